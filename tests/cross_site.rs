//! Two sites on this machine: site `a` backs up to and restores from site `b`'s daemon over
//! QUIC on loopback, with real TLS identities and real processes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

struct Sites {
    _dir: tempfile::TempDir,
    root: PathBuf,
    a: PathBuf,
    b: PathBuf,
    b_port: u16,
    daemon: Option<Child>,
    daemon_log: PathBuf,
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn fingerprint(site: &Path) -> String {
    let value = run_json(
        mover()
            .arg("identity")
            .arg("--config")
            .arg(site.join("mover.toml")),
    );
    value["fingerprint"].as_str().unwrap().to_string()
}

fn peer_add(site: &Path, name: &str, address: &str, fingerprint: &str) {
    let output = run(mover()
        .args(["peer", "add", name, address, fingerprint, "--config"])
        .arg(site.join("mover.toml")));
    assert!(output.status.success(), "{}", stderr(&output));
}

impl Sites {
    /// Sites a and b, each trusting the other; b's daemon is not started yet.
    fn new() -> Sites {
        let dir = workdir();
        let root = dir.path().to_path_buf();
        let b_port = free_udp_port();
        let a = root.join("site-a");
        let b = root.join("site-b");
        // a's daemon (started by the tests that run jobs through it) has a socket of its own.
        run_json(
            mover()
                .args(["init", "--site", "a", "--dir"])
                .arg(&a)
                .arg("--socket")
                .arg(a.join("api.sock")),
        );
        // b's daemon also serves the API; its own socket keeps parallel tests apart.
        run_json(
            mover()
                .args([
                    "init",
                    "--site",
                    "b",
                    "--listen",
                    &format!("127.0.0.1:{b_port}"),
                    "--dir",
                ])
                .arg(&b)
                .arg("--socket")
                .arg(b.join("api.sock")),
        );
        peer_add(&a, "b", &format!("127.0.0.1:{b_port}"), &fingerprint(&b));
        peer_add(&b, "a", "127.0.0.1:9", &fingerprint(&a));
        Sites {
            daemon_log: root.join("daemon-b.log"),
            _dir: dir,
            root,
            a,
            b,
            b_port,
            daemon: None,
        }
    }

    /// Starts b's daemon and waits for its "listening" line.
    fn start_daemon(&mut self) {
        let (child, line) = spawn_daemon(&self.b.join("mover.toml"), &self.daemon_log);
        assert!(
            line.contains(&format!("listening on 127.0.0.1:{}", self.b_port)),
            "daemon said {line:?}; log: {}",
            self.log()
        );
        self.daemon = Some(child);
    }

