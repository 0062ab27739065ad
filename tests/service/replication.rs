use std::time::Duration;

use ferrokinesis::store::StoreOptions;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_every_record_to_every_destination_exactly_once() {
    let (emulator, client) = with_streams(&[
        ("app-input", 2),
        ("app-output-orders", 2),
        ("app-output-search", 2),
        ("app-output-audit", 2),
        ("unrelated", 1),
    ])
    .await;
    let (_dir, checkpoint) = temp_checkpoint();
    let service = Running::start(
        &TestConfig::new(&emulator.url)
            .source("app-input")
            .pattern("^app-output-.*$")
            .checkpoint_file(&checkpoint)
            .toml(),
        &emulator.url,
    );

    let input = records(1, 5_000, 100);
    put_all(&client, "app-input", &input).await;
    for name in ["app-output-orders", "app-output-search", "app-output-audit"] {
        service.wait_accepted(name, 5_000).await;
    }
    service.stop().await.unwrap();

    let expected = sorted(&input);
    for name in ["app-output-orders", "app-output-search", "app-output-audit"] {
        assert_eq!(contents(&client, name).await, expected, "{name} holds exactly the source's records");
    }
    assert!(read_all(&client, "unrelated").await.is_empty(), "streams outside the pattern are untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_sessions_resubscribe_without_loss_or_replay() {
    let emulator =
        Emulator::with_options(StoreOptions { subscribe_to_shard_session_ms: 2_000, ..store_options() }).await;
    let client = emulator.client();
    create_stream(&client, "in", 2).await;
    create_stream(&client, "out-a", 1).await;
    // The first subscriptions find another session still open (AWS's 5-second rule).
    emulator.faults.lock().unwrap().subscribe_in_use = 2;
    let (_dir, checkpoint) = temp_checkpoint();
    let service = Running::start(&TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).toml(), &emulator.url);

    // Produce until each shard has lived through at least 3 sessions (2 s each).
    let mut all = Vec::new();
    let ends = || service.metrics.resubscribes.with_label_values(&["session_end"]).get();
    for round in 0..200u64 {
        let batch = records(100 + round, 100, 50);
        put_all(&client, "in", &batch).await;
        all.extend(batch);
        if ends() >= 6 && round >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    service.wait_accepted("out-a", all.len() as u64).await;
    assert!(emulator.calls("SubscribeToShard") >= 8, "every session is a SubscribeToShard call");
    let session_ends = service.metrics.resubscribes.with_label_values(&["session_end"]).get();
    let in_use = service.metrics.resubscribes.with_label_values(&["resource_in_use"]).get();
    service.stop().await.unwrap();

    assert!(session_ends >= 6, "expected at least 3 resubscribes per shard, saw {session_ends}");
    assert_eq!(in_use, 2, "both ResourceInUse answers were retried");
    assert_eq!(contents(&client, "out-a").await, sorted(&all), "no loss, no replay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_destination_gets_every_record_and_only_failed_ones_are_resent() {
    let emulator = Emulator::with_options(StoreOptions { enforce_limits: true, ..store_options() }).await;
    let client = emulator.client();
    create_stream(&client, "in", 4).await;
    create_stream(&client, "out-narrow", 1).await;
    let (_dir, checkpoint) = temp_checkpoint();
    // A limiter set far above the shard's 1,000 records/s, so that Kinesis does the throttling.
    let toml = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).group("records_per_second", "20000").toml();
    let service = Running::start(&toml, &emulator.url);

    // 3,000 records per second for two seconds.
    let mut all = Vec::new();
    for second in 0..2u64 {
        let batch = records(200 + second, 3_000, 20);
        put_all(&client, "in", &batch).await;
        all.extend(batch);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    service.wait_accepted("out-narrow", all.len() as u64).await;
    let throttled = service.counter("out-narrow", "throttled");
    let accepted = service.accepted("out-narrow");
    service.stop().await.unwrap();

    assert!(throttled > 0, "the shard limit was hit (otherwise this test proves nothing)");
    assert_eq!(accepted, all.len() as u64, "each record was accepted exactly once");
    assert_eq!(contents(&client, "out-narrow").await, sorted(&all), "every record arrived once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_then_restart_copies_only_new_records() {
    let (emulator, client) = with_streams(&[("in", 2), ("out-1", 1), ("out-2", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).toml();

    let first = records(300, 1_000, 64);
    let service = Running::start(&toml, &emulator.url);
    put_all(&client, "in", &first).await;
    service.wait_accepted("out-1", 1_000).await;
    service.wait_accepted("out-2", 1_000).await;
    service.stop().await.unwrap();
    let saved = std::fs::read_to_string(&checkpoint).expect("a final checkpoint was written");
    assert!(saved.contains("shardId-"), "{saved}");

    let second = records(301, 500, 64);
    put_all(&client, "in", &second).await;
    let service = Running::start(&toml, &emulator.url);
    service.wait_accepted("out-1", 500).await;
    service.wait_accepted("out-2", 500).await;
    let replayed = service.accepted("out-1");
    service.stop().await.unwrap();

    assert_eq!(replayed, 500, "after a graceful stop, a restart copies only the new records");
    let mut expected = first.clone();
    expected.extend(second);
    for name in ["out-1", "out-2"] {
        assert_eq!(contents(&client, name).await, sorted(&expected), "{name}: no duplicates, no loss");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_matching_the_pattern_is_never_written_to() {
    let (emulator, client) = with_streams(&[("app-output-source", 1), ("app-output-copy", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let service = Running::start(
        &TestConfig::new(&emulator.url)
            .source("app-output-source")
            .pattern("^app-output-.*$")
            .checkpoint_file(&checkpoint)
            .toml(),
        &emulator.url,
    );
    let input = records(400, 300, 32);
    put_all(&client, "app-output-source", &input).await;
    service.wait_accepted("app-output-copy", 300).await;
    assert_eq!(service.accepted("app-output-source"), 0);
    service.stop().await.unwrap();
    assert_eq!(contents(&client, "app-output-source").await, sorted(&input), "the source holds only what was put");
    assert_eq!(contents(&client, "app-output-copy").await, sorted(&input));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_deleted_source_is_a_clear_error() {
    let (emulator, client) = with_streams(&[("out-x", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let missing = Running::start(
        &TestConfig::new(&emulator.url).source("no-such-input").checkpoint_file(&checkpoint).toml(),
        &emulator.url,
    );
    let err = missing.finished().await.unwrap_err();
    assert!(err.to_string().contains("`no-such-input` does not exist"), "{err}");

    create_stream(&client, "doomed", 1).await;
    let service = Running::start(
        &TestConfig::new(&emulator.url).source("doomed").checkpoint_file(&checkpoint).toml(),
        &emulator.url,
    );
    put_all(&client, "doomed", &records(500, 10, 10)).await;
    service.wait_accepted("out-x", 10).await;
    client.delete_stream().stream_name("doomed").enforce_consumer_deletion(true).send().await.unwrap();
    let err = service.finished().await.unwrap_err();
    assert!(err.to_string().contains("`doomed` was deleted"), "{err}");
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
