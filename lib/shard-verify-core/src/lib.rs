//! `shard-verify`: proves that an NxD (neuronx-distributed) TP x PP shard set is complete and
//! correct, or that any directory matches a manifest.
//!
//! The checks run fastest first and report every problem found, naming the file and tensor:
//!
//! 1. [`names`]: exactly the expected `dp_rank_00_tp_rank_XX_pp_rank_YY.pt` files (and
//!    `.pt.tensors/` directories with `--xser`); missing, stray, misnamed, duplicate files.
//! 2. [`structure`]: each archive parses header-only (no tensor data read) and holds the keys,
//!    dtypes, shapes and strides the [`nxd_layout`] plan puts on its rank, in order.
//! 3. [`manifest_check`]: with a manifest, the size and SHA-256 of every file, hashed in
//!    parallel.
//! 4. [`cross`]: unless `fast`, every region the layout replicates (norms, kv heads, tied
//!    embeddings) is bit-identical across ranks, and the vocabulary rows are covered once.
//!
//! A Hugging Face `datasets` directory (tok-pack's output) is checked by [`dataset`] instead:
//! its file list, features, and every row.
//!
//! [`verify`] runs them and returns a [`Report`] (human summary with a tp x pp grid, or JSON).
#![warn(missing_docs)]

pub mod cross;
pub mod dataset;
pub mod manifest_check;
pub mod names;
pub mod report;
pub mod structure;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use nxd_layout::{
    canonical_order, expected_source_tensors, plan, validate, LayerTensor, ModelConfig,
    ParallelConfig, ShardPlan, SourceTensor, TensorKind,
};
use rayon::prelude::*;
use serde_json::Value;
use suite_support::exit::ToolError;
use suite_support::manifest::{read_manifest_path, ManifestRecord, ManifestTarget};
use tensor_formats::DType;

use crate::manifest_check::{hash_files, walk_files, Hashed};
use crate::names::{locate, rel_of, Located, NameScan, DONE_MARKER};
use crate::report::{Check, CheckResult, FileStatus, Mark, Mode, Problem, Report};
use crate::structure::{OpenFailure, Opened};

/// The manifest `kind` of shard files (as nx-shard writes it).
pub const MANIFEST_KIND: &str = "nxd-shard";

/// The manifest `kind` of the files of nx-shard's xser split (training-checkpoint) layout:
/// `<file>.tensors/tensor_<i>.pt` and `<file>.info.pt`.
pub const XSER_PART_KIND: &str = "nxd-xser-part";

/// The manifest `kind` of dataset files (as tok-pack writes it).
pub const DATASET_KIND: &str = "hf-dataset";

/// The manifest nx-shard writes into its output directory (suggested when `--manifest` is
/// absent).
pub const NX_SHARD_MANIFEST: &str = "nx-shard.manifest.jsonl";

/// Everything `shard-verify` is asked to do.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The directory: an output directory holding `model/`, `model/` itself, a training
    /// checkpoint tag directory, or (with a manifest) any directory.
    pub dir: PathBuf,
    /// The model's HF `config.json` [default: `config.json` in the directory or its root].
    pub config: Option<PathBuf>,
    /// The layout.
    pub parallel: ParallelConfig,
    /// The xser layout (a `.pt.tensors/` directory beside every file).
    pub xser: bool,
    /// A manifest to check sizes and SHA-256 against (`-`: standard input).
    pub manifest: Option<PathBuf>,
    /// Write a manifest of what is there to this file (`-`: standard output).
    pub record: Option<PathBuf>,
    /// Skip the cross-rank checks.
    pub fast: bool,
    /// For a dataset: the length every row must have (`None`: the first row's).
    pub block_size: Option<usize>,
    /// For a dataset: token ids must be below this (`None`: `vocab_size` of `--config` if
    /// given).
    pub vocab_size: Option<u64>,
    /// Worker threads (`None`: all available).
    pub jobs: Option<usize>,
    /// Show progress bars (only ever on a terminal).
    pub progress: bool,
}

