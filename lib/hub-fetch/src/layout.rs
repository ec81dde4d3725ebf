//! Where files go: a `--local-dir` with huggingface_hub's `.cache/huggingface/download/*.metadata`
//! files, or the Hugging Face cache (`blobs/`, `snapshots/`, `refs/`).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use sha1::{Digest as _, Sha1};
use suite_support::atomic::atomic_write;

use crate::plan::RemoteFile;

/// What `CACHEDIR.TAG` holds.
pub const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n# This file is a cache directory tag created by huggingface_hub.\n# For information about cache directory tags, see:\n#\thttps://bford.info/cachedir/\n";

/// Suffix of the files being downloaded (never a final name).
pub const PARTIAL_SUFFIX: &str = ".hf-fetch.partial";
/// Suffix of the resume log next to a partial file.
pub const RESUME_SUFFIX: &str = ".hf-fetch.resume";

/// The kind of repo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoType {
    /// A model.
    Model,
    /// A dataset.
    Dataset,
    /// A Space.
    Space,
}

impl RepoType {
    /// `models`, `datasets`, `spaces`: the API path part and cache folder prefix.
    pub fn plural(self) -> &'static str {
        match self {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
            RepoType::Space => "spaces",
        }
    }

    /// The prefix of `/resolve` URLs: empty, `datasets/` or `spaces/`.
    pub fn url_prefix(self) -> &'static str {
        match self {
            RepoType::Model => "",
            RepoType::Dataset => "datasets/",
            RepoType::Space => "spaces/",
        }
    }
}

/// The cache folder of a repo: `models--org--name`.
pub fn repo_folder_name(repo_type: RepoType, repo: &str) -> String {
    format!("{}--{}", repo_type.plural(), repo.replace('/', "--"))
}

/// huggingface_hub's short name for the temporary files of `basename`:
/// `urlsafe_b64encode(sha1("<basename>.metadata"))`, padded.
pub fn short_name(basename: &str) -> String {
    let digest = Sha1::digest(format!("{basename}.metadata").as_bytes());
    base64::engine::general_purpose::URL_SAFE.encode(digest)
}

/// The three lines of a `.metadata` file: commit, etag, timestamp (seconds since the epoch).
pub fn format_metadata(commit: &str, etag: &str, timestamp: f64) -> String {
    format!("{commit}\n{etag}\n{timestamp:?}\n")
}

/// Parses a `.metadata` file into (commit, etag, timestamp).
pub fn parse_metadata(text: &str) -> Option<(String, String, f64)> {
    let mut lines = text.lines();
    let commit = lines.next()?.trim().to_string();
    let etag = lines.next()?.trim().to_string();
    let ts = lines.next()?.trim().parse::<f64>().ok()?;
    Some((commit, etag, ts))
}

