//! The process's QUIC endpoint and the tokio runtime that drives it: every Control, Fetch and
//! replication connection of the process is dialled from here, so a daemon holds one UDP
//! socket whatever the number of jobs, and no job builds a runtime of its own.
//!
//! - A daemon's `Net` is its server endpoint (peers connect to it, and it dials out too, with
//!   a client config per connection) on the daemon's runtime. Where the server's bound
//!   address cannot reach a peer (a daemon listening on loopback, dialling a remote peer, or
//!   another address family), a client endpoint of the same runtime is made once for it.
//! - Any other process (an in-process command, `mover bench`) gets one `Net` on first use: a
//!   runtime with one thread and one client endpoint, kept for the life of the process.
//!
//! Not here: a cross-site backup's workers each dial from an endpoint of their own, on their
//! own tokio-uring ring, so each worker's connection is driven on the worker's core
//! (thread-per-core shipping; see ARCHITECTURE.md, "Threading model").

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use transport::quic::{LinkSettings, QuicError};
use transport::tls::SiteCredentials;

use crate::peers::Link;
use mover_format::error::{Error, Result};

/// How long a connection a job finished with is kept for the next job (or the next stream of
/// the same job: a restore's Fetch after its manifest lookup) to the same peer. Short: a kept
/// connection holds one of the peer's connection slots, and its keep-alives would hold it
/// for ever.
const KEPT_FOR: Duration = Duration::from_secs(5);

/// A connection a job finished with, kept for [`KEPT_FOR`].
struct Kept {
    key: String,
    connection: quinn::Connection,
    since: Instant,
}

/// Connections of the shared endpoint kept between jobs.
#[derive(Clone, Default)]
struct Pool(Arc<Mutex<Vec<Kept>>>);

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Kept>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kept, still open connection for `key`; closes the ones whose time is up.
    fn take(&self, key: &str) -> Option<quinn::Connection> {
        let mut kept = self.lock();
        Self::expire(&mut kept);
        let at = kept.iter().position(|k| k.key == key)?;
        Some(kept.swap_remove(at).connection)
    }

    fn expire(kept: &mut Vec<Kept>) {
        kept.retain(|k| {
            let keep = k.since.elapsed() < KEPT_FOR && k.connection.close_reason().is_none();
            if !keep {
                transport::quic::close_done(&k.connection);
            }
            keep
        });
    }
}

/// A connection to a peer and, when it has an endpoint of its own, that endpoint.
pub struct Dialed {
    pub connection: quinn::Connection,
    /// Set for a worker's connection (its endpoint goes with it); `None` on a shared endpoint.
    own_endpoint: Option<quinn::Endpoint>,
    /// A shared endpoint's connection goes back here when the job is done with it.
    kept: Option<(Pool, String, tokio::runtime::Handle)>,
    /// The connection's UDP bytes (sent, received) when this job took it.
    baseline: (u64, u64),
}

impl Dialed {
    /// A connection on an endpoint of its own (closed with it).
    pub fn own(endpoint: quinn::Endpoint, connection: quinn::Connection) -> Dialed {
        Dialed {
            connection,
            own_endpoint: Some(endpoint),
            kept: None,
            baseline: (0, 0),
        }
    }

    /// UDP bytes (sent, received) of the connection since this job took it.
    pub fn wire_bytes(&self) -> (u64, u64) {
        let stats = self.connection.stats();
        (
            stats.udp_tx.bytes.saturating_sub(self.baseline.0),
            stats.udp_rx.bytes.saturating_sub(self.baseline.1),
        )
    }

    /// The job is done with the connection and every stream it opened ended well: a shared
    /// endpoint's connection is kept for [`KEPT_FOR`] for the next job to the same peer
    /// (closed after), a worker's is closed with its endpoint.
    pub async fn done(&self) {
        match &self.kept {
            Some((pool, key, handle)) if self.connection.close_reason().is_none() => {
                pool.lock().push(Kept {
                    key: key.clone(),
                    connection: self.connection.clone(),
                    since: Instant::now(),
                });
                let pool = pool.clone();
                handle.spawn(async move {
                    tokio::time::sleep(KEPT_FOR).await;
                    Pool::expire(&mut pool.lock());
                });
            }
            _ => self.hang_up().await,
        }
    }

