//! Many workers sharing a source through the DynamoDB lease table.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use kinesis_fanout::lease::{LeaseError, LeaseManager, Position};
use kinesis_fanout::record::SequenceNumber;
use kinesis_fanout::source::assign::Assignment;
use kinesis_fanout::source::shards::ShardInfo;

use crate::helpers::cluster::*;
use crate::helpers::*;

const DESTINATIONS: [&str; 3] = ["out-a", "out-b", "out-c"];

async fn setup(shards: i32) -> (Emulator, Dynamo) {
    let (emulator, _client) =
        with_streams(&[("in", shards), (DESTINATIONS[0], 2), (DESTINATIONS[1], 2), (DESTINATIONS[2], 2)]).await;
    (emulator, Dynamo::start().await)
}

fn start_workers(emulator: &Emulator, dynamo: &Dynamo, ids: &[&str]) -> Vec<Worker> {
    ids.iter().map(|id| Worker::start(id, &worker_config(emulator, dynamo, id).toml(), &emulator.url)).collect()
}

/// Waits until the table shows `counts` and every worker reads exactly the shards it holds (a
/// stolen shard starts only after its previous owner stopped).
async fn wait_settled(dynamo: &Dynamo, workers: &[Worker], mut counts: Vec<usize>) {
    counts.sort();
    wait_until(&format!("leases balanced {counts:?} and readers settled"), || async {
        let owned = owners(&dynamo.leases("leases").await);
        let mut seen: Vec<usize> = owned.values().copied().collect();
        seen.sort();
        seen == counts
            && workers.iter().all(|w| {
                let open = w.spans().iter().filter(|s| s.stopped.is_none()).count();
                open == owned.get(&w.id).copied().unwrap_or(0)
            })
    })
    .await;
}

