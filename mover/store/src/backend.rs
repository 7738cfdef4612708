//! Storage backends: where a tier's objects (packs) and a site's manifests live.
//!
//! The trait is small on purpose (after restic's backends): whole-object durable puts, ranged
//! reads, and an appender for packs that are written as a stream and made durable once.
//! The local directory is the first implementation; object stores fit the same shape (an
//! appender becomes a multipart upload).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::direct::{reopen_direct, DirectWriter, STAGE_BYTES};
use mover_format::constants::CHUNK_BYTES_MAX;
use mover_format::error::{Error, Result};

pub trait Backend: Send + Sync {
    /// Human-readable location, for messages.
    fn describe(&self) -> String;
    /// Reads exactly `len` bytes at `offset` of object `key` into `out` (replacing its content).
    fn read_range(&self, key: &str, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<()>;
    fn read_all(&self, key: &str) -> Result<Vec<u8>>;
    /// Stores `bytes` under `key` atomically and durably: readers see all of it or nothing.
    fn put_durable(&self, key: &str, bytes: &[u8]) -> Result<()>;
    /// Starts a new object written by appends; fails if `key` exists. `expected_bytes` is
    /// about how large it will grow (a hint: space may be reserved for it up front).
    fn create_appender(&self, key: &str, expected_bytes: u64) -> Result<Box<dyn Appender>>;
    fn exists(&self, key: &str) -> Result<bool>;
    fn size(&self, key: &str) -> Result<u64>;
    /// Keys of the objects under the folder `dir` (a key prefix ending before a `/`), at any
    /// depth, in no particular order.
    fn list(&self, dir: &str) -> Result<Vec<String>>;
    /// Removes `key` when no appender, in this process or another, is writing it and
    /// `abandoned(len, tail)` (its length and its last `tail_bytes` bytes, fewer if it is
    /// shorter) says it is garbage. Returns the space freed, or `None` when it was kept.
    fn remove_abandoned(
        &self,
        key: &str,
        tail_bytes: usize,
        abandoned: &dyn Fn(u64, &[u8]) -> bool,
    ) -> Result<Option<u64>>;
    /// Opens `key` and takes the exclusive lock an appender or a remove_abandoned takes,
    /// without waiting: `None` when the object is gone or someone else holds it. Two
    /// repacks thus never take the same pack. The lock lasts as long as the handle.
    fn hold(&self, key: &str) -> Result<Option<Box<dyn Held>>>;
    /// Removes `key` durably (its name is gone after a crash too); `false` if it was gone.
    fn remove(&self, key: &str) -> Result<bool>;
}

/// An object opened under its exclusive lock ([`Backend::hold`]). Reads go through the
/// descriptor, so they keep working whatever happens to the name.
pub trait Held: Send {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads exactly `len` bytes at `offset` into `out` (replacing its content).
    fn read_range(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<()>;
}

pub trait Appender: Send {
    /// Appends the concatenation of `parts`; returns the offset it starts at.
    fn append(&mut self, parts: &[&[u8]]) -> Result<u64>;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Makes everything appended durable, including the object's name. An appender dropped
    /// before this returns Ok removes its object: half an object is never left behind.
    fn finish_durable(self: Box<Self>) -> Result<()>;
}

/// The end of every appender: data and name made durable, and the object kept. An object
/// whose name is gone is refused: where the file system gave its writer no lock, a reclaim
/// elsewhere may have removed it, and an index row pointing at it would point at nothing.
fn make_durable(file: &File, path: &Path, mut cleanup: RemoveUnlessFinished) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    file.sync_data()
        .map_err(|e| Error::io("fdatasync", path, e))?;
    let links = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .nlink();
    if links == 0 {
        return Err(Error::io(
            "finish",
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the object was removed while it was written (no lock on this file system?)",
            ),
        ));
    }
    sync_dir(path.parent().expect("has parent"))?;
    cleanup.finished = true;
    Ok(())
}

