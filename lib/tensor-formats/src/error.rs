//! The one error type of this crate.

use std::path::PathBuf;

/// What can go wrong reading or writing a checkpoint file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// An I/O error, with the file it happened on.
    #[error("{path}: {source}")]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An I/O error with no file attached (streams).
    #[error(transparent)]
    Stream(#[from] std::io::Error),
    /// The bytes do not follow the format (truncated, corrupt, lying offsets...).
    #[error("{0}")]
    Corrupt(String),
    /// The file is well-formed but uses something this suite refuses to read (forbidden global,
    /// compressed record, legacy format, unknown dtype...).
    #[error("{0}")]
    Unsupported(String),
    /// A caller-supplied value is inconsistent (shape out of range, mismatched parts...).
    #[error("{0}")]
    Invalid(String),
}

impl FormatError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> FormatError {
        FormatError::Io {
            path: path.into(),
            source,
        }
    }

    /// Prefixes the message with a context (file name, tensor name), keeping the variant.
    pub fn context(self, ctx: impl std::fmt::Display) -> FormatError {
        match self {
            FormatError::Corrupt(m) => FormatError::Corrupt(format!("{ctx}: {m}")),
            FormatError::Unsupported(m) => FormatError::Unsupported(format!("{ctx}: {m}")),
            FormatError::Invalid(m) => FormatError::Invalid(format!("{ctx}: {m}")),
            FormatError::Stream(e) => FormatError::Stream(std::io::Error::new(
                e.kind(),
                IoContext {
                    context: ctx.to_string(),
                    source: e,
                },
            )),
            FormatError::Io { path, source } => FormatError::Stream(std::io::Error::new(
                source.kind(),
                IoContext {
                    context: format!("{ctx}: {}", path.display()),
                    source,
                },
            )),
        }
    }
}

/// An I/O error under a context prefix. The error stays the source, so callers still find its
/// OS error code (a full disk is told apart from corrupt data) and its message.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
struct IoContext {
    context: String,
    #[source]
    source: std::io::Error,
}

/// Result alias for this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
