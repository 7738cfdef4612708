//! A single-producer single-consumer ring of datagram records in one preallocated byte buffer.
//!
//! The receiving thread reads a datagram straight into the ring (no copy, no allocation) and
//! publishes it with its delivery time; the sending thread sends straight from the ring once
//! the time has come. Delivery times are monotonic per direction (see `link`), so a FIFO is
//! also the timer queue: its head is always the next datagram due.
//!
//! Layout: a record is a 16-byte header (payload length u32, client index u32, delivery time
//! u64, little endian) followed by the payload, padded to 16 bytes. Positions (`head`, `tail`)
//! count bytes since creation and only grow; the buffer offset is `position % capacity`. Before
//! a receive the producer needs `RESERVE` contiguous bytes (header + the largest datagram); a
//! record therefore starts at a position only if that many bytes remain before the end of the
//! buffer, otherwise at the start of the next lap. Both sides apply the same rule, so no
//! wrap marker is written.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub const HEADER: usize = 16;
/// Larger than any UDP payload (65 507 bytes over IPv4, 65 527 over IPv6 without jumbograms).
pub const MAX_DATAGRAM: usize = 65_536;
pub const RESERVE: usize = HEADER + MAX_DATAGRAM;
const ALIGN: usize = 16;

/// The smallest capacity: two full-size records, so one can be sent while one is received.
pub const MIN_CAPACITY: usize = 2 * RESERVE;

#[repr(align(128))]
struct Padded(AtomicUsize);

struct Ring {
    buf: *mut u8,
    cap: usize,
    /// Consumer position: bytes before it may be overwritten.
    head: Padded,
    /// Producer position: bytes before it (and from `head`) are published records.
    tail: Padded,
}

// SAFETY: the buffer is only reached through one `Producer` and one `Consumer`, which touch
// disjoint byte ranges as established by the acquire/release protocol on `head` and `tail`.
unsafe impl Send for Ring {}
// SAFETY: as above; the shared fields are atomics.
unsafe impl Sync for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `buf` came from `Box::into_raw` of a boxed slice of `cap` bytes in `channel`.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.buf, self.cap)) });
    }
}

impl Ring {
    /// Where a record written at `pos` starts.
    fn start(&self, pos: usize) -> usize {
        if self.cap - pos % self.cap >= RESERVE {
            pos
        } else {
            pos.next_multiple_of(self.cap)
        }
    }
}

/// Writes records; owned by the receiving thread.
pub struct Producer {
    ring: Arc<Ring>,
    tail: usize,
    head_seen: usize,
}

/// Reads records; owned by the sending thread.
pub struct Consumer {
    ring: Arc<Ring>,
    head: usize,
    tail_seen: usize,
}

/// A published datagram.
pub struct Record<'a> {
    pub client: u32,
    pub deliver_ns: u64,
    pub payload: &'a [u8],
}

/// Creates a ring of at least `capacity` bytes (rounded up to 16, at least `MIN_CAPACITY`).
/// The buffer is zero-allocated, so the kernel backs its pages only once they are used.
pub fn channel(capacity: usize) -> (Producer, Consumer) {
    let cap = capacity.max(MIN_CAPACITY).next_multiple_of(ALIGN);
    let buf = Box::into_raw(vec![0u8; cap].into_boxed_slice()).cast::<u8>();
    let ring = Arc::new(Ring {
        buf,
        cap,
        head: Padded(AtomicUsize::new(0)),
        tail: Padded(AtomicUsize::new(0)),
    });
    (
        Producer {
            ring: ring.clone(),
            tail: 0,
            head_seen: 0,
        },
        Consumer {
            ring,
            head: 0,
            tail_seen: 0,
        },
    )
}

impl Producer {
    /// The space to receive the next datagram into (`MAX_DATAGRAM` bytes), or None when the
    /// ring is full. Nothing is published until `commit`.
    pub fn reserve(&mut self) -> Option<&mut [u8]> {
        let ring = &*self.ring;
        let start = ring.start(self.tail);
        if start + RESERVE - self.head_seen > ring.cap {
            self.head_seen = ring.head.0.load(Ordering::Acquire);
            if start + RESERVE - self.head_seen > ring.cap {
                return None;
            }
        }
        let offset = start % ring.cap + HEADER;
        // SAFETY: `start` leaves RESERVE bytes before the end of the buffer (`Ring::start`), and
        // [start, start + RESERVE) lies within one capacity after `head`, which the consumer has
        // released (acquire above), so only this thread touches these bytes until `commit`.
        Some(unsafe { std::slice::from_raw_parts_mut(ring.buf.add(offset), MAX_DATAGRAM) })
    }

    /// Publishes the datagram of `len` bytes received into the last `reserve`d space.
    /// Call only after a `reserve` that returned Some, with `len <= MAX_DATAGRAM`.
    pub fn commit(&mut self, len: usize, client: u32, deliver_ns: u64) {
        let ring = &*self.ring;
        let len = len.min(MAX_DATAGRAM);
        let start = ring.start(self.tail);
        let mut header = [0u8; HEADER];
        header[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        header[4..8].copy_from_slice(&client.to_le_bytes());
        header[8..16].copy_from_slice(&deliver_ns.to_le_bytes());
        // SAFETY: the header lies in the space `reserve` checked (see there).
        unsafe {
            std::ptr::copy_nonoverlapping(header.as_ptr(), ring.buf.add(start % ring.cap), HEADER);
        }
        self.tail = start + HEADER + len.next_multiple_of(ALIGN);
        ring.tail.0.store(self.tail, Ordering::Release);
    }
}

impl Consumer {
    /// Looks at the producer's latest position; returns whether anything is published.
    pub fn refresh(&mut self) -> bool {
        if self.head == self.tail_seen {
            self.tail_seen = self.ring.tail.0.load(Ordering::Acquire);
        }
        self.head != self.tail_seen
    }

