use std::time::Duration;

use ferrokinesis::store::StoreOptions;
use kinesis_fanout::fanout::MAX_CHUNK_BYTES;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_rejects_everything_bounds_memory_and_holds_checkpoints() {
    stuck_destination(Duration::ZERO, false).await;
}

/// The same, throttled for minutes (opt-in: `cargo test --test service throttled_for_minutes -- --ignored`,
/// THROTTLE_SECONDS to change the length).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long; run on purpose"]
async fn a_destination_throttled_for_minutes_bounds_memory_and_recovers() {
    let seconds = std::env::var("THROTTLE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(180);
    stuck_destination(Duration::from_secs(seconds), true).await;
}

/// One destination of two fails every write (500s, or throttling) for `hold` beyond what the
/// checks need: memory stays within its buffer, the source pauses, nothing is checkpointed past
/// its records, and everything arrives once it accepts again.
async fn stuck_destination(hold: Duration, throttle: bool) {
    // Events of at most 200 records, as AWS keeps its events small.
    let emulator =
        Emulator::with_options(StoreOptions { subscribe_to_shard_event_record_limit: 200, ..store_options() }).await;
    let client = emulator.client();
    create_stream(&client, "in", 1).await;
    create_stream(&client, "out-healthy", 1).await;
    create_stream(&client, "out-broken", 1).await;
    if throttle {
        emulator.faults.lock().unwrap().throttle_puts_to = Some("out-broken".into());
    } else {
        emulator.faults.lock().unwrap().reject_puts_to = Some("out-broken".into());
    }
    let (_dir, checkpoint) = temp_checkpoint();
    let budget: u64 = 1 << 20;
    // The live feed waits for the broken destination (no detaching): this is the backpressure path.
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .group("max_in_flight_bytes", "1MiB")
        .group("detach_after", "off")
        .toml();
    let service = Running::start(&toml, &emulator.url);

    // 6 MiB of records: far more than the broken destination's 1 MiB budget.
    let input = records(20, 6_000, 1_024);
    put_all(&client, "in", &input).await;
    wait_until("broken destination retried many times", || async {
        service.counter("out-broken", "retried") + service.counter("out-broken", "throttled") > 2_000
    })
    .await;
    let until = tokio::time::Instant::now() + hold;
    while tokio::time::Instant::now() < until {
        let buffered = service.metrics.buffered_bytes.with_label_values(&["out-broken"]).get() as u64;
        assert!(buffered <= budget + MAX_CHUNK_BYTES as u64, "buffer bounded while stuck: {buffered} bytes");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let buffered = service.metrics.buffered_bytes.with_label_values(&["out-broken"]).get() as u64;
    assert!(buffered <= budget + MAX_CHUNK_BYTES as u64, "buffer bounded: {buffered} bytes");
    let read: u64 = service.metrics.records_read.with_label_values(&["shardId-000000000000"]).get();
    assert!(read < 6_000 / 2, "the source paused instead of reading everything: read {read}");
    assert!(service.progress.checkpoints().is_empty(), "nothing is checkpointed past undelivered records");
    // The file may hold the healthy destination's own position, never a shard checkpoint.
    if checkpoint.exists() {
        let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&checkpoint).unwrap()).unwrap();
        assert!(file["shards"].as_object().is_none_or(|shards| shards.is_empty()), "{file}");
    }

    {
        let mut faults = emulator.faults.lock().unwrap();
        faults.reject_puts_to = None;
        faults.throttle_puts_to = None;
    }
    service.wait_accepted("out-broken", 6_000).await;
    service.wait_accepted("out-healthy", 6_000).await;
    service.stop().await.unwrap();
    for name in ["out-healthy", "out-broken"] {
        assert_eq!(contents(&client, name).await, sorted(&input), "{name} recovered with every record once");
    }
}

#[derive(serde::Deserialize)]
struct Envelope {
    source_stream: String,
    shard_id: String,
    sequence_number: String,
    destination: String,
    error_code: String,
    partition_key: String,
    data: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_destination_can_never_accept_go_to_the_dead_letter_stream() {
    use base64::Engine as _;
    let (emulator, client) = with_streams(&[("in", 1), ("out-ok", 1), ("out-denied", 1), ("out-dlq", 1)]).await;
    emulator.faults.lock().unwrap().deny_puts_to = Some("out-denied".into());
    let (_dir, checkpoint) = temp_checkpoint();
    // The dead-letter stream matches the pattern too: it must never be a destination.
    let toml =
        TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).group("dead_letter_stream", "out-dlq").toml();
    let service = Running::start(&toml, &emulator.url);
    let input = records(30, 300, 16);
    put_all(&client, "in", &input).await;
    service.wait_accepted("out-ok", 300).await;
    wait_until("300 dead-lettered", || async { service.counter("out-denied", "dead_lettered") >= 300 }).await;
    wait_until("progress not held back", || async { service.progress.outstanding() == 0 }).await;
    assert_eq!(service.metrics.destinations.get(), 2, "out-dlq is not a destination");
    service.stop().await.unwrap();

    let letters = read_all(&client, "out-dlq").await;
    assert_eq!(letters.len(), 300);
    let mut recovered: Vec<Rec> = letters
        .iter()
        .map(|(_, pk, body)| {
            let e: Envelope = serde_json::from_slice(body).expect("envelope is JSON");
            assert_eq!((e.source_stream.as_str(), e.destination.as_str()), ("in", "out-denied"));
            assert_eq!(e.error_code, "AccessDeniedException");
            assert!(e.shard_id.starts_with("shardId-") && !e.sequence_number.is_empty());
            assert_eq!(&e.partition_key, pk);
            (e.partition_key, base64::engine::general_purpose::STANDARD.decode(e.data).unwrap())
        })
        .collect();
    recovered.sort();
    assert_eq!(recovered, sorted(&input), "every rejected record is in the dead-letter stream with its origin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dead_letter_stream_a_rejecting_destination_stalls_loudly_then_recovers() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-ok", 1), ("out-denied", 1)]).await;
    emulator.faults.lock().unwrap().deny_puts_to = Some("out-denied".into());
    let (_dir, checkpoint) = temp_checkpoint();
    let service = Running::start(&TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).toml(), &emulator.url);
    let input = records(31, 100, 16);
    put_all(&client, "in", &input).await;
    service.wait_accepted("out-ok", 100).await;
    wait_until("stalled gauge raised", || async {
        service.metrics.destination_stalled.with_label_values(&["out-denied"]).get() == 1
    })
    .await;
    assert!(service.progress.checkpoints().is_empty(), "the stalled destination holds back checkpoints");

    emulator.faults.lock().unwrap().deny_puts_to = None;
    service.wait_accepted("out-denied", 100).await;
    wait_until("stalled gauge cleared", || async {
        service.metrics.destination_stalled.with_label_values(&["out-denied"]).get() == 0
    })
    .await;
    service.stop().await.unwrap();
    assert_eq!(contents(&client, "out-denied").await, sorted(&input));
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
