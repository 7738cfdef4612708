//! Aligned, registered read buffers: one pool per worker, registered with its ring once.
//!
//! Registered ("fixed") buffers are pinned by the kernel and charged to RLIMIT_MEMLOCK. We
//! size the pools from that limit up front and fail with a named error when a configured size
//! does not fit, instead of letting registration fail later with a bare ENOMEM.

use std::alloc::{alloc_zeroed, dealloc, Layout};

use tokio_uring::buf::{IoBuf, IoBufMut};

use crate::constants::{
    IO_ALIGNMENT, IO_MEMORY_BYTES_DEFAULT_MAX, IO_MEMORY_SHARE_OF_MEMLOCK,
    READ_BUFFERS_PER_WORKER_MAX, READ_BUFFERS_PER_WORKER_MIN, READ_BUFFERS_PER_WORKER_TARGET,
    READ_BUFFER_BYTES_DEFAULT, READ_BUFFER_BYTES_MIN,
};
use crate::error::{Error, Result};

/// A heap buffer aligned for O_DIRECT, owned exclusively (it moves into and out of io_uring
/// operations, as tokio-uring's ownership-passing API requires).
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    capacity: usize,
    initialised: usize,
}

// The buffer is plain owned memory; nothing aliases it.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(capacity: usize) -> AlignedBuf {
        assert!(capacity > 0 && capacity % IO_ALIGNMENT == 0);
        let layout = Layout::from_size_align(capacity, IO_ALIGNMENT).expect("valid layout");
        // Zeroed so that `initialised` can honestly start at capacity-independent 0 and no
        // uninitialised byte is ever exposed.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            capacity,
            initialised: 0,
        }
    }
}

impl AlignedBuf {
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocation is `capacity` bytes, zero-initialised at creation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.capacity) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.capacity, IO_ALIGNMENT).expect("valid layout");
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

// SAFETY: the pointer is stable for the buffer's lifetime (it never reallocates), and
// `bytes_init`/`bytes_total` describe it exactly.
unsafe impl IoBuf for AlignedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.initialised
    }
    fn bytes_total(&self) -> usize {
        self.capacity
    }
}

unsafe impl IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    unsafe fn set_init(&mut self, pos: usize) {
        if pos > self.initialised {
            self.initialised = pos;
        }
    }
}

/// The soft RLIMIT_MEMLOCK in bytes, or None when unlimited.
pub fn memlock_limit_bytes() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    if rc != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        None
    } else {
        Some(limit.rlim_cur)
    }
}

/// How many registered buffers each worker gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolPlan {
    pub buffers_per_worker: usize,
    pub buffer_bytes: usize,
}

impl PoolPlan {
    pub fn total_bytes(&self, workers: usize) -> u64 {
        (self.buffers_per_worker * self.buffer_bytes * workers) as u64
    }

    /// Sizes the pools. `configured_bytes` = 0 means the default share of RLIMIT_MEMLOCK;
    /// `configured_buffer_bytes` = None lets the buffer size shrink to fit many workers.
    pub fn new(
        workers: usize,
        configured_buffer_bytes: Option<usize>,
        configured_bytes: u64,
        memlock_limit: Option<u64>,
    ) -> Result<PoolPlan> {
        assert!(workers > 0);
        let (numerator, denominator) = IO_MEMORY_SHARE_OF_MEMLOCK;
        let budget = if configured_bytes > 0 {
            configured_bytes
        } else {
            memlock_limit
                .map(|limit| limit / denominator * numerator)
                .unwrap_or(u64::MAX)
                .min(IO_MEMORY_BYTES_DEFAULT_MAX)
        };
        let per_worker = budget / workers as u64;
        let buffer_bytes = configured_buffer_bytes.unwrap_or_else(|| {
            let mut size = READ_BUFFER_BYTES_DEFAULT;
            while size > READ_BUFFER_BYTES_MIN
                && per_worker / (size as u64) < READ_BUFFERS_PER_WORKER_TARGET as u64
            {
                size /= 2;
            }
            size
        });
        let count = ((per_worker / buffer_bytes as u64) as usize).min(READ_BUFFERS_PER_WORKER_MAX);
        let plan = PoolPlan {
            buffers_per_worker: count.max(READ_BUFFERS_PER_WORKER_MIN),
            buffer_bytes,
        };
        let needed = plan.total_bytes(workers);
        if count < READ_BUFFERS_PER_WORKER_MIN
            || (configured_bytes > 0 && needed > configured_bytes)
        {
            return Err(Error::Resource(format!(
                "engine.io_memory_bytes: {budget} bytes for {workers} workers gives fewer than {READ_BUFFERS_PER_WORKER_MIN} read buffers of {buffer_bytes} bytes each; \
                 expected at least {}",
                READ_BUFFERS_PER_WORKER_MIN as u64 * buffer_bytes as u64 * workers as u64
            )));
        }
        if let Some(limit) = memlock_limit {
            if needed > limit {
                return Err(Error::Resource(format!(
                    "registered read buffers need {needed} bytes ({workers} workers x {} x {buffer_bytes}) but RLIMIT_MEMLOCK is {limit}: \
                     raise the limit (LimitMEMLOCK= in the systemd unit, ulimit -l) or lower engine.io_memory_bytes / engine.workers",
                    plan.buffers_per_worker
                )));
            }
        }
        Ok(plan)
    }
}

pub fn align_up(value: u64) -> u64 {
    let a = IO_ALIGNMENT as u64;
    value.div_ceil(a) * a
}

pub fn is_aligned(value: u64) -> bool {
    value % IO_ALIGNMENT as u64 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn default_plan_fits_8_mib_memlock_on_two_cores() {
        let plan = PoolPlan::new(2, None, 0, Some(8 * MIB)).unwrap();
        assert_eq!(
            plan,
            PoolPlan {
                buffers_per_worker: 3,
                buffer_bytes: 1 << 20
            }
        );
        assert!(plan.total_bytes(2) <= 6 * MIB);
    }

    #[test]
    fn default_plan_shrinks_buffers_for_many_workers() {
        let plan = PoolPlan::new(16, None, 0, Some(8 * MIB)).unwrap();
        assert!(plan.buffers_per_worker >= 3, "{plan:?}");
        assert!(plan.total_bytes(16) <= 6 * MIB, "{plan:?}");
    }

    #[test]
    fn configured_size_beyond_memlock_is_a_named_error() {
        let err = PoolPlan::new(2, None, 64 * MIB, Some(8 * MIB))
            .unwrap_err()
            .to_string();
        assert!(err.contains("RLIMIT_MEMLOCK"), "{err}");
    }

    #[test]
    fn too_small_budget_is_refused() {
        let err = PoolPlan::new(4, Some(512 * 1024), MIB, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("io_memory_bytes"), "{err}");
    }

    #[test]
    fn unlimited_memlock_is_capped() {
        let plan = PoolPlan::new(16, None, 0, None).unwrap();
        assert!(plan.total_bytes(16) <= IO_MEMORY_BYTES_DEFAULT_MAX);
    }

    #[test]
    fn aligned_buffer_is_aligned() {
        let buf = AlignedBuf::new(8192);
        assert_eq!(buf.stable_ptr() as usize % IO_ALIGNMENT, 0);
        assert_eq!(align_up(1), 4096);
        assert_eq!(align_up(4096), 4096);
    }
}
