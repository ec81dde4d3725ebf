//! Writing torch `.pt` archives byte-identical to torch 2.15's `torch.save` (apart from the
//! `.data/serialization_id` value, which no reader checks), streaming storage bytes from the caller.

use std::io::Write;
use std::path::Path;

use super::pickle_write::Pickler;
use super::zip::ZipWriter;
use crate::dtype::DType;
use crate::error::{FormatError, Result};
use crate::view::Layout;

/// A tensor to save: its name in the state dict, and how it views one of the storages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtTensor {
    /// Key in the saved dict.
    pub name: String,
    /// Element type (must equal its storage's).
    pub dtype: DType,
    /// Shape, strides and offset into the storage, in elements.
    pub layout: Layout,
    /// Index into the storage list.
    pub storage: usize,
    /// The `requires_grad` flag torch records.
    pub requires_grad: bool,
}

/// A storage to save: `numel` elements of `dtype`, written by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtStorage {
    /// Element type.
    pub dtype: DType,
    /// Length in elements.
    pub numel: usize,
}

impl PtStorage {
    /// Length in bytes.
    pub fn nbytes(&self) -> u64 {
        (self.numel * self.dtype.size()) as u64
    }
}

/// What the archive's `data.pkl` holds.
#[derive(Debug, Clone)]
pub enum PtRoot {
    /// A dict of tensors (what `torch.save(state_dict)` writes).
    Dict(Vec<PtTensor>),
    /// A single tensor (what xser's `tensor_<i>.pt` files hold).
    Tensor(PtTensor),
}

/// The archive folder name torch uses when saving to `path`: the file name without its last extension.
/// Non-ASCII names get `archive`, as torch does when Python hands it a stream.
pub fn archive_name_for(path: &Path) -> String {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("archive");
    if !name.is_ascii() || name.is_empty() {
        return "archive".into();
    }
    match name.rfind('.') {
        Some(i) if i > 0 => name[..i].to_string(),
        _ => name.to_string(),
    }
}

