//! The number in front of a unit: digits with at most one point, no sign and no exponent,
//! kept exact (integers, not floats) so that `0.5GiB` is exactly 512 MiB.

/// `mantissa / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decimal {
    pub mantissa: u128,
    pub scale: u32,
}

/// More digits than any real value has; keeps every product below u128::MAX.
const DIGITS_MAX: usize = 24;

/// Splits `text` (already trimmed) into its leading number and the unit after it (trimmed).
pub(crate) fn split_number(text: &str) -> Result<(Decimal, &str), String> {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(end);
    if number.is_empty() {
        return Err(if text.starts_with('-') {
            "negative".into()
        } else {
            "no number".into()
        });
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if fraction.contains('.') || whole.is_empty() && fraction.is_empty() {
        return Err(format!("{number:?} is not a number"));
    }
    let digits = whole.len() + fraction.len();
    if digits > DIGITS_MAX {
        return Err("too many digits".into());
    }
    let mut mantissa = 0u128;
    for digit in whole.bytes().chain(fraction.bytes()) {
        mantissa = mantissa * 10 + u128::from(digit - b'0');
    }
    Ok((
        Decimal {
            mantissa,
            scale: fraction.len() as u32,
        },
        unit.trim(),
    ))
}

impl Decimal {
    /// `self * multiplier / divisor`, as (whole part, whether it is exact); None on overflow.
    pub fn times(self, multiplier: u128, divisor: u128) -> Option<(u128, bool)> {
        let numerator = self.mantissa.checked_mul(multiplier)?;
        let denominator = 10u128.checked_pow(self.scale)?.checked_mul(divisor)?;
        Some((numerator / denominator, numerator % denominator == 0))
    }

    /// `self * multiplier / divisor` rounded to the nearest whole number.
    pub fn times_rounded(self, multiplier: u128, divisor: u128) -> Option<u128> {
        let numerator = self.mantissa.checked_mul(multiplier)?;
        let denominator = 10u128.checked_pow(self.scale)?.checked_mul(divisor)?;
        Some((numerator + denominator / 2) / denominator)
    }
}

/// The binary and decimal multipliers a prefix letter stands for (`k`/`K` both kilo, `m`/`M`
/// both mega: no one means a milli-byte).
pub(crate) fn prefix(letter: char) -> Option<(u128, u128)> {
    Some(match letter.to_ascii_lowercase() {
        'k' => (1 << 10, 1_000),
        'm' => (1 << 20, 1_000_000),
        'g' => (1 << 30, 1_000_000_000),
        't' => (1 << 40, 1_000_000_000_000),
        'p' => (1 << 50, 1_000_000_000_000_000),
        _ => return None,
    })
}

/// The shortest exact form of `value` as `N` + one of the prefixes (largest first): e.g.
/// `(1, "Gi")` for 2^30 with the binary table. `prefixes` pairs a multiplier with its text.
pub(crate) fn shortest(value: u128, prefixes: &[(u128, &'static str)]) -> (u128, &'static str) {
    let mut best = (value, "");
    for &(multiplier, text) in prefixes {
        if value != 0 && value % multiplier == 0 {
            let n = value / multiplier;
            if n.to_string().len() < best.0.to_string().len() {
                best = (n, text);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_split_from_units() {
        let (d, unit) = split_number("0.5 GiB").unwrap();
        assert_eq!((d.mantissa, d.scale, unit), (5, 1, "GiB"));
        assert_eq!(d.times(1 << 30, 1), Some((1 << 29, true)));
        assert_eq!(split_number("12").unwrap().0.times(1, 8), Some((1, false)));
        assert_eq!(split_number("1.").unwrap().0.mantissa, 1);
        assert_eq!(split_number(".5").unwrap().0.scale, 1);
        for bad in ["", ".", "1.2.3", "-1", "GiB", "1e9x"] {
            if bad == "1e9x" {
                // The exponent is left in the unit, which the caller refuses.
                assert_eq!(split_number(bad).unwrap().1, "e9x");
                continue;
            }
            assert!(split_number(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            split_number(&"9".repeat(30)).unwrap_err(),
            "too many digits"
        );
    }
}
