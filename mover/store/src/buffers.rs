//! Aligned buffers, and the plan of each worker's reads.
//!
//! Reads land straight in the worker's chunk window (no copy). The window's slots are
//! registered ("fixed") buffers when the memlock budget holds every worker's window: they are
//! pinned by the kernel and charged to RLIMIT_MEMLOCK. A window is at least the largest chunk
//! plus the reads in flight (7 MiB with the defaults), so the default budget (3/4 of an
//! 8 MiB limit, 6 MiB) registers none; the windows are then ordinary pageable memory and the
//! kernel pins the pages per read (~1% of a core at 0.5 GB/s) instead of the copy a small
//! registered pool would need. A configured budget that does not fit fails with a named
//! error up front instead of a bare ENOMEM at registration; with the default budget a
//! registration the kernel refuses (older kernels refuse memfd-backed fixed buffers) falls
//! back to unregistered reads with a warning.

use std::alloc::{alloc_zeroed, dealloc, Layout};

use tokio_uring::buf::{IoBuf, IoBufMut};

use mover_format::constants::{
    CHUNK_BYTES_MAX, IO_ALIGNMENT, IO_MEMORY_BYTES_DEFAULT_MAX, IO_MEMORY_SHARE_OF_MEMLOCK,
    READS_PER_WORKER, READ_BUFFER_BYTES_DEFAULT,
};
use mover_format::error::{Error, Result};

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

/// How each worker reads: `reads_per_worker` direct reads of `read_bytes` in flight, straight
/// into its chunk window, whose slots are registered with the worker's ring when the memlock
/// budget holds every worker's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadPlan {
    pub reads_per_worker: usize,
    pub read_bytes: usize,
    /// Bytes of one worker's chunk window: a chunk that is not final yet plus the reads in
    /// flight, in whole read slots.
    pub window_bytes: usize,
    /// Register the windows as io_uring fixed buffers (they fit the budget).
    pub registered: bool,
    /// The budget was configured: registering is required, not attempted.
    pub required: bool,
}

impl ReadPlan {
    pub fn total_bytes(&self, workers: usize) -> u64 {
        (self.window_bytes * workers) as u64
    }

    /// `configured_bytes` = 0 means the default share of RLIMIT_MEMLOCK. A configured budget
    /// must hold every window and fit the limit; the default one registers the windows only
    /// when they fit, and reads into unregistered windows otherwise.
    pub fn new(
        workers: usize,
        configured_read_bytes: Option<usize>,
        configured_bytes: u64,
        memlock_limit: Option<u64>,
    ) -> Result<ReadPlan> {
        assert!(workers > 0);
        let read_bytes = configured_read_bytes.unwrap_or(READ_BUFFER_BYTES_DEFAULT);
        let reads_per_worker = READS_PER_WORKER;
        let window_bytes = (CHUNK_BYTES_MAX.div_ceil(read_bytes) + reads_per_worker) * read_bytes;
        let mut plan = ReadPlan {
            reads_per_worker,
            read_bytes,
            window_bytes,
            registered: false,
            required: configured_bytes > 0,
        };
        let needed = plan.total_bytes(workers);
        let slots = window_bytes / read_bytes;
        if configured_bytes > 0 {
            if slots > REGISTERED_SLOTS_MAX {
                return Err(Error::Resource(format!(
                    "engine.io_memory_bytes is set, but a chunk window of {slots} reads of {read_bytes} bytes \
                     cannot be registered (at most {REGISTERED_SLOTS_MAX} buffers per ring): \
                     raise engine.read_buffer_bytes or set engine.io_memory_bytes = 0"
                )));
            }
            if needed > configured_bytes {
                return Err(Error::Resource(format!(
                    "engine.io_memory_bytes = {configured_bytes}: {workers} workers' chunk windows need {needed} bytes \
                     ({window_bytes} each: the largest chunk plus {reads_per_worker} reads of {read_bytes}); \
                     raise it, or set 0 to register them only when they fit RLIMIT_MEMLOCK"
                )));
            }
            if let Some(limit) = memlock_limit {
                if configured_bytes > limit {
                    return Err(Error::Resource(format!(
                        "engine.io_memory_bytes = {configured_bytes} but RLIMIT_MEMLOCK is {limit}: \
                         raise the limit (LimitMEMLOCK= in the systemd unit, ulimit -l) or lower engine.io_memory_bytes"
                    )));
                }
            }
            plan.registered = true;
        } else {
            let (numerator, denominator) = IO_MEMORY_SHARE_OF_MEMLOCK;
            let budget = memlock_limit
                .map(|limit| limit / denominator * numerator)
                .unwrap_or(u64::MAX)
                .min(IO_MEMORY_BYTES_DEFAULT_MAX);
            plan.registered = needed <= budget && slots <= REGISTERED_SLOTS_MAX;
        }
        Ok(plan)
    }
}

