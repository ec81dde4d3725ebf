//! `tok-pack`: tokenize a corpus and pack fixed-length rows into the Hugging Face datasets
//! on-disk format (what NxD's `get_dataset.py` writes).
//!
//! Argument parsing only; the work is done by the `packing` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use packing::{InputFormat, ManifestTarget, PackOptions};
use suite_support::exit::{run_tool, ToolError, EXIT_CODES_HELP};
use suite_support::size::parse_size;
use suite_support::worksplit::WorkSlice;

const AFTER_HELP: &str = "\
Output: a datasets save_to_disk directory (data-NNNNN-of-MMMMM.arrow Arrow IPC streams,
state.json, dataset_info.json) with columns input_ids (int32), attention_mask (int8, ones) and
labels (int64, = input_ids), loadable by datasets.load_from_disk in datasets 3.6 (NxD's pin)
and later. The directory appears only when complete.

--compat nxd reproduces examples/training/llama/get_dataset.py exactly: documents are tokenized
in batches of 1000 (with the tokenizer's own special tokens, e.g. BOS only if tokenizer.json's
post-processor adds it), each batch is cut into rows on its own and its remainder dropped.
Without it, documents are concatenated across batches with EOS between them (--no-eos: none)
and only the final remainder is dropped. The output is the same whatever --jobs.

With --rank/--world (or under srun / a Slurm array), each process tokenizes its share of the
1000-document batches and writes <OUTPUT>.rank-RRRRR-of-WWWWW; `tok-pack --merge <OUTPUT>.rank-*
--output <OUTPUT>` then writes exactly the dataset a single process would.

Examples:
  tok-pack --tokenizer llama3/ --input wiki.jsonl --output wiki_8k --block-size 8192 --compat nxd
  tok-pack --tokenizer llama3/tokenizer.json --input corpus/ --output packed --block-size 4096
  srun -n 8 tok-pack --tokenizer llama3 --input wiki.parquet --output wiki_8k --block-size 8192 --compat nxd
  tok-pack --merge wiki_8k.rank-* --output wiki_8k
";

/// The `--compat` choices.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Compat {
    /// NxD's get_dataset.py.
    Nxd,
}

/// The `--format` choices.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// JSON lines (one object per line).
    Jsonl,
    /// Plain text, one document per line.
    Txt,
    /// CSV with a header row.
    Csv,
    /// Parquet.
    Parquet,
    /// Arrow IPC stream (datasets .arrow files).
    Arrow,
}

/// The `--encoder` choices.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Encoder {
    /// tokenizers 0.22 (the code behind Python's tokenizers/transformers).
    Reference,
    /// tokenizers 1.0.0-rc.3's pipeline encoder (about 5x faster end to end; same ids on the tests).
    Fast,
}

/// Tokenize a corpus and pack fixed-length rows into a Hugging Face datasets directory.
#[derive(Debug, Parser)]
#[command(name = "tok-pack", version, after_help = format!("{AFTER_HELP}\n{EXIT_CODES_HELP}"))]
struct Args {
    /// A tokenizer.json, or a directory holding tokenizer.json (and tokenizer_config.json).
    #[arg(long, value_name = "DIR|FILE", required_unless_present = "merge")]
    tokenizer: Option<PathBuf>,

    /// Input files, directories (a datasets save_to_disk directory reads its .arrow files) or
    /// quoted glob patterns ('wiki/**/*.parquet'), read in the order given.
    #[arg(long, num_args = 1.., value_name = "FILE", required_unless_present = "merge")]
    input: Vec<PathBuf>,

    /// The dataset directory to create (must not exist).
    #[arg(long, value_name = "DIR")]
    output: PathBuf,

    /// Tokens per row.
    #[arg(long, value_name = "N", required_unless_present = "merge")]
    block_size: Option<usize>,

    /// Reproduce a reference pipeline byte for byte: the same .arrow files, dataset_info.json and
    /// state.json (all but its fingerprint) as the pipeline writes for the same corpus.
    #[arg(long, value_enum, value_name = "nxd")]
    compat: Option<Compat>,

    /// The column holding the text (JSON lines, CSV, Parquet).
    #[arg(long, default_value = "text", value_name = "NAME")]
    text_column: String,

    /// Input format [default: from each file's extension].
    #[arg(long, value_enum)]
    format: Option<Format>,

    /// Put the tokenizer's EOS token between documents (default mode; the default).
    #[arg(long, overrides_with = "no_eos")]
    eos: bool,

    /// No EOS between documents.
    #[arg(long, overrides_with = "eos")]
    no_eos: bool,

