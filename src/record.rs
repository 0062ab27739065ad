//! What flows through the service: records read from a source shard, identified by their
//! sequence numbers.

use std::cmp::Ordering;
use std::fmt;
use std::time::SystemTime;

use bytes::Bytes;

/// Kinesis accepts records of at most this size (data plus partition key) unless the stream's
/// maximum was raised ([`StreamLimits`]).
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// The largest record a stream can be raised to take (`UpdateMaxRecordSize`: 10 MiB).
pub const LARGEST_RECORD_BYTES: usize = 10 << 20;

/// What one stream takes, from its `MaxRecordSizeInKiB` (DescribeStreamSummary): records of at
/// most `max_record_bytes` (1 MiB by default, up to 10 MiB), in PutRecords requests of at most
/// 5 MiB, or 10 MiB on a stream that takes records over 1 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    pub max_record_bytes: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits { max_record_bytes: MAX_RECORD_BYTES }
    }
}

impl StreamLimits {
    /// The limits a stream reports; a missing or out-of-range value (an older API, an emulator)
    /// counts as the default, and nothing is taken above 10 MiB.
    pub fn from_kib(max_record_size_in_kib: Option<i32>) -> Self {
        let bytes = max_record_size_in_kib
            .and_then(|kib| usize::try_from(kib).ok())
            .map(|kib| kib.saturating_mul(1024))
            .filter(|b| *b >= MAX_RECORD_BYTES)
            .map_or(MAX_RECORD_BYTES, |b| b.min(LARGEST_RECORD_BYTES));
        StreamLimits { max_record_bytes: bytes }
    }

    /// The largest PutRecords request the stream takes.
    pub fn max_request_bytes(&self) -> usize {
        if self.max_record_bytes > MAX_RECORD_BYTES { 10 << 20 } else { 5 << 20 }
    }
}

/// A Kinesis sequence number: a decimal number of up to 128 digits, compared numerically.
///
/// Kinesis sequence numbers do not fit in a `u128`, so they are kept as text and compared by
/// length first (there are no leading zeros), then digit by digit.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SequenceNumber(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{shown}` is not a Kinesis sequence number (expected 1 to 128 decimal digits)")]
pub struct BadSequenceNumber {
    shown: String,
}

impl SequenceNumber {
    pub fn parse(text: &str) -> Result<Self, BadSequenceNumber> {
        let valid = !text.is_empty() && text.len() <= 128 && text.bytes().all(|b| b.is_ascii_digit());
        if !valid {
            let shown: String = text.chars().take(40).collect();
            return Err(BadSequenceNumber { shown });
        }
        let trimmed = text.trim_start_matches('0');
        let canonical = if trimmed.is_empty() { "0" } else { trimmed };
        Ok(SequenceNumber(canonical.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.len().cmp(&other.0.len()).then_with(|| self.0.cmp(&other.0))
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SequenceNumber({})", self.0)
    }
}

/// One record as read from the source: copied to destinations with the same partition key and data.
#[derive(Debug, Clone)]
pub struct SourceRecord {
    pub sequence_number: SequenceNumber,
    pub partition_key: String,
    pub data: Bytes,
    /// When Kinesis accepted the record into the source stream.
    pub arrival: Option<SystemTime>,
    /// The user records of a KPL aggregate, decoded once for every destination; `None` for a
    /// plain record (or a malformed aggregate, which travels as a plain record).
    pub user_records: Option<UserRecords>,
}

impl SourceRecord {
    /// Bytes the record costs against buffers and Kinesis limits (data plus partition key).
    pub fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }

    /// Bytes the record keeps in memory, its own fields and what they point to: what it costs
    /// against the process's memory budget (the data alone undercounts small records).
    pub fn footprint(&self) -> usize {
        let users = self.user_records.as_ref().map_or(0, |users| {
            users
                .iter()
                .map(|u| {
                    std::mem::size_of::<UserRecord>()
                        + u.partition_key.len()
                        + u.explicit_hash_key.as_ref().map_or(0, String::len)
                })
                .sum()
        });
        std::mem::size_of::<Self>() + self.sequence_number.as_str().len() + self.size() + users
    }
}

/// Which destination groups take each record of a chunk (bit `g` for group `g`), decided once
/// for every destination (a JSON record is parsed once): `records[i]` for source record `i` as a
/// whole, `users[i][j]` for user record `j` of its aggregate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// Which filters judged (`Filters::id`): a reload brings new ones.
    pub by: u64,
    pub records: Vec<u64>,
    pub users: Vec<Vec<u64>>,
}

/// Why Kinesis would refuse an entry as it stands (PutRecords validates every entry of a request
/// and refuses the whole request for one bad entry, so bad ones are caught before sending).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEntry {
    #[error("partition key has {chars} characters; Kinesis takes 1 to 256")]
    PartitionKeyLength { chars: usize },
    #[error("explicit hash key `{shown}` is not a decimal number below 2^128 without leading zeros")]
    ExplicitHashKey { shown: String },
    #[error("data and partition key take {bytes} bytes; the stream takes at most {limit} (MaxRecordSizeInKiB)")]
    TooLarge { bytes: usize, limit: usize },
    /// Kinesis refused the entry when it was sent alone.
    #[error("Kinesis refused it on its own ({code}): {message}")]
    Refused { code: String, message: String },
}

