use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_come_and_go_while_running() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-a", 1), ("out-b", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let service = Running::start(&TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).toml(), &emulator.url);

    let first = records(10, 200, 32);
    put_all(&client, "in", &first).await;
    service.wait_accepted("out-a", 200).await;
    service.wait_accepted("out-b", 200).await;

    create_stream(&client, "out-c", 2).await;
    wait_until("out-c discovered", || async { service.metrics.destinations.get() == 3 }).await;
    let second = records(11, 200, 32);
    put_all(&client, "in", &second).await;
    service.wait_accepted("out-c", 200).await;
    service.wait_accepted("out-a", 400).await;

    client.delete_stream().stream_name("out-b").send().await.unwrap();
    wait_until("out-b forgotten", || async { service.metrics.destinations.get() == 2 }).await;
    let third = records(12, 200, 32);
    put_all(&client, "in", &third).await;
    service.wait_accepted("out-a", 600).await;
    service.wait_accepted("out-c", 400).await;
    // Progress is not held back by the deleted destination.
    wait_until("everything acknowledged", || async { service.progress.outstanding() == 0 }).await;
    service.stop().await.unwrap();

    let all: Vec<Rec> = first.iter().chain(&second).chain(&third).cloned().collect();
    assert_eq!(contents(&client, "out-a").await, sorted(&all));
    let after_c: Vec<Rec> = second.iter().chain(&third).cloned().collect();
    assert_eq!(contents(&client, "out-c").await, sorted(&after_c), "a new destination gets what follows its discovery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_missing_from_one_list_streams_answer_is_kept_while_it_exists() {
    let (emulator, client) = with_streams(&[("in", 1), ("out-a", 1), ("out-b", 1)]).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let service = Running::start(&TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).toml(), &emulator.url);
    let first = records(1500, 100, 32);
    put_all(&client, "in", &first).await;
    service.wait_accepted("out-b", 100).await;

    emulator.faults.lock().unwrap().hide_from_list_streams = Some("out-b".into());
    let listed = emulator.calls("ListStreams");
    wait_until("two discovery rounds without out-b", || async { emulator.calls("ListStreams") >= listed + 2 }).await;
    assert_eq!(service.metrics.destinations.get(), 2, "out-b still exists, so it is still a destination");
    let second = records(1501, 100, 32);
    put_all(&client, "in", &second).await;
    service.wait_accepted("out-b", 200).await;
    service.stop().await.unwrap();
    let mut all = first;
    all.extend(second);
    assert_eq!(contents(&client, "out-b").await, sorted(&all));
}
