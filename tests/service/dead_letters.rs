//! `dead-letters replay`: records a destination refused, re-sent once the cause is fixed.

use kinesis_fanout::operate::replay::{ReplayArgs, Summary, replay};

use crate::helpers::*;

async fn run(settings: &kinesis_fanout::Settings, url: &str, args: &ReplayArgs) -> Summary {
    replay(settings, &sdk_config(url), args, |_| {}).await.expect("the replay runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_resends_each_dead_letter_once_and_reports_what_it_cannot() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-a", 1), ("out-b", 1), ("dlq", 1)]).await;
    // out-a refuses everything for good (AccessDenied): its records go to the dead-letter stream.
    emulator.faults.lock().unwrap().deny_puts_to = Some("out-a".into());
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).group("dead_letter_stream", "dlq").toml();
    let service = Running::start(&toml, &emulator.url);
    let input = records(91, 200, 64);
    put_all(&client, "in", &input).await;
    service.wait_accepted("out-b", 200).await;
    wait_until("every record of out-a dead-lettered", || async { service.counter("out-a", "dead_lettered") >= 200 })
        .await;
    service.stop().await.unwrap();
    // Two records that are not envelopes: nonsense, and an envelope cut short.
    put_all(
        &client,
        "dlq",
        &[("x".into(), b"not json".to_vec()), ("y".into(), b"{\"destination\":\"out-a\",".to_vec())],
    )
    .await;
    let settings = kinesis_fanout::Settings::from_toml(&toml).unwrap();
    let args = ReplayArgs { stream: "dlq".into(), ..Default::default() };

    // An unknown destination is an error before anything is sent.
    let unknown = ReplayArgs { destination: Some("out-nope".into()), ..args.clone() };
    let err = replay(&settings, &sdk_config(&emulator.url), &unknown, |_| {}).await.unwrap_err();
    assert!(err.to_string().contains("`out-nope` is not a destination"), "{err}");

    // A dry run counts and sends nothing.
    let dry = run(&settings, &emulator.url, &ReplayArgs { dry_run: true, ..args.clone() }).await;
    assert_eq!(dry.destinations["out-a"].replayed, 200);
    assert!(contents(&client, "out-a").await.is_empty());

    // Still refused: reported, and never written back into the dead-letter stream.
    let refused = run(&settings, &emulator.url, &args).await;
    assert_eq!(refused.destinations["out-a"].rejected_again, 200, "{:?}", refused.destinations);
    assert!(refused.refused[0].contains("AccessDeniedException"), "{:?}", refused.refused[0]);
    assert_eq!(refused.unreadable.len(), 2, "{:?}", refused.unreadable);
    assert!(refused.unreadable.iter().all(|u| u.contains("not a dead-letter envelope")), "{:?}", refused.unreadable);
    assert_eq!(contents(&client, "dlq").await.len(), 202, "the dead-letter stream is left as it was");

    // New dead letters after the fix are replayed, each once; a second run sends nothing.
    emulator.faults.lock().unwrap().deny_puts_to = Some("out-a".into());
    let service = Running::start(&toml, &emulator.url);
    let more = records(92, 100, 64);
    put_all(&client, "in", &more).await;
    wait_until("the new records dead-lettered", || async { service.counter("out-a", "dead_lettered") >= 100 }).await;
    service.stop().await.unwrap();
    emulator.faults.lock().unwrap().deny_puts_to = None;
    let first = run(&settings, &emulator.url, &args).await;
    assert_eq!(first.destinations["out-a"].replayed, 100, "only what came after the last run");
    assert_eq!(contents(&client, "out-a").await, sorted(&more));
    let second = run(&settings, &emulator.url, &args).await;
    assert_eq!(second.read, 0, "nothing new");
    assert_eq!(contents(&client, "out-a").await, sorted(&more), "nothing sent twice");

    // Forgetting the kept position reads everything again (here only counted).
    let again = run(&settings, &emulator.url, &ReplayArgs { restart: true, dry_run: true, ..args.clone() }).await;
    assert_eq!(again.read, 302, "200 refused, 2 unreadable, 100 replayed");
    assert_eq!(again.destinations["out-a"].replayed, 300);

    // A filter skips the others' records.
    let filtered =
        run(&settings, &emulator.url, &ReplayArgs { destination: Some("out-b".into()), ..args.clone() }).await;
    assert!(filtered.destinations.get("out-a").is_none_or(|c| c.replayed == 0));

    // An envelope whose record Kinesis would refuse (an empty partition key) is reported alone.
    let invalid = br#"{"destination":"out-a","partition_key":"","data":"aGk="}"#.to_vec();
    put_all(&client, "dlq", &[("z".into(), invalid)]).await;
    let last = run(&settings, &emulator.url, &args).await;
    assert_eq!(last.destinations["out-a"].rejected_again, 1);
    assert!(last.refused[0].contains("invalid entry"), "{:?}", last.refused);
    assert_eq!(contents(&client, "out-a").await, sorted(&more), "nothing else sent");

    // A run filtered to one destination, then one over all: nothing is sent twice.
    let envelope = |destination: &str, data: &str| {
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD.encode(data);
        (
            format!("k-{destination}"),
            format!(r#"{{"destination":"{destination}","partition_key":"k","data":"{data}"}}"#).into_bytes(),
        )
    };
    put_all(&client, "dlq", &[envelope("out-a", "late-a"), envelope("out-b", "late-b")]).await;
    let only_b = run(&settings, &emulator.url, &ReplayArgs { destination: Some("out-b".into()), ..args.clone() }).await;
    assert_eq!(only_b.destinations["out-b"].replayed, 1);
    assert_eq!(only_b.destinations["out-a"].skipped, 1);
    let rest = run(&settings, &emulator.url, &args).await;
    assert_eq!(rest.destinations["out-a"].replayed, 1, "the record the filtered run skipped");
    assert_eq!(rest.destinations["out-b"].skipped, 1, "sent already by the filtered run");
    for (stream, data) in [("out-b", b"late-b"), ("out-a", b"late-a")] {
        let copies = contents(&client, stream).await.iter().filter(|(_, d)| d.as_slice() == data.as_slice()).count();
        assert_eq!(copies, 1, "{stream} got its late record once");
    }
}

