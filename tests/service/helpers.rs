//! Test harness: an in-process ferrokinesis emulator on 127.0.0.1:0 behind a fault-injecting
//! HTTP layer, SDK clients for it, and the service started in-process with its own config.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region, SharedCredentialsProvider};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ferrokinesis::store::StoreOptions;
use kinesis_fanout::metrics::Metrics;
use kinesis_fanout::{Service, Settings};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::streams::{OnReadError, read_stream};

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(90);

/// Faults injected in front of the emulator, switched by tests while the service runs.
#[derive(Debug, Default)]
pub struct Faults {
    /// PutRecords requests naming this stream get a 500 InternalFailure.
    pub reject_puts_to: Option<String>,
    /// PutRecords requests naming this stream get a 400 ProvisionedThroughputExceededException.
    pub throttle_puts_to: Option<String>,
    /// PutRecords requests naming this stream get a 400 AccessDeniedException (cannot succeed).
    pub deny_puts_to: Option<String>,
    /// The next N SubscribeToShard calls get 400 ResourceInUseException.
    pub subscribe_in_use: u32,
    /// ferrokinesis 0.7 answers SubscribeToShard from the start of the shard whatever the
    /// starting position: its request validation keeps only `StartingPosition.Type` (its rules
    /// declare no other member), so `SequenceNumber` and `Timestamp` never reach the action, and
    /// every resubscription replays the whole shard, which the service drops and counts. With this
    /// on, the layer hands SubscribeToShard to the emulator's own action without that validation,
    /// so it resumes where it is asked to, as Kinesis does. Off by default, so the tests of the
    /// replay filter keep their replays.
    pub honour_starting_position: bool,
    /// ListStreams answers leave this stream out (as a page boundary or a lagging index could).
    pub hide_from_list_streams: Option<String>,
    /// ListTagsForStream gets 400 LimitExceededException (5 TPS per account).
    pub throttle_list_tags: bool,
    /// GetRecords answers carry a malformed sequence number for records whose partition key
    /// starts with this.
    pub malform_sequence_numbers: Option<String>,
    /// GetRecords answers leave out records whose partition key starts with this, as Kinesis does
    /// once records have left the stream's retention period (ferrokinesis keeps at least 24 h).
    pub expire_partition_keys: Option<String>,
    /// Every request must be signed with one of these access key ids, before its expiry (keys
    /// an STS stand-in issued); others get 400 ExpiredTokenException and are counted under
    /// `calls["RejectedSignature"]`.
    pub require_keys: Option<Arc<Mutex<HashMap<String, std::time::SystemTime>>>>,
    /// ListShards requests for this stream are held this long before they reach the emulator (a
    /// slow or throttled control plane); counted under `calls["ListShards(<stream>)"]`.
    pub stall_list_shards: Option<(String, Duration)>,
    /// Every PutRecords request is noted in `puts` as it arrives.
    pub log_puts: bool,
    pub puts: Vec<PutSeen>,
    /// Calls seen, by operation.
    pub calls: HashMap<String, u64>,
}

/// A PutRecords request as it arrived at the emulator.
#[derive(Debug, Clone)]
pub struct PutSeen {
    pub at: std::time::Instant,
    /// The access key id it was signed with: which worker sent it.
    pub key: String,
    pub stream: String,
    pub partition_keys: Vec<String>,
}

/// The access key id of a SigV4 `Authorization` header.
fn signing_key(request: &axum::http::request::Parts) -> Option<String> {
    let auth = request.headers.get("authorization")?.to_str().ok()?;
    let credential = auth.split("Credential=").nth(1)?;
    Some(credential.split('/').next()?.to_string())
}

pub struct Emulator {
    pub url: String,
    pub faults: Arc<Mutex<Faults>>,
    stop: CancellationToken,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn store_options() -> StoreOptions {
    StoreOptions {
        create_stream_ms: 10,
        delete_stream_ms: 10,
        update_stream_ms: 10,
        shard_limit: 200,
        ..StoreOptions::default()
    }
}

impl Emulator {
    pub async fn start() -> Emulator {
        Self::with_options(store_options()).await
    }

