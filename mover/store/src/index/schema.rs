//! The index's tables, its schema version, and the upgrade of an index written by an older
//! mover. ARCHITECTURE.md ("Index (redb) tables") documents every table and version.
//!
//! Version 1 is every index written before the version existed (no `schema_version` row): one
//! home per chunk (`chunks`), `packs` as pack → tier with `pack_bytes` and `condemned` beside
//! it (the last two absent in indexes older still), damage per chunk, the catalog in
//! `snapshots`. Version 2 is an index of copies: `copies` (chunk, pack) → record, `packs` as
//! pack → (tier, state, bytes, since), damage per copy, the catalog in `catalog`.

use std::collections::HashSet;

use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use mover_format::error::{Error, Result};

/// The schema this build writes and reads.
pub const SCHEMA_VERSION: u64 = 2;
/// The `meta` row holding the schema version (absent: version 1, or a new database).
pub const SCHEMA_KEY: &str = "schema_version";

/// (chunk id, pack id): which copy.
pub(super) type CopyKey = ([u8; 32], u64);
/// (offset, stored_len, raw_len, codec): the copy's record.
pub(super) type CopyRow = (u64, u32, u32, u8);
/// (tier, state, sealed length or 0 when unknown, in this state since, unix ns).
pub(super) type PackRow = (&'static str, u8, u64, i64);

/// (chunk id, pack id) → (offset, stored_len, raw_len, codec): one copy of a chunk.
pub(super) const COPIES: TableDefinition<CopyKey, CopyRow> = TableDefinition::new("copies");
/// pack id → (tier, state, sealed length or 0 when unknown, in this state since, unix ns).
pub(super) const PACKS: TableDefinition<u64, PackRow> = TableDefinition::new("packs");
/// (chunk id, pack id) → why that copy's record was found bad.
pub(super) const DAMAGED: TableDefinition<CopyKey, &str> = TableDefinition::new("damaged");
/// snapshot id (hex) → catalog row (JSON `SnapshotInfo`).
pub(super) const CATALOG: TableDefinition<&str, &str> = TableDefinition::new("catalog");
pub(super) const JOBS: TableDefinition<&str, &str> = TableDefinition::new("jobs");
pub(super) const QUEUE: TableDefinition<&str, &str> = TableDefinition::new("queue");
pub(super) const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Version 1's tables that version 2 replaces.
pub(super) mod v1 {
    use redb::TableDefinition;

    pub const CHUNKS: TableDefinition<[u8; 32], (u64, u64, u32, u32, u8)> =
        TableDefinition::new("chunks");
    pub const PACKS: TableDefinition<u64, &str> = TableDefinition::new("packs");
    pub const PACK_BYTES: TableDefinition<u64, u64> = TableDefinition::new("pack_bytes");
    pub const CONDEMNED: TableDefinition<u64, &str> = TableDefinition::new("condemned");
    pub const DAMAGED: TableDefinition<[u8; 32], &str> = TableDefinition::new("damaged");
    pub const SNAPSHOTS: TableDefinition<&str, &str> = TableDefinition::new("snapshots");
}

/// The schema version of `db` as stored: `None` for a version-1 index or a new database.
pub(super) fn stored_version(db: &redb::Database) -> Result<Option<u64>> {
    let txn = db.begin_read()?;
    let has_meta = txn.list_tables()?.any(|t| t.name() == META.name());
    if !has_meta {
        return Ok(None);
    }
    let meta = txn.open_table(META)?;
    let version = meta.get(SCHEMA_KEY)?.map(|v| v.value());
    Ok(version)
}

/// Brings `db` to [`SCHEMA_VERSION`] in one write transaction: a crash leaves it as it was,
/// and a second run finds nothing to do. `now_ns` stamps the packs of a version-1 index (when
/// they entered their state is not known; later is the safe side for minimum storage times).
pub(super) fn upgrade(db: &redb::Database, now_ns: i64) -> Result<()> {
    let txn = db.begin_write()?;
    let present: HashSet<String> = txn.list_tables()?.map(|t| t.name().to_string()).collect();
    let has = |name: &str| present.contains(name);
    let version = if has(META.name()) {
        txn.open_table(META)?.get(SCHEMA_KEY)?.map(|v| v.value())
    } else {
        None
    };
    if version == Some(SCHEMA_VERSION) {
        txn.abort()?;
        return Ok(());
    }
    if let Some(version) = version {
        return Err(Error::Refused(format!(
            "no upgrade from index schema version {version} to {SCHEMA_VERSION}"
        )));
    }

    // chunks → copies: each chunk's one home becomes its one copy.
    {
        let mut copies = txn.open_table(COPIES)?;
        if has(v1::CHUNKS.name()) {
            let chunks = txn.open_table(v1::CHUNKS)?;
            for row in chunks.iter()? {
                let (id, home) = row?;
                let (pack, offset, stored_len, raw_len, codec) = home.value();
                copies.insert((id.value(), pack), (offset, stored_len, raw_len, codec))?;
            }
        }
    }
    if has(v1::CHUNKS.name()) {
        txn.delete_table(v1::CHUNKS)?;
    }

    // packs, pack_bytes and condemned → packs with a state. `packs` keeps its name with a new
    // value type, so version 1's rows are read out before the table is made again.
    let mut packs: Vec<(u64, String, u8, u64)> = Vec::new();
    if has(v1::PACKS.name()) {
        let sizes = if has(v1::PACK_BYTES.name()) {
            Some(txn.open_table(v1::PACK_BYTES)?)
        } else {
            None
        };
        let registered = txn.open_table(v1::PACKS)?;
        for row in registered.iter()? {
            let (id, tier) = row?;
            let bytes = match &sizes {
                Some(sizes) => sizes.get(id.value())?.map_or(0, |b| b.value()),
                None => 0,
            };
            packs.push((
                id.value(),
                tier.value().to_string(),
                super::PackState::Sealed as u8,
                bytes,
            ));
        }
    }
    if has(v1::CONDEMNED.name()) {
        let registered: HashSet<u64> = packs.iter().map(|p| p.0).collect();
        let condemned = txn.open_table(v1::CONDEMNED)?;
        for row in condemned.iter()? {
            let (id, tier) = row?;
            // Listed in both: registered again after its repack (as repair-index does), so
            // it is sealed and its file must stay.
            if !registered.contains(&id.value()) {
                packs.push((
                    id.value(),
                    tier.value().to_string(),
                    super::PackState::Condemned as u8,
                    0,
                ));
            }
        }
    }
    if has(v1::PACKS.name()) {
        txn.delete_table(v1::PACKS)?;
    }
    if has(v1::PACK_BYTES.name()) {
        txn.delete_table(v1::PACK_BYTES)?;
    }
    if has(v1::CONDEMNED.name()) {
        txn.delete_table(v1::CONDEMNED)?;
    }
    {
        let mut table = txn.open_table(PACKS)?;
        for (id, tier, state, bytes) in &packs {
            table.insert(*id, (tier.as_str(), *state, *bytes, now_ns))?;
        }
    }

    // damaged: a mark on a chunk becomes a mark on the copy its row pointed at.
    let mut marks: Vec<([u8; 32], String)> = Vec::new();
    if has(v1::DAMAGED.name()) {
        let damaged = txn.open_table(v1::DAMAGED)?;
        for row in damaged.iter()? {
            let (id, reason) = row?;
            marks.push((id.value(), reason.value().to_string()));
        }
        drop(damaged);
        txn.delete_table(v1::DAMAGED)?;
    }
    {
        let copies = txn.open_table(COPIES)?;
        let mut damaged = txn.open_table(DAMAGED)?;
        for (id, reason) in &marks {
            let mut rows = copies.range((*id, 0)..=(*id, u64::MAX))?;
            // Version 1 held one copy per chunk; a mark without one marks nothing.
            if let Some(row) = rows.next() {
                let (key, _) = row?;
                damaged.insert(key.value(), reason.as_str())?;
            }
        }
    }

    // snapshots → catalog, each row gaining when this site came to hold it (its creation:
    // version 1 held only what it took or received then).
    {
        let mut catalog = txn.open_table(CATALOG)?;
        if has(v1::SNAPSHOTS.name()) {
            let snapshots = txn.open_table(v1::SNAPSHOTS)?;
            for row in snapshots.iter()? {
                let (id, json) = row?;
                let upgraded = with_held_since(json.value());
                catalog.insert(id.value(), upgraded.as_deref().unwrap_or(json.value()))?;
            }
        }
    }
    if has(v1::SNAPSHOTS.name()) {
        txn.delete_table(v1::SNAPSHOTS)?;
    }

    txn.open_table(JOBS)?;
    txn.open_table(QUEUE)?;
    txn.open_table(IDEMPOTENCY)?;
    txn.open_table(META)?.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
    txn.commit()?;
    Ok(())
}

/// A version-1 catalog row with `held_since_unix_ns` added (= `created_unix_ns`); `None` when
/// the row is not a JSON object, which is then kept as it is (and reported as corrupt by the
/// reader, as before).
fn with_held_since(json: &str) -> Option<String> {
    let mut value: serde_json::Value = serde_json::from_str(json).ok()?;
    let object = value.as_object_mut()?;
    if !object.contains_key("held_since_unix_ns") {
        let created = object.get("created_unix_ns").cloned()?;
        object.insert("held_since_unix_ns".into(), created);
    }
    serde_json::to_string(&value).ok()
}
