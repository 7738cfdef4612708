//! A pinned worker: owns an io_uring, a chunk window and an open pack. It takes extents from
//! the shared work queue and reports chunk lists and sealed packs.
//!
//! Per extent: up to `reads_per_worker` direct reads are in flight while the thread chunks,
//! hashes and compresses what already arrived. Each read lands straight in the chunk window,
//! after the bytes not yet cut; the window is a mirrored ring, so a chunk that spans reads,
//! or wraps around the ring, is still one contiguous slice for FastCDC and BLAKE3, and no byte
//! is copied on the read side. The window's slots are registered with the ring when the
//! memlock budget allows ([`ReadPlan`]).

use mover_metrics::stage;
use std::collections::{HashSet, VecDeque};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};
use tokio_uring::buf::fixed::FixedBufRegistry;
use tokio_uring::buf::BoundedBuf;

use crate::chunker::{cut_is_final, next_chunk_len};
use crate::compress::Compressor;
use crate::scan::WorkItem;
use crate::window::{Span, Window};
use mover_format::error::{Error, Result};
use mover_format::manifest::ChunkRef;
use mover_format::pack::RecordHeader;
use mover_format::ChunkId;
use mover_peer::remote::ship::Shipper;
use mover_store::buffers::{align_up, is_aligned, ReadPlan};
use mover_store::index::{Index, SealedPack};
use mover_store::inflight::Owner;
use mover_store::sink::{Admit, PackSink};
use mover_store::Backend;

/// What a worker tells the control thread.
pub enum Report {
    Extent(ExtentDone),
    /// The item could not be read; the file is left out of the snapshot with this reason.
    Skipped {
        entry: usize,
        extent: usize,
        reason: String,
    },
    /// An extent reported with `borrowed` set is final as it was: the chunks another job
    /// held were committed by it.
    Settled {
        entry: usize,
        extent: usize,
    },
    PackSealed(SealedPack),
    Finished(WorkerStats),
    Fatal(Error),
}

impl Report {
    /// The scan's number of the entry the report is about, if it is about one.
    pub fn entry(&self) -> Option<usize> {
        match self {
            Report::Extent(done) => Some(done.entry),
            Report::Skipped { entry, .. } | Report::Settled { entry, .. } => Some(*entry),
            Report::PackSealed(_) | Report::Finished(_) | Report::Fatal(_) => None,
        }
    }
}

pub struct ExtentDone {
    pub entry: usize,
    pub extent: usize,
    pub chunks: Vec<ChunkRef>,
    pub bytes_read: u64,
    /// Set when the file changed while it was read.
    pub changed: Option<String>,
    /// Some chunk was held by another job's writer: the extent is final only after a
    /// `Report::Settled` for it, or a second `Extent` report (read again) without this flag.
    pub borrowed: bool,
}

#[derive(Default, Debug, Clone)]
pub struct WorkerStats {
    pub bytes_read: u64,
    pub bytes_new: u64,
    pub bytes_stored: u64,
    pub chunks_total: u64,
    pub chunks_new: u64,
    pub memcpy_bytes: u64,
    pub buffered_files: u64,
    /// Workers (1 for one worker's stats) whose reads went to a registered window.
    pub registered_workers: u64,
    /// Cross-site jobs: what the worker's connection shipped.
    pub ship: mover_peer::remote::ship::ShipStats,
}

/// Everything workers of one job share. Only the `pending` set is written concurrently.
pub struct JobShared<'a> {
    pub index: &'a Index,
    pub tier: String,
    pub backend: Arc<dyn Backend>,
    pub plan: ReadPlan,
    pub pack_target_bytes: u64,
    pub cancelled: AtomicBool,
    /// A local job's claims in the site's in-flight set: a chunk another job (or another of
    /// this job's workers) is storing is not stored again (`store::inflight`).
    pub claims: Owner<'a>,
    /// A cross-site job's chunks already offered to the peer, so two of its workers do not
    /// both ship a chunk they meet at the same time (the destination dedups across jobs).
    pub shipped: Mutex<HashSet<ChunkId>>,
    /// "O_DIRECT refused, reading buffered" is logged once per job, not per file.
    pub buffered_noted: AtomicBool,
    /// Set for a cross-site backup: new chunks go to this peer instead of a local pack.
    pub remote: Option<RemoteTarget>,
    /// The daemon's view of the job (progress of shipped bytes).
    pub control: Option<&'a crate::job::JobControl>,
}

