//! `st-merge`: merge, filter, rename, re-type and reshard checkpoints, and merge LoRA adapters,
//! streaming with memory bounded by the largest tensor (by a few MiB blocks of rows when
//! merging an adapter), never by the model.
//!
//! * [`store`] opens the inputs (Hugging Face directories, safetensors files, `.pt` state
//!   dicts including DeepSpeed's `{"module": ...}`) through mmap.
//! * [`adapter`] reads what a PEFT adapter or a DeepSpeed LoRA checkpoint does (pure).
//! * [`plan`] decides every output tensor: source, name, dtype, merge, shard (pure).
//! * [`merge`] is the fp32 merge arithmetic (SGEMM on row blocks, DoRA's row norms).
//! * [`exec`] binds the plan to the mapped files; `checkpoint-write` writes the outputs
//!   atomically: one `.safetensors`, one `torch.save`-identical `.pt`, or a Hugging Face
//!   directory (shards, index, config and tokenizer files).
//! * [`run`] is the whole tool.
#![warn(missing_docs)]

pub mod adapter;
pub mod exec;
pub mod merge;
pub mod plan;
pub mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use checkpoint_write::{
    copy_small_file, write_pt_file, write_safetensors_dir, write_safetensors_file, PtEntry,
};
use suite_support::atomic::AtomicDir;
use suite_support::exit::ToolError;
pub use suite_support::manifest::ManifestTarget;
use suite_support::manifest::{write_manifest_file, ManifestRecord};
use suite_support::progress::Progress;
use tensor_formats::DType;

use crate::adapter::{check_against_base, plan_deepspeed, plan_peft, AdapterPlan, Overrides};
use crate::exec::Job;
pub use crate::plan::OutputKind;
use crate::plan::{plan, PlanOptions, Planned, Rename, Selection};
use crate::store::{Store, TensorInfo};

/// The default `--max-shard-size`: 5 GB (decimal, as `save_pretrained`).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// The default manifest of a directory output, inside it.
pub const MANIFEST_FILE_NAME: &str = "st-merge.manifest.jsonl";

/// Files copied next to the weights of a directory output, when the input directory has them.
pub const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// Everything `st-merge` is asked to do.
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// Input checkpoints, in order.
    pub inputs: Vec<PathBuf>,
    /// The output: `x.safetensors`, `x.pt` or a directory.
    pub output: PathBuf,
    /// Largest shard of a directory output, in bytes.
    pub max_shard_size: u64,
    /// Convert float tensors to this dtype (`None`: keep).
    pub dtype: Option<DType>,
    /// `--include` globs.
    pub include: Vec<String>,
    /// `--exclude` globs.
    pub exclude: Vec<String>,
    /// `--rename FROM=TO`, in order.
    pub renames: Vec<String>,
    /// A LoRA adapter to merge.
    pub lora: Option<PathBuf>,
    /// `--lora-alpha` / `--lora-r`.
    pub lora_overrides: Overrides,
    /// Worker threads (`None`: all available).
    pub jobs: Option<usize>,
    /// Replace an existing output.
    pub force: bool,
    /// Plan only.
    pub dry_run: bool,
    /// Where the manifest goes (a directory's default: inside it; a file's: none).
    pub manifest: ManifestTarget,
    /// Show a progress bar (only ever on a terminal).
    pub progress: bool,
}

/// What a run did (or, with `dry_run`, would do).
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The kind of output.
    pub kind: OutputKind,
    /// The planned tensors.
    pub plan: Vec<Planned>,
    /// Files written (empty for a dry run).
    pub records: Vec<ManifestRecord>,
    /// Tensor bytes written.
    pub bytes: u64,
    /// Tensors with a LoRA merged in.
    pub merged: usize,
    /// Tensors replaced by the adapter.
    pub replaced: usize,
    /// Adapter targets left out by the selection.
    pub adapter_left_out: Vec<String>,
    /// Adapter tensors ignored (DeepSpeed's frozen base copies).
    pub adapter_ignored: usize,
}

