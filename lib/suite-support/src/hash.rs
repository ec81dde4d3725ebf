//! SHA-256, as lowercase hex, of files and of streams being written.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

/// Size of the read buffer used when hashing a file.
const READ_BUFFER_BYTES: usize = 4 << 20;

/// Hashing a file failed.
#[derive(Debug, thiserror::Error)]
#[error("hashing {}", path.display())]
pub struct HashError {
    /// The file being hashed.
    pub path: PathBuf,
    /// The underlying I/O error.
    #[source]
    pub source: io::Error,
}

/// The SHA-256 of the file at `path`, read as a stream, as 64 lowercase hex digits.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String, HashError> {
    let path = path.as_ref();
    let hash = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let mut hasher = HashingWriter::new(io::sink());
        let mut buf = vec![0; READ_BUFFER_BYTES];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.write_all(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(hasher.finish().1)
    };
    hash().map_err(|source| HashError {
        path: path.to_path_buf(),
        source,
    })
}

/// The SHA-256 of each file, in the order of `paths`, computed by `jobs` threads in parallel
/// (`0` means rayon's default, one per core; if a pool cannot be built, the current rayon pool
/// is used).
pub fn sha256_files_parallel<P>(paths: &[P], jobs: usize) -> Vec<Result<String, HashError>>
where
    P: AsRef<Path> + Sync,
{
    let hash_all = || paths.par_iter().map(sha256_file).collect();
    match rayon::ThreadPoolBuilder::new().num_threads(jobs).build() {
        Ok(pool) => pool.install(hash_all),
        Err(_) => hash_all(),
    }
}

/// A writer that passes everything through to `W` while computing its SHA-256 and length.
#[derive(Debug)]
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// The number of bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Returns the inner writer (not flushed), the SHA-256 of the bytes written as lowercase
    /// hex, and their number.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.bytes)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn hashing_writer_matches_known_digests() {
        let (inner, hex, bytes) = HashingWriter::new(Vec::new()).finish();
        assert_eq!((inner.len(), hex.as_str(), bytes), (0, EMPTY, 0));

        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"a").unwrap();
        w.write_all(b"bc").unwrap();
        assert_eq!(w.bytes_written(), 3);
        let (inner, hex, bytes) = w.finish();
        assert_eq!(
            (inner.as_slice(), hex.as_str(), bytes),
            (&b"abc"[..], ABC, 3)
        );
    }

    #[test]
    fn hashing_writer_hashes_only_what_the_inner_writer_accepted() {
        let mut buf = [0u8; 2];
        let mut w = HashingWriter::new(&mut buf[..]);
        assert_eq!(w.write(b"abc").unwrap(), 2);
        let (_, hex, bytes) = w.finish();
        assert_eq!(bytes, 2);
        assert_eq!(hex, hex::encode(Sha256::digest(b"ab")));
    }

    #[test]
    fn files_hash_like_their_contents() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..READ_BUFFER_BYTES as u32 + 12345)
            .map(|i| (i * 7) as u8)
            .collect();
        let paths = [
            dir.path().join("abc"),
            dir.path().join("big"),
            dir.path().join("none"),
        ];
        std::fs::write(&paths[0], b"abc").unwrap();
        std::fs::write(&paths[1], &big).unwrap();

        assert_eq!(sha256_file(&paths[0]).unwrap(), ABC);
        let results = sha256_files_parallel(&paths, 2);
        assert_eq!(results[0].as_ref().unwrap(), ABC);
        assert_eq!(
            results[1].as_ref().unwrap(),
            &hex::encode(Sha256::digest(&big))
        );
        let err = results[2].as_ref().unwrap_err();
        assert_eq!(err.path, paths[2]);
        assert_eq!(err.source.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().ends_with("/none"), "{err}");
    }
}
