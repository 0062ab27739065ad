//! `--scenario fleet`: a real fleet on this machine. Worker processes of the service binary share
//! one lease table (dynoxide, behind a proxy that counts the workers' calls) and read one source
//! (ferrokinesis, in a runtime with many threads of its own) under steady load, while one worker
//! is killed, one added, and then every worker restarted in turn. Every record put carries its
//! number: at the end the destination is read whole, and lost and duplicated records counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use kinesis_fanout::lease::{Lease, LeaseTable, Position, balance};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{Report, create, free_port, produce, round2, run_binary, sdk};
use crate::dynamo::Dynamo;
use crate::streams::{OnReadError, read_stream};

/// Kinesis and DynamoDB emulators in a runtime of their own, with more threads than the fleet
/// has requests in flight (ferrokinesis 0.7 can deadlock when concurrent PutRecords occupy every
/// worker thread of its runtime).
struct Backends {
    kinesis: String,
    /// dynoxide behind the counting proxy (`url` for the workers, `direct_url` for the
    /// benchmark's own looks at the table, which are not counted).
    dynamo: Dynamo,
    stop: CancellationToken,
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn start_backends() -> anyhow::Result<Backends> {
    let stop = CancellationToken::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let until = stop.clone();
    std::thread::spawn(move || {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(48).enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let options = ferrokinesis::store::StoreOptions {
                create_stream_ms: 10,
                shard_limit: 1_000,
                subscribe_to_shard_event_record_limit: 1_000,
                ..Default::default()
            };
            let (app, _store) = ferrokinesis::create_app(options);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let kinesis = format!("http://{}", listener.local_addr().expect("addr"));
            let stopped = until.clone();
            tokio::spawn(async move {
                ferrokinesis::serve_plain_http(listener, app, async move { stopped.cancelled().await }).await
            });
            let _ = tx.send((kinesis, Dynamo::start().await));
            until.cancelled().await;
        });
    });
    let (kinesis, dynamo) = rx.recv_timeout(Duration::from_secs(30))?;
    Ok(Backends { kinesis, dynamo, stop })
}

struct Process {
    id: String,
    child: Child,
}

struct Fleet<'a> {
    bin: &'a Path,
    dir: &'a Path,
    backends: &'a Backends,
    failover: &'a str,
    live: Vec<Process>,
    started: usize,
}

impl Fleet<'_> {
    fn start(&mut self) -> anyhow::Result<()> {
        let id = format!("w{}", self.started);
        self.started += 1;
        let port = free_port()?;
        let config = format!(
            r#"[aws]
region = "us-east-1"
endpoint_url = "{kinesis}"
[source]
stream_name = "fleet-in"
consumer_name = "fleet"
initial_position = "trim_horizon"
[[destinations]]
pattern = "^fleet-out-.*$"
refresh_interval = "5s"
records_per_second = "100000000"
bytes_per_second = "100GiB"
max_in_flight_bytes = "8MiB"
start_position = "trim_horizon"
[checkpoint]
backend = "dynamodb"
table_name = "fleet-leases"
endpoint_url = "{dynamo}"
failover_time = "{failover}"
worker_id = "{id}"
[shutdown]
grace_period = "10s"
[metrics]
listen = "127.0.0.1:{port}"
[log]
level = "warn"
"#,
            kinesis = self.backends.kinesis,
            dynamo = self.backends.dynamo.url,
            failover = self.failover,
        );
        let child = run_binary(self.bin, self.dir, &id, &config)?;
        self.live.push(Process { id, child });
        Ok(())
    }

    /// SIGKILL: no drain, no release.
    fn kill(&mut self, index: usize) {
        let mut p = self.live.remove(index);
        let _ = p.child.kill();
        let _ = p.child.wait();
    }

    /// SIGTERM, and wait for the drain and release.
    fn stop(&mut self, index: usize) {
        let mut p = self.live.remove(index);
        let _ = Command::new("kill").args(["-TERM", &p.child.id().to_string()]).status();
        let _ = p.child.wait();
    }

    fn ids(&self) -> BTreeSet<String> {
        self.live.iter().map(|p| p.id.clone()).collect()
    }
}

