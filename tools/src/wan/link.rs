//! The emulated link of one direction, as pure logic: given the arrival time and size of a
//! datagram, decide whether it is dropped and otherwise when it is delivered.
//!
//! The model, in the order a datagram meets it:
//!
//! 1. **Bottleneck queue** (only with a rate). The link sends one datagram at a time at `rate`;
//!    a datagram starts serialising when the link has finished every earlier one. If it would
//!    wait longer than `queue` for that (the bytes ahead of it exceed `queue` worth of link
//!    time), it is dropped (drop-tail), like a router with a `queue`-sized buffer.
//! 2. **Loss** on the wire: an independent Bernoulli drop with probability `loss`. A lost
//!    datagram has still used its link time.
//! 3. **Propagation**: `delay` plus a uniform extra in `[0, jitter]`. Jitter never reorders a
//!    direction: the delivery time is `max(previous delivery, departure + delay + jitter)`.
//!    Reordering would make QUIC declare losses and retransmit, which is a separate effect from
//!    the latency variation wanted here, and in-order delivery keeps each direction's queue a
//!    FIFO whose head is always the next datagram due (no timer heap in the relay).
//!
//! The relay sends a datagram at or after its delivery time, never before (up to ~50 µs after,
//! see `relay::MIN_SLEEP`). Times are nanoseconds since the relay started; the link's busy-until time is kept in
//! picoseconds so that rounding does not accumulate at high rates (a 1400-byte datagram takes
//! 112 ns at 100 Gbit/s).

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::args::LinkParams;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver at this time (ns since start); never earlier than a previous delivery.
    Deliver(u64),
    /// The bottleneck queue was full.
    DropQueue,
    /// Random loss.
    DropLoss,
}

pub struct Link {
    params: LinkParams,
    /// When the link finishes sending everything accepted so far, in ps since start.
    busy_until_ps: u128,
    last_deliver_ns: u64,
    rng: SmallRng,
}

