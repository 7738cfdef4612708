//! `mover-faultfs`: a pass-through FUSE file system that fails chosen operations on chosen
//! files, so tests can give mover the disk errors a real disk gives (EIO on a write, a failed
//! fdatasync, a read error) without a device-mapper target.
//!
//! ```text
//! mover-faultfs BACKING MOUNTPOINT --control FILE
//! ```
//!
//! Every operation goes to the same path under BACKING. FILE holds the faults, one per line,
//! `OP SUFFIX ERRNO`: OP is `write`, `fsync`, `read`, `create`, `fallocate`, `rename` or
//! `direct` (an open or create asking for O_DIRECT, as tmpfs before Linux 6.6 refused it);
//! SUFFIX matches the end of the file's name (`.pack`, `index.redb`, `*` for any); ERRNO is
//! `EIO`, `ENOSPC`, `EROFS` or `EINVAL`. It is read again whenever it changes (write it to a temporary
//! name and rename it into place), so a test turns faults on and off while mover runs; an
//! empty or missing file means no faults. `umount MOUNTPOINT` ends it (killed instead, it
//! leaves a dead mount that `umount -l` clears).
//!
//! Attributes are never cached by the kernel (TTL 0), so what a test changes under BACKING is
//! seen at once. Locks (flock) are the kernel's, local to this mount.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

#[derive(Parser)]
#[command(
    name = "mover-faultfs",
    version,
    about = "Pass-through FUSE file system that fails chosen operations (for mover's fault tests)"
)]
struct Cli {
    /// The directory whose contents are served.
    backing: PathBuf,
    /// Where to mount it (an existing empty directory).
    mountpoint: PathBuf,
    /// The faults file (`OP SUFFIX ERRNO` per line), re-read when it changes.
    #[arg(long, value_name = "FILE")]
    control: PathBuf,
}

const TTL: Duration = Duration::ZERO;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Write,
    Fsync,
    Read,
    Create,
    Fallocate,
    Rename,
    /// An open or create asking for O_DIRECT (a file system that refuses direct I/O).
    Direct,
}

#[derive(Clone, Debug)]
struct Fault {
    op: Op,
    suffix: String,
    errno: i32,
}

/// Parses the faults file; a bad line is an error naming it (the tool exits rather than
/// inject something else than asked).
fn parse_faults(text: &str) -> Result<Vec<Fault>, String> {
    let mut faults = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [op, suffix, errno] = fields[..] else {
            return Err(format!(
                "line {}: {line:?}: expected `OP SUFFIX ERRNO`",
                n + 1
            ));
        };
        let op = match op {
            "write" => Op::Write,
            "fsync" => Op::Fsync,
            "read" => Op::Read,
            "create" => Op::Create,
            "fallocate" => Op::Fallocate,
            "rename" => Op::Rename,
            "direct" => Op::Direct,
            other => {
                return Err(format!(
                    "line {}: operation {other:?}: expected write, fsync, read, create, fallocate, rename or direct",
                    n + 1
                ))
            }
        };
        let errno = match errno {
            "EIO" => libc::EIO,
            "ENOSPC" => libc::ENOSPC,
            "EROFS" => libc::EROFS,
            "EINVAL" => libc::EINVAL,
            other => {
                return Err(format!(
                    "line {}: errno {other:?}: expected EIO, ENOSPC, EROFS or EINVAL",
                    n + 1
                ))
            }
        };
        faults.push(Fault {
            op,
            suffix: suffix.to_string(),
            errno,
        });
    }
    Ok(faults)
}

/// A control file's identity and mtime: (inode, seconds, nanoseconds).
type Stamp = (u64, i64, i64);

/// The faults in force, re-read when the control file's identity or mtime changes.
struct Control {
    path: PathBuf,
    seen: Mutex<(Option<Stamp>, Vec<Fault>)>,
}

impl Control {
    fn errno_for(&self, op: Op, path: &Path) -> Option<Errno> {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()));
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.0 != stamp {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            match parse_faults(&text) {
                Ok(faults) => *seen = (stamp, faults),
                Err(e) => {
                    eprintln!("mover-faultfs: {}: {e}", self.path.display());
                    std::process::exit(2);
                }
            }
        }
        let name = path.as_os_str().as_bytes();
        seen.1
            .iter()
            .find(|f| f.op == op && (f.suffix == "*" || name.ends_with(f.suffix.as_bytes())))
            .map(|f| Errno::from_i32(f.errno))
    }
}

