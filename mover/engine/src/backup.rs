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

use std::collections::{HashSet, VecDeque};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crossbeam_channel::bounded;

use crate::job::{Job, JobControl, JobKind, JobState, Progress, Warning};
use crate::scan;
use crate::site::Site;
use crate::worker::{self, JobShared, RemoteTarget, Report, WorkerStats};
use mover_format::constants::{BACKUP_PENDING_ENTRIES_MAX, RESULT_QUEUE_DEPTH, WORK_QUEUE_DEPTH};
use mover_format::error::{Error, Result};
use mover_format::manifest::{Entry, EntryKind};
use mover_format::manifest_blocks::{Head, ManifestStream, ManifestWriter, MANIFEST_V2_VERSION};
use mover_format::{hex, ChunkId};
use mover_peer::remote::client::Control;
use mover_peer::remote::net::Net;
use mover_store::backend::sync_dir;
use mover_store::buffers::{memlock_limit_bytes, ReadPlan};
use mover_store::{manifest_key, SnapshotInfo};

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
                credentials: mover_peer::peers::credentials(site)?,
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
    let mut fatal: Option<Error> = None;
    let hostname = hostname();
    let mut written = Written::default();

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
        let prepared = match prepare(
            site,
            &source_bytes,
            shared.remote.as_ref(),
            net.as_deref(),
            &job.id,
        ) {
            Ok(prepared) => prepared,
            Err(e) => return stopped(Stop::Before(e)),
        };
        let head = Head {
            version: MANIFEST_V2_VERSION,
            source: source_bytes.clone(),
            hostname: hostname.clone(),
            site: site.name().to_string(),
            tier: tier.clone(),
            parent: prepared.parent.as_ref().map(|(id, _)| *id),
        };
        let mut out = match IncomingManifest::create(site, &job.id, &head) {
            Ok(out) => out,
            Err(e) => return stopped(Stop::Before(e)),
        };
        let Prepared {
            parent,
            damaged,
            control: held_control,
        } = prepared;
        let parent_id = parent.as_ref().map(|(id, _)| *id);
        let (entry_tx, entry_rx) = bounded::<(Entry, usize)>(ENTRY_QUEUE_DEPTH);
        let source = &source;
        let scanner = scope.spawn(move || {
            let mut sink = QueueSink {
                entries: entry_tx,
                work: work_tx,
                cancelled: &shared.cancelled,
            };
            match parent {
                Some((_, stream)) => {
                    let mut cursor = scan::ParentCursor::new(stream, damaged);
                    scan::scan(source, &mut cursor, &mut sink)
                }
                None => scan::scan(source, &mut scan::NoReuse, &mut sink),
            }
        });
        // Entries wait here from the scan until their extents are read, then go to the
        // manifest in scan order. At most BACKUP_PENDING_ENTRIES_MAX wait: beyond that the
        // scan waits (its queue fills), whatever the tree's size.
        let mut pending = Pending::default();
        let mut scanning = true;
        let mut workers_running = true;
        while scanning || workers_running {
            let cancelled = shared.cancelled.load(Ordering::Relaxed);
            let take_entries = scanning
                && (cancelled
                    || pending.waiting.len() < BACKUP_PENDING_ENTRIES_MAX
                    || pending.head_waits_on_other_jobs());
            let entries = if take_entries {
                &entry_rx
            } else {
                &never_entries()
            };
            let reports = if workers_running {
                &report_rx
            } else {
                &never_reports()
            };
            crossbeam_channel::select! {
                recv(entries) -> scanned => match scanned {
                    Ok((entry, work)) => pending.push(entry, work),
                    Err(_) => scanning = false,
                },
                recv(reports) -> report => {
                    let Ok(report) = report else {
                        workers_running = false;
                        continue;
                    };
                    if control.check().is_err() {
                        // Workers stop at their next extent and seal what they hold; sealed
                        // packs are still committed below, so a re-run does not store them
                        // again.
                        shared.cancelled.store(true, Ordering::Relaxed);
                    }
                    // A worker may report on an entry the scan queued before the control
                    // thread took it (its extents are queued right after it): take the
                    // entries up to it first. They are already queued, so this never waits
                    // on the scan, and it exceeds the bound by at most the entry queue.
                    if let Some(entry) = report.entry() {
                        while scanning && pending.next_entry() <= entry {
                            match entry_rx.recv() {
                                Ok((entry, work)) => pending.push(entry, work),
                                Err(_) => scanning = false,
                            }
                        }
                    }
                    match report {
                        Report::Extent(done) => {
                            job.bytes_done += done.bytes_read;
                            control.done(done.bytes_read);
                            pending.extent_done(done);
                        }
                        Report::Settled { entry, extent } => pending.settled(entry, extent),
                        Report::Skipped { entry, extent, reason } => pending.skipped(entry, extent, reason),
                        Report::PackSealed(pack) => {
                            job.bytes_sent += pack.bytes;
                            control.sent(pack.bytes);
                            // The job's one committer: packs become findable in the order
                            // they arrive, all before the snapshot.
                            if let Err(e) =
                                mover_store::sink::commit(&site.index, &shared.claims, &pack)
                            {
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
            }
            if fatal.is_none() && !shared.cancelled.load(Ordering::Relaxed) {
                if let Err(e) = pending.flush(&mut out, &mut written, &mut job.warnings) {
                    shared.cancelled.store(true, Ordering::Relaxed);
                    fatal.get_or_insert(e);
                }
            }
        }
        let mut scanned = match scanner.join().expect("scan thread does not panic") {
            Ok(scanned) => scanned,
            Err(e) => return stopped(Stop::Failed(Error::io("scan", source, e))),
        };
        job.bytes_total = scanned.bytes_total;
        job.bytes_reused = scanned.bytes_reused;
        job.files = scanned.files;
        job.files_reused = scanned.files_reused;
        job.directories = scanned.directories;
        job.warnings.append(&mut scanned.warnings);
        control.total(job.bytes_total);
        control.done(job.bytes_reused);
        if fatal.is_none()
            && !shared.cancelled.load(Ordering::Relaxed)
            && !pending.waiting.is_empty()
        {
            fatal = Some(Error::Resource(format!(
                "{} manifest entries still waited for their extents after every worker ended",
                pending.waiting.len()
            )));
        }
        Ok((held_control, out, parent_id))
    });
    let (mut held_control, out, parent) = match prepared {
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
    job.files -= written.files_left_out;
    job.bytes_done = job.bytes_total;

    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i64;
    let finished = match out.finish(now_ns) {
        Ok(finished) => finished,
        Err(e) => return Err(fail_job(site, &mut job, started, e)),
    };
    if let (Some(remote), Some(net)) = (&shared.remote, &net) {
        // The destination checks that it holds every chunk, stores the manifest durably, and
        // only then adds the catalog row.
        let (id, bytes) = match finished.read() {
            Ok(object) => object,
            Err(e) => return Err(fail_job(site, &mut job, started, e)),
        };
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
            control.commit(id, &bytes).await?;
            let (sent, received) = control.close().await;
            wire = (wire.0 + sent, wire.1 + received);
            Ok::<_, Error>(())
        });
        job.wire_bytes_sent += wire.0;
        job.wire_bytes_received += wire.1;
        if let Err(e) = committed {
            return Err(fail_job(site, &mut job, started, e));
        }
        job.snapshot = Some(hex(&id));
        job.state = JobState::Done;
        job.elapsed_s = started.elapsed().as_secs_f64();
        record_job(site, &job);
        return Ok(job);
    }
    let id = match finished.persist(site) {
        Ok(id) => id,
        Err(e) => return Err(fail_job(site, &mut job, started, e)),
    };
    let id_hex = hex(&id);
    site.index.put_snapshot(&SnapshotInfo {
        id: id_hex.clone(),
        time: crate::job::rfc3339(now_ns / 1_000_000_000),
        created_unix_ns: now_ns,
        site: site.name().to_string(),
        tier: tier.clone(),
        source: job.path.clone(),
        hostname,
        parent: parent.as_ref().map(|id| hex(id)),
        job: job.id.clone(),
        files: job.files,
        directories: job.directories,
        bytes: written.file_bytes,
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

/// Why a job stopped before its workers were given work: an error of the lookup
/// (returned as it is), or a stop the job records as failed or cancelled.
enum Stop {
    Before(Error),
    Failed(Error),
}

/// Entries between the scan and the control thread: enough to keep the scan ahead of the
/// workers without holding much.
const ENTRY_QUEUE_DEPTH: usize = 1024;

fn never_entries() -> crossbeam_channel::Receiver<(Entry, usize)> {
    crossbeam_channel::never()
}

fn never_reports() -> crossbeam_channel::Receiver<Report> {
    crossbeam_channel::never()
}

/// A parent snapshot's entries, read from the start (its id was checked by a first pass).
type ParentStream = ManifestStream<Box<dyn Read + Send>>;

/// What the control thread learns before the scan starts.
struct Prepared<'a> {
    /// The parent snapshot (at the destination, for a cross-site job) and its entries.
    parent: Option<([u8; 32], ParentStream)>,
    /// Chunks found damaged here: a file holding one is read again, even if unchanged.
    damaged: HashSet<ChunkId>,
    /// A cross-site job's Control connection, kept open for the commit (closed on the
    /// process's network runtime if the job stops first).
    control: HeldControl<'a>,
}

/// Finds the parent snapshot of the same source (at the destination for a cross-site job):
/// its unchanged files are reused without being read.
fn prepare<'a>(
    site: &Site,
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
        checked_parent(&id, &mut || {
            Ok(Box::new(std::io::Cursor::new(object.clone())) as Box<dyn Read + Send>)
        })
        .map(|stream| (id, stream))
    } else if remote.is_none() {
        local_parent(site, source_bytes)?
    } else {
        None
    };
    // A file with a chunk found damaged here is read again, even if unchanged: its good
    // bytes replace the bad record.
    let damaged: HashSet<ChunkId> = match (remote, &parent) {
        (None, Some(_)) => site
            .index
            .damaged()?
            .into_iter()
            .map(|(id, _)| id)
            .collect(),
        _ => Default::default(),
    };
    Ok(Prepared {
        parent,
        damaged,
        control: held,
    })
}

