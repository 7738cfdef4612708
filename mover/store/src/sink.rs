//! The one pipeline into this site's packs, for every writer: a local backup's workers and a
//! peer's Store streams alike. A writer admits a chunk (not stored yet, and not being stored
//! by another writer), appends it to its open pack (opened on the first chunk), seals the pack
//! at its target, and the pack's chunks become findable when it is committed: index rows in
//! one transaction, then the writer's claims on them end. Each step has one owner here, so a
//! rule such as "seal at `PACK_RECORDS_TARGET` records" or "a claim ends only after its
//! commit" holds for every writer (ARCHITECTURE.md, "Durability protocol").
//!
//! Who calls `commit` is the writer's choice: a peer's stream commits on its store thread as
//! soon as it seals; a backup's workers hand sealed packs to the job's control thread, which
//! commits them in the order they arrive and writes the snapshot only after the last.

use std::sync::Arc;

use mover_format::constants::PACK_RECORDS_TARGET;
use mover_format::error::Result;
use mover_format::pack::RecordHeader;
use mover_format::ChunkId;

use crate::index::{Index, IndexReader, SealedPack};
use crate::inflight::{Claim, Owner};
use crate::pack_writer::PackWriter;
use crate::Backend;

/// Whether a writer stores a chunk, as [`PackSink::admit`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Stored and committed already (in the index of the sink's tier).
    Known,
    /// This writer holds its claim: it is in this writer's pack, or about to be.
    Held,
    /// Another writer is storing it: a snapshot may name it only once that writer committed
    /// it ([`Owner::wait`], then admit again).
    Other,
    /// New: the caller holds the claim now and appends the chunk.
    New,
}

/// One writer's open pack in one tier.
pub struct PackSink<'a> {
    index: &'a Index,
    tier: String,
    backend: Arc<dyn Backend>,
    target_bytes: u64,
    pack: Option<PackWriter>,
}

impl<'a> PackSink<'a> {
    pub fn new(
        index: &'a Index,
        tier: &str,
        backend: Arc<dyn Backend>,
        target_bytes: u64,
    ) -> PackSink<'a> {
        PackSink {
            index,
            tier: tier.to_string(),
            backend,
            target_bytes,
            pack: None,
        }
    }

    /// Decides whether the writer holding `claims` stores `id`. `seen`, a reader the writer
    /// keeps open across many chunks, answers the common case (stored long ago) without a
    /// claim; a chunk it does not know is claimed, then looked up afresh, since a claim that
    /// ended after `seen` began was committed before it ended.
    pub fn admit(&self, claims: &Owner, id: &ChunkId, seen: Option<&IndexReader>) -> Result<Admit> {
        if let Some(seen) = seen {
            if seen.contains(id)? {
                return Ok(Admit::Known);
            }
        }
        match claims.claim(id) {
            Claim::Held => Ok(Admit::Held),
            Claim::Other => Ok(Admit::Other),
            Claim::New => {
                if self.index.reader_in(&self.tier)?.contains(id)? {
                    claims.release([id]);
                    Ok(Admit::Known)
                } else {
                    Ok(Admit::New)
                }
            }
        }
    }

    /// The tier this sink writes to.
    pub fn tier(&self) -> &str {
        &self.tier
    }

    /// Appends one record (a chunk the caller admitted) to the open pack.
    pub fn append(&mut self, header: &RecordHeader, payload: &[u8]) -> Result<()> {
        self.open()?.append(header, payload)
    }

    /// [`PackSink::append`] with the payload in pieces (as a peer's chunk arrived).
    pub fn append_parts(&mut self, header: &RecordHeader, parts: &[&[u8]]) -> Result<()> {
        self.open()?.append_parts(header, parts)
    }

    fn open(&mut self) -> Result<&mut PackWriter> {
        if self.pack.is_none() {
            self.pack = Some(PackWriter::create(
                &self.backend,
                &self.tier,
                self.target_bytes,
            )?);
        }
        Ok(self.pack.as_mut().expect("opened above"))
    }

    /// The open pack has reached its target: bytes, or records (tiny chunks would otherwise
    /// hold a footer entry and a claim each until the writer ends).
    pub fn is_full(&self) -> bool {
        self.pack.as_ref().is_some_and(|pack| {
            pack.bytes() >= self.target_bytes || pack.records() >= PACK_RECORDS_TARGET
        })
    }

    /// Nothing appended since the last seal.
    pub fn is_empty(&self) -> bool {
        self.pack.as_ref().is_none_or(PackWriter::is_empty)
    }

    /// Seals the open pack (durable, footer written) for [`commit`]; `None` when nothing was
    /// appended since the last seal. Dropping the sink instead leaves the pack unsealed: its
    /// file is removed and its chunks are not stored.
    pub fn seal(&mut self) -> Result<Option<SealedPack>> {
        let Some(pack) = self.pack.take().filter(|pack| !pack.is_empty()) else {
            return Ok(None);
        };
        let started = std::time::Instant::now();
        let sealed = pack.seal()?;
        mover_metrics::stage("pack_seal", started);
        Ok(Some(sealed))
    }
}

