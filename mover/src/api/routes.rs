//! The API's endpoints. Every answer is JSON (`/metrics` excepted); every error is
//! `{"error": "<one line naming the thing and what was expected>"}` with a 4xx/5xx status.
//!
//! | method and path | answer |
//! |---|---|
//! | `POST /v1/jobs` | 201 the new job, or 200 the job an earlier submit with the same `idempotency_key` made |
//! | `GET /v1/jobs?state=S&limit=N` | the jobs (oldest first, at most N, default 100) |
//! | `GET /v1/jobs/{id}` | the job with live progress |
//! | `GET /v1/jobs/{id}/wait?timeout=S` | the job once it has ended, or as it stands after S seconds (default 30) |
//! | `DELETE /v1/jobs/{id}` | 202 cancels (queued: at once; running: at the engine's next check) |
//! | `GET /v1/snapshots` | this site's catalog |
//! | `GET /v1/sites` | this site and its peers |
//! | `GET /v1/status` | the daemon: site, version, uptime, jobs by state |
//! | `GET /metrics` | Prometheus text |

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::refusals::{self, Refusals};
use super::server::Access;
use crate::audit::Who;
use crate::constants::{
    API_BODY_BYTES_MAX, API_HEAD_TIMEOUT_S, API_REFUSAL_WINDOW_S, API_WAIT_S_MAX,
};
use crate::job::JobState;
use crate::jobs::board::{CancelError, SubmitError};
use crate::jobs::{Board, JobRequest};
use crate::metrics::{self, names};

pub struct Api {
    pub board: std::sync::Arc<Board>,
    pub access: Access,
    pub started: Instant,
    pub started_unix_s: f64,
    pub socket: std::path::PathBuf,
    refusals: std::sync::Mutex<Refusals>,
}

type Reply = Response<Full<Bytes>>;

impl Api {
    pub fn new(board: std::sync::Arc<Board>, access: Access, socket: std::path::PathBuf) -> Api {
        let started_unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        Api {
            board,
            access,
            started: Instant::now(),
            started_unix_s,
            socket,
            refusals: std::sync::Mutex::new(Refusals::new(Duration::from_secs(
                API_REFUSAL_WINDOW_S,
            ))),
        }
    }

    /// Counts a refused request and audits it at a bounded rate (see [`refusals`]). Writes to
    /// the audit log (fsync): call it off the async threads.
    pub fn refused(&self, caller: &Who, request: &Request<Incoming>, reason: &str) {
        metrics::global().add(names::API_REFUSED, &[("reason", "caller")], 1);
        let target = format!("{} {}", request.method(), request.uri().path());
        let lines = self
            .lock_refusals()
            .refused(*caller, &target, reason, Instant::now());
        self.audit_refusals(lines);
    }

    /// Audits the counts of refusal windows that have ended (`all`: every open window, at
    /// shutdown). Writes to the audit log: call it off the async threads.
    pub fn sweep_refusals(&self, all: bool) {
        let lines = match all {
            true => self.lock_refusals().close_all(),
            false => self.lock_refusals().sweep(Instant::now()),
        };
        self.audit_refusals(lines);
    }

    fn lock_refusals(&self) -> std::sync::MutexGuard<'_, Refusals> {
        self.refusals.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn audit_refusals(&self, lines: Vec<refusals::Line>) {
        let window = self.lock_refusals().window();
        for line in lines {
            let who = line.who;
            tracing::warn!(
                uid = who.uid,
                gid = who.gid,
                pid = who.pid,
                repeats = line.repeats,
                "API caller refused"
            );
            let detail = line.detail(window);
            self.board
                .audit_event(who, "request.refused", &line.target, "refused", detail);
        }
    }
}

fn reply(status: StatusCode, body: &Value) -> Reply {
    let mut text = serde_json::to_vec_pretty(body).expect("JSON values serialise");
    text.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, reason: impl std::fmt::Display) -> Reply {
    reply(status, &json!({ "error": reason.to_string() }))
}

/// The answer to every request of a refused caller.
pub fn refuse(request: &Request<Incoming>, reason: &str) -> Reply {
    count(request.method(), StatusCode::FORBIDDEN);
    error(StatusCode::FORBIDDEN, reason)
}

fn count(method: &Method, status: StatusCode) {
    metrics::global().add(
        names::API_REQUESTS,
        &[("method", method.as_str()), ("status", status.as_str())],
        1,
    );
}

