//! Walks the source tree (metadata only) and hands the work on as it goes: each manifest
//! entry in final order, then the file extents that must be read for it. Unchanged files are
//! taken from the parent snapshot without being opened. Nothing here grows with the tree but
//! the hardlink map (files with more than one link) and one directory listing per level.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::Metadata;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::job::Warning;
use mover_format::constants::EXTENT_BYTES;
use mover_format::manifest::{path_order, Entry, EntryKind, Extent};
use mover_format::manifest_blocks::ManifestStream;
use mover_format::ChunkId;

/// One extent to read: `len` bytes at `offset` of entry `entry`.
#[derive(Clone, Debug)]
pub struct WorkItem {
    pub entry: usize,
    pub extent: usize,
    pub path: Arc<PathBuf>,
    pub offset: u64,
    pub len: u64,
    /// (size, mtime_ns, ctime_ns) at scan time, to notice a file changing under us.
    pub stamp: (u64, i64, i64),
}

#[derive(Default, Debug)]
pub struct ScanTotals {
    pub warnings: Vec<Warning>,
    pub bytes_total: u64,
    pub bytes_reused: u64,
    pub files: u64,
    pub files_reused: u64,
    pub directories: u64,
}

/// Where the scan's results go, in order: an entry (entry `n` is the n-th given), then the
/// `work` items to read for it. A `false` answer stops the scan.
pub trait ScanSink {
    fn entry(&mut self, entry: Entry, work: usize) -> bool;
    fn work(&mut self, item: WorkItem) -> bool;
}

/// The parent snapshot's entries, asked for in scan order (so a cursor over a manifest can
/// answer): the entry at `path`, if the parent has one.
pub trait Reuse {
    fn find(&mut self, path: &[u8]) -> Option<Entry>;
}

/// No parent: every file is read.
pub struct NoReuse;

impl Reuse for NoReuse {
    fn find(&mut self, _: &[u8]) -> Option<Entry> {
        None
    }
}

/// The parent snapshot as a cursor: entries come in manifest order, which is the scan's, so
/// one pass over the parent answers every question. A file whose chunks the site found
/// damaged is not reused (it is read again and its good bytes replace the bad record).
pub struct ParentCursor<R: std::io::Read> {
    stream: Option<ManifestStream<R>>,
    next: Option<Entry>,
    damaged: HashSet<ChunkId>,
}

impl<R: std::io::Read> ParentCursor<R> {
    pub fn new(stream: ManifestStream<R>, damaged: HashSet<ChunkId>) -> Self {
        ParentCursor {
            stream: Some(stream),
            next: None,
            damaged,
        }
    }

    fn advance(&mut self) {
        let Some(stream) = &mut self.stream else {
            self.next = None;
            return;
        };
        match stream.next_entry() {
            Ok(next) => {
                self.next = next;
                if self.next.is_none() {
                    self.stream = None;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "parent snapshot unreadable from here on; reading the remaining files");
                self.stream = None;
                self.next = None;
            }
        }
    }

    fn intact(&self, entry: &Entry) -> bool {
        match &entry.kind {
            EntryKind::File { extents, .. } if !self.damaged.is_empty() => !extents
                .iter()
                .flat_map(|x| &x.chunks)
                .any(|c| self.damaged.contains(&c.id)),
            _ => true,
        }
    }
}

impl<R: std::io::Read> Reuse for ParentCursor<R> {
    fn find(&mut self, path: &[u8]) -> Option<Entry> {
        loop {
            if self.next.is_none() {
                self.stream.as_ref()?;
                self.advance();
                self.next.as_ref()?;
            }
            let next = self.next.as_ref().expect("checked above");
            match path_order(&next.path, path) {
                std::cmp::Ordering::Less => self.next = None,
                std::cmp::Ordering::Greater => return None,
                std::cmp::Ordering::Equal => {
                    let entry = self.next.take().expect("checked above");
                    return self.intact(&entry).then_some(entry);
                }
            }
        }
    }
}

/// Every entry and work item, collected (tests).
#[derive(Default)]
pub struct Collected {
    pub entries: Vec<Entry>,
    pub work: Vec<WorkItem>,
}

impl ScanSink for Collected {
    fn entry(&mut self, entry: Entry, _: usize) -> bool {
        self.entries.push(entry);
        true
    }
    fn work(&mut self, item: WorkItem) -> bool {
        self.work.push(item);
        true
    }
}

pub fn scan(
    source: &Path,
    reuse: &mut dyn Reuse,
    sink: &mut dyn ScanSink,
) -> std::io::Result<ScanTotals> {
    let mut scan = Scanner {
        out: ScanTotals::default(),
        reuse,
        sink,
        entries: 0,
        stopped: false,
        hardlinks: HashMap::new(),
    };
    let meta = std::fs::symlink_metadata(source)?;
    if meta.is_dir() {
        scan.add(source, Vec::new(), &meta);
        scan.walk(source)?;
    } else {
        let name = source
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        scan.add(source, name, &meta);
    }
    Ok(scan.out)
}

