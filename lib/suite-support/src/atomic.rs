//! Atomic outputs: a file or directory appears under its final name only when it is complete.
//!
//! Output is written under a temporary name in the destination directory,
//! `.<file_name>.partial-<pid>-<counter>`, then flushed, fsynced, renamed into place, and the
//! directory fsynced. A killed run never leaves anything under a final name; what it leaves
//! behind is found and removed by [`remove_stale_partials`].

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Capacity of the write buffer of an [`AtomicFile`]: it gathers small writes (headers, pickles)
/// into fewer syscalls, while writes of this size or more (tensor data) go to the file directly
/// instead of being copied through it (an 8 MiB buffer copied every tensor byte once more).
pub const BUFFER_BYTES: usize = 256 << 10;

const PARTIAL_MARKER: &str = ".partial-";

/// An I/O error on an atomic output, naming the output's final path.
///
/// Converts into an [`io::Error`] of the same kind, so it can be returned with `?` from code
/// that speaks `io::Result`.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}", path.display())]
pub struct AtomicError {
    op: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl AtomicError {
    fn new(op: &'static str, path: &Path, source: io::Error) -> Self {
        AtomicError {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The path the error is about: the final path of the output (or the directory being cleaned).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kind of the underlying I/O error.
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

impl From<AtomicError> for io::Error {
    fn from(e: AtomicError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// A file being written under a temporary name next to `final_path`.
///
/// Writes go through a buffer of [`BUFFER_BYTES`]. [`AtomicFile::commit`] publishes the file;
/// dropping it without committing removes the temporary file.
#[derive(Debug)]
pub struct AtomicFile {
    final_path: PathBuf,
    temp_path: PathBuf,
    /// `None` only while being committed or dropped.
    writer: Option<BufWriter<File>>,
    committed: bool,
}

impl AtomicFile {
    /// Creates the temporary file `.<file_name>.partial-<pid>-<counter>` in the directory of
    /// `final_path`. Nothing is created under `final_path` itself until [`AtomicFile::commit`].
    pub fn create(final_path: impl AsRef<Path>) -> Result<Self, AtomicError> {
        let final_path = final_path.as_ref();
        let err = |e| AtomicError::new("creating", final_path, e);
        let temp_path = partial_sibling(final_path).map_err(err)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp_path)
            .map_err(err)?;
        Ok(AtomicFile {
            final_path: final_path.to_path_buf(),
            temp_path,
            writer: Some(BufWriter::with_capacity(BUFFER_BYTES, file)),
            committed: false,
        })
    }

    /// The path the file will have once committed.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// The underlying file, for seeking, `set_len` or positional writes (`FileExt::write_at`).
    ///
    /// The write buffer is flushed first, so bytes written before this call are in the file and
    /// later writes through `Write` continue at the file's cursor.
    pub fn file_mut(&mut self) -> Result<&mut File, AtomicError> {
        if let Err(e) = self.writer().flush() {
            return Err(self.error("writing", e));
        }
        Ok(self.writer().get_mut())
    }

    /// Flushes, fsyncs the file, renames it to its final name (replacing any file there) and
    /// fsyncs the directory.
    pub fn commit(self) -> Result<(), AtomicError> {
        self.finish()?.publish()
    }

    /// Flushes the file and starts writing it to disk in the background, without waiting; the
    /// returned [`Finished`] publishes it later. Lets a writer go on computing the next file while
    /// the disk catches up (see [`Publisher`]).
    pub fn finish(mut self) -> Result<Finished, AtomicError> {
        let writer = self
            .writer
            .take()
            .expect("AtomicFile writer is present until commit");
        let file = writer
            .into_inner()
            .map_err(|e| self.error("writing", e.into_error()))?;
        start_writeback(&file);
        // The temporary file now belongs to the Finished handle.
        self.committed = true;
        Ok(Finished {
            file: Some(file),
            final_path: self.final_path.clone(),
            temp_path: self.temp_path.clone(),
        })
    }

    fn writer(&mut self) -> &mut BufWriter<File> {
        self.writer
            .as_mut()
            .expect("AtomicFile writer is present until commit")
    }

    fn error(&self, op: &'static str, e: io::Error) -> AtomicError {
        AtomicError::new(op, &self.final_path, e)
    }

    fn io_error(&self, op: &'static str, e: io::Error) -> io::Error {
        self.error(op, e).into()
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let result = self.writer().write(buf);
        result.map_err(|e| self.io_error("writing", e))
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let result = self.writer().write_all(buf);
        result.map_err(|e| self.io_error("writing", e))
    }

    fn flush(&mut self) -> io::Result<()> {
        let result = self.writer().flush();
        result.map_err(|e| self.io_error("writing", e))
    }
}

impl Seek for AtomicFile {
    /// Flushes the buffer, then seeks the file.
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let result = self.writer().seek(pos);
        result.map_err(|e| self.io_error("seeking in", e))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            // Discard the buffer instead of flushing it into a file about to be removed.
            drop(writer.into_parts());
        }
        if !self.committed {
            let _ = fs::remove_file(&self.temp_path);
        }
    }
}

/// Asks the kernel to start writing the file's dirty pages now, without waiting (advisory: errors,
/// if any, surface at the fsync that publishes the file).
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a file descriptor we own; offset 0 and length 0 mean "the whole file".
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) {}

/// A completely written file still under its temporary name; [`Finished::publish`] makes it final.
/// Dropping it unpublished removes the temporary file.
#[derive(Debug)]
pub struct Finished {
    file: Option<File>,
    final_path: PathBuf,
    temp_path: PathBuf,
}

impl Finished {
    /// The path the file will have once published.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Waits for the file to be on disk (fsync), renames it to its final name and fsyncs the directory.
    pub fn publish(mut self) -> Result<(), AtomicError> {
        let file = self
            .file
            .take()
            .expect("Finished holds its file until published");
        file.sync_all()
            .map_err(|e| AtomicError::new("syncing", &self.final_path, e))?;
        drop(file);
        rename_into_place(&self.temp_path, &self.final_path)
    }
}

impl Drop for Finished {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.temp_path);
        }
    }
}

