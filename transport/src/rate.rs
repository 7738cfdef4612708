//! A token bucket for per-link bandwidth caps, enforced by the sender. Time is an argument so
//! the arithmetic is tested without sleeping. Rates arrive as bytes per second; the text
//! people write (`"1gbit"`, `"50MB/s"`) is parsed once, by `units::Rate`.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct TokenBucket {
    bytes_per_second: u64,
    burst_bytes: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket refilled at `bytes_per_second` holding at most `burst_bytes` (at least one
    /// frame's worth, or a large chunk could never be sent).
    pub fn new(bytes_per_second: u64, burst_bytes: u64, now: Instant) -> TokenBucket {
        assert!(bytes_per_second > 0 && burst_bytes > 0);
        TokenBucket {
            bytes_per_second,
            burst_bytes,
            tokens: burst_bytes as f64,
            last: now,
        }
    }

    /// The bucket of a link capped at `bytes_per_second`: a burst of ~10 ms of the rate, at
    /// least one full chunk frame.
    pub fn for_link(bytes_per_second: u64, now: Instant) -> TokenBucket {
        let burst = (bytes_per_second / 100).max(crate::frame::FRAME_PAYLOAD_BYTES_MAX as u64);
        TokenBucket::new(bytes_per_second, burst, now)
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    /// Changes the rate from `now` on (a reloaded cap): what accrued until `now` accrued at
    /// the old rate, a debt stays owed, and the burst becomes the new rate's (`for_link`).
    pub fn set_link_rate(&mut self, bytes_per_second: u64, now: Instant) {
        assert!(bytes_per_second > 0);
        self.refill(now);
        self.bytes_per_second = bytes_per_second;
        self.burst_bytes =
            (bytes_per_second / 100).max(crate::frame::FRAME_PAYLOAD_BYTES_MAX as u64);
        self.tokens = self.tokens.min(self.burst_bytes as f64);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens =
            (self.tokens + elapsed * self.bytes_per_second as f64).min(self.burst_bytes as f64);
    }

    /// Takes `bytes` and returns how long the caller must wait before sending them. Debt is
    /// allowed (tokens go negative) so a frame larger than the burst still goes out, later.
    pub fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.bytes_per_second as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_rate_applies_from_now_and_keeps_the_debt() {
        let start = Instant::now();
        let mut bucket = TokenBucket::for_link(1_000_000, start);
        // 5 MB owed beyond the burst at 1 MB/s...
        let burst = crate::frame::FRAME_PAYLOAD_BYTES_MAX as f64;
        let wait = bucket.take(5_000_000 + burst as u64, start);
        assert!((wait.as_secs_f64() - 5.0).abs() < 1e-9, "{wait:?}");
        // ...one second later 1 MB is paid; the rest is paid at the new 4 MB/s: 1 s more.
        let later = start + Duration::from_secs(1);
        bucket.set_link_rate(4_000_000, later);
        assert_eq!(bucket.bytes_per_second(), 4_000_000);
        let wait = bucket.take(0, later);
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-9, "{wait:?}");
    }

    #[test]
    fn bucket_paces_to_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, 100, start);
        assert_eq!(bucket.take(100, start), Duration::ZERO);
        // Empty: 500 bytes more take half a second.
        let wait = bucket.take(500, start);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        // A second later the debt is paid and 500 tokens accrued, capped at the burst.
        let later = start + Duration::from_secs(2);
        assert_eq!(bucket.take(100, later), Duration::ZERO);
        // Sending 10 000 bytes over 10 s in pieces never runs ahead of the rate.
        let mut bucket = TokenBucket::new(1000, 100, start);
        let mut now = start;
        for _ in 0..100 {
            now += bucket.take(100, now);
        }
        let elapsed = now.duration_since(start).as_secs_f64();
        assert!((9.8..=10.0).contains(&elapsed), "{elapsed}");
    }
}
