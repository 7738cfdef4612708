//! Reads every chunk of a snapshot back and checks it: record header checksum, payload xxh3,
//! length, and BLAKE3 of the plaintext against the chunk id. Each distinct chunk is read once
//! (up to `VERIFY_GOOD_CHUNKS_MAX` of them; see [`Checked`]), one manifest entry at a time, so
//! a verify's memory does not grow with the snapshot.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::backup::path_text;
use crate::site::Site;
use mover_format::constants::VERIFY_GOOD_CHUNKS_MAX;
use mover_format::error::{Error, Result};
use mover_format::manifest::{check_relative_path, EntryKind};
use mover_format::ChunkId;
use mover_store::source::ChunkSource;

#[derive(Debug, Serialize)]
pub struct Damage {
    pub snapshot: String,
    pub path: String,
    pub chunk: Option<String>,
    pub reason: String,
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub snapshots: Vec<String>,
    pub files: u64,
    /// Chunk reads: each distinct chunk once, unless more than `VERIFY_GOOD_CHUNKS_MAX` good
    /// ones were met (then a chunk seen before the set started again is read again).
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub elapsed_s: f64,
    /// Every (snapshot, file, chunk) that does not read back: a damaged chunk is listed in
    /// every snapshot and file that references it, though it is read only once.
    pub damage: Vec<Damage>,
    /// Snapshots with at least one damaged file or an unreadable manifest.
    pub snapshots_damaged: u64,
    pub files_damaged: u64,
    /// Distinct damaged chunks.
    pub chunks_damaged: u64,
}

/// Verifies one snapshot, or every snapshot of the site when `snapshot` is None.
pub fn run(site: &Site, snapshot: Option<&str>) -> Result<VerifyReport> {
    run_with(site, snapshot, None)
}

/// What a verify remembers of the chunks it has read: every damaged one (each is listed in
/// the report anyway) and up to `good_max` good ones. A good chunk forgotten when the set
/// started again is read again where a later file references it: the same answer, one more
/// read, and memory that does not grow with the number of distinct chunks.
struct Checked {
    damaged: HashMap<ChunkId, String>,
    good: HashSet<ChunkId>,
    good_max: usize,
}

impl Checked {
    fn new(good_max: usize) -> Checked {
        Checked {
            damaged: HashMap::new(),
            good: HashSet::new(),
            good_max: good_max.max(1),
        }
    }

    /// `Some(None)`: read and good; `Some(Some(reason))`: read and damaged; `None`: not known.
    fn get(&self, id: &ChunkId) -> Option<Option<String>> {
        if let Some(reason) = self.damaged.get(id) {
            return Some(Some(reason.clone()));
        }
        self.good.contains(id).then_some(None)
    }

    fn insert(&mut self, id: ChunkId, outcome: Option<String>) {
        match outcome {
            Some(reason) => {
                self.damaged.insert(id, reason);
            }
            None => {
                if self.good.len() >= self.good_max {
                    self.good.clear();
                }
                self.good.insert(id);
            }
        }
    }
}

/// `run` with the daemon's progress counters and stop flag.
pub fn run_with(
    site: &Site,
    snapshot: Option<&str>,
    control: Option<&crate::job::JobControl>,
) -> Result<VerifyReport> {
    run_bounded(site, snapshot, control, VERIFY_GOOD_CHUNKS_MAX)
}

