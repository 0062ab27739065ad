//! Harness for many workers: a DynamoDB emulator (dynoxide) behind a fault-injecting HTTP proxy,
//! and workers that each run in their own runtime, so that one can be killed outright.

use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::time::Instant;

use kinesis_fanout::health::{Health, ReadingSpan};
use kinesis_fanout::lease::{Lease, LeaseTable};
use kinesis_fanout::metrics::Metrics;
use kinesis_fanout::{Service, Settings};
use tokio_util::sync::CancellationToken;

use super::*;

pub use super::dynamo::{Dynamo, DynamoMode};

/// The lease table as the tests see it: through the proxy, so its faults apply to the tests' own
/// looks too.
impl Dynamo {
    pub fn table(&self, name: &str) -> LeaseTable {
        let config = aws_sdk_dynamodb::config::Builder::from(&sdk_config(&self.url)).endpoint_url(&self.url).build();
        LeaseTable::new(aws_sdk_dynamodb::Client::from_conf(config), name)
    }

    /// The leases of a table; none while it does not exist yet.
    pub async fn leases(&self, table: &str) -> Vec<Lease> {
        self.table(table).scan().await.unwrap_or_default()
    }
}

/// The template config with checkpoints and leases in the table `leases` of `dynamo`, as
/// worker `id`.
pub fn worker_config(emulator: &Emulator, dynamo: &Dynamo, id: &str) -> TestConfig {
    TestConfig::new(&emulator.url).lease_table(&dynamo.url, id)
}

/// A worker in a runtime of its own.
pub struct Worker {
    pub id: String,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    stop: CancellationToken,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Option<Result<(), String>>>>,
}

impl Worker {
    pub fn start(id: &str, toml: &str, url: &str) -> Worker {
        Self::start_signing_as(id, toml, url, "test")
    }

    /// A worker whose requests are signed with access key id `key` (the fault layer tells
    /// workers apart by it).
    pub fn start_signing_as(id: &str, toml: &str, url: &str, key: &str) -> Worker {
        let settings = Settings::from_toml(toml).expect("worker config is valid");
        let sdk = aws_config::SdkConfig::builder()
            .credentials_provider(aws_sdk_kinesis::config::SharedCredentialsProvider::new(
                aws_sdk_kinesis::config::Credentials::new(key, "test", None, None, "test"),
            ))
            .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
            .endpoint_url(url)
            .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
            .build();
        let service = Service::new(settings, &sdk).expect("admin port binds");
        let (metrics, health) = (service.metrics(), service.health());
        let stop = CancellationToken::new();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let token = stop.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let running = runtime.spawn(service.run(token));
            let outcome = runtime.block_on(async {
                tokio::select! {
                    done = running => Some(done.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string()))),
                    _ = killed => None,
                }
            });
            // Killed: every task of this worker is dropped where it stands, nothing is released.
            runtime.shutdown_background();
            outcome
        });
        Worker { id: id.to_string(), metrics, health, stop, kill: Some(kill), thread: Some(thread) }
    }

    pub fn accepted(&self, destination: &str) -> u64 {
        self.metrics.records_written.with_label_values(&[destination, "ok"]).get()
    }

    pub fn records_read(&self) -> u64 {
        self.health.records()
    }

    pub fn spans(&self) -> Vec<ReadingSpan> {
        self.health.reading_spans()
    }

    /// Graceful stop (SIGTERM path): drain, checkpoint, release leases.
    pub async fn stop(mut self) -> Result<(), String> {
        self.stop.cancel();
        let thread = self.thread.take().unwrap();
        let joined = tokio::time::timeout(WAIT, tokio::task::spawn_blocking(move || thread.join())).await;
        joined.expect("worker stops in time").unwrap().unwrap().expect("stopped, not killed")
    }

    /// No graceful path: the worker's runtime is dropped.
    pub async fn kill(mut self) {
        let _ = self.kill.take().unwrap().send(());
        let thread = self.thread.take().unwrap();
        tokio::task::spawn_blocking(move || thread.join()).await.unwrap().unwrap();
    }
}

/// Asserts that no two workers read the same shard at the same time.
pub fn assert_single_reader(workers: &[(&str, Vec<ReadingSpan>)]) {
    let mut by_shard: std::collections::BTreeMap<String, Vec<(Instant, Instant, &str)>> = Default::default();
    for (id, spans) in workers {
        for span in spans {
            let end = span.stopped.unwrap_or_else(Instant::now);
            by_shard.entry(span.shard.clone()).or_default().push((span.started, end, id));
        }
    }
    for (shard, mut spans) in by_shard {
        spans.sort();
        for pair in spans.windows(2) {
            assert!(
                pair[1].0 >= pair[0].1 || pair[0].2 == pair[1].2,
                "{shard} was read by {} and {} at once: {spans:?}",
                pair[0].2,
                pair[1].2
            );
        }
    }
}

/// Lease counts per owner.
pub fn owners(leases: &[Lease]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for lease in leases.iter().filter(|l| l.checkpoint != kinesis_fanout::lease::Position::ShardEnd) {
        if let Some(owner) = &lease.owner {
            *counts.entry(owner.clone()).or_default() += 1;
        }
    }
    counts
}
