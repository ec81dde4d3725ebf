//! Downloads from the Hugging Face Hub for `hf-fetch`: fast (files and byte ranges in
//! parallel), resumable (a resume log keyed to the content's etag survives `kill -9`),
//! verified (sha256 or git blob sha1 of every byte before a file gets its final name), into a
//! `--local-dir` or the Hugging Face cache, laid out so `huggingface_hub` and `transformers`
//! use the files as their own.
//!
//! * [`plan`]: pure: listing -> files -> byte ranges; the resume log format.
//! * [`paths`]: pure: repo ids, file names, URL quoting, include/exclude patterns.
//! * [`config`]: the Hugging Face environment variables and the token.
//! * [`layout`]: local-dir and cache layouts, `.metadata` files.
//! * [`hub`]: the Hub HTTP API, error mapping and retries.
//! * [`download`]: the executor.
#![warn(missing_docs)]

pub mod config;
pub mod download;
pub mod error;
pub mod hub;
pub mod layout;
pub mod paths;
pub mod plan;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use suite_support::hash::sha256_file;
use suite_support::manifest::{ManifestRecord, ManifestTarget};
use suite_support::progress::Progress;
use tokio::sync::mpsc;

pub use config::{HubEnv, Token};
pub use error::FetchError;
pub use layout::{Layout, RepoType};

use crate::download::{kick, open_job, units_of, worker, Ctx};
use crate::hub::Hub;
use crate::layout::{parse_metadata, Present};
use crate::paths::{check_repo_id, check_repo_path, is_commit, PathFilter};
use crate::plan::{select_files, Digest, RemoteFile};

/// Default size of the byte ranges a large file is cut into.
pub const DEFAULT_CHUNK: u64 = 16 << 20;
/// Default number of connections.
pub const DEFAULT_CONNECTIONS: usize = 16;

/// Where the files go.
#[derive(Debug, Clone)]
pub enum Target {
    /// `--local-dir DIR`.
    LocalDir(PathBuf),
    /// The cache at this directory (`--cache-dir`, else `HF_HUB_CACHE`).
    Cache(PathBuf),
}

/// What to fetch and how.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// `namespace/name`.
    pub repo: String,
    /// Model, dataset or space.
    pub repo_type: RepoType,
    /// Branch, tag or commit.
    pub revision: String,
    /// Exact file names (a name ending in `/` takes a folder); empty means all.
    pub files: Vec<String>,
    /// `--include` patterns.
    pub include: Vec<String>,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
    /// Output layout.
    pub target: Target,
    /// The environment (endpoint, token, offline, timeouts).
    pub env: HubEnv,
    /// Concurrent connections.
    pub connections: usize,
    /// Byte-range size.
    pub chunk_size: u64,
    /// Where the manifest goes.
    pub manifest: ManifestTarget,
    /// Only print the plan.
    pub dry_run: bool,
    /// Show a progress bar (subject to the terminal and `HF_HUB_DISABLE_PROGRESS_BARS`).
    pub progress: bool,
}

/// What a fetch did.
#[derive(Debug, Clone)]
pub struct FetchReport {
    /// The commit the files come from.
    pub commit: String,
    /// The directory holding the files under their repo paths.
    pub output_dir: PathBuf,
    /// One record per file, sorted by path.
    pub records: Vec<ManifestRecord>,
    /// Files downloaded (or resumed) by this run.
    pub downloaded: usize,
    /// Bytes transferred by this run (resumed bytes excluded).
    pub bytes_downloaded: u64,
    /// With `dry_run`: one line per file (`download|resume|keep <path> <bytes>`).
    pub plan: Vec<String>,
}