fn run_bounded(
    site: &Site,
    snapshot: Option<&str>,
    control: Option<&crate::job::JobControl>,
    good_chunks_max: usize,
) -> Result<VerifyReport> {
    use crate::job::Progress;
    let started = std::time::Instant::now();
    let infos = match snapshot {
        Some(wanted) => vec![site.index.find_snapshot(wanted)?],
        None => site.index.snapshots()?,
    };
    control.total(infos.iter().map(|i| i.bytes).sum());
    let mut report = VerifyReport::default();
    // Each chunk is read once; what it read as answers its later references.
    let mut checked = Checked::new(good_chunks_max);
    // Read through the source trait: a wrapper (decrypt, another site's copy) fits here.
    let mut reader = site.chunk_reader();
    let source: &mut dyn ChunkSource = &mut reader;
    let mut buffer = Vec::new();
    for info in infos {
        report.snapshots.push(info.id.clone());
        let damage_before = report.damage.len();
        let mut manifest = match mover_format::parse_hex32(&info.id)
            .ok_or_else(|| {
                Error::corrupt(
                    "catalog",
                    format!("snapshot id {} is not 64 hex digits", info.id),
                )
            })
            .and_then(|id| site.open_manifest(&id))
        {
            Ok(m) => m,
            Err(e) => {
                report.damage.push(Damage {
                    snapshot: info.id.clone(),
                    path: ".".into(),
                    chunk: None,
                    reason: format!("manifest: {e}"),
                });
                report.snapshots_damaged += 1;
                continue;
            }
        };
        // One entry at a time: a snapshot of any size is verified in bounded memory (but for
        // the outcome of each distinct chunk).
        loop {
            let entry = match manifest.next_entry() {
                Ok(Some(entry)) => entry,
                Ok(None) => break,
                Err(e) => {
                    report.damage.push(Damage {
                        snapshot: info.id.clone(),
                        path: ".".into(),
                        chunk: None,
                        reason: format!("manifest: {e}"),
                    });
                    break;
                }
            };
            let file_damage_before = report.damage.len();
            if let Err(why) = check_relative_path(&entry.path) {
                report.damage.push(Damage {
                    snapshot: info.id.clone(),
                    path: path_text(&entry.path),
                    chunk: None,
                    reason: format!("unsafe path: {why}"),
                });
            }
            let EntryKind::File { extents, .. } = &entry.kind else {
                continue;
            };
            report.files += 1;
            control.check()?;
            for chunk in extents.iter().flat_map(|e| &e.chunks) {
                control.done(chunk.len as u64);
                let outcome = match checked.get(&chunk.id) {
                    Some(outcome) => outcome.clone(),
                    None => {
                        let outcome = source
                            .read(&chunk.id, &mut buffer)
                            .and_then(|plaintext| {
                                let len = plaintext.len(&buffer);
                                if len == chunk.len as usize {
                                    Ok(())
                                } else {
                                    Err(Error::corrupt(
                                        format!("chunk {}", chunk.id),
                                        format!("{len} bytes, manifest says {}", chunk.len),
                                    ))
                                }
                            })
                            .err()
                            .map(|e| e.to_string());
                        report.chunks_checked += 1;
                        match &outcome {
                            None => report.bytes_checked += chunk.len as u64,
                            Some(_) => report.chunks_damaged += 1,
                        }
                        checked.insert(chunk.id, outcome.clone());
                        outcome
                    }
                };
                if let Some(reason) = outcome {
                    report.damage.push(Damage {
                        snapshot: info.id.clone(),
                        path: path_text(&entry.path),
                        chunk: Some(chunk.id.hex()),
                        reason,
                    });
                }
            }
            if report.damage.len() > file_damage_before {
                report.files_damaged += 1;
            }
        }
        if report.damage.len() > damage_before {
            report.snapshots_damaged += 1;
        }
    }
    report.elapsed_s = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed;
        let mut data = Vec::with_capacity(len + 8);
        while data.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            data.extend_from_slice(&state.to_le_bytes());
        }
        data.truncate(len);
        data
    }

    fn packs_under(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                packs_under(&path, out);
            } else if path.extension().is_some_and(|e| e == "pack") {
                out.push(path);
            }
        }
    }

    /// (snapshot, path, chunk) of every damage, in report order.
    fn damage_of(report: &VerifyReport) -> Vec<(String, String, Option<String>)> {
        report
            .damage
            .iter()
            .map(|d| (d.snapshot.clone(), d.path.clone(), d.chunk.clone()))
            .collect()
    }

    #[test]
    fn a_verify_that_forgets_good_chunks_reads_more_but_finds_the_same_damage() {
        let base = tempfile::tempdir().unwrap();
        let source = base.path().join("data");
        std::fs::create_dir(&source).unwrap();
        // Three files of the same bytes (their chunks referenced three times) and one other.
        let shared = random_bytes(0x9e37_79b9_7f4a_7c15, 3 << 20);
        for name in ["a", "b", "c"] {
            std::fs::write(source.join(name), &shared).unwrap();
        }
        std::fs::write(source.join("d"), random_bytes(7, 2 << 20)).unwrap();
        let dir = base.path().join("site");
        crate::site::init(&crate::site::InitOptions {
            name: "a",
            dir: &dir,
            listen: None,
            socket: None,
        })
        .unwrap();
        let site = Site::open(&dir).unwrap();
        crate::backup::run(
            &site,
            &crate::backup::BackupOptions {
                control: None,
                source: &source,
                to: None,
                tier: None,
            },
        )
        .unwrap();

        let remembered = run(&site, None).unwrap();
        let forgetful = run_bounded(&site, None, None, 1).unwrap();
        assert!(remembered.damage.is_empty(), "{:?}", remembered.damage);
        assert!(forgetful.damage.is_empty(), "{:?}", forgetful.damage);
        assert_eq!(forgetful.files, 4);
        // The shared file's chunks are read once per file when nothing good is remembered.
        assert!(
            forgetful.chunks_checked > remembered.chunks_checked,
            "{} reads with one good chunk remembered, {} with all",
            forgetful.chunks_checked,
            remembered.chunks_checked
        );

        // Damage one record in the middle of each pack: both find it, in every file.
        let mut packs = Vec::new();
        packs_under(&dir, &mut packs);
        assert!(!packs.is_empty(), "no pack under {}", dir.display());
        for pack in &packs {
            let mut bytes = std::fs::read(pack).unwrap();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0xff;
            std::fs::write(pack, &bytes).unwrap();
        }
        drop(site);
        let site = Site::open(&dir).unwrap();
        let remembered = run(&site, None).unwrap();
        let forgetful = run_bounded(&site, None, None, 1).unwrap();
        assert!(!remembered.damage.is_empty(), "a flipped byte went unseen");
        assert_eq!(damage_of(&forgetful), damage_of(&remembered));
        assert_eq!(forgetful.chunks_damaged, remembered.chunks_damaged);
        assert_eq!(forgetful.files_damaged, remembered.files_damaged);
    }
}
