//! Reads every chunk of a snapshot back and checks it: record header checksum, payload xxh3,
//! length, and BLAKE3 of the plaintext against the chunk id. Each distinct chunk is read once.

use std::collections::HashSet;

use serde::Serialize;

use crate::backup::path_text;
use crate::error::{Error, Result};
use crate::format::manifest::{check_relative_path, EntryKind};
use crate::format::ChunkId;
use crate::site::Site;

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
    pub damage: Vec<Damage>,
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
    let mut checked: HashSet<ChunkId> = HashSet::new();
    let mut reader = site.chunk_reader();
    let mut buffer = Vec::new();
    for info in infos {
        report.snapshots.push(info.id.clone());
        let manifest = match crate::format::parse_hex32(&info.id)
            .ok_or_else(|| {
                Error::corrupt(
                    "catalog",
                    format!("snapshot id {} is not 64 hex digits", info.id),
                )
            })
            .and_then(|id| site.load_manifest(&id))
        {
            Ok(m) => m,
            Err(e) => {
                report.damage.push(Damage {
                    snapshot: info.id.clone(),
                    path: ".".into(),
                    chunk: None,
                    reason: format!("manifest: {e}"),
                });
                continue;
            }
        };
        for entry in &manifest.entries {
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
                if !checked.insert(chunk.id) {
                    continue;
                }
                let outcome = reader.read(&chunk.id, &mut buffer).and_then(|()| {
                    if buffer.len() == chunk.len as usize {
                        Ok(())
                    } else {
                        Err(Error::corrupt(
                            format!("chunk {}", chunk.id),
                            format!("{} bytes, manifest says {}", buffer.len(), chunk.len),
                        ))
                    }
                });
                report.chunks_checked += 1;
                match outcome {
                    Ok(()) => report.bytes_checked += chunk.len as u64,
                    Err(e) => report.damage.push(Damage {
                        snapshot: info.id.clone(),
                        path: path_text(&entry.path),
                        chunk: Some(chunk.id.hex()),
                        reason: e.to_string(),
                    }),
                }
            }
        }
    }
    report.elapsed_s = started.elapsed().as_secs_f64();
    Ok(report)
}