/// Runs every check. `Err` only for usage or input errors (exit 2: bad directory, config,
/// manifest, refused layout); problems found are in the [`Report`].
pub fn verify(opts: &VerifyOptions) -> Result<Report, ToolError> {
    suite_support::jobs::init_thread_pool(opts.jobs);
    let manifest = match &opts.manifest {
        Some(p) => Some(read_manifest_path(p).map_err(ToolError::usage)?),
        None => None,
    };
    if dataset::is_dataset_dir(&opts.dir) {
        return verify_dataset(opts, manifest.as_deref());
    }
    match (locate(&opts.dir)?, manifest) {
        (Some(loc), manifest) => verify_shards(opts, &loc, manifest.as_deref()),
        (None, Some(records)) => verify_manifest_only(opts, &records),
        (None, None) => Err(ToolError::usage(anyhow!(
            "{} holds no shard files (no model/ directory, no dp_rank_*.pt): pass the output \
             directory, model/ itself or a training checkpoint tag directory, or --manifest to \
             check any directory against a manifest",
            opts.dir.display()
        ))),
    }
}

fn usage(e: impl Into<anyhow::Error>) -> ToolError {
    ToolError::usage(e)
}

/// The model config: `--config`, else `config.json` in the root or the model directory.
fn read_config(opts: &VerifyOptions, loc: &Located) -> Result<ModelConfig, ToolError> {
    let path = match &opts.config {
        Some(p) => p.clone(),
        None => [
            loc.root.join("config.json"),
            loc.model_dir.join("config.json"),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            usage(anyhow!(
                "no config.json in {}: pass --config (the model's Hugging Face config.json)",
                loc.root.display()
            ))
        })?,
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the model config {}", path.display()))
        .map_err(usage)?;
    ModelConfig::from_json_str(&text)
        .with_context(|| path.display().to_string())
        .map_err(usage)
}

/// The layout as JSON (the parallel settings plus `xser`).
fn layout_json(opts: &VerifyOptions) -> Value {
    let mut v = serde_json::to_value(&opts.parallel).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("xser".into(), Value::Bool(opts.xser));
    }
    v
}

/// The checkpoint's dtype: the most common dtype of the tensors read (legacy `inv_freq`
/// buffers aside, which NxD keeps in float32); bf16 if nothing could be read.
fn checkpoint_dtype(opened: &[Option<Opened>]) -> DType {
    let mut counts: HashMap<DType, usize> = HashMap::new();
    for o in opened.iter().flatten() {
        for t in &o.tensors {
            if !matches!(
                TensorKind::of(&t.name),
                TensorKind::Layer(_, LayerTensor::InvFreq)
            ) {
                *counts.entry(t.dtype).or_default() += 1;
            }
        }
    }
    counts
        .into_iter()
        .max_by_key(|&(d, n)| (n, std::cmp::Reverse(d)))
        .map_or(DType::BF16, |(d, _)| d)
}

/// The source tensors the set was made from: the config's Llama tensors in `dtype`, plus a
/// legacy `rotary_emb.inv_freq` per layer if any file holds one (with the dtype and shape
/// found), in state-dict order.
fn sources(model: &ModelConfig, dtype: DType, opened: &[Option<Opened>]) -> Vec<SourceTensor> {
    let mut out = expected_source_tensors(model, dtype.safetensors_name(), dtype.size());
    let inv = opened.iter().flatten().flat_map(|o| &o.tensors).find(|t| {
        matches!(
            TensorKind::of(&t.name),
            TensorKind::Layer(_, LayerTensor::InvFreq)
        )
    });
    if let Some(t) = inv {
        for l in 0..model.num_hidden_layers {
            out.push(SourceTensor::new(
                LayerTensor::InvFreq.name(l),
                t.shape.clone(),
                t.dtype.safetensors_name(),
                t.dtype.size(),
            ));
        }
        let names: Vec<&str> = out.iter().map(|s| s.name.as_str()).collect();
        let order = canonical_order(&names);
        out = order.into_iter().map(|i| out[i].clone()).collect();
    }
    out
}

