//! Moves live records out of packs into a new one and retires the old packs: here, merging a
//! tier's small packs, which small incremental backups leave one (or one per worker) each.
//!
//! Order (what makes a crash at any point safe):
//! 1. each old pack is opened under its exclusive lock (one that some other repack, or a
//!    writer, holds is skipped), its live records (those the index still points at) are read
//!    and checked; a pack with a bad record is left as it is and the chunk marked damaged;
//! 2. the records are appended to a new pack, which is sealed (fdatasync, directory fsync);
//! 3. one index transaction repoints each moved chunk whose row still points at the record it
//!    was copied from, adds the new pack and marks each old one that no copy points into any
//!    more condemned (`Index::repoint`);
//! 4. the old files are deleted (under their lock) and their condemned rows dropped.
//!
//! A crash before 3 leaves the new pack sealed but not indexed: nothing points into it, the
//! old packs are untouched, and it is only space (as a killed backup's sealed, uncommitted
//! pack). A crash after 3 leaves condemned files, which `store::reclaim` deletes when the site
//! opens or a local backup starts. A reader that looked a chunk up before 3 and opens the old
//! pack after 4 finds it gone and looks again (`pack_reader`); one that had it open reads on.

use std::ops::Range;
use std::sync::Arc;

use super::backend::{Backend, Held};
use super::index::{Index, Move, OldPack, PackState, Repoint};
use super::pack_key;
use super::pack_reader::read_footer;
use super::pack_writer::PackWriter;
use mover_format::constants::{
    PACK_RECORDS_TARGET, SMALL_PACKS_MERGE_AT, SMALL_PACK_SHARE_OF_TARGET,
};
use mover_format::error::{Error, Result};
use mover_format::pack::{FooterEntry, RecordHeader, RECORD_HEADER_BYTES};

/// What a merge did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Old packs retired into the new one.
    pub packs: u64,
    /// Record bytes copied (headers included).
    pub bytes: u64,
    /// Records left behind because no copy pointed at them (duplicates of a chunk stored
    /// twice, or replaced by healing).
    pub dead_records: u64,
}

/// Merges the small packs of `tier` when it holds at least [`SMALL_PACKS_MERGE_AT`] sealed,
/// committed packs smaller than `target_bytes` / [`SMALL_PACK_SHARE_OF_TARGET`]: the smallest
/// first, up to `target_bytes` in all, into one new pack. Nothing to merge costs one read of
/// the index's pack tables. `stop` is asked before each pack is taken: a job being cancelled
/// or a daemon draining ends the merge within one small pack, keeping nothing of it.
pub fn merge_small_packs(
    index: &Index,
    tier: &str,
    backend: &Arc<dyn Backend>,
    target_bytes: u64,
    stop: &dyn Fn() -> bool,
) -> Result<Merged> {
    let small_below = target_bytes / SMALL_PACK_SHARE_OF_TARGET;
    let mut small = Vec::new();
    let mut measured = Vec::new();
    for (pack_id, bytes) in index.tier_packs(tier)? {
        let bytes = match bytes {
            Some(bytes) => bytes,
            None => match backend.size(&pack_key(pack_id)) {
                Ok(bytes) => {
                    measured.push((pack_id, bytes));
                    bytes
                }
                Err(e) => {
                    tracing::warn!(tier, pack = %pack_key(pack_id), error = %e, "could not measure a pack; not merged");
                    continue;
                }
            },
        };
        if bytes < small_below {
            small.push((bytes, pack_id));
        }
    }
    if !measured.is_empty() {
        index.note_pack_bytes(&measured)?;
    }
    if small.len() < SMALL_PACKS_MERGE_AT {
        return Ok(Merged::default());
    }
    small.sort_unstable();
    let mut chosen = Vec::new();
    let mut total = 0;
    for (bytes, pack_id) in small {
        if total + bytes > target_bytes {
            break;
        }
        total += bytes;
        chosen.push(pack_id);
    }
    merge(index, tier, backend, &chosen, total, stop)
}