/// Runs a fetch to completion on its own runtime. Ctrl-C stops it with
/// [`FetchError::Interrupted`], keeping partial files for the next run.
pub fn fetch(opts: &FetchOptions) -> Result<FetchReport, FetchError> {
    check_repo_id(&opts.repo)?;
    for f in &opts.files {
        check_repo_path(f.trim_end_matches('/'))?;
    }
    if opts.connections == 0 || opts.chunk_size == 0 {
        return Err(FetchError::Usage(
            "--jobs and --chunk-size must be positive".into(),
        ));
    }
    let layout = match &opts.target {
        Target::LocalDir(d) => Layout::LocalDir { root: d.clone() },
        Target::Cache(c) => Layout::cache(c, opts.repo_type, &opts.repo),
    };
    if opts.env.offline {
        return offline(opts, &layout);
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| FetchError::io("<tokio runtime>", e))?;
    let result = rt.block_on(async {
        tokio::select! {
            r = online(opts, layout) => r,
            _ = tokio::signal::ctrl_c() => Err(FetchError::Interrupted),
        }
    });
    // After an interrupt or an error, hashers of unfinished files may still be waiting for
    // bytes: do not wait for them (what is on disk is resumable as it is).
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    result
}

fn sha256_of(path: &Path) -> Result<String, FetchError> {
    sha256_file(path).map_err(|e| FetchError::io(path, std::io::Error::other(e.to_string())))
}

/// Hashes an existing file with the file's algorithm; returns (matches, sha256).
fn check_existing(path: &Path, file: &RemoteFile) -> Result<(bool, String), FetchError> {
    use sha1::Digest as _;
    let sha256 = sha256_of(path)?;
    match &file.digest {
        Digest::Sha256(h) => Ok((*h == sha256, sha256)),
        Digest::GitSha1(h) => {
            let mut g = sha1::Sha1::new();
            g.update(format!("blob {}\0", file.size).as_bytes());
            let mut f = std::fs::File::open(path).map_err(|e| FetchError::io(path, e))?;
            std::io::copy(&mut f, &mut HashWriter(&mut g)).map_err(|e| FetchError::io(path, e))?;
            Ok((hex::encode(g.finalize()) == *h, sha256))
        }
    }
}

