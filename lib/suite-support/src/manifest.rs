//! The JSON-lines manifest: one compact JSON object per output file.
//!
//! ```text
//! {"path":"model/dp_rank_00_tp_rank_00_pp_rank_00.pt","bytes":612345678,"sha256":"…","kind":"nxd-shard","tp":0,"pp":0}
//! ```
//!
//! Keys come in the order `path`, `bytes`, `sha256`, `kind` (omitted when absent), then the
//! producer's extra fields in insertion order. `path` is relative to the directory the manifest
//! describes and uses `/`.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::atomic::{AtomicError, AtomicFile};

/// The keys with a meaning of their own, which `extra` must not repeat.
const RESERVED_KEYS: [&str; 4] = ["path", "bytes", "sha256", "kind"];

/// One line of a manifest: a file, its size and its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    /// Path relative to the directory the manifest describes, `/`-separated, normalised.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the contents, 64 lowercase hex digits.
    pub sha256: String,
    /// What the file is (`"nxd-shard"`, `"safetensors"`, …), if the producer says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Producer-specific fields (`tp`, `pp`, `tensors`, `rows`, `commit`, …), serialised after
    /// the fixed ones in insertion order.
    #[serde(flatten, deserialize_with = "unique_keys")]
    pub extra: Map<String, Value>,
}

/// Deserialises the extra fields, refusing a key given twice (as serde does for fixed fields)
/// instead of keeping the last value.
fn unique_keys<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Map<String, Value>, D::Error> {
    struct UniqueKeys;
    impl<'de> Visitor<'de> for UniqueKeys {
        type Value = Map<String, Value>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of extra fields")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
            let mut map = Map::new();
            while let Some((key, value)) = access.next_entry::<String, Value>()? {
                if map.contains_key(&key) {
                    return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
                }
                map.insert(key, value);
            }
            Ok(map)
        }
    }
    deserializer.deserialize_map(UniqueKeys)
}

/// Why a record is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// `path` is empty.
    #[error("path is empty")]
    EmptyPath,
    /// `path` starts with `/`.
    #[error("path {0:?} is absolute")]
    AbsolutePath(String),
    /// `path` has a `..` component.
    #[error("path {0:?} has a `..` component")]
    ParentComponent(String),
    /// `path` has an empty or `.` component (`a//b`, `./a`, `a/`), so it is not in normal form.
    #[error("path {0:?} has an empty or `.` component")]
    NotNormal(String),
    /// `path` contains a backslash or a NUL.
    #[error("path {0:?} contains a backslash or NUL")]
    BadCharacter(String),
    /// `sha256` is not 64 lowercase hex digits.
    #[error("sha256 {0:?} is not 64 lowercase hex digits")]
    BadSha256(String),
    /// `extra` has one of the keys `path`, `bytes`, `sha256`, `kind`.
    #[error("extra field {0:?} repeats a fixed field")]
    ReservedKey(String),
}