/// A dead-letter envelope naming `destination`.
fn envelope(destination: &str, key: &str) -> Rec {
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD.encode(format!("{destination}:{key}"));
    let json = serde_json::json!({
        "source_stream": "in", "shard_id": "shardId-000000000000", "sequence_number": "1",
        "destination": destination, "error_code": "AccessDeniedException", "error_message": "no",
        "partition_key": key, "data": data,
    });
    (key.to_string(), serde_json::to_vec(&json).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_selects_destinations_as_discovery_does_and_never_moves_past_what_it_could_not_tell() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-tagged", 1), ("out-untagged", 1), ("dlq", 1)]).await;
    client.add_tags_to_stream().stream_name("out-tagged").tags("fanout", "enabled").send().await.unwrap();
    // A group selected by tags, naming no region (the SDK's default region applies).
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .group_raw("tags", "{ fanout = \"enabled\" }")
        .group("dead_letter_stream", "dlq")
        .without("aws", "region")
        .toml();
    let settings = kinesis_fanout::Settings::from_toml(&toml).unwrap();
    // Labels as the service writes them: by name, by region and name, by account, region and
    // name (the emulator's account is 000000000000); and two that are no destination.
    let letters = vec![
        envelope("out-tagged", "by-name"),
        envelope("us-east-1/out-tagged", "by-region"),
        envelope("000000000000/us-east-1/out-tagged", "by-account"),
        envelope("111111111111/us-east-1/out-tagged", "other-account"),
        envelope("out-untagged", "untagged"),
        // Deleted since: no stream to ask the tags of, which stops nothing.
        envelope("out-deleted", "deleted"),
    ];
    put_all(&client, "dlq", &letters).await;
    let args = ReplayArgs { stream: "dlq".into(), ..Default::default() };

    // Tags that cannot be read decide nothing: the run stops, sending nothing, moving nothing.
    emulator.faults.lock().unwrap().throttle_list_tags = true;
    let err = replay(&settings, &sdk_config(&emulator.url), &args, |_| {}).await.unwrap_err();
    assert!(format!("{err}").contains("cannot tell whether"), "{err}");
    assert!(contents(&client, "out-tagged").await.is_empty());

    emulator.faults.lock().unwrap().throttle_list_tags = false;
    let summary = run(&settings, &emulator.url, &args).await;
    let keys: Vec<String> = contents(&client, "out-tagged").await.into_iter().map(|r| r.0).collect();
    assert_eq!(keys, vec!["by-account", "by-name", "by-region"], "{summary:?}");
    assert_eq!(summary.refused.len(), 3, "{:?}", summary.refused);
    assert!(
        summary.refused.iter().all(|r| r.contains("no existing stream is that destination")),
        "{:?}",
        summary.refused
    );
    assert!(contents(&client, "out-untagged").await.is_empty());
}
