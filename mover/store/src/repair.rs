//! Rebuilds a lost `index.redb` from what the store itself holds: sealed pack footers (which
//! chunk is where) and manifests (which snapshots exist).
//!
//! Why this is safe: a pack is sealed (footer and trailer written, then made durable) before
//! the index ever points into it, and a manifest is durable before its catalog row commits.
//! So the footers of sealed packs describe a superset of what the lost index pointed at, and
//! a manifest whose every chunk is found in them is a complete snapshot. What cannot come back:
//! the job history, the daemon's queue and idempotency keys, and catalog details only jobs knew
//! (the job id, its warnings count). A manifest that names a chunk no sealed pack holds is left
//! out of the catalog and reported: it would not restore. Unsealed packs (a writer killed
//! mid-pack) are skipped and reported; nothing is deleted here.
//!
//! The new index is built beside the site (`index.redb.rebuilding`) and renamed into place
//! only when complete, so an interrupted repair leaves the site as it found it.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::index::{Move, Repoint};
use crate::pack_reader::ChunkReader;
use crate::site::INDEX_FILE_NAME;
use crate::{Backend, Index, LocalDir, SealedPack};
use mover_config::{Config, CONFIG_FILE_NAME};
use mover_format::error::{Error, Result};
use mover_format::manifest;
use mover_format::{hex, parse_hex32};

/// The `job` of a catalog row rebuilt from its manifest: the job that made it is not known.
pub const REPAIRED_JOB: &str = "repair-index";
/// At most this many skipped packs and left-out snapshots are listed one by one.
const LISTED_MAX: usize = 100;

#[derive(Debug, Default, Serialize)]
pub struct RepairReport {
    pub index: String,
    pub packs_indexed: u64,
    pub chunks_indexed: u64,
    pub packs_skipped: u64,
    /// Chunks found in more than one sealed pack whose first copy read back bad and was
    /// replaced by a good one (a copy healed before the index was lost).
    pub copies_replaced: u64,
    pub snapshots: u64,
    pub snapshots_left_out: u64,
    /// `key: reason` of packs and manifests that were not taken, first [`LISTED_MAX`].
    pub skipped: Vec<String>,
}

impl RepairReport {
    fn skip(&mut self, what: String) {
        if self.skipped.len() < LISTED_MAX {
            self.skipped.push(what);
        }
    }
}

/// Rebuilds the index of the site in `dir`. Refuses when an index is already there: a damaged
/// one is moved aside by a person first, so nothing is replaced by mistake.
pub fn repair_index(dir: &Path) -> Result<RepairReport> {
    let config = Config::load(&dir.join(CONFIG_FILE_NAME))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| Error::io("resolve", dir, e))?;
    let index_path = dir.join(INDEX_FILE_NAME);
    if index_path.exists() {
        return Err(Error::Refused(format!(
            "{} exists: repair-index only rebuilds a missing index (move a damaged one aside first)",
            index_path.display()
        )));
    }
    let tiers = crate::site::open_tiers(&dir, &config)?;
    let metadata = LocalDir::new(&dir);
    let building = dir.join(format!("{INDEX_FILE_NAME}.rebuilding"));
    match std::fs::remove_file(&building) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove", &building, e)),
    }
    let mut report = RepairReport {
        index: index_path.display().to_string(),
        ..RepairReport::default()
    };
    {
        let index = Index::open(&building).map_err(|e| e.in_index(&building))?;
        let mut names: Vec<&String> = tiers.keys().collect();
        names.sort();
        let mut copies = Copies::default();
        for name in names {
            index_packs(&index, name, &tiers[name], &mut copies, &mut report)?;
        }
        keep_good_copies(&index, &tiers, copies, &mut report)?;
        catalog_manifests(&index, &metadata, &mut report)?;
    }
    std::fs::rename(&building, &index_path).map_err(|e| Error::io("rename", &building, e))?;
    crate::backend::sync_dir(&dir)?;
    Ok(report)
}

/// Where each chunk was found, by the first pack holding it, and its other copies.
#[derive(Default)]
struct Copies {
    seen: std::collections::HashSet<mover_format::ChunkId>,
    /// Copies after the first: (tier, pack id, footer entry).
    more: Vec<(String, u64, mover_format::pack::FooterEntry)>,
}

fn index_packs(
    index: &Index,
    tier: &str,
    backend: &Arc<dyn Backend>,
    copies: &mut Copies,
    report: &mut RepairReport,
) -> Result<()> {
    for key in backend.list("packs")? {
        let Some(pack_id) = pack_id_of(&key) else {
            continue;
        };
        match read_footer(backend.as_ref(), &key) {
            Ok((entries, bytes)) => {
                for e in &entries {
                    if !copies.seen.insert(e.id) {
                        copies.more.push((tier.to_string(), pack_id, *e));
                    }
                }
                report.chunks_indexed += entries.len() as u64;
                report.packs_indexed += 1;
                index.commit_pack(&SealedPack {
                    pack_id,
                    tier: tier.to_string(),
                    entries,
                    bytes,
                })?;
            }
            Err(e) => {
                report.packs_skipped += 1;
                report.skip(format!("tier {tier} {key}: {e}"));
            }
        }
    }
    Ok(())
}

