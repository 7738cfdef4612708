//! The job board: the daemon's persistent queue and the threads that run its jobs.
//!
//! Every state change is written to the `queue` table (redb, fsync on commit) before anyone
//! is told about it, so the table is the journal: a daemon killed with -9 finds jobs still
//! marked `running` at the next start, puts them back in the queue and runs them again. The
//! engine makes that cheap: a re-run backup deduplicates against every pack the killed run
//! committed (locally) or every chunk the peer acknowledged (cross-site), and a resumed
//! restore keeps the files it had finished.
//!
//! Jobs run on their own threads (a backup then starts its pinned workers); at most
//! `api.running_jobs_max` at once, chosen by priority, then submission order. Waiters (the
//! API's `wait`) watch a generation counter bumped on every change.
//!
//! Ended jobs stay in the table for the configured retention (`api.ended_jobs_kept`, count,
//! and `api.ended_jobs_kept_days`, age) and are served from it: memory holds the jobs not yet
//! ended, the newest ended ones and a small entry per ended job (to count, list and expire
//! them without reading the table).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::audit::{AuditLog, Who};
use mover_engine::job::{JobControl, JobKind, JobState};
use mover_engine::site::Site;
use mover_format::constants::{
    ENDED_JOBS_IN_MEMORY_MAX, PEER_RETRIES_MAX, PEER_RETRY_DELAY_FIRST, PEER_RETRY_DELAY_MAX,
};
use mover_format::error::{Error, ErrorKind, Result};
use mover_metrics::{self as metrics, names};

use super::{JobRecord, JobReport, JobRequest};
use mover_engine::job::{now_unix_ms, rfc3339_ms as time_text};

/// Why a submit was not queued.
#[derive(Debug)]
pub enum SubmitError {
    /// The request is wrong (400).
    Invalid(String),
    /// The daemon cannot take it now: draining, the queue is full, or the audit log cannot be
    /// written (503).
    Unavailable(String),
    /// The database failed (500).
    Internal(String),
}

/// A running job; its thread removes it when the job ends (the handle is not joined: a
/// drain waits for this map to empty, bounded by its time limit).
struct Running {
    control: Arc<JobControl>,
}

/// What the board remembers of every ended job in the table, its record in memory or not.
#[derive(Clone, Debug)]
struct Ended {
    id: String,
    state: JobState,
    idempotency_key: Option<String>,
}

/// Ended jobs by (end time in ms since the epoch, submission order): the newest last.
type EndedJobs = BTreeMap<(u64, u64), Ended>;

struct State {
    /// Jobs not yet ended and the newest ended ones ([`ENDED_JOBS_IN_MEMORY_MAX`]); every
    /// ended record here also has its entry in `ended`.
    records: HashMap<String, JobRecord>,
    ended: EndedJobs,
    running: HashMap<String, Running>,
    draining: bool,
    /// The retry time a wake-up thread is already sleeping towards (one at a time).
    wake_at: Option<u64>,
}

impl State {
    /// Notes that a record in `records` has just ended.
    fn ended_now(&mut self, id: &str) {
        if let Some(r) = self.records.get(id) {
            self.ended.insert(ended_key(r), ended_entry(r));
        }
    }
}

fn ended_key(r: &JobRecord) -> (u64, u64) {
    (r.finished_unix_ms.unwrap_or(r.submitted_unix_ms), r.seq)
}

fn ended_entry(r: &JobRecord) -> Ended {
    Ended {
        id: r.id.clone(),
        state: r.state,
        idempotency_key: r.idempotency_key.clone(),
    }
}

/// How long and how many ended jobs the table keeps.
#[derive(Clone, Copy, Debug)]
struct Retention {
    kept: usize,
    max_age_ms: u64,
}

impl Retention {
    /// The ended jobs past retention: all but the newest `kept`, and those that ended more
    /// than `max_age_ms` before `now_ms`.
    fn expired(&self, ended: &EndedJobs, now_ms: u64) -> Vec<(u64, u64)> {
        let surplus = ended.len().saturating_sub(self.kept);
        ended
            .keys()
            .enumerate()
            .filter(|(i, (finished, _))| {
                *i < surplus || now_ms.saturating_sub(*finished) > self.max_age_ms
            })
            .map(|(_, key)| *key)
            .collect()
    }
}