impl Link {
    pub fn new(params: LinkParams, seed: u64) -> Self {
        Link {
            params,
            busy_until_ps: 0,
            last_deliver_ns: 0,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// Decides the fate of a datagram of `len` bytes arriving at `now_ns`.
    pub fn admit(&mut self, now_ns: u64, len: usize) -> Verdict {
        let p = &self.params;
        let mut depart_ns = now_ns;
        if let Some(rate) = p.rate_bits_per_s {
            let now_ps = u128::from(now_ns) * 1000;
            let start_ps = self.busy_until_ps.max(now_ps);
            if start_ps - now_ps > u128::from(p.queue_ns) * 1000 {
                return Verdict::DropQueue;
            }
            // rate >= 1 (checked by the parser); max(1) keeps a hand-built LinkParams safe.
            let tx_ps = (len as u128 * 8 * 1_000_000_000_000).div_ceil(u128::from(rate.max(1)));
            self.busy_until_ps = start_ps + tx_ps;
            depart_ns = u64::try_from(self.busy_until_ps.div_ceil(1000)).unwrap_or(u64::MAX);
        }
        if p.loss > 0.0 && self.rng.gen::<f64>() < p.loss {
            return Verdict::DropLoss;
        }
        let jitter = if p.jitter_ns > 0 {
            self.rng.gen_range(0..=p.jitter_ns)
        } else {
            0
        };
        let at = depart_ns
            .saturating_add(p.delay_ns)
            .saturating_add(jitter)
            .max(self.last_deliver_ns);
        self.last_deliver_ns = at;
        Verdict::Deliver(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn params() -> LinkParams {
        LinkParams::default()
    }

    #[test]
    fn fixed_delay_only() {
        let mut link = Link::new(
            LinkParams {
                delay_ns: 25 * MS,
                ..params()
            },
            1,
        );
        assert_eq!(link.admit(0, 1400), Verdict::Deliver(25 * MS));
        assert_eq!(link.admit(0, 1400), Verdict::Deliver(25 * MS));
        assert_eq!(link.admit(7, 60_000), Verdict::Deliver(25 * MS + 7));
    }

    #[test]
    fn rate_serialises_back_to_back_datagrams() {
        // 1 Mbit/s: 1250 bytes take 10 ms on the wire.
        let mut link = Link::new(
            LinkParams {
                delay_ns: 5 * MS,
                rate_bits_per_s: Some(1_000_000),
                queue_ns: 100 * MS,
                ..params()
            },
            1,
        );
        assert_eq!(link.admit(0, 1250), Verdict::Deliver(15 * MS));
        assert_eq!(link.admit(0, 1250), Verdict::Deliver(25 * MS));
        assert_eq!(link.admit(MS, 1250), Verdict::Deliver(35 * MS));
        // The link went idle at 30 ms; a later datagram starts when it arrives.
        assert_eq!(link.admit(100 * MS, 125), Verdict::Deliver(106 * MS));
    }

    #[test]
    fn queue_is_drop_tail() {
        // 1 Mbit/s, 20 ms of queue: at most 20 ms of bytes may be waiting ahead of a datagram.
        let mut link = Link::new(
            LinkParams {
                rate_bits_per_s: Some(1_000_000),
                queue_ns: 20 * MS,
                ..params()
            },
            1,
        );
        assert_eq!(link.admit(0, 1250), Verdict::Deliver(10 * MS)); // waits 0
        assert_eq!(link.admit(0, 1250), Verdict::Deliver(20 * MS)); // waits 10 ms
        assert_eq!(link.admit(0, 1250), Verdict::Deliver(30 * MS)); // waits 20 ms
        assert_eq!(link.admit(0, 1250), Verdict::DropQueue); // would wait 30 ms
        assert_eq!(link.admit(0, 1), Verdict::DropQueue); // the tail stays dropped
                                                          // Dropped datagrams used no link time: at 15 ms the backlog is 15 ms again.
        assert_eq!(link.admit(15 * MS, 1250), Verdict::Deliver(40 * MS));
        assert_eq!(link.admit(15 * MS, 1250), Verdict::DropQueue);
    }

    #[test]
    fn jitter_stays_in_range_and_never_reorders() {
        let mut link = Link::new(
            LinkParams {
                delay_ns: 10 * MS,
                jitter_ns: 2 * MS,
                ..params()
            },
            42,
        );
        let mut last = 0;
        let mut raised = 0;
        for i in 0..10_000u64 {
            let now = i * 100_000; // one datagram each 0.1 ms, much less than the jitter
            let Verdict::Deliver(at) = link.admit(now, 1400) else {
                panic!("no loss configured")
            };
            assert!(at >= last, "reordered");
            assert!(at >= now + 10 * MS && at <= now + 12 * MS);
            if at > now + 10 * MS {
                raised += 1;
            }
            last = at;
        }
        assert!(raised > 9_000, "jitter seems to be missing: {raised}");
    }

    #[test]
    fn jitter_with_rate_uses_departure_time() {
        let mut link = Link::new(
            LinkParams {
                delay_ns: 10 * MS,
                jitter_ns: MS,
                rate_bits_per_s: Some(1_000_000),
                queue_ns: 100 * MS,
                ..params()
            },
            3,
        );
        let mut last = 0;
        for k in 1..=5u64 {
            let Verdict::Deliver(at) = link.admit(0, 1250) else {
                panic!("no loss configured")
            };
            let depart = k * 10 * MS;
            assert!(at >= last && at >= depart + 10 * MS && at <= depart + 11 * MS);
            last = at;
        }
    }

    #[test]
    fn loss_rate_is_about_right_and_seeded() {
        let run = |seed| {
            let mut link = Link::new(
                LinkParams {
                    loss: 0.05,
                    ..params()
                },
                seed,
            );
            (0..200_000u64)
                .map(|i| link.admit(i, 1400))
                .filter(|v| *v == Verdict::DropLoss)
                .count()
        };
        let lost = run(9);
        // Expected 10 000, standard deviation ~97.
        assert!((9_500..=10_500).contains(&lost), "lost {lost}");
        assert_eq!(run(9), lost, "same seed, same drops");
        assert_ne!(run(10), lost, "another seed, other drops");
        let mut none = Link::new(params(), 1);
        assert!((0..1000).all(|i| matches!(none.admit(i, 1), Verdict::Deliver(_))));
        let mut all = Link::new(
            LinkParams {
                loss: 1.0,
                ..params()
            },
            1,
        );
        assert!((0..1000).all(|i| all.admit(i, 1) == Verdict::DropLoss));
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let mut link = Link::new(
            LinkParams {
                delay_ns: 60_000 * MS,
                jitter_ns: 60_000 * MS,
                rate_bits_per_s: Some(1),
                queue_ns: 60_000 * MS,
                ..params()
            },
            1,
        );
        assert!(matches!(
            link.admit(u64::MAX - 1, 65_536),
            Verdict::Deliver(u64::MAX)
        ));
        assert_eq!(link.admit(u64::MAX - 1, 65_536), Verdict::DropQueue);
    }
}
