//! The site's transactional index and catalog, in one redb database (`DIR/index.redb`), at
//! schema version [`SCHEMA_VERSION`] (a `meta` row; `schema` upgrades older indexes in place).
//!
//! Tables:
//! - `copies`:  (chunk id, pack id) → (offset, stored_len, raw_len, codec): where the copies of
//!   a chunk are. A chunk has at most one healthy copy per tier; copies in other tiers (a
//!   migration under way, a backup into another tier) are more rows.
//! - `packs`:   pack id → (tier, state, sealed length, since): which backend holds a pack and
//!   where it is in its life ([`PackState`]). Copies point only into sealed or migrating packs.
//! - `damaged`: (chunk id, pack id) → why that copy's record was found bad (by verify, a
//!   restore, a peer's fetch, a merge). Such a copy does not satisfy dedup and is read last;
//!   the next pack committed with the chunk in its tier takes the copy's place.
//! - `catalog`: snapshot id (hex) → catalog row (JSON [`SnapshotInfo`]): which snapshots this
//!   site holds, taken where, in which tier, since when. A snapshot exists for readers exactly
//!   when its row does.
//! - `jobs`:    job id → job document (JSON), for the job history.
//! - `queue`:   job id → the daemon's job record (JSON): request, state, priority; the
//!   persistent queue and journal of `mover daemon`.
//! - `idempotency`: idempotency key → job id, so a retried submit finds its first job.
//! - `meta`:    `schema_version`, and counters (`job_seq`, the last job number handed out).
//!
//! Every change of where a chunk's copies are (repack, damage healing, repair-index, and
//! migration between tiers) goes through one primitive, [`Index::repoint`] (and
//! [`Index::commit_pack`], which heals with the same code): the old copy row goes and the new
//! one comes in one transaction, only if the old row still points where the mover copied
//! from, and a pack is condemned only in a transaction that finds no copy pointing into it.
//!
//! Writers commit with redb's default durability (fsync on commit), so a row that is readable
//! after a crash was durable before the commit returned.

mod schema;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};

use mover_format::error::{Error, Result};
use mover_format::pack::FooterEntry;
use mover_format::{ChunkId, Codec};
use schema::{CopyKey, CopyRow, PackRow};
use schema::{CATALOG, COPIES, DAMAGED, IDEMPOTENCY, JOBS, META, PACKS, QUEUE};
pub use schema::{SCHEMA_KEY, SCHEMA_VERSION};

/// Where one chunk is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack_id: u64,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub codec: Codec,
}

/// Where a pack is in its life. Transitions: (none) → `Open` → `Sealed` (its commit);
/// `Sealed` ⇄ `Migrating`; `Sealed` or `Migrating` → `Condemned` (by [`Index::repoint`], once no
/// copy points into it) → (none) once its file is deleted. A pack committed again (as
/// `repair-index` does) is `Sealed` again from any state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PackState {
    /// Being written. Registered only by writers whose backend cannot lock a pack (object
    /// storage), so that an interrupted upload is found again; local packs are not registered
    /// until sealed (their `flock` serves, see `store::reclaim`). No copy points into it.
    Open = 0,
    /// Durable and complete; copies may point into it.
    Sealed = 1,
    /// Sealed, and being copied to another tier: still read, but not merged, rewritten or
    /// condemned by anyone but the migration that marked it.
    Migrating = 2,
    /// No copy points into it any more; its file is to be deleted (`store::reclaim`).
    Condemned = 3,
}

impl PackState {
    fn from_u8(value: u8) -> Option<PackState> {
        Some(match value {
            0 => PackState::Open,
            1 => PackState::Sealed,
            2 => PackState::Migrating,
            3 => PackState::Condemned,
            _ => return None,
        })
    }

    /// Whether copies may point into a pack in this state.
    pub fn readable(self) -> bool {
        matches!(self, PackState::Sealed | PackState::Migrating)
    }
}

/// A pack's row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackInfo {
    pub pack_id: u64,
    pub tier: String,
    pub state: PackState,
    /// Its sealed length; `None` for packs committed without one (by builds before lengths
    /// were recorded), measured by the next merge check.
    pub bytes: Option<u64>,
    /// When it entered its state (unix ns); for packs from a version-1 index, the upgrade.
    pub since_unix_ns: i64,
}

/// One copy of a chunk, as readers choose among them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkCopy {
    pub tier: String,
    pub location: Location,
    pub state: PackState,
    pub damaged: bool,
}

/// A pack that is durable on its backend, with the records it holds.
pub struct SealedPack {
    pub pack_id: u64,
    pub tier: String,
    pub entries: Vec<FooterEntry>,
    pub bytes: u64,
}

/// A chunk's copy moved: from the record at `from_offset` of pack `from_pack` to the record
/// `to` of pack `to_pack` (which the same [`Repoint`] registers, or which is already sealed).
#[derive(Clone, Copy, Debug)]
pub struct Move {
    pub from_pack: u64,
    pub from_offset: u64,
    pub to_pack: u64,
    pub to: FooterEntry,
}

/// A pack whose copies moved away, with every record its footer lists: condemned by the
/// [`Repoint`] if no copy points into it any more.
pub struct OldPack {
    pub pack_id: u64,
    pub entries: Vec<FooterEntry>,
}

/// One atomic change of where chunks are: repack (`new_pack` the merged pack, `retire` the
/// small ones), migration (`new_pack` in the lower tier, `retire` the source), healing and
/// repair-index (a move from a damaged copy to a good one, nothing registered or retired).
#[derive(Default)]
pub struct Repoint<'a> {
    /// Registered as sealed in the same transaction; its entries are not read (the moves
    /// say which records are live).
    pub new_pack: Option<&'a SealedPack>,
    pub moves: &'a [Move],
    pub retire: &'a [OldPack],
}

/// What a [`Repoint`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Repointed {
    /// Moves applied (a move whose source row had changed meanwhile is not).
    pub moved: u64,
    /// Packs of `retire` now condemned.
    pub condemned: Vec<u64>,
}

/// One row of the catalog.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SnapshotInfo {
    pub id: String,
    pub time: String,
    pub created_unix_ns: i64,
    /// The site whose backup made it (for a snapshot received from a peer, that peer).
    pub site: String,
    /// The tier of this site holding it.
    pub tier: String,
    pub source: String,
    pub hostname: String,
    pub parent: Option<String>,
    pub job: String,
    pub files: u64,
    pub directories: u64,
    pub bytes: u64,
    pub warnings: u64,
    /// Since when this site holds it in `tier` (unix ns): its backup, its arrival from a peer,
    /// its rebuild by repair-index or its last move between tiers. 0 when written: stamped
    /// with the commit's time by [`Index::put_snapshot`].
    #[serde(default)]
    pub held_since_unix_ns: i64,
}

pub struct Index {
    db: redb::Database,
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

impl Index {
    /// Opens the index at `path`, creating it or upgrading an older schema in place (one write
    /// transaction). An index already at this build's schema is opened without writing, so
    /// read-only commands (`snapshots`, `verify`) still work on a full disk; one written by a
    /// newer mover is refused.
    pub fn open(path: &std::path::Path) -> Result<Index> {
        let db = redb::Builder::new()
            .set_cache_size(mover_format::constants::INDEX_CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => Error::Refused(format!(
                    "{} is in use by another mover process (a running daemon or backup)",
                    path.display()
                )),
                other => Error::index(path, other),
            })?;
        match schema::stored_version(&db)? {
            Some(SCHEMA_VERSION) => {}
            Some(newer) if newer > SCHEMA_VERSION => {
                return Err(Error::Refused(format!(
                    "{} has index schema version {newer}, newer than this mover's {SCHEMA_VERSION}: use the mover that wrote it or a newer one",
                    path.display()
                )))
            }
            _ => schema::upgrade(&db, now_ns()).map_err(|e| e.in_index(path))?,
        }
        Ok(Index { db })
    }

