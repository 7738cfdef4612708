//! A real quinn connection over loopback with jumbo-frame datagrams (8952 bytes): quinn
//! batches several per send (UDP GSO), and every batch must fit one send. Before batches were
//! capped, a batch of 10 such datagrams (89 KB) drew EMSGSIZE, which quinn takes for a failed
//! MTU probe: the path silently fell back to 1200 bytes. So the MTU reached is the check.
//! (Where the kernel lacks UDP_SEGMENT quinn sends one datagram per call and only the MTU is
//! checked.)

use std::net::SocketAddr;

use transport::identity;
use transport::quic::{self, LinkSettings};
use transport::tls::{SiteCredentials, TrustStore};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jumbo_datagrams_keep_their_size_with_batched_sends() {
    tokio::time::timeout(std::time::Duration::from_secs(60), transfer(false))
        .await
        .expect("48 MiB over loopback within a minute");
}

/// A process's shared endpoint is made for one datagram size (a daemon's: its listen
/// address's, 1452 off loopback) and carries connections to peers that allow larger ones:
/// their batches must still fit one send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jumbo_datagrams_keep_their_size_on_an_endpoint_made_for_ethernet() {
    tokio::time::timeout(std::time::Duration::from_secs(60), transfer(true))
        .await
        .expect("48 MiB over loopback within a minute");
}

async fn transfer(shared_ethernet_endpoint: bool) {
    const PAYLOAD: u16 = 8952;
    const BYTES: usize = 48 << 20;
    let (server_credentials, server_fingerprint) = credentials("s");
    let (client_credentials, client_fingerprint) = credentials("c");
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut settings = LinkSettings::for_address(&listen);
    settings.udp_payload_bytes_max = PAYLOAD;
    let server = quic::server(
        listen,
        &server_credentials,
        TrustStore::new([("c".to_string(), client_fingerprint)]),
        &settings,
    )
    .unwrap();
    let address = server.local_addr().unwrap();
    let receiving = tokio::spawn(async move {
        let connection = server.accept().await.unwrap().await.unwrap();
        let (_send, mut stream) = connection.accept_bi().await.unwrap();
        let mut received = 0;
        while let Some(chunk) = stream.read_chunk(1 << 20, true).await.unwrap() {
            received += chunk.bytes.len();
        }
        received
    });

    let (endpoint, connection) = if shared_ethernet_endpoint {
        let mut ethernet = settings.clone();
        ethernet.udp_payload_bytes_max = 1452;
        let endpoint = quic::client_endpoint(address, &ethernet).unwrap();
        let config =
            quic::client_config(&client_credentials, "s", server_fingerprint, &settings).unwrap();
        let connection = quic::connect_on(&endpoint, config, "s", address)
            .await
            .unwrap();
        (endpoint, connection)
    } else {
        quic::connect(
            &client_credentials,
            "s",
            address,
            server_fingerprint,
            &settings,
        )
        .await
        .unwrap()
    };
    let (mut stream, _recv) = connection.open_bi().await.unwrap();
    let block = vec![0x5au8; 1 << 20];
    for _ in 0..BYTES >> 20 {
        stream.write_all(&block).await.unwrap();
    }
    // Path MTU discovery runs beside the data: on a loaded machine its last probe can still
    // be in flight when the 48 MiB are through. Keep sending (bounded) until it settles; a
    // path that fell back (the bug) never reaches the size however long it runs.
    let mut sent = BYTES;
    for _ in 0..64 {
        if connection.stats().path.current_mtu == PAYLOAD {
            break;
        }
        stream.write_all(&block).await.unwrap();
        sent += block.len();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stream.finish().unwrap();
    assert_eq!(receiving.await.unwrap(), sent);
    let stats = connection.stats();
    assert_eq!(
        stats.path.current_mtu, PAYLOAD,
        "MTU discovery should reach the configured {PAYLOAD} bytes: {stats:?}"
    );
    quic::hang_up(&endpoint, &connection).await;
}
