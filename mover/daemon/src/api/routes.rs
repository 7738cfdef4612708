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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, FromRequest, Path, Query, Request, State};
use axum::http::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;
use serde_json::{json, Value};
use tower_http::normalize_path::NormalizePath;

use super::access::{Access, Caller};
use super::refusals::{self, Refusals};
use crate::audit::Who;
use crate::jobs::board::{CancelError, SubmitError};
use crate::jobs::{Board, JobRequest};
use mover_engine::job::JobState;
use mover_format::constants::{
    API_BODY_BYTES_MAX, API_HEAD_TIMEOUT_S, API_REFUSAL_WINDOW_S, API_WAIT_S_MAX,
};
use mover_metrics::{self as metrics, names};

pub struct Api {
    pub board: std::sync::Arc<Board>,
    pub access: Access,
    pub started: Instant,
    pub started_unix_s: f64,
    pub socket: std::path::PathBuf,
    refusals: std::sync::Mutex<Refusals>,
}

type Reply = Response;

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
    pub fn refused(&self, caller: &Who, target: &str, reason: &str) {
        metrics::global().add(names::API_REFUSED, &[("reason", "caller")], 1);
        let lines = self
            .lock_refusals()
            .refused(*caller, target, reason, Instant::now());
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
    let mut response = Response::new(text.into());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, reason: impl std::fmt::Display) -> Reply {
    reply(status, &json!({ "error": reason.to_string() }))
}

fn count(method: &Method, status: StatusCode) {
    metrics::global().add(
        names::API_REQUESTS,
        &[("method", method.as_str()), ("status", status.as_str())],
        1,
    );
}

/// The route a response answered, for the latency metric's `route` label (`other`: none).
#[derive(Clone, Copy)]
struct Route(&'static str);

fn named(route: &'static str, mut reply: Reply) -> Reply {
    reply.extensions_mut().insert(Route(route));
    reply
}

/// The API as one service: axum routes the requests, tower layers bound them, and the
/// connection's [`Caller`] (set by `server` as a request extension) is checked before
/// anything else runs. A trailing slash is ignored (`/v1/jobs/` is `/v1/jobs`).
pub fn app(api: Arc<Api>) -> NormalizePath<Router> {
    let router = Router::new()
        .route(
            "/v1/jobs",
            post(submit_route)
                .get(list_route)
                .fallback(|m: Method, u: Uri| async move { not_allowed(&m, &u, "GET, POST") }),
        )
        .route(
            "/v1/jobs/{id}",
            get(get_route)
                .merge(delete(cancel_route))
                .fallback(|m: Method, u: Uri| async move { not_allowed(&m, &u, "GET, DELETE") }),
        )
        .route("/v1/jobs/{id}/wait", only_get(get(wait_route)))
        .route("/v1/snapshots", only_get(get(snapshots_route)))
        .route("/v1/sites", only_get(get(sites_route)))
        .route("/v1/status", only_get(get(status_route)))
        .route("/metrics", only_get(get(metrics_route)))
        .fallback(|m: Method, u: Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                format!(
                    "{m} {}: no such endpoint (see the README's API section)",
                    u.path()
                ),
            )
        })
        // Layers run outside in: the caller check, then the metrics, then the body bound
        // that every body extractor obeys.
        .layer(DefaultBodyLimit::max(API_BODY_BYTES_MAX))
        .layer(middleware::from_fn(observe))
        .layer(middleware::from_fn_with_state(api.clone(), guard))
        .with_state(api);
    NormalizePath::trim_trailing_slash(router)
}

fn only_get(route: axum::routing::MethodRouter<Arc<Api>>) -> axum::routing::MethodRouter<Arc<Api>> {
    route.fallback(|m: Method, u: Uri| async move { not_allowed(&m, &u, "GET") })
}

fn not_allowed(method: &Method, uri: &Uri, methods: &'static str) -> Reply {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} {}: expected {methods}", uri.path()),
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(methods));
    r
}