    /// The copy a reader takes first (see [`Index::copies_preferring`]).
    pub fn lookup(&self, id: &ChunkId) -> Result<Option<Location>> {
        Ok(self.locate(id, None)?.map(|c| c.location))
    }

    /// The copy of `id` to read first: a healthy one, in `tier` if it holds one.
    pub fn locate(&self, id: &ChunkId, tier: Option<&str>) -> Result<Option<ChunkCopy>> {
        Ok(self.copies_preferring(id, tier)?.into_iter().next())
    }

    /// Every copy of `id` in readable packs, in the order a reader tries them: healthy before
    /// damaged, `tier` before the others, sealed before migrating, then by pack id.
    pub fn copies_preferring(&self, id: &ChunkId, tier: Option<&str>) -> Result<Vec<ChunkCopy>> {
        let txn = self.db.begin_read()?;
        let copies = txn.open_table(COPIES)?;
        let packs = txn.open_table(PACKS)?;
        let damaged = txn.open_table(DAMAGED)?;
        let mut out = Vec::new();
        for location in copies_of(&copies, id)? {
            let Some(pack) = pack_of(&packs, location.pack_id)? else {
                continue;
            };
            if !pack.state.readable() {
                continue;
            }
            out.push(ChunkCopy {
                damaged: damaged.get((id.0, location.pack_id))?.is_some(),
                tier: pack.tier,
                location,
                state: pack.state,
            });
        }
        out.sort_by_key(|c| {
            (
                c.damaged,
                tier.is_some_and(|t| t != c.tier),
                c.state != PackState::Sealed,
                c.location.pack_id,
            )
        });
        Ok(out)
    }

    /// The copy of `id` in pack `pack_id`, if that pack holds one the index points at.
    pub fn copy_in(&self, id: &ChunkId, pack_id: u64) -> Result<Option<ChunkCopy>> {
        Ok(self
            .copies_preferring(id, None)?
            .into_iter()
            .find(|c| c.location.pack_id == pack_id))
    }

    /// A read view for many lookups (one per chunk on the backup path) that asks about copies
    /// in any tier.
    pub fn reader(&self) -> Result<IndexReader> {
        self.reader_for(None)
    }

    /// A read view whose [`IndexReader::contains`] asks about copies in `tier` only: what
    /// dedup for a writer into `tier` asks.
    pub fn reader_in(&self, tier: &str) -> Result<IndexReader> {
        self.reader_for(Some(tier.to_string()))
    }

    fn reader_for(&self, tier: Option<String>) -> Result<IndexReader> {
        let txn = self.db.begin_read()?;
        let copies = txn.open_table(COPIES)?;
        let packs = txn.open_table(PACKS)?;
        let damaged = txn.open_table(DAMAGED)?;
        // Almost always empty: then the backup path pays no lookup for it.
        let damaged = if damaged.is_empty()? {
            None
        } else {
            Some(damaged)
        };
        Ok(IndexReader {
            copies,
            packs,
            damaged,
            tier,
            pack_counts: Default::default(),
        })
    }

