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

use crate::error::{Error, Result};

pub trait Backend: Send + Sync {
    /// Human-readable location, for messages.
    fn describe(&self) -> String;
    /// Reads exactly `len` bytes at `offset` of object `key` into `out` (replacing its content).
    fn read_range(&self, key: &str, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<()>;
    fn read_all(&self, key: &str) -> Result<Vec<u8>>;
    /// Stores `bytes` under `key` atomically and durably: readers see all of it or nothing.
    fn put_durable(&self, key: &str, bytes: &[u8]) -> Result<()>;
    /// Starts a new object written by appends; fails if `key` exists.
    fn create_appender(&self, key: &str) -> Result<Box<dyn Appender>>;
    fn exists(&self, key: &str) -> Result<bool>;
    fn size(&self, key: &str) -> Result<u64>;
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
        out.clear();
        out.resize(len, 0);
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

    fn create_appender(&self, key: &str) -> Result<Box<dyn Appender>> {
        let path = self.path_of(key);
        self.create_parent(&path)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io("create", &path, e))?;
        Ok(Box::new(FileAppender { file, path, len: 0 }))
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
