//! The site's transactional index and catalog, in one redb database (`DIR/index.redb`).
//!
//! Tables:
//! - `chunks`:    chunk id → (pack id, offset, stored_len, raw_len, codec): where a chunk lives.
//! - `packs`:     pack id → tier name: which backend holds a pack.
//! - `snapshots`: snapshot id (hex) → snapshot summary (JSON): the catalog; a snapshot exists
//!   for readers exactly when its row does.
//! - `jobs`:      job id → job document (JSON), for the job history.
//! - `queue`:     job id → the daemon's job record (JSON): request, state, priority; the
//!   persistent queue and journal of `mover daemon`.
//! - `idempotency`: idempotency key → job id, so a retried submit finds its first job.
//! - `meta`:      counters (`job_seq`, the last job sequence number handed out).
//! - `damaged`:   chunk id → why its indexed record was found bad (by verify, a restore, a
//!   peer's fetch). Such a chunk does not satisfy dedup, and the next sealed pack that holds
//!   it takes over its row (and clears this one).
//! - `pack_bytes`: pack id → its sealed length, for choosing small packs to merge without a
//!   stat per pack (packs committed by builds before this table have no row: they are
//!   measured once and recorded then).
//! - `condemned`: pack id → tier name: packs a repack (`store::repack`) took out of `packs`
//!   whose files are not yet known to be deleted; `store::reclaim` finishes the deletion.
//!
//! Writers commit with redb's default durability (fsync on commit), so a row that is readable
//! after a crash was durable before the commit returned.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::pack::FooterEntry;
use crate::format::{ChunkId, Codec};

const CHUNKS: TableDefinition<[u8; 32], (u64, u64, u32, u32, u8)> = TableDefinition::new("chunks");
const PACKS: TableDefinition<u64, &str> = TableDefinition::new("packs");
const SNAPSHOTS: TableDefinition<&str, &str> = TableDefinition::new("snapshots");
const JOBS: TableDefinition<&str, &str> = TableDefinition::new("jobs");
const QUEUE: TableDefinition<&str, &str> = TableDefinition::new("queue");
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const DAMAGED: TableDefinition<[u8; 32], &str> = TableDefinition::new("damaged");
const PACK_BYTES: TableDefinition<u64, u64> = TableDefinition::new("pack_bytes");
const CONDEMNED: TableDefinition<u64, &str> = TableDefinition::new("condemned");

/// Where one chunk is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack_id: u64,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub codec: Codec,
}

/// A pack that is durable on its backend, with the records it holds.
pub struct SealedPack {
    pub pack_id: u64,
    pub tier: String,
    pub entries: Vec<FooterEntry>,
    pub bytes: u64,
}

/// A record a repack copied: from `from_offset` of pack `from_pack` to `to` in the new pack.
pub struct Move {
    pub from_pack: u64,
    pub from_offset: u64,
    pub to: FooterEntry,
}

/// A pack a repack emptied, with every record its footer lists.
pub struct OldPack {
    pub pack_id: u64,
    pub entries: Vec<FooterEntry>,
}

/// One row of the catalog.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SnapshotInfo {
    pub id: String,
    pub time: String,
    pub created_unix_ns: i64,
    pub site: String,
    pub tier: String,
    pub source: String,
    pub hostname: String,
    pub parent: Option<String>,
    pub job: String,
    pub files: u64,
    pub directories: u64,
    pub bytes: u64,
    pub warnings: u64,
}

pub struct Index {
    db: redb::Database,
}

