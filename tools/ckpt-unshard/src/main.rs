//! `ckpt-unshard`: NxD TP x PP shard files (converter output or an NxD training checkpoint) ->
//! the Hugging Face Llama checkpoint.
//!
//! Argument parsing only; the work is done by the `nxd-unshard` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser, ValueEnum};
use nxd_cli::{parse_dtype, parse_flag, DtypeChoice, LayoutArgs};
use nxd_unshard::{
    run, ManifestTarget, OutputFormat, TagChoice, UnshardOptions, DEFAULT_MAX_SHARD_SIZE,
};
use suite_support::exit::{run_tool, ToolError, EXIT_CODES_HELP};
use suite_support::size::{format_size, parse_size};

const AFTER_HELP: &str = "\
Input: the directory nx-shard (or NxD's convert_checkpoints.py) wrote, i.e. the one holding
model/ or the dp_rank_00_tp_rank_XX_pp_rank_YY.pt files themselves (plain or --save_xser form);
or an NxD training checkpoint directory <ckpt>/<tag>/model/ (xser with TensorReferences,
tensor_<i>.pt and .info.pt). A training checkpoint's tag is --tag TAG, or --tag latest (the
default): the tag the `newest` file names, else the most recently completed one. A tag without
NxD's `done` marker (an interrupted save) is refused.

The layout flags must be the ones the shards were written with (NxD's spellings are accepted).
Every rank file is checked against them (file set, tensor names, shapes, dtypes) before anything
is written; --hw-backend cannot be checked from the files (trn1 and trn2 differ only in which q
heads a rank holds), so pass the right one.

Output (default): a Hugging Face checkpoint directory that transformers' from_pretrained loads:
model-0000X-of-0000N.safetensors (or model.safetensors when one shard is enough), split like
save_pretrained, model.safetensors.index.json, config.json (and generation_config.json when it
sits next to it), in state-dict order; a tied lm_head is omitted as HF does. --format pt writes
NxD's <OUTPUT>/checkpoint.pt instead (one torch.save dict). Either way a manifest (one JSON line
per file: path, bytes, sha256) goes to <OUTPUT>/ckpt-unshard.manifest.jsonl.

OUTPUT must not exist (or be empty): it is written as a hidden .OUTPUT.partial-* directory
beside it and renamed into place when complete, so a killed run leaves nothing under OUTPUT.

Examples:
  ckpt-unshard --input nxd --output Llama-3-8B-hf --config Llama-3-8B/config.json --tp 8 --pp 4
  ckpt-unshard --input ckpts --tag latest --output hf --config config.json --tp 32 --pp 8 \\
      --qkv-linear --kv-size-multiplier 4 --fuse-qkv --dtype bf16 --check-replicas
  ckpt-unshard --input_dir nxd/model --output_dir full --config config.json --tp_size 8 \\
      --qkv_linear 1 --load_xser 1 --convert_to_full_state --format pt
";

fn parse_max_shard_size(s: &str) -> Result<u64, String> {
    match parse_size(s) {
        Ok(0) => Err("the largest shard must be at least 1 byte".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// `--format`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// Hugging Face safetensors shards + index + config.json.
    Safetensors,
    /// NxD's checkpoint.pt (one torch.save dict).
    Pt,
}

/// Convert NxD (neuronx-distributed) TP x PP shards, or an NxD training checkpoint, back into a
/// Hugging Face Llama checkpoint.
#[derive(Debug, Parser)]
#[command(name = "ckpt-unshard", version, after_help = format!("{AFTER_HELP}\n{EXIT_CODES_HELP}"))]
struct Args {
    /// Shard directory (holding model/ or the dp_rank_*.pt files), or an NxD training checkpoint
    /// directory (holding <tag>/model/).
    #[arg(long, visible_alias = "input_dir", value_name = "DIR")]
    input: PathBuf,

    /// Output directory, created (it must not exist yet, or be empty).
    #[arg(long, visible_alias = "output_dir", value_name = "DIR")]
    output: PathBuf,

    /// The model's Hugging Face config.json [default: <INPUT>/config.json].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Training checkpoint tag to read, or `latest` [default: latest].
    #[arg(long, value_name = "TAG|latest")]
    tag: Option<String>,

    /// The layout the shards were written with (`--xser` is accepted and ignored: every shard form
    /// is detected).
    #[command(flatten)]
    layout: LayoutArgs,

    /// Accepted for NxD compatibility and ignored (this tool always converts to a full state).
    #[arg(long = "convert_to_full_state", alias = "convert-to-full-state", value_name = "BOOL",
          num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = parse_flag, action = ArgAction::Set, hide = true)]
    convert_to_full_state: bool,

    /// Output format.
    #[arg(long, value_enum, default_value = "safetensors")]
    format: Format,

    /// Largest safetensors shard (decimal units as save_pretrained: 5GB = 5e9 bytes; KiB..
    /// binary) [default: 5GB].
    #[arg(long, value_parser = parse_max_shard_size, value_name = "SIZE")]
    max_shard_size: Option<u64>,

    /// Convert float tensors: keep, bf16 or fp32.
    #[arg(long, default_value = "keep", value_parser = parse_dtype, value_name = "keep|bf16|fp32")]
    dtype: DtypeChoice,

    /// Before writing, prove that every replicated copy in the shards (kv heads repeated by the
    /// kv size multiplier, norms on every tp rank, a tied lm_head) is bit-identical to the copy
    /// the output is built from; exit 1 naming the first that differs.
    #[arg(long)]
    check_replicas: bool,

    /// Worker threads [default: all cores].
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,

    /// Manifest file, or - for stdout [default: <OUTPUT>/ckpt-unshard.manifest.jsonl].
    #[arg(long, value_name = "FILE|-")]
    manifest: Option<PathBuf>,

    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn options(a: Args) -> UnshardOptions {
    let _ = a.convert_to_full_state;
    let manifest = ManifestTarget::from_arg(a.manifest);
    UnshardOptions {
        input: a.input,
        output: a.output,
        config: a.config,
        tag: a.tag.as_deref().map(TagChoice::parse),
        parallel: a.layout.parallel(),
        format: match a.format {
            Format::Safetensors => OutputFormat::Safetensors,
            Format::Pt => OutputFormat::Pt,
        },
        max_shard_size: a.max_shard_size.unwrap_or(DEFAULT_MAX_SHARD_SIZE),
        dtype: a.dtype.0,
        check_replicas: a.check_replicas,
        jobs: a.jobs,
        manifest,
        progress: !a.quiet,
    }
}

fn main() -> ExitCode {
    suite_support::generate::handle_generate::<Args>();
    let args = Args::parse();
    run_tool("ckpt-unshard", || -> Result<(), ToolError> {
        let opts = options(args);
        let outcome = run(&opts)?;
        if let Some(r) = outcome.replicas {
            eprintln!(
                "ckpt-unshard: {} replica regions ({}) are bit-identical to the copies read",
                r.compared,
                format_size(r.bytes)
            );
        }
        eprintln!(
            "ckpt-unshard: wrote {} tensors ({}) in {} files to {}",
            outcome.tensors,
            format_size(outcome.bytes),
            outcome.files.len(),
            opts.output.display()
        );
        Ok(())
    })
}