    pub async fn with_options(options: StoreOptions) -> Emulator {
        let (app, store) = ferrokinesis::create_app(options);
        // As the emulator's own binary does (7 MiB): a 5 MiB PutRecords takes more once encoded.
        let app = app.layer(axum::extract::DefaultBodyLimit::max(7 << 20));
        let faults = Arc::new(Mutex::new(Faults::default()));
        let app = app.layer(axum::middleware::from_fn_with_state((Arc::clone(&faults), store), inject_faults));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let until = stop.clone();
        // The emulator gets a runtime of its own, with more workers than requests the tests ever
        // have in flight: ferrokinesis 0.7 can deadlock when concurrent PutRecords occupy every
        // worker of its runtime, and the tests' own runtimes have two.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(16).enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let _ = ferrokinesis::serve_plain_http(listener, app, async move { until.cancelled().await }).await;
            });
        });
        Emulator { url, faults, stop }
    }

    pub fn client(&self) -> Client {
        Client::new(&sdk_config(&self.url))
    }

    /// How many calls of an operation reached the emulator.
    pub fn calls(&self, operation: &str) -> u64 {
        self.faults.lock().unwrap().calls.get(operation).copied().unwrap_or(0)
    }
}

fn error_response(status: StatusCode, kind: &str) -> Response {
    let body = format!(r#"{{"__type":"{kind}","message":"injected by the test fault layer"}}"#);
    (status, [("content-type", "application/x-amz-json-1.1")], body).into_response()
}

async fn inject_faults(
    State((faults, store)): State<(Arc<Mutex<Faults>>, ferrokinesis::store::Store)>,
    request: Request,
    next: Next,
) -> Response {
    let operation = request
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit('.').next())
        .unwrap_or("")
        .to_string();
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20).await.unwrap_or_default();
    let honour_position;
    let hidden;
    let expired;
    let malformed;
    let stall;
    {
        let mut faults = faults.lock().unwrap();
        *faults.calls.entry(operation.clone()).or_default() += 1;
        if let Some(keys) = &faults.require_keys {
            let key = signing_key(&parts).unwrap_or_default();
            let live = keys.lock().unwrap().get(&key).is_some_and(|expiry| *expiry > std::time::SystemTime::now());
            if !live {
                *faults.calls.entry("RejectedSignature".into()).or_default() += 1;
                return error_response(StatusCode::BAD_REQUEST, "ExpiredTokenException");
            }
        }
        if operation == "PutRecords"
            && faults.log_puts
            && let Ok(body) = serde_json::from_slice::<serde_json::Value>(&bytes)
        {
            let stream = body.get("StreamName").and_then(|v| v.as_str()).unwrap_or_default().to_string();
            let partition_keys = body
                .get("Records")
                .and_then(|v| v.as_array())
                .map(|records| {
                    records.iter().filter_map(|r| r.get("PartitionKey")?.as_str().map(str::to_string)).collect()
                })
                .unwrap_or_default();
            let key = signing_key(&parts).unwrap_or_default();
            faults.puts.push(PutSeen { at: std::time::Instant::now(), key, stream, partition_keys });
        }
        if operation == "PutRecords"
            && let Some(stream) = &faults.reject_puts_to
            && contains(&bytes, stream.as_bytes())
        {
            return error_response(StatusCode::INTERNAL_SERVER_ERROR, "InternalFailure");
        }
        if operation == "PutRecords"
            && let Some(stream) = &faults.throttle_puts_to
            && contains(&bytes, stream.as_bytes())
        {
            return error_response(StatusCode::BAD_REQUEST, "ProvisionedThroughputExceededException");
        }
        if operation == "PutRecords"
            && let Some(stream) = &faults.deny_puts_to
            && contains(&bytes, stream.as_bytes())
        {
            return error_response(StatusCode::BAD_REQUEST, "AccessDeniedException");
        }
        if operation == "ListTagsForStream" && faults.throttle_list_tags {
            return error_response(StatusCode::BAD_REQUEST, "LimitExceededException");
        }
        if operation == "SubscribeToShard" && faults.subscribe_in_use > 0 {
            faults.subscribe_in_use -= 1;
            return error_response(StatusCode::BAD_REQUEST, "ResourceInUseException");
        }
        stall = faults.stall_list_shards.clone().filter(|(stream, _)| {
            operation == "ListShards" && contains(&bytes, format!("\"StreamName\":\"{stream}\"").as_bytes())
        });
        if let Some((stream, _)) = &stall {
            *faults.calls.entry(format!("ListShards({stream})")).or_default() += 1;
        }
        honour_position = operation == "SubscribeToShard" && faults.honour_starting_position;
        hidden = faults.hide_from_list_streams.clone().filter(|_| operation == "ListStreams");
        expired = faults.expire_partition_keys.clone().filter(|_| operation == "GetRecords");
        malformed = faults.malform_sequence_numbers.clone().filter(|_| operation == "GetRecords");
    }
    if let Some((_, stall)) = stall {
        tokio::time::sleep(stall).await;
    }
    if let Some(hidden) = hidden {
        let answer = next.run(Request::from_parts(parts, Body::from(bytes))).await;
        return rewritten(answer, |json| {
            if let Some(names) = json.get_mut("StreamNames").and_then(|v| v.as_array_mut()) {
                names.retain(|n| n.as_str() != Some(&hidden));
            }
            if let Some(summaries) = json.get_mut("StreamSummaries").and_then(|v| v.as_array_mut()) {
                summaries.retain(|s| s.get("StreamName").and_then(|n| n.as_str()) != Some(&hidden));
            }
        })
        .await;
    }
    if let Some(prefix) = malformed {
        let answer = next.run(Request::from_parts(parts, Body::from(bytes))).await;
        return rewritten(answer, |json| {
            for record in json.get_mut("Records").and_then(|v| v.as_array_mut()).into_iter().flatten() {
                if record.get("PartitionKey").and_then(|k| k.as_str()).is_some_and(|k| k.starts_with(&prefix)) {
                    record["SequenceNumber"] = serde_json::Value::from("not-a-sequence-number");
                }
            }
        })
        .await;
    }
    if let Some(prefix) = expired {
        let answer = next.run(Request::from_parts(parts, Body::from(bytes))).await;
        return rewritten(answer, |json| {
            if let Some(records) = json.get_mut("Records").and_then(|v| v.as_array_mut()) {
                records.retain(|r| {
                    !r.get("PartitionKey").and_then(|k| k.as_str()).is_some_and(|k| k.starts_with(&prefix))
                });
            }
        })
        .await;
    }
    if honour_position
        && parts.headers.get("content-type").is_some_and(|v| v == "application/x-amz-json-1.1")
        && let Ok(data) = serde_json::from_slice(&bytes)
        && let Ok(events) =
            ferrokinesis::actions::subscribe_to_shard::execute_streaming(&store, data, "application/x-amz-json-1.1")
                .await
    {
        return (StatusCode::OK, [("content-type", "application/vnd.amazon.eventstream")], events).into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

/// A JSON answer changed by `edit` (left as it is if it is not JSON).
async fn rewritten(answer: Response, edit: impl FnOnce(&mut serde_json::Value)) -> Response {
    let (parts, body) = answer.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20).await.unwrap_or_default();
    let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    edit(&mut json);
    let mut parts = parts;
    parts.headers.remove("content-length");
    Response::from_parts(parts, Body::from(serde_json::to_vec(&json).unwrap()))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub fn sdk_config(url: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new("test", "test", None, None, "test")))
        .region(Region::new("us-east-1"))
        .endpoint_url(url)
        .behavior_version(BehaviorVersion::latest())
        .build()
}