/// Makes a sealed pack's chunks findable: its index rows in one transaction, then the claims
/// of `claims` on them end (whoever waits on one then finds it in the index). On an error the
/// claims stay until the writer ends, and nothing of the pack is indexed.
pub fn commit(index: &Index, claims: &Owner, sealed: &SealedPack) -> Result<()> {
    let started = std::time::Instant::now();
    index.commit_pack(sealed)?;
    mover_metrics::stage("index_commit", started);
    claims.release(sealed.entries.iter().map(|e| &e.id));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inflight::InFlight;
    use crate::LocalDir;

    fn record(n: u32) -> (ChunkId, Vec<u8>) {
        let data = format!("chunk {n}").into_bytes();
        (ChunkId::of(&data), data)
    }

    #[test]
    fn a_chunk_is_admitted_once_across_writers_and_known_after_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalDir::new(dir.path()));
        let in_flight = InFlight::default();
        let (a, b) = (in_flight.owner(), in_flight.owner());
        let mut sink = PackSink::new(&index, "default", backend.clone(), 1 << 20);
        let other = PackSink::new(&index, "default", backend, 1 << 20);
        let (id, data) = record(1);

        assert_eq!(sink.admit(&a, &id, None).unwrap(), Admit::New);
        assert_eq!(sink.admit(&a, &id, None).unwrap(), Admit::Held);
        assert_eq!(other.admit(&b, &id, None).unwrap(), Admit::Other);
        let header = RecordHeader::new(id, mover_format::Codec::Raw, data.len(), &data);
        sink.append(&header, &data).unwrap();
        assert!(!sink.is_empty());
        let sealed = sink.seal().unwrap().expect("one record appended");
        assert!(sink.is_empty());
        assert!(sink.seal().unwrap().is_none(), "nothing appended since");
        // Sealed but not committed: still another writer's.
        assert_eq!(other.admit(&b, &id, None).unwrap(), Admit::Other);
        commit(&index, &a, &sealed).unwrap();
        assert!(in_flight.is_empty(), "the commit ended the claim");
        assert_eq!(other.admit(&b, &id, None).unwrap(), Admit::Known);
        let seen = index.reader_in("default").unwrap();
        assert_eq!(other.admit(&b, &id, Some(&seen)).unwrap(), Admit::Known);
        assert!(in_flight.is_empty(), "a known chunk leaves no claim");
    }

    #[test]
    fn a_pack_of_tiny_records_is_full_at_the_record_target() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalDir::new(dir.path()));
        // A byte target the tiny records stay far below (65 536 x ~60 B is ~4 MiB).
        let mut sink = PackSink::new(&index, "default", backend, 64 << 20);
        for n in 0..PACK_RECORDS_TARGET as u32 {
            assert!(!sink.is_full(), "full after {n} records");
            let (id, data) = record(n);
            let header = RecordHeader::new(id, mover_format::Codec::Raw, data.len(), &data);
            sink.append(&header, &data).unwrap();
        }
        assert!(sink.is_full());
        let sealed = sink.seal().unwrap().unwrap();
        assert_eq!(sealed.entries.len(), PACK_RECORDS_TARGET);
    }
}