/// Reading or writing a manifest failed.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A line is not a valid record.
    #[error("{source_name}:{line}: {message}")]
    Malformed {
        /// The file name, or `<stdin>`.
        source_name: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Two lines describe the same path.
    #[error("{source_name}:{line}: duplicate path {path:?} (first on line {first_line})")]
    DuplicatePath {
        /// The file name, or `<stdin>`.
        source_name: String,
        /// 1-based line number of the repeat.
        line: usize,
        /// 1-based line number of the first occurrence.
        first_line: usize,
        /// The repeated path.
        path: String,
    },
    /// Reading the manifest failed.
    #[error("reading manifest {source_name}")]
    Read {
        /// The file name, or `<stdin>`.
        source_name: String,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// A record given to the writer is not valid.
    #[error("invalid manifest record for {path:?}")]
    InvalidRecord {
        /// The record's path.
        path: String,
        /// What is wrong.
        #[source]
        reason: RecordError,
    },
    /// Two records given to the writer have the same path.
    #[error("duplicate path {0:?} in manifest records")]
    DuplicateRecord(String),
    /// Writing the manifest failed.
    #[error("writing manifest")]
    Write(#[source] io::Error),
    /// Writing the manifest file failed.
    #[error(transparent)]
    Atomic(#[from] AtomicError),
}

impl ManifestRecord {
    /// A record without `kind` or extra fields.
    pub fn new(path: impl Into<String>, bytes: u64, sha256: impl Into<String>) -> Self {
        ManifestRecord {
            path: path.into(),
            bytes,
            sha256: sha256.into(),
            kind: None,
            extra: Map::new(),
        }
    }

    /// Sets `kind`.
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }

    /// Appends (or replaces) an extra field.
    pub fn with_extra(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }

    /// Checks the path rules, the digest format and that `extra` does not repeat a fixed key.
    pub fn validate(&self) -> Result<(), RecordError> {
        let path = &self.path;
        let bad = |make: fn(String) -> RecordError| Err(make(path.clone()));
        if path.is_empty() {
            return Err(RecordError::EmptyPath);
        }
        if path.contains(['\\', '\0']) {
            return bad(RecordError::BadCharacter);
        }
        if path.starts_with('/') {
            return bad(RecordError::AbsolutePath);
        }
        if path.split('/').any(|c| c == "..") {
            return bad(RecordError::ParentComponent);
        }
        if path.split('/').any(|c| c.is_empty() || c == ".") {
            return bad(RecordError::NotNormal);
        }
        let sha = &self.sha256;
        if sha.len() != 64 || !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(RecordError::BadSha256(sha.clone()));
        }
        match RESERVED_KEYS.iter().find(|k| self.extra.contains_key(**k)) {
            Some(key) => Err(RecordError::ReservedKey(key.to_string())),
            None => Ok(()),
        }
    }
}

/// Reads a manifest. `source_name` (a file name, or `<stdin>`) is used in error messages.
///
/// Blank lines are skipped. A line that is not a valid record is rejected as
/// `<source_name>:<line>: <what is wrong>` (1-based line number), and so is a path that appears
/// twice.
pub fn read_manifest(
    mut reader: impl BufRead,
    source_name: &str,
) -> Result<Vec<ManifestRecord>, ManifestError> {
    let mut records = Vec::new();
    let mut first_line_of: HashMap<String, usize> = HashMap::new();
    let mut buf = Vec::new();
    for line in 1.. {
        buf.clear();
        let read = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| ManifestError::Read {
                source_name: source_name.to_string(),
                source,
            })?;
        if read == 0 {
            break;
        }
        if buf.trim_ascii().is_empty() {
            continue;
        }
        let malformed = |message: String| ManifestError::Malformed {
            source_name: source_name.to_string(),
            line,
            message,
        };
        let record: ManifestRecord = serde_json::from_slice(&buf).map_err(|e| {
            let message = e.to_string();
            let position = format!(" at line {} column {}", e.line(), e.column());
            malformed(match message.strip_suffix(&position) {
                Some(message) if e.column() > 0 => format!("column {}: {message}", e.column()),
                Some(message) => message.to_string(),
                None => message,
            })
        })?;
        record.validate().map_err(|e| malformed(e.to_string()))?;
        if let Some(&first_line) = first_line_of.get(&record.path) {
            return Err(ManifestError::DuplicatePath {
                source_name: source_name.to_string(),
                line,
                first_line,
                path: record.path,
            });
        }
        first_line_of.insert(record.path.clone(), line);
        records.push(record);
    }
    Ok(records)
}

/// Reads the manifest at `path`, or standard input if `path` is `-`.
pub fn read_manifest_path(path: impl AsRef<Path>) -> Result<Vec<ManifestRecord>, ManifestError> {
    let path = path.as_ref();
    if path.as_os_str() == "-" {
        return read_manifest(io::stdin().lock(), "<stdin>");
    }
    let source_name = path.display().to_string();
    match File::open(path) {
        Ok(file) => read_manifest(BufReader::new(file), &source_name),
        Err(source) => Err(ManifestError::Read {
            source_name,
            source,
        }),
    }
}

/// Writes `records` as JSON lines, **sorted by path** (byte order) whatever their order in the
/// slice, so the same outputs always give the same manifest bytes.
///
/// Every record is validated first; an invalid record or a repeated path writes nothing.
pub fn write_manifest(writer: impl Write, records: &[ManifestRecord]) -> Result<(), ManifestError> {
    let mut sorted: Vec<&ManifestRecord> = records.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for (i, record) in sorted.iter().enumerate() {
        record
            .validate()
            .map_err(|reason| ManifestError::InvalidRecord {
                path: record.path.clone(),
                reason,
            })?;
        if i > 0 && sorted[i - 1].path == record.path {
            return Err(ManifestError::DuplicateRecord(record.path.clone()));
        }
    }
    let mut out = BufWriter::new(writer);
    let write_all = || -> io::Result<()> {
        for record in sorted {
            serde_json::to_writer(&mut out, record)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    };
    write_all().map_err(ManifestError::Write)
}

/// Writes `records` (see [`write_manifest`]) to standard output, flushed (`--manifest -`).
pub fn write_manifest_stdout(records: &[ManifestRecord]) -> Result<(), ManifestError> {
    let mut out = std::io::stdout().lock();
    write_manifest(&mut out, records)?;
    out.flush().map_err(ManifestError::Write)
}

/// Writes `records` (see [`write_manifest`]) to the file at `path`, atomically.
pub fn write_manifest_file(
    path: impl AsRef<Path>,
    records: &[ManifestRecord],
) -> Result<(), ManifestError> {
    let mut file = AtomicFile::create(path)?;
    write_manifest(&mut file, records)?;
    Ok(file.commit()?)
}

/// Where a tool's `--manifest` goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ManifestTarget {
    /// The tool's default file (next to or inside its output).
    #[default]
    Default,
    /// Standard output (`--manifest -`), for piping into another tool.
    Stdout,
    /// This file.
    File(PathBuf),
}

