use std::path::Path;
use std::process::Output;

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_kinesis-fanout");

async fn run_cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(BIN);
    command.args(args).env_remove("KINESIS_FANOUT_CONFIG").env("RUST_LOG", "warn");
    for (k, v) in env {
        command.env(k, v);
    }
    tokio::time::timeout(WAIT, command.output()).await.expect("the command finishes").expect("the binary runs")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

const GOOD: &str = r#"
[source]
stream_name = "app-input"
[[destinations]]
pattern = "^app-output-.*$"
"#;

#[tokio::test]
async fn bad_configs_exit_2_and_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("missing key", "[[destinations]]\npattern = \"x\"\n", "source.stream_name"),
        (
            "bad regex",
            "[source]\nstream_name = \"s\"\n[[destinations]]\npattern = \"(oops\"\n",
            "destinations[0].pattern",
        ),
        ("bad duration", &format!("{GOOD}linger = \"soonish\"\n"), "destinations[0].linger"),
        (
            "unknown key",
            "[source]\nstream_name = \"s\"\ncolour = \"red\"\n[[destinations]]\npattern = \"x\"\n",
            "source.colour",
        ),
        (
            "at_timestamp without timestamp",
            "[source]\nstream_name = \"s\"\ninitial_position = \"at_timestamp\"\n[[destinations]]\npattern = \"x\"\n",
            "source.initial_timestamp",
        ),
        ("no destinations", "[source]\nstream_name = \"s\"\n", "destinations"),
        ("not TOML", "[source\nstream_name = ", "cannot read configuration file"),
    ];
    for (what, text, key) in cases {
        let path = write(dir.path(), "bad.toml", text);
        for command in ["check", "run"] {
            let out = run_cli(&[command, "--config", &path], &[]).await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what} ({command}): {stderr}");
            assert!(stderr.contains(key), "{what} ({command}) should name {key}: {stderr}");
        }
    }
    let good = write(dir.path(), "good.toml", GOOD);
    let out = run_cli(&["check", "--config", &good], &[("KINESIS_FANOUT__SHUTDOWN__GRACE_PERIOD", "whenever")]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("shutdown.grace_period"));
    let out = run_cli(&["check"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "no config at all");
    assert!(String::from_utf8_lossy(&out.stderr).contains("KINESIS_FANOUT_CONFIG"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_explains_every_stream_and_fails_on_a_missing_source() {
    let (emulator, _client) = with_streams(&[
        ("app-input", 2),
        ("app-output-orders", 1),
        ("app-output-search", 1),
        ("app-output-scratch", 1),
        ("app-dlq", 1),
        ("other", 1),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = TestConfig::new(&emulator.url)
        .source("app-input")
        .pattern("^app-.*$")
        .checkpoint_file(&dir.path().join("c.json"))
        .group_raw("exclude", "[\"-scratch$\"]")
        .group("dead_letter_stream", "app-dlq")
        .toml();
    let path = write(dir.path(), "c.toml", &config);
    let aws = [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")];
    let mut env = aws.to_vec();
    env.push(("KINESIS_FANOUT_CONFIG", &path));
    let out = run_cli(&["check"], &env).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for expected in [
        "source: app-input (2 open shards) in region us-east-1",
        "as the service's own credentials",
        "(account ",
        "app-output-orders: destination (group 0: ^app-.*$), 1 open shards",
        "app-output-search: destination (group 0",
        "app-input: not a destination: the source stream itself",
        "app-dlq: not a destination: a dead-letter stream",
        "app-output-scratch: not a destination: excluded by group 0's exclude `-scratch$`",
        "other: not a destination: matches no group's pattern",
    ] {
        assert!(stdout.contains(expected), "missing `{expected}` in:\n{stdout}");
    }

    let mut env = aws.to_vec();
    env.push(("KINESIS_FANOUT__SOURCE__STREAM_NAME", "nope"));
    let out = run_cli(&["check", "--config", &path], &env).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`nope` does not exist"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_explain_says_what_every_group_thought_and_json_says_the_same() {
    let (emulator, _client) =
        with_streams(&[("app-input", 1), ("app-output-orders", 1), ("app-output-scratch", 1), ("app-dlq", 1)]).await;
    let dir = tempfile::tempdir().unwrap();
    // Two groups match app-output-orders; the first wins. The first also matches the source.
    let config = TestConfig::new(&emulator.url)
        .source("app-input")
        .pattern("^app-.*$")
        .checkpoint_file(&dir.path().join("c.json"))
        .group_raw("exclude", "[\"-scratch$\"]")
        .group("dead_letter_stream", "app-dlq")
        .add_group(Group::new("^app-output-orders$"))
        .toml();
    let path = write(dir.path(), "c.toml", &config);
    let env = [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")];
    let out = run_cli(&["check", "--explain", "--config", &path], &env).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for expected in [
        "app-output-orders: destination (group 0: ^app-.*$)",
        "group 0 (^app-.*$): matches: the stream is this group's",
        "group 1 (^app-output-orders$): matches too, but group 0 came first: the first matching group wins",
        "app-input: not a destination: the source stream itself",
        "app-dlq: not a destination: a dead-letter stream",
        "app-output-scratch: not a destination: excluded by group 0's exclude `-scratch$`",
        "group 0 (^app-.*$): does not match: excluded by `-scratch$`",
        "group 1 (^app-output-orders$): does not match: pattern `^app-output-orders$` does not match",
    ] {
        assert!(stdout.contains(expected), "missing `{expected}` in:\n{stdout}");
    }

    let out = run_cli(&["check", "--json", "--config", &path], &env).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(json["source"]["stream"], "app-input");
    let streams = json["places"][0]["streams"].as_array().unwrap();
    let orders = streams.iter().find(|s| s["name"] == "app-output-orders").unwrap();
    assert_eq!(orders["verdict"], "destination");
    assert_eq!(orders["group"], 0);
    assert_eq!(orders["groups"].as_array().unwrap().len(), 2, "both groups' opinions");
    let dlq = streams.iter().find(|s| s["name"] == "app-dlq").unwrap();
    assert_eq!(dlq["verdict"], "not a destination");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_runs_from_the_binary_in_text_and_json() {
    let (emulator, _client) = with_streams(&[("in", 1)]).await;
    let dir = tempfile::tempdir().unwrap();
    let path =
        write(dir.path(), "c.toml", &TestConfig::new(&emulator.url).checkpoint_file(&dir.path().join("c.json")).toml());
    let env = [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")];
    let out = run_cli(&["leases", "--config", &path, "--json"], &env).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(rows, serde_json::json!([]), "nothing checkpointed yet");
    let out = run_cli(&["leases", "--config", &path, "--observe", "0s"], &env).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("shard"), "a table header");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replay_refuses_to_send_unasked_and_counts_a_dry_run() {
    let (emulator, _client) = with_streams(&[("in", 1), ("dlq", 1)]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = TestConfig::new(&emulator.url)
        .checkpoint_file(&dir.path().join("c.json"))
        .group("dead_letter_stream", "dlq")
        .toml();
    let path = write(dir.path(), "c.toml", &config);
    let env = [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")];
    let out = run_cli(&["dead-letters", "replay", "--config", &path, "--stream", "dlq"], &env).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("without --yes"), "{stderr}");
    let out = run_cli(&["dead-letters", "replay", "--config", &path, "--stream", "dlq", "--dry-run"], &env).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 dead-letter records read from dlq"));
    let out = run_cli(&["dead-letters", "replay", "--config", &path, "--stream", "nope", "--yes"], &env).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("`nope` is not the dead_letter_stream"), "an unknown stream");
}

#[tokio::test]
async fn a_first_run_without_a_region_or_credentials_says_what_to_set_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let no_region = write(dir.path(), "a.toml", GOOD);
    let with_region = write(dir.path(), "b.toml", &format!("[aws]\nregion = \"us-east-1\"\n{GOOD}"));
    for (config, says) in [
        (no_region, "no AWS region: set AWS_REGION, or `region` under [aws]"),
        (with_region, "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ] {
        // A newcomer's shell: nothing of AWS set, no ~/.aws.
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(["check", "--config", &config])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir.path());
        let out = tokio::time::timeout(WAIT, command.output()).await.expect("it finishes").expect("it runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(
            stderr.contains(if config.ends_with("a.toml") { "no AWS region" } else { "AWS credentials" }),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "one line, none of the SDK's warnings: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_no_colour_when_stderr_is_not_a_terminal() {
    let emulator = Emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = TestConfig::new(&emulator.url).source("nope").checkpoint_file(&dir.path().join("c.json")).toml();
    let path = write(dir.path(), "c.toml", &config);
    let env = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("RUST_LOG", "kinesis_fanout=debug"),
    ];
    let out = run_cli(&["run", "--config", &path], &env).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the source does not exist: {stderr}");
    assert!(stderr.contains("INFO") && stderr.contains("Serving /metrics"), "it logged: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "escape codes in a log written to a pipe: {stderr:?}");
}

#[test]
fn the_demo_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml");
    let settings = kinesis_fanout::Settings::load_with_env(&path, []).expect("config/demo.toml is valid");
    assert_eq!(settings.source.stream_name, "app-input");
}

#[test]
fn the_documented_example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kinesis-fanout.toml");
    let settings = kinesis_fanout::Settings::load_with_env(&path, []).expect("config/kinesis-fanout.toml is valid");
    assert_eq!(settings.source.stream_name, "app-input");
    assert!(settings.destinations[0].matches("app-output-orders"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_probes_the_admin_port() {
    let (emulator, _client) = with_streams(&[("in", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let service = Running::start(&TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).toml(), &emulator.url);
    let addr = service.admin.to_string();
    let out = run_cli(&["healthcheck", "--addr", &addr], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    service.stop().await.unwrap();
    let out = run_cli(&["healthcheck", "--addr", &addr], &[]).await;
    assert_eq!(out.status.code(), Some(1), "a stopped service fails the health check");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_checkpoint_file_is_refused_until_reset_explicitly() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-x", 1)]).await;
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoints.json");
    std::fs::write(&checkpoint, b"{\"version\":1,\"source_str").unwrap();
    let path = write(dir.path(), "c.toml", &TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).toml());
    let aws = [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")];

    let out = run_cli(&["run", "--config", &path], &aws).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("checkpoints.json") && stderr.contains("corrupt"), "{stderr}");
    assert!(checkpoint.exists(), "the corrupt file is left alone");

    // The explicit escape hatch moves it aside and starts over.
    let mut command = tokio::process::Command::new(BIN);
    command.args(["run", "--reset-checkpoints", "--config", &path]).env("RUST_LOG", "warn");
    for (k, v) in aws {
        command.env(k, v);
    }
    let child = command.spawn().unwrap();
    let pid = child.id().unwrap();
    wait_until("the corrupt file was moved aside", || async {
        std::fs::read_dir(dir.path()).unwrap().flatten().any(|e| e.file_name().to_string_lossy().contains(".reset-"))
    })
    .await;
    put_all(&client, "in", &records(90, 10, 8)).await;
    wait_until("copying again", || async { !read_all(&client, "out-x").await.is_empty() }).await;
    std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    let status = tokio::time::timeout(WAIT, child.wait_with_output()).await.unwrap().unwrap().status;
    assert!(status.success(), "SIGTERM drains and exits 0: {status:?}");
    assert!(std::fs::read_to_string(&checkpoint).unwrap().contains("shardId-"), "a fresh checkpoint was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_groups_and_refuses_a_bad_file_naming_its_keys() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-x", 1), ("out-y", 1)]).await;
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoints.json");
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let config = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).set("metrics", "listen", &listen);
    let path = write(dir.path(), "c.toml", &config.clone().groups([Group::fast("^out-x$")]).toml());
    let mut command = tokio::process::Command::new(BIN);
    command.args(["run", "--config", &path]).env("RUST_LOG", "warn").stderr(std::process::Stdio::piped());
    for (k, v) in [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")] {
        command.env(k, v);
    }
    let child = command.spawn().unwrap();
    let pid = child.id().unwrap().to_string();
    let reloads = |result: &'static str| {
        let url = format!("http://{listen}/metrics");
        async move {
            let text = match reqwest::get(&url).await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            text.contains(&format!("kinesis_fanout_config_reloads_total{{result=\"{result}\"}} 1"))
        }
    };
    let first = records(1, 20, 8);
    put_all(&client, "in", &first).await;
    wait_until("out-x copies", || async { all_hold(&client, &["out-x"], &first).await }).await;

    write(dir.path(), "c.toml", &config.clone().groups([Group::fast("^out-x$"), Group::fast("^out-y$")]).toml());
    std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    wait_until("the reload applied", || reloads("applied")).await;
    let second = records(2, 20, 8);
    put_all(&client, "in", &second).await;
    wait_until("out-y, added by the reload, copies", || async { all_hold(&client, &["out-y"], &second).await }).await;

    write(dir.path(), "c.toml", &config.groups([Group::fast("^out-x$"), Group::fast("(unclosed")]).toml());
    std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    wait_until("the bad file refused", || reloads("invalid")).await;
    let third = records(3, 20, 8);
    put_all(&client, "in", &third).await;
    wait_until("both still copy", || async { all_hold(&client, &["out-x", "out-y"], &third).await }).await;

    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "SIGTERM drains and exits 0: {stderr}");
    assert!(stderr.contains("destinations[1].pattern") && stderr.contains("refused"), "{stderr}");
}