/// Answers every request of a refused caller with 403 and the reason, and audits it.
async fn guard(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let Some(caller) = request.extensions().get::<Caller>().cloned() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "request without the caller's credentials (the API serves only its Unix socket)",
        );
    };
    let Some(reason) = caller.refusal.as_deref() else {
        return next.run(request).await;
    };
    let target = format!("{} {}", request.method(), request.uri().path());
    // The audit log fsyncs: off the async threads.
    tokio::task::block_in_place(|| api.refused(&caller.who, &target, reason));
    count(request.method(), StatusCode::FORBIDDEN);
    error(StatusCode::FORBIDDEN, reason)
}

/// Counts every answered request by method and status, and times it per route.
async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let response = next.run(request).await;
    let route = response
        .extensions()
        .get::<Route>()
        .map_or("other", |r| r.0);
    count(&method, response.status());
    metrics::global().observe(
        names::API_REQUEST_SECONDS,
        &[("route", route)],
        started.elapsed().as_secs_f64(),
    );
    response
}

type Params = Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

type Id = Result<Path<String>, axum::extract::rejection::PathRejection>;

/// The 400 that names what is wrong with a job id in the path (bad percent-encoding).
fn bad_id(e: axum::extract::rejection::PathRejection) -> Reply {
    error(
        StatusCode::BAD_REQUEST,
        format!("job id: {}", e.body_text()),
    )
}

/// The 400 that names what is wrong with a query string.
fn bad_query(e: axum::extract::rejection::QueryRejection) -> Reply {
    error(StatusCode::BAD_REQUEST, format!("query: {}", e.body_text()))
}

async fn submit_route(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    request: Request,
) -> Reply {
    named("jobs.submit", submit(&api, caller.who, request).await)
}

async fn list_route(State(api): State<Arc<Api>>, query: Params) -> Reply {
    let reply = match query {
        Ok(Query(query)) => list(&api, &query),
        Err(e) => bad_query(e),
    };
    named("jobs.list", reply)
}

async fn get_route(State(api): State<Arc<Api>>, id: Id) -> Reply {
    let reply = match id {
        Ok(Path(id)) => get_job(&api, &id),
        Err(e) => bad_id(e),
    };
    named("jobs.get", reply)
}

async fn cancel_route(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    id: Id,
) -> Reply {
    let reply = match id {
        Ok(Path(id)) => cancel(&api, caller.who, &id),
        Err(e) => bad_id(e),
    };
    named("jobs.cancel", reply)
}

async fn wait_route(State(api): State<Arc<Api>>, id: Id, query: Params) -> Reply {
    let reply = match (id, query) {
        (Ok(Path(id)), Ok(Query(query))) => wait(&api, &id, &query).await,
        (Err(e), _) => bad_id(e),
        (_, Err(e)) => bad_query(e),
    };
    named("jobs.wait", reply)
}

async fn snapshots_route(State(api): State<Arc<Api>>) -> Reply {
    named("snapshots", snapshots(&api))
}

async fn sites_route(State(api): State<Arc<Api>>) -> Reply {
    named("sites", sites(&api))
}

async fn status_route(State(api): State<Arc<Api>>) -> Reply {
    named("status", status(&api))
}

async fn metrics_route(State(api): State<Arc<Api>>) -> Reply {
    named("metrics", metrics_text(&api))
}

async fn submit(api: &Api, caller: Who, request: Request) -> Reply {
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
    // Bytes obeys the DefaultBodyLimit layer, so a chunked body is cut off at the bound too.
    let collect = Bytes::from_request(request, &());
    let Ok(collected) =
        tokio::time::timeout(Duration::from_secs(API_HEAD_TIMEOUT_S), collect).await
    else {
        return error(
            StatusCode::REQUEST_TIMEOUT,
            format!("request body: not complete within {API_HEAD_TIMEOUT_S} s"),
        );
    };
    let body = match collected {
        Ok(body) => body,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body: expected at most {API_BODY_BYTES_MAX} bytes"),
            )
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {}", e.body_text()),
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

fn list(api: &Api, query: &HashMap<String, String>) -> Reply {
    let only = match query.get("state") {
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
    let limit = match query.get("limit").map(|v| v.parse::<usize>()) {
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

fn get_job(api: &Api, id: &str) -> Reply {
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
async fn wait(api: &Api, id: &str, query: &HashMap<String, String>) -> Reply {
    let timeout = match query.get("timeout").map(|v| v.parse::<f64>()) {
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
    let mut response = Response::new(m.render().into());
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    response
}