    /// Largest shard, as save_to_disk's max_shard_size (500MB = 500*10^6 bytes) [default: 500MB;
    /// with --merge, the ranks' value].
    #[arg(long, value_name = "SIZE")]
    max_shard_size: Option<String>,

    /// The encoder: fast (tokenizers 1.0.0-rc.3, same ids as the reference on every test) or
    /// reference (tokenizers 0.22).
    #[arg(long, value_enum, default_value = "fast")]
    encoder: Encoder,

    /// Worker threads [default: all cores].
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,

    /// Manifest file, or - for stdout [default: none].
    #[arg(long, value_name = "FILE|-")]
    manifest: Option<PathBuf>,

    /// This process's rank: it tokenizes the 1000-document batches i with i % W == R and writes
    /// the partial result <OUTPUT>.rank-RRRRR-of-WWWWW for --merge [default: from Slurm, else 0].
    #[arg(long, value_name = "R")]
    rank: Option<usize>,

    /// Number of processes sharing the corpus [default: from Slurm, else 1].
    #[arg(long, value_name = "W")]
    world: Option<usize>,

    /// Join the partial results of all ranks (the <OUTPUT>.rank-* directories) into --output,
    /// exactly the dataset a single process writes.
    #[arg(long, num_args = 1.., value_name = "DIR", conflicts_with_all = ["input", "rank", "world"])]
    merge: Vec<PathBuf>,

    /// No progress bar and no report.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn run(a: Args) -> Result<(), ToolError> {
    let max_shard_size = a
        .max_shard_size
        .as_deref()
        .map(parse_size)
        .transpose()
        .map_err(|e| ToolError::usage(anyhow::anyhow!("--max-shard-size: {e}")))?
        // 0 means the default, as in datasets.
        .filter(|&n| n != 0);
    if a.compat.is_some() && (a.eos || a.no_eos) {
        return Err(ToolError::usage(anyhow::anyhow!(
            "--eos/--no-eos do not apply with --compat nxd (get_dataset.py adds no EOS)"
        )));
    }
    let slice = if a.merge.is_empty() {
        WorkSlice::resolve(a.rank, a.world).map_err(ToolError::usage)?
    } else {
        WorkSlice::new(0, 1).map_err(ToolError::usage)?
    };
    let opts = PackOptions {
        tokenizer: a.tokenizer.unwrap_or_default(),
        inputs: a.input,
        output: a.output,
        block_size: a.block_size.unwrap_or(0),
        slice,
        merge: a.merge,
        compat_nxd: a.compat.is_some(),
        text_column: a.text_column,
        format: a.format.map(|f| match f {
            Format::Jsonl => InputFormat::Jsonl,
            Format::Txt => InputFormat::Txt,
            Format::Csv => InputFormat::Csv,
            Format::Parquet => InputFormat::Parquet,
            Format::Arrow => InputFormat::Arrow,
        }),
        eos: !a.no_eos,
        max_shard_size,
        jobs: a.jobs,
        encoder: match a.encoder {
            Encoder::Reference => packing::EncoderKind::Reference,
            Encoder::Fast => packing::EncoderKind::Fast,
        },
        quiet: a.quiet,
        manifest: match a.manifest {
            None => ManifestTarget::None,
            Some(p) if p.as_os_str() == "-" => ManifestTarget::Stdout,
            Some(p) => ManifestTarget::File(p),
        },
    };
    let s = packing::run(&opts)?;
    if !a.quiet && opts.slice.world > 1 {
        eprintln!(
            "tok-pack: rank {} of {}: {} documents tokenized, {} tokens -> {} ({:.1}s); join the ranks with --merge",
            opts.slice.rank,
            opts.slice.world,
            s.docs,
            s.tokens,
            packing::partial_dir(&opts.output, opts.slice).display(),
            s.seconds
        );
    } else if !a.quiet {
        let kept = s.rows * s.block as u64;
        let rate = if s.seconds > 0.0 {
            s.tokens as f64 / s.seconds
        } else {
            0.0
        };
        eprintln!(
            "tok-pack: {} documents, {} tokens{} -> {} rows of {} ({} tokens kept, {} dropped), {} shard(s) in {}; {:.1}s, {:.2}M tokens/s",
            s.docs,
            s.tokens,
            if s.separators > 0 {
                format!(" + {} EOS", s.separators)
            } else {
                String::new()
            },
            s.rows,
            s.block,
            kept,
            s.dropped,
            s.shards,
            opts.output.display(),
            s.seconds,
            rate / 1e6
        );
        if s.rows == 0 {
            eprintln!(
                "tok-pack: warning: fewer tokens than one row of {}: the dataset is empty (0 rows)",
                s.block
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    suite_support::generate::handle_generate::<Args>();
    run_tool("tok-pack", || run(Args::parse()))
}