    /// Closes the connection: its own endpoint is turned briefly so the close leaves
    /// ([`transport::quic::hang_up`]); a shared endpoint's driver sends it by itself.
    pub async fn hang_up(&self) {
        match &self.own_endpoint {
            Some(endpoint) => transport::quic::hang_up(endpoint, &self.connection).await,
            None => transport::quic::close_done(&self.connection),
        }
    }
}

/// One endpoint (and, where needed, one more per unreachable kind of address) and the
/// runtime driving them.
pub struct Net {
    handle: tokio::runtime::Handle,
    endpoint: quinn::Endpoint,
    /// Client endpoints for peers `endpoint` cannot reach (by address family and loopback),
    /// made on first use.
    others: Mutex<Vec<(Reach, quinn::Endpoint)>>,
    /// Connections jobs finished with, kept a few seconds for the next one.
    kept: Pool,
    /// Owned by a non-daemon process's `Net` (the daemon owns its own runtime).
    _runtime: Option<tokio::runtime::Runtime>,
}

/// The `Net` of a process that is not a daemon ([`Net::of_process`]).
static PROCESS_NET: OnceLock<Arc<Net>> = OnceLock::new();

/// What kind of address an endpoint reaches.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Reach {
    ipv4: bool,
    loopback: bool,
}

impl Reach {
    fn of(address: &SocketAddr) -> Reach {
        Reach {
            ipv4: address.is_ipv4(),
            loopback: address.ip().is_loopback(),
        }
    }
}

/// Whether an endpoint bound to `bound` can send to `peer`: same family, and a loopback
/// address only reaches loopback (a wildcard or interface address reaches anything routed).
fn reaches(bound: &SocketAddr, peer: &SocketAddr) -> bool {
    bound.is_ipv4() == peer.is_ipv4()
        && (bound.ip().is_unspecified() || bound.ip().is_loopback() == peer.ip().is_loopback())
}

impl Net {
    /// A daemon's: `endpoint` (its server endpoint, or a client one without `site.listen`)
    /// on the daemon's runtime.
    pub fn of_daemon(handle: tokio::runtime::Handle, endpoint: quinn::Endpoint) -> Net {
        Net {
            handle,
            endpoint,
            others: Mutex::new(Vec::new()),
            kept: Pool::default(),
            _runtime: None,
        }
    }

    /// This process's `Net` for processes that are not a daemon, made on first use.
    pub fn of_process() -> Result<Arc<Net>> {
        static MAKING: Mutex<()> = Mutex::new(());
        if let Some(net) = PROCESS_NET.get() {
            return Ok(net.clone());
        }
        let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(net) = PROCESS_NET.get() {
            return Ok(net.clone());
        }
        // Multi-thread with one worker: its thread drives the connections while the caller's
        // thread blocks on a future with `block_on`.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mover-net")
            .enable_all()
            .build()
            .map_err(|e| Error::Resource(format!("starting the network runtime: {e}")))?;
        let any: SocketAddr = "0.0.0.0:0".parse().expect("literal");
        let endpoint = {
            let _entered = runtime.enter();
            client_endpoint(&any)?
        };
        let net = Arc::new(Net {
            handle: runtime.handle().clone(),
            endpoint,
            others: Mutex::new(Vec::new()),
            kept: Pool::default(),
            _runtime: Some(runtime),
        });
        let _ = PROCESS_NET.set(net.clone());
        Ok(net)
    }

    /// Closes the connections the process's `Net` keeps, if it was made: a command calls this
    /// before it exits, so its peers free their connection slots at once, not at their idle
    /// timeout.
    pub fn close_process() {
        let Some(net) = PROCESS_NET.get() else {
            return;
        };
        let kept = std::mem::take(&mut *net.kept.lock());
        if kept.is_empty() {
            return;
        }
        for k in &kept {
            transport::quic::close_done(&k.connection);
        }
        // One turn of the endpoint's driver sends the closes (as `quic::hang_up`).
        let endpoint = net.endpoint.clone();
        net.block_on(async move {
            let _ = tokio::time::timeout(Duration::from_millis(5), endpoint.wait_idle()).await;
        });
    }

