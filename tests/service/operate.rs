//! Operating the service: metrics, health, readiness, idle detection.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use kinesis_fanout::idle::IdleEvent;

use crate::helpers::*;

/// The value of one sample line of a Prometheus text page, by its name and labels as printed.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_during_replication_and_readiness_follows_destinations() {
    let (emulator, client) = with_streams(&[("in", 2)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let service = Running::start(&TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).toml(), &emulator.url);

    assert_eq!(service.get("/healthz").await, (200, "ok\n".to_string()));
    wait_until("readyz explains what is missing", || async {
        let (status, body) = service.get("/readyz").await;
        status == 503 && body.contains("no destination")
    })
    .await;
    create_stream(&client, "out-metrics", 1).await;
    wait_until("ready once a destination exists", || async { service.get("/readyz").await.0 == 200 }).await;

    put_all(&client, "in", &records(40, 500, 64)).await;
    service.wait_accepted("out-metrics", 500).await;
    let (status, first) = service.get("/metrics").await;
    assert_eq!(status, 200);
    let written = r#"kinesis_fanout_destination_records_total{destination="out-metrics",outcome="ok"}"#;
    assert_eq!(sample(&first, written), Some(500.0), "{first}");
    for name in [
        "kinesis_fanout_source_records_read_total",
        "kinesis_fanout_source_bytes_read_total",
        "kinesis_fanout_source_millis_behind_latest",
        "kinesis_fanout_source_active_subscriptions",
        "kinesis_fanout_destinations",
        "kinesis_fanout_destination_bytes_total",
        "kinesis_fanout_put_records_duration_seconds_bucket",
        "kinesis_fanout_rate_limiter_wait_seconds_total",
        "kinesis_fanout_destination_buffered_records",
        "kinesis_fanout_destination_buffered_bytes",
        "kinesis_fanout_checkpoint_writes_total",
        "kinesis_fanout_oldest_unacknowledged_record_age_seconds",
        "kinesis_fanout_end_to_end_latency_seconds_bucket",
        "kinesis_fanout_idle",
        "kinesis_fanout_build_info",
        "kinesis_fanout_start_time_seconds",
    ] {
        assert!(first.contains(name), "{name} missing from /metrics");
    }

    put_all(&client, "in", &records(41, 300, 64)).await;
    service.wait_accepted("out-metrics", 800).await;
    let (_, second) = service.get("/metrics").await;
    assert_eq!(sample(&second, written), Some(800.0), "the counter moved");
    let read: f64 = ["shardId-000000000000", "shardId-000000000001"]
        .iter()
        .filter_map(|s| sample(&second, &format!(r#"kinesis_fanout_source_records_read_total{{shard="{s}"}}"#)))
        .sum();
    assert_eq!(read, 800.0);
    service.stop().await.unwrap();
}

async fn receive(State(seen): State<Arc<Mutex<Vec<IdleEvent>>>>, Json(event): Json<IdleEvent>) {
    seen.lock().unwrap().push(event);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_webhook_fires_once_per_burst() {
    let seen: Arc<Mutex<Vec<IdleEvent>>> = Arc::default();
    let receiver = axum::Router::new().route("/idle", axum::routing::post(receive)).with_state(Arc::clone(&seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/idle", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    let (emulator, client) = with_streams(&[("in", 1), ("out-idle", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .set("idle", "after", "1s")
        .set("idle", "webhook_url", &hook)
        .toml();
    let service = Running::start(&toml, &emulator.url);
    wait_until("ready", || async { service.get("/readyz").await.0 == 200 }).await;

    put_all(&client, "in", &records(50, 120, 16)).await;
    wait_until("an idle event after the first burst", || async {
        seen.lock().unwrap().iter().any(|e| e.records_copied == 120)
    })
    .await;
    assert_eq!(service.metrics.idle.get(), 1);
    put_all(&client, "in", &records(51, 30, 16)).await;
    wait_until("an idle event after the second burst", || async {
        seen.lock().unwrap().iter().any(|e| e.records_copied == 30)
    })
    .await;
    service.stop().await.unwrap();

    let events = seen.lock().unwrap().clone();
    let last = events.last().unwrap();
    assert_eq!(last.source_stream, "in");
    assert_eq!(last.destinations, vec!["out-idle".to_string()]);
    assert!(last.last_sequence_numbers.contains_key("shardId-000000000000"));
    let bursts = events.iter().filter(|e| e.records_copied > 0).count();
    assert_eq!(bursts, 2, "one event per busy-to-idle transition: {events:?}");
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
