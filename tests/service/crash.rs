//! The real binary killed with SIGKILL at random moments while it copies: nothing is lost, and
//! duplicates stay within what the killed processes had read.

use std::path::Path;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::helpers::cluster::*;
use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_kinesis-fanout");
const OUTPUTS: [&str; 3] = ["out-1", "out-2", "out-3"];

/// The real binary as a child process, with its metrics port.
pub struct Process {
    pub child: tokio::process::Child,
    metrics: String,
}

/// Starts the binary on `config` (its metrics on a free port instead of port 0), with test
/// credentials and the allocator setting the Dockerfile and the ECS task use.
pub fn spawn(config: &TestConfig, dir: &Path, name: &str) -> Process {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = config.clone().set("metrics", "listen", &format!("127.0.0.1:{port}"));
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config.toml()).unwrap();
    let child = tokio::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    Process { child, metrics: format!("http://127.0.0.1:{port}/metrics") }
}

/// The sum of a metric's series in the process (0 when it does not answer yet).
pub async fn metric_total(process: &Process, name: &str) -> u64 {
    let Ok(response) = reqwest::get(&process.metrics).await else { return 0 };
    let page = response.text().await.unwrap_or_default();
    page.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Records the process has read so far (0 when it does not answer yet).
async fn read_so_far(process: &Process) -> u64 {
    metric_total(process, "kinesis_fanout_source_records_read_total").await
}

async fn kill(mut process: Process) -> u64 {
    let read = read_so_far(&process).await;
    process.child.start_kill().unwrap();
    let _ = process.child.wait().await;
    read
}

/// SIGTERM, and the process must drain and exit 0.
pub async fn terminate(mut process: Process) {
    let pid = process.child.id().unwrap();
    std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    let status = tokio::time::timeout(WAIT, process.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "a SIGTERM ends cleanly: {status:?}");
}

/// The most copies too many that any output holds.
async fn duplicates(emulator: &Emulator) -> usize {
    let client = emulator.client();
    let mut worst = 0;
    for name in OUTPUTS {
        worst = worst.max(duplicates_in(&client, name).await);
    }
    worst
}

async fn setup() -> (Emulator, Vec<Rec>, tokio::task::JoinHandle<()>) {
    let (emulator, client) = with_streams(&[("in", 2), (OUTPUTS[0], 2), (OUTPUTS[1], 2), (OUTPUTS[2], 2)]).await;
    let input = records(700, 30_000, 64);
    let producing = input.clone();
    let producer = tokio::spawn(async move {
        for batch in producing.chunks(1_000) {
            put_all(&client, "in", batch).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    (emulator, input, producer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_ten_times_loses_nothing_file_backend() {
    let (emulator, input, producer) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let config = TestConfig::new(&emulator.url).checkpoint_file(&dir.path().join("checkpoints.json"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut in_flight_bound = 0;
    for _ in 0..10 {
        let process = spawn(&config, dir.path(), "worker");
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_500))).await;
        in_flight_bound += kill(process).await;
    }
    producer.await.unwrap();
    let last = spawn(&config, dir.path(), "worker");
    let client = emulator.client();
    wait_until("every record in every destination", || all_hold(&client, &OUTPUTS, &input)).await;
    terminate(last).await;
    let duplicates = duplicates(&emulator).await;
    println!(
        "file backend: {duplicates} duplicates after 10 kills (bound: {in_flight_bound} records read by killed runs)"
    );
    assert!(duplicates as u64 <= in_flight_bound, "{duplicates} duplicates > {in_flight_bound}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_ten_times_loses_nothing_two_workers_on_dynamodb() {
    let (emulator, input, producer) = setup().await;
    let dynamo = Dynamo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let configs: Vec<TestConfig> = ["w1", "w2"].iter().map(|id| worker_config(&emulator, &dynamo, id)).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut steady = spawn(&configs[1], dir.path(), "w2");
    let mut in_flight_bound = 0;
    for round in 0..10 {
        // Kill w1 most rounds, and now and then w2 too.
        let victim = spawn(&configs[0], dir.path(), "w1");
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2_000))).await;
        in_flight_bound += kill(victim).await;
        if round % 3 == 2 {
            in_flight_bound += kill(steady).await;
            steady = spawn(&configs[1], dir.path(), "w2");
        }
    }
    producer.await.unwrap();
    let other = spawn(&configs[0], dir.path(), "w1");
    let client = emulator.client();
    wait_until("every record in every destination", || all_hold(&client, &OUTPUTS, &input)).await;
    terminate(other).await;
    terminate(steady).await;
    let duplicates = duplicates(&emulator).await;
    println!(
        "dynamodb backend: {duplicates} duplicates after kills (bound: {in_flight_bound} records read by killed runs)"
    );
    assert!(duplicates as u64 <= in_flight_bound, "{duplicates} duplicates > {in_flight_bound}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_with_a_detached_destination_lose_nothing_after_a_sigkill() {
    let (emulator, client) = with_streams(&[("in", 2), ("out-1", 1), ("out-2", 1), ("out-broken", 1)]).await;
    emulator.faults.lock().unwrap().reject_puts_to = Some("out-broken".into());
    let dynamo = Dynamo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let configs: Vec<TestConfig> = ["w1", "w2"]
        .iter()
        .map(|id| {
            worker_config(&emulator, &dynamo, id).group("max_in_flight_bytes", "1MiB").group("detach_after", "1s")
        })
        .collect();
    let input = records(800, 6_000, 512);
    put_all(&client, "in", &input).await;
    let w1 = spawn(&configs[0], dir.path(), "w1");
    let w2 = spawn(&configs[1], dir.path(), "w2");
    // The healthy destinations get everything while the broken one is detached.
    wait_until("the healthy destinations hold every record", || all_hold(&client, &["out-1", "out-2"], &input)).await;
    // Each destination's own position is in the lease items, beside the (held back) checkpoint.
    let table = dynamo.table("leases");
    wait_until("destinationCheckpoints written", || async {
        let leases = table.scan().await.unwrap_or_default();
        leases.iter().any(|l| l.destination_checkpoints.keys().any(|arn| arn.ends_with("/out-1")))
    })
    .await;
    let _ = kill(w1).await;
    emulator.faults.lock().unwrap().reject_puts_to = None;
    let w1 = spawn(&configs[0], dir.path(), "w1");
    wait_until("every destination holds every record", || all_hold(&client, &["out-1", "out-2", "out-broken"], &input))
        .await;
    terminate(w1).await;
    terminate(w2).await;
}
