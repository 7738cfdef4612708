//! Why `transport::bbr` exists: quinn 0.11's BBR starts with no ProbeRTT timestamp, which reads
//! as "min RTT expired", so on its first acknowledgement that is not application-limited every
//! connection enters ProbeRTT and its window falls to four datagrams for at least 200 ms. A
//! capped link starts from a large window (`LinkSettings::start_at_rate`) that this throws away.
//!
//! Each test runs a real quinn connection through a relay that delays every datagram by
//! 10 ms each way (a 20 ms path; loopback's microseconds would make any window look tiny) and
//! samples the sender's congestion window while it sends for a second. The signature checked
//! is ProbeRTT's: the window down to its floor of four datagrams (the start window is 1 MiB).
//! Ours must never show it; quinn's must, or quinn has fixed its start and the fork should be dropped
//! (ARCHITECTURE.md, transport). Nothing here depends on the machine's speed: a slow machine
//! sends less, but the window is what the controller decides, not how fast bytes move.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::ControllerFactory;
use quinn::{Endpoint, TransportConfig};
use tokio::net::UdpSocket;
use transport::identity;
use transport::tls::{self, Cipher, SiteCredentials, TrustStore};

const ONE_WAY_DELAY: Duration = Duration::from_millis(10);
const DATAGRAM: u64 = 1200;
/// What `start_at_rate` gives a 40 MB/s cap: 25 ms of the rate.
const INITIAL_WINDOW: u64 = 1 << 20;
const SEND_FOR: Duration = Duration::from_secs(1);
const SAMPLE_EVERY: Duration = Duration::from_millis(1);
/// BBR's smallest window: ProbeRTT's.
const FLOOR: u64 = 4 * DATAGRAM;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ours_keeps_the_start_window_of_a_capped_link() {
    let mut ours = transport::bbr::BbrConfig::default();
    ours.initial_window(INITIAL_WINDOW);
    let run = window_trace(Arc::new(ours)).await;
    assert!(
        !run.collapsed(),
        "our BBR's window fell to 4 datagrams (ProbeRTT at the start?): {run:?}"
    );
}

/// The same check on quinn's BBR must fail. Sampling can miss a short dip (it only ever hides
/// one), so this looks up to three times; it fails only if quinn never collapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quinns_own_bbr_still_collapses_at_the_start() {
    let mut runs = Vec::new();
    for _ in 0..3 {
        let mut quinns = quinn::congestion::BbrConfig::default();
        quinns.initial_window(INITIAL_WINDOW);
        let run = window_trace(Arc::new(quinns)).await;
        if run.collapsed() {
            return;
        }
        runs.push(run);
    }
    panic!(
        "quinn's BBR no longer drops to 4 datagrams at the start; transport::bbr may be \
         dropped for it: {runs:?}"
    );
}

#[derive(Debug)]
struct Trace {
    /// Longest stretch at the floor, for the reader of a failure.
    longest_collapse: Duration,
    min_window: u64,
    max_window: u64,
    samples: usize,
    bytes_sent: u64,
}

impl Trace {
    /// ProbeRTT's signature: the window at its floor of four datagrams.
    fn collapsed(&self) -> bool {
        self.min_window <= FLOOR
    }
}

async fn window_trace(controller: Arc<dyn ControllerFactory + Send + Sync>) -> Trace {
    tokio::time::timeout(Duration::from_secs(60), trace(controller))
        .await
        .expect("one second of sending through the relay within a minute")
}

fn credentials(site: &str) -> (SiteCredentials, identity::Fingerprint) {
    let id = identity::generate(site).unwrap();
    let credentials = SiteCredentials::from_pem(
        site,
        id.certificate_pem.as_bytes(),
        id.private_key_pem.as_bytes(),
    )
    .unwrap();
    (credentials, id.fingerprint)
}