struct Scanner<'a> {
    out: ScanTotals,
    reuse: &'a mut dyn Reuse,
    sink: &'a mut dyn ScanSink,
    /// Entries given to the sink so far.
    entries: usize,
    stopped: bool,
    hardlinks: HashMap<(u64, u64), Vec<u8>>,
}

impl Scanner<'_> {
    /// Depth-first, siblings sorted by name bytes; an explicit stack so deep trees cannot
    /// overflow the thread's stack.
    fn walk(&mut self, root: &Path) -> std::io::Result<()> {
        struct Level {
            dir: PathBuf,
            rel: Vec<u8>,
            names: std::vec::IntoIter<OsString>,
        }
        let mut stack = vec![Level {
            dir: root.to_path_buf(),
            rel: Vec::new(),
            names: self.list(root, b"").into_iter(),
        }];
        while let Some(level) = stack.last_mut() {
            if self.stopped {
                break;
            }
            let Some(name) = level.names.next() else {
                stack.pop();
                continue;
            };
            let path = level.dir.join(&name);
            let mut rel = level.rel.clone();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.as_bytes());
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                Err(e) => {
                    self.warn(&rel, format!("vanished or unreadable before backup: {e}"));
                    continue;
                }
            };
            if self.add(&path, rel.clone(), &meta) && meta.is_dir() {
                let names = self.list(&path, &rel).into_iter();
                stack.push(Level {
                    dir: path,
                    rel,
                    names,
                });
            }
        }
        Ok(())
    }

    fn list(&mut self, dir: &Path, rel: &[u8]) -> Vec<OsString> {
        let mut names: Vec<OsString> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(|e| match e {
                    Ok(e) => Some(e.file_name()),
                    Err(err) => {
                        self.warn(rel, format!("directory listing incomplete: {err}"));
                        None
                    }
                })
                .collect(),
            Err(e) => {
                self.warn(
                    rel,
                    format!("directory not readable, its contents are not in the snapshot: {e}"),
                );
                Vec::new()
            }
        };
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        names
    }

    fn warn(&mut self, rel: &[u8], reason: String) {
        self.out.warnings.push(Warning {
            path: String::from_utf8_lossy(rel).into_owned(),
            reason,
        });
    }

    /// Adds the entry for `path`; false when it was skipped.
    fn add(&mut self, path: &Path, rel: Vec<u8>, meta: &Metadata) -> bool {
        let file_type = meta.file_type();
        let kind = if file_type.is_dir() {
            self.out.directories += 1;
            EntryKind::Directory
        } else if file_type.is_symlink() {
            match std::fs::read_link(path) {
                Ok(target) => EntryKind::Symlink {
                    target: target.into_os_string().into_vec(),
                },
                Err(e) => {
                    self.warn(&rel, format!("symlink not readable: {e}"));
                    return false;
                }
            }
        } else if file_type.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = self.hardlinks.get(&key) {
                    let target = first.clone();
                    self.push(rel, EntryKind::Hardlink { target }, meta);
                    return true;
                }
                self.hardlinks.insert(key, rel.clone());
            }
            self.out.files += 1;
            return self.add_file(path, rel, meta);
        } else {
            let what = if file_type.is_socket() {
                "socket"
            } else if file_type.is_fifo() {
                "fifo"
            } else if file_type.is_block_device() {
                "block device"
            } else if file_type.is_char_device() {
                "character device"
            } else {
                "unknown file type"
            };
            self.warn(
                &rel,
                format!("skipped: {what} (only files, directories and symlinks are backed up)"),
            );
            return false;
        };
        self.push(rel, kind, meta);
        true
    }

    fn push(&mut self, path: Vec<u8>, kind: EntryKind, meta: &Metadata) {
        let entry = entry_of(path, kind, meta);
        self.emit(entry, Vec::new());
    }

    /// Gives the sink the entry, then its work items.
    fn emit(&mut self, entry: Entry, work: Vec<WorkItem>) {
        if self.stopped {
            return;
        }
        self.entries += 1;
        if !self.sink.entry(entry, work.len()) {
            self.stopped = true;
            return;
        }
        for item in work {
            if !self.sink.work(item) {
                self.stopped = true;
                return;
            }
        }
    }

    fn add_file(&mut self, path: &Path, rel: Vec<u8>, meta: &Metadata) -> bool {
        let size = meta.len();
        self.out.bytes_total += size;
        let mut entry = entry_of(
            rel,
            EntryKind::File {
                size,
                extents: Vec::new(),
            },
            meta,
        );
        if let Some(previous) = self.reuse.find(&entry.path) {
            if let EntryKind::File {
                size: old_size,
                extents,
            } = previous.kind
            {
                let unchanged = old_size == size
                    && previous.mtime_ns == entry.mtime_ns
                    && previous.ctime_ns == entry.ctime_ns
                    && previous.inode == entry.inode
                    && previous.device == entry.device;
                if unchanged {
                    self.out.bytes_reused += size;
                    self.out.files_reused += 1;
                    entry.kind = EntryKind::File { size, extents };
                    self.emit(entry, Vec::new());
                    return true;
                }
            }
        }
        let stamp = (size, entry.mtime_ns, entry.ctime_ns);
        let regions = match data_regions(path, meta) {
            Ok(regions) => regions,
            Err(e) => {
                let rel = entry.path.clone();
                self.warn(
                    &rel,
                    format!("could not map data regions, reading it whole: {e}"),
                );
                vec![(0, size)]
            }
        };
        let shared_path = Arc::new(path.to_path_buf());
        let index = self.entries;
        let mut extents = Vec::new();
        let mut work = Vec::new();
        for (start, end) in regions {
            let mut at = start;
            while at < end {
                // Extents end on the fixed grid so boundaries do not depend on region layout
                // beyond the holes themselves.
                let grid_end = (at / EXTENT_BYTES + 1) * EXTENT_BYTES;
                let stop = grid_end.min(end);
                work.push(WorkItem {
                    entry: index,
                    extent: extents.len(),
                    path: shared_path.clone(),
                    offset: at,
                    len: stop - at,
                    stamp,
                });
                extents.push(Extent {
                    offset: at,
                    chunks: Vec::new(),
                });
                at = stop;
            }
        }
        entry.kind = EntryKind::File { size, extents };
        self.emit(entry, work);
        true
    }
}