    /// Marks the copy of chunk `id` at `at` damaged, if the index still points at that record
    /// (a newer good copy may have taken its place since).
    pub fn mark_damaged(&self, id: &ChunkId, at: &Location, reason: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let copies = txn.open_table(COPIES)?;
            let current = match copies.get((id.0, at.pack_id))? {
                Some(row) => Some(location(at.pack_id, row.value())?),
                None => None,
            };
            if current.as_ref() == Some(at) {
                txn.open_table(DAMAGED)?
                    .insert((id.0, at.pack_id), reason)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Copies marked damaged: the chunk, and why.
    pub fn damaged(&self) -> Result<Vec<(ChunkId, String)>> {
        Ok(self
            .damaged_copies()?
            .into_iter()
            .map(|(id, _, reason)| (id, reason))
            .collect())
    }

    /// Copies marked damaged: the chunk, the pack holding the bad record, and why.
    pub fn damaged_copies(&self) -> Result<Vec<(ChunkId, u64, String)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DAMAGED)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (key, reason) = row?;
            let (id, pack) = key.value();
            out.push((ChunkId(id), pack, reason.value().to_string()));
        }
        Ok(out)
    }

    /// The tier of pack `pack_id`, if copies may point into it (sealed or migrating).
    pub fn pack_tier(&self, pack_id: u64) -> Result<Option<String>> {
        Ok(self
            .pack(pack_id)?
            .filter(|p| p.state.readable())
            .map(|p| p.tier))
    }

    /// Pack `pack_id`'s row, in whatever state.
    pub fn pack(&self, pack_id: u64) -> Result<Option<PackInfo>> {
        let txn = self.db.begin_read()?;
        let packs = txn.open_table(PACKS)?;
        pack_of(&packs, pack_id)
    }

    /// Every pack of `tier`, in whatever state.
    pub fn packs_of(&self, tier: &str) -> Result<Vec<PackInfo>> {
        let txn = self.db.begin_read()?;
        let packs = txn.open_table(PACKS)?;
        let mut out = Vec::new();
        for row in packs.iter()? {
            let (id, value) = row?;
            let pack = pack_info(id.value(), value.value())?;
            if pack.tier == tier {
                out.push(pack);
            }
        }
        Ok(out)
    }

    /// Every pack known sealed at some point (any state but open), in every tier: what
    /// `store::reclaim` must not take for an abandoned one.
    pub fn pack_ids(&self) -> Result<std::collections::HashSet<u64>> {
        let txn = self.db.begin_read()?;
        let packs = txn.open_table(PACKS)?;
        let mut ids = std::collections::HashSet::new();
        for row in packs.iter()? {
            let (id, value) = row?;
            if pack_info(id.value(), value.value())?.state != PackState::Open {
                ids.insert(id.value());
            }
        }
        Ok(ids)
    }

    /// Registers pack `pack_id` of `tier` as open, before its first byte (writers on backends
    /// without locks). `false`: the pack already has a row, which is left alone.
    pub fn register_open(&self, pack_id: u64, tier: &str) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let registered = {
            let mut packs = txn.open_table(PACKS)?;
            let exists = packs.get(pack_id)?.is_some();
            if !exists {
                packs.insert(pack_id, (tier, PackState::Open as u8, 0, now_ns()))?;
            }
            !exists
        };
        txn.commit()?;
        Ok(registered)
    }

    /// Drops the rows of packs still open (their writer is gone and the file removed).
    pub fn forget_open(&self, ids: &[u64]) -> Result<()> {
        self.forget_in_state(ids, PackState::Open)
    }

    /// Makes a sealed pack's records findable. Called only after the pack is durable. A
    /// record of a chunk that already has a healthy copy in the pack's tier is a dead
    /// duplicate (two writers stored it at once) and gets no row; a damaged copy in the tier
    /// is repointed to the new record (healing).
    pub fn commit_pack(&self, pack: &SealedPack) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut w = Writing::open(&txn)?;
            w.seal(pack)?;
            for e in &pack.entries {
                w.add_copy(pack.pack_id, &pack.tier, e)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Applies `change` in one transaction (see [`Repoint`]): `new_pack` registered sealed;
    /// each move whose source row still points at the record it was copied from repointed (a
    /// row changed meanwhile, by healing or another move, is left alone; a destination tier
    /// that already holds a healthy copy gets no second one); then each retired pack that no
    /// copy points into is condemned. A move into a pack that is not sealed or migrating is
    /// refused, and nothing is applied.
    pub fn repoint(&self, change: &Repoint) -> Result<Repointed> {
        let txn = self.db.begin_write()?;
        let mut done = Repointed::default();
        {
            let mut w = Writing::open(&txn)?;
            if let Some(pack) = change.new_pack {
                w.seal(pack)?;
            }
            for m in change.moves {
                if w.repoint_copy(m.to.id, m.from_pack, m.from_offset, m.to_pack, &m.to)? {
                    done.moved += 1;
                }
            }
            for old in change.retire {
                if w.condemn(old)? {
                    done.condemned.push(old.pack_id);
                }
            }
        }
        txn.commit()?;
        Ok(done)
    }

    /// Marks a sealed pack migrating (`true`) or a migrating pack sealed again (`false`).
    /// Returns whether the pack was in the state the change starts from.
    pub fn set_migrating(&self, pack_id: u64, migrating: bool) -> Result<bool> {
        let (from, to) = if migrating {
            (PackState::Sealed, PackState::Migrating)
        } else {
            (PackState::Migrating, PackState::Sealed)
        };
        let txn = self.db.begin_write()?;
        let changed = {
            let mut packs = txn.open_table(PACKS)?;
            match pack_of(&packs, pack_id)? {
                Some(p) if p.state == from => {
                    let bytes = p.bytes.unwrap_or(0);
                    packs.insert(pack_id, (p.tier.as_str(), to as u8, bytes, now_ns()))?;
                    true
                }
                _ => false,
            }
        };
        txn.commit()?;
        Ok(changed)
    }

    /// The sealed packs of `tier` (not migrating) with their length where it is recorded.
    pub fn tier_packs(&self, tier: &str) -> Result<Vec<(u64, Option<u64>)>> {
        Ok(self
            .packs_of(tier)?
            .into_iter()
            .filter(|p| p.state == PackState::Sealed)
            .map(|p| (p.pack_id, p.bytes))
            .collect())
    }

    /// Records the sealed length of packs committed without one.
    pub fn note_pack_bytes(&self, sizes: &[(u64, u64)]) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut packs = txn.open_table(PACKS)?;
            for &(id, bytes) in sizes {
                let Some(p) = pack_of(&packs, id)? else {
                    continue;
                };
                packs.insert(id, (p.tier.as_str(), p.state as u8, bytes, p.since_unix_ns))?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Packs of `tier` condemned (no copy points into them) whose files may still exist.
    pub fn condemned(&self, tier: &str) -> Result<Vec<u64>> {
        Ok(self
            .packs_of(tier)?
            .into_iter()
            .filter(|p| p.state == PackState::Condemned)
            .map(|p| p.pack_id)
            .collect())
    }

    /// Forgets condemned packs whose files are deleted (a pack sealed again is kept).
    pub fn forget_condemned(&self, ids: &[u64]) -> Result<()> {
        self.forget_in_state(ids, PackState::Condemned)
    }

    fn forget_in_state(&self, ids: &[u64], state: PackState) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut packs = txn.open_table(PACKS)?;
            for &id in ids {
                if pack_of(&packs, id)?.is_some_and(|p| p.state == state) {
                    packs.remove(id)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Adds or replaces a catalog row; a zero `held_since_unix_ns` is stamped with now.
    pub fn put_snapshot(&self, info: &SnapshotInfo) -> Result<()> {
        let mut info = info.clone();
        if info.held_since_unix_ns == 0 {
            info.held_since_unix_ns = now_ns();
        }
        let json = serde_json::to_string(&info).expect("snapshot info serialises");
        let txn = self.db.begin_write()?;
        txn.open_table(CATALOG)?
            .insert(info.id.as_str(), json.as_str())?;
        txn.commit()?;
        Ok(())
    }

    /// Records that snapshot `id` is now held in `tier` since `since_unix_ns` (a migration
    /// moved its data). `false`: no such row.
    pub fn move_snapshot(&self, id: &str, tier: &str, since_unix_ns: i64) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let moved = {
            let mut catalog = txn.open_table(CATALOG)?;
            let row = catalog.get(id)?.map(|v| v.value().to_string());
            match row {
                Some(json) => {
                    let mut info = catalog_row(id, &json)?;
                    info.tier = tier.to_string();
                    info.held_since_unix_ns = since_unix_ns;
                    let json = serde_json::to_string(&info).expect("snapshot info serialises");
                    catalog.insert(id, json.as_str())?;
                    true
                }
                None => false,
            }
        };
        txn.commit()?;
        Ok(moved)
    }

    /// All snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CATALOG)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (key, value) = row?;
            out.push(catalog_row(key.value(), value.value())?);
        }
        out.sort_by(|a, b| {
            a.created_unix_ns
                .cmp(&b.created_unix_ns)
                .then(a.id.cmp(&b.id))
        });
        Ok(out)
    }

    /// Finds a snapshot by id or unique id prefix (at least 4 hex digits), or `latest`.
    pub fn find_snapshot(&self, wanted: &str) -> Result<SnapshotInfo> {
        let all = self.snapshots()?;
        if wanted == "latest" {
            return all.into_iter().last().ok_or_else(|| {
                Error::NotFound("no snapshots yet: run `mover backup PATH` first".into())
            });
        }
        if wanted.len() < 4 || !wanted.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::NotFound(format!(
                "snapshot {wanted:?}: expected 'latest' or at least 4 hex digits of a snapshot id"
            )));
        }
        let wanted = wanted.to_ascii_lowercase();
        let mut matches: Vec<SnapshotInfo> = all
            .into_iter()
            .filter(|s| s.id.starts_with(&wanted))
            .collect();
        match matches.len() {
            0 => Err(Error::NotFound(format!(
                "snapshot {wanted}: no such snapshot (see `mover snapshots`)"
            ))),
            1 => Ok(matches.remove(0)),
            n => Err(Error::NotFound(format!(
                "snapshot {wanted}: prefix matches {n} snapshots, give more digits"
            ))),
        }
    }

    pub fn put_job(&self, id: &str, json: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(JOBS)?.insert(id, json)?;
        txn.commit()?;
        Ok(())
    }

    /// Adds a job to the persistent queue in one transaction: a job already submitted under
    /// `key` is returned instead (`false`), otherwise `make(seq)` builds the new record from
    /// the next sequence number and it is stored with the key (`true`). Durable on return.
    /// An `Err` from `make` abandons the transaction: nothing is stored.
    pub fn submit_job(
        &self,
        key: Option<&str>,
        make: impl FnOnce(u64) -> Result<(String, String)>,
    ) -> Result<(String, bool)> {
        let txn = self.db.begin_write()?;
        let outcome = {
            let mut queue = txn.open_table(QUEUE)?;
            let mut keys = txn.open_table(IDEMPOTENCY)?;
            let existing = match key {
                Some(key) => keys.get(key)?.map(|id| id.value().to_string()),
                None => None,
            };
            match existing.and_then(|id| {
                queue
                    .get(id.as_str())
                    .ok()
                    .flatten()
                    .map(|r| r.value().to_string())
            }) {
                Some(record) => (record, false),
                None => {
                    let mut meta = txn.open_table(META)?;
                    let seq = meta.get("job_seq")?.map_or(0, |v| v.value()) + 1;
                    meta.insert("job_seq", seq)?;
                    let (id, record) = make(seq)?;
                    queue.insert(id.as_str(), record.as_str())?;
                    if let Some(key) = key {
                        keys.insert(key, id.as_str())?;
                    }
                    (record, true)
                }
            }
        };
        txn.commit()?;
        Ok(outcome)
    }

    /// Rewrites a job's record (a state change); durable on return.
    pub fn put_queue_record(&self, id: &str, record: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(QUEUE)?.insert(id, record)?;
        txn.commit()?;
        Ok(())
    }

    /// Every job record of the queue and journal (JSON), in no particular order.
    pub fn queue_records(&self) -> Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(QUEUE)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (_, value) = row?;
            out.push(value.value().to_string());
        }
        Ok(out)
    }

    /// One job record of the queue and journal (JSON), if the table holds it.
    pub fn queue_record(&self, id: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(QUEUE)?;
        let record = table.get(id)?.map(|v| v.value().to_string());
        Ok(record)
    }

    /// Deletes job records, each with its idempotency key if the key still names that job,
    /// in one transaction (the retention of ended jobs); durable on return.
    pub fn remove_queue_records(&self, jobs: &[(String, Option<String>)]) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut queue = txn.open_table(QUEUE)?;
            let mut keys = txn.open_table(IDEMPOTENCY)?;
            for (id, key) in jobs {
                queue.remove(id.as_str())?;
                let Some(key) = key else { continue };
                let ours = keys.get(key.as_str())?.is_some_and(|v| v.value() == id);
                if ours {
                    keys.remove(key.as_str())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Distinct chunks with at least one copy.
    pub fn chunk_count(&self) -> Result<u64> {
        let txn = self.db.begin_read()?;
        let copies = txn.open_table(COPIES)?;
        let mut count = 0;
        let mut last = None;
        for row in copies.iter()? {
            let (id, _) = row?.0.value();
            if last != Some(id) {
                count += 1;
                last = Some(id);
            }
        }
        Ok(count)
    }

    /// Copies of all chunks (one per chunk and tier holding it, at most one healthy).
    pub fn copy_count(&self) -> Result<u64> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(COPIES)?.len()?)
    }
}

