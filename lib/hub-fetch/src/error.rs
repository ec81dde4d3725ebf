//! The errors of a download, each one line with what to do about it.

use std::io;
use std::path::PathBuf;

use suite_support::exit::{classify_io_error, DATA_ERROR, INTERRUPTED, IO_ERROR, USAGE_ERROR};

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Bad arguments or environment.
    #[error("{0}")]
    Usage(String),
    /// The repo does not exist, or it is private and the caller cannot see it.
    #[error("repository {repo} not found (HTTP {status}): it does not exist, or it is private and {who}")]
    RepoNotFound {
        /// The repo id.
        repo: String,
        /// The HTTP status.
        status: u16,
        /// "no token was sent" or "your token has no access to it".
        who: &'static str,
    },
    /// The repo is gated and no token was sent.
    #[error("repository {repo} is gated and no token was sent (HTTP 401)")]
    GatedNoToken {
        /// The repo id.
        repo: String,
    },
    /// The repo is gated and the token is not on its list.
    #[error("repository {repo} is gated and your token is not in its authorized list (HTTP 403)")]
    GatedNoAccess {
        /// The repo id.
        repo: String,
        /// Where to ask for access.
        page: String,
    },
    /// The Hub refused the token itself.
    #[error("the Hub rejected the token: invalid or expired credentials (HTTP 401)")]
    BadToken,
    /// The revision does not exist.
    #[error("revision {revision:?} not found in {repo}")]
    RevisionNotFound {
        /// The repo id.
        repo: String,
        /// The revision asked for.
        revision: String,
    },
    /// A file asked for does not exist at the revision.
    #[error("{path:?} not found in {repo} at {revision}")]
    EntryNotFound {
        /// The repo id.
        repo: String,
        /// The file path.
        path: String,
        /// The revision.
        revision: String,
    },
    /// Access to the repo is disabled.
    #[error("access to {repo} is disabled on the Hub (HTTP 403)")]
    Disabled {
        /// The repo id.
        repo: String,
    },
    /// Any other HTTP error status, after retries where they apply.
    #[error("{what}: HTTP {status}{message}")]
    Http {
        /// What was being fetched.
        what: String,
        /// The status.
        status: u16,
        /// `: <server message>` or empty.
        message: String,
    },
    /// A network error (connection refused or reset, timeout), after retries.
    #[error("{what}: {detail}")]
    Network {
        /// What was being fetched.
        what: String,
        /// The error, without URLs.
        detail: String,
    },
    /// The server's answers contradict each other (sizes, ranges, hashes in headers).
    #[error("{path}: the server is inconsistent: {detail}")]
    Inconsistent {
        /// The repo file.
        path: String,
        /// What disagrees.
        detail: String,
    },
    /// The downloaded bytes do not hash to what the listing promised.
    #[error(
        "{path}: {algorithm} mismatch: the listing says {expected}, the bytes hash to {actual}"
    )]
    Integrity {
        /// The repo file.
        path: String,
        /// `sha256` or `git blob sha1`.
        algorithm: &'static str,
        /// The digest from the listing.
        expected: String,
        /// The digest of the downloaded bytes.
        actual: String,
    },
    /// A file name in the listing is unsafe to write.
    #[error("refusing the repo file name {path:?}: {reason}")]
    UnsafePath {
        /// The name (debug-quoted when printed).
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// The Hub sent something unparsable.
    #[error("{what}: unexpected answer from the Hub: {detail}")]
    Protocol {
        /// What was being fetched.
        what: String,
        /// What is wrong.
        detail: String,
    },
    /// Offline mode and the files are not local.
    #[error("HF_HUB_OFFLINE is set and {0}")]
    Offline(String),
    /// Reading or writing a local file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The manifest could not be written.
    #[error("writing the manifest: {0}")]
    Manifest(#[from] suite_support::manifest::ManifestError),
    /// Interrupted by a signal; partial files are kept for the next run.
    #[error("interrupted; finished ranges are kept and a rerun resumes")]
    Interrupted,
    /// Another hf-fetch is downloading into the same place.
    #[error("{}: another hf-fetch{holder} is downloading into it", dir.display())]
    Busy {
        /// The local dir or cache repo directory.
        dir: PathBuf,
        /// " (pid N)" when the lock file names it.
        holder: String,
    },
}

impl FetchError {
    /// An [`FetchError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        FetchError::Io {
            path: path.into(),
            source,
        }
    }

    /// The exit code (see `suite_support::exit`).
    pub fn exit_code(&self) -> i32 {
        match self {
            FetchError::Usage(_)
            | FetchError::RepoNotFound { .. }
            | FetchError::GatedNoToken { .. }
            | FetchError::GatedNoAccess { .. }
            | FetchError::BadToken
            | FetchError::RevisionNotFound { .. }
            | FetchError::EntryNotFound { .. }
            | FetchError::Disabled { .. }
            | FetchError::Offline(_)
            | FetchError::Busy { .. } => USAGE_ERROR,
            FetchError::Io { source, .. } => classify_io_error(source).0,
            FetchError::Manifest(_) => IO_ERROR,
            FetchError::Interrupted => INTERRUPTED,
            _ => DATA_ERROR,
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        let login = "pass a token with --token, HF_TOKEN or `hf auth login`";
        Some(match self {
            FetchError::RepoNotFound { .. } => {
                format!("check the repo id and --repo-type; for a private repo {login}")
            }
            FetchError::GatedNoToken { .. } => {
                format!("accept the repo's conditions on its Hub page, then {login}")
            }
            FetchError::GatedNoAccess { page, .. } => {
                format!("request access at {page} and wait for approval, or use a token of an approved account")
            }
            FetchError::BadToken => {
                "create a new token at https://huggingface.co/settings/tokens and pass it with --token or HF_TOKEN (or unset a stale one)".into()
            }
            FetchError::RevisionNotFound { .. } => {
                "check --revision: a branch, tag or 40-hex commit of the repo".into()
            }
            FetchError::EntryNotFound { .. } => {
                "check the file name (case-sensitive, relative to the repo root) and --revision".into()
            }
            FetchError::Http { status: 429, .. } => {
                "rate limited by the Hub: wait a few minutes and rerun (a token raises the quota)".into()
            }
            FetchError::Http { .. } | FetchError::Network { .. } => {
                "rerun to resume: finished ranges are kept".into()
            }
            FetchError::Integrity { .. } | FetchError::Inconsistent { .. } => {
                "the partial file was discarded; rerun, and report it if it persists (the server or a proxy is corrupting data)".into()
            }
            FetchError::UnsafePath { .. } => {
                "the repo holds a file name that cannot be written safely; exclude it with --exclude".into()
            }
            FetchError::Offline(_) => "unset HF_HUB_OFFLINE to download".into(),
            FetchError::Busy { .. } => {
                "wait for the other run to finish (or stop it; a rerun resumes its partial files), or download elsewhere".into()
            }
            FetchError::Io { source, .. } => return classify_io_error(source).1.map(str::to_string),
            _ => return None,
        })
    }
}

/// Result alias.
pub type Result<T, E = FetchError> = std::result::Result<T, E>;