struct FaultFs {
    backing: PathBuf,
    control: Control,
    /// Inode number (the backing file's) to a path relative to `backing`.
    paths: Mutex<HashMap<u64, PathBuf>>,
    root_ino: u64,
    files: Mutex<HashMap<u64, Arc<File>>>,
    next_fh: AtomicU64,
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn attr_of(ino: u64, meta: &std::fs::Metadata) -> FileAttr {
    let time = |secs: i64, nsecs: i64| {
        if secs >= 0 {
            UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
        } else {
            UNIX_EPOCH
        }
    };
    let kind = match meta.mode() & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    };
    FileAttr {
        ino: INodeNo(ino),
        size: meta.size(),
        blocks: meta.blocks(),
        atime: time(meta.atime(), meta.atime_nsec()),
        mtime: time(meta.mtime(), meta.mtime_nsec()),
        ctime: time(meta.ctime(), meta.ctime_nsec()),
        crtime: time(meta.ctime(), meta.ctime_nsec()),
        kind,
        perm: (meta.mode() & 0o7777) as u16,
        nlink: meta.nlink() as u32,
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: meta.rdev() as u32,
        blksize: meta.blksize() as u32,
        flags: 0,
    }
}

fn c_path(path: &Path) -> Result<CString, Errno> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::from_i32(libc::EINVAL))
}

