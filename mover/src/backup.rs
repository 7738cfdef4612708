//! A backup job: scan on the control thread, pinned workers read and store, the control thread
//! commits sealed packs to the index as they arrive and the snapshot last.
//!
//! Commit order (what makes kill -9 safe at any instant):
//! 1. a worker seals a pack: footer written, fdatasync, directory fsync;
//! 2. the control thread commits the pack's chunk locations to the index (redb, fsync);
//! 3. after all workers finish: the manifest object is written durably (tmp, fsync, rename);
//! 4. the catalog row is committed: only now does the snapshot exist.
//!
//! A crash before 4 leaves unreferenced packs and index rows (reused by the next backup's
//! dedup, which is how a re-run resumes) and never a visible partial snapshot.

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crossbeam_channel::bounded;

use crate::buffers::{memlock_limit_bytes, ReadPlan};
use crate::constants::{RESULT_QUEUE_DEPTH, WORK_QUEUE_DEPTH};
use crate::error::{Error, Result};
use crate::format::manifest::{Entry, EntryKind, Manifest, MANIFEST_VERSION};
use crate::format::{hex, ChunkId};
use crate::job::{Job, JobControl, JobKind, JobState, Progress, Warning};
use crate::remote::client::Control;
use crate::remote::net::Net;
use crate::scan::{self, ReuseMap};
use crate::site::Site;
use crate::store::SnapshotInfo;
use crate::worker::{self, JobShared, RemoteTarget, Report, WorkerStats};

pub struct BackupOptions<'a> {
    pub source: &'a Path,
    pub tier: Option<&'a str>,
    /// A peer site to back up to instead of this site (`--to SITE[:TIER]`).
    pub to: Option<&'a str>,
    /// Set when the daemon runs the job: live progress and the stop flag.
    pub control: Option<&'a JobControl>,
}

/// The Control connection a cross-site backup holds from its parent lookup to its commit.
/// A job that stops on the way closes it here, so the peer is told at once instead of
/// holding the connection until its idle timeout.
struct HeldControl<'a> {
    control: Option<Control>,
    net: Option<&'a Net>,
}

impl Drop for HeldControl<'_> {
    fn drop(&mut self) {
        if let (Some(control), Some(net)) = (self.control.take(), self.net) {
            net.block_on(control.close());
        }
    }
}

/// Splits `SITE[:TIER]`.
pub fn parse_destination(to: &str) -> (&str, Option<&str>) {
    match to.split_once(':') {
        Some((site, tier)) if !tier.is_empty() => (site, Some(tier)),
        Some((site, _)) => (site, None),
        None => (to, None),
    }
}

