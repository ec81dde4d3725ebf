//! Check 3: sizes and SHA-256 against a manifest (written by nx-shard, hf-fetch, tok-pack or
//! `--record`), hashing in parallel; and the hashing behind `--record`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use suite_support::hash::sha256_file;
use suite_support::manifest::ManifestRecord;
use suite_support::progress::Progress;

use crate::report::{Check, Problem};

/// A file's size and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// Why a file could not be hashed: the message, and whether it is an I/O error other than a
/// missing file (the input cannot be read, rather than being wrong).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashFailure {
    /// One line.
    pub message: String,
    /// True for an I/O error other than a missing file.
    pub io: bool,
}

/// Hashes `files` (relative name, path) in parallel on the current rayon pool, with a byte
/// progress bar when `progress`.
pub fn hash_files(files: &[(String, PathBuf)], progress: bool) -> Vec<Result<Hashed, HashFailure>> {
    let sizes: Vec<u64> = files
        .iter()
        .map(|(_, p)| fs::metadata(p).map_or(0, |m| m.len()))
        .collect();
    let bar = Progress::new(sizes.iter().sum(), "sha256", progress);
    let out = files
        .par_iter()
        .zip(&sizes)
        .map(|((_, path), &bytes)| {
            let r = sha256_file(path)
                .map(|sha256| Hashed { bytes, sha256 })
                .map_err(|e| HashFailure {
                    message: format!("cannot hash: {}", e.source),
                    io: e.source.kind() != std::io::ErrorKind::NotFound,
                });
            bar.inc(bytes);
            r
        })
        .collect();
    bar.finish();
    out
}

/// What the manifest check found.
#[derive(Debug, Clone, Default)]
pub struct ManifestOutcome {
    /// Problems (sizes, digests, files missing or not listed).
    pub problems: Vec<Problem>,
    /// The files hashed, by relative path (reused by `--record`).
    pub hashed: HashMap<String, Hashed>,
    /// True if some file could not be read.
    pub unreadable: bool,
    /// Files compared with their records.
    pub files: usize,
    /// Bytes hashed.
    pub bytes: u64,
}

impl ManifestOutcome {
    /// What the check covered, for the report: files compared, records, bytes hashed.
    pub fn detail(&self, records: usize) -> String {
        format!(
            "{} files against {records} records, {} hashed",
            self.files,
            suite_support::size::format_size(self.bytes)
        )
    }
}

/// Compares the files under `base` with `records`. `must_list`: files present that the
/// manifest must describe; `known_missing`: files already reported missing (not repeated).
pub fn check(
    records: &[ManifestRecord],
    base: &Path,
    must_list: &[String],
    known_missing: &HashSet<String>,
    progress: bool,
) -> ManifestOutcome {
    let mut out = ManifestOutcome::default();
    let mut to_hash: Vec<(String, PathBuf)> = Vec::new();
    let mut expected: HashMap<&str, &ManifestRecord> = HashMap::new();
    for r in records {
        expected.insert(r.path.as_str(), r);
        let path = base.join(&r.path);
        let problem = |msg: String| Problem::file(Check::Manifest, &r.path, msg);
        match fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !known_missing.contains(&r.path) {
                    out.problems
                        .push(problem("listed in the manifest but missing".into()));
                }
            }
            Err(e) => {
                out.unreadable = true;
                out.problems.push(problem(format!("cannot read: {e}")));
            }
            Ok(m) if !m.is_file() => {
                out.problems.push(problem(
                    "listed in the manifest as a file, but is not one".into(),
                ));
            }
            Ok(m) if m.len() != r.bytes => {
                out.files += 1;
                out.problems.push(problem(format!(
                    "size {} bytes, the manifest says {} ({})",
                    m.len(),
                    r.bytes,
                    if m.len() < r.bytes {
                        "truncated"
                    } else {
                        "grown"
                    }
                )));
            }
            Ok(_) => to_hash.push((r.path.clone(), path)),
        }
    }
    let results = hash_files(&to_hash, progress);
    for ((rel, _), res) in to_hash.iter().zip(results) {
        out.files += 1;
        match res {
            Ok(h) => {
                out.bytes += h.bytes;
                if h.sha256 != expected[rel.as_str()].sha256 {
                    out.problems.push(Problem::file(
                        Check::Manifest,
                        rel,
                        "sha256 differs from the manifest: the content changed",
                    ));
                }
                out.hashed.insert(rel.clone(), h);
            }
            Err(f) => {
                out.unreadable |= f.io;
                out.problems
                    .push(Problem::file(Check::Manifest, rel, f.message));
            }
        }
    }
    for rel in must_list {
        if !expected.contains_key(rel.as_str()) {
            out.problems
                .push(Problem::file(Check::Manifest, rel, "not in the manifest"));
        }
    }
    out
}

/// Every regular file under `dir` (recursively, following symlinks), sorted, skipping entries
/// for which `skip` is true.
pub fn walk_files(dir: &Path, skip: &dyn Fn(&Path) -> bool) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let path = e?.path();
            if skip(&path) {
                continue;
            }
            let m = fs::metadata(&path)?;
            if m.is_dir() {
                stack.push(path);
            } else if m.is_file() {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn sizes_digests_missing_and_unlisted_files() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("m")).unwrap();
        fs::write(d.path().join("m/a"), b"abc").unwrap();
        fs::write(d.path().join("m/b"), b"abd").unwrap();
        fs::write(d.path().join("m/c"), b"ab").unwrap();
        let records = vec![
            ManifestRecord::new("m/a", 3, SHA_ABC),
            ManifestRecord::new("m/b", 3, SHA_ABC),
            ManifestRecord::new("m/c", 3, SHA_ABC),
            ManifestRecord::new("m/gone", 3, SHA_ABC),
            ManifestRecord::new("m/known", 3, SHA_ABC),
        ];
        let must = vec!["m/a".to_string(), "m/extra".to_string()];
        let known: HashSet<String> = ["m/known".to_string()].into();
        let out = check(&records, d.path(), &must, &known, false);
        let lines: Vec<String> = out.problems.iter().map(Problem::line).collect();
        assert_eq!(
            lines,
            vec![
                "m/c: size 2 bytes, the manifest says 3 (truncated)",
                "m/gone: listed in the manifest but missing",
                "m/b: sha256 differs from the manifest: the content changed",
                "m/extra: not in the manifest",
            ]
        );
        assert_eq!(out.files, 3);
        assert_eq!(out.bytes, 6);
        assert_eq!(out.hashed["m/a"].sha256, SHA_ABC);
        assert!(!out.unreadable);
        let files = walk_files(d.path(), &|p| p.ends_with("b")).unwrap();
        assert_eq!(files, vec![d.path().join("m/a"), d.path().join("m/c")]);
    }
}