    fn kill_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.daemon_log).unwrap_or_default()
    }

    fn backup_to_b(&self, path: &Path) -> Value {
        let job = run_json(
            mover()
                .arg("backup")
                .arg(path)
                .args(["--to", "b", "--site-dir"])
                .arg(&self.a),
        );
        assert_eq!(job["state"], "done", "{job}");
        assert_eq!(job["destination"], "b", "{job}");
        job
    }

    /// Adds `line` (`key = value`) to a's settings for peer b (the last section of a's
    /// config, as `Sites::new` leaves it).
    fn set_a_peer_b(&self, line: &str) {
        let config = self.a.join("mover.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        let last = text.rfind("\n[").map(|at| &text[at + 1..]);
        assert!(last.is_some_and(|l| l.starts_with("[peers.b]")), "{text}");
        std::fs::write(&config, format!("{text}{line}\n")).unwrap();
    }

    fn restore_from_b(&self, spec: &str, to: &Path) -> Value {
        let job = run_json(
            mover()
                .args(["restore", spec, "--from", "b", "--to"])
                .arg(to)
                .arg("--site-dir")
                .arg(&self.a),
        );
        assert_eq!(job["state"], "done", "{job}");
        job
    }

    /// b's catalog, read with its daemon stopped.
    fn snapshots_at_b(&self) -> Vec<Value> {
        let value = run_json(mover().arg("snapshots").arg("--site-dir").arg(&self.b));
        value.as_array().unwrap().clone()
    }

    fn set_b_pack_target(&self, bytes: u64) {
        let path = self.b.join("mover.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replace(
            "# pack_target_bytes = 134217728",
            &format!("pack_target_bytes = {bytes}"),
        );
        std::fs::write(&path, text).unwrap();
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        self.kill_daemon();
    }
}

fn data_set(root: &Path) -> PathBuf {
    let data = root.join("data");
    for i in 0..4u64 {
        write_random(&data.join(format!("ckpt/shard-{i}.bin")), 6 << 20, i);
    }
    std::fs::write(data.join("notes.txt"), "checkpoint notes\n".repeat(5000)).unwrap();
    std::fs::create_dir_all(data.join("empty")).unwrap();
    std::os::unix::fs::symlink("ckpt/shard-0.bin", data.join("latest")).unwrap();
    std::fs::hard_link(data.join("ckpt/shard-1.bin"), data.join("shard-1.link")).unwrap();
    // A sparse file: a hole, then data.
    let sparse = std::fs::File::create(data.join("sparse.bin")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, &random_bytes(1 << 20, 77), 63 << 20)
        .unwrap();
    data
}

fn data_bytes(job: &Value) -> u64 {
    job["bytes_total"].as_u64().unwrap()
}

#[test]
fn backup_to_a_peer_and_restore_from_it_are_exact_and_incremental_ships_little() {
    let mut sites = Sites::new();
    sites.start_daemon();
    let data = data_set(&sites.root);

    let first = sites.backup_to_b(&data);
    let snapshot = snapshot_id(&first);
    assert!(
        first["wire_bytes_sent"].as_u64().unwrap() > 24 << 20,
        "{first}"
    );

    let restored = sites.root.join("restored");
    let job = sites.restore_from_b(&snapshot, &restored);
    assert_eq!(job["snapshot"], snapshot.as_str());
    assert_same_tree(&data, &restored);

    // Change 2% of one checkpoint in place: the next backup ships a few chunks.
    let shard = data.join("ckpt/shard-2.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() / 2;
    let edit = bytes.len() / 50;
    bytes[at..at + edit].copy_from_slice(&random_bytes(edit, 99));
    std::fs::write(&shard, &bytes).unwrap();
    let second = sites.backup_to_b(&data);
    let wire = second["wire_bytes_sent"].as_u64().unwrap();
    assert!(
        wire * 20 <= data_bytes(&second),
        "incremental put {wire} bytes on the wire for a {} byte data set: {second}",
        data_bytes(&second)
    );
    assert!(second["files_reused"].as_u64().unwrap() >= 4, "{second}");
    let latest = sites.root.join("restored-latest");
    sites.restore_from_b("latest", &latest);
    assert_same_tree(&data, &latest);

    // Nothing was stored at a: the backups live at b.
    let at_a = run_json(mover().arg("snapshots").arg("--site-dir").arg(&sites.a));
    assert_eq!(at_a.as_array().unwrap().len(), 0, "{at_a}");
    sites.kill_daemon();
    let at_b = sites.snapshots_at_b();
    assert_eq!(at_b.len(), 2);
    assert_eq!(at_b[0]["site"], "a");
    let verify = run_json(mover().arg("verify").arg("--site-dir").arg(&sites.b));
    assert_eq!(verify["damage"].as_array().unwrap().len(), 0, "{verify}");
}

#[test]
fn a_wrong_fingerprint_is_refused_on_both_sides() {
    let mut sites = Sites::new();
    sites.start_daemon();
    let data = sites.root.join("small");
    write_random(&data.join("f"), 1 << 20, 1);
    let wrong = format!("sha256:{}", "ab".repeat(32));

    // a pins the wrong fingerprint for b: a refuses b's certificate.
    peer_add(
        &sites.a,
        "b",
        &format!("127.0.0.1:{}", sites.b_port),
        &wrong,
    );
    let output = run(mover()
        .arg("backup")
        .arg(&data)
        .args(["--to", "b", "--site-dir"])
        .arg(&sites.a));
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("refused peer") && err.contains(&wrong),
        "{err}"
    );
    assert!(err.contains(&fingerprint(&sites.b)), "{err}");

    // b does not trust a (wrong pin at b): b refuses a and logs the fingerprint it saw.
    peer_add(
        &sites.a,
        "b",
        &format!("127.0.0.1:{}", sites.b_port),
        &fingerprint(&sites.b),
    );
    sites.kill_daemon();
    peer_add(&sites.b, "a", "127.0.0.1:9", &wrong);
    sites.start_daemon();
    let output = run(mover()
        .arg("backup")
        .arg(&data)
        .args(["--to", "b", "--site-dir"])
        .arg(&sites.a));
    assert!(!output.status.success());
    let err = stderr(&output);
    assert_eq!(
        err.trim()
            .lines()
            .last()
            .map(|l| l.starts_with("mover: peer b:")),
        Some(true),
        "{err}"
    );
    let log = sites.log();
    assert!(
        log.contains("refused peer") && log.contains(&fingerprint(&sites.a)),
        "{log}"
    );
}

/// Waits until part of the transfer is durable at b: each store stream has one open pack at
/// a time, so with two workers a fourth pack file means at least two were sealed (and their
/// index commit follows the seal at once).
fn wait_for_a_pack(b: &Path, deadline: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        let packs = walk_count(&b.join("tiers/hot/packs"));
        if packs >= 4 {
            std::thread::sleep(Duration::from_millis(100));
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn walk_count(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                walk_count(&e.path())
            } else {
                1
            }
        })
        .sum()
}