/// Runs a backup to completion. Errors that stop the job come back as `Err`; per-file
/// problems are warnings in the returned job.
pub fn run(site: &Site, options: &BackupOptions) -> Result<Job> {
    let started = Instant::now();
    let source = options
        .source
        .canonicalize()
        .map_err(|e| Error::io("resolve backup source", options.source, e))?;
    let control = options.control;
    let mut job = Job::new(
        JobKind::Backup,
        site.name(),
        source.display().to_string(),
        control,
    );
    // A cross-site backup stores nothing here: chunks, manifest and catalog row go to the peer.
    let remote = match options.to {
        Some(to) => {
            let (peer, tier) = parse_destination(to);
            if tier.is_some() && options.tier.is_some() {
                return Err(Error::Refused(
                    "give the tier either as --to SITE:TIER or --tier, not both".into(),
                ));
            }
            Some(RemoteTarget {
                link: site.links.link(peer)?,
                credentials: crate::peers::credentials(site)?,
                tier: tier.or(options.tier).unwrap_or("").to_string(),
                job: job.id.clone(),
                attempt: JobControl::attempt_of(control),
            })
        }
        None => None,
    };
    let tier = match &remote {
        Some(remote) => remote.tier.clone(),
        None => options
            .tier
            .unwrap_or_else(|| site.config.default_tier())
            .to_string(),
    };
    let backend = match &remote {
        Some(_) => site.tier(site.config.default_tier())?.clone(),
        None => {
            // A daemon opens its site once: what a killed writer of another process left
            // since then is reclaimed here, beside this site's running writers.
            site.reclaim_packs(&tier);
            site.tier(&tier)?.clone()
        }
    };
    // Empty for a peer's default tier, which only the peer knows.
    job.tier = Some(tier.clone()).filter(|t| !t.is_empty());
    job.destination = remote.as_ref().map(|r| r.link.site.clone());

    let workers = site.config.workers();
    let plan = ReadPlan::new(
        workers,
        site.config.read_buffer_bytes(),
        site.config.engine.io_memory_bytes.bytes(),
        memlock_limit_bytes(),
    )?;
    job.workers = workers;

    // The parent is the newest snapshot of the same source (at the destination): its
    // unchanged files are reused without being read.
    let source_bytes = source.as_os_str().as_bytes().to_vec();
    // The process's endpoint and runtime carry the job's Control connection (parent lookup
    // and commit); the workers dial from their own.
    let net = match &remote {
        Some(_) => Some(site.net()?),
        None => None,
    };
    let shared = JobShared {
        index: &site.index,
        tier: tier.clone(),
        backend,
        plan,
        pack_target_bytes: site.config.pack_target_bytes(),
        cancelled: AtomicBool::new(false),
        claims: site.in_flight.owner(),
        shipped: Mutex::new(HashSet::new()),
        buffered_noted: AtomicBool::new(false),
        remote,
        control,
    };
    let cores = if site.config.pin_workers() {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut totals = WorkerStats::default();
    let mut skipped: HashMap<usize, String> = HashMap::new();
    let mut changed: HashMap<usize, String> = HashMap::new();
    let mut fatal: Option<Error> = None;

    let prepared = std::thread::scope(|scope| {
        let (work_tx, work_rx) = bounded(WORK_QUEUE_DEPTH);
        let (report_tx, report_rx) = bounded(RESULT_QUEUE_DEPTH);
        let shared = &shared;
        // Workers start before the parent lookup and the scan: a cross-site worker opens its
        // connection and stream to the peer meanwhile (two round trips off a WAN job's start),
        // then waits for the first extent.
        for i in 0..workers {
            let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
            let (work_rx, report_tx) = (work_rx.clone(), report_tx.clone());
            std::thread::Builder::new()
                .name(format!("mover-worker-{i}"))
                .spawn_scoped(scope, move || worker::run(shared, core, work_rx, report_tx))
                .expect("spawn worker thread");
        }
        drop((work_rx, report_tx));
        // A stop before any work is queued closes the queue: the workers finish with nothing
        // shipped, and the scope waits for them.
        let stopped = |e: Stop| {
            shared.cancelled.store(true, Ordering::Relaxed);
            Err(e)
        };
        let mut prepared = match prepare(
            site,
            &source,
            &source_bytes,
            shared.remote.as_ref(),
            net.as_deref(),
            &job.id,
        ) {
            Ok(prepared) => prepared,
            Err(e) => return stopped(Stop::Before(e)),
        };
        let scanned = &mut prepared.scanned;
        job.bytes_total = scanned.bytes_total;
        job.bytes_reused = scanned.bytes_reused;
        job.files = scanned.files;
        job.files_reused = scanned.files_reused;
        job.directories = scanned.directories;
        job.warnings.append(&mut scanned.warnings);
        control.total(job.bytes_total);
        control.done(job.bytes_reused);
        if let Err(e) = control.check() {
            return stopped(Stop::Failed(e));
        }
        let work = std::mem::take(&mut scanned.work);
        scope.spawn(move || {
            for item in work {
                if shared.cancelled.load(Ordering::Relaxed) || work_tx.send(item).is_err() {
                    break;
                }
            }
        });
        for report in report_rx {
            if control.check().is_err() {
                // Workers stop at their next extent and seal what they hold; sealed packs
                // are still committed below, so a re-run does not store them again.
                shared.cancelled.store(true, Ordering::Relaxed);
            }
            match report {
                Report::Extent(done) => {
                    job.bytes_done += done.bytes_read;
                    control.done(done.bytes_read);
                    if let Some(reason) = done.changed {
                        changed.entry(done.entry).or_insert(reason);
                    }
                    if let EntryKind::File { extents, .. } = &mut scanned.entries[done.entry].kind {
                        extents[done.extent].chunks = done.chunks;
                    }
                }
                Report::Skipped { entry, reason } => {
                    skipped.entry(entry).or_insert(reason);
                }
                Report::PackSealed(pack) => {
                    job.bytes_sent += pack.bytes;
                    control.sent(pack.bytes);
                    let committing = Instant::now();
                    let committed = site.index.commit_pack(&pack);
                    worker::stage("index_commit", committing);
                    if committed.is_ok() {
                        shared.claims.release(pack.entries.iter().map(|e| &e.id));
                    }
                    if let Err(e) = committed {
                        shared.cancelled.store(true, Ordering::Relaxed);
                        fatal.get_or_insert(e);
                    }
                }
                Report::Finished(stats) => add_stats(&mut totals, &stats),
                Report::Fatal(e) => {
                    shared.cancelled.store(true, Ordering::Relaxed);
                    fatal.get_or_insert(e);
                }
            }
        }
        Ok(prepared)
    });
    let Prepared {
        parent,
        control: mut held_control,
        scanned,
    } = match prepared {
        Ok(prepared) => prepared,
        Err(Stop::Before(e)) => return Err(e),
        Err(Stop::Failed(e)) => return Err(fail_job(site, &mut job, started, e)),
    };

    job.bytes_read = totals.bytes_read;
    job.bytes_new = totals.bytes_new;
    job.chunks_total = totals.chunks_total;
    job.chunks_new = totals.chunks_new;
    job.direct_io = totals.buffered_files == 0;
    job.registered_reads = totals.registered_workers == workers as u64;
    if shared.remote.is_some() {
        let ship = &totals.ship;
        job.chunks_new = ship.chunks_sent;
        job.bytes_new = ship.raw_bytes_sent;
        job.bytes_sent = ship.payload_bytes_sent;
        job.wire_bytes_sent += ship.wire_bytes_sent;
        job.wire_bytes_received += ship.wire_bytes_received;
    }
    job.memcpy_per_byte = if totals.bytes_read > 0 {
        totals.memcpy_bytes as f64 / totals.bytes_read as f64
    } else {
        0.0
    };
    if let Some(e) = fatal {
        return Err(fail_job(site, &mut job, started, e));
    }
    if let Err(e) = control.check() {
        return Err(fail_job(site, &mut job, started, e));
    }

    for (entry, reason) in &changed {
        if !skipped.contains_key(entry) {
            job.warnings.push(Warning {
                path: path_text(&scanned.entries[*entry].path),
                reason: reason.clone(),
            });
        }
    }
    let mut entries = scanned.entries;
    if !skipped.is_empty() {
        let mut dropped_paths = HashSet::new();
        for (entry, reason) in &skipped {
            job.warnings.push(Warning {
                path: path_text(&entries[*entry].path),
                reason: format!("left out of the snapshot: {reason}"),
            });
            dropped_paths.insert(entries[*entry].path.clone());
        }
        let mut index = 0;
        entries.retain(|e| {
            let keep = !skipped.contains_key(&index)
                && !matches!(&e.kind, EntryKind::Hardlink { target } if dropped_paths.contains(target));
            index += 1;
            keep
        });
        job.files -= skipped.len() as u64;
    }
    job.bytes_done = job.bytes_total;

    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i64;
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        source: source_bytes,
        hostname: hostname(),
        site: site.name().to_string(),
        tier: tier.clone(),
        created_unix_ns: now_ns,
        parent: parent.as_ref().map(|(id, _)| *id),
        entries,
    };
    if let (Some(remote), Some(net)) = (&shared.remote, &net) {
        // The destination checks that it holds every chunk, stores the manifest durably, and
        // only then adds the catalog row.
        let encoded = crate::format::manifest::encode(&manifest)?;
        let mut wire = (0, 0);
        let committed = net.block_on(async {
            let mut control = match held_control.control.take() {
                Some(control) if control.is_open() => control,
                stale => {
                    if let Some(stale) = stale {
                        wire = stale.close().await;
                    }
                    Control::open(net, &remote.link, &remote.credentials, &job.id).await?
                }
            };
            control.commit(encoded.id, &encoded.bytes).await?;
            let (sent, received) = control.close().await;
            wire = (wire.0 + sent, wire.1 + received);
            Ok::<_, Error>(())
        });
        job.wire_bytes_sent += wire.0;
        job.wire_bytes_received += wire.1;
        if let Err(e) = committed {
            return Err(fail_job(site, &mut job, started, e));
        }
        job.snapshot = Some(hex(&encoded.id));
        job.state = JobState::Done;
        job.elapsed_s = started.elapsed().as_secs_f64();
        record_job(site, &job);
        return Ok(job);
    }
    let id = site.store_manifest(&manifest)?;
    let id_hex = hex(&id);
    site.index.put_snapshot(&SnapshotInfo {
        id: id_hex.clone(),
        time: crate::job::rfc3339(now_ns / 1_000_000_000),
        created_unix_ns: now_ns,
        site: site.name().to_string(),
        tier: tier.clone(),
        source: job.path.clone(),
        hostname: manifest.hostname.clone(),
        parent: parent.as_ref().map(|(id, _)| hex(id)),
        job: job.id.clone(),
        files: job.files,
        directories: job.directories,
        bytes: manifest
            .entries
            .iter()
            .map(|e| match &e.kind {
                EntryKind::File { size, .. } => *size,
                _ => 0,
            })
            .sum(),
        warnings: job.warnings.len() as u64,
        held_since_unix_ns: now_ns,
    })?;
    job.snapshot = Some(id_hex);
    job.elapsed_s = started.elapsed().as_secs_f64();
    // After the snapshot is visible, so a merge cannot fail it; not in elapsed_s (it is
    // housekeeping, not the backup); a cancel or a drain ends it within one small pack.
    job.packs_merged =
        site.merge_small_packs(&tier, &|| control.is_some_and(JobControl::stop_requested));
    job.state = JobState::Done;
    record_job(site, &job);
    Ok(job)
}