impl Drop for Fleet<'_> {
    fn drop(&mut self) {
        for p in &mut self.live {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// What the benchmark sees of the lease table, sampled once a second.
#[derive(Default)]
struct Watch {
    /// Per shard: the last checkpoint seen and since when.
    last: BTreeMap<String, (Position, Instant)>,
    longest_unread: Duration,
    backwards: usize,
}

impl Watch {
    fn observe(&mut self, leases: &[Lease]) {
        let now = Instant::now();
        for lease in leases {
            match self.last.get_mut(&lease.key) {
                Some((position, since)) if *position == lease.checkpoint => {
                    if lease.checkpoint != Position::ShardEnd {
                        self.longest_unread = self.longest_unread.max(now - *since);
                    }
                }
                Some((position, since)) => {
                    if let (Position::Sequence(old), Position::Sequence(new)) = (&*position, &lease.checkpoint)
                        && new < old
                    {
                        self.backwards += 1;
                    }
                    *position = lease.checkpoint.clone();
                    *since = now;
                }
                None => {
                    self.last.insert(lease.key.clone(), (lease.checkpoint.clone(), now));
                }
            }
        }
    }

    /// A new phase: gaps are measured from now.
    fn restart(&mut self) {
        let now = Instant::now();
        for (_, since) in self.last.values_mut() {
            *since = now;
        }
        self.longest_unread = Duration::ZERO;
    }
}

/// Balanced, once the table has leases at all.
fn balanced(leases: &[Lease], live: &BTreeSet<String>) -> bool {
    !balance::active(leases).is_empty() && balance::balanced(leases, live)
}

/// Samples the table once a second until the fleet is balanced and then `hold` more.
async fn until_balanced(
    table: &LeaseTable,
    fleet: &Fleet<'_>,
    watch: &mut Watch,
    hold: Duration,
    limit: Duration,
) -> anyhow::Result<f64> {
    let since = Instant::now();
    let live = fleet.ids();
    let mut balanced_after = None;
    loop {
        let leases = table.scan().await.unwrap_or_default();
        watch.observe(&leases);
        if balanced_after.is_none() && balanced(&leases, &live) {
            balanced_after = Some(since.elapsed());
        }
        if let Some(after) = balanced_after
            && since.elapsed() >= after + hold
        {
            return Ok(after.as_secs_f64());
        }
        if since.elapsed() > limit {
            anyhow::bail!("the fleet of {} did not balance within {limit:?}", live.len());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Every record number in the stream, with how often it is there.
async fn contents(client: &Client, stream: &str) -> anyhow::Result<BTreeMap<u64, u32>> {
    let mut seen = BTreeMap::new();
    for record in read_stream(client, stream, OnReadError::Fail).await? {
        let id = std::str::from_utf8(&record.data[..12.min(record.data.len())]).ok().and_then(|s| s.parse().ok());
        if let Some(id) = id {
            *seen.entry(id).or_insert(0) += 1;
        }
    }
    Ok(seen)
}

pub async fn run(smoke: bool, bin: &Path) -> anyhow::Result<Vec<Report>> {
    let (shards, workers, rate, failover) = if smoke { (16, 3, 200, "3s") } else { (128, 8, 500, "10s") };
    let backends = start_backends()?;
    let client = Client::new(&sdk(&backends.kinesis));
    create(&client, "fleet-in", shards).await?;
    create(&client, "fleet-out-0", 8).await?;
    let dir = tempfile::tempdir()?;
    let dynamo = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&sdk(&backends.dynamo.direct_url)).build(),
    );
    let table = LeaseTable::new(dynamo, "fleet-leases");

    // Steady load from the start to the end: `rate` records a second, numbered.
    let produced = Arc::new(AtomicU64::new(0));
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let (client, produced, producing) = (client.clone(), Arc::clone(&produced), Arc::clone(&producing));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while producing.load(Ordering::Relaxed) {
                tick.tick().await;
                let from = produced.load(Ordering::Relaxed) as usize;
                if produce(&client, "fleet-in", from, from + rate / 10, 256).await.is_ok() {
                    produced.store((from + rate / 10) as u64, Ordering::Relaxed);
                }
            }
        })
    };

    let mut fleet = Fleet { bin, dir: dir.path(), backends: &backends, failover, live: Vec::new(), started: 0 };
    let mut watch = Watch::default();
    let hold = Duration::from_secs(if smoke { 5 } else { 15 });
    let limit = Duration::from_secs(if smoke { 120 } else { 600 });
    let mut phases: Vec<(String, f64, f64, f64, f64)> = Vec::new();
    let mut phase = |name: String, balance_s: f64, began: Instant, reads0: u64, writes0: u64, watch: &mut Watch| {
        let secs = began.elapsed().as_secs_f64().max(1.0);
        let reads = (backends.dynamo.calls.reads() - reads0) as f64 / secs;
        let writes = (backends.dynamo.calls.writes() - writes0) as f64 / secs;
        phases.push((name, balance_s, reads, writes, watch.longest_unread.as_secs_f64()));
        watch.restart();
    };
    let counts = || (backends.dynamo.calls.reads(), backends.dynamo.calls.writes());

    // Start together.
    let (began, (r0, w0)) = (Instant::now(), counts());
    for _ in 0..workers {
        fleet.start()?;
    }
    let s = until_balanced(&table, &fleet, &mut watch, hold, limit).await?;
    phase(format!("start-{shards}x{workers}"), s, began, r0, w0, &mut watch);

    // Kill one.
    let (began, (r0, w0)) = (Instant::now(), counts());
    fleet.kill(0);
    let s = until_balanced(&table, &fleet, &mut watch, hold, limit).await?;
    phase(format!("kill-1-of-{workers}"), s, began, r0, w0, &mut watch);

    // Add one.
    let (began, (r0, w0)) = (Instant::now(), counts());
    fleet.start()?;
    let s = until_balanced(&table, &fleet, &mut watch, hold, limit).await?;
    phase(format!("add-1-to-{}", workers - 1), s, began, r0, w0, &mut watch);

    // Restart every worker in turn: SIGTERM (drain, release), then a new one.
    let (began, (r0, w0)) = (Instant::now(), counts());
    for _ in 0..workers {
        fleet.stop(0);
        fleet.start()?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        watch.observe(&table.scan().await.unwrap_or_default());
    }
    let s = until_balanced(&table, &fleet, &mut watch, hold, limit).await?;
    phase(format!("rolling-restart-{workers}"), s, began, r0, w0, &mut watch);

    // Stop the load, let the fleet copy the rest, stop it, and count.
    producing.store(false, Ordering::Relaxed);
    producer.await?;
    let put = produced.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(if smoke { 60 } else { 180 });
    let seen = loop {
        let seen = contents(&client, "fleet-out-0").await?;
        if (0..put).all(|i| seen.contains_key(&i)) || Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    while !fleet.live.is_empty() {
        fleet.stop(0);
    }
    let lost = (0..put).filter(|i| !seen.contains_key(i)).count();
    let duplicated: u64 = seen.values().map(|n| u64::from(n.saturating_sub(1))).sum();

    let mut reports = Vec::new();
    for (case, balance_s, reads, writes, unread) in phases {
        let mut r = Report::new();
        r.insert("case", json!(case));
        r.insert("shards", json!(shards));
        r.insert("workers", json!(workers));
        r.insert("invariant_violations", json!(watch.backwards + lost));
        r.insert("seconds_to_balance", json!(round2(balance_s)));
        r.insert("table_reads_per_s", json!(round2(reads)));
        r.insert("table_writes_per_s", json!(round2(writes)));
        r.insert("longest_unread_s", json!(round2(unread)));
        r.insert("records_put", json!(put));
        r.insert("lost", json!(lost));
        r.insert("duplicated", json!(duplicated));
        r.insert("failover_time", json!(failover));
        reports.push(r);
    }
    Ok(reports)
}
