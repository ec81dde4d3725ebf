//! The xser layouts of torch_xla and NxD.
//!
//! * Converter form (`convert_checkpoints.py --save_xser`): a plain `.pt` with inline tensors plus an
//!   **empty** `<file>.tensors/` directory.
//! * Training-checkpoint form (NxD `save_checkpoint(use_xser=True)`): the `.pt` holds
//!   `TensorReference(tid)` objects, each tensor lives in `<file>.tensors/tensor_<tid>.pt` (a bare tensor),
//!   and `<file>.info.pt` maps tid to `{dtype, shape, expert_model_parallel}`.
//!
//! [`NxdFile`] reads either form (and plain files) into one list of named tensors.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::copy::{write_view, Part};
use crate::dtype::DType;
use crate::error::{FormatError, Result};
use crate::torch::pickle::{for_each_named, TensorValue, Value};
use crate::torch::pickle_write::Pickler;
use crate::torch::{
    archive_name_for, write_archive, write_pt, PtFile, PtRoot, PtStorage, PtTensor,
};
use crate::view::TensorRef;

/// `<file>.tensors`: the directory xser keeps beside a reference file.
pub fn tensors_dir(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tensors");
    PathBuf::from(s)
}

/// `<file>.tensors/tensor_<tid>.pt`.
pub fn tensor_file(path: &Path, tid: usize) -> PathBuf {
    tensors_dir(path).join(format!("tensor_{tid}.pt"))
}

/// `<file>.info.pt`: NxD's tensor-info file.
pub fn info_file(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".info.pt");
    PathBuf::from(s)
}

/// Classes whose instances stand for an out-of-line tensor.
fn reference_tid(v: &Value) -> Option<usize> {
    match v {
        Value::Object { class, state } if class.ends_with("TensorReference") => state
            .iter()
            .find(|(k, _)| k.as_str() == Some("tid"))
            .and_then(|(_, v)| v.as_int())
            .map(|t| t as usize),
        _ => None,
    }
}

/// A shard file in any of the three forms, with its referenced tensor files opened.
pub struct NxdFile {
    main: PtFile,
    referenced: BTreeMap<usize, PtFile>,
    /// Names in pickle order and where each tensor lives.
    entries: Vec<(String, Location)>,
}

#[derive(Debug, Clone)]
enum Location {
    Inline(TensorValue),
    Referenced(usize),
}

impl NxdFile {
    /// Opens a plain or xser shard. Referenced tensors are looked up in `<path>.tensors/`.
    pub fn open(path: impl AsRef<Path>) -> Result<NxdFile> {
        let path = path.as_ref();
        let main = PtFile::open(path)?;
        let entries = collect(main.root());
        let mut referenced = BTreeMap::new();
        for (name, loc) in &entries {
            if let Location::Referenced(tid) = loc {
                let file = tensor_file(path, *tid);
                let pt = PtFile::open(&file).map_err(|e| {
                    e.context(format!("{}: tensor {name} (tid {tid})", path.display()))
                })?;
                if !matches!(pt.root(), Value::Tensor(_)) {
                    return Err(FormatError::Corrupt(format!(
                        "{}: does not hold a single tensor",
                        file.display()
                    )));
                }
                referenced.insert(*tid, pt);
            }
        }
        Ok(NxdFile {
            main,
            referenced,
            entries,
        })
    }

    /// True if the file uses `TensorReference`s (the training-checkpoint form).
    pub fn has_references(&self) -> bool {
        !self.referenced.is_empty()
    }

    /// The main (reference or plain) file.
    pub fn main(&self) -> &PtFile {
        &self.main
    }

    /// Tensor names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// Every tensor with its name, as zero-copy views, in file order.
    pub fn tensors(&self) -> Result<Vec<(&str, TensorRef<'_>)>> {
        self.entries
            .iter()
            .map(|(name, loc)| {
                let view = match loc {
                    Location::Inline(t) => self.main.tensor(t)?,
                    Location::Referenced(tid) => {
                        let pt = &self.referenced[tid];
                        let Value::Tensor(t) = pt.root() else {
                            unreachable!("checked at open")
                        };
                        pt.tensor(t)?
                    }
                };
                Ok((name.as_str(), view))
            })
            .collect()
    }
}

fn collect(root: &Value) -> Vec<(String, Location)> {
    let mut out = Vec::new();
    for_each_named(root, &mut |name, v| {
        if let Some(tid) = reference_tid(v) {
            out.push((name, Location::Referenced(tid)));
        } else if let Value::Tensor(t) = v {
            out.push((name, Location::Inline(t.clone())));
        }
    });
    out
}

/// Writes an xser reference file: `{name: TensorReference(i)}` for the i-th name.
pub fn write_reference_file<W: Write>(out: W, archive: &str, names: &[String]) -> Result<W> {
    let mut p = Pickler::new();
    p.dict(names.len(), |p, i| {
        p.str(&names[i]);
        p.tensor_reference(i);
    });
    write_archive(out, archive, &p.finish(), &[], |_, _| Ok(()))
}

