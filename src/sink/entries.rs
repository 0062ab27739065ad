//! What a destination actually writes for a chunk of source records, by KPL mode:
//! the records as they are (passthrough), every user record on its own (deaggregate), or user
//! records regrouped per destination shard into new aggregates routed into that shard
//! (reaggregate). Plain records pass through unchanged in every mode.

use std::collections::BTreeMap;
use std::sync::Arc;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bytes::Bytes;
use tokio::time::Instant;

use super::batch;

use crate::config::KplMode;
use crate::kpl::{Aggregator, MAX_AGGREGATE_BYTES, Packed};
use crate::progress::Chunk;

/// A destination's open shards as sorted, disjoint hash key ranges, with their shard ids when
/// known (PutRecords names the shard each record went to, so a stale map shows).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardMap {
    ranges: Vec<(u128, u128)>,
    ids: Vec<Arc<str>>,
}

impl ShardMap {
    pub fn new(mut ranges: Vec<(u128, u128)>) -> Self {
        ranges.sort();
        ShardMap { ranges, ids: Vec::new() }
    }

    /// From `(shard id, start, end)` of each open shard.
    pub fn with_ids(mut shards: Vec<(String, u128, u128)>) -> Self {
        shards.sort_by_key(|s| (s.1, s.2));
        let ids = shards.iter().map(|s| Arc::from(s.0.as_str())).collect();
        ShardMap { ranges: shards.into_iter().map(|s| (s.1, s.2)).collect(), ids }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn ranges(&self) -> &[(u128, u128)] {
        &self.ranges
    }

    /// The id of the shard at `index` into `ranges`, when known.
    pub fn id(&self, index: usize) -> Option<&Arc<str>> {
        self.ids.get(index)
    }

    /// The shard (index into `ranges`) whose range holds `hash`.
    pub fn shard_of(&self, hash: u128) -> Option<usize> {
        let index = self.ranges.partition_point(|(start, _)| *start <= hash).checked_sub(1)?;
        (hash <= self.ranges[index].1).then_some(index)
    }
}

/// One PutRecords entry, relative to the source record it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The source record as it is.
    Source,
    /// One user record (by index) of the source record's aggregate.
    User(u32),
    /// Bytes built here: a new aggregate (with what it was built for), or a user record too large
    /// to aggregate.
    Built { partition_key: String, explicit_hash_key: Option<String>, data: Bytes, aggregate: Option<Arc<Aggregate>> },
}

/// What an aggregate built here carries beside its bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Aggregate {
    /// The destination shard it was built for, when the map knows its id.
    pub shard: Option<Arc<str>>,
    /// Its user records' keys, as strict order compares them (`order::key_hash`): read when it
    /// is built, not decoded from it for every request.
    pub keys: Box<[u64]>,
}

/// Which records a destination takes: `take(record, None)` for a source record as a whole,
/// `take(record, Some(user))` for one user record of its aggregate.
pub type Take<'a> = &'a dyn Fn(u32, Option<u32>) -> bool;

/// Takes every record (a group without a filter).
pub fn every(_: u32, _: Option<u32>) -> bool {
    true
}

/// The entries to write for `chunk`: (index of the source record, payload), in order, and how
/// many records `take` refused (the destination's filter).
pub fn build(
    chunk: &Chunk,
    mode: KplMode,
    shards: &ShardMap,
    max_record_bytes: usize,
    take: Take<'_>,
) -> (Vec<(u32, Payload)>, u64) {
    let mut refused = 0u64;
    // An aggregate's partition key is one of its records' (up to 1,024 bytes of UTF-8).
    let max_aggregate =
        if max_record_bytes > crate::record::MAX_RECORD_BYTES { max_record_bytes - 1024 } else { MAX_AGGREGATE_BYTES };
    let mode = match mode {
        KplMode::Reaggregate if shards.is_empty() => KplMode::Deaggregate,
        other => other,
    };
    let mut out = Vec::with_capacity(chunk.records.len());
    // Per destination shard: the aggregator and the first source record it holds (for origins).
    let mut open: BTreeMap<usize, (Aggregator, u32)> = BTreeMap::new();
    let flush = |open: &mut BTreeMap<usize, (Aggregator, u32)>, out: &mut Vec<(u32, Payload)>| {
        for (shard, (mut aggregator, first)) in std::mem::take(open) {
            if let Some(packed) = aggregator.finish() {
                out.push((first, built(packed, shards, shard)));
            }
        }
    };
    for (index, record) in chunk.records.iter().enumerate() {
        let index = index as u32;
        let users = match (&record.user_records, mode) {
            (Some(users), KplMode::Deaggregate | KplMode::Reaggregate) => users,
            _ => {
                if !take(index, None) {
                    refused += 1;
                    continue;
                }
                // Keep plain records in order with the aggregates around them.
                flush(&mut open, &mut out);
                out.push((index, Payload::Source));
                continue;
            }
        };
        if mode == KplMode::Deaggregate {
            for i in 0..users.len() as u32 {
                if take(index, Some(i)) {
                    out.push((index, Payload::User(i)));
                } else {
                    refused += 1;
                }
            }
            continue;
        }
        for (i, user) in users.iter().enumerate() {
            if !take(index, Some(i as u32)) {
                refused += 1;
                continue;
            }
            if user.validate_within(max_record_bytes).is_err() {
                // Never inside an aggregate: it could lend the aggregate an invalid partition key,
                // and a consumer would get a record Kinesis itself refuses. Alone, it is refused
                // (dead-lettered or held) on its own, after the aggregates open so far: they may
                // hold older records of its key, which must not queue behind it.
                flush(&mut open, &mut out);
                out.push((index, Payload::User(i as u32)));
                continue;
            }
            let shard = shards.shard_of(user.hash_key()).unwrap_or(0);
            let (aggregator, _) = open.entry(shard).or_insert_with(|| (Aggregator::new(max_aggregate), index));
            for packed in aggregator.add(user) {
                out.push((index, built(packed, shards, shard)));
            }
        }
    }
    flush(&mut open, &mut out);
    (out, refused)
}