fn usage(msg: impl std::fmt::Display) -> ToolError {
    ToolError::usage(anyhow!("{msg}"))
}

/// Opens an adapter: a PEFT directory (`adapter_config.json` + `adapter_model.safetensors` or
/// `.bin`), or a DeepSpeed checkpoint (a `.pt` file, or a directory holding
/// `mp_rank_00_model_states.pt`, directly or under the tag its `latest` file names).
pub fn open_adapter(path: &Path, overrides: Overrides) -> Result<(Store, AdapterPlan), ToolError> {
    let config_path = path.join("adapter_config.json");
    let fail = |e: String| usage(format!("adapter {}: {e}", path.display()));
    if path.is_dir() && config_path.is_file() {
        let text = std::fs::read(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))
            .map_err(ToolError::classify)?;
        let config: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
            ToolError::data(anyhow!("{}: not valid JSON: {e}", config_path.display()))
        })?;
        let weights = ["adapter_model.safetensors", "adapter_model.bin"]
            .iter()
            .map(|f| path.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                fail("no adapter_model.safetensors (or adapter_model.bin) next to adapter_config.json".into())
            })?;
        let store = Store::open(&weights).map_err(ToolError::classify)?;
        let plan = plan_peft(&config, &store.tensors(), overrides).map_err(fail)?;
        return Ok((store, plan));
    }
    let file = if path.is_dir() {
        let tag = std::fs::read_to_string(path.join("latest")).ok();
        let candidates = [
            Some(path.join("mp_rank_00_model_states.pt")),
            tag.map(|t| path.join(t.trim()).join("mp_rank_00_model_states.pt")),
        ];
        candidates
            .into_iter()
            .flatten()
            .find(|p| p.is_file())
            .ok_or_else(|| {
                fail(
                    "neither a PEFT adapter (adapter_config.json) nor a DeepSpeed checkpoint \
                  (mp_rank_00_model_states.pt)"
                        .into(),
                )
            })?
    } else {
        path.to_path_buf()
    };
    let store = Store::open(&file).map_err(ToolError::classify)?;
    let plan = plan_deepspeed(&store.tensors(), overrides).map_err(fail)?;
    Ok((store, plan))
}

/// Refuses an existing output (unless `force`) and an output that is one of the inputs.
fn check_output(opts: &MergeOptions, kind: OutputKind, inputs: &[Store]) -> Result<(), ToolError> {
    let out = &opts.output;
    if out.as_os_str().is_empty() || out.file_name().is_none() {
        return Err(usage(format!(
            "output {} must name a file or directory to create",
            out.display()
        )));
    }
    if let Ok(canon) = out.canonicalize() {
        for s in inputs {
            for f in s.files() {
                let f = f.canonicalize().unwrap_or(f);
                if f == canon || f.starts_with(&canon) {
                    return Err(usage(format!(
                        "output {} would overwrite input {}: choose another output",
                        out.display(),
                        f.display()
                    )));
                }
            }
        }
    }
    let empty_dir = out.is_dir() && std::fs::read_dir(out).is_ok_and(|mut e| e.next().is_none());
    if out.exists() && !empty_dir && !opts.force {
        return Err(usage(format!(
            "output {} already exists: remove it, choose another name, or pass --force to replace it",
            out.display()
        )));
    }
    if out.is_dir() && kind != OutputKind::Dir {
        return Err(usage(format!(
            "output {} is a directory but its name asks for a single {} file",
            out.display(),
            if kind == OutputKind::Pt {
                ".pt"
            } else {
                ".safetensors"
            }
        )));
    }
    if out.is_file() && kind == OutputKind::Dir {
        return Err(usage(format!(
            "output {} is a file; a directory output needs a new name (or end it in .pt / \
             .safetensors for a single file)",
            out.display()
        )));
    }
    Ok(())
}

