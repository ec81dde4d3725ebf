//! `nx-shard`: Hugging Face Llama checkpoint -> NxD TP x PP shard files.
//!
//! Argument parsing only; the work is done by the `nxd-shard` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser};
use nxd_cli::{parse_dtype, parse_flag, DtypeChoice, LayoutArgs};
use nxd_shard::{merge_manifests, run, ManifestTarget, ShardOptions};
use suite_support::exit::{run_tool, ToolError, EXIT_CODES_HELP};

const AFTER_HELP: &str = "\
Output: <OUTPUT>/model/dp_rank_00_tp_rank_XX_pp_rank_YY.pt, one file per tp x pp rank, exactly
as NxD's convert_checkpoints.py --convert_from_full_state writes them, and a manifest (one JSON
line per file: path, bytes, sha256, tp, pp, tensors), written last.

Finished outputs are kept: every file is written under a temporary name and renamed when
complete, and a file that already exists is skipped (unless --force), so rerunning an
interrupted conversion resumes it. Configurations NxD crashes on or silently gets wrong are
refused (exit 2) with the settings that work.

Examples:
  nx-shard --input Llama-3-8B --output nxd --tp 8 --pp 4
  nx-shard --input Llama-3-8B --output nxd --tp 32 --qkv-linear --kv-size-multiplier 4
  nx-shard --input_dir Llama-3-8B --output_dir nxd --tp_size 8 --pp_size 4 --save_xser 1
  nx-shard --config Llama-3-8B/config.json --tp 8 --pp 4 --dry-run
  srun -n 4 nx-shard --input Llama-3-70B --output nxd --tp 32 --pp 8   # 4 ranks share the files
  nx-shard --merge-manifests --output nxd   # after a split run: check every rank finished
";

/// Convert a Hugging Face Llama checkpoint into NxD (neuronx-distributed) TP x PP shards.
#[derive(Debug, Parser)]
#[command(name = "nx-shard", version, after_help = format!("{AFTER_HELP}\n{EXIT_CODES_HELP}"))]
struct Args {
    /// HF checkpoint: a directory (model.safetensors or an index with shards), a .safetensors
    /// file, or a full-state .pt. Optional only with --dry-run --config.
    #[arg(long, visible_alias = "input_dir", value_name = "PATH")]
    input: Option<PathBuf>,

    /// Output directory; the shards go to <OUTPUT>/model/.
    #[arg(long, visible_alias = "output_dir", value_name = "DIR")]
    output: Option<PathBuf>,

    #[command(flatten)]
    layout: LayoutArgs,

    /// xser layout: `converter` (what convert_checkpoints.py --save_xser writes: inline tensors plus an
    /// empty .pt.tensors/ dir) or `split` (NxD's training-checkpoint layout: TensorReferences,
    /// .pt.tensors/tensor_<i>.pt, .pt.info.pt). Implies --xser.
    #[arg(long, value_name = "converter|split", default_value = "converter",
          value_parser = ["converter", "split"])]
    xser_layout: String,

    /// Accepted for NxD compatibility and ignored (the input is always a full checkpoint).
    #[arg(long = "convert_from_full_state", alias = "convert-from-full-state", value_name = "BOOL",
          num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = parse_flag, action = ArgAction::Set, hide = true)]
    convert_from_full_state: bool,

    /// Model config.json [default: <input dir>/config.json].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Convert float tensors: keep, bf16 or fp32.
    #[arg(long, default_value = "keep", value_parser = parse_dtype, value_name = "keep|bf16|fp32")]
    dtype: DtypeChoice,

    /// Worker threads (files are written in parallel) [default: all cores].
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,

    /// This process's rank when the files are split over --world processes
    /// [default: from Slurm (array task or srun step), else 0].
    #[arg(long, value_name = "R")]
    rank: Option<usize>,

    /// Number of processes sharing the files [default: from Slurm, else 1].
    #[arg(long, value_name = "W")]
    world: Option<usize>,

    /// Print the plan (files, layers, tensors, bytes) and write nothing. With --config and no
    /// --input, plans a bf16 checkpoint of that config.
    #[arg(long)]
    dry_run: bool,

    /// Manifest file, or - for stdout [default: <OUTPUT>/nx-shard.manifest.jsonl; with
    /// --world > 1: <OUTPUT>/nx-shard.manifest.rank-R-of-W.jsonl].
    #[arg(long, value_name = "FILE|-")]
    manifest: Option<PathBuf>,

    /// Join the per-rank manifests of a split run in --output into nx-shard.manifest.jsonl,
    /// checking that every rank finished (the last rank to finish does this by itself).
    #[arg(long, requires = "output")]
    merge_manifests: bool,

    /// Rewrite files that already exist (by default they are kept and skipped).
    #[arg(long)]
    force: bool,

    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn options(a: Args) -> ShardOptions {
    let _ = a.convert_from_full_state;
    let manifest = ManifestTarget::from_arg(a.manifest);
    ShardOptions {
        input: a.input,
        output: a.output,
        config: a.config,
        parallel: a.layout.parallel(),
        dtype: a.dtype.0,
        jobs: a.jobs,
        rank: a.rank,
        world: a.world,
        dry_run: a.dry_run,
        manifest,
        force: a.force,
        xser: a.layout.xser || a.xser_layout == "split",
        xser_split: a.xser_layout == "split",
        progress: !a.quiet,
    }
}

fn main() -> ExitCode {
    suite_support::generate::handle_generate::<Args>();
    let args = Args::parse();
    run_tool("nx-shard", || -> Result<(), ToolError> {
        if args.merge_manifests {
            let output = args.output.as_deref().expect("clap requires --output");
            let n = merge_manifests(output)?;
            eprintln!("nx-shard: joined the rank manifests: {n} files in nx-shard.manifest.jsonl");
            return Ok(());
        }
        let outcome = run(&options(args))?;
        if !outcome.written.is_empty() || !outcome.skipped.is_empty() {
            eprintln!(
                "nx-shard: wrote {} files, kept {} existing",
                outcome.written.len(),
                outcome.skipped.len()
            );
        }
        Ok(())
    })
}
