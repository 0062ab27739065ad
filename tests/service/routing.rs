//! Routing (issue 27): a destination group takes the records its filter says, and a record its
//! filter refuses counts as accepted by it.

use std::collections::BTreeSet;

use kinesis_fanout::Settings;

use crate::helpers::*;

/// Records of 40 keys, in put order: JSON with a region and a total, and every 30th not JSON.
fn orders(from: usize, n: usize) -> Vec<Rec> {
    (from..from + n)
        .map(|i| {
            let key = format!("k-{}", i % 40);
            let data = if i % 30 == 29 {
                format!("plain text {i}")
            } else {
                let region = if i % 3 == 0 { "eu" } else { "us" };
                format!(r#"{{"seq":{i},"region":"{region}","total":{}}}"#, (i * 37) % 1000)
            };
            (key, data.into_bytes())
        })
        .collect()
}

fn region_of(data: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(data).ok()?;
    value.get("region")?.as_str().map(str::to_string)
}

/// Per key, the records in the order a stream holds them.
fn per_key(records: impl IntoIterator<Item = Rec>) -> std::collections::BTreeMap<String, Vec<Vec<u8>>> {
    let mut keys: std::collections::BTreeMap<String, Vec<Vec<u8>>> = Default::default();
    for (key, data) in records {
        keys.entry(key).or_default().push(data);
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_with_filters_get_exactly_what_their_filters_say_in_order_per_key() {
    let (emulator, client) = limited(&[("in", 2), ("out-all", 1), ("out-eu", 2), ("out-k1", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let config = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).groups([
        Group::fast("^out-all$"),
        Group::fast("^out-eu$").set_raw("filter", r#"{ json = { "/region" = "eu" } }"#),
        Group::fast("^out-k1$").set_raw("filter", r#"{ partition_key = "^k-1[0-9]?$", data_prefix = "{" }"#),
    ]);
    let service = Running::start(&config.toml(), &emulator.url);
    let records = orders(0, 1200);
    put_all(&client, "in", &records).await;

    let eu: Vec<Rec> = records.iter().filter(|(_, d)| region_of(d).as_deref() == Some("eu")).cloned().collect();
    let k1: Vec<Rec> = records
        .iter()
        .filter(|(k, d)| (k == "k-1" || (k.len() == 4 && k.starts_with("k-1"))) && d.starts_with(b"{"))
        .cloned()
        .collect();
    let not_json = records.iter().filter(|(_, d)| !d.starts_with(b"{")).count() as u64;
    service.wait_accepted("out-all", records.len() as u64).await;
    service.wait_accepted("out-eu", eu.len() as u64).await;
    service.wait_accepted("out-k1", k1.len() as u64).await;
    let filtered = |d: &str| service.metrics.destination_records_filtered.with_label_values(&[d]).get();
    wait_until("every record judged by both filters", || async {
        filtered("out-eu") + eu.len() as u64 == records.len() as u64
            && filtered("out-k1") + k1.len() as u64 == records.len() as u64
    })
    .await;

    assert_eq!(contents(&client, "out-all").await, sorted(&records), "no filter: everything");
    assert_eq!(contents(&client, "out-eu").await, sorted(&eu), "exactly the eu records");
    assert_eq!(contents(&client, "out-k1").await, sorted(&k1), "exactly k-1 and k-10..k-19, JSON");
    let held = |stream: &str| {
        let client = client.clone();
        let stream = stream.to_string();
        async move { read_all(&client, &stream).await.into_iter().map(|(_, k, d)| (k, d)) }
    };
    assert_eq!(per_key(held("out-eu").await), per_key(eu.clone()), "per-key order kept");
    assert_eq!(per_key(held("out-k1").await), per_key(k1.clone()), "per-key order kept");
    assert_eq!(service.metrics.records_not_json.get(), not_json, "counted once per record, not per group");
    assert_eq!(filtered("out-all"), 0);

    // What a filter refused counts as accepted: a restart sends nothing again.
    service.stop().await.unwrap();
    let service = Running::start(&config.toml(), &emulator.url);
    let more = orders(1200, 60);
    put_all(&client, "in", &more).await;
    service.wait_accepted("out-all", more.len() as u64).await;
    let eu_more = more.iter().filter(|(_, d)| region_of(d).as_deref() == Some("eu")).count() as u64;
    service.wait_accepted("out-eu", eu_more).await;
    let all_eu: Vec<Rec> =
        eu.iter().chain(&more).filter(|(_, d)| region_of(d).as_deref() == Some("eu")).cloned().collect();
    let d = delivery(&client, "out-eu", &all_eu).await;
    assert_eq!((d.missing, d.duplicates, d.foreign), (0, 0, 0), "nothing lost, nothing sent twice");
    service.stop().await.unwrap();
}

/// The index `orders` gave a record (its `seq`, or the number in its plain text).
fn index_of(data: &[u8]) -> usize {
    let text = String::from_utf8_lossy(data);
    let digits: String = match text.find("\"seq\":") {
        Some(at) => text[at + 6..].chars().take_while(char::is_ascii_digit).collect(),
        None => text.chars().filter(char::is_ascii_digit).collect(),
    };
    digits.parse().expect("every test record carries its index")
}

/// Puts `orders` in batches of 50 until stopped; `produced` says how many are in the source,
/// `started` how many were or are being put.
struct Flow {
    produced: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    started: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Vec<Rec>>,
}

impl Flow {
    fn start(client: &aws_sdk_kinesis::Client) -> Flow {
        let produced = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let (client, produced, started, stop) = (client.clone(), produced.clone(), started.clone(), stop.clone());
            async move {
                let mut all = Vec::new();
                while !stop.is_cancelled() {
                    let batch = orders(all.len(), 50);
                    started.store(all.len() + batch.len(), std::sync::atomic::Ordering::SeqCst);
                    put_all(&client, "in", &batch).await;
                    all.extend(batch);
                    produced.store(all.len(), std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                all
            }
        });
        Flow { produced, started, stop, task }
    }

    /// Every record from this index on is put after now.
    fn started(&self) -> usize {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn produced(&self) -> usize {
        self.produced.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn until(&self, n: usize) {
        wait_until(&format!("{n} records put"), || async { self.produced() >= n }).await;
    }

    async fn stop(self) -> Vec<Rec> {
        self.stop.cancel();
        self.task.await.expect("the producer did not panic")
    }
}

/// Whether `held`, per key, is `all`'s records of that key in order with some left out.
fn in_order_per_key(held: &[Rec], all: &[Rec]) -> bool {
    let all = per_key(all.iter().cloned());
    per_key(held.iter().cloned()).into_iter().all(|(key, records)| {
        let mut source = all.get(&key).into_iter().flatten();
        records.iter().all(|r| source.any(|s| s == r))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_a_group_changes_a_filter_and_removes_a_group_while_records_flow() {
    let streams = [("in", 2), ("out-all", 1), ("out-f", 1), ("out-gone", 1), ("new-d", 1)];
    let (emulator, client) = limited(&streams).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let config = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint);
    let before = config.clone().groups([
        Group::fast("^out-all$"),
        Group::fast("^out-f$").set_raw("filter", r#"{ json = { "/region" = "eu" } }"#),
        Group::fast("^out-gone$"),
    ]);
    // Groups move: out-f's group index changes, and a second group has a filter, so chunks
    // judged by the old filters meet writers that follow the new ones.
    let after = config.groups([
        Group::fast("^new-d$").set_raw("filter", r#"{ partition_key = "^k-" }"#),
        Group::fast("^out-all$"),
        Group::fast("^out-f$").set_raw("filter", r#"{ json = { "/region" = "us" } }"#),
    ]);
    let service = Running::start(&before.toml(), &emulator.url);
    let flow = Flow::start(&client);
    service.wait_accepted("out-gone", 300).await;

    // While records flow: the reload is applied once every destination follows it.
    let report = service.reloader.reload(Settings::from_toml(&after.toml())).await.expect("applied");
    let report = report.expect("groups changed");
    let applied_at = flow.started();
    assert_eq!(report.added, ["new-d"]);
    assert_eq!(report.removed, ["out-gone"]);
    assert_eq!(report.kept, ["out-all", "out-f"]);
    flow.until(applied_at + 600).await;
    let all = flow.stop().await;
    let since =
        |records: &[Rec]| -> Vec<Rec> { records.iter().filter(|(_, d)| index_of(d) >= applied_at).cloned().collect() };
    let region = |region: &str| -> Vec<Rec> {
        since(&all).into_iter().filter(|(_, d)| region_of(d).as_deref() == Some(region)).collect()
    };

    // The group that stayed as it was: everything, once, in order.
    service.wait_accepted("out-all", all.len() as u64).await;
    let d = delivery(&client, "out-all", &all).await;
    assert_eq!((d.missing, d.duplicates, d.foreign), (0, 0, 0), "nothing lost, nothing sent twice");
    assert_eq!(per_key(read_all(&client, "out-all").await.into_iter().map(|(_, k, d)| (k, d))), per_key(all.clone()));

    // The changed filter: every record is taken or refused (none waits), the new filter's
    // verdict holds for everything read after the reload, and order per key holds.
    let filtered = |d: &str| service.metrics.destination_records_filtered.with_label_values(&[d]).get();
    wait_until("out-f judged every record", || async {
        service.accepted("out-f") + filtered("out-f") == all.len() as u64
    })
    .await;
    let held: Vec<Rec> = read_all(&client, "out-f").await.into_iter().map(|(_, k, d)| (k, d)).collect();
    assert_eq!(held.len() as u64, service.accepted("out-f"), "what it accepted, once");
    assert_eq!(since(&held).into_iter().collect::<BTreeSet<_>>(), region("us").into_iter().collect(), "the new filter");
    assert!(in_order_per_key(&held, &all), "per-key order kept across the reload");

    // The new group: every record read since it appeared.
    let new = since(&all);
    // (It also takes records put before the reload that were read after it: its count can reach
    // `new.len()` with the last of `new` still on their way. What it holds says when it is done.)
    wait_until("new-d holds every record read since it appeared", || all_hold(&client, &["new-d"], &new)).await;
    let held: Vec<Rec> = read_all(&client, "new-d").await.into_iter().map(|(_, k, d)| (k, d)).collect();
    assert!(new.iter().all(|r| held.contains(r)), "nothing read after the reload is missing");
    assert!(in_order_per_key(&held, &all) && duplicates_in(&client, "new-d").await == 0);

    // The removed group: nothing read after the reload.
    let gone: Vec<Rec> = read_all(&client, "out-gone").await.into_iter().map(|(_, k, d)| (k, d)).collect();
    assert!(since(&gone).is_empty(), "nothing sent to a removed destination after the reload");
    assert_eq!(service.metrics.config_reloads.with_label_values(&["applied"]).get(), 1);
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_bad_file_or_a_restart_key_changes_nothing() {
    let (emulator, client) = limited(&[("in", 2), ("out-eu", 1), ("out-all", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let config = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).groups([
        Group::fast("^out-eu$").set_raw("filter", r#"{ json = { "/region" = "eu" } }"#),
        Group::fast("^out-all$"),
    ]);
    let service = Running::start(&config.toml(), &emulator.url);
    let flow = Flow::start(&client);
    service.wait_accepted("out-all", 200).await;

    // Two problems in one file: both named, nothing applied.
    let bad = config.clone().groups([
        Group::fast("^out-eu$").set_raw("filter", r#"{ json = { "/region" = [] } }"#),
        Group::fast("(unclosed"),
    ]);
    let err = service.reloader.reload(Settings::from_toml(&bad.toml())).await.expect_err("refused");
    let keys: Vec<String> = match &err {
        kinesis_fanout::app::ReloadError::Invalid(err) => err.problems().iter().map(|p| p.key.clone()).collect(),
        other => panic!("not refused as invalid: {other}"),
    };
    assert!(keys.iter().any(|k| k.starts_with("destinations[0].filter")), "{keys:?}");
    assert!(keys.iter().any(|k| k == "destinations[1].pattern"), "{keys:?}");

    // Keys only a restart changes: named, nothing applied, even beside a group change.
    let restart = config
        .clone()
        .set("source", "stream_name", "other")
        .set("memory", "limit", "64MiB")
        .groups([Group::fast("^out-eu$")]);
    let err = service.reloader.reload(Settings::from_toml(&restart.toml())).await.expect_err("refused");
    let message = err.to_string();
    assert!(message.contains("source.stream_name") && message.contains("memory.limit"), "{message}");
    assert!(service.reloader.reload(Settings::from_toml(&config.toml())).await.expect("same file").is_none());

    let all = {
        flow.until(flow.produced() + 300).await;
        flow.stop().await
    };
    let eu: Vec<Rec> = all.iter().filter(|(_, d)| region_of(d).as_deref() == Some("eu")).cloned().collect();
    service.wait_accepted("out-all", all.len() as u64).await;
    service.wait_accepted("out-eu", eu.len() as u64).await;
    assert_eq!(contents(&client, "out-eu").await, sorted(&eu), "the running filter stayed");
    let d = delivery(&client, "out-all", &all).await;
    assert_eq!((d.missing, d.duplicates, d.foreign), (0, 0, 0));
    let reloads = |result: &str| service.metrics.config_reloads.with_label_values(&[result]).get();
    assert_eq!(
        (reloads("invalid"), reloads("restart_required"), reloads("unchanged"), reloads("applied")),
        (1, 1, 1, 0)
    );
    service.stop().await.unwrap();
}
