//! The executor: downloads planned files as byte ranges over a pool of connections, written
//! in place into partial files with a resume log, hashed in order while the ranges arrive,
//! verified, then published under their final names.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::{Method, StatusCode};
use sha1::Sha1;
use sha2::{Digest as _, Sha256};
use suite_support::manifest::ManifestRecord;
use suite_support::progress::Progress;
use tokio::sync::mpsc;

use crate::error::FetchError;
use crate::hub::{describe, redirect_target, retryable, Hub, Resolved};
use crate::layout::{Layout, RESUME_SUFFIX};
use crate::plan::{
    chunk_ranges, effective_chunk, parse_resume, resume_header, resume_record, Digest, RemoteFile,
};

/// How often (bytes) a range's progress is appended to the resume log.
pub const LOG_EVERY: u64 = 1 << 20;

/// One file being downloaded (in the cache, shared by files with the same content).
pub struct Job {
    /// The file (the first one with this content).
    pub file: RemoteFile,
    /// Other repo paths with the same content (cache layout only).
    pub aliases: Vec<RemoteFile>,
    /// Where to GET it.
    pub resolved: Mutex<Resolved>,
    partial: PathBuf,
    log_path: PathBuf,
    data: File,
    log: Mutex<File>,
    ranges: Vec<Range<u64>>,
    /// Bytes on disk from the start of each range (contiguous), for the streaming hasher.
    written: Vec<AtomicU64>,
    hash: Mutex<HashState>,
    failed: AtomicBool,
}

struct HashState {
    done: Vec<bool>,
    cursor: usize,
    /// Bytes of range `cursor` already hashed.
    hashed: u64,
    busy: bool,
    sha256: Option<Sha256>,
    git: Option<Sha1>,
}

/// A range still to fetch: chunk `index` of `job`, from `start` to the chunk's end.
pub struct Unit {
    job: Arc<Job>,
    index: usize,
    start: u64,
}

/// What all workers share.
pub struct Ctx {
    /// The Hub client.
    pub hub: Hub,
    /// The layout.
    pub layout: Layout,
    /// The commit.
    pub commit: String,
    /// The byte progress bar.
    pub progress: Progress,
    abort: AtomicBool,
    queue: Mutex<VecDeque<Unit>>,
    results: mpsc::UnboundedSender<Result<Vec<ManifestRecord>, Option<FetchError>>>,
}

/// A job, the (chunk index, start offset) of the ranges still to fetch, and the bytes already on disk.
pub type OpenedJob = (Arc<Job>, Vec<(usize, u64)>, u64);

/// Opens (or resumes) the partial file of `file` and returns its job, the units still to
/// fetch and how many bytes are already there.
pub fn open_job(
    layout: &Layout,
    file: RemoteFile,
    aliases: Vec<RemoteFile>,
    resolved: Resolved,
    chunk: u64,
) -> Result<OpenedJob, FetchError> {
    let partial = layout.partial_path(&file);
    let mut log_path = partial.clone().into_os_string();
    log_path.push(RESUME_SUFFIX.trim_start_matches(".hf-fetch"));
    let log_path = PathBuf::from(log_path);
    if let Some(parent) = partial.parent() {
        fs::create_dir_all(parent).map_err(|e| FetchError::io(parent, e))?;
    }
    let chunk = effective_chunk(file.size, chunk);
    let ranges = chunk_ranges(file.size, chunk);
    let header = resume_header(file.digest.etag(), file.size, chunk);
    let existing_len = fs::metadata(&partial).map(|m| m.len()).ok();
    let resumed = match (existing_len, fs::read_to_string(&log_path)) {
        (Some(len), Ok(text)) if len == file.size => parse_resume(&text, &header, &ranges),
        _ => None,
    };
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&partial)
        .map_err(|e| FetchError::io(&partial, e))?;
    let done = match resumed {
        Some(d) => d,
        None => {
            data.set_len(0).map_err(|e| FetchError::io(&partial, e))?;
            reserve(&data, file.size).map_err(|e| FetchError::io(&partial, e))?;
            atomic_log(&log_path, &header)?;
            vec![0; ranges.len()]
        }
    };
    let log = OpenOptions::new()
        .append(true)
        .open(&log_path)
        .map_err(|e| FetchError::io(&log_path, e))?;
    let mut units = Vec::new();
    let mut have = 0;
    let mut flags = Vec::with_capacity(ranges.len());
    for (i, r) in ranges.iter().enumerate() {
        let len = r.end - r.start;
        have += done[i];
        flags.push(done[i] == len && len > 0);
        if done[i] < len || len == 0 {
            units.push((i, r.start + done[i]));
        }
    }
    let git = matches!(file.digest, Digest::GitSha1(_)).then(|| {
        let mut h = Sha1::new();
        h.update(format!("blob {}\0", file.size).as_bytes());
        h
    });
    let job = Arc::new(Job {
        file,
        aliases,
        resolved: Mutex::new(resolved),
        partial,
        log_path,
        data,
        log: Mutex::new(log),
        written: done.iter().map(|&d| AtomicU64::new(d)).collect(),
        ranges,
        hash: Mutex::new(HashState {
            done: flags,
            cursor: 0,
            hashed: 0,
            busy: false,
            sha256: Some(Sha256::new()),
            git,
        }),
        failed: AtomicBool::new(false),
    });
    Ok((job, units, have))
}