/// The parent's entries, once a first pass read the object whole and found it matches its
/// id (a version-2 object is checked only at its end, and a reused entry must be sound).
/// `None`, with a warning, when it does not: every file is then read.
fn checked_parent(
    id: &[u8; 32],
    open: &mut dyn FnMut() -> Result<Box<dyn Read + Send>>,
) -> Option<ParentStream> {
    let mut check = || -> Result<ParentStream> {
        let mut stream = ManifestStream::open(open()?, Some(id))?;
        while stream.next_entry()?.is_some() {}
        ManifestStream::open(open()?, Some(id))
    };
    match check() {
        Ok(stream) => Some(stream),
        Err(e) => {
            tracing::warn!(snapshot = %hex(id), error = %e, "parent snapshot unreadable; reading every file");
            None
        }
    }
}

/// The newest local snapshot of the same source, with its entries.
fn local_parent(site: &Site, source_bytes: &[u8]) -> Result<Option<([u8; 32], ParentStream)>> {
    let Some(info) = site
        .index
        .snapshots()?
        .into_iter()
        .rev()
        .find(|s| s.source.as_bytes() == source_bytes)
    else {
        return Ok(None);
    };
    let id = mover_format::parse_hex32(&info.id).ok_or_else(|| {
        Error::corrupt(
            format!("catalog row {}", info.id),
            "id is not 64 hex digits",
        )
    })?;
    let stream = checked_parent(&id, &mut || site.manifest_reader(&id));
    Ok(stream.map(|stream| (id, stream)))
}