pub struct Board {
    site: Arc<Site>,
    audit: Arc<AuditLog>,
    state: Mutex<State>,
    /// Serialises record writes so the table always ends with a record's latest state; held
    /// from a job's end to its write, and by `retire`, so a record is never dropped from
    /// memory (or deleted) with its end not yet written.
    persist_lock: Mutex<()>,
    changed: tokio::sync::watch::Sender<u64>,
    running_max: usize,
    queued_max: usize,
    retention: Retention,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Board {
    /// Loads the queue; jobs a previous daemon left running are queued again (they resume),
    /// then the queue starts.
    pub fn open(site: Arc<Site>, audit: Arc<AuditLog>) -> Result<Arc<Board>> {
        let mut records = HashMap::new();
        let mut ended = EndedJobs::new();
        let mut resumed = Vec::new();
        for text in site.index.queue_records()? {
            let mut record: JobRecord = serde_json::from_str(&text)
                .map_err(|e| Error::corrupt("job queue row", e.to_string()))?;
            if record.state == JobState::Running {
                record.state = JobState::Queued;
                resumed.push(record.id.clone());
            }
            if record.state.is_terminal() {
                ended.insert(ended_key(&record), ended_entry(&record));
            }
            records.insert(record.id.clone(), record);
        }
        let api = &site.config.api;
        let board = Arc::new(Board {
            running_max: api.running_jobs_max,
            queued_max: api.queued_jobs_max,
            retention: Retention {
                kept: api.ended_jobs_kept,
                max_age_ms: u64::from(api.ended_jobs_kept_days) * 86_400_000,
            },
            site,
            audit,
            state: Mutex::new(State {
                records,
                ended,
                running: HashMap::new(),
                draining: false,
                wake_at: None,
            }),
            persist_lock: Mutex::new(()),
            changed: tokio::sync::watch::channel(0).0,
        });
        for id in &resumed {
            tracing::info!(job = %id, "resuming a job the previous daemon left running");
            board.persist(id)?;
        }
        board.retire(now_unix_ms());
        board.schedule();
        Ok(board)
    }

    /// Queues a job (or returns the one submitted earlier under the same idempotency key:
    /// `false`). Durable before it returns.
    pub fn submit(
        self: &Arc<Self>,
        request: JobRequest,
        caller: Who,
    ) -> std::result::Result<(JobRecord, bool), SubmitError> {
        request
            .check(&self.site.config, &self.site.peers())
            .map_err(SubmitError::Invalid)?;
        {
            let state = lock(&self.state);
            if state.draining {
                return Err(SubmitError::Unavailable(
                    "the daemon is stopping; submit again once it is back".into(),
                ));
            }
            let queued = state
                .records
                .values()
                .filter(|r| r.state == JobState::Queued)
                .count();
            if queued >= self.queued_max {
                return Err(SubmitError::Unavailable(format!(
                    "the queue is full ({queued} jobs waiting, api.queued_jobs_max); try later"
                )));
            }
        }
        let submitted = now_unix_ms();
        let detail = serde_json::to_value(&request).unwrap_or_default();
        // Audited inside the queue's transaction, before it commits: a job whose submit cannot
        // be audited is never stored, so it never runs unaudited.
        let mut audit_failure = None;
        let mut audited = None;
        let make = |seq: u64| {
            let record = JobRecord {
                id: format!("{}-{seq}", request.kind().letter()),
                kind: request.kind(),
                state: JobState::Queued,
                priority: request.priority,
                seq,
                bytes_total: 0,
                bytes_done: 0,
                bytes_sent: 0,
                snapshot: None,
                error: None,
                idempotency_key: request.idempotency_key.clone(),
                request: request.clone(),
                caller,
                submitted: time_text(submitted),
                submitted_unix_ms: submitted,
                started: None,
                started_unix_ms: None,
                finished: None,
                finished_unix_ms: None,
                attempts: 0,
                cancel_requested: false,
                retries: 0,
                retry_at_unix_ms: None,
                error_kind: None,
                result: None,
            };
            let json = serde_json::to_string(&record).expect("record serialises");
            if let Err(e) =
                self.audit
                    .append(caller, "job.submit", &record.id, "ok", detail.clone())
            {
                let why = format!(
                    "the audit log {} cannot be written ({e}); new jobs are refused until it \
                     can be",
                    self.audit.path().display()
                );
                audit_failure = Some(why.clone());
                return Err(Error::Refused(why));
            }
            audited = Some(record.id.clone());
            Ok((record.id, json))
        };
        let outcome = self
            .site
            .index
            .submit_job(request.idempotency_key.as_deref(), make);
        let (json, created) = match (outcome, audit_failure) {
            (Ok(stored), _) => stored,
            (Err(_), Some(why)) => {
                tracing::error!(uid = caller.uid, pid = caller.pid, error = %why, "job submit refused");
                return Err(SubmitError::Unavailable(why));
            }
            (Err(e), None) => {
                if let Some(id) = audited {
                    // The audit already says submitted: record that it did not happen.
                    let detail = serde_json::json!({ "error": e.to_string() });
                    self.audit_event(caller, "job.submit", &id, "failed", detail);
                }
                return Err(SubmitError::Internal(self.named(e).to_string()));
            }
        };
        let stored: JobRecord = serde_json::from_str(&json)
            .map_err(|e| SubmitError::Internal(format!("job queue row: {e}")))?;
        if !created {
            // The live record (it may have moved on since it was queued).
            let live = self.get(&stored.id).ok().flatten();
            return Ok((live.unwrap_or(stored), false));
        }
        lock(&self.state)
            .records
            .insert(stored.id.clone(), stored.clone());
        self.bump();
        self.schedule();
        let live = self.get(&stored.id).ok().flatten();
        Ok((live.unwrap_or(stored), true))
    }

    /// A job as it stands, progress included: from memory, else (an older ended job) from
    /// the table. `None` when neither holds it (never submitted, or past retention).
    pub fn get(&self, id: &str) -> Result<Option<JobRecord>> {
        {
            let state = lock(&self.state);
            if let Some(record) = state.records.get(id) {
                let mut record = record.clone();
                if let Some(running) = state.running.get(id) {
                    fill_progress(&mut record, &running.control);
                }
                return Ok(Some(record));
            }
        }
        self.stored(id)
    }

    fn stored(&self, id: &str) -> Result<Option<JobRecord>> {
        match self
            .site
            .index
            .queue_record(id)
            .map_err(|e| self.named(e))?
        {
            Some(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Error::corrupt(format!("job queue row {id}"), e.to_string())),
            None => Ok(None),
        }
    }

    /// All jobs (oldest first), optionally only those in `state`; at most `limit`, the newest.
    pub fn list(&self, only: Option<JobState>, limit: usize) -> Result<Vec<JobRecord>> {
        let wanted = |s: JobState| only.is_none_or(|o| o == s);
        let (mut out, from_table) = {
            let state = lock(&self.state);
            // (submission order, id) of every matching job, memory or table.
            let mut order: Vec<(u64, &str)> = state
                .records
                .values()
                .filter(|r| !r.state.is_terminal() && wanted(r.state))
                .map(|r| (r.seq, r.id.as_str()))
                .chain(
                    state
                        .ended
                        .iter()
                        .filter(|(_, e)| wanted(e.state))
                        .map(|((_, seq), e)| (*seq, e.id.as_str())),
                )
                .collect();
            order.sort_unstable();
            let skip = order.len().saturating_sub(limit);
            let mut out = Vec::new();
            let mut from_table = Vec::new();
            for (_, id) in &order[skip..] {
                match state.records.get(*id) {
                    Some(record) => {
                        let mut record = record.clone();
                        if let Some(running) = state.running.get(*id) {
                            fill_progress(&mut record, &running.control);
                        }
                        out.push(record);
                    }
                    None => from_table.push(id.to_string()),
                }
            }
            (out, from_table)
        };
        for id in from_table {
            // Gone meanwhile (retention) is not an error: the list is a moment's view.
            out.extend(self.stored(&id)?);
        }
        out.sort_by_key(|r| r.seq);
        Ok(out)
    }

    /// Jobs by state: those in the table, ended ones included.
    pub fn counts(&self) -> HashMap<JobState, usize> {
        let mut counts = HashMap::new();
        let state = lock(&self.state);
        let live = state.records.values().map(|r| r.state);
        for s in live
            .filter(|s| !s.is_terminal())
            .chain(state.ended.values().map(|e| e.state))
        {
            *counts.entry(s).or_insert(0) += 1;
        }
        counts
    }

    /// Cancels a queued job at once, or asks a running one to stop (it ends `cancelled`
    /// once the engine reaches its next check). `Err` names why nothing changed.
    pub fn cancel(&self, id: &str, caller: Who) -> std::result::Result<JobRecord, CancelError> {
        let order = lock(&self.persist_lock);
        let outcome = {
            let mut state = lock(&self.state);
            let State {
                records, running, ..
            } = &mut *state;
            // Some(Ok(true)): ended now; Some(Ok(false)): asked to stop.
            let outcome = match records.get_mut(id) {
                None => None,
                Some(record) => Some(match record.state {
                    JobState::Queued => {
                        let now = now_unix_ms();
                        record.state = JobState::Cancelled;
                        record.finished = Some(time_text(now));
                        record.finished_unix_ms = Some(now);
                        record.error = Some("cancelled before it started".into());
                        Ok(true)
                    }
                    JobState::Running => {
                        record.cancel_requested = true;
                        if let Some(r) = running.get(id) {
                            r.control.cancel();
                        }
                        Ok(false)
                    }
                    other => Err(CancelError::Finished(other)),
                }),
            };
            if let Some(Ok(true)) = outcome {
                state.ended_now(id);
            }
            outcome
        };
        match outcome {
            Some(outcome) => {
                outcome?;
            }
            None => {
                drop(order);
                // Not in memory: an older ended job, or none at all.
                return Err(match self.stored(id) {
                    Ok(Some(record)) => CancelError::Finished(record.state),
                    Ok(None) => CancelError::NotFound,
                    Err(e) => CancelError::Internal(self.named(e).to_string()),
                });
            }
        }
        if let Err(e) = self.save(&order, id) {
            tracing::error!(job = %id, error = %e, "could not record the cancel");
        }
        drop(order);
        self.audit_event(caller, "job.cancel", id, "ok", serde_json::Value::Null);
        self.bump();
        self.retire(now_unix_ms());
        match self.get(id) {
            Ok(Some(record)) => Ok(record),
            Ok(None) => Err(CancelError::NotFound),
            Err(e) => Err(CancelError::Internal(self.named(e).to_string())),
        }
    }

    /// A receiver that changes whenever any job does (for waiting without polling).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// SIGTERM: stops taking jobs, asks running ones to checkpoint (they stop at their next
    /// check, leaving what they committed; they resume at the next start) and waits for them
    /// up to `limit`. Returns the jobs still running when it gave up.
    pub fn drain(&self, limit: Duration) -> Vec<String> {
        {
            let mut state = lock(&self.state);
            state.draining = true;
            for r in state.running.values() {
                r.control.interrupt_for_shutdown();
            }
        }
        let deadline = Instant::now() + limit;
        loop {
            let left: Vec<String> = lock(&self.state).running.keys().cloned().collect();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts queued jobs while there is room: highest priority first, then oldest; a job
    /// waiting out a retry backoff is passed over until its time, when a wake-up thread
    /// schedules again.
    fn schedule(self: &Arc<Self>) {
        loop {
            let order = lock(&self.persist_lock);
            let started = {
                let mut state = lock(&self.state);
                if state.draining || state.running.len() >= self.running_max {
                    return;
                }
                let now = now_unix_ms();
                let waiting = |r: &&JobRecord| r.retry_at_unix_ms.is_some_and(|at| at > now);
                let Some(id) = state
                    .records
                    .values()
                    .filter(|r| r.state == JobState::Queued)
                    .filter(|r| !waiting(r))
                    // Queued again but its thread still finishing (saving, auditing).
                    .filter(|r| !state.running.contains_key(&r.id))
                    .min_by_key(|r| (-(r.priority as i64), r.seq))
                    .map(|r| r.id.clone())
                else {
                    let next = state
                        .records
                        .values()
                        .filter(|r| r.state == JobState::Queued)
                        .filter_map(|r| r.retry_at_unix_ms)
                        .min();
                    if let Some(at) = next {
                        self.wake_at(&mut state, at);
                    }
                    return;
                };
                let record = state.records.get_mut(&id).expect("just found");
                let now = now_unix_ms();
                record.state = JobState::Running;
                record.attempts += 1;
                record.retry_at_unix_ms = None;
                record.started = Some(time_text(now));
                record.started_unix_ms = Some(now);
                metrics::global().observe(
                    names::JOB_QUEUE_WAIT,
                    &[],
                    now.saturating_sub(record.submitted_unix_ms) as f64 / 1e3,
                );
                let control = Arc::new(JobControl::new(&id, record.attempts));
                let board = self.clone();
                let (record, thread_control) = (record.clone(), control.clone());
                let thread = std::thread::Builder::new()
                    .name(format!("mover-job-{id}"))
                    .spawn(move || board.run(record, thread_control));
                match thread {
                    Ok(_detached) => {
                        state.running.insert(id.clone(), Running { control });
                        id
                    }
                    Err(e) => {
                        let record = state.records.get_mut(&id).expect("just found");
                        record.state = JobState::Failed;
                        record.error = Some(format!("could not start a job thread: {e}"));
                        record.finished = Some(time_text(now));
                        record.finished_unix_ms = Some(now);
                        state.ended_now(&id);
                        id
                    }
                }
            };
            if let Err(e) = self.save(&order, &started) {
                tracing::error!(job = %started, error = %e, "could not record the job start");
            }
            drop(order);
            self.bump();
        }
    }

    /// A job's thread: runs the engine, then records the outcome and starts the next job.
    fn run(self: Arc<Self>, record: JobRecord, control: Arc<JobControl>) {
        // The thread is registered in `running` by `schedule` under the lock this waits for,
        // so the bookkeeping below always finds it.
        drop(lock(&self.state));
        // `schedule` saves the start (its attempt number) under this lock before letting go:
        // a daemon killed from here on resumes the job as a later attempt, which the peer
        // tells from this one's streams.
        drop(lock(&self.persist_lock));
        tracing::info!(job = %record.id, kind = record.kind.name(), attempt = record.attempts, "job started");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            execute(&self.site, &record, &control)
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::Resource(format!("internal error (panic): {what}")))
        });
        let now = now_unix_ms();
        let order = lock(&self.persist_lock);
        let mut report = None;
        let final_record = {
            let mut state = lock(&self.state);
            let Some(r) = state.records.get_mut(&record.id) else {
                state.running.remove(&record.id);
                return;
            };
            fill_progress(r, &control);
            match outcome {
                Ok(done) => {
                    r.state = done.state;
                    r.snapshot = done.snapshot;
                    r.error = done.error;
                    r.error_kind = None;
                    r.result = Some(serde_json::to_value(&done.report).unwrap_or_default());
                    (r.bytes_total, r.bytes_done, r.bytes_sent) = done.bytes;
                    report = Some(done.report);
                }
                Err(e) if e.kind() == ErrorKind::Cancelled && control.is_draining() => {
                    // Checkpointed: what it committed stays; it runs again at the next start.
                    r.state = JobState::Queued;
                }
                Err(e)
                    if e.is_transient() && r.retries < PEER_RETRIES_MAX && !r.cancel_requested =>
                {
                    // The peer is restarting or the path dropped: run it again later; what it
                    // shipped is acknowledged at the peer, so the next attempt skips it.
                    r.retries += 1;
                    let delay = retry_delay(r.retries);
                    r.state = JobState::Queued;
                    r.retry_at_unix_ms = Some(now + delay.as_millis() as u64);
                    r.error_kind = Some(e.kind());
                    r.error = Some(format!(
                        "{e}; retry {} of {PEER_RETRIES_MAX} in {} s",
                        r.retries,
                        delay.as_secs()
                    ));
                }
                Err(e) => {
                    r.state = JobState::after(&e);
                    r.error = Some(e.to_string());
                    r.error_kind = Some(e.kind());
                }
            }
            if r.state.is_terminal() {
                r.finished = Some(time_text(now));
                r.finished_unix_ms = Some(now);
            }
            let r = r.clone();
            if r.state.is_terminal() {
                state.ended_now(&record.id);
            }
            r
        };
        if let Err(e) = self.save(&order, &record.id) {
            tracing::error!(job = %record.id, error = %e, "could not record the job's end");
        }
        drop(order);
        let elapsed = final_record
            .started_unix_ms
            .map_or(0.0, |s| now.saturating_sub(s) as f64 / 1e3);
        match final_record.state {
            JobState::Queued if final_record.retry_at_unix_ms.is_some() => tracing::warn!(
                job = %record.id,
                error = final_record.error.as_deref().unwrap_or(""),
                "job queued again after a transient peer error"
            ),
            JobState::Queued => {
                tracing::info!(job = %record.id, "job interrupted by shutdown; it resumes at the next start")
            }
            JobState::Done => tracing::info!(job = %record.id, elapsed_s = elapsed, "job done"),
            state => tracing::warn!(
                job = %record.id,
                state = state.name(),
                error = final_record.error.as_deref().unwrap_or(""),
                "job ended"
            ),
        }
        if final_record.state.is_terminal() {
            record_metrics(
                &self.site,
                final_record.kind,
                final_record.state,
                report.as_ref(),
            );
            self.audit_event(
                Who::this_process(),
                "job.end",
                &record.id,
                final_record.state.name(),
                serde_json::json!({"error": final_record.error, "snapshot": final_record.snapshot}),
            );
        }
        // Running until its end is saved and audited: a drain waits for exactly this, so a
        // daemon that stops never exits while a job's last row or audit line is half written.
        lock(&self.state).running.remove(&record.id);
        self.bump();
        self.schedule();
        self.retire(now_unix_ms());
    }

