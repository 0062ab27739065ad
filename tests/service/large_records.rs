//! Records up to 10 MiB (issue 26): each stream's own `MaxRecordSizeInKiB` decides what its
//! batches, re-aggregates and dead letters may hold.
//!
//! ferrokinesis 0.7 stores a stream's `UpdateMaxRecordSize`, but its request validation refuses
//! `Data` over 1 MiB, its PutRecords action refuses requests over 5 MiB, and its
//! DescribeStreamSummary does not say `MaxRecordSizeInKiB`. The layer here stands in for the
//! Kinesis of today: a put that only a raised stream takes is checked against that stream's own
//! limit (and the request against 10 MiB) and handed, record by record, to the emulator's own
//! PutRecord action without that validation; DescribeStreamSummary answers with the stream's
//! maximum. Shard limits stay off here: the emulator's 1 MiB-per-second window can never take a
//! 6 MiB record, where Kinesis lets a large record borrow burst capacity.

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ferrokinesis::store::Store;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// The emulator behind the large-record layer.
struct LargeEmulator {
    url: String,
    stop: CancellationToken,
}

impl Drop for LargeEmulator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl LargeEmulator {
    fn start() -> LargeEmulator {
        let (app, store) = ferrokinesis::create_app(store_options());
        let app = app
            .layer(axum::middleware::from_fn_with_state(store, large_records))
            // A 10 MiB request, base64-encoded in JSON.
            .layer(axum::extract::DefaultBodyLimit::max(16 << 20));
        let (url, stop) = serve(app);
        LargeEmulator { url, stop }
    }
}

fn json_answer(status: StatusCode, body: Value) -> Response {
    (status, [("content-type", "application/x-amz-json-1.1")], body.to_string()).into_response()
}

fn validation(message: String) -> Response {
    json_answer(StatusCode::BAD_REQUEST, json!({ "__type": "ValidationException", "message": message }))
}

/// Decoded size of a base64 text.
fn decoded_len(text: &str) -> usize {
    let padding = text.bytes().rev().take_while(|b| *b == b'=').count();
    (text.len() / 4 * 3).saturating_sub(padding)
}

async fn large_records(State(store): State<Store>, request: Request, next: Next) -> Response {
    let operation = operation_of(&request);
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 32 << 20).await.unwrap_or_default();
    let json_request = parts.headers.get("content-type").is_some_and(|v| v == "application/x-amz-json-1.1");
    let data: Option<Value> = if json_request { serde_json::from_slice(&bytes).ok() } else { None };
    match (operation.as_str(), data) {
        ("DescribeStreamSummary", Some(data)) => {
            let name = data["StreamName"].as_str().unwrap_or_default().to_string();
            let answer = next.run(Request::from_parts(parts, Body::from(bytes))).await;
            let Ok(stream) = store.get_stream(&name).await else { return answer };
            let (answer_parts, body) = answer.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
            let Ok(mut json) = serde_json::from_slice::<Value>(&body) else {
                return Response::from_parts(answer_parts, Body::from(body));
            };
            if let Some(summary) = json.get_mut("StreamDescriptionSummary") {
                summary["MaxRecordSizeInKiB"] = json!(stream.max_record_size_kib);
            }
            let mut answer_parts = answer_parts;
            answer_parts.headers.remove("content-length");
            Response::from_parts(answer_parts, Body::from(json.to_string()))
        }
        ("PutRecords", Some(data)) => {
            let name = data["StreamName"].as_str().unwrap_or_default().to_string();
            let records = data["Records"].as_array().cloned().unwrap_or_default();
            let sizes: Vec<usize> = records
                .iter()
                .map(|r| decoded_len(r["Data"].as_str().unwrap_or("")) + r["PartitionKey"].as_str().map_or(0, str::len))
                .collect();
            let total: usize = sizes.iter().sum();
            if sizes.iter().all(|s| *s <= 1 << 20) && total <= 5 << 20 {
                // What the emulator takes as it is.
                return next.run(Request::from_parts(parts, Body::from(bytes))).await;
            }
            let Ok(stream) = store.get_stream(&name).await else {
                return next.run(Request::from_parts(parts, Body::from(bytes))).await;
            };
            let limit = stream.max_record_size_kib as usize * 1024;
            if let Some((i, size)) = sizes.iter().enumerate().find(|(_, s)| **s > limit) {
                return validation(format!(
                    "1 validation error detected: Value at 'records.{}.member.data' failed to satisfy constraint: record of {size} bytes over the stream's {limit}",
                    i + 1
                ));
            }
            let request_limit = if limit > 1 << 20 { 10 << 20 } else { 5 << 20 };
            if total > request_limit {
                return validation(format!("Records total {total} bytes, over the {request_limit}-byte request limit"));
            }
            // Record by record, through the emulator's own PutRecord action.
            let mut answers = Vec::new();
            let mut failed = 0;
            for record in records {
                let mut single = record.clone();
                single["StreamName"] = json!(name);
                match ferrokinesis::actions::put_record::execute(&store, single).await {
                    Ok(Some(out)) => answers.push(json!({
                        "SequenceNumber": out["SequenceNumber"],
                        "ShardId": out["ShardId"],
                    })),
                    Ok(None) => {
                        failed += 1;
                        answers.push(json!({ "ErrorCode": "InternalFailure", "ErrorMessage": "no answer" }));
                    }
                    Err(err) => {
                        failed += 1;
                        answers.push(json!({
                            "ErrorCode": err.body.error_type,
                            "ErrorMessage": err.body.message.unwrap_or_default(),
                        }));
                    }
                }
            }
            json_answer(StatusCode::OK, json!({ "FailedRecordCount": failed, "Records": answers }))
        }
        _ => next.run(Request::from_parts(parts, Body::from(bytes))).await,
    }
}