/// A directory on a local or network file system.
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    /// Opens the object `key` (never following, nor blocking on, something swapped in for it)
    /// and takes its exclusive lock without waiting. `None`: it is gone, someone holds it (an
    /// appender, a repack), or it was removed between our open and our lock.
    fn open_locked(&self, key: &str) -> Result<Option<(PathBuf, File, std::fs::Metadata)>> {
        let path = self.path_of(key);
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        if !lock_exclusive(&file, false).map_err(|e| Error::io("lock", &path, e))? {
            return Ok(None);
        }
        let meta = file.metadata().map_err(|e| Error::io("stat", &path, e))?;
        if !meta.is_file() || meta.nlink() == 0 {
            return Ok(None);
        }
        Ok(Some((path, file, meta)))
    }

    pub fn new(root: impl Into<PathBuf>) -> LocalDir {
        LocalDir { root: root.into() }
    }

    pub fn path_of(&self, key: &str) -> PathBuf {
        debug_assert!(!key.starts_with('/') && !key.contains(".."));
        self.root.join(key)
    }

    fn create_parent(&self, path: &Path) -> Result<()> {
        let parent = path.parent().expect("keys have a parent");
        if !parent.exists() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io("create directory", parent, e))?;
            // The new directory's own entry must survive a crash before anything in it counts.
            if let Some(grandparent) = parent.parent() {
                sync_dir(grandparent)?;
            }
        }
        Ok(())
    }
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))
}

impl Backend for LocalDir {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn read_range(&self, key: &str, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<()> {
        let path = self.path_of(key);
        let file = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
        // Every byte is overwritten by the read: zero only what the buffer never held.
        if out.len() < len {
            out.resize(len, 0);
        }
        out.truncate(len);
        file.read_exact_at(out, offset)
            .map_err(|e| Error::io("read", &path, e))
    }

    fn read_all(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path_of(key);
        std::fs::read(&path).map_err(|e| Error::io("read", &path, e))
    }

    fn put_durable(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path_of(key);
        self.create_parent(&path)?;
        let tmp = path.with_extension("tmp");
        let mut file = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        file.write_all(bytes)
            .and_then(|_| file.sync_data())
            .map_err(|e| Error::io("write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &tmp, e))?;
        sync_dir(path.parent().expect("has parent"))
    }

    fn create_appender(&self, key: &str, expected_bytes: u64) -> Result<Box<dyn Appender>> {
        let path = self.path_of(key);
        self.create_parent(&path)?;
        let file = create_owned(&path)?;
        let cleanup = RemoveUnlessFinished {
            path: path.clone(),
            finished: false,
        };
        match reopen_direct(&file) {
            Ok(direct) => Ok(Box::new(DirectAppender::new(
                file,
                direct,
                cleanup,
                expected_bytes,
            ))),
            // tmpfs and some FUSE file systems refuse O_DIRECT (and without /proc there is no
            // second descriptor): write through the page cache.
            Err(e) => {
                if e.raw_os_error() != Some(libc::EINVAL) {
                    tracing::warn!(path = %path.display(), error = %e, "no direct descriptor for a pack; writing it buffered");
                }
                Ok(Box::new(FileAppender {
                    cleanup,
                    file,
                    path,
                    len: 0,
                }))
            }
        }
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path_of(key);
        path.try_exists().map_err(|e| Error::io("stat", &path, e))
    }

    fn size(&self, key: &str) -> Result<u64> {
        let path = self.path_of(key);
        std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| Error::io("stat", &path, e))
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut folders = vec![dir.trim_end_matches('/').to_string()];
        while let Some(folder) = folders.pop() {
            let path = self.path_of(&folder);
            let listing = match std::fs::read_dir(&path) {
                Ok(listing) => listing,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("read directory", &path, e)),
            };
            for entry in listing {
                let entry = entry.map_err(|e| Error::io("read directory", &path, e))?;
                // Keys are UTF-8 by construction; any other name is not an object of ours.
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                let kind = entry
                    .file_type()
                    .map_err(|e| Error::io("stat", entry.path(), e))?;
                if kind.is_dir() {
                    folders.push(format!("{folder}/{name}"));
                } else if kind.is_file() {
                    keys.push(format!("{folder}/{name}"));
                }
            }
        }
        Ok(keys)
    }

    fn remove_abandoned(
        &self,
        key: &str,
        tail_bytes: usize,
        abandoned: &dyn Fn(u64, &[u8]) -> bool,
    ) -> Result<Option<u64>> {
        // Held by its appender (see `create_owned`); the lock is ours until `file` closes,
        // after the removal, so no appender can take the object over meanwhile.
        let Some((path, file, meta)) = self.open_locked(key)? else {
            return Ok(None);
        };
        let take = (tail_bytes as u64).min(meta.len());
        let mut tail = vec![0u8; take as usize];
        file.read_exact_at(&mut tail, meta.len() - take)
            .map_err(|e| Error::io("read", &path, e))?;
        if !abandoned(meta.len(), &tail) {
            return Ok(None);
        }
        // The name must still be this file (nothing renames objects, but a check is cheap).
        match std::fs::symlink_metadata(&path) {
            Ok(now) if now.ino() == meta.ino() && now.dev() == meta.dev() => {}
            _ => return Ok(None),
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(Some(meta.blocks() * 512)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("remove", &path, e)),
        }
    }

    fn hold(&self, key: &str) -> Result<Option<Box<dyn Held>>> {
        let Some((path, file, meta)) = self.open_locked(key)? else {
            return Ok(None);
        };
        Ok(Some(Box::new(HeldFile {
            file,
            path,
            len: meta.len(),
        })))
    }

    fn remove(&self, key: &str) -> Result<bool> {
        let path = self.path_of(key);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io("remove", &path, e)),
        }
        sync_dir(path.parent().expect("keys have a parent"))?;
        Ok(true)
    }
}

