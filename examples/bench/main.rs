//! The benchmark: the real `kinesis-fanout` binary against the SDK's own floor, in one run.
//!
//! `cargo run --release --example bench -- [--scenario NAME] [--records N] [--record-size B]
//! [--shards S] [--destinations D] [--smoke] [--case CASE]`
//!
//! Starts a Kinesis emulator in this process (ferrokinesis; shard limits off), runs the service
//! binary as a child process with a generated config, and reads the child's CPU time and peak RSS
//! from /proc. Prints a table and one JSON line per scenario. `--smoke` runs every scenario with
//! tiny sizes (CI checks that it runs and prints valid JSON, not its speed).
//!
//! Two scenarios print one line per case: `fleet-sim` (the lease protocol of up to 100 workers
//! and 10,000 shards, simulated on a paused clock; `--case` runs one) and `fleet` (worker
//! processes sharing a lease table on dynoxide).

// The benchmark measures wall time, outside any paused clock.
#![allow(clippy::disallowed_types)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region, SharedCredentialsProvider};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{
    PutRecordsRequestEntry, ShardIteratorType, StartingPosition, StreamStatus, SubscribeToShardEventStream,
};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

mod fleet;
mod fleet_sim;

// Shared with the service tests: the DynamoDB double and the stream reader.
#[path = "../../tests/common/dynamo.rs"]
mod dynamo;
#[path = "../../tests/common/streams.rs"]
mod streams;

use streams::{OnReadError, out_of_order, read_stream};

#[derive(Debug, Clone)]
struct Opts {
    scenario: Option<String>,
    records: usize,
    record_size: usize,
    shards: i32,
    destinations: usize,
    smoke: bool,
}

fn parse_opts() -> anyhow::Result<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let smoke = args.iter().any(|a| a == "--smoke");
    Ok(Opts {
        scenario: value("--scenario"),
        records: value("--records").map(|v| v.parse()).transpose()?.unwrap_or(if smoke { 2_000 } else { 200_000 }),
        record_size: value("--record-size").map(|v| v.parse()).transpose()?.unwrap_or(1024),
        shards: value("--shards").map(|v| v.parse()).transpose()?.unwrap_or(4),
        destinations: value("--destinations").map(|v| v.parse()).transpose()?.unwrap_or(3),
        smoke,
    })
}

fn sdk(url: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new("bench", "bench", None, None, "bench")))
        .region(Region::new("us-east-1"))
        .endpoint_url(url)
        .behavior_version(BehaviorVersion::latest())
        .build()
}

/// The emulator, with a switch that makes PutRecords to one stream fail (the `stall` scenario).
struct Emulator {
    url: String,
    reject: Arc<Mutex<Option<String>>>,
    _stop: tokio_util::sync::DropGuard,
}

async fn reject_layer(State(reject): State<Arc<Mutex<Option<String>>>>, request: Request, next: Next) -> Response {
    let put = request.headers().get("x-amz-target").is_some_and(|v| v.as_bytes().ends_with(b"PutRecords"));
    let target = reject.lock().unwrap().clone();
    match target {
        Some(stream) if put => {
            let (parts, body) = request.into_parts();
            let bytes = axum::body::to_bytes(body, 64 << 20).await.unwrap_or_default();
            if bytes.windows(stream.len()).any(|w| w == stream.as_bytes()) {
                let body = r#"{"__type":"InternalFailure","message":"bench stall"}"#;
                return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, body).into_response();
            }
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
        }
        _ => next.run(request).await,
    }
}

async fn start_emulator() -> anyhow::Result<Emulator> {
    // AWS sends SubscribeToShard events of about a megabyte at most (a shard reads 2 MB/s); the
    // emulator's default of 10,000 records per event would make every reader hold 10 MB.
    start_emulator_with(1_000).await
}

async fn start_emulator_with(event_records: usize) -> anyhow::Result<Emulator> {
    serve_emulator(ferrokinesis::store::StoreOptions {
        create_stream_ms: 10,
        shard_limit: 1_000,
        subscribe_to_shard_event_record_limit: event_records,
        ..Default::default()
    })
    .await
}

/// An emulator with AWS-like shard limits: 1,000 records/s and 1 MiB/s written per shard (a
/// faster writer is throttled, record by record), 5 GetRecords calls/s per shard.
async fn start_limited_emulator() -> anyhow::Result<Emulator> {
    serve_emulator(ferrokinesis::store::StoreOptions {
        create_stream_ms: 10,
        shard_limit: 1_000,
        subscribe_to_shard_event_record_limit: 1_000,
        enforce_limits: true,
        ..Default::default()
    })
    .await
}