fn atomic_log(path: &PathBuf, header: &str) -> Result<(), FetchError> {
    let mut f = File::create(path).map_err(|e| FetchError::io(path, e))?;
    f.write_all(header.as_bytes())
        .map_err(|e| FetchError::io(path, e))
}

/// Sizes the partial file, reserving the blocks so a full disk fails now, not mid-download.
fn reserve(file: &File, size: u64) -> std::io::Result<()> {
    file.set_len(size)?;
    if size > 0 {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(size).unwrap_or(libc::off_t::MAX);
        // SAFETY: a valid open descriptor; posix_fallocate does not touch memory.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        if rc != 0 && rc != libc::EOPNOTSUPP && rc != libc::EINVAL {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}

impl Ctx {
    /// A context whose results go to `results`.
    pub fn new(
        hub: Hub,
        layout: Layout,
        commit: String,
        progress: Progress,
        units: Vec<Unit>,
        results: mpsc::UnboundedSender<Result<Vec<ManifestRecord>, Option<FetchError>>>,
    ) -> Ctx {
        Ctx {
            hub,
            layout,
            commit,
            progress,
            abort: AtomicBool::new(false),
            queue: Mutex::new(units.into()),
            results,
        }
    }

    /// Stops handing out work (after a fatal error or a signal).
    pub fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
    }

    fn fail(&self, job: &Job, error: Option<FetchError>) {
        if !job.failed.swap(true, Ordering::SeqCst) {
            let _ = self.results.send(Err(error));
        }
    }
}

/// Builds the units of a job.
pub fn units_of(job: &Arc<Job>, starts: &[(usize, u64)]) -> Vec<Unit> {
    starts
        .iter()
        .map(|&(index, start)| Unit {
            job: job.clone(),
            index,
            start,
        })
        .collect()
}

/// Files at least this big are hashed while their ranges arrive (by a hasher that follows the
/// bytes written); smaller ones once complete.
pub const STREAM_HASH_MIN: u64 = 8 << 20;

/// Starts hashing a job whose chunks were all on disk already.
pub fn kick(ctx: &Arc<Ctx>, job: &Arc<Job>) {
    chunk_done(ctx, job, None);
}

/// One worker: takes units until the queue is empty.
pub async fn worker(ctx: Arc<Ctx>) {
    loop {
        let unit = ctx.queue.lock().expect("queue lock").pop_front();
        let Some(unit) = unit else { return };
        if ctx.abort.load(Ordering::SeqCst) {
            ctx.fail(&unit.job, None);
            continue;
        }
        if unit.job.failed.load(Ordering::SeqCst) {
            continue;
        }
        if unit.job.file.size >= STREAM_HASH_MIN {
            start_hasher(&ctx, &unit.job);
        }
        match fetch_unit(&ctx, &unit).await {
            Ok(()) => chunk_done(&ctx, &unit.job, Some(unit.index)),
            Err(e) => {
                if !matches!(
                    e,
                    FetchError::Integrity { .. } | FetchError::Inconsistent { .. }
                ) {
                    ctx.abort();
                }
                ctx.fail(&unit.job, Some(e));
            }
        }
    }
}

fn start_hasher(ctx: &Arc<Ctx>, job: &Arc<Job>) {
    let mut st = job.hash.lock().expect("hash lock");
    if !st.busy && st.cursor < job.ranges.len() {
        st.busy = true;
        let (ctx, job) = (ctx.clone(), job.clone());
        tokio::task::spawn_blocking(move || hash_in_order(&ctx, &job));
    }
}

fn chunk_done(ctx: &Arc<Ctx>, job: &Arc<Job>, index: Option<usize>) {
    let mut st = job.hash.lock().expect("hash lock");
    if let Some(i) = index {
        st.done[i] = true;
        let r = &job.ranges[i];
        job.written[i].store(r.end - r.start, Ordering::Release);
    }
    let ready = st.cursor < job.ranges.len() && st.done[st.cursor];
    if !st.busy && ready {
        st.busy = true;
        let (ctx, job) = (ctx.clone(), job.clone());
        tokio::task::spawn_blocking(move || hash_in_order(&ctx, &job));
    }
}

/// Hashes the bytes on disk in file order; a large file's hasher waits for more bytes, a small
/// file's returns and is started again when a range completes. The call that reaches the end
/// verifies and publishes the file.
fn hash_in_order(ctx: &Arc<Ctx>, job: &Arc<Job>) {
    let mut buf = Vec::new();
    let follow = job.file.size >= STREAM_HASH_MIN;
    loop {
        let (from, to, mut sha, mut git) = {
            let mut st = job.hash.lock().expect("hash lock");
            if job.failed.load(Ordering::SeqCst) || (follow && ctx.abort.load(Ordering::SeqCst)) {
                st.busy = false;
                return;
            }
            if st.cursor == job.ranges.len() {
                let sha = st.sha256.take().expect("hasher");
                let git = st.git.take();
                drop(st);
                finish(ctx, job, sha, git);
                return;
            }
            let r = &job.ranges[st.cursor];
            let avail = job.written[st.cursor].load(Ordering::Acquire);
            if st.done[st.cursor] && st.hashed == r.end - r.start {
                st.cursor += 1;
                st.hashed = 0;
                continue;
            }
            if avail > st.hashed {
                (
                    r.start + st.hashed,
                    r.start + avail,
                    st.sha256.take().expect("hasher"),
                    st.git.take(),
                )
            } else if follow {
                drop(st);
                std::thread::sleep(std::time::Duration::from_millis(2));
                continue;
            } else {
                st.busy = false;
                return;
            }
        };
        let mut pos = from;
        let mut failure = None;
        while pos < to {
            let n = ((to - pos) as usize).min(HASH_WINDOW);
            match hash_window(&job.data, pos, n, &mut buf) {
                Ok(bytes) => {
                    sha.update(&*bytes);
                    if let Some(g) = git.as_mut() {
                        g.update(&*bytes);
                    }
                    pos += bytes.len() as u64;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            ctx.abort();
            ctx.fail(job, Some(FetchError::io(&job.partial, e)));
            return;
        }
        let mut st = job.hash.lock().expect("hash lock");
        st.sha256 = Some(sha);
        st.git = git;
        st.hashed += to - from;
    }
}

/// Bytes hashed from one mapping of the partial file.
const HASH_WINDOW: usize = 64 << 20;
/// Bytes read at a time when the partial file cannot be mapped.
const HASH_READ_BYTES: usize = 1 << 20;

/// The `len` bytes at `pos` of the partial file (already written and allocated): a read-only
/// mapping of them, so hashing reads the page cache in place instead of copying it out. If the
/// file cannot be mapped, the first [`HASH_READ_BYTES`] of them at most, read into `buf` (the
/// caller advances by the length returned).
fn hash_window<'b>(
    file: &File,
    pos: u64,
    len: usize,
    buf: &'b mut Vec<u8>,
) -> std::io::Result<HashBytes<'b>> {
    let page = 4096;
    let start = pos / page * page;
    let skip = (pos - start) as usize;
    // SAFETY: the partial file is ours (never truncated while a download runs), and the mapped
    // range lies inside the part already written.
    match unsafe {
        memmap2::MmapOptions::new()
            .offset(start)
            .len(skip + len)
            .map(file)
    } {
        Ok(map) => Ok(HashBytes::Mapped(map, skip)),
        Err(_) => {
            let len = len.min(HASH_READ_BYTES);
            buf.resize(len, 0);
            file.read_exact_at(&mut buf[..len], pos)?;
            Ok(HashBytes::Read(&buf[..len]))
        }
    }
}

/// Bytes to hash: a mapping (from an offset) or a read buffer.
enum HashBytes<'b> {
    Mapped(memmap2::Mmap, usize),
    Read(&'b [u8]),
}

impl std::ops::Deref for HashBytes<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            HashBytes::Mapped(map, skip) => &map[*skip..],
            HashBytes::Read(bytes) => bytes,
        }
    }
}

