use ferrokinesis::store::StoreOptions;
use kinesis_fanout::fanout::MAX_CHUNK_BYTES;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_rejects_everything_bounds_memory_and_holds_checkpoints() {
    // Events of at most 200 records, as AWS keeps its events small.
    let emulator =
        Emulator::with_options(StoreOptions { subscribe_to_shard_event_record_limit: 200, ..store_options() }).await;
    let client = emulator.client();
    create_stream(&client, "in", 1).await;
    create_stream(&client, "out-healthy", 1).await;
    create_stream(&client, "out-broken", 1).await;
    emulator.faults.lock().unwrap().reject_puts_to = Some("out-broken".into());
    let (_dir, checkpoint) = temp_checkpoint();
    let budget: u64 = 1 << 20;
    let toml = config_toml(&emulator.url, "in", "^out-.*$", &checkpoint, r#"max_in_flight_bytes = "1MiB""#);
    let service = Running::start(&toml, &emulator.url);

    // 6 MiB of records: far more than the broken destination's 1 MiB budget.
    let input = records(20, 6_000, 1_024);
    put_all(&client, "in", &input).await;
    wait_until("broken destination retried many times", || async { service.counter("out-broken", "retried") > 2_000 })
        .await;

    let buffered = service.metrics.buffered_bytes.with_label_values(&["out-broken"]).get() as u64;
    assert!(buffered <= budget + MAX_CHUNK_BYTES as u64, "buffer bounded: {buffered} bytes");
    let read: u64 = service.metrics.records_read.with_label_values(&["shardId-000000000000"]).get();
    assert!(read < 6_000 / 2, "the source paused instead of reading everything: read {read}");
    assert!(service.progress.checkpoints().is_empty(), "nothing is checkpointed past undelivered records");
    assert!(!checkpoint.exists() || !std::fs::read_to_string(&checkpoint).unwrap().contains("shardId"));

    emulator.faults.lock().unwrap().reject_puts_to = None;
    service.wait_accepted("out-broken", 6_000).await;
    service.wait_accepted("out-healthy", 6_000).await;
    service.stop().await.unwrap();
    for name in ["out-healthy", "out-broken"] {
        assert_eq!(contents(&client, name).await, sorted(&input), "{name} recovered with every record once");
    }
}
