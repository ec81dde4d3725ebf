//! Writing the unsharded checkpoint: Hugging Face safetensors shards plus their index (as
//! `save_pretrained` writes them), or NxD's one-file `checkpoint.pt`. Every tensor is streamed
//! from the mapped shard files through the strided-copy engine; every file is written under a
//! temporary name and renamed when complete.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Result};
pub use checkpoint_write::{copy_small_file, Written};
use checkpoint_write::{write_pt_file, PtEntry, TensorSource};
use nxd_layout::{UnshardTensor, EMBED, NORM};
use suite_support::manifest::ManifestRecord;
use suite_support::progress::Progress;
use tensor_formats::copy::{write_concat, write_view, Part};
use tensor_formats::{DType, FormatError};

use crate::shards::ShardTensors;

/// The file name of `--format pt` output (what NxD's `--convert_to_full_state` writes).
pub const PT_FILE_NAME: &str = "checkpoint.pt";

/// One tensor of the output: what to rebuild, and the dtype to write it in.
#[derive(Debug, Clone, Copy)]
pub struct OutTensor<'p> {
    /// The inverse plan of the tensor.
    pub tensor: &'p UnshardTensor,
    /// The output dtype (the shards' dtype, or the `--dtype` conversion of a float tensor).
    pub dtype: DType,
}

impl OutTensor<'_> {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.tensor.shape.iter().product::<usize>() as u64
    }

    /// Bytes written.
    pub fn bytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }
}

/// The views of the shard regions that make up `t`, in order (each piece narrowed).
pub fn pieces<'a>(
    t: &UnshardTensor,
    shards: &[ShardTensors<'a>],
) -> Result<Vec<Part<'a>>, FormatError> {
    t.pieces
        .iter()
        .map(|p| {
            let view = shards
                .get(p.file)
                .and_then(|s| s.get(&p.tensor))
                .ok_or_else(|| {
                    FormatError::Invalid(format!(
                        "tensor {}: the plan names `{}` of file {}, which is not there",
                        t.name, p.tensor, p.file
                    ))
                })?;
            let mut part = Part::whole(*view);
            for n in &p.narrow {
                part = part.narrow(n.dim, n.start, n.len)?;
            }
            Ok(part)
        })
        .collect()
}

/// Writes the row-major bytes of `t` in `dtype`; returns their number.
pub fn write_tensor(
    t: &OutTensor<'_>,
    shards: &[ShardTensors<'_>],
    out: &mut dyn Write,
) -> Result<u64, FormatError> {
    let parts = pieces(t.tensor, shards)?;
    let n = if t.tensor.shape.is_empty() {
        write_view(&parts[0], t.dtype, out)?
    } else {
        write_concat(&parts, t.tensor.concat_dim, t.dtype, out)?
    };
    if n != t.bytes() {
        return Err(FormatError::Invalid(format!(
            "tensor {}: wrote {n} bytes, expected {}",
            t.tensor.name,
            t.bytes()
        )));
    }
    Ok(n)
}

/// An output tensor together with the shards it is rebuilt from: what the shared checkpoint
/// writers consume.
struct Source<'a, 'p> {
    t: OutTensor<'p>,
    shards: &'a [ShardTensors<'a>],
}

impl TensorSource for Source<'_, '_> {
    fn name(&self) -> &str {
        &self.t.tensor.name
    }
    fn dtype(&self) -> DType {
        self.t.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.t.tensor.shape
    }
    fn write_to(&self, out: &mut dyn Write) -> Result<u64> {
        Ok(write_tensor(&self.t, self.shards, out)?)
    }
}

fn sources<'a, 'p>(
    tensors: &[OutTensor<'p>],
    shards: &'a [ShardTensors<'a>],
) -> Vec<Source<'a, 'p>> {
    tensors.iter().map(|&t| Source { t, shards }).collect()
}

/// Writes `tensors` (in state-dict order) as a Hugging Face checkpoint into `dir`: shards of at
/// most `max_shard_size` bytes split as `save_pretrained` splits them (`model.safetensors` when
/// one is enough), each with `{"format": "pt"}` metadata, and `model.safetensors.index.json`
/// when there are several. Shards are written in parallel. Returns the manifest records.
pub fn write_safetensors(
    dir: &Path,
    tensors: &[OutTensor<'_>],
    shards: &[ShardTensors<'_>],
    max_shard_size: u64,
    progress: &Progress,
) -> Result<Vec<ManifestRecord>> {
    checkpoint_write::write_safetensors_dir(
        dir,
        &sources(tensors, shards),
        max_shard_size,
        progress,
    )
}

/// Writes `tensors` as NxD's `--convert_to_full_state` output: one `torch.save`-compatible
/// dict in `dir/checkpoint.pt`, keys in state-dict order, every tensor contiguous with its own
/// storage. With `tied_head`, `lm_head.weight` is added right after `model.norm.weight` as a
/// view of the embedding's storage (as a tied model's `state_dict()` holds it).
pub fn write_pt_checkpoint(
    dir: &Path,
    tensors: &[OutTensor<'_>],
    tied_head: bool,
    shards: &[ShardTensors<'_>],
    progress: &Progress,
) -> Result<Vec<ManifestRecord>> {
    let mut entries = Vec::with_capacity(tensors.len() + 1);
    for (i, t) in tensors.iter().enumerate() {
        entries.push(PtEntry {
            name: t.tensor.name.clone(),
            storage: i,
        });
        if tied_head && t.tensor.name == NORM {
            let embed = tensors
                .iter()
                .position(|t| t.tensor.name == EMBED)
                .ok_or_else(|| anyhow!("tied embeddings but no {EMBED}"))?;
            entries.push(PtEntry {
                name: nxd_layout::LM_HEAD.to_string(),
                storage: embed,
            });
        }
    }
    let path = dir.join(PT_FILE_NAME);
    let w = write_pt_file(&path, &sources(tensors, shards), &entries, progress)?;
    Ok(vec![w
        .record(PT_FILE_NAME, "torch")
        .with_extra("tensors", tensors.len())])
}
