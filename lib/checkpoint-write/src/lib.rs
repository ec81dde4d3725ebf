//! Writing checkpoints from any tensor source, shared by `ckpt-unshard` and `st-merge`.
//!
//! A [`TensorSource`] knows an output tensor's name, dtype and shape and writes its row-major
//! bytes on demand, so a writer holds at most one tensor's worth of buffers at a time. From a
//! list of them this crate writes:
//!
//! * [`write_safetensors_dir`]: a Hugging Face checkpoint directory's weights: shards split as
//!   `save_pretrained` splits them (`model.safetensors` when one is enough), each with
//!   `{"format": "pt"}` metadata, plus `model.safetensors.index.json` when there are several;
//! * [`write_safetensors_file`]: one safetensors file;
//! * [`write_pt_file`]: one `.pt` archive byte-identical to `torch.save` of the same dict
//!   (apart from the serialization id);
//! * [`copy_small_file`]: `config.json`, tokenizer files and the like.
//!
//! Every file is written under a temporary name, hashed on the way, and renamed into place only
//! when complete; the results come back as manifest records.
#![warn(missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use rayon::prelude::*;
use suite_support::atomic::AtomicFile;
use suite_support::hash::HashingWriter;
use suite_support::manifest::ManifestRecord;
use suite_support::progress::Progress;
use tensor_formats::safetensors::{
    plan_shards, render_index, shard_file_name, SafetensorsWriter, TensorSpec, INDEX_FILE_NAME,
};
use tensor_formats::torch::{archive_name_for, write_pt, PtRoot, PtStorage, PtTensor};
use tensor_formats::{DType, FormatError, Layout};

/// One output tensor, produced on demand.
pub trait TensorSource: Sync {
    /// Its name in the output.
    fn name(&self) -> &str;
    /// Its output dtype.
    fn dtype(&self) -> DType;
    /// Its shape.
    fn shape(&self) -> &[usize];
    /// Writes exactly its row-major bytes in [`dtype`](Self::dtype); returns their number.
    fn write_to(&self, out: &mut dyn Write) -> Result<u64>;

    /// Number of elements.
    fn numel(&self) -> u64 {
        self.shape().iter().product::<usize>() as u64
    }

    /// Bytes written.
    fn bytes(&self) -> u64 {
        self.numel() * self.dtype().size() as u64
    }
}

/// What writing a file produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// File size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
}

impl Written {
    /// The manifest record of this file, at `path` relative to the described directory.
    pub fn record(&self, path: &str, kind: &str) -> ManifestRecord {
        ManifestRecord::new(path, self.bytes, self.sha256.clone()).with_kind(kind)
    }
}

/// Writes `t` and checks that it wrote the bytes its dtype and shape promise.
fn write_checked<T: TensorSource + ?Sized>(t: &T, out: &mut dyn Write) -> Result<u64> {
    let n = t
        .write_to(out)
        .with_context(|| format!("tensor {}", t.name()))?;
    if n != t.bytes() {
        return Err(anyhow!(
            "tensor {}: wrote {n} bytes, expected {}",
            t.name(),
            t.bytes()
        ));
    }
    Ok(n)
}

/// Writes one file atomically through a hashing writer: `fill` writes the bytes.
pub fn write_atomic<F>(path: &Path, fill: F) -> Result<Written>
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

/// Copies a small file (`config.json`, `tokenizer.json`) to `dir/name`.
pub fn copy_small_file(src: &Path, dir: &Path, name: &str) -> Result<Written> {
    let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    write_atomic(&dir.join(name), |mut h| {
        h.write_all(&bytes)?;
        Ok(h)
    })
}

/// The index's `total_parameters`: elements of every tensor but buffers (transformers counts
/// the model's parameters; a legacy `rotary_emb.inv_freq` is a buffer).
pub fn total_parameters<T: TensorSource>(tensors: &[T]) -> u64 {
    tensors
        .iter()
        .filter(|t| !t.name().ends_with(".inv_freq"))
        .map(TensorSource::numel)
        .sum()
}

