//! Exit codes shared by every tool, and the one-line error report.
//!
//! A tool's `main` is `run_tool("nx-shard", || run(Args::parse()))`, where `run` returns
//! `Result<(), ToolError>`; an `anyhow::Error` converts with `?`, classified by
//! [`ToolError::classify`].

use std::io;
use std::process::ExitCode;

use crate::redact::redact_secrets;

/// Success.
pub const SUCCESS: i32 = 0;
/// Verification failed, or something is wrong with the data.
pub const DATA_ERROR: i32 = 1;
/// Usage or input error: bad arguments, missing or unusable input.
pub const USAGE_ERROR: i32 = 2;
/// Writing failed: disk full, quota, permission, read-only filesystem.
pub const IO_ERROR: i32 = 3;
/// Interrupted (SIGINT).
pub const INTERRUPTED: i32 = 130;

/// The exit codes, for clap's `after_help`.
pub const EXIT_CODES_HELP: &str = "\
Exit status:
  0    success
  1    verification failed, or something is wrong with the data
  2    usage or input error
  3    writing failed (disk full, quota, permission); finished files are kept
  130  interrupted";

/// The hint for a full disk or an exceeded quota.
pub const STORAGE_FULL_HINT: &str =
    "free space on the output filesystem and rerun; finished files are kept";

/// An error that ends a tool, with its exit code and an optional hint for the user.
#[derive(Debug)]
pub struct ToolError {
    /// The exit code, one of this module's constants.
    pub code: i32,
    /// The error, whose context chain is printed.
    pub error: anyhow::Error,
    /// What the user can do about it, printed after the error.
    pub hint: Option<String>,
}

impl ToolError {
    /// An error with the given exit code and no hint.
    pub fn new(code: i32, error: impl Into<anyhow::Error>) -> Self {
        ToolError {
            code,
            error: error.into(),
            hint: None,
        }
    }

    /// [`DATA_ERROR`]: verification failed, or the data is wrong.
    pub fn data(error: impl Into<anyhow::Error>) -> Self {
        Self::new(DATA_ERROR, error)
    }

    /// [`USAGE_ERROR`]: bad usage or input.
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self::new(USAGE_ERROR, error)
    }

    /// [`IO_ERROR`]: writing failed; with [`STORAGE_FULL_HINT`] if the disk or quota is full.
    pub fn io(error: impl Into<anyhow::Error>) -> Self {
        let error = error.into();
        let hint = first_io_error(&error).and_then(storage_hint);
        ToolError {
            code: IO_ERROR,
            error,
            hint: hint.map(str::to_string),
        }
    }

    /// [`INTERRUPTED`].
    pub fn interrupted(error: impl Into<anyhow::Error>) -> Self {
        Self::new(INTERRUPTED, error)
    }

    /// Picks the code from the first [`io::Error`] in the error's chain (see
    /// [`classify_io_error`]); an error without one is a [`DATA_ERROR`].
    pub fn classify(error: impl Into<anyhow::Error>) -> Self {
        let error = error.into();
        let (code, hint) = first_io_error(&error).map_or((DATA_ERROR, None), classify_io_error);
        ToolError {
            code,
            error,
            hint: hint.map(str::to_string),
        }
    }

    /// Sets the hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The one-line report `<tool>: error: <context chain joined by ": ">[; hint: <hint>]`,
    /// with secrets redacted and line breaks flattened.
    pub fn report(&self, tool: &str) -> String {
        let mut message = String::new();
        for cause in self.error.chain() {
            let cause = cause.to_string();
            // Some errors repeat their source in their own message: print it once.
            if message.ends_with(&cause) {
                continue;
            }
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&cause);
        }
        if let Some(hint) = &self.hint {
            message.push_str("; hint: ");
            message.push_str(hint);
        }
        let line = format!("{tool}: error: {message}");
        let one_line: Vec<&str> = line
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        redact_secrets(&one_line.join(" "))
    }
}

impl From<anyhow::Error> for ToolError {
    /// See [`ToolError::classify`].
    fn from(error: anyhow::Error) -> Self {
        Self::classify(error)
    }
}

/// The exit code and hint for an I/O error: a full disk or quota is an [`IO_ERROR`] with
/// [`STORAGE_FULL_HINT`]; a missing file a [`USAGE_ERROR`]; invalid or truncated data a
/// [`DATA_ERROR`]; anything else (permission, read-only filesystem, device errors) an
/// [`IO_ERROR`].
pub fn classify_io_error(error: &io::Error) -> (i32, Option<&'static str>) {
    match error.kind() {
        io::ErrorKind::NotFound => (USAGE_ERROR, None),
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => (DATA_ERROR, None),
        _ => (IO_ERROR, storage_hint(error)),
    }
}

fn storage_hint(error: &io::Error) -> Option<&'static str> {
    matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)).then_some(STORAGE_FULL_HINT)
}

/// The first `io::Error` in the chain that carries an OS error, else the first at all (errors
/// that wrap an `io::Error` in a new one keep the OS code only in the inner one).
fn first_io_error(error: &anyhow::Error) -> Option<&io::Error> {
    let mut io_errors = error.chain().filter_map(|e| e.downcast_ref::<io::Error>());
    let first = io_errors.next()?;
    Some(
        std::iter::once(first)
            .chain(io_errors)
            .find(|e| e.raw_os_error().is_some())
            .unwrap_or(first),
    )
}

