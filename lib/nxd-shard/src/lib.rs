//! The `nx-shard` executor: Hugging Face Llama checkpoint -> NxD (neuronx-distributed) TP x PP
//! shard files, as NxD's `convert_checkpoints.py --convert_from_full_state` writes them.
//!
//! [`nxd_layout::plan`] decides what goes where; this crate does the I/O:
//!
//! * [`input`]: opens the source (HF safetensors directory / index / file, or a full-state
//!   `.pt`) through mmap and lists its tensors in state-dict order.
//! * [`write`]: writes one `dp_rank_00_tp_rank_XX_pp_rank_YY.pt` with the strided-copy engine,
//!   atomically, hashing it on the way.
//! * [`run`]: the whole tool: plan, select this rank's files, write them in parallel, write the
//!   manifest.
//!
//! Finished outputs are kept: a file that already exists under its final name is skipped (unless
//! [`ShardOptions::force`]), so rerunning an interrupted conversion resumes it. Partial files are
//! only ever written under temporary names.
#![warn(missing_docs)]

pub mod input;
pub mod write;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use nxd_layout::{expected_source_tensors, plan, FilePlan, ModelConfig, ParallelConfig, ShardPlan};
use rayon::prelude::*;
use suite_support::atomic::{remove_stale_partials, Publisher};
use suite_support::exit::ToolError;
use suite_support::hash::sha256_file;
use suite_support::manifest::ManifestRecord;
pub use suite_support::manifest::ManifestTarget;
use suite_support::progress::Progress;
use suite_support::worksplit::WorkSlice;
use tensor_formats::DType;

use crate::input::{default_config_path, sources, Input};
use crate::write::{write_file, write_split_file};

/// The manifest `kind` of shard files.
pub const MANIFEST_KIND: &str = "nxd-shard";
/// Manifest `kind` of the side files of the split xser layout (`.info.pt`, `tensor_<i>.pt`).
pub const SIDE_FILE_KIND: &str = "nxd-xser-part";

/// The default manifest file name, inside the output directory.
pub const MANIFEST_FILE_NAME: &str = "nx-shard.manifest.jsonl";

/// Subdirectory of the output directory holding the shard files (as NxD writes them).
pub const MODEL_DIR: &str = "model";

/// Everything `nx-shard` is asked to do.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    /// The HF checkpoint (directory, index, `.safetensors` file) or a full-state `.pt`. May be
    /// `None` only for a dry run with [`ShardOptions::config`].
    pub input: Option<PathBuf>,
    /// The output directory (the shards go to `<output>/model/`). May be `None` for a dry run.
    pub output: Option<PathBuf>,
    /// `config.json`; default `<input dir>/config.json`.
    pub config: Option<PathBuf>,
    /// The NxD converter settings.
    pub parallel: ParallelConfig,
    /// Convert float tensors to this dtype (`None`: keep the source dtype).
    pub dtype: Option<DType>,
    /// Worker threads (`None`: all available).
    pub jobs: Option<usize>,
    /// `--rank` (default from Slurm, else 0).
    pub rank: Option<usize>,
    /// `--world` (default from Slurm, else 1).
    pub world: Option<usize>,
    /// Print the plan summary and write nothing.
    pub dry_run: bool,
    /// Where the manifest goes.
    pub manifest: ManifestTarget,
    /// Rewrite files that already exist.
    pub force: bool,
    /// Also create the empty `<file>.tensors/` directories of NxD's `--save_xser`.
    pub xser: bool,
    /// Write NxD's training-checkpoint xser layout instead (`TensorReference`s in the file, one
    /// `<file>.tensors/tensor_<i>.pt` per tensor, `<file>.info.pt`), which NxD's loader also reads.
    pub xser_split: bool,
    /// Show a progress bar (only ever on a terminal).
    pub progress: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Files written, relative to the output directory.
    pub written: Vec<String>,
    /// Files skipped because they already existed.
    pub skipped: Vec<String>,
}

fn usage(e: impl Into<anyhow::Error>) -> ToolError {
    ToolError::usage(e)
}

/// Reads `config.json`.
pub fn read_model_config(path: &Path) -> Result<ModelConfig, ToolError> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the model config {}", path.display()))
        .map_err(ToolError::classify)?;
    ModelConfig::from_json_str(&text)
        .with_context(|| path.display().to_string())
        .map_err(usage)
}