fn big_data_set(root: &Path) -> PathBuf {
    let data = root.join("big");
    for i in 0..6u64 {
        write_random(&data.join(format!("part-{i}.bin")), 40 << 20, 100 + i);
    }
    data
}

#[test]
fn a_peer_killed_mid_transfer_leaves_no_snapshot_and_the_rerun_sends_only_the_rest() {
    let mut sites = Sites::new();
    sites.set_b_pack_target(8 << 20);
    sites.start_daemon();
    let data = big_data_set(&sites.root);
    let child = mover()
        .arg("--json")
        .arg("backup")
        .arg(&data)
        .args(["--to", "b", "--site-dir"])
        .arg(&sites.a)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_for_a_pack(&sites.b, Duration::from_secs(60)),
        "no pack at b: {}",
        sites.log()
    );
    sites.kill_daemon(); // kill -9
    let output = child.wait_with_output().unwrap();
    assert!(
        !output.status.success(),
        "the backup cannot succeed without b"
    );
    let err = stderr(&output);
    assert!(
        err.trim().lines().count() == 1 && err.contains("peer b"),
        "{err}"
    );
    assert!(
        sites.snapshots_at_b().is_empty(),
        "a partial snapshot is visible"
    );

    sites.start_daemon();
    let job = sites.backup_to_b(&data);
    let sent = job["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < data_bytes(&job),
        "the re-run sent {sent} of {} bytes: nothing acknowledged was skipped",
        data_bytes(&job)
    );
    let restored = sites.root.join("restored");
    sites.restore_from_b(&snapshot_id(&job), &restored);
    assert_same_tree(&data, &restored);
}

#[test]
fn a_sender_killed_mid_transfer_leaves_no_snapshot_and_the_daemon_keeps_serving() {
    let mut sites = Sites::new();
    sites.set_b_pack_target(8 << 20);
    sites.start_daemon();
    let data = big_data_set(&sites.root);
    let mut child = mover()
        .arg("backup")
        .arg(&data)
        .args(["--to", "b", "--site-dir"])
        .arg(&sites.a)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_for_a_pack(&sites.b, Duration::from_secs(60)),
        "no pack at b: {}",
        sites.log()
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let job = sites.backup_to_b(&data);
    assert!(
        job["bytes_sent"].as_u64().unwrap() < data_bytes(&job),
        "{job}"
    );
    let restored = sites.root.join("restored");
    sites.restore_from_b("latest", &restored);
    assert_same_tree(&data, &restored);
    sites.kill_daemon();
    assert_eq!(
        sites.snapshots_at_b().len(),
        1,
        "only the finished backup is visible"
    );
}

/// Connects to b as site a (a trusted certificate) and writes raw bytes on one stream;
/// returns what b answered (decoded frames as text) before closing the stream.
fn speak_raw(sites: &Sites, bytes: Vec<u8>) -> String {
    let identity = sites.a.join("identity");
    let credentials = transport::tls::SiteCredentials::from_pem(
        "a",
        &std::fs::read(identity.join("cert.pem")).unwrap(),
        &std::fs::read(identity.join("key.pem")).unwrap(),
    )
    .unwrap();
    let expected = transport::identity::Fingerprint::parse(&fingerprint(&sites.b)).unwrap();
    let address: std::net::SocketAddr = format!("127.0.0.1:{}", sites.b_port).parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let settings = transport::quic::LinkSettings::for_address(&address);
        let (endpoint, connection) =
            transport::quic::connect(&credentials, "b", address, expected, &settings)
                .await
                .unwrap();
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        let _ = send.finish();
        let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
            .await
            .expect("b answers within 10 s")
            .unwrap_or_default();
        let mut frames = Vec::new();
        let _ = transport::frame::decode_all(&answer, |f| frames.push(format!("{f:?}")));
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        frames.join("\n")
    })
}

/// An encoded Store hello naming `site`.
fn store_hello(site: &str) -> Vec<u8> {
    let mut out = Vec::new();
    transport::frame::encode(
        &transport::frame::Frame::Hello {
            version_min: 1,
            version_max: 1,
            purpose: transport::frame::Purpose::Store,
            site,
            tier: "",
            job: "j",
        },
        &mut out,
    );
    out
}

