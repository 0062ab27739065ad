//! The one-command demo: `cargo run --release --example demo [-- --seconds 60]`.
//!
//! Starts a Kinesis emulator in-process (ferrokinesis), creates `app-input` (4 shards) and three
//! `app-output-*` streams, produces a steady stream of sample records, and runs the real service
//! on `config/demo.toml`. Every second it prints one line per destination; halfway it creates a
//! fourth `app-output-*` stream to show live discovery. Ctrl-C stops it gracefully. At the end it
//! reads every destination back and tallies what was produced against what each one holds.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region, SharedCredentialsProvider};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use kinesis_fanout::{Service, Settings};
use rand::Rng;
use tokio_util::sync::CancellationToken;

// Shared with the service tests and the benchmark.
#[path = "../tests/common/streams.rs"]
mod streams;
use streams::{OnReadError, read_stream};

const OUTPUTS: [&str; 3] = ["app-output-orders", "app-output-search", "app-output-audit"];
const LATE_OUTPUT: &str = "app-output-billing";
const RECORDS_PER_SECOND: usize = 400;

fn sdk(url: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new("demo", "demo", None, None, "demo")))
        .region(Region::new("us-east-1"))
        .endpoint_url(url)
        .behavior_version(BehaviorVersion::latest())
        .build()
}

