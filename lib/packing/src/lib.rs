//! Tokenize a text corpus and pack the tokens into fixed-length rows, written as the Hugging Face
//! `datasets` directory NxD's `examples/training/llama/get_dataset.py` saves.
//!
//! * [`input`]: reading documents (JSON lines, plain text, CSV, each maybe gzip or zstd
//!   compressed; Parquet; Arrow streams and `datasets` directories) in order, in batches.
//! * [`tok`]: loading a `tokenizer.json` as `transformers` uses it, and encoding.
//! * [`Packer`]: grouping token ids into rows ([`Mode::CompatNxd`] or [`Mode::Concat`]).
//! * [`hfds`]: writing the `save_to_disk` directory (Arrow IPC stream shards, `state.json`,
//!   `dataset_info.json`).
//! * [`run`]: the whole `tok-pack` pipeline.

pub mod hfds;
pub mod input;
pub mod ipc_stream;
pub mod provenance;
pub mod tok;

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use provenance::{RawTable, Source};
use sha2::{Digest, Sha256};
use suite_support::atomic::AtomicDir;
use suite_support::exit::ToolError;
use suite_support::manifest::{write_manifest_file, write_manifest_stdout, ManifestRecord};
use suite_support::progress::Progress;
use suite_support::worksplit::WorkSlice;

pub use input::{DocReader, InputFormat};
pub use tok::EncoderKind;

/// Documents per tokenizer batch: `Dataset.map(batched=True)`'s default `batch_size`, which is
/// also the unit whose remainder NxD's `group_texts` drops.
pub const DOCS_PER_BATCH: usize = 1000;

/// How token ids become rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Exactly NxD's `get_dataset.py`: each batch of [`DOCS_PER_BATCH`] documents is grouped on
    /// its own and its remainder dropped; no EOS is added.
    CompatNxd,
    /// Documents are concatenated across batches (only the final remainder is dropped), with
    /// `eos` (if any) between documents.
    Concat {
        /// The token put between documents.
        eos: Option<u32>,
    },
}

/// Groups documents' token ids into rows of `block` tokens, spooled as little-endian i32.
pub struct Packer<W: Write> {
    mode: Mode,
    block: usize,
    pending: Vec<u32>,
    out: W,
    hasher: Sha256,
    /// Documents seen.
    pub docs: u64,
    /// Tokens the tokenizer produced (EOS separators not included).
    pub tokens: u64,
    /// EOS separators inserted.
    pub separators: u64,
    /// Rows written.
    pub rows: u64,
    /// Tokens dropped so far (batch remainders in compat mode).
    pub dropped: u64,
    buf: Vec<u8>,
}

impl<W: Write> Packer<W> {
    /// A packer of rows of `block` tokens (`block` > 0) into `out`.
    pub fn new(mode: Mode, block: usize, out: W) -> Self {
        assert!(block > 0, "block size must be positive");
        let mut hasher = Sha256::new();
        hasher.update(format!("tok-pack {mode:?} {block}\n").as_bytes());
        Packer {
            mode,
            block,
            pending: Vec::new(),
            out,
            hasher,
            docs: 0,
            tokens: 0,
            separators: 0,
            rows: 0,
            dropped: 0,
            buf: Vec::new(),
        }
    }

    /// Adds one batch of documents' ids, in order.
    pub fn push_batch(&mut self, docs: &[Vec<u32>]) -> Result<()> {
        for ids in docs {
            if let Mode::Concat { eos: Some(eos) } = self.mode {
                if self.docs > 0 {
                    self.pending.push(eos);
                    self.separators += 1;
                }
            }
            self.pending.extend_from_slice(ids);
            self.docs += 1;
            self.tokens += ids.len() as u64;
        }
        let full = self.pending.len() / self.block * self.block;
        self.emit(full)?;
        match self.mode {
            Mode::CompatNxd => {
                self.dropped += (self.pending.len() - full) as u64;
                self.pending.clear();
            }
            Mode::Concat { .. } => {
                self.pending.drain(..full);
            }
        }
        Ok(())
    }