#[test]
fn garbage_truncated_and_oversized_frames_close_the_stream_with_a_reason() {
    let mut sites = Sites::new();
    sites.start_daemon();

    let answer = speak_raw(&sites, b"GET / HTTP/1.1\r\n\r\n".to_vec());
    assert!(answer.contains("unknown frame type"), "{answer}");

    // A Chunk header claiming 1 GiB: refused from the header, nothing buffered.
    let mut oversized = vec![5u8, 0, 0, 0];
    oversized.extend_from_slice(&(1u32 << 30).to_le_bytes());
    let answer = speak_raw(&sites, oversized);
    assert!(answer.contains("exceeds its bound"), "{answer}");

    // A hello cut short.
    let mut hello = store_hello("a");
    hello.truncate(hello.len() - 3);
    let answer = speak_raw(&sites, hello);
    assert!(answer.contains("Error"), "{answer}");

    // A hello that claims to be another site than the certificate says.
    let lying = store_hello("b");
    let answer = speak_raw(&sites, lying);
    assert!(answer.contains("certificate"), "{answer}");

    // A chunk nobody asked for, after a proper hello.
    let mut unasked = store_hello("a");
    transport::frame::encode(
        &transport::frame::Frame::Chunk {
            id: [7; 32],
            codec: 0,
            raw_len: 3,
            payload: b"abc",
        },
        &mut unasked,
    );
    let answer = speak_raw(&sites, unasked);
    assert!(answer.contains("not asked for"), "{answer}");

    // The daemon still serves a real backup.
    let data = sites.root.join("small");
    write_random(&data.join("f"), 3 << 20, 5);
    let job = sites.backup_to_b(&data);
    let restored = sites.root.join("restored");
    sites.restore_from_b(&snapshot_id(&job), &restored);
    assert_same_tree(&data, &restored);
}

/// A Store stream's opening: Hello of versions `min..=max` for job "j", then, when `attempt`
/// is given, the Attempt frame a version-2 sender sends after the Welcome.
fn store_opening(min: u16, max: u16, attempt: Option<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    transport::frame::encode(
        &transport::frame::Frame::Hello {
            version_min: min,
            version_max: max,
            purpose: transport::frame::Purpose::Store,
            site: "a",
            tier: "",
            job: "j",
        },
        &mut out,
    );
    if let Some(attempt) = attempt {
        transport::frame::encode(&transport::frame::Frame::Attempt { attempt }, &mut out);
    }
    out
}

#[test]
fn a_version_1_sender_is_served_as_before_and_an_old_attempt_is_refused_as_superseded() {
    let mut sites = Sites::new();
    sites.start_daemon();
    let query = |out: &mut Vec<u8>| {
        transport::frame::encode(
            &transport::frame::Frame::Query {
                seq: 1,
                ids: transport::frame::id_list(&[[7; 32]]),
            },
            out,
        )
    };

    // An old sender: version 1, no Attempt frame, have/want as before.
    let mut old = store_opening(1, 1, None);
    query(&mut old);
    let answer = speak_raw(&sites, old);
    assert!(answer.contains("Welcome { version: 1,"), "{answer}");
    assert!(answer.contains("Missing { seq: 1"), "{answer}");
    assert!(!answer.contains("Error"), "{answer}");

    // A new one: version 2, its attempt right after the Welcome.
    let mut second = store_opening(1, 2, Some(2));
    query(&mut second);
    let answer = speak_raw(&sites, second);
    assert!(answer.contains("Welcome { version: 2,"), "{answer}");
    assert!(answer.contains("Missing { seq: 1"), "{answer}");
    assert!(!answer.contains("Error"), "{answer}");

    // A stream of attempt 1 of the same job, after attempt 2 began: refused before it stores.
    let mut stale = store_opening(1, 2, Some(1));
    query(&mut stale);
    let answer = speak_raw(&sites, stale);
    assert!(answer.contains("code: Superseded"), "{answer}");
    assert!(
        answer.contains("attempt 1") && answer.contains("attempt 2"),
        "{answer}"
    );
    assert!(!answer.contains("Missing"), "{answer}");

    // A version-2 stream must name its attempt before anything else.
    let mut unnamed = store_opening(1, 2, None);
    query(&mut unnamed);
    let answer = speak_raw(&sites, unnamed);
    assert!(answer.contains("expected Attempt"), "{answer}");
}