fn verify_shards(
    opts: &VerifyOptions,
    loc: &Located,
    manifest: Option<&[ManifestRecord]>,
) -> Result<Report, ToolError> {
    let model = read_config(opts, loc)?;
    validate(&model, &opts.parallel).map_err(usage)?;
    let p = &opts.parallel;
    let NameScan {
        mut slots,
        mut problems,
    } = names::scan(&loc.root, &loc.model_dir, p.tp, p.pp, opts.xser)?;
    let mut warnings: Vec<Problem> = Vec::new();
    let mut unreadable = false;
    if loc.training && !loc.root.join(DONE_MARKER).is_file() {
        problems.push(Problem::file(
            Check::Names,
            DONE_MARKER,
            "missing: the training checkpoint was not finished by every rank",
        ));
    }

    // 2. Structure, header-only.
    let results: Vec<Option<Result<Opened, OpenFailure>>> = slots
        .par_iter()
        .map(|s| s.present.then(|| structure::open(&s.path)))
        .collect();
    let mut opened: Vec<Option<Opened>> = Vec::with_capacity(slots.len());
    for (slot, r) in slots.iter_mut().zip(results) {
        match r {
            Some(Err(f)) => {
                unreadable |= f.io;
                slot.flag(Mark::Unreadable);
                problems.push(Problem::file(
                    Check::Structure,
                    &slot.rel,
                    format!("unreadable: {}", f.message),
                ));
                opened.push(None);
            }
            Some(Ok(o)) => opened.push(Some(o)),
            None => opened.push(None),
        }
    }
    let dtype = checkpoint_dtype(&opened);
    let plan: ShardPlan = plan(&model, p, &sources(&model, dtype, &opened)).map_err(usage)?;
    let stems: HashMap<String, (usize, usize)> = plan
        .files
        .iter()
        .map(|f| {
            (
                f.file_name.trim_end_matches(".pt").to_string(),
                (f.tp, f.pp),
            )
        })
        .collect();
    let mut verified: Vec<HashSet<String>> = vec![HashSet::new(); slots.len()];
    let mut tensors_checked = 0;
    for (i, slot) in slots.iter().enumerate() {
        let Some(o) = &opened[i] else { continue };
        let c = structure::compare(slot, o, &plan.files[i], &stems);
        tensors_checked += o.tensors.len();
        problems.extend(c.problems);
        warnings.extend(c.warnings);
        verified[i] = c.verified;
        if opts.xser {
            let (p, w) = structure::check_xser_dir(slot, o);
            problems.extend(p);
            warnings.extend(w);
        }
    }
    let opened_count = opened.iter().flatten().count();

    // 3. Manifest.
    let present: Vec<String> = slots
        .iter()
        .filter(|s| s.present)
        .map(|s| s.rel.clone())
        .collect();
    let missing: HashSet<String> = slots
        .iter()
        .filter(|s| !s.present)
        .map(|s| s.rel.clone())
        .collect();
    let mut hashed: HashMap<String, Hashed> = HashMap::new();
    let manifest_result = match manifest {
        Some(records) => {
            let m = manifest_check::check(records, &loc.root, &present, &missing, opts.progress);
            unreadable |= m.unreadable;
            let detail = m.detail(records.len());
            problems.extend(m.problems);
            hashed = m.hashed;
            (detail, true)
        }
        None => {
            let hint = loc.root.join(NX_SHARD_MANIFEST);
            let detail = if hint.is_file() {
                format!("no --manifest (nx-shard's is {})", hint.display())
            } else {
                "no --manifest".to_string()
            };
            (detail, false)
        }
    };

    // 4. Cross-rank.
    let cross_result = if opts.fast {
        None
    } else {
        let c = cross::check(&plan, &slots, &opened, &verified, model.head_dim);
        unreadable |= c.unreadable;
        let detail = c.detail();
        problems.extend(c.problems);
        Some(detail)
    };

    // Marks from the problems.
    let index: HashMap<String, usize> = slots
        .iter()
        .enumerate()
        .map(|(i, s)| (s.rel.clone(), i))
        .collect();
    for pr in &problems {
        let mark = match pr.check {
            Check::Names => continue,
            Check::Structure => Mark::Structure,
            Check::Manifest => Mark::Manifest,
            Check::CrossRank => Mark::CrossRank,
        };
        for f in &pr.files {
            if let Some(&i) = index.get(f) {
                slots[i].flag(mark);
            }
        }
    }

    if let Some(target) = &opts.record {
        // As nx-shard describes them: shard files with their ranks, xser parts by kind.
        let describe = |r: ManifestRecord| -> ManifestRecord {
            if let Some(&i) = index.get(&r.path) {
                let f = &plan.files[i];
                let tensors = opened[i].as_ref().map_or(0, |o| o.tensors.len());
                return r
                    .with_kind(MANIFEST_KIND)
                    .with_extra("tp", f.tp)
                    .with_extra("pp", f.pp)
                    .with_extra("tensors", tensors);
            }
            let part = r
                .path
                .strip_suffix(".info.pt")
                .or_else(|| r.path.split_once(".tensors/").map(|(s, _)| s))
                .is_some_and(|s| index.contains_key(s));
            if part {
                r.with_kind(XSER_PART_KIND)
            } else {
                r
            }
        };
        unreadable |= record_dir(
            opts,
            target,
            &loc.model_dir,
            &loc.root,
            &mut hashed,
            &describe,
        )?;
    }

    let present_count = slots.iter().filter(|s| s.present).count();
    let checks = vec![
        CheckResult::ran(
            Check::Names,
            &problems,
            format!(
                "{present_count} of {} files present{}",
                slots.len(),
                if opts.xser { " (xser)" } else { "" }
            ),
        ),
        CheckResult::ran(
            Check::Structure,
            &problems,
            format!(
                "{opened_count} files parsed header-only, {tensors_checked} tensors against \
                 the layout"
            ),
        ),
        match manifest_result {
            (detail, true) => CheckResult::ran(Check::Manifest, &problems, detail),
            (detail, false) => CheckResult::skipped(Check::Manifest, detail),
        },
        match cross_result {
            Some(detail) => CheckResult::ran(Check::CrossRank, &problems, detail),
            None => CheckResult::skipped(Check::CrossRank, "--fast"),
        },
    ];
    Ok(Report {
        dir: opts.dir.display().to_string(),
        mode: if loc.training {
            Mode::TrainingCheckpoint
        } else {
            Mode::ShardSet
        },
        layout: Some(layout_json(opts)),
        tp: p.tp,
        pp: p.pp,
        dtype: Some(dtype.to_string()),
        files: slots
            .iter()
            .map(|s| FileStatus {
                path: s.rel.clone(),
                tp: s.tp,
                pp: s.pp,
                mark: s.mark,
            })
            .collect(),
        checks,
        problems,
        warnings,
        unreadable,
    })
}

