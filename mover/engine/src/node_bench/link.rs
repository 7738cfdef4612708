//! `mover bench link SITE`: this node's link to a configured peer, measured with a Bench
//! stream (the peer's daemon counts the data and drops it: nothing is stored, and it cuts the
//! stream beyond `BENCH_BYTES_MAX` or `BENCH_TIME_MAX`), held against the link's physical
//! limit on this node: the configured bandwidth cap, or, uncapped, raw QUIC (the same
//! transport settings and TLS, no mover frames) between two endpoints on this node's
//! loopback, which is what this node's CPU lets QUIC carry at most.
//!
//! Runs beside a running daemon of the same site: it reads the site's config and identity,
//! never its index (which the daemon holds locked).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use transport::frame::{self, Frame, Purpose};
use transport::quic::LinkSettings;
use transport::tls::{SiteCredentials, TrustStore};

use super::stages::Row;
use super::{Machine, Report};
use mover_config::{Config, CONFIG_FILE_NAME};
use mover_format::constants::{BENCH_BYTES_MAX, BENCH_TIME_MAX};
use mover_format::error::{Error, Result};
use mover_peer::peers::{Link, LinkRegistry};
use mover_peer::remote::ship::{connect, open_stream, read_failure};

/// Bytes per BenchData frame: the largest frame, so per-frame costs are a chunk's.
const FILLER_BYTES: usize = frame::CHUNK_BYTES_MAX;
/// `--seconds` must leave the peer's time bound room for the handshake and the last bytes.
pub const SECONDS_MAX: u64 = BENCH_TIME_MAX.as_secs() - 10;

/// What one bench pass moved.
struct Measured {
    bytes: u64,
    seconds: f64,
    frames: u64,
    note: String,
}

/// Measures the link from the site in `site_dir` to `peer`: at most `bytes_max` bytes or
/// `seconds` of sending, whichever ends first.
pub fn link(site_dir: &Path, peer: &str, bytes_max: u64, seconds: u64) -> Result<Report> {
    if bytes_max == 0 || bytes_max > BENCH_BYTES_MAX {
        return Err(Error::Refused(format!(
            "--size-mib {}: expected 1 to {} (what a peer accepts in one bench stream)",
            bytes_max >> 20,
            BENCH_BYTES_MAX >> 20
        )));
    }
    if seconds == 0 || seconds > SECONDS_MAX {
        return Err(Error::Refused(format!(
            "--seconds {seconds}: expected 1 to {SECONDS_MAX} (a peer cuts a bench stream at {} s)",
            BENCH_TIME_MAX.as_secs()
        )));
    }
    let config = Config::load(&site_dir.join(CONFIG_FILE_NAME))?;
    let link = LinkRegistry::new(&config.peers).link(peer)?;
    let credentials = mover_peer::peers::credentials_in(
        &site_dir.join(&config.site.identity),
        &config.site.name,
    )?;
    // This is a CLI process, not the daemon: a runtime of its own. Two threads, so the raw
    // QUIC pair's two ends each have a core, as they would on two nodes.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mover-bench")
        .enable_all()
        .build()
        .map_err(|e| Error::Resource(format!("starting a tokio runtime: {e}")))?;
    let time_max = Duration::from_secs(seconds);
    let filler = filler();
    let measured =
        runtime.block_on(over_link(&link, &credentials, &filler, bytes_max, time_max))?;
    let mut row = row(
        &format!("link to {peer}"),
        format!(
            "{} at {}, {:?}, UDP payload <= {} B",
            link.site, link.address, link.settings.congestion, link.settings.udp_payload_bytes_max
        ),
        &measured,
    );
    let mut rows = Vec::new();
    match &link.bucket {
        Some(bucket) => {
            let rate = bucket.bytes_per_second() as f64 / 1e9;
            row.against("bandwidth cap", round6(rate));
        }
        None => {
            let raw =
                runtime.block_on(raw_quic(&credentials, &filler, measured.bytes, time_max))?;
            let raw = row_of_raw(raw);
            row.against(&raw.name, raw.gb_per_s);
            rows.push(raw);
        }
    }
    rows.insert(0, row);
    Ok(Report {
        bench: "link",
        machine: Machine::this(),
        rows,
    })
}

fn row(name: &str, input: String, measured: &Measured) -> Row {
    Row {
        name: name.to_string(),
        input,
        gb_per_s: round6(measured.bytes as f64 / measured.seconds.max(1e-9) / 1e9),
        bytes: measured.bytes,
        seconds: super::stages::round3(measured.seconds),
        limit: None,
        limit_gb_per_s: None,
        ratio: None,
        p50_us: None,
        p99_us: None,
        max_us: None,
        ops: measured.frames,
        note: Some(measured.note.clone()),
    }
}

fn row_of_raw(measured: Measured) -> Row {
    row(
        "raw QUIC on this node's loopback",
        "one stream, loopback link settings, same TLS".into(),
        &measured,
    )
}

/// Rates of slow links are small in GB/s: six decimals keep 1 kB/s.
fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// Random bytes, so nothing on the path (a WAN optimiser, a compressing VPN) makes the link
/// look faster than it is for backup data, which is mostly incompressible once lz4 ran.
fn filler() -> Bytes {
    let mut block = vec![0u8; FILLER_BYTES];
    rand::rngs::SmallRng::seed_from_u64(14).fill_bytes(&mut block);
    Bytes::from(block)
}

