//! Storage backends: where a tier's objects (packs) and a site's manifests live.
//!
//! The trait is small on purpose (after restic's backends): whole-object durable puts, ranged
//! reads, and an appender for packs that are written as a stream and made durable once.
//! The local directory is the first implementation; object stores fit the same shape (an
//! appender becomes a multipart upload).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::direct::{reopen_direct, DirectWriter, STAGE_BYTES};
use crate::constants::CHUNK_BYTES_MAX;
use crate::error::{Error, Result};

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
    /// Every object whose key starts with the folder `prefix` (e.g. `packs`), sorted; empty if
    /// there is no such folder.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
}

pub trait Appender: Send {
    /// Appends the concatenation of `parts`; returns the offset it starts at.
    fn append(&mut self, parts: &[&[u8]]) -> Result<u64>;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Makes everything appended durable, including the object's name.
    fn finish_durable(self: Box<Self>) -> Result<()>;
}

/// A directory on a local or network file system.
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
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
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io("create", &path, e))?;
        match reopen_direct(&file) {
            Ok(direct) => Ok(Box::new(DirectAppender::new(
                file,
                direct,
                path,
                expected_bytes,
            ))),
            // tmpfs and some FUSE file systems refuse O_DIRECT (and without /proc there is no
            // second descriptor): write through the page cache.
            Err(e) => {
                if e.raw_os_error() != Some(libc::EINVAL) {
                    tracing::warn!(path = %path.display(), error = %e, "no direct descriptor for a pack; writing it buffered");
                }
                Ok(Box::new(FileAppender { file, path, len: 0 }))
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

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut folders = vec![prefix.trim_end_matches('/').to_string()];
        while let Some(folder) = folders.pop() {
            let path = self.path_of(&folder);
            let listing = match std::fs::read_dir(&path) {
                Ok(listing) => listing,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("list", &path, e)),
            };
            for entry in listing {
                let entry = entry.map_err(|e| Error::io("list", &path, e))?;
                // Keys are ours, so a name that is not UTF-8 is not one of them.
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let key = format!("{folder}/{name}");
                let kind = entry.file_type().map_err(|e| Error::io("list", &path, e))?;
                if kind.is_dir() {
                    folders.push(key);
                } else if kind.is_file() {
                    keys.push(key);
                }
            }
        }
        keys.sort();
        Ok(keys)
    }
}

struct FileAppender {
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
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync", &self.path, e))?;
        sync_dir(self.path.parent().expect("has parent"))
    }
}

/// A pack written with O_DIRECT ([`DirectWriter`]). The file is first given its expected size
/// (so the concurrent direct writes land inside it) and always cut to the appended length
/// before the fdatasync (a fallocate that failed part-way may still have grown it). A crash
/// before the seal leaves zeros after, or between, the records written so far, which a
/// record-by-record read of an unsealed pack stops at, as it stops at any torn record; such a
/// pack holds nothing committed, and (as before) nothing removes it, so a crash now leaves up
/// to the reservation (~133 MiB) per open pack instead of what was written.
struct DirectAppender {
    writer: DirectWriter,
}

impl DirectAppender {
    fn new(buffered: File, direct: File, path: PathBuf, expected_bytes: u64) -> DirectAppender {
        let writer = DirectWriter::new(buffered, direct, path);
        // The target, the chunk that crosses it and the footer. A pack can grow further (a
        // local worker seals between extents); writes past the reservation extend the file
        // one at a time, which is slower but correct.
        let reserve = expected_bytes.saturating_add((CHUNK_BYTES_MAX + STAGE_BYTES) as u64);
        if expected_bytes > 0 {
            writer.reserve(0, reserve);
        }
        DirectAppender { writer }
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
        let len = self.writer.len();
        let path = self.writer.path().to_path_buf();
        let file = self.writer.finish()?;
        file.set_len(len)
            .map_err(|e| Error::io("truncate", &path, e))?;
        file.sync_data()
            .map_err(|e| Error::io("fdatasync", &path, e))?;
        sync_dir(path.parent().expect("has parent"))
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