/// Publishes [`Finished`] files on a background thread, in the order they are submitted, so the
/// threads that compute outputs never wait for the disk.
#[derive(Debug)]
pub struct Publisher {
    sender: Option<std::sync::mpsc::Sender<Finished>>,
    thread: Option<std::thread::JoinHandle<Result<(), AtomicError>>>,
}

impl Default for Publisher {
    fn default() -> Self {
        Publisher::start()
    }
}

impl Publisher {
    /// Starts the publishing thread. It works in batches (group commit): whatever files are queued
    /// are made durable with one `syncfs`, then renamed, then their directories are synced once.
    pub fn start() -> Publisher {
        let (sender, receiver) = std::sync::mpsc::channel::<Finished>();
        let thread = std::thread::spawn(move || {
            let mut first_error = None;
            while let Ok(first) = receiver.recv() {
                let mut batch = vec![first];
                batch.extend(receiver.try_iter());
                // After an error, later files are dropped (removed) rather than published.
                if first_error.is_none() {
                    first_error = publish_batch(batch).err();
                }
            }
            first_error.map_or(Ok(()), Err)
        });
        Publisher {
            sender: Some(sender),
            thread: Some(thread),
        }
    }

    /// Queues a file for publishing.
    pub fn submit(&self, finished: Finished) {
        if let Some(sender) = &self.sender {
            // A send fails only if the thread ended, which it does only after `wait`.
            let _ = sender.send(finished);
        }
    }

