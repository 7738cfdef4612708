//! Restores a snapshot (or a subtree of it) into a new or empty directory.
//!
//! The manifest is untrusted input: every path is checked before anything is written, and an
//! entry that would land outside the target (absolute, `..`) or be written through a symlink
//! the restore itself created refuses the whole restore, naming the entry, so that nothing is
//! half restored. Every chunk is checked (xxh3, length, BLAKE3) before its bytes are written.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backup::path_text;
use crate::error::{Error, Result};
use crate::format::manifest::{check_relative_path, Entry, EntryKind, Manifest};
use crate::format::ChunkId;
use crate::job::{Job, JobControl, JobKind, JobState, Progress};
use crate::peers::Link;
use crate::remote::client::{Control, Plaintext, RemoteChunks};
use crate::restore_sink::FileSink;
use crate::site::Site;
use crate::store::pack_reader::ChunkReader;

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

/// Where chunks come from: this site's packs, or a peer streaming them in restore order.
pub enum ChunkSource<'a> {
    Local(ChunkReader<'a>),
    Remote(RemoteChunks),
}

impl ChunkSource<'_> {
    /// Chunk `id`'s plaintext, verified: in `out`, or in the pieces a peer sent it in.
    fn read(&mut self, id: &ChunkId, out: &mut Vec<u8>) -> Result<Plaintext> {
        match self {
            ChunkSource::Local(reader) => reader.read(id, out).map(|()| Plaintext::InBuffer),
            ChunkSource::Remote(remote) => remote.read(id, out),
        }
    }
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
            Link::from_config(site, from)?,
            crate::peers::credentials(site)?,
        )),
        None => None,
    };
    let (id, manifest) = match &peer {
        None => {
            let info = site.index.find_snapshot(snapshot)?;
            let id = crate::format::parse_hex32(&info.id).ok_or_else(|| {
                Error::corrupt(
                    format!("catalog row {}", info.id),
                    "id is not 64 hex digits",
                )
            })?;
            (id, site.load_manifest(&id)?)
        }
        Some((link, credentials)) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::Resource(format!("starting a tokio runtime: {e}")))?;
            let (found, wire) = runtime.block_on(async {
                let mut control = Control::open(link, credentials, &job.id).await?;
                let found = control.get_manifest(false, snapshot.as_bytes()).await?;
                Ok::<_, Error>((found, control.close().await))
            })?;
            job.wire_bytes_sent += wire.0;
            job.wire_bytes_received += wire.1;
            let (id, object) = found.ok_or_else(|| {
                Error::NotFound(format!("snapshot {snapshot:?} at {}", link.site))
            })?;
            (id, crate::format::manifest::decode(&object, Some(&id))?)
        }
    };
    job.destination = peer.as_ref().map(|(link, _)| link.site.clone());
    job.snapshot = Some(crate::format::hex(&id));
    job.workers = 1;
    job.direct_io = false;

    let selected = select(&manifest, subpath)?;
    check_entries(&manifest, &selected)?;
    prepare_target(options.target, options.resume)?;
    let target = options
        .target
        .canonicalize()
        .map_err(|e| Error::io("resolve", options.target, e))?;
    let marker = match control {
        Some(_) => Some(claim_target(&target, &job.id, options.resume)?),
        None => None,
    };
    for &i in &selected {
        if let EntryKind::File { size, .. } = &manifest.entries[i].kind {
            job.bytes_total += size;
        }
    }
    control.total(job.bytes_total);

    let mut chunks = match peer {
        None => ChunkSource::Local(site.chunk_reader()),
        Some((link, credentials)) => ChunkSource::Remote(RemoteChunks::start(
            link,
            credentials,
            job.id.clone(),
            read_order(&manifest, &selected),
        )?),
    };
    let mut restorer = Restorer {
        target,
        manifest: &manifest,
        directories: HashSet::new(),
        restored_files: HashMap::new(),
        chunk: Vec::new(),
        direct: true,
        is_root: unsafe { libc::geteuid() } == 0,
        // Skipping a finished file must not skip its chunks in a peer's ordered stream.
        resume: options.resume,
        skip_finished: options.resume && options.from.is_none(),
        marker,
        control,
        job: &mut job,
    };
    let outcome = restorer.restore(&selected, &mut chunks);
    if let ChunkSource::Remote(remote) = &mut chunks {
        remote.finish();
        job.wire_bytes_sent += remote.wire_bytes.0;
        job.wire_bytes_received += remote.wire_bytes.1;
    }
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

