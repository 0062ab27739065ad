//! Streams named by ARN (issue 26): a stream of another account, shared with this service by a
//! resource policy, is reached by its ARN alone; ListStreams never lists it.

use crate::helpers::*;

async fn arn_of(client: &aws_sdk_kinesis::Client, stream: &str) -> String {
    let out = client.describe_stream_summary().stream_name(stream).send().await.unwrap();
    out.stream_description_summary().unwrap().stream_arn().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_named_by_arn_writes_to_a_stream_that_list_streams_never_shows() {
    let (emulator, client) = with_streams(&[("in", 2), ("out-a", 1), ("shared-orders", 1)]).await;
    let arn = arn_of(&client, "shared-orders").await;
    {
        let mut faults = emulator.faults.lock().unwrap();
        faults.hide_from_list_streams = Some("shared-orders".into());
        faults.log_puts = true;
    }
    let (_dir, checkpoint) = temp_checkpoint();
    // The pattern would take shared-orders too, were it listed: the ARN is the only way to it.
    let config = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .pattern("^(out-a|shared-orders)$")
        .add_group(Group::of_streams(&[&arn]));
    let settings = kinesis_fanout::Settings::from_toml(&config.toml()).unwrap();

    // `check` describes it (reachable, writable, limits) and names its group.
    let report = kinesis_fanout::operate::check::report(&settings, &sdk_config(&emulator.url)).await.unwrap();
    let text = report.render(&settings, true);
    assert!(
        text.contains(&format!("{arn}: destination (group 1: streams {arn}), 1 open shards, records up to 1024 KiB")),
        "{text}"
    );
    assert!(text.contains("out-a: destination (group 0"), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("  shared-orders:")), "never listed by name: {text}");

    let service = Running::start(&config.toml(), &emulator.url);
    let records = records(3, 300, 64);
    put_all(&client, "in", &records).await;
    service.wait_accepted("shared-orders", 300).await;
    service.wait_accepted("out-a", 300).await;
    assert_eq!(contents(&client, "shared-orders").await, sorted(&records));
    assert_eq!(contents(&client, "out-a").await, sorted(&records));
    let puts = emulator.faults.lock().unwrap().puts.clone();
    assert!(!puts.iter().any(|p| p.stream == "shared-orders"), "never named by its name: written by ARN");

    // A reload that drops the ARN group removes it, although it is never listed (nothing says it
    // is gone but the configuration).
    let without = config.clone().groups([Group::fast("^(out-a|shared-orders)$")]);
    let report = service.reloader.reload(kinesis_fanout::Settings::from_toml(&without.toml())).await.unwrap();
    assert_eq!(report.expect("changed").removed, ["shared-orders"]);
    let more = crate::helpers::records(4, 100, 64);
    put_all(&client, "in", &more).await;
    service.wait_accepted("out-a", 400).await;
    assert_eq!(contents(&client, "shared-orders").await, sorted(&records), "nothing after the reload");
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_named_by_arn_is_read_and_never_written_to() {
    let (emulator, client) = with_streams(&[("in", 2), ("out-a", 1)]).await;
    let source = arn_of(&client, "in").await;
    let (_dir, checkpoint) = temp_checkpoint();
    // The pattern matches the source's name too: the source is still no destination.
    let config = TestConfig::new(&emulator.url).source(&source).checkpoint_file(&checkpoint).pattern("^(in|out-a)$");
    let service = Running::start(&config.toml(), &emulator.url);
    let records = records(5, 200, 64);
    put_all(&client, "in", &records).await;
    service.wait_accepted("out-a", 200).await;
    assert_eq!(contents(&client, "out-a").await, sorted(&records));
    assert_eq!(contents(&client, "in").await, sorted(&records), "nothing written back to the source");
    assert_eq!(service.accepted("in"), 0);
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_of_groups_named_by_arn_only_never_lists_streams() {
    let (emulator, client) = with_streams(&[("in", 1), ("shared-orders", 1)]).await;
    let arn = arn_of(&client, "shared-orders").await;
    let (_dir, checkpoint) = temp_checkpoint();
    let config = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).groups([Group::of_streams(&[&arn])]);
    let service = Running::start(&config.toml(), &emulator.url);
    let records = records(4, 100, 32);
    put_all(&client, "in", &records).await;
    service.wait_accepted("shared-orders", 100).await;
    assert_eq!(contents(&client, "shared-orders").await, sorted(&records));
    assert_eq!(emulator.calls("ListStreams"), 0, "a resource policy grants no ListStreams");
    service.stop().await.unwrap();
}
