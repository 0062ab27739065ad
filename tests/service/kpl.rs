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
    let (emulator, client) = with_streams(&[("in", 2), ("out-kpl", 4)]).await;
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

/// An aggregate whose user records include `bad` among valid ones.
fn aggregate_with(bad: &[kinesis_fanout::kpl::UserRecord], valid: usize) -> (Vec<u8>, Vec<Rec>) {
    use kinesis_fanout::kpl::{self, Packed, UserRecord};
    let mut users: Vec<UserRecord> = (0..valid)
        .map(|i| UserRecord {
            partition_key: format!("user-{i}"),
            explicit_hash_key: None,
            data: bytes::Bytes::from(format!("valid-{i}")),
        })
        .collect();
    let expected = users.iter().map(|u| (u.partition_key.clone(), u.data.to_vec())).collect();
    for (i, b) in bad.iter().enumerate() {
        users.insert(3 + 5 * i, b.clone());
    }
    let packed = kpl::aggregate(&users, 1 << 19);
    let [Packed::Aggregate { data, .. }] = &packed[..] else { panic!("one aggregate: {packed:?}") };
    (data.to_vec(), expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_invalid_user_record_is_dead_lettered_alone_and_the_rest_arrive() {
    use kinesis_fanout::kpl::UserRecord;
    let (emulator, client) = with_streams(&[("in", 1), ("out-kpl", 1), ("dlq", 1)]).await;
    let bad = |pk: String, ehk: Option<&str>, data: &str| UserRecord {
        partition_key: pk,
        explicit_hash_key: ehk.map(String::from),
        data: bytes::Bytes::from(data.to_string()),
    };
    let invalid = [
        // Refused by the service's own check: too long, empty, a hash key of 2^128.
        bad("k".repeat(300), None, "bad-long-key"),
        bad(String::new(), None, "bad-empty-key"),
        bad("fine".into(), Some("340282366920938463463374607431768211456"), "bad-hash-key"),
        // 100 characters are fine for Kinesis, but the emulator counts 300 bytes: only the
        // request tells, and splitting it must find this one record.
        bad("€".repeat(100), None, "bad-for-the-emulator"),
    ];
    let (aggregate, expected) = aggregate_with(&invalid, 40);
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .group("kpl", "deaggregate")
        .group("dead_letter_stream", "dlq")
        .toml();
    let service = Running::start(&toml, &emulator.url);
    put_all(&client, "in", &[("a".to_string(), aggregate)]).await;
    wait_until("every valid user record arrived", || async { all_hold(&client, &["out-kpl"], &expected).await }).await;
    wait_until("the invalid ones were dead-lettered", || async { service.counter("out-kpl", "dead_lettered") >= 4 })
        .await;
    wait_until("nothing held back", || async { service.progress.outstanding() == 0 }).await;
    service.stop().await.unwrap();

    assert_eq!(contents(&client, "out-kpl").await, sorted(&expected), "valid records arrive once, invalid ones never");
    let letters = read_all(&client, "dlq").await;
    let mut dead: Vec<String> = letters
        .iter()
        .map(|(_, _, body)| {
            let e: serde_json::Value = serde_json::from_slice(body).unwrap();
            let data = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, e["data"].as_str().unwrap());
            String::from_utf8(data.unwrap()).unwrap()
        })
        .collect();
    dead.sort();
    assert_eq!(dead, vec!["bad-empty-key", "bad-for-the-emulator", "bad-hash-key", "bad-long-key"]);
}

/// User records of a stream with the shard each is on: (shard, partition key, data).
async fn user_records_in(client: &aws_sdk_kinesis::Client, stream: &str) -> Vec<(String, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (shard, pk, data) in read_all(client, stream).await {
        match kinesis_fanout::kpl::decode(&bytes::Bytes::from(data.clone())) {
            Ok(Some(users)) => out.extend(users.into_iter().map(|u| (shard.clone(), u.partition_key, u.data.to_vec()))),
            _ => out.push((shard, pk, data)),
        }
    }
    out
}

/// An aggregate of 60 user records with random keys; returns it and its user records.
fn wave(seed: u64) -> (Rec, Vec<Rec>) {
    use kinesis_fanout::kpl::{self, Packed, UserRecord};
    let users: Vec<UserRecord> = records(seed, 60, 16)
        .into_iter()
        .map(|(pk, data)| UserRecord { partition_key: pk, explicit_hash_key: None, data: data.into() })
        .collect();
    let packed = kpl::aggregate(&users, 1 << 19);
    let [Packed::Aggregate { data, .. }] = &packed[..] else { panic!("one aggregate") };
    (("a".to_string(), data.to_vec()), users.iter().map(|u| (u.partition_key.clone(), u.data.to_vec())).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaggregation_follows_a_reshard_that_keeps_the_shard_count() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-kpl", 2)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    // Discovery rounds are far apart: only the PutRecords answers can tell the map is stale.
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .group("kpl", "reaggregate")
        .group("refresh_interval", "1h")
        .toml();
    let service = Running::start(&toml, &emulator.url);
    let arrived = |users: Vec<Rec>| {
        let client = client.clone();
        async move {
            let held: std::collections::BTreeSet<Rec> =
                user_records_in(&client, "out-kpl").await.into_iter().map(|(_, pk, d)| (pk, d)).collect();
            users.iter().all(|u| held.contains(u))
        }
    };
    let (first, first_users) = wave(1900);
    put_all(&client, "in", &[first]).await;
    wait_until("the first wave arrived", || arrived(first_users.clone())).await;

    // Split shard 0 and merge its upper half into shard 1: still two shards, other ranges.
    split_in_half(&client, "out-kpl", "shardId-000000000000").await;
    let listed = client.list_shards().stream_name("out-kpl").send().await.unwrap();
    let upper_child = listed
        .shards()
        .iter()
        .filter(|s| s.parent_shard_id() == Some("shardId-000000000000"))
        .max_by_key(|s| s.hash_key_range().unwrap().starting_hash_key().parse::<u128>().unwrap())
        .unwrap()
        .shard_id()
        .to_string();
    client
        .merge_shards()
        .stream_name("out-kpl")
        .shard_to_merge(&upper_child)
        .adjacent_shard_to_merge("shardId-000000000001")
        .send()
        .await
        .unwrap();
    wait_active(&client, "out-kpl").await;

    for seed in [1901, 1902] {
        let (aggregate, users) = wave(seed);
        put_all(&client, "in", &[aggregate]).await;
        wait_until("the wave arrived", || arrived(users.clone())).await;
    }
    let misrouted = service.metrics.misrouted_records.with_label_values(&["out-kpl"]).get();
    let (last, last_users) = wave(1903);
    put_all(&client, "in", &[last]).await;
    wait_until("the last wave arrived", || arrived(last_users.clone())).await;
    service.stop().await.unwrap();

    assert!(misrouted > 0, "the stale map showed in PutRecords' answers");
    let ranges: std::collections::BTreeMap<String, (u128, u128)> = client
        .list_shards()
        .stream_name("out-kpl")
        .send()
        .await
        .unwrap()
        .shards()
        .iter()
        .map(|s| {
            let r = s.hash_key_range().unwrap();
            (s.shard_id().to_string(), (r.starting_hash_key().parse().unwrap(), r.ending_hash_key().parse().unwrap()))
        })
        .collect();
    let last_keys: std::collections::BTreeSet<&String> = last_users.iter().map(|(pk, _)| pk).collect();
    for (shard, pk, _) in user_records_in(&client, "out-kpl").await.iter().filter(|(_, pk, _)| last_keys.contains(pk)) {
        let hash = kinesis_fanout::kpl::partition_key_hash(pk);
        let (start, end) = ranges[shard];
        assert!(start <= hash && hash <= end, "after the map was rebuilt, {pk} is on {shard}, outside its range");
    }
}