struct HashWriter<'a>(&'a mut sha1::Sha1);
impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        sha1::Digest::update(self.0, b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn record(file: &RemoteFile, sha256: String, commit: &str) -> ManifestRecord {
    ManifestRecord::new(file.path.clone(), file.size, sha256)
        .with_extra("commit", commit.to_string())
}

async fn online(opts: &FetchOptions, layout: Layout) -> Result<FetchReport, FetchError> {
    let env = &opts.env;
    let hub = Hub::new(
        &env.endpoint,
        env.token.clone(),
        &opts.repo,
        opts.repo_type,
        env.read_timeout,
        env.etag_timeout.max(env.read_timeout) * 3,
        opts.connections,
    )?;
    let commit = hub.commit(&opts.revision).await?;
    let entries = hub.tree(&commit).await?;
    let filter = PathFilter::new(&opts.include, &opts.exclude)?;
    let files = select_files(&entries, &opts.files, &filter, &opts.repo, &opts.revision)?;
    let output_dir = layout.output_dir(&commit);
    // Held until the run ends.
    let _lock = if opts.dry_run {
        None
    } else {
        layout
            .prepare(&commit, &opts.revision)
            .map_err(|e| FetchError::io(&output_dir, e))?;
        let lock = layout
            .lock()
            .map_err(|e| FetchError::io(layout.lock_path(), e))?;
        Some(lock.map_err(|pid| FetchError::Busy {
            dir: output_dir.clone(),
            holder: pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        })?)
    };

    // What is already there.
    let mut records = Vec::new();
    let mut plan = Vec::new();
    let mut todo: Vec<RemoteFile> = Vec::new();
    for file in files {
        let present = layout.present(&commit, &file);
        let keep = match present {
            Present::Complete => {
                let sha = match &file.digest {
                    Digest::Sha256(h) => h.clone(),
                    Digest::GitSha1(_) => sha256_of(&layout.content_path(&file))?,
                };
                Some(sha)
            }
            Present::Unverified => {
                let (ok, sha) = check_existing(&layout.content_path(&file), &file)?;
                ok.then_some(sha)
            }
            Present::Missing => None,
        };
        match keep {
            Some(sha) => {
                if !opts.dry_run {
                    layout
                        .publish(&commit, &file, None)
                        .map_err(|e| FetchError::io(layout.content_path(&file), e))?;
                }
                plan.push(format!("keep {} {}", file.path, file.size));
                records.push(record(&file, sha, &commit));
            }
            None => todo.push(file),
        }
    }
    if opts.dry_run {
        for f in &todo {
            let partial = layout.partial_path(f);
            let verb = if partial.exists() {
                "resume"
            } else {
                "download"
            };
            plan.push(format!("{verb} {} {}", f.path, f.size));
        }
        plan.sort_by(|a, b| a.split(' ').nth(1).cmp(&b.split(' ').nth(1)));
        records.sort_by(|a, b| a.path.cmp(&b.path));
        return Ok(FetchReport {
            commit,
            output_dir,
            records,
            downloaded: 0,
            bytes_downloaded: 0,
            plan,
        });
    }

    // Same content twice in the cache is one blob: one download, several links.
    let mut groups: BTreeMap<String, Vec<RemoteFile>> = BTreeMap::new();
    let mut order = Vec::new();
    for f in todo {
        let key = match &layout {
            Layout::Cache { .. } => f.digest.etag().to_string(),
            Layout::LocalDir { .. } => f.path.clone(),
        };
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(f);
    }

    // Resolve every file (HEAD), a few at a time.
    let sem = Arc::new(tokio::sync::Semaphore::new(opts.connections.min(16)));
    let mut set = tokio::task::JoinSet::new();
    for (i, key) in order.iter().enumerate() {
        let f = groups[key][0].clone();
        let (hub, commit, sem) = (hub.clone(), commit.clone(), sem.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            (i, hub.resolve(&commit, &f.path).await)
        });
    }
    let mut resolved = HashMap::new();
    while let Some(r) = set.join_next().await {
        let (i, r) = r.map_err(|e| FetchError::Protocol {
            what: "resolving".into(),
            detail: e.to_string(),
        })?;
        resolved.insert(i, r?);
    }

    let mut jobs = Vec::new();
    let mut units = Vec::new();
    let mut total = 0u64;
    let mut have = 0u64;
    for (i, key) in order.iter().enumerate() {
        let mut fs = groups.remove(key).unwrap_or_default();
        let file = fs.remove(0);
        let r = resolved.remove(&i).expect("every file was resolved");
        if let Some(size) = r.size {
            if size != file.size {
                return Err(FetchError::Inconsistent {
                    path: file.path.clone(),
                    detail: format!("the listing says {} bytes, /resolve says {size}", file.size),
                });
            }
        }
        if let Some(etag) = &r.etag {
            if etag != file.digest.etag() {
                return Err(FetchError::Inconsistent {
                    path: file.path.clone(),
                    detail: format!(
                        "the listing says etag {}, /resolve says {etag}",
                        file.digest.etag()
                    ),
                });
            }
        }
        total += file.size;
        let (job, starts, done) = open_job(&layout, file, fs, r, opts.chunk_size)?;
        have += done;
        units.extend(units_of(&job, &starts));
        jobs.push((job, starts.is_empty()));
    }
    let n_jobs = jobs.len();
    let progress = Progress::new(total, "hf-fetch", opts.progress && !env.disable_progress);
    progress.inc(have);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(Ctx::new(
        hub,
        layout,
        commit.clone(),
        progress.clone(),
        units,
        tx,
    ));
    for (job, complete) in &jobs {
        if *complete {
            kick(&ctx, job);
        }
    }
    let workers: Vec<_> = (0..opts.connections)
        .map(|_| tokio::spawn(worker(ctx.clone())))
        .collect();
    let mut first_error = None;
    for _ in 0..n_jobs {
        match rx.recv().await {
            Some(Ok(rs)) => records.extend(rs),
            Some(Err(Some(e))) => {
                if first_error.is_none() {
                    first_error = Some(e);
                }
            }
            Some(Err(None)) => {}
            None => break,
        }
    }
    ctx.abort();
    for w in workers {
        let _ = w.await;
    }
    progress.finish();
    if let Some(e) = first_error {
        return Err(e);
    }
    if records.len() < n_jobs {
        return Err(FetchError::Interrupted);
    }
    records.sort_by(|a, b| a.path.cmp(&b.path));
    opts.manifest
        .write(&ctx.layout.default_manifest(&commit), &records)?;
    Ok(FetchReport {
        commit,
        output_dir,
        records,
        downloaded: n_jobs,
        bytes_downloaded: total - have,
        plan,
    })
}