/// Why a job stopped before its workers were given work: an error of the lookup or scan
/// (returned as it is), or a stop the job records as failed or cancelled.
enum Stop {
    Before(Error),
    Failed(Error),
}

/// What the control thread learns before the workers get work.
struct Prepared<'a> {
    /// The parent snapshot (at the destination, for a cross-site job) and its manifest.
    parent: Option<([u8; 32], Manifest)>,
    /// A cross-site job's Control connection, kept open for the commit (closed on the
    /// process's network runtime if the job stops first).
    control: HeldControl<'a>,
    scanned: scan::ScanResult,
}

/// Finds the parent snapshot of the same source (at the destination for a cross-site job)
/// and scans the source against it: its unchanged files are reused without being read.
fn prepare<'a>(
    site: &Site,
    source: &Path,
    source_bytes: &[u8],
    remote: Option<&RemoteTarget>,
    net: Option<&'a Net>,
    job_id: &str,
) -> Result<Prepared<'a>> {
    let (remote_parent, control) = match (remote, net) {
        (Some(remote), Some(net)) => net.block_on(async {
            let mut control = Control::open(net, &remote.link, &remote.credentials, job_id).await?;
            let found = control.get_manifest(true, source_bytes).await?;
            Ok::<_, Error>((found, Some(control)))
        })?,
        _ => (None, None),
    };
    // Closed on the network runtime if anything below fails.
    let held = HeldControl { control, net };
    let parent = if let Some((id, object)) = remote_parent {
        match crate::format::manifest::decode(&object, Some(&id)) {
            Ok(manifest) => Some((id, manifest)),
            Err(e) => {
                tracing::warn!(snapshot = %hex(&id), error = %e, "parent snapshot from the peer unreadable; reading every file");
                None
            }
        }
    } else if remote.is_none() {
        local_parent(site, source_bytes)?
    } else {
        None
    };
    // A file with a chunk found damaged here is read again, even if unchanged: its good
    // bytes replace the bad record.
    let damaged: HashSet<ChunkId> = match remote {
        None => site
            .index
            .damaged()?
            .into_iter()
            .map(|(id, _)| id)
            .collect(),
        Some(_) => Default::default(),
    };
    let intact = |e: &Entry| match &e.kind {
        EntryKind::File { extents, .. } => !extents
            .iter()
            .flat_map(|x| &x.chunks)
            .any(|c| damaged.contains(&c.id)),
        _ => true,
    };
    let reuse: ReuseMap = parent
        .as_ref()
        .map(|(_, m)| {
            m.entries
                .iter()
                .filter(|e| damaged.is_empty() || intact(e))
                .map(|e| (e.path.as_slice(), e))
                .collect()
        })
        .unwrap_or_default();
    let scanned = scan::scan(source, &reuse).map_err(|e| Error::io("scan", source, e))?;
    drop(reuse);
    Ok(Prepared {
        parent,
        control: held,
        scanned,
    })
}