pub async fn handle(api: &Api, caller: Who, request: Request<Incoming>) -> Reply {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let (route, response) = match (segments.as_slice(), &method) {
        (["v1", "jobs"], &Method::POST) => ("jobs.submit", submit(api, caller, request).await),
        (["v1", "jobs"], &Method::GET) => ("jobs.list", list(api, &query)),
        (["v1", "jobs", id], &Method::GET) => ("jobs.get", get(api, id)),
        (["v1", "jobs", id], &Method::DELETE) => ("jobs.cancel", cancel(api, caller, id)),
        (["v1", "jobs", id, "wait"], &Method::GET) => ("jobs.wait", wait(api, id, &query).await),
        (["v1", "snapshots"], &Method::GET) => ("snapshots", snapshots(api)),
        (["v1", "sites"], &Method::GET) => ("sites", sites(api)),
        (["v1", "status"], &Method::GET) => ("status", status(api)),
        (["metrics"], &Method::GET) => ("metrics", metrics_text(api)),
        (known, _) => match allowed(known) {
            Some(methods) => {
                let mut r = error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("{method} {path}: expected {methods}"),
                );
                r.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(methods));
                ("other", r)
            }
            None => (
                "other",
                error(
                    StatusCode::NOT_FOUND,
                    format!("{method} {path}: no such endpoint (see the README's API section)"),
                ),
            ),
        },
    };
    count(&method, response.status());
    metrics::global().observe(
        names::API_REQUEST_SECONDS,
        &[("route", route)],
        started.elapsed().as_secs_f64(),
    );
    response
}

fn allowed(segments: &[&str]) -> Option<&'static str> {
    match segments {
        ["v1", "jobs"] => Some("GET, POST"),
        ["v1", "jobs", _] => Some("GET, DELETE"),
        ["v1", "jobs", _, "wait"]
        | ["v1", "snapshots"]
        | ["v1", "sites"]
        | ["v1", "status"]
        | ["metrics"] => Some("GET"),
        _ => None,
    }
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

async fn submit(api: &Api, caller: Who, request: Request<Incoming>) -> Reply {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > API_BODY_BYTES_MAX as u64) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body of {} bytes: expected at most {API_BODY_BYTES_MAX}",
                declared.unwrap_or(0)
            ),
        );
    }
    let collect = Limited::new(request.into_body(), API_BODY_BYTES_MAX).collect();
    let Ok(collected) =
        tokio::time::timeout(Duration::from_secs(API_HEAD_TIMEOUT_S), collect).await
    else {
        return error(
            StatusCode::REQUEST_TIMEOUT,
            format!("request body: not complete within {API_HEAD_TIMEOUT_S} s"),
        );
    };
    let body = match collected {
        Ok(body) => body.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body: expected at most {API_BODY_BYTES_MAX} bytes"),
            )
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {e}"),
            )
        }
    };
    let job: JobRequest = match serde_json::from_slice(&body) {
        Ok(job) => job,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "job request: {e} (expected a JSON object with `kind` and the job's arguments)"
                ),
            )
        }
    };
    // The submit commits to the database and the audit log (fsyncs): off the async threads.
    match tokio::task::block_in_place(|| api.board.submit(job, caller)) {
        Ok((record, true)) => reply(StatusCode::CREATED, &json!(record)),
        Ok((record, false)) => reply(StatusCode::OK, &json!(record)),
        Err(SubmitError::Invalid(reason)) => error(StatusCode::BAD_REQUEST, reason),
        Err(SubmitError::Unavailable(reason)) => error(StatusCode::SERVICE_UNAVAILABLE, reason),
        Err(SubmitError::Internal(reason)) => error(StatusCode::INTERNAL_SERVER_ERROR, reason),
    }
}

fn parse_state(text: &str) -> Option<JobState> {
    serde_json::from_value(Value::String(text.to_string())).ok()
}