    fn emit(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.buf.clear();
        self.buf.reserve(n * 4);
        for &id in &self.pending[..n] {
            let id = i32::try_from(id).map_err(|_| anyhow!("token id {id} exceeds int32"))?;
            self.buf.extend_from_slice(&id.to_le_bytes());
        }
        self.hasher.update(&self.buf);
        self.out
            .write_all(&self.buf)
            .context("writing the token spool")?;
        self.rows += (n / self.block) as u64;
        Ok(())
    }

    /// Ends the input: drops the final remainder and returns the writer and the 16-hex-digit
    /// fingerprint of the rows.
    pub fn finish(mut self) -> (W, String) {
        self.dropped += self.pending.len() as u64;
        self.pending.clear();
        let digest = self.hasher.finalize();
        (self.out, hex::encode(&digest[..8]))
    }
}

/// Where the manifest goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestTarget {
    /// No manifest.
    None,
    /// Standard output.
    Stdout,
    /// A file (written atomically).
    File(PathBuf),
}

/// Everything `tok-pack` needs.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// A `tokenizer.json`, or a directory with one (and maybe `tokenizer_config.json`).
    pub tokenizer: PathBuf,
    /// Input files or directories (read in this order; a directory's files in name order).
    pub inputs: Vec<PathBuf>,
    /// The dataset directory to create (must not exist).
    pub output: PathBuf,
    /// Tokens per row.
    pub block_size: usize,
    /// Reproduce NxD's `get_dataset.py` exactly.
    pub compat_nxd: bool,
    /// The column holding the text (JSON lines, CSV, Parquet).
    pub text_column: String,
    /// The input format; `None`: from each file's extension.
    pub format: Option<InputFormat>,
    /// Default mode: put the tokenizer's EOS between documents.
    pub eos: bool,
    /// `save_to_disk`'s `max_shard_size` in bytes (`None`: [`hfds::DEFAULT_MAX_SHARD_SIZE`], or
    /// with `merge` the value the ranks were given).
    pub max_shard_size: Option<u64>,
    /// Worker threads (`None`: all cores).
    pub jobs: Option<usize>,
    /// The encoder.
    pub encoder: tok::EncoderKind,
    /// No progress bar and no report.
    pub quiet: bool,
    /// Where the manifest goes.
    pub manifest: ManifestTarget,
    /// This process's share of the 1000-document batches (`--rank/--world`); with `world` > 1
    /// a partial result is written to [`partial_dir`] for [`PackOptions::merge`] to join.
    pub slice: WorkSlice,
    /// Partial results to join into `output` (`--merge`); the input options are then unused.
    pub merge: Vec<PathBuf>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Documents read.
    pub docs: u64,
    /// Tokens produced by the tokenizer.
    pub tokens: u64,
    /// EOS separators inserted (default mode).
    pub separators: u64,
    /// Rows written.
    pub rows: u64,
    /// Tokens per row.
    pub block: usize,
    /// Tokens not written (remainders).
    pub dropped: u64,
    /// Shard files written.
    pub shards: usize,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// The input files: each file as given; a `datasets` `save_to_disk` directory's data files in
