//! The one parser of the units people write in `mover.toml`, the policy file and the tools'
//! arguments, so that `"50Mb/s"` means the same everywhere (issue 14, item 5).
//!
//! Each value is a type with one parser behind three doors: `FromStr` (command lines),
//! `Deserialize` (TOML: a bad value becomes toml's `line:column` plus what was expected) and
//! `Display`, which prints a canonical form that parses back to the same value.
//!
//! | type | accepts | refuses |
//! |---|---|---|
//! | [`ByteSize`] | `4096`, `512B`, `4KiB`..`TiB` (binary), `4KB`..`TB` (decimal), `4K`..`T` (binary, as coreutils), fractions that give whole bytes (`0.5GiB`); case-insensitive | fractional bytes, signs, exponents |
//! | [`Rate`] | bits: `100mbit`, `1Gbit/s`, `50Mb/s`, `2Gbps`; bytes: `50MB/s`, `512KiB/s` | a bare number (bits or bytes?), `MBps` (bytes to some tools, bits to others), a size without `/s` |
//! | [`Duration`] | `30s`, `5m`, `5min`, `12h`, `7d`, `2w`, `1h30m`, ISO 8601 `PT1H` (days are 24 h) | months and years (no fixed length), negative durations |
//! | [`UsdPerGb`] | `0.09`, `0`, `1.5` (TOML number or string), up to 9 decimals | negative, NaN, infinite |
//! | [`Window`] | `22:00-06:00` (wraps midnight), optionally followed by an IANA zone | equal start and end, unknown zones |
//!
//! This crate is the bottom layer: it depends on neither `mover` nor `transport`.

mod decimal;
mod duration;
mod money;
mod rate;
mod size;
mod window;

pub use duration::Duration;
pub use money::UsdPerGb;
pub use rate::Rate;
pub use size::ByteSize;
pub use window::Window;

/// Which kind of value failed to parse; each knows how to say what was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ByteSize,
    Rate,
    Duration,
    UsdPerGb,
    Window,
}

impl Kind {
    /// What a valid value looks like, for the end of an error line.
    pub fn expected(self) -> &'static str {
        match self {
            Kind::ByteSize => "a size such as \"4GiB\", \"500MB\" or a number of bytes",
            Kind::Rate => "a rate such as \"1gbit\" or \"50MB/s\"",
            Kind::Duration => "a duration such as \"30s\", \"5m\", \"12h\" or \"7d\"",
            Kind::UsdPerGb => "a price in US dollars per GB such as 0.09",
            Kind::Window => {
                "a daily window such as \"22:00-06:00\", optionally followed by an IANA time zone"
            }
        }
    }
}

/// A value that does not parse: the text (quoted, so control characters cannot break the
/// line), why, and what was expected. One line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?}: {reason}; expected {}", kind.expected())]
pub struct ParseError {
    pub kind: Kind,
    pub input: String,
    pub reason: String,
}

impl ParseError {
    fn new(kind: Kind, input: &str, reason: impl Into<String>) -> ParseError {
        // Long enough for any real value; a pasted file is cut so the error stays one line.
        const INPUT_SHOWN_MAX: usize = 80;
        let input = match input.char_indices().nth(INPUT_SHOWN_MAX) {
            Some((end, _)) => format!("{}…", &input[..end]),
            None => input.to_string(),
        };
        ParseError {
            kind,
            input,
            reason: reason.into(),
        }
    }
}

/// `Deserialize` through `FromStr`, for string-valued settings parsed into enums (a cipher, a
/// congestion controller) with the parser's own message at the value's position.
pub fn deserialize_from_str<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

/// As [`deserialize_from_str`], for an optional key (use with `#[serde(default)]`).
pub fn deserialize_option_from_str<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    deserialize_from_str(deserializer).map(Some)
}

/// The string-valued half of each type's `Deserialize`: the visitor's `visit_str`.
macro_rules! deserialize_via_str {
    ($ty:ty) => {
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl serde::de::Visitor<'_> for Visitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str(<$ty>::KIND.expected())
                    }
                    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<$ty, E> {
                        text.parse().map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(Visitor)
            }
        }
    };
}
pub(crate) use deserialize_via_str;

/// Every type serializes as its canonical text (so JSON keeps a string where a user wrote one).
macro_rules! serialize_via_display {
    ($ty:ty) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
    };
}
pub(crate) use serialize_via_display;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_one_line_and_quote_the_input() {
        let err = "1\nfurlong".parse::<Rate>().unwrap_err().to_string();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("\"1\\nfurlong\": "), "{err}");
        assert!(
            err.ends_with("expected a rate such as \"1gbit\" or \"50MB/s\""),
            "{err}"
        );
        let long = "9".repeat(10_000);
        assert!(long.parse::<ByteSize>().unwrap_err().to_string().len() < 300);
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Peer {
        bandwidth: Rate,
        #[serde(default, deserialize_with = "deserialize_option_from_str")]
        flavour: Option<u8>,
    }

    #[test]
    fn toml_errors_point_at_the_value_and_say_what_was_expected() {
        let text = "[x]\nbandwidth = \"fast\"\n";
        let err = toml::from_str::<std::collections::BTreeMap<String, Peer>>(text).unwrap_err();
        assert_eq!(
            err.message(),
            "\"fast\": no number; expected a rate such as \"1gbit\" or \"50MB/s\""
        );
        assert_eq!(err.span().unwrap().start, text.find("\"fast\"").unwrap());

        let text = "bandwidth = \"1gbit\"\nflavour = \"sweet\"\n";
        let err = toml::from_str::<Peer>(text).unwrap_err();
        assert_eq!(err.message(), "invalid digit found in string");
        let peer: Peer = toml::from_str("bandwidth = \"1gbit\"\nflavour = \"7\"\n").unwrap();
        assert_eq!(peer.flavour, Some(7));
        // A number where a string is expected names the expectation too.
        let err = toml::from_str::<Peer>("bandwidth = 5\n").unwrap_err();
        assert!(err.message().contains("expected a rate such as"), "{err}");
    }
}
