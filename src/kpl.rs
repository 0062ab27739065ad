//! The Kinesis Producer Library's aggregation format: many user records packed into one Kinesis
//! record as `F3 89 9A C2`, a protobuf `AggregatedRecord` (partition-key and explicit-hash-key
//! tables, then the records), and the MD5 of the protobuf.
//!
//! Decoding never panics: anything that has the magic bytes but not a valid body is reported as a
//! [`KplError`], and the caller copies it unchanged as a plain record (what the KCL does).

use bytes::Bytes;
use md5::{Digest, Md5};
use prost::Message;
use prost::encoding::encoded_len_varint;

/// The first four bytes of every aggregated record.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
const DIGEST_LEN: usize = 16;

/// The KPL's `AggregatedRecord` message (messages.proto).
#[derive(Clone, PartialEq, Message)]
pub struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<Record>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Record {
    #[prost(uint64, required, tag = "1")]
    pub partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "bytes", required, tag = "3")]
    pub data: Bytes,
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Tag {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

pub use crate::record::{UserRecord, UserRecords};

impl UserRecord {
    /// The 128-bit hash key that routes this record: its explicit hash key, else the MD5 of its
    /// partition key (as Kinesis does).
    pub fn hash_key(&self) -> u128 {
        self.explicit_hash_key
            .as_deref()
            .and_then(|k| k.parse::<u128>().ok())
            .unwrap_or_else(|| partition_key_hash(&self.partition_key))
    }
}

impl UserRecord {
    /// Whether Kinesis would take this record as an entry of its own.
    pub fn validate(&self) -> Result<(), crate::record::InvalidEntry> {
        self.validate_within(crate::record::MAX_RECORD_BYTES)
    }

    /// As [`Self::validate`], for a stream that takes records of up to `max_record_bytes`.
    pub fn validate_within(&self, max_record_bytes: usize) -> Result<(), crate::record::InvalidEntry> {
        crate::record::validate_entry_within(
            &self.partition_key,
            self.explicit_hash_key.as_deref(),
            self.data.len(),
            max_record_bytes,
        )
    }
}

/// MD5 of a partition key as a big-endian 128-bit number: the shard-routing hash of Kinesis.
pub fn partition_key_hash(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KplError {
    #[error("aggregated record is too short to hold a body and its MD5")]
    TooShort,
    #[error("aggregated record's MD5 does not match its body")]
    BadDigest,
    #[error("aggregated record's protobuf is malformed: {0}")]
    Malformed(String),
    #[error("aggregated record's user record {record} names a missing {table} entry {index}")]
    BadIndex { record: usize, table: &'static str, index: u64 },
}

/// Whether the data starts with the aggregation magic.
pub fn has_magic(data: &[u8]) -> bool {
    data.starts_with(&MAGIC)
}

/// The user records of an aggregated record; `Ok(None)` for a plain record.
pub fn decode(data: &Bytes) -> Result<Option<Vec<UserRecord>>, KplError> {
    if !has_magic(data) {
        return Ok(None);
    }
    if data.len() < MAGIC.len() + DIGEST_LEN {
        return Err(KplError::TooShort);
    }
    let body = data.slice(MAGIC.len()..data.len() - DIGEST_LEN);
    let digest = &data[data.len() - DIGEST_LEN..];
    if Md5::digest(&body).as_slice() != digest {
        return Err(KplError::BadDigest);
    }
    let message = AggregatedRecord::decode(body).map_err(|e| KplError::Malformed(e.to_string()))?;
    let mut out = Vec::with_capacity(message.records.len());
    for (i, record) in message.records.into_iter().enumerate() {
        let partition_key = message
            .partition_key_table
            .get(record.partition_key_index as usize)
            .ok_or(KplError::BadIndex { record: i, table: "partition key", index: record.partition_key_index })?
            .clone();
        let explicit_hash_key = match record.explicit_hash_key_index {
            None => None,
            Some(index) => Some(
                message
                    .explicit_hash_key_table
                    .get(index as usize)
                    .ok_or(KplError::BadIndex { record: i, table: "explicit hash key", index })?
                    .clone(),
            ),
        };
        out.push(UserRecord { partition_key, explicit_hash_key, data: record.data });
    }
    Ok(Some(out))
}

/// Largest aggregate this project writes: a Kinesis record is at most 1 MiB including its
/// partition key, which for an aggregate is one of its user records' keys (at most 256
/// characters, so up to 1,024 bytes of UTF-8).
pub const MAX_AGGREGATE_BYTES: usize = (1 << 20) - 1024;

/// Packs user records into aggregates of at most `max_bytes` (magic and digest included), in
/// order. A record too large to share an aggregate is returned on its own, unaggregated.
pub struct Aggregator {
    max_bytes: usize,
    current: AggregatedRecord,
    keys: std::collections::HashMap<String, u64>,
    hash_keys: std::collections::HashMap<String, u64>,
    size: usize,
}

/// One record the aggregator produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packed {
    /// An aggregate of `count` user records; its partition key is the first record's. Its key
    /// tables: every partition key and explicit hash key its records have, once each.
    Aggregate {
        partition_key: String,
        data: Bytes,
        count: usize,
        partition_keys: Vec<String>,
        explicit_hash_keys: Vec<String>,
    },
    /// A record too large to aggregate, to be sent as it is.
    Single(UserRecord),
}

const EMPTY_SIZE: usize = MAGIC.len() + DIGEST_LEN;

impl Aggregator {
    pub fn new(max_bytes: usize) -> Self {
        Aggregator {
            max_bytes,
            current: AggregatedRecord::default(),
            keys: Default::default(),
            hash_keys: Default::default(),
            size: EMPTY_SIZE,
        }
    }

    fn field_len(len: usize) -> usize {
        1 + encoded_len_varint(len as u64) + len
    }

    /// Bytes `record` adds to the current aggregate.
    fn added_size(&self, record: &UserRecord) -> usize {
        let mut added = 0;
        let pk_index = match self.keys.get(&record.partition_key) {
            Some(i) => *i,
            None => {
                added += Self::field_len(record.partition_key.len());
                self.keys.len() as u64
            }
        };
        let mut inner = 1 + encoded_len_varint(pk_index) + Self::field_len(record.data.len());
        if let Some(ehk) = &record.explicit_hash_key {
            let index = match self.hash_keys.get(ehk) {
                Some(i) => *i,
                None => {
                    added += Self::field_len(ehk.len());
                    self.hash_keys.len() as u64
                }
            };
            inner += 1 + encoded_len_varint(index);
        }
        added + Self::field_len(inner)
    }

    /// Size of an aggregate holding only `record`.
    fn alone_size(record: &UserRecord) -> usize {
        let mut inner = 2 + Self::field_len(record.data.len());
        let mut tables = Self::field_len(record.partition_key.len());
        if let Some(ehk) = &record.explicit_hash_key {
            inner += 2;
            tables += Self::field_len(ehk.len());
        }
        EMPTY_SIZE + tables + Self::field_len(inner)
    }

    /// Adds a record; returns what had to be finished to make room.
    pub fn add(&mut self, record: &UserRecord) -> Vec<Packed> {
        let mut out = Vec::new();
        if Self::alone_size(record) > self.max_bytes {
            out.extend(self.finish());
            out.push(Packed::Single(record.clone()));
            return out;
        }
        let mut added = self.added_size(record);
        if self.size + added > self.max_bytes {
            out.extend(self.finish());
            // Into an empty aggregate: its keys are new to the tables again.
            added = self.added_size(record);
        }
        self.size += added;
        let partition_key_index = *self.keys.entry(record.partition_key.clone()).or_insert_with(|| {
            self.current.partition_key_table.push(record.partition_key.clone());
            self.current.partition_key_table.len() as u64 - 1
        });
        let explicit_hash_key_index = record.explicit_hash_key.as_ref().map(|ehk| {
            *self.hash_keys.entry(ehk.clone()).or_insert_with(|| {
                self.current.explicit_hash_key_table.push(ehk.clone());
                self.current.explicit_hash_key_table.len() as u64 - 1
            })
        });
        self.current.records.push(Record {
            partition_key_index,
            explicit_hash_key_index,
            data: record.data.clone(),
            tags: Vec::new(),
        });
        out
    }

    /// The aggregate being built, if it holds anything; the aggregator starts over empty.
    pub fn finish(&mut self) -> Option<Packed> {
        if self.current.records.is_empty() {
            return None;
        }
        let message = std::mem::take(&mut self.current);
        self.keys.clear();
        self.hash_keys.clear();
        self.size = EMPTY_SIZE;
        let partition_key = message.partition_key_table[message.records[0].partition_key_index as usize].clone();
        let count = message.records.len();
        let data = encode(&message);
        let AggregatedRecord { partition_key_table, explicit_hash_key_table, .. } = message;
        Some(Packed::Aggregate {
            partition_key,
            data,
            count,
            partition_keys: partition_key_table,
            explicit_hash_keys: explicit_hash_key_table,
        })
    }
}

/// Magic, protobuf body, MD5 of the body.
pub fn encode(message: &AggregatedRecord) -> Bytes {
    let body = message.encode_to_vec();
    let mut out = Vec::with_capacity(EMPTY_SIZE + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&body);
    out.extend_from_slice(&Md5::digest(&body));
    Bytes::from(out)
}

/// Packs all `records` (in order) into aggregates of at most `max_bytes`.
pub fn aggregate(records: &[UserRecord], max_bytes: usize) -> Vec<Packed> {
    let mut aggregator = Aggregator::new(max_bytes);
    let mut out: Vec<Packed> = records.iter().flat_map(|r| aggregator.add(r)).collect();
    out.extend(aggregator.finish());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn user(pk: &str, ehk: Option<&str>, data: &[u8]) -> UserRecord {
        UserRecord {
            partition_key: pk.into(),
            explicit_hash_key: ehk.map(String::from),
            data: Bytes::copy_from_slice(data),
        }
    }

    fn unpack(packed: &[Packed]) -> Vec<UserRecord> {
        packed
            .iter()
            .flat_map(|p| match p {
                Packed::Aggregate { data, count, .. } => {
                    let records = decode(data).unwrap().unwrap();
                    assert_eq!(records.len(), *count);
                    records
                }
                Packed::Single(r) => vec![r.clone()],
            })
            .collect()
    }

    #[test]
    fn round_trip_and_corruption() {
        let records = vec![user("a", None, b"one"), user("b", Some("1234"), b"two"), user("a", None, b"three")];
        let packed = aggregate(&records, MAX_AGGREGATE_BYTES);
        assert_eq!(packed.len(), 1);
        assert_eq!(unpack(&packed), records);
        let Packed::Aggregate { data, .. } = &packed[0] else { panic!("aggregate") };
        let mut bad = data.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(decode(&Bytes::from(bad)), Err(KplError::BadDigest));
        assert_eq!(decode(&Bytes::from_static(b"plain")), Ok(None));
        assert_eq!(decode(&Bytes::copy_from_slice(&MAGIC)), Err(KplError::TooShort));
    }

    #[test]
    fn hash_keys_follow_kinesis() {
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(partition_key_hash("a"), 0x0cc175b9c0f1b6a831c399e269772661);
        assert_eq!(user("a", Some("42"), b"").hash_key(), 42);
    }

    #[test]
    fn oversized_records_stay_single() {
        let big = user("k", None, &vec![0u8; 2_000]);
        let packed = aggregate(&[user("k", None, b"x"), big.clone()], 1_000);
        assert!(matches!(packed.last(), Some(Packed::Single(r)) if *r == big));
    }

    proptest! {
        #[test]
        fn aggregate_then_deaggregate_is_identity(
            records in proptest::collection::vec(
                ("[a-z]{1,12}", proptest::option::of("[0-9]{1,38}"), proptest::collection::vec(any::<u8>(), 0..300)),
                1..80,
            ),
            max in 200usize..4_000,
        ) {
            let records: Vec<UserRecord> =
                records.iter().map(|(pk, ehk, data)| user(pk, ehk.as_deref(), data)).collect();
            let packed = aggregate(&records, max);
            for p in &packed {
                if let Packed::Aggregate { data, .. } = p {
                    prop_assert!(data.len() <= max, "aggregate of {} bytes over {max}", data.len());
                }
            }
            prop_assert_eq!(unpack(&packed), records);
        }

        #[test]
        fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut data = MAGIC.to_vec();
            data.extend_from_slice(&tail);
            let _ = decode(&Bytes::from(data));
            // With a valid digest, the protobuf parser sees the arbitrary bytes.
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&tail);
            framed.extend_from_slice(&Md5::digest(&tail));
            let _ = decode(&Bytes::from(framed));
        }
    }
}