/// row order; any other directory's files with a known extension (or all of them with an
/// explicit `format`), in name order; a glob pattern's (`*`, `?`, `[...]`, `{a,b}`, `**`)
/// matching files with a known extension, in path order.
pub fn expand_inputs(
    inputs: &[PathBuf],
    format: Option<InputFormat>,
) -> Result<Vec<(PathBuf, InputFormat)>> {
    let mut files = Vec::new();
    let pick = |p: &Path, explicit: bool| -> Result<Option<InputFormat>> {
        match format.or_else(|| InputFormat::from_path(p)) {
            Some(f) => Ok(Some(f)),
            None if explicit => Err(anyhow!(
                "{}: unknown input format (expected .jsonl, .json, .txt, .csv, maybe with .gz or .zst, .parquet or .arrow); give --format",
                p.display()
            )),
            None => Ok(None),
        }
    };
    for input in inputs {
        if !input.exists() && is_glob(input) {
            let matches = glob_files(input)?;
            if matches.is_empty() {
                return Err(anyhow!("input {}: no files match", input.display()));
            }
            for p in matches {
                if let Some(f) = pick(&p, false)? {
                    files.push((p, f));
                }
            }
            continue;
        }
        let meta =
            std::fs::metadata(input).with_context(|| format!("input {}", input.display()))?;
        if meta.is_dir() && input.join("state.json").is_file() {
            // A datasets save_to_disk directory: its data files, in row order.
            let state_path = input.join("state.json");
            let state: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&state_path)
                    .with_context(|| format!("reading {}", state_path.display()))?,
            )
            .with_context(|| format!("parsing {}", state_path.display()))?;
            let data_files = state["_data_files"]
                .as_array()
                .ok_or_else(|| anyhow!("{}: no _data_files list", state_path.display()))?;
            for f in data_files {
                let name = f["filename"].as_str().ok_or_else(|| {
                    anyhow!(
                        "{}: a _data_files entry has no filename",
                        state_path.display()
                    )
                })?;
                files.push((input.join(name), InputFormat::Arrow));
            }
        } else if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("listing {}", input.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            entries.sort();
            for p in entries {
                if let Some(f) = pick(&p, false)? {
                    files.push((p, f));
                }
            }
        } else if let Some(f) = pick(input, true)? {
            files.push((input.clone(), f));
        }
    }
    Ok(files)
}

fn is_glob(path: &Path) -> bool {
    path.to_string_lossy().contains(['*', '?', '[', '{'])
}

/// The files matching the glob `pattern` (`*` stays within a path component, `**` crosses
/// them), sorted. The walk starts at the pattern's longest literal leading directory.
fn glob_files(pattern: &Path) -> Result<Vec<PathBuf>> {
    let matcher = globset::GlobBuilder::new(&pattern.to_string_lossy())
        .literal_separator(true)
        .build()
        .with_context(|| format!("input {}: not a valid glob", pattern.display()))?
        .compile_matcher();
    let base: PathBuf = pattern
        .components()
        .take_while(|c| !is_glob(Path::new(c.as_os_str())))
        .collect();
    let root = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base.clone()
    };
    let mut matches = Vec::new();
    for entry in walkdir::WalkDir::new(&root).follow_links(true) {
        let entry = entry.with_context(|| format!("listing {}", root.display()))?;
        // Paths relative to "." are matched without the "./" a bare pattern lacks.
        let path = if base.as_os_str().is_empty() {
            entry.path().strip_prefix(".").unwrap_or(entry.path())
        } else {
            entry.path()
        };
        if entry.file_type().is_file() && matcher.is_match(path) {
            matches.push(path.to_path_buf());
        }
    }
    matches.sort();
    Ok(matches)
}

/// The directory rank `slice.rank` of `slice.world` writes its partial result to:
/// `<output>.rank-RRRRR-of-WWWWW`.
pub fn partial_dir(output: &Path, slice: WorkSlice) -> PathBuf {
    let mut name = output.as_os_str().to_os_string();
    name.push(format!(".rank-{:05}-of-{:05}", slice.rank, slice.world));
    PathBuf::from(name)
}

const PARTIAL_META: &str = "tok-pack-partial.json";
const PARTIAL_TOKENS: &str = "tokens.u32";
const PARTIAL_DOCS: &str = "doc-lengths.u32";

