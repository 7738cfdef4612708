//! `mover-bench api`: load on a running daemon's API socket, from a process of its own.
//!
//! Two measurements, either of which can be left out (`--seconds 0`, `--submits 0`):
//!
//! 1. **Requests per second.** `--connections` threads, each with one keep-alive HTTP/1.1
//!    connection, alternate `GET /v1/jobs/{id}` (the oldest job `GET /v1/jobs` lists) and
//!    `GET /v1/status` for `--seconds`, as fast as the daemon answers. Every request's latency
//!    (write of the request to the last byte of the body) goes into an hdrhistogram. The
//!    daemon's CPU time over the run (utime + stime of the pid `GET /v1/status` names, read
//!    from /proc) and this process's give the cost per request on each side: on a small
//!    machine the client competes with the daemon for the same cores.
//! 2. **Submit to running.** `--submits` verify jobs (`{"kind":"verify"}`: all snapshots; keep
//!    the site's catalog small), one after another on an otherwise idle daemon. For each:
//!    the client time until the `POST /v1/jobs` answer, the client time from sending the POST
//!    until `GET /v1/jobs/{id}` first shows it `running` (or already ended), polled every
//!    `--poll-us`, and the daemon's own figure `started_unix_ms - submitted_unix_ms`
//!    (millisecond resolution). Each job is waited for (`/wait`) before the next is sent.
//!
//! The HTTP client is a few dozen lines written for this: requests with Content-Length,
//! responses with Content-Length or chunked bodies, nothing else. It is load-generator code,
//! not a general client.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;

/// `--socket`, else `$MOVER_SOCKET`.
pub fn socket_path(flag: Option<PathBuf>) -> Result<PathBuf, String> {
    match flag {
        Some(path) => Ok(path),
        None => match std::env::var_os("MOVER_SOCKET") {
            Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
            _ => Err("no socket given: pass --socket PATH or set MOVER_SOCKET".into()),
        },
    }
}

pub struct ApiArgs {
    pub socket: PathBuf,
    pub connections: usize,
    pub seconds: f64,
    pub submits: usize,
    pub poll_us: u64,
    pub json: bool,
}

/// One keep-alive connection to the daemon.
pub struct Conn {
    path: PathBuf,
    stream: Option<BufReader<UnixStream>>,
    request: Vec<u8>,
    line: Vec<u8>,
    pub body: Vec<u8>,
}

/// Why a request could not be answered.
#[derive(Debug)]
pub struct HttpError(String);

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Conn {
    pub fn connect(path: &Path) -> Result<Conn, HttpError> {
        let mut conn = Conn {
            path: path.to_path_buf(),
            stream: None,
            request: Vec::with_capacity(512),
            line: Vec::with_capacity(256),
            body: Vec::with_capacity(64 * 1024),
        };
        conn.reconnect()?;
        Ok(conn)
    }

    fn reconnect(&mut self) -> Result<(), HttpError> {
        self.stream = None;
        let stream = UnixStream::connect(&self.path).map_err(|e| {
            HttpError(format!(
                "{}: cannot connect: {e} (is `mover daemon` running with this site.socket?)",
                self.path.display()
            ))
        })?;
        self.stream = Some(BufReader::with_capacity(64 * 1024, stream));
        Ok(())
    }

    /// Sends one request and reads its answer into `self.body`; returns the status code. A
    /// connection the daemon closed while idle is reopened once and the request sent again
    /// (callers make POSTs safe to repeat with an idempotency key).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<u16, HttpError> {
        self.request.clear();
        let _ = write!(
            self.request,
            "{method} {path} HTTP/1.1\r\nHost: mover\r\nAccept: application/json\r\n"
        );
        if let Some(body) = body {
            let _ = write!(
                self.request,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        self.request.extend_from_slice(b"\r\n");
        if let Some(body) = body {
            self.request.extend_from_slice(body);
        }
        match self.exchange() {
            Ok(status) => Ok(status),
            Err(Stale::Closed(_)) => {
                self.reconnect()?;
                self.exchange().map_err(|e| e.into_error(method, path))
            }
            Err(e) => {
                self.stream = None;
                Err(e.into_error(method, path))
            }
        }
    }

    fn exchange(&mut self) -> Result<u16, Stale> {
        if self.stream.is_none() {
            self.reconnect().map_err(|e| Stale::Other(e.0))?;
        }
        let stream = self.stream.as_mut().expect("connected above");
        if let Err(e) = stream.get_mut().write_all(&self.request) {
            return Err(match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    Stale::Closed(e.to_string())
                }
                _ => Stale::Other(format!("sending: {e}")),
            });
        }
        let result = read_response(stream, &mut self.line, &mut self.body);
        match result {
            Ok((status, close)) => {
                if close {
                    self.stream = None;
                }
                Ok(status)
            }
            Err(ReadError::NothingRead(e)) => Err(Stale::Closed(e)),
            Err(ReadError::Broken(e)) => Err(Stale::Other(e)),
        }
    }

    /// A request whose answer must be 2xx JSON.
    pub fn json(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Value, String> {
        let status = self.request(method, path, body).map_err(|e| e.0)?;
        if !(200..300).contains(&status) {
            return Err(format!(
                "{method} {path}: HTTP {status}: {}",
                String::from_utf8_lossy(&self.body).trim()
            ));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("{method} {path}: answer is not JSON: {e}"))
    }
}