impl Index {
    pub fn open(path: &std::path::Path) -> Result<Index> {
        let db = redb::Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::Refused(format!(
                "{} is in use by another mover process (a running daemon or backup)",
                path.display()
            )),
            other => Error::index(path, other),
        })?;
        // Tables are created only when one is missing (a new site, or one made by an older
        // build): a site that has them all opens without writing, so read-only commands
        // (`snapshots`, `verify`) still work on a full disk.
        let missing = {
            use redb::TableHandle;
            let txn = db.begin_read()?;
            let present: std::collections::HashSet<String> =
                txn.list_tables()?.map(|t| t.name().to_string()).collect();
            [
                CHUNKS.name(),
                PACKS.name(),
                SNAPSHOTS.name(),
                JOBS.name(),
                QUEUE.name(),
                IDEMPOTENCY.name(),
                META.name(),
                DAMAGED.name(),
                PACK_BYTES.name(),
                CONDEMNED.name(),
            ]
            .iter()
            .any(|name| !present.contains(*name))
        };
        if missing {
            let txn = db.begin_write()?;
            txn.open_table(CHUNKS)?;
            txn.open_table(PACKS)?;
            txn.open_table(SNAPSHOTS)?;
            txn.open_table(JOBS)?;
            txn.open_table(QUEUE)?;
            txn.open_table(IDEMPOTENCY)?;
            txn.open_table(META)?;
            txn.open_table(DAMAGED)?;
            txn.open_table(PACK_BYTES)?;
            txn.open_table(CONDEMNED)?;
            txn.commit()?;
        }
        Ok(Index { db })
    }

    pub fn lookup(&self, id: &ChunkId) -> Result<Option<Location>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CHUNKS)?;
        let row = table.get(id.0)?;
        Ok(match row {
            Some(guard) => Some(location(guard.value())?),
            None => None,
        })
    }

    /// A read view for many lookups (one per chunk on the backup path).
    pub fn reader(&self) -> Result<IndexReader> {
        use redb::ReadableTableMetadata;
        let txn = self.db.begin_read()?;
        let chunks = txn.open_table(CHUNKS)?;
        let damaged = txn.open_table(DAMAGED)?;
        // Almost always empty: then the backup path pays no second lookup.
        let damaged = if damaged.is_empty()? {
            None
        } else {
            Some(damaged)
        };
        Ok(IndexReader { chunks, damaged })
    }

    /// Marks chunk `id` damaged, if the index still points at the record found bad at `at`
    /// (a newer good copy may have taken its row since).
    pub fn mark_damaged(&self, id: &ChunkId, at: &Location, reason: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let chunks = txn.open_table(CHUNKS)?;
            let current = match chunks.get(id.0)? {
                Some(row) => Some(location(row.value())?),
                None => None,
            };
            if current.as_ref() == Some(at) {
                txn.open_table(DAMAGED)?.insert(id.0, reason)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Chunks marked damaged, with the reason.
    pub fn damaged(&self) -> Result<Vec<(ChunkId, String)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DAMAGED)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (id, reason) = row?;
            out.push((ChunkId(id.value()), reason.value().to_string()));
        }
        Ok(out)
    }

    pub fn pack_tier(&self, pack_id: u64) -> Result<Option<String>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PACKS)?;
        let row = table.get(pack_id)?;
        Ok(row.map(|g| g.value().to_string()))
    }

    /// Every committed pack.
    pub fn pack_ids(&self) -> Result<std::collections::HashSet<u64>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PACKS)?;
        let mut ids = std::collections::HashSet::new();
        for row in table.iter()? {
            ids.insert(row?.0.value());
        }
        Ok(ids)
    }

    /// Makes a sealed pack's records findable. Called only after the pack is durable.
    pub fn commit_pack(&self, pack: &SealedPack) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut packs = txn.open_table(PACKS)?;
            packs.insert(pack.pack_id, pack.tier.as_str())?;
            // Zero: a repair repointing single records, which does not know the length.
            if pack.bytes > 0 {
                txn.open_table(PACK_BYTES)?
                    .insert(pack.pack_id, pack.bytes)?;
            }
            let mut chunks = txn.open_table(CHUNKS)?;
            let mut damaged = txn.open_table(DAMAGED)?;
            for e in &pack.entries {
                // A chunk already indexed (stored twice by racing workers) keeps its first
                // home, unless that home was found damaged: then this copy replaces it.
                let repair = chunks.get(e.id.0)?.is_some() && damaged.remove(e.id.0)?.is_some();
                if repair || chunks.get(e.id.0)?.is_none() {
                    chunks.insert(
                        e.id.0,
                        (
                            pack.pack_id,
                            e.offset,
                            e.stored_len,
                            e.raw_len,
                            e.codec as u8,
                        ),
                    )?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The committed packs of `tier` with their sealed length where it is recorded.
    pub fn tier_packs(&self, tier: &str) -> Result<Vec<(u64, Option<u64>)>> {
        let txn = self.db.begin_read()?;
        let packs = txn.open_table(PACKS)?;
        let sizes = txn.open_table(PACK_BYTES)?;
        let mut out = Vec::new();
        for row in packs.iter()? {
            let (id, pack_tier) = row?;
            if pack_tier.value() == tier {
                let id = id.value();
                out.push((id, sizes.get(id)?.map(|b| b.value())));
            }
        }
        Ok(out)
    }

    /// Records the sealed length of packs committed without one.
    pub fn note_pack_bytes(&self, sizes: &[(u64, u64)]) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let packs = txn.open_table(PACKS)?;
            let mut table = txn.open_table(PACK_BYTES)?;
            for &(id, bytes) in sizes {
                if packs.get(id)?.is_some() {
                    table.insert(id, bytes)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Commits a repack in one transaction: each moved chunk whose row still points at the
    /// record it was copied from now points into `new` (a row repointed meanwhile, by damage
    /// healing, is left alone), `new` joins `packs`, and each old pack that no row points
    /// into any more leaves `packs` for `condemned`. Returns the condemned packs.
    pub fn commit_repack(
        &self,
        new: &SealedPack,
        moves: &[Move],
        old: &[OldPack],
    ) -> Result<Vec<u64>> {
        let txn = self.db.begin_write()?;
        let mut condemned_ids = Vec::new();
        {
            let mut chunks = txn.open_table(CHUNKS)?;
            let mut packs = txn.open_table(PACKS)?;
            let mut sizes = txn.open_table(PACK_BYTES)?;
            let mut condemned = txn.open_table(CONDEMNED)?;
            for m in moves {
                let current = match chunks.get(m.to.id.0)? {
                    Some(row) => Some(location(row.value())?),
                    None => None,
                };
                if current.is_some_and(|at| at.pack_id == m.from_pack && at.offset == m.from_offset)
                {
                    let e = &m.to;
                    chunks.insert(
                        e.id.0,
                        (
                            new.pack_id,
                            e.offset,
                            e.stored_len,
                            e.raw_len,
                            e.codec as u8,
                        ),
                    )?;
                }
            }
            packs.insert(new.pack_id, new.tier.as_str())?;
            sizes.insert(new.pack_id, new.bytes)?;
            for pack in old {
                let mut still_used = false;
                for e in &pack.entries {
                    let row = chunks.get(e.id.0)?;
                    if row.is_some_and(|r| {
                        let (pack_id, offset, ..) = r.value();
                        pack_id == pack.pack_id && offset == e.offset
                    }) {
                        still_used = true;
                        break;
                    }
                }
                if still_used {
                    tracing::warn!(pack = %format_args!("{:016x}", pack.pack_id), "a record of a merged pack is still indexed there; the pack is kept");
                    continue;
                }
                if packs.remove(pack.pack_id)?.is_some() {
                    sizes.remove(pack.pack_id)?;
                    condemned.insert(pack.pack_id, new.tier.as_str())?;
                    condemned_ids.push(pack.pack_id);
                }
            }
        }
        txn.commit()?;
        Ok(condemned_ids)
    }

    /// Packs of `tier` condemned by a repack whose files may still exist. A pack that
    /// `packs` lists again is never among them.
    pub fn condemned(&self, tier: &str) -> Result<Vec<u64>> {
        let txn = self.db.begin_read()?;
        let condemned = txn.open_table(CONDEMNED)?;
        let packs = txn.open_table(PACKS)?;
        let mut out = Vec::new();
        for row in condemned.iter()? {
            let (id, pack_tier) = row?;
            let id = id.value();
            if pack_tier.value() == tier && packs.get(id)?.is_none() {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Forgets condemned packs whose files are deleted.
    pub fn forget_condemned(&self, ids: &[u64]) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut condemned = txn.open_table(CONDEMNED)?;
            for id in ids {
                condemned.remove(*id)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Whether chunk `id` is marked damaged.
    pub fn is_damaged(&self, id: &ChunkId) -> Result<bool> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(DAMAGED)?.get(id.0)?.is_some())
    }

    pub fn put_snapshot(&self, info: &SnapshotInfo) -> Result<()> {
        let json = serde_json::to_string(info).expect("snapshot info serialises");
        let txn = self.db.begin_write()?;
        txn.open_table(SNAPSHOTS)?
            .insert(info.id.as_str(), json.as_str())?;
        txn.commit()?;
        Ok(())
    }

    /// All snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (key, value) = row?;
            let info: SnapshotInfo = serde_json::from_str(value.value()).map_err(|e| {
                Error::corrupt(format!("catalog row {}", key.value()), e.to_string())
            })?;
            out.push(info);
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

    pub fn chunk_count(&self) -> Result<u64> {
        use redb::ReadableTableMetadata;
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(CHUNKS)?.len()?)
    }
}

pub struct IndexReader {
    chunks: redb::ReadOnlyTable<[u8; 32], (u64, u64, u32, u32, u8)>,
    damaged: Option<redb::ReadOnlyTable<[u8; 32], &'static str>>,
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
        manifest: &crate::format::manifest::Manifest,
        tier: String,
        job: &str,
    ) -> Result<CatalogCheck> {
        use crate::format::manifest::EntryKind;
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
        let hex = crate::format::hex;
        let info = SnapshotInfo {
            id: hex(id),
            time: crate::job::rfc3339(manifest.created_unix_ns.div_euclid(1_000_000_000)),
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
        };
        Ok(CatalogCheck {
            info,
            missing,
            first_missing,
        })
    }

    /// Whether a good copy of chunk `id` is stored: what dedup asks. A chunk marked damaged
    /// is not, so that whoever has its bytes stores them again.
    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        if let Some(damaged) = &self.damaged {
            if damaged.get(id.0)?.is_some() {
                return Ok(false);
            }
        }
        Ok(self.chunks.get(id.0)?.is_some())
    }
}

fn location(
    (pack_id, offset, stored_len, raw_len, codec): (u64, u64, u32, u32, u8),
) -> Result<Location> {
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