/// How tensors `(name, bytes)` in state-dict order split into Hugging Face shards of at most
/// `max_shard_size` bytes: each shard's file name and members (indices into `sizes`).
pub fn named_shards(sizes: &[(String, u64)], max_shard_size: u64) -> Vec<(String, Vec<usize>)> {
    let groups = plan_shards(sizes, max_shard_size);
    let count = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, g)| (shard_file_name(i, count), g))
        .collect()
}

/// [`named_shards`] of tensor sources.
pub fn shard_plan<T: TensorSource>(
    tensors: &[T],
    max_shard_size: u64,
) -> Vec<(String, Vec<usize>)> {
    let sizes: Vec<(String, u64)> = tensors
        .iter()
        .map(|t| (t.name().to_string(), t.bytes()))
        .collect();
    named_shards(&sizes, max_shard_size)
}

/// Writes `tensors` (in state-dict order) as a Hugging Face checkpoint's weights into `dir`:
/// shards of at most `max_shard_size` bytes split as `save_pretrained` splits them, each with
/// `{"format": "pt"}` metadata, and `model.safetensors.index.json` when there are several.
/// Shards are written in parallel (on the current rayon pool). Returns the manifest records.
pub fn write_safetensors_dir<T: TensorSource>(
    dir: &Path,
    tensors: &[T],
    max_shard_size: u64,
    progress: &Progress,
) -> Result<Vec<ManifestRecord>> {
    let plan = shard_plan(tensors, max_shard_size);
    let results: Vec<Result<ManifestRecord>> = plan
        .par_iter()
        .map(|(name, members)| {
            let members: Vec<&T> = members.iter().map(|&m| &tensors[m]).collect();
            let w = write_safetensors_file(&dir.join(name), &members, progress)?;
            Ok(w.record(name, "safetensors")
                .with_extra("tensors", members.len()))
        })
        .collect();
    let mut records = results.into_iter().collect::<Result<Vec<_>>>()?;
    if plan.len() > 1 {
        let mut weight_map = BTreeMap::new();
        for (name, members) in &plan {
            for &m in members {
                weight_map.insert(tensors[m].name().to_string(), name.clone());
            }
        }
        let total_size: u64 = tensors.iter().map(TensorSource::bytes).sum();
        let text = render_index(&weight_map, total_size, Some(total_parameters(tensors)));
        let w = write_atomic(&dir.join(INDEX_FILE_NAME), |mut h| {
            h.write_all(text.as_bytes())?;
            Ok(h)
        })?;
        records.push(w.record(INDEX_FILE_NAME, "safetensors-index"));
    }
    Ok(records)
}

/// Writes `members` as one safetensors file at `path` (with `{"format": "pt"}` metadata, as
/// transformers writes), in the order the format requires.
pub fn write_safetensors_file<T: TensorSource + ?Sized>(
    path: &Path,
    members: &[&T],
    progress: &Progress,
) -> Result<Written> {
    let specs: Vec<TensorSpec> = members
        .iter()
        .map(|t| TensorSpec {
            name: t.name().to_string(),
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
        })
        .collect();
    let by_name: HashMap<&str, &T> = members.iter().map(|t| (t.name(), *t)).collect();
    let metadata = Some(BTreeMap::from([("format".to_string(), "pt".to_string())]));
    write_atomic(path, |h| {
        let mut w = SafetensorsWriter::new(h, specs, metadata)?;
        let order: Vec<String> = w.order().iter().map(|s| s.name.clone()).collect();
        for name in order {
            let n = write_checked(by_name[name.as_str()], &mut w)?;
            w.finish_tensor()?;
            progress.inc(n);
        }
        Ok(w.finish()?)
    })
}

/// An entry of a `.pt` dict: its key and the storage (index into the tensor list) it views in
/// full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtEntry {
    /// Key in the saved dict.
    pub name: String,
    /// Index of the tensor whose storage it views.
    pub storage: usize,
}

impl PtEntry {
    /// One entry per tensor, each with its own storage, in order.
    pub fn one_each<T: TensorSource>(tensors: &[T]) -> Vec<PtEntry> {
        tensors
            .iter()
            .enumerate()
            .map(|(i, t)| PtEntry {
                name: t.name().to_string(),
                storage: i,
            })
            .collect()
    }
}

