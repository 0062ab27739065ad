//! Where reading starts and stays: a shard started at LATEST or at a timestamp copies what was
//! written after that point, nothing before it, and keeps its place across a restart, with
//! either checkpoint backend.

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
async fn a_shard_started_at_a_timestamp_keeps_its_place_across_a_restart() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-1", 1)]).await;
    emulator.faults.lock().unwrap().honour_starting_position = true;
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
