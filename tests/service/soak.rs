//! The soak: the real binary at a steady rate with 30-second subscription sessions for ten
//! minutes (SOAK_SECONDS to change). Opt-in, not part of the quick run:
//!
//!     cargo test --release --test service soak -- --ignored --nocapture
//!
//! Passes when resident memory at the end is within 10% of what it was after the first minute,
//! and open file descriptors and threads did not grow.

use std::time::{Duration, Instant};

use ferrokinesis::store::StoreOptions;

use crate::helpers::*;

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

/// Five samples a second apart, folded with `pick` (a connection open at one instant is not a
/// leak: the end takes the smallest counts, the baseline the largest).
async fn footprint(pid: u32, pick: fn(usize, usize) -> usize) -> (u64, usize, usize) {
    let mut folded = sample(pid);
    for _ in 0..4 {
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
        subscribe_to_shard_session_ms: 30_000,
        retention_check_interval_secs: 60,
        ..store_options()
    })
    .await;
    let client = emulator.client();
    create_stream(&client, "in", 4).await;
    for name in ["out-1", "out-2", "out-3"] {
        create_stream(&client, name, 2).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = config_toml(&emulator.url, "in", "^out-.*$", &dir.path().join("c.json"), "");
    let process = crate::crash::spawn(&config, dir.path(), "soak");
    let pid = process.child.id().unwrap();

    let started = Instant::now();
    let mut baseline = None;
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        // 500 records/s of 256 bytes.
        put_all(&client, "in", &records(10_000 + round, 250, 256)).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
        if baseline.is_none() && started.elapsed() > Duration::from_secs(60.min(seconds / 2)) {
            baseline = Some(footprint(pid, usize::max).await);
            println!("soak baseline after the first minute: {:?} (RSS KiB, fds, threads)", baseline.unwrap());
        }
    }
    let end = footprint(pid, usize::min).await;
    let baseline = baseline.expect("ran past the first minute");
    println!("soak end after {seconds}s: {end:?}");
    crate::crash::terminate(process).await;
    assert!(end.0 as f64 <= baseline.0 as f64 * 1.10, "RSS grew from {} KiB to {} KiB", baseline.0, end.0);
    assert!(end.1 <= baseline.1, "open file descriptors grew from {} to {}", baseline.1, end.1);
    assert!(end.2 <= baseline.2, "threads grew from {} to {}", baseline.2, end.2);
}