fn finish(ctx: &Ctx, job: &Job, sha: Sha256, git: Option<Sha1>) {
    let sha256 = hex::encode(sha.finalize());
    let actual = match (&job.file.digest, git) {
        (Digest::GitSha1(_), Some(g)) => hex::encode(g.finalize()),
        _ => sha256.clone(),
    };
    let expected = job.file.digest.etag();
    if actual != expected {
        let _ = fs::remove_file(&job.partial);
        let _ = fs::remove_file(&job.log_path);
        ctx.fail(
            job,
            Some(FetchError::Integrity {
                path: job.file.path.clone(),
                algorithm: job.file.digest.algorithm(),
                expected: expected.to_string(),
                actual,
            }),
        );
        return;
    }
    let publish = || -> std::io::Result<()> {
        ctx.layout
            .publish(&ctx.commit, &job.file, Some(&job.partial))?;
        for a in &job.aliases {
            ctx.layout.publish(&ctx.commit, a, None)?;
        }
        Ok(())
    };
    if let Err(e) = publish() {
        ctx.abort();
        ctx.fail(
            job,
            Some(FetchError::io(ctx.layout.content_path(&job.file), e)),
        );
        return;
    }
    let _ = fs::remove_file(&job.log_path);
    let records = std::iter::once(&job.file)
        .chain(&job.aliases)
        .map(|f| {
            ManifestRecord::new(f.path.clone(), f.size, sha256.clone())
                .with_extra("commit", ctx.commit.clone())
        })
        .collect();
    let _ = ctx.results.send(Ok(records));
}

