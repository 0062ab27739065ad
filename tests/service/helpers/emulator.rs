//! The Kinesis emulator of a test: ferrokinesis on 127.0.0.1:0 in a runtime of its own, behind an
//! HTTP layer that injects the faults a test switches on (`Faults`) and counts calls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::Client;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ferrokinesis::store::StoreOptions;
use tokio_util::sync::CancellationToken;

use super::sdk_config;

/// Faults injected in front of the emulator, switched by tests while the service runs.
#[derive(Debug, Default)]
pub struct Faults {
    /// PutRecords requests naming this stream get a 500 InternalFailure.
    pub reject_puts_to: Option<String>,
    /// PutRecords requests naming this stream get a 400 ProvisionedThroughputExceededException.
    pub throttle_puts_to: Option<String>,
    /// PutRecords requests naming this stream get a 400 AccessDeniedException (cannot succeed).
    pub deny_puts_to: Option<String>,
    /// `(stream, data prefix)`: in PutRecords requests to the stream, records whose data starts
    /// with the prefix fail on their own with KMSAccessDeniedException (retrying cannot help),
    /// and the others go on to the emulator, as a record encrypted with a key it may not use.
    pub refuse_records: Option<(String, Vec<u8>)>,
    /// The next N SubscribeToShard calls get 400 ResourceInUseException.
    pub subscribe_in_use: u32,
    /// The next N RegisterStreamConsumer calls get LimitExceededException for their call rate.
    pub register_rate_limited: u32,
    /// ListStreamConsumers is refused (an identity without that permission).
    pub deny_list_consumers: bool,
    /// ferrokinesis 0.7 answers SubscribeToShard from the start of the shard whatever the
    /// starting position: its request validation keeps only `StartingPosition.Type` (its rules
    /// declare no other member), so `SequenceNumber` and `Timestamp` never reach the action, and
    /// every resubscription replays the whole shard, which the service drops and counts. With this
    /// on, the layer hands SubscribeToShard to the emulator's own action without that validation,
    /// so it resumes where it is asked to, as Kinesis does. Off by default, so the tests of the
    /// replay filter keep their replays.
    pub honour_starting_position: bool,
    /// ListStreams answers leave this stream out (as a page boundary or a lagging index could).
    pub hide_from_list_streams: Option<String>,
    /// ListTagsForStream gets 400 LimitExceededException (5 TPS per account).
    pub throttle_list_tags: bool,
    /// GetRecords answers carry a malformed sequence number for records whose partition key
    /// starts with this.
    pub malform_sequence_numbers: Option<String>,
    /// GetRecords answers leave out records whose partition key starts with this, as Kinesis does
    /// once records have left the stream's retention period (ferrokinesis keeps at least 24 h).
    pub expire_partition_keys: Option<String>,
    /// Every request must be signed with one of these access key ids, before its expiry (keys
    /// an STS stand-in issued); others get 400 ExpiredTokenException and are counted under
    /// `calls["RejectedSignature"]`.
    pub require_keys: Option<Arc<Mutex<HashMap<String, std::time::SystemTime>>>>,
    /// ListShards requests for this stream are held this long before they reach the emulator (a
    /// slow or throttled control plane); counted under `calls["ListShards(<stream>)"]`.
    pub stall_list_shards: Option<(String, Duration)>,
    /// Every PutRecords request is noted in `puts` as it arrives.
    pub log_puts: bool,
    pub puts: Vec<PutSeen>,
    /// Calls seen, by operation.
    pub calls: HashMap<String, u64>,
}

/// A PutRecords request as it arrived at the emulator.
#[derive(Debug, Clone)]
pub struct PutSeen {
    pub at: std::time::Instant,
    /// The access key id it was signed with: which worker sent it.
    pub key: String,
    pub stream: String,
    pub partition_keys: Vec<String>,
}

/// The access key id of a SigV4 `Authorization` header.
fn signing_key(request: &axum::http::request::Parts) -> Option<String> {
    let auth = request.headers.get("authorization")?.to_str().ok()?;
    let credential = auth.split("Credential=").nth(1)?;
    Some(credential.split('/').next()?.to_string())
}

