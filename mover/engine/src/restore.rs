//! Restores a snapshot (or a subtree of it) into a new or empty directory.
//!
//! The manifest is untrusted input: every path is checked before anything is written, and an
//! entry that would land outside the target (absolute, `..`) or be written through a symlink
//! the restore itself created refuses the whole restore, naming the entry, so that nothing is
//! half restored. Every chunk is checked (xxh3, length, BLAKE3) before its bytes are written.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use crate::backup::path_text;
use crate::job::{Job, JobControl, JobKind, JobState, Progress};
use crate::restore_sink::FileSink;
use crate::restore_target::{Metadata, TargetDir};
use crate::site::Site;
use mover_format::constants::FETCH_ORDER_BATCHES_QUEUED;
use mover_format::error::{Error, Result};
use mover_format::manifest::{check_relative_path, is_ancestor, path_order, Entry, EntryKind};
use mover_format::manifest_blocks::ManifestStream;
use mover_format::ChunkId;
use mover_peer::remote::client::{Control, ReadOrder, RemoteChunks};
use mover_store::source::{ChunkSource, Plaintext};
use transport::frame::IDS_PER_FRAME_MAX;

pub struct RestoreOptions<'a> {
    /// `SNAPSHOT[:SUBPATH]`
    pub spec: &'a str,
    pub target: &'a Path,
    /// Read the snapshot from this peer site instead of this one (`--from SITE`).
    pub from: Option<&'a str>,
    /// Set when the daemon runs the job: live progress and the stop flag.
    pub control: Option<&'a JobControl>,
    /// A resumed job (the daemon restarted mid-restore): the target holds what the previous
    /// attempt wrote, so it may be non-empty; finished files are kept, the rest rewritten.
    pub resume: bool,
}

pub fn parse_spec(spec: &str) -> (&str, Option<&str>) {
    match spec.split_once(':') {
        Some((snapshot, sub)) => (
            snapshot,
            Some(sub.trim_matches('/')).filter(|s| !s.is_empty()),
        ),
        None => (spec, None),
    }
}

pub fn run(site: &Site, options: &RestoreOptions) -> Result<Job> {
    let started = Instant::now();
    let (snapshot, subpath) = parse_spec(options.spec);
    let control = options.control;
    let mut job = Job::new(
        JobKind::Restore,
        site.name(),
        options.target.display().to_string(),
        control,
    );
    let peer = match options.from {
        Some(from) => Some((
            site.links.link(from)?,
            mover_peer::peers::credentials(site)?,
        )),
        None => None,
    };
    // A local snapshot is read from its own tier first (the catalog says which), where its
    // chunks were written; another tier's copy is taken only for a chunk that has none there.
    let mut snapshot_tier = None;
    let (id, object) = match &peer {
        None => {
            let info = site.index.find_snapshot(snapshot)?;
            snapshot_tier = Some(info.tier.clone());
            let id = mover_format::parse_hex32(&info.id).ok_or_else(|| {
                Error::corrupt(
                    format!("catalog row {}", info.id),
                    "id is not 64 hex digits",
                )
            })?;
            (id, None)
        }
        Some((link, credentials)) => {
            let net = site.net()?;
            let (found, wire) = net.block_on(async {
                let mut control = Control::open(&net, link, credentials, &job.id).await?;
                let found = control.get_manifest(false, snapshot.as_bytes()).await?;
                Ok::<_, Error>((found, control.close().await))
            })?;
            job.wire_bytes_sent += wire.0;
            job.wire_bytes_received += wire.1;
            let (id, object) = found.ok_or_else(|| {
                Error::NotFound(format!("snapshot {snapshot:?} at {}", link.site))
            })?;
            (id, Some(std::sync::Arc::new(object)))
        }
    };
    // The manifest is read twice, one entry at a time: to check it whole (and its id), then
    // to restore. A snapshot of any size is restored in bounded memory.
    let open = || -> Result<Entries> {
        let input: Box<dyn Read + Send> = match &object {
            None => site.manifest_reader(&id)?,
            Some(object) => Box::new(std::io::Cursor::new(SharedBytes(object.clone()))),
        };
        ManifestStream::open(input, Some(&id))
    };
    job.destination = peer.as_ref().map(|(link, _)| link.site.clone());
    job.snapshot = Some(mover_format::hex(&id));
    job.workers = 1;
    job.direct_io = false;

    let selection = Selection::new(subpath);
    let plan = check_entries(open()?, &selection)?;
    create_target(options.target)?;
    let target_path = options
        .target
        .canonicalize()
        .map_err(|e| Error::io("resolve", options.target, e))?;
    let mut target = TargetDir::open(&target_path)?;
    let restore_of = RestoreOf {
        snapshot: job.snapshot.clone().unwrap_or_default(),
        subpath: subpath.unwrap_or_default().to_string(),
        from: options.from.unwrap_or_default().to_string(),
    };
    // Held (and so locked) until the restore ends.
    let (resume, _marker) = claim_target(&target, &job.id, &restore_of, options.resume)?;
    job.bytes_total = plan.bytes_total;
    control.total(job.bytes_total);

    // This site's tiers, or a peer streaming the chunks in restore order.
    let mut chunks: Box<dyn ChunkSource + '_> = match peer {
        None => Box::new(match &snapshot_tier {
            Some(tier) => site.chunk_reader().preferring(tier),
            None => site.chunk_reader(),
        }),
        Some((link, credentials)) => Box::new(RemoteChunks::start(
            site.net()?,
            link,
            credentials,
            job.id.clone(),
            feed_read_order(open()?, selection.clone(), plan.link_targets.clone())?,
        )?),
    };
    let mut restorer = Restorer {
        target: &mut target,
        link_targets: &plan.link_targets,
        open_directories: Vec::new(),
        restored_files: HashMap::new(),
        outside: HashMap::new(),
        chunk: Vec::new(),
        direct: true,
        is_root: unsafe { libc::geteuid() } == 0,
        // Skipping a finished file must not skip its chunks in a peer's ordered stream.
        resume,
        skip_finished: resume && options.from.is_none(),
        control,
        job: &mut job,
    };
    let outcome = open().and_then(|entries| restorer.restore(entries, &selection, &mut *chunks));
    let wire = chunks.finish();
    job.wire_bytes_sent += wire.0;
    job.wire_bytes_received += wire.1;
    job.elapsed_s = started.elapsed().as_secs_f64();
    match outcome {
        Ok(()) => {
            job.state = JobState::Done;
            job.bytes_done = job.bytes_total;
            crate::backup::record_job(site, &job);
            Ok(job)
        }
        Err(e) => Err(crate::backup::record_failure(site, &mut job, e)),
    }
}

