//! `mover daemon`: the long-running process of a site. It serves peers over QUIC (the
//! receiving end of cross-site backups, manifest lookups and restores) and callers on the
//! API socket (jobs, snapshots, sites, metrics), and runs the job queue.
//!
//! Threads: a multi-threaded tokio runtime with one thread per engine worker runs the QUIC
//! endpoint (the one the peers connect to and the jobs dial from), the peer streams, the
//! jobs' Control and Fetch connections and the API connections; the blocking parts of a
//! stream (pack seal, fdatasync, index commit) run in `block_in_place` so other streams keep
//! moving. Each running job has its own thread, which blocks on its network work through the
//! runtime's handle (a backup also starts its pinned workers, each with its own ring and, for
//! a peer, its own endpoint).
//!
//! Signals: SIGTERM/SIGINT drain (the socket closes, running jobs checkpoint and go back to
//! the queue, the process exits 0); SIGHUP reloads peers and API access from the config.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use transport::tls::TrustStore;

use crate::api::access::Access;
use crate::api::routes::Api;
use crate::audit::{AuditLog, Who};
use crate::jobs::Board;
use mover_config::Config;
use mover_engine::site::Site;
use mover_format::constants::DRAIN_WAIT_S;
use mover_format::error::{Error, Result};

/// The audit log of a site: `DIR/audit.log` (and `audit.log.head`).
pub const AUDIT_FILE_NAME: &str = "audit.log";

/// What a started daemon serves.
#[derive(Clone, Debug)]
pub struct Ready {
    /// The QUIC endpoint peers connect to (absent when `site.listen` is not set).
    pub peers: Option<SocketAddr>,
    /// The API socket (absent for an in-process daemon without `site.socket`).
    pub socket: Option<PathBuf>,
}

/// Whether the daemon opens the API socket.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ApiMode {
    /// `mover daemon`: the configured socket, or the default under /run/mover.
    Always,
    /// In-process (quickstart): only a socket the config names.
    IfConfigured,
}

