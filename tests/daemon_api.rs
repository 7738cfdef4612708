//! The daemon's API with real processes: `mover daemon` serving its Unix socket, driven by
//! curl, by the `mover` CLI and by raw HTTP from the test.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A site with its daemon; sockets live in a short /tmp directory (sun_path is 108 bytes).
struct Daemon {
    _dir: tempfile::TempDir,
    _socket_dir: tempfile::TempDir,
    root: PathBuf,
    site: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn new(config_extra: &str) -> Daemon {
        let dir = workdir();
        let socket_dir = tempfile::Builder::new()
            .prefix("mvapi")
            .tempdir_in("/tmp")
            .unwrap();
        let root = dir.path().to_path_buf();
        let site = root.join("site-a");
        let socket = socket_dir.path().join("a.sock");
        run_json(
            mover()
                .args(["init", "--site", "a", "--dir"])
                .arg(&site)
                .arg("--socket")
                .arg(&socket),
        );
        if !config_extra.is_empty() {
            let path = site.join("mover.toml");
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, text + config_extra).unwrap();
        }
        let mut daemon = Daemon {
            log: root.join("daemon.log"),
            _dir: dir,
            _socket_dir: socket_dir,
            root,
            site,
            socket,
            child: None,
        };
        daemon.start();
        daemon
    }

    fn start(&mut self) {
        let (child, line) = spawn_daemon(&self.site.join("mover.toml"), &self.log);
        assert!(
            line.contains(&format!("api on {}", self.socket.display())),
            "daemon said {line:?}; log: {}",
            self.log_text()
        );
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM; returns the exit status once the daemon has drained.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn hup(&self) {
        let pid = self.child.as_ref().unwrap().id();
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The CLI as a client of this daemon.
    fn cli(&self) -> Command {
        let mut command = mover();
        command.env("MOVER_SOCKET", &self.socket);
        command
    }

    fn http(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: mover\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let (status, text) = raw_http(&self.socket, request.as_bytes());
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    fn wait_job(&self, id: &str) -> Value {
        loop {
            let (status, job) = self.http("GET", &format!("/v1/jobs/{id}/wait?timeout=30"), None);
            assert_eq!(status, 200, "{job}");
            if ["done", "failed", "cancelled"].contains(&job["state"].as_str().unwrap()) {
                return job;
            }
        }
    }

    /// Polls until `ready(job)` holds (for catching a job mid-flight).
    fn poll_until(&self, id: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, job) = self.http("GET", &format!("/v1/jobs/{id}"), None);
            if ready(&job) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job never reached the state: {job}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn audit(&self) -> Vec<Value> {
        let v = run_json(mover().arg("audit").arg("--site-dir").arg(&self.site));
        v.as_array().unwrap().clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends raw bytes, returns the status code and body text (0 when no status line came).
fn raw_http(socket: &Path, request: &[u8]) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).expect("connect to the API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = stream.write_all(request);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn data_set(root: &Path, files: usize, size: usize) -> PathBuf {
    let data = root.join("data");
    for i in 0..files {
        write_random(
            &data.join(format!("d{}/f{i}.bin", i % 3)),
            size,
            i as u64 + 7,
        );
    }
    std::fs::write(data.join("notes.txt"), "checkpoint notes\n".repeat(100)).unwrap();
    data
}

#[test]
fn jobs_via_curl_and_cli() {
    let d = Daemon::new("");
    let data = data_set(&d.root, 4, 3 << 20);

    // curl: submit, then wait without polling.
    let output = Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(&d.socket)
        .args(["-X", "POST", "-d"])
        .arg(json!({"kind": "backup", "path": data}).to_string())
        .args(["-w", "\n%{http_code}", "http://mover/v1/jobs"])
        .output()
        .expect("curl is installed (.ci/run installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap();
    assert_eq!(code, "201", "{text}");
    let job: Value = serde_json::from_str(body).unwrap();
    for field in [
        "id",
        "state",
        "bytes_total",
        "bytes_done",
        "bytes_sent",
        "snapshot",
    ] {
        assert!(job.get(field).is_some(), "job lacks {field}: {job}");
    }
    let id = job["id"].as_str().unwrap().to_string();
    let waited = run_json(d.cli().args(["wait", &id]));
    assert_eq!(waited["state"], "done", "{waited}");
    let first = waited["snapshot"].as_str().unwrap().to_string();
    assert_eq!(waited["bytes_done"], waited["bytes_total"]);

    // The CLI: a second backup (nothing new), a restore, the views.
    std::fs::write(data.join("notes.txt"), "changed\n").unwrap();
    let second = run_json(d.cli().args(["backup", "--wait"]).arg(&data));
    assert_eq!(second["state"], "done", "{second}");
    assert_eq!(second["kind"], "backup");
    assert_ne!(second["snapshot"].as_str().unwrap(), first);
    let target = d.root.join("restored");
    let restored = run_json(
        d.cli()
            .args([
                "restore",
                second["snapshot"].as_str().unwrap(),
                "--wait",
                "--to",
            ])
            .arg(&target),
    );
    assert_eq!(restored["state"], "done", "{restored}");
    assert_same_tree(&data, &target);

    let jobs = run_json(d.cli().arg("jobs"));
    assert_eq!(jobs.as_array().unwrap().len(), 3, "{jobs}");
    let snapshots = run_json(d.cli().arg("snapshots"));
    assert_eq!(snapshots.as_array().unwrap().len(), 2, "{snapshots}");
    let sites = run_json(d.cli().arg("sites"));
    assert_eq!(sites[0]["site"], "a");
    let status = run_json(d.cli().args(["status", &id]));
    assert_eq!(status["state"], "done");
    let verify = run_json(d.cli().args(["verify", "--wait"]));
    assert_eq!(verify["state"], "done", "{verify}");

    let (code, metrics) = d.http("GET", "/metrics", None);
    assert_eq!(code, 200);
    let metrics = metrics.as_str().unwrap().to_string();
    for needle in [
        "mover_jobs{state=\"done\"} 4",
        "mover_bytes_read_total{site=\"a\"}",
        "mover_bytes_stored_total{site=\"a\",tier=\"hot\"}",
        "mover_stage_seconds_bucket{stage=\"pack_seal\",le=\"+Inf\"}",
        "mover_job_queue_wait_seconds_count 4",
        "mover_api_requests_total{method=\"POST\",status=\"201\"}",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }

    // Exit codes a scheduler acts on.
    let missing = run(d.cli().args(["status", "b-999"]));
    assert_eq!(missing.status.code(), Some(5), "{}", stderr(&missing));
    assert!(stderr(&missing).contains("no such job"));
    // `mover jobs | head -0`: a quiet end, as a closed pipe ends any filter.
    let piped = d
        .cli()
        .arg("jobs")
        .stdout(pipe_without_reader())
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        piped.status.signal(),
        Some(libc::SIGPIPE),
        "{}",
        stderr(&piped)
    );
    assert!(!stderr(&piped).contains("panicked"), "{}", stderr(&piped));
    let nowhere = run(mover()
        .env("MOVER_SOCKET", d.root.join("nothing.sock"))
        .arg("jobs"));
    assert_eq!(nowhere.status.code(), Some(6), "{}", stderr(&nowhere));
    assert!(stderr(&nowhere).contains("daemon unreachable"));
    let actions: Vec<String> = d
        .audit()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    assert!(
        actions.iter().filter(|a| *a == "job.submit").count() == 4,
        "{actions:?}"
    );
}

#[test]
fn concurrent_submits_with_idempotency_keys_make_exactly_one_job_per_key() {
    let d = Daemon::new("");
    const KEYS: usize = 20;
    let ids: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..200)
            .map(|i| {
                let d = &d;
                scope.spawn(move || {
                    let request = json!({"kind": "verify", "idempotency_key": format!("epilog-{}", i % KEYS)});
                    let (status, job) = d.http("POST", "/v1/jobs", Some(&request));
                    assert!(status == 201 || status == 200, "{status} {job}");
                    job["id"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), KEYS, "{distinct:?}");
    let (_, jobs) = d.http("GET", "/v1/jobs?limit=1000", None);
    assert_eq!(jobs.as_array().unwrap().len(), KEYS);
    // A retry after the job ended still finds it.
    let (status, again) = d.http(
        "POST",
        "/v1/jobs",
        Some(&json!({"kind": "verify", "idempotency_key": "epilog-3"})),
    );
    assert_eq!(status, 200);
    assert!(distinct.contains(&again["id"].as_str().unwrap().to_string()));
}

#[test]
fn bad_requests_get_a_reason_and_the_daemon_keeps_serving() {
    let d = Daemon::new("");
    let cases: Vec<(&[u8], u16, &str)> = vec![
        (b"GARBAGE\r\n\r\n", 400, ""),
        (b"GET /v1/jobs HTTP/9.9\r\n\r\n", 0, ""),
        (
            b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{\"kind\":}",
            400,
            "job request",
        ),
        (
            b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 40\r\nConnection: close\r\n\r\n{\"kind\":\"backup\",\"path\":\"/x\",\"colour\":1}",
            400,
            "unknown field `colour`",
        ),
        (
            b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 17\r\nConnection: close\r\n\r\n{\"kind\":\"backup\"}",
            400,
            "`path` is required",
        ),
        (
            b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 999999999\r\nConnection: close\r\n\r\n",
            413,
            "expected at most",
        ),
        (
            b"GET /v1/nothing HTTP/1.1\r\nConnection: close\r\n\r\n",
            404,
            "no such endpoint",
        ),
        (
            b"PUT /v1/jobs HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            405,
            "expected GET, POST",
        ),
        (
            b"DELETE /v1/jobs/v-1 HTTP/1.1\r\nConnection: close\r\n\r\n",
            404,
            "no such job",
        ),
    ];
    for (request, status, reason) in cases {
        let (got, body) = raw_http(&d.socket, request);
        if status != 0 {
            assert_eq!(got, status, "{}: {body}", String::from_utf8_lossy(request));
        } else {
            assert!(got == 0 || (400..500).contains(&got), "{got} {body}");
        }
        assert!(
            body.contains(reason),
            "{}: {body}",
            String::from_utf8_lossy(request)
        );
    }
    // A huge body sent chunked (no length up front) is cut off at the bound.
    let mut chunked =
        b"POST /v1/jobs HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    for _ in 0..40 {
        chunked.extend_from_slice(b"1000\r\n");
        chunked.extend(std::iter::repeat_n(b' ', 0x1000));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (got, body) = raw_http(&d.socket, &chunked);
    assert_eq!(got, 413, "{body}");
    // Headers beyond the bound.
    let mut big_head = b"GET /v1/status HTTP/1.1\r\nX-Filler: ".to_vec();
    big_head.extend(std::iter::repeat_n(b'a', 64 * 1024));
    big_head.extend_from_slice(b"\r\n\r\n");
    let (got, _) = raw_http(&d.socket, &big_head);
    assert_eq!(got, 431);
    // A snapshot spec that cannot name a snapshot is refused at submit.
    for spec in ["1", "../../etc/passwd", "latest:../../etc"] {
        let request = json!({"kind": "restore", "snapshot": spec, "to": "/tmp/r"});
        let (status, body) = d.http("POST", "/v1/jobs", Some(&request));
        assert_eq!(status, 400, "{spec}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("`snapshot`"),
            "{body}"
        );
    }
    let (status, daemon) = d.http("GET", "/v1/status", None);
    assert_eq!(status, 200, "{daemon}");
    assert_eq!(daemon["site"], "a");
}

#[test]
fn a_job_body_with_an_unknown_field_or_a_missing_argument_names_it() {
    let d = Daemon::new("");
    for (body, named) in [
        (json!({"path": "/x"}), "`kind` is required"),
        (
            json!({"kind": "backup", "paht": "/x"}),
            "unknown field `paht`",
        ),
        (json!({"kind": "backup", "to": "b"}), "`path` is required"),
        (
            json!({"kind": "restore", "to": "/r"}),
            "`snapshot` is required",
        ),
        (
            json!({"kind": "restore", "snapshot": "latest"}),
            "`to` is required",
        ),
        (
            json!({"kind": "replicate", "to": "b"}),
            "`snapshot` is required",
        ),
        (
            json!({"kind": "replicate", "snapshot": "abcd"}),
            "`to` is required",
        ),
        (
            json!({"kind": "verify", "tier": "t"}),
            "`tier` does not apply",
        ),
    ] {
        let (status, reply) = d.http("POST", "/v1/jobs", Some(&body));
        assert_eq!(status, 400, "{body}: {reply}");
        let reason = reply["error"].as_str().unwrap_or_default();
        assert!(reason.contains(named), "{body}: {reason}");
        assert_eq!(reason.lines().count(), 1, "{reason}");
    }
    // A job that fails says what kind of failure it was, beside the line.
    let target = d.root.join("restored");
    let body = json!({"kind": "restore", "snapshot": "latest", "to": target});
    let (status, job) = d.http("POST", "/v1/jobs", Some(&body));
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap();
    let (_, end) = d.http("GET", &format!("/v1/jobs/{id}/wait?timeout=60"), None);
    assert_eq!(end["state"], "failed", "{end}");
    assert_eq!(end["error_kind"], "not_found", "{end}");
    assert!(
        end["error"].as_str().unwrap().contains("no snapshots"),
        "{end}"
    );
}

#[test]
fn a_caller_not_allowed_is_refused_and_audited() {
    assert!(
        is_root(),
        "this test switches to another uid and needs root; CI runs as root"
    );
    let uid = other_uid();
    let d = Daemon::new_open_to_all();
    let as_user = |args: &[&str]| {
        let mut command = Command::new("setpriv");
        command
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
            ])
            .arg(env!("CARGO_BIN_EXE_mover"))
            .args(args)
            .env("MOVER_SOCKET", &d.socket)
            .env("MOVER_LOG", "warn");
        command.output().unwrap()
    };
    let refused = as_user(&["jobs"]);
    assert_eq!(refused.status.code(), Some(5), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains(&format!("uid {uid}")),
        "{}",
        stderr(&refused)
    );
    let audit = d.audit();
    let entry = audit
        .iter()
        .find(|e| e["action"] == "request.refused")
        .expect("refusal audited");
    assert_eq!(entry["uid"], uid);
    assert_eq!(entry["result"], "refused");

    // Allowed after a reload.
    let config = d.site.join("mover.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[api]\n", &format!("[api]\nallowed_uids = [{uid}]\n")),
    )
    .unwrap();
    d.hup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.audit().iter().any(|e| e["action"] == "config.reload") {
        assert!(Instant::now() < deadline, "no reload: {}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let allowed = as_user(&["jobs", "--json"]);
    assert!(allowed.status.success(), "{}", stderr(&allowed));
}

/// A uid the daemon does not allow: the CI creates `mover-test`; nobody (65534) exists
/// everywhere else.
fn other_uid() -> u32 {
    Command::new("id")
        .args(["-u", "mover-test"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(65534)
}

impl Daemon {
    /// A daemon whose socket anyone can connect to (the caller check then decides).
    fn new_open_to_all() -> Daemon {
        let d = Daemon::new_with_api("socket_mode = \"0666\"\n");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            d.socket.parent().unwrap(),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        d
    }

    /// A daemon whose config has `lines` in its `[api]` section.
    fn new_with_api(lines: &str) -> Daemon {
        let mut d = Daemon::new("");
        d.kill9();
        let config = d.site.join("mover.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, text.replace("[api]\n", &format!("[api]\n{lines}"))).unwrap();
        d.start();
        d
    }
}

#[test]
fn kill9_and_sigterm_mid_job_resume_without_redoing_committed_work() {
    // Small packs so a killed backup has committed some of them.
    let mut d = Daemon::new("");
    d.kill9();
    let config = d.site.join("mover.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[engine]\n", "[engine]\npack_target_bytes = 8388608\n"),
    )
    .unwrap();
    d.start();
    let data = data_set(&d.root, 6, 64 << 20);
    let (status, job) = d.http(
        "POST",
        "/v1/jobs",
        Some(&json!({"kind": "backup", "path": data})),
    );
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let total = 6u64 * (64 << 20);
    let mid = d.poll_until(&id, |j| {
        j["state"] == "done" || j["bytes_done"].as_u64().unwrap_or(0) > total / 2
    });
    assert_eq!(
        mid["state"], "running",
        "the job ended before the kill: {mid}"
    );
    d.kill9();

    // Restarted: the job is resumed (same id) and stores only what was not committed.
    d.start();
    let resumed = d.poll_until(&id, |j| j["state"] == "running" || j["state"] == "done");
    assert!(resumed["attempts"].as_u64().unwrap() >= 2, "{resumed}");
    // A drain in the middle: exit 0, the job goes back to the queue.
    let status = d.terminate();
    assert!(
        status.success(),
        "SIGTERM exit: {status:?}; log: {}",
        d.log_text()
    );
    d.start();
    let done = d.wait_job(&id);
    assert_eq!(done["state"], "done", "{done}");
    let new = done["result"]["bytes_new"].as_u64().unwrap();
    assert!(
        new < total,
        "the resumed backup stored {new} new bytes of {total}: committed packs were redone"
    );
    let target = d.root.join("restored");
    let restore = run_json(
        d.cli()
            .args(["restore", done["snapshot"].as_str().unwrap(), "--to"])
            .arg(&target),
    );
    let restored = d.wait_job(restore["id"].as_str().unwrap());
    assert_eq!(restored["state"], "done", "{restored}");
    assert_same_tree(&data, &target);

    // A restore killed mid-way finishes on restart into the same directory.
    let target2 = d.root.join("restored2");
    let restore = run_json(
        d.cli()
            .args(["restore", done["snapshot"].as_str().unwrap(), "--to"])
            .arg(&target2),
    );
    let rid = restore["id"].as_str().unwrap().to_string();
    let mid = d.poll_until(&rid, |j| {
        j["state"] == "done" || j["bytes_done"].as_u64().unwrap_or(0) > total / 3
    });
    assert_eq!(
        mid["state"], "running",
        "the restore ended before the kill: {mid}"
    );
    d.kill9();
    d.start();
    let finished = d.wait_job(&rid);
    assert_eq!(finished["state"], "done", "{finished}");
    assert_same_tree(&data, &target2);
}

#[test]
fn cancel_queued_and_running_jobs() {
    let d = Daemon::new("");
    let data = data_set(&d.root, 4, 64 << 20);
    let big = run_json(d.cli().arg("backup").arg(&data));
    let queued = run_json(d.cli().arg("backup").arg(&data));
    let queued_id = queued["id"].as_str().unwrap();
    // One job runs at a time (running_jobs_max = 1): the second waits and cancels at once.
    let cancelled = run_json(d.cli().args(["cancel", queued_id]));
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    let id = big["id"].as_str().unwrap();
    d.poll_until(id, |j| j["state"] != "queued");
    run_json(d.cli().args(["cancel", id]));
    let waited = run(d.cli().args(["wait", id]));
    let end: Value = serde_json::from_slice(&waited.stdout).unwrap_or_default();
    // 256 MiB cannot be read, chunked and stored in the moment between the job starting and
    // the cancel; if it ever is, this fails saying so rather than passing untested.
    assert_ne!(
        end["state"], "done",
        "the job finished before the cancel reached it: {end}"
    );
    assert_eq!(waited.status.code(), Some(4), "{}", stderr(&waited));
    let snapshots = run_json(d.cli().arg("snapshots"));
    assert_eq!(
        snapshots.as_array().unwrap().len(),
        0,
        "a cancelled backup left a snapshot"
    );
    let again = run(d.cli().args(["cancel", id]));
    assert_eq!(again.status.code(), Some(5), "{}", stderr(&again));
}

#[test]
fn an_edited_or_removed_audit_line_is_detected() {
    let d = Daemon::new("");
    for key in ["a", "b", "c"] {
        let (status, _) = d.http(
            "POST",
            "/v1/jobs",
            Some(&json!({"kind": "verify", "idempotency_key": key})),
        );
        assert_eq!(status, 201);
    }
    let verify = |site: &Path| run(mover().args(["audit", "--verify", "--site-dir"]).arg(site));
    assert!(verify(&d.site).status.success());
    let log = d.site.join("audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 4, "{text}");
    let edited = text.replacen("\"job.submit\"", "\"job.sabotage\"", 1);
    std::fs::write(&log, &edited).unwrap();
    let output = verify(&d.site);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("line"), "{}", stderr(&output));
    // Restore, then drop a line in the middle.
    let mut without: Vec<&str> = lines.clone();
    without.remove(1);
    std::fs::write(&log, without.join("\n") + "\n").unwrap();
    assert_eq!(verify(&d.site).status.code(), Some(3));
}

#[test]
fn a_line_appended_to_the_audit_log_alone_is_flagged_and_the_daemon_refuses_to_start() {
    let mut d = Daemon::new("");
    let (status, _) = d.http("POST", "/v1/jobs", Some(&json!({"kind": "verify"})));
    assert_eq!(status, 201);
    assert!(d.terminate().success(), "{}", d.log_text());
    // A well-chained line added after the daemon's last one; the head is left alone.
    let log = d.site.join("audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let last = text.lines().last().unwrap();
    let mut forged: Value = serde_json::from_str(last).unwrap();
    forged["seq"] = json!(forged["seq"].as_u64().unwrap() + 1);
    forged["prev"] = json!(blake3::hash(last.as_bytes()).to_hex().to_string());
    forged["action"] = json!("job.cancel");
    std::fs::write(&log, format!("{text}{forged}\n")).unwrap();

    let verify = run(mover()
        .args(["audit", "--verify", "--site-dir"])
        .arg(&d.site));
    assert_eq!(verify.status.code(), Some(3), "{}", stderr(&verify));
    assert!(
        stderr(&verify).contains("runs past the head"),
        "{}",
        stderr(&verify)
    );
    let (mut child, line) = spawn_daemon(&d.site.join("mover.toml"), &d.log);
    let exit = child.wait().unwrap();
    assert!(line.is_empty() && !exit.success(), "daemon started: {line}");
    let said = d.log_text();
    assert!(
        said.contains(&format!("audit log {}", log.display())) && said.contains("runs past"),
        "{said}"
    );
}

#[test]
fn a_flood_of_refused_requests_is_audited_as_a_count() {
    assert!(
        is_root(),
        "this test runs curl as another uid (setpriv) and needs root; CI runs as root"
    );
    let uid = other_uid();
    let mut d = Daemon::new_open_to_all();
    let flood = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "sh",
            "-c",
            "for i in $(seq 200); do curl -s -o /dev/null --unix-socket \"$0\" http://mover/v1/jobs || exit 1; done",
        ])
        .arg(&d.socket)
        .output()
        .expect("setpriv and curl are installed (.ci/run installs them)");
    assert!(flood.status.success(), "{}", stderr(&flood));
    // A window stays open a minute; the drain at SIGTERM writes its count.
    assert!(d.terminate().success(), "{}", d.log_text());
    let refused: Vec<Value> = d
        .audit()
        .into_iter()
        .filter(|e| e["action"] == "request.refused")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert!(refused.iter().all(|e| e["uid"] == uid), "{refused:#?}");
    assert!(refused[0]["detail"]["repeats"].is_null(), "{refused:#?}");
    assert_eq!(refused[1]["detail"]["repeats"], 199, "{refused:#?}");
    assert_eq!(refused[1]["target"], "GET /v1/jobs");
}

#[test]
fn a_full_disk_refuses_jobs_with_503_until_the_audit_log_can_be_written() {
    assert!(
        is_root(),
        "this test mounts a small tmpfs to fill the disk and needs root; CI runs as root"
    );
    let mut d = Daemon::new("");
    d.kill9();
    let disk = Tmpfs::over(&d.site, "16m");
    d.start();
    let filler = disk.fill();
    let verify_job = json!({"kind": "verify", "idempotency_key": "after-the-epilog"});
    for _ in 0..2 {
        let (status, body) = d.http("POST", "/v1/jobs", Some(&verify_job));
        assert_eq!(status, 503, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        let log = d.site.join("audit.log");
        assert!(
            error.contains(&format!("audit log {}", log.display()))
                && error.contains("No space left on device"),
            "{error}"
        );
    }
    let (status, jobs) = d.http("GET", "/v1/jobs", None);
    assert_eq!((status, jobs.clone()), (200, json!([])), "{jobs}");
    assert!(
        d.log_text().contains("job submit refused"),
        "{}",
        d.log_text()
    );

    // Space again: the next submit (same idempotency key) is taken and audited.
    std::fs::remove_file(&filler).unwrap();
    let (status, job) = d.http("POST", "/v1/jobs", Some(&verify_job));
    assert_eq!(status, 201, "{job}");
    let job = d.wait_job(job["id"].as_str().unwrap());
    assert_eq!(job["state"], "done", "{job}");
    let submits: Vec<Value> = d
        .audit()
        .into_iter()
        .filter(|e| e["action"] == "job.submit")
        .collect();
    assert_eq!(submits.len(), 1, "{submits:#?}");
    assert_eq!(submits[0]["target"], job["id"]);
    let verify = run(mover()
        .args(["audit", "--verify", "--site-dir"])
        .arg(&d.site));
    assert!(verify.status.success(), "{}", stderr(&verify));
    d.kill9();
}

#[test]
fn ended_jobs_stay_findable_beyond_the_memory_bound_until_their_retention() {
    // More ended jobs than the daemon keeps in memory (1000), all in the table.
    const JOBS: usize = 1003;
    let mut d = Daemon::new("");
    let first = run_json(d.cli().args(["verify", "--idempotency-key", "epilog-1"]));
    assert_eq!(first["id"], "v-1", "{first}");
    std::thread::scope(|scope| {
        for t in 0..4 {
            let d = &d;
            scope.spawn(move || {
                for _ in (1 + t..JOBS).step_by(4) {
                    let (status, job) =
                        d.http("POST", "/v1/jobs", Some(&json!({"kind": "verify"})));
                    assert_eq!(status, 201, "{job}");
                }
            });
        }
    });
    // One job runs at a time, in submission order: the last one ends last.
    assert_eq!(d.wait_job(&format!("v-{JOBS}"))["state"], "done");

    let (status, job) = d.http("GET", "/v1/jobs/v-1", None);
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["state"], "done", "{job}");
    let waited = run(d.cli().args(["wait", "v-1"]));
    assert_eq!(waited.status.code(), Some(0), "{}", stderr(&waited));
    // The Slurm epilog's retry: same key, --wait.
    let again = run_json(
        d.cli()
            .args(["verify", "--wait", "--idempotency-key", "epilog-1"]),
    );
    assert_eq!(again["id"], "v-1", "{again}");
    let (status, body) = d.http("DELETE", "/v1/jobs/v-2", None);
    assert_eq!(status, 409, "{body}");
    let (_, daemon) = d.http("GET", "/v1/status", None);
    assert_eq!(daemon["jobs"]["done"], JOBS, "{daemon}");
    let (_, jobs) = d.http("GET", "/v1/jobs?limit=5000", None);
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), JOBS);
    assert_eq!(jobs[0]["id"], "v-1");
    let (_, done) = d.http("GET", "/v1/jobs?state=done&limit=2", None);
    let ids: Vec<&str> = done
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [format!("v-{}", JOBS - 1), format!("v-{JOBS}")]);

    // Retention: a restart with room for 1001 ended jobs deletes the two oldest rows and
    // frees their idempotency keys.
    d.kill9();
    let config = d.site.join("mover.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[api]\n", "[api]\nended_jobs_kept = 1001\n"),
    )
    .unwrap();
    d.start();
    for gone in ["v-1", "v-2"] {
        let (status, body) = d.http("GET", &format!("/v1/jobs/{gone}"), None);
        assert_eq!(status, 404, "{body}");
        assert!(body["error"]
            .as_str()
            .unwrap()
            .contains("api.ended_jobs_kept"));
    }
    assert_eq!(d.http("GET", "/v1/jobs/v-3", None).0, 200);
    let (_, daemon) = d.http("GET", "/v1/status", None);
    assert_eq!(daemon["jobs"]["done"], 1001, "{daemon}");
    let (status, fresh) = d.http(
        "POST",
        "/v1/jobs",
        Some(&json!({"kind": "verify", "idempotency_key": "epilog-1"})),
    );
    assert_eq!(status, 201, "{fresh}");
    assert_eq!(fresh["id"], format!("v-{}", JOBS + 1));
}
