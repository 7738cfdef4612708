//! Durations in config and policy: RPOs, tiering ages, timeouts.

use std::fmt;
use std::str::FromStr;

use jiff::{SignedDuration, Span, SpanRelativeTo};

use crate::{Kind, ParseError};

/// A non-negative length of time. Parsed by jiff's friendly format (`30s`, `5m`, `5min`,
/// `12h`, `7d`, `2w`, `1h30m`, `1 day 2 hours`) or ISO 8601 (`PT1H`), with a day taken as 24
/// hours and a week as 7 days: an RPO of `7d` means 168 hours whatever the clocks do. Months
/// and years are refused: their length depends on the date (retention counts calendar days
/// elsewhere). A number without a unit is refused (seconds or minutes?).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(std::time::Duration);

impl Duration {
    pub(crate) const KIND: Kind = Kind::Duration;

    pub const fn from_std(duration: std::time::Duration) -> Duration {
        Duration(duration)
    }

    pub const fn as_std(self) -> std::time::Duration {
        self.0
    }

    /// As jiff's duration, for arithmetic with `jiff::Timestamp`.
    pub fn as_jiff(self) -> SignedDuration {
        SignedDuration::try_from(self.0).unwrap_or(SignedDuration::MAX)
    }
}

impl FromStr for Duration {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Duration, ParseError> {
        let error = |reason: String| ParseError::new(Kind::Duration, text, reason);
        let trimmed = text.trim();
        if trimmed.starts_with('-') {
            return Err(error("negative".into()));
        }
        if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(error("a number without a unit is ambiguous".into()));
        }
        let span: Span = trimmed
            .parse()
            .map_err(|e: jiff::Error| error(e.to_string()))?;
        if span.is_negative() {
            return Err(error("negative".into()));
        }
        if span.get_years() != 0 || span.get_months() != 0 {
            return Err(error(
                "months and years have no fixed length; write days or weeks".into(),
            ));
        }
        let signed = span
            .to_duration(SpanRelativeTo::days_are_24_hours())
            .map_err(|e| error(e.to_string()))?;
        let duration =
            std::time::Duration::try_from(signed).map_err(|_| error("negative".into()))?;
        Ok(Duration(duration))
    }
}

/// Largest units first, without weeks (`14d` reads better than `2w` in an RPO), down to the
/// nanosecond, so that the text parses back to the same value: `7d`, `1h30m`, `1s500ms`.
impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u128, &str); 7] = [
            (86_400_000_000_000, "d"),
            (3_600_000_000_000, "h"),
            (60_000_000_000, "m"),
            (1_000_000_000, "s"),
            (1_000_000, "ms"),
            (1_000, "us"),
            (1, "ns"),
        ];
        let mut rest = self.0.as_nanos();
        if rest == 0 {
            return f.write_str("0s");
        }
        for (nanos, unit) in UNITS {
            if rest >= nanos {
                write!(f, "{}{unit}", rest / nanos)?;
                rest %= nanos;
            }
        }
        Ok(())
    }
}

crate::deserialize_via_str!(Duration);
crate::serialize_via_display!(Duration);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secs(text: &str) -> Result<u64, String> {
        text.parse::<Duration>()
            .map(|d| d.as_std().as_secs())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn durations_in_config_and_policy() {
        assert_eq!(secs("30s"), Ok(30));
        assert_eq!(secs("5m"), Ok(300));
        assert_eq!(secs("5min"), Ok(300));
        assert_eq!(secs("12h"), Ok(43_200));
        assert_eq!(secs("24h"), Ok(86_400));
        assert_eq!(secs("7d"), Ok(7 * 86_400));
        assert_eq!(secs("2w"), Ok(14 * 86_400));
        assert_eq!(secs("1h30m"), Ok(5_400));
        assert_eq!(secs("1 day 2 hours"), Ok(93_600));
        assert_eq!(secs("PT1H"), Ok(3_600));
        assert_eq!(secs(" 0s "), Ok(0));
        let d: Duration = "1.5s".parse().unwrap();
        assert_eq!(d.as_std().as_millis(), 1_500);
    }

    #[test]
    fn bad_durations_say_why_and_what_was_expected() {
        for (bad, why) in [
            ("", ""),
            ("30", "without a unit"),
            ("-5m", "negative"),
            ("3mo", "months and years"),
            ("1y", "months and years"),
            ("5 fortnights", ""),
            ("5x", ""),
        ] {
            let err = secs(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(
                err.ends_with("expected a duration such as \"30s\", \"5m\", \"12h\" or \"7d\""),
                "{err}"
            );
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }

    #[test]
    fn display_uses_days_down_to_nanoseconds() {
        for (text, shown) in [
            ("7d", "7d"),
            ("2w", "14d"),
            ("90m", "1h30m"),
            ("1.5s", "1s500ms"),
            ("0s", "0s"),
            ("25h", "1d1h"),
        ] {
            assert_eq!(
                text.parse::<Duration>().unwrap().to_string(),
                shown,
                "{text}"
            );
        }
    }

    proptest! {
        #[test]
        fn display_parses_back(secs in 0u64..(100 * 365 * 86_400), nanos in 0u32..1_000_000_000, whole: bool) {
            let duration = Duration(std::time::Duration::new(secs, if whole { 0 } else { nanos }));
            prop_assert_eq!(duration.to_string().parse::<Duration>().unwrap(), duration);
        }
    }
}
