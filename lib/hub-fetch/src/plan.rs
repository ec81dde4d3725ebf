//! Pure planning: the tree listing becomes the list of files to fetch, each file a list of
//! byte ranges, and a resume log says which bytes of each range are already on disk.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;

use crate::error::FetchError;
use crate::paths::{check_repo_path, is_hex, PathFilter};

/// One entry of `GET /api/{type}s/{repo}/tree/{rev}?recursive=true`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct TreeEntry {
    /// `file` or `directory`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Git blob sha1 (for LFS files, of the pointer).
    #[serde(default)]
    pub oid: String,
    /// Content size.
    #[serde(default)]
    pub size: u64,
    /// Path in the repo.
    pub path: String,
    /// LFS information, for LFS and Xet files.
    #[serde(default)]
    pub lfs: Option<LfsInfo>,
}

/// The `lfs` object of a tree entry.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct LfsInfo {
    /// sha256 of the content.
    pub oid: String,
    /// Content size.
    pub size: u64,
}

/// What a file's content must hash to; its hex value is also the file's etag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Digest {
    /// sha256 of the content (LFS and Xet files).
    Sha256(String),
    /// Git blob sha1 (`sha1("blob <size>\0" + content)`, regular files).
    GitSha1(String),
}

impl Digest {
    /// The hex value: what the Hub calls the etag.
    pub fn etag(&self) -> &str {
        match self {
            Digest::Sha256(h) | Digest::GitSha1(h) => h,
        }
    }

    /// The algorithm's name, for messages.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Digest::Sha256(_) => "sha256",
            Digest::GitSha1(_) => "git blob sha1",
        }
    }
}

/// A file to have locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// Path in the repo (checked by [`check_repo_path`]).
    pub path: String,
    /// Content size.
    pub size: u64,
    /// Expected digest.
    pub digest: Digest,
}

/// Picks the files to fetch from a listing: files only, the exact `names` if any were given
/// (a name ending in `/` takes the folder), else those `filter` keeps; sorted by path.
///
/// Unsafe names among the selected files, malformed digests and a size that disagrees with
/// the LFS size are errors; a name in `names` that is not in the listing is an
/// [`FetchError::EntryNotFound`].
pub fn select_files(
    entries: &[TreeEntry],
    names: &[String],
    filter: &PathFilter,
    repo: &str,
    revision: &str,
) -> Result<Vec<RemoteFile>, FetchError> {
    let files: BTreeMap<&str, &TreeEntry> = entries
        .iter()
        .filter(|e| e.kind == "file")
        .map(|e| (e.path.as_str(), e))
        .collect();
    let mut chosen: Vec<&TreeEntry> = Vec::new();
    if names.is_empty() {
        chosen.extend(files.values().filter(|e| filter.keeps(&e.path)));
    } else {
        for name in names {
            if let Some(dir) = name.strip_suffix('/') {
                let prefix = format!("{dir}/");
                let before = chosen.len();
                chosen.extend(files.values().filter(|e| e.path.starts_with(&prefix)));
                if chosen.len() == before {
                    return Err(not_found(repo, name, revision));
                }
            } else {
                match files.get(name.as_str()) {
                    Some(e) => chosen.push(e),
                    None => return Err(not_found(repo, name, revision)),
                }
            }
        }
        chosen.sort_by(|a, b| a.path.cmp(&b.path));
        chosen.dedup_by(|a, b| a.path == b.path);
    }
    chosen.into_iter().map(remote_file).collect()
}

fn not_found(repo: &str, path: &str, revision: &str) -> FetchError {
    FetchError::EntryNotFound {
        repo: repo.into(),
        path: path.into(),
        revision: revision.into(),
    }
}

fn remote_file(e: &TreeEntry) -> Result<RemoteFile, FetchError> {
    check_repo_path(&e.path)?;
    let bad = |detail: String| FetchError::Inconsistent {
        path: e.path.clone(),
        detail,
    };
    let digest = match &e.lfs {
        Some(lfs) => {
            if !is_hex(&lfs.oid, 64) {
                return Err(bad(format!("LFS oid {:?} is not a sha256", lfs.oid)));
            }
            if lfs.size != e.size {
                return Err(bad(format!(
                    "listing size {} differs from LFS size {}",
                    e.size, lfs.size
                )));
            }
            Digest::Sha256(lfs.oid.clone())
        }
        None => {
            if !is_hex(&e.oid, 40) {
                return Err(bad(format!("blob id {:?} is not a sha1", e.oid)));
            }
            Digest::GitSha1(e.oid.clone())
        }
    };
    Ok(RemoteFile {
        path: e.path.clone(),
        size: e.size,
        digest,
    })
}

/// The smallest range size [`effective_chunk`] picks by itself.
pub const MIN_CHUNK: u64 = 1 << 20;

/// The range size for a file: `requested`, but small enough that the file is cut into at least
/// 16 ranges (whole MiB, at least [`MIN_CHUNK`]), so a file a few times the range size still
/// spreads over many connections. Depends only on the size and `requested`, so a rerun cuts
/// the file the same way and resumes.
pub fn effective_chunk(size: u64, requested: u64) -> u64 {
    let spread = size.div_ceil(16).div_ceil(MIN_CHUNK).max(1) * MIN_CHUNK;
    requested.min(spread).max(1)
}

/// Splits `0..size` into ranges of `chunk` bytes (the last one shorter); an empty file is one
/// empty range, so every file has at least one.
pub fn chunk_ranges(size: u64, chunk: u64) -> Vec<Range<u64>> {
    let chunk = chunk.max(1);
    if size == 0 {
        return std::iter::once(0..0).collect();
    }
    (0..size.div_ceil(chunk))
        .map(|i| i * chunk..((i + 1) * chunk).min(size))
        .collect()
}

