//! Reading: header validation on a byte slice, and memory-mapped files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::de::{value, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::{byte_len, MAX_HEADER_LEN};
use crate::dtype::{DType, ALL_DTYPES};
use crate::error::{FormatError, Result};
use crate::view::{Layout, TensorRef};

/// One tensor of a safetensors file, as its header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsEntry {
    /// Tensor name (its key in the header).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// The shape, as a contiguous layout at offset 0 of the tensor's own bytes.
    pub layout: Layout,
    /// Absolute byte range of the tensor's data in the file.
    pub data: Range<usize>,
}

/// A validated header: the tensors in file-offset order and the optional `__metadata__` map.
#[derive(Debug, Clone)]
pub struct ParsedHeader {
    tensors: Vec<SafetensorsEntry>,
    by_name: HashMap<String, usize>,
    metadata: Option<BTreeMap<String, String>>,
}

impl ParsedHeader {
    /// The tensors in file-offset order (ties between zero-size tensors keep header order).
    pub fn tensors(&self) -> &[SafetensorsEntry] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&SafetensorsEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The `__metadata__` map (`None` when absent or `null`).
    pub fn metadata(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.as_ref()
    }
}

/// Parses and validates the header of a whole safetensors file held in `bytes`.
///
/// Accepts what the reference reader (safetensors 0.8.0) accepts, except: duplicate header keys (the reference
/// silently keeps the last one), empty tensors whose other dimensions overflow 64 bits when multiplied (the
/// reference accepts `[0, 2^32, 2^32]`), and dtypes this suite does not carry ([`FormatError::Unsupported`]).
/// Every other failure is a one-line [`FormatError::Corrupt`] naming the tensor concerned. Never panics, even
/// where the reference's own arithmetic overflows (offsets summing to nearly `usize::MAX`).
pub fn parse_header(bytes: &[u8]) -> Result<ParsedHeader> {
    let Some(prefix) = bytes.first_chunk::<8>() else {
        return Err(corrupt(format!(
            "file is {} bytes long, shorter than the 8-byte header length",
            bytes.len()
        )));
    };
    let header_len = u64::from_le_bytes(*prefix);
    if header_len > MAX_HEADER_LEN as u64 {
        return Err(corrupt(format!(
            "header length {header_len} is over the limit of {MAX_HEADER_LEN} bytes"
        )));
    }
    let data_start = 8 + header_len as usize;
    let Some(header) = bytes.get(8..data_start) else {
        return Err(corrupt(format!(
            "truncated: the header length says {header_len} bytes but only {} follow it",
            bytes.len() - 8
        )));
    };
    let text = std::str::from_utf8(header)
        .map_err(|e| corrupt(format!("header is not valid UTF-8: {e}")))?;
    let RawHeader(raw) = serde_json::from_str(text)
        .map_err(|e| corrupt(format!("header is not valid JSON: {e}")))?;

    let mut seen = HashSet::new();
    if let Some((key, _)) = raw.iter().find(|(key, _)| !seen.insert(key.as_str())) {
        return Err(corrupt(format!("`{key}` appears twice in the header")));
    }
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            metadata = Deserialize::deserialize(value).map_err(|e| {
                corrupt(format!(
                    "`__metadata__` is not a map of strings to strings: {e}"
                ))
            })?;
        } else {
            tensors.push(parse_entry(name, value)?);
        }
    }

    tensors.sort_by_key(|t| (t.data.start, t.data.end));
    let data_len = check_contiguous(&tensors)?;
    match data_start.checked_add(data_len) {
        Some(end) if end == bytes.len() => {}
        Some(end) if end < bytes.len() => {
            let extra = bytes.len() - end;
            return Err(corrupt(format!(
                "{extra} trailing bytes after the last tensor's data (which ends at byte {end})"
            )));
        }
        _ => {
            let present = bytes.len() - data_start;
            return Err(corrupt(format!(
                "truncated: the tensors need {data_len} bytes of data but only {present} follow \
                 the header"
            )));
        }
    }

    for t in &mut tensors {
        t.data = data_start + t.data.start..data_start + t.data.end;
    }
    let by_name = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    Ok(ParsedHeader {
        tensors,
        by_name,
        metadata,
    })
}

