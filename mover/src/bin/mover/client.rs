//! The commands that talk to a running daemon over its API socket: submit, wait with
//! progress, job control and the site views.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use hyper::Method;
use mover::api::client::{Client, ClientError};
use mover::jobs::JobRequest;
use serde_json::Value;

use crate::exit;

/// A command's failure against the daemon, with the exit code a scheduler acts on.
pub struct Failed {
    pub code: u8,
    pub message: String,
}

impl From<ClientError> for Failed {
    fn from(e: ClientError) -> Failed {
        let code = match &e {
            ClientError::Unreachable { .. } => exit::UNREACHABLE,
            ClientError::Refused { status, .. } if status.as_u16() == 503 => exit::UNREACHABLE,
            ClientError::Refused { status, .. } if status.is_client_error() => exit::REFUSED,
            _ => exit::FAILED,
        };
        Failed {
            code,
            message: e.to_string(),
        }
    }
}

pub type Outcome = Result<ExitCode, Failed>;

pub struct Session {
    pub client: Client,
    pub json: bool,
}

impl Session {
    /// Submits a job; with `wait`, follows it to the end.
    pub fn submit(&self, request: &JobRequest, wait: bool) -> Outcome {
        let body = serde_json::to_value(request).map_err(|e| Failed {
            code: exit::FAILED,
            message: format!("job request: {e}"),
        })?;
        let (status, record) = self.client.request(Method::POST, "/v1/jobs", Some(&body))?;
        let id = record["id"].as_str().unwrap_or("").to_string();
        if !wait {
            if self.json {
                crate::print_json(&record);
            } else {
                let again = if status.as_u16() == 200 {
                    " (already submitted with this idempotency key)"
                } else {
                    ""
                };
                outln!("{id}{again}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        self.follow(&id, None)
    }

    /// Waits for a job to end (without polling: the daemon holds each request until the job
    /// changes state or a few seconds pass), showing progress on a terminal.
    pub fn follow(&self, id: &str, timeout: Option<Duration>) -> Outcome {
        let started = Instant::now();
        let bar = (!self.json && std::io::stderr().is_terminal()).then(|| progress_bar(id));
        let mut last_line = Instant::now();
        let step: f64 = if bar.is_some() { 0.25 } else { 10.0 };
        let record = loop {
            // Never wait past the caller's own timeout.
            let step = match timeout {
                Some(t) => step.min(t.saturating_sub(started.elapsed()).as_secs_f64()),
                None => step,
            };
            let path = format!("/v1/jobs/{id}/wait?timeout={step:.3}");
            let record = self.client.get(&path)?;
            let state = record["state"].as_str().unwrap_or("");
            if let Some(bar) = &bar {
                update_bar(bar, &record);
            } else if !self.json && !is_terminal(state) && last_line.elapsed().as_secs() >= 10 {
                errln!("{}", progress_line(&record, started.elapsed()));
                last_line = Instant::now();
            }
            if is_terminal(state) {
                break record;
            }
            if timeout.is_some_and(|t| started.elapsed() >= t) {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                if self.json {
                    crate::print_json(&record);
                }
                return Err(Failed {
                    code: exit::TIMED_OUT,
                    message: format!(
                        "job {id} is still {state} after {:.0} s",
                        started.elapsed().as_secs_f64()
                    ),
                });
            }
        };
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        self.finished(&record)
    }

    fn finished(&self, record: &Value) -> Outcome {
        let state = record["state"].as_str().unwrap_or("");
        if self.json {
            crate::print_json(record);
        } else {
            outln!("{}", mover::error::escaped(&summary(record)));
        }
        let error = record["error"].as_str().unwrap_or("");
        match state {
            "done" => Ok(ExitCode::SUCCESS),
            "cancelled" => Err(Failed {
                code: exit::CANCELLED,
                message: format!(
                    "job {} was cancelled: {error}",
                    record["id"].as_str().unwrap_or("")
                ),
            }),
            _ => Err(Failed {
                code: exit::FAILED,
                message: format!(
                    "job {} failed: {error}",
                    record["id"].as_str().unwrap_or("")
                ),
            }),
        }
    }

    pub fn status(&self, id: &str) -> Outcome {
        let record = self.client.get(&format!("/v1/jobs/{id}"))?;
        if self.json {
            crate::print_json(&record);
        } else {
            outln!("{}", mover::error::escaped(&summary(&record)));
        }
        Ok(ExitCode::SUCCESS)
    }

    pub fn cancel(&self, id: &str) -> Outcome {
        let (_, record) = self
            .client
            .request(Method::DELETE, &format!("/v1/jobs/{id}"), None)?;
        if self.json {
            crate::print_json(&record);
        } else {
            let state = record["state"].as_str().unwrap_or("");
            match state {
                "cancelled" => outln!("job {id} cancelled"),
                _ => outln!("job {id}: cancel requested; it stops at its next checkpoint"),
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    pub fn jobs(&self, state: Option<&str>, limit: usize) -> Outcome {
        let mut path = format!("/v1/jobs?limit={limit}");
        if let Some(state) = state {
            path.push_str(&format!("&state={state}"));
        }
        let list = self.client.get(&path)?;
        if self.json {
            crate::print_json(&list);
            return Ok(ExitCode::SUCCESS);
        }
        let jobs = list.as_array().cloned().unwrap_or_default();
        if jobs.is_empty() {
            outln!("no jobs");
        }
        for r in &jobs {
            outln!(
                "{:<10} {:<9} {:<9} {:>10}/{:<10} {}",
                r["id"].as_str().unwrap_or(""),
                r["kind"].as_str().unwrap_or(""),
                r["state"].as_str().unwrap_or(""),
                human(r["bytes_done"].as_u64().unwrap_or(0)),
                human(r["bytes_total"].as_u64().unwrap_or(0)),
                describe(&r["request"])
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    pub fn show(&self, path: &str, print: impl Fn(&Value)) -> Outcome {
        let value = self.client.get(path)?;
        if self.json {
            crate::print_json(&value);
        } else {
            print(&value);
        }
        Ok(ExitCode::SUCCESS)
    }
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "done" | "failed" | "cancelled")
}

fn progress_bar(id: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} {msg:>9} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(id.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn update_bar(bar: &indicatif::ProgressBar, record: &Value) {
    let total = record["bytes_total"].as_u64().unwrap_or(0);
    let done = record["bytes_done"].as_u64().unwrap_or(0);
    let sent = record["bytes_sent"].as_u64().unwrap_or(0);
    bar.set_length(total.max(done));
    bar.set_position(done);
    let state = record["state"].as_str().unwrap_or("");
    if state == "running" && sent > 0 && done > 0 {
        bar.set_message(format!("dedup {:.1}x", done as f64 / sent as f64));
    } else {
        bar.set_message(state.to_string());
    }
}

fn progress_line(record: &Value, elapsed: Duration) -> String {
    let done = record["bytes_done"].as_u64().unwrap_or(0);
    format!(
        "job {} {}: {} of {} ({:.2} GB/s)",
        record["id"].as_str().unwrap_or(""),
        record["state"].as_str().unwrap_or(""),
        human(done),
        human(record["bytes_total"].as_u64().unwrap_or(0)),
        done as f64 / elapsed.as_secs_f64().max(1e-3) / 1e9
    )
}

fn describe(request: &Value) -> String {
    ["path", "snapshot", "from", "to", "tier"]
        .iter()
        .filter_map(|k| request[*k].as_str().map(|v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line about a job: what it is, how it stands, what it made.
pub fn summary(r: &Value) -> String {
    let id = r["id"].as_str().unwrap_or("");
    let state = r["state"].as_str().unwrap_or("");
    let result = &r["result"];
    let mut line = format!(
        "job {id} {} {state}: {} of {}",
        r["kind"].as_str().unwrap_or(""),
        human(r["bytes_done"].as_u64().unwrap_or(0)),
        human(r["bytes_total"].as_u64().unwrap_or(0)),
    );
    if let Some(s) = result["elapsed_s"].as_f64() {
        // A restore's holes are not written: its rate is over the bytes it wrote.
        let written = result["bytes_written"]
            .as_u64()
            .filter(|_| r["kind"] == "restore");
        let moved = written.unwrap_or(r["bytes_total"].as_u64().unwrap_or(0)) as f64;
        line.push_str(&format!(
            " in {s:.2} s ({:.2} GB/s",
            moved / s.max(1e-6) / 1e9
        ));
        if let Some(written) = written {
            line.push_str(&format!(" over {} written", human(written)));
        }
        line.push(')');
    }
    line.push_str(&format!(
        ", {} sent",
        human(r["bytes_sent"].as_u64().unwrap_or(0))
    ));
    if let Some(snapshot) = r["snapshot"].as_str() {
        line.push_str(&format!(", snapshot {snapshot}"));
    }
    if let Some(e) = r["error"].as_str() {
        line.push_str(&format!(": {e}"));
    }
    line
}

pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}