/// Polls `condition` every 50 ms until it holds, failing the test after `WAIT`.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let outcome = tokio::time::timeout(WAIT, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(outcome.is_ok(), "timed out after {WAIT:?} waiting for: {what}");
}

pub async fn create_stream(client: &Client, name: &str, shards: i32) {
    client.create_stream().stream_name(name).shard_count(shards).send().await.unwrap();
    wait_active(client, name).await;
}

/// A fresh emulator holding `streams` (name, shard count), and a client for it.
pub async fn with_streams(streams: &[(&str, i32)]) -> (Emulator, Client) {
    let emulator = Emulator::start().await;
    let client = emulator.client();
    for (name, shards) in streams {
        create_stream(&client, name, *shards).await;
    }
    (emulator, client)
}

/// Splits the first shard of `stream` in the middle of its hash range, waits until the stream
/// is ACTIVE again, and returns the parent's id.
pub async fn split_first_shard(client: &Client, stream: &str) -> String {
    let shards = client.list_shards().stream_name(stream).send().await.unwrap();
    let parent = shards.shards()[0].shard_id().to_string();
    client
        .split_shard()
        .stream_name(stream)
        .shard_to_split(&parent)
        .new_starting_hash_key((u128::MAX / 2).to_string())
        .send()
        .await
        .unwrap();
    wait_active(client, stream).await;
    parent
}