/// Kinesis's limits for one PutRecords entry: a partition key of 1 to 256 Unicode characters, an
/// explicit hash key that is a decimal below 2^128 (as Kinesis writes it: no leading zeros),
/// and at most 1 MiB of data plus partition key (a stream's default maximum).
pub fn validate_entry(
    partition_key: &str,
    explicit_hash_key: Option<&str>,
    data_len: usize,
) -> Result<(), InvalidEntry> {
    validate_entry_within(partition_key, explicit_hash_key, data_len, MAX_RECORD_BYTES)
}

/// As [`validate_entry`], for a stream that takes records of up to `max_record_bytes`.
pub fn validate_entry_within(
    partition_key: &str,
    explicit_hash_key: Option<&str>,
    data_len: usize,
    max_record_bytes: usize,
) -> Result<(), InvalidEntry> {
    let chars = partition_key.chars().count();
    if !(1..=256).contains(&chars) {
        return Err(InvalidEntry::PartitionKeyLength { chars });
    }
    if let Some(key) = explicit_hash_key {
        let canonical = key == "0" || (!key.starts_with('0') && key.bytes().all(|b| b.is_ascii_digit()));
        if !canonical || key.parse::<u128>().is_err() {
            return Err(InvalidEntry::ExplicitHashKey { shown: key.chars().take(48).collect() });
        }
    }
    let bytes = data_len + partition_key.len();
    if bytes > max_record_bytes {
        return Err(InvalidEntry::TooLarge { bytes, limit: max_record_bytes });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compares_numerically() {
        let a = SequenceNumber::parse("49590338271490256608559692538361571095921575989136588898").unwrap();
        let b = SequenceNumber::parse("49590338271490256608559692540925702759324208523137515618").unwrap();
        let small = SequenceNumber::parse("999").unwrap();
        assert!(a < b);
        assert!(small < a);
        assert_eq!(SequenceNumber::parse("007").unwrap(), SequenceNumber::parse("7").unwrap());
    }

    #[test]
    fn rejects_non_numbers() {
        for bad in ["", "12a", "-1", " 1", &"9".repeat(129)] {
            assert!(SequenceNumber::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn entries_are_checked_against_kinesis_limits() {
        assert!(validate_entry("k", None, 10).is_ok());
        assert!(validate_entry(&"é".repeat(256), Some("340282366920938463463374607431768211455"), 0).is_ok());
        assert_eq!(validate_entry("", None, 1), Err(InvalidEntry::PartitionKeyLength { chars: 0 }));
        assert_eq!(validate_entry(&"k".repeat(257), None, 1), Err(InvalidEntry::PartitionKeyLength { chars: 257 }));
        for bad in ["340282366920938463463374607431768211456", "01", "-1", "1e3", ""] {
            assert!(matches!(validate_entry("k", Some(bad), 1), Err(InvalidEntry::ExplicitHashKey { .. })), "{bad}");
        }
        assert!(validate_entry("k", Some("0"), 1).is_ok());
        assert_eq!(
            validate_entry("kk", None, (1 << 20) - 1),
            Err(InvalidEntry::TooLarge { bytes: (1 << 20) + 1, limit: 1 << 20 })
        );
        assert_eq!(validate_entry_within("kk", None, 6 << 20, 10 << 20), Ok(()));
        assert!(matches!(validate_entry_within("kk", None, 10 << 20, 10 << 20), Err(InvalidEntry::TooLarge { .. })));
        assert_eq!(StreamLimits::from_kib(None), StreamLimits::default());
        assert_eq!(StreamLimits::from_kib(Some(10240)).max_record_bytes, 10 << 20);
        assert_eq!(StreamLimits::from_kib(Some(10240)).max_request_bytes(), 10 << 20);
        assert_eq!(StreamLimits::from_kib(Some(99_999)).max_record_bytes, 10 << 20);
        assert_eq!(StreamLimits::from_kib(Some(-5)), StreamLimits::default());
        assert_eq!(StreamLimits::default().max_request_bytes(), 5 << 20);
    }

    proptest! {
        #[test]
        fn arbitrary_entries_never_panic(pk in ".{0,300}", ehk in proptest::option::of(".{0,45}"), len in 0usize..2_000_000) {
            let _ = validate_entry(&pk, ehk.as_deref(), len);
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,200}") {
            let _ = SequenceNumber::parse(&text);
        }

        #[test]
        fn order_matches_u128(a in any::<u128>(), b in any::<u128>()) {
            let sa = SequenceNumber::parse(&a.to_string()).unwrap();
            let sb = SequenceNumber::parse(&b.to_string()).unwrap();
            prop_assert_eq!(sa.cmp(&sb), a.cmp(&b));
        }
    }
}

/// One user record out of a KPL aggregate (decoded in [`crate::kpl`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Bytes,
}

/// User records decoded once at the source and shared by every destination.
pub type UserRecords = std::sync::Arc<[UserRecord]>;
