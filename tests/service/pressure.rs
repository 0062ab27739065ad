//! The pressure tier: the real service under sustained traffic, with the emulator's AWS-like shard
//! limits on, and invariants checked while it runs, not only at the end.
//!
//! Short variants run in the default suite. `KINESIS_FANOUT_PRESSURE_SECONDS=N` makes every
//! producer run N seconds: the long variants (`cargo test --release --test service pressure::` with
//! it set; see docs/guarantees.md). The bounds checked do not depend on the length.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_kinesis::Client;

use crate::helpers::*;

/// How long producers run, in seconds (`default` unless stretched for a long run).
fn seconds(default: u64) -> u64 {
    std::env::var("KINESIS_FANOUT_PRESSURE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Waits until `destination` holds every record of `input`, allowing for a long run's backlog.
async fn wait_drained(service: &Running, client: &Client, destination: &str, input: &[Rec]) {
    let within = WAIT + Duration::from_secs(2 * seconds(0));
    let n = input.len() as u64;
    // The count is the cheap first sign; it counts the copies a shed destination re-sends too, so
    // what the destination holds says when it is done.
    let drained = tokio::time::timeout(within, async {
        while service.accepted(destination) < n || !all_hold(client, &[destination], input).await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "{destination} accepted {} of {n} records within {within:?} (or does not hold every one)",
        service.accepted(destination)
    );
}

/// A steady producer: `rate` records a second over 40 keys, for `seconds`, each record's data
/// naming its key and its index within the key (`key:index:` then padding to `size` bytes).
struct Producer {
    produced: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Rec>>,
}

impl Producer {
    fn start(client: &Client, tag: &str, rate: usize, seconds: u64, size: usize) -> Producer {
        let produced = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicBool::new(true));
        let (client, tag) = (client.clone(), tag.to_string());
        let task = tokio::spawn({
            let (produced, running) = (Arc::clone(&produced), Arc::clone(&running));
            async move {
                let mut all = Vec::new();
                let mut index: BTreeMap<usize, u64> = BTreeMap::new();
                let tick = Duration::from_millis(100);
                let per_tick = (rate / 10).max(1);
                let mut clock = tokio::time::interval(tick);
                for round in 0..seconds * 10 {
                    clock.tick().await;
                    let batch: Vec<Rec> = (0..per_tick)
                        .map(|i| {
                            let key = (round as usize * per_tick + i) % 40;
                            let n = index.entry(key).or_default();
                            *n += 1;
                            let mut data = format!("{tag}-{key:02}:{n:08}:").into_bytes();
                            data.resize(size.max(data.len()), b'.');
                            (format!("{tag}-{key:02}"), data)
                        })
                        .collect();
                    put_all(&client, "in", &batch).await;
                    produced.fetch_add(batch.len() as u64, Ordering::SeqCst);
                    all.extend(batch);
                }
                running.store(false, Ordering::SeqCst);
                all
            }
        });
        Producer { produced, running, task }
    }

    fn produced(&self) -> u64 {
        self.produced.load(Ordering::SeqCst)
    }

    fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }
}

/// Samples, every 200 ms while the producer runs, how far each of `fast` is behind it (records
/// produced and not yet accepted there); returns the largest gap seen per destination.
async fn watch_lag(service: &Running, producer: &Producer, fast: &[&str]) -> BTreeMap<String, u64> {
    let mut worst: BTreeMap<String, u64> = BTreeMap::new();
    while producer.running() {
        let produced = producer.produced();
        for name in fast {
            let gap = produced.saturating_sub(service.accepted(name));
            let entry = worst.entry(name.to_string()).or_default();
            *entry = (*entry).max(gap);
        }
        let used = service.metrics.memory.get().map(|m| (m.used(), m.limit()));
        if let Some((used, limit)) = used {
            assert!(used <= limit, "buffered {used} bytes over the {limit}-byte budget");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worst
}

/// Checks that per destination shard, every key's records stand in the order they were
/// produced, and returns how many records stand more than once.
async fn check_order_per_key(client: &Client, stream: &str) -> usize {
    let mut last: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut duplicates = 0;
    for (shard, key, data) in read_all(client, stream).await {
        let text = String::from_utf8_lossy(&data);
        let index: u64 = text.split(':').nth(1).and_then(|n| n.parse().ok()).expect("a produced record");
        if !seen.insert(data.clone()) {
            duplicates += 1;
            continue;
        }
        let previous = last.insert((shard.clone(), key.clone()), index);
        assert!(
            previous.is_none_or(|p| p < index),
            "{stream} {shard}: record {index} of {key} stands after record {previous:?} of that key"
        );
    }
    duplicates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_destination_that_still_drains_holds_no_one_back_under_a_small_memory_limit() {
    let (emulator, client) = limited(&[("in", 4), ("out-fast-a", 4), ("out-fast-b", 4), ("out-slow", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    // 8 MiB of buffers for a backlog of about 25 MB owed to the slow destination.
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .group("detach_after", "2s")
        .set("memory", "limit", "16MiB")
        .toml();
    let service = Running::start(&toml, &emulator.url);
    wait_until("three destinations", || async { service.metrics.destinations.get() == 3 }).await;

    // 2,000 records/s of 700 bytes: twice what the 1-shard destination can take.
    let producer = Producer::start(&client, "slow", 2_000, seconds(20), 700);
    let worst = watch_lag(&service, &producer, &["out-fast-a", "out-fast-b"]).await;
    eprintln!("slow-but-draining: worst gaps behind the producer {worst:?}");
    let input = producer.task.await.unwrap();
    let total = input.len() as u64;
    // Bound: the fast destinations are never more than 1.5 s of traffic behind the producer.
    for (name, gap) in &worst {
        assert!(*gap <= 3_000, "{name} fell {gap} records behind the producer: it waited for the slow one");
    }
    for name in ["out-fast-a", "out-fast-b"] {
        service.wait_accepted(name, total).await;
    }
    assert!(service.accepted("out-slow") < total, "the slow destination is still behind when the fast ones are done");
    wait_drained(&service, &client, "out-slow", &input).await;
    service.stop().await.unwrap();
    for name in ["out-fast-a", "out-fast-b"] {
        assert_eq!(contents(&client, name).await, sorted(&input), "{name}: every record exactly once");
    }
    assert!(all_hold(&client, &["out-slow"], &input).await, "the slow destination got every record");
    eprintln!("slow-but-draining: slow duplicates {}", duplicates_in(&client, "out-slow").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_refuses_everything_holds_no_one_back_under_a_small_memory_limit() {
    let (emulator, client) = limited(&[("in", 4), ("out-fast-a", 4), ("out-broken", 1)]).await;
    emulator.faults.lock().unwrap().reject_puts_to = Some("out-broken".into());
    let (_dir, checkpoint) = temp_checkpoint();
    // No dead-letter stream, and a detach_after far longer than memory lasts.
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .group("detach_after", "10m")
        .set("memory", "limit", "16MiB")
        .toml();
    let service = Running::start(&toml, &emulator.url);
    wait_until("two destinations", || async { service.metrics.destinations.get() == 2 }).await;

    let producer = Producer::start(&client, "refused", 1_500, seconds(15), 700);
    let worst = watch_lag(&service, &producer, &["out-fast-a"]).await;
    eprintln!("refusing: worst gap behind the producer {worst:?}");
    let input = producer.task.await.unwrap();
    let total = input.len() as u64;
    // Bound: the healthy destination is never more than 2 s of traffic behind the producer.
    assert!(worst["out-fast-a"] <= 3_000, "the healthy destination fell {worst:?} records behind");
    service.wait_accepted("out-fast-a", total).await;
    assert_eq!(service.accepted("out-broken"), 0, "still refusing");
    assert!(service.metrics.destination_shed.with_label_values(&["out-broken"]).get() > 0, "it was shed");

    emulator.faults.lock().unwrap().reject_puts_to = None;
    wait_drained(&service, &client, "out-broken", &input).await;
    service.stop().await.unwrap();
    assert_eq!(contents(&client, "out-fast-a").await, sorted(&input), "every record exactly once");
    assert!(all_hold(&client, &["out-broken"], &input).await, "the refusing destination got every record once fixed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_destination_rejoins_the_live_feed_while_records_keep_arriving_without_gap_or_duplicate() {
    let (emulator, client) = limited(&[("in", 2), ("out-fast", 2), ("out-slow", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    // The slow one is held below its shard's limit, so that no record of it is throttled (a
    // retried record may land after a newer one of its key in batched mode; see issue 28).
    let slow = Group::fast("^out-slow$")
        .set("max_in_flight_bytes", "1MiB")
        .set("detach_after", "1s")
        .set("records_per_second", "600");
    let fast = Group::fast("^out-fast$")
        .set("max_in_flight_bytes", "4MiB")
        .set("detach_after", "1s")
        .set("records_per_second", "1200");
    let toml = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).groups([slow, fast]).toml();
    let service = Running::start(&toml, &emulator.url);
    wait_until("two destinations", || async { service.metrics.destinations.get() == 2 }).await;
    let detached = || service.metrics.destination_detached.with_label_values(&["out-slow"]).get();

    // Twice what the slow one takes: it is detached.
    let burst = Producer::start(&client, "burst", 1_200, 6, 1_000);
    let input = burst.task.await.unwrap();
    assert!(
        service.metrics.catch_up_records.with_label_values(&["out-slow"]).get() > 0 || detached() > 0,
        "the slow destination was detached"
    );
    // Then a steady trickle it can follow: it catches up and rejoins while records keep arriving.
    let trickle = Producer::start(&client, "trickle", 200, seconds(20), 1_000);
    let mut rejoined_while_producing = false;
    while trickle.running() {
        if detached() == 0 && service.accepted("out-slow") >= input.len() as u64 {
            rejoined_while_producing = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let more = trickle.task.await.unwrap();
    assert!(rejoined_while_producing, "the slow destination rejoined the live feed while records kept arriving");
    let everything = [input, more].concat();
    for name in ["out-fast", "out-slow"] {
        service.wait_accepted(name, everything.len() as u64).await;
    }
    assert_eq!(service.metrics.records_expired.with_label_values(&["out-slow"]).get(), 0, "no false expiry");
    service.stop().await.unwrap();
    for name in ["out-fast", "out-slow"] {
        assert_eq!(check_order_per_key(&client, name).await, 0, "{name}: no duplicate, at the seam or anywhere");
        assert_eq!(contents(&client, name).await, sorted(&everything), "{name}: no gap");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_cut_short_on_an_idle_shard_resumes_after_a_restart_and_finishes_when_the_shard_splits() {
    let (emulator, client) = limited(&[("in", 1), ("out-a", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let groups = [
        Group::fast("^out-new$")
            .set("start_position", "trim_horizon")
            .set("records_per_second", "150")
            .set("max_in_flight_bytes", "1MiB"),
        Group::fast("^out-a$").set("start_position", "trim_horizon"),
    ];
    let toml = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).groups(groups).toml();
    let input = records(91, 2_000, 3_000);
    put_all(&client, "in", &input).await;
    let first = Running::start(&toml, &emulator.url);
    first.wait_accepted("out-a", 2_000).await;

    // A destination created while running backfills the shard at 150 records/s, a page at a
    // time (its budget is 1 MiB); it is stopped gracefully early on. The shard is idle from here.
    create_stream(&client, "out-new", 1).await;
    wait_until("the backfill is under way", || async { first.accepted("out-new") >= 300 }).await;
    first.stop().await.unwrap();
    let before = contents(&client, "out-new").await.len();
    assert!(before < 2_000, "the backfill was cut short ({before} of 2,000)");

    // Restarted on the idle shard: the backfill moves on from its own position.
    let second = Running::start(&toml, &emulator.url);
    wait_until("the backfill finished on the idle shard", || async { all_hold(&client, &["out-new"], &input).await })
        .await;
    // The shard is split: its end is reached, and its children are read.
    split_first_shard(&client, "in").await;
    let after = records(92, 400, 200);
    put_all(&client, "in", &after).await;
    second.wait_accepted("out-a", 400).await;
    wait_until("the new destination has the children's records", || async {
        all_hold(&client, &["out-new"], &after).await
    })
    .await;
    second.stop().await.unwrap();
    let everything = sorted(&[input, after].concat());
    assert_eq!(contents(&client, "out-a").await, everything, "out-a: every record exactly once");
    assert!(all_hold(&client, &["out-new"], &everything).await, "out-new: every record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_waiting_for_memory_stays_ready_and_keeps_its_subscription() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-1", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    // Backpressure by choice (never detached, never shed), and a memory budget (2 MiB of buffers)
    // far below the destination's buffer: the reader ends up waiting for memory, not for buffer.
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .group("detach_after", "off")
        .set("memory", "limit", "4MiB")
        .toml();
    let service = Running::start(&toml, &emulator.url);
    wait_until("ready", || async { service.get("/readyz").await.0 == 200 }).await;
    emulator.faults.lock().unwrap().throttle_puts_to = Some("out-1".into());
    let input = records(1900, 15_000, 100);
    put_all(&client, "in", &input).await;
    let budget = service.metrics.memory.get().expect("the budget is set").clone();
    wait_until("the reader waits for memory", || async { budget.used() * 10 >= budget.limit() * 9 }).await;
    let resubscribes = service.metrics.resubscribes.with_label_values(&["idle_timeout"]).get();
    let until = tokio::time::Instant::now() + kinesis_fanout::health::SUBSCRIPTION_STALE + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let (status, body) = service.get("/readyz").await;
        assert_eq!(status, 200, "waiting for memory is not a failure: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(service.metrics.resubscribes.with_label_values(&["idle_timeout"]).get(), resubscribes);
    emulator.faults.lock().unwrap().throttle_puts_to = None;
    service.wait_accepted("out-1", input.len() as u64).await;
    service.stop().await.unwrap();
    assert_eq!(contents(&client, "out-1").await, sorted(&input));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_ups_of_a_refusing_destination_on_many_shards_hold_no_memory_while_they_wait() {
    let (emulator, client) = limited(&[("in", 16), ("out-fast-a", 8), ("out-broken", 4)]).await;
    emulator.faults.lock().unwrap().reject_puts_to = Some("out-broken".into());
    let (_dir, checkpoint) = temp_checkpoint();
    // Detached within a second on every shard (its buffer is 1 MiB): sixteen catch-ups, each of
    // which could hold a page (half a megabyte and more of 8 KB records) waiting for a
    // destination that never frees room, beside 6 MiB of buffers.
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .group("max_in_flight_bytes", "1MiB")
        .group("detach_after", "1s")
        .set("memory", "limit", "12MiB")
        .toml();
    let service = Running::start(&toml, &emulator.url);
    wait_until("two destinations", || async { service.metrics.destinations.get() == 2 }).await;

    let producer = Producer::start(&client, "pages", 480, seconds(15), 8_000);
    let worst = watch_lag(&service, &producer, &["out-fast-a"]).await;
    eprintln!("many catch-ups: worst gap behind the producer {worst:?}");
    let input = producer.task.await.unwrap();
    // Bound: 2 s of traffic.
    assert!(worst["out-fast-a"] <= 960, "the healthy destination fell {worst:?} records behind");
    service.wait_accepted("out-fast-a", input.len() as u64).await;
    assert!(service.metrics.destination_detached.with_label_values(&["out-broken"]).get() > 0);
    emulator.faults.lock().unwrap().reject_puts_to = None;
    wait_drained(&service, &client, "out-broken", &input).await;
    service.stop().await.unwrap();
    assert!(all_hold(&client, &["out-broken"], &input).await);
}