/// The directory holding the input's side files (`config.json` ...): the first input that is a
/// directory with a `config.json`, or the directory of an input file that has one.
fn side_file_dir(inputs: &[PathBuf]) -> Option<PathBuf> {
    inputs.iter().find_map(|p| {
        let dir = if p.is_dir() {
            p.clone()
        } else {
            p.parent()?.to_path_buf()
        };
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        dir.join("config.json").is_file().then_some(dir)
    })
}

/// Whether the inputs' `config.json` ties the output embedding to the input one.
fn tied_embeddings(inputs: &[PathBuf]) -> bool {
    let Some(dir) = side_file_dir(inputs) else {
        return false;
    };
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|c| {
            c.get("tie_word_embeddings")
                .and_then(serde_json::Value::as_bool)
        })
        .unwrap_or(false)
}

/// With tied embeddings, a Hugging Face checkpoint omits `lm_head.weight`, but the model's
/// `state_dict()` (what the seed's `torch.save` wrote) holds it as a view of the embedding's
/// storage: add it that way, after `model.norm.weight` as in the state dict.
pub fn add_tied_head(entries: &mut Vec<PtEntry>) {
    const HEAD: &str = "lm_head.weight";
    if entries.iter().any(|e| e.name == HEAD) {
        return;
    }
    let Some(embed) = entries
        .iter()
        .find(|e| e.name == "model.embed_tokens.weight")
        .map(|e| e.storage)
    else {
        return;
    };
    let at = entries
        .iter()
        .position(|e| e.name == "model.norm.weight")
        .map_or(entries.len(), |i| i + 1);
    entries.insert(
        at,
        PtEntry {
            name: HEAD.to_string(),
            storage: embed,
        },
    );
}

/// Plans (and unless `dry_run`, writes) the output.
pub fn run(opts: &MergeOptions) -> Result<Outcome, ToolError> {
    if opts.inputs.is_empty() {
        return Err(usage("no input: give one or more checkpoints"));
    }
    let kind = OutputKind::of(&opts.output);
    let stores: Vec<Store> =
        opts.inputs
            .iter()
            .map(|p| {
                Store::open(p).map_err(|e| {
                    ToolError::classify(anyhow!(e)).with_hint(
            "check the path; an index-sharded checkpoint needs every shard its index names")
                })
            })
            .collect::<Result<_, _>>()?;
    check_output(opts, kind, &stores)?;
    let lists: Vec<Vec<TensorInfo>> = stores.iter().map(Store::tensors).collect();
    let names: Vec<String> = opts
        .inputs
        .iter()
        .map(|p| p.display().to_string())
        .collect();

    let adapter = match &opts.lora {
        Some(path) => {
            let (store, aplan) = open_adapter(path, opts.lora_overrides)?;
            let mut base: BTreeMap<&str, &TensorInfo> = BTreeMap::new();
            for t in lists.iter().flatten() {
                base.entry(t.name.as_str()).or_insert(t);
            }
            check_against_base(&aplan, &store.tensors(), &base)
                .map_err(|e| usage(format!("adapter {}: {e}", path.display())))?;
            Some((store, aplan))
        }
        None => None,
    };

    let plan_opts = PlanOptions {
        selection: Selection::new(&opts.include, &opts.exclude).map_err(usage)?,
        renames: opts
            .renames
            .iter()
            .map(|r| Rename::parse(r))
            .collect::<Result<_, _>>()
            .map_err(usage)?,
        dtype: opts.dtype,
    };
    let planned =
        plan(&lists, &names, &plan_opts, adapter.as_ref().map(|(_, p)| p)).map_err(|e| {
            if e.usage {
                usage(e.message)
            } else {
                ToolError::data(anyhow!(e.message))
            }
        })?;
    let (merged, replaced, left_out, ignored) = match &adapter {
        Some((_, a)) => {
            let (m, r, l) = plan::adapter_coverage(&planned, a);
            (m, r, l, a.ignored)
        }
        None => (0, 0, Vec::new(), 0),
    };
    let bytes: u64 = planned.iter().map(Planned::bytes).sum();
    let mut outcome = Outcome {
        kind,
        plan: planned,
        records: Vec::new(),
        bytes,
        merged,
        replaced,
        adapter_left_out: left_out,
        adapter_ignored: ignored,
    };
    if opts.dry_run {
        return Ok(outcome);
    }

    suite_support::jobs::init_thread_pool(opts.jobs);
    let jobs: Vec<Job<'_>> = outcome
        .plan
        .iter()
        .map(|p| Job {
            planned: p,
            inputs: &stores,
            adapter: adapter.as_ref().map(|(s, _)| s),
        })
        .collect();
    if let Some(parent) = opts.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))
            .map_err(ToolError::io)?;
    }
    let progress = Progress::new(bytes, "st-merge", opts.progress);
    let file_name = opts
        .output
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let records = match kind {
        OutputKind::Safetensors => {
            let refs: Vec<&Job<'_>> = jobs.iter().collect();
            let w = write_safetensors_file(&opts.output, &refs, &progress)
                .map_err(ToolError::classify)?;
            vec![w
                .record(&file_name, "safetensors")
                .with_extra("tensors", jobs.len())]
        }
        OutputKind::Pt => {
            let mut entries = PtEntry::one_each(&jobs);
            if tied_embeddings(&opts.inputs) {
                add_tied_head(&mut entries);
            }
            let w = write_pt_file(&opts.output, &jobs, &entries, &progress)
                .map_err(ToolError::classify)?;
            vec![w
                .record(&file_name, "torch")
                .with_extra("tensors", jobs.len())]
        }
        OutputKind::Dir => write_dir(opts, &jobs, &progress)?,
    };
    progress.finish();
    if kind != OutputKind::Dir {
        match &opts.manifest {
            ManifestTarget::Default => {}
            target => target
                .write(Path::new(""), &records)
                .context("writing the manifest")
                .map_err(ToolError::io)?,
        }
    }
    outcome.records = records;
    Ok(outcome)
}

