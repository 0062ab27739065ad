//! The one-command demo: `cargo run --release --example demo [-- --seconds 60]`.
//!
//! Starts a Kinesis emulator in-process (ferrokinesis), creates `app-input` (4 shards) and three
//! `app-output-*` streams, produces a steady stream of sample records, and runs the real service
//! on `config/demo.toml`. Every second it prints one line per destination; halfway it creates a
//! fourth `app-output-*` stream to show live discovery. Ctrl-C stops it gracefully.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region, SharedCredentialsProvider};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use kinesis_fanout::{Service, Settings};
use rand::Rng;
use tokio_util::sync::CancellationToken;

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

/// A steady stream of order-like JSON records with random customer ids as partition keys.
async fn produce(client: Client, stop: CancellationToken) {
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !stop.is_cancelled() {
        tick.tick().await;
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
        let _ = client.put_records().stream_name("app-input").set_records(Some(entries)).send().await;
    }
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
    tokio::spawn(produce(client.clone(), producer_stop.clone()));

    let mut previous: HashMap<String, u64> = HashMap::new();
    let mut read_before = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    for second in 1..=seconds {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => { println!("\nCtrl-C: stopping gracefully."); break; }
        }
        if second == seconds / 2 {
            create(&client, LATE_OUTPUT, 1).await?;
            println!("+ created {LATE_OUTPUT}: discovery picks it up within 2 s");
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
    shutdown.cancel();
    running.await??;
    println!("\nStopped cleanly; checkpoints are in ./data/demo-checkpoints.json.");
    emulator_stop.cancel();
    Ok(())
}