enum Stale {
    /// The connection was closed before any of the answer arrived (idle timeout).
    Closed(String),
    Other(String),
}

impl Stale {
    fn into_error(self, method: &str, path: &str) -> HttpError {
        match self {
            Stale::Closed(e) => HttpError(format!("{method} {path}: connection closed: {e}")),
            Stale::Other(e) => HttpError(format!("{method} {path}: {e}")),
        }
    }
}

enum ReadError {
    NothingRead(String),
    Broken(String),
}

/// Reads a status line, headers and body. Returns the status and whether the server said it
/// closes the connection.
fn read_response(
    r: &mut BufReader<UnixStream>,
    line: &mut Vec<u8>,
    body: &mut Vec<u8>,
) -> Result<(u16, bool), ReadError> {
    let broken = |what: &str, e: io::Error| ReadError::Broken(format!("reading {what}: {e}"));
    line.clear();
    match r.read_until(b'\n', line) {
        Ok(0) => return Err(ReadError::NothingRead("end of stream".into())),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
            return Err(ReadError::NothingRead(e.to_string()))
        }
        Err(e) => return Err(broken("the status line", e)),
    }
    // "HTTP/1.1 200 OK\r\n"
    let status = line
        .split(|&b| b == b' ')
        .nth(1)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| {
            ReadError::Broken(format!(
                "status line {:?}: expected `HTTP/1.1 CODE REASON`",
                String::from_utf8_lossy(line)
            ))
        })?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut close = false;
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', line)
            .map_err(|e| broken("a header", e))?;
        if n == 0 {
            return Err(ReadError::Broken("end of stream inside the headers".into()));
        }
        let text = trim_crlf(line);
        if text.is_empty() {
            break;
        }
        let Some(colon) = text.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&text[..colon], trim_ascii(&text[colon + 1..]));
        if name.eq_ignore_ascii_case(b"content-length") {
            length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = value.eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"connection") {
            close = value.eq_ignore_ascii_case(b"close");
        }
    }
    body.clear();
    if chunked {
        loop {
            line.clear();
            r.read_until(b'\n', line)
                .map_err(|e| broken("a chunk size", e))?;
            let size_text = trim_crlf(line);
            let size_text = size_text.split(|&b| b == b';').next().unwrap_or(size_text);
            let size = std::str::from_utf8(size_text)
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .ok_or_else(|| ReadError::Broken("a chunk size that is not hex".into()))?;
            if size == 0 {
                // Trailers end with an empty line.
                loop {
                    line.clear();
                    let n = r
                        .read_until(b'\n', line)
                        .map_err(|e| broken("the trailers", e))?;
                    if n == 0 || trim_crlf(line).is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])
                .map_err(|e| broken("a chunk", e))?;
            line.clear();
            r.read_until(b'\n', line)
                .map_err(|e| broken("a chunk's end", e))?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(body).map_err(|e| broken("the body", e))?;
    } else if (100..200).contains(&status) || status == 204 || status == 304 {
        // No body.
    } else {
        // Neither length nor chunked: the body runs to the end of the connection.
        r.read_to_end(body).map_err(|e| broken("the body", e))?;
        close = true;
    }
    Ok((status, close))
}