pub struct Emulator {
    pub url: String,
    pub faults: Arc<Mutex<Faults>>,
    stop: CancellationToken,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn store_options() -> StoreOptions {
    StoreOptions {
        create_stream_ms: 10,
        delete_stream_ms: 10,
        update_stream_ms: 10,
        shard_limit: 200,
        ..StoreOptions::default()
    }
}

/// Serves an emulator app on 127.0.0.1 until the token is cancelled: its URL and that token.
/// The emulator gets a runtime of its own, with more workers than requests the tests ever have in
/// flight: ferrokinesis 0.7 can deadlock when concurrent PutRecords occupy every worker of its
/// runtime, and the tests' own runtimes have two.
pub fn serve(app: axum::Router) -> (String, CancellationToken) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let until = stop.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(16).enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = ferrokinesis::serve_plain_http(listener, app, async move { until.cancelled().await }).await;
        });
    });
    (url, stop)
}

impl Emulator {
    pub async fn start() -> Emulator {
        Self::with_options(store_options()).await
    }

    pub async fn with_options(options: StoreOptions) -> Emulator {
        let (app, store) = ferrokinesis::create_app(options);
        // As the emulator's own binary does (7 MiB): a 5 MiB PutRecords takes more once encoded.
        let app = app.layer(axum::extract::DefaultBodyLimit::max(7 << 20));
        let faults = Arc::new(Mutex::new(Faults::default()));
        let app = app.layer(axum::middleware::from_fn_with_state((Arc::clone(&faults), store), inject_faults));
        let (url, stop) = serve(app);
        Emulator { url, faults, stop }
    }

    pub fn client(&self) -> Client {
        Client::new(&sdk_config(&self.url))
    }

    /// How many calls of an operation reached the emulator.
    pub fn calls(&self, operation: &str) -> u64 {
        self.faults.lock().unwrap().calls.get(operation).copied().unwrap_or(0)
    }
}

