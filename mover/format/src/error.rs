//! The engine's error type. Every variant renders as one line naming the thing and what was
//! expected, because that line is what the CLI prints and what lands in a job's result.
//!
//! Code that decides something from an error (retry a job, answer a peer with an error code,
//! end a job cancelled) asks [`Error::kind`] and [`Error::is_transient`], never the text.

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
    /// The redb database failed. `path` is `index.redb` where it is known: [`Error::in_index`]
    /// names it where the caller knows the site (the index's own calls know nothing of it).
    #[error("index database{}: {source}", path.as_ref().map(|p| format!(" {}", escaped(&p.to_string_lossy()))).unwrap_or_default())]
    Index {
        path: Option<PathBuf>,
        #[source]
        source: redb::Error,
    },
    /// A chunk a manifest (or a peer) names is not in this site's index. Damage to the site
    /// that holds the manifest; to a peer asking for it, simply not found.
    #[error("corrupt chunk {chunk}: not in the index (missing from the store)")]
    ChunkMissing { chunk: String },
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

/// What went wrong, for code that decides on it (retries, peer error codes, exit codes,
/// metrics); the message is for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A file system call failed (other than running out of space).
    Io,
    /// The configuration is wrong (file:line:column says where).
    Config,
    /// The site cannot be opened or served as configured.
    Site,
    /// What was asked for does not exist (snapshot, chunk, job).
    NotFound,
    /// Not allowed now or at all (in use, policy, refused by a check).
    Refused,
    /// Stored bytes failed a check.
    Corrupt,
    /// The index database failed.
    Index,
    /// A limit of this machine (memory lock, threads, runtime) stopped it.
    Resource,
    /// Asked to stop.
    Cancelled,
    /// A peer site could not be reached, refused us, or broke the protocol.
    Peer,
    /// A disk (or quota) is full: ENOSPC or EDQUOT, here or in the index.
    NoSpace,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::Config => "config",
            ErrorKind::Site => "site",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Refused => "refused",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Index => "index",
            ErrorKind::Resource => "resource",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Peer => "peer",
            ErrorKind::NoSpace => "no_space",
        }
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
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

    /// What went wrong, for code that decides on it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } if is_no_space(source) => ErrorKind::NoSpace,
            Error::Io { .. } => ErrorKind::Io,
            Error::Config { .. } => ErrorKind::Config,
            Error::Site(_) => ErrorKind::Site,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::NotFound(_) | Error::ChunkMissing { .. } => ErrorKind::NotFound,
            Error::Refused(_) => ErrorKind::Refused,
            Error::Index { source, .. } => match source {
                redb::Error::Io(e) if is_no_space(e) => ErrorKind::NoSpace,
                redb::Error::DatabaseAlreadyOpen => ErrorKind::Refused,
                _ => ErrorKind::Index,
            },
            Error::Resource(_) => ErrorKind::Resource,
            Error::Cancelled(_) => ErrorKind::Cancelled,
            Error::Peer { .. } => ErrorKind::Peer,
        }
    }

    /// Whether running the job again later may succeed without anyone changing anything:
    /// only a peer that is restarting or a path that dropped. A full disk, a refusal or
    /// damage needs someone to act first.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Peer {
                transient: true,
                ..
            }
        )
    }

    /// An index error with the database's path, when it did not name one yet.
    pub fn in_index(self, index_path: &Path) -> Self {
        match self {
            Error::Index { path: None, source } => Error::Index {
                path: Some(index_path.to_path_buf()),
                source,
            },
            other => other,
        }
    }

    /// An index error of the database at `path`.
    pub fn index(path: &Path, source: impl Into<redb::Error>) -> Self {
        Error::Index {
            path: Some(path.to_path_buf()),
            source: source.into(),
        }
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
                Error::Index {
                    path: None,
                    source: e.into(),
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn io(errno: i32) -> Error {
        Error::io("append", "/t/p", std::io::Error::from_raw_os_error(errno))
    }

    #[test]
    fn an_error_stays_small_enough_to_return() {
        // clippy's result_large_err bound: every `Result` of the engine carries one.
        assert!(
            std::mem::size_of::<Error>() <= 128,
            "{}",
            std::mem::size_of::<Error>()
        );
    }

    #[test]
    fn each_error_has_its_kind() {
        let cases = [
            (io(libc::EIO), ErrorKind::Io),
            (io(libc::ENOSPC), ErrorKind::NoSpace),
            (io(libc::EDQUOT), ErrorKind::NoSpace),
            (
                Error::Config {
                    path: "m.toml".into(),
                    line: 1,
                    column: 2,
                    message: "x".into(),
                },
                ErrorKind::Config,
            ),
            (Error::Site("x".into()), ErrorKind::Site),
            (Error::corrupt("pack 1", "bad"), ErrorKind::Corrupt),
            (Error::NotFound("snapshot x".into()), ErrorKind::NotFound),
            (
                Error::ChunkMissing { chunk: "ab".into() },
                ErrorKind::NotFound,
            ),
            (Error::Refused("x".into()), ErrorKind::Refused),
            (
                Error::from(redb::StorageError::Corrupted("x".into())),
                ErrorKind::Index,
            ),
            (
                Error::from(redb::StorageError::Io(std::io::Error::from_raw_os_error(
                    libc::ENOSPC,
                ))),
                ErrorKind::NoSpace,
            ),
            (
                Error::from(redb::DatabaseError::DatabaseAlreadyOpen),
                ErrorKind::Refused,
            ),
            (Error::Resource("x".into()), ErrorKind::Resource),
            (Error::Cancelled("x".into()), ErrorKind::Cancelled),
            (Error::peer("b", "refused"), ErrorKind::Peer),
            (Error::peer_transient("b", "restarting"), ErrorKind::Peer),
        ];
        for (error, kind) in cases {
            assert_eq!(error.kind(), kind, "{error}");
        }
    }

    #[test]
    fn only_a_transient_peer_failure_is_worth_a_retry() {
        assert!(Error::peer_transient("b", "is shutting down").is_transient());
        for permanent in [
            Error::peer("b", "refused: tier full"),
            io(libc::ENOSPC),
            io(libc::EIO),
            Error::Resource("x".into()),
            Error::Cancelled("x".into()),
            Error::from(redb::StorageError::Corrupted("x".into())),
        ] {
            assert!(!permanent.is_transient(), "{permanent}");
        }
    }

    #[test]
    fn an_index_error_names_the_database_and_keeps_redb_as_its_source() {
        let e = Error::from(redb::StorageError::Corrupted("bad page".into()));
        let text = e.to_string();
        assert!(
            text.starts_with("index database: ") && text.ends_with("bad page"),
            "{text}"
        );
        let e = e.in_index(Path::new("/s/index.redb"));
        let text = e.to_string();
        assert!(text.starts_with("index database /s/index.redb: "), "{text}");
        let source = std::error::Error::source(&e).expect("redb's error is the source");
        assert!(source.downcast_ref::<redb::Error>().is_some());
        // A path already named stays.
        let e = e.in_index(Path::new("/other"));
        assert!(e.to_string().contains("/s/index.redb"), "{e}");
    }
}