    /// Whether nothing is published, looking at the producer's latest position.
    pub fn is_empty(&mut self) -> bool {
        self.tail_seen = self.ring.tail.0.load(Ordering::Acquire);
        self.head == self.tail_seen
    }

    /// Position of the oldest record not yet released.
    pub fn head(&self) -> usize {
        self.head
    }

    /// The record at `pos` (`head()` or a position this returned) and the position after it,
    /// if it was published by the last `refresh` or `is_empty`. Several may be held at once;
    /// they stay valid until `release`.
    pub fn get(&self, pos: usize) -> Option<(Record<'_>, usize)> {
        if pos >= self.tail_seen || pos < self.head {
            return None;
        }
        let ring = &*self.ring;
        let start = ring.start(pos);
        let offset = start % ring.cap;
        let mut header = [0u8; HEADER];
        // SAFETY: the record at `start(pos)` lies in [head, tail_seen): it was published
        // (release store of `tail`, acquired when `tail_seen` was read) and the producer does
        // not touch it until `head` moves past it, which needs `&mut self`.
        unsafe {
            std::ptr::copy_nonoverlapping(ring.buf.add(offset), header.as_mut_ptr(), HEADER);
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let client = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let deliver_ns = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);
        // SAFETY: as above; `len <= MAX_DATAGRAM` (clamped by `commit`) fits in the reserve.
        let payload = unsafe { std::slice::from_raw_parts(ring.buf.add(offset + HEADER), len) };
        let record = Record {
            client,
            deliver_ns,
            payload,
        };
        Some((record, start + HEADER + len.next_multiple_of(ALIGN)))
    }

    /// Releases every record before `pos` (a position `get` returned) to the producer.
    pub fn release(&mut self, pos: usize) {
        if pos > self.head && pos <= self.tail_seen {
            self.head = pos;
            self.ring.head.0.store(pos, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Consumer {
        fn peek(&mut self) -> Option<Record<'_>> {
            self.refresh();
            self.get(self.head).map(|(r, _)| r)
        }

        fn pop(&mut self) {
            if let Some((_, next)) = self.get(self.head) {
                self.release(next);
            }
        }
    }

    #[test]
    fn fifo_across_many_laps_and_full_ring() {
        let (mut p, mut c) = channel(0);
        assert_eq!(p.ring.cap, MIN_CAPACITY);
        assert!(c.peek().is_none());
        let mut sent = 0u32;
        let mut received = 0u32;
        for round in 0..200u32 {
            // Fill until full with varying sizes, then drain part of it.
            loop {
                let len = [1usize, 15, 16, 1400, 30_000, MAX_DATAGRAM][(sent % 6) as usize];
                let Some(space) = p.reserve() else { break };
                space[..len].fill(sent as u8);
                p.commit(len, sent, u64::from(sent) * 10);
                sent += 1;
            }
            let take = if round % 2 == 0 { 1 } else { 3 };
            assert!(c.peek().is_some(), "a full ring holds a record");
            for _ in 0..take {
                let Some(r) = c.peek() else { break };
                let len = [1usize, 15, 16, 1400, 30_000, MAX_DATAGRAM][(received % 6) as usize];
                assert_eq!(r.client, received);
                assert_eq!(r.deliver_ns, u64::from(received) * 10);
                assert_eq!(r.payload.len(), len);
                assert!(r.payload.iter().all(|&b| b == received as u8));
                c.pop();
                received += 1;
            }
        }
        while c.peek().is_some() {
            c.pop();
            received += 1;
        }
        assert_eq!(sent, received);
        assert!(c.is_empty());
        assert!(sent >= 300, "only {sent} records went through");
    }

    #[test]
    fn several_records_held_then_released_in_part() {
        let (mut p, mut c) = channel(0);
        for i in 0..5u32 {
            let space = p.reserve().unwrap();
            space[0] = i as u8;
            p.commit(100 + i as usize, i, u64::from(i));
        }
        assert!(c.refresh());
        let mut pos = c.head();
        let mut held = Vec::new();
        while let Some((record, next)) = c.get(pos) {
            held.push(record);
            pos = next;
        }
        assert_eq!(held.len(), 5);
        for (i, r) in held.iter().enumerate() {
            assert_eq!(
                (r.client as usize, r.payload.len(), r.payload[0] as usize),
                (i, 100 + i, i)
            );
        }
        let (_, after_third) = c.get(c.get(c.get(c.head()).unwrap().1).unwrap().1).unwrap();
        c.release(after_third);
        assert_eq!(c.peek().map(|r| r.client), Some(3));
        c.release(c.head()); // no-op: nothing before head
        c.release(usize::MAX); // refused: beyond what was published
        assert_eq!(c.peek().map(|r| r.client), Some(3));
    }

    #[test]
    fn threads() {
        let (mut p, mut c) = channel(4 * RESERVE);
        const N: u32 = 100_000;
        let producer = std::thread::spawn(move || {
            let mut i = 0u32;
            while i < N {
                if let Some(space) = p.reserve() {
                    let len = 4 + (i as usize * 7919) % 3000;
                    space[..4].copy_from_slice(&i.to_le_bytes());
                    p.commit(len, i, 0);
                    i += 1;
                } else {
                    std::thread::yield_now();
                }
            }
        });
        let mut next = 0u32;
        while next < N {
            match c.peek() {
                Some(r) => {
                    assert_eq!(r.client, next);
                    assert_eq!(r.payload.len(), 4 + (next as usize * 7919) % 3000);
                    assert_eq!(r.payload[..4], next.to_le_bytes());
                    c.pop();
                    next += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        producer.join().unwrap();
    }
}