/// The tables a write transaction changes copies and packs through, with the rules every
/// change of copies keeps (one healthy copy per chunk and tier; copies only into readable
/// packs; a pack condemned only when no copy points into it).
struct Writing<'t> {
    copies: redb::Table<'t, CopyKey, CopyRow>,
    packs: redb::Table<'t, u64, PackRow>,
    damaged: redb::Table<'t, CopyKey, &'static str>,
}

impl<'t> Writing<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Writing<'t>> {
        Ok(Writing {
            copies: txn.open_table(COPIES)?,
            packs: txn.open_table(PACKS)?,
            damaged: txn.open_table(DAMAGED)?,
        })
    }

    /// Registers `pack` sealed: a new, open or condemned one from now; a sealed or migrating
    /// one keeps its state and gains its length if it had none.
    fn seal(&mut self, pack: &SealedPack) -> Result<()> {
        let row = match pack_of(&self.packs, pack.pack_id)? {
            Some(p) if p.state.readable() => {
                let bytes = p.bytes.unwrap_or(pack.bytes);
                (p.state, bytes, p.since_unix_ns)
            }
            _ => (PackState::Sealed, pack.bytes, now_ns()),
        };
        self.packs.insert(
            pack.pack_id,
            (pack.tier.as_str(), row.0 as u8, row.1, row.2),
        )?;
        Ok(())
    }

    /// The copies of `id` in readable packs of `tier`, with whether each is damaged.
    fn copies_in_tier(&self, id: [u8; 32], tier: &str) -> Result<Vec<(Location, bool)>> {
        let mut out = Vec::new();
        for at in copies_of(&self.copies, &ChunkId(id))? {
            if pack_of(&self.packs, at.pack_id)?
                .is_some_and(|p| p.state.readable() && p.tier == tier)
            {
                let damaged = self.damaged.get((id, at.pack_id))?.is_some();
                out.push((at, damaged));
            }
        }
        Ok(out)
    }

    /// The tier of a pack copies may point into.
    fn readable_tier(&self, pack_id: u64) -> Result<String> {
        match pack_of(&self.packs, pack_id)? {
            Some(p) if p.state.readable() => Ok(p.tier),
            other => Err(Error::corrupt(
                "index",
                format!(
                    "a copy cannot point into pack {pack_id:016x}: it is {}",
                    other.map_or("not registered".to_string(), |p| format!("{:?}", p.state)
                        .to_lowercase())
                ),
            )),
        }
    }

    /// A new copy of `e.id` in `pack_id`: none when the tier already holds a healthy one;
    /// otherwise it takes the place of the tier's damaged copy, if any.
    fn add_copy(&mut self, pack_id: u64, tier: &str, e: &FooterEntry) -> Result<bool> {
        let here = self.copies_in_tier(e.id.0, tier)?;
        if here
            .iter()
            .any(|(at, damaged)| !damaged || at.pack_id == pack_id)
        {
            return Ok(false);
        }
        for (at, _) in &here {
            self.drop_copy(e.id.0, at.pack_id)?;
        }
        self.insert_copy(pack_id, e)?;
        Ok(true)
    }

    /// Moves `id`'s copy at (`from_pack`, `from_offset`) to `to` in `to_pack`. `false`, and
    /// nothing changed, when no copy is there any more.
    fn repoint_copy(
        &mut self,
        id: ChunkId,
        from_pack: u64,
        from_offset: u64,
        to_pack: u64,
        to: &FooterEntry,
    ) -> Result<bool> {
        let tier = self.readable_tier(to_pack)?;
        let from = self.copies.get((id.0, from_pack))?.map(|r| r.value());
        if from.is_none_or(|(offset, ..)| offset != from_offset) {
            return Ok(false);
        }
        self.drop_copy(id.0, from_pack)?;
        // The destination tier's other copies: a healthy one makes this record a dead
        // duplicate; a damaged one is replaced.
        let here = self.copies_in_tier(id.0, &tier)?;
        if here
            .iter()
            .any(|(at, damaged)| !damaged && at.pack_id != to_pack)
        {
            return Ok(true);
        }
        for (at, _) in &here {
            self.drop_copy(id.0, at.pack_id)?;
        }
        self.insert_copy(to_pack, to)?;
        Ok(true)
    }

    /// Condemns `old` if no copy points into it and it is sealed or migrating.
    fn condemn(&mut self, old: &OldPack) -> Result<bool> {
        for e in &old.entries {
            if self.copies.get((e.id.0, old.pack_id))?.is_some() {
                tracing::warn!(pack = %format_args!("{:016x}", old.pack_id), "a copy still points into a retired pack; the pack is kept");
                return Ok(false);
            }
        }
        let Some(p) = pack_of(&self.packs, old.pack_id)? else {
            return Ok(false);
        };
        if !p.state.readable() {
            return Ok(false);
        }
        self.packs.insert(
            old.pack_id,
            (
                p.tier.as_str(),
                PackState::Condemned as u8,
                p.bytes.unwrap_or(0),
                now_ns(),
            ),
        )?;
        Ok(true)
    }

    fn insert_copy(&mut self, pack_id: u64, e: &FooterEntry) -> Result<()> {
        self.copies.insert(
            (e.id.0, pack_id),
            (e.offset, e.stored_len, e.raw_len, e.codec as u8),
        )?;
        Ok(())
    }

    fn drop_copy(&mut self, id: [u8; 32], pack_id: u64) -> Result<()> {
        self.copies.remove((id, pack_id))?;
        self.damaged.remove((id, pack_id))?;
        Ok(())
    }
}

