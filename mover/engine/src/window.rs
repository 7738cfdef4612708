//! The chunk window: a ring buffer mapped twice back to back ("magic ring buffer"), so any
//! span of up to its size starting anywhere in the ring is one contiguous slice.
//!
//! Reads land at the tail (io_uring writes into lent spans, [`Window::reserve`]) and chunks
//! are cut from the head. A chunk that wraps around the end of the ring is still contiguous
//! through the second mapping, so no byte is moved or copied on the read side. The memory is
//! a memfd mapped shared twice: ordinary pageable memory, unless the worker registers the
//! window's slots ([`Window::slots`]) as io_uring fixed buffers, which pins them and charges
//! them to RLIMIT_MEMLOCK.

use std::io;
use std::rc::Rc;

use tokio_uring::buf::{IoBuf, IoBufMut};

/// The double mapping. Shared by the window and the reads in flight into it, so the memory
/// outlives a read even if the window is dropped before the kernel is done with it.
struct Mapping {
    base: *mut u8,
    size: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the reservation made in `Window::new`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, 2 * self.size) };
    }
}

pub struct Window {
    map: Rc<Mapping>,
    /// Absolute byte counters; `tail - head` bytes are held, `reserved - tail` are being read.
    head: u64,
    tail: u64,
    reserved: u64,
}

/// A piece of the window lent to io_uring: free space after the tail for one read
/// ([`Window::reserve`]), or one slot of the window to register as a fixed buffer
/// ([`Window::slots`]). The bytes a read delivers join the window with [`Window::commit`].
pub struct Span {
    _map: Rc<Mapping>,
    ptr: *mut u8,
    len: usize,
    initialised: usize,
}

// SAFETY: the pointer stays valid while the span holds the mapping. A span from `reserve`
// lies past the window's tail, where nothing else reads or writes until it is committed. A
// slot from `slots` covers any part of the ring; the kernel writes into it only through a
// read the worker issued with `reserve_slot`, which puts that read past the tail the same way.
unsafe impl IoBuf for Span {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr
    }
    fn bytes_init(&self) -> usize {
        self.initialised
    }
    fn bytes_total(&self) -> usize {
        self.len
    }
}

unsafe impl IoBufMut for Span {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
    unsafe fn set_init(&mut self, pos: usize) {
        self.initialised = self.initialised.max(pos);
    }
}

