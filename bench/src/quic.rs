//! `mover-bench quic`: raw quinn throughput, memory to memory, with exactly the transport
//! settings mover uses between sites (`transport::quic::{server, connect, LinkSettings}`,
//! pinned mutual TLS from `transport::tls`, identities from `transport::identity::generate`).
//!
//! The process re-executes itself as the server (`mover-bench quic-serve`, hidden), so client
//! and server are separate processes as mover's client and daemon are. The server runs on a
//! multi-threaded tokio runtime with one thread per core, as `mover daemon` does; each client
//! connection runs on a thread of its own inside `tokio_uring::start` (the runtime mover's
//! workers ship from), or on a plain current-thread tokio runtime. `--connections C` opens C
//! connections from C threads (mover opens one per worker); `--streams K` opens K
//! bidirectional streams on each. Each stream carries `--size / (C x K)` bytes written as
//! 1 MiB `Bytes` slices of one random buffer (no copy on the send side, as mover's
//! `send_chunk`) and read into a reusable buffer on the server (one copy, as mover's
//! `FrameReader`). The server answers each stream with the byte count once it saw the end, so
//! the client's elapsed time covers delivery, not just queueing.
//!
//! `--wan "ARGS"` puts `mover-wan ARGS` (the binary next to this one) between client and server
//! and reports its counters; `--bandwidth RATE` paces the client with mover's token bucket
//! (`transport::rate`), shared by all connections as a peer's bucket is.
//!
//! GB/s means 1e9 bytes per second of payload over the client's elapsed time (first stream
//! opened to the last answer), after the handshakes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use transport::identity::Fingerprint;
use transport::quic::{Congestion, LinkSettings};
use transport::rate::TokenBucket;
use transport::tls::{Cipher, SiteCredentials, TrustStore};

use mover::node_bench::stages::round3;

/// Bytes per write on the client, about mover's average chunk.
const WRITE_BYTES: usize = 1 << 20;
/// The random payload the writes are slices of.
const PAYLOAD_BYTES: usize = 8 << 20;
/// Server's read buffer per stream.
const READ_BYTES: usize = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientRuntime {
    /// `tokio_uring::start` on the connection's thread (what mover's workers run).
    Uring,
    /// A current-thread tokio runtime.
    Current,
}

pub struct QuicArgs {
    pub bytes: u64,
    pub connections: usize,
    pub streams: usize,
    pub udp_payload_bytes_max: Option<u16>,
    pub cipher: String,
    pub congestion: String,
    pub stream_window_bytes: Option<u32>,
    pub connection_window_bytes: Option<u32>,
    pub bandwidth: Option<units::Rate>,
    pub runtime: ClientRuntime,
    pub server_threads: usize,
    pub pin: bool,
    pub wan: Option<String>,
    pub json: bool,
}

/// What the server child prints when its stdin closes.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ServerReport {
    pub bytes_received: u64,
    pub streams: u64,
    /// First byte received to the last stream's end, seconds.
    pub receive_s: f64,
    pub cpu_user_s: f64,
    pub cpu_sys_s: f64,
    pub threads: usize,
}

#[derive(Debug, Serialize)]
struct ConnectionReport {
    handshake_ms: f64,
    transfer_s: f64,
    bytes: u64,
    path_mtu: u16,
    rtt_ms: f64,
    cwnd: u64,
    lost_packets: u64,
    lost_bytes: u64,
    congestion_events: u64,
    udp_tx_datagrams: u64,
    udp_tx_bytes: u64,
    udp_rx_datagrams: u64,
    udp_rx_bytes: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    bytes: u64,
    connections: usize,
    streams_per_connection: usize,
    udp_payload_bytes_max: u16,
    cipher: String,
    congestion: String,
    stream_window_bytes: u32,
    connection_window_bytes: u32,
    bandwidth: Option<String>,
    client_runtime: ClientRuntime,
    server_threads: usize,
    elapsed_s: f64,
    gb_per_s: f64,
    /// UDP payload bytes the client sent (QUIC headers, retransmissions and acks included),
    /// in Gbit/s over the elapsed time.
    wire_gbit_per_s: f64,
    client_cpu_user_s: f64,
    client_cpu_sys_s: f64,
    server: ServerReport,
    per_connection: Vec<ConnectionReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wan: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wan_args: Option<String>,
}

