//! Order per key under throttling (issue 28): in strict mode a throttled record is retried
//! before anything newer of its key goes out; in batched mode a retried record can land after a
//! newer one of its key that succeeded in the same request, and the test reports how often.

use crate::helpers::streams::{OnReadError, StreamRecord, out_of_order, read_stream};
use crate::helpers::*;

/// Reads a stream whole, waiting out the emulator's five reads a second per shard.
async fn read(client: &aws_sdk_kinesis::Client, stream: &str) -> Vec<crate::helpers::streams::StreamRecord> {
    let retry = OnReadError::Retry(std::time::Duration::from_millis(250));
    read_stream(client, stream, retry).await.expect("the stream reads back")
}

/// `n` records over `keys` keys, of mixed sizes (30 B to 8 KB), each unique.
fn mixed(n: usize, keys: usize) -> Vec<Rec> {
    (0..n)
        .map(|i| {
            let key = format!("key-{}", (i * 7919) % keys);
            // Mostly small, one in four large (a shard's bytes run out before its 1,000 records):
            // its byte budget refuses a large record while small ones of its key behind it in
            // the same request still fit.
            let size = [30, 30, 30, 8_000][(i * 31 + i / 7) % 4];
            let mut data = format!("{key}:{i}:").into_bytes();
            data.resize(size.max(data.len()), b'.');
            (key, data)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_ordering_keeps_every_key_in_order_under_throttling_and_batched_says_how_often_it_does_not() {
    let streams = [("in", 4), ("strict-1", 1), ("strict-3", 3), ("batched-1", 1), ("batched-3", 3)];
    let (emulator, client) = limited(&streams).await;
    let (_dir, checkpoint) = temp_checkpoint();
    // Rates far above what a shard takes: every destination is throttled by the emulator.
    let config = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).groups([
        Group::fast("^strict-")
            .set("ordering", "strict")
            .set("records_per_second", "20000")
            .set("bytes_per_second", "64MiB"),
        Group::fast("^batched-").set("records_per_second", "20000").set("bytes_per_second", "64MiB"),
    ]);
    // `check --explain` says each group's ordering.
    let settings = kinesis_fanout::Settings::from_toml(&config.toml()).unwrap();
    let report = kinesis_fanout::operate::check::report(&settings, &sdk_config(&emulator.url)).await.unwrap();
    let text = report.render(&settings, true);
    assert!(text.contains("group 0 ordering: one record per key in flight (strict)"), "{text}");
    assert!(text.contains("group 1 ordering: requests as full as they fit (batched)"), "{text}");
    let service = Running::start(&config.toml(), &emulator.url);
    let records = mixed(6_000, 400);
    put_all(&client, "in", &records).await;
    let source = read(&client, "in").await;
    for (destination, _) in &streams[1..] {
        service.wait_accepted(destination, records.len() as u64).await;
    }
    for (destination, _) in &streams[1..] {
        let landed = read(&client, destination).await;
        let d = delivery(&client, destination, &records).await;
        assert_eq!((d.missing, d.foreign), (0, 0), "{destination}: nothing lost");
        let late = out_of_order(&landed, &source);
        let throttled = service.counter(destination, "throttled");
        println!(
            "{destination}: {late} of {} records landed after a newer one of their key ({throttled} throttled)",
            records.len()
        );
        assert!(throttled > 0, "{destination} was throttled: the test puts order under pressure");
        if destination.starts_with("strict-") {
            assert_eq!(late, 0, "{destination}: strict order per key under throttling");
        }
    }
    service.stop().await.unwrap();
}

/// Records read back, the user records of each KPL aggregate in its place.
fn users(records: Vec<StreamRecord>) -> Vec<StreamRecord> {
    let mut out = Vec::new();
    for record in records {
        match kinesis_fanout::kpl::decode(&bytes::Bytes::from(record.data.clone())) {
            Ok(Some(users)) => out.extend(users.into_iter().map(|u| StreamRecord {
                shard: record.shard.clone(),
                partition_key: u.partition_key,
                data: u.data.to_vec(),
            })),
            _ => out.push(record),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_ordering_holds_with_reaggregation_and_with_dead_letters_under_throttling() {
    use kinesis_fanout::kpl::{self, Packed, UserRecord};
    let streams = [("in", 4), ("agg-2", 2), ("refusing-1", 1), ("letters", 1)];
    let (emulator, client) = limited(&streams).await;
    // One user record in 40 is refused on its own by the refusing destination (as a record
    // encrypted with a key it may not use): dead-lettered, it releases its key.
    emulator.faults.lock().unwrap().refuse_records = Some(("refusing-1".into(), b"refused:".to_vec()));
    let (_dir, checkpoint) = temp_checkpoint();
    let strict = |group: Group| {
        group.set("ordering", "strict").set("records_per_second", "20000").set("bytes_per_second", "64MiB")
    };
    let config = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).groups([
        strict(Group::fast("^agg-")).set("kpl", "reaggregate"),
        strict(Group::fast("^refusing-")).set("kpl", "deaggregate").set("dead_letter_stream", "letters"),
    ]);
    let service = Running::start(&config.toml(), &emulator.url);
    // KPL aggregates of 8 user records each, of mixed sizes over 400 keys; as the KPL makes
    // them, each of records whose keys hash into one source shard, so that every key's records
    // are read in the order they were put.
    let mut records = mixed(4_000, 400);
    let mut refused = Vec::new();
    for (i, (_, data)) in records.iter_mut().enumerate() {
        if i % 40 == 7 {
            data.splice(0..0, b"refused:".iter().copied());
            refused.push(data.clone());
        }
    }
    let ranges: Vec<(u128, u128)> =
        crate::resharding::open_shards(&client, "in").await.into_iter().map(|(_, start, end)| (start, end)).collect();
    let shard_of = |key: &str| {
        let hash = kpl::partition_key_hash(key);
        ranges.iter().position(|(start, end)| (*start..=*end).contains(&hash)).unwrap()
    };
    let by_shard: Vec<Vec<Rec>> =
        (0..ranges.len()).map(|i| records.iter().filter(|(key, _)| shard_of(key) == i).cloned().collect()).collect();
    let aggregates: Vec<Rec> = by_shard
        .iter()
        .flat_map(|records| records.chunks(8))
        .flat_map(|batch| {
            let batch: Vec<UserRecord> = batch
                .iter()
                .map(|(key, data)| UserRecord {
                    partition_key: key.clone(),
                    explicit_hash_key: None,
                    data: bytes::Bytes::from(data.clone()),
                })
                .collect();
            let key = batch[0].partition_key.clone();
            kpl::aggregate(&batch, 1 << 20).into_iter().map(move |packed| match packed {
                Packed::Aggregate { data, .. } => (key.clone(), data.to_vec()),
                Packed::Single(_) => panic!("8 records fit one aggregate"),
            })
        })
        .collect();
    // 50 aggregates (about 800 KB) a request: under the emulator's request body limit.
    for slice in aggregates.chunks(50) {
        put_all(&client, "in", slice).await;
    }
    let source = users(read(&client, "in").await);
    assert_eq!(source.len(), records.len());
    let kept = records.len() - refused.len();
    wait_until("every user record written or dead-lettered", || async {
        service.counter("refusing-1", "ok") >= kept as u64
            && service.counter("refusing-1", "dead_lettered") >= refused.len() as u64
    })
    .await;
    wait_until("every aggregate written", || async { service.progress.outstanding() == 0 }).await;

    // Re-aggregated: an aggregate counts as one record of every key it holds.
    let stored = read(&client, "agg-2").await;
    let written = stored.len();
    let landed = users(stored);
    let mut found: Vec<Rec> = landed.iter().map(|r| (r.partition_key.clone(), r.data.clone())).collect();
    found.sort();
    assert_eq!(found, sorted(&records), "agg-2: every user record once ({written} records on the stream)");
    let late = out_of_order(&landed, &source);
    let throttled = service.counter("agg-2", "throttled");
    println!("agg-2: {late} late, {throttled} throttled, {written} aggregates written");
    assert!(throttled > 0, "agg-2 was throttled: the test puts order under pressure");
    assert_eq!(late, 0, "agg-2: strict order per key under throttling, re-aggregated");

    // Dead-lettered: the letters are the gaps, and nothing behind them passed an earlier record.
    let landed = read(&client, "refusing-1").await;
    assert!(!landed.iter().any(|r| r.data.starts_with(b"refused:")), "no refused record landed");
    let mut found: Vec<Rec> = landed.iter().map(|r| (r.partition_key.clone(), r.data.clone())).collect();
    found.sort();
    let expected: Vec<Rec> = sorted(&records).into_iter().filter(|(_, data)| !data.starts_with(b"refused:")).collect();
    assert_eq!(found, expected, "refusing-1: every other record once");
    let late = out_of_order(&landed, &source);
    let throttled = service.counter("refusing-1", "throttled");
    println!("refusing-1: {late} late, {throttled} throttled, {} dead-lettered", refused.len());
    assert!(throttled > 0, "refusing-1 was throttled");
    assert_eq!(late, 0, "refusing-1: strict order per key with dead letters");
    let mut letters: Vec<Vec<u8>> = read(&client, "letters")
        .await
        .iter()
        .map(|letter| {
            use base64::Engine as _;
            let envelope: serde_json::Value = serde_json::from_slice(&letter.data).expect("an envelope");
            assert_eq!(envelope["error_code"], "KMSAccessDeniedException");
            base64::engine::general_purpose::STANDARD.decode(envelope["data"].as_str().unwrap()).unwrap()
        })
        .collect();
    letters.sort();
    refused.sort();
    assert_eq!(letters, refused, "each refused record is in the dead-letter stream once");
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_ordering_holds_through_a_shed_and_its_catch_up_under_a_small_memory_limit() {
    let streams = [("in", 2), ("out-fast-4", 4), ("out-slow-1", 1)];
    let (emulator, client) = limited(&streams).await;
    let (_dir, checkpoint) = temp_checkpoint();
    // A 1-shard destination the emulator throttles beside a 4-shard one, both strict and written
    // far faster than a shard takes, through a memory budget far below the backlog: the slow one
    // is shed, lets go of what it holds and catches up from its own position, re-sending what it
    // had already written past it, while throttled records are retried. What this guards is the
    // shed's seam in strict mode: re-sent records are duplicates, and first copies keep their order
    // (with strict bypassed it gave 0 late too: memory, not the shard, paced these requests).
    let strict = |group: Group| {
        group
            .set("ordering", "strict")
            .set("detach_after", "30s")
            .set("records_per_second", "20000")
            .set("bytes_per_second", "64MiB")
    };
    let config = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .set("memory", "limit", "4MiB")
        .groups([strict(Group::fast("^out-fast-")), strict(Group::fast("^out-slow-"))]);
    let service = Running::start(&config.toml(), &emulator.url);
    let records = mixed(6_000, 400);
    put_all(&client, "in", &records).await;
    let source = read(&client, "in").await;
    let detached = |name: &str| service.metrics.destination_detached.with_label_values(&[name]).get();
    wait_until("both destinations done, no catch-up under way", || async {
        ["out-fast-4", "out-slow-1"]
            .iter()
            .all(|name| service.accepted(name) >= records.len() as u64 && detached(name) == 0)
    })
    .await;
    // Re-sent records count as accepted too: what the destinations hold says when it is done.
    wait_until("both destinations hold every record", || all_hold(&client, &["out-fast-4", "out-slow-1"], &records))
        .await;
    let shed = service.metrics.destination_shed.with_label_values(&["out-slow-1"]).get();
    let throttled: Vec<u64> = streams[1..].iter().map(|(name, _)| service.counter(name, "throttled")).collect();
    service.stop().await.unwrap();
    assert!(shed > 0, "the slow destination was shed: the test puts order through a shed");
    assert!(throttled[1] > 0, "the slow destination was throttled");
    for ((name, _), throttled) in streams[1..].iter().zip(throttled) {
        let landed = read(&client, name).await;
        let d = delivery(&client, name, &records).await;
        assert_eq!((d.missing, d.foreign), (0, 0), "{name}: every record");
        let late = out_of_order(&landed, &source);
        println!(
            "{name}: {late} late of {} (first copies), {} duplicates, {throttled} throttled, shed {shed}",
            records.len(),
            d.duplicates
        );
        assert_eq!(late, 0, "{name}: strict order per key for each record's first copy, through a shed");
    }
}
