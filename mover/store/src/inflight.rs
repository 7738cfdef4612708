//! Chunks a site is storing and has not yet indexed: the dedup between writers that run at
//! the same time (the daemon's concurrent jobs, a peer's concurrent streams).
//!
//! The index answers "is X stored?" only once X's pack is sealed and committed, which for a
//! running writer is up to a pack target of chunks later. Without this set, two writers
//! meeting X in that window both store it. A writer claims X before storing it and the claim
//! ends when the pack holding X is committed (X is then in the index) or when the writer
//! ends (it failed, or stopped before committing: X may never be stored). A writer that finds
//! X claimed by another does not store it, but may let a snapshot name X only once X is
//! durable and indexed: it waits for the claim to end and, if X is not in the index then,
//! stores X itself (ARCHITECTURE.md, "Durability protocol").

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use mover_format::ChunkId;

/// How often a waiting writer looks at its stop flag; claims ending wake it at once.
const STOP_POLL: Duration = Duration::from_millis(100);

#[derive(Default)]
pub struct InFlight {
    claims: Mutex<HashMap<ChunkId, u64>>,
    ended: Condvar,
    owners: AtomicU64,
}

/// What claiming a chunk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The caller now holds the claim: it stores the chunk.
    New,
    /// The caller held it already (another of its workers is storing the chunk).
    Held,
    /// Another writer is storing it: the caller must `wait` before its snapshot names it.
    Other,
}

impl InFlight {
    /// A new writer (a job, a peer's stream). Its claims end when it is dropped.
    pub fn owner(&self) -> Owner<'_> {
        Owner {
            set: self,
            id: self.owners.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ChunkId, u64>> {
        // The map stays consistent under a panicking holder: each change is one insert/remove.
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chunks claimed and not yet committed or released, for tests and metrics.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One writer's hold on the set.
pub struct Owner<'a> {
    set: &'a InFlight,
    id: u64,
}

impl Owner<'_> {
    pub fn claim(&self, chunk: &ChunkId) -> Claim {
        let mut claims = self.set.lock();
        match claims.get(chunk) {
            Some(&owner) if owner == self.id => Claim::Held,
            Some(_) => Claim::Other,
            None => {
                claims.insert(*chunk, self.id);
                Claim::New
            }
        }
    }

    /// Ends this writer's claims on `chunks`: committed to the index, or not stored after all.
    pub fn release<'c>(&self, chunks: impl IntoIterator<Item = &'c ChunkId>) {
        let mut claims = self.set.lock();
        let mut any = false;
        for chunk in chunks {
            if claims.get(chunk) == Some(&self.id) {
                claims.remove(chunk);
                any = true;
            }
        }
        drop(claims);
        if any {
            self.set.ended.notify_all();
        }
    }

    /// Waits until no other writer holds a claim on `chunk`. Returns false when `stop` said
    /// so first. The caller then looks in the index: the claim ended either with a commit
    /// (the chunk is there) or without one (the caller stores the chunk).
    pub fn wait(&self, chunk: &ChunkId, stop: impl Fn() -> bool) -> bool {
        let mut claims = self.set.lock();
        loop {
            match claims.get(chunk) {
                Some(&owner) if owner != self.id => {}
                _ => return true,
            }
            if stop() {
                return false;
            }
            claims = self
                .set
                .ended
                .wait_timeout(claims, STOP_POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for Owner<'_> {
    fn drop(&mut self) {
        let mut claims = self.set.lock();
        let before = claims.len();
        claims.retain(|_, owner| *owner != self.id);
        let released = claims.len() != before;
        drop(claims);
        if released {
            self.set.ended.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[test]
    fn a_claim_is_one_writers_until_committed_or_dropped() {
        let set = InFlight::default();
        let a = set.owner();
        let b = set.owner();
        assert_eq!(a.claim(&id(1)), Claim::New);
        assert_eq!(a.claim(&id(1)), Claim::Held);
        assert_eq!(b.claim(&id(1)), Claim::Other);
        a.release([&id(1)]);
        assert_eq!(b.claim(&id(1)), Claim::New);
        // Another writer's release does not end b's claim.
        a.release([&id(1)]);
        assert_eq!(a.claim(&id(1)), Claim::Other);
        drop(b);
        assert!(set.is_empty());
        assert_eq!(a.claim(&id(1)), Claim::New);
    }

    #[test]
    fn a_waiter_wakes_when_the_owner_ends_and_stops_when_told() {
        let set = InFlight::default();
        let a = set.owner();
        a.claim(&id(7));
        std::thread::scope(|s| {
            let waiter = s.spawn(|| set.owner().wait(&id(7), || false));
            drop(a);
            assert!(waiter.join().unwrap());
        });
        let b = set.owner();
        b.claim(&id(8));
        assert!(!set.owner().wait(&id(8), || true));
    }
}