/// Runs `tok-pack`: the whole pipeline, one rank's partial result, or a merge of partials.
pub fn run(opts: &PackOptions) -> Result<Summary, ToolError> {
    let started = Instant::now();
    if !opts.merge.is_empty() {
        return run_merge(opts, started);
    }
    if opts.block_size == 0 {
        return Err(ToolError::usage(anyhow!("--block-size must be at least 1")));
    }
    if opts.inputs.is_empty() {
        return Err(ToolError::usage(anyhow!("no --input given")));
    }
    let partial = opts.slice.world > 1;
    let target = if partial {
        partial_dir(&opts.output, opts.slice)
    } else {
        opts.output.clone()
    };
    check_output_free(&target)?;
    let files = expand_inputs(&opts.inputs, opts.format).map_err(ToolError::usage)?;
    if files.is_empty() {
        return Err(ToolError::usage(anyhow!("no input files found")));
    }
    let sizes = files
        .iter()
        .map(|(p, _)| {
            std::fs::metadata(p)
                .map(|m| m.len())
                .with_context(|| format!("input {}", p.display()))
        })
        .collect::<Result<Vec<u64>>>()
        .map_err(ToolError::usage)?;
    let inputs_meta: Vec<serde_json::Value> = files
        .iter()
        .zip(&sizes)
        .map(|((p, _), bytes)| serde_json::json!({"path": p.display().to_string(), "bytes": bytes}))
        .collect();
    let total_bytes: u64 = sizes.iter().sum();
    if let (Some(jobs), tok::EncoderKind::Fast) = (opts.jobs.filter(|&j| j > 0), opts.encoder) {
        tokenizers_rc::parallelism::set_num_threads(jobs);
    }
    let loaded = tok::load_tokenizer(&opts.tokenizer, opts.encoder).map_err(ToolError::usage)?;
    let mut block = opts.block_size;
    let mode = if opts.compat_nxd {
        // get_dataset.py: block_size = min(block_size, tokenizer.model_max_length)
        if let Some(max) = loaded.model_max_length {
            if max >= 1.0 && (max as usize) < block {
                block = max as usize;
            }
        }
        Mode::CompatNxd
    } else {
        Mode::Concat {
            eos: if opts.eos { loaded.eos_id } else { None },
        }
    };
    suite_support::jobs::init_thread_pool(opts.jobs);
    let dir = create_output(&target)?;
    let progress = Progress::new(total_bytes, "tokenizing", !opts.quiet);
    let slice = opts.slice;
    let owns = |batch: usize| !partial || slice.owns(batch);

    if partial {
        let mut sink = PartialSink::create(dir.path())?;
        let (total_docs, raw) = tokenize_batches(
            files.clone(),
            &opts.text_column,
            &loaded,
            &owns,
            &progress,
            &mut |ids| sink.push(ids),
        )?;
        progress.finish();
        if total_docs == 0 {
            return Err(no_documents());
        }
        let meta = serde_json::json!({
            "format": "tok-pack partial 1",
            "rank": slice.rank,
            "world": slice.world,
            "mode": mode_name(mode),
            "block": block,
            "eos": match mode { Mode::Concat { eos } => eos, Mode::CompatNxd => None },
            "total_docs": total_docs,
            "inputs": inputs_meta,
            "batch_docs": sink.batch_docs,
            "max_shard_size": opts.max_shard_size,
            "source": source_of(&files, &sizes, raw)?,
        });
        let (docs, tokens) = sink.finish()?;
        write_file(
            &dir.path().join(PARTIAL_META),
            serde_json::to_string_pretty(&meta)
                .map_err(ToolError::data)?
                .as_bytes(),
        )?;
        dir.commit()
            .with_context(|| format!("publishing {}", target.display()))
            .map_err(ToolError::io)?;
        return Ok(Summary {
            docs,
            tokens,
            separators: 0,
            rows: 0,
            block,
            dropped: 0,
            shards: 0,
            seconds: started.elapsed().as_secs_f64(),
        });
    }

    let spool = create_spool(dir.path())?;
    let mut packer = Packer::new(mode, block, BufWriter::with_capacity(8 << 20, &spool));
    let (_, raw) = tokenize_batches(
        files.clone(),
        &opts.text_column,
        &loaded,
        &owns,
        &progress,
        &mut |ids| packer.push_batch(ids).map_err(ToolError::io),
    )?;
    progress.finish();
    if packer.docs == 0 {
        return Err(no_documents());
    }
    let max_shard_size = opts.max_shard_size.unwrap_or(hfds::DEFAULT_MAX_SHARD_SIZE);
    let source = source_of(&files, &sizes, raw)?;
    finish_output(opts, dir, &spool, packer, max_shard_size, &source, started)
}

/// The corpus description for `dataset_info.json`.
fn source_of(
    files: &[(PathBuf, InputFormat)],
    sizes: &[u64],
    raw: RawTable,
) -> Result<Source, ToolError> {
    Source::new(files, sizes, raw)
        .context("resolving the input files' absolute paths")
        .map_err(ToolError::io)
}