/// Plans from `sources`, turning planner errors (refusals included) into usage errors (exit 2)
/// carrying the planner's one-line message.
fn make_plan(
    model: &ModelConfig,
    parallel: &ParallelConfig,
    sources: &[nxd_layout::SourceTensor],
) -> Result<ShardPlan, ToolError> {
    plan(model, parallel, sources).map_err(usage)
}

/// The relative path of a shard file inside the output directory.
pub fn relative_path(file: &FilePlan) -> String {
    format!("{MODEL_DIR}/{}", file.file_name)
}

/// Runs `nx-shard`.
pub fn run(opts: &ShardOptions) -> Result<Outcome, ToolError> {
    if let Some(i) = &opts.input {
        if !i.exists() {
            return Err(usage(anyhow!("input {} does not exist", i.display())));
        }
    }
    let config_path = match (&opts.config, &opts.input) {
        (Some(c), _) => c.clone(),
        (None, Some(i)) => default_config_path(i),
        (None, None) => {
            return Err(usage(anyhow!(
                "no input: pass --input (an HF checkpoint), or --config with --dry-run"
            )))
        }
    };
    let model = read_model_config(&config_path)?;

    let Some(input_path) = &opts.input else {
        if !opts.dry_run {
            return Err(usage(anyhow!(
                "--input is required unless --dry-run is given (a dry run without weights plans \
                 from --config alone)"
            )));
        }
        let dtype = opts.dtype.unwrap_or(DType::BF16);
        let srcs = expected_source_tensors(&model, dtype.safetensors_name(), dtype.size());
        let plan = make_plan(&model, &opts.parallel, &srcs)?;
        println!("{}", plan.summary());
        return Ok(Outcome::default());
    };

    let input = Input::open(input_path).map_err(ToolError::usage)?;
    let tensors = input.tensors().map_err(ToolError::usage)?;
    let (srcs, views) = sources(tensors, opts.dtype);
    let plan = make_plan(&model, &opts.parallel, &srcs)?;
    if opts.dry_run {
        println!("{}", plan.summary());
        return Ok(Outcome::default());
    }

    let output = opts
        .output
        .as_ref()
        .ok_or_else(|| usage(anyhow!("--output is required (unless --dry-run)")))?;
    let slice = WorkSlice::resolve(opts.rank, opts.world).map_err(usage)?;
    let weights: Vec<u64> = plan.files.iter().map(FilePlan::bytes).collect();
    let mine = slice.balanced(&weights);

    let model_dir = output.join(MODEL_DIR);
    std::fs::create_dir_all(&model_dir)
        .with_context(|| format!("creating {}", model_dir.display()))
        .map_err(ToolError::io)?;
    if slice.world == 1 {
        remove_stale_partials(&model_dir)
            .context("cleaning up after an earlier run")
            .map_err(ToolError::io)?;
    }

    if !opts.force {
        refuse_other_layouts(&model_dir, &plan)?;
    }
    // Existing outputs are kept (resume) unless --force, once checked to be this plan's files.
    let mut todo = Vec::new();
    let mut skipped = Vec::new();
    for &i in &mine {
        let f = &plan.files[i];
        let path = model_dir.join(&f.file_name);
        if !opts.force && path.is_file() {
            check_existing(&path, f, opts.xser_split)?;
            if opts.xser {
                let dir = tensor_formats::xser::tensors_dir(&path);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))
                    .map_err(ToolError::io)?;
            }
            skipped.push(i);
        } else {
            todo.push(i);
        }
    }
    for &i in &skipped {
        eprintln!(
            "nx-shard: keeping existing {} (pass --force to rewrite it)",
            relative_path(&plan.files[i])
        );
    }

    suite_support::jobs::init_thread_pool(opts.jobs);
    let total: u64 = todo.iter().map(|&i| weights[i]).sum();
    let progress = Progress::new(total, "nx-shard", opts.progress);
    // Workers hand finished files to the publisher and go on; the disk catches up behind them.
    let publisher = Publisher::start();
    let results: Vec<(usize, anyhow::Result<write::Written>)> = todo
        .par_iter()
        .map(|&i| {
            let f = &plan.files[i];
            let path = model_dir.join(&f.file_name);
            let result = if opts.xser_split {
                write_split_file(f, &views, &path, &progress, &publisher)
            } else {
                write_file(f, &views, &path, opts.xser, &progress, &publisher)
            };
            (i, result)
        })
        .collect();
    progress.finish();
    publisher
        .wait()
        .context("publishing the shard files")
        .map_err(ToolError::classify)?;

    let mut records = Vec::new();
    let mut written = Vec::new();
    for (i, r) in results {
        let f = &plan.files[i];
        let w = r
            .with_context(|| format!("writing {}", relative_path(f)))
            .map_err(ToolError::classify)?;
        written.push(relative_path(f));
        for side in w.side_files {
            records.push(
                ManifestRecord::new(
                    format!("{MODEL_DIR}/{}", side.name),
                    side.bytes,
                    side.sha256,
                )
                .with_kind(SIDE_FILE_KIND),
            );
        }
        records.push(record(f, w.bytes, w.sha256));
    }
    // Skipped files are described too, so a resumed run's manifest covers every output.
    for &i in &skipped {
        let f = &plan.files[i];
        let path = model_dir.join(&f.file_name);
        let bytes = std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))
            .map_err(ToolError::classify)?
            .len();
        let sha = sha256_file(&path)
            .with_context(|| format!("hashing {}", path.display()))
            .map_err(ToolError::classify)?;
        records.push(record(f, bytes, sha));
    }
    records.sort_by(|a, b| a.path.cmp(&b.path));

    write_manifest_to(&opts.manifest, output, slice, &records)?;
    // The last rank to finish joins the per-rank manifests, so a split run needs no extra step
    // (`--merge-manifests` does the same by hand).
    if slice.world > 1 && opts.manifest == ManifestTarget::Default {
        // Other ranks still running is the normal case; anything else is worth a warning but
        // does not undo this rank's finished work.
        if let Err(e) = merge_manifests(output) {
            if e.code != suite_support::exit::DATA_ERROR {
                eprintln!("{} (this rank's files are done)", e.report("nx-shard"));
            }
        }
    }
    Ok(Outcome {
        written,
        skipped: skipped
            .iter()
            .map(|&i| relative_path(&plan.files[i]))
            .collect(),
    })
}

