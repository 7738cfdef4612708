//! The directory a restore writes into, reached only through directory descriptors.
//!
//! Why: the daemon usually runs as root, and the target is often a directory its caller can
//! write to (a user's scratch space). Anything done by full path (create, chown, chmod, utimes)
//! resolves every component again at that moment, so a caller who swaps a restored directory
//! for a symlink mid-restore would have root create, chown and chmod files wherever the link
//! points. Here every step starts at the target's own descriptor and walks the manifest's
//! relative path one component at a time with `O_NOFOLLOW | O_DIRECTORY`, then acts on the
//! last component with a `*at` call that does not follow it either (or on the descriptor of
//! the file just created). A directory swapped for a symlink or a file stops the restore with
//! one line naming it; a directory merely renamed away keeps receiving through the descriptor
//! already open (it is the caller's own rename, and nothing outside the target is resolved).
//!
//! New directories are created 0700 and get their snapshot mode in the final pass, so nobody
//! else can plant entries in them while the restore runs.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::backup::path_text;
use mover_format::error::{Error, Result};

/// What a restore needs to know of something already at a path (a resumed restore).
pub struct Existing {
    pub is_dir: bool,
    pub is_file: bool,
    pub size: u64,
    pub mtime_ns: i64,
}

/// Owner, mode and modification time to give a restored entry.
pub struct Metadata {
    /// `Some((uid, gid))` when the restore runs as root.
    pub owner: Option<(u32, u32)>,
    pub mode: u32,
    pub mtime_ns: i64,
}

pub struct TargetDir {
    root: OwnedFd,
    path: PathBuf,
    /// The last directory looked up: entries come grouped by directory, so one walk serves
    /// all of a directory's entries.
    cached: Option<(Vec<u8>, OwnedFd)>,
}

impl TargetDir {
    /// Opens the restore target (an existing directory, not a symlink).
    /// `path` is absolute and already resolved (canonical): it is walked from `/` one
    /// component at a time without following symlinks, so a component swapped for a link
    /// after it was resolved is refused rather than followed.
    pub fn open(path: &Path) -> Result<TargetDir> {
        if !path.is_absolute() {
            return Err(Error::Refused(format!(
                "restore target {}: expected an absolute, resolved path",
                path.display()
            )));
        }
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut at = rustix::fs::open("/", flags, Mode::empty())
            .map_err(|e| Error::io("open restore target", path, e.into()))?;
        for component in path.components() {
            let std::path::Component::Normal(name) = component else {
                continue;
            };
            at = rustix::fs::openat(&at, name, flags, Mode::empty()).map_err(|e| match e {
                Errno::LOOP | Errno::NOTDIR => Error::Refused(format!(
                    "restore target {}: {} is no longer a directory (replaced by a link?); stopped without following it",
                    path.display(),
                    name.to_string_lossy()
                )),
                e => Error::io("open restore target", path, e.into()),
            })?;
        }
        Ok(TargetDir {
            root: at,
            path: path.to_path_buf(),
            cached: None,
        })
    }