/// Where a cross-site backup ships to.
pub struct RemoteTarget {
    pub link: mover_peer::peers::Link,
    pub credentials: transport::tls::SiteCredentials,
    /// Tier at the destination ("" = its default).
    pub tier: String,
    pub job: String,
    /// Which attempt of the job this is (see `Shipper::connect`).
    pub attempt: u64,
}

pub fn run(
    shared: &JobShared,
    core: Option<core_affinity::CoreId>,
    work: Receiver<WorkItem>,
    reports: Sender<Report>,
) {
    if let Some(core) = core {
        if !core_affinity::set_for_current(core) {
            tracing::warn!(
                core = core.id,
                "could not pin worker to its core; running unpinned"
            );
        }
    }
    tokio_uring::builder().entries(64).start(async {
        let mut worker = match Worker::new(shared) {
            Ok(worker) => worker,
            Err(e) => {
                let _ = reports.send(Report::Fatal(e));
                return;
            }
        };
        let outcome = worker.start_remote().await;
        let outcome = match outcome {
            Ok(()) => worker.drain(&work, &reports).await,
            Err(e) => Err(e),
        };
        let outcome = match outcome {
            Ok(()) => worker.finish(&reports).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                let _ = reports.send(Report::Finished(worker.stats.clone()));
            }
            Err(e) => {
                shared.cancelled.store(true, Ordering::Relaxed);
                let _ = reports.send(Report::Fatal(e));
            }
        }
    });
}

struct Worker<'a> {
    shared: &'a JobShared<'a>,
    window: Window,
    /// The window's slots as fixed buffers, when the plan registers them and the kernel
    /// accepted them.
    registered: Option<FixedBufRegistry<Span>>,
    compressor: Compressor,
    /// Where new chunks go: this site's packs or a peer.
    sink: ChunkSink<'a>,
    /// Shipped payload bytes already added to the job's live progress.
    sent_reported: u64,
    /// Chunks referenced while another job held their claim, with the extent that met them:
    /// settled (committed by their owner, or stored here) before this worker finishes.
    borrowed: Vec<(ChunkId, WorkItem)>,
    stats: WorkerStats,
}