pub struct IndexReader {
    copies: redb::ReadOnlyTable<CopyKey, CopyRow>,
    packs: redb::ReadOnlyTable<u64, PackRow>,
    damaged: Option<redb::ReadOnlyTable<CopyKey, &'static str>>,
    /// `Some`: `contains` asks about this tier only.
    tier: Option<String>,
    pack_counts: std::cell::RefCell<std::collections::HashMap<u64, bool>>,
}

/// A catalog row for a manifest that no local backup job describes (a peer's, or one found
/// again by `repair-index`), and the chunk references it names that the index cannot serve.
pub struct CatalogCheck {
    pub info: SnapshotInfo,
    pub missing: u64,
    pub first_missing: Option<ChunkId>,
}

impl IndexReader {
    /// Counts `manifest`'s files, directories and bytes for its catalog row and checks that
    /// every chunk it names is stored here (a snapshot becomes visible only then).
    pub fn catalog_check(
        &self,
        id: &[u8; 32],
        manifest: &mover_format::manifest::Manifest,
        tier: String,
        job: &str,
    ) -> Result<CatalogCheck> {
        use mover_format::manifest::EntryKind;
        let (mut files, mut directories, mut bytes) = (0, 0, 0);
        let (mut missing, mut first_missing) = (0, None);
        for entry in &manifest.entries {
            match &entry.kind {
                EntryKind::File { size, extents } => {
                    files += 1;
                    bytes += size;
                    for chunk in extents.iter().flat_map(|e| &e.chunks) {
                        if !self.contains(&chunk.id)? {
                            missing += 1;
                            first_missing.get_or_insert(chunk.id);
                        }
                    }
                }
                EntryKind::Directory => directories += 1,
                _ => {}
            }
        }
        let hex = mover_format::hex;
        let info = SnapshotInfo {
            id: hex(id),
            time: mover_format::time::rfc3339(manifest.created_unix_ns.div_euclid(1_000_000_000)),
            created_unix_ns: manifest.created_unix_ns,
            site: manifest.site.clone(),
            tier,
            source: String::from_utf8_lossy(&manifest.source).into_owned(),
            hostname: manifest.hostname.clone(),
            parent: manifest.parent.as_ref().map(|p| hex(p)),
            job: job.to_string(),
            files,
            directories,
            bytes,
            warnings: 0,
            held_since_unix_ns: 0,
        };
        Ok(CatalogCheck {
            info,
            missing,
            first_missing,
        })
    }