/// The chunks `Restorer::restore` reads, in the order it reads them (a file's chunks when it
/// is written; a hardlink whose first path is outside the selection carries the content).
fn read_order(manifest: &Manifest, selected: &[usize]) -> Vec<ChunkId> {
    let mut written: HashSet<&[u8]> = HashSet::new();
    let mut order = Vec::new();
    let push = |entry: &Entry, order: &mut Vec<ChunkId>| {
        if let EntryKind::File { extents, .. } = &entry.kind {
            order.extend(extents.iter().flat_map(|e| e.chunks.iter().map(|c| c.id)));
        }
    };
    for &i in selected {
        let entry = &manifest.entries[i];
        match &entry.kind {
            EntryKind::File { .. } => {
                push(entry, &mut order);
                written.insert(&entry.path);
            }
            EntryKind::Hardlink { target } if !written.contains(target.as_slice()) => {
                if let Some(source) = manifest
                    .entries
                    .iter()
                    .find(|e| &e.path == target && matches!(e.kind, EntryKind::File { .. }))
                {
                    push(source, &mut order);
                    written.insert(target);
                }
            }
            _ => {}
        }
    }
    order
}

/// Indices of the entries to restore: all, or the subtree at `subpath`.
fn select(manifest: &Manifest, subpath: Option<&str>) -> Result<Vec<usize>> {
    let Some(sub) = subpath else {
        return Ok((0..manifest.entries.len()).collect());
    };
    let sub = sub.as_bytes();
    let selected: Vec<usize> = manifest
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            e.path == sub || (e.path.starts_with(sub) && e.path.get(sub.len()) == Some(&b'/'))
        })
        .map(|(i, _)| i)
        .collect();
    if selected.is_empty() {
        return Err(Error::NotFound(format!(
            "path {:?} is not in the snapshot",
            String::from_utf8_lossy(sub)
        )));
    }
    Ok(selected)
}

/// Refuses the restore if any selected entry is unsafe or inconsistent.
fn check_entries(manifest: &Manifest, selected: &[usize]) -> Result<()> {
    let refuse = |entry: &Entry, why: String| {
        Error::Refused(format!(
            "snapshot entry {:?}: {why}; nothing was restored",
            path_text(&entry.path)
        ))
    };
    let mut seen: HashSet<&[u8]> = HashSet::new();
    // Paths that will not be directories: nothing may be restored beneath them, or a crafted
    // manifest could plant a symlink to /etc and then write "through" it.
    let not_directories: HashMap<&[u8], &'static str> = selected
        .iter()
        .map(|&i| &manifest.entries[i])
        .filter_map(|e| match e.kind {
            EntryKind::Directory => None,
            EntryKind::Symlink { .. } => Some((e.path.as_slice(), "symlink")),
            EntryKind::File { .. } | EntryKind::Hardlink { .. } => {
                Some((e.path.as_slice(), "file"))
            }
        })
        .collect();
    for &i in selected {
        let entry = &manifest.entries[i];
        check_relative_path(&entry.path)
            .map_err(|why| refuse(entry, format!("{why} would escape the target")))?;
        let mut at = 0;
        while let Some(slash) = entry.path[at..].iter().position(|&b| b == b'/') {
            let ancestor = &entry.path[..at + slash];
            if let Some(kind) = not_directories.get(ancestor) {
                return Err(refuse(
                    entry,
                    format!(
                        "would be written through the {kind} {:?}",
                        path_text(ancestor)
                    ),
                ));
            }
            at += slash + 1;
        }
        if !seen.insert(&entry.path) {
            return Err(refuse(entry, "appears twice".into()));
        }
        match &entry.kind {
            EntryKind::File { size, extents } => {
                for extent in extents {
                    let end = extent.offset.checked_add(extent.len());
                    if end.is_none_or(|end| end > *size) {
                        return Err(refuse(
                            entry,
                            format!("extent at {} runs past the file size {size}", extent.offset),
                        ));
                    }
                }
            }
            EntryKind::Hardlink { target } => {
                check_relative_path(target).map_err(|why| {
                    refuse(
                        entry,
                        format!("hardlink target: {why} would escape the target"),
                    )
                })?;
            }
            EntryKind::Symlink { target } if target.contains(&0) => {
                return Err(refuse(entry, "symlink target contains a NUL byte".into()));
            }
            _ => {}
        }
        if entry.path.is_empty() && !matches!(entry.kind, EntryKind::Directory) {
            return Err(refuse(entry, "root entry is not a directory".into()));
        }
    }
    Ok(())
}

/// Name of the file a daemon-run restore keeps in its target while it writes: it says whose
/// partial tree this is, so only that job resumes into it (and a user sees it is partial).
pub const RESTORE_MARKER: &str = ".mover-restore-in-progress";