fn list(api: &Api, query: &str) -> Reply {
    let only = match query_param(query, "state") {
        Some(s) => match parse_state(s) {
            Some(state) => Some(state),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("state={s}: expected queued, running, done, failed or cancelled"),
                )
            }
        },
        None => None,
    };
    let limit = match query_param(query, "limit").map(str::parse::<usize>) {
        None => 100,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "limit: expected a positive integer",
            )
        }
    };
    match tokio::task::block_in_place(|| api.board.list(only, limit)) {
        Ok(jobs) => reply(StatusCode::OK, &json!(jobs)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn no_job(api: &Api, id: &str) -> Reply {
    let kept = &api.board.site().config.api;
    error(
        StatusCode::NOT_FOUND,
        format!(
            "job {id:?}: no such job (see GET /v1/jobs; ended jobs are kept for {} days, the newest {}: api.ended_jobs_kept_days, api.ended_jobs_kept)",
            kept.ended_jobs_kept_days, kept.ended_jobs_kept
        ),
    )
}

/// The job from memory or, once it has ended, from the table (a read: off the async threads).
fn lookup(api: &Api, id: &str) -> Result<crate::jobs::JobRecord, Box<Reply>> {
    match tokio::task::block_in_place(|| api.board.get(id)) {
        Ok(Some(record)) => Ok(record),
        Ok(None) => Err(Box::new(no_job(api, id))),
        Err(e) => Err(Box::new(error(StatusCode::INTERNAL_SERVER_ERROR, e))),
    }
}

fn get(api: &Api, id: &str) -> Reply {
    match lookup(api, id) {
        Ok(record) => reply(StatusCode::OK, &json!(record)),
        Err(reply) => *reply,
    }
}

fn cancel(api: &Api, caller: Who, id: &str) -> Reply {
    match tokio::task::block_in_place(|| api.board.cancel(id, caller)) {
        Ok(record) => reply(StatusCode::ACCEPTED, &json!(record)),
        Err(CancelError::NotFound) => no_job(api, id),
        Err(CancelError::Internal(reason)) => error(StatusCode::INTERNAL_SERVER_ERROR, reason),
        Err(CancelError::Finished(state)) => error(
            StatusCode::CONFLICT,
            format!(
                "job {id} has already ended ({}); nothing to cancel",
                state.name()
            ),
        ),
    }
}

/// Holds the request until the job ends (or `timeout` passes), woken by the board's
/// change counter rather than polling.
async fn wait(api: &Api, id: &str, query: &str) -> Reply {
    let timeout = match query_param(query, "timeout").map(str::parse::<f64>) {
        None => 30.0,
        Some(Ok(s)) if s.is_finite() && s >= 0.0 => s.min(API_WAIT_S_MAX as f64),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "timeout: expected seconds (a number ≥ 0)",
            )
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
    let mut changes = api.board.watch();
    loop {
        changes.borrow_and_update();
        let record = match lookup(api, id) {
            Ok(record) => record,
            Err(reply) => return *reply,
        };
        if record.state.is_terminal() || tokio::time::Instant::now() >= deadline {
            return reply(StatusCode::OK, &json!(record));
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_ok_and(|r| r.is_err())
        {
            // The board is gone (daemon stopping): answer with what we have.
            return reply(StatusCode::OK, &json!(record));
        }
    }
}

fn snapshots(api: &Api) -> Reply {
    match api.board.site().index.snapshots() {
        Ok(list) => reply(StatusCode::OK, &json!(list)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn sites(api: &Api) -> Reply {
    let site = api.board.site();
    let tiers: Vec<Value> = site
        .config
        .tiers
        .iter()
        .map(|(name, t)| json!({"tier": name, "path": t.path, "default": name == site.config.default_tier()}))
        .collect();
    let mut out = vec![json!({
        "site": site.name(),
        "local": true,
        "listen": site.config.site.listen,
        "fingerprint": site.fingerprint().ok(),
        "tiers": tiers,
    })];
    for (name, peer) in site.peers() {
        out.push(json!({
            "site": name,
            "local": false,
            "address": peer.address,
            "fingerprint": peer.fingerprint,
            "bandwidth": peer.bandwidth,
        }));
    }
    reply(StatusCode::OK, &json!(out))
}

fn job_counts(api: &Api) -> Value {
    let counts = api.board.counts();
    let mut out = serde_json::Map::new();
    for state in JobState::ALL {
        out.insert(
            state.name().into(),
            json!(counts.get(&state).copied().unwrap_or(0)),
        );
    }
    Value::Object(out)
}

fn status(api: &Api) -> Reply {
    let site = api.board.site();
    reply(
        StatusCode::OK,
        &json!({
            "site": site.name(),
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_s": api.started.elapsed().as_secs_f64(),
            "socket": api.socket,
            "draining": api.board.is_draining(),
            "jobs": job_counts(api),
        }),
    )
}

fn metrics_text(api: &Api) -> Reply {
    let m = metrics::global();
    let counts = api.board.counts();
    for state in JobState::ALL {
        let n = counts.get(&state).copied().unwrap_or(0);
        m.set(names::JOBS, &[("state", state.name())], n as f64);
    }
    m.set(
        names::JOB_QUEUE_DEPTH,
        &[],
        counts.get(&JobState::Queued).copied().unwrap_or(0) as f64,
    );
    m.set(names::UP, &[], 1.0);
    m.set(names::START_TIME, &[], api.started_unix_s);
    let mut response = Response::new(Full::new(Bytes::from(m.render())));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
