//! Reclaims packs that were never sealed. Each new pack is preallocated to its full target
//! size, so a writer killed (or a process that died) mid-pack leaves up to ~133 MiB that
//! nothing can ever reference.
//!
//! Why removing them is safe: the index only points into sealed packs (a pack is committed
//! after its seal), so a pack that is not sealed and not in the index holds nothing anyone
//! can find. And a pack still being written is never taken: its writer holds an exclusive
//! `flock` on it from before its first byte to after its seal or removal, in this process or
//! another, and the backend removes only what it can lock (`Backend::remove_abandoned`).
//!
//! It also finishes repacks (`store::repack`) that committed but did not delete the packs
//! they emptied (a crash between the two): those packs are condemned in the index, which
//! condemns a pack only when no copy points into it; their files are deleted and the rows
//! dropped. And it drops the rows of packs registered open (writers without locks) whose
//! files it removed or never found.

use std::collections::HashSet;

use super::backend::Backend;
use super::index::{Index, PackState};
use super::pack_key;
use super::repack::delete_condemned;
use mover_format::error::Result;
use mover_format::pack::{decode_trailer, PACK_HEADER_BYTES, TRAILER_BYTES};

/// What a reclaim removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reclaimed {
    pub packs: u64,
    /// Condemned packs whose files are now deleted (counted apart from `packs`).
    pub condemned: u64,
    /// Space given back (allocated blocks, which for a preallocated pack exceed its data).
    pub bytes: u64,
}

/// Removes the unsealed packs of `tier` that no writer owns and the index does not reference.
/// A pack that cannot be examined is kept and logged; only a tier that cannot be listed fails.
pub fn reclaim_tier(index: &Index, tier: &str, backend: &dyn Backend) -> Result<Reclaimed> {
    let mut reclaimed = Reclaimed::default();
    let condemned = index.condemned(tier)?;
    if !condemned.is_empty() {
        let deleted = delete_condemned(tier, backend, &condemned);
        index.forget_condemned(&deleted)?;
        reclaimed.condemned = deleted.len() as u64;
        if reclaimed.condemned > 0 {
            tracing::info!(
                tier,
                packs = reclaimed.condemned,
                "deleted packs an interrupted merge had emptied"
            );
        }
    }
    let committed: HashSet<u64> = index.pack_ids()?;
    // Packs registered open whose file is gone (removed here, or never created) lose their
    // row; one whose writer still holds it keeps it. A writer that registers after this
    // read is not listed in it.
    let mut open: HashSet<u64> = index
        .packs_of(tier)?
        .into_iter()
        .filter(|p| p.state == PackState::Open)
        .map(|p| p.pack_id)
        .collect();
    for key in backend.list("packs")? {
        let Some(pack_id) = pack_id_of(&key) else {
            continue;
        };
        if committed.contains(&pack_id) {
            continue;
        }
        match backend.remove_abandoned(&key, TRAILER_BYTES, &|len, tail| !is_sealed(len, tail)) {
            Ok(Some(bytes)) => {
                reclaimed.packs += 1;
                reclaimed.bytes += bytes;
            }
            Ok(None) => {
                open.remove(&pack_id);
            }
            Err(e) => {
                open.remove(&pack_id);
                tracing::warn!(tier, pack = %key, error = %e, "could not check an uncommitted pack; kept")
            }
        }
    }
    if !open.is_empty() {
        index.forget_open(&open.into_iter().collect::<Vec<_>>())?;
    }
    if reclaimed.packs > 0 {
        tracing::info!(
            tier,
            packs = reclaimed.packs,
            bytes = reclaimed.bytes,
            "reclaimed packs left unsealed by a killed or failed writer"
        );
    }
    Ok(reclaimed)
}

/// The id of a pack key, only for keys exactly as `pack_key` writes them.
fn pack_id_of(key: &str) -> Option<u64> {
    let name = key.rsplit('/').next()?.strip_suffix(".pack")?;
    if name.len() != 16 {
        return None;
    }
    let id = u64::from_str_radix(name, 16).ok()?;
    (pack_key(id) == key).then_some(id)
}

