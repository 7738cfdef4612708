//! The daemon's jobs: what a caller may ask for ([`JobRequest`]), what the daemon keeps about
//! each job ([`JobRecord`], the row of the persistent queue), the [`board`] that queues,
//! runs, cancels and resumes them, and the [`runner`] every entry point runs a job through.

pub mod board;
pub mod runner;

use serde::{Deserialize, Serialize};

use crate::audit::Who;
use std::collections::BTreeMap;

use mover_config::{Config, PeerSection};
use mover_engine::job::{JobKind, JobState};
use mover_format::constants::IDEMPOTENCY_KEY_BYTES_MAX;

pub use board::Board;
pub use runner::{run, JobReport};

/// The body of `POST /v1/jobs` as it arrives: the job's kind and its arguments, named as the
/// CLI's flags. Only the wire form: [`JobRequest`] is what the daemon and the CLI hold, made
/// from it once by [`JobRequest::try_from`], which checks each kind's arguments.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestBody {
    pub kind: Option<JobKind>,
    /// backup: the absolute path to back up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// backup and replicate: `SITE[:TIER]`; restore: the absolute target directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// backup: the tier at this site (or use `to = "SITE:TIER"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// restore and replicate: `SNAPSHOT[:SUBPATH]` (id, unique prefix or `latest`); verify:
    /// the snapshot to check (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// restore: read the snapshot from this peer site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Higher runs first; equal priorities run in submission order.
    #[serde(default)]
    pub priority: i32,
    /// A retried submit with the same key returns the first job instead of adding one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// An absolute path without `..` or NUL bytes: the daemon has no working directory of the
/// caller's, and `..` would leave directories on the way created (restore).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbsolutePath(String);