fn trim_crlf(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && (line[end - 1] == b'\n' || line[end - 1] == b'\r') {
        end -= 1;
    }
    &line[..end]
}

fn trim_ascii(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &v[start..end]
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// Percentiles of a histogram of nanoseconds, in `unit` nanoseconds (1e3: µs, 1e6: ms).
fn latency(h: &Histogram<u64>, unit: f64) -> Latency {
    let r = |ns: f64| (ns / unit * 1000.0).round() / 1000.0;
    Latency {
        count: h.len(),
        p50: r(h.value_at_quantile(0.50) as f64),
        p99: r(h.value_at_quantile(0.99) as f64),
        p999: r(h.value_at_quantile(0.999) as f64),
        max: r(h.max() as f64),
        mean: r(h.mean()),
    }
}

fn histogram() -> Histogram<u64> {
    // 1 ns to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds")
}

#[derive(Serialize)]
pub struct RouteReport {
    pub route: String,
    pub requests: u64,
    pub response_bytes_mean: u64,
    pub latency_us: Latency,
}

#[derive(Serialize)]
pub struct LoadReport {
    pub connections: usize,
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    pub req_per_s: f64,
    pub latency_us: Latency,
    pub routes: Vec<RouteReport>,
    /// utime + stime of the daemon over the run (None where /proc/PID is not readable).
    pub daemon_cpu_s: Option<f64>,
    pub daemon_cpu_us_per_request: Option<f64>,
    /// This process (all client threads).
    pub client_cpu_s: f64,
    pub client_cpu_us_per_request: f64,
}

#[derive(Serialize)]
pub struct SubmitReport {
    pub submits: usize,
    pub poll_us: u64,
    /// Jobs that did not end `done`.
    pub not_done: usize,
    /// Submits whose POST answer already showed the job running or ended (the daemon had
    /// started it before answering), so no GET was needed to see it.
    pub running_in_post_answer: usize,
    /// Client: sending the POST to its answer.
    pub post_answer_ms: Latency,
    /// Client: sending the POST to the first GET that shows the job running or ended.
    pub submit_to_running_ms: Latency,
    /// Daemon: started_unix_ms - submitted_unix_ms (whole milliseconds).
    pub daemon_queued_ms: Latency,
    /// Client: sending the POST to the job observed ended (through /wait).
    pub submit_to_end_ms: Latency,
}

#[derive(Serialize)]
pub struct ApiReport {
    pub machine: mover::node_bench::Machine,
    pub socket: PathBuf,
    pub site: Option<String>,
    pub daemon_pid: Option<i64>,
    pub daemon_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub submit: Option<SubmitReport>,
}

// ---------------------------------------------------------------------------------------------
// CPU accounting

/// utime + stime of process `pid` in seconds, from /proc/PID/stat.
fn process_cpu_s(pid: i64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) / ticks as f64)
}

fn self_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

// ---------------------------------------------------------------------------------------------
// The runs

pub fn run(args: ApiArgs) -> Result<(), String> {
    if args.connections == 0 || args.connections > 200 {
        return Err(format!(
            "--connections {}: expected 1 to 200 (the daemon serves at most 256 at once)",
            args.connections
        ));
    }
    if !args.seconds.is_finite() || !(0.0..=3600.0).contains(&args.seconds) {
        return Err(format!("--seconds {}: expected 0 to 3600", args.seconds));
    }
    if args.seconds == 0.0 && args.submits == 0 {
        return Err("--seconds 0 and --submits 0: nothing to measure".into());
    }
    let mut conn = Conn::connect(&args.socket).map_err(|e| e.0)?;
    let status = conn.json("GET", "/v1/status", None)?;
    let daemon_pid = status["pid"].as_i64();
    let mut report = ApiReport {
        machine: mover::node_bench::Machine::this(),
        socket: args.socket.clone(),
        site: status["site"].as_str().map(str::to_string),
        daemon_pid,
        daemon_version: status["version"].as_str().map(str::to_string),
        load: None,
        submit: None,
    };
    if args.seconds > 0.0 {
        let jobs = conn.json("GET", "/v1/jobs?limit=1", None)?;
        let id = jobs
            .as_array()
            .and_then(|a| a.first())
            .and_then(|j| j["id"].as_str())
            .ok_or_else(|| {
                "GET /v1/jobs: the daemon has no jobs; submit one first (bench/api.sh backs up a small directory)".to_string()
            })?
            .to_string();
        if !args.json {
            eprintln!(
                "mover-bench: {} connection(s), {} s, GET /v1/jobs/{id} and GET /v1/status ...",
                args.connections, args.seconds
            );
        }
        report.load = Some(load(&args, &id, daemon_pid)?);
    }
    if args.submits > 0 {
        if !args.json {
            eprintln!(
                "mover-bench: {} verify submits, one at a time ...",
                args.submits
            );
        }
        report.submit = Some(submits(&mut conn, &args)?);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serialises")
        );
    } else {
        print_text(&report);
    }
    Ok(())
}

