//! How many queued records go into the next PutRecords request.
//!
//! Sizes are measured on the encoded request (the data travels base64-encoded in JSON), so a
//! batch never crosses the service's 5 MiB request limit whatever the wire protocol.

/// PutRecords accepts at most this many records per request.
pub const MAX_BATCH_RECORDS: usize = 500;
/// PutRecords accepts at most this many bytes per request.
pub const MAX_BATCH_BYTES: usize = 5 << 20;
pub use crate::record::MAX_RECORD_BYTES;

/// Per-record overhead of the JSON envelope (field names, quotes, commas).
const ENTRY_OVERHEAD: usize = 48;

/// Encoded size of one entry with `partition_key_len` key bytes and `data_len` data bytes.
pub fn encoded_size(partition_key_len: usize, data_len: usize) -> usize {
    4 * data_len.div_ceil(3) + partition_key_len + ENTRY_OVERHEAD
}

/// Limits of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_records: usize,
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits { max_records: MAX_BATCH_RECORDS, max_bytes: MAX_BATCH_BYTES }
    }
}

/// How many of the leading entries (given by their encoded sizes) fit in one request.
/// Always at least one when there is any entry, so an oversized record still reaches Kinesis and
/// gets a per-record error back instead of blocking the queue.
pub fn fits(sizes: impl IntoIterator<Item = usize>, limits: BatchLimits) -> usize {
    let mut count = 0;
    let mut bytes = 0usize;
    for size in sizes {
        if count == limits.max_records || (count > 0 && bytes + size > limits.max_bytes) {
            break;
        }
        count += 1;
        bytes += size;
    }
    count
}

/// Whether the entries already fill a request, so there is no point waiting for more.
pub fn is_full(records: usize, encoded_bytes: usize, limits: BatchLimits) -> bool {
    records >= limits.max_records || encoded_bytes + encoded_size(0, MAX_RECORD_BYTES) > limits.max_bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stops_at_record_and_byte_limits() {
        let limits = BatchLimits::default();
        assert_eq!(fits(std::iter::repeat_n(100, 800), limits), 500);
        let big = encoded_size(10, MAX_RECORD_BYTES);
        assert_eq!(fits(std::iter::repeat_n(big, 10), limits), 3);
        assert_eq!(fits(std::iter::empty(), limits), 0);
        assert_eq!(fits([MAX_BATCH_BYTES * 2], limits), 1);
    }

    proptest! {
        #[test]
        fn batches_respect_limits(sizes in proptest::collection::vec(1usize..=encoded_size(256, MAX_RECORD_BYTES), 0..1200)) {
            let limits = BatchLimits::default();
            let mut rest = &sizes[..];
            while !rest.is_empty() {
                let n = fits(rest.iter().copied(), limits);
                prop_assert!(n >= 1);
                prop_assert!(n <= MAX_BATCH_RECORDS);
                let bytes: usize = rest[..n].iter().sum();
                prop_assert!(bytes <= MAX_BATCH_BYTES);
                // Maximal: the next entry would not have fitted.
                if n < rest.len() && n < MAX_BATCH_RECORDS {
                    prop_assert!(bytes + rest[n] > MAX_BATCH_BYTES);
                }
                rest = &rest[n..];
            }
        }
    }
}