    /// Applies the retention of ended jobs at `now_ms`: deletes the rows past it (and their
    /// idempotency keys) and keeps only the newest ended records in memory; the others are
    /// read from the table when asked for.
    fn retire(&self, now_ms: u64) {
        let _order = lock(&self.persist_lock);
        let expired: Vec<(String, Option<String>)> = {
            let mut state = lock(&self.state);
            let State { records, ended, .. } = &mut *state;
            let expired: Vec<Ended> = self
                .retention
                .expired(ended, now_ms)
                .into_iter()
                .filter_map(|key| ended.remove(&key))
                .collect();
            for e in &expired {
                records.remove(&e.id);
            }
            for e in ended.values().rev().skip(ENDED_JOBS_IN_MEMORY_MAX) {
                records.remove(&e.id);
            }
            expired
                .into_iter()
                .map(|e| (e.id, e.idempotency_key))
                .collect()
        };
        if expired.is_empty() {
            return;
        }
        match self.site.index.remove_queue_records(&expired) {
            Ok(()) => tracing::info!(jobs = expired.len(), "ended jobs past retention deleted"),
            // They stay in the table; the next start expires them again.
            Err(e) => tracing::error!(error = %e, "could not delete ended jobs past retention"),
        }
    }

    /// Makes sure a thread schedules again at `at` (unix ms). One thread sleeps at a time,
    /// towards the earliest retry; it re-arms for later ones when it schedules.
    fn wake_at(self: &Arc<Self>, state: &mut State, at: u64) {
        if state.wake_at.is_some_and(|armed| armed <= at) {
            return;
        }
        state.wake_at = Some(at);
        let board = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("mover-job-retry".into())
            .spawn(move || {
                std::thread::sleep(Duration::from_millis(at.saturating_sub(now_unix_ms())));
                // A board dropped meanwhile (the daemon stopped) has nothing to schedule.
                if let Some(board) = board.upgrade() {
                    let mut state = lock(&board.state);
                    if state.wake_at == Some(at) {
                        state.wake_at = None;
                    }
                    drop(state);
                    board.schedule();
                }
            });
        if let Err(e) = spawned {
            state.wake_at = None;
            tracing::error!(error = %e, "could not start the job retry timer; retries wait for the next job event");
        }
    }

