//! Repo ids, repo file names, URL quoting and include/exclude patterns (all pure).

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::error::FetchError;

/// Checks a repo file name before it becomes a local path: relative, `/`-separated, no empty,
/// `.` or `..` component, no backslash, control character or NUL, no `.git` or
/// `.cache/huggingface` directory (where the tool keeps its own state), at most 4096 bytes.
pub fn check_repo_path(path: &str) -> Result<(), FetchError> {
    let refuse = |reason| {
        Err(FetchError::UnsafePath {
            path: path.to_string(),
            reason,
        })
    };
    if path.is_empty() {
        return refuse("empty name");
    }
    if path.len() > 4096 {
        return refuse("longer than 4096 bytes");
    }
    if path.starts_with('/') {
        return refuse("absolute path");
    }
    if path.contains('\\') {
        return refuse("contains a backslash");
    }
    if path.chars().any(|c| c.is_control()) {
        return refuse("contains a control character");
    }
    let components: Vec<&str> = path.split('/').collect();
    for c in &components {
        match *c {
            "" => return refuse("empty path component"),
            "." => return refuse("`.` path component"),
            ".." => return refuse("`..` path component (would escape the output directory)"),
            _ if c.len() > 255 => return refuse("a path component longer than 255 bytes"),
            _ => {}
        }
    }
    if components[0] == ".git"
        || (components.len() > 1 && components[0] == ".cache" && components[1] == "huggingface")
    {
        return refuse("inside .git or .cache/huggingface");
    }
    Ok(())
}

/// Checks a repo id: `name` or `namespace/name`, each part of ASCII letters, digits, `-`, `_`
/// and `.`, not starting or ending with `-` or `.`, without `--` or `..`, at most 96 characters.
pub fn check_repo_id(id: &str) -> Result<(), FetchError> {
    let bad = |why: &str| {
        Err(FetchError::Usage(format!(
            "invalid repo id {id:?}: {why} (expected NAME or NAMESPACE/NAME)"
        )))
    };
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 {
        return bad("more than one `/`");
    }
    if id.len() > 96 {
        return bad("longer than 96 characters");
    }
    for p in parts {
        if p.is_empty() {
            return bad("empty part");
        }
        if !p
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return bad("only letters, digits, `-`, `_` and `.` are allowed");
        }
        if p.starts_with(['-', '.'])
            || p.ends_with(['-', '.'])
            || p.contains("--")
            || p.contains("..")
        {
            return bad("`-` or `.` at an end, or `--`/`..`");
        }
    }
    Ok(())
}

/// Percent-encodes `s` as Python's `urllib.parse.quote(s, safe=safe)`: letters, digits, `_.-~`
/// and the characters of `safe` are kept.
pub fn quote(s: &str, safe: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) || safe.as_bytes().contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether `s` is a full commit id (40 lowercase hex digits).
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `s` is `len` lowercase hex digits.
pub fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `--include`/`--exclude` as huggingface_hub matches them: `fnmatch` on the whole path,
/// case-sensitive, `*` crossing `/`; `\` becomes `/` and a trailing `/` gets `*`.
#[derive(Debug, Clone)]
pub struct PathFilter {
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
}

fn build(patterns: &[String]) -> Result<Option<GlobSet>, FetchError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        let mut p = p.replace('\\', "/");
        if p.ends_with('/') {
            p.push('*');
        }
        let glob = GlobBuilder::new(&p)
            .literal_separator(false)
            .backslash_escape(false)
            .build()
            .map_err(|e| FetchError::Usage(format!("bad pattern {p:?}: {e}")))?;
        set.add(glob);
    }
    set.build()
        .map(Some)
        .map_err(|e| FetchError::Usage(format!("bad patterns: {e}")))
}

impl PathFilter {
    /// A filter keeping paths that match any `include` (all if none) and no `exclude`.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self, FetchError> {
        Ok(PathFilter {
            include: build(include)?,
            exclude: build(exclude)?,
        })
    }

    /// Whether `path` is kept.
    pub fn keeps(&self, path: &str) -> bool {
        self.include.as_ref().is_none_or(|s| s.is_match(path))
            && !self.exclude.as_ref().is_some_and(|s| s.is_match(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_names_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/",
            "a\\b",
            "a\nb",
            "a\0b",
            ".git/config",
            ".cache/huggingface/download/x.metadata",
        ] {
            assert!(check_repo_path(bad).is_err(), "{bad:?}");
        }
        for good in [
            "config.json",
            "sub/deeper/weird name (1).txt",
            "..hidden",
            "a..b",
            ".gitattributes",
            ".cache/other",
            "ünïcode.txt",
        ] {
            assert!(check_repo_path(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn repo_ids() {
        for good in ["gpt2", "meta-llama/Llama-3.1-8B", "org/tiny_model.v2"] {
            assert!(check_repo_id(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a/b/c",
            "../x",
            "a/..",
            "org/na me",
            "-a/b",
            "a--b/c",
            "/x",
        ] {
            assert!(check_repo_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quoting_matches_python() {
        assert_eq!(
            quote("sub/deeper/weird name (1).txt", "/"),
            "sub/deeper/weird%20name%20%281%29.txt"
        );
        assert_eq!(quote("refs/pr/1", ""), "refs%2Fpr%2F1");
        assert_eq!(quote("é", "/"), "%C3%A9");
    }

    #[test]
    fn patterns_like_fnmatch() {
        let f = PathFilter::new(&["*.json".into(), "sub/".into()], &["*notes*".into()]).unwrap();
        assert!(f.keeps("config.json"));
        assert!(f.keeps("data/a/b.json"));
        assert!(f.keeps("sub/deeper/weird name (1).txt"));
        assert!(!f.keeps("sub/notes.txt"));
        assert!(!f.keeps("model.safetensors"));
        assert!(!f.keeps("CONFIG.JSON"));
        let all = PathFilter::new(&[], &[]).unwrap();
        assert!(all.keeps("anything/at/all"));
        let q = PathFilter::new(&["model-0000?-of-*.safetensors".into()], &[]).unwrap();
        assert!(q.keeps("model-00001-of-00002.safetensors"));
        assert!(!q.keeps("model.safetensors"));
    }
}
