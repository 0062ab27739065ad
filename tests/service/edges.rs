//! The at-least-once promise where state is created or handed over: starting points, bad records,
//! graceful stops under backpressure, resharding while running, lease handover.

use crate::helpers::cluster::*;
use crate::helpers::*;

/// A service with either checkpoint backend.
enum Instance {
    Alone(Running),
    Leased(Worker),
}

impl Instance {
    fn start(toml: &str, url: &str) -> Instance {
        if toml.contains("backend = \"dynamodb\"") {
            Instance::Leased(Worker::start("w1", toml, url))
        } else {
            Instance::Alone(Running::start(toml, url))
        }
    }

    /// Waits until `shards` shards are being read and each has had a subscription event.
    async fn wait_reading(&self, shards: usize) {
        let health = match self {
            Instance::Alone(r) => &r.health,
            Instance::Leased(w) => &w.health,
        };
        wait_until(&format!("{shards} shard(s) read, each with an event"), || async {
            let open = health.reading_spans().iter().filter(|s| s.stopped.is_none()).count();
            open == shards && health.readiness().is_ok()
        })
        .await;
    }

    async fn stop(self) {
        match self {
            Instance::Alone(r) => r.stop().await.unwrap(),
            Instance::Leased(w) => w.stop().await.unwrap(),
        }
    }
}

fn starting_at_latest(config: TestConfig) -> String {
    config.set("source", "initial_position", "latest").toml()
}

