//! A DynamoDB double for the service tests and the fleet benchmark: dynoxide in memory behind a
//! small HTTP proxy that counts the calls it forwards (reads and writes) and can answer every call
//! with a fault instead. One copy, included by both (`#[path]`), so the two measure and break
//! the lease table the same way. Test doubles stay out of the library.

// Each includer uses a part: the tests the faults, the benchmark the counts.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

/// How the proxy in front of DynamoDB behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DynamoMode {
    #[default]
    Pass,
    /// Every call answers ProvisionedThroughputExceededException.
    Throttle,
    /// Every call answers 503, as an unreachable endpoint behind a load balancer would.
    Down,
}

/// Calls that reached the proxy, by kind (faulted ones too).
#[derive(Debug, Default)]
pub struct DynamoCalls {
    /// Scan, GetItem, Query, DescribeTable.
    pub reads: AtomicU64,
    /// Everything else.
    pub writes: AtomicU64,
}

impl DynamoCalls {
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

/// dynoxide and its proxy, both stopped when this is dropped.
pub struct Dynamo {
    /// The proxy's URL: what workers use (counted, and faulted by `mode`).
    pub url: String,
    /// dynoxide itself, for looks at the table that should be neither counted nor faulted.
    pub direct_url: String,
    pub mode: Arc<Mutex<DynamoMode>>,
    pub calls: Arc<DynamoCalls>,
    stop: CancellationToken,
}

impl Drop for Dynamo {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Clone)]
struct Proxy {
    upstream: String,
    mode: Arc<Mutex<DynamoMode>>,
    calls: Arc<DynamoCalls>,
    client: reqwest::Client,
}

async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    let target = request.headers().get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default();
    match target.rsplit('.').next().unwrap_or_default() {
        "Scan" | "GetItem" | "Query" | "DescribeTable" => proxy.calls.reads.fetch_add(1, Ordering::Relaxed),
        _ => proxy.calls.writes.fetch_add(1, Ordering::Relaxed),
    };
    let mode = *proxy.mode.lock().unwrap();
    match mode {
        DynamoMode::Throttle => {
            let body = r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"injected"}"#;
            return (StatusCode::BAD_REQUEST, [("content-type", "application/x-amz-json-1.0")], body).into_response();
        }
        DynamoMode::Down => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        DynamoMode::Pass => {}
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 16 << 20).await.unwrap_or_default();
    let mut upstream = proxy.client.post(&proxy.upstream).body(bytes.to_vec());
    for (name, value) in parts.headers.iter() {
        if name != "host" && name != "content-length" {
            upstream = upstream.header(name.as_str(), value.as_bytes());
        }
    }
    match upstream.send().await {
        Ok(answer) => {
            let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or_default();
            let content_type = answer.headers().get("content-type").cloned();
            let body = answer.bytes().await.unwrap_or_default();
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            if let Some(content_type) = content_type {
                response.headers_mut().insert("content-type", content_type);
            }
            response
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

impl Dynamo {
    /// Starts dynoxide (in memory) and the proxy on the current runtime.
    pub async fn start() -> Dynamo {
        let stop = CancellationToken::new();
        let db = dynoxide::Database::memory().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let direct_url = format!("http://{}", listener.local_addr().unwrap());
        let until = stop.clone();
        tokio::spawn(async move { dynoxide::server::serve_with_shutdown(listener, db, until.cancelled_owned()).await });

        let mode = Arc::new(Mutex::new(DynamoMode::Pass));
        let calls = Arc::new(DynamoCalls::default());
        let proxy = Proxy {
            upstream: format!("{direct_url}/"),
            mode: Arc::clone(&mode),
            calls: Arc::clone(&calls),
            client: reqwest::Client::new(),
        };
        let app = axum::Router::new().fallback(forward).with_state(proxy);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let until = stop.clone();
        tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(until.cancelled_owned()).await });
        Dynamo { url, direct_url, mode, calls, stop }
    }

    pub fn set(&self, mode: DynamoMode) {
        *self.mode.lock().unwrap() = mode;
    }
}