/// `HF_HUB_OFFLINE`: report (and hash) what is already local, without any network.
fn offline(opts: &FetchOptions, layout: &Layout) -> Result<FetchReport, FetchError> {
    let filter = PathFilter::new(&opts.include, &opts.exclude)?;
    let wanted = |p: &str| {
        if opts.files.is_empty() {
            filter.keeps(p)
        } else {
            opts.files
                .iter()
                .any(|f| f == p || (f.ends_with('/') && p.starts_with(f.as_str())))
        }
    };
    let (commit, output_dir, paths) = match layout {
        Layout::Cache { repo_dir } => {
            let commit = if is_commit(&opts.revision) {
                opts.revision.clone()
            } else {
                std::fs::read_to_string(repo_dir.join("refs").join(&opts.revision))
                    .map_err(|_| {
                        FetchError::Offline(format!(
                            "{} at {:?} is not in the cache {}",
                            opts.repo,
                            opts.revision,
                            repo_dir.display()
                        ))
                    })?
                    .trim()
                    .to_string()
            };
            let dir = repo_dir.join("snapshots").join(&commit);
            let mut paths = Vec::new();
            walk(&dir, "", &mut paths);
            (commit, dir, paths)
        }
        Layout::LocalDir { root } => {
            let md_root = root.join(".cache/huggingface/download");
            let mut mds = Vec::new();
            walk(&md_root, "", &mut mds);
            let mut commit = String::new();
            let mut paths = Vec::new();
            for m in mds {
                let Some(p) = m.strip_suffix(".metadata") else {
                    continue;
                };
                if let Some((c, _, _)) = std::fs::read_to_string(md_root.join(&m))
                    .ok()
                    .and_then(|t| parse_metadata(&t))
                {
                    if root.join(p).is_file() {
                        commit = c;
                        paths.push(p.to_string());
                    }
                }
            }
            (commit, root.clone(), paths)
        }
    };
    let mut records = Vec::new();
    for p in paths.iter().filter(|p| wanted(p)) {
        let full = output_dir.join(p);
        let bytes = std::fs::metadata(&full)
            .map_err(|e| FetchError::io(&full, e))?
            .len();
        records.push(
            ManifestRecord::new(p.clone(), bytes, sha256_of(&full)?)
                .with_extra("commit", commit.clone()),
        );
    }
    for f in &opts.files {
        if !f.ends_with('/') && !records.iter().any(|r| r.path == *f) {
            return Err(FetchError::Offline(format!("{f} is not available locally")));
        }
    }
    if records.is_empty() {
        return Err(FetchError::Offline(format!(
            "no files of {} are available locally",
            opts.repo
        )));
    }
    records.sort_by(|a, b| a.path.cmp(&b.path));
    if !opts.dry_run {
        opts.manifest
            .write(&layout.default_manifest(&commit), &records)?;
    }
    Ok(FetchReport {
        commit,
        output_dir,
        records,
        downloaded: 0,
        bytes_downloaded: 0,
        plan: Vec::new(),
    })
}

/// Lists the files (and symlinks to files) under `dir`, as `/`-separated relative paths.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<_> = rd.flatten().collect();
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let path = e.path();
        if path.is_dir() {
            walk(&path, &rel, out);
        } else if path.is_file() {
            out.push(rel);
        }
    }
}
