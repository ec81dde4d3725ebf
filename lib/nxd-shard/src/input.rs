//! The source checkpoint: HF safetensors (a directory, an index or one file) or a full-state `.pt`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use nxd_layout::{canonical_order, SourceTensor};
use tensor_formats::safetensors::ShardedCheckpoint;
use tensor_formats::xser::NxdFile;
use tensor_formats::{DType, TensorRef};

/// An opened (memory-mapped) source checkpoint.
pub enum Input {
    /// Hugging Face safetensors: one file, or shards listed by an index.
    Safetensors(ShardedCheckpoint),
    /// A torch `.pt` state dict (NxD's `full_state.pt`; plain or xser form).
    Pt(NxdFile),
}

impl Input {
    /// Opens `path`: a `.pt` file is read as a torch state dict, anything else (a directory, a
    /// `.safetensors` file, an `*.index.json`) as a Hugging Face safetensors checkpoint.
    pub fn open(path: &Path) -> Result<Input> {
        let is_pt = path.is_file()
            && path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "pt" | "bin" | "pth"));
        if is_pt {
            let f = NxdFile::open(path)
                .with_context(|| format!("reading the input checkpoint {}", path.display()))?;
            Ok(Input::Pt(f))
        } else {
            let c = ShardedCheckpoint::open(path)
                .with_context(|| format!("reading the input checkpoint {}", path.display()))?;
            Ok(Input::Safetensors(c))
        }
    }

    /// Every tensor, as `(name, view)`, in the source's own order.
    pub fn tensors(&self) -> Result<Vec<(String, TensorRef<'_>)>> {
        match self {
            Input::Safetensors(c) => c
                .names()
                .iter()
                .map(|n| {
                    let (file, entry) = c
                        .get(n)
                        .ok_or_else(|| anyhow!("tensor {n} is listed but cannot be found"))?;
                    Ok((n.clone(), file.tensor(entry)))
                })
                .collect(),
            Input::Pt(f) => Ok(f
                .tensors()
                .context("reading the input checkpoint")?
                .into_iter()
                .map(|(n, t)| (n.to_string(), t))
                .collect()),
        }
    }
}

/// The source tensors in state-dict order (see [`canonical_order`]), as the planner wants them,
/// and the matching views (same index).
///
/// With `out_dtype`, every float tensor is described with that dtype, so the plan (and its
/// sizes) is the plan of the converted checkpoint; the executor converts while copying.
pub fn sources<'a>(
    tensors: Vec<(String, TensorRef<'a>)>,
    out_dtype: Option<DType>,
) -> (Vec<SourceTensor>, Vec<TensorRef<'a>>) {
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    let order = canonical_order(&names);
    let mut srcs = Vec::with_capacity(order.len());
    let mut views = Vec::with_capacity(order.len());
    for i in order {
        let (name, view) = &tensors[i];
        let dtype = planned_dtype(view.dtype, out_dtype);
        srcs.push(SourceTensor::new(
            name.clone(),
            view.layout.shape.clone(),
            dtype.safetensors_name(),
            dtype.size(),
        ));
        views.push(*view);
    }
    (srcs, views)
}

/// The dtype a source of dtype `dtype` is written with.
pub fn planned_dtype(dtype: DType, out_dtype: Option<DType>) -> DType {
    match out_dtype {
        Some(o) if dtype.is_float() && o.is_float() => o,
        _ => dtype,
    }
}

/// `<input dir>/config.json`: next to a file input, inside a directory input.
pub fn default_config_path(input: &Path) -> PathBuf {
    if input.is_dir() {
        input.join("config.json")
    } else {
        input
            .parent()
            .map_or_else(|| PathBuf::from("config.json"), |p| p.join("config.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_floats_are_converted() {
        assert_eq!(planned_dtype(DType::BF16, None), DType::BF16);
        assert_eq!(planned_dtype(DType::BF16, Some(DType::F32)), DType::F32);
        assert_eq!(planned_dtype(DType::I64, Some(DType::F32)), DType::I64);
    }

    #[test]
    fn config_next_to_the_input() {
        let dir = std::env::temp_dir();
        assert_eq!(default_config_path(&dir), dir.join("config.json"));
        assert_eq!(
            default_config_path(Path::new("/x/y/model.safetensors")),
            Path::new("/x/y/config.json")
        );
    }
}