/// Refuses an output directory holding shard files this plan would not write (another tp/pp layout):
/// resuming into it would mix two layouts.
fn refuse_other_layouts(model_dir: &Path, plan: &ShardPlan) -> Result<(), ToolError> {
    let expected: std::collections::HashSet<&str> =
        plan.files.iter().map(|f| f.file_name.as_str()).collect();
    let entries = std::fs::read_dir(model_dir)
        .with_context(|| format!("reading {}", model_dir.display()))
        .map_err(ToolError::io)?;
    let mut strays: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.starts_with("dp_rank_") && n.ends_with(".pt") && !expected.contains(n.as_str())
        })
        .collect();
    strays.sort();
    match strays.first() {
        None => Ok(()),
        Some(first) => Err(usage(anyhow!(
            "{} holds {} shard file(s) of another layout (e.g. {first}); choose another --output or pass --force",
            model_dir.display(),
            strays.len()
        ))),
    }
}

/// Checks that an existing output has exactly the planned tensors (names in order, shapes, dtypes),
/// reading only its header, before a rerun keeps it.
fn check_existing(path: &Path, f: &FilePlan, split: bool) -> Result<(), ToolError> {
    let mismatch = |why: String| {
        usage(anyhow!(
            "{} is not this layout's file ({why}); choose another --output or pass --force",
            path.display()
        ))
    };
    let file = tensor_formats::xser::NxdFile::open(path)
        .map_err(|e| mismatch(format!("unreadable: {e}")))?;
    if split != file.has_references() {
        return Err(mismatch("a different xser layout".into()));
    }
    let found = file.tensors().map_err(|e| mismatch(e.to_string()))?;
    if found.len() != f.tensors.len() {
        return Err(mismatch(format!(
            "{} tensors, expected {}",
            found.len(),
            f.tensors.len()
        )));
    }
    for ((name, view), t) in found.iter().zip(&f.tensors) {
        if *name != t.name
            || view.layout.shape != t.shape
            || view.dtype.safetensors_name() != t.dtype
        {
            return Err(mismatch(format!(
                "tensor {name} {:?} {}, expected {} {:?} {}",
                view.layout.shape, view.dtype, t.name, t.shape, t.dtype
            )));
        }
    }
    Ok(())
}

fn record(f: &FilePlan, bytes: u64, sha256: String) -> ManifestRecord {
    ManifestRecord::new(relative_path(f), bytes, sha256)
        .with_kind(MANIFEST_KIND)
        .with_extra("tp", f.tp)
        .with_extra("pp", f.pp)
        .with_extra("tensors", f.tensors.len())
}