/// Waits until every destination holds every record at least once; returns the duplicates seen.
///
/// The workers' accepted counts are only the cheap first sign: they count duplicates too, so a
/// shard read again from its checkpoint (after a lease was lost and taken back, say) reaches the
/// total while records of the last batch are still on their way. Done is what the destinations
/// hold. (Found on a loaded host: a throttled table stopped both shards, they were read again
/// from TRIM_HORIZON, and the count was reached with the second batch still in flight.)
async fn wait_all_delivered(emulator: &Emulator, workers: &[&Worker], input: &[Rec]) -> usize {
    let total = input.len() as u64;
    wait_until("every destination accepted as many records as were put", || async {
        DESTINATIONS.iter().all(|d| workers.iter().map(|w| w.accepted(d)).sum::<u64>() >= total)
    })
    .await;
    let client = emulator.client();
    wait_until("every destination holds every record", || all_hold(&client, &DESTINATIONS, input)).await;
    let expected: BTreeSet<Rec> = input.iter().cloned().collect();
    let mut duplicates = 0;
    for name in DESTINATIONS {
        let held = contents(&client, name).await;
        let unique: BTreeSet<Rec> = held.iter().cloned().collect();
        assert!(expected.is_subset(&unique), "{name} misses records");
        duplicates = duplicates.max(held.len() - unique.len());
    }
    duplicates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_eight_shards_one_reader_per_shard() {
    let (emulator, dynamo) = setup(8).await;
    let workers = start_workers(&emulator, &dynamo, &["w1", "w2", "w3"]);
    wait_settled(&dynamo, &workers, vec![3, 3, 2]).await;
    let input = records(60, 20_000, 100);
    put_all(&emulator.client(), "in", &input).await;
    let refs: Vec<&Worker> = workers.iter().collect();
    let duplicates = wait_all_delivered(&emulator, &refs, &input).await;
    let spans: Vec<(String, Vec<_>)> = workers.iter().map(|w| (w.id.clone(), w.spans())).collect();
    for worker in workers {
        worker.stop().await.unwrap();
    }
    let spans: Vec<(&str, Vec<_>)> = spans.iter().map(|(id, s)| (id.as_str(), s.clone())).collect();
    assert_single_reader(&spans);
    assert_eq!(duplicates, 0, "balancing finished before the records arrived: nothing is read twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_shards_move_within_two_failover_times() {
    let (emulator, dynamo) = setup(4).await;
    let mut workers = start_workers(&emulator, &dynamo, &["w1", "w2"]);
    wait_settled(&dynamo, &workers, vec![2, 2]).await;
    let first = records(61, 2_000, 64);
    put_all(&emulator.client(), "in", &first).await;
    let victim = workers.remove(0);
    // Counted once it is dead: it reads (and writes) until its thread sees the kill.
    let victim_health = victim.health.clone();
    victim.kill().await;
    let killed_at = Instant::now();
    let read_by_victim = victim_health.records();
    wait_until("w2 holds every lease", || async { owners(&dynamo.leases("leases").await).get("w2") == Some(&4) }).await;
    let takeover = killed_at.elapsed();
    assert!(takeover < Duration::from_secs(8), "failover_time is 3s; takeover took {takeover:?}");

    let second = records(62, 2_000, 64);
    put_all(&emulator.client(), "in", &second).await;
    let all: Vec<Rec> = first.iter().chain(&second).cloned().collect();
    let survivor = workers.remove(0);
    // The survivor's own count plus what the victim had delivered covers everything.
    let client = emulator.client();
    wait_until("every record in every destination", || all_hold(&client, &DESTINATIONS, &all)).await;
    survivor.stop().await.unwrap();
    for name in DESTINATIONS {
        let duplicates = duplicates_in(&client, name).await;
        assert!(
            duplicates as u64 <= read_by_victim,
            "{name}: {duplicates} duplicates, victim had read {read_by_victim}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_hands_shards_over_without_waiting_for_expiry() {
    let (emulator, dynamo) = setup(4).await;
    let mut workers = start_workers(&emulator, &dynamo, &["w1", "w2"]);
    wait_settled(&dynamo, &workers, vec![2, 2]).await;
    let input = records(63, 1_000, 64);
    put_all(&emulator.client(), "in", &input).await;
    let refs: Vec<&Worker> = workers.iter().collect();
    wait_all_delivered(&emulator, &refs, &input).await;

    let leaving = workers.remove(0);
    leaving.stop().await.unwrap();
    let stopped_at = Instant::now();
    let released = dynamo.leases("leases").await;
    assert!(released.iter().all(|l| l.owner.as_deref() != Some("w1")), "w1 released its leases: {released:?}");
    wait_until("w2 holds every lease", || async { owners(&dynamo.leases("leases").await).get("w2") == Some(&4) }).await;
    assert!(
        stopped_at.elapsed() < Duration::from_secs(3),
        "taken over before failover_time (3s) could expire anything"
    );
    let more = records(64, 500, 64);
    put_all(&emulator.client(), "in", &more).await;
    let all: Vec<Rec> = input.iter().chain(&more).cloned().collect();
    let survivor = workers.remove(0);
    let client = emulator.client();
    wait_until("new records arrive through w2", || all_hold(&client, &["out-a"], &all)).await;
    survivor.stop().await.unwrap();
    let held = contents(&client, "out-a").await;
    assert_eq!(held.len(), all.len(), "a graceful handover copies nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_cannot_move_a_checkpoint_it_no_longer_owns() {
    let dynamo = Dynamo::start().await;
    let table = dynamo.table("zombie");
    table.ensure(true).await.unwrap();
    let shards: Vec<ShardInfo> = (0..2)
        .map(|i| ShardInfo { id: format!("shard-{i}"), parents: vec![], closed: false, hash_range: None })
        .collect();
    let failover = Duration::from_secs(1);
    let (zombie, mut zombie_events, _) = LeaseManager::new(dynamo.table("zombie"), "zombie".into(), failover);
    zombie.sync(&shards, &kinesis_fanout::position::Position::TrimHorizon).await.unwrap();
    zombie.round().await;
    assert_eq!(zombie.held().await.len(), 2);
    let seq = |n: &str| Position::Sequence(SequenceNumber::parse(n).unwrap());
    zombie.checkpoint("shard-0", &seq("100"), &[]).await.unwrap();

    // The zombie pauses (no rounds); the other worker sees its counters stand still and takes over.
    let (healthy, _events, _) = LeaseManager::new(dynamo.table("zombie"), "healthy".into(), failover);
    let started = Instant::now();
    while healthy.held().await.len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(10), "takeover after expiry");
        healthy.round().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The zombie wakes up and tries to checkpoint: refused, and it learns it lost the lease.
    let refused = zombie.checkpoint("shard-0", &seq("999"), &[]).await;
    assert!(matches!(refused, Err(LeaseError::Lost { .. })), "{refused:?}");
    let stored = table.scan().await.unwrap().into_iter().find(|l| l.key == "shard-0").unwrap();
    assert_eq!(stored.checkpoint, seq("100"), "the zombie moved nothing");
    assert_eq!(stored.owner.as_deref(), Some("healthy"));
    let mut lost = Vec::new();
    while let Ok(event) = zombie_events.try_recv() {
        if let Assignment::Lost { shard } = event {
            lost.push(shard);
        }
    }
    assert_eq!(lost, vec!["shard-0".to_string()]);
    // Its next round's renewal of the other lease fails too: that shard stops as well. (It may
    // then take a lease again, like any worker, with a fresh counter.)
    zombie.round().await;
    let mut lost = Vec::new();
    while let Ok(event) = zombie_events.try_recv() {
        if let Assignment::Lost { shard } = event {
            lost.push(shard);
        }
    }
    assert_eq!(lost, vec!["shard-1".to_string()], "the zombie's renewal fails and it stops that shard");

    // Two workers racing for one lease: one wins.
    let lease = table.scan().await.unwrap().into_iter().find(|l| l.key == "shard-1").unwrap();
    let first = table.take("shard-1", lease.counter, "racer-1").await;
    let second = table.take("shard-1", lease.counter, "racer-2").await;
    assert!(first.is_ok() && matches!(second, Err(LeaseError::Lost { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_an_unreachable_table_never_leave_a_shard_unproven() {
    let (emulator, dynamo) = setup(2).await;
    let workers = start_workers(&emulator, &dynamo, &["w1"]);
    let worker = &workers[0];
    wait_until("w1 holds both leases", || async { owners(&dynamo.leases("leases").await).get("w1") == Some(&2) }).await;
    let first = records(65, 500, 32);
    put_all(&emulator.client(), "in", &first).await;
    wait_until("first batch copied", || async { worker.accepted("out-a") >= 500 }).await;

    // Throttling for a moment (shorter than the failover time) is retried. On a loaded host it can
    // outlast the watchdog's line (a failover time less a renewal period after the last
    // confirmation): then both shards stop, and are read again from their checkpoints once the
    // leases are taken back. Either way the worker ends up reading both shards.
    dynamo.set(DynamoMode::Throttle);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    dynamo.set(DynamoMode::Pass);
    let reading = |w: &Worker| w.spans().iter().filter(|s| s.stopped.is_none()).count();
    wait_until("still reading both shards", || async { reading(worker) == 2 }).await;

    // The table is gone for longer than the failover time: the worker stops reading.
    dynamo.set(DynamoMode::Down);
    let down_at = Instant::now();
    wait_until("shards stopped while their leases cannot be proven", || async { reading(worker) == 0 }).await;
    // Judged by when the worker stopped them, not by when this test looked.
    let last_stop =
        worker.spans().iter().filter_map(|s| s.stopped.map(|t| t.into_std())).filter(|t| *t >= down_at).max();
    let took = last_stop.map(|t| t - down_at);
    assert!(took.is_none_or(|d| d < Duration::from_secs(4)), "stopped within the failover time: {took:?}");
    dynamo.set(DynamoMode::Pass);
    wait_until("reading again once the table is back", || async { reading(worker) == 2 }).await;
    let second = records(66, 500, 32);
    put_all(&emulator.client(), "in", &second).await;
    let all: Vec<Rec> = first.iter().chain(&second).cloned().collect();
    let refs: Vec<&Worker> = workers.iter().collect();
    wait_all_delivered(&emulator, &refs, &all).await;
    for worker in workers {
        worker.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_keep_order_across_split_and_merge() {
    let (emulator, dynamo) = setup(2).await;
    let workers = start_workers(&emulator, &dynamo, &["w1", "w2", "w3"]);
    let source = crate::resharding::produce_with_split_and_merge(&emulator).await;
    let expected: BTreeSet<Vec<u8>> = source.values().flatten().cloned().collect();
    let client = emulator.client();
    wait_until("every record delivered", || async {
        let mut complete = true;
        for name in DESTINATIONS {
            let held: BTreeSet<Vec<u8>> = read_all(&client, name).await.into_iter().map(|(_, _, d)| d).collect();
            complete &= expected.is_subset(&held);
        }
        complete
    })
    .await;
    let spans: Vec<(String, Vec<_>)> = workers.iter().map(|w| (w.id.clone(), w.spans())).collect();
    for worker in workers {
        worker.stop().await.unwrap();
    }
    let spans: Vec<(&str, Vec<_>)> = spans.iter().map(|(id, s)| (id.as_str(), s.clone())).collect();
    assert_single_reader(&spans);
    for name in DESTINATIONS {
        let copied = crate::resharding::per_key(&client, name).await;
        // A shard handed over between workers can be read again from its checkpoint; the first
        // copy of each record must still be in source order.
        let first_copies: BTreeMap<String, Vec<Vec<u8>>> = copied
            .into_iter()
            .map(|(k, v)| {
                let mut seen = HashSet::new();
                (k, v.into_iter().filter(|d| seen.insert(d.clone())).collect())
            })
            .collect();
        let wrong: Vec<&String> = source.keys().filter(|k| first_copies.get(*k) != source.get(*k)).collect();
        assert!(wrong.is_empty(), "{name}: keys out of source order or incomplete: {wrong:?}");
    }
}

fn lease_rows(
    rows: &[kinesis_fanout::operate::leases::LeaseRow],
) -> BTreeMap<String, &kinesis_fanout::operate::leases::LeaseRow> {
    rows.iter().map(|r| (r.shard.clone(), r)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leases_command_shows_owners_moving_checkpoints_and_expired_leases() {
    let (emulator, dynamo) = setup(2).await;
    let workers = start_workers(&emulator, &dynamo, &["w1", "w2"]);
    wait_settled(&dynamo, &workers, vec![1, 1]).await;
    let settings = kinesis_fanout::Settings::from_toml(&worker_config(&emulator, &dynamo, "cli").toml()).unwrap();
    let sdk = sdk_config(&emulator.url);
    let input = records(67, 300, 32);
    put_all(&emulator.client(), "in", &input).await;
    wait_all_delivered(&emulator, &workers.iter().collect::<Vec<_>>(), &input).await;
    wait_until("both checkpoints moved past the records", || async {
        dynamo.leases("leases").await.iter().all(|l| matches!(l.checkpoint, Position::Sequence(_)))
    })
    .await;

    // Watched for the failover time, both workers renew: owned, each by one of them.
    let rows = kinesis_fanout::operate::leases::rows(&settings, &sdk, None).await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let owners: BTreeSet<String> = rows.iter().filter_map(|r| r.owner.clone()).collect();
    assert_eq!(owners, BTreeSet::from(["w1".to_string(), "w2".to_string()]));
    for row in &rows {
        assert_eq!(row.state, "owned", "{row:?}");
        assert!(row.checkpoint.chars().all(|c| c.is_ascii_digit()), "a sequence number: {row:?}");
        assert_eq!(row.destinations.len(), DESTINATIONS.len(), "each destination's own position: {row:?}");
        assert_eq!(row.lag_seconds, Some(0.0), "caught up: {row:?}");
    }
    let text = kinesis_fanout::operate::leases::render(&rows);
    assert!(text.contains("owned") && text.contains("w1") && text.contains("destination arn:"), "{text}");

    // More records: the checkpoints move on.
    let before: BTreeMap<String, String> = rows.iter().map(|r| (r.shard.clone(), r.checkpoint.clone())).collect();
    let more = records(71, 300, 32);
    put_all(&emulator.client(), "in", &more).await;
    let all = [input.clone(), more].concat();
    wait_all_delivered(&emulator, &workers.iter().collect::<Vec<_>>(), &all).await;
    let seq = |text: &str| SequenceNumber::parse(text).ok();
    wait_until("the leases command shows every checkpoint moved", || async {
        let rows = kinesis_fanout::operate::leases::rows(&settings, &sdk, Some(Duration::ZERO)).await.unwrap();
        rows.iter().all(|r| seq(&r.checkpoint) > seq(&before[&r.shard]))
    })
    .await;

    // Records not yet copied: a stopped owner's lease shows it is behind, and expires.
    for worker in workers {
        worker.stop().await.unwrap();
    }
    put_all(&emulator.client(), "in", &records(68, 50, 32)).await;
    let rows = kinesis_fanout::operate::leases::rows(&settings, &sdk, Some(Duration::from_millis(500))).await.unwrap();
    for row in &rows {
        assert_eq!(row.state, "free", "a graceful stop releases its leases: {row:?}");
    }
    assert!(rows.iter().any(|r| r.lag_seconds.is_some_and(|s| s >= 0.0) && r.lag_note.is_none()), "{rows:?}");

    let table = dynamo.table("leases");
    let (ghost, _events, _) = LeaseManager::new(table, "ghost".into(), Duration::from_secs(3));
    ghost.round().await;
    let rows = kinesis_fanout::operate::leases::rows(&settings, &sdk, Some(Duration::from_millis(500))).await.unwrap();
    let rows = lease_rows(&rows);
    assert!(rows.values().any(|r| r.owner.as_deref() == Some("ghost")), "{rows:?}");
    for row in rows.values().filter(|r| r.owner.as_deref() == Some("ghost")) {
        assert_eq!(row.state, "expired", "its counter did not move while watched: {row:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leases_command_reads_the_checkpoint_file_and_shows_finished_parents() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-a", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).toml();
    let service = Running::start(&toml, &emulator.url);
    put_all(&client, "in", &records(69, 100, 32)).await;
    service.wait_accepted("out-a", 100).await;
    // A split: the parent is read to its end.
    let parent = split_first_shard(&client, "in").await;
    put_all(&client, "in", &records(70, 100, 32)).await;
    service.wait_accepted("out-a", 200).await;
    service.stop().await.unwrap();

    let settings = kinesis_fanout::Settings::from_toml(&toml).unwrap();
    let rows = kinesis_fanout::operate::leases::rows(&settings, &sdk_config(&emulator.url), None).await.unwrap();
    let rows = lease_rows(&rows);
    assert_eq!(rows.len(), 3, "the parent and its two children: {rows:?}");
    assert_eq!(rows[&parent].state, "finished");
    assert_eq!(rows[&parent].checkpoint, "SHARD_END");
    assert_eq!(rows[&parent].children.len(), 2, "{:?}", rows[&parent]);
    for child in &rows[&parent].children {
        assert_eq!(rows[child].parents, vec![parent.clone()]);
    }
    for row in rows.values().filter(|r| r.shard != parent) {
        assert_eq!(row.state, "file", "{row:?}");
        assert_eq!(row.destinations.len(), 1, "out-a's own position: {row:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replays_note_in_the_lease_table_is_never_taken_for_a_lease() {
    let dynamo = Dynamo::start().await;
    let table = dynamo.table("notes");
    table.ensure(true).await.unwrap();
    let key = format!("{}dlq/shardId-000000000000", kinesis_fanout::lease::table::NOTE_PREFIX);
    table.set_note(&key, "49590338271490256608559692538361571095921575989136588898").await.unwrap();
    assert_eq!(
        table.note(&key).await.unwrap().as_deref(),
        Some("49590338271490256608559692538361571095921575989136588898")
    );
    assert!(table.scan().await.unwrap().is_empty(), "a note is not a lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_lease_item_is_skipped_and_counted_and_the_takeovers_go_on() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let (emulator, dynamo) = setup(4).await;
    let first = start_workers(&emulator, &dynamo, &["w1"]);
    wait_settled(&dynamo, &first, vec![4]).await;
    // A hand-edited row, and a row of another kind (KCL 3's single-table mode), beside the leases.
    let config = aws_sdk_dynamodb::config::Builder::from(&sdk_config(&dynamo.url)).endpoint_url(&dynamo.url).build();
    let raw = aws_sdk_dynamodb::Client::from_conf(config);
    let s = |v: &str| AttributeValue::S(v.into());
    for item in [
        vec![("leaseKey", s("shardId-hand-edited")), ("leaseCounter", s("seven")), ("checkpoint", s("TRIM_HORIZON"))],
        vec![("leaseKey", s("worker-metrics-w9")), ("entityType", s("WORKER_METRICS"))],
        // Another tool's row with neither counter nor checkpoint: never taken for a free lease.
        vec![("leaseKey", s("app:other-stream:shardId-000000000000"))],
    ] {
        let mut put = raw.put_item().table_name("leases");
        for (name, value) in item {
            put = put.item(name, value);
        }
        put.send().await.unwrap();
    }
    // The worker holding every lease dies without releasing them; a new one must take them over.
    for worker in first {
        worker.kill().await;
    }
    let second = start_workers(&emulator, &dynamo, &["w2"]);
    wait_settled(&dynamo, &second, vec![4]).await;
    let input = records(64, 400, 64);
    put_all(&emulator.client(), "in", &input).await;
    let refs: Vec<&Worker> = second.iter().collect();
    wait_all_delivered(&emulator, &refs, &input).await;
    assert_eq!(
        second[0].metrics.lease_items_unreadable.get(),
        2,
        "the hand-edited row and the foreign one, once each; the other kind is ignored"
    );
    let rows = dynamo.table("leases").scan_with_unreadable().await.unwrap();
    let mut bad: Vec<&str> = rows.1.iter().filter_map(|u| u.key.as_deref()).collect();
    bad.sort();
    assert_eq!(bad, ["app:other-stream:shardId-000000000000", "shardId-hand-edited"]);
    assert!(rows.1.iter().all(|u| u.reason.contains("leaseCounter")), "{:?}", rows.1);
    // The operator's `leases` command shows it, with why.
    let settings = kinesis_fanout::Settings::from_toml(&worker_config(&emulator, &dynamo, "op").toml()).unwrap();
    let shown = kinesis_fanout::operate::leases::rows(&settings, &sdk_config(&emulator.url), Some(Duration::ZERO))
        .await
        .unwrap();
    let bad = shown.iter().find(|r| r.shard == "shardId-hand-edited").expect("the unreadable item is listed");
    assert_eq!(bad.state, "unreadable");
    assert!(bad.problem.as_deref().is_some_and(|p| p.contains("leaseCounter")), "{bad:?}");
    assert!(!shown.iter().any(|r| r.shard == "worker-metrics-w9"), "rows of other kinds are not leases");
    assert!(kinesis_fanout::operate::leases::render(&shown).contains("unreadable: "));
    for worker in second {
        worker.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_whose_lease_was_never_created_is_read_before_its_children() {
    let (emulator, dynamo) = setup(1).await;
    let client = emulator.client();
    // Records before and after a split, the stream resharded within its retention.
    let keys: Vec<String> = (0..10).map(|k| format!("key-{k}")).collect();
    let round =
        |r: usize| -> Vec<Rec> { keys.iter().map(|k| (k.clone(), format!("{k}:{r:04}").into_bytes())).collect() };
    let before: Vec<Rec> = (0..30).flat_map(round).collect();
    put_all(&client, "in", &before).await;
    let parent = split_first_shard(&client, "in").await;
    let after: Vec<Rec> = (30..60).flat_map(round).collect();
    put_all(&client, "in", &after).await;
    // A first start was cut off after the children's leases were created and before the
    // parent's was.
    let table = dynamo.table("leases");
    table.ensure(true).await.unwrap();
    let listed = client.list_shards().stream_name("in").send().await.unwrap();
    for child in listed.shards().iter().filter(|s| s.parent_shard_id() == Some(parent.as_str())) {
        let lease = kinesis_fanout::lease::table::Lease {
            key: child.shard_id().to_string(),
            checkpoint: Position::TrimHorizon,
            parents: vec![parent.clone()],
            ..Default::default()
        };
        assert!(table.create_if_absent(&lease).await.unwrap());
    }
    let workers = start_workers(&emulator, &dynamo, &["w1", "w2"]);
    let refs: Vec<&Worker> = workers.iter().collect();
    let input = [before, after].concat();
    wait_all_delivered(&emulator, &refs, &input).await;
    for worker in workers {
        worker.stop().await.unwrap();
    }
    // Per key, the parent's records stand before the children's on every destination.
    for name in DESTINATIONS {
        for (key, data) in crate::resharding::per_key(&client, name).await {
            // First landings only: a handover may repeat a record, never put an older one later.
            let mut landed = BTreeSet::new();
            let firsts: Vec<String> = data
                .iter()
                .map(|d| String::from_utf8_lossy(d).to_string())
                .filter(|r| landed.insert(r.clone()))
                .collect();
            let mut sorted = firsts.clone();
            sorted.sort();
            assert_eq!(firsts, sorted, "{name} {key}: the parent's records first, in order");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_list_shards_never_keeps_a_worker_from_stopping_a_lost_shard() {
    let (emulator, dynamo) = setup(1).await;
    let workers = start_workers(&emulator, &dynamo, &["w1"]);
    wait_settled(&dynamo, &workers, vec![1]).await;
    // The control plane stalls: the coordinator's next relist (every 30 s) hangs in ListShards.
    emulator.faults.lock().unwrap().stall_list_shards = Some(("in".into(), Duration::from_secs(120)));
    wait_until("the coordinator is in a stalled ListShards", || async { emulator.calls("ListShards(in)") > 0 }).await;
    // Meanwhile another worker takes the lease (the renewals race it: try until it holds).
    let table = dynamo.table("leases");
    let stolen = Instant::now();
    wait_until("the lease is taken from w1", || async {
        let leases = table.scan().await.unwrap_or_default();
        let Some(lease) = leases.first() else { return false };
        lease.owner.as_deref() == Some("thief") || table.take(&lease.key, lease.counter, "thief").await.is_ok()
    })
    .await;
    // w1 hears it within a renewal period (1 s here) and the coordinator's bound (half of one).
    wait_until("w1 stopped reading the shard", || async {
        workers[0].spans().iter().any(|s| s.started < stolen.into() && s.stopped.is_some())
    })
    .await;
    let heard = stolen.elapsed();
    assert!(heard < Duration::from_secs(5), "w1 read a shard it had lost for {heard:?}");
    emulator.faults.lock().unwrap().stall_list_shards = None;
    for worker in workers {
        worker.kill().await;
    }
}

/// The shard of `in` whose hash range holds `partition_key` (Kinesis: MD5 of the key as a
/// 128-bit number).
fn shard_of(ranges: &[(String, u128, u128)], partition_key: &str) -> String {
    use md5::{Digest, Md5};
    let hash = u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into());
    ranges.iter().find(|(_, lo, hi)| (*lo..=*hi).contains(&hash)).map(|(id, _, _)| id.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_of_a_lease_s_old_owner_lands_after_the_new_owner_s_first() {
    let (emulator, dynamo) = setup(2).await;
    let client = emulator.client();
    emulator.faults.lock().unwrap().log_puts = true;
    // The old owner is rate-limited so that a full batch waits on its limiter far longer than
    // the new owner's wait of a failover time plus the settle time (500 records at 15/s: 33 s);
    // the new owner is not, so that its first request comes soon after its wait.
    let slow = worker_config(&emulator, &dynamo, "w1").group("records_per_second", "15");
    let w1 = Worker::start_signing_as("w1", &slow.toml(), &emulator.url, "AKIDW1");
    wait_settled(&dynamo, std::slice::from_ref(&w1), vec![2]).await;
    let producing = tokio::spawn({
        let client = client.clone();
        async move {
            for round in 0..120u64 {
                put_all(&client, "in", &records(500 + round, 25, 64)).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    // A second worker steals one of w1's two leases while w1 has batches waiting.
    let w2 = Worker::start_signing_as("w2", &worker_config(&emulator, &dynamo, "w2").toml(), &emulator.url, "AKIDW2");
    wait_until("w2 holds a lease", || async { owners(&dynamo.leases("leases").await).get("w2") == Some(&1) }).await;
    let stolen = dynamo.leases("leases").await.into_iter().find(|l| l.owner.as_deref() == Some("w2")).unwrap().key;
    let shards = client.list_shards().stream_name("in").send().await.unwrap();
    let ranges: Vec<(String, u128, u128)> = shards
        .shards()
        .iter()
        .map(|s| {
            let r = s.hash_key_range().unwrap();
            (s.shard_id().to_string(), r.starting_hash_key().parse().unwrap(), r.ending_hash_key().parse().unwrap())
        })
        .collect();
    let carries =
        |p: &PutSeen| p.stream.starts_with("out-") && p.partition_keys.iter().any(|k| shard_of(&ranges, k) == stolen);
    wait_until("the new owner wrote the stolen shard's records", || async {
        emulator.faults.lock().unwrap().puts.iter().any(|p| p.key == "AKIDW2" && carries(p))
    })
    .await;
    // Long enough for every batch w1 had waiting to have been sent, had it been sent.
    tokio::time::sleep(Duration::from_secs(40)).await;
    producing.abort();
    let puts = emulator.faults.lock().unwrap().puts.clone();
    let first_new = puts.iter().filter(|p| p.key == "AKIDW2" && carries(p)).map(|p| p.at).min().unwrap();
    let late: Vec<&PutSeen> = puts.iter().filter(|p| p.key == "AKIDW1" && carries(p) && p.at > first_new).collect();
    assert!(
        late.is_empty(),
        "{} PutRecords of the old owner carried {stolen}'s records after the new owner's first (the first {:?} later)",
        late.len(),
        late.first().map(|p| p.at - first_new)
    );
    assert!(puts.iter().any(|p| p.key == "AKIDW1" && carries(p)), "w1 wrote the shard before it lost it");
    w1.kill().await;
    w2.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_takes_no_lease() {
    let (emulator, client) = with_streams(&[("in", 4), ("out-a", 1)]).await;
    let dynamo = Dynamo::start().await;
    let w1 = Worker::start("w1", &worker_config(&emulator, &dynamo, "w1").toml(), &emulator.url);
    let w2 = Worker::start("w2", &worker_config(&emulator, &dynamo, "w2").toml(), &emulator.url);
    wait_until("two leases each", || async {
        let owned = owners(&dynamo.leases("leases").await);
        owned.get("w1") == Some(&2) && owned.get("w2") == Some(&2)
    })
    .await;
    // Records nobody can deliver: w1's drain lasts its whole grace period.
    emulator.faults.lock().unwrap().deny_puts_to = Some("out-a".into());
    put_all(&client, "in", &records(1600, 200, 32)).await;
    wait_until("both workers read records", || async { w1.records_read() > 0 && w2.records_read() > 0 }).await;

    // w2 dies; its leases expire while w1 drains.
    w2.kill().await;
    let stopping = tokio::spawn(w1.stop());
    let mut most = 0;
    while !stopping.is_finished() {
        let owned = owners(&dynamo.leases("leases").await);
        most = most.max(owned.get("w1").copied().unwrap_or(0));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stopping.await.unwrap().unwrap();
    assert_eq!(most, 2, "a draining worker renews what it holds and takes nothing more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_from_before_a_lease_was_lost_and_taken_again_moves_nothing() {
    use kinesis_fanout::checkpoint::{CheckpointStore, Checkpoints};
    use kinesis_fanout::lease::{LeaseManager, Position};
    use kinesis_fanout::record::SequenceNumber;
    use kinesis_fanout::source::shards::ShardInfo;
    let dynamo = Dynamo::start().await;
    let table = dynamo.table("handover");
    table.ensure(true).await.unwrap();
    let shards = vec![ShardInfo { id: "shard-0".into(), parents: vec![], closed: false, hash_range: None }];
    let (me, _events, _) = LeaseManager::new(dynamo.table("handover"), "me".into(), std::time::Duration::from_secs(3));
    me.sync(&shards, &kinesis_fanout::position::Position::TrimHorizon).await.unwrap();
    me.round().await;
    assert_eq!(me.held().await, vec!["shard-0".to_string()]);

    // The checkpoint loop takes a snapshot of this reading...
    let seq = |n: &str| SequenceNumber::parse(n).unwrap();
    let as_of = tokio::time::Instant::now();
    let mut snapshot = Checkpoints::new();
    snapshot.insert("shard-0".into(), Position::Sequence(seq("100")));
    // ...meanwhile the lease goes to another worker, which moves the checkpoint on and gives
    // the lease back, and this worker takes it again (a new reading, from 200).
    let lease = table.scan().await.unwrap().remove(0);
    let counter = table.take("shard-0", lease.counter, "other").await.unwrap();
    let counter = table.checkpoint("shard-0", counter, "other", &Position::Sequence(seq("200")), &[]).await.unwrap();
    table.release("shard-0", counter, "other").await.unwrap();
    me.round().await;
    me.round().await;
    assert_eq!(me.held().await, vec!["shard-0".to_string()], "taken again");

    // The old snapshot arrives late: it belongs to the earlier reading and moves nothing back.
    me.save(&snapshot, as_of).await.unwrap();
    let stored = table.scan().await.unwrap().remove(0);
    assert_eq!(stored.checkpoint, Position::Sequence(seq("200")), "the checkpoint never moves backwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_loses_a_lease_stops_sending_its_queued_records() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-1", 1)]).await;
    let dynamo = Dynamo::start().await;
    // A slow destination: most of what is read waits in the queue.
    let toml = worker_config(&emulator, &dynamo, "w1").group("records_per_second", "200").toml();
    let w1 = Worker::start("w1", &toml, &emulator.url);
    wait_until("w1 holds the lease", || async { owners(&dynamo.leases("leases").await).get("w1") == Some(&1) }).await;
    let input = records(2000, 20_000, 64);
    put_all(&client, "in", &input).await;
    let buffered = || w1.metrics.buffered_records.with_label_values(&["out-1"]).get();
    wait_until("a queue of records", || async { buffered() > 5_000 }).await;

    // Another worker takes the lease and keeps it.
    let table = dynamo.table("leases");
    let lease = table.scan().await.unwrap().remove(0);
    let mut counter = table.take("shardId-000000000000", lease.counter, "intruder").await.unwrap();
    let started = tokio::time::Instant::now();
    while buffered() > 0 {
        assert!(started.elapsed() < WAIT, "w1 still holds {} records of a shard it no longer owns", buffered());
        counter = table.renew("shardId-000000000000", counter, "intruder").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let sent = w1.accepted("out-1");
    let dropped = w1.metrics.records_written.with_label_values(&["out-1", "lease_lost"]).get();
    for _ in 0..5 {
        counter = table.renew("shardId-000000000000", counter, "intruder").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(w1.accepted("out-1"), sent, "nothing more is sent for the lost shard");
    assert!(
        dropped > 0 && sent < input.len() as u64,
        "the queue was dropped, not written: sent {sent}, dropped {dropped}"
    );
    w1.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_lease_is_deleted_once_its_children_started_and_never_read_again() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-1", 1)]).await;
    let dynamo = Dynamo::start().await;
    let toml = worker_config(&emulator, &dynamo, "w1").toml();
    let worker = Worker::start("w1", &toml, &emulator.url);
    let before = records(2100, 200, 32);
    put_all(&client, "in", &before).await;
    wait_until("the parent copied", || async { all_hold(&client, &["out-1"], &before).await }).await;
    split_in_half(&client, "in", "shardId-000000000000").await;
    let after = records(2101, 400, 32);
    put_all(&client, "in", &after).await;
    wait_until("the parent's lease is gone once both children have checkpoints", || async {
        let leases = dynamo.leases("leases").await;
        let children_started = leases
            .iter()
            .filter(|l| l.parents.contains(&"shardId-000000000000".to_string()))
            .filter(|l| matches!(l.checkpoint, kinesis_fanout::lease::Position::Sequence(_)))
            .count();
        !leases.iter().any(|l| l.key == "shardId-000000000000") && children_started == 2
    })
    .await;
    worker.stop().await.unwrap();

    // A restart lists the parent again (it is within retention): it must not get a new lease
    // and be read from its beginning.
    let worker = Worker::start("w1", &toml, &emulator.url);
    let more = records(2102, 100, 32);
    put_all(&client, "in", &more).await;
    let mut all = before.clone();
    all.extend(after);
    all.extend(more);
    wait_until("every record copied", || async { all_hold(&client, &["out-1"], &all).await }).await;
    let leases = dynamo.leases("leases").await;
    worker.stop().await.unwrap();
    assert!(!leases.iter().any(|l| l.key == "shardId-000000000000"), "the finished lease was not created again");
    assert_eq!(duplicates_in(&client, "out-1").await, 0, "the parent was not read again");
}