/// Writes one `torch.save`-compatible dict to `path`: every tensor of `tensors` is a contiguous
/// storage, written in order; `entries` are the dict's keys, each a whole view of one storage
/// (several keys may share one, as tied weights do).
pub fn write_pt_file<T: TensorSource>(
    path: &Path,
    tensors: &[T],
    entries: &[PtEntry],
    progress: &Progress,
) -> Result<Written> {
    let mut specs = Vec::with_capacity(entries.len());
    for e in entries {
        let t = tensors
            .get(e.storage)
            .ok_or_else(|| anyhow!("entry {} names storage {}", e.name, e.storage))?;
        specs.push(PtTensor {
            name: e.name.clone(),
            dtype: t.dtype(),
            layout: Layout::contiguous(t.shape()),
            storage: e.storage,
            requires_grad: false,
        });
    }
    let storages: Vec<PtStorage> = tensors
        .iter()
        .map(|t| PtStorage {
            dtype: t.dtype(),
            numel: t.numel() as usize,
        })
        .collect();
    let archive = archive_name_for(path);
    write_atomic(path, |h| {
        Ok(write_pt(
            h,
            &archive,
            &PtRoot::Dict(specs),
            &storages,
            |i, out| {
                let n = write_checked(&tensors[i], out).map_err(to_format_error)?;
                progress.inc(n);
                Ok(())
            },
        )?)
    })
}

/// Hands an error back through the `.pt` writer's callback: an OS error as itself (so a full
/// disk still gets its hint), any other error as its text.
fn to_format_error(e: anyhow::Error) -> FormatError {
    let text = format!("{e:#}");
    let io = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>());
    match io.map(|io| (io.kind(), io.raw_os_error())) {
        Some((_, Some(code))) => FormatError::Stream(std::io::Error::from_raw_os_error(code)),
        Some((kind, None)) => FormatError::Stream(std::io::Error::new(kind, text)),
        None => FormatError::Invalid(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Const {
        name: String,
        shape: Vec<usize>,
        byte: u8,
    }

    impl TensorSource for Const {
        fn name(&self) -> &str {
            &self.name
        }
        fn dtype(&self) -> DType {
            DType::U8
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn write_to(&self, out: &mut dyn Write) -> Result<u64> {
            let n = self.shape.iter().product::<usize>();
            out.write_all(&vec![self.byte; n])?;
            Ok(n as u64)
        }
    }

    fn consts(sizes: &[usize]) -> Vec<Const> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Const {
                name: format!("t{i}"),
                shape: vec![n],
                byte: i as u8,
            })
            .collect()
    }

    #[test]
    fn shards_and_indexes_like_save_pretrained() {
        let dir = tempfile::tempdir().unwrap();
        let ts = consts(&[6, 6, 2, 6]);
        let records =
            write_safetensors_dir(dir.path(), &ts, 10, &Progress::new(0, "", false)).unwrap();
        let names: Vec<_> = records.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors",
                INDEX_FILE_NAME
            ]
        );
        let index = std::fs::read_to_string(dir.path().join(INDEX_FILE_NAME)).unwrap();
        assert!(index.contains("\"t2\": \"model-00002-of-00003.safetensors\""));
        assert!(index.contains("\"total_size\": 20"));
    }

    #[test]
    fn a_tensor_that_lies_about_its_size_leaves_nothing() {
        struct Short;
        impl TensorSource for Short {
            fn name(&self) -> &str {
                "short"
            }
            fn dtype(&self) -> DType {
                DType::F32
            }
            fn shape(&self) -> &[usize] {
                &[2]
            }
            fn write_to(&self, out: &mut dyn Write) -> Result<u64> {
                out.write_all(&[0; 4])?;
                Ok(4)
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pt");
        let err = write_pt_file(
            &path,
            &[Short],
            &[PtEntry {
                name: "short".into(),
                storage: 0,
            }],
            &Progress::new(0, "", false),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("short"), "{err:#}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