impl<'a> Worker<'a> {
    fn new(shared: &'a JobShared<'a>) -> Result<Worker<'a>> {
        let plan = shared.plan;
        let window = Window::new(plan.window_bytes).map_err(|e| {
            Error::Resource(format!(
                "mapping the {} MiB chunk window failed: {e}",
                plan.window_bytes >> 20
            ))
        })?;
        let registered = if plan.registered {
            match register(&window, &plan) {
                Ok(registry) => Some(registry),
                Err(e) if plan.required => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "reading into an unregistered chunk window");
                    None
                }
            }
        } else {
            None
        };
        let stats = WorkerStats {
            registered_workers: registered.is_some() as u64,
            ..WorkerStats::default()
        };
        Ok(Worker {
            shared,
            window,
            registered,
            compressor: Compressor::new(),
            sink: ChunkSink::Local(PackSink::new(
                shared.index,
                &shared.tier,
                shared.backend.clone(),
                shared.pack_target_bytes,
            )),
            sent_reported: 0,
            borrowed: Vec::new(),
            stats,
        })
    }

    /// A cross-site job: connects this worker's own QUIC connection to the destination.
    async fn start_remote(&mut self) -> Result<()> {
        if let Some(remote) = &self.shared.remote {
            self.sink = ChunkSink::Peer(Box::new(
                Shipper::connect(
                    &remote.link,
                    &remote.credentials,
                    &remote.tier,
                    &remote.job,
                    remote.attempt,
                )
                .await?,
            ));
        }
        Ok(())
    }

    /// Seals the local pack, or ships what is left and waits for the peer's acknowledgements.
    async fn finish(&mut self, reports: &Sender<Report>) -> Result<()> {
        self.seal_pack(reports)?;
        self.settle_borrowed(reports).await?;
        if let ChunkSink::Peer(shipper) = std::mem::replace(&mut self.sink, ChunkSink::Finished) {
            self.stats.ship = shipper.finish().await?;
            self.report_sent(self.stats.ship.payload_bytes_sent);
        }
        Ok(())
    }

    /// Waits until every chunk this worker referenced under another job's claim is committed;
    /// an extent whose chunk was given up by its owner is read again and stored here. The
    /// worker's own pack is sealed before each wait, so a waiting worker holds no claim that
    /// only it could commit: two jobs waiting on each other's chunks both make progress.
    async fn settle_borrowed(&mut self, reports: &Sender<Report>) -> Result<()> {
        while !self.borrowed.is_empty() {
            let mut again: Vec<WorkItem> = Vec::new();
            let mut settled: Vec<(usize, usize)> = Vec::new();
            for (id, item) in std::mem::take(&mut self.borrowed) {
                // A stop asked of the daemon's job is seen here too: the control thread
                // only looks at it when a report arrives, and waiting workers send none.
                let stopped = || {
                    self.shared.cancelled.load(Ordering::Relaxed)
                        || self.shared.control.is_some_and(|c| c.stop_requested())
                };
                if !self.shared.claims.wait(&id, stopped) {
                    // The job stops: no snapshot will name the chunk.
                    return Ok(());
                }
                let stored = self
                    .shared
                    .index
                    .reader_in(&self.shared.tier)?
                    .contains(&id)?;
                let queued = again
                    .iter()
                    .any(|i| i.entry == item.entry && i.extent == item.extent);
                if !stored && !queued {
                    settled.retain(|&x| x != (item.entry, item.extent));
                    again.push(item);
                } else if !queued && !settled.contains(&(item.entry, item.extent)) {
                    settled.push((item.entry, item.extent));
                }
            }
            for (entry, extent) in settled {
                if reports.send(Report::Settled { entry, extent }).is_err() {
                    return Ok(());
                }
            }
            for item in again {
                // Its bytes were counted the first time.
                let outcome = self.extent(&item).await.map(|done| ExtentDone {
                    bytes_read: 0,
                    ..done
                });
                let report = report_of(&item, outcome)?;
                if reports.send(report).is_err() {
                    return Ok(());
                }
            }
            self.seal_pack(reports)?;
        }
        Ok(())
    }

    /// Tells the job's live progress about payload bytes shipped up to `sent` in all.
    fn report_sent(&mut self, sent: u64) {
        if let Some(control) = self.shared.control {
            control.add_sent(sent - self.sent_reported);
        }
        self.sent_reported = sent;
    }

    /// The next extent. A remote worker must keep its runtime turning while it waits (quinn
    /// drives the connection as a task on this thread), so it polls instead of blocking.
    async fn next_item(&self, work: &Receiver<WorkItem>) -> Option<WorkItem> {
        if !matches!(self.sink, ChunkSink::Peer(_)) {
            // Blocking is fine: this thread has nothing else to run between extents.
            return work.recv().ok();
        }
        loop {
            match work.try_recv() {
                Ok(item) => return Some(item),
                Err(crossbeam_channel::TryRecvError::Disconnected) => return None,
                Err(crossbeam_channel::TryRecvError::Empty) => {
                    tokio::time::sleep(std::time::Duration::from_micros(500)).await
                }
            }
        }
    }

    async fn drain(&mut self, work: &Receiver<WorkItem>, reports: &Sender<Report>) -> Result<()> {
        while let Some(item) = self.next_item(work).await {
            if self.shared.cancelled.load(Ordering::Relaxed) {
                continue;
            }
            let started = std::time::Instant::now();
            let outcome = self.extent(&item).await;
            stage("extent", started);
            let report = report_of(&item, outcome)?;
            if reports.send(report).is_err() {
                break;
            }
            if matches!(&self.sink, ChunkSink::Local(pack) if pack.is_full()) {
                self.seal_pack(reports)?;
            }
        }
        Ok(())
    }

    /// Seals the open pack and hands it to the control thread, which commits it.
    fn seal_pack(&mut self, reports: &Sender<Report>) -> Result<()> {
        if let ChunkSink::Local(pack) = &mut self.sink {
            if let Some(sealed) = pack.seal()? {
                let _ = reports.send(Report::PackSealed(sealed));
            }
        }
        Ok(())
    }

    async fn extent(&mut self, item: &WorkItem) -> Result<ExtentDone, ExtentError> {
        let path = item.path.as_path();
        let mut direct = is_aligned(item.offset);
        let borrowed_before = self.borrowed.len();
        let result = loop {
            let std_file = match open(path, direct) {
                Ok(file) => file,
                Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    self.note_buffered(path);
                    direct = false;
                    continue;
                }
                Err(e) => return Err(ExtentError::Skip(format!("not readable: {e}"))),
            };
            let file = Rc::new(tokio_uring::fs::File::from_std(std_file));
            match self.read_and_chunk(&file, item, direct).await {
                // Some file systems accept O_DIRECT at open and refuse it on read.
                Err(ExtentError::DirectRefused) => {
                    self.note_buffered(path);
                    direct = false;
                }
                other => break other,
            }
        };
        let mut done = result?;
        done.changed = changed_since_scan(item);
        done.borrowed = self.borrowed.len() > borrowed_before;
        Ok(done)
    }

    fn note_buffered(&mut self, path: &std::path::Path) {
        self.stats.buffered_files += 1;
        if !self.shared.buffered_noted.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                path = %path.display(),
                "O_DIRECT refused by this file system; reading with buffered I/O (noted once per job)"
            );
        }
    }

    async fn read_and_chunk(
        &mut self,
        file: &Rc<tokio_uring::fs::File>,
        item: &WorkItem,
        direct: bool,
    ) -> Result<ExtentDone, ExtentError> {
        let buffer_bytes = self.shared.plan.read_bytes as u64;
        let end = item.offset + item.len;
        let index = self
            .shared
            .index
            .reader_in(&self.shared.tier)
            .map_err(ExtentError::Fatal)?;
        let mut in_flight = VecDeque::new();
        let mut next_read = item.offset;
        let mut received = item.offset;
        let mut at_eof = false;
        let mut chunks = Vec::new();
        self.window.clear();

        let outcome = async {
            loop {
                while !at_eof
                    && next_read < end
                    && in_flight.len() < self.shared.plan.reads_per_worker
                {
                    let want = (end - next_read).min(buffer_bytes);
                    // Direct reads must cover whole blocks; the tail past `end` is ignored.
                    let len = if direct {
                        align_up(want).min(buffer_bytes)
                    } else {
                        want
                    } as usize;
                    let file = file.clone();
                    let at = next_read;
                    let read = match &self.registered {
                        Some(registry) => {
                            let slot = self.window.reserve_slot(len, buffer_bytes as usize);
                            // A slot is free once the window has consumed its bytes.
                            let buf = registry.check_out(slot).ok_or_else(|| {
                                ExtentError::Fatal(Error::Resource(format!(
                                    "chunk window slot {slot} is not available for a read"
                                )))
                            })?;
                            tokio_uring::spawn(async move {
                                file.read_fixed_at(buf.slice(..len), at).await.0
                            })
                        }
                        None => {
                            let span = self.window.reserve(len);
                            tokio_uring::spawn(async move { file.read_at(span, at).await.0 })
                        }
                    };
                    in_flight.push_back((at, want, read));
                    next_read += want;
                }
                let Some((at, want, read)) = in_flight.pop_front() else {
                    break;
                };
                let result = read.await.expect("read task does not panic");
                let n = result.map_err(|e| {
                    if direct && e.raw_os_error() == Some(libc::EINVAL) {
                        ExtentError::DirectRefused
                    } else {
                        ExtentError::Skip(format!("read at offset {at}: {e}"))
                    }
                })? as u64;
                // Past a short read the file has shrunk: nothing after it belongs here.
                if !at_eof {
                    debug_assert_eq!(at, received);
                    let useful = n.min(want) as usize;
                    self.window.commit(useful);
                    self.stats.bytes_read += useful as u64;
                    received += useful as u64;
                    if (useful as u64) < want {
                        // The file shrank under us: take what is there, the change is reported.
                        at_eof = true;
                    }
                }
                let at_end = received >= end || (at_eof && in_flight.is_empty());
                while !self.window.is_empty() && cut_is_final(self.window.len(), at_end) {
                    let len = next_chunk_len(self.window.held());
                    let chunk_ref = self
                        .store_chunk(len, &index, item)
                        .await
                        .map_err(ExtentError::Fatal)?;
                    chunks.push(chunk_ref);
                    self.window.consume(len);
                }
            }
            Ok(())
        }
        .await;
        // Reads still in flight after an error write into the window: wait for them, so the
        // next attempt (or extent) finds the whole window (and every slot) free again.
        for (_, _, read) in in_flight.drain(..) {
            let _ = read.await;
        }
        self.window.release();
        outcome?;
        debug_assert!(self.window.is_empty());
        Ok(ExtentDone {
            entry: item.entry,
            extent: item.extent,
            chunks,
            bytes_read: received - item.offset,
            changed: None,
            borrowed: false,
        })
    }

    /// Hashes the chunk at the head of the window and stores it unless it is known (locally,
    /// or at the destination of a cross-site job: the shipper asks it).
    async fn store_chunk(
        &mut self,
        len: usize,
        index: &mover_store::index::IndexReader,
        item: &WorkItem,
    ) -> Result<ChunkRef> {
        let data = &self.window.held()[..len];
        let id = ChunkId::of(data);
        self.stats.chunks_total += 1;
        let chunk_ref = ChunkRef {
            id,
            len: len as u32,
        };
        let admitted = match &self.sink {
            // `index` is as of the extent's start; `admit` looks again before it says New.
            ChunkSink::Local(pack) => match pack.admit(&self.shared.claims, &id, Some(index))? {
                Admit::New => true,
                Admit::Known | Admit::Held => false,
                Admit::Other => {
                    self.borrowed.push((id, item.clone()));
                    false
                }
            },
            // The destination decides what is new; this only keeps the job's workers from
            // offering one chunk twice.
            ChunkSink::Peer(_) => self
                .shared
                .shipped
                .lock()
                .expect("shipped set lock")
                .insert(id),
            ChunkSink::Finished => {
                return Err(Error::Resource(
                    "a worker stored a chunk after it finished".into(),
                ))
            }
        };
        if !admitted {
            return Ok(chunk_ref);
        }
        let (codec, payload) = self.compressor.compress(data);
        // Into the pack's staging buffer or the shipper's batch: a new chunk's one user-space
        // copy (before quinn's packet assembly, for a shipped one).
        self.stats.memcpy_bytes += payload.len() as u64;
        match &mut self.sink {
            ChunkSink::Local(pack) => {
                let header = RecordHeader::new(id, codec, len, payload);
                pack.append(&header, payload)?;
                self.stats.chunks_new += 1;
                self.stats.bytes_new += len as u64;
                self.stats.bytes_stored += header.record_len();
            }
            ChunkSink::Peer(shipper) => {
                shipper
                    .offer(id.0, codec as u8, len as u32, payload)
                    .await?;
                // The ship task sends while this worker reads; progress catches up here.
                let sent = shipper.payload_bytes_sent();
                self.report_sent(sent);
            }
            ChunkSink::Finished => unreachable!("refused above"),
        }
        Ok(chunk_ref)
    }
}