fn error_response(status: StatusCode, kind: &str) -> Response {
    let body = format!(r#"{{"__type":"{kind}","message":"injected by the test fault layer"}}"#);
    (status, [("content-type", "application/x-amz-json-1.1")], body).into_response()
}

/// The Kinesis action a request asks for (`PutRecords`, from its `X-Amz-Target`).
pub fn operation_of(request: &Request) -> String {
    let target = request.headers().get("x-amz-target").and_then(|v| v.to_str().ok());
    target.and_then(|v| v.rsplit('.').next()).unwrap_or("").to_string()
}

async fn inject_faults(
    State((faults, store)): State<(Arc<Mutex<Faults>>, ferrokinesis::store::Store)>,
    request: Request,
    next: Next,
) -> Response {
    let operation = operation_of(&request);
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20).await.unwrap_or_default();
    let bytes = by_name(&operation, bytes);
    let honour_position;
    let refused;
    let hidden;
    let expired;
    let malformed;
    let stall;
    {
        let mut faults = faults.lock().unwrap();
        *faults.calls.entry(operation.clone()).or_default() += 1;
        if let Some(keys) = &faults.require_keys {
            let key = signing_key(&parts).unwrap_or_default();
            let live = keys.lock().unwrap().get(&key).is_some_and(|expiry| *expiry > std::time::SystemTime::now());
            if !live {
                *faults.calls.entry("RejectedSignature".into()).or_default() += 1;
                return error_response(StatusCode::BAD_REQUEST, "ExpiredTokenException");
            }
        }
        if operation == "PutRecords"
            && faults.log_puts
            && let Ok(body) = serde_json::from_slice::<serde_json::Value>(&bytes)
        {
            let stream = body.get("StreamName").and_then(|v| v.as_str()).unwrap_or_default().to_string();
            let partition_keys = body
                .get("Records")
                .and_then(|v| v.as_array())
                .map(|records| {
                    records.iter().filter_map(|r| r.get("PartitionKey")?.as_str().map(str::to_string)).collect()
                })
                .unwrap_or_default();
            let key = signing_key(&parts).unwrap_or_default();
            faults.puts.push(PutSeen { at: std::time::Instant::now(), key, stream, partition_keys });
        }
        if operation == "PutRecords"
            && let Some(stream) = &faults.reject_puts_to
            && contains(&bytes, stream.as_bytes())
        {
            return error_response(StatusCode::INTERNAL_SERVER_ERROR, "InternalFailure");
        }
        if operation == "PutRecords"
            && let Some(stream) = &faults.throttle_puts_to
            && contains(&bytes, stream.as_bytes())
        {
            return error_response(StatusCode::BAD_REQUEST, "ProvisionedThroughputExceededException");
        }
        if operation == "PutRecords"
            && let Some(stream) = &faults.deny_puts_to
            && contains(&bytes, stream.as_bytes())
        {
            return error_response(StatusCode::BAD_REQUEST, "AccessDeniedException");
        }
        if operation == "ListTagsForStream" && faults.throttle_list_tags {
            return error_response(StatusCode::BAD_REQUEST, "LimitExceededException");
        }
        if operation == "RegisterStreamConsumer" && faults.register_rate_limited > 0 {
            faults.register_rate_limited -= 1;
            let body = r#"{"__type":"LimitExceededException","message":"Rate exceeded for stream in under account 000000000000."}"#;
            return (StatusCode::BAD_REQUEST, [("content-type", "application/x-amz-json-1.1")], body).into_response();
        }
        if operation == "ListStreamConsumers" && faults.deny_list_consumers {
            return error_response(StatusCode::BAD_REQUEST, "AccessDeniedException");
        }
        if operation == "SubscribeToShard" && faults.subscribe_in_use > 0 {
            faults.subscribe_in_use -= 1;
            return error_response(StatusCode::BAD_REQUEST, "ResourceInUseException");
        }
        stall = faults.stall_list_shards.clone().filter(|(stream, _)| {
            operation == "ListShards" && contains(&bytes, format!("\"StreamName\":\"{stream}\"").as_bytes())
        });
        if let Some((stream, _)) = &stall {
            *faults.calls.entry(format!("ListShards({stream})")).or_default() += 1;
        }
        honour_position = operation == "SubscribeToShard" && faults.honour_starting_position;
        refused = faults.refuse_records.clone().filter(|_| operation == "PutRecords");
        hidden = faults.hide_from_list_streams.clone().filter(|_| operation == "ListStreams");
        expired = faults.expire_partition_keys.clone().filter(|_| operation == "GetRecords");
        malformed = faults.malform_sequence_numbers.clone().filter(|_| operation == "GetRecords");
    }
    if let Some((_, stall)) = stall {
        tokio::time::sleep(stall).await;
    }
    if let Some(refused) = refused {
        return refuse_records(parts, bytes, refused, next).await;
    }
    if let Some(hidden) = hidden {
        let answer = next.run(Request::from_parts(parts, Body::from(bytes))).await;
        return rewritten(answer, |json| {
            if let Some(names) = json.get_mut("StreamNames").and_then(|v| v.as_array_mut()) {
                names.retain(|n| n.as_str() != Some(&hidden));
            }
            if let Some(summaries) = json.get_mut("StreamSummaries").and_then(|v| v.as_array_mut()) {
                summaries.retain(|s| s.get("StreamName").and_then(|n| n.as_str()) != Some(&hidden));
            }
        })
        .await;
    }
    if let Some(prefix) = malformed {
        let answer = next.run(Request::from_parts(parts, Body::from(bytes))).await;
        return rewritten(answer, |json| {
            for record in json.get_mut("Records").and_then(|v| v.as_array_mut()).into_iter().flatten() {
                if record.get("PartitionKey").and_then(|k| k.as_str()).is_some_and(|k| k.starts_with(&prefix)) {
                    record["SequenceNumber"] = serde_json::Value::from("not-a-sequence-number");
                }
            }
        })
        .await;
    }
    if let Some(prefix) = expired {
        let answer = next.run(Request::from_parts(parts, Body::from(bytes))).await;
        return rewritten(answer, |json| {
            if let Some(records) = json.get_mut("Records").and_then(|v| v.as_array_mut()) {
                records.retain(|r| {
                    !r.get("PartitionKey").and_then(|k| k.as_str()).is_some_and(|k| k.starts_with(&prefix))
                });
            }
        })
        .await;
    }
    if honour_position
        && parts.headers.get("content-type").is_some_and(|v| v == "application/x-amz-json-1.1")
        && let Ok(data) = serde_json::from_slice(&bytes)
        && let Ok(events) =
            ferrokinesis::actions::subscribe_to_shard::execute_streaming(&store, data, "application/x-amz-json-1.1")
                .await
    {
        return (StatusCode::OK, [("content-type", "application/vnd.amazon.eventstream")], events).into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

/// ferrokinesis 0.7 reads the stream of DescribeStreamSummary, ListShards, GetShardIterator and
/// ListTagsForStream by `StreamName` only; Kinesis takes `StreamARN` too (the only way to name a
/// stream of another account shared by a resource policy). The layer names the stream as the
/// emulator reads it.
fn by_name(operation: &str, bytes: axum::body::Bytes) -> axum::body::Bytes {
    const BY_NAME_ONLY: [&str; 4] = ["DescribeStreamSummary", "ListShards", "GetShardIterator", "ListTagsForStream"];
    if !BY_NAME_ONLY.contains(&operation) || !contains(&bytes, b"\"StreamARN\"") {
        return bytes;
    }
    let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return bytes };
    let Some(arn) = json.get("StreamARN").and_then(|v| v.as_str()).map(str::to_string) else { return bytes };
    let Some((_, name)) = arn.split_once(":stream/") else { return bytes };
    if let Some(object) = json.as_object_mut() {
        object.remove("StreamARN");
        object.insert("StreamName".into(), serde_json::Value::from(name));
    }
    serde_json::to_vec(&json).map(Into::into).unwrap_or(bytes)
}

/// A PutRecords request to `stream` whose records with data starting with `prefix` fail on
/// their own (KMSAccessDeniedException): the others are put, and the answers placed back in
/// order. A request to another stream goes on as it is.
async fn refuse_records(
    mut parts: axum::http::request::Parts,
    bytes: axum::body::Bytes,
    (stream, prefix): (String, Vec<u8>),
    next: Next,
) -> Response {
    use base64::Engine as _;
    let request = serde_json::from_slice::<serde_json::Value>(&bytes).ok();
    let Some(mut request) = request.filter(|r| names_stream(r, &stream)) else {
        return next.run(Request::from_parts(parts, Body::from(bytes))).await;
    };
    let records = request["Records"].as_array().cloned().unwrap_or_default();
    let refused: Vec<bool> = records
        .iter()
        .map(|r| {
            let data = r["Data"].as_str().unwrap_or_default();
            base64::engine::general_purpose::STANDARD.decode(data).is_ok_and(|d| d.starts_with(&prefix))
        })
        .collect();
    let kept: Vec<serde_json::Value> =
        records.into_iter().zip(&refused).filter(|(_, r)| !**r).map(|(record, _)| record).collect();
    let denied =
        serde_json::json!({ "ErrorCode": "KMSAccessDeniedException", "ErrorMessage": "The key may not be used." });
    let mut answers: Vec<serde_json::Value> = Vec::new();
    let mut failed = refused.iter().filter(|r| **r).count() as u64;
    if !kept.is_empty() {
        request["Records"] = serde_json::Value::Array(kept);
        parts.headers.remove("content-length");
        let answer = next.run(Request::from_parts(parts, Body::from(serde_json::to_vec(&request).unwrap()))).await;
        if !answer.status().is_success() {
            return answer;
        }
        let body = axum::body::to_bytes(answer.into_body(), 64 << 20).await.unwrap_or_default();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        failed += json["FailedRecordCount"].as_u64().unwrap_or(0);
        answers = json["Records"].as_array().cloned().unwrap_or_default();
    }
    let mut put = answers.into_iter();
    let records: Vec<serde_json::Value> = refused
        .iter()
        .map(|r| if *r { denied.clone() } else { put.next().unwrap_or_else(|| denied.clone()) })
        .collect();
    let body = serde_json::json!({ "FailedRecordCount": failed, "Records": records });
    (StatusCode::OK, [("content-type", "application/x-amz-json-1.1")], body.to_string()).into_response()
}

/// A JSON answer changed by `edit` (left as it is if it is not JSON).
async fn rewritten(answer: Response, edit: impl FnOnce(&mut serde_json::Value)) -> Response {
    let (parts, body) = answer.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20).await.unwrap_or_default();
    let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    edit(&mut json);
    let mut parts = parts;
    parts.headers.remove("content-length");
    Response::from_parts(parts, Body::from(serde_json::to_vec(&json).unwrap()))
}

/// Whether a request names `stream`, by name or by ARN.
fn names_stream(request: &serde_json::Value, stream: &str) -> bool {
    request["StreamName"].as_str() == Some(stream)
        || request["StreamARN"].as_str().is_some_and(|arn| arn.ends_with(&format!(":stream/{stream}")))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