struct ThreadResult {
    routes: [(Histogram<u64>, u64, u64); 2],
    errors: u64,
    first_error: Option<String>,
}

const ROUTES: [&str; 2] = ["GET /v1/jobs/{id}", "GET /v1/status"];

fn load(args: &ApiArgs, id: &str, daemon_pid: Option<i64>) -> Result<LoadReport, String> {
    let duration = Duration::from_secs_f64(args.seconds);
    let barrier = Arc::new(Barrier::new(args.connections + 1));
    let job_path = format!("/v1/jobs/{id}");
    let mut handles = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let barrier = barrier.clone();
        let socket = args.socket.clone();
        let job_path = job_path.clone();
        let handle = std::thread::Builder::new()
            .name(format!("api-load-{i}"))
            .spawn(move || -> Result<ThreadResult, String> {
                // Connect before the clock starts; a failure still meets the barrier.
                let conn = Conn::connect(&socket);
                barrier.wait();
                let mut conn = conn.map_err(|e| e.0)?;
                let mut out = ThreadResult {
                    routes: [(histogram(), 0, 0), (histogram(), 0, 0)],
                    errors: 0,
                    first_error: None,
                };
                let paths = [job_path.as_str(), "/v1/status"];
                let start = Instant::now();
                // Threads start on different routes so both are hit evenly at any moment.
                let mut which = i % 2;
                while start.elapsed() < duration {
                    let t = Instant::now();
                    let result = conn.request("GET", paths[which], None);
                    let took = t.elapsed();
                    match result {
                        Ok(200) => {
                            let (h, n, bytes) = &mut out.routes[which];
                            h.saturating_record(took.as_nanos() as u64);
                            *n += 1;
                            *bytes += conn.body.len() as u64;
                        }
                        Ok(status) => {
                            out.errors += 1;
                            out.first_error.get_or_insert_with(|| {
                                format!(
                                    "GET {}: HTTP {status}: {}",
                                    paths[which],
                                    String::from_utf8_lossy(&conn.body).trim()
                                )
                            });
                        }
                        Err(e) => {
                            out.errors += 1;
                            out.first_error.get_or_insert_with(|| e.0.clone());
                            if out.errors > 1000 {
                                break;
                            }
                        }
                    }
                    which ^= 1;
                }
                Ok(out)
            })
            .map_err(|e| format!("starting load thread {i}: {e}"))?;
        handles.push(handle);
    }
    let cpu_before = daemon_pid.and_then(process_cpu_s);
    let client_before = self_cpu_s();
    barrier.wait();
    let started = Instant::now();
    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        results.push(
            h.join()
                .map_err(|_| "a load thread panicked".to_string())??,
        );
    }
    let wall = started.elapsed().as_secs_f64();
    let client_cpu_s = self_cpu_s() - client_before;
    let daemon_cpu_s = match (cpu_before, daemon_pid.and_then(process_cpu_s)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };

    let mut all = histogram();
    let mut routes = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for (r, name) in ROUTES.iter().enumerate() {
        let mut h = histogram();
        let (mut n, mut bytes) = (0, 0);
        for t in &results {
            h.add(&t.routes[r].0).expect("same bounds");
            n += t.routes[r].1;
            bytes += t.routes[r].2;
        }
        all.add(&h).expect("same bounds");
        routes.push(RouteReport {
            route: name.to_string(),
            requests: n,
            response_bytes_mean: bytes.checked_div(n).unwrap_or(0),
            latency_us: latency(&h, 1e3),
        });
    }
    for t in &mut results {
        errors += t.errors;
        if first_error.is_none() {
            first_error = t.first_error.take();
        }
    }
    let requests = all.len();
    let per_request = |cpu: f64| {
        if requests > 0 {
            (cpu / requests as f64 * 1e6 * 100.0).round() / 100.0
        } else {
            0.0
        }
    };
    Ok(LoadReport {
        connections: args.connections,
        seconds: (wall * 1000.0).round() / 1000.0,
        requests,
        errors,
        first_error,
        req_per_s: (requests as f64 / wall).round(),
        latency_us: latency(&all, 1e3),
        routes,
        daemon_cpu_s: daemon_cpu_s.map(|s| (s * 1000.0).round() / 1000.0),
        daemon_cpu_us_per_request: daemon_cpu_s.map(per_request),
        client_cpu_s: (client_cpu_s * 1000.0).round() / 1000.0,
        client_cpu_us_per_request: per_request(client_cpu_s),
    })
}