/// Checks that `tensors`, sorted by offsets, cover the data buffer from 0 without gaps or overlaps; returns
/// the data length.
fn check_contiguous(tensors: &[SafetensorsEntry]) -> Result<usize> {
    let mut data_len = 0;
    let mut prev: Option<&SafetensorsEntry> = None;
    for t in tensors {
        let Range { start, end } = t.data;
        let name = &t.name;
        let message = match prev {
            _ if start == data_len => None,
            None => Some(format!(
                "the first tensor `{name}` starts at data offset {start}, not 0"
            )),
            Some(p) if start > data_len => Some(format!(
                "gap: {} bytes between tensor `{}` (ends at data offset {data_len}) and tensor \
                 `{name}` (starts at {start}) belong to no tensor",
                start - data_len,
                p.name
            )),
            Some(p) => Some(format!(
                "tensor `{name}` (data_offsets [{start}, {end}]) overlaps tensor `{}` \
                 (data_offsets [{}, {}])",
                p.name, p.data.start, p.data.end
            )),
        };
        if let Some(message) = message {
            return Err(corrupt(message));
        }
        data_len = end;
        prev = Some(t);
    }
    Ok(data_len)
}

/// Fuzzing entry point: runs [`parse_header`] on arbitrary bytes and ignores the outcome.
pub fn fuzz_parse(bytes: &[u8]) {
    let _ = parse_header(bytes);
}

fn corrupt(message: String) -> FormatError {
    FormatError::Corrupt(message)
}

