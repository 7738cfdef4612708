//! The job document: what `--json` prints and what the catalog keeps for each job.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Warning {
    pub path: String,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Backup,
    Restore,
    Replicate,
    Verify,
}

impl JobKind {
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Restore => "restore",
            JobKind::Replicate => "replicate",
            JobKind::Verify => "verify",
        }
    }

    /// The one-letter prefix of job ids.
    pub fn letter(self) -> &'static str {
        match self {
            JobKind::Backup => "b",
            JobKind::Restore => "r",
            JobKind::Replicate => "p",
            JobKind::Verify => "v",
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Done,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// How a job that stopped with `e` ended: cancelled (asked to stop) or failed. A
    /// transient failure the daemon retries does not end the job (see `jobs::board`).
    pub fn after(e: &mover_format::Error) -> JobState {
        match e.kind() {
            mover_format::error::ErrorKind::Cancelled => JobState::Cancelled,
            _ => JobState::Failed,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

/// The live side of a job the daemon runs: the engine updates the progress counters as it
/// goes and checks the stop flag between units of work (an extent, a chunk, a file).
#[derive(Debug, Default)]
pub struct JobControl {
    /// The job id the daemon assigned (the engine's document carries it).
    pub id: String,
    /// Which start of the job this is (1, 2, … across retries and daemon restarts; persisted
    /// with the job before it runs): a peer stops an older attempt's streams.
    pub attempt: u32,
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_sent: AtomicU64,
    stop: AtomicBool,
    /// Why it was stopped: true = the daemon is draining (the job resumes at the next start),
    /// false = cancelled by a caller.
    draining: AtomicBool,
}

impl JobControl {
    pub fn new(id: &str, attempt: u32) -> JobControl {
        JobControl {
            id: id.to_string(),
            attempt,
            ..JobControl::default()
        }
    }

    /// The attempt a job run with `control` ships as: an in-process run (no control) is a
    /// job of its own, run once.
    pub fn attempt_of(control: Option<&JobControl>) -> u64 {
        control.map_or(1, |c| u64::from(c.attempt.max(1)))
    }

    pub fn cancel(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn interrupt_for_shutdown(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// `Err(Cancelled)` once a stop was asked for.
    pub fn check(&self) -> mover_format::Result<()> {
        if self.stop_requested() {
            Err(mover_format::Error::Cancelled(if self.is_draining() {
                "the daemon is stopping; the job resumes when it starts again".into()
            } else {
                "cancelled on request".into()
            }))
        } else {
            Ok(())
        }
    }

    pub fn add_done(&self, bytes: u64) {
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_sent(&self, bytes: u64) {
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn set_total(&self, bytes: u64) {
        self.bytes_total.store(bytes, Ordering::Relaxed);
    }
}

/// Progress hooks for engine code that may or may not run under the daemon.
pub trait Progress {
    fn done(&self, bytes: u64);
    fn sent(&self, bytes: u64);
    fn total(&self, bytes: u64);
    fn check(&self) -> mover_format::Result<()>;
}

impl Progress for Option<&JobControl> {
    fn done(&self, bytes: u64) {
        if let Some(c) = self {
            c.add_done(bytes)
        }
    }
    fn sent(&self, bytes: u64) {
        if let Some(c) = self {
            c.add_sent(bytes)
        }
    }
    fn total(&self, bytes: u64) {
        if let Some(c) = self {
            c.set_total(bytes)
        }
    }
    fn check(&self) -> mover_format::Result<()> {
        match self {
            Some(c) => c.check(),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    pub state: JobState,
    pub site: String,
    /// Backup: the source path; restore: the target directory.
    pub path: String,
    pub tier: Option<String>,
    /// The peer site of a cross-site job (backup to it, restore from it).
    pub destination: Option<String>,
    pub snapshot: Option<String>,
    /// Logical bytes the job covers (file sizes, holes included).
    pub bytes_total: u64,
    /// Logical bytes finished so far (read and chunked, or reused unchanged).
    pub bytes_done: u64,
    /// Bytes handed to the destination: records written locally (headers included), or chunk
    /// payload bytes shipped to a peer.
    pub bytes_sent: u64,
    /// UDP payload bytes on the wire to and from peers (QUIC headers, acks, control included).
    pub wire_bytes_sent: u64,
    pub wire_bytes_received: u64,
    pub bytes_read: u64,
    /// Restore: data bytes written into the target. Holes are not written, so a sparse
    /// file's throughput is this over the time, not `bytes_total` (its apparent size).
    pub bytes_written: u64,
    /// Plaintext bytes of chunks the destination did not have.
    pub bytes_new: u64,
    pub bytes_reused: u64,
    pub files: u64,
    pub files_reused: u64,
    pub directories: u64,
    pub chunks_total: u64,
    pub chunks_new: u64,
    /// Local backup: small packs of the tier merged into one after the snapshot committed
    /// (`store::repack`); 0 while the tier holds few small packs.
    pub packs_merged: u64,
    pub workers: usize,
    /// Backup: every file was read with O_DIRECT. Restore: large files were written with it.
    pub direct_io: bool,
    /// Reads landed in chunk windows registered with io_uring (fixed buffers); false when
    /// the windows did not fit the memlock budget (`engine.io_memory_bytes`).
    pub registered_reads: bool,
    /// User-space bytes copied per byte read: reads land in the chunk window, so what is
    /// counted is each new chunk's copy into the pack's staging buffer (local) or the ship
    /// batch (cross-site).
    pub memcpy_per_byte: f64,
    pub started: String,
    pub elapsed_s: f64,
    pub warnings: Vec<Warning>,
    pub error: Option<String>,
}

impl Job {
    /// A job document; `control` (a job the daemon runs) gives it the daemon's id.
    pub fn new(kind: JobKind, site: &str, path: String, control: Option<&JobControl>) -> Job {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let id = match control {
            Some(c) => c.id.clone(),
            None => format!(
                "{}-{:x}-{:08x}",
                kind.letter(),
                now.as_secs(),
                rand::random::<u32>()
            ),
        };
        Job {
            id,
            kind,
            state: JobState::Running,
            site: site.to_string(),
            path,
            tier: None,
            destination: None,
            snapshot: None,
            bytes_total: 0,
            bytes_done: 0,
            bytes_sent: 0,
            bytes_written: 0,
            wire_bytes_sent: 0,
            wire_bytes_received: 0,
            bytes_read: 0,
            bytes_new: 0,
            bytes_reused: 0,
            files: 0,
            files_reused: 0,
            directories: 0,
            chunks_total: 0,
            chunks_new: 0,
            packs_merged: 0,
            workers: 0,
            direct_io: true,
            registered_reads: false,
            memcpy_per_byte: 0.0,
            started: rfc3339(now.as_secs() as i64),
            elapsed_s: 0.0,
            warnings: Vec::new(),
            error: None,
        }
    }

    /// Logical bytes per second over the job's run time, in GB/s (1e9).
    pub fn gb_per_s(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.bytes_total as f64 / self.elapsed_s / 1e9
        } else {
            0.0
        }
    }
}

pub use mover_format::time::{now_unix_ms, rfc3339, rfc3339_ms};

#[cfg(test)]
mod tests {
    use super::JobControl;

    #[test]
    fn a_daemon_job_ships_as_its_start_and_an_in_process_run_as_its_first() {
        assert_eq!(JobControl::attempt_of(None), 1);
        assert_eq!(JobControl::attempt_of(Some(&JobControl::new("b-4", 3))), 3);
    }

    #[test]
    fn a_job_ends_cancelled_only_when_asked_to_stop() {
        use super::JobState;
        use mover_format::Error;
        let stop = Error::Cancelled("cancelled on request".into());
        assert_eq!(JobState::after(&stop), JobState::Cancelled);
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        for failed in [
            Error::io("append", "/p", enospc),
            Error::peer_transient("b", "restarting"),
            Error::Refused("cancelled is only a word here".into()),
        ] {
            assert_eq!(JobState::after(&failed), JobState::Failed, "{failed}");
        }
    }
}