async fn raise(client: &aws_sdk_kinesis::Client, stream: &str) {
    let arn = client.describe_stream_summary().stream_name(stream).send().await.unwrap();
    let arn = arn.stream_description_summary().unwrap().stream_arn().to_string();
    client.update_max_record_size().stream_arn(arn).max_record_size_in_kib(10240).send().await.unwrap();
    wait_active(client, stream).await;
}

/// A record of the key `k`, numbered, whose data says its number.
fn neighbour(i: usize) -> Rec {
    ("k".to_string(), format!("neighbour-{i:03}").into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_a_destinations_maximum_is_dead_lettered_and_its_neighbours_arrive_in_order() {
    let emulator = LargeEmulator::start();
    let client = aws_sdk_kinesis::Client::new(&sdk_config(&emulator.url));
    for (name, shards) in [("in", 2), ("out-big", 1), ("out-small", 1), ("dead", 1)] {
        create_stream(&client, name, shards).await;
    }
    for name in ["in", "out-big", "out-small", "dead"] {
        wait_active(&client, name).await;
    }
    raise(&client, "in").await;
    raise(&client, "out-big").await;

    let (_dir, checkpoint) = temp_checkpoint();
    let toml = TestConfig::new(&emulator.url).checkpoint_file(&checkpoint).group("dead_letter_stream", "dead").toml();
    let service = Running::start(&toml, &emulator.url);

    // Before, the large record, after: all of one key, so one shard of the source, in order.
    let large: Vec<u8> = (0..6 << 20).map(|i: usize| (i % 251) as u8).collect();
    let before: Vec<Rec> = (0..20).map(neighbour).collect();
    let after: Vec<Rec> = (20..40).map(neighbour).collect();
    put_all(&client, "in", &before).await;
    let entry = PutRecordsRequestEntry::builder().partition_key("k").data(Blob::new(large.clone())).build().unwrap();
    let put = client.put_records().stream_name("in").records(entry).send().await.expect("a raised source takes 6 MiB");
    assert_eq!(put.failed_record_count(), Some(0));
    let large_seq = put.records()[0].sequence_number().unwrap().to_string();
    put_all(&client, "in", &after).await;

    service.wait_accepted("out-big", 41).await;
    service.wait_accepted("out-small", 40).await;
    wait_until("the large record is dead-lettered", || async { !read_all(&client, "dead").await.is_empty() }).await;

    // The raised destination holds the large record intact, between its neighbours.
    let big: Vec<Vec<u8>> = read_all(&client, "out-big").await.into_iter().map(|(_, _, data)| data).collect();
    let mut expected: Vec<Vec<u8>> = before.iter().map(|(_, d)| d.clone()).collect();
    expected.push(large.clone());
    expected.extend(after.iter().map(|(_, d)| d.clone()));
    assert_eq!(big.len(), expected.len(), "out-big holds every record once");
    assert!(big == expected, "out-big holds the records of k in order, the 6 MiB one intact");

    // The 1 MiB destination holds the neighbours, in order, and not the large one.
    let small: Vec<Vec<u8>> = read_all(&client, "out-small").await.into_iter().map(|(_, _, data)| data).collect();
    let neighbours: Vec<Vec<u8>> = before.iter().chain(&after).map(|(_, d)| d.clone()).collect();
    assert_eq!(small, neighbours, "out-small holds the neighbours in order");

    // The dead-letter stream (1 MiB) names the record, the reason and both sizes, without its data.
    let letters = read_all(&client, "dead").await;
    assert_eq!(letters.len(), 1, "one letter");
    let envelope: Value = serde_json::from_slice(&letters[0].2).expect("an envelope");
    assert_eq!(envelope["destination"], "out-small");
    assert_eq!(envelope["error_code"], "too_large_for_destination");
    let message = envelope["error_message"].as_str().unwrap();
    assert!(message.contains(&(6 * 1048576 + 1).to_string()) && message.contains("1048576"), "{message}");
    assert_eq!(envelope["data_omitted"], true);
    assert_eq!(envelope["data_bytes"], 6 * 1048576);
    assert!(envelope["shard_id"].as_str().unwrap().starts_with("shardId-"));
    assert_eq!(envelope["sequence_number"], large_seq.as_str(), "the large record's origin");

    let too_large = service.metrics.destination_records_too_large.with_label_values(&["out-small"]).get();
    assert_eq!(too_large, 1, "counted once");
    assert_eq!(service.metrics.destination_records_too_large.with_label_values(&["out-big"]).get(), 0);
    service.stop().await.unwrap();
}
