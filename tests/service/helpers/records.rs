//! Streams and records: creating streams, putting records in, reading them back and comparing.

use std::collections::BTreeSet;
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};

use super::streams::{OnReadError, read_stream};
use super::{Emulator, wait_until};

pub async fn create_stream(client: &Client, name: &str, shards: i32) {
    client.create_stream().stream_name(name).shard_count(shards).send().await.unwrap();
    wait_active(client, name).await;
}

/// A fresh emulator holding `streams` (name, shard count), and a client for it.
pub async fn with_streams(streams: &[(&str, i32)]) -> (Emulator, Client) {
    let emulator = Emulator::start().await;
    let client = emulator.client();
    for (name, shards) in streams {
        create_stream(&client, name, *shards).await;
    }
    (emulator, client)
}

/// Splits the first shard of `stream` in the middle of its hash range, waits until the stream
/// is ACTIVE again, and returns the parent's id.
pub async fn split_first_shard(client: &Client, stream: &str) -> String {
    let shards = client.list_shards().stream_name(stream).send().await.unwrap();
    let parent = shards.shards()[0].shard_id().to_string();
    client
        .split_shard()
        .stream_name(stream)
        .shard_to_split(&parent)
        .new_starting_hash_key((u128::MAX / 2).to_string())
        .send()
        .await
        .unwrap();
    wait_active(client, stream).await;
    parent
}

pub async fn wait_active(client: &Client, name: &str) {
    wait_until(&format!("stream {name} ACTIVE"), || async {
        let out = client.describe_stream_summary().stream_name(name).send().await;
        out.ok()
            .and_then(|o| o.stream_description_summary().map(|s| *s.stream_status() == StreamStatus::Active))
            .unwrap_or(false)
    })
    .await;
}

/// A test record: partition key and data.
pub type Rec = (String, Vec<u8>);

/// Puts records in order, 500 at a time, retrying failed entries until all are in.
pub async fn put_all(client: &Client, stream: &str, records: &[Rec]) {
    for batch in records.chunks(500) {
        let mut pending: Vec<&Rec> = batch.iter().collect();
        let mut attempts = 0;
        while !pending.is_empty() {
            attempts += 1;
            assert!(attempts < 200, "producer could not put records into {stream}");
            let entries = pending
                .iter()
                .map(|(pk, data)| {
                    PutRecordsRequestEntry::builder().partition_key(pk).data(Blob::new(data.clone())).build().unwrap()
                })
                .collect();
            // A failed request leaves every entry pending.
            if let Ok(out) = client.put_records().stream_name(stream).set_records(Some(entries)).send().await {
                pending = pending
                    .into_iter()
                    .zip(out.records())
                    .filter(|(_, r)| r.error_code().is_some())
                    .map(|(rec, _)| rec)
                    .collect();
            }
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Records of a stream, per shard, in shard order: (shard id, partition key, data).
pub async fn read_all(client: &Client, stream: &str) -> Vec<(String, String, Vec<u8>)> {
    let records = read_stream(client, stream, OnReadError::Fail).await.expect("the stream reads back");
    records.into_iter().map(|r| (r.shard, r.partition_key, r.data)).collect()
}

/// (partition key, data) pairs of a stream, sorted, for multiset comparison.
pub async fn contents(client: &Client, stream: &str) -> Vec<Rec> {
    let mut all: Vec<Rec> = read_all(client, stream).await.into_iter().map(|(_, pk, data)| (pk, data)).collect();
    all.sort();
    all
}

/// Whether every one of `streams` holds every record of `expected` (duplicates allowed).
pub async fn all_hold(client: &Client, streams: &[&str], expected: &[Rec]) -> bool {
    for stream in streams {
        let held: BTreeSet<Rec> = contents(client, stream).await.into_iter().collect();
        if !expected.iter().all(|r| held.contains(r)) {
            return false;
        }
    }
    true
}

/// How many records `stream` holds more than once.
pub async fn duplicates_in(client: &Client, stream: &str) -> usize {
    let held = contents(client, stream).await;
    let unique: BTreeSet<&Rec> = held.iter().collect();
    held.len() - unique.len()
}

/// How `stream`'s contents compare with `expected`: counts only, so a failure prints no payloads.
#[derive(Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Records of `expected` the stream does not hold.
    pub missing: usize,
    /// Copies beyond the first of records the stream holds.
    pub duplicates: usize,
    /// Records the stream holds that `expected` does not.
    pub foreign: usize,
}

pub async fn delivery(client: &Client, stream: &str, expected: &[Rec]) -> Delivery {
    let held = contents(client, stream).await;
    let unique: BTreeSet<&Rec> = held.iter().collect();
    let wanted: BTreeSet<&Rec> = expected.iter().collect();
    Delivery {
        missing: wanted.difference(&unique).count(),
        duplicates: held.len() - unique.len(),
        foreign: unique.difference(&wanted).count(),
    }
}

pub fn sorted(records: &[Rec]) -> Vec<Rec> {
    let mut v = records.to_vec();
    v.sort();
    v
}

/// `n` records with random partition keys and unique data, reproducible from `seed`.
pub fn records(seed: u64, n: usize, data_len: usize) -> Vec<Rec> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let pk = format!("pk-{:016x}", rng.random::<u64>());
            let mut data = format!("record-{seed}-{i}-").into_bytes();
            data.resize(data_len.max(data.len()), b'x');
            (pk, data)
        })
        .collect()
}

/// Splits `shard` of `stream` in the middle of its hash range and waits until the stream is
/// ACTIVE again.
pub async fn split_in_half(client: &Client, stream: &str, shard: &str) {
    let shards = client.list_shards().stream_name(stream).send().await.unwrap();
    let range = shards.shards().iter().find(|s| s.shard_id() == shard).unwrap().hash_key_range().unwrap().clone();
    let (start, end): (u128, u128) =
        (range.starting_hash_key().parse().unwrap(), range.ending_hash_key().parse().unwrap());
    client
        .split_shard()
        .stream_name(stream)
        .shard_to_split(shard)
        .new_starting_hash_key((start + (end - start) / 2).to_string())
        .send()
        .await
        .unwrap();
    wait_active(client, stream).await;
}

/// An emulator with AWS-like shard limits (1,000 records/s and 1 MiB/s written per shard, 5
/// GetRecords calls/s per shard) and events of at most 500 records.
pub async fn limited(streams: &[(&str, i32)]) -> (Emulator, Client) {
    let emulator = Emulator::with_options(ferrokinesis::store::StoreOptions {
        enforce_limits: true,
        subscribe_to_shard_event_record_limit: 500,
        ..super::store_options()
    })
    .await;
    emulator.faults.lock().unwrap().honour_starting_position = true;
    let client = emulator.client();
    for (name, shards) in streams {
        create_stream(&client, name, *shards).await;
    }
    (emulator, client)
}