/// The first copy of a chunk wins the index, as in a backup (a later record in the same tier
/// is a dead duplicate); but a chunk stored again because its first copy was found bad
/// (healing) has a good later copy. So every chunk with more than one record is read back
/// through the new index, and a bad first copy is repointed (`Index::repoint`, as healing and
/// repack do) to the first later record that reads back good.
fn keep_good_copies(
    index: &Index,
    tiers: &std::collections::HashMap<String, Arc<dyn Backend>>,
    copies: Copies,
    report: &mut RepairReport,
) -> Result<()> {
    let mut buffer = Vec::new();
    for (tier, pack_id, entry) in copies.more {
        // The copy of the later record's tier; reading it marks it damaged if it is bad.
        let Some(first) = index.locate(&entry.id, Some(&tier))? else {
            continue;
        };
        if first.tier != tier || first.location.pack_id == pack_id {
            continue;
        }
        let mut reader = ChunkReader::new(index, tiers).preferring(&tier);
        let _ = reader.read(&entry.id, &mut buffer);
        let bad = index
            .copy_in(&entry.id, first.location.pack_id)?
            .is_some_and(|c| c.damaged);
        if !bad {
            continue;
        }
        index.repoint(&Repoint {
            moves: &[Move {
                from_pack: first.location.pack_id,
                from_offset: first.location.offset,
                to_pack: pack_id,
                to: entry,
            }],
            ..Repoint::default()
        })?;
        let mut reader = ChunkReader::new(index, tiers).preferring(&tier);
        if reader.read(&entry.id, &mut buffer).is_ok() {
            report.copies_replaced += 1;
        }
    }
    Ok(())
}

/// `packs/xx/<16 hex digits>.pack` → the pack id.
fn pack_id_of(key: &str) -> Option<u64> {
    let name = key.rsplit('/').next()?.strip_suffix(".pack")?;
    (name.len() == 16)
        .then(|| u64::from_str_radix(name, 16).ok())
        .flatten()
}

/// The footer of a sealed pack, checked against its header, trailer and checksum.
pub fn read_footer(
    backend: &dyn Backend,
    key: &str,
) -> Result<(Vec<mover_format::pack::FooterEntry>, u64)> {
    let len = backend.size(key)?;
    let entries = crate::pack_reader::read_footer(key, len, |offset, n, buf| {
        backend.read_range(key, offset, n, buf)
    })?;
    Ok((entries, len))
}

fn catalog_manifests(index: &Index, metadata: &LocalDir, report: &mut RepairReport) -> Result<()> {
    for key in metadata.list("manifests")? {
        let Some(id) = key.rsplit('/').next().and_then(parse_hex32) else {
            continue;
        };
        let manifest = match metadata
            .read_all(&key)
            .and_then(|bytes| manifest::decode(&bytes, Some(&id)))
        {
            Ok(manifest) => manifest,
            Err(e) => {
                report.snapshots_left_out += 1;
                report.skip(format!("manifest {key}: {e}"));
                continue;
            }
        };
        let check =
            index
                .reader()?
                .catalog_check(&id, &manifest, manifest.tier.clone(), REPAIRED_JOB)?;
        if check.missing > 0 {
            report.snapshots_left_out += 1;
            report.skip(format!(
                "snapshot {}: {} chunk references found in no sealed pack; left out of the catalog",
                hex(&id),
                check.missing
            ));
            continue;
        }
        index.put_snapshot(&check.info)?;
        report.snapshots += 1;
    }
    Ok(())
}

/// Refuses to open a site whose index is missing while its store holds packs or manifests:
/// an empty index would make every snapshot look gone and every chunk new.
pub fn refuse_lost_index(
    index_path: &Path,
    tiers: &std::collections::HashMap<String, Arc<dyn Backend>>,
    metadata: &LocalDir,
) -> Result<()> {
    let mut packs = 0usize;
    for backend in tiers.values() {
        packs += backend
            .list("packs")?
            .iter()
            .filter(|k| pack_id_of(k).is_some())
            .count();
    }
    let manifests = metadata.list("manifests")?.len();
    if packs == 0 && manifests == 0 {
        return Ok(());
    }
    let dir = index_path.parent().unwrap_or(Path::new("."));
    Err(Error::Site(format!(
        "{} is missing but the site holds {packs} packs and {manifests} manifests: refusing to treat it as empty; rebuild it with `mover repair-index --site-dir {}`",
        index_path.display(),
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_keys_name_their_id() {
        assert_eq!(
            pack_id_of("packs/ab/ab00000000000001.pack"),
            Some(0xab00000000000001)
        );
        assert_eq!(pack_id_of("packs/ab/ab00000000000001.pack.tmp"), None);
        assert_eq!(pack_id_of("packs/ab/xyz.pack"), None);
        assert_eq!(pack_id_of("packs/ab/1.pack"), None);
    }
}
