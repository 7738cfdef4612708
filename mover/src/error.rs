//! The engine's error type. Every variant renders as one line naming the thing and what was
//! expected, because that line is what the CLI prints and what lands in a job's result.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {}: {source}", escaped(&path.to_string_lossy()))]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", escaped(&path.to_string_lossy()))]
    Config {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{0}")]
    Site(String),
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("{0}")]
    NotFound(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("index database: {0}")]
    Index(String),
    #[error("{0}")]
    Resource(String),
    /// The job was asked to stop (cancelled, or the daemon is draining); what it committed so
    /// far stays committed.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A peer site could not be reached, refused us, or broke the protocol. `transient`: the
    /// cause passes by itself (the peer is restarting, the path dropped), so a daemon job that
    /// failed with it is queued again with a backoff instead of failing.
    #[error("peer {site}: {detail}")]
    Peer {
        site: String,
        detail: String,
        transient: bool,
    },
}

/// `text` with control characters (NUL, newline, escape, ...) written as Rust escapes
/// (`\u{0}`, `\n`, `\u{1b}`), so a name cannot break a line or drive a terminal.
pub fn escaped(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

impl Error {
    pub fn io(op: &'static str, path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A peer failure that retrying will not fix (refused, protocol broken, peer disk full).
    pub fn peer(site: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Error::Peer {
            site: site.into(),
            detail: detail.to_string(),
            transient: false,
        }
    }

    /// A peer failure that passes by itself: unreachable, shutting down, connection lost.
    pub fn peer_transient(site: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Error::Peer {
            site: site.into(),
            detail: detail.to_string(),
            transient: true,
        }
    }

    /// Whether running the job again later may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Peer {
                transient: true,
                ..
            }
        )
    }

    pub fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

macro_rules! index_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Index(e.to_string())
            }
        }
    )*};
}
index_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T, E = Error> = std::result::Result<T, E>;
