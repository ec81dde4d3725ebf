//! Writing the unsharded checkpoint: Hugging Face safetensors shards plus their index (as
//! `save_pretrained` writes them), or NxD's one-file `checkpoint.pt`. Every tensor is streamed
//! from the mapped shard files through the strided-copy engine; every file is written under a
//! temporary name and renamed when complete.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use nxd_layout::{UnshardTensor, EMBED, NORM};
use rayon::prelude::*;
use suite_support::atomic::AtomicFile;
use suite_support::hash::HashingWriter;
use suite_support::manifest::ManifestRecord;
use suite_support::progress::Progress;
use tensor_formats::copy::{write_concat, write_view, Part};
use tensor_formats::safetensors::{
    plan_shards, render_index, shard_file_name, SafetensorsWriter, TensorSpec, INDEX_FILE_NAME,
};
use tensor_formats::torch::{archive_name_for, write_pt, PtRoot, PtStorage, PtTensor};
use tensor_formats::{DType, FormatError, Layout};

use crate::shards::ShardTensors;

/// The file name of `--format pt` output (what NxD's `--convert_to_full_state` writes).
pub const PT_FILE_NAME: &str = "checkpoint.pt";

/// What writing a file produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// File size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
}

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

/// Writes one file atomically through a hashing writer: `fill` writes the bytes.
fn write_atomic<F>(path: &Path, fill: F) -> Result<Written>
where
    F: FnOnce(HashingWriter<AtomicFile>) -> Result<HashingWriter<AtomicFile>>,
{
    let out = AtomicFile::create(path)?;
    let hashing =
        fill(HashingWriter::new(out)).with_context(|| format!("writing {}", path.display()))?;
    let (out, sha256, bytes) = hashing.finish();
    out.commit()?;
    Ok(Written { bytes, sha256 })
}

/// Copies a small file (`config.json`) to `dir/name`.
pub fn copy_small_file(src: &Path, dir: &Path, name: &str) -> Result<Written> {
    let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    write_atomic(&dir.join(name), |mut h| {
        h.write_all(&bytes)?;
        Ok(h)
    })
}

/// One written file, relative to the output directory, for the manifest.
fn record(name: &str, w: &Written, kind: &str) -> ManifestRecord {
    ManifestRecord::new(name, w.bytes, w.sha256.clone()).with_kind(kind)
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
    let sizes: Vec<(String, u64)> = tensors
        .iter()
        .map(|t| (t.tensor.name.clone(), t.bytes()))
        .collect();
    let groups = plan_shards(&sizes, max_shard_size);
    let count = groups.len();
    let results: Vec<Result<ManifestRecord>> = groups
        .par_iter()
        .enumerate()
        .map(|(i, members)| {
            let name = shard_file_name(i, count);
            let members: Vec<&OutTensor<'_>> = members.iter().map(|&m| &tensors[m]).collect();
            let w = write_safetensors_file(&dir.join(&name), &members, shards, progress)?;
            Ok(record(&name, &w, "safetensors").with_extra("tensors", members.len()))
        })
        .collect();
    let mut records = results.into_iter().collect::<Result<Vec<_>>>()?;
    if count > 1 {
        let mut weight_map = BTreeMap::new();
        for (i, members) in groups.iter().enumerate() {
            for &m in members {
                weight_map.insert(tensors[m].tensor.name.clone(), shard_file_name(i, count));
            }
        }
        let total_size: u64 = tensors.iter().map(OutTensor::bytes).sum();
        let text = render_index(&weight_map, total_size, Some(total_parameters(tensors)));
        let w = write_atomic(&dir.join(INDEX_FILE_NAME), |mut h| {
            h.write_all(text.as_bytes())?;
            Ok(h)
        })?;
        records.push(record(INDEX_FILE_NAME, &w, "safetensors-index"));
    }
    Ok(records)
}

/// The index's `total_parameters`: elements of every tensor but buffers (transformers counts
/// the model's parameters; a legacy `rotary_emb.inv_freq` is a buffer).
fn total_parameters(tensors: &[OutTensor<'_>]) -> u64 {
    tensors
        .iter()
        .filter(|t| !t.tensor.name.ends_with(".inv_freq"))
        .map(OutTensor::numel)
        .sum()
}

fn write_safetensors_file(
    path: &Path,
    members: &[&OutTensor<'_>],
    shards: &[ShardTensors<'_>],
    progress: &Progress,
) -> Result<Written> {
    let specs: Vec<TensorSpec> = members
        .iter()
        .map(|t| TensorSpec {
            name: t.tensor.name.clone(),
            dtype: t.dtype,
            shape: t.tensor.shape.clone(),
        })
        .collect();
    let by_name: HashMap<&str, &OutTensor<'_>> = members
        .iter()
        .map(|t| (t.tensor.name.as_str(), *t))
        .collect();
    let metadata = Some(BTreeMap::from([("format".to_string(), "pt".to_string())]));
    write_atomic(path, |h| {
        let mut w = SafetensorsWriter::new(h, specs, metadata)?;
        let order: Vec<String> = w.order().iter().map(|s| s.name.clone()).collect();
        for name in order {
            let t = by_name[name.as_str()];
            let n =
                write_tensor(t, shards, &mut w).map_err(|e| e.context(format!("tensor {name}")))?;
            w.finish_tensor()?;
            progress.inc(n);
        }
        Ok(w.finish()?)
    })
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
    let mut specs: Vec<PtTensor> = Vec::with_capacity(tensors.len() + 1);
    for (i, t) in tensors.iter().enumerate() {
        specs.push(PtTensor {
            name: t.tensor.name.clone(),
            dtype: t.dtype,
            layout: Layout::contiguous(&t.tensor.shape),
            storage: i,
            requires_grad: false,
        });
        if tied_head && t.tensor.name == NORM {
            let embed = tensors
                .iter()
                .position(|t| t.tensor.name == EMBED)
                .ok_or_else(|| anyhow!("tied embeddings but no {EMBED}"))?;
            specs.push(PtTensor {
                name: nxd_layout::LM_HEAD.to_string(),
                dtype: tensors[embed].dtype,
                layout: Layout::contiguous(&tensors[embed].tensor.shape),
                storage: embed,
                requires_grad: false,
            });
        }
    }
    let storages: Vec<PtStorage> = tensors
        .iter()
        .map(|t| PtStorage {
            dtype: t.dtype,
            numel: t.numel() as usize,
        })
        .collect();
    let path = dir.join(PT_FILE_NAME);
    let archive = archive_name_for(&path);
    let w = write_atomic(&path, |h| {
        Ok(write_pt(
            h,
            &archive,
            &PtRoot::Dict(specs),
            &storages,
            |i, out| {
                let n = write_tensor(&tensors[i], shards, out)
                    .map_err(|e| e.context(format!("tensor {}", tensors[i].tensor.name)))?;
                progress.inc(n);
                Ok(())
            },
        )?)
    })?;
    Ok(vec![
        record(PT_FILE_NAME, &w, "torch").with_extra("tensors", tensors.len())
    ])
}