#[test]
fn an_open_stream_of_an_old_attempt_is_stopped_when_a_newer_attempt_begins() {
    let mut sites = Sites::new();
    sites.start_daemon();
    let identity = sites.a.join("identity");
    let credentials = transport::tls::SiteCredentials::from_pem(
        "a",
        &std::fs::read(identity.join("cert.pem")).unwrap(),
        &std::fs::read(identity.join("key.pem")).unwrap(),
    )
    .unwrap();
    let expected = transport::identity::Fingerprint::parse(&fingerprint(&sites.b)).unwrap();
    let address: std::net::SocketAddr = format!("127.0.0.1:{}", sites.b_port).parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = runtime.block_on(async move {
        let settings = transport::quic::LinkSettings::for_address(&address);
        let (endpoint, connection) =
            transport::quic::connect(&credentials, "b", address, expected, &settings)
                .await
                .unwrap();
        // Attempt 3's stream: welcomed, then its sender goes quiet (killed) without closing.
        let (mut old_send, old_recv) = connection.open_bi().await.unwrap();
        old_send
            .write_all(&store_opening(1, 2, Some(3)))
            .await
            .unwrap();
        let mut old = transport::quic::FrameReader::new(old_recv);
        let welcome = format!("{:?}", old.next().await.unwrap());
        assert!(welcome.contains("Welcome"), "{welcome}");
        // Attempt 4 of the same job opens its stream (the resumed sender).
        let (mut new_send, _new_recv) = connection.open_bi().await.unwrap();
        new_send
            .write_all(&store_opening(1, 2, Some(4)))
            .await
            .unwrap();
        // The old stream is told at once (well before any idle timeout would end it).
        let answer = tokio::time::timeout(Duration::from_secs(30), old.next())
            .await
            .expect("the old attempt's stream was not stopped")
            .map(|frame| format!("{frame:?}"))
            .unwrap_or_else(|e| format!("read error: {e}"));
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        answer
    });
    assert!(answer.contains("code: Superseded"), "{answer}");
    assert!(
        answer.contains("attempt 3") && answer.contains("attempt 4"),
        "{answer}"
    );
}

#[test]
fn a_restore_over_ethernet_sized_datagrams_is_exact() {
    // 1452-byte datagrams (a's setting for b, which the daemon's sends follow): every chunk
    // reaches the frame reader in many small pieces that it copies together, so the restore
    // takes raw and lz4 chunks from one piece (not loopback's pieces kept as they came).
    let mut sites = Sites::new();
    sites.set_a_peer_b("udp_payload_bytes_max = 1452");
    sites.start_daemon();
    let data = sites.root.join("ethernet");
    write_random(&data.join("weights.bin"), 5 << 20, 21);
    let digits = random_bytes(3 << 20, 22);
    let text: String = digits
        .chunks(16)
        .map(|line| {
            let fields: Vec<String> = line.iter().map(|b| (b % 100).to_string()).collect();
            format!("{{\"values\": [{}]}}\n", fields.join(", "))
        })
        .collect();
    std::fs::write(data.join("shard.jsonl"), text).unwrap();
    let job = sites.backup_to_b(&data);
    let restored = sites.root.join("restored");
    sites.restore_from_b(&snapshot_id(&job), &restored);
    assert_same_tree(&data, &restored);
}

#[test]
fn a_bandwidth_cap_holds_the_sender_to_its_rate() {
    let mut sites = Sites::new();
    sites.set_a_peer_b("bandwidth = \"16MB/s\"");
    sites.start_daemon();
    let data = sites.root.join("capped");
    write_random(&data.join("f"), 24 << 20, 9);
    let job = sites.backup_to_b(&data);
    // 25.2 MB at 16 MB/s with a 4 MiB burst cannot take less than ~1.3 s; a cap that did not
    // hold would finish in a fraction of that on loopback.
    let elapsed = job["elapsed_s"].as_f64().unwrap();
    assert!(
        elapsed >= 1.0,
        "24 MiB capped at 16 MB/s took only {elapsed} s: {job}"
    );
}

