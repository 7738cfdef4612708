//! The daemon's jobs: what a caller may ask for ([`JobRequest`]), what the daemon keeps about
//! each job ([`JobRecord`], the row of the persistent queue), and the [`board`] that queues,
//! runs, cancels and resumes them.

pub mod board;

use serde::{Deserialize, Serialize};

use crate::audit::Who;
use std::collections::BTreeMap;

use crate::config::{Config, PeerSection};
use crate::constants::IDEMPOTENCY_KEY_BYTES_MAX;
use crate::job::{JobKind, JobState};

pub use board::Board;

/// The body of `POST /v1/jobs`: the job's kind and its arguments, named as the CLI's flags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub kind: JobKind,
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

pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

impl JobRequest {
    /// Checks the request against the kind's arguments and this site's configuration; the
    /// error is one line naming the field and what was expected.
    pub fn check(
        &self,
        config: &Config,
        peers: &BTreeMap<String, PeerSection>,
    ) -> Result<(), String> {
        let kind = self.kind.name();
        let need = |field: &str, value: &Option<String>| match value {
            Some(v) if !v.is_empty() => Ok(()),
            _ => Err(format!("{kind} job: `{field}` is required")),
        };
        let refuse = |field: &str, value: &Option<String>| match value {
            Some(_) => Err(format!("{kind} job: `{field}` does not apply to a {kind}")),
            None => Ok(()),
        };
        let absolute = |field: &str, value: &Option<String>| {
            match value {
            Some(v) if !v.starts_with('/') => Err(format!(
                "{kind} job: `{field}` = {v:?}: expected an absolute path (the daemon has no working directory of yours)"
            )),
            // `..` would leave directories on the way created (restore) and makes the path
            // say less than it seems; the CLI resolves it before submitting.
            Some(v) if v.split('/').any(|part| part == "..") => Err(format!(
                "{kind} job: `{field}` = {v:?}: expected an absolute path without `..`"
            )),
            Some(v) if v.contains('\0') => Err(format!(
                "{kind} job: `{field}` = {v:?}: expected a path without NUL bytes"
            )),
            _ => Ok(()),
        }
        };
        let peer_of = |field: &str, value: &Option<String>| -> Result<(), String> {
            if let Some(v) = value {
                let (site, _) = crate::backup::parse_destination(v);
                if !peers.contains_key(site) {
                    return Err(format!(
                        "{kind} job: `{field}` = {v:?}: no peer named {site:?} in the daemon's config (see `mover peer list`)"
                    ));
                }
            }
            Ok(())
        };
        match self.kind {
            JobKind::Backup => {
                need("path", &self.path)?;
                absolute("path", &self.path)?;
                refuse("snapshot", &self.snapshot)?;
                refuse("from", &self.from)?;
                peer_of("to", &self.to)?;
                if let Some(tier) = &self.tier {
                    if self.to.is_none() && !config.tiers.contains_key(tier) {
                        return Err(format!("backup job: `tier` = {tier:?}: no such tier here"));
                    }
                }
            }
            JobKind::Restore => {
                need("snapshot", &self.snapshot)?;
                need("to", &self.to)?;
                absolute("to", &self.to)?;
                refuse("path", &self.path)?;
                refuse("tier", &self.tier)?;
                peer_of("from", &self.from)?;
            }
            JobKind::Replicate => {
                need("snapshot", &self.snapshot)?;
                need("to", &self.to)?;
                refuse("path", &self.path)?;
                refuse("from", &self.from)?;
                refuse("tier", &self.tier)?;
                peer_of("to", &self.to)?;
            }
            JobKind::Verify => {
                refuse("path", &self.path)?;
                refuse("to", &self.to)?;
                refuse("from", &self.from)?;
                refuse("tier", &self.tier)?;
            }
        }
        if let Some(spec) = &self.snapshot {
            check_snapshot_spec(spec)
                .map_err(|why| format!("{kind} job: `snapshot` = {spec:?}: {why}"))?;
        }
        if !PRIORITY_RANGE.contains(&self.priority) {
            return Err(format!(
                "`priority` = {}: expected {} to {}",
                self.priority,
                PRIORITY_RANGE.start(),
                PRIORITY_RANGE.end()
            ));
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty()
                || key.len() > IDEMPOTENCY_KEY_BYTES_MAX
                || key.chars().any(|c| c.is_control())
            {
                return Err(format!(
                    "`idempotency_key`: expected 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes of printable text"
                ));
            }
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
    /// [`crate::constants::PEER_RETRIES_MAX`]).
    #[serde(default)]
    pub retries: u32,
    /// A queued job waiting out its retry backoff starts no earlier than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_unix_ms: Option<u64>,
    /// The engine's full job document (or verify report) once the job ends.
    pub result: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let text = crate::config::template("a", None, None)
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
        let bad = |j: &str| parse(j).unwrap().check(&c, &c.peers).unwrap_err();
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
    fn unknown_fields_and_kinds_are_refused() {
        assert!(parse(r#"{"kind":"backup","path":"/d","colour":1}"#)
            .unwrap_err()
            .contains("unknown field `colour`"));
        assert!(parse(r#"{"kind":"teleport"}"#)
            .unwrap_err()
            .contains("unknown variant `teleport`"));
    }
}