impl AbsolutePath {
    /// `Err` says what was expected.
    pub fn new(path: &str) -> Result<AbsolutePath, String> {
        if !path.starts_with('/') {
            return Err(
                "expected an absolute path (the daemon has no working directory of yours)".into(),
            );
        }
        if path.split('/').any(|part| part == "..") {
            return Err("expected an absolute path without `..`".into());
        }
        if path.contains('\0') {
            return Err("expected a path without NUL bytes".into());
        }
        Ok(AbsolutePath(path.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_path(&self) -> &std::path::Path {
        std::path::Path::new(&self.0)
    }
}

/// `ID[:SUBPATH]`, checked by [`check_snapshot_spec`]; the id is resolved when the job runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotSpec(String);

impl SnapshotSpec {
    pub fn new(spec: &str) -> Result<SnapshotSpec, String> {
        check_snapshot_spec(spec)?;
        Ok(SnapshotSpec(spec.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A peer site and, optionally, the tier there: `SITE[:TIER]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub site: String,
    pub tier: Option<String>,
}

impl Destination {
    pub fn new(text: &str) -> Result<Destination, String> {
        let (site, tier) = mover_engine::backup::parse_destination(text);
        if site.is_empty() {
            return Err("expected SITE[:TIER] naming a peer site".into());
        }
        Ok(Destination {
            site: site.to_string(),
            tier: tier.map(str::to_string),
        })
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tier {
            Some(tier) => write!(f, "{}:{tier}", self.site),
            None => f.write_str(&self.site),
        }
    }
}

/// What a job does, one variant per kind, its arguments checked and typed.
#[derive(Clone, Debug, PartialEq)]
pub enum JobSpec {
    /// Back `path` up here (into `tier`, default the site's default tier), or to the peer
    /// `to` (its tier from `to` or `tier`, not both).
    Backup {
        path: AbsolutePath,
        to: Option<Destination>,
        tier: Option<String>,
    },
    /// Restore `snapshot` into `to`, from this site or the peer `from`.
    Restore {
        snapshot: SnapshotSpec,
        to: AbsolutePath,
        from: Option<String>,
    },
    /// Copy a whole snapshot to the peer `to`.
    Replicate {
        snapshot: SnapshotSpec,
        to: Destination,
    },
    /// Check one snapshot, or all of them.
    Verify { snapshot: Option<SnapshotSpec> },
}

impl JobSpec {
    pub fn kind(&self) -> JobKind {
        match self {
            JobSpec::Backup { .. } => JobKind::Backup,
            JobSpec::Restore { .. } => JobKind::Restore,
            JobSpec::Replicate { .. } => JobKind::Replicate,
            JobSpec::Verify { .. } => JobKind::Verify,
        }
    }

    /// The snapshot the job names, as given.
    pub fn snapshot(&self) -> Option<&SnapshotSpec> {
        match self {
            JobSpec::Backup { .. } => None,
            JobSpec::Restore { snapshot, .. } | JobSpec::Replicate { snapshot, .. } => {
                Some(snapshot)
            }
            JobSpec::Verify { snapshot } => snapshot.as_ref(),
        }
    }
}

/// A job a caller asks for: what to do, and how to queue it. Its JSON form is
/// [`RequestBody`] (the documented `POST /v1/jobs` body); reading one checks it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RequestBody", into = "RequestBody")]
pub struct JobRequest {
    pub spec: JobSpec,
    pub priority: i32,
    pub idempotency_key: Option<String>,
}

pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

impl TryFrom<RequestBody> for JobRequest {
    type Error = String;

    /// Checks the arguments against the kind; the error is one line naming the field and
    /// what was expected.
    fn try_from(body: RequestBody) -> Result<JobRequest, String> {
        let Some(kind) = body.kind else {
            return Err("`kind` is required: expected backup, restore, replicate or verify".into());
        };
        let name = kind.name();
        let field = |field: &str, value: &str, why: String| {
            format!("{name} job: `{field}` = {value:?}: {why}")
        };
        let need = |field: &str, value: &Option<String>| match value {
            Some(v) if !v.is_empty() => Ok(v.clone()),
            _ => Err(format!("{name} job: `{field}` is required")),
        };
        let refuse = |field: &str, value: &Option<String>| match value {
            Some(_) => Err(format!("{name} job: `{field}` does not apply to a {name}")),
            None => Ok(()),
        };
        let absolute = |f: &str, v: String| AbsolutePath::new(&v).map_err(|why| field(f, &v, why));
        let snapshot = |v: String| SnapshotSpec::new(&v).map_err(|why| field("snapshot", &v, why));
        let destination =
            |f: &str, v: String| Destination::new(&v).map_err(|why| field(f, &v, why));
        let spec = match kind {
            JobKind::Backup => {
                let path = absolute("path", need("path", &body.path)?)?;
                refuse("snapshot", &body.snapshot)?;
                refuse("from", &body.from)?;
                let to = body.to.clone().map(|v| destination("to", v)).transpose()?;
                JobSpec::Backup {
                    path,
                    to,
                    tier: body.tier.clone(),
                }
            }
            JobKind::Restore => {
                let spec = need("snapshot", &body.snapshot)?;
                let to = absolute("to", need("to", &body.to)?)?;
                refuse("path", &body.path)?;
                refuse("tier", &body.tier)?;
                JobSpec::Restore {
                    snapshot: snapshot(spec)?,
                    to,
                    from: body.from.clone(),
                }
            }
            JobKind::Replicate => {
                let spec = need("snapshot", &body.snapshot)?;
                let to = destination("to", need("to", &body.to)?)?;
                refuse("path", &body.path)?;
                refuse("from", &body.from)?;
                refuse("tier", &body.tier)?;
                JobSpec::Replicate {
                    snapshot: snapshot(spec)?,
                    to,
                }
            }
            JobKind::Verify => {
                refuse("path", &body.path)?;
                refuse("to", &body.to)?;
                refuse("from", &body.from)?;
                refuse("tier", &body.tier)?;
                JobSpec::Verify {
                    snapshot: body.snapshot.clone().map(snapshot).transpose()?,
                }
            }
        };
        if !PRIORITY_RANGE.contains(&body.priority) {
            return Err(format!(
                "`priority` = {}: expected {} to {}",
                body.priority,
                PRIORITY_RANGE.start(),
                PRIORITY_RANGE.end()
            ));
        }
        if let Some(key) = &body.idempotency_key {
            if key.is_empty()
                || key.len() > IDEMPOTENCY_KEY_BYTES_MAX
                || key.chars().any(|c| c.is_control())
            {
                return Err(format!(
                    "`idempotency_key`: expected 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes of printable text"
                ));
            }
        }
        Ok(JobRequest {
            spec,
            priority: body.priority,
            idempotency_key: body.idempotency_key,
        })
    }
}

impl From<JobRequest> for RequestBody {
    fn from(request: JobRequest) -> RequestBody {
        let mut body = RequestBody {
            kind: Some(request.spec.kind()),
            priority: request.priority,
            idempotency_key: request.idempotency_key,
            ..RequestBody::default()
        };
        match request.spec {
            JobSpec::Backup { path, to, tier } => {
                body.path = Some(path.0);
                body.to = to.map(|d| d.to_string());
                body.tier = tier;
            }
            JobSpec::Restore { snapshot, to, from } => {
                body.snapshot = Some(snapshot.0);
                body.to = Some(to.0);
                body.from = from;
            }
            JobSpec::Replicate { snapshot, to } => {
                body.snapshot = Some(snapshot.0);
                body.to = Some(to.to_string());
            }
            JobSpec::Verify { snapshot } => body.snapshot = snapshot.map(|s| s.0),
        }
        body
    }
}

impl JobRequest {
    /// A request at the default priority, without an idempotency key.
    pub fn new(spec: JobSpec) -> JobRequest {
        JobRequest {
            spec,
            priority: 0,
            idempotency_key: None,
        }
    }

    pub fn kind(&self) -> JobKind {
        self.spec.kind()
    }

    /// Checks what only this site's configuration can tell: the peers and tiers named.
    pub fn check(
        &self,
        config: &Config,
        peers: &BTreeMap<String, PeerSection>,
    ) -> Result<(), String> {
        let kind = self.kind().name();
        let peer = |field: &str, site: &str, text: &str| {
            if peers.contains_key(site) {
                Ok(())
            } else {
                Err(format!(
                    "{kind} job: `{field}` = {text:?}: no peer named {site:?} in the daemon's config (see `mover peer list`)"
                ))
            }
        };
        match &self.spec {
            JobSpec::Backup { to, tier, .. } => {
                if let Some(to) = to {
                    peer("to", &to.site, &to.to_string())?;
                }
                if let Some(tier) = tier {
                    if to.is_none() && !config.tiers.contains_key(tier) {
                        return Err(format!("backup job: `tier` = {tier:?}: no such tier here"));
                    }
                }
            }
            JobSpec::Restore { from, .. } => {
                if let Some(from) = from {
                    let (site, _) = mover_engine::backup::parse_destination(from);
                    peer("from", site, from)?;
                }
            }
            JobSpec::Replicate { to, .. } => peer("to", &to.site, &to.to_string())?,
            JobSpec::Verify { .. } => {}
        }
        Ok(())
    }
}

/// Checks `ID[:SUBPATH]` at submit, so a job that cannot name a snapshot is refused there
/// rather than failing later: ID is `latest` or 4 to 64 hex digits (a unique prefix is
/// looked up when the job runs: the snapshot may come from a backup queued before it, or
/// live at a peer); SUBPATH is relative to the snapshot's root, without `..`.
pub fn check_snapshot_spec(spec: &str) -> Result<(), String> {
    let (id, subpath) = match spec.split_once(':') {
        Some((id, subpath)) => (id, Some(subpath)),
        None => (spec, None),
    };
    let hex = (4..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit());
    if id != "latest" && !hex {
        return Err(
            "expected ID[:SUBPATH] with ID `latest` or 4 to 64 hex digits of a snapshot id".into(),
        );
    }
    if let Some(subpath) = subpath {
        if subpath.contains('\0') {
            return Err("expected a SUBPATH without NUL bytes".into());
        }
        if subpath.split('/').any(|part| part == "..") {
            return Err("expected a SUBPATH inside the snapshot, without `..`".into());
        }
    }
    Ok(())
}

/// What the daemon keeps about a job: one row of the queue table, rewritten on every state
/// change (the journal), and what the API answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub kind: JobKind,
    pub state: JobState,
    pub priority: i32,
    /// Submission order (ties of priority run oldest first).
    pub seq: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub bytes_sent: u64,
    pub snapshot: Option<String>,
    pub error: Option<String>,
    pub request: JobRequest,
    pub idempotency_key: Option<String>,
    pub caller: Who,
    pub submitted: String,
    pub submitted_unix_ms: u64,
    pub started: Option<String>,
    pub started_unix_ms: Option<u64>,
    pub finished: Option<String>,
    pub finished_unix_ms: Option<u64>,
    /// How many times the job was started (more than 1 after a daemon restart mid-job).
    pub attempts: u32,
    /// A caller asked to cancel it while it ran.
    pub cancel_requested: bool,
    /// Times it went back to the queue after a transient peer error (see
    /// [`mover_format::constants::PEER_RETRIES_MAX`]).
    #[serde(default)]
    pub retries: u32,
    /// A queued job waiting out its retry backoff starts no earlier than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_unix_ms: Option<u64>,
    /// What kind of error `error` is (`ErrorKind`), when the engine stopped with one: a
    /// scheduler can tell a full disk or a refusal from damage without reading the line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<mover_format::error::ErrorKind>,
    /// The engine's full job document (or verify report) once the job ends.
    pub result: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let text = mover_config::template("a", None, None)
            + "\n[peers.b]\naddress = \"127.0.0.1:7401\"\nfingerprint = \"sha256:"
            + &"ab".repeat(32)
            + "\"\n";
        Config::parse(&text, std::path::Path::new("m.toml")).unwrap()
    }

    fn parse(json: &str) -> Result<JobRequest, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn requests_are_checked_per_kind() {
        let c = config();
        let ok = |j: &str| parse(j).unwrap().check(&c, &c.peers).unwrap();
        // Wrong in itself: refused when read; wrong for this site: by `check`.
        let bad = |j: &str| match parse(j) {
            Err(e) => e,
            Ok(r) => r.check(&c, &c.peers).unwrap_err(),
        };
        ok(r#"{"kind":"backup","path":"/data"}"#);
        ok(r#"{"kind":"backup","path":"/data","to":"b:archive","priority":5}"#);
        ok(r#"{"kind":"restore","snapshot":"latest","to":"/r","from":"b"}"#);
        ok(r#"{"kind":"replicate","snapshot":"abcd","to":"b"}"#);
        ok(r#"{"kind":"verify"}"#);
        assert!(bad(r#"{"kind":"backup"}"#).contains("`path` is required"));
        assert!(bad(r#"{"kind":"backup","path":"rel"}"#).contains("absolute"));
        assert!(bad(r#"{"kind":"restore","snapshot":"latest","to":"/a/../b"}"#).contains("`..`"));
        assert!(bad(r#"{"kind":"backup","path":"/a\u0000b"}"#).contains("NUL"));
        assert!(bad(r#"{"kind":"backup","path":"/d","to":"nowhere"}"#).contains("no peer"));
        assert!(bad(r#"{"kind":"restore","snapshot":"x"}"#).contains("`to` is required"));
        assert!(bad(r#"{"kind":"verify","path":"/x"}"#).contains("does not apply"));
        assert!(bad(r#"{"kind":"verify","priority":5000}"#).contains("priority"));
        assert!(bad(r#"{"kind":"verify","idempotency_key":""}"#).contains("idempotency_key"));
        assert!(bad(r#"{"kind":"backup","path":"/d","tier":"none"}"#).contains("no such tier"));
        ok(r#"{"kind":"restore","snapshot":"3fA9:sub/dir/","to":"/r"}"#);
        ok(r#"{"kind":"verify","snapshot":"latest"}"#);
        for spec in [
            "1",
            "../../etc/passwd",
            "latest:../x",
            "abcd:a/../../b",
            "",
            "xyz1",
        ] {
            let request = format!(r#"{{"kind":"restore","snapshot":{spec:?},"to":"/r"}}"#);
            let reason = bad(&request);
            assert!(reason.contains("`snapshot`"), "{spec}: {reason}");
        }
    }

    #[test]
    fn a_missing_argument_is_named_for_every_kind() {
        for (body, field) in [
            (r#"{"path":"/d"}"#, "`kind` is required"),
            (r#"{"kind":"backup","to":"b"}"#, "`path` is required"),
            (r#"{"kind":"restore","to":"/r"}"#, "`snapshot` is required"),
            (
                r#"{"kind":"restore","snapshot":"latest"}"#,
                "`to` is required",
            ),
            (r#"{"kind":"replicate","to":"b"}"#, "`snapshot` is required"),
            (
                r#"{"kind":"replicate","snapshot":"abcd"}"#,
                "`to` is required",
            ),
            (
                r#"{"kind":"replicate","snapshot":"abcd","to":":t"}"#,
                "`to`",
            ),
        ] {
            let reason = parse(body).unwrap_err();
            assert!(reason.contains(field), "{body}: {reason}");
        }
    }

    #[test]
    fn a_request_reads_and_writes_the_documented_body() {
        for body in [
            r#"{"kind":"backup","path":"/data","to":"b:archive","priority":5,"idempotency_key":"k"}"#,
            r#"{"kind":"backup","path":"/data","tier":"fast","priority":0}"#,
            r#"{"kind":"restore","to":"/r","snapshot":"latest:sub","from":"b","priority":0}"#,
            r#"{"kind":"replicate","to":"b","snapshot":"abcd","priority":-3}"#,
            r#"{"kind":"verify","priority":0}"#,
        ] {
            let request = parse(body).unwrap();
            let written: serde_json::Value = serde_json::to_value(&request).unwrap();
            let read: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(written, read, "{body}");
        }
        let request = parse(r#"{"kind":"replicate","snapshot":"abcd","to":"b:t"}"#).unwrap();
        assert_eq!(
            request.spec,
            JobSpec::Replicate {
                snapshot: SnapshotSpec::new("abcd").unwrap(),
                to: Destination {
                    site: "b".into(),
                    tier: Some("t".into())
                },
            }
        );
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused() {
        assert!(parse(r#"{"kind":"backup","path":"/d","colour":1}"#)
            .unwrap_err()
            .contains("unknown field `colour`"));
        assert!(parse(r#"{"kind":"teleport"}"#)
            .unwrap_err()
            .contains("unknown variant `teleport`"));
    }
}