/// Writes NxD's `.info.pt`: `{tid: {'dtype', 'shape', 'expert_model_parallel': False}}` in tid order.
pub fn write_info_file<W: Write>(
    out: W,
    archive: &str,
    infos: &[(DType, Vec<usize>)],
) -> Result<W> {
    let mut p = Pickler::new();
    p.dict(infos.len(), |p, i| {
        p.int(i as i64);
        p.tensor_info(infos[i].0, &infos[i].1);
    });
    write_archive(out, archive, &p.finish(), &[], |_, _| Ok(()))
}

/// Writes the NxD training-checkpoint layout of existing tensor views (see
/// [`write_training_layout_with`]), converting float tensors to `out_dtype` when given.
pub fn write_training_layout<W: Write>(
    main: &Path,
    tensors: &[(String, TensorRef<'_>)],
    out_dtype: Option<DType>,
    create: impl FnMut(&Path) -> Result<W>,
    mut commit: impl FnMut(W) -> Result<()>,
) -> Result<()> {
    let dtype_of = |t: &TensorRef<'_>| out_dtype.filter(|_| t.dtype.is_float()).unwrap_or(t.dtype);
    let specs: Vec<SplitTensor> = tensors
        .iter()
        .map(|(name, t)| SplitTensor {
            name: name.clone(),
            dtype: dtype_of(t),
            shape: t.layout.shape.clone(),
        })
        .collect();
    write_training_layout_with(
        main,
        &specs,
        |i, w| write_view(&Part::whole(tensors[i].1), specs[i].dtype, w).map(|_| ()),
        create,
        |_, w| commit(w),
    )
}

/// A tensor of the training-checkpoint layout: written contiguous, as NxD's `t.cpu()` saves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitTensor {
    /// Key in the reference file.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (the bytes are row-major).
    pub shape: Vec<usize>,
}

/// Writes the NxD training-checkpoint layout: `<main>.tensors/tensor_<i>.pt` (each a bare contiguous
/// tensor whose bytes `fill(i, out)` writes), `<main>.info.pt`, then the reference file `main` last.
///
/// `create(path)` opens an output (the caller decides how: atomic temporary files, plain files) and
/// `commit(path, out)` finishes it; the `.tensors` directory must exist.
pub fn write_training_layout_with<W: Write>(
    main: &Path,
    tensors: &[SplitTensor],
    mut fill: impl FnMut(usize, &mut dyn Write) -> Result<()>,
    mut create: impl FnMut(&Path) -> Result<W>,
    mut commit: impl FnMut(&Path, W) -> Result<()>,
) -> Result<()> {
    for (tid, t) in tensors.iter().enumerate() {
        let path = tensor_file(main, tid);
        let spec = PtTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            layout: crate::view::Layout::contiguous(&t.shape),
            storage: 0,
            requires_grad: false,
        };
        let storages = [PtStorage {
            dtype: t.dtype,
            numel: spec.layout.numel(),
        }];
        let out = write_pt(
            create(&path)?,
            &archive_name_for(&path),
            &PtRoot::Tensor(spec),
            &storages,
            |_, w| fill(tid, w),
        )?;
        commit(&path, out)?;
    }
    let infos: Vec<(DType, Vec<usize>)> =
        tensors.iter().map(|t| (t.dtype, t.shape.clone())).collect();
    let info = info_file(main);
    commit(
        &info,
        write_info_file(create(&info)?, &archive_name_for(&info), &infos)?,
    )?;
    let names: Vec<String> = tensors.iter().map(|t| t.name.clone()).collect();
    commit(
        main,
        write_reference_file(create(main)?, &archive_name_for(main), &names)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::Layout;

    #[test]
    fn training_layout_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("dp_rank_00_tp_rank_00_pp_rank_00.pt");
        let names = vec!["a".to_string(), "b".to_string()];
        let data = [vec![1u8, 2, 3, 4], vec![9u8, 8]];
        let f = std::fs::File::create(&main).unwrap();
        write_reference_file(f, &archive_name_for(&main), &names).unwrap();
        std::fs::create_dir(tensors_dir(&main)).unwrap();
        for (i, d) in data.iter().enumerate() {
            let path = tensor_file(&main, i);
            let t = PtTensor {
                name: String::new(),
                dtype: DType::U8,
                layout: Layout::contiguous(&[d.len()]),
                storage: 0,
                requires_grad: false,
            };
            let storages = [PtStorage {
                dtype: DType::U8,
                numel: d.len(),
            }];
            let f = std::fs::File::create(&path).unwrap();
            write_pt(
                f,
                &archive_name_for(&path),
                &PtRoot::Tensor(t),
                &storages,
                |_, w| Ok(w.write_all(d)?),
            )
            .unwrap();
        }
        let info = info_file(&main);
        write_info_file(
            std::fs::File::create(&info).unwrap(),
            &archive_name_for(&info),
            &[(DType::U8, vec![4]), (DType::U8, vec![2])],
        )
        .unwrap();

        let f = NxdFile::open(&main).unwrap();
        assert!(f.has_references());
        let tensors = f.tensors().unwrap();
        assert_eq!(tensors.len(), 2);
        assert_eq!(tensors[0].0, "a");
        assert_eq!(tensors[1].1.contiguous_bytes().unwrap(), &[9, 8]);

        std::fs::remove_file(tensor_file(&main, 1)).unwrap();
        let err = NxdFile::open(&main).err().unwrap().to_string();
        assert!(
            err.contains("tensor_1.pt") && err.contains("tensor b"),
            "{err}"
        );
    }
}
