//! Opening the shard files (plain, converter xser, or training-checkpoint xser with
//! `TensorReference`s) and listing their tensors by name, as zero-copy views of the mapped files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use suite_support::exit::ToolError;
use tensor_formats::torch::Value;
use tensor_formats::xser::{info_file, tensors_dir, NxdFile};
use tensor_formats::TensorRef;

/// One opened shard file.
pub struct ShardFile {
    name: String,
    file: NxdFile,
}

/// The tensors of one shard file, by name.
pub struct ShardTensors<'a> {
    /// The file name (`dp_rank_00_tp_rank_01_pp_rank_00.pt`), for messages.
    pub name: &'a str,
    list: Vec<(String, TensorRef<'a>)>,
    by_name: HashMap<String, usize>,
}

impl ShardFile {
    /// Maps and parses `path` and every tensor file it references. A file that cannot be read
    /// (truncated, corrupt, a referenced `tensor_<i>.pt` missing) is a usage error (exit 2).
    pub fn open(path: &Path) -> Result<ShardFile, ToolError> {
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let file = NxdFile::open(path).map_err(|e| {
            let hint = tensor_data_not_saved(path).then_some(
                "the model tensors of this checkpoint were not saved (NxD skips them when ZeRO-1 \
                 keeps the fp32 master weights in optim/); unsharding from the optimizer state \
                 is not supported",
            );
            let err = ToolError::usage(anyhow!(e).context("cannot read a shard file"));
            match hint {
                Some(h) => err.with_hint(h),
                None => err,
            }
        })?;
        Ok(ShardFile { name, file })
    }

    /// The model tensors by name. A file whose root dict wraps the state dict under a `model`
    /// key (`{"model": {...}}`, which NxD's reverse conversion also accepts) is unwrapped.
    pub fn tensors(&self) -> Result<ShardTensors<'_>, ToolError> {
        let all = self.file.tensors().map_err(|e| {
            ToolError::usage(anyhow!(e).context(format!("cannot read {}", self.name)))
        })?;
        let wrapped = match self.file.main().root() {
            Value::Dict(items) => items
                .iter()
                .any(|(k, v)| k.as_str() == Some("model") && matches!(v, Value::Dict(_))),
            _ => false,
        };
        let list: Vec<(String, TensorRef<'_>)> = all
            .into_iter()
            .filter_map(|(n, t)| {
                if wrapped {
                    n.strip_prefix("model.").map(|s| (s.to_string(), t))
                } else {
                    Some((n.to_string(), t))
                }
            })
            .collect();
        let by_name = list
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Ok(ShardTensors {
            name: &self.name,
            list,
            by_name,
        })
    }
}

impl<'a> ShardTensors<'a> {
    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&TensorRef<'a>> {
        self.by_name.get(name).map(|&i| &self.list[i].1)
    }

    /// Every tensor in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &TensorRef<'a>)> {
        self.list.iter().map(|(n, t)| (n.as_str(), t))
    }
}

/// True when `path` has NxD's `.info.pt` but its `.tensors/` directory is missing or empty: the
/// model tensors were not written (ZeRO-1 master weights), only their references.
fn tensor_data_not_saved(path: &Path) -> bool {
    let dir: PathBuf = tensors_dir(path);
    info_file(path).is_file()
        && std::fs::read_dir(&dir).map_or(true, |mut entries| entries.next().is_none())
}

/// Opens every file of `paths` in parallel (rayon's pool), in order; the first failure in path
/// order is returned.
pub fn open_all(paths: &[PathBuf]) -> Result<Vec<ShardFile>, ToolError> {
    use rayon::prelude::*;
    let opened: Vec<Result<ShardFile, ToolError>> =
        paths.par_iter().map(|p| ShardFile::open(p)).collect();
    opened.into_iter().collect()
}
