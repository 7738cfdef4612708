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

use transport::quic::{LinkSettings, QuicError};
use transport::tls::SiteCredentials;

use crate::error::{Error, Result};
use crate::peers::Link;

/// A connection to a peer and, when it has an endpoint of its own, that endpoint.
pub struct Dialed {
    pub connection: quinn::Connection,
    /// Set for a worker's connection (its endpoint goes with it); `None` on a shared endpoint.
    own_endpoint: Option<quinn::Endpoint>,
}

impl Dialed {
    /// A connection on an endpoint of its own (closed with it).
    pub fn own(endpoint: quinn::Endpoint, connection: quinn::Connection) -> Dialed {
        Dialed {
            connection,
            own_endpoint: Some(endpoint),
        }
    }

    /// Closes the finished connection: its own endpoint is turned briefly so the close leaves
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
    /// Owned by a non-daemon process's `Net` (the daemon owns its own runtime).
    _runtime: Option<tokio::runtime::Runtime>,
}

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
            _runtime: None,
        }
    }

    /// This process's `Net` for processes that are not a daemon, made on first use.
    pub fn of_process() -> Result<Arc<Net>> {
        static NET: OnceLock<Arc<Net>> = OnceLock::new();
        static MAKING: Mutex<()> = Mutex::new(());
        if let Some(net) = NET.get() {
            return Ok(net.clone());
        }
        let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(net) = NET.get() {
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
            _runtime: Some(runtime),
        });
        let _ = NET.set(net.clone());
        Ok(net)
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

    /// Dials `link` from the process's endpoint. Must run on this `Net`'s runtime.
    pub async fn dial(&self, link: &Link, credentials: &SiteCredentials) -> Result<Dialed> {
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