    fn persist(&self, id: &str) -> Result<()> {
        let order = lock(&self.persist_lock);
        self.save(&order, id)
    }

    /// Writes a record's current state; the caller holds `persist_lock` (`_order`).
    fn save(&self, _order: &MutexGuard<'_, ()>, id: &str) -> Result<()> {
        let json = {
            let state = lock(&self.state);
            match state.records.get(id) {
                Some(r) => serde_json::to_string(r).expect("record serialises"),
                None => return Ok(()),
            }
        };
        self.site.index.put_queue_record(id, &json)
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Audits an event that goes ahead whether or not it can be audited; an unaudited one is
    /// logged loudly instead. Only submits start work, so only they are refused when the log
    /// cannot be written (see `submit`). Cancels go ahead: they only stop work, and on a full
    /// disk stopping jobs is how an operator makes room; refusing them would keep unaudited
    /// work running rather than prevent it.
    pub fn audit_event(
        &self,
        who: Who,
        action: &str,
        target: &str,
        result: &str,
        detail: serde_json::Value,
    ) {
        if let Err(e) = self.audit.append(who, action, target, result, detail) {
            tracing::error!(
                action,
                target,
                result,
                uid = who.uid,
                pid = who.pid,
                log = %self.audit.path().display(),
                error = %e,
                "UNAUDITED: this event is missing from the audit log"
            );
        }
    }

    /// An index error naming this site's database.
    fn named(&self, e: Error) -> Error {
        e.in_index(&self.site.index_path())
    }

    pub fn site(&self) -> &Arc<Site> {
        &self.site
    }

    pub fn is_draining(&self) -> bool {
        lock(&self.state).draining
    }
}

#[derive(Debug)]
pub enum CancelError {
    NotFound,
    Finished(JobState),
    /// The table could not be read (500).
    Internal(String),
}

fn fill_progress(record: &mut JobRecord, control: &JobControl) {
    record.bytes_total = control.bytes_total.load(Ordering::Relaxed);
    record.bytes_done = control.bytes_done.load(Ordering::Relaxed);
    record.bytes_sent = control.bytes_sent.load(Ordering::Relaxed);
}

/// The wait before retry `n` (1-based) of a job that failed with a transient peer error:
/// doubling from [`PEER_RETRY_DELAY_FIRST`], capped at [`PEER_RETRY_DELAY_MAX`].
pub fn retry_delay(n: u32) -> Duration {
    let doublings = n.saturating_sub(1).min(31);
    PEER_RETRY_DELAY_FIRST
        .saturating_mul(1 << doublings)
        .min(PEER_RETRY_DELAY_MAX)
}

/// What a finished engine run hands back.
struct Outcome {
    state: JobState,
    snapshot: Option<String>,
    error: Option<String>,
    report: JobReport,
    bytes: (u64, u64, u64),
}

fn execute(site: &Site, record: &JobRecord, control: &JobControl) -> Result<Outcome> {
    let spec = &record.request.spec;
    let report = super::run(site, spec, Some(control), record.attempts > 1)?;
    let (snapshot, bytes) = match (&report, report.job()) {
        (_, Some(job)) => (
            job.snapshot.clone(),
            (job.bytes_total, job.bytes_done, job.bytes_sent),
        ),
        (JobReport::Verify(verify), None) => (
            spec.snapshot().map(|s| s.as_str().to_string()),
            (
                control.bytes_total.load(Ordering::Relaxed),
                verify.bytes_checked,
                0,
            ),
        ),
        (_, None) => (None, (0, 0, 0)),
    };
    Ok(Outcome {
        state: report.state(),
        error: report.error(),
        snapshot,
        bytes,
        report,
    })
}

/// Adds a finished job's bytes to the per-site, tier and link counters, from its report.
fn record_metrics(site: &Site, kind: JobKind, state: JobState, report: Option<&JobReport>) {
    let m = metrics::global();
    let name = site.name();
    m.add(
        names::JOBS_FINISHED,
        &[("kind", kind.name()), ("state", state.name())],
        1,
    );
    let Some(job) = report.and_then(JobReport::job) else {
        return;
    };
    match kind {
        JobKind::Backup | JobKind::Replicate => {
            m.add(names::BYTES_READ, &[("site", name)], job.bytes_read);
            let tier = job.tier.as_deref().unwrap_or("");
            let dedup = job.bytes_total.saturating_sub(job.bytes_new);
            match &job.destination {
                Some(peer) => {
                    let link = format!("{name}->{peer}");
                    let labels = [("site", name), ("link", link.as_str())];
                    m.add(names::BYTES_SENT, &labels, job.bytes_sent);
                    m.add(names::WIRE_BYTES_SENT, &labels, job.wire_bytes_sent);
                    m.add(names::WIRE_BYTES_RECEIVED, &labels, job.wire_bytes_received);
                    let dest_tier = format!("{peer}:{tier}");
                    m.add(
                        names::BYTES_DEDUPLICATED,
                        &[("site", name), ("tier", dest_tier.as_str())],
                        dedup,
                    );
                }
                None => {
                    let labels = [("site", name), ("tier", tier)];
                    m.add(names::BYTES_STORED, &labels, job.bytes_sent);
                    m.add(names::BYTES_DEDUPLICATED, &labels, dedup);
                }
            }
        }
        JobKind::Restore => {
            m.add(names::BYTES_RESTORED, &[("site", name)], job.bytes_done);
            if let Some(peer) = &job.destination {
                let link = format!("{peer}->{name}");
                let labels = [("site", name), ("link", link.as_str())];
                m.add(names::WIRE_BYTES_SENT, &labels, job.wire_bytes_sent);
                m.add(names::WIRE_BYTES_RECEIVED, &labels, job.wire_bytes_received);
            }
        }
        JobKind::Verify => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(jobs: &[(u64, u64)]) -> EndedJobs {
        jobs.iter()
            .map(|&(finished, seq)| {
                let entry = Ended {
                    id: format!("v-{seq}"),
                    state: JobState::Done,
                    idempotency_key: None,
                };
                ((finished, seq), entry)
            })
            .collect()
    }

    const DAY: u64 = 86_400_000;

    #[test]
    fn retention_keeps_the_newest_ended_jobs_within_the_age() {
        let retention = Retention {
            kept: 3,
            max_age_ms: 30 * DAY,
        };
        let now = 100 * DAY;
        // Five ended jobs; the long-running v-1 ended last, so it counts as the newest.
        let jobs = ended(&[
            (now - 4, 2),
            (now - 3, 3),
            (now - 2, 4),
            (now - 1, 5),
            (now, 1),
        ]);
        assert_eq!(
            retention.expired(&jobs, now),
            vec![(now - 4, 2), (now - 3, 3)]
        );
        // The clock moves on: past the age, even the newest go.
        let old = ended(&[(now - 31 * DAY, 1), (now - 30 * DAY, 2), (now - DAY, 3)]);
        assert_eq!(retention.expired(&old, now), vec![(now - 31 * DAY, 1)]);
        assert_eq!(
            retention.expired(&old, now + 29 * DAY),
            vec![(now - 31 * DAY, 1), (now - 30 * DAY, 2)]
        );
        assert!(retention.expired(&EndedJobs::new(), now).is_empty());
    }

    #[test]
    fn retry_delays_double_from_the_first_and_stop_at_the_cap() {
        let secs: Vec<u64> = (1..=11).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(secs, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(retry_delay(PEER_RETRIES_MAX), PEER_RETRY_DELAY_MAX);
        assert_eq!(retry_delay(u32::MAX), PEER_RETRY_DELAY_MAX);
    }
}
