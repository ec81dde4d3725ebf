//! `hf-fetch`: fast, resumable, verified downloads from the Hugging Face Hub, into a local
//! directory or the Hugging Face cache.
//!
//! Argument parsing only; the work is done by the `hub-fetch` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use hub_fetch::{fetch, FetchError, FetchOptions, HubEnv, RepoType, Target, Token};
use suite_support::exit::{run_tool, ToolError, EXIT_CODES_HELP};
use suite_support::manifest::ManifestTarget;
use suite_support::size::{format_size, parse_size};

const AFTER_HELP: &str = "\
Files are fetched in parallel, large ones as parallel byte ranges, written in place into a
partial file under .cache/huggingface/download (local dir) or blobs/ (cache) and verified
(sha256 for LFS files, git blob sha1 for the others) before they get their final name. A rerun
after a crash, kill -9 or dropped connection continues where it stopped. --local-dir writes the
.metadata files huggingface_hub writes, so the Python client sees the files as up to date;
without it the files go to the Hugging Face cache (--cache-dir, HF_HUB_CACHE, $HF_HOME/hub),
where transformers' from_pretrained(..., local_files_only=True) finds them.

The manifest (JSON lines: path, bytes, sha256, commit) is written last: by default to
<local-dir>/.cache/huggingface/hf-fetch.manifest.jsonl, or <cache>/models--org--name/
hf-fetch.<commit>.manifest.jsonl. Without --manifest -, the output directory is printed.

Environment: HF_ENDPOINT, HF_TOKEN (then HUGGING_FACE_HUB_TOKEN, then HF_TOKEN_PATH or
$HF_HOME/token), HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE (no network: report what is local),
HF_HUB_DISABLE_PROGRESS_BARS, HF_HUB_DOWNLOAD_TIMEOUT (seconds of silence before a connection
is retried, default 10). The token is sent only to the Hub's own origins, never printed.

Examples:
  hf-fetch meta-llama/Llama-3.1-8B --local-dir Llama-3.1-8B
  hf-fetch meta-llama/Llama-3.1-8B config.json tokenizer.json --local-dir llama
  hf-fetch meta-llama/Llama-3.1-70B --include '*.safetensors' --include '*.json' --jobs 32
  hf-fetch org/model --revision v1.0 --cache-dir /fsx/hf-cache
  hf-fetch org/model --local-dir m --manifest - | shard-verify m --manifest -
";

/// The `--repo-type` choices.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    /// A model repo.
    Model,
    /// A dataset repo.
    Dataset,
    /// A Space.
    Space,
}

/// Fast, resumable, verified downloads from the Hugging Face Hub.
#[derive(Debug, Parser)]
#[command(name = "hf-fetch", version, after_help = format!("{AFTER_HELP}\n{EXIT_CODES_HELP}"))]
struct Args {
    /// The repo id (NAMESPACE/NAME).
    repo: String,

    /// Files to fetch (exact repo paths; `dir/` takes a folder) [default: all].
    files: Vec<String>,

    /// Download into this directory (huggingface_hub's --local-dir layout).
    #[arg(long, value_name = "DIR", conflicts_with = "cache_dir")]
    local_dir: Option<PathBuf>,

    /// The Hugging Face cache to download into [default: HF_HUB_CACHE or $HF_HOME/hub].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,

    /// Only files matching one of these patterns (fnmatch; `*` crosses `/`).
    #[arg(long, value_name = "GLOB", conflicts_with = "files")]
    include: Vec<String>,

    /// Skip files matching one of these patterns.
    #[arg(long, value_name = "GLOB", conflicts_with = "files")]
    exclude: Vec<String>,

    /// Branch, tag or commit.
    #[arg(long, default_value = "main", value_name = "REV")]
    revision: String,

    /// The repo type.
    #[arg(long, value_enum, default_value = "model")]
    repo_type: Kind,

    /// Access token [default: HF_TOKEN, then the token file under HF_HOME]. Prefer the
    /// environment: a command line is visible to other users of the machine.
    #[arg(long, value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Concurrent connections (files and byte ranges together).
    #[arg(long, short = 'j', default_value_t = hub_fetch::DEFAULT_CONNECTIONS, value_name = "N")]
    jobs: usize,

    /// Largest byte range fetched over one connection; a file is also cut into at least 16
    /// ranges (whole MiB), so even a mid-sized file spreads over many connections.
    #[arg(long, default_value = "16MiB", value_name = "SIZE")]
    chunk_size: String,

    /// Manifest file, or - for stdout [default: see below].
    #[arg(long, value_name = "FILE|-")]
    manifest: Option<PathBuf>,

    /// Print what would be downloaded, kept or resumed, and download nothing.
    #[arg(long)]
    dry_run: bool,

    /// No progress bar and no summary.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn to_tool_error(e: FetchError) -> ToolError {
    let code = e.exit_code();
    let hint = e.hint();
    let t = ToolError::new(code, e);
    match hint {
        Some(h) => t.with_hint(h),
        None => t,
    }
}

fn run(a: Args) -> Result<(), ToolError> {
    let chunk_size = parse_size(&a.chunk_size)
        .map_err(|e| ToolError::usage(anyhow::anyhow!("--chunk-size: {e}")))?;
    let mut env = HubEnv::from_process().map_err(to_tool_error)?;
    if let Some(t) = a.token.as_deref() {
        env.token = Token::new(t);
    }
    let target = match (a.local_dir, a.cache_dir) {
        (Some(d), _) => Target::LocalDir(d),
        (None, Some(c)) => Target::Cache(c),
        (None, None) => Target::Cache(env.hub_cache.clone()),
    };
    let manifest = ManifestTarget::from_arg(a.manifest);
    let to_stdout = manifest == ManifestTarget::Stdout;
    let opts = FetchOptions {
        repo: a.repo,
        repo_type: match a.repo_type {
            Kind::Model => RepoType::Model,
            Kind::Dataset => RepoType::Dataset,
            Kind::Space => RepoType::Space,
        },
        revision: a.revision,
        files: a.files,
        include: a.include,
        exclude: a.exclude,
        target,
        env,
        connections: a.jobs,
        chunk_size,
        manifest,
        dry_run: a.dry_run,
        progress: !a.quiet,
    };
    let report = fetch(&opts).map_err(to_tool_error)?;
    if a.dry_run {
        for line in &report.plan {
            println!("{line}");
        }
        return Ok(());
    }
    if !to_stdout {
        println!("{}", report.output_dir.display());
    }
    if !a.quiet {
        let total: u64 = report.records.iter().map(|r| r.bytes).sum();
        eprintln!(
            "hf-fetch: {} files ({}) of {} at {}, {} fetched by this run",
            report.records.len(),
            format_size(total),
            opts.repo,
            &report.commit[..report.commit.len().min(12)],
            format_size(report.bytes_downloaded),
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    suite_support::generate::handle_generate::<Args>();
    run_tool("hf-fetch", || run(Args::parse()))
}
