//! Human-readable sizes in the Hugging Face convention: `KB`, `MB`, `GB`, `TB`, `PB`, `EB` are
//! powers of 1000, `KiB`, `MiB`, `GiB`, `TiB`, `PiB`, `EiB` powers of 1024.

/// Decimal units, smallest first, as [`format_size`] prints them.
const DECIMAL_UNITS: [(&str, u64); 6] = [
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("PB", 1_000_000_000_000_000),
    ("EB", 1_000_000_000_000_000_000),
];

/// Binary units.
const BINARY_UNITS: [(&str, u64); 6] = [
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("PiB", 1 << 50),
    ("EiB", 1 << 60),
];

/// More fractional digits than this (after dropping trailing zeros) are refused: exact
/// arithmetic needs `10^digits * unit` to fit in a `u128`.
const MAX_FRACTION_DIGITS: usize = 18;

/// A size string that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// The string has no number.
    #[error("invalid size {0:?}: expected a number with an optional unit, such as 5GB or 300KiB")]
    Invalid(String),
    /// The number is negative.
    #[error("invalid size {0:?}: sizes cannot be negative")]
    Negative(String),
    /// The unit is not one of the known ones.
    #[error(
        "invalid size {input:?}: unknown unit {unit:?} \
         (use B, KB, MB, GB, TB, PB, EB, KiB, MiB, GiB, TiB, PiB or EiB)"
    )]
    UnknownUnit {
        /// The whole input.
        input: String,
        /// The unit as written.
        unit: String,
    },
    /// The number has too many digits after the decimal point.
    #[error("invalid size {0:?}: too many decimal places")]
    TooPrecise(String),
    /// The size does not fit in 64 bits.
    #[error("invalid size {0:?}: larger than 2^64 - 1 bytes")]
    Overflow(String),
}

/// Parses `123`, `300KB`, `1.5GB`, `5 GiB`, `10b`: a non-negative decimal number, optional
/// spaces, and an optional case-insensitive unit (`B`, decimal `KB`…`EB`, binary `KiB`…`EiB`).
/// A fraction of a byte is dropped (`1.0005KB` is 1000 bytes).
///
/// Usable directly as a clap value parser: `#[arg(value_parser = parse_size)]`.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let text = input.trim();
    if text.starts_with('-') {
        return Err(SizeError::Negative(input.to_string()));
    }
    let number_len = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(SizeError::Invalid(input.to_string()));
    }
    let unit = unit.trim_start();
    let multiplier = unit_multiplier(unit).ok_or_else(|| {
        if unit.chars().all(|c| c.is_ascii_alphabetic()) {
            SizeError::UnknownUnit {
                input: input.to_string(),
                unit: unit.to_string(),
            }
        } else {
            SizeError::Invalid(input.to_string())
        }
    })?;
    let fraction = fraction.trim_end_matches('0');
    if fraction.len() > MAX_FRACTION_DIGITS {
        return Err(SizeError::TooPrecise(input.to_string()));
    }
    let overflow = || SizeError::Overflow(input.to_string());
    // Digits only, so parsing fails only on overflow (or emptiness, which means zero).
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| overflow())?
    };
    let fraction_bytes = match fraction {
        "" => 0,
        digits => digits.parse::<u128>().unwrap() * multiplier / 10u128.pow(digits.len() as u32),
    };
    whole
        .checked_mul(multiplier)
        .and_then(|bytes| bytes.checked_add(fraction_bytes))
        .and_then(|bytes| u64::try_from(bytes).ok())
        .ok_or_else(overflow)
}

fn unit_multiplier(unit: &str) -> Option<u128> {
    if unit.is_empty() || unit.eq_ignore_ascii_case("B") {
        return Some(1);
    }
    DECIMAL_UNITS
        .iter()
        .chain(&BINARY_UNITS)
        .find(|(name, _)| name.eq_ignore_ascii_case(unit))
        .map(|&(_, multiplier)| u128::from(multiplier))
}