/// A `datasets` save_to_disk directory: its file list, features and rows, and a manifest if
/// given (tok-pack's, whose `rows` fields are compared with the rows found).
fn verify_dataset(
    opts: &VerifyOptions,
    manifest: Option<&[ManifestRecord]>,
) -> Result<Report, ToolError> {
    let vocab_size = match (opts.vocab_size, &opts.config) {
        (Some(v), _) => Some(v),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the model config {}", path.display()))
                .map_err(usage)?;
            let config: Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))
                .map_err(usage)?;
            Some(config["vocab_size"].as_u64().ok_or_else(|| {
                usage(anyhow!(
                    "{} has no vocab_size: pass --vocab-size",
                    path.display()
                ))
            })?)
        }
        (None, None) => None,
    };
    let expect = dataset::RowExpectations {
        block_size: opts.block_size,
        vocab_size,
    };
    let d = dataset::check(&opts.dir, expect);
    let mut unreadable = d.unreadable;
    let mut problems = d.names;
    let mut structure = d.structure;
    let mut manifest_detail = None;
    let mut hashed = HashMap::new();
    if let Some(records) = manifest {
        let m = manifest_check::check(records, &opts.dir, &[], &HashSet::new(), opts.progress);
        unreadable |= m.unreadable;
        manifest_detail = Some(m.detail(records.len()));
        problems.extend(m.problems);
        hashed = m.hashed;
        for (name, rows) in d.data_files.iter().zip(&d.rows) {
            let listed = records
                .iter()
                .find(|r| &r.path == name)
                .and_then(|r| r.extra.get("rows"))
                .and_then(Value::as_u64);
            if let Some(listed) = listed.filter(|l| l != rows) {
                structure.push(Problem::file(
                    Check::Structure,
                    name,
                    format!("{rows} rows, the manifest says {listed}"),
                ));
            }
        }
    }
    problems.extend(structure);
    if let Some(target) = &opts.record {
        let rows: HashMap<&String, u64> = d.data_files.iter().zip(d.rows.iter().copied()).collect();
        let describe = |r: ManifestRecord| match rows.get(&r.path) {
            Some(&n) => r.with_kind(DATASET_KIND).with_extra("rows", n),
            None => r.with_kind(DATASET_KIND),
        };
        unreadable |= record_dir(opts, target, &opts.dir, &opts.dir, &mut hashed, &describe)?;
    }

    let total_rows: u64 = d.rows.iter().sum();
    let checks = vec![
        CheckResult::ran(
            Check::Names,
            &problems,
            format!(
                "{} of {} data files listed in state.json present",
                d.present,
                d.data_files.len()
            ),
        ),
        CheckResult::ran(
            Check::Structure,
            &problems,
            format!(
                "{total_rows} rows of {} tokens read, ids {} (vocabulary {})",
                d.block.map_or("?".to_string(), |b| b.to_string()),
                d.max_id
                    .map_or("none".to_string(), |m| format!("up to {m}")),
                vocab_size.map_or("not given: --vocab-size or --config".to_string(), |v| v
                    .to_string())
            ),
        ),
        match manifest_detail {
            Some(detail) => CheckResult::ran(Check::Manifest, &problems, detail),
            None => CheckResult::skipped(Check::Manifest, "no --manifest"),
        },
    ];
    Ok(Report {
        dir: opts.dir.display().to_string(),
        mode: Mode::Dataset,
        layout: None,
        tp: 0,
        pp: 0,
        dtype: None,
        files: Vec::new(),
        checks,
        problems,
        warnings: Vec::new(),
        unreadable,
    })
}

