//! How often refused callers reach the audit log. Every refusal is answered, but audit lines
//! are fsynced, so a flood of refused requests (one caller looping on curl) must not turn into
//! a flood of lines: per caller uid (a loop has a new pid per request, so pids would not
//! bound it), the first refusal is written at once and further ones within a window are
//! counted, then written as one line with the count when the window closes (on the caller's
//! next refusal after it, or on the server's periodic sweep, or at shutdown).
//!
//! Time is passed in, so the windows are tested without waiting.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::audit::Who;

/// An audit line to write for refusals.
#[derive(Debug, PartialEq)]
pub struct Line {
    /// The caller of the refusal the line is about (the latest, for a count).
    pub who: Who,
    /// The request, `METHOD /path`.
    pub target: String,
    pub reason: String,
    /// 0: a first refusal; n: n refusals of this uid after the first within the window.
    pub repeats: u64,
}

impl Line {
    pub fn detail(&self, window: Duration) -> serde_json::Value {
        match self.repeats {
            0 => serde_json::json!({ "reason": self.reason }),
            n => serde_json::json!({
                "reason": self.reason,
                "repeats": n,
                "window_s": window.as_secs(),
            }),
        }
    }
}

struct Window {
    opened: Instant,
    repeats: u64,
    last: Who,
    target: String,
    reason: String,
}

impl Window {
    fn close(self) -> Option<Line> {
        (self.repeats > 0).then_some(Line {
            who: self.last,
            target: self.target,
            reason: self.reason,
            repeats: self.repeats,
        })
    }
}

pub struct Refusals {
    window: Duration,
    open: HashMap<u32, Window>,
}

impl Refusals {
    pub fn new(window: Duration) -> Refusals {
        Refusals {
            window,
            open: HashMap::new(),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Notes one refusal at `now`; returns the lines to write (the count of a window this
    /// refusal closed, then this refusal if it opens a window).
    pub fn refused(&mut self, who: Who, target: &str, reason: &str, now: Instant) -> Vec<Line> {
        let mut out = self.sweep(now);
        match self.open.get_mut(&who.uid) {
            Some(w) => {
                w.repeats += 1;
                w.last = who;
                w.target = target.to_owned();
                w.reason = reason.to_owned();
            }
            None => {
                self.open.insert(
                    who.uid,
                    Window {
                        opened: now,
                        repeats: 0,
                        last: who,
                        target: target.to_owned(),
                        reason: reason.to_owned(),
                    },
                );
                out.push(Line {
                    who,
                    target: target.to_owned(),
                    reason: reason.to_owned(),
                    repeats: 0,
                });
            }
        }
        out
    }

    /// Closes the windows that have ended by `now`; returns their counts.
    pub fn sweep(&mut self, now: Instant) -> Vec<Line> {
        let ended: Vec<u32> = self
            .open
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.opened) >= self.window)
            .map(|(uid, _)| *uid)
            .collect();
        let mut out: Vec<Line> = ended
            .into_iter()
            .filter_map(|uid| self.open.remove(&uid)?.close())
            .collect();
        out.sort_by_key(|l| l.who.uid);
        out
    }

    /// Closes every window (at shutdown); returns their counts.
    pub fn close_all(&mut self) -> Vec<Line> {
        let mut out: Vec<Line> = self.open.drain().filter_map(|(_, w)| w.close()).collect();
        out.sort_by_key(|l| l.who.uid);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(uid: u32, pid: i32) -> Who {
        Who { uid, gid: uid, pid }
    }

    #[test]
    fn a_flood_is_one_line_then_one_count_per_window() {
        let window = Duration::from_secs(60);
        let mut r = Refusals::new(window);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let first = r.refused(who(1000, 1), "GET /v1/jobs", "no", at(0));
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].repeats, 0);
        // 12 000 requests in 10 s, each from a new pid: nothing more written.
        for i in 1..12_000u64 {
            let lines = r.refused(who(1000, i as i32 + 1), "GET /v1/jobs", "no", at(i));
            assert!(lines.is_empty(), "request {i}: {lines:?}");
        }
        // Another uid has its own window.
        assert_eq!(
            r.refused(who(1001, 9), "POST /v1/jobs", "no", at(20)).len(),
            1
        );
        assert!(r.sweep(at(59_999)).is_empty());
        // The next refusal after the window: the count, then a new first line.
        let next = r.refused(who(1000, 77), "DELETE /v1/jobs/x", "no", at(70_000));
        let expected_count = Line {
            who: who(1000, 12_000),
            target: "GET /v1/jobs".into(),
            reason: "no".into(),
            repeats: 11_999,
        };
        // uid 1001's window closed too, with nothing to count: no line for it.
        assert_eq!(next.len(), 2, "{next:?}");
        assert_eq!(next[0], expected_count);
        assert_eq!(next[1].repeats, 0);
        assert_eq!(next[1].who, who(1000, 77));
        assert_eq!(next[1].target, "DELETE /v1/jobs/x");
        assert_eq!(
            expected_count.detail(window),
            serde_json::json!({"reason": "no", "repeats": 11_999, "window_s": 60})
        );
    }

    #[test]
    fn a_window_that_ends_quietly_is_counted_by_the_sweep_or_at_shutdown() {
        let mut r = Refusals::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(r.refused(who(5, 1), "GET /v1/status", "no", at(0)).len(), 1);
        assert!(r
            .refused(who(5, 2), "GET /v1/status", "no", at(1))
            .is_empty());
        assert!(r
            .refused(who(5, 3), "GET /v1/status", "no", at(2))
            .is_empty());
        assert!(r.sweep(at(59)).is_empty());
        let swept = r.sweep(at(60));
        assert_eq!(swept.len(), 1);
        assert_eq!((swept[0].repeats, swept[0].who.pid), (2, 3));
        assert!(r.sweep(at(600)).is_empty(), "counted twice");
        // After the window, the next refusal is a first again; shutdown writes what is open.
        assert_eq!(
            r.refused(who(5, 4), "GET /v1/status", "no", at(61)).len(),
            1
        );
        assert!(r
            .refused(who(5, 5), "GET /v1/status", "no", at(62))
            .is_empty());
        let closed = r.close_all();
        assert_eq!((closed.len(), closed[0].repeats), (1, 1));
        assert!(r.close_all().is_empty());
    }
}
