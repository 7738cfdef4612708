//! The read stage alone: one thread, one ring, direct reads into registered buffers, the way
//! a worker reads an extent (same buffer type, same pool, same submission pattern), with no
//! chunking behind it. Comparing it with the CPU stages shows which side bounds a worker; the
//! same reads with a deep queue are the disk's own limit.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

use mover_store::buffers::{align_up, AlignedBuf};
use rand::{RngCore, SeedableRng};
use tokio_uring::buf::fixed::FixedBufPool;
use tokio_uring::buf::BoundedBuf;

use super::stages::{Recorder, Row};

/// A read pattern: this many direct reads of this size in flight.
#[derive(Clone, Copy, Debug)]
pub struct Pattern {
    pub depth: usize,
    pub read_bytes: usize,
}

impl Pattern {
    /// One worker's reads with the default config.
    pub const ENGINE: Pattern = Pattern {
        depth: mover_format::constants::READS_PER_WORKER,
        read_bytes: mover_format::constants::READ_BUFFER_BYTES_DEFAULT,
    };
    /// Deep enough to keep an NVMe device or a RAID set busy from one thread: the disk's limit.
    pub const DEEP: Pattern = Pattern {
        depth: 32,
        read_bytes: 1 << 20,
    };

    pub fn name(self) -> String {
        format!(
            "io_uring direct read qd{} x {} KiB",
            self.depth,
            self.read_bytes / 1024
        )
    }
}

/// Writes `bytes` of random data to `path` and makes it durable, so the direct reads that
/// follow come from the device and not from dirty pages being written back.
pub fn write_scratch_file(path: &Path, bytes: u64) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = std::fs::File::create(path)?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        rng.fill_bytes(&mut block[..n]);
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.sync_all()
}

/// Whether `path`'s file system keeps everything in memory, in which case no read, direct or
/// not, says anything about a disk.
pub fn is_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the struct we own from a NUL-terminated path. (f_type is i64 or u32
    // depending on the architecture, hence the casts.)
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut fs) };
    rc == 0 && fs.f_type as u64 == libc::TMPFS_MAGIC as u64
}

/// Reads all of `path` (at most `limit_bytes` of it) with `pattern`, recording each read's
/// latency.
pub fn read_direct(
    path: &Path,
    input: &str,
    pattern: Pattern,
    limit_bytes: u64,
) -> std::io::Result<Row> {
    let Pattern {
        depth: buffers,
        read_bytes: buffer_bytes,
    } = pattern;
    let open = |direct: bool| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(path)
    };
    let (std_file, direct) = match open(true) {
        Ok(file) => (file, true),
        // tmpfs and some FUSE file systems refuse O_DIRECT; measure buffered and say so.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(false)?, false),
        Err(e) => return Err(e),
    };
    let size = std_file.metadata()?.len().min(limit_bytes);

    let rec = tokio_uring::builder().entries(64).start(async move {
        let pool = FixedBufPool::new((0..buffers).map(|_| AlignedBuf::new(buffer_bytes)));
        pool.register().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "registering {buffers} x {buffer_bytes} bytes with io_uring: {e} (check ulimit -l)"
                ),
            )
        })?;
        let file = Rc::new(tokio_uring::fs::File::from_std(std_file));
        let mut in_flight = std::collections::VecDeque::new();
        let mut next = 0u64;
        let mut rec = Recorder::new();
        let mut short = false;
        loop {
            while !short && next < size && in_flight.len() < buffers {
                let buf = pool
                    .try_next(buffer_bytes)
                    .expect("a buffer is free while fewer reads than buffers are in flight");
                let want = (size - next).min(buffer_bytes as u64);
                // Direct reads cover whole blocks; the kernel stops at end of file.
                let len = if direct {
                    align_up(want).min(buffer_bytes as u64)
                } else {
                    want
                } as usize;
                let (file, at) = (file.clone(), next);
                in_flight.push_back((
                    at,
                    want,
                    tokio_uring::spawn(async move {
                        let t = Instant::now();
                        let (result, slice) = file.read_fixed_at(buf.slice(..len), at).await;
                        let took = t.elapsed();
                        // Back to the pool now, not when the main task gets round to it.
                        drop(slice);
                        (result, took)
                    }),
                ));
                next += want;
            }
            let Some((at, want, read)) = in_flight.pop_front() else {
                break;
            };
            let (result, took) = read.await.expect("read task does not panic");
            let n = result.map_err(|e| {
                std::io::Error::new(e.kind(), format!("read at offset {at}: {e}"))
            })? as u64;
            let useful = n.min(want);
            rec.record(useful as usize, took);
            if useful < want {
                short = true; // the file shrank while we read it
            }
        }
        Ok::<_, std::io::Error>(rec)
    })?;

    let mut row = rec.finish(input, &pattern.name());
    row.note = Some(if direct {
        "O_DIRECT: the page cache was bypassed (a VM host's cache may still serve it)".into()
    } else {
        "buffered (O_DIRECT refused): the page cache could have served it".into()
    });
    Ok(row)
}