    /// The full path of `rel`, for messages only: nothing is ever opened by it.
    pub fn display(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.path.clone()
        } else {
            self.path.join(OsStr::from_bytes(rel))
        }
    }

    /// The descriptor of directory `rel` ("" is the target itself).
    fn dir(&mut self, rel: &[u8]) -> Result<BorrowedFd<'_>> {
        if rel.is_empty() {
            return Ok(self.root.as_fd());
        }
        if !matches!(&self.cached, Some((at, _)) if at == rel) {
            let fd = self.walk(rel)?;
            self.cached = Some((rel.to_vec(), fd));
        }
        Ok(self.cached.as_ref().expect("just cached").1.as_fd())
    }

    fn walk(&self, rel: &[u8]) -> Result<OwnedFd> {
        let mut at: Option<OwnedFd> = None;
        for component in rel.split(|&b| b == b'/') {
            let parent = at.as_ref().map_or(self.root.as_fd(), |fd| fd.as_fd());
            let next = rustix::fs::openat(
                parent,
                OsStr::from_bytes(component),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.not_a_directory(rel, e))?;
            at = Some(next);
        }
        at.ok_or_else(|| Error::corrupt("manifest", "empty directory path"))
    }

    fn not_a_directory(&self, rel: &[u8], e: Errno) -> Error {
        match e {
            // O_NOFOLLOW | O_DIRECTORY met a symlink or a file where a directory was.
            Errno::LOOP | Errno::NOTDIR | Errno::NOENT => Error::Refused(format!(
                "restore target: {} is no longer the directory this restore created (replaced or removed while restoring); stopped without following it",
                self.display(rel).display()
            )),
            e => Error::io("open directory", self.display(rel), e.into()),
        }
    }

    /// The descriptor of `rel`'s parent directory and `rel`'s last component.
    fn parent<'r>(&mut self, rel: &'r [u8]) -> Result<(BorrowedFd<'_>, &'r OsStr)> {
        let (parent, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(slash) => (&rel[..slash], &rel[slash + 1..]),
            None => (&rel[..0], rel),
        };
        if name.is_empty() || name == b"." || name == b".." {
            return Err(Error::corrupt(
                "manifest",
                format!("entry {:?} has no file name", path_text(rel)),
            ));
        }
        Ok((self.dir(parent)?, OsStr::from_bytes(name)))
    }

    /// Creates directory `rel` for a snapshot entry: 0700 until the final pass gives it its
    /// snapshot mode, so nobody else can plant entries in it meanwhile.
    pub fn mkdir(&mut self, rel: &[u8]) -> Result<()> {
        self.mkdir_mode(rel, Mode::RWXU)
    }

    /// Creates directory `rel` above a restored subtree, which has no snapshot entry to take
    /// its mode from: 0755 less the umask, as `mkdir -p` would, root's (or the caller's).
    pub fn mkdir_ancestor(&mut self, rel: &[u8]) -> Result<()> {
        self.mkdir_mode(
            rel,
            Mode::RWXU | Mode::RGRP | Mode::XGRP | Mode::ROTH | Mode::XOTH,
        )
    }

    fn mkdir_mode(&mut self, rel: &[u8], mode: Mode) -> Result<()> {
        let shown = self.display(rel);
        let (dir, name) = self.parent(rel)?;
        rustix::fs::mkdirat(dir, name, mode)
            .map_err(|e| Error::io("create directory", shown, e.into()))
    }

    /// Creates regular file `rel`, which must not exist (a symlink there is not followed).
    pub fn create_file(&mut self, rel: &[u8]) -> Result<File> {
        let shown = self.display(rel);
        let (dir, name) = self.parent(rel)?;
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::RUSR | Mode::WUSR,
        )
        .map_err(|e| Error::io("create", shown, e.into()))?;
        Ok(File::from(fd))
    }

    pub fn symlink(&mut self, target: &[u8], rel: &[u8]) -> Result<()> {
        let shown = self.display(rel);
        let (dir, name) = self.parent(rel)?;
        rustix::fs::symlinkat(OsStr::from_bytes(target), dir, name)
            .map_err(|e| Error::io("create symlink", shown, e.into()))
    }

    /// Links `rel` to the file already restored at `existing` (neither is followed).
    pub fn hard_link(&mut self, existing: &[u8], rel: &[u8]) -> Result<()> {
        let shown = self.display(rel);
        let (from_dir, from_name) = self.parent(existing)?;
        // The source's directory stays open while the destination's is looked up.
        let from_dir = from_dir
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicate descriptor of", &shown, e))?;
        let (to_dir, to_name) = self.parent(rel)?;
        rustix::fs::linkat(&from_dir, from_name, to_dir, to_name, AtFlags::empty())
            .map_err(|e| Error::io("create hardlink", shown, e.into()))
    }

    /// What is at `rel` now, without following a symlink there; `None` if nothing is.
    pub fn lstat(&mut self, rel: &[u8]) -> Result<Option<Existing>> {
        let shown = self.display(rel);
        let stat = if rel.is_empty() {
            rustix::fs::fstat(&self.root)
        } else {
            let (dir, name) = self.parent(rel)?;
            rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        };
        match stat {
            Ok(stat) => {
                let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
                Ok(Some(Existing {
                    is_dir: kind == rustix::fs::FileType::Directory,
                    is_file: kind == rustix::fs::FileType::RegularFile,
                    size: stat.st_size as u64,
                    mtime_ns: stat.st_mtime * 1_000_000_000 + stat.st_mtime_nsec as i64,
                }))
            }
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(Error::io("inspect", shown, e.into())),
        }
    }

    /// Removes the non-directory at `rel` (a symlink is removed, not followed).
    pub fn remove_file(&mut self, rel: &[u8]) -> Result<()> {
        let shown = self.display(rel);
        let (dir, name) = self.parent(rel)?;
        rustix::fs::unlinkat(dir, name, AtFlags::empty())
            .map_err(|e| Error::io("remove", shown, e.into()))
    }

    /// Owner, mode and mtime of a file through its own descriptor.
    pub fn set_file_metadata(&self, file: &File, rel: &[u8], meta: &Metadata) -> Result<()> {
        let shown = || self.display(rel);
        if let Some((uid, gid)) = meta.owner {
            rustix::fs::fchown(file, Some(uid_of(uid)), Some(gid_of(gid)))
                .map_err(|e| Error::io("chown", shown(), e.into()))?;
        }
        // After chown, which clears set-id bits.
        rustix::fs::fchmod(file, Mode::from_raw_mode(meta.mode & 0o7777))
            .map_err(|e| Error::io("chmod", shown(), e.into()))?;
        rustix::fs::futimens(file, &times(meta.mtime_ns))
            .map_err(|e| Error::io("set mtime", shown(), e.into()))
    }

    /// Owner and mtime of the symlink `rel` itself. The owner is set through an `O_PATH`
    /// descriptor of the link, checked to be a symlink, so a name swapped for a hard link to
    /// another file is not chowned.
    pub fn set_symlink_metadata(&mut self, rel: &[u8], meta: &Metadata) -> Result<()> {
        let shown = self.display(rel);
        let (dir, name) = self.parent(rel)?;
        if let Some((uid, gid)) = meta.owner {
            let link = rustix::fs::openat(
                dir,
                name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io("open", &shown, e.into()))?;
            let stat =
                rustix::fs::fstat(&link).map_err(|e| Error::io("inspect", &shown, e.into()))?;
            if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Symlink {
                return Err(Error::Refused(format!(
                    "restore target: {} is no longer the symlink this restore created; stopped",
                    shown.display()
                )));
            }
            rustix::fs::chownat(
                &link,
                "",
                Some(uid_of(uid)),
                Some(gid_of(gid)),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| Error::io("chown", &shown, e.into()))?;
        }
        let (dir, name) = self.parent(rel)?;
        // No descriptor form sets a symlink's own times; at worst a swapped name has its
        // mtime set, never its owner or mode.
        rustix::fs::utimensat(dir, name, &times(meta.mtime_ns), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| Error::io("set mtime", &shown, e.into()))
    }

    /// Owner, mode and mtime of directory `rel`, reached by the same no-follow walk. The mode
    /// may forbid reading the directory, so it is held by an `O_PATH` descriptor and changed
    /// through that descriptor's /proc link, which names the inode itself, not a path.
    pub fn set_dir_metadata(&mut self, rel: &[u8], meta: &Metadata) -> Result<()> {
        let shown = self.display(rel);
        let owned;
        let fd = if rel.is_empty() {
            self.root.as_fd()
        } else {
            owned = self.walk(rel)?;
            owned.as_fd()
        };
        if let Some((uid, gid)) = meta.owner {
            rustix::fs::chownat(
                fd,
                "",
                Some(uid_of(uid)),
                Some(gid_of(gid)),
                AtFlags::EMPTY_PATH,
            )
            .map_err(|e| Error::io("chown", &shown, e.into()))?;
        }
        let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        rustix::fs::chmod(&*link, Mode::from_raw_mode(meta.mode & 0o7777))
            .map_err(|e| Error::io("chmod", &shown, e.into()))?;
        rustix::fs::utimensat(
            rustix::fs::CWD,
            &*link,
            &times(meta.mtime_ns),
            AtFlags::empty(),
        )
        .map_err(|e| Error::io("set mtime", &shown, e.into()))
    }

    /// Flushes the target's file system: one syncfs instead of an fsync per file.
    pub fn sync(&self) -> Result<()> {
        // syncfs needs a descriptor opened for more than O_PATH.
        let fd = rustix::fs::openat(
            &self.root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open", &self.path, e.into()))?;
        rustix::fs::syncfs(&fd).map_err(|e| Error::io("syncfs", &self.path, e.into()))
    }

    /// Whether the target holds nothing.
    pub fn is_empty(&self) -> Result<bool> {
        let fd = rustix::fs::openat(
            &self.root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("read directory", &self.path, e.into()))?;
        let mut dir = rustix::fs::Dir::new(fd)
            .map_err(|e| Error::io("read directory", &self.path, e.into()))?;
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(|e| Error::io("read directory", &self.path, e.into()))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Takes file `name` in the target itself (created if missing; a symlink there is refused,
    /// not followed) under an exclusive lock and replaces its contents. The lock lasts as long
    /// as the returned file is open: it tells another restore that this target is being
    /// written right now.
    pub fn claim_top_file(&self, name: &str, contents: &[u8]) -> Result<File> {
        let shown = self.path.join(name);
        let fd = rustix::fs::openat(
            &self.root,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::RUSR | Mode::WUSR | Mode::RGRP | Mode::ROTH,
        )
        .map_err(|e| Error::io("create", &shown, e.into()))?;
        self.plain_file(&fd, &shown)?;
        match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                return Err(Error::Refused(format!(
                    "restore target {} is being written by another restore right now: wait for it to end",
                    self.path.display()
                )))
            }
            Err(e) => return Err(Error::io("lock", &shown, e.into())),
        }
        let file = File::from(fd);
        file.set_len(0)
            .and_then(|()| std::os::unix::fs::FileExt::write_all_at(&file, contents, 0))
            .map_err(|e| Error::io("write", &shown, e))?;
        Ok(file)
    }

    /// The contents of file `name` in the target itself, up to `max` bytes; `None` if absent.
    pub fn read_top_file(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let shown = self.path.join(name);
        let fd = match rustix::fs::openat(
            &self.root,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(Error::io("open", &shown, e.into())),
        };
        self.plain_file(&fd, &shown)?;
        let mut contents = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(File::from(fd), max), &mut contents)
            .map_err(|e| Error::io("read", &shown, e))?;
        Ok(Some(contents))
    }

    /// Refuses anything but a regular file with one link (a fifo would block us, a hard link
    /// would have us rewrite a file outside the target).
    fn plain_file(&self, fd: &OwnedFd, shown: &Path) -> Result<()> {
        let stat = rustix::fs::fstat(fd).map_err(|e| Error::io("inspect", shown, e.into()))?;
        let regular =
            rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::RegularFile;
        if !regular || stat.st_nlink != 1 {
            return Err(Error::Refused(format!(
                "{} is not a plain file this restore wrote (a regular file with one link); remove it",
                shown.display()
            )));
        }
        Ok(())
    }

    pub fn remove_top_file(&self, name: &str) -> Result<()> {
        rustix::fs::unlinkat(&self.root, name, AtFlags::empty())
            .map_err(|e| Error::io("remove", self.path.join(name), e.into()))
    }
}