/// The newest local snapshot of the same source, with its manifest.
fn local_parent(site: &Site, source_bytes: &[u8]) -> Result<Option<([u8; 32], Manifest)>> {
    let Some(info) = site
        .index
        .snapshots()?
        .into_iter()
        .rev()
        .find(|s| s.source.as_bytes() == source_bytes)
    else {
        return Ok(None);
    };
    let id = crate::format::parse_hex32(&info.id).ok_or_else(|| {
        Error::corrupt(
            format!("catalog row {}", info.id),
            "id is not 64 hex digits",
        )
    })?;
    match site.load_manifest(&id) {
        Ok(manifest) => Ok(Some((id, manifest))),
        Err(e) => {
            tracing::warn!(snapshot = %info.id, error = %e, "parent snapshot unreadable; reading every file");
            Ok(None)
        }
    }
}

fn add_stats(total: &mut WorkerStats, s: &WorkerStats) {
    total.bytes_read += s.bytes_read;
    total.bytes_new += s.bytes_new;
    total.bytes_stored += s.bytes_stored;
    total.chunks_total += s.chunks_total;
    total.chunks_new += s.chunks_new;
    total.memcpy_bytes += s.memcpy_bytes;
    total.registered_workers += s.registered_workers;
    total.buffered_files += s.buffered_files;
    let (t, w) = (&mut total.ship, &s.ship);
    t.chunks_sent += w.chunks_sent;
    t.payload_bytes_sent += w.payload_bytes_sent;
    t.raw_bytes_sent += w.raw_bytes_sent;
    t.chunks_present += w.chunks_present;
    t.raw_bytes_present += w.raw_bytes_present;
    t.wire_bytes_sent += w.wire_bytes_sent;
    t.wire_bytes_received += w.wire_bytes_received;
}

