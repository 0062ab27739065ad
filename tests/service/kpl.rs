//! KPL aggregates through the whole service, in each mode, into a 4-shard destination.

use std::collections::BTreeMap;

use bytes::Bytes;
use kinesis_fanout::kpl::{self, Packed, UserRecord};

use crate::helpers::*;

/// Hash ranges of a stream's shards, by shard id.
async fn ranges(client: &aws_sdk_kinesis::Client, stream: &str) -> BTreeMap<String, (u128, u128)> {
    let out = client.list_shards().stream_name(stream).send().await.unwrap();
    out.shards()
        .iter()
        .map(|s| {
            let r = s.hash_key_range().unwrap();
            (s.shard_id().to_string(), (r.starting_hash_key().parse().unwrap(), r.ending_hash_key().parse().unwrap()))
        })
        .collect()
}

struct Input {
    /// What the source holds, KPL-style: aggregates under the outer key "a", plain records, and
    /// one corrupt aggregate.
    source: Vec<Rec>,
    /// Every user record (and plain record) that must arrive: (partition key, data).
    expected: Vec<Rec>,
    corrupt: Vec<u8>,
    /// Explicit hash keys of the user records that have one (records read back do not show it).
    hash_keys: BTreeMap<String, String>,
}

fn input() -> Input {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    let users: Vec<UserRecord> = (0..600)
        .map(|i| UserRecord {
            partition_key: format!("user-{}", rng.random::<u32>()),
            explicit_hash_key: (i % 5 == 0).then(|| rng.random::<u128>().to_string()),
            data: Bytes::from(format!("user-record-{i}")),
        })
        .collect();
    let mut source = Vec::new();
    let mut expected = Vec::new();
    for batch in users.chunks(50) {
        for packed in kpl::aggregate(batch, 4_000) {
            let Packed::Aggregate { data, .. } = packed else { panic!("small records aggregate") };
            source.push(("a".to_string(), data.to_vec()));
        }
        expected.extend(batch.iter().map(|u| (u.partition_key.clone(), u.data.to_vec())));
        let plain = (format!("plain-{}", source.len()), b"not aggregated".to_vec());
        source.push(plain.clone());
        expected.push(plain);
    }
    let mut corrupt = kpl::MAGIC.to_vec();
    corrupt.extend_from_slice(b"this is not a protobuf, and no md5 either");
    source.push(("a".to_string(), corrupt.clone()));
    expected.push(("a".to_string(), corrupt.clone()));
    let hash_keys =
        users.iter().filter_map(|u| Some((u.partition_key.clone(), u.explicit_hash_key.clone()?))).collect();
    Input { source, expected, corrupt, hash_keys }
}

/// Runs the service in `mode` and returns the destination's records: (shard, partition key,
/// explicit hash key of user records if any, data), with aggregates opened up.
async fn run_mode(
    mode: &str,
) -> (Vec<(String, String, Option<String>, Vec<u8>)>, Input, u64, BTreeMap<String, (u128, u128)>) {
    let emulator = Emulator::start().await;
    let client = emulator.client();
    create_stream(&client, "in", 2).await;
    create_stream(&client, "out-kpl", 4).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).group("kpl", mode).toml();
    let service = Running::start(&toml, &emulator.url);
    let input = input();
    put_all(&client, "in", &input.source).await;
    let total = input.source.len() as u64;
    wait_until("every source record copied", || async {
        let read: u64 = ["shardId-000000000000", "shardId-000000000001"]
            .iter()
            .map(|s| service.metrics.records_read.with_label_values(&[s]).get())
            .sum();
        read == total && service.progress.outstanding() == 0
    })
    .await;
    let malformed: u64 = ["shardId-000000000000", "shardId-000000000001"]
        .iter()
        .map(|s| service.metrics.kpl_malformed_records.with_label_values(&[s]).get())
        .sum();
    service.stop().await.unwrap();
    let mut found = Vec::new();
    for (shard, pk, data) in read_all(&client, "out-kpl").await {
        match kpl::decode(&Bytes::from(data.clone())) {
            Ok(Some(users)) => found.extend(
                users.into_iter().map(|u| (shard.clone(), u.partition_key, u.explicit_hash_key, u.data.to_vec())),
            ),
            _ => found.push((shard, pk, None, data)),
        }
    }
    (found, input, malformed, ranges(&client, "out-kpl").await)
}

fn assert_every_record_once(mode: &str, found: &[(String, String, Option<String>, Vec<u8>)], input: &Input) {
    let mut got: Vec<Rec> = found.iter().map(|(_, pk, _, data)| (pk.clone(), data.clone())).collect();
    got.sort();
    assert_eq!(got, sorted(&input.expected), "{mode}: every user record arrives once");
}

fn assert_routed(
    mode: &str,
    found: &[(String, String, Option<String>, Vec<u8>)],
    input: &Input,
    shards: &BTreeMap<String, (u128, u128)>,
) {
    for (shard, pk, ehk, _) in found {
        let ehk = ehk.as_ref().or_else(|| input.hash_keys.get(pk));
        let hash = ehk.and_then(|h| h.parse().ok()).unwrap_or_else(|| kpl::partition_key_hash(pk));
        let (start, end) = shards[shard];
        assert!(start <= hash && hash <= end, "{mode}: record with key {pk} is on {shard}, outside its hash range");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deaggregate_writes_each_user_record_on_its_own_shard() {
    let (found, input, malformed, shards) = run_mode("deaggregate").await;
    assert_every_record_once("deaggregate", &found, &input);
    assert_routed("deaggregate", &found, &input, &shards);
    assert_eq!(malformed, 1, "the corrupt aggregate is counted");
    assert!(found.iter().any(|(_, _, _, d)| *d == input.corrupt), "and delivered unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaggregate_packs_user_records_per_destination_shard() {
    let (found, input, malformed, shards) = run_mode("reaggregate").await;
    assert_every_record_once("reaggregate", &found, &input);
    assert_routed("reaggregate", &found, &input, &shards);
    assert_eq!(malformed, 1);
    assert!(found.iter().any(|(_, _, _, d)| *d == input.corrupt));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_copies_aggregates_unchanged() {
    let (found, input, malformed, _) = run_mode("passthrough").await;
    assert_every_record_once("passthrough", &found, &input);
    assert_eq!(malformed, 1);
}