/// The header's top-level entries in file order, duplicates kept (a JSON object read into a map would hide them).
struct RawHeader(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RawHeader, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a JSON object mapping tensor names to their dtype, shape and data_offsets",
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(RawHeader(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// A tensor entry as the reference deserializes it (unknown keys are ignored).
#[derive(Deserialize)]
#[serde(expecting = "an object with dtype, shape and data_offsets")]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Checks one tensor entry on its own; its `data` range is still relative to the data buffer.
fn parse_entry(name: String, value: Value) -> Result<SafetensorsEntry> {
    let err = |message: String| corrupt(format!("tensor `{name}`: {message}"));
    let info = RawInfo::deserialize(value).map_err(|e| err(e.to_string()))?;
    let Some(dtype) = DType::from_safetensors_name(&info.dtype) else {
        let reference = safetensors::Dtype::deserialize(
            IntoDeserializer::<value::Error>::into_deserializer(info.dtype.as_str()),
        );
        return Err(match reference {
            Ok(_) => FormatError::Unsupported(format!(
                "tensor `{name}`: dtype {} is valid safetensors but not supported here \
                 (supported: {})",
                info.dtype,
                ALL_DTYPES.map(DType::safetensors_name).join(", ")
            )),
            Err(_) => err(format!("unknown dtype `{}`", info.dtype)),
        });
    };
    let (start, end) = info.data_offsets;
    if end < start {
        return Err(err(format!(
            "data_offsets [{start}, {end}] end before they start"
        )));
    }
    let Some(needed) = byte_len(dtype, &info.shape) else {
        return Err(err(format!(
            "shape {:?} of {} is too large: its dimensions times the element size overflow \
             64 bits",
            info.shape, info.dtype
        )));
    };
    if end - start != needed {
        return Err(err(format!(
            "data_offsets [{start}, {end}] hold {} bytes but shape {:?} of {} needs {needed}",
            end - start,
            info.shape,
            info.dtype
        )));
    }
    Ok(SafetensorsEntry {
        layout: Layout::contiguous(&info.shape),
        name,
        dtype,
        data: start..end,
    })
}

/// A safetensors file, memory-mapped read-only, with its validated header.
///
/// The map is shared with the file on disk: the file must not be modified while it is open (the usual mmap
/// contract; the suite never writes to its inputs).
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    header: ParsedHeader,
}

impl SafetensorsFile {
    /// Maps `path` and validates its header; errors name the file.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref();
        let io = |e| FormatError::io(path, e);
        let file = File::open(path).map_err(io)?;
        if file.metadata().map_err(io)?.is_dir() {
            return Err(FormatError::Invalid(format!(
                "{}: is a directory, not a safetensors file",
                path.display()
            )));
        }
        // SAFETY: read-only private map of a file that nothing in this process writes to; see the type's docs.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = parse_header(&map).map_err(|e| e.context(path.display()))?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            header,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The validated header.
    pub fn header(&self) -> &ParsedHeader {
        &self.header
    }

    /// The tensors in file-offset order.
    pub fn tensors(&self) -> &[SafetensorsEntry] {
        self.header.tensors()
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&SafetensorsEntry> {
        self.header.get(name)
    }

    /// The `__metadata__` map (`None` when absent or `null`).
    pub fn metadata(&self) -> Option<&BTreeMap<String, String>> {
        self.header.metadata()
    }

    /// A zero-copy view of a tensor: its storage is the mapped bytes of that tensor.
    ///
    /// # Panics
    ///
    /// If `entry` does not come from this file and lies beyond its end.
    pub fn tensor<'a>(&'a self, entry: &'a SafetensorsEntry) -> TensorRef<'a> {
        TensorRef {
            dtype: entry.dtype,
            layout: &entry.layout,
            storage: &self.map[entry.data.clone()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::test_support::{bf16_2x3, mixed, multi, safetensors_bytes};
    use proptest::prelude::*;
    use safetensors::SafeTensors;

    /// A file whose header is exactly `header` (no padding), followed by `data`.
    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        safetensors_bytes(header.len() as u64, header, data)
    }

    /// `bytes` is rejected by both this reader and the reference, and our message contains `expected`.
    #[track_caller]
    fn rejected(bytes: &[u8], expected: &str) {
        let ours = parse_header(bytes).unwrap_err();
        assert!(matches!(ours, FormatError::Corrupt(_)), "{ours:?}");
        let message = ours.to_string();
        assert!(
            message.contains(expected),
            "`{message}` should contain `{expected}`"
        );
        assert!(!message.contains('\n'), "one line: {message}");
        assert!(
            SafeTensors::read_metadata(bytes).is_err(),
            "the reference accepts what we reject: {message}"
        );
    }

    fn tensor_json(dtype: &str, shape: &str, start: usize, end: usize) -> String {
        format!(r#"{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{start},{end}]}}"#)
    }

    #[test]
    fn reads_the_reference_vectors() {
        let bytes = bf16_2x3();
        let h = parse_header(&bytes).unwrap();
        assert_eq!(
            h.tensors(),
            [SafetensorsEntry {
                name: "w".into(),
                dtype: DType::BF16,
                layout: Layout::contiguous(&[2, 3]),
                data: 72..84
            }]
        );
        assert!(h.metadata().is_none());

        let bytes = mixed();
        let h = parse_header(&bytes).unwrap();
        let names: Vec<_> = h.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["i", "b", "e", "w", "s", "flag"]);
        let e = h.get("e").unwrap();
        assert_eq!(
            (e.dtype, &e.layout.shape[..], e.data.len()),
            (DType::F32, &[0, 4][..], 0)
        );
        let s = h.get("s").unwrap();
        assert_eq!(
            (s.dtype, s.layout.shape.len(), &bytes[s.data.clone()]),
            (DType::F16, 0, &[0x00, 0x42][..])
        );
        assert_eq!(h.get("flag").unwrap().data, 426..428);
        assert_eq!(
            h.metadata().unwrap(),
            &BTreeMap::from([("format".into(), "pt".into())])
        );

        let bytes = multi();
        let h = parse_header(&bytes).unwrap();
        let odd = h.get("café\"\\\u{1}").unwrap();
        assert_eq!(
            (odd.dtype, &bytes[odd.data.clone()]),
            (DType::Bool, &[1][..])
        );
        assert_eq!(h.metadata().unwrap()["note"], "über \"q\"\n");
    }

    #[test]
    fn accepts_what_the_reference_accepts() {
        // Leading whitespace, unpadded length, entries out of offset order, unknown keys, null metadata, and
        // zero-size tensors sharing an offset (kept in header order).
        let header = format!(
            r#" {{"__metadata__":null,"b":{},"a":{},"z":{},"y":{},"extra":{{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":1}}}}"#,
            tensor_json("I32", "[]", 2, 6),
            tensor_json("U8", "[2]", 0, 2),
            tensor_json("F16", "[0,3]", 6, 6),
            tensor_json("F16", "[3,0]", 6, 6),
        );
        let bytes = file(&header, &[1, 2, 3, 4, 5, 6]);
        assert!(SafeTensors::read_metadata(&bytes).is_ok());
        let h = parse_header(&bytes).unwrap();
        let names: Vec<_> = h.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["extra", "a", "b", "z", "y"]);
        assert!(h.metadata().is_none());
        let start = 8 + header.len();
        assert_eq!(h.get("b").unwrap().data, start + 2..start + 6);
        assert_eq!(parse_header(&file("{}", &[])).unwrap().tensors(), []);
    }

    #[test]
    fn rejects_bad_lengths() {
        rejected(&[], "0 bytes long, shorter than the 8-byte header length");
        rejected(&[8, 0, 0], "3 bytes long");
        rejected(
            &100_000_001u64.to_le_bytes(),
            "header length 100000001 is over the limit of 100000000",
        );
        rejected(&u64::MAX.to_le_bytes(), "over the limit");
        let mut bytes = bf16_2x3();
        bytes.truncate(40);
        rejected(
            &bytes,
            "truncated: the header length says 64 bytes but only 32 follow it",
        );
    }

    #[test]
    fn rejects_bad_json() {
        rejected(
            &file("{\"a\":\u{7f}\u{80}", &[]),
            "header is not valid JSON",
        );
        rejected(
            &safetensors_bytes(2, "\u{0}", &[0xff]),
            "header is not valid UTF-8",
        );
        rejected(
            &file("[]", &[]),
            "header is not valid JSON: invalid type: sequence, expected a JSON object",
        );
        rejected(
            &file("{}\0", &[]),
            "header is not valid JSON: trailing characters",
        );
        rejected(
            &file(r#"{"a":5}"#, &[]),
            "tensor `a`: invalid type: integer `5`, expected an object",
        );
        rejected(
            &file(r#"{"a":{"dtype":"U8","shape":[1]}}"#, &[0]),
            "tensor `a`: missing field `data_offsets`",
        );
        rejected(
            &file(
                &format!(r#"{{"a":{}}}"#, tensor_json("U8", "[-1]", 0, 1)),
                &[0],
            ),
            "tensor `a`: invalid value: integer `-1`, expected usize",
        );
        rejected(
            &file(
                &format!(r#"{{"a":{}}}"#, tensor_json("U8", "[1.0]", 0, 1)),
                &[0],
            ),
            "tensor `a`: invalid type: floating point",
        );
        rejected(
            &file(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
                &[0],
            ),
            "tensor `a`: invalid length 3",
        );
        rejected(
            &file(r#"{"__metadata__":{"n":1}}"#, &[]),
            "`__metadata__` is not a map of strings to strings: invalid type: integer `1`, \
             expected a string",
        );
        rejected(
            &file(r#"{"__metadata__":{},"__metadata__":{}}"#, &[]),
            "`__metadata__` appears twice in the header",
        );
    }

    #[test]
    fn dtypes_are_named() {
        rejected(
            &file(
                &format!(r#"{{"q":{}}}"#, tensor_json("Q4", "[2]", 0, 1)),
                &[0],
            ),
            "tensor `q`: unknown dtype `Q4`",
        );
        // U16 is a valid safetensors dtype, so the reference reads it; this suite does not carry it.
        let bytes = file(
            &format!(r#"{{"u":{}}}"#, tensor_json("U16", "[1]", 0, 2)),
            &[0, 0],
        );
        assert!(SafeTensors::read_metadata(&bytes).is_ok());
        let err = parse_header(&bytes).unwrap_err();
        assert!(matches!(err, FormatError::Unsupported(_)), "{err:?}");
        let expected = "tensor `u`: dtype U16 is valid safetensors but not supported here \
                        (supported: BOOL, U8, I8, I16, I32, I64, F16, BF16, F32, F64)";
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn rejects_bad_offsets() {
        let two = |a: (usize, usize), b: (usize, usize), data: &[u8]| {
            file(
                &format!(
                    r#"{{"a":{},"b":{}}}"#,
                    tensor_json("U8", "[2]", a.0, a.1),
                    tensor_json("U8", "[2]", b.0, b.1)
                ),
                data,
            )
        };
        rejected(
            &two((2, 4), (4, 6), &[0; 6]),
            "the first tensor `a` starts at data offset 2, not 0",
        );
        rejected(
            &two((0, 2), (3, 5), &[0; 5]),
            "gap: 1 bytes between tensor `a` (ends at data offset 2) and tensor `b` (starts at 3)",
        );
        rejected(
            &two((0, 2), (1, 3), &[0; 3]),
            "tensor `b` (data_offsets [1, 3]) overlaps tensor `a` (data_offsets [0, 2])",
        );
        rejected(
            &two((0, 2), (2, 4), &[0; 3]),
            "truncated: the tensors need 4 bytes of data but only 3 follow the header",
        );
        rejected(
            &two((0, 2), (2, 4), &[0; 7]),
            "3 trailing bytes after the last tensor's data",
        );
        rejected(
            &file(
                &format!(r#"{{"a":{}}}"#, tensor_json("U8", "[1]", 3, 2)),
                &[0],
            ),
            "tensor `a`: data_offsets [3, 2] end before they start",
        );
        rejected(
            &file(
                &format!(r#"{{"a":{}}}"#, tensor_json("BF16", "[2,3]", 0, 10)),
                &[0; 10],
            ),
            "tensor `a`: data_offsets [0, 10] hold 10 bytes but shape [2, 3] of BF16 needs 12",
        );
        rejected(
            &file(
                &format!(
                    r#"{{"a":{}}}"#,
                    tensor_json("U8", "[4294967296,4294967296]", 0, 0)
                ),
                &[],
            ),
            "tensor `a`: shape [4294967296, 4294967296] of U8 is too large: its dimensions times the element size overflow 64 bits",
        );
        rejected(
            &file(
                &format!(
                    r#"{{"a":{}}}"#,
                    tensor_json("F32", "[4611686018427387904]", 0, 0)
                ),
                &[],
            ),
            "is too large",
        );
        // Offsets near usize::MAX must not overflow when checked against the file length.
        let max = usize::MAX;
        rejected(&two((0, 2), (2, max), &[0; 4]), "hold");
        // Offsets summing to nearly usize::MAX make the reference overflow (a panic in debug builds).
        let k = (1usize << 61) - 1;
        let mut entries: Vec<_> = (0..8)
            .map(|i| {
                format!(
                    r#""t{i}":{}"#,
                    tensor_json("U8", &format!("[{k}]"), i * k, (i + 1) * k)
                )
            })
            .collect();
        entries.push(format!(
            r#""z":{}"#,
            tensor_json("U8", "[4]", 8 * k, 8 * k + 4)
        ));
        let huge = file(&format!("{{{}}}", entries.join(",")), &[]);
        assert_eq!(
            parse_header(&huge).unwrap_err().to_string(),
            format!(
                "truncated: the tensors need {} bytes of data but only 0 follow the header",
                8 * k + 4
            )
        );
    }

    #[test]
    fn stricter_than_the_reference() {
        // The reference keeps the last of duplicate entries silently.
        let t = tensor_json("U8", "[2]", 0, 2);
        let bytes = file(&format!(r#"{{"a":{t},"a":{t}}}"#), &[0, 0]);
        assert!(SafeTensors::read_metadata(&bytes).is_ok());
        let err = parse_header(&bytes).unwrap_err();
        assert_eq!(err.to_string(), "`a` appears twice in the header");
        // The reference accepts absurd empty shapes, whose strides would overflow.
        let bytes = file(
            &format!(
                r#"{{"e":{}}}"#,
                tensor_json("U8", "[0,4294967296,4294967296]", 0, 0)
            ),
            &[],
        );
        assert!(SafeTensors::read_metadata(&bytes).is_ok());
        let err = parse_header(&bytes).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("tensor `e`: shape [0, 4294967296, 4294967296] of U8 is too large"));
    }

    #[test]
    fn open_maps_the_file_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, mixed()).unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.path(), path);
        assert_eq!(f.bytes(), mixed());
        assert_eq!(f.tensors(), f.header().tensors());
        assert_eq!(f.metadata().unwrap()["format"], "pt");
        let w = f.get("w").unwrap();
        let t = f.tensor(w);
        assert_eq!(
            t.contiguous_bytes().unwrap(),
            [0x00, 0x00, 0x80, 0x3f, 0x00, 0x40, 0x40, 0x40, 0x80, 0x40, 0xa0, 0x40]
        );
        assert!(
            std::ptr::eq(t.storage.as_ptr(), f.bytes()[w.data.start..].as_ptr()),
            "zero-copy"
        );
        t.validate().unwrap();

        std::fs::write(&path, b"").unwrap();
        let err = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: file is 0 bytes long, shorter than the 8-byte header length",
                path.display()
            )
        );
        let err = SafetensorsFile::open(dir.path().join("missing.safetensors")).unwrap_err();
        assert!(
            matches!(err, FormatError::Io { .. })
                && err.to_string().contains("missing.safetensors"),
            "{err}"
        );
        let err = SafetensorsFile::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.ends_with(": is a directory, not a safetensors file"),
            "{err}"
        );
    }

    proptest! {
        /// Mutated vectors never panic, and agree with the reference: we accept only what it accepts, with the
        /// same tensors, and refuse what it accepts only for the documented reasons (duplicate keys, unsupported
        /// dtypes, absurd empty shapes).
        #[test]
        fn agrees_with_the_reference_on_mutations(
            which in 0..3usize,
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut bytes = [bf16_2x3, mixed, multi][which]();
            for (at, byte) in edits {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            match (parse_header(&bytes), SafeTensors::read_metadata(&bytes)) {
                (Ok(ours), Ok((n, reference))) => {
                    prop_assert_eq!(ours.tensors().len(), reference.tensors().len());
                    for t in ours.tensors() {
                        let info = reference.info(&t.name).unwrap();
                        prop_assert_eq!(info.dtype.to_string(), t.dtype.safetensors_name());
                        prop_assert_eq!(&info.shape, &t.layout.shape);
                        prop_assert_eq!(8 + n + info.data_offsets.0..8 + n + info.data_offsets.1, t.data.clone());
                    }
                }
                (Ok(_), Err(e)) => prop_assert!(false, "we accept what the reference rejects: {}", e),
                (Err(e), Ok(_)) => prop_assert!(
                    matches!(e, FormatError::Unsupported(_))
                        || ["appears twice", "is too large"].iter().any(|m| e.to_string().contains(m)),
                    "we reject what the reference accepts: {}", e
                ),
                (Err(_), Err(_)) => {}
            }
        }
    }
}