async fn create(client: &Client, name: &str, shards: i32) -> anyhow::Result<()> {
    client.create_stream().stream_name(name).shard_count(shards).send().await?;
    for _ in 0..100 {
        let out = client.describe_stream_summary().stream_name(name).send().await?;
        if out.stream_description_summary().is_some_and(|s| *s.stream_status() == StreamStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("stream {name} did not become ACTIVE")
}

/// Order numbers the source stream accepted, and when each was accepted.
type Produced = Arc<Mutex<Vec<(u64, tokio::time::Instant)>>>;

/// A steady stream of order-like JSON records with random customer ids as partition keys; notes
/// the order numbers the source accepted.
async fn produce(client: Client, stop: CancellationToken, produced: Produced) {
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !stop.is_cancelled() {
        tick.tick().await;
        let first = n + 1;
        let entries: Vec<PutRecordsRequestEntry> = (0..RECORDS_PER_SECOND / 10)
            .map(|_| {
                n += 1;
                let customer = rand::rng().random_range(0..5_000);
                let body = format!(r#"{{"order":{n},"customer":{customer},"amount_cents":{}}}"#, n * 37 % 10_000);
                PutRecordsRequestEntry::builder()
                    .partition_key(format!("customer-{customer}"))
                    .data(Blob::new(body))
                    .build()
                    .expect("complete entry")
            })
            .collect();
        if let Ok(out) = client.put_records().stream_name("app-input").set_records(Some(entries)).send().await {
            let now = tokio::time::Instant::now();
            let mut produced = produced.lock().unwrap();
            for (i, entry) in out.records().iter().enumerate() {
                if entry.error_code().is_none() {
                    produced.push((first + i as u64, now));
                }
            }
        }
    }
}

/// The order numbers a stream holds, one per record (duplicates kept).
async fn orders_in(client: &Client, stream: &str) -> anyhow::Result<Vec<u64>> {
    // The emulator keeps GetRecords' limits: a refused read waits and asks again.
    let records = read_stream(client, stream, OnReadError::Retry(Duration::from_millis(250))).await?;
    Ok(records
        .iter()
        .filter_map(|record| {
            let body = String::from_utf8_lossy(&record.data);
            body.split("\"order\":").nth(1).and_then(|r| r.split(',').next()).and_then(|d| d.parse().ok())
        })
        .collect())
}

fn total(metrics: &kinesis_fanout::metrics::Metrics, destination: &str, outcome: &str) -> u64 {
    metrics.records_written.with_label_values(&[destination, outcome]).get()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 =
        std::env::args().skip_while(|a| a != "--seconds").nth(1).map(|s| s.parse()).transpose()?.unwrap_or(60);

    // The emulator, on the port config/demo.toml names (or any free one, overriding the config).
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:4567").await {
        Ok(l) => l,
        Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let url = format!("http://{}", listener.local_addr()?);
    let options = ferrokinesis::store::StoreOptions {
        create_stream_ms: 50,
        enforce_limits: true,
        shard_limit: 100,
        ..Default::default()
    };
    let (app, _store) = ferrokinesis::create_app(options);
    let emulator_stop = CancellationToken::new();
    let until = emulator_stop.clone();
    tokio::spawn(
        async move { ferrokinesis::serve_plain_http(listener, app, async move { until.cancelled().await }).await },
    );

    let client = Client::new(&sdk(&url));
    create(&client, "app-input", 4).await?;
    for name in OUTPUTS {
        create(&client, name, 2).await?;
    }
    let _ = std::fs::remove_file("./data/demo-checkpoints.json");
    let env = [("KINESIS_FANOUT__AWS__ENDPOINT_URL".to_string(), url.clone())];
    let settings = Settings::load_with_env(Path::new("config/demo.toml"), env)?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.log.level));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let service = Service::new(settings, &sdk(&url))?;
    let metrics = service.metrics();
    let progress = service.progress();
    println!("kinesis-fanout demo: emulator at {url}, metrics at http://{}/metrics", service.admin_addr());
    println!("copying app-input (4 shards) to every app-output-* stream for {seconds}s; Ctrl-C stops earlier.\n");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(service.run(shutdown.clone()));
    let producer_stop = CancellationToken::new();
    let produced: Produced = Arc::default();
    let producer = tokio::spawn(produce(client.clone(), producer_stop.clone(), Arc::clone(&produced)));
    println!("in: records/s read from app-input; out: records/s the destination accepted; lag: age of the");
    println!("oldest record not yet accepted by every destination; total: records the destination accepted.\n");

    let mut previous: HashMap<String, u64> = HashMap::new();
    let mut read_before = 0u64;
    let mut late_since = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    for second in 1..=seconds {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => { println!("\nCtrl-C: stopping gracefully."); break; }
        }
        if second == seconds / 2 {
            create(&client, LATE_OUTPUT, 1).await?;
            late_since = Some(tokio::time::Instant::now());
            println!(
                "+ created {LATE_OUTPUT}: discovery picks it up within 2 s, and it gets what is read from then on"
            );
        }
        let read: u64 = ["0", "1", "2", "3"]
            .iter()
            .map(|i| metrics.records_read.with_label_values(&[&format!("shardId-00000000000{i}")]).get())
            .sum();
        let lag = progress
            .all()
            .iter()
            .filter_map(|s| s.oldest_unacknowledged_arrival())
            .filter_map(|t| t.elapsed().ok())
            .max()
            .unwrap_or_default();
        for name in OUTPUTS.iter().chain([LATE_OUTPUT].iter()) {
            let ok = total(&metrics, name, "ok");
            if ok == 0 && !previous.contains_key(*name) && *name == LATE_OUTPUT {
                continue;
            }
            let retries = total(&metrics, name, "retried") + total(&metrics, name, "throttled");
            let before = previous.insert(name.to_string(), ok).unwrap_or(0);
            println!(
                "{second:>3}s  {name:<20} in {:>5}/s  out {:>5}/s  lag {:>5.2}s  retries {retries:>4}  total {ok}",
                read - read_before,
                ok - before,
                lag.as_secs_f64(),
            );
        }
        read_before = read;
    }
    producer_stop.cancel();
    producer.await?;
    // Let the service write what it read, then stop it.
    let everything = produced.lock().unwrap().len() as u64;
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        while OUTPUTS.iter().any(|name| total(&metrics, name, "ok") < everything) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let _ = drained.await;
    shutdown.cancel();
    running.await??;
    println!("\nStopped cleanly; checkpoints are in ./data/demo-checkpoints.json.");

    // The tally: every destination read back.
    let produced = produced.lock().unwrap().clone();
    let all: BTreeSet<u64> = produced.iter().map(|(n, _)| *n).collect();
    println!("\n{} records produced to app-input. What each destination holds:", all.len());
    for name in OUTPUTS.iter().chain([LATE_OUTPUT].iter()) {
        let held = orders_in(&client, name).await?;
        let unique: BTreeSet<u64> = held.iter().copied().collect();
        let duplicates = held.len() - unique.len();
        if *name == LATE_OUTPUT {
            // It starts at LATEST: what was produced before discovery found it is not its.
            let after: BTreeSet<u64> =
                produced.iter().filter(|(_, at)| late_since.is_some_and(|t| *at > t)).map(|(n, _)| *n).collect();
            println!(
                "  {name:<20} {:>6} records (from its discovery on; {} produced after it was created), {duplicates} duplicates",
                unique.len(),
                after.len()
            );
            continue;
        }
        let missing = all.difference(&unique).count();
        println!(
            "  {name:<20} {:>6} of {} records, {missing} missing, {duplicates} duplicates",
            unique.len(),
            all.len()
        );
    }
    emulator_stop.cancel();
    Ok(())
}
