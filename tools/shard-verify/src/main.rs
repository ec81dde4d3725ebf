//! `shard-verify`: prove that an NxD TP x PP shard set (or any directory with a manifest) is
//! complete and correct.
//!
//! Argument parsing and output only; the checks are in the `shard-verify-core` library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::Parser;
use nxd_cli::LayoutArgs;
use shard_verify_core::{verify, VerifyOptions};
use suite_support::exit::{run_tool, ToolError, EXIT_CODES_HELP};

const AFTER_HELP: &str = "\
DIR is the output directory holding model/ (as nx-shard and NxD's convert_checkpoints.py write
it), model/ itself, or an NxD training checkpoint tag directory. The layout flags are nx-shard's
(NxD's spellings are accepted too); config.json is looked for in DIR when --config is absent.

Checks, fastest first, every problem reported with the file (and tensor) it concerns:
  names       exactly the expected dp_rank_00_tp_rank_XX_pp_rank_YY.pt files (and .pt.tensors/
              directories with --xser): missing, stray, misnamed, duplicate files
  structure   header-only (no tensor data read): each archive parses and holds the keys, dtypes,
              shapes and strides the layout puts on its rank, in order
  manifest    with --manifest: size and sha256 of every file, hashed in parallel
  cross-rank  unless --fast: norms identical on every tp rank, kv-head replicas identical across
              the ranks that hold the same head, vocabulary rows covered exactly once
A Hugging Face datasets directory (state.json, as tok-pack writes it) is checked as a dataset:
  names       exactly the .arrow files state.json lists (missing, stray)
  structure   dataset_info.json's features against every file's schema; every row: the block
              length (--block-size, else the first row's), token ids below the vocabulary
              (--vocab-size, or vocab_size of --config), attention_mask all ones, labels equal
              to input_ids; truncated or corrupt files
  manifest    with --manifest (tok-pack's): sizes, sha256 and row counts
A directory without shard files is checked against --manifest alone (e.g. a Hub download).
Several manifests (nx-shard --world N writes one per rank): cat them into --manifest -.

Grid marks: . ok  M missing  U unreadable  S structure  H size/sha256  X cross-rank replicas

Examples:
  shard-verify nxd --tp 8 --pp 4 --config Llama-3-8B/config.json
  shard-verify nxd --tp 32 --pp 8 --kv-size-multiplier 4 --qkv-linear --fuse-qkv \\
      --config config.json --manifest nxd/nx-shard.manifest.jsonl
  shard-verify ckpt/step_1000 --tp_size 32 --pp_size 8 --load_xser 1 --config config.json --fast
  shard-verify Llama-3-8B --manifest Llama-3-8B.manifest.jsonl
  shard-verify wiki_8k --block-size 8192 --config Llama-3-8B/config.json --manifest wiki_8k.manifest.jsonl
";

/// Prove that an NxD TP x PP shard set, or any directory with a manifest, is complete and
/// correct.
#[derive(Debug, Parser)]
#[command(name = "shard-verify", version, after_help = format!("{AFTER_HELP}\n{EXIT_CODES_HELP}"))]
struct Args {
    /// The shard set: output directory holding model/, model/ itself, or a training checkpoint
    /// tag directory (or any directory, with --manifest).
    #[arg(value_name = "DIR")]
    dir: PathBuf,

    #[command(flatten)]
    layout: LayoutArgs,

    /// Model config.json [default: DIR/config.json].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Check sizes and sha256 against this manifest (- for stdin); paths in it are relative to
    /// the directory holding model/.
    #[arg(long, value_name = "FILE|-")]
    manifest: Option<PathBuf>,

    /// Write a manifest of the files that are there (- for stdout).
    #[arg(long, value_name = "FILE|-")]
    record: Option<PathBuf>,

    /// Skip the cross-rank checks (they read the replicated tensors and kv heads).
    #[arg(long)]
    fast: bool,

    /// For a dataset: the length every row must have [default: the first row's].
    #[arg(long, value_name = "N")]
    block_size: Option<usize>,

    /// For a dataset: token ids must be below N [default: vocab_size of --config].
    #[arg(long, value_name = "N")]
    vocab_size: Option<u64>,

    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,

    /// Worker threads [default: all cores].
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,

    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn main() -> ExitCode {
    suite_support::generate::handle_generate::<Args>();
    let a = Args::parse();
    run_tool("shard-verify", || -> Result<(), ToolError> {
        let to_stdout = |p: &Option<PathBuf>| p.as_ref().is_some_and(|p| p.as_os_str() == "-");
        if a.json && to_stdout(&a.record) {
            return Err(ToolError::usage(anyhow!(
                "--record - and --json both write to stdout: give --record a file"
            )));
        }
        let opts = VerifyOptions {
            dir: a.dir,
            config: a.config,
            parallel: a.layout.parallel(),
            xser: a.layout.xser,
            manifest: a.manifest,
            record: a.record.clone(),
            fast: a.fast,
            block_size: a.block_size,
            vocab_size: a.vocab_size,
            jobs: a.jobs,
            progress: !a.quiet,
        };
        let report = verify(&opts)?;
        if a.json {
            println!("{}", report.to_json());
        } else if to_stdout(&a.record) {
            eprint!("{}", report.human());
        } else {
            print!("{}", report.human());
        }
        match report.exit_code() {
            0 => Ok(()),
            code if report.unreadable => Err(ToolError::new(
                code,
                anyhow!(
                    "some input could not be read, so the verification is incomplete ({} problems \
                     found)",
                    report.problems.len()
                ),
            )),
            code => Err(ToolError::new(
                code,
                anyhow!(
                    "{} problems found in {}",
                    report.problems.len(),
                    opts.dir.display()
                ),
            )),
        }
    })
}
