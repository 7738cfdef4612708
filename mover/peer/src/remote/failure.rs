//! Why the server closed a peer's stream: the error code and reason sent to the peer (and
//! logged), from whichever part of the server stopped it.

use transport::frame::ErrorCode;
use transport::quic::ReadError;

use super::attempts::Superseded;
use mover_format::error::{Error, ErrorKind};

/// Why a stream was closed: the code and reason go to the peer and into our log.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) code: ErrorCode,
    pub(super) reason: String,
}

impl Failure {
    pub(super) fn protocol(reason: impl std::fmt::Display) -> Failure {
        Failure {
            code: ErrorCode::Protocol,
            reason: reason.to_string(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let code = match e.kind() {
            ErrorKind::NoSpace => ErrorCode::NoSpace,
            ErrorKind::NotFound => ErrorCode::NotFound,
            ErrorKind::Refused => ErrorCode::Refused,
            ErrorKind::Corrupt => ErrorCode::Corrupt,
            ErrorKind::Io
            | ErrorKind::Config
            | ErrorKind::Site
            | ErrorKind::Index
            | ErrorKind::Resource
            | ErrorKind::Cancelled
            | ErrorKind::Peer => ErrorCode::Internal,
        };
        Failure {
            code,
            reason: e.to_string(),
        }
    }
}

impl From<Superseded> for Failure {
    fn from(s: Superseded) -> Failure {
        Failure {
            code: ErrorCode::Superseded,
            reason: s.to_string(),
        }
    }
}

impl From<quinn::WriteError> for Failure {
    fn from(e: quinn::WriteError) -> Failure {
        Failure::protocol(format!("writing to the stream: {e}"))
    }
}

impl From<ReadError> for Failure {
    fn from(e: ReadError) -> Failure {
        Failure::protocol(e)
    }
}