/// Formats a size for people with decimal units and two decimals: `999 B`, `1.50 GB`,
/// `12.35 MB`. [`parse_size`] reads the result back to within half of its last digit.
pub fn format_size(bytes: u64) -> String {
    let Some(&(mut unit, mut size)) = DECIMAL_UNITS.iter().rev().find(|(_, size)| bytes >= *size)
    else {
        return format!("{bytes} B");
    };
    let hundredths =
        |size: u64| (u128::from(bytes) * 100 + u128::from(size) / 2) / u128::from(size);
    let mut value = hundredths(size);
    // 999_999 bytes rounds to 1000.00 KB: say 1.00 MB instead.
    if value >= 100_000 {
        if let Some(&(bigger, bigger_size)) = DECIMAL_UNITS.iter().find(|(_, s)| *s > size) {
            (unit, size) = (bigger, bigger_size);
            value = hundredths(size);
        }
    }
    format!("{}.{:02} {unit}", value / 100, value % 100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_units_like_huggingface() {
        let cases = [
            ("123", 123),
            ("0", 0),
            ("10b", 10),
            ("5GB", 5_000_000_000),
            ("5gb", 5_000_000_000),
            ("5 GB", 5_000_000_000),
            (" 300KB ", 300_000),
            ("300KiB", 300 * 1024),
            ("5GiB", 5 << 30),
            ("2tib", 2 << 40),
            ("1.5GB", 1_500_000_000),
            ("1.5MiB", 3 << 19),
            ("0.5KB", 500),
            (".5KB", 500),
            ("2.KB", 2000),
            ("1.0005KB", 1000),
            ("1.000000000000000000000000000MB", 1_000_000),
            ("1PB", 1_000_000_000_000_000),
            ("18446744073709551615", u64::MAX),
            ("15EiB", 15 << 60),
            ("18.446744073709551615EB", u64::MAX),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(bytes), "{text:?}");
        }
    }

    #[test]
    fn rejects_garbage_with_clear_errors() {
        let invalid = [
            "", "  ", "GB", ".", "1.2.3GB", "1,5GB", "+5GB", "5 G B", "1e9", "5GB!",
        ];
        for text in invalid {
            assert!(
                matches!(parse_size(text), Err(SizeError::Invalid(_))),
                "{text:?}"
            );
        }
        assert!(matches!(parse_size("-5GB"), Err(SizeError::Negative(_))));
        assert!(matches!(parse_size(" -1"), Err(SizeError::Negative(_))));
        assert!(
            matches!(parse_size("5G"), Err(SizeError::UnknownUnit { unit, .. }) if unit == "G")
        );
        assert!(matches!(
            parse_size("5 bytes"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("5ZB"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("1.0000000000000000001GB"),
            Err(SizeError::TooPrecise(_))
        ));
        for text in [
            "18446744073709551616",
            "18446744073709551615KB",
            "99999999999999999999999999999999999999999999GB",
            "16EiB",
            "18.5EB",
        ] {
            assert!(
                matches!(parse_size(text), Err(SizeError::Overflow(_))),
                "{text:?}"
            );
        }
        assert_eq!(
            parse_size("5G").unwrap_err().to_string(),
            "invalid size \"5G\": unknown unit \"G\" (use B, KB, MB, GB, TB, PB, EB, KiB, MiB, GiB, TiB, PiB or EiB)"
        );
    }

    #[test]
    fn formats_with_decimal_units() {
        let cases = [
            (0, "0 B"),
            (999, "999 B"),
            (1000, "1.00 KB"),
            (1_500_000_000, "1.50 GB"),
            (12_345_678, "12.35 MB"),
            (999_994, "999.99 KB"),
            (999_995, "1.00 MB"),
            (u64::MAX, "18.45 EB"),
        ];
        for (bytes, text) in cases {
            assert_eq!(format_size(bytes), text, "{bytes}");
        }
    }

    #[test]
    fn works_as_a_clap_value_parser() {
        use clap::Parser;
        #[derive(Parser)]
        struct Args {
            #[arg(long, value_parser = parse_size)]
            max_shard_size: u64,
        }
        let args = Args::try_parse_from(["t", "--max-shard-size", "5GB"]).unwrap();
        assert_eq!(args.max_shard_size, 5_000_000_000);
        let err = Args::try_parse_from(["t", "--max-shard-size", "5X"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("unknown unit \"X\""), "{err}");
    }

    proptest! {
        #[test]
        fn plain_and_unit_sizes_parse_exactly(n in any::<u64>(), k in 0u64..1_000_000, unit in 0usize..12) {
            prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
            prop_assert_eq!(parse_size(&format!("{n} b")), Ok(n));
            let (name, size) = DECIMAL_UNITS.iter().chain(&BINARY_UNITS).nth(unit).unwrap();
            let expected = u128::from(k) * u128::from(*size);
            let parsed = parse_size(&format!("{k}{}", name.to_lowercase()));
            match u64::try_from(expected) {
                Ok(bytes) => prop_assert_eq!(parsed, Ok(bytes)),
                Err(_) => prop_assert!(matches!(parsed, Err(SizeError::Overflow(_)))),
            }
        }

        #[test]
        fn format_then_parse_is_within_half_a_percent(n in 0u64..18_440_000_000_000_000_000) {
            let parsed = parse_size(&format_size(n)).unwrap();
            prop_assert!(parsed.abs_diff(n) as f64 <= n as f64 * 0.00501, "{} -> {}", n, parsed);
        }
    }
}