/// A daemon started by a test, killed when the test ends (passes or fails).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_concurrent_jobs_to_one_capped_peer_share_its_cap() {
    const CAP_BYTES_PER_S: f64 = 8e6;
    // One bucket lets through its burst (one full chunk frame, 4 MiB + 37 B) beyond the rate.
    const BURST_BYTES: f64 = ((4 << 20) + 37) as f64;
    let mut sites = Sites::new();
    sites.set_a_peer_b("bandwidth = \"8MB/s\"");
    let config = sites.a.join("mover.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace("# running_jobs_max = 1 ", "running_jobs_max = 2 ");
    assert!(text.contains("\nrunning_jobs_max = 2 "), "{text}");
    std::fs::write(&config, text).unwrap();
    sites.start_daemon();
    let (a_daemon, line) = spawn_daemon(&config, &sites.root.join("daemon-a.log"));
    let _a_daemon = KillOnDrop(a_daemon);
    assert!(line.contains("api on"), "a's daemon said {line:?}");
    let socket = sites.a.join("api.sock");

    // Two data sets of 32 MiB (4x the cap, so each job is cap-limited for seconds), apart
    // so that neither finds the other's chunks at b.
    let ids: Vec<String> = (0..2u64)
        .map(|i| {
            let data = sites.root.join(format!("capped-{i}"));
            write_random(&data.join("f"), 32 << 20, 300 + i);
            let job = run_json(
                mover()
                    .arg("backup")
                    .arg(&data)
                    .args(["--to", "b", "--socket"])
                    .arg(&socket),
            );
            job["id"].as_str().expect("job id").to_string()
        })
        .collect();
    let jobs: Vec<Value> = ids
        .iter()
        .map(|id| {
            let output = run(mover()
                .args(["wait", id, "--timeout", "300", "--socket"])
                .arg(&socket));
            let job = job_status(&socket, id);
            assert!(output.status.success(), "{job}: {}", stderr(&output));
            assert_eq!(job["state"], "done", "{job}");
            job
        })
        .collect();
    let span = |job: &Value| {
        (
            job["started_unix_ms"].as_u64().expect("started") as f64 / 1e3,
            job["finished_unix_ms"].as_u64().expect("finished") as f64 / 1e3,
        )
    };
    let ((start_0, end_0), (start_1, end_1)) = (span(&jobs[0]), span(&jobs[1]));
    let overlap = end_0.min(end_1) - start_0.max(start_1);
    let shorter = (end_0 - start_0).min(end_1 - start_1);
    assert!(
        overlap >= shorter / 2.0,
        "the jobs ran one after the other ({overlap} s together): {jobs:?}"
    );
    // Everything both shipped went out within the union of their runs (which also holds
    // their scans and handshakes, so the true rate is at least the one computed here): an
    // upper bound only, since a slow machine can only lower the rate. A 45-byte frame head
    // per chunk is charged to the cap too (under 0.1% of these chunks).
    let union = end_0.max(end_1) - start_0.min(start_1);
    let shipped: f64 = jobs
        .iter()
        .map(|job| {
            let result = &job["result"];
            let payload = result["bytes_sent"].as_u64().expect("bytes_sent");
            assert!(payload >= 32 << 20, "shipped less than its data: {job}");
            (payload + 45 * result["chunks_new"].as_u64().expect("chunks_new")) as f64
        })
        .sum();
    let allowed = 1.1 * CAP_BYTES_PER_S * union + BURST_BYTES;
    assert!(
        shipped <= allowed,
        "two jobs shipped {shipped} B in {union:.2} s ({start_0}..{end_0}, {start_1}..{end_1}): \
         {:.2} MB/s beyond one burst, over the 8 MB/s cap (+10%); each job had its own bucket?",
        (shipped - BURST_BYTES) / union / 1e6
    );
}

