//! The `ckpt-unshard` executor: NxD (neuronx-distributed) TP x PP shard files -> the Hugging Face
//! Llama checkpoint they hold, the inverse of `nx-shard` and a replacement for NxD's
//! `convert_checkpoints.py --convert_to_full_state`.
//!
//! [`nxd_layout::plan`] (inverted with [`nxd_layout::ShardPlan::unshard`]) decides where every
//! part of every tensor sits; this crate does the I/O:
//!
//! * [`locate`]: finds the shard files: a shard directory, or an NxD training checkpoint
//!   `<ckpt>/<tag>/model/` chosen by tag (`newest`, `done` markers), and checks the rank files
//!   against the layout.
//! * [`shards`]: maps every rank file (plain, converter xser, or training-checkpoint xser with
//!   `TensorReference`s and `tensor_<i>.pt`) and lists its tensors.
//! * [`layout`]: plans for the shards at hand (extra replicated keys and dtypes taken from the
//!   shards) and checks every file against the plan: names, shapes, dtypes.
//! * [`replicas`]: `--check-replicas`, proof that every replicated copy is bit-identical.
//! * [`write`]: the Hugging Face safetensors shards and index, or NxD's `checkpoint.pt`.
//! * [`run`]: the whole tool.
//!
//! Memory stays bounded: headers are read first, then every output tensor is copied from the
//! mapped shard files through the strided-copy engine in bounded chunks. The output directory
//! is written under a temporary name and renamed into place when complete, so nothing
//! half-written ever sits under the final name.
#![warn(missing_docs)]

pub mod layout;
pub mod locate;
pub mod replicas;
pub mod shards;
pub mod write;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use nxd_layout::{ModelConfig, ParallelConfig};
use nxd_shard::input::planned_dtype;
use nxd_shard::read_model_config;
use suite_support::atomic::AtomicDir;
use suite_support::exit::ToolError;
use suite_support::manifest::ManifestRecord;
pub use suite_support::manifest::ManifestTarget;
use suite_support::progress::Progress;
use tensor_formats::DType;

pub use crate::locate::TagChoice;
pub use crate::replicas::ReplicaReport;

use crate::layout::plan_for_shards;
use crate::locate::{locate, rank_file_paths};
use crate::replicas::check_replicas;
use crate::shards::{open_all, ShardTensors};
use crate::write::{copy_small_file, write_pt_checkpoint, write_safetensors, OutTensor};

/// The default `--max-shard-size`: 5 GB (decimal, as `save_pretrained`).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// The default manifest file name, inside the output directory.
pub const MANIFEST_FILE_NAME: &str = "ckpt-unshard.manifest.jsonl";

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// A Hugging Face checkpoint directory: safetensors shards, their index, `config.json`.
    #[default]
    Safetensors,
    /// NxD's `--convert_to_full_state` output: one `checkpoint.pt`.
    Pt,
}

/// Everything `ckpt-unshard` is asked to do.
#[derive(Debug, Clone)]
pub struct UnshardOptions {
    /// The shard directory (holding `model/` or the rank files) or a training checkpoint
    /// directory.
    pub input: PathBuf,
    /// The output directory; it must not exist yet (or be empty).
    pub output: PathBuf,
    /// The model's `config.json`; default `<input>/config.json`.
    pub config: Option<PathBuf>,
    /// The tag of a training checkpoint (default: the latest).
    pub tag: Option<TagChoice>,
    /// The layout the shards were written with (the NxD converter / training settings).
    pub parallel: ParallelConfig,
    /// What to write.
    pub format: OutputFormat,
    /// Largest safetensors shard, in bytes.
    pub max_shard_size: u64,
    /// Convert float tensors to this dtype (`None`: keep the shards' dtypes).
    pub dtype: Option<DType>,
    /// Prove that every replica is bit-identical before writing anything.
    pub check_replicas: bool,
    /// Worker threads (`None`: all available).
    pub jobs: Option<usize>,
    /// Where the manifest goes.
    pub manifest: ManifestTarget,
    /// Show progress bars (only ever on a terminal).
    pub progress: bool,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Files written, relative to the output directory (manifest excluded).
    pub files: Vec<String>,
    /// Tensors written.
    pub tensors: usize,
    /// Tensor bytes written.
    pub bytes: u64,
    /// The training-checkpoint tag read, if any.
    pub tag: Option<String>,
    /// What `--check-replicas` compared.
    pub replicas: Option<ReplicaReport>,
}

fn usage(msg: String) -> ToolError {
    ToolError::usage(anyhow!(msg))
}

fn config_path(opts: &UnshardOptions) -> Result<PathBuf, ToolError> {
    if let Some(c) = &opts.config {
        return Ok(c.clone());
    }
    let guess = opts.input.join("config.json");
    if guess.is_file() {
        return Ok(guess);
    }
    Err(usage(format!(
        "no config.json in {}: pass --config with the model's Hugging Face config.json (NxD shards \
         do not carry it)",
        opts.input.display()
    )))
}