/// A daemon running on threads of this process (used by `mover quickstart` and tests of the
/// library); `mover daemon` runs the same service in the foreground.
pub struct Daemon {
    pub address: SocketAddr,
    pub socket: Option<PathBuf>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    /// Opens the site and starts serving peers; returns once the endpoint is bound.
    pub fn start(config_path: &Path) -> Result<Daemon> {
        let config_path_text = config_path.display().to_string();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let config_path = config_path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("mover-daemon".into())
            .spawn(move || {
                let outcome = serve(
                    &config_path,
                    ApiMode::IfConfigured,
                    |ready| {
                        let _ = ready_tx.send(Ok(ready));
                    },
                    |_reload| async {
                        let _ = stop_rx.await;
                    },
                );
                if let Err(e) = outcome {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| Error::Resource(format!("spawning the daemon thread: {e}")))?;
        let ready = ready_rx
            .recv()
            .map_err(|_| Error::Resource("the daemon thread ended before it was ready".into()))??;
        let address = ready.peers.ok_or_else(|| {
            Error::Site(format!(
                "{}: site.listen is not set: expected HOST:PORT for peers to connect to",
                config_path_text
            ))
        })?;
        Ok(Daemon {
            address,
            socket: ready.socket,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Stops accepting, closes connections and waits for the service to end.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Runs in the foreground until SIGTERM or SIGINT (drain, then exit); SIGHUP reloads.
pub fn run_foreground(config_path: &Path, ready: impl FnOnce(&Ready)) -> Result<()> {
    serve(
        config_path,
        ApiMode::Always,
        |r| ready(&r),
        |reload: Reload| {
            // Installed now, when `serve` makes the stop future (before the ready line),
            // not when it is first polled: an early SIGTERM must drain, not kill.
            let signals = (
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()),
            );
            async move {
                let (mut term, mut int, mut hup) = match signals {
                    (Ok(t), Ok(i), Ok(h)) => (t, i, h),
                    _ => {
                        tracing::error!("could not install signal handlers; stopping");
                        return;
                    }
                };
                loop {
                    tokio::select! {
                        _ = term.recv() => { tracing::info!("SIGTERM: draining and stopping"); return; }
                        _ = int.recv() => { tracing::info!("SIGINT: draining and stopping"); return; }
                        _ = hup.recv() => reload.apply(),
                    }
                }
            }
        },
    )
}

/// What SIGHUP reloads: the peers jobs may use, the peers trusted to connect, who may call.
pub struct Reload {
    config_path: PathBuf,
    site: Arc<Site>,
    trust: TrustStore,
    api: Option<Arc<Api>>,
    board: Arc<Board>,
}

impl Reload {
    /// Re-reads the config. One that does not parse changes nothing; either way the result
    /// is logged and audited.
    fn apply(&self) {
        let path = &self.config_path;
        match Config::load(path) {
            Ok(config) => {
                self.site.links.reload(&config.peers);
                self.trust
                    .replace(mover_peer::peers::trusted_peers(&config));
                if let Some(api) = &self.api {
                    api.access.replace(config.api.clone());
                }
                tracing::info!(config = %path.display(), peers = config.peers.len(), "SIGHUP: reloaded peers and API access");
                self.board.audit_event(
                    Who::this_process(),
                    "config.reload",
                    &path.display().to_string(),
                    "ok",
                    serde_json::json!({"peers": config.peers.keys().collect::<Vec<_>>()}),
                );
            }
            Err(e) => self.failed(&e),
        }
    }

    fn failed(&self, e: &Error) {
        let path = &self.config_path;
        tracing::error!(config = %path.display(), error = %e, "SIGHUP: reload failed; keeping the running configuration");
        self.board.audit_event(
            Who::this_process(),
            "config.reload",
            &path.display().to_string(),
            "failed",
            serde_json::json!({"error": e.to_string()}),
        );
    }
}

fn serve<F, Fut>(
    config_path: &Path,
    api_mode: ApiMode,
    ready: impl FnOnce(Ready),
    shutdown: F,
) -> Result<()>
where
    F: FnOnce(Reload) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let site = Arc::new(Site::open_config(config_path)?);
    let listen = match &site.config.site.listen {
        Some(listen) => Some(
            listen
                .to_socket_addrs()
                .map_err(|e| Error::Site(format!("site.listen {listen:?}: {e}")))?
                .next()
                .ok_or_else(|| {
                    Error::Site(format!("site.listen {listen:?} resolves to nothing"))
                })?,
        ),
        None => None,
    };
    let socket = match (api_mode, &site.config.site.socket) {
        (ApiMode::Always, _) => Some(site.config.socket_path()),
        (ApiMode::IfConfigured, Some(path)) => Some(path.clone()),
        (ApiMode::IfConfigured, None) => None,
    };
    if listen.is_none() && socket.is_none() {
        return Err(Error::Site(format!(
            "{}: site.listen is not set: expected HOST:PORT for peers to connect to",
            config_path.display()
        )));
    }
    let audit = Arc::new(AuditLog::open(&site.dir.join(AUDIT_FILE_NAME))?);
    let threads = site.config.workers();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("mover-daemon")
        .enable_all()
        .build()
        .map_err(|e| Error::Resource(format!("starting the daemon runtime: {e}")))?;
    let credentials = mover_peer::peers::credentials(&site)?;
    let trust = mover_peer::peers::trust_of(&site.config);
    // The one endpoint of the process: peers connect to it and jobs dial from it (Control,
    // Fetch and replication connections), on this runtime. Set on the site before the job
    // board starts, since the board resumes interrupted jobs at once.
    let endpoint = match listen {
        Some(listen) => {
            let _entered = runtime.enter();
            let settings = transport::quic::LinkSettings::for_address(&listen);
            Some(
                transport::quic::server(listen, &credentials, trust.clone(), &settings)
                    .map_err(|e| Error::Site(format!("listening on {listen}: {e}")))?,
            )
        }
        None => None,
    };
    let dial_from = match &endpoint {
        Some(endpoint) => endpoint.clone(),
        None => mover_peer::remote::net::Net::client_endpoint_for_daemon(runtime.handle())?,
    };
    site.set_net(Arc::new(mover_peer::remote::net::Net::of_daemon(
        runtime.handle().clone(),
        dial_from,
    )))?;
    let listener = match &socket {
        Some(path) => Some(crate::api::server::bind(path, &site.config.api)?),
        None => None,
    };
    // The queue starts (and resumes interrupted jobs) only once the socket is ours.
    let board = Board::open(site.clone(), audit.clone())?;
    board.audit_event(
        Who::this_process(),
        "daemon.start",
        &config_path.display().to_string(),
        "ok",
        serde_json::json!({"socket": socket, "listen": listen.map(|a| a.to_string()), "version": env!("CARGO_PKG_VERSION")}),
    );
    let api = socket.as_ref().map(|path| {
        Arc::new(Api::new(
            board.clone(),
            Access::new(site.config.api.clone()),
            path.clone(),
        ))
    });
    let outcome = runtime.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // Peers are served until the jobs drained: the jobs' own connections share the
        // endpoint, which the accept loop closes when it stops.
        let (peers_stop_tx, peers_stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut tasks = Vec::new();
        let mut address = None;
        if let Some(endpoint) = endpoint {
            address = Some(
                endpoint
                    .local_addr()
                    .map_err(|e| Error::io("local address of", config_path, e))?,
            );
            tracing::info!(site = %site.name(), address = ?address, peers = site.config.peers.len(), "serving peers");
            tasks.push(tokio::spawn(mover_peer::remote::serve::accept_loop(
                site.store().clone(),
                site.links.clone(),
                endpoint,
                trust.clone(),
                stopped(peers_stop_rx),
            )));
        }
        if let (Some(listener), Some(api), Some(path)) = (listener, &api, &socket) {
            tracing::info!(socket = %path.display(), "serving the API");
            tasks.push(tokio::spawn(crate::api::server::serve(
                listener,
                path.clone(),
                api.clone(),
                stopped(stop_rx.clone()),
            )));
        }
        // The stop future is made before anyone is told the daemon is ready: a caller that
        // signals as soon as it reads the ready line must find the handlers installed.
        let stop = shutdown(Reload {
            config_path: config_path.to_path_buf(),
            site: site.clone(),
            trust: trust.clone(),
            api: api.clone(),
            board: board.clone(),
        });
        ready(Ready {
            peers: address,
            socket: socket.clone(),
        });
        stop.await;
        // Drain: no new callers; running jobs checkpoint (their committed work stays) and
        // go back to the queue; then peers are closed.
        let _ = stop_tx.send(true);
        let drain_board = board.clone();
        let left = tokio::task::spawn_blocking(move || {
            drain_board.drain(Duration::from_secs(DRAIN_WAIT_S))
        })
        .await
        .unwrap_or_default();
        if !left.is_empty() {
            tracing::warn!(jobs = ?left, "jobs still running after the drain limit; they resume at the next start");
        }
        let _ = peers_stop_tx.send(true);
        for task in tasks {
            let _ = task.await;
        }
        Ok::<_, Error>(())
    });
    board.audit_event(
        Who::this_process(),
        "daemon.stop",
        &config_path.display().to_string(),
        if outcome.is_ok() { "ok" } else { "failed" },
        serde_json::Value::Null,
    );
    drop(runtime);
    outcome
}