struct HeldFile {
    file: File,
    path: PathBuf,
    len: u64,
}

impl Held for HeldFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_range(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<()> {
        if out.len() < len {
            out.resize(len, 0);
        }
        out.truncate(len);
        self.file
            .read_exact_at(out, offset)
            .map_err(|e| Error::io("read", &self.path, e))
    }
}

/// How often `create_owned` tries again when its new file is removed before it could lock it.
const CREATE_ATTEMPTS: usize = 8;

/// Creates `path` (which must not exist) and takes an exclusive `flock` on it for as long as
/// the returned descriptor (or a clone) is open: that lock is how `remove_abandoned`, in any
/// process, tells an object being written from one whose writer is gone. A reclaim can remove
/// the file between its creation and the lock; the lock is then taken on a file without a
/// name (no links left), and the name is simply created again.
fn create_owned(path: &Path) -> Result<File> {
    for _ in 0..CREATE_ATTEMPTS {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io("create", path, e))?;
        match lock_exclusive(&file, true) {
            Ok(_) => {}
            // Without locks nothing can reclaim the file either (it must lock it first).
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "no lock on a new pack; it will not be reclaimed if this process dies")
            }
        }
        let links = file
            .metadata()
            .map_err(|e| Error::io("stat", path, e))?
            .nlink();
        if links > 0 {
            return Ok(file);
        }
    }
    Err(Error::io(
        "create",
        path,
        std::io::Error::other(format!(
            "removed {CREATE_ATTEMPTS} times between its creation and its lock"
        )),
    ))
}

/// Takes an exclusive `flock` on `file`; `wait` blocks until it is free, otherwise a lock held
/// elsewhere (any other open file description, in this process or another) returns false.
fn lock_exclusive(file: &File, wait: bool) -> std::io::Result<bool> {
    let operation = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !wait => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Removes an appender's object when the appender goes away unfinished (an error, a cancel, a
/// panic): such an object holds nothing anyone can find, and a pack holds its whole
/// preallocated size. Declared first in an appender so the file is removed while the
/// appender's descriptor still holds the lock.
struct RemoveUnlessFinished {
    path: PathBuf,
    finished: bool,
}

impl Drop for RemoveUnlessFinished {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove an unfinished pack; the next site open reclaims it")
            }
        }
    }
}

struct FileAppender {
    cleanup: RemoveUnlessFinished,
    file: File,
    path: PathBuf,
    len: u64,
}