pub async fn wait_active(client: &Client, name: &str) {
    wait_until(&format!("stream {name} ACTIVE"), || async {
        let out = client.describe_stream_summary().stream_name(name).send().await;
        out.ok()
            .and_then(|o| o.stream_description_summary().map(|s| *s.stream_status() == StreamStatus::Active))
            .unwrap_or(false)
    })
    .await;
}

/// A test record: partition key and data.
pub type Rec = (String, Vec<u8>);

/// Puts records in order, 500 at a time, retrying failed entries until all are in.
pub async fn put_all(client: &Client, stream: &str, records: &[Rec]) {
    for batch in records.chunks(500) {
        let mut pending: Vec<&Rec> = batch.iter().collect();
        let mut attempts = 0;
        while !pending.is_empty() {
            attempts += 1;
            assert!(attempts < 200, "producer could not put records into {stream}");
            let entries = pending
                .iter()
                .map(|(pk, data)| {
                    PutRecordsRequestEntry::builder().partition_key(pk).data(Blob::new(data.clone())).build().unwrap()
                })
                .collect();
            // A failed request leaves every entry pending.
            if let Ok(out) = client.put_records().stream_name(stream).set_records(Some(entries)).send().await {
                pending = pending
                    .into_iter()
                    .zip(out.records())
                    .filter(|(_, r)| r.error_code().is_some())
                    .map(|(rec, _)| rec)
                    .collect();
            }
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Records of a stream, per shard, in shard order: (shard id, partition key, data).
pub async fn read_all(client: &Client, stream: &str) -> Vec<(String, String, Vec<u8>)> {
    let records = read_stream(client, stream, OnReadError::Fail).await.expect("the stream reads back");
    records.into_iter().map(|r| (r.shard, r.partition_key, r.data)).collect()
}

/// (partition key, data) pairs of a stream, sorted, for multiset comparison.
pub async fn contents(client: &Client, stream: &str) -> Vec<Rec> {
    let mut all: Vec<Rec> = read_all(client, stream).await.into_iter().map(|(_, pk, data)| (pk, data)).collect();
    all.sort();
    all
}

/// Whether every one of `streams` holds every record of `expected` (duplicates allowed).
pub async fn all_hold(client: &Client, streams: &[&str], expected: &[Rec]) -> bool {
    for stream in streams {
        let held: BTreeSet<Rec> = contents(client, stream).await.into_iter().collect();
        if !expected.iter().all(|r| held.contains(r)) {
            return false;
        }
    }
    true
}

/// How many records `stream` holds more than once.
pub async fn duplicates_in(client: &Client, stream: &str) -> usize {
    let held = contents(client, stream).await;
    let unique: BTreeSet<&Rec> = held.iter().collect();
    held.len() - unique.len()
}

/// How `stream`'s contents compare with `expected`: counts only, so a failure prints no payloads.
#[derive(Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Records of `expected` the stream does not hold.
    pub missing: usize,
    /// Copies beyond the first of records the stream holds.
    pub duplicates: usize,
    /// Records the stream holds that `expected` does not.
    pub foreign: usize,
}

pub async fn delivery(client: &Client, stream: &str, expected: &[Rec]) -> Delivery {
    let held = contents(client, stream).await;
    let unique: BTreeSet<&Rec> = held.iter().collect();
    let wanted: BTreeSet<&Rec> = expected.iter().collect();
    Delivery {
        missing: wanted.difference(&unique).count(),
        duplicates: held.len() - unique.len(),
        foreign: unique.difference(&wanted).count(),
    }
}

pub fn sorted(records: &[Rec]) -> Vec<Rec> {
    let mut v = records.to_vec();
    v.sort();
    v
}

/// `n` records with random partition keys and unique data, reproducible from `seed`.
pub fn records(seed: u64, n: usize, data_len: usize) -> Vec<Rec> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let pk = format!("pk-{:016x}", rng.random::<u64>());
            let mut data = format!("record-{seed}-{i}-").into_bytes();
            data.resize(data_len.max(data.len()), b'x');
            (pk, data)
        })
        .collect()
}

