//! Reads every chunk of a snapshot back and checks it: record header checksum, payload xxh3,
//! length, and BLAKE3 of the plaintext against the chunk id. Each distinct chunk is read once.

use std::collections::HashMap;

use serde::Serialize;

use crate::backup::path_text;
use crate::site::Site;
use mover_format::error::{Error, Result};
use mover_format::manifest::{check_relative_path, EntryKind};
use mover_format::ChunkId;

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

/// `run` with the daemon's progress counters and stop flag.
pub fn run_with(
    site: &Site,
    snapshot: Option<&str>,
    control: Option<&crate::job::JobControl>,
) -> Result<VerifyReport> {
    use crate::job::Progress;
    let started = std::time::Instant::now();
    let infos = match snapshot {
        Some(wanted) => vec![site.index.find_snapshot(wanted)?],
        None => site.index.snapshots()?,
    };
    control.total(infos.iter().map(|i| i.bytes).sum());
    let mut report = VerifyReport::default();
    // Each chunk is read once; what it read as (None: good) answers its later references.
    let mut checked: HashMap<ChunkId, Option<String>> = HashMap::new();
    let mut reader = site.chunk_reader();
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
                        let outcome = reader
                            .read(&chunk.id, &mut buffer)
                            .and_then(|()| {
                                if buffer.len() == chunk.len as usize {
                                    Ok(())
                                } else {
                                    Err(Error::corrupt(
                                        format!("chunk {}", chunk.id),
                                        format!(
                                            "{} bytes, manifest says {}",
                                            buffer.len(),
                                            chunk.len
                                        ),
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