impl ManifestTarget {
    /// From the `--manifest` argument: absent means the default, `-` standard output.
    pub fn from_arg(arg: Option<PathBuf>) -> ManifestTarget {
        match arg {
            None => ManifestTarget::Default,
            Some(p) if p.as_os_str() == "-" => ManifestTarget::Stdout,
            Some(p) => ManifestTarget::File(p),
        }
    }

    /// Writes `records` to the target; `default` is the file [`ManifestTarget::Default`] stands for.
    /// Files are written atomically.
    pub fn write(&self, default: &Path, records: &[ManifestRecord]) -> Result<(), ManifestError> {
        match self {
            ManifestTarget::Stdout => write_manifest_stdout(records),
            ManifestTarget::Default => write_manifest_file(default, records),
            ManifestTarget::File(p) => write_manifest_file(p, records),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const SHA_A: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const SHA_B: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn to_string(records: &[ManifestRecord]) -> String {
        let mut out = Vec::new();
        write_manifest(&mut out, records).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn read_str(text: &str) -> Result<Vec<ManifestRecord>, ManifestError> {
        read_manifest(text.as_bytes(), "m.jsonl")
    }

    fn err_str(text: &str) -> String {
        read_str(text).unwrap_err().to_string()
    }

    #[test]
    fn writes_fixed_keys_first_then_extras_in_insertion_order_sorted_by_path() {
        let shard = ManifestRecord::new("model/b.pt", 612345678, SHA_A)
            .with_kind("nxd-shard")
            .with_extra("tp", 1)
            .with_extra("pp", 0)
            .with_extra("commit", "abc");
        let config = ManifestRecord::new("config.json", 12, SHA_B);
        assert_eq!(
            to_string(&[shard, config]),
            format!(
                "{{\"path\":\"config.json\",\"bytes\":12,\"sha256\":\"{SHA_B}\"}}\n\
                 {{\"path\":\"model/b.pt\",\"bytes\":612345678,\"sha256\":\"{SHA_A}\",\
                 \"kind\":\"nxd-shard\",\"tp\":1,\"pp\":0,\"commit\":\"abc\"}}\n"
            )
        );
    }

    #[test]
    fn reads_extras_and_skips_blank_lines() {
        let text = format!(
            "\n{{\"sha256\":\"{SHA_A}\",\"rows\":5,\"path\":\"data-00000-of-00001.arrow\",\"bytes\":9}}\r\n  \n\
             {{\"path\":\"x\",\"bytes\":0,\"sha256\":\"{SHA_B}\",\"kind\":null,\"tensors\":[1,2]}}"
        );
        let records = read_str(&text).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].path, "data-00000-of-00001.arrow");
        assert_eq!(records[0].bytes, 9);
        assert_eq!(records[0].kind, None);
        assert_eq!(
            records[0].extra,
            json!({"rows": 5}).as_object().unwrap().clone()
        );
        assert_eq!(records[1].extra["tensors"], json!([1, 2]));
    }

    #[test]
    fn malformed_lines_name_the_source_and_line() {
        let good = format!("{{\"path\":\"a\",\"bytes\":1,\"sha256\":\"{SHA_A}\"}}\n");
        let text = format!("{good}\n{{\"path\":\"b\",\"bytes\":1 \"sha256\":\"x\"}}\n");
        assert_eq!(err_str(&text), "m.jsonl:3: column 23: expected `,` or `}`");
        assert_eq!(
            err_str(&format!("{good}[1]\n")),
            "m.jsonl:2: column 0: invalid type: sequence, expected struct ManifestRecord"
                .replace("column 0: ", "")
        );
        let missing = "{\"path\":\"a\",\"bytes\":1}";
        assert_eq!(
            err_str(missing),
            "m.jsonl:1: column 22: missing field `sha256`"
        );
        let negative = format!("{{\"path\":\"a\",\"bytes\":-1,\"sha256\":\"{SHA_A}\"}}");
        assert!(
            err_str(&negative).starts_with("m.jsonl:1: "),
            "{}",
            err_str(&negative)
        );
        assert_eq!(
            err_str(&format!("{good}{good}")),
            "m.jsonl:2: duplicate path \"a\" (first on line 1)"
        );
        let repeated_key =
            format!("{{\"path\":\"a\",\"path\":\"b\",\"bytes\":1,\"sha256\":\"{SHA_A}\"}}");
        assert_eq!(
            err_str(&repeated_key),
            "m.jsonl:1: column 18: duplicate field `path`"
        );
        let repeated_extra =
            format!("{{\"path\":\"a\",\"bytes\":1,\"sha256\":\"{SHA_A}\",\"tp\":1,\"tp\":2}}");
        assert_eq!(
            err_str(&repeated_extra),
            "m.jsonl:1: column 112: duplicate field `tp`"
        );
        let trailing = format!("{}x\n", good.trim_end());
        assert!(
            err_str(&trailing).starts_with("m.jsonl:1: column "),
            "{}",
            err_str(&trailing)
        );
        let not_utf8 = read_manifest(&b"\n\"\xff\"\n"[..], "m.jsonl")
            .unwrap_err()
            .to_string();
        assert!(not_utf8.starts_with("m.jsonl:2: "), "{not_utf8}");
    }

    #[test]
    fn invalid_records_are_rejected_on_read_and_write() {
        let cases = [
            ("", SHA_A, "path is empty"),
            ("/etc/passwd", SHA_A, "is absolute"),
            ("a/../../b", SHA_A, "`..` component"),
            ("..", SHA_A, "`..` component"),
            ("a//b", SHA_A, "empty or `.` component"),
            ("./a", SHA_A, "empty or `.` component"),
            ("a/", SHA_A, "empty or `.` component"),
            ("a\\b", SHA_A, "backslash or NUL"),
            ("a\0b", SHA_A, "backslash or NUL"),
            ("a", &SHA_A.to_uppercase(), "64 lowercase hex"),
            ("a", &SHA_A[1..], "64 lowercase hex"),
        ];
        for (path, sha, why) in cases {
            let record = ManifestRecord::new(path, 1, sha);
            let line = serde_json::to_string(&record).unwrap();
            let read = err_str(&line);
            assert!(
                read.starts_with("m.jsonl:1: ") && read.contains(why),
                "{path:?}: {read}"
            );
            let err = write_manifest(Vec::new(), &[record]).unwrap_err();
            assert!(std::error::Error::source(&err)
                .unwrap()
                .to_string()
                .contains(why));
        }
        let reserved = ManifestRecord::new("a", 1, SHA_A).with_extra("bytes", 2);
        assert_eq!(
            reserved.validate(),
            Err(RecordError::ReservedKey("bytes".into()))
        );
        let twice = [
            ManifestRecord::new("a", 1, SHA_A),
            ManifestRecord::new("a", 2, SHA_B),
        ];
        assert!(matches!(
            write_manifest(Vec::new(), &twice),
            Err(ManifestError::DuplicateRecord(p)) if p == "a"
        ));
    }

    #[test]
    fn manifest_file_round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.jsonl");
        let records = vec![
            ManifestRecord::new("a", 1, SHA_A).with_kind("config"),
            ManifestRecord::new("b/c", 2, SHA_B).with_extra("rows", 3),
        ];
        write_manifest_file(&path, &records).unwrap();
        assert_eq!(read_manifest_path(&path).unwrap(), records);
        let missing = read_manifest_path(dir.path().join("nope")).unwrap_err();
        assert!(
            missing.to_string().starts_with("reading manifest "),
            "{missing}"
        );
        assert!(matches!(missing, ManifestError::Read { .. }));
    }