fn uid_of(uid: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(uid)
}

fn gid_of(gid: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(gid)
}

fn times(mtime_ns: i64) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_marker_refuses_a_second_claim_until_released() {
        // Two jobs of one daemon restoring into the same target: the second is refused while
        // the first holds the marker, and may claim it once the first is done.
        let dir = tempfile::tempdir().unwrap();
        let first = TargetDir::open(dir.path()).unwrap();
        let second = TargetDir::open(dir.path()).unwrap();
        let held = first.claim_top_file("marker", b"job-1\n").unwrap();
        let refused = second.claim_top_file("marker", b"job-2\n").unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("being written by another restore"),
            "{refused}"
        );
        assert_eq!(
            first.read_top_file("marker", 100).unwrap().unwrap(),
            b"job-1\n"
        );
        drop(held);
        second.claim_top_file("marker", b"job-2\n").unwrap();
        assert_eq!(
            first.read_top_file("marker", 100).unwrap().unwrap(),
            b"job-2\n"
        );
    }

    #[test]
    fn a_target_path_through_a_symlink_is_refused() {
        // Resolved once, then an ancestor is swapped for a link: the walk from `/` refuses it.
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let elsewhere = base.join("elsewhere");
        std::fs::create_dir_all(elsewhere.join("t")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, base.join("swapped")).unwrap();
        let e = TargetDir::open(&base.join("swapped/t")).err().unwrap();
        assert!(
            e.to_string().contains("swapped is no longer a directory"),
            "{e}"
        );
        TargetDir::open(&elsewhere.join("t")).unwrap();
        assert!(TargetDir::open(Path::new("relative/t")).is_err());
    }

    #[test]
    fn nothing_is_reached_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let mut target = TargetDir::open(dir.path()).unwrap();
        target.mkdir(b"real/sub").unwrap();
        for result in [
            target.create_file(b"link/file").map(drop),
            target.mkdir(b"link/dir"),
            target.symlink(b"x", b"link/s"),
        ] {
            let e = result.unwrap_err().to_string();
            assert!(e.contains("no longer the directory"), "{e}");
        }
        let meta = Metadata {
            owner: None,
            mode: 0o777,
            mtime_ns: 0,
        };
        assert!(target.set_dir_metadata(b"link", &meta).is_err());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert!(target.claim_top_file("link", b"x").is_err());
    }
}