/// Merges the live records of `packs` (of `tier`) into one new pack of about `expected_bytes`.
/// Packs that cannot be taken (locked, gone, no longer committed, a bad record) are left out;
/// with fewer than two taken nothing is kept, as when `stop` answers true before the commit.
/// Holds one old pack's live records in memory at a time.
pub fn merge(
    index: &Index,
    tier: &str,
    backend: &Arc<dyn Backend>,
    packs: &[u64],
    expected_bytes: u64,
    stop: &dyn Fn() -> bool,
) -> Result<Merged> {
    let Some(committed) = merge_and_commit(index, tier, backend, packs, expected_bytes, stop)?
    else {
        return Ok(Merged::default());
    };
    // Deleted while still locked: a repack that opened one of these files before the
    // deletion cannot take it once we let go (its lock finds no name left).
    let deleted = delete_condemned(tier, backend.as_ref(), &committed.condemned);
    index.forget_condemned(&deleted)?;
    let merged = committed.merged;
    tracing::info!(
        tier,
        packs = merged.packs,
        into = %pack_key(committed.pack_id),
        bytes = merged.bytes,
        dead_records = merged.dead_records,
        "merged small packs"
    );
    Ok(merged)
}

/// A merge up to its index commit: the old packs are condemned, their files not yet deleted.
struct Committed {
    merged: Merged,
    pack_id: u64,
    condemned: Vec<u64>,
    /// The old packs' locks, held until their files are deleted.
    _held: Vec<Box<dyn Held>>,
}

/// Steps 1 to 3 of the module's order; `None` when fewer than two packs could be taken.
fn merge_and_commit(
    index: &Index,
    tier: &str,
    backend: &Arc<dyn Backend>,
    packs: &[u64],
    expected_bytes: u64,
    stop: &dyn Fn() -> bool,
) -> Result<Option<Committed>> {
    let mut held = Vec::new();
    let mut old = Vec::new();
    let mut sources = Vec::new();
    let mut writer = None;
    let mut merged = Merged::default();
    for &pack_id in packs {
        if stop() {
            // The writer, dropped unsealed, removes its file: nothing of this merge stays.
            return Ok(None);
        }
        let key = pack_key(pack_id);
        let pack = match backend.hold(&key) {
            Ok(Some(pack)) => pack,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(tier, pack = %key, error = %e, "could not open a small pack; not merged");
                continue;
            }
        };
        // Condemned by another repack between our scan and our lock, or being migrated.
        if !index
            .pack(pack_id)?
            .is_some_and(|p| p.tier == tier && p.state == PackState::Sealed)
        {
            continue;
        }
        // One pack's records in memory at a time (under a quarter of a pack target).
        let Some(live) = read_live(index, pack_id, &key, &*pack)? else {
            continue;
        };
        // A merged pack keeps the record bound a worker's pack has (PACK_RECORDS_TARGET):
        // packs of tiny records are small in bytes but not in what a commit holds.
        if writer
            .as_ref()
            .is_some_and(|w: &PackWriter| w.records() + live.records.len() > PACK_RECORDS_TARGET)
        {
            break;
        }
        let writer = match &mut writer {
            Some(writer) => writer,
            None => writer.insert(PackWriter::create(backend, tier, expected_bytes)?),
        };
        for (from, range) in &live.records {
            let record = &live.bytes[range.clone()];
            let header = RecordHeader::decode(&record[..RECORD_HEADER_BYTES])?;
            writer.append(&header, &record[RECORD_HEADER_BYTES..])?;
            sources.push((pack_id, from.offset));
        }
        merged.dead_records += (live.entries.len() - live.records.len()) as u64;
        old.push(OldPack {
            pack_id,
            entries: live.entries,
        });
        held.push(pack);
    }
    // One pack alone gains nothing; the writer, dropped unsealed, removes its file.
    let Some(writer) = writer.filter(|_| old.len() >= 2) else {
        return Ok(None);
    };
    let sealed = writer.seal()?;
    merged.bytes = sealed.entries.iter().map(record_len).sum();
    let moves: Vec<Move> = sources
        .into_iter()
        .zip(&sealed.entries)
        .map(|((from_pack, from_offset), to)| Move {
            from_pack,
            from_offset,
            to_pack: sealed.pack_id,
            to: *to,
        })
        .collect();
    let repointed = index.repoint(&Repoint {
        new_pack: Some(&sealed),
        moves: &moves,
        retire: &old,
    });
    let condemned = match repointed {
        Ok(done) => done.condemned,
        Err(e) => {
            // A sealed pack the index does not list is never reclaimed (a crash between seal
            // and commit leaves one, which is GC's); here we know the commit failed, so remove
            // it unless the index lists it after all (a commit whose outcome was misreported).
            if index.pack_tier(sealed.pack_id).ok().flatten().is_none() {
                if let Err(remove) = backend.remove(&pack_key(sealed.pack_id)) {
                    tracing::warn!(tier, pack = %pack_key(sealed.pack_id), error = %remove, "could not remove the merged pack of a failed commit");
                }
            }
            return Err(e);
        }
    };
    merged.packs = condemned.len() as u64;
    Ok(Some(Committed {
        merged,
        pack_id: sealed.pack_id,
        condemned,
        _held: held,
    }))
}