/// The first line of a resume log, which ties it to one content (etag), size and chunking.
pub fn resume_header(etag: &str, size: u64, chunk: u64) -> String {
    format!("hf-fetch-partial v1 {etag} {size} {chunk}\n")
}

/// Progress records of a resume log: `<chunk index> <bytes done in the chunk>\n`.
pub fn resume_record(index: usize, done: u64) -> String {
    format!("{index} {done}\n")
}

/// Reads a resume log: for each of the `ranges`, how many bytes from its start are on disk.
/// `None` if the header does not match (another content, size or chunking: start over).
/// A torn last line (a kill during the append) and records out of range are ignored.
pub fn parse_resume(text: &str, header: &str, ranges: &[Range<u64>]) -> Option<Vec<u64>> {
    let body = text.strip_prefix(header)?;
    let mut done = vec![0u64; ranges.len()];
    for line in body.split_inclusive('\n') {
        let Some(line) = line.strip_suffix('\n') else {
            break;
        };
        let mut parts = line.split(' ');
        let (Some(i), Some(d), None) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(i), Ok(d)) = (i.parse::<usize>(), d.parse::<u64>()) else {
            continue;
        };
        if let Some(r) = ranges.get(i) {
            if d <= r.end - r.start {
                done[i] = done[i].max(d);
            }
        }
    }
    Some(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(path: &str, size: u64, lfs: bool) -> TreeEntry {
        TreeEntry {
            kind: "file".into(),
            oid: "a".repeat(40),
            size,
            path: path.into(),
            lfs: lfs.then(|| LfsInfo {
                oid: "b".repeat(64),
                size,
            }),
        }
    }

    #[test]
    fn selection() {
        let mut dir = entry("sub", 0, false);
        dir.kind = "directory".into();
        let entries = vec![
            entry("model.safetensors", 100, true),
            entry("config.json", 10, false),
            dir,
            entry("sub/notes.txt", 3, false),
        ];
        let all = PathFilter::new(&[], &[]).unwrap();
        let files = select_files(&entries, &[], &all, "o/r", "main").unwrap();
        let paths: Vec<_> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["config.json", "model.safetensors", "sub/notes.txt"]);
        assert_eq!(files[1].digest, Digest::Sha256("b".repeat(64)));
        assert_eq!(files[0].digest, Digest::GitSha1("a".repeat(40)));
        let json = PathFilter::new(&["*.json".into()], &[]).unwrap();
        assert_eq!(
            select_files(&entries, &[], &json, "o/r", "main")
                .unwrap()
                .len(),
            1
        );
        let named = select_files(
            &entries,
            &["sub/".into(), "config.json".into()],
            &all,
            "o/r",
            "main",
        )
        .unwrap();
        assert_eq!(named.len(), 2);
        let missing = select_files(&entries, &["nope".into()], &all, "o/r", "main");
        assert!(matches!(missing, Err(FetchError::EntryNotFound { .. })));
    }

    #[test]
    fn bad_listings_are_refused() {
        let all = PathFilter::new(&[], &[]).unwrap();
        for e in [entry("../evil", 1, false), entry("/abs", 1, false)] {
            assert!(matches!(
                select_files(&[e], &[], &all, "o/r", "main"),
                Err(FetchError::UnsafePath { .. })
            ));
        }
        let mut e = entry("x.bin", 5, true);
        e.lfs.as_mut().unwrap().size = 6;
        assert!(select_files(&[e], &[], &all, "o/r", "main").is_err());
        let mut e = entry("x.txt", 5, false);
        e.oid = "zz".into();
        assert!(select_files(&[e], &[], &all, "o/r", "main").is_err());
        // An unsafe name that is excluded is simply not fetched.
        let only = PathFilter::new(&["*.json".into()], &[]).unwrap();
        assert!(
            select_files(&[entry("../x", 1, false)], &[], &only, "o/r", "main")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn resume_log() {
        let ranges = chunk_ranges(25, 10);
        let h = resume_header("e", 25, 10);
        let text = format!("{h}0 4\n0 10\n2 5\n1 3\n9 9\n2 99\n1 7");
        assert_eq!(parse_resume(&text, &h, &ranges), Some(vec![10, 3, 5]));
        assert_eq!(
            parse_resume(&text, &resume_header("f", 25, 10), &ranges),
            None
        );
        assert_eq!(parse_resume(&h, &h, &ranges), Some(vec![0, 0, 0]));
    }

    #[test]
    fn chunk_choice() {
        assert_eq!(effective_chunk(1 << 30, 32 << 20), 32 << 20);
        assert_eq!(effective_chunk(64 << 20, 32 << 20), 4 << 20);
        assert_eq!(effective_chunk(24 << 20, 2 << 20), 2 << 20);
        assert_eq!(effective_chunk(6 << 20, 1 << 20), 1 << 20);
        assert_eq!(effective_chunk(100, 32 << 20), 1 << 20);
        assert_eq!(effective_chunk(0, 32 << 20), 1 << 20);
        assert_eq!(effective_chunk(1 << 30, 1000), 1000);
    }

    proptest! {
        #[test]
        fn chunks_tile_the_file(size in 0u64..10_000, chunk in 1u64..3_000) {
            let r = chunk_ranges(size, chunk);
            prop_assert_eq!(r[0].start, 0);
            prop_assert_eq!(r.last().unwrap().end, size);
            for w in r.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
            }
            for x in &r {
                prop_assert!(x.end - x.start <= chunk);
                prop_assert!(size == 0 || x.end > x.start);
            }
        }
    }
}