/// A config file for the emulator, with fast intervals; `extra` is appended to the first
/// destination group (e.g. `records_per_second = "5000"`).
pub fn config_toml(url: &str, source: &str, pattern: &str, checkpoint: &Path, extra: &str) -> String {
    format!(
        r#"
[aws]
region = "us-east-1"
endpoint_url = "{url}"

[source]
stream_name = "{source}"
consumer_name = "fanout-test"

[[destinations]]
pattern = "{pattern}"
refresh_interval = "1s"
linger = "20ms"
initial_backoff = "20ms"
max_backoff = "500ms"
{extra}

[checkpoint]
backend = "file"
path = "{checkpoint}"
interval = "200ms"

[metrics]
listen = "127.0.0.1:0"

[shutdown]
grace_period = "10s"
"#,
        checkpoint = checkpoint.display()
    )
}

/// The service running in-process.
pub struct Running {
    pub metrics: Arc<Metrics>,
    /// Address of /metrics, /healthz, /readyz.
    pub admin: std::net::SocketAddr,
    pub progress: Arc<kinesis_fanout::progress::Progress>,
    pub health: Arc<kinesis_fanout::health::Health>,
    stop: CancellationToken,
    handle: JoinHandle<Result<(), kinesis_fanout::RunError>>,
}

impl Running {
    pub fn start(toml: &str, url: &str) -> Running {
        // Service logs show in a failing test's output (RUST_LOG to tune).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("kinesis_fanout=info")),
            )
            .with_test_writer()
            .try_init();
        let settings = Settings::from_toml(toml).expect("test config is valid");
        let service = Service::new(settings, &sdk_config(url)).expect("admin port binds");
        let admin = service.admin_addr();
        let metrics = service.metrics();
        let progress = service.progress();
        let health = service.health();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(service.run(stop.clone()));
        Running { metrics, progress, health, admin, stop, handle }
    }

    /// GET an admin path: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://{}{path}", self.admin)).await.expect("admin port answers");
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// Records accepted by a destination so far.
    pub fn accepted(&self, destination: &str) -> u64 {
        self.metrics.records_written.with_label_values(&[destination, "ok"]).get()
    }

    pub fn counter(&self, destination: &str, outcome: &str) -> u64 {
        self.metrics.records_written.with_label_values(&[destination, outcome]).get()
    }

    pub async fn wait_accepted(&self, destination: &str, n: u64) {
        wait_until(&format!("{destination} accepted {n} records"), || async { self.accepted(destination) >= n }).await;
    }

    /// Stops gracefully and returns the service's result.
    pub async fn stop(self) -> Result<(), kinesis_fanout::RunError> {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("service stops within the wait")
            .expect("service task did not panic")
    }

    /// Waits for the service to end by itself (a fatal error).
    pub async fn finished(self) -> Result<(), kinesis_fanout::RunError> {
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("service ends within the wait")
            .expect("service task did not panic")
    }
}

pub fn temp_checkpoint() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoints.json");
    (dir, path)
}
