//! `mover daemon`: the long-running process of a site. Today it serves peers over QUIC (the
//! receiving end of cross-site backups, manifest lookups and restores); the API socket joins
//! it with the scheduler issue.
//!
//! Threads: a multi-threaded tokio runtime with one thread per engine worker runs the QUIC
//! endpoint and the peer streams; the blocking parts of a stream (pack seal, fdatasync, index
//! commit) run in `block_in_place` so other streams keep moving.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;

use transport::tls::TrustStore;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::site::Site;

/// A daemon running on threads of this process (used by `mover quickstart` and tests of the
/// library); `mover daemon` runs the same service in the foreground.
pub struct Daemon {
    pub address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    /// Opens the site and starts serving peers; returns once the endpoint is bound.
    pub fn start(config_path: &Path) -> Result<Daemon> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let config_path = config_path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("mover-daemon".into())
            .spawn(move || {
                let outcome = serve(
                    &config_path,
                    |address| {
                        let _ = ready_tx.send(Ok(address));
                    },
                    |_trust| async {
                        let _ = stop_rx.await;
                    },
                );
                if let Err(e) = outcome {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| Error::Resource(format!("spawning the daemon thread: {e}")))?;
        let address = ready_rx
            .recv()
            .map_err(|_| Error::Resource("the daemon thread ended before it was ready".into()))??;
        Ok(Daemon {
            address,
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

/// Runs in the foreground until SIGTERM or SIGINT; SIGHUP reloads the peers.
pub fn run_foreground(config_path: &Path, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let reload_path = config_path.to_path_buf();
    serve(config_path, ready, |trust| async move {
        let (mut term, mut int, mut hup) = match (
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()),
        ) {
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
                _ = hup.recv() => reload(&reload_path, &trust),
            }
        }
    })
}

/// SIGHUP: re-reads the config; new peers are trusted (and removed ones refused) for new
/// connections. A config that does not parse changes nothing.
fn reload(config_path: &Path, trust: &TrustStore) {
    match Config::load(config_path) {
        Ok(config) => {
            trust.replace(crate::peers::trusted_peers(&config));
            tracing::info!(config = %config_path.display(), peers = config.peers.len(), "reloaded peers");
        }
        Err(e) => tracing::error!(
            config = %config_path.display(),
            error = %e,
            "reload failed; keeping the running configuration"
        ),
    }
}

fn serve<F, Fut>(config_path: &Path, ready: impl FnOnce(SocketAddr), shutdown: F) -> Result<()>
where
    F: FnOnce(TrustStore) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let site = Arc::new(Site::open_config(config_path)?);
    let listen = site.config.site.listen.clone().ok_or_else(|| {
        Error::Site(format!(
            "{}: site.listen is not set: expected HOST:PORT for peers to connect to",
            config_path.display()
        ))
    })?;
    let listen = listen
        .to_socket_addrs()
        .map_err(|e| Error::Site(format!("site.listen {listen:?}: {e}")))?
        .next()
        .ok_or_else(|| Error::Site(format!("site.listen {listen:?} resolves to nothing")))?;
    let threads = match site.config.engine.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("mover-peer")
        .enable_all()
        .build()
        .map_err(|e| Error::Resource(format!("starting the daemon runtime: {e}")))?;
    let credentials = crate::peers::credentials(&site)?;
    let trust = crate::peers::trust_of(&site.config);
    runtime.block_on(async move {
        let settings = transport::quic::LinkSettings::for_address(&listen);
        let endpoint = transport::quic::server(listen, &credentials, trust.clone(), &settings)
            .map_err(|e| Error::Site(format!("listening on {listen}: {e}")))?;
        let address = endpoint
            .local_addr()
            .map_err(|e| Error::io("local address of", config_path, e))?;
        tracing::info!(site = %site.name(), %address, peers = site.config.peers.len(), "serving peers");
        ready(address);
        let shutdown = shutdown(trust.clone());
        crate::remote::serve::accept_loop(site, endpoint, trust, shutdown).await;
        Ok(())
    })
}