async fn serve_emulator(options: ferrokinesis::store::StoreOptions) -> anyhow::Result<Emulator> {
    let (app, _store) = ferrokinesis::create_app(options);
    let reject = Arc::new(Mutex::new(None));
    let app = app.layer(axum::middleware::from_fn_with_state(Arc::clone(&reject), reject_layer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let until = stop.clone();
    tokio::spawn(
        async move { ferrokinesis::serve_plain_http(listener, app, async move { until.cancelled().await }).await },
    );
    Ok(Emulator { url, reject, _stop: stop.drop_guard() })
}

async fn create(client: &Client, name: &str, shards: i32) -> anyhow::Result<()> {
    client.create_stream().stream_name(name).shard_count(shards).send().await?;
    loop {
        let out = client.describe_stream_summary().stream_name(name).send().await?;
        if out.stream_description_summary().is_some_and(|s| *s.stream_status() == StreamStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn record(i: usize, size: usize) -> PutRecordsRequestEntry {
    let mut data = format!("{i:012}").into_bytes();
    data.resize(size.max(12), b'x');
    PutRecordsRequestEntry::builder()
        .partition_key(format!("pk-{}", i.wrapping_mul(2_654_435_761) % 100_003))
        .data(Blob::new(data))
        .build()
        .expect("complete")
}

/// A JSON record of about `size` bytes: every second one from region "eu".
fn json_record(i: usize, size: usize) -> PutRecordsRequestEntry {
    let region = if i.is_multiple_of(2) { "eu" } else { "us" };
    let head = format!(r#"{{"seq":{i},"region":"{region}","total":{},"pad":""#, i % 997);
    let pad = size.saturating_sub(head.len() + 2);
    let data = format!("{head}{}\"}}", "x".repeat(pad));
    PutRecordsRequestEntry::builder()
        .partition_key(format!("pk-{}", i.wrapping_mul(2_654_435_761) % 100_003))
        .data(Blob::new(data.into_bytes()))
        .build()
        .expect("complete")
}

/// Puts records `from..to`, 500 per request, 4 requests at a time.
async fn produce(client: &Client, stream: &str, from: usize, to: usize, size: usize) -> anyhow::Result<()> {
    produce_with(client, stream, from, to, size, record).await
}

/// As [`produce`], each record made by `make`.
async fn produce_with(
    client: &Client,
    stream: &str,
    from: usize,
    to: usize,
    size: usize,
    make: fn(usize, usize) -> PutRecordsRequestEntry,
) -> anyhow::Result<()> {
    let batches: Vec<Vec<PutRecordsRequestEntry>> =
        (from..to).collect::<Vec<_>>().chunks(500).map(|c| c.iter().map(|i| make(*i, size)).collect()).collect();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(batches)
        .map(|entries| async move { put_until_accepted(client, stream, entries, Duration::ZERO).await })
        .buffer_unordered(4)
        .collect()
        .await;
    results.into_iter().collect()
}

/// The service binary: `KINESIS_FANOUT_BIN` when set (CI reuses the test build), else the one
/// next to this example, built first in the same profile so it is never stale.
fn service_binary() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("KINESIS_FANOUT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).ok_or_else(|| anyhow::anyhow!("unexpected example path"))?;
    let bin = profile_dir.join("kinesis-fanout");
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "--bin", "kinesis-fanout"]);
    if release {
        build.arg("--release");
    }
    if !build.status()?.success() {
        anyhow::bail!("building the service binary failed");
    }
    Ok(bin)
}

struct Service {
    child: Child,
    metrics: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn_service(bin: &Path, dir: &Path, url: &str, max_in_flight: &str) -> anyhow::Result<Service> {
    spawn_service_with(bin, dir, url, max_in_flight, "")
}

/// As [`spawn_service`], with `extra` keys for the destination group.
fn spawn_service_with(bin: &Path, dir: &Path, url: &str, max_in_flight: &str, extra: &str) -> anyhow::Result<Service> {
    let port = free_port()?;
    let config = format!(
        r#"[aws]
region = "us-east-1"
endpoint_url = "{url}"
[source]
stream_name = "bench-in"
consumer_name = "bench-service"
[[destinations]]
pattern = "^bench-out-.*$"
refresh_interval = "5s"
records_per_second = "100000000"
bytes_per_second = "100GiB"
max_in_flight_bytes = "{max_in_flight}"
linger = "50ms"
initial_backoff = "50ms"
max_backoff = "1s"
{extra}
[checkpoint]
path = "{checkpoint}"
interval = "1s"
[metrics]
listen = "127.0.0.1:{port}"
[log]
level = "warn"
"#,
        checkpoint = dir.join("checkpoints.json").display()
    );
    let child = run_binary(bin, dir, "bench", &config)?;
    Ok(Service { child, metrics: format!("http://127.0.0.1:{port}/metrics") })
}

/// Starts `kinesis-fanout run` with `config` (written to `<name>.toml` in `dir`, its log to
/// `<name>.log`): the bare binary, with no allocator variables (it configures its own).
fn run_binary(bin: &Path, dir: &Path, name: &str, config: &str) -> anyhow::Result<Child> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config)?;
    Ok(Command::new(bin)
        .args(["run", "--config"])
        .arg(&path)
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench")
        .env("AWS_REGION", "us-east-1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?)
        .spawn()?)
}

/// (CPU seconds, peak RSS MiB) of a running process, from /proc.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the command name; 100 ticks/s.
    let ticks: f64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<f64>().ok()).sum();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    (ticks / 100.0, hwm_kib / 1024.0)
}

async fn scrape(url: &str) -> String {
    match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Sum of the samples of `name` whose labels contain `filter`.
fn sum(page: &str, name: &str, filter: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A quantile of a Prometheus histogram, interpolated within its bucket, in milliseconds.
fn quantile_ms(page: &str, name: &str, q: f64) -> f64 {
    let bucket = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = page
        .lines()
        .filter_map(|l| l.strip_prefix(&bucket))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, count.parse().ok()?))
        })
        .collect();
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    if total == 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return previous.0 * 1000.0;
            }
            let within = if count > previous.1 { (rank - previous.1) / (count - previous.1) } else { 1.0 };
            return (previous.0 + (le - previous.0) * within) * 1000.0;
        }
        previous = (le, count);
    }
    previous.0 * 1000.0
}

