//! The API socket: creation, the accept loop and the HTTP/1.1 connections.
//!
//! The socket is bound under a temporary name, given its mode and group, then renamed into
//! place, so there is no instant at which it exists with looser permissions. The accept loop
//! is ours, not axum's `serve`, because it is where the peer credentials are: each accepted
//! connection's caller is read by SO_PEERCRED and judged once (`access`), and the verdict
//! rides on every request of the connection as an extension to the router (`routes`), which
//! answers a refused caller 403 and audits it at a bounded rate. The connection cap, the
//! head size and the head timeout are enforced here because they come before any request
//! exists for a tower layer to see.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tower::ServiceExt;

use super::routes::{self, Api};
use crate::audit::Who;
use mover_config::ApiSection;
use mover_format::constants::{
    API_CONNECTIONS_MAX, API_HEAD_BYTES_MAX, API_HEAD_TIMEOUT_S, API_REFUSAL_WINDOW_S,
};
use mover_format::error::{Error, Result};

/// Binds the socket at `path` with the configured mode and group.
pub fn bind(path: &Path, section: &ApiSection) -> Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io("create socket directory", dir, e))?;
        }
    }
    if path.exists() {
        // A live daemon answers; a stale socket file from a killed one does not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::Refused(format!(
                "{}: another daemon is listening on this socket",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| Error::io("remove stale socket", path, e))?;
    }
    let temp: PathBuf = {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{}.tmp", std::process::id()));
        name.into()
    };
    let _ = std::fs::remove_file(&temp);
    let listener = std::os::unix::net::UnixListener::bind(&temp)
        .map_err(|e| Error::io("bind API socket", &temp, e))?;
    let mode = section.socket_mode_bits().unwrap_or(0o660);
    let prepared = (|| {
        if let Some(group) = &section.socket_group {
            let gid = group_id(group)?;
            std::os::unix::fs::chown(&temp, None, Some(gid))
                .map_err(|e| Error::io("chown API socket", &temp, e))?;
        }
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("chmod API socket", &temp, e))?;
        std::fs::rename(&temp, path).map_err(|e| Error::io("place API socket", path, e))
    })();
    if let Err(e) = prepared {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("configure API socket", path, e))?;
    Ok(listener)
}

fn group_id(group: &str) -> Result<u32> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group)
        .map_err(|_| Error::Site(format!("api.socket_group {group:?}: not a group name")))?;
    // SAFETY: a valid C string; getgrnam returns a pointer into static storage (or null),
    // read at once on this thread.
    let entry = unsafe { libc::getgrnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(Error::Site(format!(
            "api.socket_group {group:?}: no such group on this machine"
        )));
    }
    // SAFETY: non-null pointer from getgrnam.
    Ok(unsafe { (*entry).gr_gid })
}

/// Serves the API until `shutdown` resolves; then stops accepting and removes the socket.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    api: Arc<Api>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(socket = %path.display(), error = %e, "API socket unusable");
            return;
        }
    };
    let app = routes::app(api.clone());
    // Connections, not requests, are what is scarce (a file descriptor and a task each, idle
    // or not), so the cap gates accept; tower's concurrency limit would only see requests.
    let slots = Arc::new(tokio::sync::Semaphore::new(API_CONNECTIONS_MAX));
    // Writes the counts of refusal windows that end while their caller is quiet.
    let sweeper = tokio::spawn({
        let api = api.clone();
        async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs(API_REFUSAL_WINDOW_S.div_ceil(4)));
            loop {
                tick.tick().await;
                tokio::task::block_in_place(|| api.sweep_refusals(false));
            }
        }
    });
    tokio::pin!(shutdown);
    loop {
        // Beyond the connection limit, callers wait in the listen backlog.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let caller = match stream.peer_cred() {
            Ok(cred) => Who {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid().unwrap_or(0),
            },
            Err(e) => {
                tracing::warn!(error = %e, "no peer credentials on an API connection; closing it");
                continue;
            }
        };
        let caller = api.access.caller(caller);
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let uid = caller.who.uid;
            let service = service_fn(move |mut request| {
                request.extensions_mut().insert(caller.clone());
                app.clone().oneshot(request)
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(API_HEAD_TIMEOUT_S))
                .max_buf_size(API_HEAD_BYTES_MAX)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(uid, error = %e, "API connection ended with an error");
            }
        });
    }
    sweeper.abort();
    tokio::task::block_in_place(|| api.sweep_refusals(true));
    let _ = std::fs::remove_file(&path);
    tracing::info!(socket = %path.display(), "API socket closed");
}