    /// A client endpoint for a daemon without `site.listen`, on its runtime.
    pub fn client_endpoint_for_daemon(handle: &tokio::runtime::Handle) -> Result<quinn::Endpoint> {
        let _entered = handle.enter();
        client_endpoint(&"0.0.0.0:0".parse().expect("literal"))
    }

    /// Runs `future` to completion on the calling thread while the runtime drives the
    /// connections. Called from job threads and a command's main thread, never from inside
    /// the runtime.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.handle.block_on(future)
    }

    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }

    /// The endpoints' local addresses (the daemon's server endpoint first).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs: Vec<SocketAddr> = self.endpoint.local_addr().into_iter().collect();
        let others = self.others.lock().unwrap_or_else(|e| e.into_inner());
        addrs.extend(others.iter().filter_map(|(_, e)| e.local_addr().ok()));
        addrs
    }

    /// A connection to `link` from the process's endpoint: one a job finished with in the
    /// last seconds (same peer, address, pin and settings), else a new one. Must run on this
    /// `Net`'s runtime.
    pub async fn dial(&self, link: &Link, credentials: &SiteCredentials) -> Result<Dialed> {
        let key = format!(
            "{}|{}|{:?}|{:?}",
            link.site, link.address, link.fingerprint, link.settings
        );
        let kept = Some((self.kept.clone(), key.clone(), self.handle.clone()));
        if let Some(connection) = self.kept.take(&key) {
            let stats = connection.stats();
            return Ok(Dialed {
                connection,
                own_endpoint: None,
                kept,
                baseline: (stats.udp_tx.bytes, stats.udp_rx.bytes),
            });
        }
        let endpoint = self.endpoint_for(&link.address)?;
        let config = transport::quic::client_config(
            credentials,
            &link.site,
            link.fingerprint,
            &link.settings,
        )
        .map_err(|e| super::ship::connect_error(link, credentials, e))?;
        let connection = transport::quic::connect_on(&endpoint, config, &link.site, link.address)
            .await
            .map_err(|e| super::ship::connect_error(link, credentials, e))?;
        Ok(Dialed {
            connection,
            own_endpoint: None,
            kept,
            baseline: (0, 0),
        })
    }

    fn endpoint_for(&self, peer: &SocketAddr) -> Result<quinn::Endpoint> {
        if self
            .endpoint
            .local_addr()
            .is_ok_and(|bound| reaches(&bound, peer))
        {
            return Ok(self.endpoint.clone());
        }
        let reach = Reach::of(peer);
        let mut others = self.others.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, endpoint)) = others.iter().find(|(r, _)| *r == reach) {
            return Ok(endpoint.clone());
        }
        let _entered = self.handle.enter();
        let endpoint = client_endpoint(peer)?;
        others.push((reach, endpoint.clone()));
        Ok(endpoint)
    }
}

/// A client endpoint of the family of `peer`, with the default socket buffers and batches
/// sized for Ethernet datagrams (larger ones are split into sends that fit,
/// `transport::gso`).
fn client_endpoint(peer: &SocketAddr) -> Result<quinn::Endpoint> {
    let ethernet: SocketAddr = "192.0.2.1:1".parse().expect("literal");
    let settings = LinkSettings::for_address(&ethernet);
    transport::quic::client_endpoint(*peer, &settings).map_err(|e| match e {
        QuicError::Socket { address, source } => {
            Error::Resource(format!("opening a UDP socket on {address}: {source}"))
        }
        e => Error::Resource(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_reaches_peers_of_its_family_and_scope() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(reaches(&addr("0.0.0.0:7400"), &addr("10.1.2.3:7400")));
        assert!(reaches(&addr("0.0.0.0:7400"), &addr("127.0.0.1:7400")));
        assert!(reaches(&addr("127.0.0.1:7400"), &addr("127.0.0.1:7401")));
        assert!(!reaches(&addr("127.0.0.1:7400"), &addr("10.1.2.3:7400")));
        assert!(reaches(&addr("10.0.0.5:7400"), &addr("10.1.2.3:7400")));
        assert!(!reaches(&addr("10.0.0.5:7400"), &addr("127.0.0.1:7400")));
        assert!(!reaches(&addr("0.0.0.0:7400"), &addr("[::1]:7400")));
        assert!(reaches(&addr("[::]:7400"), &addr("[2001:db8::1]:7400")));
    }
}