/// An aggregate is routed into its shard with an explicit hash key inside the shard's range.
fn built(packed: Packed, shards: &ShardMap, shard: usize) -> Payload {
    match packed {
        Packed::Aggregate { partition_key, data, partition_keys, explicit_hash_keys, .. } => {
            let keys = partition_keys
                .iter()
                .map(|key| super::order::key_hash(super::order::PARTITION_KEY, key))
                .chain(
                    explicit_hash_keys.iter().map(|key| super::order::key_hash(super::order::EXPLICIT_HASH_KEY, key)),
                )
                .collect();
            Payload::Built {
                partition_key,
                explicit_hash_key: shards.ranges().get(shard).map(|(start, _)| start.to_string()),
                data,
                aggregate: Some(Arc::new(Aggregate { shard: shards.id(shard).cloned(), keys })),
            }
        }
        Packed::Single(user) => Payload::Built {
            partition_key: user.partition_key,
            explicit_hash_key: user.explicit_hash_key,
            data: user.data,
            aggregate: None,
        },
    }
}

pub use crate::fanout::QUEUED_ENTRY_BYTES;

/// One PutRecords entry waiting to be written; what it costs in memory beside the record it
/// points to is the fan-out's [`QUEUED_ENTRY_BYTES`] (a test keeps the two equal).
pub struct Pending {
    pub chunk: Arc<Chunk>,
    /// The source record it comes from (for origins in dead letters).
    pub index: u32,
    pub payload: Payload,
    pub queued_at: Instant,
    /// Sent before and failed: send again without lingering.
    pub retry: bool,
    /// Why Kinesis would refuse this entry: it is never sent, but refused on its own.
    pub invalid: Option<crate::record::InvalidEntry>,
    /// Already counted as `rejected` (held for want of a dead-letter stream): count it once.
    pub held: bool,
}

impl Pending {
    /// An entry to write, checked here against Kinesis's limits for a stream that takes records
    /// of up to `max_record_bytes`.
    pub fn new(chunk: Arc<Chunk>, index: u32, payload: Payload, queued_at: Instant, max_record_bytes: usize) -> Self {
        let mut pending = Pending { chunk, index, payload, queued_at, retry: false, invalid: None, held: false };
        pending.check(max_record_bytes);
        pending
    }

    /// Checks the entry again against the stream's record size (it changed): returns whether it
    /// is now too large. Only the size is checked again: other problems do not change with it.
    pub fn check(&mut self, max_record_bytes: usize) -> bool {
        if matches!(self.invalid, None | Some(crate::record::InvalidEntry::TooLarge { .. })) {
            self.invalid = crate::record::validate_entry_within(
                self.partition_key(),
                self.explicit_hash_key(),
                self.data().len(),
                max_record_bytes,
            )
            .err();
        }
        self.too_large()
    }

    pub fn too_large(&self) -> bool {
        matches!(self.invalid, Some(crate::record::InvalidEntry::TooLarge { .. }))
    }

    pub fn source(&self) -> &crate::record::SourceRecord {
        &self.chunk.records[self.index as usize]
    }

    pub fn user(&self, i: u32) -> &crate::kpl::UserRecord {
        &self.source().user_records.as_ref().expect("user entries come from aggregates")[i as usize]
    }

    pub fn partition_key(&self) -> &str {
        match &self.payload {
            Payload::Source => &self.source().partition_key,
            Payload::User(i) => &self.user(*i).partition_key,
            Payload::Built { partition_key, .. } => partition_key,
        }
    }

    pub fn explicit_hash_key(&self) -> Option<&str> {
        match &self.payload {
            Payload::Source => None,
            Payload::User(i) => self.user(*i).explicit_hash_key.as_deref(),
            Payload::Built { explicit_hash_key, .. } => explicit_hash_key.as_deref(),
        }
    }

