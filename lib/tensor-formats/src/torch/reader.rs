//! Reading torch `.pt` archives through a memory map, with zero-copy tensor views.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::pickle::{for_each_named, unpickle, TensorValue, Value};
use super::zip::{read_central_directory, ZipRecord};
use crate::error::{FormatError, Result};
use crate::view::TensorRef;

/// A parsed `.pt` archive: its records, the decoded `data.pkl`, and the mapped bytes tensors point into.
pub struct PtFile {
    path: PathBuf,
    map: Mmap,
    archive: PtArchive,
}

/// The parsed structure of an archive held in memory (no file attached): used by [`PtFile`] and fuzzing.
#[derive(Debug)]
pub struct PtArchive {
    /// The top folder name (`bf16_2x3`, `archive`...).
    pub archive_name: String,
    /// Records by lower-cased name relative to the top folder (miniz looks names up case-insensitively).
    pub records: HashMap<String, ZipRecord>,
    /// The decoded `data.pkl`.
    pub root: Value,
}

/// Parses an archive from its bytes: zip directory, `version`, `byteorder`, and the restricted unpickling
/// of `data.pkl`. Storage records are checked lazily, when a tensor is viewed.
pub fn parse_archive(bytes: &[u8]) -> Result<PtArchive> {
    if bytes.len() >= 4 && bytes[..4] != *b"PK\x03\x04" {
        return Err(FormatError::Unsupported(
            "not a zip-format torch file (legacy torch.save format or plain pickle); re-save it with torch.save's default settings".into(),
        ));
    }
    let entries = read_central_directory(bytes)?;
    let first = entries
        .first()
        .ok_or_else(|| FormatError::Corrupt("empty zip archive".into()))?;
    let archive_name = match first.name.split_once('/') {
        Some((prefix, _)) if !prefix.is_empty() => prefix.to_string(),
        _ => {
            return Err(FormatError::Corrupt(format!(
                "record {} is not in a top-level folder",
                first.name
            )))
        }
    };
    let mut records = HashMap::new();
    for rec in entries {
        let rel = rec
            .name
            .strip_prefix(&archive_name)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| {
                FormatError::Corrupt(format!(
                    "record {} is not under the archive folder {archive_name}/",
                    rec.name
                ))
            })?
            .to_ascii_lowercase();
        records.insert(rel, rec);
    }
    let small = |name: &str| -> Result<Option<&[u8]>> {
        match records.get(name) {
            Some(r) => stored_slice(bytes, r).map(Some),
            None => Ok(None),
        }
    };
    let version = small(".data/version")?
        .or(small("version")?)
        .ok_or_else(|| {
            FormatError::Corrupt("no `version` record: not a torch.save archive".into())
        })?;
    let version: u64 = std::str::from_utf8(version)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| FormatError::Corrupt("unreadable `version` record".into()))?;
    if !(1..=10).contains(&version) {
        return Err(FormatError::Unsupported(format!(
            "archive format version {version} (torch reads 1 to 10)"
        )));
    }
    match small("byteorder")? {
        None | Some(b"little") => {}
        Some(b"big") => {
            return Err(FormatError::Unsupported(
                "big-endian archive: re-save it on a little-endian machine".into(),
            ))
        }
        Some(_) => {
            return Err(FormatError::Corrupt(
                "`byteorder` record is neither little nor big".into(),
            ))
        }
    }
    let pickle = small("data.pkl")?.ok_or_else(|| {
        FormatError::Corrupt("no `data.pkl` record (a TorchScript or non-torch zip?)".into())
    })?;
    if records.contains_key("constants.pkl") {
        return Err(FormatError::Unsupported(
            "TorchScript archive (has constants.pkl): not a state dict".into(),
        ));
    }
    let root = unpickle(pickle)?;
    Ok(PtArchive {
        archive_name,
        records,
        root,
    })
}