/// The scan's side of its queues: entries to the control thread, extents to the workers.
struct QueueSink<'a> {
    entries: crossbeam_channel::Sender<(Entry, usize)>,
    work: crossbeam_channel::Sender<scan::WorkItem>,
    cancelled: &'a AtomicBool,
}

impl scan::ScanSink for QueueSink<'_> {
    fn entry(&mut self, entry: Entry, work: usize) -> bool {
        !self.cancelled.load(Ordering::Relaxed) && self.entries.send((entry, work)).is_ok()
    }

    fn work(&mut self, item: scan::WorkItem) -> bool {
        !self.cancelled.load(Ordering::Relaxed) && self.work.send(item).is_ok()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ExtentState {
    Reading,
    /// Read, but a chunk was another job's to store: final once that job committed it (or
    /// this job read the extent again).
    Borrowed,
    Done,
}

/// An entry waiting for its extents.
struct Waiting {
    entry: Entry,
    extents: Vec<ExtentState>,
    left: usize,
    borrowed: usize,
    skipped: Option<String>,
    changed: Option<String>,
}

/// The entries the scan gave and the manifest has not yet taken, in scan order.
#[derive(Default)]
struct Pending {
    /// The scan's number of `waiting[0]`.
    base: usize,
    waiting: VecDeque<Waiting>,
    /// Files left out of the snapshot: the hardlinks to them are left out too (they come
    /// later in scan order). Grows with the files left out, not with the tree.
    dropped: HashSet<Vec<u8>>,
}

/// What went into the manifest.
#[derive(Default)]
struct Written {
    file_bytes: u64,
    files_left_out: u64,
}

impl Pending {
    fn push(&mut self, entry: Entry, work: usize) {
        self.waiting.push_back(Waiting {
            entry,
            extents: vec![ExtentState::Reading; work],
            left: work,
            borrowed: 0,
            skipped: None,
            changed: None,
        });
    }

    /// The scan's number of the next entry pushed.
    fn next_entry(&self) -> usize {
        self.base + self.waiting.len()
    }

    fn get(&mut self, entry: usize) -> Option<&mut Waiting> {
        entry
            .checked_sub(self.base)
            .and_then(|i| self.waiting.get_mut(i))
    }

    /// True when the oldest entry waits only on chunks another job is storing: its wait ends
    /// when this job's workers finish, which needs the scan to finish, so the scan may run on.
    fn head_waits_on_other_jobs(&self) -> bool {
        self.waiting
            .front()
            .is_some_and(|w| w.left > 0 && w.left == w.borrowed)
    }

    fn mark(waiting: &mut Waiting, extent: usize, to: ExtentState) {
        let Some(state) = waiting.extents.get_mut(extent) else {
            return;
        };
        match (*state, to) {
            (ExtentState::Done, _) => return,
            (ExtentState::Reading, ExtentState::Borrowed) => waiting.borrowed += 1,
            (ExtentState::Borrowed, ExtentState::Done) => {
                waiting.borrowed -= 1;
                waiting.left -= 1;
            }
            (ExtentState::Borrowed, _) => return,
            (ExtentState::Reading, _) => waiting.left -= 1,
        }
        *state = to;
    }

    fn extent_done(&mut self, done: worker::ExtentDone) {
        let Some(waiting) = self.get(done.entry) else {
            return;
        };
        if waiting.extents.get(done.extent) == Some(&ExtentState::Done) {
            return;
        }
        if let Some(reason) = done.changed {
            waiting.changed.get_or_insert(reason);
        }
        if let EntryKind::File { extents, .. } = &mut waiting.entry.kind {
            if let Some(extent) = extents.get_mut(done.extent) {
                extent.chunks = done.chunks;
            }
        }
        let to = match done.borrowed {
            true => ExtentState::Borrowed,
            false => ExtentState::Done,
        };
        Self::mark(waiting, done.extent, to);
    }

    fn settled(&mut self, entry: usize, extent: usize) {
        if let Some(waiting) = self.get(entry) {
            Self::mark(waiting, extent, ExtentState::Done);
        }
    }

    fn skipped(&mut self, entry: usize, extent: usize, reason: String) {
        if let Some(waiting) = self.get(entry) {
            waiting.skipped.get_or_insert(reason);
            Self::mark(waiting, extent, ExtentState::Borrowed);
            Self::mark(waiting, extent, ExtentState::Done);
        }
    }

    /// Hands every finished entry at the front to the manifest, in scan order.
    fn flush(
        &mut self,
        out: &mut IncomingManifest,
        written: &mut Written,
        warnings: &mut Vec<Warning>,
    ) -> Result<()> {
        while self.waiting.front().is_some_and(|w| w.left == 0) {
            let waiting = self.waiting.pop_front().expect("checked above");
            self.base += 1;
            let entry = waiting.entry;
            if let Some(reason) = waiting.skipped {
                warnings.push(Warning {
                    path: path_text(&entry.path),
                    reason: format!("left out of the snapshot: {reason}"),
                });
                written.files_left_out += 1;
                self.dropped.insert(entry.path);
                continue;
            }
            if matches!(&entry.kind, EntryKind::Hardlink { target } if self.dropped.contains(target))
            {
                continue;
            }
            if let Some(reason) = waiting.changed {
                warnings.push(Warning {
                    path: path_text(&entry.path),
                    reason,
                });
            }
            if let EntryKind::File { size, .. } = &entry.kind {
                written.file_bytes += size;
            }
            out.writer.push(&entry)?;
        }
        Ok(())
    }
}

/// The manifest being written, in a temporary file of the site until the snapshot commits.
struct IncomingManifest {
    writer: ManifestWriter<std::io::BufWriter<std::fs::File>>,
    temp: TempFile,
}

/// Removed when dropped unless taken.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Where manifests are written before their id is known (a sibling of `manifests/`, so a
/// rename puts them in place and `repair-index` never reads a partial one).
const INCOMING_MANIFESTS: &str = "manifests-incoming";

impl IncomingManifest {
    fn create(site: &Site, job: &str, head: &Head) -> Result<IncomingManifest> {
        let dir = site.metadata.path_of(INCOMING_MANIFESTS);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
        remove_orphans(&dir);
        let path = dir.join(format!("{job}.{}.tmp", std::process::id()));
        let file = std::fs::File::create(&path).map_err(|e| Error::io("create", &path, e))?;
        let temp = TempFile(Some(path));
        let writer = ManifestWriter::new(std::io::BufWriter::with_capacity(1 << 20, file), head)?;
        Ok(IncomingManifest { writer, temp })
    }

    fn finish(self, created_unix_ns: i64) -> Result<FinishedManifest> {
        let (id, out) = self.writer.finish(created_unix_ns)?;
        let file = out
            .into_inner()
            .map_err(|e| Error::Resource(format!("writing the manifest: {}", e.error())))?;
        Ok(FinishedManifest {
            id,
            file,
            temp: self.temp,
        })
    }
}

/// Removes what killed processes left in `dir`: a file is `<job>.<pid>.tmp`, and a process
/// that no longer exists writes nothing (a reused pid only keeps a file longer).
fn remove_orphans(dir: &Path) {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in listing.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.rsplit_once('.'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

struct FinishedManifest {
    id: [u8; 32],
    file: std::fs::File,
    temp: TempFile,
}

impl FinishedManifest {
    /// Makes the manifest durable under its id (the snapshot is not yet visible: the catalog
    /// row comes after).
    fn persist(mut self, site: &Site) -> Result<[u8; 32]> {
        let path = self.temp.0.clone().expect("not taken");
        self.file
            .sync_data()
            .map_err(|e| Error::io("fsync", &path, e))?;
        let key = manifest_key(&self.id);
        let dest = site.metadata.path_of(&key);
        let parent = dest.parent().expect("keys have a parent");
        if !parent.exists() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io("create directory", parent, e))?;
            if let Some(grandparent) = parent.parent() {
                sync_dir(grandparent)?;
            }
        }
        if !dest.exists() {
            std::fs::rename(&path, &dest).map_err(|e| Error::io("rename", &path, e))?;
            self.temp.0 = None;
            sync_dir(parent)?;
        }
        Ok(self.id)
    }

    /// The object's bytes, to send to a peer.
    fn read(self) -> Result<([u8; 32], Vec<u8>)> {
        let path = self.temp.0.clone().expect("not taken");
        let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        Ok((self.id, bytes))
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

    fn file(path: &str, extents: usize) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: EntryKind::File {
                size: extents as u64,
                extents: (0..extents)
                    .map(|i| mover_format::manifest::Extent {
                        offset: i as u64,
                        chunks: Vec::new(),
                    })
                    .collect(),
            },
            mode: 0,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            inode: 0,
            device: 0,
        }
    }

    fn done(entry: usize, extent: usize, borrowed: bool, id: u8) -> worker::ExtentDone {
        worker::ExtentDone {
            entry,
            extent,
            chunks: vec![mover_format::manifest::ChunkRef {
                id: ChunkId([id; 32]),
                len: 1,
            }],
            bytes_read: 1,
            changed: None,
            borrowed,
        }
    }

    #[test]
    fn manifests_left_by_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join("job-1.4294967295.tmp");
        let alive = dir.path().join(format!("job-2.{}.tmp", std::process::id()));
        let other = dir.path().join("notes");
        for path in [&dead, &alive, &other] {
            std::fs::write(path, b"x").unwrap();
        }
        remove_orphans(dir.path());
        assert!(!dead.exists());
        assert!(alive.exists() && other.exists());
    }

    /// Entries leave in scan order once all their extents are final; an extent whose chunk
    /// another job was storing is final only when settled or read again (its second chunk
    /// list is the one written).
    #[test]
    fn pending_entries_leave_in_order_once_their_extents_are_final() {
        let dir = tempfile::tempdir().unwrap();
        let site_dir = dir.path().join("site");
        crate::site::init(&crate::site::InitOptions {
            name: "a",
            dir: &site_dir,
            listen: None,
            socket: None,
        })
        .unwrap();
        let site = Site::open(&site_dir).unwrap();
        let head = Head {
            version: MANIFEST_V2_VERSION,
            source: b"/s".to_vec(),
            hostname: String::new(),
            site: "a".into(),
            tier: "hot".into(),
            parent: None,
        };
        let mut out = IncomingManifest::create(&site, "job", &head).unwrap();
        let (mut written, mut warnings) = (Written::default(), Vec::new());
        let mut pending = Pending::default();
        pending.push(file("a", 2), 2);
        pending.push(file("b", 1), 1);
        pending.push(file("c", 1), 1);
        pending.extent_done(done(1, 0, false, 1));
        pending.extent_done(done(0, 1, true, 2));
        pending
            .flush(&mut out, &mut written, &mut warnings)
            .unwrap();
        assert_eq!(out.writer.entries(), 0, "b must wait for a");
        pending.extent_done(done(0, 0, false, 3));
        assert!(pending.head_waits_on_other_jobs());
        pending
            .flush(&mut out, &mut written, &mut warnings)
            .unwrap();
        assert_eq!(out.writer.entries(), 0, "a's borrowed extent is not final");
        // Read again: the new chunk list replaces the first.
        pending.extent_done(done(0, 1, false, 4));
        pending.skipped(2, 0, "gone".into());
        pending
            .flush(&mut out, &mut written, &mut warnings)
            .unwrap();
        assert_eq!(out.writer.entries(), 2);
        assert_eq!(written.files_left_out, 1);
        assert!(pending.waiting.is_empty());
        // Late reports for entries already written are ignored.
        pending.settled(0, 1);
        pending.extent_done(done(1, 0, false, 9));
        let finished = out.finish(1).unwrap();
        let (id, bytes) = finished.read().unwrap();
        let manifest = mover_format::manifest::decode(&bytes, Some(&id)).unwrap();
        let chunks = |e: &Entry| match &e.kind {
            EntryKind::File { extents, .. } => extents
                .iter()
                .flat_map(|x| &x.chunks)
                .map(|c| c.id.0[0])
                .collect::<Vec<_>>(),
            _ => vec![],
        };
        let paths: Vec<_> = manifest.entries.iter().map(|e| e.path.clone()).collect();
        assert_eq!(paths, [b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(chunks(&manifest.entries[0]), [3, 4]);
        assert_eq!(warnings.len(), 1);
    }

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
        let mut store = crate::site::Store::open(&dir).unwrap();
        store.config.engine.workers = 2;
        store.config.engine.pin_workers = Some(false);
        let site = Site::new(store);

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
            let id = mover_format::parse_hex32(job.snapshot.as_ref().unwrap()).unwrap();
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