/// Files `--record` leaves out: the record itself, the manifest being checked, and partial
/// outputs of interrupted writes.
fn record_skip(record: &Path, manifest: Option<&Path>) -> impl Fn(&Path) -> bool {
    // The record may not exist yet: compare canonical parent directories and names.
    let canon = |p: &Path| -> Option<PathBuf> {
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some(std::fs::canonicalize(parent).ok()?.join(p.file_name()?))
    };
    let skip: Vec<PathBuf> = [Some(record), manifest]
        .into_iter()
        .flatten()
        .filter_map(canon)
        .collect();
    move |p: &Path| {
        let partial = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.') && n.contains(".partial-"));
        partial || canon(p).is_some_and(|c| skip.contains(&c))
    }
}

/// Writes the `--record` manifest of every file under `walk` (paths relative to `base`), leaving
/// out the record itself, the manifest being checked and partial outputs. Returns true if some
/// file could not be read.
fn record_dir(
    opts: &VerifyOptions,
    target: &Path,
    walk: &Path,
    base: &Path,
    hashed: &mut HashMap<String, Hashed>,
    describe: Describe<'_>,
) -> Result<bool, ToolError> {
    let skip = record_skip(target, opts.manifest.as_deref());
    let files = walk_files(walk, &|p: &Path| skip(p))
        .with_context(|| format!("listing {}", walk.display()))
        .map_err(usage)?;
    let files: Vec<(String, PathBuf)> = files.into_iter().map(|f| (rel_of(base, &f), f)).collect();
    write_record(target, &files, hashed, describe, opts.progress)
}