/// The per-rank manifest of a split run (`--world > 1`): `rank` and `world` parsed from
/// `nx-shard.manifest.rank-R-of-W.jsonl`.
fn parse_rank_manifest_name(name: &str) -> Option<(usize, usize)> {
    let middle = name
        .strip_prefix("nx-shard.manifest.rank-")?
        .strip_suffix(".jsonl")?;
    let (rank, world) = middle.split_once("-of-")?;
    Some((rank.parse().ok()?, world.parse().ok()?))
}

/// Joins the per-rank manifests of a split run (`nx-shard.manifest.rank-R-of-W.jsonl`) into
/// `<output>/nx-shard.manifest.jsonl`, sorted by path as a single process writes it, and returns
/// the number of records.
///
/// Fails with a data error (exit 1) naming the ranks that have not finished, and with a usage
/// error when the directory mixes runs of different `--world`, when two ranks list the same file,
/// or when a listed file is missing or has another size (a stale manifest).
pub fn merge_manifests(output: &Path) -> Result<usize, ToolError> {
    let entries = std::fs::read_dir(output)
        .with_context(|| format!("reading {}", output.display()))
        .map_err(ToolError::classify)?;
    let mut ranks = std::collections::BTreeMap::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((rank, world)) = parse_rank_manifest_name(&name) {
            ranks.insert((world, rank), entry.path());
        }
    }
    let worlds: std::collections::BTreeSet<usize> = ranks.keys().map(|&(w, _)| w).collect();
    let world = match worlds.iter().collect::<Vec<_>>().as_slice() {
        [] => {
            return Err(usage(anyhow!(
            "{} holds no per-rank manifests (nx-shard.manifest.rank-R-of-W.jsonl): run nx-shard \
                 with --rank/--world (or under Slurm) first",
            output.display()
        )))
        }
        [w] => **w,
        _ => {
            return Err(usage(anyhow!(
                "{} holds per-rank manifests of runs split {worlds:?} ways: delete the stale \
                 nx-shard.manifest.rank-*.jsonl files of the other runs",
                output.display()
            )))
        }
    };
    let missing: Vec<String> = (0..world)
        .filter(|r| !ranks.contains_key(&(world, *r)))
        .map(|r| r.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(ToolError::data(anyhow!(
            "rank(s) {} of {world} have not finished (no nx-shard.manifest.rank-R-of-{world}.jsonl \
             in {}): rerun them, then merge again",
            missing.join(", "),
            output.display()
        )));
    }
    let mut records: Vec<ManifestRecord> = Vec::new();
    for path in ranks.values() {
        let part = suite_support::manifest::read_manifest_path(path)
            .with_context(|| format!("reading {}", path.display()))
            .map_err(ToolError::data)?;
        records.extend(part);
    }
    records.sort_by(|a, b| a.path.cmp(&b.path));
    if let Some(w) = records.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(usage(anyhow!(
            "{} is listed by two rank manifests in {}: delete the stale \
             nx-shard.manifest.rank-*.jsonl files and rerun",
            w[0].path,
            output.display()
        )));
    }
    for r in &records {
        let path = output.join(&r.path);
        let found = std::fs::metadata(&path).map(|m| m.len()).ok();
        if found != Some(r.bytes) {
            return Err(usage(anyhow!(
                "{} is listed in a rank manifest but {}: the manifest is stale; rerun that rank",
                path.display(),
                match found {
                    None => "missing".to_string(),
                    Some(b) => format!("has {b} bytes, not {}", r.bytes),
                }
            )));
        }
    }
    let joined = output.join(MANIFEST_FILE_NAME);
    suite_support::manifest::write_manifest_file(&joined, &records)
        .with_context(|| format!("writing {}", joined.display()))
        .map_err(ToolError::io)?;
    Ok(records.len())
}

/// The default manifest path for `slice`.
pub fn default_manifest_path(output: &Path, slice: WorkSlice) -> PathBuf {
    if slice.world > 1 {
        output.join(format!(
            "nx-shard.manifest.rank-{}-of-{}.jsonl",
            slice.rank, slice.world
        ))
    } else {
        output.join(MANIFEST_FILE_NAME)
    }
}

fn write_manifest_to(
    target: &ManifestTarget,
    output: &Path,
    slice: WorkSlice,
    records: &[ManifestRecord],
) -> Result<(), ToolError> {
    target
        .write(&default_manifest_path(output, slice), records)
        .context("writing the manifest")
        .map_err(ToolError::io)
}