    pub fn data(&self) -> &bytes::Bytes {
        match &self.payload {
            Payload::Source => &self.source().data,
            Payload::User(i) => &self.user(*i).data,
            Payload::Built { data, .. } => data,
        }
    }

    /// Bytes against Kinesis limits and buffers.
    pub fn size(&self) -> usize {
        self.data().len() + self.partition_key().len()
    }

    pub fn encoded_size(&self) -> usize {
        let keys = self.partition_key().len() + self.explicit_hash_key().map_or(0, str::len);
        batch::encoded_size(keys, self.data().len())
    }

    pub fn entry(&self) -> PutRecordsRequestEntry {
        PutRecordsRequestEntry::builder()
            .data(Blob::new(self.data().to_vec()))
            .partition_key(self.partition_key())
            .set_explicit_hash_key(self.explicit_hash_key().map(str::to_string))
            .build()
            .expect("data and partition key are set")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_queued_entry_costs_what_the_fan_out_counts_for_it() {
        assert_eq!(std::mem::size_of::<Pending>(), QUEUED_ENTRY_BYTES, "update fanout::QUEUED_ENTRY_BYTES");
    }

    use super::*;
    use crate::kpl::{UserRecord, decode, partition_key_hash};
    use crate::progress::Progress;
    use crate::record::{SequenceNumber, SourceRecord};

    fn chunk(records: Vec<SourceRecord>) -> std::sync::Arc<Chunk> {
        let progress = Progress::default();
        let shard = progress.shard("s");
        progress.begin(&shard, records, vec!["d".into()])
    }

    fn source(seq: u64, users: Option<Vec<UserRecord>>) -> SourceRecord {
        SourceRecord {
            sequence_number: SequenceNumber::parse(&seq.to_string()).unwrap(),
            partition_key: "a".into(),
            data: Bytes::from_static(b"outer"),
            arrival: None,
            user_records: users.map(Into::into),
        }
    }

    fn users(n: usize) -> Vec<UserRecord> {
        (0..n)
            .map(|i| UserRecord {
                partition_key: format!("key-{i}"),
                explicit_hash_key: None,
                data: Bytes::from(format!("data-{i}")),
            })
            .collect()
    }

    #[test]
    fn a_user_record_refused_alone_queues_after_the_older_records_of_its_key() {
        let small = |data: &[u8]| UserRecord {
            partition_key: "x".into(),
            explicit_hash_key: None,
            data: Bytes::copy_from_slice(data),
        };
        // x1 fits, x2 is over the destination's maximum: x1's aggregate goes first.
        let c = chunk(vec![source(1, Some(vec![small(b"x1"), small(&[0; 2_000])]))]);
        let entries = build(&c, KplMode::Reaggregate, &four_shards(), 1_024, &every).0;
        assert!(matches!(entries[0].1, Payload::Built { aggregate: Some(_), .. }), "{entries:?}");
        assert_eq!(entries[1], (0, Payload::User(1)));
    }

    fn four_shards() -> ShardMap {
        let quarter = u128::MAX / 4 + 1;
        ShardMap::new(
            (0..4u128).map(|i| (i * quarter, if i == 3 { u128::MAX } else { (i + 1) * quarter - 1 })).collect(),
        )
    }

    #[test]
    fn shard_lookup_covers_the_hash_space() {
        let map = four_shards();
        assert_eq!(map.shard_of(0), Some(0));
        assert_eq!(map.shard_of(u128::MAX), Some(3));
        assert_eq!(map.shard_of(u128::MAX / 4 + 1), Some(1));
        assert_eq!(ShardMap::new(vec![(10, 20)]).shard_of(5), None);
    }

    #[test]
    fn modes_build_the_expected_entries() {
        let c = chunk(vec![source(1, Some(users(40))), source(2, None)]);
        let pass = build(&c, KplMode::Passthrough, &four_shards(), crate::record::MAX_RECORD_BYTES, &every).0;
        assert_eq!(pass, vec![(0, Payload::Source), (1, Payload::Source)]);
        let deagg = build(&c, KplMode::Deaggregate, &four_shards(), crate::record::MAX_RECORD_BYTES, &every).0;
        assert_eq!(deagg.len(), 41);
        assert_eq!(deagg[40], (1, Payload::Source), "plain records pass through");

        let map = four_shards();
        let reagg = build(&c, KplMode::Reaggregate, &map, crate::record::MAX_RECORD_BYTES, &every).0;
        assert!(reagg.len() <= 5, "at most one aggregate per shard plus the plain record");
        let mut seen = 0;
        for (_, payload) in &reagg {
            let Payload::Built { explicit_hash_key: Some(ehk), data, .. } = payload else { continue };
            let shard = map.shard_of(ehk.parse().unwrap()).unwrap();
            for user in decode(data).unwrap().unwrap() {
                assert_eq!(map.shard_of(partition_key_hash(&user.partition_key)), Some(shard));
                seen += 1;
            }
        }
        assert_eq!(seen, 40, "every user record is in exactly one aggregate");
        assert_eq!(reagg.last(), Some(&(1, Payload::Source)));
    }
}
