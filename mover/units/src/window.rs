//! Daily windows: when DR copies may use a link.

use std::fmt;
use std::str::FromStr;

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

use crate::{Kind, ParseError};

/// A daily window of wall-clock time in a time zone, open from `start` (included) to `end`
/// (excluded): `22:00-06:00` wraps midnight and is open 8 hours a night. Written
/// `HH:MM-HH:MM`, optionally followed by an IANA zone (`22:00-06:00 Europe/Paris`; UTC when
/// absent, or given apart with [`Window::in_time_zone`] as the policy's `timezone` key). A
/// window with equal start and end is refused (empty or the whole day?).
///
/// Times are arguments, never read from a clock, so callers (and tests) inject them. Across a
/// daylight-saving change the wall clock rules; a start inside a skipped hour opens as much
/// later as the clock jumped (02:30 becomes 03:30, jiff's "compatible" rule), so a window that
/// lies wholly inside the skipped hour does not open that night.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    start: Time,
    end: Time,
    zone_name: String,
    zone: TimeZone,
}

impl Window {
    pub(crate) const KIND: Kind = Kind::Window;

    /// The same hours in the IANA zone `name`.
    pub fn in_time_zone(self, name: &str) -> Result<Window, ParseError> {
        let zone = TimeZone::get(name).map_err(|_| {
            ParseError::new(
                Kind::Window,
                name,
                "not a known IANA time zone such as \"UTC\" or \"Europe/Paris\"",
            )
        })?;
        Ok(Window {
            zone_name: name.to_string(),
            zone,
            ..self
        })
    }

    pub fn start(&self) -> Time {
        self.start
    }

    pub fn end(&self) -> Time {
        self.end
    }

    pub fn time_zone_name(&self) -> &str {
        &self.zone_name
    }

    fn wraps(&self) -> bool {
        self.end < self.start
    }

    /// Whether the window is open at `at`.
    pub fn is_open(&self, at: Timestamp) -> bool {
        let now = self.zone.to_datetime(at).time();
        if self.wraps() {
            now >= self.start || now < self.end
        } else {
            now >= self.start && now < self.end
        }
    }

    /// The first opening strictly after `after` (when the window is open at `after`, the next
    /// one, so "open now; next opens at" can both be said).
    pub fn next_start(&self, after: Timestamp) -> Timestamp {
        let today: Date = self.zone.to_datetime(after).date();
        // Today's start may be past; tomorrow's is after `after` unless a zone change moved
        // the clock back by more than a day, which no zone does; the third day is margin.
        for days in 0..3 {
            let Ok(date) = today.checked_add(days.days()) else {
                break;
            };
            if let Ok(start) = self.zone.to_timestamp(date.to_datetime(self.start)) {
                if start > after {
                    return start;
                }
            }
        }
        Timestamp::MAX
    }
}

fn parse_time(text: &str) -> Option<Time> {
    let (hours, minutes) = text.split_once(':')?;
    if hours.len() != 2
        || minutes.len() != 2
        || !(hours.bytes().chain(minutes.bytes())).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Time::new(hours.parse().ok()?, minutes.parse().ok()?, 0, 0).ok()
}

impl FromStr for Window {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Window, ParseError> {
        let error = |reason: &str| ParseError::new(Kind::Window, text, reason);
        let mut words = text.split_whitespace();
        let hours = words.next().ok_or_else(|| error("empty"))?;
        let zone = words.next();
        if words.next().is_some() {
            return Err(error("more than hours and a time zone"));
        }
        let (start, end) = hours
            .split_once('-')
            .ok_or_else(|| error("no '-' between start and end"))?;
        let (Some(start), Some(end)) = (parse_time(start), parse_time(end)) else {
            return Err(error("times must be HH:MM, 00:00 to 23:59"));
        };
        if start == end {
            return Err(error(
                "start equals end (an empty window, or the whole day?)",
            ));
        }
        let window = Window {
            start,
            end,
            zone_name: "UTC".into(),
            zone: TimeZone::UTC,
        };
        match zone {
            None => Ok(window),
            Some(name) => window.in_time_zone(name).map_err(|e| error(&e.reason)),
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02} {}",
            self.start.hour(),
            self.start.minute(),
            self.end.hour(),
            self.end.minute(),
            self.zone_name
        )
    }
}