fn entry_of(path: Vec<u8>, kind: EntryKind, meta: &Metadata) -> Entry {
    Entry {
        path,
        kind,
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        inode: meta.ino(),
        device: meta.dev(),
    }
}

/// Data regions of a file as (start, end). Holes are found with SEEK_DATA/SEEK_HOLE only when
/// the allocated blocks say the file may be sparse, which keeps the common case to a stat.
pub fn data_regions(path: &Path, meta: &Metadata) -> std::io::Result<Vec<(u64, u64)>> {
    let size = meta.len();
    if size == 0 {
        return Ok(Vec::new());
    }
    if meta.blocks() * 512 >= size {
        return Ok(vec![(0, size)]);
    }
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    let fd = file.as_raw_fd();
    let mut regions = Vec::new();
    let mut at: i64 = 0;
    while (at as u64) < size {
        // SAFETY: lseek on a file descriptor we own.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(err);
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = (hole as u64).min(size);
        if end > data as u64 {
            regions.push((data as u64, end));
        }
        at = hole;
    }
    Ok(regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mover_format::manifest::{ChunkRef, Manifest, MANIFEST_VERSION};
    use mover_format::manifest_blocks::MANIFEST_V2_VERSION;

    fn tree(root: &Path) {
        for d in ["a", "a-b", "a/c", "b"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for (i, f) in ["a/c/x", "a/y", "a-b/z", "b/w", "top", "a/c/x2"]
            .iter()
            .enumerate()
        {
            std::fs::write(root.join(f), vec![i as u8; i + 1]).unwrap();
        }
    }

    #[test]
    fn a_parent_of_either_version_is_merged_with_the_scan_in_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        tree(dir.path());
        let mut first = Collected::default();
        let totals = scan(dir.path(), &mut NoReuse, &mut first).unwrap();
        assert_eq!(totals.files, 6);
        assert_eq!(first.work.len(), 6);
        // Scan order is manifest order.
        for pair in first.entries.windows(2) {
            assert_eq!(
                path_order(&pair[0].path, &pair[1].path),
                std::cmp::Ordering::Less
            );
        }
        let mut entries = first.entries.clone();
        for entry in &mut entries {
            if let EntryKind::File { extents, .. } = &mut entry.kind {
                for extent in extents {
                    extent.chunks = vec![ChunkRef {
                        id: ChunkId([7; 32]),
                        len: 1,
                    }];
                }
            }
        }
        for version in [MANIFEST_VERSION, MANIFEST_V2_VERSION] {
            let parent = Manifest {
                version,
                source: b"/x".to_vec(),
                hostname: String::new(),
                site: String::new(),
                tier: String::new(),
                created_unix_ns: 0,
                parent: None,
                entries: entries.clone(),
            };
            let encoded = mover_format::manifest::encode(&parent).unwrap();
            let stream = ManifestStream::open(&encoded.bytes[..], Some(&encoded.id)).unwrap();
            let mut cursor = ParentCursor::new(stream, HashSet::new());
            let mut again = Collected::default();
            let totals = scan(dir.path(), &mut cursor, &mut again).unwrap();
            assert_eq!(totals.files_reused, 6, "version {version}");
            assert!(again.work.is_empty(), "version {version}");
            assert_eq!(again.entries, entries, "version {version}");

            // A damaged chunk makes its files read again.
            let stream = ManifestStream::open(&encoded.bytes[..], Some(&encoded.id)).unwrap();
            let mut cursor = ParentCursor::new(stream, HashSet::from([ChunkId([7; 32])]));
            let totals = scan(dir.path(), &mut cursor, &mut Collected::default()).unwrap();
            assert_eq!(totals.files_reused, 0, "version {version}");
        }
    }
}
