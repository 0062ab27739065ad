//! Reading a whole stream back, shard by shard from TRIM_HORIZON, for the service tests, the
//! benchmark and the demo: each checks what a destination holds with it. One copy, included by
//! each (`#[path]`).

// Each includer uses a part.
#![allow(dead_code)]

use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::types::ShardIteratorType;

/// One record of a stream, with the shard it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    pub shard: String,
    pub partition_key: String,
    pub data: Vec<u8>,
}

/// What a reader does when a GetRecords call fails.
#[derive(Debug, Clone, Copy)]
pub enum OnReadError {
    /// The error is the answer (emulators without read limits fail only when something is wrong).
    Fail,
    /// Wait this long and ask again (an emulator that keeps Kinesis' five reads a second per shard).
    Retry(Duration),
}

/// Every record of `stream`, shard by shard in the order ListShards gives, each shard's in order.
pub async fn read_stream(
    client: &Client,
    stream: &str,
    on_error: OnReadError,
) -> Result<Vec<StreamRecord>, aws_sdk_kinesis::Error> {
    let shards = client.list_shards().stream_name(stream).send().await?;
    let mut out = Vec::new();
    for shard in shards.shards() {
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard.shard_id())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await?
            .shard_iterator
            .unwrap_or_default();
        loop {
            let page = match client.get_records().shard_iterator(&iterator).limit(10_000).send().await {
                Ok(page) => page,
                Err(error) => match on_error {
                    OnReadError::Fail => return Err(error.into()),
                    OnReadError::Retry(pause) => {
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                },
            };
            for record in page.records() {
                out.push(StreamRecord {
                    shard: shard.shard_id().to_string(),
                    partition_key: record.partition_key().unwrap_or_default().to_string(),
                    data: record.data().as_ref().to_vec(),
                });
            }
            // An empty page ends the shard, unless the answer says there is more behind it.
            let more = !page.records().is_empty() || page.millis_behind_latest().is_some_and(|ms| ms > 0);
            match page.next_shard_iterator() {
                Some(next) if more => iterator = next.to_string(),
                _ => break,
            }
        }
    }
    Ok(out)
}

/// How many records of `landed` arrived after a newer record of their partition key, the order
/// of `source` per key being the truth (records told apart by their data); a record seen again
/// (a duplicate) is not counted twice.
pub fn out_of_order(landed: &[StreamRecord], source: &[StreamRecord]) -> usize {
    use std::collections::{HashMap, HashSet};
    let mut rank: HashMap<&[u8], usize> = HashMap::new();
    let mut per_key: HashMap<&str, usize> = HashMap::new();
    for record in source {
        let n = per_key.entry(&record.partition_key).or_default();
        rank.insert(&record.data, *n);
        *n += 1;
    }
    let mut newest: HashMap<&str, usize> = HashMap::new();
    let mut seen: HashSet<&[u8]> = HashSet::new();
    let mut late = 0;
    for record in landed {
        let Some(&r) = rank.get(record.data.as_slice()) else { continue };
        if !seen.insert(&record.data) {
            continue;
        }
        match newest.get(record.partition_key.as_str()) {
            Some(&n) if r < n => late += 1,
            _ => {
                newest.insert(&record.partition_key, r);
            }
        }
    }
    late
}
