//! Link rates in bits or bytes per second.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use crate::decimal::{prefix, shortest, split_number};
use crate::{Kind, ParseError};

/// Highest rate accepted, 1 Pbit/s: far beyond any link, and keeps every time computation
/// (bytes / rate, in nanoseconds) far from overflow.
const BITS_PER_SECOND_MAX: u64 = 1_000_000_000_000_000;
/// Lowest, 1 byte/s: a token bucket counts whole bytes.
const BITS_PER_SECOND_MIN: u64 = 8;

/// A rate, kept in bits per second (whole bits: 1 B/s is 8 bit/s).
///
/// Accepted (the number may have a fraction; prefixes `k`, `M`, `G`, `T` are decimal, `Ki`,
/// `Mi`, `Gi`, `Ti` binary, either case, and `m` is mega, never milli):
/// - bits: `100mbit`, `1Gbit/s`, `1gbits`, `50Mb/s` (lower-case `b`), `2Gbps` (`bps` as
///   network equipment and ISPs write it);
/// - bytes: `50MB/s`, `512KiB/s`, `1000B/s` (upper-case `B`, always with `/s`).
///
/// Refused as ambiguous: a bare number (bits or bytes per second?); `MBps`/`Bps` (bytes to
/// most, but `tc` spells megabytes `mbps`, so the case cannot be trusted); a size without
/// `/s` (`50MB`, `50Mb`).
///
/// Equality is on the value; whether it was written in bits or bytes only chooses how it is
/// displayed (`"16MB/s"` stays `16MB/s`, `"1gbit"` becomes `1Gbit`).
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    bits_per_second: u64,
    in_bytes: bool,
}

impl Rate {
    pub(crate) const KIND: Kind = Kind::Rate;

    /// None outside 8 bit/s..=1 Pbit/s.
    pub fn from_bits_per_second(bits: u64) -> Option<Rate> {
        (BITS_PER_SECOND_MIN..=BITS_PER_SECOND_MAX)
            .contains(&bits)
            .then_some(Rate {
                bits_per_second: bits,
                in_bytes: false,
            })
    }

    /// None outside 1 B/s..=125 TB/s.
    pub fn from_bytes_per_second(bytes: u64) -> Option<Rate> {
        let bits = bytes.checked_mul(8)?;
        Rate::from_bits_per_second(bits).map(|rate| Rate {
            in_bytes: true,
            ..rate
        })
    }

    pub fn bits_per_second(self) -> u64 {
        self.bits_per_second
    }

    /// Whole bytes per second (rounded down; at least 1).
    pub fn bytes_per_second(self) -> u64 {
        self.bits_per_second / 8
    }
}

impl PartialEq for Rate {
    fn eq(&self, other: &Rate) -> bool {
        self.bits_per_second == other.bits_per_second
    }
}

impl Eq for Rate {}

impl Hash for Rate {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.bits_per_second.hash(state);
    }
}

