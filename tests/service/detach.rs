//! One slow destination never holds back the others (it is detached from the live feed, catches
//! up on its own with GetRecords, and joins the live feed again without a gap or a duplicate), and
//! one memory budget bounds what the whole process buffers.

use ferrokinesis::store::StoreOptions;

use crate::helpers::*;

fn detached(service: &Running, destination: &str) -> i64 {
    service.metrics.destination_detached.with_label_values(&[destination]).get()
}

/// One source shard, a healthy `out-a` and an `out-broken` that refuses every write, each with
/// a 1 MiB buffer and a 1 s `detach_after`; events of at most 200 records, as AWS keeps them small.
struct Broken {
    emulator: Emulator,
    client: aws_sdk_kinesis::Client,
    _dir: tempfile::TempDir,
    checkpoint: std::path::PathBuf,
    toml: String,
}

async fn with_a_broken_destination(configure: impl FnOnce(&mut Faults)) -> Broken {
    let emulator =
        Emulator::with_options(StoreOptions { subscribe_to_shard_event_record_limit: 200, ..store_options() }).await;
    configure(&mut emulator.faults.lock().unwrap());
    let client = emulator.client();
    create_stream(&client, "in", 1).await;
    for name in ["out-a", "out-broken"] {
        create_stream(&client, name, 1).await;
    }
    emulator.faults.lock().unwrap().reject_puts_to = Some("out-broken".into());
    let (dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .group("max_in_flight_bytes", "1MiB")
        .group("detach_after", "1s")
        .toml();
    Broken { emulator, client, _dir: dir, checkpoint, toml }
}

/// Three times the broken destination's buffer (records of `seed`), read while it refuses: the
/// healthy one has them all, and the broken one is detached.
async fn detach_the_broken_one(service: &Running, client: &aws_sdk_kinesis::Client, seed: u64) -> Vec<Rec> {
    let first = records(seed, 3_000, 1_024);
    put_all(client, "in", &first).await;
    service.wait_accepted("out-a", 3_000).await;
    wait_until("the broken destination is detached", || async { detached(service, "out-broken") > 0 }).await;
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_destination_is_detached_the_others_get_everything_and_it_catches_up_alone() {
    // Events of at most 200 records, as AWS keeps its events small.
    let emulator =
        Emulator::with_options(StoreOptions { subscribe_to_shard_event_record_limit: 200, ..store_options() }).await;
    let client = emulator.client();
    create_stream(&client, "in", 2).await;
    for name in ["out-a", "out-b", "out-broken"] {
        create_stream(&client, name, 1).await;
    }
    emulator.faults.lock().unwrap().reject_puts_to = Some("out-broken".into());
    let (_dir, checkpoint) = temp_checkpoint();
    // The healthy ones' buffers hold the whole burst: a destination whose queue stays over its
    // buffer for `detach_after` is detached however fast it writes, and on a loaded machine a
    // 1-shard destination can take longer than a second to write 6 MiB.
    let toml = TestConfig::new(&emulator.url)
        .pattern("^out-broken$")
        .checkpoint_file(&checkpoint)
        .group("max_in_flight_bytes", "1MiB")
        .group("detach_after", "1s")
        .add_group(Group::fast("^out-[ab]$").set("max_in_flight_bytes", "8MiB").set("detach_after", "1s"))
        .toml();
    let service = Running::start(&toml, &emulator.url);

    // 6 MiB: six times the broken destination's buffer.
    let input = records(31, 6_000, 1_024);
    put_all(&client, "in", &input).await;
    // The healthy ones get every record while the broken one still refuses everything.
    service.wait_accepted("out-a", 6_000).await;
    service.wait_accepted("out-b", 6_000).await;
    assert_eq!(service.accepted("out-broken"), 0, "still broken");
    assert!(detached(&service, "out-broken") > 0, "the broken destination was detached");
    assert_eq!(detached(&service, "out-a"), 0);
    assert!(
        service.progress.checkpoints().is_empty(),
        "no checkpoint passes what the broken destination has: {:?}",
        service.progress.checkpoints()
    );

    // Fixed: it catches up by itself and joins the live feed again.
    emulator.faults.lock().unwrap().reject_puts_to = None;
    service.wait_accepted("out-broken", 6_000).await;
    wait_until("the broken destination follows the live feed again", || async {
        detached(&service, "out-broken") == 0
    })
    .await;
    assert!(
        service.metrics.catch_up_records.with_label_values(&["out-broken"]).get() > 0,
        "records reached it through the catch-up"
    );
    assert_eq!(service.metrics.records_expired.with_label_values(&["out-broken"]).get(), 0, "nothing expired");
    // Records written after the seam reach all three through the live feed.
    let more = records(32, 300, 256);
    put_all(&client, "in", &more).await;
    for name in ["out-a", "out-b", "out-broken"] {
        service.wait_accepted(name, 6_300).await;
    }
    service.stop().await.unwrap();
    let everything = sorted(&[input, more].concat());
    for name in ["out-a", "out-b", "out-broken"] {
        assert_eq!(contents(&client, name).await, everything, "{name}: every record exactly once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_expire_before_a_detached_destination_reads_them_are_counted() {
    let Broken { emulator, client, toml, .. } = with_a_broken_destination(|_| {}).await;
    let service = Running::start(&toml, &emulator.url);
    let first = detach_the_broken_one(&service, &client, 41).await;

    // While it is detached, 50 records leave the source's retention before its catch-up reads
    // them: the live feed reads them, GetRecords no longer returns them.
    emulator.faults.lock().unwrap().expire_partition_keys = Some("gone-".into());
    let gone: Vec<Rec> = (0..50).map(|i| (format!("gone-{i:03}"), format!("expired-{i}").into_bytes())).collect();
    put_all(&client, "in", &gone).await;
    // Records written after them are what proves to the catch-up that nothing it could still
    // read is left before them (an empty page at the tip proves nothing).
    let after = records(43, 20, 128);
    put_all(&client, "in", &after).await;
    service.wait_accepted("out-a", 3_070).await;

    emulator.faults.lock().unwrap().reject_puts_to = None;
    wait_until("the broken destination caught up and follows the live feed again", || async {
        service.accepted("out-broken") >= 3_020 && detached(&service, "out-broken") == 0
    })
    .await;
    let expired = |name: &str| service.metrics.records_expired.with_label_values(&[name]).get();
    assert_eq!(expired("out-broken"), 50, "every record it never got is counted");
    assert_eq!(expired("out-a"), 0);
    service.stop().await.unwrap();
    emulator.faults.lock().unwrap().expire_partition_keys = None;
    assert_eq!(contents(&client, "out-a").await, sorted(&[first.clone(), gone, after.clone()].concat()));
    assert_eq!(
        contents(&client, "out-broken").await,
        sorted(&[first, after].concat()),
        "everything that had not expired, once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_sequence_number_holds_a_catch_up_loudly_and_loses_nothing() {
    let Broken { emulator, client, toml, .. } = with_a_broken_destination(|_| {}).await;
    let service = Running::start(&toml, &emulator.url);
    let first = detach_the_broken_one(&service, &client, 45).await;

    // While it is detached, GetRecords answers one record with a sequence number that is none.
    emulator.faults.lock().unwrap().malform_sequence_numbers = Some("bad-".into());
    let bad: Vec<Rec> = vec![("bad-0".into(), b"malformed on the catch-up's read".to_vec())];
    let after = records(47, 20, 128);
    put_all(&client, "in", &bad).await;
    put_all(&client, "in", &after).await;
    service.wait_accepted("out-a", 3_021).await;
    emulator.faults.lock().unwrap().reject_puts_to = None;
    let errors =
        || service.metrics.catch_up_errors.with_label_values(&["out-broken", "malformed_sequence_number"]).get();
    wait_until("the catch-up stops at the malformed record", || async { errors() > 1 }).await;
    assert!(detached(&service, "out-broken") > 0, "it stays detached: no gap is skipped over");
    assert!(
        !contents(&client, "out-broken").await.iter().any(|r| r.0.starts_with("bad-") || after.contains(r)),
        "nothing at or after the malformed record was sent"
    );

    // Once GetRecords answers well, the catch-up reads the page again and goes on by itself.
    emulator.faults.lock().unwrap().malform_sequence_numbers = None;
    let everything = [first, bad, after].concat();
    wait_until("out-broken holds every record", || async { all_hold(&client, &["out-broken"], &everything).await })
        .await;
    wait_until("out-broken follows the live feed again", || async { detached(&service, "out-broken") == 0 }).await;
    service.stop().await.unwrap();
    assert_eq!(delivery(&client, "out-a", &everything).await.missing, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_detachment_resumes_each_destination_from_its_own_position() {
    let Broken { emulator, client, toml, checkpoint, _dir } =
        with_a_broken_destination(|faults| faults.honour_starting_position = true).await;

    let input = records(41, 3_000, 1_024);
    put_all(&client, "in", &input).await;
    let first = Running::start(&toml, &emulator.url);
    first.wait_accepted("out-a", 3_000).await;
    assert!(detached(&first, "out-broken") > 0);
    first.stop().await.unwrap();
    let stored = std::fs::read_to_string(&checkpoint).unwrap();
    assert!(stored.contains("destination_checkpoints"), "each destination's own position is stored: {stored}");

    // Restarted while the broken destination is still broken: the healthy one is not sent again
    // what it has, although the shard's checkpoint is held back by the broken one.
    let second = Running::start(&toml, &emulator.url);
    let more = records(42, 200, 256);
    put_all(&client, "in", &more).await;
    second.wait_accepted("out-a", 200).await;
    assert_eq!(duplicates_in(&client, "out-a").await, 0, "nothing re-sent to the healthy destination");
    emulator.faults.lock().unwrap().reject_puts_to = None;
    second.wait_accepted("out-broken", 3_200).await;
    second.stop().await.unwrap();
    let everything = sorted(&[input, more].concat());
    for name in ["out-a", "out-broken"] {
        assert_eq!(contents(&client, name).await, everything, "{name}: every record exactly once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_destination_starting_at_trim_horizon_receives_the_whole_retained_stream() {
    let (emulator, client) = with_streams(&[("in", 2), ("out-a", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let toml =
        TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).group("start_position", "trim_horizon").toml();
    let service = Running::start(&toml, &emulator.url);
    let before = records(51, 800, 512);
    put_all(&client, "in", &before).await;
    service.wait_accepted("out-a", 800).await;

    // A destination created while running, in a group that starts at the trim horizon: it is
    // backfilled through a catch-up while the live feed goes on.
    create_stream(&client, "out-new", 1).await;
    wait_until("out-new discovered", || async { service.metrics.destinations.get() == 2 }).await;
    let after = records(52, 300, 512);
    put_all(&client, "in", &after).await;
    service.wait_accepted("out-a", 1_100).await;
    service.wait_accepted("out-new", 1_100).await;
    wait_until("the backfill joined the live feed", || async { detached(&service, "out-new") == 0 }).await;
    assert!(service.metrics.catch_up_records.with_label_values(&["out-new"]).get() > 0, "records came by backfill");
    // One created while the source is idle is backfilled too: nothing new has to arrive first.
    create_stream(&client, "out-idle", 1).await;
    service.wait_accepted("out-idle", 1_100).await;
    service.stop().await.unwrap();
    let everything = sorted(&[before, after].concat());
    for name in ["out-a", "out-new", "out-idle"] {
        assert_eq!(contents(&client, name).await, everything, "{name}: every record exactly once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_memory_budget_bounds_what_is_buffered_and_loses_nothing() {
    // The emulator's default events: up to 10,000 records each, far more than the budget.
    let (emulator, client) = with_streams(&[("in", 2), ("out-a", 2), ("out-b", 2)]).await;
    let input = records(61, 12_000, 1_024);
    put_all(&client, "in", &input).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).set("memory", "limit", "4MiB").toml();
    let service = Running::start(&toml, &emulator.url);
    let mut peak = 0;
    // A shed destination's re-sent records count as accepted too: it is done once it has accepted
    // as many and no catch-up of it is under way (what that queued, the graceful stop flushes).
    wait_until("every record in both destinations", || {
        let used = service.metrics.memory.get().map(|m| m.used()).unwrap_or(0);
        peak = peak.max(used);
        let done = |name| service.accepted(name) >= 12_000 && detached(&service, name) == 0;
        async move { done("out-a") && done("out-b") }
    })
    .await;
    // Those counts include the re-sent copies: what the destinations hold says when it is done.
    wait_until("both destinations hold every record", || all_hold(&client, &["out-a", "out-b"], &input)).await;
    assert_eq!(service.metrics.memory_limit_bytes.get(), 4 << 20);
    let budget = service.metrics.memory_budget_bytes.get() as u64;
    assert!(budget > 0 && budget < 4 << 20, "the buffer budget ({budget}) is the limit less the headroom");
    assert!(peak <= budget, "buffered {peak} bytes, over the {budget}-byte buffer budget");
    assert!(peak > 0, "the budget was used");
    let shed = |name: &str| service.metrics.destination_shed.with_label_values(&[name]).get() as usize;
    let shed = [shed("out-a"), shed("out-b")];
    service.stop().await.unwrap();
    for (name, shed) in ["out-a", "out-b"].into_iter().zip(shed) {
        // On a loaded host a reader can wait for memory long enough that the budget sheds a
        // destination: it lets go of what it held and re-sends that from its own position. Those
        // re-sent records are the only duplicates allowed, bounded by what fits in the budget.
        let bound = shed * (4 << 20) / 1_024;
        let found = delivery(&client, name, &input).await;
        assert_eq!((found.missing, found.foreign), (0, 0), "{name}: every record, nothing else ({found:?})");
        assert!(found.duplicates <= bound, "{name}: {found:?}, shed {shed} times, allowed {bound} duplicates");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_under_provisioned_destination_lags_alone() {
    // AWS-like shard write limits: 1,000 records/s per shard.
    let emulator = Emulator::with_options(StoreOptions { enforce_limits: true, ..store_options() }).await;
    let client = emulator.client();
    create_stream(&client, "in", 4).await;
    create_stream(&client, "out-big", 4).await;
    create_stream(&client, "out-small", 1).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url)
        .checkpoint_file(&checkpoint)
        .group("max_in_flight_bytes", "1MiB")
        .group("detach_after", "1s")
        .toml();
    let service = Running::start(&toml, &emulator.url);
    let total = 20_000;
    let input = records(71, total, 256);
    put_all(&client, "in", &input).await;
    // The 4-shard destination takes 4,000 records/s, the 1-shard one 1,000: the big one is done
    // long before the small one, which does not slow it down: the small one was detached and
    // catches up on its own (with detaching off, the big one waits for it, and it never is).
    service.wait_accepted("out-big", total as u64).await;
    let small = service.accepted("out-small");
    assert!(small < total as u64, "the small destination lags ({small} of {total})");
    let caught_up = || service.metrics.catch_up_records.with_label_values(&["out-small"]).get();
    wait_until("the small destination catches up on its own", || async { caught_up() > 0 }).await;
    service.wait_accepted("out-small", total as u64).await;
    service.stop().await.unwrap();
    for name in ["out-big", "out-small"] {
        assert_eq!(contents(&client, name).await, sorted(&input), "{name}: every record exactly once");
    }
}
