//! The read stage alone: one thread, one ring, direct reads into registered buffers, the way
//! a worker reads an extent (same buffer type, same pool, same submission pattern), with no
//! chunking behind it. Comparing it with the CPU stages shows which side bounds a worker.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

use mover::buffers::{align_up, AlignedBuf};
use rand::{RngCore, SeedableRng};
use tokio_uring::buf::fixed::FixedBufPool;
use tokio_uring::buf::BoundedBuf;

use crate::stages::{Recorder, StageResult};

pub const BUFFERS: usize = 4;
pub const BUFFER_BYTES: usize = 512 * 1024;

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

/// Reads all of `path` with queue depth `BUFFERS`, recording each read's latency.
pub fn read_direct(path: &Path, input: &str) -> std::io::Result<StageResult> {
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
    let size = std_file.metadata()?.len();

    let rec = tokio_uring::builder().entries(64).start(async move {
        let pool = FixedBufPool::new((0..BUFFERS).map(|_| AlignedBuf::new(BUFFER_BYTES)));
        pool.register().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "registering {BUFFERS} x {BUFFER_BYTES} bytes with io_uring: {e} (check ulimit -l)"
                ),
            )
        })?;
        let file = Rc::new(tokio_uring::fs::File::from_std(std_file));
        let mut in_flight = std::collections::VecDeque::new();
        let mut next = 0u64;
        let mut rec = Recorder::new();
        let mut short = false;
        loop {
            while !short && next < size && in_flight.len() < BUFFERS {
                let buf = pool
                    .try_next(BUFFER_BYTES)
                    .expect("a buffer is free while fewer reads than buffers are in flight");
                let want = (size - next).min(BUFFER_BYTES as u64);
                // Direct reads cover whole blocks; the kernel stops at end of file.
                let len = if direct {
                    align_up(want).min(BUFFER_BYTES as u64)
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

    let mut row = rec.finish(
        input,
        &format!(
            "io_uring read_fixed_at qd{BUFFERS} {BUFFERS}x{}KiB",
            BUFFER_BYTES / 1024
        ),
    );
    row.note = Some(if direct {
        "O_DIRECT: the page cache was bypassed (a VM host's cache may still serve it)".into()
    } else {
        "buffered (O_DIRECT refused): the page cache could have served it".into()
    });
    Ok(row)
}
