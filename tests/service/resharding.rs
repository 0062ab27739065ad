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

async fn open_shards(client: &Client, stream: &str) -> Vec<(String, u128, u128)> {
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
    let emulator = Emulator::start().await;
    let client = emulator.client();
    create_stream(&client, "in", 2).await;
    create_stream(&client, "out-wide", 3).await;
    create_stream(&client, "out-one", 1).await;
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