/// Marks `target` as being restored by `job`. A resumed job only continues into a target
/// holding its own marker (or an empty one): it never deletes files it did not write.
fn claim_target(target: &Path, job: &str, resume: bool) -> Result<PathBuf> {
    let marker = target.join(RESTORE_MARKER);
    if resume {
        let ours = std::fs::read_to_string(&marker).is_ok_and(|id| id.trim() == job);
        let empty = std::fs::read_dir(target)
            .map_err(|e| Error::io("read directory", target, e))?
            .next()
            .is_none();
        if !ours && !empty {
            return Err(Error::Refused(format!(
                "restore target {} is not empty and holds no partial restore of job {job}: expected a new or empty directory",
                target.display()
            )));
        }
    }
    std::fs::write(&marker, format!("{job}\n")).map_err(|e| Error::io("create", &marker, e))?;
    Ok(marker)
}

fn prepare_target(target: &Path, resume: bool) -> Result<()> {
    match std::fs::read_dir(target) {
        Ok(mut listing) => {
            if listing.next().is_some() && !resume {
                return Err(Error::Refused(format!(
                    "restore target {} is not empty: expected a new or empty directory (restore never overwrites)",
                    target.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(target).map_err(|e| Error::io("create directory", target, e))
        }
        Err(e) => Err(Error::io("read directory", target, e)),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Existing {
    None,
    Directory,
    Finished,
}

struct Restorer<'a> {
    target: PathBuf,
    manifest: &'a Manifest,
    directories: HashSet<Vec<u8>>,
    /// Restored regular files, for hardlinks to them.
    restored_files: HashMap<Vec<u8>, PathBuf>,
    chunk: Vec<u8>,
    /// Large files may be written with O_DIRECT (cleared if the target refuses it).
    direct: bool,
    is_root: bool,
    resume: bool,
    skip_finished: bool,
    /// The daemon's "restore in progress" file, removed once every entry is written.
    marker: Option<PathBuf>,
    control: Option<&'a JobControl>,
    job: &'a mut Job,
}

impl Restorer<'_> {
    fn restore(&mut self, selected: &[usize], reader: &mut ChunkSource) -> Result<()> {
        let mut directories = Vec::new();
        for &i in selected {
            self.control.check()?;
            let entry = &self.manifest.entries[i];
            let path = self.prepare_parent(entry)?;
            let exists = match self.resume {
                true => self.clear_for_resume(entry, &path)?,
                false => Existing::None,
            };
            if exists == Existing::Finished {
                if let EntryKind::File { size, .. } = &entry.kind {
                    self.job.bytes_done += size;
                    self.control.done(*size);
                    self.job.files += 1;
                }
                self.restored_files.insert(entry.path.clone(), path);
                continue;
            }
            match &entry.kind {
                EntryKind::Directory => {
                    if !entry.path.is_empty() && exists != Existing::Directory {
                        std::fs::create_dir(&path)
                            .map_err(|e| Error::io("create directory", &path, e))?;
                    }
                    self.directories.insert(entry.path.clone());
                    directories.push(i);
                    self.job.directories += 1;
                }
                EntryKind::File { .. } => {
                    let started = std::time::Instant::now();
                    self.write_file(reader, entry, &path)?;
                    crate::worker::stage("restore_file", started);
                    self.restored_files.insert(entry.path.clone(), path);
                }
                EntryKind::Symlink { target } => {
                    std::os::unix::fs::symlink(OsStr::from_bytes(target), &path)
                        .map_err(|e| Error::io("create symlink", &path, e))?;
                    self.set_metadata(entry, &path, true)?;
                }
                EntryKind::Hardlink { target } => {
                    if let Some(existing) = self.restored_files.get(target) {
                        std::fs::hard_link(existing, &path)
                            .map_err(|e| Error::io("create hardlink", &path, e))?;
                    } else {
                        // The inode's first path is outside the restored subtree: this path
                        // gets the content itself and becomes the one later links point to.
                        let manifest = self.manifest;
                        let source = manifest
                            .entries
                            .iter()
                            .find(|e| &e.path == target && matches!(e.kind, EntryKind::File { .. }))
                            .ok_or_else(|| {
                                Error::corrupt(
                                    "manifest",
                                    format!(
                                        "hardlink {:?} points to no file",
                                        path_text(&entry.path)
                                    ),
                                )
                            })?;
                        self.write_file(reader, source, &path)?;
                        self.restored_files.insert(target.clone(), path);
                    }
                }
            }
        }
        if let Some(marker) = &self.marker {
            std::fs::remove_file(marker).map_err(|e| Error::io("remove", marker, e))?;
        }
        // Directories last, deepest first: writing into a directory changes its mtime, and a
        // read-only mode would stop us writing into it.
        for &i in directories.iter().rev() {
            let entry = &self.manifest.entries[i];
            let path = self.path_of(&entry.path);
            self.set_metadata(entry, &path, false)?;
        }
        // One syncfs instead of an fsync per file: the job reports done only once every
        // restored byte is on disk.
        let dir =
            std::fs::File::open(&self.target).map_err(|e| Error::io("open", &self.target, e))?;
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } != 0 {
            return Err(Error::io(
                "syncfs",
                &self.target,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Writes a regular file's data at `path` (holes stay holes), then its metadata.
    fn write_file(&mut self, reader: &mut ChunkSource, entry: &Entry, path: &Path) -> Result<()> {
        let EntryKind::File { size, extents } = &entry.kind else {
            unreachable!("write_file is called for file entries");
        };
        // Setting the length first leaves every byte no extent covers as a hole.
        let mut sink = FileSink::create(path, *size, extents, &mut self.direct)?;
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
                self.control.done(chunk.len as u64);
            }
        }
        sink.finish()?;
        self.set_metadata(entry, path, false)?;
        self.job.files += 1;
        Ok(())
    }

    /// A resumed restore meets what the previous attempt wrote (it started on an empty
    /// target, so everything there is its own): a directory is kept, a file whose size and
    /// mtime are final (set only after its last byte) is finished, anything else is removed.
    fn clear_for_resume(&self, entry: &Entry, path: &Path) -> Result<Existing> {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::None),
            Err(e) => return Err(Error::io("inspect", path, e)),
        };
        if entry.path.is_empty() || meta.is_dir() {
            return match entry.kind {
                EntryKind::Directory => Ok(Existing::Directory),
                _ => Err(Error::Refused(format!(
                    "resuming the restore: {} is a directory, the snapshot has a file there",
                    path.display()
                ))),
            };
        }
        if let EntryKind::File { size, .. } = &entry.kind {
            use std::os::unix::fs::MetadataExt;
            let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
            if self.skip_finished
                && meta.is_file()
                && meta.len() == *size
                && mtime_ns == entry.mtime_ns
            {
                return Ok(Existing::Finished);
            }
        }
        std::fs::remove_file(path).map_err(|e| Error::io("remove partly restored", path, e))?;
        Ok(Existing::None)
    }

    fn path_of(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.target.clone()
        } else {
            self.target.join(OsStr::from_bytes(rel))
        }
    }

    /// Makes sure every ancestor of the entry is a real directory, creating missing ones (a
    /// subtree restore). `check_entries` already refused entries beneath symlinks; the lstat
    /// here keeps that true even if the target changes under us.
    fn prepare_parent(&mut self, entry: &Entry) -> Result<PathBuf> {
        let rel = &entry.path;
        let mut at = 0;
        while let Some(slash) = rel[at..].iter().position(|&b| b == b'/') {
            let ancestor = &rel[..at + slash];
            if !self.directories.contains(ancestor) {
                let path = self.path_of(ancestor);
                match std::fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => {
                        return Err(Error::Refused(format!(
                            "snapshot entry {:?}: its parent {:?} is not a directory",
                            path_text(rel),
                            path_text(ancestor)
                        )))
                    }
                    Err(_) => std::fs::create_dir(&path)
                        .map_err(|e| Error::io("create directory", &path, e))?,
                }
                self.directories.insert(ancestor.to_vec());
            }
            at += slash + 1;
        }
        Ok(self.path_of(rel))
    }

    fn set_metadata(&self, entry: &Entry, path: &Path, is_symlink: bool) -> Result<()> {
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| Error::corrupt("manifest", "path contains a NUL byte"))?;
        if self.is_root {
            // SAFETY: valid C string; lchown does not follow symlinks.
            if unsafe { libc::lchown(c_path.as_ptr(), entry.uid, entry.gid) } != 0 {
                return Err(Error::io("chown", path, std::io::Error::last_os_error()));
            }
        }
        if !is_symlink {
            // After chown, which clears set-id bits.
            let mode = entry.mode & 0o7777;
            // SAFETY: valid C string.
            if unsafe { libc::chmod(c_path.as_ptr(), mode) } != 0 {
                return Err(Error::io("chmod", path, std::io::Error::last_os_error()));
            }
        }
        let mtime = libc::timespec {
            tv_sec: entry.mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: entry.mtime_ns.rem_euclid(1_000_000_000),
        };
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            mtime,
        ];
        // SAFETY: valid C string and a two-element timespec array.
        let rc = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c_path.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Err(Error::io(
                "set mtime",
                path,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}