fn submits(conn: &mut Conn, args: &ApiArgs) -> Result<SubmitReport, String> {
    let mut post = histogram();
    let mut running = histogram();
    let mut queued = histogram();
    let mut ended = histogram();
    let mut not_done = 0;
    let mut running_in_post_answer = 0;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let poll = Duration::from_micros(args.poll_us);
    for i in 0..args.submits {
        // A key per submit makes the one automatic resend (after an idle close) safe.
        let body = format!(
            r#"{{"kind":"verify","idempotency_key":"mover-bench-{}-{nonce}-{i}"}}"#,
            std::process::id()
        );
        let t0 = Instant::now();
        let record = conn.json("POST", "/v1/jobs", Some(body.as_bytes()))?;
        post.saturating_record(t0.elapsed().as_nanos() as u64);
        let id = record["id"]
            .as_str()
            .ok_or("POST /v1/jobs: the answer has no `id`")?
            .to_string();
        let job_path = format!("/v1/jobs/{id}");
        if record["state"] != "queued" {
            running_in_post_answer += 1;
        }
        let mut record = record;
        loop {
            match record["state"].as_str() {
                Some("queued") => {}
                Some(_) => break,
                None => return Err(format!("GET {job_path}: the answer has no `state`")),
            }
            if t0.elapsed() > Duration::from_secs(600) {
                return Err(format!("job {id} still queued after 600 s"));
            }
            if !poll.is_zero() {
                std::thread::sleep(poll);
            }
            record = conn.json("GET", &job_path, None)?;
        }
        running.saturating_record(t0.elapsed().as_nanos() as u64);
        let wait_path = format!("{job_path}/wait?timeout=60");
        let mut polls = 0;
        while !matches!(
            record["state"].as_str(),
            Some("done" | "failed" | "cancelled")
        ) {
            polls += 1;
            if polls > 10 {
                return Err(format!("job {id} has not ended after 600 s"));
            }
            record = conn.json("GET", &wait_path, None)?;
        }
        ended.saturating_record(t0.elapsed().as_nanos() as u64);
        if record["state"] != "done" {
            not_done += 1;
            if not_done == 1 {
                eprintln!(
                    "mover-bench: verify job {id} ended {}: {}",
                    record["state"],
                    record["error"].as_str().unwrap_or("")
                );
            }
        }
        if let (Some(s), Some(b)) = (
            record["submitted_unix_ms"].as_u64(),
            record["started_unix_ms"].as_u64(),
        ) {
            // Whole milliseconds; 0 is recorded as 1 ns so it stays in the histogram.
            queued.saturating_record((b.saturating_sub(s) * 1_000_000).max(1));
        }
    }
    Ok(SubmitReport {
        submits: args.submits,
        poll_us: args.poll_us,
        not_done,
        running_in_post_answer,
        post_answer_ms: latency(&post, 1e6),
        submit_to_running_ms: latency(&running, 1e6),
        daemon_queued_ms: latency(&queued, 1e6),
        submit_to_end_ms: latency(&ended, 1e6),
    })
}