impl FaultFs {
    fn relative(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        if ino == INodeNo::ROOT {
            return Ok(PathBuf::new());
        }
        self.paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::from_i32(libc::ESTALE))
    }

    fn full(&self, relative: &Path) -> PathBuf {
        self.backing.join(relative)
    }

    /// The FUSE inode of a backing file: its own inode number, the root's mapped to 1.
    fn ino_of(&self, meta: &std::fs::Metadata) -> u64 {
        if meta.ino() == self.root_ino {
            INodeNo::ROOT.0
        } else if meta.ino() == INodeNo::ROOT.0 {
            // The backing file system's inode 1 would collide with the root: move it aside.
            u64::MAX
        } else {
            meta.ino()
        }
    }

    /// Stats `relative`, remembers its path and returns its attributes.
    fn entry(&self, relative: PathBuf) -> Result<FileAttr, Errno> {
        let meta = std::fs::symlink_metadata(self.full(&relative)).map_err(|e| errno_of(&e))?;
        let ino = self.ino_of(&meta);
        if ino != INodeNo::ROOT.0 {
            self.paths
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ino, relative);
        }
        Ok(attr_of(ino, &meta))
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.relative(parent)?.join(name))
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::from_i32(libc::EBADF))
    }

    fn keep(&self, file: File) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Arc::new(file));
        FileHandle(fh)
    }

    fn fault(&self, op: Op, relative: &Path) -> Result<(), Errno> {
        match self.control.errno_for(op, relative) {
            Some(errno) => Err(errno),
            None => Ok(()),
        }
    }

    /// Opens the backing file with the caller's flags, less the ones that make no sense here:
    /// O_DIRECT (this process's buffers are not aligned; the kernel already bypassed its
    /// cache for a direct open of this mount) and O_CREAT/O_EXCL/O_TRUNC (create does those).
    fn open_backing(&self, relative: &Path, flags: i32) -> Result<File, Errno> {
        let access = flags & libc::O_ACCMODE;
        let extra = flags & !(libc::O_ACCMODE | libc::O_DIRECT | libc::O_CREAT | libc::O_EXCL);
        std::fs::OpenOptions::new()
            .read(access == libc::O_RDONLY || access == libc::O_RDWR)
            .write(access == libc::O_WRONLY || access == libc::O_RDWR)
            .custom_flags(extra)
            .open(self.full(relative))
            .map_err(|e| errno_of(&e))
    }
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for FaultFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name).and_then(|p| self.entry(p)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let meta = match fh {
            Some(fh) => self
                .file(fh)
                .and_then(|f| f.metadata().map_err(|e| errno_of(&e))),
            None => self
                .relative(ino)
                .and_then(|p| std::fs::symlink_metadata(self.full(&p)).map_err(|e| errno_of(&e))),
        };
        match meta {
            Ok(meta) => reply.attr(&TTL, &attr_of(ino.0, &meta)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = (|| -> Result<FileAttr, Errno> {
            let relative = self.relative(ino)?;
            let full = self.full(&relative);
            if let Some(size) = size {
                self.fault(Op::Write, &relative)?;
                match fh {
                    Some(fh) => self.file(fh)?.set_len(size),
                    None => File::options()
                        .write(true)
                        .open(&full)
                        .and_then(|f| f.set_len(size)),
                }
                .map_err(|e| errno_of(&e))?;
            }
            if let Some(mode) = mode {
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| errno_of(&e))?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&full, uid, gid).map_err(|e| errno_of(&e))?;
            }
            if atime.is_some() || mtime.is_some() {
                let spec = |t: Option<TimeOrNow>| match t {
                    None => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                    Some(TimeOrNow::Now) => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    },
                    Some(TimeOrNow::SpecificTime(t)) => {
                        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                        libc::timespec {
                            tv_sec: d.as_secs() as libc::time_t,
                            tv_nsec: d.subsec_nanos() as libc::c_long,
                        }
                    }
                };
                let times = [spec(atime), spec(mtime)];
                let path = c_path(&full)?;
                // SAFETY: a NUL-terminated path and two timespecs we own.
                let rc = unsafe {
                    libc::utimensat(
                        libc::AT_FDCWD,
                        path.as_ptr(),
                        times.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
                if rc != 0 {
                    return Err(errno_of(&std::io::Error::last_os_error()));
                }
            }
            let meta = std::fs::symlink_metadata(&full).map_err(|e| errno_of(&e))?;
            Ok(attr_of(ino.0, &meta))
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .relative(ino)
            .and_then(|p| std::fs::read_link(self.full(&p)).map_err(|e| errno_of(&e)))
        {
            Ok(target) => reply.data(target.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self.child(parent, name).and_then(|relative| {
            std::fs::DirBuilder::new()
                .mode(mode & !umask)
                .create(self.full(&relative))
                .map_err(|e| errno_of(&e))?;
            self.entry(relative)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.child(parent, name).and_then(|relative| {
            std::fs::remove_file(self.full(&relative)).map_err(|e| errno_of(&e))
        });
        reply_empty(reply, result);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.child(parent, name).and_then(|relative| {
            std::fs::remove_dir(self.full(&relative)).map_err(|e| errno_of(&e))
        });
        reply_empty(reply, result);
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let result = self.child(parent, link_name).and_then(|relative| {
            std::os::unix::fs::symlink(target, self.full(&relative)).map_err(|e| errno_of(&e))?;
            self.entry(relative)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = (|| -> Result<(), Errno> {
            let from = self.child(parent, name)?;
            let to = self.child(newparent, newname)?;
            self.fault(Op::Rename, &to)?;
            let (from_c, to_c) = (c_path(&self.full(&from))?, c_path(&self.full(&to))?);
            // SAFETY: two NUL-terminated paths; flags as the kernel passed them.
            let rc = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    from_c.as_ptr(),
                    libc::AT_FDCWD,
                    to_c.as_ptr(),
                    flags.bits(),
                )
            };
            if rc != 0 {
                return Err(errno_of(&std::io::Error::last_os_error()));
            }
            // Paths under the old name now live under the new one.
            let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
            for path in paths.values_mut() {
                if let Ok(rest) = path.strip_prefix(&from) {
                    *path = to.join(rest);
                }
            }
            Ok(())
        })();
        reply_empty(reply, result);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let result = (|| {
            let from = self.relative(ino)?;
            let to = self.child(newparent, newname)?;
            std::fs::hard_link(self.full(&from), self.full(&to)).map_err(|e| errno_of(&e))?;
            self.entry(to)
        })();
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let opened = self.relative(ino).and_then(|p| {
            if flags.0 & libc::O_DIRECT != 0 {
                self.fault(Op::Direct, &p)?;
            }
            self.open_backing(&p, flags.0)
        });
        match opened {
            Ok(file) => reply.opened(self.keep(file), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = (|| {
            let relative = self.child(parent, name)?;
            self.fault(Op::Create, &relative)?;
            if flags & libc::O_DIRECT != 0 {
                self.fault(Op::Direct, &relative)?;
            }
            let access = flags & libc::O_ACCMODE;
            let extra = flags
                & !(libc::O_ACCMODE
                    | libc::O_DIRECT
                    | libc::O_CREAT
                    | libc::O_EXCL
                    | libc::O_TRUNC);
            let file = std::fs::OpenOptions::new()
                .read(access == libc::O_RDONLY || access == libc::O_RDWR)
                .write(true)
                .create_new(flags & libc::O_EXCL != 0)
                .create(true)
                .truncate(flags & libc::O_TRUNC != 0)
                .mode(mode & !umask)
                .custom_flags(extra)
                .open(self.full(&relative))
                .map_err(|e| errno_of(&e))?;
            let attr = self.entry(relative)?;
            Ok((attr, self.keep(file)))
        })();
        match result {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let result = (|| {
            self.fault(Op::Read, &self.relative(ino)?)?;
            let file = self.file(fh)?;
            let mut buf = vec![0u8; size as usize];
            let mut filled = 0;
            while filled < buf.len() {
                match file.read_at(&mut buf[filled..], offset + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(errno_of(&e)),
                }
            }
            buf.truncate(filled);
            Ok(buf)
        })();
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = (|| {
            self.fault(Op::Write, &self.relative(ino)?)?;
            self.file(fh)?
                .write_all_at(data, offset)
                .map_err(|e| errno_of(&e))
        })();
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            self.fault(Op::Fsync, &self.relative(ino)?)?;
            let file = self.file(fh)?;
            if datasync {
                file.sync_data()
            } else {
                file.sync_all()
            }
            .map_err(|e| errno_of(&e))
        })();
        reply_empty(reply, result);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.relative(ino) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let result = (|| {
            let relative = self.relative(ino)?;
            let mut entries = vec![
                (ino.0, FileType::Directory, OsStr::new(".").to_os_string()),
                (ino.0, FileType::Directory, OsStr::new("..").to_os_string()),
            ];
            for entry in std::fs::read_dir(self.full(&relative)).map_err(|e| errno_of(&e))? {
                let entry = entry.map_err(|e| errno_of(&e))?;
                let meta = entry.metadata().map_err(|e| errno_of(&e))?;
                let attr = attr_of(self.ino_of(&meta), &meta);
                entries.push((attr.ino.0, attr.kind, entry.file_name()));
            }
            Ok(entries)
        })();
        match result {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(ino), (i + 1) as u64, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            let relative = self.relative(ino)?;
            self.fault(Op::Fsync, &relative)?;
            File::open(self.full(&relative))
                .and_then(|d| d.sync_all())
                .map_err(|e| errno_of(&e))
        })();
        reply_empty(reply, result);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let result = (|| {
            let path = c_path(&self.backing)?;
            // SAFETY: statvfs fills the struct we own from a NUL-terminated path.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
                return Err(errno_of(&std::io::Error::last_os_error()));
            }
            Ok(st)
        })();
        match result {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            self.fault(Op::Fallocate, &self.relative(ino)?)?;
            let file = self.file(fh)?;
            // SAFETY: fallocate on a descriptor we own.
            let rc = unsafe {
                libc::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&*file),
                    mode,
                    offset as libc::off_t,
                    length as libc::off_t,
                )
            };
            if rc != 0 {
                return Err(errno_of(&std::io::Error::last_os_error()));
            }
            Ok(())
        })();
        reply_empty(reply, result);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let backing = match cli.backing.canonicalize() {
        Ok(path) if path.is_dir() => path,
        Ok(path) => {
            eprintln!(
                "mover-faultfs: {}: expected a directory to serve",
                path.display()
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("mover-faultfs: {}: {e}", cli.backing.display());
            return ExitCode::from(2);
        }
    };
    let root_ino = match std::fs::metadata(&backing) {
        Ok(meta) => meta.ino(),
        Err(e) => {
            eprintln!("mover-faultfs: {}: {e}", backing.display());
            return ExitCode::from(2);
        }
    };
    if let Ok(text) = std::fs::read_to_string(&cli.control) {
        if let Err(e) = parse_faults(&text) {
            eprintln!("mover-faultfs: {}: {e}", cli.control.display());
            return ExitCode::from(2);
        }
    }
    let fs = FaultFs {
        backing: backing.clone(),
        control: Control {
            path: cli.control.clone(),
            seen: Mutex::new((None, Vec::new())),
        },
        paths: Mutex::new(HashMap::new()),
        root_ino,
        files: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("faultfs:{}", backing.display())),
        MountOption::DefaultPermissions,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(4);
    match fuser::mount(fs, &cli.mountpoint, &config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mover-faultfs: mount on {}: {e}", cli.mountpoint.display());
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_lines_parse_and_bad_ones_are_named() {
        let faults = parse_faults("# comment\nfsync .pack EIO\n\nwrite * ENOSPC\n").unwrap();
        assert_eq!(faults.len(), 2);
        assert_eq!(faults[0].op, Op::Fsync);
        assert_eq!(faults[1].errno, libc::ENOSPC);
        let err = parse_faults("fsync .pack").unwrap_err();
        assert!(
            err.contains("line 1") && err.contains("OP SUFFIX ERRNO"),
            "{err}"
        );
        let err = parse_faults("truncate x EIO").unwrap_err();
        assert!(err.contains("truncate"), "{err}");
        let err = parse_faults("write x EPERM").unwrap_err();
        assert!(err.contains("EPERM"), "{err}");
    }
}
