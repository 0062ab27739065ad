//! Enhanced Fan-Out consumers (issue 26): the per-stream consumer limit said as exactly that, a
//! consumer someone else registered (`source.consumer_arn`), and `consumer deregister`.

use std::path::Path;
use std::process::Output;

use crate::helpers::cluster::*;
use crate::helpers::dynamo::Dynamo;
use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_kinesis-fanout");
const ENV: [(&str, &str); 3] =
    [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")];

async fn run_cli(args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(BIN);
    command.args(args).env_remove("KINESIS_FANOUT_CONFIG").env("RUST_LOG", "warn").envs(ENV);
    tokio::time::timeout(WAIT, command.output()).await.expect("the command finishes").expect("the binary runs")
}

fn write(dir: &Path, text: &str) -> String {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

async fn stream_arn(client: &aws_sdk_kinesis::Client, stream: &str) -> String {
    let out = client.describe_stream_summary().stream_name(stream).send().await.unwrap();
    out.stream_description_summary().unwrap().stream_arn().to_string()
}

async fn consumers(client: &aws_sdk_kinesis::Client, stream: &str) -> Vec<String> {
    let arn = stream_arn(client, stream).await;
    let out = client.list_stream_consumers().stream_arn(arn).send().await.unwrap();
    out.consumers().iter().map(|c| c.consumer_name().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_at_its_consumer_limit_is_reported_with_its_consumers_and_exit_status_1() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-a", 1)]).await;
    let arn = stream_arn(&client, "in").await;
    for i in 0..20 {
        client.register_stream_consumer().stream_arn(&arn).consumer_name(format!("other-{i:02}")).send().await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &TestConfig::new(&emulator.url).checkpoint_file(&dir.path().join("c.json")).toml());
    let out = run_cli(&["run", "--config", &path]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is at its consumer limit") && stderr.contains("with 20 consumers registered"), "{stderr}");
    assert!(stderr.contains("other-00") && stderr.contains("other-19"), "their names: {stderr}");
    assert!(!stderr.to_lowercase().contains("permission") && !stderr.contains("retrying"), "{stderr}");
    assert!(!consumers(&client, "in").await.contains(&"fanout-test".to_string()), "nothing registered");

    // An identity that may not list the consumers still hears of the limit, not a retry loop.
    emulator.faults.lock().unwrap().deny_list_consumers = true;
    let out = run_cli(&["run", "--config", &path]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is at its consumer limit") && stderr.contains("with an unknown number"), "{stderr}");
    assert!(stderr.contains("ListStreamConsumers failed"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_limit_for_the_call_rate_is_retried_not_reported() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-a", 1)]).await;
    emulator.faults.lock().unwrap().register_rate_limited = 3;
    let (_dir, checkpoint) = temp_checkpoint();
    let service = Running::start(&TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).toml(), &emulator.url);
    let records = records(9, 50, 32);
    put_all(&client, "in", &records).await;
    service.wait_accepted("out-a", 50).await;
    assert_eq!(emulator.calls("RegisterStreamConsumer"), 4, "three refused for the rate, then registered");
    assert_eq!(consumers(&client, "in").await, vec!["fanout-test".to_string()]);
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_registered_by_someone_else_is_used_and_never_registered_or_removed() {
    let (emulator, client) = with_streams(&[("in", 2), ("out-a", 1)]).await;
    let arn = stream_arn(&client, "in").await;
    let shared = client.register_stream_consumer().stream_arn(&arn).consumer_name("platform-owned").send().await;
    let shared = shared.unwrap().consumer().unwrap().consumer_arn().to_string();
    let (_dir, checkpoint) = temp_checkpoint();
    let config = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).without("source", "consumer_name").set(
        "source",
        "consumer_arn",
        &shared,
    );
    let service = Running::start(&config.toml(), &emulator.url);
    let records = records(7, 200, 64);
    put_all(&client, "in", &records).await;
    service.wait_accepted("out-a", 200).await;
    assert_eq!(contents(&client, "out-a").await, sorted(&records));
    assert_eq!(consumers(&client, "in").await, vec!["platform-owned".to_string()], "nothing else registered");
    service.stop().await.unwrap();

    // `consumer deregister` leaves a consumer it did not register alone.
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &config.toml());
    let out = run_cli(&["consumer", "deregister", "--config", &path, "--force"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("did not register"), "{stderr}");
    assert_eq!(consumers(&client, "in").await, vec!["platform-owned".to_string()]);

    // A consumer ARN of another stream is refused with both named.
    let other = stream_arn(&client, "out-a").await;
    let wrong = format!("{other}/consumer/x:1");
    let config = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).without("source", "consumer_name").set(
        "source",
        "consumer_arn",
        &wrong,
    );
    let service = Running::start(&config.toml(), &emulator.url);
    let err = service.finished().await.expect_err("refused");
    assert!(err.to_string().contains("is not a consumer of source stream `in`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_deregister_refuses_while_a_worker_holds_a_lease_unless_forced() {
    let (emulator, client) = with_streams(&[("in", 2), ("out-a", 1)]).await;
    let dynamo = Dynamo::start().await;
    let config = worker_config(&emulator, &dynamo, "w1");
    let worker = Worker::start("w1", &config.toml(), &emulator.url);
    wait_until("w1 holds both leases", || async {
        dynamo.leases("leases").await.iter().filter(|l| l.owner.as_deref() == Some("w1")).count() == 2
    })
    .await;
    assert_eq!(consumers(&client, "in").await, vec!["fanout-test".to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &config.toml());

    let out = run_cli(&["consumer", "deregister", "--config", &path]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("workers w1 still hold 2 leases"), "{stderr}");
    assert_eq!(consumers(&client, "in").await, vec!["fanout-test".to_string()], "still registered");

    // Once the fleet is stopped (its leases released), it goes; a second run has nothing to do.
    worker.stop().await.unwrap();
    let out = run_cli(&["consumer", "deregister", "--config", &path, "--json"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done, serde_json::json!({ "stream": "in", "consumer": "fanout-test", "existed": true }));
    assert!(consumers(&client, "in").await.is_empty());
    let out = run_cli(&["consumer", "deregister", "--config", &path]).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to do"));

    // --force deregisters under a running worker.
    let worker = Worker::start("w1", &config.toml(), &emulator.url);
    wait_until("w1 holds a lease again", || async {
        dynamo.leases("leases").await.iter().any(|l| l.owner.as_deref() == Some("w1"))
    })
    .await;
    wait_until("w1 registered its consumer again", || async { !consumers(&client, "in").await.is_empty() }).await;
    let out = run_cli(&["consumer", "deregister", "--config", &path, "--force"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(consumers(&client, "in").await.is_empty(), "gone under a running worker");
    worker.kill().await;
}