fn print_text(r: &ApiReport) {
    println!(
        "machine: {} cores, {}, kernel {}; daemon pid {} (site {}, version {}) on {}",
        r.machine.cores,
        r.machine.cpu_model,
        r.machine.kernel,
        r.daemon_pid.map_or("?".into(), |p| p.to_string()),
        r.site.as_deref().unwrap_or("?"),
        r.daemon_version.as_deref().unwrap_or("?"),
        r.socket.display()
    );
    if let Some(l) = &r.load {
        println!();
        println!(
            "{} connection(s), {:.1} s: {} requests, {:.0} req/s, {} errors",
            l.connections, l.seconds, l.requests, l.req_per_s, l.errors
        );
        if let Some(e) = &l.first_error {
            println!("  first error: {e}");
        }
        println!(
            "  {:<20} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "route", "requests", "bytes", "p50 us", "p99 us", "p99.9 us", "max us"
        );
        let row = |name: &str, n: u64, bytes: String, lat: &Latency| {
            println!(
                "  {:<20} {:>9} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                name, n, bytes, lat.p50, lat.p99, lat.p999, lat.max
            )
        };
        for route in &l.routes {
            row(
                &route.route,
                route.requests,
                route.response_bytes_mean.to_string(),
                &route.latency_us,
            );
        }
        row("all", l.requests, String::new(), &l.latency_us);
        match (l.daemon_cpu_s, l.daemon_cpu_us_per_request) {
            (Some(s), Some(per)) => println!(
                "  daemon CPU {s:.2} s ({:.0}% of one core), {per:.1} us per request",
                s / l.seconds * 100.0
            ),
            _ => println!("  daemon CPU: not readable from /proc"),
        }
        println!(
            "  client CPU {:.2} s ({:.0}% of one core), {:.1} us per request",
            l.client_cpu_s,
            l.client_cpu_s / l.seconds * 100.0,
            l.client_cpu_us_per_request
        );
    }
    if let Some(s) = &r.submit {
        println!();
        println!(
            "{} verify submits, one at a time (state polled every {} us), {} not done, {} already running in the POST answer:",
            s.submits, s.poll_us, s.not_done, s.running_in_post_answer
        );
        println!(
            "  {:<38} {:>9} {:>9} {:>9} {:>9}",
            "ms", "p50", "p99", "max", "mean"
        );
        for (name, lat) in [
            ("POST answered (client)", &s.post_answer_ms),
            (
                "POST sent -> seen running (client)",
                &s.submit_to_running_ms,
            ),
            (
                "started - submitted (daemon, whole ms)",
                &s.daemon_queued_ms,
            ),
            ("POST sent -> seen ended (client)", &s.submit_to_end_ms),
        ] {
            println!(
                "  {:<38} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                name, lat.p50, lat.p99, lat.max, lat.mean
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn serve_once(answer: &'static [u8]) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            for _ in 0..2 {
                // One request per answer; the requests are small enough for one read.
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    return;
                }
                s.write_all(answer).unwrap();
            }
        });
        (dir, path)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!(
                    "mover-bench-api-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn content_length_keep_alive() {
        let (_d, path) = serve_once(
            b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\ncontent-type: x\r\n\r\n{\"a\":1}\n",
        );
        let mut c = Conn::connect(&path).unwrap();
        assert_eq!(c.request("GET", "/v1/status", None).unwrap(), 200);
        assert_eq!(c.body, b"{\"a\":1}\n");
        let v = c.json("POST", "/v1/jobs", Some(b"{}")).unwrap();
        assert_eq!(v["a"], 1);
    }

    #[test]
    fn chunked() {
        let (_d, path) = serve_once(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        );
        let mut c = Conn::connect(&path).unwrap();
        assert_eq!(c.request("GET", "/nope", None).unwrap(), 404);
        assert_eq!(c.body, b"abcde");
        assert!(c
            .json("GET", "/nope", None)
            .unwrap_err()
            .contains("HTTP 404"));
    }

    #[test]
    fn proc_stat_of_self() {
        let s = process_cpu_s(std::process::id() as i64);
        assert!(s.is_some_and(|s| s >= 0.0));
    }
}
