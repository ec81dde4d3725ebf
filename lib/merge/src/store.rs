//! Opening inputs: a Hugging Face directory (index + shards, or one file), a safetensors file,
//! or a `.pt` state dict (a DeepSpeed `{"module": {...}}` checkpoint reads its `module`). Every
//! file is memory-mapped; tensors are borrowed views.

use std::path::{Path, PathBuf};

use tensor_formats::safetensors::ShardedCheckpoint;
use tensor_formats::torch::{PtFile, TensorValue, Value};
use tensor_formats::{DType, FormatError, TensorRef};

/// What a planner needs to know of a tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its name in the state dict.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

/// A [`TensorInfo`] from its parts (for tests).
#[cfg(test)]
pub(crate) fn info(name: &str, dtype: DType, shape: &[usize]) -> TensorInfo {
    TensorInfo {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
    }
}

/// One opened input.
pub enum Store {
    /// safetensors: one file or an index-sharded checkpoint.
    Safetensors(ShardedCheckpoint),
    /// A torch `.pt` archive, with its tensors (DeepSpeed's `module.` prefix removed).
    Pt {
        /// The mapped file.
        file: PtFile,
        /// Tensor names and values, in pickle order.
        entries: Vec<(String, TensorValue)>,
    },
}

/// True for a path that names a torch archive rather than safetensors.
fn is_torch_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("pt" | "bin" | "pth" | "ckpt")
    )
}

impl Store {
    /// Opens `path`: a directory (Hugging Face checkpoint), a `.safetensors` or `.index.json`
    /// file, or a `.pt`/`.bin`/`.pth` torch archive.
    pub fn open(path: &Path) -> Result<Store, FormatError> {
        if !path.exists() {
            return Err(FormatError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        if path.is_file() && is_torch_file(path) {
            let file = PtFile::open(path)?;
            let entries = pt_entries(&file);
            return Ok(Store::Pt { file, entries });
        }
        Ok(Store::Safetensors(ShardedCheckpoint::open(path)?))
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        match self {
            Store::Safetensors(c) => c
                .names()
                .iter()
                .map(|n| {
                    let (_, e) = c.get(n).expect("names() are in the checkpoint");
                    TensorInfo {
                        name: n.clone(),
                        dtype: e.dtype,
                        shape: e.layout.shape.clone(),
                    }
                })
                .collect(),
            Store::Pt { entries, .. } => entries
                .iter()
                .map(|(n, t)| TensorInfo {
                    name: n.clone(),
                    dtype: t.storage.dtype,
                    shape: t.layout.shape.clone(),
                })
                .collect(),
        }
    }

    /// A view of the tensor called `name`.
    pub fn view(&self, name: &str) -> Result<TensorRef<'_>, FormatError> {
        match self {
            Store::Safetensors(c) => {
                let (file, entry) = c
                    .get(name)
                    .ok_or_else(|| FormatError::Invalid(format!("no tensor `{name}`")))?;
                Ok(file.tensor(entry))
            }
            Store::Pt { file, entries } => {
                let (_, t) = entries
                    .iter()
                    .find(|(n, _)| n == name)
                    .ok_or_else(|| FormatError::Invalid(format!("no tensor `{name}`")))?;
                file.tensor(t)
            }
        }
    }

    /// The files this input reads (for messages and for refusing to overwrite an input).
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            Store::Safetensors(c) => c.shards().iter().map(|s| s.path().to_path_buf()).collect(),
            Store::Pt { file, .. } => vec![file.path().to_path_buf()],
        }
    }
}

/// The tensors of a `.pt` file; for a DeepSpeed checkpoint (a dict with a `module` dict) only
/// those under `module`, named without the prefix.
fn pt_entries(file: &PtFile) -> Vec<(String, TensorValue)> {
    let deepspeed = matches!(file.root().get("module"), Some(Value::Dict(_)));
    file.named_tensors()
        .into_iter()
        .filter_map(|(name, t)| {
            if deepspeed {
                name.strip_prefix("module.")
                    .map(|n| (n.to_string(), t.clone()))
            } else {
                Some((name, t.clone()))
            }
        })
        .collect()
}