/// Deletes the files of condemned packs; returns those deleted (or already gone). One that
/// cannot be deleted keeps its condemned row, for the next reclaim.
pub fn delete_condemned(tier: &str, backend: &dyn Backend, condemned: &[u64]) -> Vec<u64> {
    let mut deleted = Vec::new();
    for &pack_id in condemned {
        match backend.remove(&pack_key(pack_id)) {
            Ok(_) => deleted.push(pack_id),
            Err(e) => {
                tracing::warn!(tier, pack = %pack_key(pack_id), error = %e, "could not delete a merged pack; the next reclaim tries again")
            }
        }
    }
    deleted
}

/// The live records of one pack, checked, in one buffer.
struct Live {
    /// Every record the footer lists.
    entries: Vec<FooterEntry>,
    /// The live ones: their footer entry and their bytes (header and payload) in `bytes`.
    records: Vec<(FooterEntry, Range<usize>)>,
    bytes: Vec<u8>,
}

fn record_len(e: &FooterEntry) -> u64 {
    RECORD_HEADER_BYTES as u64 + e.stored_len as u64
}

/// Reads and checks the records of pack `pack_id` that the index points at. `None`: the pack
/// is left out (unreadable footer, a chunk known damaged, a read error, or a bad record,
/// which alone is marked damaged, so that the next backup holding its bytes stores them
/// again: a device error says nothing about the bytes).
fn read_live(index: &Index, pack_id: u64, key: &str, held: &dyn Held) -> Result<Option<Live>> {
    let entries = match read_footer(key, held.len(), |offset, len, buf| {
        held.read_range(offset, len, buf)
    }) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(pack = %key, error = %e, "a small pack's footer cannot be read; not merged");
            return Ok(None);
        }
    };
    let mut live = Live {
        records: Vec::new(),
        bytes: Vec::new(),
        entries,
    };
    let mut record = Vec::new();
    for e in &live.entries {
        let Some(copy) = index.copy_in(&e.id, pack_id)? else {
            continue;
        };
        let at = copy.location;
        if at.offset != e.offset {
            continue;
        }
        if copy.damaged {
            return Ok(None);
        }
        let len = record_len(e) as usize;
        let checked = held
            .read_range(e.offset, len, &mut record)
            .and_then(|()| check_record(&record, e));
        match checked {
            Ok(()) => {}
            Err(bad @ Error::Corrupt { .. }) => {
                let reason = format!("chunk {} in {key}: {bad}", e.id);
                tracing::warn!(pack = %key, chunk = %e.id, error = %bad, "a bad record found while merging small packs; the pack is left out");
                index.mark_damaged(&e.id, &at, &reason)?;
                return Ok(None);
            }
            Err(failed) => {
                tracing::warn!(pack = %key, chunk = %e.id, error = %failed, "a small pack could not be read; not merged");
                return Ok(None);
            }
        }
        let start = live.bytes.len();
        live.bytes.extend_from_slice(&record);
        live.records.push((*e, start..live.bytes.len()));
    }
    Ok(Some(live))
}