crate::deserialize_via_str!(Window);
crate::serialize_via_display!(Window);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn a_night_window_wraps_midnight() {
        let w: Window = "22:00-06:00".parse().unwrap();
        assert!(!w.is_open(at("2026-03-01T21:59:59Z")));
        assert!(w.is_open(at("2026-03-01T22:00:00Z")));
        assert!(w.is_open(at("2026-03-02T03:00:00Z")));
        assert!(!w.is_open(at("2026-03-02T06:00:00Z")));
        assert_eq!(
            w.next_start(at("2026-03-01T12:00:00Z")),
            at("2026-03-01T22:00:00Z")
        );
        // Open now: the next opening is tomorrow night's.
        assert_eq!(
            w.next_start(at("2026-03-01T22:00:00Z")),
            at("2026-03-02T22:00:00Z")
        );
        assert_eq!(
            w.next_start(at("2026-03-02T01:00:00Z")),
            at("2026-03-02T22:00:00Z")
        );
    }

    #[test]
    fn a_day_window_does_not_wrap() {
        let w: Window = "09:30-17:00".parse().unwrap();
        assert!(!w.is_open(at("2026-03-01T09:29:00Z")));
        assert!(w.is_open(at("2026-03-01T09:30:00Z")));
        assert!(!w.is_open(at("2026-03-01T17:00:00Z")));
        assert!(!w.is_open(at("2026-03-01T23:00:00Z")));
        assert_eq!(
            w.next_start(at("2026-03-01T18:00:00Z")),
            at("2026-03-02T09:30:00Z")
        );
    }

    #[test]
    fn the_window_is_in_its_time_zone_across_daylight_saving() {
        let w = "22:00-06:00"
            .parse::<Window>()
            .unwrap()
            .in_time_zone("Europe/Paris")
            .unwrap();
        // Winter: UTC+1, so 22:00 in Paris is 21:00 UTC.
        assert!(w.is_open(at("2026-01-15T21:00:00Z")));
        assert!(!w.is_open(at("2026-01-15T20:59:00Z")));
        // Summer: UTC+2.
        assert!(w.is_open(at("2026-07-15T20:00:00Z")));
        assert_eq!(
            w.next_start(at("2026-07-15T12:00:00Z")),
            at("2026-07-15T20:00:00Z")
        );
        // Clocks go forward on 2026-03-29 at 02:00: a 02:30 start opens at 03:30 local.
        let w: Window = "02:30-04:00 Europe/Paris".parse().unwrap();
        assert_eq!(
            w.next_start(at("2026-03-29T00:00:00Z")),
            at("2026-03-29T01:30:00Z")
        );
        assert!(w.is_open(at("2026-03-29T01:30:00Z")));
        assert_eq!(w.to_string(), "02:30-04:00 Europe/Paris");
    }

    #[test]
    fn bad_windows_say_why_and_what_was_expected() {
        for (bad, why) in [
            ("", "empty"),
            ("22:00", "no '-'"),
            ("22:00-24:00", "HH:MM"),
            ("10pm-6am", "HH:MM"),
            ("2:00-06:00", "HH:MM"),
            ("06:00-06:00", "start equals end"),
            ("22:00-06:00 Mars/Olympus", "IANA time zone"),
            ("22:00-06:00 UTC extra", "more than"),
        ] {
            let err = bad.parse::<Window>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(
                err.contains("expected a daily window such as \"22:00-06:00\""),
                "{err}"
            );
        }
    }

    proptest! {
        #[test]
        fn display_parses_back(start in 0u32..1440, end in 0u32..1440, paris: bool) {
            prop_assume!(start != end);
            let text = format!("{:02}:{:02}-{:02}:{:02}{}", start / 60, start % 60, end / 60, end % 60, if paris { " Europe/Paris" } else { "" });
            let window: Window = text.parse().unwrap();
            prop_assert_eq!(window.to_string().parse::<Window>().unwrap(), window);
        }

        // In a zone without daylight saving (Tokyo): there every window opens each day.
        #[test]
        fn next_start_opens_the_window(start in 0u32..1440, end in 0u32..1440, secs in 0i64..(400 * 86_400)) {
            prop_assume!(start != end);
            let text = format!("{:02}:{:02}-{:02}:{:02} Asia/Tokyo", start / 60, start % 60, end / 60, end % 60);
            let window: Window = text.parse().unwrap();
            let now = Timestamp::from_second(1_767_225_600 + secs).unwrap();
            let next = window.next_start(now);
            prop_assert!(next > now);
            prop_assert!(next.duration_since(now) <= jiff::SignedDuration::from_hours(24));
            prop_assert!(window.is_open(next), "{} not open at {}", window, next);
        }
    }
}
