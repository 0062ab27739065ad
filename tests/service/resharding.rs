use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_kinesis::Client;

use crate::helpers::*;

/// Per partition key, the data in the order a stream holds it (shards in id order, so parents
/// come before their children).
pub async fn per_key(client: &Client, stream: &str) -> BTreeMap<String, Vec<Vec<u8>>> {
    let mut out: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for (_, pk, data) in read_all(client, stream).await {
        out.entry(pk).or_default().push(data);
    }
    out
}

pub async fn open_shards(client: &Client, stream: &str) -> Vec<(String, u128, u128)> {
    let out = client.list_shards().stream_name(stream).send().await.unwrap();
    out.shards()
        .iter()
        .filter(|s| s.sequence_number_range().and_then(|r| r.ending_sequence_number()).is_none())
        .map(|s| {
            let range = s.hash_key_range().unwrap();
            (
                s.shard_id().to_string(),
                range.starting_hash_key().parse().unwrap(),
                range.ending_hash_key().parse().unwrap(),
            )
        })
        .collect()
}

/// Puts 40 keys x 60 rounds into `in` (2 shards), splitting a shard after round 20 and merging two
/// after round 40; returns the source's records per key, in order.
pub async fn produce_with_split_and_merge(emulator: &Emulator) -> BTreeMap<String, Vec<Vec<u8>>> {
    let client = emulator.client();
    let keys: Vec<String> = (0..40).map(|k| format!("key-{k:02}")).collect();
    let rounds = 60;
    for round in 0..rounds {
        let batch: Vec<Rec> = keys.iter().map(|k| (k.clone(), format!("{k}:{round:05}").into_bytes())).collect();
        put_all(&client, "in", &batch).await;
        if round == 20 {
            let shards = open_shards(&client, "in").await;
            let (id, start, end) = shards[0].clone();
            let middle = start + (end - start) / 2;
            client
                .split_shard()
                .stream_name("in")
                .shard_to_split(id)
                .new_starting_hash_key(middle.to_string())
                .send()
                .await
                .unwrap();
            wait_active(&client, "in").await;
        }
        if round == 40 {
            // Merge the upper child of the split with its neighbour.
            let mut shards = open_shards(&client, "in").await;
            shards.sort_by_key(|s| s.1);
            let pair = shards.windows(2).find(|w| w[0].2 + 1 == w[1].1).expect("adjacent shards").to_vec();
            client
                .merge_shards()
                .stream_name("in")
                .shard_to_merge(&pair[0].0)
                .adjacent_shard_to_merge(&pair[1].0)
                .send()
                .await
                .unwrap();
            wait_active(&client, "in").await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    per_key(&client, "in").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_keep_every_record_and_per_key_order() {
    let (emulator, client) = with_streams(&[("in", 2), ("out-wide", 3), ("out-one", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let service = Running::start(&TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).toml(), &emulator.url);
    let source = produce_with_split_and_merge(&emulator).await;
    let total = source.values().map(Vec::len).sum::<usize>() as u64;
    service.wait_accepted("out-wide", total).await;
    service.wait_accepted("out-one", total).await;
    service.stop().await.unwrap();

    assert_eq!(total, 40 * 60);
    for name in ["out-wide", "out-one"] {
        let copied = per_key(&client, name).await;
        let wrong: Vec<&String> = source.keys().filter(|k| copied.get(*k) != source.get(*k)).collect();
        assert!(
            wrong.is_empty() && copied.len() == source.len(),
            "{name}: keys out of source order or incomplete: {wrong:?}"
        );
    }
}

/// Partition keys that Kinesis routes into the upper half of the hash space.
fn upper_half_keys(n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("upper-{i}"))
        .filter(|k| kinesis_fanout::kpl::partition_key_hash(k) > u128::MAX / 2 + (u128::MAX / 8))
        .take(n)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_latest_a_split_while_running_reads_children_only_after_their_parent() {
    let (emulator, client) = with_streams(&[("in", 2), ("out-1", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let toml =
        TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).set("source", "initial_position", "latest").toml();
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
