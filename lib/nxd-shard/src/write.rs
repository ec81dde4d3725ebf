//! Writing one shard file from its plan.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use nxd_layout::{FilePlan, TensorPlan};
use suite_support::atomic::{remove_stale_partials, AtomicFile, Publisher};
use suite_support::hash::HashingWriter;
use suite_support::progress::Progress;
use tensor_formats::copy::{write_concat, write_view, Part};
use tensor_formats::torch::{archive_name_for, write_pt, PtRoot, PtStorage, PtTensor};
use tensor_formats::xser::{write_training_layout_with, SplitTensor};
use tensor_formats::{DType, FormatError, Layout, TensorRef};

/// What writing a file produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// File size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
    /// Other files written for it (the split xser layout's `.info.pt` and `tensor_<i>.pt`).
    pub side_files: Vec<SideFile>,
}

/// A file written beside a shard file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideFile {
    /// Path relative to the shard file's directory.
    pub name: String,
    /// File size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
}

/// The output dtype of a planned tensor.
fn tensor_dtype(t: &TensorPlan) -> Result<DType> {
    DType::from_safetensors_name(&t.dtype)
        .ok_or_else(|| anyhow!("tensor {}: unknown dtype {}", t.name, t.dtype))
}

/// The parts of `t`, as views of `views`: each source narrowed in order, and transposed when the
/// tensor is stored transposed.
pub fn tensor_parts<'a>(t: &TensorPlan, views: &[TensorRef<'a>]) -> Result<Vec<Part<'a>>> {
    t.parts
        .iter()
        .map(|p| {
            let view = views.get(p.source).ok_or_else(|| {
                anyhow!("tensor {}: plan names missing source {}", t.name, p.source)
            })?;
            let mut part = Part::whole(*view);
            for n in &p.narrow {
                part = part.narrow(n.dim, n.start, n.len)?;
            }
            if t.stored_transposed {
                part = part.transpose(0, 1);
            }
            Ok(part)
        })
        .collect()
}