/// The relative symlink target from `snapshots/<commit>/<path>` to `blobs/<etag>`.
pub fn snapshot_link_target(path: &str, etag: &str) -> PathBuf {
    let depth = path.matches('/').count();
    let mut target = String::from("../../");
    for _ in 0..depth {
        target.push_str("../");
    }
    target.push_str("blobs/");
    target.push_str(etag);
    PathBuf::from(target)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What is already on disk for a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Present {
    /// Complete and known good (metadata or the content-addressed blob says so).
    Complete,
    /// A file of the right size is there without proof: hash it to decide.
    Unverified,
    /// Nothing usable.
    Missing,
}

/// The output layout.
#[derive(Debug, Clone)]
pub enum Layout {
    /// `--local-dir`: real files, with `.cache/huggingface/download/<path>.metadata`.
    LocalDir {
        /// The directory.
        root: PathBuf,
    },
    /// The Hugging Face cache.
    Cache {
        /// `<cache>/models--org--name`.
        repo_dir: PathBuf,
    },
}

impl Layout {
    /// The cache layout for a repo under `cache`.
    pub fn cache(cache: &Path, repo_type: RepoType, repo: &str) -> Layout {
        Layout::Cache {
            repo_dir: cache.join(repo_folder_name(repo_type, repo)),
        }
    }

    /// The directory holding the files under their repo paths.
    pub fn output_dir(&self, commit: &str) -> PathBuf {
        match self {
            Layout::LocalDir { root } => root.clone(),
            Layout::Cache { repo_dir } => repo_dir.join("snapshots").join(commit),
        }
    }

    /// Where the manifest goes unless `--manifest` says otherwise.
    pub fn default_manifest(&self, commit: &str) -> PathBuf {
        match self {
            Layout::LocalDir { root } => root.join(".cache/huggingface/hf-fetch.manifest.jsonl"),
            Layout::Cache { repo_dir } => {
                repo_dir.join(format!("hf-fetch.{commit}.manifest.jsonl"))
            }
        }
    }

    fn metadata_path(root: &Path, path: &str) -> PathBuf {
        root.join(".cache/huggingface/download")
            .join(format!("{path}.metadata"))
    }

    /// The final location of a file's content (for the cache, its blob).
    pub fn content_path(&self, file: &RemoteFile) -> PathBuf {
        match self {
            Layout::LocalDir { root } => root.join(&file.path),
            Layout::Cache { repo_dir } => repo_dir.join("blobs").join(file.digest.etag()),
        }
    }

    /// The partial file a download writes into (its resume log is this plus `.hf-fetch.resume`).
    pub fn partial_path(&self, file: &RemoteFile) -> PathBuf {
        let etag = file.digest.etag();
        match self {
            Layout::LocalDir { root } => {
                let (dir, base) = match file.path.rsplit_once('/') {
                    Some((d, b)) => (Some(d), b),
                    None => (None, file.path.as_str()),
                };
                let mut p = root.join(".cache/huggingface/download");
                if let Some(d) = dir {
                    p.push(d);
                }
                p.join(format!("{}.{etag}{PARTIAL_SUFFIX}", short_name(base)))
            }
            Layout::Cache { repo_dir } => repo_dir
                .join("blobs")
                .join(format!("{etag}{PARTIAL_SUFFIX}")),
        }
    }

    /// The lock file a run holds while it writes into the layout.
    pub fn lock_path(&self) -> PathBuf {
        match self {
            Layout::LocalDir { root } => root.join(".cache/huggingface/hf-fetch.lock"),
            Layout::Cache { repo_dir } => repo_dir.join(".hf-fetch.lock"),
        }
    }

    /// Takes the layout's run lock (an exclusive `flock`, released when the file is closed, also
    /// when the process dies), so that two runs never write the same partial files. `Ok(Err(pid))`:
    /// another process holds it (its pid, if it wrote one).
    pub fn lock(&self) -> io::Result<Result<fs::File, Option<u32>>> {
        use std::io::{Read, Seek};
        use std::os::fd::AsRawFd;
        let path = self.lock_path();
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        // SAFETY: a plain syscall on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Ok(Err(text.trim().parse().ok()));
        }
        file.set_len(0)?;
        file.seek(io::SeekFrom::Start(0))?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Ok(file))
    }

    /// Creates the layout's directories and marker files; in the cache also `refs/<revision>`
    /// when the revision is a name.
    pub fn prepare(&self, commit: &str, revision: &str) -> io::Result<()> {
        match self {
            Layout::LocalDir { root } => {
                let hf = root.join(".cache/huggingface");
                fs::create_dir_all(hf.join("download"))?;
                let gitignore = hf.join(".gitignore");
                if !gitignore.exists() {
                    atomic_write(&gitignore, b"*")?;
                }
                let tag = hf.join("CACHEDIR.TAG");
                if !tag.exists() {
                    atomic_write(&tag, CACHEDIR_TAG.as_bytes())?;
                }
            }
            Layout::Cache { repo_dir } => {
                fs::create_dir_all(repo_dir.join("blobs"))?;
                fs::create_dir_all(repo_dir.join("snapshots").join(commit))?;
                if let Some(cache) = repo_dir.parent() {
                    let tag = cache.join("CACHEDIR.TAG");
                    if !tag.exists() {
                        atomic_write(&tag, CACHEDIR_TAG.as_bytes())?;
                    }
                }
                if revision != commit {
                    let r = repo_dir.join("refs").join(revision);
                    fs::create_dir_all(r.parent().unwrap_or(repo_dir))?;
                    let current = fs::read_to_string(&r).ok();
                    if current.as_deref() != Some(commit) {
                        atomic_write(&r, commit.as_bytes())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the file is already there (never hashes: see [`Present::Unverified`]).
    pub fn present(&self, commit: &str, file: &RemoteFile) -> Present {
        let content = self.content_path(file);
        let Ok(meta) = fs::metadata(&content) else {
            return Present::Missing;
        };
        if !meta.is_file() || meta.len() != file.size {
            return Present::Missing;
        }
        match self {
            Layout::Cache { .. } => {
                // Blobs are content-addressed and only ever renamed in after verification.
                let _ = commit;
                Present::Complete
            }
            Layout::LocalDir { root } => {
                let md = fs::read_to_string(Self::metadata_path(root, &file.path))
                    .ok()
                    .and_then(|t| parse_metadata(&t));
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
                    .map_or(f64::MAX, |d| d.as_secs_f64());
                match md {
                    Some((_, etag, ts)) if etag == file.digest.etag() && mtime - 1.0 <= ts => {
                        Present::Complete
                    }
                    _ => Present::Unverified,
                }
            }
        }
    }

    /// Makes a complete file visible: renames `partial` (if given) to its final place and writes
    /// the metadata (local dir) or the snapshot symlink (cache).
    pub fn publish(
        &self,
        commit: &str,
        file: &RemoteFile,
        partial: Option<&Path>,
    ) -> io::Result<()> {
        let content = self.content_path(file);
        if let Some(partial) = partial {
            if let Some(parent) = content.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::File::open(partial)?.sync_all()?;
            if let Ok(m) = fs::symlink_metadata(&content) {
                if m.is_dir() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} is a directory", content.display()),
                    ));
                }
            }
            fs::rename(partial, &content)?;
            if let Some(parent) = content.parent() {
                fs::File::open(parent)?.sync_all()?;
            }
        }
        match self {
            Layout::LocalDir { root } => {
                let md = Self::metadata_path(root, &file.path);
                if let Some(parent) = md.parent() {
                    fs::create_dir_all(parent)?;
                }
                let text = format_metadata(commit, file.digest.etag(), now());
                let mut f = fs::File::create(&md)?;
                f.write_all(text.as_bytes())?;
            }
            Layout::Cache { repo_dir } => {
                let link = repo_dir.join("snapshots").join(commit).join(&file.path);
                if let Some(parent) = link.parent() {
                    fs::create_dir_all(parent)?;
                }
                let target = snapshot_link_target(&file.path, file.digest.etag());
                if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
                    let _ = fs::remove_file(&link);
                    std::os::unix::fs::symlink(&target, &link)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Digest;

    #[test]
    fn names_like_huggingface_hub() {
        assert_eq!(
            repo_folder_name(RepoType::Model, "org/name"),
            "models--org--name"
        );
        assert_eq!(repo_folder_name(RepoType::Dataset, "d"), "datasets--d");
        assert_eq!(short_name("config.json").len(), 28);
        assert!(short_name("config.json").ends_with('='));
        assert_eq!(
            snapshot_link_target("sub/deeper/x.txt", "ab"),
            PathBuf::from("../../../../blobs/ab")
        );
        assert_eq!(
            snapshot_link_target("m.bin", "ab"),
            PathBuf::from("../../blobs/ab")
        );
    }

    #[test]
    fn metadata_round_trip() {
        let c = "c".repeat(40);
        let t = format_metadata(&c, "e", 1795374299.7517009);
        assert_eq!(t, format!("{c}\ne\n1795374299.7517009\n"));
        assert_eq!(
            parse_metadata(&t),
            Some((c, "e".into(), 1795374299.7517009))
        );
        assert_eq!(format_metadata("a", "b", 5.0), "a\nb\n5.0\n");
        assert!(parse_metadata("a\nb\n").is_none());
    }

    #[test]
    fn local_dir_publish_and_presence() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::LocalDir {
            root: dir.path().to_path_buf(),
        };
        let file = RemoteFile {
            path: "sub/a.txt".into(),
            size: 3,
            digest: Digest::GitSha1("f".repeat(40)),
        };
        let commit = "1".repeat(40);
        layout.prepare(&commit, "main").unwrap();
        assert_eq!(layout.present(&commit, &file), Present::Missing);
        let partial = layout.partial_path(&file);
        fs::create_dir_all(partial.parent().unwrap()).unwrap();
        fs::write(&partial, b"abc").unwrap();
        layout.publish(&commit, &file, Some(&partial)).unwrap();
        assert_eq!(fs::read(dir.path().join("sub/a.txt")).unwrap(), b"abc");
        assert_eq!(layout.present(&commit, &file), Present::Complete);
        fs::remove_file(
            dir.path()
                .join(".cache/huggingface/download/sub/a.txt.metadata"),
        )
        .unwrap();
        assert_eq!(layout.present(&commit, &file), Present::Unverified);
    }
}