#[test]
fn a_restore_served_to_a_peer_is_held_to_that_peers_cap_after_a_reload() {
    const CAP_BYTES_PER_S: f64 = 8e6;
    const BURST_BYTES: f64 = ((4 << 20) + 37) as f64;
    let mut sites = Sites::new();
    sites.start_daemon();
    let data = sites.root.join("served");
    write_random(&data.join("f"), 32 << 20, 400);
    let snapshot = snapshot_id(&sites.backup_to_b(&data));

    // b caps what it sends to a (its last section is [peers.a]), taken in by SIGHUP.
    let config = sites.b.join("mover.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let last = text.rfind("\n[").map(|at| &text[at + 1..]);
    assert!(last.is_some_and(|l| l.starts_with("[peers.a]")), "{text}");
    std::fs::write(&config, format!("{text}bandwidth = \"8MB/s\"\n")).unwrap();
    let pid = sites.daemon.as_ref().unwrap().id();
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sites.log().contains("SIGHUP: reloaded") {
        assert!(Instant::now() < deadline, "no reload: {}", sites.log());
        std::thread::sleep(Duration::from_millis(20));
    }

    let restored = sites.root.join("restored");
    let job = sites.restore_from_b(&snapshot, &restored);
    assert_same_tree(&data, &restored);
    // Every chunk b sent went out while the restore ran: an upper bound on the rate only,
    // since a slow machine can only lower it.
    let elapsed = job["elapsed_s"].as_f64().unwrap();
    let bytes = job["bytes_written"].as_u64().unwrap() as f64;
    assert!(bytes >= (32 << 20) as f64, "{job}");
    assert!(
        bytes <= 1.1 * CAP_BYTES_PER_S * elapsed + BURST_BYTES,
        "b served {bytes} B in {elapsed:.2} s: {:.2} MB/s beyond one burst, over the 8 MB/s \
         cap (+10%) it has for a: {job}",
        (bytes - BURST_BYTES) / elapsed / 1e6
    );
}

#[test]
fn replicate_copies_a_local_snapshot_under_the_same_id_and_only_what_the_peer_lacks() {
    let mut sites = Sites::new();
    sites.start_daemon();
    let data = data_set(&sites.root);
    let local = backup(&sites.a, &data);
    let snapshot = snapshot_id(&local);
    let replicate = |spec: &str| {
        run_json(
            mover()
                .args(["replicate", spec, "--to", "b", "--site-dir"])
                .arg(&sites.a),
        )
    };
    let first = replicate(&snapshot);
    assert_eq!(first["state"], "done", "{first}");
    assert_eq!(first["snapshot"], snapshot.as_str(), "{first}");
    assert!(first["chunks_new"].as_u64().unwrap() > 0, "{first}");
    // The same snapshot id now restores from b, byte-exact.
    let restored = sites.root.join("from-b");
    sites.restore_from_b(&snapshot, &restored);
    assert_same_tree(&data, &restored);
    // Again: the peer has every chunk, so none crosses the link.
    let again = replicate("latest");
    assert_eq!(again["chunks_new"], 0, "{again}");
    assert_eq!(again["bytes_sent"], 0, "{again}");
    // A subtree is not a replica.
    let sub = run(mover()
        .args([
            "replicate",
            &format!("{snapshot}:ckpt"),
            "--to",
            "b",
            "--site-dir",
        ])
        .arg(&sites.a));
    assert!(!sub.status.success());
    assert!(stderr(&sub).contains("whole snapshot"), "{}", stderr(&sub));
}

#[test]
fn a_peer_that_does_not_pin_us_says_what_to_run_there() {
    let mut sites = Sites::new();
    peer_add(
        &sites.b,
        "a",
        "127.0.0.1:9",
        &format!("sha256:{}", "cd".repeat(32)),
    );
    sites.start_daemon();
    let data = sites.root.join("small");
    write_random(&data.join("f"), 1 << 20, 1);
    let output = run(mover()
        .arg("backup")
        .arg(&data)
        .args(["--to", "b", "--site-dir"])
        .arg(&sites.a));
    assert!(!output.status.success());
    let err = stderr(&output);
    let line = err.trim();
    assert_eq!(line.lines().count(), 1, "{err}");
    assert!(
        line.contains("site b does not trust this site's certificate; on b run `mover peer add a ")
            && line.contains(&fingerprint(&sites.a)),
        "{err}"
    );
}

#[test]
fn a_full_tier_at_the_peer_names_enospc_and_the_tier_in_the_senders_error() {
    assert!(is_root(), "this test mounts a tmpfs and must run as root");
    let mut sites = Sites::new();
    // b's hot tier on an 8 MiB file system, with what init put there.
    let _tier = Tmpfs::over(&sites.b.join("tiers/hot"), "8m");
    sites.start_daemon();
    let data = sites.root.join("data");
    for i in 0..3u64 {
        write_random(&data.join(format!("f{i}")), 8 << 20, 300 + i);
    }
    let output = run(mover()
        .arg("backup")
        .arg(&data)
        .args(["--to", "b", "--site-dir"])
        .arg(&sites.a));
    assert!(!output.status.success(), "24 MiB fit an 8 MiB tier?");
    let err = stderr(&output);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("peer b:") && err.contains("ENOSPC") && err.contains("tier \"hot\" at site b"),
        "{err}"
    );
    sites.kill_daemon();
}

fn job_status(socket: &Path, id: &str) -> Value {
    run_json(mover().args(["status", id, "--socket"]).arg(socket))
}

#[test]
fn a_peer_stopped_with_sigterm_mid_backup_requeues_the_daemon_job_which_then_succeeds() {
    let mut sites = Sites::new();
    sites.set_b_pack_target(8 << 20);
    sites.start_daemon();
    let socket = sites.a.join("api.sock");
    let a_log = sites.root.join("daemon-a.log");
    let (a_daemon, line) = spawn_daemon(&sites.a.join("mover.toml"), &a_log);
    let a_daemon = KillOnDrop(a_daemon);
    assert!(line.contains("api on"), "a's daemon said {line:?}");
    let data = big_data_set(&sites.root);
    let job = run_json(
        mover()
            .arg("backup")
            .arg(&data)
            .args(["--to", "b", "--socket"])
            .arg(&socket),
    );
    let id = job["id"].as_str().expect("job id").to_string();
    assert!(
        wait_for_a_pack(&sites.b, Duration::from_secs(60)),
        "no pack at b: {}",
        sites.log()
    );
    let mut b = sites.daemon.take().unwrap();
    unsafe { libc::kill(b.id() as i32, libc::SIGTERM) };
    b.wait().unwrap();

    // Back in the queue with the peer's reason, not failed.
    let deadline = Instant::now() + Duration::from_secs(120);
    let requeued = loop {
        let job = job_status(&socket, &id);
        assert!(
            !matches!(job["state"].as_str(), Some("failed" | "cancelled" | "done")),
            "{job}"
        );
        if job["state"] == "queued" && job["retries"].as_u64() >= Some(1) {
            break job;
        }
        assert!(Instant::now() < deadline, "never requeued: {job}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let error = requeued["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("peer b: is shutting down") && error.contains("retry 1 of"),
        "{requeued}"
    );

    sites.start_daemon();
    let output = run(mover()
        .args(["wait", &id, "--timeout", "600", "--socket"])
        .arg(&socket));
    let job = job_status(&socket, &id);
    assert!(output.status.success(), "{job}: {}", stderr(&output));
    assert_eq!(job["state"], "done", "{job}");
    drop(a_daemon); // the restore below opens a's site itself
    let restored = sites.root.join("restored");
    sites.restore_from_b(job["snapshot"].as_str().unwrap(), &restored);
    assert_same_tree(&data, &restored);
}

/// The UDP sockets process `pid` holds: its descriptors' socket inodes that the namespace's
/// UDP tables list.
fn udp_sockets(pid: u32) -> std::collections::BTreeSet<u64> {
    let mut udp = std::collections::BTreeSet::new();
    for table in ["udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            if let Some(inode) = line.split_whitespace().nth(9) {
                udp.insert(inode.parse::<u64>().unwrap());
            }
        }
    }
    let mut held = std::collections::BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        {
            let inode: u64 = inode.parse().unwrap();
            if udp.contains(&inode) {
                held.insert(inode);
            }
        }
    }
    held
}