/// Writes the storage bytes of `t` (row-major; the transposed matrix when stored transposed).
fn write_tensor(
    t: &TensorPlan,
    views: &[TensorRef<'_>],
    out: &mut dyn Write,
) -> Result<u64, FormatError> {
    let dtype = tensor_dtype(t).map_err(|e| FormatError::Invalid(e.to_string()))?;
    let parts = tensor_parts(t, views).map_err(|e| FormatError::Invalid(format!("{e:#}")))?;
    let n = if t.shape.is_empty() {
        // A 0-d tensor: one part, one element.
        write_view(&parts[0], dtype, out)?
    } else {
        let dim = if t.stored_transposed {
            1 - t.concat_dim
        } else {
            t.concat_dim
        };
        write_concat(&parts, dim, dtype, out)?
    };
    let expected = (t.numel() * dtype.size()) as u64;
    if n != expected {
        return Err(FormatError::Invalid(format!(
            "tensor {}: wrote {n} bytes, expected {expected}",
            t.name
        )));
    }
    Ok(n)
}

/// The dict a shard file holds: one tensor per planned tensor, each with its own storage.
fn pt_root(file: &FilePlan) -> Result<(PtRoot, Vec<PtStorage>)> {
    let mut tensors = Vec::with_capacity(file.tensors.len());
    let mut storages = Vec::with_capacity(file.tensors.len());
    for (i, t) in file.tensors.iter().enumerate() {
        let dtype = tensor_dtype(t)?;
        tensors.push(PtTensor {
            name: t.name.clone(),
            dtype,
            layout: Layout {
                shape: t.shape.clone(),
                strides: t.strides(),
                offset: 0,
            },
            storage: i,
            requires_grad: false,
        });
        storages.push(PtStorage {
            dtype,
            numel: t.numel(),
        });
    }
    Ok((PtRoot::Dict(tensors), storages))
}

/// Writes `file` to `path` atomically (a temporary name, renamed by `publisher` once on disk). With
/// `xser`, the empty `<path>.tensors/` directory NxD's `--save_xser` creates is made too.
pub fn write_file(
    file: &FilePlan,
    views: &[TensorRef<'_>],
    path: &Path,
    xser: bool,
    progress: &Progress,
    publisher: &Publisher,
) -> Result<Written> {
    let (root, storages) = pt_root(file)?;
    let out = AtomicFile::create(path)?;
    let hashing = HashingWriter::new(out);
    let hashing = write_pt(
        hashing,
        &archive_name_for(path),
        &root,
        &storages,
        |i, w| {
            let n = write_tensor(&file.tensors[i], views, w)
                .map_err(|e| e.context(format!("tensor {}", file.tensors[i].name)))?;
            progress.inc(n);
            Ok(())
        },
    )
    .with_context(|| format!("writing {}", path.display()))?;
    let (out, sha256, bytes) = hashing.finish();
    if xser {
        let dir = tensor_formats::xser::tensors_dir(path);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the xser directory {}", dir.display()))?;
    }
    publisher.submit(out.finish()?);
    Ok(Written {
        bytes,
        sha256,
        side_files: Vec::new(),
    })
}

/// Writes `file` in NxD's training-checkpoint xser layout: every tensor (contiguous, as training
/// saves it) in `<path>.tensors/tensor_<i>.pt`, the `<path>.info.pt` index, and `path` itself last,
/// holding `TensorReference`s. Each file is atomic and published through `publisher`.
pub fn write_split_file(
    file: &FilePlan,
    views: &[TensorRef<'_>],
    path: &Path,
    progress: &Progress,
    publisher: &Publisher,
) -> Result<Written> {
    let dir = tensor_formats::xser::tensors_dir(path);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    remove_stale_partials(&dir).with_context(|| format!("cleaning up {}", dir.display()))?;
    // Training checkpoints hold plain contiguous tensors: no transposed storage.
    let plans: Vec<TensorPlan> = file
        .tensors
        .iter()
        .map(|t| TensorPlan {
            stored_transposed: false,
            ..t.clone()
        })
        .collect();
    let specs = plans
        .iter()
        .map(|t| {
            Ok(SplitTensor {
                name: t.name.clone(),
                dtype: tensor_dtype(t)?,
                shape: t.shape.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let parent = path.parent().unwrap_or(Path::new("."));
    let mut written = Vec::new();
    write_training_layout_with(
        path,
        &specs,
        |i, w| {
            let n = write_tensor(&plans[i], views, w)
                .map_err(|e| e.context(format!("tensor {}", plans[i].name)))?;
            progress.inc(n);
            Ok(())
        },
        |p| {
            let out = AtomicFile::create(p).map_err(|e| FormatError::Stream(e.into()))?;
            Ok(HashingWriter::new(out))
        },
        |p, hashing| {
            let (out, sha256, bytes) = hashing.finish();
            publisher.submit(out.finish().map_err(|e| FormatError::Stream(e.into()))?);
            let name = p
                .strip_prefix(parent)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned();
            written.push(SideFile {
                name,
                bytes,
                sha256,
            });
            Ok(())
        },
    )
    .with_context(|| format!("writing {}", path.display()))?;
    // The last file written is the reference file itself.
    let main = written.pop().expect("the reference file is always written");
    Ok(Written {
        bytes: main.bytes,
        sha256: main.sha256,
        side_files: written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nxd_layout::{Narrow, PartPlan};

    /// A stored-transposed tensor's storage holds the transposed matrix, row-major.
    #[test]
    fn transposed_storage_bytes() {
        // Source 2x4, values 0..8 as u8; take columns 1..3 (logical [2, 2]).
        let layout = Layout::contiguous(&[2, 4]);
        let storage: Vec<u8> = (0..8).collect();
        let view = TensorRef {
            dtype: DType::U8,
            layout: &layout,
            storage: &storage,
        };
        let t = TensorPlan {
            name: "o".into(),
            shape: vec![2, 2],
            dtype: "U8".into(),
            elem_size: 1,
            stored_transposed: true,
            concat_dim: 1,
            parts: vec![PartPlan {
                source: 0,
                narrow: vec![Narrow::new(1, 1, 2)],
            }],
        };
        let mut out = Vec::new();
        write_tensor(&t, &[view], &mut out).unwrap();
        // Logical [[1, 2], [5, 6]]; stored transposed: [[1, 5], [2, 6]].
        assert_eq!(out, vec![1, 5, 2, 6]);
        assert_eq!(t.strides(), vec![1, 2]);
    }
}