/// Writes a `.pt` archive: `fill(storage_index, out)` must write exactly that storage's bytes.
///
/// Storages are numbered in the order the pickle first uses them (as torch does) and written in that
/// order; a storage no tensor uses is an error. Returns the inner writer.
pub fn write_pt<W: Write>(
    out: W,
    archive: &str,
    root: &PtRoot,
    storages: &[PtStorage],
    mut fill: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<W> {
    let tensors: Vec<&PtTensor> = match root {
        PtRoot::Dict(ts) => ts.iter().collect(),
        PtRoot::Tensor(t) => vec![t],
    };
    // Keys in first-use order.
    let mut key_of = vec![usize::MAX; storages.len()];
    let mut order = Vec::new();
    for t in &tensors {
        let s = storages.get(t.storage).ok_or_else(|| {
            FormatError::Invalid(format!(
                "tensor {} names storage {} of {}",
                t.name,
                t.storage,
                storages.len()
            ))
        })?;
        if s.dtype != t.dtype {
            return Err(FormatError::Invalid(format!(
                "tensor {} is {} but its storage is {} (torch refuses to save that)",
                t.name, t.dtype, s.dtype
            )));
        }
        if t.layout.storage_span() > s.numel || t.layout.shape.len() != t.layout.strides.len() {
            return Err(FormatError::Invalid(format!(
                "tensor {} does not fit its storage",
                t.name
            )));
        }
        if key_of[t.storage] == usize::MAX {
            key_of[t.storage] = order.len();
            order.push(t.storage);
        }
    }
    if order.len() != storages.len() {
        return Err(FormatError::Invalid(
            "a storage is not used by any tensor".into(),
        ));
    }
    let mut p = Pickler::new();
    let emit = |p: &mut Pickler, t: &PtTensor| {
        p.tensor(
            t.dtype,
            &t.layout,
            key_of[t.storage],
            storages[t.storage].numel,
            t.requires_grad,
        )
    };
    match root {
        PtRoot::Dict(ts) => p.dict(ts.len(), |p, i| {
            p.str(&ts[i].name);
            emit(p, &ts[i]);
        }),
        PtRoot::Tensor(t) => emit(&mut p, t),
    }
    write_archive(
        out,
        archive,
        &p.finish(),
        &order.iter().map(|&i| storages[i]).collect::<Vec<_>>(),
        |k, w| fill(order[k], w),
    )
}

/// Writes an archive around an already-built `data.pkl`, with storages `data/0..` in the given order.
pub fn write_archive<W: Write>(
    out: W,
    archive: &str,
    pickle: &[u8],
    storages: &[PtStorage],
    mut fill: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<W> {
    let mut zip = ZipWriter::new(out);
    zip.write_record(&format!("{archive}/data.pkl"), pickle)?;
    zip.write_record(&format!("{archive}/.format_version"), b"1")?;
    zip.write_record(&format!("{archive}/.storage_alignment"), b"64")?;
    zip.write_record(&format!("{archive}/byteorder"), b"little")?;
    for (key, s) in storages.iter().enumerate() {
        zip.start_record(&format!("{archive}/data/{key}"), s.nbytes())?;
        fill(key, &mut zip)?;
        zip.end_record()
            .map_err(|e| e.context(format!("storage {key}")))?;
    }
    zip.write_record(&format!("{archive}/version"), b"3\n")?;
    let id = serialization_id(zip.record_crcs());
    zip.write_record(&format!("{archive}/.data/serialization_id"), id.as_bytes())?;
    zip.finish()
}

/// torch's `.data/serialization_id`: 20 digits of a name hash (not reproducible, torch uses libstdc++'s
/// unordered_set order; we write zeros, which readers accept) and 20 digits folding the records' CRCs.
fn serialization_id(crcs: impl Iterator<Item = (u64, u32)>) -> String {
    let folded = crcs
        .filter(|&(size, _)| size > 0)
        .fold(0u64, |s, (_, crc)| {
            s ^ (crc as u64)
                .wrapping_add(0x9e37_79b9)
                .wrapping_add(s << 6)
                .wrapping_add(s >> 2)
        });
    format!("{:020}{:020}", 0, folded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::torch::pickle::Value;
    use crate::torch::reader::parse_archive;

    #[test]
    fn archive_names_follow_torch() {
        for (p, want) in [
            ("bf16_2x3.pt", "bf16_2x3"),
            ("model.v1.pt", "model.v1"),
            ("noext", "noext"),
            (".hidden.pt", ".hidden"),
            ("x.pt.info.pt", "x.pt.info"),
            ("modèle.pt", "archive"),
        ] {
            assert_eq!(archive_name_for(Path::new(p)), want);
        }
    }

    /// The worked example of the spec: same bytes as torch 2.15 for every record but serialization_id.
    #[test]
    fn worked_example_layout() {
        let data: Vec<u8> = [0u16, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let root = PtRoot::Dict(vec![PtTensor {
            name: "w".into(),
            dtype: DType::BF16,
            layout: Layout::contiguous(&[2, 3]),
            storage: 0,
            requires_grad: false,
        }]);
        let storages = [PtStorage {
            dtype: DType::BF16,
            numel: 6,
        }];
        let bytes = write_pt(Vec::new(), "bf16_2x3", &root, &storages, |_, w| {
            Ok(w.write_all(&data)?)
        })
        .unwrap();
        assert_eq!(bytes.len(), 1584);
        // data/0 at 0x2c0 exactly as in the hex dump, followed by its descriptor with CRC 0x3ae021b3.
        assert_eq!(&bytes[0x2c0..0x2cc], &data[..]);
        assert_eq!(
            &bytes[0x2cc..0x2d4],
            &[0x50, 0x4b, 0x07, 0x08, 0xb3, 0x21, 0xe0, 0x3a]
        );
        let a = parse_archive(&bytes).unwrap();
        let tensors = a.named_tensors();
        assert_eq!(tensors.len(), 1);
        assert_eq!(a.storage_bytes(&bytes, tensors[0].1).unwrap(), &data[..]);
        assert!(matches!(a.root, Value::Dict(_)));
    }

    #[test]
    fn shared_storage_is_written_once() {
        let root = PtRoot::Dict(vec![
            PtTensor {
                name: "a".into(),
                dtype: DType::F32,
                layout: Layout::contiguous(&[4]),
                storage: 0,
                requires_grad: false,
            },
            PtTensor {
                name: "c".into(),
                dtype: DType::F32,
                layout: Layout {
                    shape: vec![2],
                    strides: vec![1],
                    offset: 2,
                },
                storage: 0,
                requires_grad: false,
            },
        ]);
        let storages = [PtStorage {
            dtype: DType::F32,
            numel: 4,
        }];
        let mut calls = 0;
        let bytes = write_pt(Vec::new(), "s", &root, &storages, |_, w| {
            calls += 1;
            Ok(w.write_all(&[0u8; 16])?)
        })
        .unwrap();
        assert_eq!(calls, 1);
        let a = parse_archive(&bytes).unwrap();
        assert_eq!(a.named_tensors()[1].1.layout.offset, 2);
    }

    #[test]
    fn refuses_inconsistent_input() {
        let t = PtTensor {
            name: "a".into(),
            dtype: DType::F32,
            layout: Layout::contiguous(&[5]),
            storage: 0,
            requires_grad: false,
        };
        let storages = [PtStorage {
            dtype: DType::F32,
            numel: 4,
        }];
        assert!(write_pt(
            Vec::new(),
            "s",
            &PtRoot::Dict(vec![t]),
            &storages,
            |_, _| Ok(())
        )
        .is_err());
    }
}
