//! The chunk window: a ring buffer mapped twice back to back ("magic ring buffer"), so any
//! span of up to its size starting anywhere in the ring is one contiguous slice.
//!
//! Reads are appended at the tail and chunks are cut from the head. A chunk that wraps around
//! the end of the ring is still contiguous through the second mapping, so no byte is ever moved
//! after its one copy in from the read buffer. The memory is a memfd mapped shared twice; it is
//! ordinary pageable memory (not locked), so it does not count against RLIMIT_MEMLOCK.

use std::io;

pub struct Window {
    base: *mut u8,
    size: usize,
    /// Absolute byte counters; `tail - head` bytes are held.
    head: u64,
    tail: u64,
}

// The mapping is owned exclusively by the window.
unsafe impl Send for Window {}

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
            Ok(Window {
                base: reserve as *mut u8,
                size,
                head: 0,
                tail: 0,
            })
        }
    }

    pub fn capacity(&self) -> usize {
        self.size
    }

    /// Bytes held (appended and not yet consumed).
    pub fn len(&self) -> usize {
        (self.tail - self.head) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.tail == self.head
    }

    pub fn free(&self) -> usize {
        self.size - self.len()
    }

    pub fn clear(&mut self) {
        self.head = 0;
        self.tail = 0;
    }

    /// Copies `data` in at the tail. The caller keeps `data.len() <= free()`.
    pub fn append(&mut self, data: &[u8]) {
        assert!(data.len() <= self.free(), "window overflow");
        let at = (self.tail % self.size as u64) as usize;
        // SAFETY: at + len <= 2 * size stays inside the double mapping, and the destination
        // does not overlap held bytes (len <= free).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(at), data.len()) };
        self.tail += data.len() as u64;
    }

    /// The held bytes, contiguous.
    pub fn held(&self) -> &[u8] {
        let at = (self.head % self.size as u64) as usize;
        // SAFETY: at < size and len <= size, so the span lies inside the double mapping, whose
        // second half shows the same pages as the first.
        unsafe { std::slice::from_raw_parts(self.base.add(at), self.len()) }
    }

    /// Drops `len` bytes from the head.
    pub fn consume(&mut self, len: usize) {
        assert!(len <= self.len());
        self.head += len as u64;
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the reservation made in `new`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, 2 * self.size) };
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
}