    fn arb_record() -> impl Strategy<Value = ManifestRecord> {
        let component =
            "[a-zA-Z0-9_.-]{1,12}".prop_filter("not . or ..", |c| c != "." && c != "..");
        (
            prop::collection::vec(component, 1..4),
            any::<u64>(),
            "[0-9a-f]{64}",
            prop::option::of("[a-z-]{1,10}"),
            prop::collection::vec(("x[a-z]{0,6}", any::<i64>()), 0..4),
        )
            .prop_map(|(parts, bytes, sha256, kind, extras)| {
                let mut record = ManifestRecord::new(parts.join("/"), bytes, sha256);
                record.kind = kind;
                for (k, v) in extras {
                    record = record.with_extra(k, v);
                }
                record
            })
    }

    proptest! {
        #[test]
        fn write_then_read_gives_the_records_sorted(
            records in prop::collection::vec(arb_record(), 0..8)
        ) {
            let mut unique: Vec<ManifestRecord> = Vec::new();
            for r in records {
                if !unique.iter().any(|u| u.path == r.path) {
                    unique.push(r);
                }
            }
            let text = to_string(&unique);
            prop_assert_eq!(text.lines().count(), unique.len());
            let read = read_str(&text).unwrap();
            unique.sort_by(|a, b| a.path.cmp(&b.path));
            prop_assert_eq!(&read, &unique);
            prop_assert_eq!(to_string(&read), text);
        }
    }
}