    /// Whether a healthy copy of chunk `id` is stored (in the reader's tier, if it has one):
    /// what dedup asks. A copy marked damaged is not, so that whoever has the chunk's bytes
    /// stores them again.
    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        for row in self.copies.range((id.0, 0)..=(id.0, u64::MAX))? {
            let pack_id = row?.0.value().1;
            if !self.counts(pack_id)? {
                continue;
            }
            if let Some(damaged) = &self.damaged {
                if damaged.get((id.0, pack_id))?.is_some() {
                    continue;
                }
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Whether copies in pack `pack_id` count for `contains` (readable, in the reader's
    /// tier); remembered per pack, since a reader sees one snapshot of the index.
    fn counts(&self, pack_id: u64) -> Result<bool> {
        if let Some(&counts) = self.pack_counts.borrow().get(&pack_id) {
            return Ok(counts);
        }
        let counts = pack_of(&self.packs, pack_id)?
            .is_some_and(|p| p.state.readable() && self.tier.as_ref().is_none_or(|t| *t == p.tier));
        self.pack_counts.borrow_mut().insert(pack_id, counts);
        Ok(counts)
    }
}

/// The copies of `id`, by pack id.
fn copies_of(copies: &impl ReadableTable<CopyKey, CopyRow>, id: &ChunkId) -> Result<Vec<Location>> {
    let mut out = Vec::new();
    for row in copies.range((id.0, 0)..=(id.0, u64::MAX))? {
        let (key, value) = row?;
        out.push(location(key.value().1, value.value())?);
    }
    Ok(out)
}

fn pack_of(packs: &impl ReadableTable<u64, PackRow>, pack_id: u64) -> Result<Option<PackInfo>> {
    match packs.get(pack_id)? {
        Some(row) => Ok(Some(pack_info(pack_id, row.value())?)),
        None => Ok(None),
    }
}

fn pack_info(pack_id: u64, (tier, state, bytes, since): (&str, u8, u64, i64)) -> Result<PackInfo> {
    let state = PackState::from_u8(state).ok_or_else(|| {
        Error::corrupt(
            format!("index row of pack {pack_id:016x}"),
            format!("unknown pack state {state}"),
        )
    })?;
    Ok(PackInfo {
        pack_id,
        tier: tier.to_string(),
        state,
        bytes: (bytes > 0).then_some(bytes),
        since_unix_ns: since,
    })
}

fn catalog_row(id: &str, json: &str) -> Result<SnapshotInfo> {
    serde_json::from_str(json)
        .map_err(|e| Error::corrupt(format!("catalog row {id}"), e.to_string()))
}

fn location(pack_id: u64, (offset, stored_len, raw_len, codec): CopyRow) -> Result<Location> {
    let codec = Codec::from_u8(codec)
        .ok_or_else(|| Error::corrupt("index row", format!("unknown codec {codec}")))?;
    Ok(Location {
        pack_id,
        offset,
        stored_len,
        raw_len,
        codec,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use redb::TableDefinition;
    use schema::v1;

    fn entry(seed: u8, offset: u64) -> FooterEntry {
        FooterEntry {
            id: ChunkId([seed; 32]),
            offset,
            stored_len: 100 + seed as u32,
            raw_len: 200 + seed as u32,
            codec: Codec::Lz4,
        }
    }

    fn pack(pack_id: u64, tier: &str, seeds: &[u8]) -> SealedPack {
        SealedPack {
            pack_id,
            tier: tier.into(),
            entries: seeds
                .iter()
                .enumerate()
                .map(|(i, &s)| entry(s, 16 + 1000 * i as u64))
                .collect(),
            bytes: 4096 + pack_id,
        }
    }

    fn open() -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        (dir, index)
    }

    fn id(seed: u8) -> ChunkId {
        ChunkId([seed; 32])
    }

    fn info(id: &str, created: i64) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            time: "t".into(),
            created_unix_ns: created,
            site: "a".into(),
            tier: "hot".into(),
            source: "/src".into(),
            hostname: "h".into(),
            parent: None,
            job: "j".into(),
            files: 1,
            directories: 2,
            bytes: 3,
            warnings: 0,
            held_since_unix_ns: 0,
        }
    }

    /// Writes an index at `path` the way mover wrote it before schema versions (version 1):
    /// `packs` committed in `chunks` and `packs`, with `pack_bytes` rows unless `oldest` (an
    /// index from before `pack_bytes` and `condemned`, like tests/fixtures/site-v1).
    pub(crate) fn write_v1(path: &std::path::Path, packs: &[SealedPack], oldest: bool) {
        let db = redb::Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut chunks = txn.open_table(v1::CHUNKS).unwrap();
            let mut registered = txn.open_table(v1::PACKS).unwrap();
            for p in packs {
                registered.insert(p.pack_id, p.tier.as_str()).unwrap();
                for e in &p.entries {
                    if chunks.get(e.id.0).unwrap().is_none() {
                        let row = (p.pack_id, e.offset, e.stored_len, e.raw_len, e.codec as u8);
                        chunks.insert(e.id.0, row).unwrap();
                    }
                }
            }
            txn.open_table(v1::SNAPSHOTS).unwrap();
            txn.open_table(v1::DAMAGED).unwrap();
            txn.open_table(JOBS).unwrap();
            txn.open_table(QUEUE).unwrap();
            txn.open_table(IDEMPOTENCY).unwrap();
            txn.open_table(META).unwrap();
            if !oldest {
                let mut sizes = txn.open_table(v1::PACK_BYTES).unwrap();
                for p in packs {
                    sizes.insert(p.pack_id, p.bytes).unwrap();
                }
                txn.open_table(v1::CONDEMNED).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    fn table_names(path: &std::path::Path) -> Vec<String> {
        table_names_of(&redb::Database::create(path).unwrap())
    }

    fn table_names_of(db: &redb::Database) -> Vec<String> {
        use redb::TableHandle;
        let txn = db.begin_read().unwrap();
        let mut names: Vec<String> = txn
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_string())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_version_1_index_with_every_table_populated_upgrades_losing_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        // Pack 1 (hot): chunks 1, 2; pack 2 (hot): chunk 3 and a dead duplicate of 1;
        // pack 3: condemned by a repack; pack 4: condemned, then registered again.
        let packs = [pack(1, "hot", &[1, 2]), pack(2, "cold", &[3, 1])];
        write_v1(&path, &packs, false);
        let snapshot = serde_json::to_string(&info("ab01", 5)).unwrap();
        let old_row = snapshot.replace(",\"held_since_unix_ns\":0", "");
        assert!(!old_row.contains("held_since"), "{old_row}");
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut sizes = txn.open_table(v1::PACK_BYTES).unwrap();
                sizes.remove(2).unwrap();
                let mut registered = txn.open_table(v1::PACKS).unwrap();
                registered.insert(4, "hot").unwrap();
                let mut condemned = txn.open_table(v1::CONDEMNED).unwrap();
                condemned.insert(3, "hot").unwrap();
                condemned.insert(4, "hot").unwrap();
                let mut damaged = txn.open_table(v1::DAMAGED).unwrap();
                damaged.insert(id(2).0, "xxh3 mismatch").unwrap();
                let mut snapshots = txn.open_table(v1::SNAPSHOTS).unwrap();
                snapshots.insert("ab01", old_row.as_str()).unwrap();
                snapshots.insert("cd02", "not json").unwrap();
                txn.open_table(JOBS).unwrap().insert("job-1", "{}").unwrap();
                txn.open_table(QUEUE)
                    .unwrap()
                    .insert("job-1", "{\"state\":\"done\"}")
                    .unwrap();
                txn.open_table(IDEMPOTENCY)
                    .unwrap()
                    .insert("key", "job-1")
                    .unwrap();
                txn.open_table(META).unwrap().insert("job_seq", 7).unwrap();
            }
            txn.commit().unwrap();
        }

        let index = Index::open(&path).unwrap();
        let at = |seed: u8| index.lookup(&id(seed)).unwrap().unwrap();
        assert_eq!(at(1).pack_id, 1);
        assert_eq!(at(2).pack_id, 1);
        assert_eq!(at(3).pack_id, 2);
        assert_eq!(at(3).offset, 16);
        assert_eq!(at(3).stored_len, 103);
        assert_eq!(at(3).raw_len, 203);
        assert_eq!(at(3).codec, Codec::Lz4);
        assert_eq!(index.copy_count().unwrap(), 3);

        let state = |p: u64| index.pack(p).unwrap().map(|p| (p.tier, p.state, p.bytes));
        assert_eq!(
            state(1),
            Some(("hot".into(), PackState::Sealed, Some(4097)))
        );
        assert_eq!(state(2), Some(("cold".into(), PackState::Sealed, None)));
        assert_eq!(state(3), Some(("hot".into(), PackState::Condemned, None)));
        assert_eq!(state(4), Some(("hot".into(), PackState::Sealed, None)));
        assert_eq!(index.condemned("hot").unwrap(), vec![3]);

        let damaged = index.damaged_copies().unwrap();
        assert_eq!(damaged, vec![(id(2), 1, "xxh3 mismatch".to_string())]);
        assert!(!index.reader().unwrap().contains(&id(2)).unwrap());

        // The catalog row gained `held_since_unix_ns`; a row that is not JSON is kept as it was.
        let txn = index.db.begin_read().unwrap();
        let catalog = txn.open_table(CATALOG).unwrap();
        assert_eq!(catalog.get("cd02").unwrap().unwrap().value(), "not json");
        let row: SnapshotInfo =
            serde_json::from_str(catalog.get("ab01").unwrap().unwrap().value()).unwrap();
        assert_eq!(
            row,
            SnapshotInfo {
                held_since_unix_ns: 5,
                ..info("ab01", 5)
            }
        );
        drop((catalog, txn));

        assert_eq!(index.queue_records().unwrap(), vec!["{\"state\":\"done\"}"]);
        let (record, new) = index.submit_job(Some("key"), |_| unreachable!()).unwrap();
        assert_eq!((record.as_str(), new), ("{\"state\":\"done\"}", false));
        let (_, new) = index
            .submit_job(None, |seq| Ok((format!("job-{seq}"), seq.to_string())))
            .unwrap();
        assert!(new);
        assert_eq!(index.queue_record("job-8").unwrap().as_deref(), Some("8"));
        let since = index.pack(1).unwrap().unwrap().since_unix_ns;
        drop(index);

        let names = table_names(&path);
        for gone in ["chunks", "pack_bytes", "condemned", "snapshots"] {
            assert!(!names.contains(&gone.to_string()), "{names:?}");
        }
        // Opening again finds nothing to do, and an upgrade run again changes nothing.
        let index = Index::open(&path).unwrap();
        assert_eq!(at_version(&index), Some(SCHEMA_VERSION));
        schema::upgrade(&index.db, 1).unwrap();
        assert_eq!(index.pack(1).unwrap().unwrap().since_unix_ns, since);
        assert_eq!(index.copy_count().unwrap(), 3);
        assert_eq!(table_names_of(&index.db), names);
    }

    fn at_version(index: &Index) -> Option<u64> {
        schema::stored_version(&index.db).unwrap()
    }

    #[test]
    fn an_index_from_before_pack_lengths_upgrades() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        write_v1(&path, &[pack(9, "hot", &[4])], true);
        let index = Index::open(&path).unwrap();
        assert_eq!(at_version(&index), Some(SCHEMA_VERSION));
        assert_eq!(index.lookup(&id(4)).unwrap().unwrap().pack_id, 9);
        assert_eq!(index.tier_packs("hot").unwrap(), vec![(9, None)]);
        assert!(index.snapshots().unwrap().is_empty());
    }