fn no_documents() -> ToolError {
    ToolError::usage(anyhow!("the input holds no documents; nothing to write"))
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::CompatNxd => "compat-nxd",
        Mode::Concat { .. } => "concat",
    }
}

fn check_output_free(path: &Path) -> Result<(), ToolError> {
    if output_taken(path) {
        return Err(ToolError::usage(anyhow!(
            "output {} already exists; remove it or choose another --output",
            path.display()
        )));
    }
    Ok(())
}

fn create_output(path: &Path) -> Result<AtomicDir, ToolError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))
            .map_err(ToolError::io)?;
    }
    AtomicDir::create(path)
        .with_context(|| format!("creating {}", path.display()))
        .map_err(ToolError::io)
}

const SPOOL: &str = ".tok-pack.spool";

fn create_spool(dir: &Path) -> Result<File, ToolError> {
    let path = dir.join(SPOOL);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))
        .map_err(ToolError::io)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ToolError> {
    suite_support::atomic::atomic_write(path, bytes)
        .with_context(|| format!("writing {}", path.display()))
        .map_err(ToolError::io)
}

/// Writes the dataset from the packer's spool in shards of at most `max_shard_size`, publishes the
/// directory and the manifest.
fn finish_output(
    opts: &PackOptions,
    dir: AtomicDir,
    spool: &File,
    packer: Packer<BufWriter<&File>>,
    max_shard_size: u64,
    source: &Source,
    started: Instant,
) -> Result<Summary, ToolError> {
    let (docs, tokens, separators, rows, block) = (
        packer.docs,
        packer.tokens,
        packer.separators,
        packer.rows,
        packer.block,
    );
    let dropped = packer.dropped + packer.pending.len() as u64;
    let (mut out, fingerprint) = packer.finish();
    out.flush()
        .context("writing the token spool")
        .map_err(ToolError::io)?;
    drop(out);
    let (info, without_source) = source.dataset_info(hfds::features_json());
    if let (Some(why), false) = (without_source, opts.quiet) {
        eprintln!("tok-pack: dataset_info.json describes only the features: {why}");
    }
    let records = hfds::write_dataset(
        dir.path(),
        spool,
        rows,
        block,
        max_shard_size,
        &fingerprint,
        &info,
    )
    .map_err(ToolError::classify)?;
    let spool_path = dir.path().join(SPOOL);
    std::fs::remove_file(&spool_path)
        .with_context(|| format!("removing {}", spool_path.display()))
        .map_err(ToolError::io)?;
    dir.commit()
        .with_context(|| format!("publishing {}", opts.output.display()))
        .map_err(ToolError::io)?;
    write_manifest_to(&opts.manifest, &records)?;
    Ok(Summary {
        docs,
        tokens,
        separators,
        rows,
        block,
        dropped,
        shards: records.len() - 2,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A rank's partial result being written: every owned batch's token ids and document lengths.
struct PartialSink {
    tokens: BufWriter<File>,
    docs: BufWriter<File>,
    batch_docs: Vec<usize>,
    n_docs: u64,
    n_tokens: u64,
}

impl PartialSink {
    fn create(dir: &Path) -> Result<Self, ToolError> {
        let open = |name: &str| {
            let path = dir.join(name);
            File::create(&path)
                .with_context(|| format!("creating {}", path.display()))
                .map_err(ToolError::io)
                .map(|f| BufWriter::with_capacity(4 << 20, f))
        };
        Ok(PartialSink {
            tokens: open(PARTIAL_TOKENS)?,
            docs: open(PARTIAL_DOCS)?,
            batch_docs: Vec::new(),
            n_docs: 0,
            n_tokens: 0,
        })
    }

    fn push(&mut self, ids: &[Vec<u32>]) -> Result<(), ToolError> {
        let io = |e: std::io::Error| {
            ToolError::io(anyhow::Error::new(e).context("writing the partial result"))
        };
        for doc in ids {
            let len = u32::try_from(doc.len())
                .map_err(|_| ToolError::data(anyhow!("a document of more than 2^32 tokens")))?;
            self.docs.write_all(&len.to_le_bytes()).map_err(io)?;
            let mut buf = Vec::with_capacity(doc.len() * 4);
            for id in doc {
                buf.extend_from_slice(&id.to_le_bytes());
            }
            self.tokens.write_all(&buf).map_err(io)?;
            self.n_tokens += doc.len() as u64;
        }
        self.n_docs += ids.len() as u64;
        self.batch_docs.push(ids.len());
        Ok(())
    }

    fn finish(self) -> Result<(u64, u64), ToolError> {
        for mut w in [self.tokens, self.docs] {
            w.flush()
                .and_then(|()| w.get_ref().sync_all())
                .context("writing the partial result")
                .map_err(ToolError::io)?;
        }
        Ok((self.n_docs, self.n_tokens))
    }
}

/// One partial result opened for merging.
struct Partial {
    dir: PathBuf,
    meta: serde_json::Value,
    batch_docs: Vec<usize>,
    next_batch: usize,
    tokens: std::io::BufReader<File>,
    docs: std::io::BufReader<File>,
}

fn read_u32s(r: &mut impl std::io::Read, n: usize) -> std::io::Result<Vec<u32>> {
    let mut raw = vec![0u8; n * 4];
    r.read_exact(&mut raw)?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

impl Partial {
    fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join(PARTIAL_META);
        let text = std::fs::read_to_string(&meta_path).with_context(|| {
            format!(
                "{} is not a tok-pack partial result (no {PARTIAL_META})",
                dir.display()
            )
        })?;
        let meta: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", meta_path.display()))?;
        let batch_docs = meta["batch_docs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64().map(|n| n as usize))
                    .collect()
            })
            .ok_or_else(|| anyhow!("{}: no batch_docs", meta_path.display()))?;
        let open = |name: &str| -> Result<std::io::BufReader<File>> {
            let p = dir.join(name);
            Ok(std::io::BufReader::with_capacity(
                4 << 20,
                File::open(&p).with_context(|| format!("opening {}", p.display()))?,
            ))
        };
        Ok(Partial {
            dir: dir.to_path_buf(),
            batch_docs,
            next_batch: 0,
            tokens: open(PARTIAL_TOKENS)?,
            docs: open(PARTIAL_DOCS)?,
            meta,
        })
    }

    /// The next batch's documents' ids.
    fn next(&mut self) -> Result<Vec<Vec<u32>>> {
        let n = self.batch_docs[self.next_batch];
        self.next_batch += 1;
        let ctx = || format!("reading the partial result {}", self.dir.display());
        let lens = read_u32s(&mut self.docs, n).with_context(ctx)?;
        lens.iter()
            .map(|&len| read_u32s(&mut self.tokens, len as usize).with_context(ctx))
            .collect()
    }
}

/// Joins the partial results of every rank into the dataset a single process would write.
fn run_merge(opts: &PackOptions, started: Instant) -> Result<Summary, ToolError> {
    check_output_free(&opts.output)?;
    let mut parts: Vec<Partial> = opts
        .merge
        .iter()
        .map(|d| Partial::open(d))
        .collect::<Result<_>>()
        .map_err(ToolError::usage)?;
    parts.sort_by_key(|p| p.meta["rank"].as_u64());
    let world = parts[0].meta["world"].as_u64().unwrap_or(0) as usize;
    let ranks: Vec<Option<u64>> = parts.iter().map(|p| p.meta["rank"].as_u64()).collect();
    let expected: Vec<Option<u64>> = (0..world as u64).map(Some).collect();
    if ranks != expected {
        return Err(ToolError::usage(anyhow!(
            "--merge needs the partial results of ranks 0..{world} exactly once, got ranks {:?}",
            ranks
                .iter()
                .map(|r| r.map_or(-1, |r| r as i64))
                .collect::<Vec<_>>()
        )));
    }
    for key in [
        "world",
        "mode",
        "block",
        "eos",
        "total_docs",
        "inputs",
        "source",
    ] {
        if let Some(p) = parts.iter().find(|p| p.meta[key] != parts[0].meta[key]) {
            return Err(ToolError::usage(anyhow!(
                "{} and {} come from different runs ({key} differs)",
                parts[0].dir.display(),
                p.dir.display()
            )));
        }
    }
    let meta = parts[0].meta.clone();
    let block = meta["block"].as_u64().unwrap_or(0) as usize;
    if block == 0 {
        return Err(ToolError::usage(anyhow!(
            "{}: bad block size",
            parts[0].dir.display()
        )));
    }
    let mode = match meta["mode"].as_str() {
        Some("compat-nxd") => Mode::CompatNxd,
        Some("concat") => Mode::Concat {
            eos: meta["eos"].as_u64().map(|e| e as u32),
        },
        other => {
            return Err(ToolError::usage(anyhow!(
                "{}: unknown mode {other:?}",
                parts[0].dir.display()
            )))
        }
    };
    let total_batches: usize = parts.iter().map(|p| p.batch_docs.len()).sum();
    for (r, p) in parts.iter().enumerate() {
        let want = (total_batches + world - 1 - r) / world;
        if p.batch_docs.len() != want {
            return Err(ToolError::usage(anyhow!(
                "{}: {} batches, expected {want}: the partial results do not fit together",
                p.dir.display(),
                p.batch_docs.len()
            )));
        }
    }
    let dir = create_output(&opts.output)?;
    let spool = create_spool(dir.path())?;
    let mut packer = Packer::new(mode, block, BufWriter::with_capacity(8 << 20, &spool));
    for b in 0..total_batches {
        let ids = parts[b % world].next().map_err(ToolError::classify)?;
        packer.push_batch(&ids).map_err(ToolError::io)?;
    }
    // The ranks' --max-shard-size unless the merge is given one, so the merge writes what a single
    // process given the ranks' flags writes.
    let max_shard_size = opts
        .max_shard_size
        .or(meta["max_shard_size"].as_u64())
        .unwrap_or(hfds::DEFAULT_MAX_SHARD_SIZE);
    let source: Source = serde_json::from_value(meta["source"].clone())
        .with_context(|| format!("{}: no corpus description", parts[0].dir.display()))
        .map_err(ToolError::usage)?;
    finish_output(opts, dir, &spool, packer, max_shard_size, &source, started)
}

/// Takes each tokenized batch (one id list per document).
type BatchSink<'a> = dyn FnMut(&[Vec<u32>]) -> Result<(), ToolError> + 'a;

/// A batch of documents and the input bytes it took, or the reading error.
type ReadBatch = Result<(Vec<String>, u64)>;

/// Reads (on a thread of its own) every batch of [`DOCS_PER_BATCH`] documents, tokenizes those
/// `owns` accepts (by batch index) and gives their ids to `sink`, in order. Returns the number
/// of documents read and the raw table they came from.
fn tokenize_batches(
    files: Vec<(PathBuf, InputFormat)>,
    text_column: &str,
    tokenizer: &tok::LoadedTokenizer,
    owns: &dyn Fn(usize) -> bool,
    progress: &Progress,
    sink: &mut BatchSink<'_>,
) -> Result<(u64, RawTable), ToolError> {
    let (tx, rx) = mpsc::sync_channel::<ReadBatch>(2);
    let text_column = text_column.to_string();
    let reader = std::thread::spawn(move || {
        let mut reader = DocReader::new(files, &text_column);
        loop {
            let before = reader.bytes_read();
            let batch = reader.next_batch(DOCS_PER_BATCH);
            let done = match &batch {
                Ok(b) => b.is_empty(),
                Err(_) => true,
            };
            let bytes = reader.bytes_read() - before;
            if tx.send(batch.map(|b| (b, bytes))).is_err() || done {
                return reader.raw_table().clone();
            }
        }
    });
    let mut docs = 0u64;
    let mut tokens = 0u64;
    let started = std::time::Instant::now();
    let result = (|| -> Result<(), ToolError> {
        for (index, message) in rx.iter().enumerate() {
            let (batch, bytes) = message.map_err(ToolError::usage)?;
            if batch.is_empty() {
                break;
            }
            docs += batch.len() as u64;
            if owns(index) {
                let ids = tokenizer.encode_batch(batch).map_err(ToolError::data)?;
                tokens += ids.iter().map(|d| d.len() as u64).sum::<u64>();
                sink(&ids)?;
            }
            progress.set_message(|| {
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                format!(
                    "{} docs ({:.0}/s), {} tokens ({:.2}M/s)",
                    docs,
                    docs as f64 / secs,
                    tokens,
                    tokens as f64 / secs / 1e6
                )
            });
            progress.inc(bytes);
        }
        Ok(())
    })();
    drop(rx);
    let raw = reader.join();
    result?;
    let raw = raw.map_err(|_| ToolError::io(anyhow!("the input reader thread panicked")))?;
    Ok((docs, raw))
}

/// Whether something is at `path` that the output would replace (a file, or a non-empty
/// directory).
fn output_taken(path: &Path) -> bool {
    match std::fs::symlink_metadata(path) {
        Err(_) => false,
        Ok(m) if m.is_dir() => std::fs::read_dir(path).map_or(true, |mut d| d.next().is_some()),
        Ok(_) => true,
    }
}

fn write_manifest_to(target: &ManifestTarget, records: &[ManifestRecord]) -> Result<(), ToolError> {
    match target {
        ManifestTarget::None => Ok(()),
        ManifestTarget::Stdout => write_manifest_stdout(records)
            .context("writing the manifest to stdout")
            .map_err(ToolError::io),
        ManifestTarget::File(p) => write_manifest_file(p, records)
            .with_context(|| format!("writing the manifest {}", p.display()))
            .map_err(ToolError::io),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(spool: &[u8], block: usize) -> Vec<Vec<i32>> {
        spool
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<_>>()
            .chunks(block)
            .map(<[i32]>::to_vec)
            .collect()
    }

    #[test]
    fn globs_expand_to_known_files_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("a/deep")).unwrap();
        for name in [
            "b.jsonl",
            "a/x.jsonl",
            "a/deep/y.jsonl.gz",
            "a/notes.md",
            "c.txt",
        ] {
            std::fs::write(d.join(name), "{}").unwrap();
        }
        let names = |pattern: &str| -> Vec<String> {
            expand_inputs(&[d.join(pattern)], None)
                .unwrap()
                .into_iter()
                .map(|(p, _)| p.strip_prefix(d).unwrap().display().to_string())
                .collect()
        };
        assert_eq!(names("*.jsonl"), ["b.jsonl"]);
        assert_eq!(
            names("**/*.jsonl*"),
            ["a/deep/y.jsonl.gz", "a/x.jsonl", "b.jsonl"]
        );
        assert_eq!(names("a/*"), ["a/x.jsonl"]);
        assert_eq!(names("{b.jsonl,c.txt}"), ["b.jsonl", "c.txt"]);
        let err = expand_inputs(&[d.join("*.parquet")], None).unwrap_err();
        assert!(err.to_string().contains("no files match"), "{err}");
    }

    #[test]
    fn compat_drops_each_batch_remainder() {
        let mut p = Packer::new(Mode::CompatNxd, 3, Vec::new());
        p.push_batch(&[vec![1, 2], vec![3, 4, 5, 6]]).unwrap();
        p.push_batch(&[vec![7, 8]]).unwrap();
        p.push_batch(&[vec![9], vec![10, 11, 12]]).unwrap();
        assert_eq!((p.rows, p.dropped, p.docs, p.tokens), (3, 3, 5, 12));
        let (out, fp) = p.finish();
        assert_eq!(fp.len(), 16);
        assert_eq!(
            rows(&out, 3),
            vec![vec![1, 2, 3], vec![4, 5, 6], vec![9, 10, 11]]
        );
    }

    #[test]
    fn concat_carries_over_with_eos_between_documents() {
        let mut p = Packer::new(Mode::Concat { eos: Some(0) }, 3, Vec::new());
        p.push_batch(&[vec![1, 2], vec![3]]).unwrap();
        p.push_batch(&[vec![4, 5]]).unwrap();
        assert_eq!((p.rows, p.separators), (2, 2));
        let (out, _) = p.finish();
        assert_eq!(rows(&out, 3), vec![vec![1, 2, 0], vec![3, 0, 4]]);
    }
}
