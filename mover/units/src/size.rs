//! Sizes in bytes.

use std::fmt;
use std::str::FromStr;

use crate::decimal::{prefix, shortest, split_number};
use crate::{Kind, ParseError};

/// A number of bytes. `KB`, `MB`, `GB`, `TB` are decimal (10^3..10^12); `KiB`..`TiB` and the
/// bare letters `K`, `M`, `G`, `T` binary (2^10..2^40, as coreutils and fio read them); `B`
/// or no unit is bytes. Case does not matter: a size has no bit form to confuse with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(u64);

impl ByteSize {
    pub const fn from_bytes(bytes: u64) -> ByteSize {
        ByteSize(bytes)
    }

    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<ByteSize, ParseError> {
        let error = |reason: String| ParseError::new(Kind::ByteSize, text, reason);
        let (number, unit) = split_number(text.trim()).map_err(error)?;
        let lower = unit.to_ascii_lowercase();
        let multiplier = match lower.as_str() {
            "" | "b" => 1,
            _ => {
                let mut chars = lower.chars();
                let letter = chars.next().unwrap_or_default();
                let (binary, decimal) =
                    prefix(letter).ok_or_else(|| error(format!("unknown unit {unit:?}")))?;
                match chars.as_str() {
                    "" | "ib" => binary,
                    "b" => decimal,
                    _ => return Err(error(format!("unknown unit {unit:?}"))),
                }
            }
        };
        let (bytes, exact) = number
            .times(multiplier, 1)
            .filter(|&(bytes, _)| bytes <= u128::from(u64::MAX))
            .ok_or_else(|| error("too large (at most 16 EiB)".into()))?;
        if !exact {
            return Err(error("not a whole number of bytes".into()));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const PREFIXES: [(u128, &str); 10] = [
            (1 << 50, "PiB"),
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
            (1_000_000_000_000_000, "PB"),
            (1_000_000_000_000, "TB"),
            (1_000_000_000, "GB"),
            (1_000_000, "MB"),
            (1_000, "KB"),
        ];
        match shortest(u128::from(self.0), &PREFIXES) {
            (n, "") => write!(f, "{n}B"),
            (n, unit) => write!(f, "{n}{unit}"),
        }
    }
}

/// A TOML integer is a number of bytes (the `*_bytes` keys); a string has a unit.
impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(Kind::ByteSize.expected())
            }
            fn visit_u64<E: serde::de::Error>(self, bytes: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(bytes))
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<ByteSize, E> {
                u64::try_from(value).map(ByteSize).map_err(|_| {
                    E::custom(ParseError::new(
                        Kind::ByteSize,
                        &value.to_string(),
                        "negative",
                    ))
                })
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ByteSize, E> {
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

crate::serialize_via_display!(ByteSize);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn size(text: &str) -> Result<u64, String> {
        text.parse::<ByteSize>()
            .map(ByteSize::bytes)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(size("512"), Ok(512));
        assert_eq!(size("512B"), Ok(512));
        assert_eq!(size("4GiB"), Ok(4 << 30));
        assert_eq!(size("256mib"), Ok(256 << 20));
        assert_eq!(size("1GB"), Ok(1_000_000_000));
        assert_eq!(size("1kb"), Ok(1_000));
        assert_eq!(size("8K"), Ok(8192));
        assert_eq!(size("0.5GiB"), Ok(512 << 20));
        assert_eq!(size(" 2 TiB "), Ok(2 << 40));
        assert_eq!(size("1.5KB"), Ok(1_500));
        assert_eq!(size("0"), Ok(0));
        assert_eq!(size("16PiB"), Ok(16 << 50));
    }

    #[test]
    fn bad_sizes_say_why_and_what_was_expected() {
        for (bad, why) in [
            ("", "no number"),
            ("GiB", "no number"),
            ("4XB", "unknown unit \"XB\""),
            ("4Gbit", "unknown unit \"Gbit\""),
            ("1.2.3GiB", "is not a number"),
            ("-1GiB", "negative"),
            ("1.5B", "not a whole number of bytes"),
            ("99999999TiB", "too large"),
            ("1e9", "unknown unit \"e9\""),
        ] {
            let err = size(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(
                err.ends_with("expected a size such as \"4GiB\", \"500MB\" or a number of bytes"),
                "{err}"
            );
        }
    }

    #[test]
    fn display_is_the_shortest_exact_form() {
        for (bytes, text) in [
            (0, "0B"),
            (512, "512B"),
            (1 << 30, "1GiB"),
            (1_000_000, "1MB"),
            (1536, "1536B"),
            (3 << 19, "1536KiB"),
            (128 << 20, "128MiB"),
        ] {
            assert_eq!(ByteSize(bytes).to_string(), text);
        }
    }

    #[test]
    fn toml_takes_integers_and_strings() {
        #[derive(serde::Deserialize, Debug)]
        struct T {
            a: ByteSize,
            b: ByteSize,
        }
        let t: T = toml::from_str("a = 4096\nb = \"4KiB\"\n").unwrap();
        assert_eq!((t.a, t.b), (ByteSize(4096), ByteSize(4096)));
        let err = toml::from_str::<T>("a = -1\nb = 1\n").unwrap_err();
        assert!(err.message().contains("negative"), "{err}");
    }

    proptest! {
        #[test]
        fn display_parses_back(bytes in any::<u64>(), shift in 0u32..50) {
            for value in [bytes, (bytes >> shift) << shift] {
                let size = ByteSize(value);
                prop_assert_eq!(size.to_string().parse::<ByteSize>().unwrap(), size);
            }
        }
    }
}