/// tokio-uring registers at most this many buffers per ring (UIO_MAXIOV); a window is
/// registered as one buffer per read slot.
pub const REGISTERED_SLOTS_MAX: usize = 1024;

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
    fn default_plan_registers_only_what_fits_the_memlock_share() {
        let one = ReadPlan::new(1, None, 0, Some(16 * MIB)).unwrap();
        assert_eq!(
            one,
            ReadPlan {
                reads_per_worker: READS_PER_WORKER,
                read_bytes: 1 << 20,
                window_bytes: (4 + READS_PER_WORKER) << 20,
                registered: true,
                required: false,
            }
        );
        let two = ReadPlan::new(2, None, 0, Some(16 * MIB)).unwrap();
        assert!(!two.registered, "{two:?}");
        // This machine's 8 MiB limit registers no window by default; 7 MiB configured does.
        assert!(!ReadPlan::new(1, None, 0, Some(8 * MIB)).unwrap().registered);
        assert!(
            ReadPlan::new(1, None, 7 * MIB, Some(8 * MIB))
                .unwrap()
                .registered
        );
        assert!(ReadPlan::new(2, None, 0, None).unwrap().registered);
    }

    #[test]
    fn window_holds_the_largest_chunk_and_the_reads() {
        for read in [128 * 1024, 1 << 20, 3 << 20] {
            let plan = ReadPlan::new(2, Some(read), 0, None).unwrap();
            assert_eq!(plan.window_bytes % read, 0, "{plan:?}");
            assert!(plan.window_bytes >= CHUNK_BYTES_MAX + plan.reads_per_worker * read);
        }
    }

    #[test]
    fn windows_of_more_slots_than_a_ring_registers_are_not_registered() {
        // 4 KiB reads: 1027 slots per window.
        let plan = ReadPlan::new(1, Some(4096), 0, None).unwrap();
        assert!(!plan.registered, "{plan:?}");
        let err = ReadPlan::new(1, Some(4096), 64 * MIB, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("read_buffer_bytes"), "{err}");
    }

    #[test]
    fn configured_size_beyond_memlock_is_a_named_error() {
        let err = ReadPlan::new(2, None, 64 * MIB, Some(8 * MIB))
            .unwrap_err()
            .to_string();
        assert!(err.contains("RLIMIT_MEMLOCK"), "{err}");
    }

    #[test]
    fn too_small_budget_is_refused() {
        let err = ReadPlan::new(4, Some(512 * 1024), MIB, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("io_memory_bytes"), "{err}");
    }

    #[test]
    fn unlimited_memlock_is_capped() {
        let plan = ReadPlan::new(16, None, 0, None).unwrap();
        assert!(
            !plan.registered,
            "16 windows exceed the 64 MiB cap: {plan:?}"
        );
    }

    #[test]
    fn aligned_buffer_is_aligned() {
        let buf = AlignedBuf::new(8192);
        assert_eq!(buf.stable_ptr() as usize % IO_ALIGNMENT, 0);
        assert_eq!(align_up(1), 4096);
        assert_eq!(align_up(4096), 4096);
    }
}