fn transport_config(
    controller: Option<Arc<dyn ControllerFactory + Send + Sync>>,
) -> TransportConfig {
    let mut t = TransportConfig::default();
    // Fixed 1200-byte datagrams, one per send: the window's floor is exactly 4 x 1200.
    t.mtu_discovery_config(None);
    t.enable_segmentation_offload(false);
    t.stream_receive_window(quinn::VarInt::from_u32(64 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    if let Some(controller) = controller {
        t.congestion_controller_factory(controller);
    }
    t
}

async fn trace(controller: Arc<dyn ControllerFactory + Send + Sync>) -> Trace {
    let (server_credentials, server_fingerprint) = credentials("s");
    let (client_credentials, client_fingerprint) = credentials("c");
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();

    let crypto = tls::server_config(
        &server_credentials,
        TrustStore::new([("c".to_string(), client_fingerprint)]),
    )
    .unwrap();
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server_config.transport_config(Arc::new(transport_config(None)));
    let server = Endpoint::server(server_config, loopback).unwrap();
    let relay = delay_relay(server.local_addr().unwrap()).await;

    let receiving = tokio::spawn(async move {
        let connection = server.accept().await.unwrap().await.unwrap();
        let (_send, mut stream) = connection.accept_bi().await.unwrap();
        while stream.read_chunk(1 << 20, true).await.unwrap().is_some() {}
        connection.close(0u32.into(), b"done");
    });

    let crypto =
        tls::client_config(&client_credentials, "s", server_fingerprint, Cipher::Aes128).unwrap();
    let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
    client_config.transport_config(Arc::new(transport_config(Some(controller))));
    let mut client = Endpoint::client(loopback).unwrap();
    client.set_default_client_config(client_config);
    let connection = client.connect(relay, "s.mover").unwrap().await.unwrap();

    let sampler = {
        let connection = connection.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut collapsed_since: Option<Instant> = None;
            let mut trace = Trace {
                longest_collapse: Duration::ZERO,
                min_window: u64::MAX,
                max_window: 0,
                samples: 0,
                bytes_sent: 0,
            };
            while started.elapsed() < SEND_FOR {
                let now = Instant::now();
                let window = connection.stats().path.cwnd;
                trace.samples += 1;
                trace.min_window = trace.min_window.min(window);
                trace.max_window = trace.max_window.max(window);
                if window <= FLOOR {
                    let since = *collapsed_since.get_or_insert(now);
                    trace.longest_collapse = trace.longest_collapse.max(now - since);
                } else {
                    collapsed_since = None;
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
            trace.bytes_sent = connection.stats().udp_tx.bytes;
            trace
        })
    };
    let (mut stream, _recv) = connection.open_bi().await.unwrap();
    let block = vec![0x5au8; 256 << 10];
    while !sampler.is_finished() {
        stream.write_all(&block).await.unwrap();
    }
    let trace = sampler.await.unwrap();
    stream.finish().unwrap();
    let _ = stream.stopped().await;
    receiving.abort();
    connection.close(0u32.into(), b"done");
    trace
}

/// A UDP relay on loopback that delays every datagram by [`ONE_WAY_DELAY`] in each direction.
/// Returns the address the client dials. Its sockets' receive buffers are the kernel default;
/// a drop there is loss, which neither controller answers by sitting at its floor.
async fn delay_relay(server: SocketAddr) -> SocketAddr {
    let facing_client = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let facing_server = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    facing_server.connect(server).await.unwrap();
    let address = facing_client.local_addr().unwrap();
    let client_address = Arc::new(tokio::sync::OnceCell::new());

    // Client to server.
    let (to_server, mut delayed_to_server) =
        tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    {
        let facing_client = facing_client.clone();
        let client_address = client_address.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = facing_client.recv_from(&mut buf).await else {
                    return;
                };
                let _ = client_address.set(from);
                if to_server
                    .send((Instant::now() + ONE_WAY_DELAY, buf[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    {
        let facing_server = facing_server.clone();
        tokio::spawn(async move {
            while let Some((due, datagram)) = delayed_to_server.recv().await {
                tokio::time::sleep_until(due.into()).await;
                let _ = facing_server.send(&datagram).await;
            }
        });
    }
    // Server to client.
    let (to_client, mut delayed_to_client) =
        tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    {
        let facing_server = facing_server.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok(n) = facing_server.recv(&mut buf).await else {
                    return;
                };
                if to_client
                    .send((Instant::now() + ONE_WAY_DELAY, buf[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    tokio::spawn(async move {
        while let Some((due, datagram)) = delayed_to_client.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if let Some(to) = client_address.get() {
                let _ = facing_client.send_to(&datagram, to).await;
            }
        }
    });
    address
}