    #[test]
    fn an_up_to_date_index_needs_no_write_transaction() {
        // redb itself writes on close (its allocator state); what must not happen on open is
        // a write transaction, which needs free space (tests/faults.rs: a full disk).
        let (dir, index) = open();
        index.commit_pack(&pack(1, "hot", &[1])).unwrap();
        assert_eq!(at_version(&index), Some(SCHEMA_VERSION));
        drop(index);
        let path = dir.path().join("index.redb");
        let v1 = dir.path().join("v1.redb");
        write_v1(&v1, &[pack(1, "hot", &[1])], false);
        for (path, upgrade) in [(&path, false), (&v1, true)] {
            let db = redb::Database::create(path).unwrap();
            let version = schema::stored_version(&db).unwrap();
            assert_eq!(
                version != Some(SCHEMA_VERSION),
                upgrade,
                "{}",
                path.display()
            );
        }
    }

    #[test]
    fn an_index_newer_than_this_build_is_refused_in_one_line() {
        let (dir, index) = open();
        {
            let txn = index.db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(SCHEMA_KEY, SCHEMA_VERSION + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        drop(index);
        let err = Index::open(&dir.path().join("index.redb"))
            .err()
            .expect("a newer schema opened");
        let line = err.to_string();
        assert!(matches!(err, Error::Refused(_)), "{line}");
        assert!(
            line.contains(&format!("schema version {}", SCHEMA_VERSION + 1)),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn a_failed_upgrade_leaves_the_index_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        write_v1(&path, &[pack(1, "hot", &[1])], false);
        // A pack row whose type version 1 never wrote makes the upgrade fail half-way.
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(v1::PACK_BYTES).unwrap();
            let bad: TableDefinition<u64, &str> = TableDefinition::new("pack_bytes");
            txn.open_table(bad).unwrap().insert(1, "x").unwrap();
            txn.commit().unwrap();
        }
        let names = table_names(&path);
        let err = Index::open(&path).err().expect("the upgrade succeeded");
        assert!(matches!(err, Error::Index { .. }), "{err}");
        let line = err.to_string();
        assert!(line.contains(&path.display().to_string()), "{line}");
        assert_eq!(line.matches("index database").count(), 1, "{line}");
        assert_eq!(table_names(&path), names);
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let chunks = txn.open_table(v1::CHUNKS).unwrap();
        assert_eq!(chunks.get(id(1).0).unwrap().unwrap().value().0, 1);
        assert_eq!(schema::stored_version(&db).unwrap(), None);
    }

    #[test]
    fn a_chunk_has_one_copy_per_tier_and_readers_prefer_the_tier_asked_for() {
        let (_dir, index) = open();
        index.commit_pack(&pack(1, "hot", &[1, 2])).unwrap();
        // A second writer stored chunk 1 in hot too: a dead duplicate, no row.
        index.commit_pack(&pack(2, "hot", &[1])).unwrap();
        index.commit_pack(&pack(3, "cold", &[1])).unwrap();
        let copies = index.copies_preferring(&id(1), None).unwrap();
        let packs: Vec<u64> = copies.iter().map(|c| c.location.pack_id).collect();
        assert_eq!(packs, vec![1, 3]);
        assert_eq!(index.chunk_count().unwrap(), 2);
        assert_eq!(index.copy_count().unwrap(), 3);
        assert_eq!(
            index
                .locate(&id(1), Some("cold"))
                .unwrap()
                .unwrap()
                .location
                .pack_id,
            3
        );
        assert_eq!(
            index
                .locate(&id(1), Some("hot"))
                .unwrap()
                .unwrap()
                .location
                .pack_id,
            1
        );
        assert_eq!(
            index.locate(&id(2), Some("cold")).unwrap().unwrap().tier,
            "hot"
        );

        // Dedup asks about one tier; catalog checks about any.
        assert!(index.reader_in("cold").unwrap().contains(&id(1)).unwrap());
        assert!(!index.reader_in("cold").unwrap().contains(&id(2)).unwrap());
        assert!(index.reader().unwrap().contains(&id(2)).unwrap());
        assert!(!index.reader().unwrap().contains(&id(9)).unwrap());
    }

    #[test]
    fn a_damaged_copy_fails_dedup_in_its_tier_only_and_the_next_commit_heals_it() {
        let (_dir, index) = open();
        index.commit_pack(&pack(1, "hot", &[1])).unwrap();
        index.commit_pack(&pack(2, "cold", &[1])).unwrap();
        let hot = index.locate(&id(1), Some("hot")).unwrap().unwrap().location;
        // A mark for a record the index no longer points at is ignored.
        index
            .mark_damaged(&id(1), &Location { offset: 99, ..hot }, "stale")
            .unwrap();
        assert!(index.damaged().unwrap().is_empty());
        index.mark_damaged(&id(1), &hot, "xxh3").unwrap();
        assert!(!index.reader_in("hot").unwrap().contains(&id(1)).unwrap());
        assert!(index.reader_in("cold").unwrap().contains(&id(1)).unwrap());
        assert!(index.reader().unwrap().contains(&id(1)).unwrap());
        // The damaged copy is read last.
        let order = index.copies_preferring(&id(1), Some("hot")).unwrap();
        assert_eq!((order[0].location.pack_id, order[1].damaged), (2, true));

        index.commit_pack(&pack(3, "hot", &[1])).unwrap();
        assert!(index.damaged().unwrap().is_empty());
        assert!(index.reader_in("hot").unwrap().contains(&id(1)).unwrap());
        let packs: Vec<u64> = index
            .copies_preferring(&id(1), None)
            .unwrap()
            .iter()
            .map(|c| c.location.pack_id)
            .collect();
        assert_eq!(packs, vec![2, 3]);
    }

    #[test]
    fn repoint_moves_copies_whose_source_is_unchanged_and_condemns_emptied_packs() {
        let (_dir, index) = open();
        let a = pack(1, "hot", &[1, 2]);
        let b = pack(2, "hot", &[3]);
        index.commit_pack(&a).unwrap();
        index.commit_pack(&b).unwrap();
        // Chunk 2 was healed into pack 5 after the mover read it from pack 1.
        index
            .mark_damaged(&id(2), &index.lookup(&id(2)).unwrap().unwrap(), "bad")
            .unwrap();
        index.commit_pack(&pack(5, "hot", &[2])).unwrap();

        let new = pack(7, "hot", &[1, 2, 3]);
        let moves: Vec<Move> = [(&a, 0, 0), (&a, 1, 1), (&b, 0, 2)]
            .iter()
            .map(|&(from, i, j)| Move {
                from_pack: from.pack_id,
                from_offset: from.entries[i].offset,
                to_pack: new.pack_id,
                to: new.entries[j],
            })
            .collect();
        let old = [
            OldPack {
                pack_id: 1,
                entries: a.entries.clone(),
            },
            OldPack {
                pack_id: 2,
                entries: b.entries.clone(),
            },
        ];
        let done = index
            .repoint(&Repoint {
                new_pack: Some(&new),
                moves: &moves,
                retire: &old,
            })
            .unwrap();
        assert_eq!(
            done,
            Repointed {
                moved: 2,
                condemned: vec![1, 2]
            }
        );
        assert_eq!(index.lookup(&id(1)).unwrap().unwrap().pack_id, 7);
        assert_eq!(
            index.lookup(&id(1)).unwrap().unwrap().offset,
            new.entries[0].offset
        );
        assert_eq!(index.lookup(&id(2)).unwrap().unwrap().pack_id, 5);
        assert_eq!(index.lookup(&id(3)).unwrap().unwrap().pack_id, 7);
        assert_eq!(index.pack(7).unwrap().unwrap().state, PackState::Sealed);
        assert_eq!(index.condemned("hot").unwrap().len(), 2);
        assert_eq!(index.pack_tier(1).unwrap(), None);
        // Condemned packs stay known to reclaim until forgotten.
        assert!(index.pack_ids().unwrap().contains(&1));
        index.forget_condemned(&[1, 2, 7]).unwrap();
        assert!(index.pack(1).unwrap().is_none());
        assert!(
            index.pack(7).unwrap().is_some(),
            "a sealed pack was forgotten"
        );
    }

    #[test]
    fn a_pack_a_copy_still_points_into_is_not_condemned() {
        let (_dir, index) = open();
        let a = pack(1, "hot", &[1, 2]);
        index.commit_pack(&a).unwrap();
        let new = pack(2, "hot", &[1]);
        let done = index
            .repoint(&Repoint {
                new_pack: Some(&new),
                moves: &[Move {
                    from_pack: 1,
                    from_offset: a.entries[0].offset,
                    to_pack: 2,
                    to: new.entries[0],
                }],
                retire: &[OldPack {
                    pack_id: 1,
                    entries: a.entries.clone(),
                }],
            })
            .unwrap();
        assert_eq!(
            done,
            Repointed {
                moved: 1,
                condemned: vec![]
            }
        );
        assert_eq!(index.pack(1).unwrap().unwrap().state, PackState::Sealed);
        assert_eq!(index.lookup(&id(2)).unwrap().unwrap().pack_id, 1);
    }

    #[test]
    fn a_move_into_a_pack_that_is_not_sealed_is_refused_and_nothing_changes() {
        let (_dir, index) = open();
        let a = pack(1, "hot", &[1, 2]);
        index.commit_pack(&a).unwrap();
        index.register_open(3, "cold").unwrap();
        let to = pack(3, "cold", &[1, 2]);
        let moves: Vec<Move> = (0..2)
            .map(|i| Move {
                from_pack: 1,
                from_offset: a.entries[i].offset,
                to_pack: 3,
                to: to.entries[i],
            })
            .collect();
        let retire = [OldPack {
            pack_id: 1,
            entries: a.entries.clone(),
        }];
        let change = Repoint {
            new_pack: None,
            moves: &moves,
            retire: &retire,
        };
        assert!(index.repoint(&change).is_err());
        assert_eq!(index.lookup(&id(1)).unwrap().unwrap().pack_id, 1);
        assert_eq!(index.pack(1).unwrap().unwrap().state, PackState::Sealed);

        // A migration: the source is marked, copied, repointed and condemned.
        assert!(index.set_migrating(1, true).unwrap());
        assert!(!index.set_migrating(1, true).unwrap());
        assert!(
            index.tier_packs("hot").unwrap().is_empty(),
            "a migrating pack is merged"
        );
        assert_eq!(index.pack_tier(1).unwrap().as_deref(), Some("hot"));
        let done = index
            .repoint(&Repoint {
                new_pack: Some(&to),
                ..change
            })
            .unwrap();
        assert_eq!(
            done,
            Repointed {
                moved: 2,
                condemned: vec![1]
            }
        );
        assert_eq!(
            index.locate(&id(2), Some("hot")).unwrap().unwrap().tier,
            "cold"
        );
        assert_eq!(index.pack(3).unwrap().unwrap().state, PackState::Sealed);
    }

    #[test]
    fn a_move_into_a_tier_holding_a_healthy_copy_adds_none() {
        let (_dir, index) = open();
        let a = pack(1, "hot", &[1]);
        index.commit_pack(&a).unwrap();
        index.commit_pack(&pack(2, "cold", &[1])).unwrap();
        let to = pack(3, "cold", &[1]);
        let done = index
            .repoint(&Repoint {
                new_pack: Some(&to),
                moves: &[Move {
                    from_pack: 1,
                    from_offset: a.entries[0].offset,
                    to_pack: 3,
                    to: to.entries[0],
                }],
                retire: &[OldPack {
                    pack_id: 1,
                    entries: a.entries.clone(),
                }],
            })
            .unwrap();
        assert_eq!(
            done,
            Repointed {
                moved: 1,
                condemned: vec![1]
            }
        );
        let copies = index.copies_preferring(&id(1), None).unwrap();
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].location.pack_id, 2);
    }