/// A manifest's entries as a restore reads them (from this site's disk or a peer's object).
type Entries = ManifestStream<Box<dyn Read + Send>>;

/// A peer's manifest object, read by each pass without copying it.
struct SharedBytes(std::sync::Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Which entries the restore writes: all, or the subtree at a path.
#[derive(Clone)]
struct Selection {
    subpath: Option<Vec<u8>>,
}

impl Selection {
    fn new(subpath: Option<&str>) -> Selection {
        Selection {
            subpath: subpath.map(|s| s.as_bytes().to_vec()),
        }
    }

    fn contains(&self, path: &[u8]) -> bool {
        match &self.subpath {
            None => true,
            Some(sub) => path == &sub[..] || is_ancestor(sub, path),
        }
    }
}

/// What the check pass learned for the restore pass.
struct Plan {
    bytes_total: u64,
    /// Paths hardlinks of the selection point to: the only files whose restored path is kept
    /// (it grows with the hardlinks, not with the tree).
    link_targets: HashSet<Vec<u8>>,
}

/// The chunks `Restorer::restore` reads, in the order it reads them (a file's chunks when it
/// is written; a hardlink whose first path is outside the selection carries the content),
/// handed to `each` in batches of at most `IDS_PER_FRAME_MAX` as the manifest is read, so
/// the order is never held whole. Stops early, without error, when `each` returns false.
fn read_order(
    mut entries: Entries,
    selection: &Selection,
    link_targets: &HashSet<Vec<u8>>,
    each: &mut dyn FnMut(Vec<ChunkId>) -> bool,
) -> Result<()> {
    let mut written: HashSet<Vec<u8>> = HashSet::new();
    let mut outside: HashMap<Vec<u8>, Entry> = HashMap::new();
    let mut batch = Vec::with_capacity(IDS_PER_FRAME_MAX);
    let mut push = |entry: &Entry, batch: &mut Vec<ChunkId>| -> bool {
        if let EntryKind::File { extents, .. } = &entry.kind {
            for id in extents.iter().flat_map(|e| e.chunks.iter().map(|c| c.id)) {
                batch.push(id);
                if batch.len() == IDS_PER_FRAME_MAX && !each(std::mem::take(batch)) {
                    return false;
                }
            }
        }
        true
    };
    while let Some(entry) = entries.next_entry()? {
        if !selection.contains(&entry.path) {
            if link_targets.contains(&entry.path) {
                outside.insert(entry.path.clone(), entry);
            }
            continue;
        }
        let more = match &entry.kind {
            EntryKind::File { .. } => {
                if link_targets.contains(&entry.path) {
                    written.insert(entry.path.clone());
                }
                push(&entry, &mut batch)
            }
            EntryKind::Hardlink { target } if !written.contains(target) => {
                match outside
                    .get(target)
                    .filter(|e| matches!(e.kind, EntryKind::File { .. }))
                {
                    Some(source) => {
                        written.insert(target.clone());
                        push(source, &mut batch)
                    }
                    None => true,
                }
            }
            _ => true,
        };
        if !more {
            return Ok(());
        }
    }
    if !batch.is_empty() {
        each(batch);
    }
    Ok(())
}

/// Feeds a remote restore's chunk order to its fetch task from a thread of its own, batch by
/// batch through a bounded channel: the manifest is read (and decompressed) off the network
/// runtime, and no more of the order is held than the channel's few batches. The thread ends
/// when the order does or when the fetch stops taking it.
fn feed_read_order(
    entries: Entries,
    selection: Selection,
    link_targets: HashSet<Vec<u8>>,
) -> Result<ReadOrder> {
    let (tx, rx) = tokio::sync::mpsc::channel(FETCH_ORDER_BATCHES_QUEUED);
    std::thread::Builder::new()
        .name("restore-order".into())
        .spawn(move || {
            let mut send = |batch: Vec<ChunkId>| tx.blocking_send(Ok(batch)).is_ok();
            if let Err(e) = read_order(entries, &selection, &link_targets, &mut send) {
                let _ = tx.blocking_send(Err(e));
            }
        })
        .map_err(|e| Error::Resource(format!("starting the restore's order thread: {e}")))?;
    Ok(rx)
}

/// Reads the whole manifest (checking its id) and refuses the restore if any selected entry
/// is unsafe or inconsistent. Entries must come in manifest order (depth first, siblings
/// sorted), strictly: that makes a path appearing twice an order error, and puts whatever
/// lies beneath a path right after it, so "nothing is restored beneath a symlink or file" is
/// a check against the previous entry. Memory stays bounded whatever the snapshot's size.
fn check_entries(mut entries: Entries, selection: &Selection) -> Result<Plan> {
    let refuse = |entry: &Entry, why: String| {
        Error::Refused(format!(
            "snapshot entry {:?}: {why}; nothing was restored",
            path_text(&entry.path)
        ))
    };
    let mut plan = Plan {
        bytes_total: 0,
        link_targets: HashSet::new(),
    };
    let mut selected = 0u64;
    // The previous selected entry's path, and what it is when not a directory.
    let mut previous: Option<(Vec<u8>, Option<&'static str>)> = None;
    while let Some(entry) = entries.next_entry()? {
        if !selection.contains(&entry.path) {
            continue;
        }
        selected += 1;
        check_relative_path(&entry.path)
            .map_err(|why| refuse(&entry, format!("{why} would escape the target")))?;
        if let Some((before, kind)) = &previous {
            match path_order(before, &entry.path) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => {
                    return Err(refuse(&entry, "appears twice".into()));
                }
                std::cmp::Ordering::Greater => {
                    return Err(refuse(
                        &entry,
                        format!("comes after {:?}, out of order", path_text(before)),
                    ));
                }
            }
            if let Some(kind) = kind {
                if is_ancestor(before, &entry.path) {
                    return Err(refuse(
                        &entry,
                        format!(
                            "would be written through the {kind} {:?}",
                            path_text(before)
                        ),
                    ));
                }
            }
        }
        match &entry.kind {
            EntryKind::File { size, extents } => {
                for extent in extents {
                    let end = extent.offset.checked_add(extent.len());
                    if end.is_none_or(|end| end > *size) {
                        return Err(refuse(
                            &entry,
                            format!("extent at {} runs past the file size {size}", extent.offset),
                        ));
                    }
                }
                plan.bytes_total += size;
            }
            EntryKind::Hardlink { target } => {
                check_relative_path(target).map_err(|why| {
                    refuse(
                        &entry,
                        format!("hardlink target: {why} would escape the target"),
                    )
                })?;
                plan.link_targets.insert(target.clone());
            }
            EntryKind::Symlink { target } if target.contains(&0) => {
                return Err(refuse(&entry, "symlink target contains a NUL byte".into()));
            }
            _ => {}
        }
        if entry.path.is_empty() && !matches!(entry.kind, EntryKind::Directory) {
            return Err(refuse(&entry, "root entry is not a directory".into()));
        }
        let kind = match entry.kind {
            EntryKind::Directory => None,
            EntryKind::Symlink { .. } => Some("symlink"),
            EntryKind::File { .. } | EntryKind::Hardlink { .. } => Some("file"),
        };
        previous = Some((entry.path, kind));
    }
    if let (0, Some(sub)) = (selected, &selection.subpath) {
        return Err(Error::NotFound(format!(
            "path {:?} is not in the snapshot",
            String::from_utf8_lossy(sub)
        )));
    }
    Ok(plan)
}

/// Name of the file a restore keeps in its target while it writes: it says whose partial tree
/// this is and what it restores, so that only the same restore resumes into it (and a user
/// sees it is partial).
pub const RESTORE_MARKER: &str = ".mover-restore-in-progress";
/// The marker is two short lines; anything longer is not ours.
const MARKER_BYTES_MAX: u64 = 4096;

/// What a restore writes: the same snapshot, subtree and source resume into each other's
/// partial targets, whichever job (daemon or in-process) wrote them.
struct RestoreOf {
    snapshot: String,
    subpath: String,
    from: String,
}

impl RestoreOf {
    fn line(&self) -> String {
        let from = if self.from.is_empty() {
            "this site"
        } else {
            &self.from
        };
        format!(
            "restore {}:{} from {from}",
            self.snapshot,
            path_text(self.subpath.as_bytes())
        )
    }
}

/// Claims `target` for this restore and says whether it resumes a partial one. A new or empty
/// target starts afresh. A target holding the marker of the same restore (same snapshot,
/// subtree and source; a daemon job retried after a restart, or the same command run again
/// after a kill) is resumed: finished files are kept, the rest rewritten. Anything else is
/// refused, naming the partial restore it holds if it holds one: a restore never deletes files
/// it did not write.
/// The marker stays locked while the returned file is open, so two restores never write into
/// one target at once (the second is refused).
fn claim_target(
    target: &TargetDir,
    job: &str,
    of: &RestoreOf,
    retried: bool,
) -> Result<(bool, std::fs::File)> {
    let shown = target.display(b"");
    let resume = if target.is_empty()? {
        false
    } else {
        let marker = target.read_top_file(RESTORE_MARKER, MARKER_BYTES_MAX)?;
        let marker = marker.as_deref().map(String::from_utf8_lossy);
        let mut lines = marker.as_deref().unwrap_or_default().lines();
        let (marker_job, marker_of) = (lines.next().unwrap_or_default(), lines.next());
        let same = marker_of == Some(of.line().as_str()) || (retried && marker_job == job);
        match (&marker, same) {
            (Some(_), true) => {
                tracing::info!(target = %shown.display(), job = marker_job, "finishing the partial restore left in the target");
                true
            }
            (Some(_), false) => {
                return Err(Error::Refused(format!(
                    "restore target {} holds a partial {} (job {}): run that restore again to finish it, or remove the directory",
                    shown.display(),
                    marker_of.unwrap_or("restore"),
                    path_text(marker_job.as_bytes())
                )))
            }
            (None, _) => {
                return Err(Error::Refused(format!(
                    "restore target {} is not empty: expected a new or empty directory (restore never overwrites)",
                    shown.display()
                )))
            }
        }
    };
    let marker =
        target.claim_top_file(RESTORE_MARKER, format!("{job}\n{}\n", of.line()).as_bytes())?;
    Ok((resume, marker))
}

/// Creates the target directory (and its parents) when it does not exist yet.
fn create_target(target: &Path) -> Result<()> {
    match std::fs::symlink_metadata(target) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(target).map_err(|e| Error::io("create directory", target, e))
        }
        Err(e) => Err(Error::io("inspect", target, e)),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Existing {
    None,
    Directory,
    Finished,
}

struct Restorer<'a> {
    /// Every entry is created and changed through this, never by full path.
    target: &'a mut TargetDir,
    /// The files hardlinks point to (from the check pass).
    link_targets: &'a HashSet<Vec<u8>>,
    /// The directories the current entry is in, outermost first, with the entry whose
    /// metadata a directory gets once the restore leaves it (none for the root and for
    /// ancestors of a restored subtree). Depth-first order makes this a stack.
    open_directories: Vec<(Vec<u8>, Option<Entry>)>,
    /// Restored link targets (manifest path -> where it was restored).
    restored_files: HashMap<Vec<u8>, Vec<u8>>,
    /// Link targets outside the restored subtree: the first link restored gets the content.
    outside: HashMap<Vec<u8>, Entry>,
    chunk: Vec<u8>,
    /// Large files may be written with O_DIRECT (cleared if the target refuses it).
    direct: bool,
    is_root: bool,
    resume: bool,
    skip_finished: bool,
    control: Option<&'a JobControl>,
    job: &'a mut Job,
}