fn rusage_self() -> (f64, f64) {
    // SAFETY: getrusage fills the struct we pass; zeroed is a valid initial value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime))
}

fn pin_to(core: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core % cores, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills and reaps a child that is still running when we leave early.
struct Reap(Option<Child>);
impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_listening(
    child: &mut Child,
    what: &str,
) -> Result<(SocketAddr, BufReader<std::process::ChildStdout>), String> {
    let stdout = child.stdout.take().expect("stdout piped");
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("{what}: reading its first line: {e}"))?;
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| format!("{what}: expected \"listening on ADDR\", got {line:?}"))?;
    let address = address
        .parse()
        .map_err(|e| format!("{what}: address {address:?}: {e}"))?;
    Ok((address, reader))
}

pub fn run(args: QuicArgs) -> Result<(), String> {
    if args.connections == 0 || args.streams == 0 || args.bytes == 0 {
        return Err("--size, --connections and --streams must be above 0".into());
    }
    let cipher: Cipher = args.cipher.parse().map_err(|e| format!("--cipher: {e}"))?;
    let congestion: Congestion = args
        .congestion
        .parse()
        .map_err(|e| format!("--congestion: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;

    // Identities, as `mover init` makes them; the server's go to a private directory for the child.
    let client_id = transport::identity::generate("bench-client").map_err(|e| e.to_string())?;
    let server_id = transport::identity::generate("bench-server").map_err(|e| e.to_string())?;
    let dir =
        TempDir(std::env::temp_dir().join(format!("mover-bench-quic-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).map_err(|e| format!("{}: {e}", dir.0.display()))?;
    std::fs::write(dir.0.join("cert.pem"), &server_id.certificate_pem)
        .map_err(|e| e.to_string())?;
    std::fs::write(dir.0.join("key.pem"), &server_id.private_key_pem).map_err(|e| e.to_string())?;
    let credentials = SiteCredentials::from_pem(
        "bench-client",
        client_id.certificate_pem.as_bytes(),
        client_id.private_key_pem.as_bytes(),
    )
    .map_err(|e| e.to_string())?;

    let mut server = Reap(Some(
        Command::new(&exe)
            .arg("quic-serve")
            .arg("--identity-dir")
            .arg(&dir.0)
            .arg("--trust")
            .arg(client_id.fingerprint.to_string())
            .arg("--threads")
            .arg(args.server_threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the server child {}: {e}", exe.display()))?,
    ));
    let (server_address, mut server_out) =
        read_listening(server.0.as_mut().expect("just spawned"), "server child")?;

    let mut relay = Reap(None);
    let mut relay_out = None;
    let target = match &args.wan {
        None => server_address,
        Some(wan) => {
            let wan_bin = exe.with_file_name("mover-wan");
            let mut command = Command::new(&wan_bin);
            command
                .args([
                    "--listen",
                    "127.0.0.1:0",
                    "--to",
                    &server_address.to_string(),
                    "--json-stats",
                ])
                .args(wan.split_whitespace())
                .stdout(Stdio::piped());
            let mut child = command.spawn().map_err(|e| {
                format!(
                    "starting {} (build it with cargo build --release -p mover-tools): {e}",
                    wan_bin.display()
                )
            })?;
            let (address, out) = read_listening(&mut child, "mover-wan")?;
            relay.0 = Some(child);
            relay_out = Some(out);
            address
        }
    };

    let mut settings = LinkSettings::for_address(&target);
    if let Some(v) = args.udp_payload_bytes_max {
        settings.udp_payload_bytes_max = v;
    }
    settings.cipher = cipher;
    settings.congestion = congestion;
    if let Some(v) = args.stream_window_bytes {
        settings.stream_window_bytes = v;
    }
    if let Some(v) = args.connection_window_bytes {
        // As mover's peers.rs: the send window follows a larger connection window.
        settings.connection_window_bytes = v;
        settings.send_window_bytes = settings.send_window_bytes.max(v as u64);
    }
    let bucket = match args.bandwidth {
        Some(rate) => {
            let rate = rate.bytes_per_second();
            // As mover's peers.rs.
            settings.start_at_rate(rate);
            Some(Arc::new(Mutex::new(TokenBucket::for_link(
                rate,
                Instant::now(),
            ))))
        }
        None => None,
    };

    let mut payload = vec![0u8; PAYLOAD_BYTES];
    rand::rngs::SmallRng::seed_from_u64(7).fill_bytes(&mut payload);
    let payload = Bytes::from(payload);

    let per_stream = args.bytes / (args.connections * args.streams) as u64;
    let total = per_stream * (args.connections * args.streams) as u64;
    let barrier = Arc::new(Barrier::new(args.connections + 1));
    let cpu_before = Arc::new(Mutex::new((0.0, 0.0)));
    let mut threads = Vec::new();
    for c in 0..args.connections {
        let job = ConnectionJob {
            index: c,
            credentials: credentials.clone(),
            fingerprint: server_id.fingerprint,
            target,
            settings: settings.clone(),
            streams: args.streams,
            per_stream,
            payload: payload.clone(),
            bucket: bucket.clone(),
            barrier: barrier.clone(),
            runtime: args.runtime,
            pin: args.pin,
        };
        threads.push(
            std::thread::Builder::new()
                .name(format!("quic-client-{c}"))
                .spawn(move || job.run())
                .map_err(|e| format!("spawning a client thread: {e}"))?,
        );
    }
    // Everyone connected: start the clock and the CPU count together.
    barrier.wait();
    *cpu_before.lock().unwrap() = rusage_self();
    let mut per_connection = Vec::new();
    let mut failures = Vec::new();
    for thread in threads {
        match thread.join() {
            Ok(Ok(report)) => per_connection.push(report),
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push("a client thread panicked".into()),
        }
    }
    let (user1, sys1) = rusage_self();
    let (user0, sys0) = *cpu_before.lock().unwrap();
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    let elapsed = per_connection
        .iter()
        .map(|c| c.transfer_s)
        .fold(0.0f64, f64::max)
        .max(1e-9);

    // Closing the child's stdin asks for its report.
    let mut child = server.0.take().expect("server child");
    drop(child.stdin.take());
    let mut text = String::new();
    let read = server_out.read_to_string(&mut text);
    let _ = child.wait();
    read.map_err(|e| format!("reading the server report: {e}"))?;
    let server_report: ServerReport =
        serde_json::from_str(text.trim()).map_err(|e| format!("server report {text:?}: {e}"))?;

    let wan = match relay.0.take() {
        Some(child) => {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let mut child = child;
            let mut text = String::new();
            if let Some(mut out) = relay_out.take() {
                let _ = out.read_to_string(&mut text);
            }
            let _ = child.wait();
            text.lines()
                .rev()
                .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        }
        None => None,
    };

    let wire: u64 = per_connection.iter().map(|c| c.udp_tx_bytes).sum();
    let report = Report {
        bytes: total,
        connections: args.connections,
        streams_per_connection: args.streams,
        udp_payload_bytes_max: settings.udp_payload_bytes_max,
        cipher: args.cipher.clone(),
        congestion: args.congestion.clone(),
        stream_window_bytes: settings.stream_window_bytes,
        connection_window_bytes: settings.connection_window_bytes,
        bandwidth: args.bandwidth.map(|rate| rate.to_string()),
        client_runtime: args.runtime,
        server_threads: server_report.threads,
        elapsed_s: round3(elapsed),
        gb_per_s: round3(total as f64 / elapsed / 1e9),
        wire_gbit_per_s: round3(wire as f64 * 8.0 / elapsed / 1e9),
        client_cpu_user_s: round3(user1 - user0),
        client_cpu_sys_s: round3(sys1 - sys0),
        server: server_report,
        per_connection,
        wan,
        wan_args: args.wan.clone(),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serialises")
        );
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &Report) {
    println!(
        "raw quinn: {} bytes over {} connection(s) x {} stream(s), udp_payload_bytes_max {}, {} / {}, client {:?}, server {} threads{}",
        r.bytes,
        r.connections,
        r.streams_per_connection,
        r.udp_payload_bytes_max,
        r.cipher,
        r.congestion,
        r.client_runtime,
        r.server_threads,
        r.bandwidth.as_deref().map(|b| format!(", paced at {b}")).unwrap_or_default()
    );
    println!(
        "  {:.3} s, {:.3} GB/s payload, {:.3} Gbit/s on the wire",
        r.elapsed_s, r.gb_per_s, r.wire_gbit_per_s
    );
    println!(
        "  client CPU {:.2} s user + {:.2} s sys; server CPU {:.2} s user + {:.2} s sys (whole child)",
        r.client_cpu_user_s, r.client_cpu_sys_s, r.server.cpu_user_s, r.server.cpu_sys_s
    );
    for (i, c) in r.per_connection.iter().enumerate() {
        println!(
            "  connection {i}: handshake {:.1} ms, {:.3} s, MTU {}, rtt {:.2} ms, cwnd {}, lost {} packets, {} congestion events, {} datagrams sent",
            c.handshake_ms, c.transfer_s, c.path_mtu, c.rtt_ms, c.cwnd, c.lost_packets, c.congestion_events, c.udp_tx_datagrams
        );
    }
    if let Some(wan) = &r.wan {
        println!("  mover-wan {}: {wan}", r.wan_args.as_deref().unwrap_or(""));
    }
}

struct ConnectionJob {
    index: usize,
    credentials: SiteCredentials,
    fingerprint: Fingerprint,
    target: SocketAddr,
    settings: LinkSettings,
    streams: usize,
    per_stream: u64,
    payload: Bytes,
    bucket: Option<Arc<Mutex<TokenBucket>>>,
    barrier: Arc<Barrier>,
    runtime: ClientRuntime,
    pin: bool,
}

impl ConnectionJob {
    fn run(self) -> Result<ConnectionReport, String> {
        if self.pin {
            pin_to(self.index);
        }
        match self.runtime {
            ClientRuntime::Uring => tokio_uring::start(self.transfer()),
            ClientRuntime::Current => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("client runtime: {e}"))?;
                let local = tokio::task::LocalSet::new();
                runtime.block_on(local.run_until(self.transfer()))
            }
        }
    }

    async fn transfer(self) -> Result<ConnectionReport, String> {
        let t0 = Instant::now();
        let connected = transport::quic::connect(
            &self.credentials,
            "bench-server",
            self.target,
            self.fingerprint,
            &self.settings,
        )
        .await;
        let (endpoint, connection) = match connected {
            Ok(pair) => pair,
            Err(e) => {
                // Release the others before failing.
                self.barrier.wait();
                return Err(e.to_string());
            }
        };
        let handshake = t0.elapsed();
        // The barrier blocks this thread briefly; nothing is in flight yet.
        self.barrier.wait();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..self.streams {
            let (mut send, mut recv) = connection
                .open_bi()
                .await
                .map_err(|e| format!("opening a stream: {e}"))?;
            let payload = self.payload.clone();
            let bucket = self.bucket.clone();
            let per_stream = self.per_stream;
            tasks.push(tokio::task::spawn_local(async move {
                let mut sent = 0u64;
                let mut at = 0usize;
                while sent < per_stream {
                    let len = (per_stream - sent).min(WRITE_BYTES as u64) as usize;
                    if at + len > payload.len() {
                        at = 0;
                    }
                    if let Some(bucket) = &bucket {
                        let wait = bucket
                            .lock()
                            .expect("bucket")
                            .take(len as u64 + 45, Instant::now());
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                    }
                    send.write_chunk(payload.slice(at..at + len))
                        .await
                        .map_err(|e| format!("writing: {e}"))?;
                    at += len;
                    sent += len as u64;
                }
                send.finish().map_err(|e| format!("finishing: {e}"))?;
                let mut answer = [0u8; 8];
                recv.read_exact(&mut answer)
                    .await
                    .map_err(|e| format!("reading the server's answer: {e}"))?;
                let received = u64::from_le_bytes(answer);
                if received != per_stream {
                    return Err(format!("server received {received} bytes of {per_stream}"));
                }
                Ok::<u64, String>(received)
            }));
        }
        let mut bytes = 0;
        for task in tasks {
            bytes += task.await.map_err(|e| format!("stream task: {e}"))??;
        }
        let transfer = start.elapsed();
        let stats = connection.stats();
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        Ok(ConnectionReport {
            handshake_ms: round3(handshake.as_secs_f64() * 1e3),
            transfer_s: round3(transfer.as_secs_f64()),
            bytes,
            path_mtu: stats.path.current_mtu,
            rtt_ms: round3(stats.path.rtt.as_secs_f64() * 1e3),
            cwnd: stats.path.cwnd,
            lost_packets: stats.path.lost_packets,
            lost_bytes: stats.path.lost_bytes,
            congestion_events: stats.path.congestion_events,
            udp_tx_datagrams: stats.udp_tx.datagrams,
            udp_tx_bytes: stats.udp_tx.bytes,
            udp_rx_datagrams: stats.udp_rx.datagrams,
            udp_rx_bytes: stats.udp_rx.bytes,
        })
    }
}

/// The server child: mover daemon's endpoint settings on a multi-threaded runtime.
pub fn serve(identity_dir: &Path, trust: &str, threads: usize) -> Result<(), String> {
    let read = |name: &str| {
        std::fs::read(identity_dir.join(name))
            .map_err(|e| format!("{}: {e}", identity_dir.join(name).display()))
    };
    let credentials =
        SiteCredentials::from_pem("bench-server", &read("cert.pem")?, &read("key.pem")?)
            .map_err(|e| e.to_string())?;
    let trust_fp = Fingerprint::parse(trust).map_err(|e| e.to_string())?;
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| format!("server runtime: {e}"))?;
    let received = Arc::new(AtomicU64::new(0));
    let streams = Arc::new(AtomicU64::new(0));
    let first = Arc::new(Mutex::new(None::<Instant>));
    let last = Arc::new(Mutex::new(None::<Instant>));
    runtime.block_on(async {
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal");
        let settings = LinkSettings::for_address(&listen);
        let endpoint = transport::quic::server(
            listen,
            &credentials,
            TrustStore::new([("bench-client".to_string(), trust_fp)]),
            &settings,
        )
        .map_err(|e| e.to_string())?;
        let address = endpoint.local_addr().map_err(|e| e.to_string())?;
        println!("listening on {address}");
        std::io::stdout().flush().map_err(|e| e.to_string())?;
        // The parent closes our stdin when it wants the report.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            let _ = done_tx.send(());
        });
        let accept = {
            let endpoint = endpoint.clone();
            let (received, streams, first, last) = (
                received.clone(),
                streams.clone(),
                first.clone(),
                last.clone(),
            );
            async move {
                while let Some(incoming) = endpoint.accept().await {
                    let (received, streams, first, last) = (
                        received.clone(),
                        streams.clone(),
                        first.clone(),
                        last.clone(),
                    );
                    tokio::spawn(async move {
                        let Ok(connection) = incoming.await else {
                            return;
                        };
                        while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                            let (received, streams, first, last) = (
                                received.clone(),
                                streams.clone(),
                                first.clone(),
                                last.clone(),
                            );
                            tokio::spawn(async move {
                                let mut buf = vec![0u8; READ_BYTES];
                                let mut n = 0u64;
                                loop {
                                    match recv.read(&mut buf).await {
                                        Ok(Some(k)) => {
                                            if n == 0 {
                                                first
                                                    .lock()
                                                    .unwrap()
                                                    .get_or_insert_with(Instant::now);
                                            }
                                            n += k as u64;
                                        }
                                        Ok(None) => break,
                                        Err(_) => return,
                                    }
                                }
                                *last.lock().unwrap() = Some(Instant::now());
                                received.fetch_add(n, Ordering::Relaxed);
                                streams.fetch_add(1, Ordering::Relaxed);
                                let _ = send.write_all(&n.to_le_bytes()).await;
                                let _ = send.finish();
                                let _ = send.stopped().await;
                            });
                        }
                    });
                }
            }
        };
        tokio::select! {
            () = accept => {}
            _ = done_rx => {}
        }
        endpoint.close(0u32.into(), b"bench done");
        Ok::<(), String>(())
    })?;
    let (user, sys) = rusage_self();
    let receive_s = match (*first.lock().unwrap(), *last.lock().unwrap()) {
        (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let report = ServerReport {
        bytes_received: received.load(Ordering::Relaxed),
        streams: streams.load(Ordering::Relaxed),
        receive_s: round3(receive_s),
        cpu_user_s: round3(user),
        cpu_sys_s: round3(sys),
        threads,
    };
    println!("{}", serde_json::to_string(&report).expect("serialises"));
    // Leave without waiting for the runtime's blocked tasks (the stdin thread is done).
    std::process::exit(0);
}