    /// Waits until every submitted file is published; returns the first error, if any.
    pub fn wait(mut self) -> Result<(), AtomicError> {
        self.sender.take();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Ok(()),
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Makes every file of `batch` durable with one filesystem sync, renames each into place, then syncs
/// each destination directory once.
fn publish_batch(mut batch: Vec<Finished>) -> Result<(), AtomicError> {
    let first = &batch[0];
    sync_filesystem(first.file.as_ref().expect("unpublished"))
        .map_err(|e| AtomicError::new("syncing", &first.final_path, e))?;
    let mut dirs: Vec<&Path> = Vec::new();
    for f in &mut batch {
        f.file.take();
        fs::rename(&f.temp_path, &f.final_path)
            .map_err(|e| AtomicError::new("renaming into place", &f.final_path, e))?;
    }
    for f in &batch {
        let dir = parent_dir(&f.final_path);
        if !dirs.contains(&dir) {
            dirs.push(dir);
            sync_dir(dir)
                .map_err(|e| AtomicError::new("syncing the directory of", &f.final_path, e))?;
        }
    }
    Ok(())
}

/// Flushes everything of the filesystem holding `file` (one call instead of an fsync per file).
#[cfg(target_os = "linux")]
fn sync_filesystem(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a file descriptor we own.
    if unsafe { libc::syncfs(file.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn sync_filesystem(file: &File) -> io::Result<()> {
    file.sync_all()
}

/// Writes `bytes` to `path` atomically (see [`AtomicFile`]).
pub fn atomic_write(path: impl AsRef<Path>, bytes: &[u8]) -> Result<(), AtomicError> {
    let mut file = AtomicFile::create(path)?;
    if let Err(e) = file.writer().write_all(bytes) {
        return Err(file.error("writing", e));
    }
    file.commit()
}

/// A directory being filled under a temporary name next to its final path.
///
/// Write into [`AtomicDir::path`]; [`AtomicDir::commit`] renames it into place, and dropping it
/// without committing removes it with its contents. Files inside are not fsynced by the
/// directory: write them with [`AtomicFile`] (or sync them yourself).
#[derive(Debug)]
pub struct AtomicDir {
    final_path: PathBuf,
    temp_path: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Creates the empty directory `.<dir_name>.partial-<pid>-<counter>` next to `final_path`.
    pub fn create(final_path: impl AsRef<Path>) -> Result<Self, AtomicError> {
        let final_path = final_path.as_ref();
        let err = |e| AtomicError::new("creating", final_path, e);
        let temp_path = partial_sibling(final_path).map_err(err)?;
        fs::create_dir(&temp_path).map_err(err)?;
        Ok(AtomicDir {
            final_path: final_path.to_path_buf(),
            temp_path,
            committed: false,
        })
    }

    /// The temporary directory to write into.
    pub fn path(&self) -> &Path {
        &self.temp_path
    }

    /// The path the directory will have once committed.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Fsyncs the directory and renames it to its final name, then fsyncs the parent.
    ///
    /// Fails if a non-empty directory (or a file) is already at the final path: remove an old
    /// output first when it is to be replaced.
    pub fn commit(mut self) -> Result<(), AtomicError> {
        sync_dir(&self.temp_path).map_err(|e| AtomicError::new("syncing", &self.final_path, e))?;
        rename_into_place(&self.temp_path, &self.final_path)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.temp_path);
        }
    }
}

/// Removes the partial outputs (`.*.partial-<pid>-<counter>` files and directories) that killed
/// runs left in `dir`, and returns how many were removed.
///
/// Partials whose writer process is still alive on this host are kept. A writer on another
/// host (a shared filesystem) cannot be told from a dead one, so call this only where no other
/// host writes into `dir` at the same time: a single-process run (world size 1), or before the
/// ranks of a job start.
pub fn remove_stale_partials(dir: impl AsRef<Path>) -> Result<usize, AtomicError> {
    let dir = dir.as_ref();
    let err = |e| AtomicError::new("removing stale partial outputs in", dir, e);
    let mut removed = 0;
    for entry in fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let Some(pid) = entry.file_name().to_str().and_then(partial_owner) else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let result = if entry.file_type().map_err(err)?.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match result {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(AtomicError::new("removing", &path, e)),
        }
    }
    Ok(removed)
}

/// `dir/.<name>.partial-<pid>-<counter>` for `dir/<name>`, unique within this process.
fn partial_sibling(final_path: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = final_path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the output path has no file name",
        )
    })?;
    let mut partial = OsString::from(".");
    partial.push(name);
    partial.push(format!(
        "{PARTIAL_MARKER}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    Ok(final_path.with_file_name(partial))
}

/// The writer's pid if `name` has the form `.<name>.partial-<pid>-<counter>`.
fn partial_owner(name: &str) -> Option<i32> {
    let (base, tail) = name.strip_prefix('.')?.rsplit_once(PARTIAL_MARKER)?;
    let (pid, counter) = tail.split_once('-')?;
    if base.is_empty() || counter.parse::<u64>().is_err() {
        return None;
    }
    pid.parse().ok().filter(|&pid| pid > 0)
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks whether `pid` (> 0, a single process) exists; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn rename_into_place(temp_path: &Path, final_path: &Path) -> Result<(), AtomicError> {
    fs::rename(temp_path, final_path)
        .map_err(|e| AtomicError::new("renaming into place", final_path, e))?;
    sync_dir(parent_dir(final_path))
        .map_err(|e| AtomicError::new("syncing the directory of", final_path, e))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn publisher_publishes_in_batches_and_drops_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let publisher = Publisher::start();
        for i in 0..20 {
            let mut f = AtomicFile::create(dir.path().join(format!("f{i}"))).unwrap();
            f.write_all(format!("{i}").as_bytes()).unwrap();
            publisher.submit(f.finish().unwrap());
        }
        publisher.wait().unwrap();
        for i in 0..20 {
            assert_eq!(
                fs::read_to_string(dir.path().join(format!("f{i}"))).unwrap(),
                i.to_string()
            );
        }
        // Only the published names remain: no temporary files.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 20);

        // A finished file that is dropped unpublished leaves nothing behind.
        let f = AtomicFile::create(dir.path().join("never")).unwrap();
        drop(f.finish().unwrap());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 20);
    }

    use super::*;
    use std::os::unix::fs::FileExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn commit_publishes_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let mut f = AtomicFile::create(&target).unwrap();
        f.write_all(b"hello ").unwrap();
        let partials = names(dir.path());
        assert_eq!(partials.len(), 1);
        assert!(partials[0].starts_with(".out.bin.partial-"), "{partials:?}");
        assert!(!target.exists());
        f.write_all(b"world").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"hello world");
        assert_eq!(names(dir.path()), ["out.bin"]);
    }

    #[test]
    fn drop_without_commit_removes_the_partial() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        fs::write(&target, b"old").unwrap();
        let mut f = AtomicFile::create(&target).unwrap();
        f.write_all(&[7; 1000]).unwrap();
        drop(f);
        assert_eq!(names(dir.path()), ["out.bin"]);
        assert_eq!(fs::read(&target).unwrap(), b"old");
    }

    #[test]
    fn commit_replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x.json");
        fs::write(&target, b"old contents").unwrap();
        atomic_write(&target, b"new").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
    }

    #[test]
    fn seek_and_positional_writes_see_buffered_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("header.bin");
        let mut f = AtomicFile::create(&target).unwrap();
        f.write_all(&[0; 8]).unwrap();
        f.write_all(b"payload").unwrap();
        f.file_mut().unwrap().write_at(b"HEAD", 2).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(b"ab").unwrap();
        f.seek(SeekFrom::End(0)).unwrap();
        f.write_all(b"!").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"abHEAD\0\0payload!");
    }

    #[test]
    fn concurrent_writers_to_one_directory_get_distinct_partials() {
        let dir = tempfile::tempdir().unwrap();
        let a = AtomicFile::create(dir.path().join("same")).unwrap();
        let b = AtomicFile::create(dir.path().join("same")).unwrap();
        assert_ne!(a.temp_path, b.temp_path);
    }

    #[test]
    fn errors_name_the_final_path() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("missing-dir").join("out.bin");
        let err = AtomicFile::create(&target).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(err.path(), target);
        assert!(err.to_string().contains("missing-dir/out.bin"), "{err}");
        let io_err = io::Error::from(err);
        assert_eq!(io_err.kind(), io::ErrorKind::NotFound);
        assert!(io_err.to_string().starts_with("creating "), "{io_err}");
        assert!(AtomicFile::create("/").is_err());
    }

    #[test]
    fn atomic_dir_commit_and_drop() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("dataset");
        let d = AtomicDir::create(&target).unwrap();
        atomic_write(d.path().join("state.json"), b"{}").unwrap();
        assert!(!target.exists());
        assert_eq!(d.final_path(), target);
        d.commit().unwrap();
        assert_eq!(fs::read(target.join("state.json")).unwrap(), b"{}");

        let abandoned = AtomicDir::create(dir.path().join("other")).unwrap();
        fs::write(abandoned.path().join("f"), b"x").unwrap();
        drop(abandoned);
        assert_eq!(names(dir.path()), ["dataset"]);

        // A complete output is not replaced implicitly.
        let again = AtomicDir::create(&target).unwrap();
        fs::write(again.path().join("g"), b"y").unwrap();
        assert!(again.commit().is_err());
        assert_eq!(names(dir.path()), ["dataset"]);
    }

    #[test]
    fn stale_partials_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // A pid above the kernel's maximum (2^22) never belongs to a live process.
        let dead = 4_194_999;
        fs::write(dir.path().join(format!(".a.pt.partial-{dead}-0")), b"x").unwrap();
        fs::create_dir(dir.path().join(format!(".data.partial-{dead}-3"))).unwrap();
        fs::write(dir.path().join(format!(".data.partial-{dead}-3/f")), b"x").unwrap();
        for keep in [
            "a.pt",
            ".hidden",
            ".b.partial-x-1",
            ".partial-1-1",
            "c.partial-9-9",
        ] {
            fs::write(dir.path().join(keep), b"x").unwrap();
        }
        let live = AtomicFile::create(dir.path().join("live")).unwrap();
        assert_eq!(remove_stale_partials(dir.path()).unwrap(), 2);
        let left = names(dir.path());
        assert_eq!(left.len(), 6, "{left:?}");
        assert!(left.iter().any(|n| n.starts_with(".live.partial-")));
        live.commit().unwrap();
        assert_eq!(remove_stale_partials(dir.path()).unwrap(), 0);
    }

    #[test]
    fn partial_owner_parses_only_partial_names() {
        assert_eq!(partial_owner(".x.partial-12-0"), Some(12));
        assert_eq!(partial_owner(".a.partial-b.partial-7-1"), Some(7));
        assert_eq!(partial_owner(".x.partial-0-0"), None);
        assert_eq!(partial_owner(".x.partial--1-0"), None);
        assert_eq!(partial_owner("x.partial-12-0"), None);
        assert_eq!(partial_owner(".x.partial-12"), None);
    }
}