/// Whether a pack of `len` bytes ending in `tail` ends with a trailer that fits it: what a seal
/// writes last. A damaged footer still counts as sealed: reclaim never takes a sealed pack.
pub fn is_sealed(len: u64, tail: &[u8]) -> bool {
    len >= (PACK_HEADER_BYTES + TRAILER_BYTES) as u64
        && tail.len() == TRAILER_BYTES
        && decode_trailer(tail, len).is_ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pack_writer::PackWriter;
    use crate::LocalDir;
    use mover_format::pack::RecordHeader;
    use mover_format::{ChunkId, Codec};

    struct Tier {
        _dir: tempfile::TempDir,
        index: Index,
        backend: Arc<dyn Backend>,
        root: std::path::PathBuf,
    }

    fn tier() -> Tier {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("hot");
        std::fs::create_dir(&root).unwrap();
        Tier {
            index: Index::open(&dir.path().join("index.redb")).unwrap(),
            backend: Arc::new(LocalDir::new(&root)),
            root,
            _dir: dir,
        }
    }

    fn append_one(pack: &mut PackWriter, seed: u8) {
        let payload = vec![seed; 4096 + seed as usize];
        let id = ChunkId(*blake3::hash(&payload).as_bytes());
        pack.append(
            &RecordHeader::new(id, Codec::Raw, payload.len(), &payload),
            &payload,
        )
        .unwrap();
    }

    fn packs(root: &std::path::Path) -> Vec<String> {
        let mut keys = LocalDir::new(root).list("packs").unwrap();
        keys.sort();
        keys
    }

    /// A pack as a writer killed mid-way leaves it: records, then the preallocated rest.
    fn leave_unsealed(root: &std::path::Path, pack_id: u64) -> String {
        let key = pack_key(pack_id);
        let path = root.join(&key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut bytes = mover_format::pack::pack_header().to_vec();
        bytes.extend_from_slice(&[7u8; 5000]);
        bytes.resize(1 << 20, 0);
        std::fs::write(&path, bytes).unwrap();
        key
    }

    #[test]
    fn an_unsealed_pack_without_a_writer_is_removed() {
        let t = tier();
        let key = leave_unsealed(&t.root, 0x1234);
        let reclaimed = reclaim_tier(&t.index, "hot", &*t.backend).unwrap();
        assert_eq!(reclaimed.packs, 1);
        assert!(reclaimed.bytes >= 1 << 20, "{reclaimed:?}");
        assert!(!t.root.join(key).exists());
    }

    #[test]
    fn a_pack_being_written_is_kept_and_still_seals() {
        // The writer's lock is per open file description: a reclaim in the same process (a
        // daemon running jobs side by side) is refused as one in another process would be.
        let t = tier();
        let mut pack = PackWriter::create(&t.backend, "hot", 8 << 20).unwrap();
        append_one(&mut pack, 1);
        assert_eq!(packs(&t.root).len(), 1);
        let reclaimed = reclaim_tier(&t.index, "hot", &*t.backend).unwrap();
        assert_eq!(reclaimed, Reclaimed::default());
        append_one(&mut pack, 2);
        let sealed = pack.seal().unwrap();
        assert_eq!(packs(&t.root), vec![pack_key(sealed.pack_id)]);
    }

    #[test]
    fn a_sealed_pack_is_kept_whether_committed_or_not() {
        let t = tier();
        let mut pack = PackWriter::create(&t.backend, "hot", 8 << 20).unwrap();
        append_one(&mut pack, 3);
        let uncommitted = pack.seal().unwrap();
        let mut pack = PackWriter::create(&t.backend, "hot", 8 << 20).unwrap();
        append_one(&mut pack, 4);
        let committed = pack.seal().unwrap();
        t.index.commit_pack(&committed).unwrap();
        let before = packs(&t.root);
        assert_eq!(before.len(), 2);
        let reclaimed = reclaim_tier(&t.index, "hot", &*t.backend).unwrap();
        assert_eq!(reclaimed, Reclaimed::default());
        assert_eq!(packs(&t.root), before);
        let _ = uncommitted;
    }

    #[test]
    fn a_dropped_writer_leaves_nothing() {
        let t = tier();
        let mut pack = PackWriter::create(&t.backend, "hot", 64 << 20).unwrap();
        append_one(&mut pack, 5);
        assert_eq!(packs(&t.root).len(), 1);
        drop(pack);
        assert_eq!(packs(&t.root), Vec::<String>::new());
    }

    #[test]
    fn files_that_are_not_packs_are_left_alone() {
        let t = tier();
        let key = leave_unsealed(&t.root, 0x42);
        let stray = t.root.join("packs/00/notes.txt");
        std::fs::write(&stray, b"mine").unwrap();
        let misplaced = t.root.join("packs/00/00000000000000ff.pack.tmp");
        std::fs::write(&misplaced, b"").unwrap();
        reclaim_tier(&t.index, "hot", &*t.backend).unwrap();
        assert!(!t.root.join(key).exists());
        assert!(stray.exists() && misplaced.exists());
    }

    #[test]
    fn a_pack_registered_open_loses_its_row_with_its_file_unless_a_writer_holds_it() {
        let t = tier();
        // A writer that registered its pack and died before or after its first byte.
        let key = leave_unsealed(&t.root, 0x77);
        t.index.register_open(0x77, "hot").unwrap();
        t.index.register_open(0x78, "hot").unwrap();
        // One still writing.
        let mut pack = PackWriter::create(&t.backend, "hot", 8 << 20).unwrap();
        append_one(&mut pack, 6);
        let live = pack_id_of(&packs(&t.root).into_iter().find(|k| *k != key).unwrap()).unwrap();
        t.index.register_open(live, "hot").unwrap();

        let reclaimed = reclaim_tier(&t.index, "hot", &*t.backend).unwrap();
        assert_eq!(reclaimed.packs, 1);
        assert!(!t.root.join(&key).exists());
        assert!(t.index.pack(0x77).unwrap().is_none());
        assert!(t.index.pack(0x78).unwrap().is_none());
        let state = t.index.pack(live).unwrap().map(|p| p.state);
        assert_eq!(state, Some(crate::index::PackState::Open));
        let sealed = pack.seal().unwrap();
        t.index.commit_pack(&sealed).unwrap();
        let state = t.index.pack(live).unwrap().map(|p| p.state);
        assert_eq!(state, Some(crate::index::PackState::Sealed));
    }

    #[test]
    fn pack_ids_round_trip_through_keys() {
        for id in [0, 0x42, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(pack_id_of(&pack_key(id)), Some(id));
        }
        assert_eq!(pack_id_of("packs/01/0000000000000042.pack"), None);
        assert_eq!(pack_id_of("packs/00/42.pack"), None);
    }
}