impl Window {
    /// `size` is rounded up to whole pages.
    pub fn new(size: usize) -> io::Result<Window> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let size = size.div_ceil(page) * page;
        // SAFETY: plain syscalls on values we own; every failure path unmaps/closes what was made.
        unsafe {
            let fd = libc::memfd_create(c"mover-chunk-window".as_ptr(), libc::MFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let close_with = |e: io::Error| {
                libc::close(fd);
                e
            };
            if libc::ftruncate(fd, size as libc::off_t) != 0 {
                return Err(close_with(io::Error::last_os_error()));
            }
            // Reserve twice the size, then map the same pages into both halves.
            let reserve = libc::mmap(
                std::ptr::null_mut(),
                2 * size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if reserve == libc::MAP_FAILED {
                return Err(close_with(io::Error::last_os_error()));
            }
            for half in 0..2 {
                let at = (reserve as *mut u8).add(half * size) as *mut libc::c_void;
                let mapped = libc::mmap(
                    at,
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd,
                    0,
                );
                if mapped != at {
                    let e = io::Error::last_os_error();
                    libc::munmap(reserve, 2 * size);
                    return Err(close_with(e));
                }
            }
            libc::close(fd);
            let base = reserve as *mut u8;
            Ok(Window {
                map: Rc::new(Mapping { base, size }),
                head: 0,
                tail: 0,
                reserved: 0,
            })
        }
    }

    pub fn capacity(&self) -> usize {
        self.map.size
    }

    /// Bytes held (appended and not yet consumed).
    pub fn len(&self) -> usize {
        (self.tail - self.head) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.tail == self.head
    }

    pub fn free(&self) -> usize {
        self.map.size - (self.reserved - self.head) as usize
    }

    /// Empties the window. The caller has waited for every read into it: one still in flight
    /// would land in bytes the window hands out again.
    pub fn clear(&mut self) {
        self.head = 0;
        self.tail = 0;
        self.reserved = 0;
    }

    /// Lends the next `len` free bytes after the tail (and after earlier reservations) to a
    /// read. The caller keeps `len <= free()`. The span starts at ring offset
    /// `reserved % size`, so reads of aligned lengths into a cleared window land at aligned
    /// addresses.
    pub fn reserve(&mut self, len: usize) -> Span {
        let at = self.reserve_at(len);
        Span {
            _map: self.map.clone(),
            // SAFETY: at + len <= 2 * size stays inside the double mapping.
            ptr: unsafe { self.map.base.add(at) },
            len,
            initialised: 0,
        }
    }

    /// Like [`Window::reserve`] for a window registered as [`Window::slots`] of `slot_bytes`:
    /// returns the index of the slot the read goes to. Reservations must start on a slot
    /// boundary (every read but an extent's last is a whole slot) and stay within the slot.
    pub fn reserve_slot(&mut self, len: usize, slot_bytes: usize) -> usize {
        assert!(len <= slot_bytes);
        let at = self.reserve_at(len);
        assert_eq!(at % slot_bytes, 0, "a read starts on a slot boundary");
        at / slot_bytes
    }

    fn reserve_at(&mut self, len: usize) -> usize {
        assert!(len <= self.free(), "window overflow");
        let at = (self.reserved % self.map.size as u64) as usize;
        self.reserved += len as u64;
        at
    }

    /// The window cut into `slot_bytes` pieces (in ring order) for registration with io_uring.
    pub fn slots(&self, slot_bytes: usize) -> Vec<Span> {
        assert!(slot_bytes > 0 && self.map.size % slot_bytes == 0);
        (0..self.map.size / slot_bytes)
            .map(|i| Span {
                _map: self.map.clone(),
                // SAFETY: the slot lies inside the first half of the mapping.
                ptr: unsafe { self.map.base.add(i * slot_bytes) },
                len: slot_bytes,
                initialised: 0,
            })
            .collect()
    }

    /// Adds the `n` bytes the oldest uncommitted read delivered to the held bytes. Reads are
    /// committed in the order they were reserved; one that is not (a read past a short one,
    /// or after an error) is given up with [`Window::release`].
    pub fn commit(&mut self, n: usize) {
        assert!(
            self.tail + n as u64 <= self.reserved,
            "commit beyond the reserved bytes"
        );
        self.tail += n as u64;
    }

    /// Gives up every reserved byte after the tail (reads that were dropped, not committed).
    pub fn release(&mut self) {
        self.reserved = self.tail;
    }

    /// Copies `data` in at the tail. The caller keeps `data.len() <= free()`. (Tests fill
    /// the window with it; the worker's reads land through `reserve`.)
    #[cfg(test)]
    pub fn append(&mut self, data: &[u8]) {
        assert!(data.len() <= self.free(), "window overflow");
        assert_eq!(
            self.reserved, self.tail,
            "a read into the window is in flight"
        );
        let at = (self.tail % self.map.size as u64) as usize;
        // SAFETY: at + len <= 2 * size stays inside the double mapping, and the destination
        // does not overlap held bytes (len <= free).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.base.add(at), data.len()) };
        self.tail += data.len() as u64;
        self.reserved = self.tail;
    }

    /// The held bytes, contiguous.
    pub fn held(&self) -> &[u8] {
        let at = (self.head % self.map.size as u64) as usize;
        // SAFETY: at < size and len <= size, so the span lies inside the double mapping, whose
        // second half shows the same pages as the first.
        unsafe { std::slice::from_raw_parts(self.map.base.add(at), self.len()) }
    }

    /// Drops `len` bytes from the head.
    pub fn consume(&mut self, len: usize) {
        assert!(len <= self.len());
        self.head += len as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_spans_read_contiguously() {
        let mut w = Window::new(4096).unwrap();
        let size = w.capacity();
        let first: Vec<u8> = (0..size - 100).map(|i| i as u8).collect();
        w.append(&first);
        w.consume(size - 200);
        let second: Vec<u8> = (0..300).map(|i| (i * 7) as u8).collect();
        w.append(&second);
        let held = w.held();
        assert_eq!(held.len(), 400);
        assert_eq!(&held[..100], &first[size - 200..]);
        assert_eq!(&held[100..], &second[..]);
    }

    #[test]
    fn many_laps_keep_content() {
        let mut w = Window::new(8192).unwrap();
        let mut expected = std::collections::VecDeque::new();
        let mut value = 0u8;
        for round in 0..1000 {
            let n = (round * 37) % 3000 + 1;
            if n <= w.free() {
                let data: Vec<u8> = (0..n)
                    .map(|_| {
                        value = value.wrapping_add(1);
                        value
                    })
                    .collect();
                w.append(&data);
                expected.extend(data);
            }
            let take = (round * 53) % (w.len() + 1);
            assert!(w.held().iter().eq(expected.iter()));
            w.consume(take);
            expected.drain(..take);
        }
    }

    #[test]
    fn reads_land_after_the_tail_and_join_in_order() {
        let mut w = Window::new(4 * 4096).unwrap();
        let size = w.capacity();
        w.append(&vec![1u8; 4096]);
        w.consume(4096);
        // Two reads in flight: the second lies after the first, the window does not grow
        // until they are committed, and the wrapped one is still one slice.
        let mut first = w.reserve(2 * 4096);
        let mut second = w.reserve(2 * 4096);
        assert_eq!(w.free(), 0);
        assert!(w.is_empty());
        // SAFETY: the spans are ours; nothing else touches their bytes until committed.
        unsafe {
            std::ptr::write_bytes(first.stable_mut_ptr(), 7, 2 * 4096);
            std::ptr::write_bytes(second.stable_mut_ptr(), 9, 2 * 4096);
        }
        w.commit(2 * 4096);
        w.commit(4096);
        assert_eq!(w.len(), 3 * 4096);
        assert!(w.held()[..2 * 4096].iter().all(|&b| b == 7));
        assert!(w.held()[2 * 4096..].iter().all(|&b| b == 9));
        w.release();
        assert_eq!(w.free(), size - 3 * 4096);
        let slots = w.slots(4096);
        assert_eq!(slots.len(), size / 4096);
        // The tail is at ring offset 0 (4 * 4096 wrapped): the next read is slot 0.
        assert_eq!(w.reserve_slot(4096, 4096), 0);
    }
}
