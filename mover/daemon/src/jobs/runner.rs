//! The one place a job of any kind runs: the daemon's job threads and the CLI's in-process
//! commands (`--site-dir`) both call [`run`], and both get the kind's typed [`JobReport`].

use serde::Serialize;

use super::JobSpec;
use mover_engine::job::{Job, JobControl, JobKind, JobState};
use mover_engine::site::Site;
use mover_engine::verify::VerifyReport;
use mover_format::error::Result;

/// What a finished job reports, per kind. Its JSON is the engine's document (a verify's
/// report for verify), which is what a job's `result` shows.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum JobReport {
    Backup(Job),
    Restore(Job),
    Replicate(Job),
    Verify(VerifyReport),
}

impl JobReport {
    pub fn kind(&self) -> JobKind {
        match self {
            JobReport::Backup(_) => JobKind::Backup,
            JobReport::Restore(_) => JobKind::Restore,
            JobReport::Replicate(_) => JobKind::Replicate,
            JobReport::Verify(_) => JobKind::Verify,
        }
    }

    /// The engine's job document; `None` for a verify, which reports damage instead.
    pub fn job(&self) -> Option<&Job> {
        match self {
            JobReport::Backup(job) | JobReport::Restore(job) | JobReport::Replicate(job) => {
                Some(job)
            }
            JobReport::Verify(_) => None,
        }
    }

    /// How the job ended: as the engine says, and failed for a verify that found damage.
    pub fn state(&self) -> JobState {
        match self {
            JobReport::Verify(report) if !report.damage.is_empty() => JobState::Failed,
            JobReport::Verify(_) => JobState::Done,
            JobReport::Backup(job) | JobReport::Restore(job) | JobReport::Replicate(job) => {
                job.state
            }
        }
    }

    /// The one line saying why the job did not succeed.
    pub fn error(&self) -> Option<String> {
        match self {
            JobReport::Verify(report) => report.damage.first().map(|d| {
                format!(
                    "{} damaged chunk(s); first: snapshot {} file {:?}: {}",
                    report.damage.len(),
                    &d.snapshot[..12.min(d.snapshot.len())],
                    d.path,
                    d.reason
                )
            }),
            JobReport::Backup(job) | JobReport::Restore(job) | JobReport::Replicate(job) => {
                job.error.clone()
            }
        }
    }
}

/// Runs `spec` on `site` to its end. `control` is the daemon's (progress, stop flag; `None`
/// in-process); `resume`: a restore started again after the daemon stopped mid-job. Index
/// errors come back naming the site's index database.
pub fn run(
    site: &Site,
    spec: &JobSpec,
    control: Option<&JobControl>,
    resume: bool,
) -> Result<JobReport> {
    run_spec(site, spec, control, resume).map_err(|e| e.in_index(&site.index_path()))
}

fn run_spec(
    site: &Site,
    spec: &JobSpec,
    control: Option<&JobControl>,
    resume: bool,
) -> Result<JobReport> {
    match spec {
        JobSpec::Backup { path, to, tier } => {
            let to = to.as_ref().map(ToString::to_string);
            mover_engine::backup::run(
                site,
                &mover_engine::backup::BackupOptions {
                    source: path.as_path(),
                    tier: tier.as_deref(),
                    to: to.as_deref(),
                    control,
                },
            )
            .map(JobReport::Backup)
        }
        JobSpec::Restore { snapshot, to, from } => mover_engine::restore::run(
            site,
            &mover_engine::restore::RestoreOptions {
                spec: snapshot.as_str(),
                target: to.as_path(),
                from: from.as_deref(),
                control,
                resume,
            },
        )
        .map(JobReport::Restore),
        JobSpec::Replicate { snapshot, to } => mover_engine::replicate::run(
            site,
            &mover_engine::replicate::ReplicateOptions {
                spec: snapshot.as_str(),
                to: &to.to_string(),
                control,
            },
        )
        .map(JobReport::Replicate),
        JobSpec::Verify { snapshot } => {
            mover_engine::verify::run_with(site, snapshot.as_ref().map(|s| s.as_str()), control)
                .map(JobReport::Verify)
        }
    }
}
