//! The CLI's side of the API socket: one request, one JSON answer.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket (or we may not open it).
    #[error("daemon unreachable at {}: {source} (is `mover daemon` running? pass --socket PATH or set MOVER_SOCKET; or run in-process with --site-dir DIR)", socket.display())]
    Unreachable {
        socket: PathBuf,
        source: std::io::Error,
    },
    /// The daemon answered with an error status.
    #[error("{reason}")]
    Refused { status: StatusCode, reason: String },
    #[error("talking to the daemon at {}: {detail}", socket.display())]
    Protocol { socket: PathBuf, detail: String },
}

/// Where the CLI finds the daemon: `--socket`, else `$MOVER_SOCKET`, else the default.
pub fn socket_path(flag: Option<&Path>) -> PathBuf {
    if let Some(path) = flag {
        return path.to_path_buf();
    }
    match std::env::var_os("MOVER_SOCKET") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(mover_format::constants::API_SOCKET_DEFAULT),
    }
}

pub struct Client {
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    pub fn new(socket: PathBuf) -> Result<Client, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Protocol {
                socket: socket.clone(),
                detail: format!("starting a runtime: {e}"),
            })?;
        Ok(Client { socket, runtime })
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.request(Method::GET, path, None).map(|(_, v)| v)
    }

    /// Sends one request; a 2xx answer comes back as its status and JSON body, anything
    /// else as `Refused` carrying the daemon's reason.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let protocol = |detail: String| ClientError::Protocol {
            socket: self.socket.clone(),
            detail,
        };
        self.runtime.block_on(async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Unreachable {
                    socket: self.socket.clone(),
                    source,
                })?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| protocol(e.to_string()))?;
            tokio::spawn(connection);
            let body = match body {
                Some(v) => Bytes::from(serde_json::to_vec(v).expect("JSON values serialise")),
                None => Bytes::new(),
            };
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "mover")
                .header("content-type", "application/json")
                .body(Full::new(body))
                .map_err(|e| protocol(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| protocol(e.to_string()))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| protocol(e.to_string()))?
                .to_bytes();
            let value: Value = if path == "/metrics" {
                Value::String(String::from_utf8_lossy(&bytes).into_owned())
            } else {
                serde_json::from_slice(&bytes)
                    .map_err(|e| protocol(format!("answer is not JSON ({e})")))?
            };
            if status.is_success() {
                Ok((status, value))
            } else {
                let reason = value
                    .get("error")
                    .and_then(|e| e.as_str())
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("the daemon answered {status}"));
                Err(ClientError::Refused { status, reason })
            }
        })
    }
}