/// Marks the job failed with `e`, records it in the history and hands `e` back.
fn fail_job(site: &Site, job: &mut Job, started: Instant, e: Error) -> Error {
    job.elapsed_s = started.elapsed().as_secs_f64();
    record_failure(site, job, e)
}

/// Ends `job` with `e` (failed, or cancelled when asked to stop), records it in the history
/// and hands `e` back.
pub fn record_failure(site: &Site, job: &mut Job, e: Error) -> Error {
    job.state = JobState::after(&e);
    job.error = Some(e.to_string());
    record_job(site, job);
    e
}

/// Keeps the job's final document in the site's history; a failure to do so is logged, not
/// fatal, since the job's real outcome is already durable (or not) in the catalog.
pub fn record_job(site: &Site, job: &Job) {
    let json = serde_json::to_string(job).expect("job serialises");
    if let Err(e) = site.index.put_job(&job.id, &json) {
        tracing::warn!(job = %job.id, error = %e, "could not record the job in the history");
    }
}

pub fn path_text(path: &[u8]) -> String {
    if path.is_empty() {
        ".".into()
    } else {
        String::from_utf8_lossy(path).into_owned()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Incompressible, distinct bytes: every chunk of the tree is new to the site.
    fn random_tree(dir: &Path, files: usize, bytes: usize) {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for f in 0..files {
            let mut data = Vec::with_capacity(bytes);
            while data.len() < bytes {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                data.extend_from_slice(&state.to_le_bytes());
            }
            std::fs::write(dir.join(format!("f{f}")), &data).unwrap();
        }
    }

    #[test]
    fn concurrent_backups_of_one_tree_store_each_chunk_once() {
        let base = tempfile::tempdir().unwrap();
        let source = base.path().join("data");
        std::fs::create_dir(&source).unwrap();
        random_tree(&source, 12, 3 << 20);
        let dir = base.path().join("site");
        crate::site::init(&crate::site::InitOptions {
            name: "a",
            dir: &dir,
            listen: None,
            socket: None,
        })
        .unwrap();
        let mut site = Site::open(&dir).unwrap();
        site.config.engine.workers = 2;
        site.config.engine.pin_workers = Some(false);

        // Both jobs start together, as the daemon runs them with `api.running_jobs_max = 2`.
        let start = std::sync::Barrier::new(2);
        let jobs: Vec<Job> = std::thread::scope(|s| {
            let run = || {
                start.wait();
                run(
                    &site,
                    &BackupOptions {
                        source: &source,
                        tier: None,
                        to: None,
                        control: None,
                    },
                )
                .unwrap()
            };
            let (a, b) = (s.spawn(run), s.spawn(run));
            vec![a.join().unwrap(), b.join().unwrap()]
        });

        let stored: u64 = jobs.iter().map(|j| j.chunks_new).sum();
        let distinct = site.index.chunk_count().unwrap();
        assert!(distinct >= 12, "{distinct} chunks indexed");
        assert_eq!(
            stored, distinct,
            "records stored by both jobs vs distinct chunks"
        );
        assert!(site.in_flight.is_empty(), "claims outlived their jobs");
        // Both snapshots are whole: every chunk they name is indexed.
        let reader = site.index.reader().unwrap();
        for job in &jobs {
            let id = crate::format::parse_hex32(job.snapshot.as_ref().unwrap()).unwrap();
            for entry in site.load_manifest(&id).unwrap().entries {
                if let EntryKind::File { extents, .. } = entry.kind {
                    for chunk in extents.iter().flat_map(|x| &x.chunks) {
                        assert!(reader.contains(&chunk.id).unwrap());
                    }
                }
            }
        }
    }
}