/// Writes a Hugging Face directory: shards, index, side files, manifest; renamed into place
/// when complete (replacing the old one with `--force`).
fn write_dir(
    opts: &MergeOptions,
    jobs: &[Job<'_>],
    progress: &Progress,
) -> Result<Vec<ManifestRecord>, ToolError> {
    let dir = AtomicDir::create(&opts.output)
        .context("creating the output directory")
        .map_err(ToolError::io)?;
    let mut records = write_safetensors_dir(dir.path(), jobs, opts.max_shard_size, progress)
        .map_err(ToolError::classify)?;
    match side_file_dir(&opts.inputs) {
        Some(src) => {
            for name in SIDE_FILES {
                let from = src.join(name);
                if !from.is_file() {
                    continue;
                }
                let w = match opts.dtype {
                    Some(dtype) if *name == "config.json" => {
                        write_config(&from, &dir.path().join(name), dtype)
                    }
                    _ => copy_small_file(&from, dir.path(), name),
                }
                .map_err(ToolError::classify)?;
                let kind = if name.starts_with("tokenizer") || !name.ends_with("config.json") {
                    "tokenizer"
                } else {
                    "config"
                };
                records.push(w.record(name, kind));
            }
        }
        None => eprintln!(
            "st-merge: warning: no config.json next to the inputs; {} will need one before \
             transformers can load it",
            opts.output.display()
        ),
    }
    if opts.manifest == ManifestTarget::Default {
        write_manifest_file(dir.path().join(MANIFEST_FILE_NAME), &records)
            .context("writing the manifest")
            .map_err(ToolError::io)?;
    }
    if opts.force && opts.output.exists() {
        let old = &opts.output;
        let removed = if old.is_dir() {
            std::fs::remove_dir_all(old)
        } else {
            std::fs::remove_file(old)
        };
        removed
            .with_context(|| format!("removing the old {} (--force)", old.display()))
            .map_err(ToolError::io)?;
    }
    dir.commit()
        .context("renaming the finished output into place")
        .map_err(ToolError::io)?;
    if opts.manifest != ManifestTarget::Default {
        opts.manifest
            .write(&opts.output.join(MANIFEST_FILE_NAME), &records)
            .context("writing the manifest")
            .map_err(ToolError::io)?;
    }
    Ok(records)
}

/// `config.json` with its `dtype` / `torch_dtype` value changed to `dtype` (what
/// `save_pretrained` of the converted model writes); every other byte as it was.
pub fn config_with_dtype(text: &str, dtype: DType) -> String {
    let mut out = text.to_string();
    for key in ["\"dtype\"", "\"torch_dtype\""] {
        let mut from = 0;
        while let Some(at) = out[from..].find(key).map(|i| i + from) {
            let rest = &out[at + key.len()..];
            let value_start = rest.find('"').filter(|&i| rest[..i].trim() == ":");
            let Some(vs) = value_start else {
                from = at + key.len();
                continue;
            };
            let value = &rest[vs + 1..];
            let Some(ve) = value.find('"') else { break };
            let start = at + key.len() + vs + 1;
            let is_float = DType::from_torch_name(&value[..ve]).is_some_and(DType::is_float);
            if is_float {
                out.replace_range(start..start + ve, dtype.torch_name());
            }
            from = start;
        }
    }
    out
}

fn write_config(src: &Path, dst: &Path, dtype: DType) -> anyhow::Result<checkpoint_write::Written> {
    let text =
        std::fs::read_to_string(src).with_context(|| format!("reading {}", src.display()))?;
    let new = config_with_dtype(&text, dtype);
    checkpoint_write::write_atomic(dst, |mut h| {
        std::io::Write::write_all(&mut h, new.as_bytes())?;
        Ok(h)
    })
}

/// The dry-run plan as JSON lines: one object per output tensor.
pub fn plan_json(outcome: &Outcome, max_shard_size: u64) -> Vec<serde_json::Value> {
    let shard_of: BTreeMap<usize, String> = if outcome.kind == OutputKind::Dir {
        plan::shards(&outcome.plan, max_shard_size)
            .into_iter()
            .flat_map(|(name, members)| members.into_iter().map(move |m| (m, name.clone())))
            .collect()
    } else {
        BTreeMap::new()
    };
    outcome
        .plan
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut v = serde_json::json!({
                "name": p.name,
                "source": p.source,
                "input": p.input,
                "dtype": p.dtype.safetensors_name(),
                "source_dtype": p.source_dtype.safetensors_name(),
                "shape": p.shape,
                "bytes": p.bytes(),
            });
            match &p.origin {
                plan::Origin::Copy => {}
                plan::Origin::Lora(op) => {
                    v["lora"] = serde_json::json!({"a": op.a, "b": op.b, "scale": op.scale, "r": op.r, "dora": op.magnitude.is_some()});
                }
                plan::Origin::Replace(src) => v["replaced_by"] = src.clone().into(),
            }
            if let Some(s) = shard_of.get(&i) {
                v["shard"] = s.clone().into();
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_dtype_follows_the_conversion() {
        let text = "{\n  \"dtype\": \"bfloat16\",\n  \"rms_norm_eps\": 1e-06,\n  \"sub\": {\"torch_dtype\" : \"float16\", \"dtype\": \"int64\"}\n}\n";
        assert_eq!(
            config_with_dtype(text, DType::F32),
            "{\n  \"dtype\": \"float32\",\n  \"rms_norm_eps\": 1e-06,\n  \"sub\": {\"torch_dtype\" : \"float32\", \"dtype\": \"int64\"}\n}\n"
        );
        assert_eq!(config_with_dtype("{}", DType::BF16), "{}");
    }
}
