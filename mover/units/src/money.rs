//! Prices per GB: egress and storage costs in the policy.

use std::fmt;
use std::str::FromStr;

use crate::decimal::split_number;
use crate::{Kind, ParseError};

const NANOS_PER_USD: u128 = 1_000_000_000;
/// Bytes in the GB of a price list: cloud providers bill decimal gigabytes.
const BYTES_PER_GB: f64 = 1e9;

/// US dollars per GB (10^9 bytes, as cloud price lists count), kept exactly in nano-dollars:
/// `0.09` is 90 000 000, so sums of prices never drift. At most 9 decimals; never negative,
/// NaN or infinite. In TOML a number (`0.09`) or a string (`"0.09"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UsdPerGb(u64);

impl UsdPerGb {
    pub const fn from_nano_usd(nano_usd_per_gb: u64) -> UsdPerGb {
        UsdPerGb(nano_usd_per_gb)
    }

    pub const fn nano_usd(self) -> u64 {
        self.0
    }

    pub fn usd(self) -> f64 {
        self.0 as f64 / NANOS_PER_USD as f64
    }

    /// What `bytes` cost at this price, in dollars.
    pub fn cost_usd(self, bytes: u64) -> f64 {
        self.usd() * bytes as f64 / BYTES_PER_GB
    }
}

impl FromStr for UsdPerGb {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<UsdPerGb, ParseError> {
        let error = |reason: String| ParseError::new(Kind::UsdPerGb, text, reason);
        let trimmed = text.trim();
        if trimmed.eq_ignore_ascii_case("nan") {
            return Err(error("not a number".into()));
        }
        if trimmed
            .trim_start_matches(['-', '+'])
            .eq_ignore_ascii_case("inf")
        {
            return Err(error("infinite".into()));
        }
        let (number, unit) = split_number(trimmed).map_err(error)?;
        if !unit.is_empty() {
            return Err(error(format!("unexpected {unit:?} after the number")));
        }
        if number.scale > 9 {
            return Err(error("more than 9 decimals (nano-dollars)".into()));
        }
        let (nanos, _) = number
            .times(NANOS_PER_USD, 1)
            .filter(|&(nanos, _)| nanos <= u128::from(u64::MAX))
            .ok_or_else(|| error("too large".into()))?;
        Ok(UsdPerGb(nanos as u64))
    }
}

/// Plain decimal dollars without trailing zeros: `0.09`, `1`, `0.000000001`.
impl fmt::Display for UsdPerGb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = u128::from(self.0) / NANOS_PER_USD;
        let fraction = u128::from(self.0) % NANOS_PER_USD;
        if fraction == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{fraction:09}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

impl<'de> serde::Deserialize<'de> for UsdPerGb {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = UsdPerGb;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(Kind::UsdPerGb.expected())
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<UsdPerGb, E> {
                value.to_string().parse().map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<UsdPerGb, E> {
                value.to_string().parse().map_err(E::custom)
            }
            // A float's shortest exact decimal (Rust's Display has no exponent) goes through
            // the same parser as a string, so 0.09 is exactly 90 000 000 nano-dollars.
            fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<UsdPerGb, E> {
                value.to_string().parse().map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<UsdPerGb, E> {
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A number in JSON (`egress_usd_per_gb: 0.09`), as in the policy file.
impl serde::Serialize for UsdPerGb {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.usd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prices_are_exact_and_never_negative() {
        assert_eq!("0.09".parse::<UsdPerGb>().unwrap().nano_usd(), 90_000_000);
        assert_eq!("0".parse::<UsdPerGb>().unwrap().nano_usd(), 0);
        assert_eq!("1.5".parse::<UsdPerGb>().unwrap().nano_usd(), 1_500_000_000);
        let price: UsdPerGb = "0.09".parse().unwrap();
        assert!((price.cost_usd(10_000_000_000) - 0.9).abs() < 1e-12);
        for (bad, why) in [
            ("-0.09", "negative"),
            ("NaN", "not a number"),
            ("inf", "infinite"),
            ("-inf", "infinite"),
            ("$0.09", "no number"),
            ("0.09/GB", "unexpected \"/GB\""),
            ("0.0000000001", "more than 9 decimals"),
            ("", "no number"),
        ] {
            let err = bad.parse::<UsdPerGb>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(
                err.ends_with("expected a price in US dollars per GB such as 0.09"),
                "{err}"
            );
        }
    }

    #[test]
    fn toml_numbers_and_strings() {
        #[derive(serde::Deserialize, Debug)]
        struct Link {
            egress_usd_per_gb: UsdPerGb,
        }
        for (text, nanos) in [
            ("0.09", 90_000_000),
            ("1", 1_000_000_000),
            ("\"0.02\"", 20_000_000),
            ("0.00099", 990_000),
        ] {
            let link: Link = toml::from_str(&format!("egress_usd_per_gb = {text}")).unwrap();
            assert_eq!(link.egress_usd_per_gb.nano_usd(), nanos, "{text}");
        }
        for (text, why) in [
            ("-0.09", "negative"),
            ("nan", "not a number"),
            ("-1", "negative"),
            ("inf", "infinite"),
        ] {
            let err = toml::from_str::<Link>(&format!("egress_usd_per_gb = {text}")).unwrap_err();
            assert!(err.message().contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn display_is_plain_decimal() {
        for (nanos, text) in [
            (90_000_000, "0.09"),
            (1_000_000_000, "1"),
            (1, "0.000000001"),
            (0, "0"),
        ] {
            assert_eq!(UsdPerGb(nanos).to_string(), text);
        }
    }

    proptest! {
        #[test]
        fn display_parses_back(nanos: u64) {
            let price = UsdPerGb(nanos);
            prop_assert_eq!(price.to_string().parse::<UsdPerGb>().unwrap(), price);
        }
    }
}