/// Adds what is known about a file (`kind`, extra fields) to its record.
type Describe<'a> = &'a dyn Fn(ManifestRecord) -> ManifestRecord;

/// Writes the `--record` manifest of `files` (relative path, path), hashing those not in
/// `hashed` yet, each record passed through `describe`. Returns true if some file could not be
/// read.
fn write_record(
    target: &Path,
    files: &[(String, PathBuf)],
    hashed: &mut HashMap<String, Hashed>,
    describe: Describe<'_>,
    progress: bool,
) -> Result<bool, ToolError> {
    let todo: Vec<(String, PathBuf)> = files
        .iter()
        .filter(|(r, _)| !hashed.contains_key(r))
        .cloned()
        .collect();
    let mut unreadable = false;
    for ((rel, path), r) in todo.iter().zip(hash_files(&todo, progress)) {
        match r {
            Ok(h) => {
                hashed.insert(rel.clone(), h);
            }
            Err(f) => {
                unreadable = true;
                eprintln!(
                    "shard-verify: --record leaves out {}: {}",
                    path.display(),
                    f.message
                );
            }
        }
    }
    let records: Vec<ManifestRecord> = files
        .iter()
        .filter_map(|(rel, _)| {
            let h = hashed.get(rel)?;
            Some(describe(ManifestRecord::new(
                rel.clone(),
                h.bytes,
                h.sha256.clone(),
            )))
        })
        .collect();
    ManifestTarget::from_arg(Some(target.to_path_buf()))
        .write(target, &records)
        .with_context(|| format!("writing the record {}", target.display()))
        .map_err(ToolError::io)?;
    Ok(unreadable)
}

/// Any directory against a manifest (a Hub download, a dataset): every record's size and
/// SHA-256; files the manifest does not list are warnings.
fn verify_manifest_only(
    opts: &VerifyOptions,
    records: &[ManifestRecord],
) -> Result<Report, ToolError> {
    let m = manifest_check::check(records, &opts.dir, &[], &HashSet::new(), opts.progress);
    let mut unreadable = m.unreadable;
    let detail = m.detail(records.len());
    let mut hashed = m.hashed;
    let skip_record = opts
        .record
        .as_deref()
        .map(|r| record_skip(r, opts.manifest.as_deref()));
    let manifest_canon = opts
        .manifest
        .as_deref()
        .and_then(|p| std::fs::canonicalize(p).ok());
    let skip = |p: &Path| {
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        hidden
            || skip_record.as_ref().is_some_and(|s| s(p))
            || manifest_canon
                .as_ref()
                .is_some_and(|c| std::fs::canonicalize(p).ok().as_ref() == Some(c))
    };
    let files = walk_files(&opts.dir, &skip)
        .with_context(|| format!("listing {}", opts.dir.display()))
        .map_err(usage)?;
    let files: Vec<(String, PathBuf)> = files
        .into_iter()
        .map(|f| (rel_of(&opts.dir, &f), f))
        .collect();
    let listed: HashSet<&str> = records.iter().map(|r| r.path.as_str()).collect();
    let warnings: Vec<Problem> = files
        .iter()
        .filter(|(r, _)| !listed.contains(r.as_str()))
        .map(|(r, _)| Problem::file(Check::Manifest, r, "not in the manifest"))
        .collect();
    if let Some(target) = &opts.record {
        unreadable |= write_record(target, &files, &mut hashed, &|r| r, opts.progress)?;
    }
    Ok(Report {
        dir: opts.dir.display().to_string(),
        mode: Mode::Manifest,
        layout: None,
        tp: 0,
        pp: 0,
        dtype: None,
        files: Vec::new(),
        checks: vec![CheckResult::ran(Check::Manifest, &m.problems, detail)],
        problems: m.problems,
        warnings,
        unreadable,
    })
}
