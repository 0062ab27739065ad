//! Routing (issue 27): a destination group takes the records its filter says, and a record its
//! filter refuses counts as accepted by it.

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
    let (emulator, client) = with_streams(&[("in", 2), ("out-all", 1), ("out-eu", 2), ("out-k1", 1)]).await;
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
