//! Order per key under throttling (issue 28): in strict mode a throttled record is retried
//! before anything newer of its key goes out; in batched mode a retried record can land after a
//! newer one of its key that succeeded in the same request, and the test reports how often.

use crate::helpers::streams::{OnReadError, out_of_order, read_stream};
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