/// The bytes of a stored record; compressed records are refused (torch's mmap path would read garbage).
fn stored_slice<'a>(bytes: &'a [u8], rec: &ZipRecord) -> Result<&'a [u8]> {
    if rec.method != 0 {
        return Err(FormatError::Unsupported(format!(
            "record {} is compressed (method {}); torch writes stored records: re-save with torch.save",
            rec.name, rec.method
        )));
    }
    let start = rec.data_offset as usize;
    Ok(&bytes[start..start + rec.compressed_size as usize])
}

impl PtArchive {
    /// The bytes of `data/<key>` for a tensor, checked to be long enough for its storage.
    pub fn storage_bytes<'a>(&self, bytes: &'a [u8], tensor: &TensorValue) -> Result<&'a [u8]> {
        let name = format!("data/{}", tensor.storage.key.to_ascii_lowercase());
        let rec = self
            .records
            .get(&name)
            .ok_or_else(|| FormatError::Corrupt(format!("storage record {name} is missing")))?;
        let data = stored_slice(bytes, rec)?;
        let needed = tensor
            .storage
            .numel
            .checked_mul(tensor.storage.dtype.size());
        match needed {
            Some(n) if n <= data.len() => Ok(&data[..n]),
            _ => Err(FormatError::Corrupt(format!(
                "storage record {name} has {} bytes, the pickle says {} elements of {}",
                data.len(),
                tensor.storage.numel,
                tensor.storage.dtype
            ))),
        }
    }

    /// Every tensor under the root with its dotted name, in pickle order. A bare-tensor root is named `""`.
    /// Non-tensor leaves (ints, strings, xser references...) are skipped.
    pub fn named_tensors(&self) -> Vec<(String, &TensorValue)> {
        let mut out = Vec::new();
        for_each_named(&self.root, &mut |name, v| {
            if let Value::Tensor(t) = v {
                out.push((name, t));
            }
        });
        out
    }
}

impl PtFile {
    /// Maps and parses a `.pt` file. Errors name the file.
    pub fn open(path: impl AsRef<Path>) -> Result<PtFile> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| FormatError::io(path, e))?;
        // SAFETY: the map is read-only; a concurrent truncation of the file would be a user error that
        // surfaces as SIGBUS, the same contract every mmap-based checkpoint reader (torch included) has.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
        let archive = parse_archive(&map).map_err(|e| e.context(path.display()))?;
        Ok(PtFile {
            path: path.to_path_buf(),
            map,
            archive,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed archive structure.
    pub fn archive(&self) -> &PtArchive {
        &self.archive
    }

    /// The decoded `data.pkl`.
    pub fn root(&self) -> &Value {
        &self.archive.root
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Every tensor under the root with its dotted name, in pickle order.
    pub fn named_tensors(&self) -> Vec<(String, &TensorValue)> {
        self.archive.named_tensors()
    }

    /// A zero-copy view of a tensor of this file, checked to lie inside its storage.
    pub fn tensor<'a>(&'a self, t: &'a TensorValue) -> Result<TensorRef<'a>> {
        let storage = self
            .archive
            .storage_bytes(&self.map, t)
            .map_err(|e| e.context(self.path.display()))?;
        let view = TensorRef {
            dtype: t.storage.dtype,
            layout: &t.layout,
            storage,
        };
        view.validate()
            .map_err(|e| e.context(self.path.display()))?;
        Ok(view)
    }
}

/// Fuzzing entry point: parses an archive and views every tensor, ignoring the result. Must never panic.
pub fn fuzz_parse(bytes: &[u8]) {
    if let Ok(archive) = parse_archive(bytes) {
        for (_, t) in archive.named_tensors() {
            if let Ok(storage) = archive.storage_bytes(bytes, t) {
                let _ = TensorRef {
                    dtype: t.storage.dtype,
                    layout: &t.layout,
                    storage,
                }
                .validate();
            }
        }
    }
}