impl Appender for FileAppender {
    fn append(&mut self, parts: &[&[u8]]) -> Result<u64> {
        let offset = self.len;
        let mut at = offset;
        for part in parts {
            // Positioned writes: no seek state to get wrong, and the kernel copies straight
            // from the caller's buffer.
            self.file
                .write_all_at(part, at)
                .map_err(|e| Error::io("write", &self.path, e))?;
            at += part.len() as u64;
        }
        self.len = at;
        Ok(offset)
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn finish_durable(self: Box<Self>) -> Result<()> {
        let FileAppender {
            cleanup,
            file,
            path,
            ..
        } = *self;
        make_durable(&file, &path, cleanup)
    }
}

/// A pack written with O_DIRECT ([`DirectWriter`]). The file is first given its expected size
/// (so the concurrent direct writes land inside it) and always cut to the appended length
/// before the fdatasync (a fallocate that failed part-way may still have grown it). A crash
/// before the seal leaves zeros after, or between, the records written so far, which a
/// record-by-record read of an unsealed pack stops at, as it stops at any torn record; such a
/// pack holds nothing committed and up to the reservation (~133 MiB): an appender that fails
/// or is dropped removes it, and after a crash `store::reclaim` does.
struct DirectAppender {
    cleanup: RemoveUnlessFinished,
    writer: DirectWriter,
}

impl DirectAppender {
    fn new(
        buffered: File,
        direct: File,
        cleanup: RemoveUnlessFinished,
        expected_bytes: u64,
    ) -> DirectAppender {
        let writer = DirectWriter::new(buffered, direct, cleanup.path.clone());
        // The target, the chunk that crosses it and the footer. A pack can grow further (a
        // local worker seals between extents); writes past the reservation extend the file
        // one at a time, which is slower but correct.
        let reserve = expected_bytes.saturating_add((CHUNK_BYTES_MAX + STAGE_BYTES) as u64);
        if expected_bytes > 0 {
            writer.reserve(0, reserve);
        }
        DirectAppender { cleanup, writer }
    }
}

impl Appender for DirectAppender {
    fn append(&mut self, parts: &[&[u8]]) -> Result<u64> {
        self.writer.append(parts)
    }

    fn len(&self) -> u64 {
        self.writer.len()
    }

    fn finish_durable(self: Box<Self>) -> Result<()> {
        let DirectAppender { cleanup, writer } = *self;
        let len = writer.len();
        let path = writer.path().to_path_buf();
        let file = writer.finish()?;
        file.set_len(len)
            .map_err(|e| Error::io("truncate", &path, e))?;
        make_durable(&file, &path, cleanup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn appended_object_is_exactly_the_appends() {
        // Several staging buffers' worth, written by concurrent writers into a preallocated
        // file, plus an unaligned tail: the object must be the appends, byte for byte, with
        // nothing of the reservation left after them.
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalDir::new(dir.path());
        let mut appender = backend.create_appender("p/one", 64 << 20).unwrap();
        let mut expected = Vec::new();
        for (i, len) in [16, 3 << 20, 123_457, 5 << 20, 1, 2 << 20]
            .into_iter()
            .enumerate()
        {
            let part = pattern(len, i as u8);
            let half = len / 2;
            assert_eq!(
                appender.append(&[&part[..half], &part[half..]]).unwrap(),
                expected.len() as u64
            );
            expected.extend_from_slice(&part);
        }
        assert_eq!(appender.len(), expected.len() as u64);
        appender.finish_durable().unwrap();
        assert_eq!(backend.size("p/one").unwrap(), expected.len() as u64);
        assert!(backend.read_all("p/one").unwrap() == expected);
    }

    #[test]
    fn an_object_smaller_than_a_staging_buffer_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalDir::new(dir.path());
        let mut appender = backend.create_appender("small", 128 << 20).unwrap();
        appender.append(&[b"header", b"record"]).unwrap();
        appender.finish_durable().unwrap();
        assert_eq!(backend.read_all("small").unwrap(), b"headerrecord");
        assert!(
            backend.create_appender("small", 0).is_err(),
            "keys are never reused"
        );
    }
}
