//! What flows through the service: records read from a source shard, identified by their
//! sequence numbers.

use std::cmp::Ordering;
use std::fmt;
use std::time::SystemTime;

use bytes::Bytes;

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
    pub user_records: Option<crate::kpl::UserRecords>,
}

impl SourceRecord {
    /// Bytes the record costs against buffers and Kinesis limits (data plus partition key).
    pub fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
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

    proptest! {
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
