//! Destinations in other regions: a second emulator stands for eu-west-1, with its own endpoint,
//! region and account-wide stream list.

use ferrokinesis::store::StoreOptions;

use crate::helpers::*;
use crate::resharding::per_key;

/// `n` records over 20 partition keys, numbered, so that the order per key can be checked.
fn keyed(tag: &str, n: usize) -> Vec<Rec> {
    (0..n).map(|i| (format!("key-{:02}", i % 20), format!("{tag}-{i:05}").into_bytes())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_in_two_regions_get_every_record_in_order_and_new_ones_are_found() {
    let home = Emulator::start().await;
    let dr = Emulator::with_options(StoreOptions { aws_region: "eu-west-1".into(), ..store_options() }).await;
    let (home_client, dr_client) = (home.client(), dr.client());
    create_stream(&home_client, "in", 2).await;
    create_stream(&home_client, "out-a", 1).await;
    // The same stream name in two regions is two destinations; the source's name in another
    // region is a destination too (a disaster-recovery copy), never the source itself.
    create_stream(&dr_client, "out-a", 2).await;
    create_stream(&dr_client, "in", 1).await;
    // The second region's group selects by tag as well as by name.
    create_stream(&dr_client, "out-untagged", 1).await;
    for name in ["out-a", "in"] {
        tag(&dr_client, name).await;
    }
    let (_dir, checkpoint) = temp_checkpoint();
    let dr_group = Group::new("^(in|out-.*)$")
        .set("region", "eu-west-1")
        .set("endpoint_url", &dr.url)
        .set_raw("tags", "{ fanout = \"enabled\" }")
        .set("refresh_interval", "1s")
        .set("linger", "20ms");
    // The home group's pattern matches the source too: it is left out.
    let toml =
        TestConfig::new(&home.url).pattern("^(in|out-.*)$").checkpoint_file(&checkpoint).add_group(dr_group).toml();
    let service = Running::start(&toml, &home.url);

    let first = keyed("first", 2_000);
    put_all(&home_client, "in", &first).await;
    // The home region's out-a was found first and keeps its name as its label; the other one is
    // told apart by its region.
    for label in ["out-a", "eu-west-1/out-a", "in"] {
        service.wait_accepted(label, 2_000).await;
    }

    create_stream(&dr_client, "out-new", 1).await;
    tag(&dr_client, "out-new").await;
    wait_until("the stream created in the second region is a destination", || async {
        service.metrics.destinations.get() == 4
    })
    .await;
    let second = keyed("second", 500);
    put_all(&home_client, "in", &second).await;
    for label in ["out-a", "eu-west-1/out-a", "in"] {
        service.wait_accepted(label, 2_500).await;
    }
    service.wait_accepted("out-new", 500).await;
    service.stop().await.unwrap();

    let everything = sorted(&[first, second.clone()].concat());
    let source_order = per_key(&home_client, "in").await;
    for (client, stream) in [(&home_client, "out-a"), (&dr_client, "out-a"), (&dr_client, "in")] {
        assert_eq!(contents(client, stream).await, everything, "{stream}: every record exactly once");
        assert_eq!(per_key(client, stream).await, source_order, "{stream}: the order of every key kept");
    }
    assert_eq!(contents(&dr_client, "out-new").await, sorted(&second), "records read after it appeared");
    assert_eq!(contents(&home_client, "in").await.len(), 2_500, "the source was not written to");
    assert!(
        contents(&dr_client, "out-untagged").await.is_empty(),
        "a stream without the group's tags is not a destination"
    );
    assert!(dr.calls("ListTagsForStream") >= 3, "tags were read");
}

async fn tag(client: &aws_sdk_kinesis::Client, stream: &str) {
    client.add_tags_to_stream().stream_name(stream).tags("fanout", "enabled").send().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streams_tags_are_read_once_per_refresh_interval() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-a", 1), ("out-b", 1), ("other", 1)]).await;
    tag(&client, "out-a").await;
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .group_raw("tags", "{ fanout = \"enabled\" }")
        .group("refresh_interval", "1h")
        .toml();
    let settings = std::sync::Arc::new(kinesis_fanout::Settings::from_toml(&toml).unwrap());
    let discovery = kinesis_fanout::discovery::Discovery::new(settings, vec![client.clone()]);
    for _ in 0..3 {
        let changes = discovery.changes(&Default::default()).await.unwrap();
        let found: Vec<String> = changes
            .into_iter()
            .filter_map(|c| match c {
                kinesis_fanout::discovery::Change::Writable { candidate, .. } => Some(candidate.name),
                _ => None,
            })
            .collect();
        assert_eq!(found, vec!["out-a".to_string()], "only the tagged stream");
    }
    assert_eq!(emulator.calls("ListTagsForStream"), 2, "out-a and out-b, once each over three rounds");
}

/// The destinations a discovery round found writable, and those it says are gone.
fn found_and_gone(changes: Vec<kinesis_fanout::discovery::Change>) -> (Vec<String>, Vec<String>) {
    let (mut found, mut gone) = (Vec::new(), Vec::new());
    for change in changes {
        match change {
            kinesis_fanout::discovery::Change::Writable { candidate, .. } => found.push(candidate.name),
            kinesis_fanout::discovery::Change::Gone { name, .. } => gone.push(name),
        }
    }
    (found, gone)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_selected_destination_stays_while_its_tags_cannot_be_read() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-a", 1)]).await;
    tag(&client, "out-a").await;
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .group_raw("tags", "{ fanout = \"enabled\" }")
        .toml();
    let settings = std::sync::Arc::new(kinesis_fanout::Settings::from_toml(&toml).unwrap());
    let discovery = kinesis_fanout::discovery::Discovery::new(settings, vec![client.clone()]);
    let (found, _) = found_and_gone(discovery.changes(&Default::default()).await.unwrap());
    assert_eq!(found, vec!["out-a".to_string()]);
    let current = std::collections::BTreeSet::from([(0usize, "out-a".to_string())]);

    // One ListStreams answer leaves it out (a page boundary, a lagging index): it still exists,
    // so it stays.
    emulator.faults.lock().unwrap().hide_from_list_streams = Some("out-a".into());
    let (_, gone) = found_and_gone(discovery.changes(&current).await.unwrap());
    assert!(gone.is_empty(), "left out of one listing, but it exists: {gone:?}");

    // Listed again, but its tags cannot be read (throttled): nothing says they changed.
    {
        let mut faults = emulator.faults.lock().unwrap();
        faults.hide_from_list_streams = None;
        faults.throttle_list_tags = true;
    }
    let before = emulator.calls("ListTagsForStream");
    for _ in 0..3 {
        let (_, gone) = found_and_gone(discovery.changes(&current).await.unwrap());
        assert!(gone.is_empty(), "removed on a failed tag read: {gone:?}");
    }
    assert!(emulator.calls("ListTagsForStream") > before, "its tags were asked for");

    // Read, and no longer matching: that is evidence, and it goes.
    client.remove_tags_from_stream().stream_name("out-a").tag_keys("fanout").send().await.unwrap();
    emulator.faults.lock().unwrap().throttle_list_tags = false;
    let (_, gone) = found_and_gone(discovery.changes(&current).await.unwrap());
    assert_eq!(gone, vec!["out-a".to_string()], "its tags were read and no longer match");
}