/// A record as read matches its footer entry and its header and payload checksums.
fn check_record(record: &[u8], entry: &FooterEntry) -> Result<()> {
    let header = RecordHeader::decode(&record[..RECORD_HEADER_BYTES])?;
    if header.id != entry.id || header.stored_len != entry.stored_len {
        return Err(Error::corrupt(
            format!("record at offset {}", entry.offset),
            format!(
                "holds chunk {} where the footer says {}",
                header.id, entry.id
            ),
        ));
    }
    if xxhash_rust::xxh3::xxh3_64(&record[RECORD_HEADER_BYTES..]) != header.payload_xxh3 {
        return Err(Error::corrupt(
            format!("record at offset {}", entry.offset),
            "payload checksum (xxh3) mismatch",
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::reclaim::reclaim_tier;
    use crate::{LocalDir, Location, SealedPack};
    use mover_format::{ChunkId, Codec};

    pub(crate) struct Tier {
        _dir: tempfile::TempDir,
        pub index: Index,
        pub backend: Arc<dyn Backend>,
        pub tiers: HashMap<String, Arc<dyn Backend>>,
        pub root: std::path::PathBuf,
    }

    pub(crate) fn tier() -> Tier {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("hot");
        std::fs::create_dir(&root).unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalDir::new(&root));
        Tier {
            index: Index::open(&dir.path().join("index.redb")).unwrap(),
            tiers: HashMap::from([("hot".to_string(), backend.clone())]),
            backend,
            root,
            _dir: dir,
        }
    }

    pub(crate) fn payload(seed: u32) -> Vec<u8> {
        (0..4096 + seed)
            .map(|i| (i.wrapping_mul(seed | 1) >> 3) as u8)
            .collect()
    }

    pub(crate) fn id_of(payload: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(payload).as_bytes())
    }

    /// Seals and commits a pack holding the chunks made from `seeds`.
    pub(crate) fn committed_pack(t: &Tier, seeds: &[u32]) -> SealedPack {
        let mut writer = PackWriter::create(&t.backend, "hot", 8 << 20).unwrap();
        for &seed in seeds {
            let payload = payload(seed);
            let header = RecordHeader::new(id_of(&payload), Codec::Raw, payload.len(), &payload);
            writer.append(&header, &payload).unwrap();
        }
        let sealed = writer.seal().unwrap();
        t.index.commit_pack(&sealed).unwrap();
        sealed
    }

    fn pack_files(root: &std::path::Path) -> usize {
        LocalDir::new(root).list("packs").unwrap().len()
    }

    fn read(t: &Tier, seed: u32) -> Vec<u8> {
        let mut out = Vec::new();
        crate::pack_reader::ChunkReader::new(&t.index, &t.tiers)
            .read(&id_of(&payload(seed)), &mut out)
            .unwrap();
        out
    }

    fn location(t: &Tier, seed: u32) -> Location {
        t.index.lookup(&id_of(&payload(seed))).unwrap().unwrap()
    }

    #[test]
    fn small_packs_merge_into_one_and_dead_records_are_dropped() {
        let t = tier();
        let mut packs = Vec::new();
        for i in 0..SMALL_PACKS_MERGE_AT as u32 - 1 {
            packs.push(committed_pack(&t, &[i]));
        }
        // Below the threshold: nothing happens.
        let merged = merge_small_packs(&t.index, "hot", &t.backend, 8 << 20, &|| false).unwrap();
        assert_eq!(merged, Merged::default());
        assert_eq!(pack_files(&t.root), SMALL_PACKS_MERGE_AT - 1);

        // A chunk stored twice (racing writers): the second copy is dead and not carried over.
        let twice = committed_pack(&t, &[0, 100]);
        let merged = merge_small_packs(&t.index, "hot", &t.backend, 8 << 20, &|| false).unwrap();
        assert_eq!(merged.packs, SMALL_PACKS_MERGE_AT as u64);
        assert_eq!(merged.dead_records, 1);
        assert_eq!(pack_files(&t.root), 1);
        let new_pack = location(&t, 0).pack_id;
        for seed in (0..SMALL_PACKS_MERGE_AT as u32 - 1).chain([100]) {
            assert_eq!(read(&t, seed), payload(seed));
            assert_eq!(location(&t, seed).pack_id, new_pack);
        }
        let registered = t.index.pack_ids().unwrap();
        assert_eq!(registered.into_iter().collect::<Vec<_>>(), vec![new_pack]);
        assert!(t.index.condemned("hot").unwrap().is_empty());
        let _ = (packs, twice);
    }

    #[test]
    fn a_pack_with_a_bad_record_is_left_out_and_its_chunk_marked_damaged() {
        let t = tier();
        let good = committed_pack(&t, &[1]);
        let bad = committed_pack(&t, &[2]);
        let other = committed_pack(&t, &[3]);
        // Flip a payload byte of chunk 2.
        let path = t.root.join(pack_key(bad.pack_id));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[bad.entries[0].offset as usize + RECORD_HEADER_BYTES + 10] ^= 1;
        std::fs::write(&path, bytes).unwrap();

        let ids = [good.pack_id, bad.pack_id, other.pack_id];
        let merged = merge(&t.index, "hot", &t.backend, &ids, 1 << 20, &|| false).unwrap();
        assert_eq!(merged.packs, 2);
        assert!(path.exists(), "the damaged pack was merged away");
        assert_eq!(location(&t, 2).pack_id, bad.pack_id);
        let damaged = t.index.damaged().unwrap();
        assert_eq!(damaged.len(), 1);
        assert_eq!(damaged[0].0, id_of(&payload(2)));
        assert_eq!(read(&t, 1), payload(1));
        assert_eq!(read(&t, 3), payload(3));
    }

    #[test]
    fn a_stop_during_a_merge_keeps_nothing_of_it() {
        let t = tier();
        let packs: Vec<u64> = (0..4).map(|i| committed_pack(&t, &[i]).pack_id).collect();
        let files = || std::fs::read_dir(&t.root).unwrap().count();
        let before = files();
        // Asked once per pack: the third time (two packs copied) the job is being cancelled.
        let asked = std::cell::Cell::new(0);
        let stop = || {
            asked.set(asked.get() + 1);
            asked.get() > 2
        };
        let merged = merge(&t.index, "hot", &t.backend, &packs, 1 << 20, &stop).unwrap();
        assert_eq!(merged, Merged::default());
        assert_eq!(asked.get(), 3);
        assert_eq!(files(), before, "the unsealed merge pack was left behind");
        for (i, &pack) in (0u32..).zip(&packs) {
            assert_eq!(location(&t, i).pack_id, pack);
            assert_eq!(read(&t, i), payload(i));
        }
    }

    #[test]
    fn a_pack_another_repack_holds_is_not_taken() {
        let t = tier();
        let packs: Vec<u64> = (0..3).map(|i| committed_pack(&t, &[i]).pack_id).collect();
        let held = t.backend.hold(&pack_key(packs[0])).unwrap().unwrap();
        let merged = merge(&t.index, "hot", &t.backend, &packs, 1 << 20, &|| false).unwrap();
        assert_eq!(merged.packs, 2);
        assert_eq!(location(&t, 0).pack_id, packs[0]);
        assert!(t.root.join(pack_key(packs[0])).exists());
        drop(held);
    }

    #[test]
    fn a_merge_committed_but_not_deleted_is_finished_by_reclaim() {
        let t = tier();
        let packs: Vec<u64> = (0..4).map(|i| committed_pack(&t, &[i]).pack_id).collect();
        // The merge up to its index commit, then a crash: the old files stay.
        let committed = merge_and_commit(&t.index, "hot", &t.backend, &packs, 1 << 20, &|| false)
            .unwrap()
            .unwrap();
        assert_eq!(committed.condemned.len(), 4);
        drop(committed);
        assert_eq!(pack_files(&t.root), 5);
        assert_eq!(t.index.condemned("hot").unwrap().len(), 4);
        for seed in 0..4 {
            assert_eq!(read(&t, seed), payload(seed));
        }

        // What the next site open (or local backup) runs.
        let reclaimed = reclaim_tier(&t.index, "hot", &*t.backend).unwrap();
        assert_eq!(reclaimed.condemned, 4);
        assert_eq!(pack_files(&t.root), 1);
        assert!(t.index.condemned("hot").unwrap().is_empty());
        for (seed, old) in (0..4).zip(&packs) {
            assert!(!t.root.join(pack_key(*old)).exists());
            assert_eq!(read(&t, seed), payload(seed));
        }
    }

    #[test]
    fn reclaim_never_deletes_a_pack_that_packs_still_lists() {
        let t = tier();
        let packs: Vec<u64> = (0..2).map(|i| committed_pack(&t, &[i]).pack_id).collect();
        let committed = merge_and_commit(&t.index, "hot", &t.backend, &packs, 1 << 20, &|| false)
            .unwrap()
            .unwrap();
        drop(committed);
        // Registered again (as a repair-index would after losing the index).
        t.index
            .commit_pack(&SealedPack {
                pack_id: packs[0],
                tier: "hot".into(),
                entries: Vec::new(),
                bytes: 0,
            })
            .unwrap();
        let reclaimed = reclaim_tier(&t.index, "hot", &*t.backend).unwrap();
        assert_eq!(reclaimed.condemned, 1);
        assert!(t.root.join(pack_key(packs[0])).exists());
        assert!(!t.root.join(pack_key(packs[1])).exists());
    }

    #[test]
    fn a_site_from_before_the_pack_bytes_table_opens_and_merges() {
        let mut t = tier();
        let packs: Vec<SealedPack> = (0..SMALL_PACKS_MERGE_AT as u32)
            .map(|i| committed_pack(&t, &[i]))
            .collect();
        // The same packs in an index as builds before `pack_bytes` and `condemned` left it.
        let path = t._dir.path().join("v1.redb");
        crate::index::tests::write_v1(&path, &packs, true);
        t.index = Index::open(&path).unwrap();
        assert!(t
            .index
            .tier_packs("hot")
            .unwrap()
            .iter()
            .all(|(_, bytes)| bytes.is_none()));

        let merged = merge_small_packs(&t.index, "hot", &t.backend, 8 << 20, &|| false).unwrap();
        assert_eq!(merged.packs, SMALL_PACKS_MERGE_AT as u64);
        assert_eq!(pack_files(&t.root), 1);
        for seed in 0..SMALL_PACKS_MERGE_AT as u32 {
            assert_eq!(read(&t, seed), payload(seed));
        }
    }
}