/// Parses `Content-Range: bytes a-b/total` into (a, b, total).
pub fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let total = if total.trim() == "*" {
        None
    } else {
        Some(total.trim().parse().ok()?)
    };
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, total))
}

fn network(job: &Job, detail: String) -> FetchError {
    FetchError::Network {
        what: format!("{}: downloading", job.file.path),
        detail,
    }
}

fn inconsistent(job: &Job, detail: String) -> FetchError {
    FetchError::Inconsistent {
        path: job.file.path.clone(),
        detail,
    }
}

/// Asks the kernel to start writing `from..to` to disk now, without waiting, so the fsync
/// before publishing finds little left to do (advisory: errors surface at that fsync).
fn start_writeback(file: &File, from: u64, to: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (
        libc::off64_t::try_from(from),
        libc::off64_t::try_from(to - from),
    ) else {
        return;
    };
    // SAFETY: a valid open descriptor; sync_file_range does not touch memory.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

fn log_progress(job: &Job, index: usize, done: u64) {
    if let Ok(mut log) = job.log.lock() {
        let _ = log.write_all(resume_record(index, done).as_bytes());
    }
}

/// Fetches one range, retrying transient failures and resuming within the range.
async fn fetch_unit(ctx: &Ctx, unit: &Unit) -> Result<(), FetchError> {
    let job = &unit.job;
    let range = job.ranges[unit.index].clone();
    let size = job.file.size;
    let mut pos = unit.start;
    let mut logged = pos;
    let mut attempts = 0u32;
    let mut reresolved = 0;
    let retry = ctx.hub.retry;
    while pos < range.end {
        if ctx.abort.load(Ordering::SeqCst) {
            return Err(FetchError::Interrupted);
        }
        let mut url = job.resolved.lock().expect("url lock").url.clone();
        let mut hops = 0;
        let sent = loop {
            let r = ctx
                .hub
                .request(Method::GET, &url)
                .header(RANGE, format!("bytes={pos}-{}", range.end - 1))
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_redirection() && hops < 10 => {
                    match redirect_target(&r, &url) {
                        Some(n) => {
                            url = n;
                            hops += 1;
                        }
                        None => break Ok(r),
                    }
                }
                other => break other,
            }
        };
        let mut wait_headers = None;
        let resp = match sent {
            Err(e) => Err(network(job, describe(&e))),
            Ok(r) => {
                let status = r.status();
                let h = r.headers();
                let hv = |k| {
                    h.get(k)
                        .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                };
                if status == StatusCode::PARTIAL_CONTENT {
                    let Some((a, b, total)) = hv(CONTENT_RANGE).and_then(parse_content_range)
                    else {
                        return Err(inconsistent(
                            job,
                            "206 without a valid Content-Range".into(),
                        ));
                    };
                    if total.is_some_and(|t| t != size) {
                        return Err(inconsistent(
                            job,
                            format!(
                                "the listing says {size} bytes, the download server {}",
                                total.unwrap_or(0)
                            ),
                        ));
                    }
                    if a != pos || b < a {
                        return Err(inconsistent(
                            job,
                            format!("asked for bytes {pos}-{}, got {a}-{b}", range.end - 1),
                        ));
                    }
                    Ok((r, 0u64))
                } else if status == StatusCode::OK {
                    // The server ignored Range: take our bytes out of the whole body.
                    if let Some(len) = hv(CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok()) {
                        if len != size {
                            return Err(inconsistent(
                                job,
                                format!("the listing says {size} bytes, the download server {len}"),
                            ));
                        }
                    }
                    Ok((r, pos))
                } else if status == StatusCode::RANGE_NOT_SATISFIABLE {
                    return Err(inconsistent(
                        job,
                        format!(
                            "range {pos}-{} refused (416): the file is shorter than the listed {size} bytes",
                            range.end - 1
                        ),
                    ));
                } else if (status == StatusCode::FORBIDDEN || status == StatusCode::GONE)
                    && !ctx.hub.is_hub_origin(&url)
                    && reresolved < 2
                {
                    // An expired signed URL: ask /resolve for a fresh one.
                    reresolved += 1;
                    let fresh = ctx.hub.resolve(&ctx.commit, &job.file.path).await?;
                    *job.resolved.lock().expect("url lock") = fresh;
                    continue;
                } else if retryable(status) {
                    wait_headers = Some(h.clone());
                    let e = ctx
                        .hub
                        .error_from(
                            r,
                            &format!("{}: downloading", job.file.path),
                            Some(&job.file.path),
                            Some(&ctx.commit),
                        )
                        .await;
                    Err(e)
                } else {
                    return Err(ctx
                        .hub
                        .error_from(
                            r,
                            &format!("{}: downloading", job.file.path),
                            Some(&job.file.path),
                            Some(&ctx.commit),
                        )
                        .await);
                }
            }
        };
        let start_pos = pos;
        let failure = match resp {
            Err(e) => Some(e),
            Ok((mut r, mut skip)) => loop {
                match r.chunk().await {
                    Ok(Some(bytes)) => {
                        let mut b = &bytes[..];
                        if skip > 0 {
                            let s = (skip as usize).min(b.len());
                            b = &b[s..];
                            skip -= s as u64;
                        }
                        let take = (b.len() as u64).min(range.end - pos) as usize;
                        if take > 0 {
                            job.data
                                .write_all_at(&b[..take], pos)
                                .map_err(|e| FetchError::io(&job.partial, e))?;
                            pos += take as u64;
                            job.written[unit.index].store(pos - range.start, Ordering::Release);
                            ctx.progress.inc(take as u64);
                            if pos - logged >= LOG_EVERY {
                                start_writeback(&job.data, logged, pos);
                                log_progress(job, unit.index, pos - range.start);
                                logged = pos;
                            }
                        }
                        if pos >= range.end {
                            break None;
                        }
                    }
                    Ok(None) => {
                        break Some(network(
                            job,
                            "the connection closed before the end of the range".into(),
                        ))
                    }
                    Err(e) => break Some(network(job, describe(&e))),
                }
            },
        };
        if let Some(e) = failure {
            if pos > start_pos {
                attempts = 0;
                log_progress(job, unit.index, pos - range.start);
                logged = pos;
            }
            if attempts >= retry.max_retries {
                return Err(e);
            }
            tokio::time::sleep(retry.delay(attempts, wait_headers.as_ref())).await;
            attempts += 1;
        }
    }
    log_progress(job, unit.index, range.end - range.start);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((0, 9, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }
}
