//! Parsers for the human-friendly values of the config file: durations (`"250ms"`), byte sizes
//! (`"32MiB"`) and rates (`"auto"` or a number). Each returns a message that says what was expected;
//! the caller adds the key.

use std::time::Duration;

/// Parses a duration such as `"250ms"`, `"30s"`, `"5m"` or `"1h 30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration ({e}); use values like \"250ms\", \"30s\", \"5m\""))
}

/// Parses a byte size: a whole number of bytes (`"1048576"`), or a number with a unit
/// (`B`, `KB`, `MB`, `GB` in powers of 1000; `KiB`, `MiB`, `GiB` in powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a byte size; use values like \"512KiB\", \"32MiB\" or a number of bytes");
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    number.checked_mul(multiplier).ok_or_else(bad)
}

/// A per-destination rate: follow the destination's open shard count, or a fixed number per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// Open shards times the per-shard write limit (1,000 records/s, 1 MiB/s).
    Auto,
    /// A fixed number of units (records or bytes) per second for this destination.
    PerSecond(u64),
}

impl Rate {
    /// The rate for a destination with `open_shards` open shards, given the per-shard limit.
    pub fn resolve(self, open_shards: u32, per_shard: u64) -> u64 {
        match self {
            Rate::Auto => u64::from(open_shards.max(1)) * per_shard,
            Rate::PerSecond(n) => n,
        }
    }
}

/// Parses `"auto"` or a positive number of records per second.
pub fn parse_record_rate(text: &str) -> Result<Rate, String> {
    let trimmed = text.trim();
    if trimmed.eq_ignore_ascii_case("auto") {
        return Ok(Rate::Auto);
    }
    match trimmed.parse::<u64>() {
        Ok(0) | Err(_) => {
            Err(format!("`{text}` is not a rate; use \"auto\" or a positive number of records per second"))
        }
        Ok(n) => Ok(Rate::PerSecond(n)),
    }
}

/// Parses `"auto"` or a positive byte size per second (`"2MiB"`).
pub fn parse_byte_rate(text: &str) -> Result<Rate, String> {
    let trimmed = text.trim();
    if trimmed.eq_ignore_ascii_case("auto") {
        return Ok(Rate::Auto);
    }
    match parse_bytes(trimmed) {
        Ok(0) => Err(format!("`{text}` must be more than zero bytes per second")),
        Ok(n) => Ok(Rate::PerSecond(n)),
        Err(e) => Err(format!("{e}, or \"auto\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("fast").unwrap_err().contains("fast"));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("32MiB"), Ok(32 << 20));
        assert_eq!(parse_bytes("5 MB"), Ok(5_000_000));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("1KiB"), Ok(1024));
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("99999999999999999999GiB").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_record_rate("auto"), Ok(Rate::Auto));
        assert_eq!(parse_record_rate("500"), Ok(Rate::PerSecond(500)));
        assert!(parse_record_rate("0").is_err());
        assert_eq!(parse_byte_rate("2MiB"), Ok(Rate::PerSecond(2 << 20)));
        assert_eq!(Rate::Auto.resolve(4, 1000), 4000);
        assert_eq!(Rate::Auto.resolve(0, 1000), 1000);
        assert_eq!(Rate::PerSecond(7).resolve(4, 1000), 7);
    }

    proptest! {
        #[test]
        fn byte_sizes_never_panic(text in ".{0,24}") {
            let _ = parse_bytes(&text);
            let _ = parse_byte_rate(&text);
            let _ = parse_record_rate(&text);
            let _ = parse_duration(&text);
        }

        #[test]
        fn byte_sizes_round_trip(n in 0u64..1_000_000, unit in prop::sample::select(vec![("", 1u64), ("KiB", 1024), ("MiB", 1 << 20), ("KB", 1000)])) {
            prop_assert_eq!(parse_bytes(&format!("{n}{}", unit.0)), Ok(n * unit.1));
        }
    }
}