fn delivered(page: &str, destination: &str) -> f64 {
    sum(page, "kinesis_fanout_destination_records_total", &format!("destination=\"{destination}\",outcome=\"ok\""))
}

async fn wait_delivered(
    service: &Service,
    destinations: &[String],
    each: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let page = scrape(&service.metrics).await;
        if destinations.iter().all(|d| delivered(&page, d) >= each as f64) {
            return Ok(());
        }
        if start.elapsed() > limit {
            anyhow::bail!("destinations did not receive {each} records each within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stop(mut service: Service) {
    let _ = Command::new("kill").args(["-TERM", &service.child.id().to_string()]).status();
    let _ = service.child.wait();
}

type Report = BTreeMap<&'static str, serde_json::Value>;

async fn setup(opts: &Opts, prefix: &str) -> anyhow::Result<(Emulator, Client, Vec<String>)> {
    let emulator = start_emulator().await?;
    let client = Client::new(&sdk(&emulator.url));
    create(&client, "bench-in", opts.shards).await?;
    let names: Vec<String> = (0..opts.destinations).map(|i| format!("{prefix}{i}")).collect();
    for name in &names {
        create(&client, name, 4).await?;
    }
    Ok((emulator, client, names))
}

async fn drain(opts: &Opts, bin: &Path) -> anyhow::Result<Report> {
    let (emulator, client, names) = setup(opts, "bench-out-").await?;
    let floor_names: Vec<String> = (0..opts.destinations).map(|i| format!("floor-out-{i}")).collect();
    for name in &floor_names {
        create(&client, name, 4).await?;
    }
    produce(&client, "bench-in", 0, opts.records, opts.record_size).await?;
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let service = spawn_service(bin, dir.path(), &emulator.url, "32MiB")?;
    wait_delivered(&service, &names, opts.records, Duration::from_secs(600)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let (cpu, rss) = usage(service.child.id());
    let page = scrape(&service.metrics).await;
    stop(service);

    // The floor: a bare SDK reader/writer, same batches and concurrency, in its own process.
    let floor = Command::new(std::env::current_exe()?)
        .args(["--floor-worker", &emulator.url, &opts.records.to_string(), &floor_names.join(",")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()?;
    let floor_pid = floor.id();
    let sampler = tokio::spawn(async move {
        let mut last = (0.0, 0.0);
        loop {
            let now = usage(floor_pid);
            if now.0 == 0.0 && now.1 == 0.0 {
                return last;
            }
            last = now;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let output = tokio::task::spawn_blocking(move || floor.wait_with_output()).await??;
    let reported: f64 = String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or(0.0);
    let sampled = sampler.await?.0;
    let floor_cpu = if reported > 0.0 { reported } else { sampled };

    let gb = (opts.records * opts.record_size * opts.destinations) as f64 / 1e9;
    let mut r = Report::new();
    r.insert("records_per_s", json!(((opts.records * opts.destinations) as f64 / elapsed).round()));
    r.insert("mb_per_s", json!(round2(gb * 1000.0 / elapsed)));
    r.insert("cpu_s_per_gb", json!(round2(cpu / gb)));
    r.insert("floor_cpu_s_per_gb", json!(round2(floor_cpu / gb)));
    r.insert("ratio", json!(round2(if floor_cpu > 0.0 { cpu / floor_cpu } else { 0.0 })));
    r.insert("peak_rss_mib", json!(round2(rss)));
    r.insert("p50_ms", json!(round2(quantile_ms(&page, "kinesis_fanout_delivery_latency_seconds", 0.5))));
    r.insert("p99_ms", json!(round2(quantile_ms(&page, "kinesis_fanout_delivery_latency_seconds", 0.99))));
    Ok(r)
}

/// A JSON filter's cost: the same JSON records copied without a filter, with a group filter that
/// every record passes (`/region` in eu, us: the cost of judging alone), and with one that half
/// pass (`/region` = eu); CPU per GB judged (read x destinations).
async fn filter(opts: &Opts, bin: &Path) -> anyhow::Result<Report> {
    let mut r = Report::new();
    let runs = [
        ("plain", "", 1),
        ("all_pass", r#"filter = { json = { "/region" = ["eu", "us"] } }"#, 1),
        ("half_pass", r#"filter = { json = { "/region" = "eu" } }"#, 2),
    ];
    for (label, extra, share) in runs {
        let (emulator, client, names) = setup(opts, "bench-out-").await?;
        produce_with(&client, "bench-in", 0, opts.records, opts.record_size, json_record).await?;
        let dir = tempfile::tempdir()?;
        let started = Instant::now();
        let service = spawn_service_with(bin, dir.path(), &emulator.url, "32MiB", extra)?;
        let each = opts.records.div_ceil(share);
        wait_delivered(&service, &names, each, Duration::from_secs(600)).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let (cpu, rss) = usage(service.child.id());
        stop(service);
        let gb = (opts.records * opts.record_size * opts.destinations) as f64 / 1e9;
        let key = |what: &str| -> &'static str { Box::leak(format!("{label}_{what}").into_boxed_str()) };
        r.insert(key("cpu_s_per_gb"), json!(round2(cpu / gb)));
        r.insert(key("records_per_s"), json!(((opts.records * opts.destinations) as f64 / elapsed).round()));
        r.insert(key("peak_rss_mib"), json!(round2(rss)));
    }
    Ok(r)
}

/// Order per key under throttling (`destinations[].ordering`): batched against strict, at 10,000
/// keys and at 10 hot keys, into a 2-shard destination the emulator's shard limits throttle.
/// Two runs of each: a backlog (the service writes as fast as it can: records/s, service start
/// included) and a steady producer at each of [`PACED_RATES`] while the service runs (p50 and p99 delivery
/// latency: queued behind a backlog, every record would sit in the histogram's top bucket).
/// Both report records throttled and records that landed after a newer record of their key, per
/// million, the source's order per key being the truth.
async fn strict(opts: &Opts, bin: &Path) -> anyhow::Result<Report> {
    let records = if opts.smoke { 2_000 } else { 20_000 };
    let seconds = if opts.smoke { 2 } else { 20 };
    let mut r = Report::new();
    for (keys_label, keys) in [("10000_keys", 10_000usize), ("10_hot_keys", 10)] {
        for mode in ["batched", "strict"] {
            let key =
                |what: &str| -> &'static str { Box::leak(format!("{keys_label}_{mode}_{what}").into_boxed_str()) };
            let run = OrderRun { bin, keys, mode };
            let (elapsed, page, late) = run.backlog(records).await?;
            r.insert(key("records_per_s"), json!((records as f64 / elapsed).round()));
            r.insert(key("throttled"), json!(throttled(&page)));
            r.insert(key("out_of_order_per_million"), json!((late as f64 * 1e6 / records as f64).round()));
            let rates = if opts.smoke { &PACED_RATES[..1] } else { &PACED_RATES[..] };
            for &rate in rates {
                let (put, page, late) = run.paced(rate, seconds).await?;
                let key = |what: &str| key(&format!("paced_{rate}_{what}"));
                let latency = |q| json!(round2(quantile_ms(&page, "kinesis_fanout_delivery_latency_seconds", q)));
                r.insert(key("p50_ms"), latency(0.5));
                r.insert(key("p99_ms"), latency(0.99));
                r.insert(key("throttled"), json!(throttled(&page)));
                r.insert(key("out_of_order_per_million"), json!((late as f64 * 1e6 / put as f64).round()));
            }
        }
    }
    Ok(r)
}

/// The steady producer's rates in the `strict` scenario, records/s: about 60% and 90% of what
/// the 2-shard destination takes of these records (2 MB/s), so that a mode that keeps up shows
/// its own latency, with no throttling and with some.
const PACED_RATES: [usize; 2] = [1_000, 1_250];

fn throttled(page: &str) -> f64 {
    // An empty sum of floats is -0.0.
    sum(page, "kinesis_fanout_destination_records_total", "outcome=\"throttled\"") + 0.0
}

/// One run of the `strict` scenario: a fresh emulator with shard limits, a 4-shard source and a
/// 2-shard destination, the service in `mode`, records over `keys` keys.
struct OrderRun<'a> {
    bin: &'a Path,
    keys: usize,
    mode: &'a str,
}

impl OrderRun<'_> {
    async fn start(&self) -> anyhow::Result<(Emulator, Client, tempfile::TempDir)> {
        let emulator = start_limited_emulator().await?;
        let client = Client::new(&sdk(&emulator.url));
        create(&client, "bench-in", 4).await?;
        create(&client, "bench-out-0", 2).await?;
        Ok((emulator, client, tempfile::tempdir()?))
    }

    fn service(&self, dir: &Path, url: &str) -> anyhow::Result<Service> {
        spawn_service_with(self.bin, dir, url, "32MiB", &format!("ordering = \"{}\"", self.mode))
    }

    /// `records` put first, then the service started: seconds until it wrote them, its metrics,
    /// records out of order.
    async fn backlog(&self, records: usize) -> anyhow::Result<(f64, String, usize)> {
        let (emulator, client, dir) = self.start().await?;
        for from in (0..records).step_by(500) {
            put_keyed(&client, from..(from + 500).min(records), self.keys).await?;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let started = Instant::now();
        let service = self.service(dir.path(), &emulator.url)?;
        wait_delivered(&service, &["bench-out-0".to_string()], records, Duration::from_secs(900)).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let (page, late) = self.finish(service, &client).await?;
        Ok((elapsed, page, late))
    }

    /// `rate` records/s put for `seconds` while the service runs: how many were put, its metrics,
    /// records out of order.
    async fn paced(&self, rate: usize, seconds: usize) -> anyhow::Result<(usize, String, usize)> {
        let (emulator, client, dir) = self.start().await?;
        let service = self.service(dir.path(), &emulator.url)?;
        let per_tick = rate / 10;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut put = 0;
        for _ in 0..seconds * 10 {
            tick.tick().await;
            put_keyed(&client, put..put + per_tick, self.keys).await?;
            put += per_tick;
        }
        wait_delivered(&service, &["bench-out-0".to_string()], put, Duration::from_secs(600)).await?;
        let (page, late) = self.finish(service, &client).await?;
        Ok((put, page, late))
    }

    /// Stops the service; its metrics and the records that landed after a newer one of their key.
    async fn finish(&self, service: Service, client: &Client) -> anyhow::Result<(String, usize)> {
        let page = scrape(&service.metrics).await;
        stop(service);
        let retry = OnReadError::Retry(Duration::from_millis(250));
        let source = read_stream(client, "bench-in", retry).await?;
        let landed = read_stream(client, "bench-out-0", retry).await?;
        Ok((page, out_of_order(&landed, &source)))
    }
}

/// Puts records `range` of `keys` keys in one request (at most 500), failed ones again until none
/// is left: the order per key is the put order but for a throttled record (the source, read back,
/// is the truth).
async fn put_keyed(client: &Client, range: std::ops::Range<usize>, keys: usize) -> anyhow::Result<()> {
    let entries = range.map(|i| keyed_record(i, keys)).collect();
    put_until_accepted(client, "bench-in", entries, Duration::from_millis(50)).await
}

/// Puts `entries` in one request, and the failed ones again (after `pause`) until none is left.
async fn put_until_accepted(
    client: &Client,
    stream: &str,
    mut pending: Vec<PutRecordsRequestEntry>,
    pause: Duration,
) -> anyhow::Result<()> {
    while !pending.is_empty() {
        let out = client.put_records().stream_name(stream).set_records(Some(pending.clone())).send().await?;
        pending = pending
            .into_iter()
            .zip(out.records())
            .filter(|(_, e)| e.error_code().is_some())
            .map(|(entry, _)| entry)
            .collect();
        if !pending.is_empty() && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    Ok(())
}

/// Record `i` of `keys` keys, its data unique (its index first): three of 300 bytes, then one of
/// 4,000, so that a shard's bytes (not its 1,000 records) run out first, and a large record is
/// throttled while the small ones of its key behind it in the same request still fit (a request
/// stays under the emulator's 2 MB body limit).
fn keyed_record(i: usize, keys: usize) -> PutRecordsRequestEntry {
    let mut data = format!("{i:012}").into_bytes();
    data.resize(if i % 4 == 3 { 4_000 } else { 300 }, b'x');
    PutRecordsRequestEntry::builder()
        .partition_key(format!("key-{}", i % keys))
        .data(Blob::new(data))
        .build()
        .expect("complete")
}

/// The emulator's default events (up to 10,000 records, 10 MB at 1 KiB) against a 64 MiB memory
/// budget: peak RSS must stay within `memory.limit`.
async fn big_events(opts: &Opts, bin: &Path) -> anyhow::Result<Report> {
    let emulator = start_emulator_with(10_000).await?;
    let client = Client::new(&sdk(&emulator.url));
    create(&client, "bench-in", opts.shards).await?;
    let names: Vec<String> = (0..opts.destinations).map(|i| format!("bench-out-{i}")).collect();
    for name in &names {
        create(&client, name, 4).await?;
    }
    let records = if opts.smoke { 2_000 } else { opts.records };
    produce(&client, "bench-in", 0, records, opts.record_size).await?;
    let dir = tempfile::tempdir()?;
    let limit_mib = 96.0;
    let extra = format!("[memory]\nlimit = \"{limit_mib}MiB\"");
    let started = Instant::now();
    let service = spawn_service_with(bin, dir.path(), &emulator.url, "32MiB", &extra)?;
    wait_delivered(&service, &names, records, Duration::from_secs(600)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let (cpu, rss) = usage(service.child.id());
    stop(service);
    let mut r = Report::new();
    r.insert("records_per_s", json!(((records * opts.destinations) as f64 / elapsed).round()));
    r.insert("cpu_s", json!(round2(cpu)));
    r.insert("peak_rss_mib", json!(round2(rss)));
    r.insert("memory_limit_mib", json!(limit_mib));
    r.extend(slow_but_draining(opts, bin, 10_000, 96).await?);
    Ok(r)
}

/// A slow destination that still drains (rate-limited to a quarter of the source's rate) beside
/// healthy ones, under a memory limit far below its backlog, with the bare binary: the healthy
/// destinations' share of what was produced and p99 lag behind the producer while it runs, how
/// long the slow one takes to get everything after the load ends, and peak RSS against the limit.
/// `event_records`: the most records the emulator puts in one SubscribeToShard event.
async fn slow_but_draining(opts: &Opts, bin: &Path, event_records: usize, limit_mib: u64) -> anyhow::Result<Report> {
    let emulator = start_emulator_with(event_records).await?;
    let client = Client::new(&sdk(&emulator.url));
    create(&client, "bench-in", opts.shards).await?;
    let healthy: Vec<String> = (0..opts.destinations.max(2) - 1).map(|i| format!("bench-out-{i}")).collect();
    for name in &healthy {
        create(&client, name, 4).await?;
    }
    let slow = "bench-slow-0".to_string();
    create(&client, &slow, 1).await?;
    let (rate, slow_rate) = (3_000, 1_000);
    let extra = format!(
        "detach_after = \"2s\"\n[[destinations]]\npattern = \"^bench-slow-.*$\"\nrefresh_interval = \"5s\"\n\
         records_per_second = \"{slow_rate}\"\nlinger = \"50ms\"\ndetach_after = \"2s\"\n[memory]\nlimit = \"{limit_mib}MiB\""
    );
    let dir = tempfile::tempdir()?;
    let service = spawn_service_with(bin, dir.path(), &emulator.url, "32MiB", &extra)?;
    let seconds = if opts.smoke { 2 } else { 20 };
    let per_tick = rate / 10;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let (mut put, mut lags) = (0usize, Vec::new());
    let mut healthy_at_end = 0.0;
    for _ in 0..seconds * 10 {
        tick.tick().await;
        produce(&client, "bench-in", put, put + per_tick, opts.record_size).await?;
        put += per_tick;
        let page = scrape(&service.metrics).await;
        let slowest = healthy.iter().map(|d| delivered(&page, d)).fold(f64::INFINITY, f64::min);
        lags.push((put as f64 - slowest).max(0.0) / rate as f64 * 1000.0);
        healthy_at_end = slowest;
    }
    wait_delivered(&service, &healthy, put, Duration::from_secs(120)).await?;
    let ended = Instant::now();
    wait_delivered(&service, std::slice::from_ref(&slow), put, Duration::from_secs(900)).await?;
    let slow_done = ended.elapsed().as_secs_f64();
    let (_, rss) = usage(service.child.id());
    let page = scrape(&service.metrics).await;
    stop(service);
    lags.sort_by(f64::total_cmp);
    let p99 = lags.get(((lags.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0.0);
    let mut r = Report::new();
    r.insert("slow_healthy_share", json!(round2(healthy_at_end / put as f64)));
    r.insert("slow_healthy_lag_p99_ms", json!(round2(p99)));
    r.insert("slow_done_after_load_s", json!(round2(slow_done)));
    r.insert("slow_sheds", json!(sum(&page, "kinesis_fanout_destination_shed_total", &slow)));
    r.insert("slow_peak_rss_mib", json!(round2(rss)));
    r.insert("slow_memory_limit_mib", json!(limit_mib));
    Ok(r)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Produces `rate` records/s for `seconds`, from `offset`. Returns how many were put.
async fn steady(client: &Client, rate: usize, seconds: u64, offset: usize, size: usize) -> anyhow::Result<usize> {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let per_tick = (rate / 10).max(1);
    let mut put = 0;
    for _ in 0..seconds * 10 {
        tick.tick().await;
        produce(client, "bench-in", offset + put, offset + put + per_tick, size).await?;
        put += per_tick;
    }
    Ok(put)
}

async fn latency(opts: &Opts, bin: &Path) -> anyhow::Result<Report> {
    let (emulator, client, names) = setup(opts, "bench-out-").await?;
    let dir = tempfile::tempdir()?;
    let service = spawn_service(bin, dir.path(), &emulator.url, "32MiB")?;
    let seconds = if opts.smoke { 2 } else { 30 };
    let put = steady(&client, 2_000, seconds, 0, opts.record_size).await?;
    wait_delivered(&service, &names, put, Duration::from_secs(60)).await?;
    let (cpu, rss) = usage(service.child.id());
    let page = scrape(&service.metrics).await;
    stop(service);
    let mut r = Report::new();
    r.insert("records_per_s", json!(put as f64 / seconds as f64));
    r.insert("cpu_s", json!(round2(cpu)));
    r.insert("peak_rss_mib", json!(round2(rss)));
    r.insert("p50_ms", json!(round2(quantile_ms(&page, "kinesis_fanout_delivery_latency_seconds", 0.5))));
    r.insert("p99_ms", json!(round2(quantile_ms(&page, "kinesis_fanout_delivery_latency_seconds", 0.99))));
    r.insert("max_ms", json!(round2(quantile_ms(&page, "kinesis_fanout_delivery_latency_seconds", 1.0))));
    r.insert("arrival_p99_ms", json!(round2(quantile_ms(&page, "kinesis_fanout_end_to_end_latency_seconds", 0.99))));
    Ok(r)
}

/// One destination of three rejects everything for a while. The others must not notice: their
/// lag behind the producer (records put minus records they accepted, in seconds of production) is
/// sampled every 100 ms before the stall and during it.
async fn stall(opts: &Opts, bin: &Path) -> anyhow::Result<Report> {
    let (emulator, client, names) = setup(opts, "bench-out-").await?;
    let dir = tempfile::tempdir()?;
    let service = spawn_service(bin, dir.path(), &emulator.url, "32MiB")?;
    let broken = names[names.len() - 1].clone();
    let healthy = &names[..names.len() - 1];
    let (before_s, stall_s) = if opts.smoke { (1, 2) } else { (10, 30) };
    let rate = 2_000;
    let per_tick = rate / 10;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let (mut put, mut lag_before, mut lag_during) = (0usize, Vec::new(), Vec::new());
    let mut healthy_at_end = 0.0;
    for i in 0..(before_s + stall_s) * 10 {
        if i == before_s * 10 {
            *emulator.reject.lock().unwrap() = Some(broken.clone());
        }
        tick.tick().await;
        produce(&client, "bench-in", put, put + per_tick, opts.record_size).await?;
        put += per_tick;
        let page = scrape(&service.metrics).await;
        let slowest = healthy.iter().map(|d| delivered(&page, d)).fold(f64::INFINITY, f64::min);
        let lag_ms = (put as f64 - slowest).max(0.0) / rate as f64 * 1000.0;
        if i < before_s * 10 {
            lag_before.push(lag_ms)
        } else {
            lag_during.push(lag_ms)
        }
        healthy_at_end = slowest;
    }
    let put_at_end = put;
    *emulator.reject.lock().unwrap() = None;
    let healed = Instant::now();
    wait_delivered(&service, &names, put, Duration::from_secs(300)).await?;
    let catch_up = healed.elapsed().as_secs_f64();
    let (cpu, rss) = usage(service.child.id());
    let page = scrape(&service.metrics).await;
    stop(service);
    let p99 = |samples: &mut Vec<f64>| {
        samples.sort_by(f64::total_cmp);
        samples.get(((samples.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0.0)
    };
    let (before, during) = (p99(&mut lag_before), p99(&mut lag_during));
    let mut r = Report::new();
    r.insert("records_put", json!(put));
    r.insert("healthy_share_during_stall", json!(round2(healthy_at_end / put_at_end as f64)));
    r.insert("healthy_lag_p99_ms_before", json!(round2(before)));
    r.insert("healthy_lag_p99_ms_during", json!(round2(during)));
    r.insert("lag_ratio", json!(round2(during / before.max(100.0))));
    r.insert("catch_up_s", json!(round2(catch_up)));
    r.insert("catch_up_records", json!(sum(&page, "kinesis_fanout_destination_catch_up_records_total", &broken)));
    r.insert("cpu_s", json!(round2(cpu)));
    r.insert("peak_rss_mib", json!(round2(rss)));
    r.extend(slow_but_draining(opts, bin, 1_000, 64).await?);
    Ok(r)
}

/// A destination created while running, in a group that starts at the trim horizon: the whole
/// retained stream reaches it by GetRecords catch-up. Compared with the live path that delivered
/// the same records to the first destination.
async fn backfill(opts: &Opts, bin: &Path) -> anyhow::Result<Report> {
    let single = Opts { destinations: 1, ..opts.clone() };
    let (emulator, client, names) = setup(&single, "bench-out-").await?;
    let dir = tempfile::tempdir()?;
    let records = if opts.smoke { 2_000 } else { opts.records / 2 };
    // Produced before the service starts: the emulator's runtime must not be shared by the
    // producer's and the service's PutRecords at once (ferrokinesis 0.7 can deadlock).
    produce(&client, "bench-in", 0, records, opts.record_size).await?;
    let started = Instant::now();
    let service = spawn_service_with(bin, dir.path(), &emulator.url, "32MiB", "start_position = \"trim_horizon\"")?;
    wait_delivered(&service, &names, records, Duration::from_secs(600)).await?;
    let live_s = started.elapsed().as_secs_f64();
    let newcomer = "bench-out-backfill".to_string();
    create(&client, &newcomer, 4).await?;
    let started = Instant::now();
    wait_delivered(&service, std::slice::from_ref(&newcomer), records, Duration::from_secs(600)).await?;
    let backfill_s = started.elapsed().as_secs_f64();
    let (cpu, rss) = usage(service.child.id());
    stop(service);
    let mut r = Report::new();
    r.insert("records", json!(records));
    r.insert("live_records_per_s", json!(round2(records as f64 / live_s)));
    r.insert("backfill_records_per_s", json!(round2(records as f64 / backfill_s)));
    r.insert("backfill_vs_live", json!(round2(live_s / backfill_s)));
    r.insert("cpu_s", json!(round2(cpu)));
    r.insert("peak_rss_mib", json!(round2(rss)));
    Ok(r)
}

async fn wide(opts: &Opts, bin: &Path) -> anyhow::Result<Report> {
    let wide =
        Opts { shards: if opts.smoke { 8 } else { 64 }, destinations: if opts.smoke { 3 } else { 10 }, ..opts.clone() };
    let (emulator, client, names) = setup(&wide, "bench-out-").await?;
    let dir = tempfile::tempdir()?;
    let service = spawn_service(bin, dir.path(), &emulator.url, "8MiB")?;
    let seconds = if opts.smoke { 2 } else { 60 };
    let rate = 50 * wide.shards as usize;
    let put = steady(&client, rate, seconds, 0, opts.record_size).await?;
    let stopped = Instant::now();
    wait_delivered(&service, &names, put, Duration::from_secs(120)).await?;
    let catch_up = stopped.elapsed().as_secs_f64();
    let page = scrape(&service.metrics).await;
    let (cpu, rss) = usage(service.child.id());
    stop(service);
    let mut r = Report::new();
    r.insert("records_per_s", json!(rate));
    r.insert("shards", json!(wide.shards));
    r.insert("destinations", json!(wide.destinations));
    r.insert("catch_up_after_stop_s", json!(round2(catch_up)));
    r.insert("kept_up", json!(catch_up < 2.0));
    r.insert("cpu_s", json!(round2(cpu)));
    r.insert("peak_rss_mib", json!(round2(rss)));
    r.insert("p99_ms", json!(round2(quantile_ms(&page, "kinesis_fanout_delivery_latency_seconds", 0.99))));
    Ok(r)
}

/// The floor: reads the source with SubscribeToShard and writes every record to each destination
/// with PutRecords, 500 per request, one request in flight per destination, like the service.
/// Prints its own CPU seconds when done.
async fn floor_worker(url: &str, records: usize, destinations: Vec<String>) -> anyhow::Result<()> {
    let client = Client::new(&sdk(url));
    let stream = client.describe_stream_summary().stream_name("bench-in").send().await?;
    let arn = stream.stream_description_summary().map(|s| s.stream_arn().to_string()).unwrap_or_default();
    let consumer = client.register_stream_consumer().stream_arn(&arn).consumer_name("bench-floor").send().await?;
    let consumer_arn = consumer.consumer().map(|c| c.consumer_arn().to_string()).unwrap_or_default();
    loop {
        let d = client.describe_stream_consumer().consumer_arn(&consumer_arn).send().await?;
        if d.consumer_description().is_some_and(|c| c.consumer_status().as_str() == "ACTIVE") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shards = client.list_shards().stream_name("bench-in").send().await?;
    let mut writers = Vec::new();
    let mut senders = Vec::new();
    for name in destinations {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Arc<Vec<(String, bytes::Bytes)>>>(64);
        senders.push(tx);
        let client = client.clone();
        writers.push(tokio::spawn(async move {
            let mut written = 0;
            while written < records {
                let Some(batch) = rx.recv().await else { break };
                for chunk in batch.chunks(500) {
                    let entries: Vec<PutRecordsRequestEntry> = chunk
                        .iter()
                        .map(|(pk, data)| {
                            PutRecordsRequestEntry::builder()
                                .partition_key(pk)
                                .data(Blob::new(data.to_vec()))
                                .build()
                                .expect("complete")
                        })
                        .collect();
                    let _ = client.put_records().stream_name(&name).set_records(Some(entries)).send().await;
                    written += chunk.len();
                }
            }
        }));
    }
    for shard in shards.shards() {
        let client = client.clone();
        let consumer_arn = consumer_arn.clone();
        let shard_id = shard.shard_id().to_string();
        let senders = senders.clone();
        tokio::spawn(async move {
            let mut out = client
                .subscribe_to_shard()
                .consumer_arn(consumer_arn)
                .shard_id(shard_id)
                .starting_position(
                    StartingPosition::builder().r#type(ShardIteratorType::TrimHorizon).build().expect("type"),
                )
                .send()
                .await
                .expect("subscribe");
            while let Ok(Some(event)) = out.event_stream.recv().await {
                if let SubscribeToShardEventStream::SubscribeToShardEvent(e) = event {
                    if e.records.is_empty() {
                        continue;
                    }
                    let batch: Arc<Vec<(String, bytes::Bytes)>> = Arc::new(
                        e.records
                            .into_iter()
                            .map(|r| (r.partition_key.unwrap_or_default(), bytes::Bytes::from(r.data.into_inner())))
                            .collect(),
                    );
                    for tx in &senders {
                        let _ = tx.send(Arc::clone(&batch)).await;
                    }
                }
            }
        });
    }
    for writer in writers {
        writer.await?;
    }
    println!("{}", usage(std::process::id()).0);
    Ok(())
}

/// The value after `name` on the command line.
fn value_of(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--floor-worker") {
        let destinations = args[4].split(',').map(String::from).collect();
        return floor_worker(&args[2], args[3].parse()?, destinations).await;
    }
    let opts = parse_opts()?;
    // The simulation runs no binary.
    let needs_binary = opts.scenario.as_deref() != Some("fleet-sim");
    let bin = if needs_binary { service_binary()? } else { PathBuf::new() };
    let all = ["drain", "big-events", "latency", "stall", "backfill", "wide", "filter", "strict", "fleet-sim", "fleet"];
    let chosen: Vec<&str> = match &opts.scenario {
        Some(name) if name == "floor" => vec!["drain"],
        Some(name) => {
            vec![all.iter().find(|s| **s == name).copied().ok_or_else(|| anyhow::anyhow!("unknown scenario {name}"))?]
        }
        None => all.to_vec(),
    };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "kinesis-fanout benchmark on {cores} cores ({} records of {} bytes for drain)\n",
        opts.records, opts.record_size
    );
    let mut lines = Vec::new();
    for scenario in chosen {
        if scenario == "fleet-sim" || scenario == "fleet" {
            // One line per case.
            let reports = if scenario == "fleet" {
                let started = Instant::now();
                let mut reports = fleet::run(opts.smoke, &bin).await?;
                let wall = round2(started.elapsed().as_secs_f64());
                reports.iter_mut().for_each(|r| {
                    r.insert("wall_s", json!(wall));
                });
                reports.into_iter().map(|r| r.into_iter().map(|(k, v)| (k.to_string(), v)).collect()).collect()
            } else {
                fleet_sim::run(opts.smoke, value_of("--case").as_deref())?
            };
            for report in reports {
                println!(
                    "{scenario:<8} {}",
                    report.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("  ")
                );
                let mut line = serde_json::Map::new();
                line.insert("scenario".into(), json!(scenario));
                line.insert("cores".into(), json!(cores));
                line.extend(report);
                lines.push(serde_json::Value::Object(line));
            }
            continue;
        }
        let started = Instant::now();
        let mut report = match scenario {
            "drain" => drain(&opts, &bin).await?,
            "latency" => latency(&opts, &bin).await?,
            "stall" => stall(&opts, &bin).await?,
            "backfill" => backfill(&opts, &bin).await?,
            "big-events" => big_events(&opts, &bin).await?,
            "filter" => filter(&opts, &bin).await?,
            "strict" => strict(&opts, &bin).await?,
            _ => wide(&opts, &bin).await?,
        };
        report.insert("wall_s", json!(round2(started.elapsed().as_secs_f64())));
        println!("{scenario:<8} {}", report.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("  "));
        let mut line = serde_json::Map::new();
        line.insert("scenario".into(), json!(scenario));
        line.insert("cores".into(), json!(cores));
        line.extend(report.into_iter().map(|(k, v)| (k.to_string(), v)));
        lines.push(serde_json::Value::Object(line));
    }
    println!();
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
