//! Shared support for the suite's tools.
//!
//! * [`manifest`]: the JSON-lines manifest every tool writes and `shard-verify` reads.
//! * [`atomic`]: output files (and directories) that appear under their final name only when complete.
//! * [`hash`]: SHA-256 of files (streaming, in parallel) and of everything written through a writer.
//! * [`size`]: human sizes (`5GB`, `300KiB`) in the Hugging Face convention, parsed and formatted.
//! * [`worksplit`]: which items of a plan this process owns (`--rank/--world`, Slurm variables).
//! * [`exit`]: exit codes, the one-line error report, and `run_tool` for `main`.
//! * [`progress`]: byte progress bars on a terminal, no-ops elsewhere.
//! * [`jobs`]: the rayon thread pool.
//! * [`redact`]: hide access tokens before printing.
//! * [`generate`]: `TOOL --generate man|complete-SHELL`: the man page and shell completions.
#![warn(missing_docs)]

pub mod atomic;
pub mod exit;
pub mod generate;
pub mod hash;
pub mod jobs;
pub mod manifest;
pub mod progress;
pub mod redact;
pub mod size;
pub mod worksplit;