/// Where a worker's new chunks go: one sink, two implementations. A local job appends them
/// to this site's packs through `mover_store::sink` (the pipeline a peer's Store stream uses
/// on the receiving side); a cross-site job offers them to the peer over this worker's Store
/// stream. Later wrappers (encrypt, a second destination) go between the compressor and this.
enum ChunkSink<'a> {
    Local(PackSink<'a>),
    /// Boxed: one per worker, and it would size every variant.
    Peer(Box<Shipper>),
    /// A peer sink after its stream was finished.
    Finished,
}

enum ExtentError {
    /// This file cannot be read; the job goes on without it.
    Skip(String),
    /// The file system refused a direct read; the extent is read again buffered.
    DirectRefused,
    /// The destination failed; the job stops.
    Fatal(Error),
}

/// Registers the window's read slots with this thread's ring.
fn register(window: &Window, plan: &ReadPlan) -> Result<FixedBufRegistry<Span>> {
    let failed = |why: String| {
        Error::Resource(format!(
            "registering the {} MiB chunk window with io_uring failed: {why} (check RLIMIT_MEMLOCK, engine.io_memory_bytes)",
            plan.window_bytes >> 20
        ))
    };
    // Pages larger than 4 KiB can round the window past a whole number of slots.
    if window.capacity() % plan.read_bytes != 0 {
        return Err(failed(format!(
            "{} bytes is not a whole number of {}-byte reads",
            window.capacity(),
            plan.read_bytes
        )));
    }
    let registry = FixedBufRegistry::new(window.slots(plan.read_bytes));
    registry.register().map_err(|e| failed(e.to_string()))?;
    Ok(registry)
}

