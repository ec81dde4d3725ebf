//! `st-merge`: merge, filter, rename, re-type and reshard safetensors / `.pt` checkpoints into
//! one safetensors file, one `torch.save` `.pt`, or a Hugging Face directory; merge PEFT or
//! DeepSpeed LoRA (and DoRA) adapters on the way.
//!
//! Argument parsing only; the work is done by the `st-merge-core` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use st_merge_core::adapter::Overrides;
use st_merge_core::{run, ManifestTarget, MergeOptions, OutputKind, DEFAULT_MAX_SHARD_SIZE};
use suite_support::exit::{run_tool, ToolError, EXIT_CODES_HELP};
use suite_support::size::{format_size, parse_size};
use tensor_formats::DType;

const AFTER_HELP: &str = "\
INPUT: a Hugging Face checkpoint directory (model.safetensors.index.json + shards, or one
model.safetensors), a .safetensors file, or a torch .pt/.bin state dict (a DeepSpeed
{\"module\": {...}} checkpoint reads its module). Several inputs are concatenated in order; a
name present twice is an error (drop one with --exclude, or --rename).

OUTPUT, by its form:
  x.safetensors   one safetensors file
  x.pt            one torch archive, byte-identical to torch.save of the same dict (apart from
                  the serialization id); loads in torch 2.1 (the Neuron SDK's) and NxD's converter
  DIR             a Hugging Face directory: shards split as save_pretrained (--max-shard-size),
                  model.safetensors.index.json, and the input's config.json,
                  generation_config.json and tokenizer files; plus st-merge.manifest.jsonl
Outputs are written under a temporary name and renamed when complete: a failed or killed run
leaves nothing under OUTPUT. An existing OUTPUT is refused unless --force.

--include/--exclude globs and the adapter's targets use the input names (before --rename);
`*` matches dots too. --rename FROM=TO replaces every FROM in a name; ^FROM=TO only a prefix.
--dtype converts float tensors only (round to nearest even, once); integer tensors are kept.
With several inputs of different float dtypes, --dtype is required.

--lora ADAPTER merges a LoRA adapter: a PEFT adapter directory (adapter_config.json +
adapter_model.safetensors; r, lora_alpha, use_rslora, rank/alpha_pattern, use_dora,
modules_to_save honoured), or a DeepSpeed LoRA checkpoint (.pt, or a directory with
mp_rank_00_model_states.pt; lora_weight_1 = A, lora_weight_2 = B) with --lora-alpha and
--lora-r. W' = W + scale * B @ A is computed in fp32 and rounded once to the output dtype (DoRA:
W' = m * (W + scale B A) / ||W + scale B A|| per row). Memory: one base tensor's adapter pair
plus a few MiB of rows per thread.

Examples:
  st-merge Meta-Llama-3-70B -o llama-3-70b.pt                       # the seed's torch.save step
  st-merge Meta-Llama-3-8B -o llama3-8b-fp32 --dtype fp32 --max-shard-size 2GB
  st-merge Meta-Llama-3-8B --lora my-peft-adapter -o llama3-8b-tuned
  st-merge base-hf --lora ds_ckpt/global_step500 --lora-alpha 16 --lora-r 64 -o merged
  st-merge model.pt -o model.safetensors --exclude '*.rotary_emb.inv_freq'
  st-merge a.safetensors b.safetensors -o joined/ --rename '^model.=' --dry-run
";

fn parse_max_shard_size(s: &str) -> Result<u64, String> {
    match parse_size(s) {
        Ok(0) => Err("the largest shard must be at least 1 byte".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// `--dtype`: `None` keeps the inputs' dtypes.
#[derive(Debug, Clone, Copy)]
struct DtypeChoice(Option<DType>);

fn parse_dtype(s: &str) -> Result<DtypeChoice, String> {
    Ok(DtypeChoice(match s {
        "keep" => None,
        "bf16" | "bfloat16" => Some(DType::BF16),
        "fp16" | "f16" | "float16" => Some(DType::F16),
        "fp32" | "f32" | "float32" => Some(DType::F32),
        other => return Err(format!("`{other}`: expected keep, bf16, fp16 or fp32")),
    }))
}

/// Merge, filter, rename, re-type and reshard safetensors / .pt checkpoints, and merge LoRA
/// adapters, streaming with bounded memory.
#[derive(Debug, Parser)]
#[command(name = "st-merge", version, after_help = format!("{AFTER_HELP}\n{EXIT_CODES_HELP}"))]
struct Args {
    /// Input checkpoints (HF directory, .safetensors, .pt), in order.
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<PathBuf>,

    /// Output: x.safetensors, x.pt, or a directory.
    #[arg(long, short = 'o', value_name = "OUTPUT")]
    output: PathBuf,

    /// Largest shard of a directory output (5GB = 5e9 bytes; KiB.. binary) [default: 5GB].
    #[arg(long, value_parser = parse_max_shard_size, value_name = "SIZE")]
    max_shard_size: Option<u64>,

    /// Convert float tensors.
    #[arg(long, default_value = "keep", value_parser = parse_dtype, value_name = "keep|bf16|fp16|fp32")]
    dtype: DtypeChoice,

    /// Keep only tensors whose input name matches (repeatable).
    #[arg(long, value_name = "GLOB")]
    include: Vec<String>,

    /// Drop tensors whose input name matches (repeatable).
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,

    /// Rename: every FROM in a name becomes TO; ^FROM=TO only a leading FROM (repeatable,
    /// applied in order).
    #[arg(long, value_name = "FROM=TO")]
    rename: Vec<String>,

    /// Merge this LoRA adapter (PEFT directory or DeepSpeed checkpoint).
    #[arg(long, value_name = "ADAPTER")]
    lora: Option<PathBuf>,

    /// LoRA alpha (required for DeepSpeed; overrides adapter_config.json).
    #[arg(long, value_name = "A", requires = "lora")]
    lora_alpha: Option<f64>,

    /// LoRA rank (required for DeepSpeed; overrides adapter_config.json).
    #[arg(long, value_name = "R", requires = "lora")]
    lora_r: Option<usize>,

    /// Worker threads [default: all cores].
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,

    /// Replace an existing OUTPUT.
    #[arg(long)]
    force: bool,

    /// Print the plan (one JSON line per output tensor) and write nothing.
    #[arg(long)]
    dry_run: bool,

    /// Manifest file, or - for stdout [default: DIR/st-merge.manifest.jsonl for a directory,
    /// none for a file].
    #[arg(long, value_name = "FILE|-")]
    manifest: Option<PathBuf>,

    /// Print a JSON summary of the run on stdout.
    #[arg(long)]
    json: bool,

    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn main() -> ExitCode {
    suite_support::generate::handle_generate::<Args>();
    let a = Args::parse();
    run_tool("st-merge", || -> Result<(), ToolError> {
        let max_shard_size = a.max_shard_size.unwrap_or(DEFAULT_MAX_SHARD_SIZE);
        let opts = MergeOptions {
            inputs: a.inputs,
            output: a.output,
            max_shard_size,
            dtype: a.dtype.0,
            include: a.include,
            exclude: a.exclude,
            renames: a.rename,
            lora: a.lora,
            lora_overrides: Overrides {
                alpha: a.lora_alpha,
                r: a.lora_r,
            },
            jobs: a.jobs,
            force: a.force,
            dry_run: a.dry_run,
            manifest: ManifestTarget::from_arg(a.manifest),
            progress: !a.quiet,
        };
        let outcome = run(&opts)?;
        if !outcome.adapter_left_out.is_empty() {
            eprintln!(
                "st-merge: warning: {} adapter target(s) are not in the output (excluded): {}",
                outcome.adapter_left_out.len(),
                outcome.adapter_left_out.join(", ")
            );
        }
        if opts.dry_run {
            for line in st_merge_core::plan_json(&outcome, max_shard_size) {
                println!("{line}");
            }
            return Ok(());
        }
        let kind = match outcome.kind {
            OutputKind::Safetensors => "safetensors",
            OutputKind::Pt => "pt",
            OutputKind::Dir => "dir",
        };
        if a.json {
            let summary = serde_json::json!({
                "output": opts.output.display().to_string(),
                "kind": kind,
                "tensors": outcome.plan.len(),
                "bytes": outcome.bytes,
                "lora_merged": outcome.merged,
                "replaced": outcome.replaced,
                "files": outcome.records.iter().map(|r| serde_json::json!({"path": r.path, "bytes": r.bytes, "sha256": r.sha256})).collect::<Vec<_>>(),
            });
            println!("{summary}");
        }
        if !a.quiet {
            let lora = if opts.lora.is_some() {
                format!(
                    ", {} with the adapter merged{}",
                    outcome.merged,
                    if outcome.replaced > 0 {
                        format!(", {} replaced", outcome.replaced)
                    } else {
                        String::new()
                    }
                )
            } else {
                String::new()
            };
            eprintln!(
                "st-merge: wrote {} tensors ({}{lora}) in {} file(s) to {}",
                outcome.plan.len(),
                format_size(outcome.bytes),
                outcome.records.len(),
                opts.output.display()
            );
        }
        Ok(())
    })
}