/// Starts at LATEST on a shard with history, stops gracefully once reading, writes, starts again:
/// everything written after the first start is copied, nothing from before it.
async fn latest_survives_a_restart(emulator: &Emulator, toml: &str) {
    let client = emulator.client();
    let history = records(1100, 50, 32);
    put_all(&client, "in", &history).await;

    let first = Instance::start(toml, &emulator.url);
    first.wait_reading(1).await;
    first.stop().await;

    let later = records(1101, 200, 32);
    put_all(&client, "in", &later).await;
    let second = Instance::start(toml, &emulator.url);
    wait_until("out-1 holds every record written after the first start", || async {
        all_hold(&client, &["out-1"], &later).await
    })
    .await;
    second.stop().await;
    assert_eq!(contents(&client, "out-1").await, sorted(&later), "nothing from before the first start, nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_started_at_latest_copies_everything_written_after_the_first_start() {
    let (emulator, _client) = with_streams(&[("in", 1), ("out-1", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = starting_at_latest(TestConfig::new(&emulator.url).checkpoint_file(&checkpoint));
    latest_survives_a_restart(&emulator, &toml).await;
    let saved = std::fs::read_to_string(&checkpoint).unwrap();
    assert!(saved.contains("shardId-000000000000"), "{saved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_started_at_latest_copies_everything_written_after_the_first_start_with_the_lease_table() {
    let (emulator, _client) = with_streams(&[("in", 1), ("out-1", 1)]).await;
    let dynamo = Dynamo::start().await;
    let toml = starting_at_latest(worker_config(&emulator, &dynamo, "w1"));
    latest_survives_a_restart(&emulator, &toml).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_under_backpressure_flushes_what_was_queued_and_duplicates_nothing() {
    let emulator =
        Emulator::with_options(ferrokinesis::store::StoreOptions { enforce_limits: true, ..store_options() }).await;
    let client = emulator.client();
    create_stream(&client, "in", 4).await;
    // Budgets are taken by name: the wide destination's first, so a reader paused on the narrow
    // one has already queued the chunk for the wide one.
    create_stream(&client, "out-a-wide", 4).await;
    create_stream(&client, "out-b-narrow", 1).await;
    let (_dir, checkpoint) = temp_checkpoint();
    // Kinesis (the emulator's shard limits) throttles the narrow destination, not our limiter.
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .group("records_per_second", "20000")
        .group("max_in_flight_bytes", "1MiB")
        .set("shutdown", "grace_period", "60s")
        .toml();
    let input = records(1300, 15_000, 100);
    put_all(&client, "in", &input).await;

    let first = Running::start(&toml, &emulator.url);
    // Paused: the narrow destination's budget is full and it writes at its shard's pace.
    first.wait_accepted("out-b-narrow", 1_500).await;
    let progress = std::sync::Arc::clone(&first.progress);
    first.stop().await.unwrap();
    assert_eq!(
        progress.outstanding(),
        0,
        "the drain ended because everything queued was written, not by the grace period"
    );

    let second = Running::start(&toml, &emulator.url);
    wait_until("every destination holds every record", || async {
        all_hold(&client, &["out-a-wide", "out-b-narrow"], &input).await
    })
    .await;
    second.stop().await.unwrap();
    for name in ["out-a-wide", "out-b-narrow"] {
        assert_eq!(duplicates_in(&client, name).await, 0, "{name}: a graceful stop duplicates nothing");
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_respect_kinesis_limits_and_oversized_ones_go_unwrapped() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-denied", 1), ("dlq", 1)]).await;
    emulator.faults.lock().unwrap().deny_puts_to = Some("out-denied".into());
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).group("dead_letter_stream", "dlq").toml();
    // Ten envelopes of about 800 KB (too many for one 5 MiB request), two records whose
    // envelopes would pass 1 MiB, and small ones.
    let mut input = records(1400, 10, 600_000);
    input.extend(records(1401, 2, 900_000));
    input.extend(records(1402, 50, 100));
    let service = Running::start(&toml, &emulator.url);
    for record in &input {
        put_all(&client, "in", std::slice::from_ref(record)).await;
    }
    wait_until("every record dead-lettered", || async { service.counter("out-denied", "dead_lettered") >= 62 }).await;
    wait_until("nothing held back", || async { service.progress.outstanding() == 0 }).await;
    let unwrapped = service.metrics.dead_letters_unwrapped.with_label_values(&["out-denied"]).get();
    service.stop().await.unwrap();

    assert_eq!(unwrapped, 2, "the two records over ~780 KB travel unwrapped");
    let letters = read_all(&client, "dlq").await;
    assert_eq!(letters.len(), 62);
    let mut recovered: Vec<Rec> = letters
        .into_iter()
        .map(|(_, pk, body)| match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(e) => {
                let data =
                    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, e["data"].as_str().unwrap());
                (e["partition_key"].as_str().unwrap().to_string(), data.unwrap())
            }
            Err(_) => {
                assert!(pk.starts_with("shardId-000000000000/"), "an unwrapped letter is keyed by its origin: {pk}");
                let original = input.iter().find(|(_, d)| *d == body).expect("unchanged bytes");
                (original.0.clone(), body)
            }
        })
        .collect();
    recovered.sort();
    assert_eq!(recovered, sorted(&input), "every rejected record reached the dead-letter stream");
}

/// Partition keys that Kinesis routes into the upper half of the hash space.
fn upper_half_keys(n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("upper-{i}"))
        .filter(|k| kinesis_fanout::kpl::partition_key_hash(k) > u128::MAX / 2 + (u128::MAX / 8))
        .take(n)
        .collect()
}

async fn split_in_half(client: &aws_sdk_kinesis::Client, stream: &str, shard: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_latest_a_split_while_running_reads_children_only_after_their_parent() {
    let (emulator, client) = with_streams(&[("in", 2), ("out-1", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = starting_at_latest(TestConfig::new(&emulator.url).checkpoint_file(&checkpoint));
    let service = Running::start(&toml, &emulator.url);
    wait_until("both shards read", || async {
        service.health.reading_spans().iter().filter(|s| s.stopped.is_none()).count() == 2
            && service.health.readiness().is_ok()
    })
    .await;

    // Shard 1 holds records its destination refuses for now, so it cannot reach its end.
    emulator.faults.lock().unwrap().deny_puts_to = Some("out-1".into());
    let keys = upper_half_keys(10);
    let before: Vec<Rec> = keys.iter().map(|k| (k.clone(), format!("{k}:before").into_bytes())).collect();
    put_all(&client, "in", &before).await;
    wait_until("shard 1's records read", || async { service.health.records() >= 10 }).await;
    split_in_half(&client, "in", "shardId-000000000000").await;
    split_in_half(&client, "in", "shardId-000000000001").await;
    let shards = client.list_shards().stream_name("in").send().await.unwrap();
    let children_of = |parent: &str| -> Vec<String> {
        shards
            .shards()
            .iter()
            .filter(|s| s.parent_shard_id() == Some(parent))
            .map(|s| s.shard_id().to_string())
            .collect()
    };
    let (children_0, children_1) = (children_of("shardId-000000000000"), children_of("shardId-000000000001"));
    // Shard 0 ended (it held nothing): its children are read, in the same planning round that
    // would wrongly start shard 1's children.
    wait_until("shard 0's children read", || async {
        let spans = service.health.reading_spans();
        children_0.iter().all(|c| spans.iter().any(|s| &s.shard == c && s.stopped.is_none()))
            && service.health.readiness().is_ok()
    })
    .await;
    let spans = service.health.reading_spans();
    let early: Vec<&String> = children_1.iter().filter(|c| spans.iter().any(|s| &s.shard == *c)).collect();
    assert!(early.is_empty(), "children of shard 1 started while it was still being read: {early:?}");

    let after: Vec<Rec> = keys.iter().map(|k| (k.clone(), format!("{k}:after").into_bytes())).collect();
    put_all(&client, "in", &after).await;
    emulator.faults.lock().unwrap().deny_puts_to = None;
    let mut all = before.clone();
    all.extend(after);
    wait_until("every record copied", || async { all_hold(&client, &["out-1"], &all).await }).await;
    service.stop().await.unwrap();
    let per_key = crate::resharding::per_key(&client, "out-1").await;
    for key in &keys {
        let data: Vec<String> = per_key[key].iter().map(|d| String::from_utf8(d.clone()).unwrap()).collect();
        assert_eq!(data, vec![format!("{key}:before"), format!("{key}:after")], "order per key across the split");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_missing_from_one_list_streams_answer_is_kept_while_it_exists() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-a", 1), ("out-b", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let service = Running::start(&TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).toml(), &emulator.url);
    let first = records(1500, 100, 32);
    put_all(&client, "in", &first).await;
    service.wait_accepted("out-b", 100).await;

    emulator.faults.lock().unwrap().hide_from_list_streams = Some("out-b".into());
    let listed = emulator.calls("ListStreams");
    wait_until("two discovery rounds without out-b", || async { emulator.calls("ListStreams") >= listed + 2 }).await;
    assert_eq!(service.metrics.destinations.get(), 2, "out-b still exists, so it is still a destination");
    let second = records(1501, 100, 32);
    put_all(&client, "in", &second).await;
    service.wait_accepted("out-b", 200).await;
    service.stop().await.unwrap();
    let mut all = first;
    all.extend(second);
    assert_eq!(contents(&client, "out-b").await, sorted(&all));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_takes_no_lease() {
    let (emulator, client) = with_streams(&[("in", 4), ("out-a", 1)]).await;
    let dynamo = Dynamo::start().await;
    let w1 = Worker::start("w1", &worker_config(&emulator, &dynamo, "w1").toml(), &emulator.url);
    let w2 = Worker::start("w2", &worker_config(&emulator, &dynamo, "w2").toml(), &emulator.url);
    wait_until("two leases each", || async {
        let owned = owners(&dynamo.leases("leases").await);
        owned.get("w1") == Some(&2) && owned.get("w2") == Some(&2)
    })
    .await;
    // Records nobody can deliver: w1's drain lasts its whole grace period.
    emulator.faults.lock().unwrap().deny_puts_to = Some("out-a".into());
    put_all(&client, "in", &records(1600, 200, 32)).await;
    wait_until("both workers read records", || async { w1.records_read() > 0 && w2.records_read() > 0 }).await;

    // w2 dies; its leases expire while w1 drains.
    w2.kill().await;
    let stopping = tokio::spawn(w1.stop());
    let mut most = 0;
    while !stopping.is_finished() {
        let owned = owners(&dynamo.leases("leases").await);
        most = most.max(owned.get("w1").copied().unwrap_or(0));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stopping.await.unwrap().unwrap();
    assert_eq!(most, 2, "a draining worker renews what it holds and takes nothing more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_paused_by_backpressure_stays_ready() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-1", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).group("max_in_flight_bytes", "1MiB").toml();
    let service = Running::start(&toml, &emulator.url);
    wait_until("ready", || async { service.get("/readyz").await.0 == 200 }).await;
    // Throttled, not broken: ordinary backpressure, for longer than a subscription may be silent.
    emulator.faults.lock().unwrap().throttle_puts_to = Some("out-1".into());
    let input = records(1700, 15_000, 100);
    put_all(&client, "in", &input).await;
    wait_until("the reader waits for buffer space", || async {
        service.metrics.buffered_bytes.with_label_values(&["out-1"]).get() > 900_000
    })
    .await;
    let until =
        tokio::time::Instant::now() + kinesis_fanout::health::SUBSCRIPTION_STALE + std::time::Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let (status, body) = service.get("/readyz").await;
        assert_eq!(status, 200, "backpressure is not a failure: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    emulator.faults.lock().unwrap().throttle_puts_to = None;
    service.wait_accepted("out-1", input.len() as u64).await;
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_record_is_counted_rejected_once() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-denied", 1)]).await;
    emulator.faults.lock().unwrap().deny_puts_to = Some("out-denied".into());
    let (_dir, checkpoint) = temp_checkpoint();
    let service = Running::start(&TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).toml(), &emulator.url);
    put_all(&client, "in", &records(1800, 100, 16)).await;
    wait_until("held", || async { service.counter("out-denied", "rejected") >= 100 }).await;
    let puts = emulator.calls("PutRecords");
    wait_until("three more attempts", || async { emulator.calls("PutRecords") >= puts + 3 }).await;
    assert_eq!(service.counter("out-denied", "rejected"), 100, "each held record counts once, not once per attempt");
    service.stop().await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_from_before_a_lease_was_lost_and_taken_again_moves_nothing() {
    use kinesis_fanout::lease::{LeaseManager, Position};
    use kinesis_fanout::progress::{CheckpointStore, Checkpoints};
    use kinesis_fanout::record::SequenceNumber;
    use kinesis_fanout::source::shards::ShardInfo;
    let dynamo = Dynamo::start().await;
    let table = dynamo.table("handover");
    table.ensure(true).await.unwrap();
    let shards = vec![ShardInfo { id: "shard-0".into(), parents: vec![], closed: false, hash_range: None }];
    let (me, _events, _) = LeaseManager::new(dynamo.table("handover"), "me".into(), std::time::Duration::from_secs(3));
    me.sync(&shards, &kinesis_fanout::position::Position::TrimHorizon).await.unwrap();
    me.round().await;
    assert_eq!(me.held().await, vec!["shard-0".to_string()]);

    // The checkpoint loop takes a snapshot of this reading...
    let seq = |n: &str| SequenceNumber::parse(n).unwrap();
    let as_of = tokio::time::Instant::now();
    let mut snapshot = Checkpoints::new();
    snapshot.insert("shard-0".into(), Position::Sequence(seq("100")));
    // ...meanwhile the lease goes to another worker, which moves the checkpoint on and gives
    // the lease back, and this worker takes it again (a new reading, from 200).
    let lease = table.scan().await.unwrap().remove(0);
    let counter = table.take("shard-0", lease.counter, "other").await.unwrap();
    let counter = table.checkpoint("shard-0", counter, "other", &Position::Sequence(seq("200")), &[]).await.unwrap();
    table.release("shard-0", counter, "other").await.unwrap();
    me.round().await;
    me.round().await;
    assert_eq!(me.held().await, vec!["shard-0".to_string()], "taken again");

    // The old snapshot arrives late: it belongs to the earlier reading and moves nothing back.
    me.save(&snapshot, as_of).await.unwrap();
    let stored = table.scan().await.unwrap().remove(0);
    assert_eq!(stored.checkpoint, Position::Sequence(seq("200")), "the checkpoint never moves backwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_loses_a_lease_stops_sending_its_queued_records() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-1", 1)]).await;
    let dynamo = Dynamo::start().await;
    // A slow destination: most of what is read waits in the queue.
    let toml = worker_config(&emulator, &dynamo, "w1").group("records_per_second", "200").toml();
    let w1 = Worker::start("w1", &toml, &emulator.url);
    wait_until("w1 holds the lease", || async { owners(&dynamo.leases("leases").await).get("w1") == Some(&1) }).await;
    let input = records(2000, 20_000, 64);
    put_all(&client, "in", &input).await;
    let buffered = || w1.metrics.buffered_records.with_label_values(&["out-1"]).get();
    wait_until("a queue of records", || async { buffered() > 5_000 }).await;

    // Another worker takes the lease and keeps it.
    let table = dynamo.table("leases");
    let lease = table.scan().await.unwrap().remove(0);
    let mut counter = table.take("shardId-000000000000", lease.counter, "intruder").await.unwrap();
    let started = tokio::time::Instant::now();
    while buffered() > 0 {
        assert!(started.elapsed() < WAIT, "w1 still holds {} records of a shard it no longer owns", buffered());
        counter = table.renew("shardId-000000000000", counter, "intruder").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let sent = w1.accepted("out-1");
    let dropped = w1.metrics.records_written.with_label_values(&["out-1", "lease_lost"]).get();
    for _ in 0..5 {
        counter = table.renew("shardId-000000000000", counter, "intruder").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(w1.accepted("out-1"), sent, "nothing more is sent for the lost shard");
    assert!(
        dropped > 0 && sent < input.len() as u64,
        "the queue was dropped, not written: sent {sent}, dropped {dropped}"
    );
    w1.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_lease_is_deleted_once_its_children_started_and_never_read_again() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-1", 1)]).await;
    let dynamo = Dynamo::start().await;
    let toml = worker_config(&emulator, &dynamo, "w1").toml();
    let worker = Worker::start("w1", &toml, &emulator.url);
    let before = records(2100, 200, 32);
    put_all(&client, "in", &before).await;
    wait_until("the parent copied", || async { all_hold(&client, &["out-1"], &before).await }).await;
    split_in_half(&client, "in", "shardId-000000000000").await;
    let after = records(2101, 400, 32);
    put_all(&client, "in", &after).await;
    wait_until("the parent's lease is gone once both children have checkpoints", || async {
        let leases = dynamo.leases("leases").await;
        let children_started = leases
            .iter()
            .filter(|l| l.parents.contains(&"shardId-000000000000".to_string()))
            .filter(|l| matches!(l.checkpoint, kinesis_fanout::lease::Position::Sequence(_)))
            .count();
        !leases.iter().any(|l| l.key == "shardId-000000000000") && children_started == 2
    })
    .await;
    worker.stop().await.unwrap();

    // A restart lists the parent again (it is within retention): it must not get a new lease
    // and be read from its beginning.
    let worker = Worker::start("w1", &toml, &emulator.url);
    let more = records(2102, 100, 32);
    put_all(&client, "in", &more).await;
    let mut all = before.clone();
    all.extend(after);
    all.extend(more);
    wait_until("every record copied", || async { all_hold(&client, &["out-1"], &all).await }).await;
    let leases = dynamo.leases("leases").await;
    worker.stop().await.unwrap();
    assert!(!leases.iter().any(|l| l.key == "shardId-000000000000"), "the finished lease was not created again");
    assert_eq!(duplicates_in(&client, "out-1").await, 0, "the parent was not read again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_started_at_a_timestamp_keeps_its_place_across_a_restart() {
    let emulator = Emulator::start().await;
    emulator.faults.lock().unwrap().honour_starting_position = true;
    let client = emulator.client();
    create_stream(&client, "in", 1).await;
    create_stream(&client, "out-1", 1).await;
    let history = records(2200, 30, 32);
    put_all(&client, "in", &history).await;
    // Arrival times have whole-second resolution here: start two seconds after the history.
    let at = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .set("source", "initial_position", "at_timestamp")
        .set("source", "initial_timestamp", &humantime::format_rfc3339_seconds(at).to_string())
        .toml();
    wait_until("the start time has passed", || async { std::time::SystemTime::now() > at }).await;
    let first = Instance::start(&toml, &emulator.url);
    first.wait_reading(1).await;
    wait_until("the starting point is stored", || async {
        std::fs::read_to_string(&checkpoint).is_ok_and(|t| t.contains("AT_SEQUENCE_NUMBER:"))
    })
    .await;
    first.stop().await;

    let later = records(2201, 100, 32);
    put_all(&client, "in", &later).await;
    let second = Instance::start(&toml, &emulator.url);
    wait_until("out-1 holds what was written after the start", || async {
        all_hold(&client, &["out-1"], &later).await
    })
    .await;
    second.stop().await;
    assert_eq!(contents(&client, "out-1").await, sorted(&later), "nothing from before the timestamp, nothing twice");
}