fn open(path: &std::path::Path, direct: bool) -> std::io::Result<std::fs::File> {
    let flags = if direct { libc::O_DIRECT } else { 0 };
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags | libc::O_NOFOLLOW)
        .open(path)
}

fn changed_since_scan(item: &WorkItem) -> Option<String> {
    match std::fs::symlink_metadata(item.path.as_path()) {
        Ok(meta) => {
            let now = (
                meta.len(),
                meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            );
            (now != item.stamp).then(|| "changed during backup: the snapshot holds the bytes read then, which may mix old and new content".to_string())
        }
        Err(e) => Some(format!(
            "vanished during backup ({e}): the snapshot holds the bytes read before"
        )),
    }
}

/// What the control thread hears of one extent: done, skipped with a reason, or the job's end.
fn report_of(item: &WorkItem, outcome: Result<ExtentDone, ExtentError>) -> Result<Report> {
    match outcome {
        Ok(done) => Ok(Report::Extent(done)),
        Err(ExtentError::DirectRefused) => unreachable!("extent() retries buffered"),
        Err(ExtentError::Skip(reason)) => Ok(Report::Skipped {
            entry: item.entry,
            extent: item.extent,
            reason,
        }),
        Err(ExtentError::Fatal(e)) => Err(e),
    }
}