/// Refuses an output that exists and is not an empty directory.
fn check_output(output: &Path) -> Result<(), ToolError> {
    if output.file_name().is_none() {
        return Err(usage(format!(
            "output {} must name a directory to create",
            output.display()
        )));
    }
    let empty_dir = output.is_dir()
        && std::fs::read_dir(output).is_ok_and(|mut entries| entries.next().is_none());
    if output.exists() && !empty_dir {
        return Err(usage(format!(
            "output {} already exists: remove it or choose another directory (ckpt-unshard \
             never writes into an existing checkpoint)",
            output.display()
        )));
    }
    Ok(())
}

/// The output tensors: every tensor of the plan, in state-dict order, with its output dtype.
fn out_tensors<'p>(
    plan: &'p nxd_layout::UnshardPlan,
    dtype: Option<DType>,
) -> Result<Vec<OutTensor<'p>>, ToolError> {
    plan.tensors
        .iter()
        .map(|t| {
            let src = DType::from_safetensors_name(&t.dtype).ok_or_else(|| {
                ToolError::data(anyhow!("tensor {}: unknown dtype {}", t.name, t.dtype))
            })?;
            Ok(OutTensor {
                tensor: t,
                dtype: planned_dtype(src, dtype),
            })
        })
        .collect()
}

/// Runs `ckpt-unshard`.
pub fn run(opts: &UnshardOptions) -> Result<Outcome, ToolError> {
    let located = locate(&opts.input, opts.tag.as_ref())?;
    if let (Some(tag), Some(how)) = (&located.tag, located.tag_source) {
        eprintln!("ckpt-unshard: reading checkpoint tag {tag} ({how})");
    }
    let config = config_path(opts)?;
    let model: ModelConfig = read_model_config(&config)?;
    nxd_layout::validate(&model, &opts.parallel).map_err(|e| {
        ToolError::usage(
            anyhow!(e).context("these layout flags describe no layout nx-shard writes"),
        )
    })?;
    let paths = rank_file_paths(&located.model_dir, &opts.parallel)?;
    check_output(&opts.output)?;

    suite_support::jobs::init_thread_pool(opts.jobs);
    let files = open_all(&paths)?;
    let shards: Vec<ShardTensors<'_>> = files
        .iter()
        .map(|f| f.tensors())
        .collect::<Result<_, _>>()?;
    let plan = plan_for_shards(&model, &opts.parallel, &shards)?;
    let tensors = out_tensors(&plan, opts.dtype)?;

    let replicas = if opts.check_replicas {
        Some(check_replicas(&plan, &shards, opts.progress)?)
    } else {
        None
    };

    if let Some(parent) = opts.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))
            .map_err(ToolError::io)?;
    }
    let dir = AtomicDir::create(&opts.output)
        .context("creating the output directory")
        .map_err(ToolError::io)?;
    let total: u64 = tensors.iter().map(OutTensor::bytes).sum();
    let progress = Progress::new(total, "ckpt-unshard", opts.progress);
    let mut records = match opts.format {
        OutputFormat::Safetensors => write_safetensors(
            dir.path(),
            &tensors,
            &shards,
            opts.max_shard_size,
            &progress,
        ),
        OutputFormat::Pt => write_pt_checkpoint(
            dir.path(),
            &tensors,
            model.tie_word_embeddings,
            &shards,
            &progress,
        ),
    }
    .map_err(ToolError::classify)?;
    progress.finish();
    if opts.format == OutputFormat::Safetensors {
        // config.json under that name whatever --config was called; generation_config.json
        // when it sits next to it.
        let generation = config.with_file_name("generation_config.json");
        let mut extra = vec![(config.clone(), "config.json")];
        if generation.is_file() {
            extra.push((generation, "generation_config.json"));
        }
        for (src, name) in extra {
            let w = copy_small_file(&src, dir.path(), name).map_err(ToolError::classify)?;
            records.push(ManifestRecord::new(name, w.bytes, w.sha256).with_kind("config"));
        }
    }
    let files_written: Vec<String> = records.iter().map(|r| r.path.clone()).collect();
    // The default manifest is part of the output directory, so it goes in before the rename.
    let write_manifest = |default: &Path| {
        opts.manifest
            .write(default, &records)
            .context("writing the manifest")
            .map_err(ToolError::io)
    };
    if opts.manifest == ManifestTarget::Default {
        write_manifest(&dir.path().join(MANIFEST_FILE_NAME))?;
    }
    dir.commit()
        .context("renaming the finished output into place")
        .map_err(ToolError::io)?;
    if opts.manifest != ManifestTarget::Default {
        write_manifest(&opts.output.join(MANIFEST_FILE_NAME))?;
    }
    Ok(Outcome {
        files: files_written,
        tensors: tensors.len(),
        bytes: total,
        tag: located.tag,
        replicas,
    })
}
