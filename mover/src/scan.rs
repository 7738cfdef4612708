//! Walks the source tree (metadata only) and plans the work: manifest entries in final order,
//! and the file extents that must be read. Unchanged files are taken from the parent snapshot
//! without being opened.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::Metadata;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::constants::EXTENT_BYTES;
use crate::format::manifest::{Entry, EntryKind, Extent};
use crate::job::Warning;

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

#[derive(Default)]
pub struct ScanResult {
    pub entries: Vec<Entry>,
    pub work: Vec<WorkItem>,
    pub warnings: Vec<Warning>,
    pub bytes_total: u64,
    pub bytes_reused: u64,
    pub files: u64,
    pub files_reused: u64,
    pub directories: u64,
}

/// Parent snapshot's files by path, for reuse.
pub type ReuseMap<'a> = HashMap<&'a [u8], &'a Entry>;

pub fn scan(source: &Path, reuse: &ReuseMap) -> std::io::Result<ScanResult> {
    let mut scan = Scanner {
        out: ScanResult::default(),
        reuse,
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
    out: ScanResult,
    reuse: &'a ReuseMap<'a>,
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
        self.out.entries.push(Entry {
            path,
            kind,
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            inode: meta.ino(),
            device: meta.dev(),
        });
    }

    fn add_file(&mut self, path: &Path, rel: Vec<u8>, meta: &Metadata) -> bool {
        let size = meta.len();
        self.out.bytes_total += size;
        self.push(
            rel,
            EntryKind::File {
                size,
                extents: Vec::new(),
            },
            meta,
        );
        let index = self.out.entries.len() - 1;
        let entry = &self.out.entries[index];
        if let Some(previous) = self.reuse.get(entry.path.as_slice()) {
            if let EntryKind::File {
                size: old_size,
                extents,
            } = &previous.kind
            {
                let unchanged = *old_size == size
                    && previous.mtime_ns == entry.mtime_ns
                    && previous.ctime_ns == entry.ctime_ns
                    && previous.inode == entry.inode
                    && previous.device == entry.device;
                if unchanged {
                    let extents = extents.clone();
                    self.out.bytes_reused += size;
                    self.out.files_reused += 1;
                    self.out.entries[index].kind = EntryKind::File { size, extents };
                    return true;
                }
            }
        }
        let stamp = (size, entry.mtime_ns, entry.ctime_ns);
        let regions = match data_regions(path, meta) {
            Ok(regions) => regions,
            Err(e) => {
                let rel = self.out.entries[index].path.clone();
                self.warn(
                    &rel,
                    format!("could not map data regions, reading it whole: {e}"),
                );
                vec![(0, size)]
            }
        };
        let shared_path = Arc::new(path.to_path_buf());
        let mut extents = Vec::new();
        for (start, end) in regions {
            let mut at = start;
            while at < end {
                // Extents end on the fixed grid so boundaries do not depend on region layout
                // beyond the holes themselves.
                let grid_end = (at / EXTENT_BYTES + 1) * EXTENT_BYTES;
                let stop = grid_end.min(end);
                self.out.work.push(WorkItem {
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
        self.out.entries[index].kind = EntryKind::File { size, extents };
        true
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