/// One Bench stream to the peer: BenchData until `bytes_max` or `time_max`, then the peer's
/// count. Timed from the first byte handed to quinn to the peer's answer (one round trip
/// more than the data needed: negligible over seconds).
async fn over_link(
    link: &Link,
    credentials: &SiteCredentials,
    filler: &Bytes,
    bytes_max: u64,
    time_max: Duration,
) -> Result<Measured> {
    let (endpoint, connection) = connect(link, credentials).await?;
    let hello = Frame::Hello {
        version_min: frame::BENCH_VERSION,
        version_max: frame::VERSION_MAX,
        purpose: Purpose::Bench,
        site: &credentials.site,
        tier: "",
        job: "bench",
    };
    let (mut writer, mut reader, _, _) =
        open_stream(link, credentials, &connection, &hello).await?;
    let fail = |detail: String| Error::peer(&link.site, detail);
    let started = Instant::now();
    let (mut sent, mut frames) = (0u64, 0u64);
    while sent < bytes_max && started.elapsed() < time_max {
        let len = (bytes_max - sent).min(FILLER_BYTES as u64) as usize;
        if let Some(bucket) = &link.bucket {
            bucket.pace((frame::FRAME_HEADER_BYTES + len) as u64).await;
        }
        writer
            .send_bench_data(filler.slice(..len))
            .await
            .map_err(|e| fail(format!("sending bench data: {e}")))?;
        sent += len as u64;
        frames += 1;
    }
    writer.finish();
    let answer = match reader.next().await {
        Ok(Frame::BenchReceived { bytes, micros }) => Ok((bytes, micros)),
        Ok(Frame::Error { reason, .. }) => Err(fail(format!("refused the bench: {reason}"))),
        Ok(other) => Err(fail(format!("answered the bench with {}", other.name()))),
        Err(e) => Err(read_failure(&e, &connection).error(&link.site)),
    };
    let seconds = started.elapsed().as_secs_f64();
    let stats = connection.stats();
    transport::quic::hang_up(&endpoint, &connection).await;
    let (received, micros) = answer?;
    if received != sent {
        return Err(fail(format!(
            "counted {received} bench bytes of the {sent} sent"
        )));
    }
    let receiver_rate = received as f64 / (micros.max(1) as f64 / 1e6) / 1e9;
    Ok(Measured {
        bytes: sent,
        seconds,
        frames,
        note: format!(
            "rtt {:.3} ms, path MTU {} B, {} packets lost, {} UDP bytes sent; the peer received at {:.3} GB/s from its first byte",
            stats.path.rtt.as_secs_f64() * 1e3,
            stats.path.current_mtu,
            stats.path.lost_packets,
            stats.udp_tx.bytes,
            receiver_rate
        ),
    })
}

/// The same bytes over raw QUIC between two endpoints of this process on loopback (this
/// site's credentials on both ends): one stream, written from the filler without copies,
/// read and dropped, the count sent back.
async fn raw_quic(
    credentials: &SiteCredentials,
    filler: &Bytes,
    bytes_max: u64,
    time_max: Duration,
) -> Result<Measured> {
    let fail = |e: &dyn std::fmt::Display| Error::Resource(format!("raw QUIC loopback: {e}"));
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal");
    let settings = LinkSettings::for_address(&listen);
    let trust = TrustStore::new([(credentials.site.clone(), credentials.fingerprint())]);
    let server =
        transport::quic::server(listen, credentials, trust, &settings).map_err(|e| fail(&e))?;
    let address = server.local_addr().map_err(|e| fail(&e))?;
    let receiver = tokio::spawn(async move {
        let incoming = server.accept().await.ok_or("the endpoint closed")?;
        let connection = incoming.await.map_err(|e| e.to_string())?;
        let (mut send, mut recv) = connection.accept_bi().await.map_err(|e| e.to_string())?;
        let mut bytes = 0u64;
        while let Some(chunk) = recv
            .read_chunk(usize::MAX, false)
            .await
            .map_err(|e| e.to_string())?
        {
            bytes += chunk.bytes.len() as u64;
        }
        send.write_all(&bytes.to_le_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        // Until the sender has read the count and closed.
        connection.closed().await;
        Ok::<u64, String>(bytes)
    });
    let (endpoint, connection) = transport::quic::connect(
        credentials,
        &credentials.site,
        address,
        credentials.fingerprint(),
        &settings,
    )
    .await
    .map_err(|e| fail(&e))?;
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| fail(&e))?;
    let started = Instant::now();
    let (mut sent, mut writes) = (0u64, 0u64);
    while sent < bytes_max && started.elapsed() < time_max {
        let len = (bytes_max - sent).min(FILLER_BYTES as u64) as usize;
        send.write_chunk(filler.slice(..len))
            .await
            .map_err(|e| fail(&e))?;
        sent += len as u64;
        writes += 1;
    }
    send.finish().map_err(|e| fail(&e))?;
    let mut count = [0u8; 8];
    recv.read_exact(&mut count).await.map_err(|e| fail(&e))?;
    let seconds = started.elapsed().as_secs_f64();
    let stats = connection.stats();
    transport::quic::hang_up(&endpoint, &connection).await;
    let received = receiver
        .await
        .map_err(|e| fail(&e))?
        .map_err(|e| fail(&e))?;
    if received != sent || u64::from_le_bytes(count) != sent {
        return Err(fail(&format!("received {received} of {sent} bytes")));
    }
    Ok(Measured {
        bytes: sent,
        seconds,
        frames: writes,
        note: format!(
            "the CPU ceiling of QUIC on this node (both ends here); path MTU {} B",
            stats.path.current_mtu
        ),
    })
}
