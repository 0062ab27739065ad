//! How many queued records go into the next PutRecords request.
//!
//! Sizes are measured on the encoded request (the data travels base64-encoded in JSON), so a
//! batch never crosses the stream's request limit (5 MiB, or 10 MiB on a stream that takes
//! records over 1 MiB) whatever the wire protocol.

/// PutRecords accepts at most this many records per request.
pub const MAX_BATCH_RECORDS: usize = 500;
/// PutRecords accepts at most this many bytes per request (on a stream of 1 MiB records).
pub const MAX_BATCH_BYTES: usize = 5 << 20;
pub use crate::record::MAX_RECORD_BYTES;
use crate::record::StreamLimits;

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
    /// The stream's largest record (data plus partition key).
    pub max_record_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits::for_stream(StreamLimits::default())
    }
}

impl BatchLimits {
    /// The requests a stream with these limits takes.
    pub fn for_stream(limits: StreamLimits) -> Self {
        BatchLimits {
            max_records: MAX_BATCH_RECORDS,
            max_bytes: limits.max_request_bytes(),
            max_record_bytes: limits.max_record_bytes,
        }
    }
}

/// How many of the leading entries (given by their encoded sizes) fit in one request.
/// Always at least one when there is any entry, so an oversized record still reaches Kinesis and
/// gets a per-record error back instead of blocking the queue.
pub fn fits(sizes: impl IntoIterator<Item = usize>, limits: BatchLimits) -> usize {
    fits_sent(sizes.into_iter().map(Some), limits)
}

/// As [`fits`], for entries of which some are not sent (`None`: refused here on their own, as a
/// record Kinesis would refuse): they take no room in the request, so however many of them lead
/// the queue, the records behind them still go.
pub fn fits_sent(entries: impl IntoIterator<Item = Option<usize>>, limits: BatchLimits) -> usize {
    let (mut count, mut sent, mut bytes) = (0, 0, 0usize);
    for size in entries {
        let Some(size) = size else {
            count += 1;
            continue;
        };
        if sent == limits.max_records || (sent > 0 && bytes + size > limits.max_bytes) {
            break;
        }
        count += 1;
        sent += 1;
        bytes += size;
    }
    count
}

/// Whether the entries already fill a request, so there is no point waiting for more.
pub fn is_full(records: usize, encoded_bytes: usize, limits: BatchLimits) -> bool {
    // Room for one more record of the usual largest size (1 MiB): on a stream that takes larger
    // ones, those are rare, and a batch does not stop lingering for them.
    let usual = limits.max_record_bytes.min(MAX_RECORD_BYTES);
    records >= limits.max_records || encoded_bytes + encoded_size(0, usual) > limits.max_bytes
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
        let large = BatchLimits::for_stream(StreamLimits::from_kib(Some(10240)));
        assert_eq!(large.max_bytes, 10 << 20);
        assert_eq!(fits(std::iter::repeat_n(big, 10), large), 7);
        assert!(!is_full(1, encoded_size(1, 6 << 20), large), "room for a usual record beside a 6 MiB one");
        assert!(is_full(2, encoded_size(1, 6 << 20) + encoded_size(1, 3 << 20), large));
    }

    #[test]
    fn entries_not_sent_take_no_room() {
        let limits = BatchLimits::default();
        // 600 refused here, then 800 to send: all 600 and 500 of the others.
        let entries = std::iter::repeat_n(None, 600).chain(std::iter::repeat_n(Some(100), 800));
        assert_eq!(fits_sent(entries, limits), 1_100);
        assert_eq!(fits_sent([None, None], limits), 2);
        assert_eq!(fits_sent([Some(MAX_BATCH_BYTES), None, Some(10)], limits), 2);
    }

    proptest! {
        #[test]
        fn batches_respect_limits(
            max_record_kib in prop::sample::select(vec![1024, 4096, 10240]),
            sizes in proptest::collection::vec(1usize..=encoded_size(256, MAX_RECORD_BYTES), 0..1200),
            large in proptest::collection::vec((0usize..1200, 1usize..=10 << 20), 0..4),
        ) {
            let limits = BatchLimits::for_stream(StreamLimits::from_kib(Some(max_record_kib)));
            let mut sizes = sizes;
            for (at, data) in large {
                sizes.insert(at.min(sizes.len()), encoded_size(1, data));
            }
            let mut rest = &sizes[..];
            while !rest.is_empty() {
                let n = fits(rest.iter().copied(), limits);
                prop_assert!(n >= 1);
                prop_assert!(n <= MAX_BATCH_RECORDS);
                let bytes: usize = rest[..n].iter().sum();
                // Over the request limit only as one record alone (refused on its own if too large).
                prop_assert!(bytes <= limits.max_bytes || n == 1);
                // Maximal: the next entry would not have fitted.
                if n < rest.len() && n < MAX_BATCH_RECORDS {
                    prop_assert!(bytes + rest[n] > limits.max_bytes);
                }
                rest = &rest[n..];
            }
        }
    }
}