impl Restorer<'_> {
    fn restore(
        &mut self,
        mut entries: Entries,
        selection: &Selection,
        reader: &mut dyn ChunkSource,
    ) -> Result<()> {
        let mut root = None;
        while let Some(entry) = entries.next_entry()? {
            if !selection.contains(&entry.path) {
                if self.link_targets.contains(&entry.path) {
                    self.outside.insert(entry.path.clone(), entry);
                }
                continue;
            }
            self.control.check()?;
            self.leave_directories(&entry.path)?;
            self.prepare_parent(&entry)?;
            let exists = match self.resume {
                true => self.clear_for_resume(&entry)?,
                false => Existing::None,
            };
            if exists == Existing::Finished {
                if let EntryKind::File { size, .. } = &entry.kind {
                    self.job.bytes_done += size;
                    self.control.done(*size);
                    self.job.files += 1;
                }
                self.restored(&entry.path, &entry.path);
                continue;
            }
            match &entry.kind {
                EntryKind::Directory => {
                    if !entry.path.is_empty() && exists != Existing::Directory {
                        self.target.mkdir(&entry.path)?;
                    }
                    self.job.directories += 1;
                    if entry.path.is_empty() {
                        self.open_directories.push((Vec::new(), None));
                        root = Some(entry);
                    } else {
                        self.open_directories
                            .push((entry.path.clone(), Some(entry)));
                    }
                }
                EntryKind::File { .. } => {
                    let started = std::time::Instant::now();
                    self.write_file(reader, &entry, &entry.path)?;
                    mover_metrics::stage("restore_file", started);
                    self.restored(&entry.path, &entry.path);
                }
                EntryKind::Symlink { target } => {
                    self.target.symlink(target, &entry.path)?;
                    let meta = self.metadata(&entry);
                    self.target.set_symlink_metadata(&entry.path, &meta)?;
                }
                EntryKind::Hardlink { target } => {
                    if let Some(existing) = self.restored_files.get(target) {
                        let existing = existing.clone();
                        self.target.hard_link(&existing, &entry.path)?;
                    } else {
                        // The inode's first path is outside the restored subtree: this path
                        // gets the content itself and becomes the one later links point to.
                        let source = self
                            .outside
                            .remove(target)
                            .filter(|e| matches!(e.kind, EntryKind::File { .. }))
                            .ok_or_else(|| {
                                Error::corrupt(
                                    "manifest",
                                    format!(
                                        "hardlink {:?} points to no file",
                                        path_text(&entry.path)
                                    ),
                                )
                            })?;
                        self.write_file(reader, &source, &entry.path)?;
                        self.restored_files
                            .insert(target.clone(), entry.path.clone());
                    }
                }
            }
        }
        // Every entry is written. Directories got their metadata as the restore left them,
        // deepest first (writing into a directory changes its mtime, and a read-only mode
        // would stop us writing into it); the rest now, all but the target itself; then
        // everything is made durable before the marker goes, so a crash never leaves a
        // partial tree without it. Removing the marker changes the target's mtime, so the
        // target's own metadata comes last, with a second (cheap) sync.
        self.leave_directories(b"")?;
        self.target.sync()?;
        self.target.remove_top_file(RESTORE_MARKER)?;
        if let Some(entry) = root {
            let meta = self.metadata(&entry);
            self.target.set_dir_metadata(b"", &meta)?;
        }
        // The job reports done only once every restored byte is on disk.
        self.target.sync()
    }

    /// Keeps where a link target was restored.
    fn restored(&mut self, path: &[u8], at: &[u8]) {
        if self.link_targets.contains(path) {
            self.restored_files.insert(path.to_vec(), at.to_vec());
        }
    }

    /// Gives the directories `path` is not in their metadata and closes them (with `""`,
    /// every directory but the root). Nothing is written into them afterwards: the entries
    /// beneath a directory come right after it.
    fn leave_directories(&mut self, path: &[u8]) -> Result<()> {
        while let Some((dir, _)) = self.open_directories.last() {
            if dir.is_empty() || is_ancestor(dir, path) {
                break;
            }
            let (dir, entry) = self.open_directories.pop().expect("checked above");
            if let Some(entry) = entry {
                let meta = self.metadata(&entry);
                self.target.set_dir_metadata(&dir, &meta)?;
            }
        }
        Ok(())
    }

    fn metadata(&self, entry: &Entry) -> Metadata {
        Metadata {
            owner: self.is_root.then_some((entry.uid, entry.gid)),
            mode: entry.mode,
            mtime_ns: entry.mtime_ns,
        }
    }

    /// Writes a regular file's data at `rel` (holes stay holes), then its metadata.
    fn write_file(
        &mut self,
        reader: &mut dyn ChunkSource,
        entry: &Entry,
        rel: &[u8],
    ) -> Result<()> {
        let EntryKind::File { size, extents } = &entry.kind else {
            unreachable!("write_file is called for file entries");
        };
        let path = self.target.display(rel);
        let file = self.target.create_file(rel)?;
        // Metadata is set through this descriptor once the sink is done with its own.
        let meta_file = file
            .try_clone()
            .map_err(|e| Error::io("duplicate descriptor of", &path, e))?;
        // Setting the length first leaves every byte no extent covers as a hole.
        let mut sink = FileSink::create(file, &path, *size, extents, &mut self.direct)?;
        self.job.direct_io |= sink.is_direct();
        for extent in extents {
            sink.start_extent(extent.offset, extent.len())?;
            let mut at = extent.offset;
            for chunk in &extent.chunks {
                let damaged = |detail: String| {
                    Error::corrupt(format!("file {:?}", path_text(&entry.path)), detail)
                };
                let plaintext = reader
                    .read(&chunk.id, &mut self.chunk)
                    .map_err(|e| match e {
                        // A peer that went away or broke the protocol is not damage to the
                        // snapshot; its message names the peer.
                        e @ (Error::Peer { .. } | Error::Cancelled(_)) => e,
                        e => damaged(e.to_string()),
                    })?;
                let parts: Vec<&[u8]> = match &plaintext {
                    Plaintext::InBuffer => vec![&self.chunk],
                    Plaintext::Pieces(pieces) => pieces.iter().map(|p| &p[..]).collect(),
                };
                let len: usize = parts.iter().map(|p| p.len()).sum();
                if len != chunk.len as usize {
                    return Err(damaged(format!(
                        "chunk {} is {len} bytes, manifest says {}",
                        chunk.id, chunk.len
                    )));
                }
                sink.write_parts(at, &parts)?;
                at += chunk.len as u64;
                self.job.bytes_done += chunk.len as u64;
                self.job.bytes_read += chunk.len as u64;
                self.job.bytes_written += chunk.len as u64;
                self.control.done(chunk.len as u64);
            }
        }
        sink.finish()?;
        self.target
            .set_file_metadata(&meta_file, rel, &self.metadata(entry))?;
        self.job.files += 1;
        Ok(())
    }

    /// A resumed restore meets what the previous attempt wrote (it started on an empty
    /// target, so everything there is its own): a directory is kept, a file whose size and
    /// mtime are final (set only after its last byte) is finished, anything else is removed.
    fn clear_for_resume(&mut self, entry: &Entry) -> Result<Existing> {
        let Some(existing) = self.target.lstat(&entry.path)? else {
            return Ok(Existing::None);
        };
        if entry.path.is_empty() || existing.is_dir {
            return match entry.kind {
                EntryKind::Directory => Ok(Existing::Directory),
                _ => Err(Error::Refused(format!(
                    "resuming the restore: {} is a directory, the snapshot has a file there",
                    self.target.display(&entry.path).display()
                ))),
            };
        }
        if let EntryKind::File { size, .. } = &entry.kind {
            if self.skip_finished
                && existing.is_file
                && existing.size == *size
                && existing.mtime_ns == entry.mtime_ns
            {
                return Ok(Existing::Finished);
            }
        }
        self.target.remove_file(&entry.path)?;
        Ok(Existing::None)
    }

    /// Makes sure every ancestor of the entry is a real directory, creating missing ones (a
    /// subtree restore). `check_entries` already refused entries beneath symlinks, and every
    /// later step walks without following symlinks, so a swapped ancestor stops the restore.
    /// The open directories are its ancestors already seen (`leave_directories` ran).
    fn prepare_parent(&mut self, entry: &Entry) -> Result<()> {
        let rel = &entry.path;
        let mut at = 0;
        while let Some(slash) = rel[at..].iter().position(|&b| b == b'/') {
            let ancestor = &rel[..at + slash];
            at += slash + 1;
            if self
                .open_directories
                .iter()
                .any(|(dir, _)| dir.as_slice() == ancestor)
            {
                continue;
            }
            match self.target.lstat(ancestor)? {
                Some(existing) if existing.is_dir => {}
                Some(_) => {
                    return Err(Error::Refused(format!(
                        "snapshot entry {:?}: its parent {:?} is not a directory",
                        path_text(rel),
                        path_text(ancestor)
                    )))
                }
                None => self.target.mkdir_ancestor(ancestor)?,
            }
            self.open_directories.push((ancestor.to_vec(), None));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mover_format::manifest::{ChunkRef, Extent, Manifest};

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            inode: 0,
            device: 0,
        }
    }

    /// A file of `chunks` distinct chunks, numbered from `first`.
    fn file(path: &str, first: u32, chunks: u32) -> Entry {
        let chunks: Vec<ChunkRef> = (first..first + chunks)
            .map(|n| ChunkRef {
                id: ChunkId::of(&n.to_le_bytes()),
                len: 4,
            })
            .collect();
        let size = chunks.len() as u64 * 4;
        entry(
            path,
            EntryKind::File {
                size,
                extents: vec![Extent { offset: 0, chunks }],
            },
        )
    }

    fn ids(first: u32, chunks: u32) -> Vec<ChunkId> {
        (first..first + chunks)
            .map(|n| ChunkId::of(&n.to_le_bytes()))
            .collect()
    }

    fn entries(manifest: &Manifest) -> Entries {
        let encoded = mover_format::manifest::encode(manifest).unwrap();
        ManifestStream::open(
            Box::new(std::io::Cursor::new(encoded.bytes)) as Box<dyn Read + Send>,
            Some(&encoded.id),
        )
        .unwrap()
    }

    #[test]
    fn the_fetch_order_comes_in_frame_sized_batches_and_carries_outside_link_targets() {
        // In manifest order: "a" (outside the selection, the first path of a hardlink in
        // it), then "d/" with a big file, the link, and a small file.
        let manifest = Manifest {
            version: mover_format::manifest_blocks::MANIFEST_V2_VERSION,
            source: b"/src".to_vec(),
            hostname: "h".into(),
            site: "s".into(),
            tier: "default".into(),
            created_unix_ns: 0,
            parent: None,
            entries: vec![
                entry("", EntryKind::Directory),
                file("a", 0, 3),
                entry("d", EntryKind::Directory),
                file("d/big", 100, 2500),
                entry(
                    "d/link",
                    EntryKind::Hardlink {
                        target: b"a".to_vec(),
                    },
                ),
                file("d/small", 5000, 2),
            ],
        };
        let link_targets: HashSet<Vec<u8>> = [b"a".to_vec()].into_iter().collect();
        let mut batches: Vec<Vec<ChunkId>> = Vec::new();
        read_order(
            entries(&manifest),
            &Selection::new(Some("d")),
            &link_targets,
            &mut |batch| {
                batches.push(batch);
                true
            },
        )
        .unwrap();
        assert!(batches
            .iter()
            .all(|b| !b.is_empty() && b.len() <= IDS_PER_FRAME_MAX));
        let order: Vec<ChunkId> = batches.concat();
        let expected = [ids(100, 2500), ids(0, 3), ids(5000, 2)].concat();
        assert_eq!(order.len(), expected.len());
        assert!(order == expected, "chunks out of restore order");

        // A fetch that stops taking the order ends the reader after that batch.
        let mut taken = 0;
        read_order(
            entries(&manifest),
            &Selection::new(None),
            &link_targets,
            &mut |_| {
                taken += 1;
                false
            },
        )
        .unwrap();
        assert_eq!(taken, 1);
    }
}