impl PartialOrd for Rate {
    fn partial_cmp(&self, other: &Rate) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Rate {
    fn cmp(&self, other: &Rate) -> std::cmp::Ordering {
        self.bits_per_second.cmp(&other.bits_per_second)
    }
}

/// How the unit after the number reads: (prefix text, bits per unit).
fn unit(unit: &str) -> Result<(&str, u128), String> {
    let lower = unit.to_ascii_lowercase();
    if unit.is_empty() {
        return Err("a number without a unit is ambiguous (bits or bytes per second?)".into());
    }
    for suffix in ["bits/s", "bit/s", "bits", "bit"] {
        if lower.ends_with(suffix) {
            return Ok((&unit[..unit.len() - suffix.len()], 1));
        }
    }
    if let Some(prefix) = unit
        .strip_suffix("b/s")
        .or_else(|| unit.strip_suffix("bps"))
    {
        return Ok((prefix, 1));
    }
    if let Some(prefix) = unit.strip_suffix("B/s") {
        return Ok((prefix, 8));
    }
    if unit.ends_with("Bps") {
        return Err(format!(
            "{unit:?} is ambiguous (bytes to some tools, bits to others); write B/s for bytes or bit for bits"
        ));
    }
    if lower.ends_with('b') {
        return Err(format!("{unit:?} is a size, not a rate; add /s"));
    }
    Err(format!("unknown unit {unit:?}"))
}

impl FromStr for Rate {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Rate, ParseError> {
        let error = |reason: String| ParseError::new(Kind::Rate, text, reason);
        let (number, unit_text) = split_number(text.trim()).map_err(error)?;
        let (prefix_text, bits_per_unit) = unit(unit_text).map_err(error)?;
        let mut chars = prefix_text.chars();
        let multiplier = match (chars.next(), chars.as_str()) {
            (None, _) => 1,
            (Some(letter), rest) => {
                let (binary, decimal) = prefix(letter)
                    .filter(|_| !letter.eq_ignore_ascii_case(&'p'))
                    .ok_or_else(|| {
                        error(format!("unknown prefix {prefix_text:?} in {unit_text:?}"))
                    })?;
                match rest {
                    "" => decimal,
                    "i" | "I" => binary,
                    _ => {
                        return Err(error(format!(
                            "unknown prefix {prefix_text:?} in {unit_text:?}"
                        )))
                    }
                }
            }
        };
        let bits = number
            .times_rounded(multiplier * bits_per_unit, 1)
            .filter(|&bits| bits <= u128::from(BITS_PER_SECOND_MAX))
            .ok_or_else(|| error("too fast (at most 1 Pbit/s)".into()))?;
        if bits < u128::from(BITS_PER_SECOND_MIN) {
            return Err(error("too slow (at least 1 B/s, 8 bit/s)".into()));
        }
        Ok(Rate {
            bits_per_second: bits as u64,
            in_bytes: bits_per_unit == 8,
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const PREFIXES: [(u128, &str); 8] = [
            (1_000_000_000_000, "T"),
            (1_000_000_000, "G"),
            (1_000_000, "M"),
            (1_000, "k"),
            (1 << 40, "Ti"),
            (1 << 30, "Gi"),
            (1 << 20, "Mi"),
            (1 << 10, "Ki"),
        ];
        if self.in_bytes && self.bits_per_second % 8 == 0 {
            let (n, prefix) = shortest(u128::from(self.bits_per_second / 8), &PREFIXES);
            write!(f, "{n}{prefix}B/s")
        } else {
            let (n, prefix) = shortest(u128::from(self.bits_per_second), &PREFIXES);
            write!(f, "{n}{prefix}bit")
        }
    }
}

crate::deserialize_via_str!(Rate);
crate::serialize_via_display!(Rate);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bits(text: &str) -> Result<u64, String> {
        text.parse::<Rate>()
            .map(Rate::bits_per_second)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn bits_and_bytes_are_told_apart_by_the_case_of_b() {
        assert_eq!(bits("50Mb/s"), Ok(50_000_000));
        assert_eq!(bits("50MB/s"), Ok(400_000_000));
        assert_eq!(bits("50mb/s"), Ok(50_000_000));
        assert_eq!(bits("1gbit"), Ok(1_000_000_000));
        assert_eq!(bits("1Gbit"), Ok(1_000_000_000));
        assert_eq!(bits("1Gbit/s"), Ok(1_000_000_000));
        assert_eq!(bits("10 gbits"), Ok(10_000_000_000));
        assert_eq!(bits("100mbit"), Ok(100_000_000));
        assert_eq!(bits("2Gbps"), Ok(2_000_000_000));
        assert_eq!(bits("2gbps"), Ok(2_000_000_000));
        assert_eq!(bits("2.5gbit"), Ok(2_500_000_000));
        assert_eq!(bits("125MB/s"), Ok(1_000_000_000));
        assert_eq!(bits("1GiB/s"), Ok(8 << 30));
        assert_eq!(bits("512KiB/s"), Ok(8 * 512 * 1024));
        assert_eq!(bits("10kibit"), Ok(10_240));
        assert_eq!(bits(" 10 gbit "), Ok(10_000_000_000));
        assert_eq!(bits("1B/s"), Ok(8));
        assert_eq!(bits("1Tbit"), Ok(1_000_000_000_000));
        let rate: Rate = "16MB/s".parse().unwrap();
        assert_eq!(rate.bytes_per_second(), 16_000_000);
        assert_eq!(
            "1gbit".parse::<Rate>().unwrap().bytes_per_second(),
            125_000_000
        );
    }

    #[test]
    fn ambiguous_and_bad_rates_are_refused() {
        for (bad, why) in [
            ("", "no number"),
            ("fast", "no number"),
            ("1000", "ambiguous (bits or bytes"),
            ("100MBps", "ambiguous (bytes to some tools"),
            ("50MB", "a size, not a rate"),
            ("50Mb", "a size, not a rate"),
            ("1 furlong", "unknown unit"),
            ("1xbit", "unknown prefix \"x\""),
            ("1Pbit", "unknown prefix \"P\""),
            ("1Gxbit", "unknown prefix \"Gx\""),
            ("0mbit", "too slow"),
            ("7bit", "too slow"),
            ("-5mbit", "negative"),
            ("1e9bit", "unknown prefix \"e9\""),
            ("1001tbit", "too fast"),
        ] {
            let err = bits(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(
                err.ends_with("expected a rate such as \"1gbit\" or \"50MB/s\""),
                "{err}"
            );
        }
    }

    #[test]
    fn display_keeps_bits_or_bytes_as_written() {
        for (text, shown) in [
            ("16MB/s", "16MB/s"),
            ("1gbit", "1Gbit"),
            ("50Mb/s", "50Mbit"),
            ("2Gbps", "2Gbit"),
            ("512KiB/s", "512KiB/s"),
            ("1.5kbit", "1500bit"),
            ("10kibit", "10Kibit"),
            ("1.5B/s", "12bit"),
        ] {
            assert_eq!(text.parse::<Rate>().unwrap().to_string(), shown, "{text}");
        }
        assert_eq!(
            "16MB/s".parse::<Rate>().unwrap(),
            "128Mbit".parse::<Rate>().unwrap()
        );
    }

    proptest! {
        #[test]
        fn display_parses_back(bits in BITS_PER_SECOND_MIN..=BITS_PER_SECOND_MAX, in_bytes: bool) {
            let rate = Rate { bits_per_second: bits, in_bytes };
            prop_assert_eq!(rate.to_string().parse::<Rate>().unwrap(), rate);
        }
    }
}