/// Runs a tool's body: on error prints [`ToolError::report`] as one line to stderr and exits
/// with the error's code (a code outside `1..=255` exits with [`DATA_ERROR`]).
///
/// A closed standard output (`tool | head`) ends the process quietly, as it does for other Unix
/// tools, instead of a panic in `println!`: the Rust runtime ignores SIGPIPE, so it is restored.
pub fn run_tool(name: &str, f: impl FnOnce() -> Result<(), ToolError>) -> ExitCode {
    restore_sigpipe();
    match f() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}", error.report(name));
            ExitCode::from(exit_status(error.code))
        }
    }
}

/// Lets a closed standard output end the process quietly (the Unix default, which the Rust
/// runtime turns off).
pub fn restore_sigpipe() {
    // SAFETY: setting a signal's disposition to the default has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn exit_status(code: i32) -> u8 {
    u8::try_from(code)
        .ok()
        .filter(|&c| c != 0)
        .unwrap_or(DATA_ERROR as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    fn enospc() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOSPC)
    }

    #[test]
    fn report_is_one_line_with_the_context_chain() {
        let err = anyhow::Error::from(enospc())
            .context("writing out/model/dp_rank_00_tp_rank_01_pp_rank_00.pt")
            .context("rank 1");
        let report = ToolError::classify(err).report("nx-shard");
        assert_eq!(
            report,
            format!(
                "nx-shard: error: rank 1: writing out/model/dp_rank_00_tp_rank_01_pp_rank_00.pt: {}; \
                 hint: {STORAGE_FULL_HINT}",
                enospc()
            )
        );
        let multi = ToolError::data(anyhow::anyhow!("bad\nthings\r\n  happened  here\n"));
        assert_eq!(multi.report("t"), "t: error: bad things happened  here");
    }

    #[test]
    fn report_redacts_and_deduplicates() {
        let token = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz";
        let err = ToolError::usage(anyhow::anyhow!("401 for token {token}"));
        assert_eq!(
            err.report("hf-fetch"),
            "hf-fetch: error: 401 for token hf_***"
        );

        #[derive(Debug, thiserror::Error)]
        #[error("opening config: {0}")]
        struct Repeats(#[source] io::Error);
        let inner = io::Error::other("boom");
        let err = ToolError::data(Repeats(inner));
        assert_eq!(err.report("t"), "t: error: opening config: boom");
    }

    #[test]
    fn classification() {
        let code = |e: anyhow::Error| ToolError::from(e).code;
        assert_eq!(code(anyhow::anyhow!("tensor shape mismatch")), DATA_ERROR);
        assert_eq!(
            code(io::Error::from(io::ErrorKind::NotFound).into()),
            USAGE_ERROR
        );
        assert_eq!(
            code(io::Error::from(io::ErrorKind::InvalidData).into()),
            DATA_ERROR
        );
        assert_eq!(
            code(io::Error::from_raw_os_error(libc::EACCES).into()),
            IO_ERROR
        );
        assert_eq!(
            code(io::Error::from_raw_os_error(libc::EROFS).into()),
            IO_ERROR
        );
        let full = ToolError::from(anyhow::Error::from(enospc()).context("x"));
        assert_eq!(
            (full.code, full.hint.as_deref()),
            (IO_ERROR, Some(STORAGE_FULL_HINT))
        );
        let quota = ToolError::io(io::Error::from_raw_os_error(libc::EDQUOT));
        assert_eq!(quota.hint.as_deref(), Some(STORAGE_FULL_HINT));
        let denied = ToolError::io(io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!((denied.code, denied.hint), (IO_ERROR, None));
        let hinted = ToolError::usage(anyhow::anyhow!("exists")).with_hint("pass --force");
        assert_eq!(hinted.report("t"), "t: error: exists; hint: pass --force");
    }

    #[test]
    fn wrapped_io_errors_keep_their_os_code() {
        // AtomicFile's Write impl wraps the OS error in an io::Error of the same kind that names
        // the output; the hint must still be found.
        #[derive(Debug, thiserror::Error)]
        #[error("writing out/x.pt")]
        struct Named(#[source] io::Error);
        let wrapped = io::Error::new(enospc().kind(), Named(enospc()));
        let err = ToolError::classify(anyhow::Error::from(wrapped).context("rank 0"));
        assert_eq!(
            (err.code, err.hint.as_deref()),
            (IO_ERROR, Some(STORAGE_FULL_HINT))
        );
        assert!(err
            .report("t")
            .starts_with(&format!("t: error: rank 0: writing out/x.pt: {}", enospc())));
    }

    #[test]
    fn help_lists_every_code() {
        for code in [SUCCESS, DATA_ERROR, USAGE_ERROR, IO_ERROR, INTERRUPTED] {
            assert!(EXIT_CODES_HELP
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{code} "))));
        }
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_status(USAGE_ERROR), 2);
        assert_eq!(exit_status(INTERRUPTED), 130);
        assert_eq!(exit_status(0), 1);
        assert_eq!(exit_status(300), 1);
        assert_eq!(exit_status(-2), 1);
        let body = || -> Result<(), ToolError> {
            Err(io::Error::from(io::ErrorKind::NotFound)).context("opening input")?;
            Ok(())
        };
        assert_eq!(body().unwrap_err().code, USAGE_ERROR);
    }
}