#[test]
fn a_daemon_dials_every_restore_from_its_one_endpoint() {
    let mut sites = Sites::new();
    // b caps what it sends to a, so each restore's fetch lasts long enough to be seen.
    let config = sites.b.join("mover.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let last = text.rfind("\n[").map(|at| &text[at + 1..]);
    assert!(last.is_some_and(|l| l.starts_with("[peers.a]")), "{text}");
    std::fs::write(&config, format!("{text}bandwidth = \"16MB/s\"\n")).unwrap();
    sites.start_daemon();
    let data = sites.root.join("served");
    write_random(&data.join("f"), 16 << 20, 500);
    let snapshot = snapshot_id(&sites.backup_to_b(&data));

    let socket = sites.a.join("api.sock");
    let (a_daemon, line) = spawn_daemon(&sites.a.join("mover.toml"), &sites.root.join("a.log"));
    let a_daemon = KillOnDrop(a_daemon);
    assert!(line.contains("api on"), "a's daemon said {line:?}");
    let pid = a_daemon.0.id();
    let endpoint = udp_sockets(pid);
    assert_eq!(endpoint.len(), 1, "a's daemon at rest holds {endpoint:?}");

    // Two restores, one after the other, each a Control and a Fetch connection to b.
    for i in 0..2 {
        let restored = sites.root.join(format!("restored-{i}"));
        let job = run_json(
            mover()
                .args(["restore", &snapshot, "--from", "b", "--to"])
                .arg(&restored)
                .arg("--socket")
                .arg(&socket),
        );
        let id = job["id"].as_str().expect("job id").to_string();
        let mut wait = mover()
            .args(["wait", &id, "--timeout", "120", "--socket"])
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut samples = 0;
        while wait.try_wait().unwrap().is_none() {
            let held = udp_sockets(pid);
            assert_eq!(
                held, endpoint,
                "restore {i}: a's daemon holds {held:?}, not only its endpoint {endpoint:?}"
            );
            samples += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        let job = job_status(&socket, &id);
        assert_eq!(job["state"], "done", "{job}");
        assert!(
            samples > 0,
            "the restore ended before it was looked at: {job}"
        );
        assert_same_tree(&data, &restored);
    }
    assert_eq!(udp_sockets(pid), endpoint);
}

/// Connections b's log shows a opening.
fn connections_from_a(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("peer connected") && l.contains("peer=a"))
        .count()
}

#[test]
fn a_restore_looks_up_and_fetches_on_one_connection() {
    let mut sites = Sites::new();
    sites.start_daemon();
    let data = sites.root.join("served");
    write_random(&data.join("f"), 4 << 20, 501);
    let snapshot = snapshot_id(&sites.backup_to_b(&data));
    let before = connections_from_a(&sites.log());
    // The manifest lookup's connection is given back and the fetch, a moment later on the
    // same thread, takes it again (it is kept 5 s).
    let restored = sites.root.join("restored");
    sites.restore_from_b(&snapshot, &restored);
    assert_same_tree(&data, &restored);
    let opened = connections_from_a(&sites.log()) - before;
    assert_eq!(
        opened,
        1,
        "the restore opened {opened} connections: {}",
        sites.log()
    );
}
