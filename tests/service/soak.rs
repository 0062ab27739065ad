//! The soak: the real binary at a steady rate with 30-second subscription sessions for ten
//! minutes (SOAK_SECONDS to change). Opt-in, not part of the quick run:
//!
//!     cargo test --release --test service soak -- --ignored --nocapture
//!
//! Passes when resident memory at the end is within 10% of what it was after the first minute,
//! and open file descriptors and threads did not grow: the fewest seen during the last session
//! are no more than the most seen in the first half of the run. The SDK's connection pools
//! open and close a connection or two as load shifts (20 to 22 descriptors here); a leak would
//! keep climbing.
//!
//! The load must stay steady for that to mean anything: ferrokinesis 0.7 answers every
//! SubscribeToShard from the start of the shard whatever the starting position, so each
//! resubscription would replay the whole stream so far (3 million records dropped in a first
//! ten-minute run, a burst growing every 30 s). The test layer makes it resume at the position
//! instead (`Faults::honour_starting_position`), as Kinesis does. Both footprints are taken over
//! one whole session (30 one-second samples), so that they compare the same phase.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferrokinesis::store::StoreOptions;

use crate::helpers::*;

const SESSION: Duration = Duration::from_secs(30);

/// (resident KiB, open file descriptors, threads) of a process, once.
fn sample(pid: u32) -> (u64, usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let count = |dir: &str| std::fs::read_dir(format!("/proc/{pid}/{dir}")).map(|d| d.count()).unwrap_or(0);
    (rss, count("fd"), count("task"))
}

/// One sample a second over a whole session: the largest resident size, and the descriptor and
/// thread counts folded with `pick` (a connection open at one instant is not a leak: the end
/// takes the smallest counts, the baseline the largest).
async fn footprint(pid: u32, pick: fn(usize, usize) -> usize) -> (u64, usize, usize) {
    let mut folded = sample(pid);
    for _ in 1..SESSION.as_secs() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let next = sample(pid);
        folded = (folded.0.max(next.0), pick(folded.1, next.1), pick(folded.2, next.2));
    }
    folded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "ten minutes; run on purpose (see the module docs)"]
async fn soak_keeps_memory_descriptors_and_threads_flat() {
    let seconds: u64 = std::env::var("SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let emulator = Emulator::with_options(StoreOptions {
        subscribe_to_shard_session_ms: SESSION.as_millis() as u64,
        // Events of at most 1,000 records, as Kinesis sends them to a consumer that keeps up.
        subscribe_to_shard_event_record_limit: 1_000,
        ..store_options()
    })
    .await;
    emulator.faults.lock().unwrap().honour_starting_position = true;
    let client = emulator.client();
    create_stream(&client, "in", 4).await;
    for name in ["out-1", "out-2", "out-3"] {
        create_stream(&client, name, 2).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = TestConfig::new(&emulator.url).checkpoint_file(&dir.path().join("c.json"));
    let process = crate::crash::spawn(&config, dir.path(), "soak");
    let pid = process.child.id().unwrap();

    // 500 records/s of 256 bytes, from a task of its own so that sampling never pauses it.
    let produced = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn({
        let (produced, stop) = (produced.clone(), stop.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                put_all(&client, "in", &records(10_000 + round, 250, 256)).await;
                produced.fetch_add(250, Ordering::Relaxed);
                round += 1;
            }
        }
    });

    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(60).min(Duration::from_secs(seconds / 3))).await;
    let mut baseline = footprint(pid, usize::max).await;
    println!("soak baseline over the session after the first minute: {baseline:?} (RSS KiB, fds, threads)");
    let end_sampling = Duration::from_secs(seconds).saturating_sub(SESSION);
    while started.elapsed() < end_sampling {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let now = sample(pid);
        println!("soak t={:>4}s {now:?}", started.elapsed().as_secs());
        if started.elapsed() < Duration::from_secs(seconds / 2) {
            baseline = (baseline.0, baseline.1.max(now.1), baseline.2.max(now.2));
        }
    }
    let end = footprint(pid, usize::min).await;
    println!("soak end over the last session, after {}s: {end:?}", started.elapsed().as_secs());
    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();

    // Every record was read exactly once (replays are dropped, not counted as reads).
    let produced = produced.load(Ordering::Relaxed);
    let read = "kinesis_fanout_source_records_read_total";
    wait_until("the service read every record", || async {
        crate::crash::metric_total(&process, read).await >= produced
    })
    .await;
    let read = crate::crash::metric_total(&process, read).await;
    let replayed = crate::crash::metric_total(&process, "kinesis_fanout_source_replayed_records_dropped_total").await;
    println!("soak produced {produced}, read {read}, replayed and dropped {replayed}");
    assert_eq!(read, produced, "each record read once");
    assert_eq!(replayed, 0, "resubscriptions resumed after the last record read");
    crate::crash::terminate(process).await;

    assert!(end.0 as f64 <= baseline.0 as f64 * 1.10, "RSS grew from {} KiB to {} KiB", baseline.0, end.0);
    assert!(end.1 <= baseline.1, "open file descriptors grew from at most {} to at least {}", baseline.1, end.1);
    assert!(end.2 <= baseline.2, "threads grew from at most {} to at least {}", baseline.2, end.2);
}
