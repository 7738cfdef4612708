//! The newest attempt of each peer job this process has seen, so that a killed try's Store
//! streams stop storing once a newer try of the same job has started.
//!
//! A sender that is killed, or whose connection drops, leaves its streams here open until
//! their connection times out; a retry (or the restarted daemon resuming the job) opens new
//! ones with a higher attempt number (protocol version 2, `Frame::Attempt`). Every stream
//! of a job holds the job's entry; when a newer attempt begins, the older attempt's streams
//! see it ([`Stream::superseded`], [`Stream::wait_superseded`]) and stop at their next commit
//! point without committing, so their claims end at once instead of at the connection's
//! timeout. All streams of one attempt (one per sending worker) carry the same number and
//! live side by side. Streams of version 1 carry no attempt and are not registered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;

use mover_format::constants::PEER_ATTEMPTS_FORGET_AFTER;

/// Jobs keyed by (sending site, job id).
#[derive(Default)]
pub struct Attempts {
    jobs: Mutex<HashMap<(String, String), Arc<Job>>>,
}

struct Job {
    newest: watch::Sender<u64>,
    /// When a stream of the job last began or ended.
    last_active: Mutex<Instant>,
}

impl Job {
    fn touch(&self, now: Instant) {
        let mut last = self.last_active.lock().unwrap_or_else(|e| e.into_inner());
        *last = (*last).max(now);
    }
}

/// A stream of an attempt older than its job's newest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("attempt {attempt} of job {job:?} from site {site} was superseded by attempt {newest}: its stream stores nothing more")]
pub struct Superseded {
    pub site: String,
    pub job: String,
    pub attempt: u64,
    pub newest: u64,
}

/// One Store stream's hold on its job's entry (the entry is kept while any stream holds it).
#[derive(Clone)]
pub struct Stream {
    site: String,
    job: String,
    attempt: u64,
    entry: Arc<Job>,
    newest: watch::Receiver<u64>,
}

impl Attempts {
    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), Arc<Job>>> {
        // Each change is one insert or remove: the map stays whole under a panicking holder.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a stream of `attempt` of `site`'s `job` at `now`: refused when a newer
    /// attempt of the job has begun; otherwise it becomes the newest (the job's streams of
    /// older attempts see it).
    pub fn begin(
        &self,
        site: &str,
        job: &str,
        attempt: u64,
        now: Instant,
    ) -> Result<Stream, Superseded> {
        let mut jobs = self.lock();
        jobs.retain(|_, entry| !entry.is_idle(now));
        let entry = jobs
            .entry((site.to_string(), job.to_string()))
            .or_insert_with(|| {
                Arc::new(Job {
                    newest: watch::channel(attempt).0,
                    last_active: Mutex::new(now),
                })
            })
            .clone();
        drop(jobs);
        entry.touch(now);
        let newest = *entry.newest.borrow();
        if attempt < newest {
            return Err(Superseded {
                site: site.to_string(),
                job: job.to_string(),
                attempt,
                newest,
            });
        }
        entry.newest.send_if_modified(|newest| {
            let newer = attempt > *newest;
            *newest = (*newest).max(attempt);
            newer
        });
        Ok(Stream {
            site: site.to_string(),
            job: job.to_string(),
            attempt,
            newest: entry.newest.subscribe(),
            entry,
        })
    }

    /// Jobs remembered, for tests.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Job {
    /// No stream holds it (the map's is the only reference) and none began or ended lately.
    fn is_idle(self: &Arc<Self>, now: Instant) -> bool {
        Arc::strong_count(self) == 1
            && now.saturating_duration_since(
                *self.last_active.lock().unwrap_or_else(|e| e.into_inner()),
            ) >= PEER_ATTEMPTS_FORGET_AFTER
    }
}

impl Stream {
    pub fn attempt(&self) -> u64 {
        self.attempt
    }

    /// Why this stream must stop, once a newer attempt of its job has begun.
    pub fn superseded(&self) -> Option<Superseded> {
        let newest = *self.newest.borrow();
        (newest > self.attempt).then(|| Superseded {
            site: self.site.clone(),
            job: self.job.clone(),
            attempt: self.attempt,
            newest,
        })
    }

    /// Resolves once a newer attempt of this stream's job has begun.
    pub async fn wait_superseded(&mut self) -> Superseded {
        loop {
            // Marks the value seen, so `changed` waits for a newer one.
            self.newest.borrow_and_update();
            if let Some(superseded) = self.superseded() {
                return superseded;
            }
            // The sender lives in `entry`, which this stream holds: `changed` cannot fail.
            if self.newest.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.entry.touch(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_newer_attempt_supersedes_the_older_ones_streams_and_refuses_them_after() {
        let attempts = Attempts::default();
        let now = Instant::now();
        let first = attempts.begin("a", "b-7", 1, now).unwrap();
        // The same attempt's other workers, and another job, are left alone.
        let second_worker = attempts.begin("a", "b-7", 1, now).unwrap();
        let other_job = attempts.begin("a", "b-8", 1, now).unwrap();
        let other_site = attempts.begin("c", "b-7", 1, now).unwrap();
        assert_eq!(first.superseded(), None);
        let retry = attempts.begin("a", "b-7", 2, now).unwrap();
        let expected = Superseded {
            site: "a".into(),
            job: "b-7".into(),
            attempt: 1,
            newest: 2,
        };
        assert_eq!(first.superseded(), Some(expected.clone()));
        assert_eq!(second_worker.superseded(), Some(expected.clone()));
        assert_eq!(retry.superseded(), None);
        assert_eq!(other_job.superseded(), None);
        assert_eq!(other_site.superseded(), None);
        // A stream of the old attempt that opens now is refused at once.
        assert_eq!(
            attempts.begin("a", "b-7", 1, now).err(),
            Some(expected.clone())
        );
        let text = expected.to_string();
        assert!(
            text.contains("b-7") && text.contains("attempt 1") && text.contains("attempt 2"),
            "{text}"
        );
    }

    #[test]
    fn a_waiting_stream_wakes_when_a_newer_attempt_begins() {
        let attempts = Attempts::default();
        let now = Instant::now();
        let mut old = attempts.begin("a", "p-1", 3, now).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let waiting = tokio::spawn(async move { old.wait_superseded().await });
            tokio::task::yield_now().await;
            let _new = attempts.begin("a", "p-1", 4, now).unwrap();
            let superseded = waiting.await.unwrap();
            assert_eq!((superseded.attempt, superseded.newest), (3, 4));
        });
    }

    #[test]
    fn idle_jobs_are_forgotten_and_jobs_with_open_streams_are_kept() {
        let attempts = Attempts::default();
        let start = Instant::now();
        let open = attempts.begin("a", "b-1", 5, start).unwrap();
        drop(attempts.begin("a", "b-2", 5, start).unwrap());
        assert_eq!(attempts.len(), 2);
        // Within the window both are kept: a late stream of an old attempt is still refused.
        let soon = start + PEER_ATTEMPTS_FORGET_AFTER / 2;
        assert!(attempts.begin("a", "b-2", 4, soon).is_err());
        let later = soon + PEER_ATTEMPTS_FORGET_AFTER + Duration::from_secs(1);
        drop(attempts.begin("a", "b-3", 1, later).unwrap());
        // b-2 ended long ago and is gone; b-1 still has a stream open.
        assert_eq!(attempts.len(), 2);
        assert!(attempts.begin("a", "b-1", 4, later).is_err());
        assert!(attempts.begin("a", "b-2", 1, later).is_ok());
        drop(open);
    }
}