    #[test]
    fn pack_states_follow_their_transitions() {
        let (_dir, index) = open();
        assert!(index.register_open(1, "hot").unwrap());
        assert!(!index.register_open(1, "hot").unwrap());
        assert_eq!(index.pack(1).unwrap().unwrap().state, PackState::Open);
        assert!(!index.pack_ids().unwrap().contains(&1));
        assert_eq!(index.pack_tier(1).unwrap(), None);
        assert!(!index.set_migrating(1, true).unwrap());
        // Forgetting open rows leaves sealed ones.
        index.register_open(2, "hot").unwrap();
        index.commit_pack(&pack(1, "hot", &[1])).unwrap();
        index.forget_open(&[1, 2]).unwrap();
        let p = index.pack(1).unwrap().unwrap();
        assert_eq!((p.state, p.bytes), (PackState::Sealed, Some(4097)));
        assert!(index.pack(2).unwrap().is_none());
        assert_eq!(index.tier_packs("hot").unwrap(), vec![(1, Some(4097))]);
        assert!(index.set_migrating(1, true).unwrap());
        assert!(index.set_migrating(1, false).unwrap());
        assert_eq!(index.pack(1).unwrap().unwrap().state, PackState::Sealed);
        index.note_pack_bytes(&[(1, 5000), (99, 1)]).unwrap();
        assert_eq!(index.pack(1).unwrap().unwrap().bytes, Some(5000));
        assert!(index.pack(99).unwrap().is_none());
    }

    #[test]
    fn the_catalog_records_where_and_since_when_apart_from_the_queue() {
        let (_dir, index) = open();
        index.put_snapshot(&info("ab02", 20)).unwrap();
        index
            .put_snapshot(&SnapshotInfo {
                held_since_unix_ns: 11,
                ..info("ab01", 10)
            })
            .unwrap();
        index
            .submit_job(None, |seq| Ok((format!("job-{seq}"), "{}".into())))
            .unwrap();
        let all = index.snapshots().unwrap();
        let ids: Vec<&str> = all.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, vec!["ab01", "ab02"]);
        assert_eq!(all[0].held_since_unix_ns, 11);
        assert!(all[1].held_since_unix_ns > 20, "not stamped at commit");

        assert!(index.move_snapshot("ab01", "cold", 30).unwrap());
        assert!(!index.move_snapshot("ffff", "cold", 30).unwrap());
        let moved = index.find_snapshot("ab01").unwrap();
        assert_eq!(
            (moved.tier.as_str(), moved.held_since_unix_ns),
            ("cold", 30)
        );
        assert_eq!(
            moved,
            SnapshotInfo {
                tier: "cold".into(),
                held_since_unix_ns: 30,
                ..info("ab01", 10)
            }
        );
        assert_eq!(index.find_snapshot("latest").unwrap().id, "ab02");
        assert_eq!(index.queue_records().unwrap(), vec!["{}"]);
    }
}
