//! Destinations in another account, written with an assumed role: a small STS stand-in issues
//! expiring credentials, and the second emulator (the other account) accepts only requests
//! signed with a live one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferrokinesis::store::StoreOptions;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

const ROLE: &str = "arn:aws:iam::222222222222:role/kinesis-fanout-writer";
const EXTERNAL_ID: &str = "fanout-ext-1";

/// An STS stand-in answering AssumeRole for [`ROLE`] with [`EXTERNAL_ID`], with credentials that
/// live `lifetime`.
struct Sts {
    url: String,
    issued: Arc<Mutex<HashMap<String, SystemTime>>>,
    /// Every RoleSessionName asked for.
    sessions: Arc<Mutex<Vec<String>>>,
    down: Arc<AtomicBool>,
    _stop: tokio_util::sync::DropGuard,
}

#[derive(Clone)]
struct StsState {
    issued: Arc<Mutex<HashMap<String, SystemTime>>>,
    sessions: Arc<Mutex<Vec<String>>>,
    down: Arc<AtomicBool>,
    serial: Arc<AtomicU32>,
    lifetime: Duration,
}

async fn assume_role(State(state): State<StsState>, body: String) -> Response {
    let form: HashMap<String, String> = body
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    if state.down.load(Ordering::SeqCst) {
        return sts_error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable");
    }
    let asked = (form.get("Action"), form.get("RoleArn"), form.get("ExternalId"));
    if asked != (Some(&"AssumeRole".to_string()), Some(&ROLE.to_string()), Some(&EXTERNAL_ID.to_string())) {
        return sts_error(StatusCode::FORBIDDEN, "AccessDenied");
    }
    if let Some(session) = form.get("RoleSessionName") {
        state.sessions.lock().unwrap().push(session.clone());
    }
    let key = format!("ASIATESTKEY{:09}", state.serial.fetch_add(1, Ordering::SeqCst));
    let expiry = SystemTime::now() + state.lifetime;
    state.issued.lock().unwrap().insert(key.clone(), expiry);
    let expiration = humantime::format_rfc3339_seconds(expiry);
    let xml = format!(
        r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleResult><Credentials><AccessKeyId>{key}</AccessKeyId><SecretAccessKey>secret-{key}</SecretAccessKey><SessionToken>token-{key}</SessionToken><Expiration>{expiration}</Expiration></Credentials><AssumedRoleUser><Arn>arn:aws:sts::222222222222:assumed-role/kinesis-fanout-writer/test</Arn><AssumedRoleId>AROATEST:test</AssumedRoleId></AssumedRoleUser></AssumeRoleResult><ResponseMetadata><RequestId>1</RequestId></ResponseMetadata></AssumeRoleResponse>"#
    );
    (StatusCode::OK, [("content-type", "text/xml")], xml).into_response()
}

fn sts_error(status: StatusCode, code: &str) -> Response {
    let xml = format!(
        r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>{code}</Code><Message>injected by the STS stand-in</Message></Error><RequestId>1</RequestId></ErrorResponse>"#
    );
    (status, [("content-type", "text/xml")], xml).into_response()
}

fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                out.push(hex.unwrap_or(b'%'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Sts {
    async fn start(lifetime: Duration) -> Sts {
        let state = StsState {
            issued: Arc::default(),
            sessions: Arc::default(),
            down: Arc::default(),
            serial: Arc::default(),
            lifetime,
        };
        let (issued, down, sessions) =
            (Arc::clone(&state.issued), Arc::clone(&state.down), Arc::clone(&state.sessions));
        let app = axum::Router::new().route("/", axum::routing::post(assume_role)).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(async move { until.cancelled().await }).await
        });
        Sts { url, issued, sessions, down, _stop: stop.drop_guard() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_destinations_are_written_with_an_assumed_role_refreshed_before_it_expires() {
    // Credentials live 14 s; the SDK refreshes them when less than 10 s remain.
    let sts = Sts::start(Duration::from_secs(14)).await;
    let home = Emulator::start().await;
    let other = Emulator::with_options(StoreOptions { aws_account_id: "222222222222".into(), ..store_options() }).await;
    let (home_client, other_client) = (home.client(), other.client());
    create_stream(&home_client, "in", 1).await;
    create_stream(&other_client, "shared-orders", 1).await;
    // From now on the other account takes only requests signed with a live assumed key.
    other.faults.lock().unwrap().require_keys = Some(Arc::clone(&sts.issued));
    let (_dir, checkpoint) = temp_checkpoint();
    let group = Group::new("^shared-.*$")
        .set("endpoint_url", &other.url)
        .set("role_arn", ROLE)
        .set("external_id", EXTERNAL_ID)
        .set("refresh_interval", "1s")
        .set("linger", "20ms")
        .set("initial_backoff", "50ms")
        .set("max_backoff", "500ms");
    let toml = TestConfig::new(&home.url)
        .pattern("^out-none$")
        .checkpoint_file(&checkpoint)
        .set("aws", "sts_endpoint_url", &sts.url)
        .add_group(group)
        .toml();
    let service = Running::start(&toml, &home.url);

    // A run longer than the credentials live: records every second for 16 s.
    let mut sent = Vec::new();
    for round in 0..16 {
        let batch = records(90 + round, 50, 100);
        put_all(&home_client, "in", &batch).await;
        sent.extend(batch);
        service.wait_accepted("shared-orders", sent.len() as u64).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let keys = sts.issued.lock().unwrap().len();
    assert!(keys >= 2, "the role was assumed again before its credentials expired ({keys} sessions)");
    assert_eq!(other.calls("RejectedSignature"), 0, "every request was signed with a live assumed key");
    assert_eq!(service.metrics.credential_refresh_errors.with_label_values(&["destinations[1]"]).get(), 0);

    // STS goes down: the group holds its records (nothing lost), says so, and recovers.
    sts.down.store(true, Ordering::SeqCst);
    let held = records(120, 100, 100);
    put_all(&home_client, "in", &held).await;
    sent.extend(held);
    wait_until("the failed refresh is counted and shown on /readyz", || async {
        let errors = service.metrics.credential_refresh_errors.with_label_values(&["destinations[1]"]).get();
        errors > 0 && service.get("/readyz").await.0 == 503
    })
    .await;
    sts.down.store(false, Ordering::SeqCst);
    service.wait_accepted("shared-orders", sent.len() as u64).await;
    wait_until("ready again", || async { service.get("/readyz").await.0 == 200 }).await;
    service.stop().await.unwrap();
    other.faults.lock().unwrap().require_keys = None;
    assert_eq!(contents(&other_client, "shared-orders").await, sorted(&sent), "every record exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_assumed_role_and_the_account_and_reports_an_unreachable_one() {
    let sts = Sts::start(Duration::from_secs(900)).await;
    let home = Emulator::start().await;
    let other = Emulator::with_options(StoreOptions { aws_account_id: "222222222222".into(), ..store_options() }).await;
    create_stream(&home.client(), "in", 1).await;
    create_stream(&other.client(), "shared-orders", 1).await;
    create_stream(&other.client(), "private", 1).await;
    other.faults.lock().unwrap().require_keys = Some(Arc::clone(&sts.issued));
    let (_dir, checkpoint) = temp_checkpoint();
    let config = |external_id: &str| {
        let group = Group::new("^shared-.*$")
            .set("endpoint_url", &other.url)
            .set("role_arn", ROLE)
            .set("external_id", external_id);
        TestConfig::new(&home.url)
            .pattern("^out-none$")
            .checkpoint_file(&checkpoint)
            .set("aws", "sts_endpoint_url", &sts.url)
            .add_group(group)
            .toml()
    };
    let settings = kinesis_fanout::Settings::from_toml(&config(EXTERNAL_ID)).unwrap();
    let report = kinesis_fanout::operate::check::report(&settings, &sdk_config(&home.url))
        .await
        .unwrap()
        .render(&settings, false);
    for expected in [
        format!("(account 222222222222) at {}, as assumed role {ROLE}", other.url),
        "shared-orders: destination (group 1: ^shared-.*$)".to_string(),
        "private: not a destination: matches no group's pattern".to_string(),
    ] {
        assert!(report.contains(&expected), "missing `{expected}` in:\n{report}");
    }

    // Without a role it can assume, the other account is unreachable, and says so.
    sts.down.store(true, Ordering::SeqCst);
    let settings = kinesis_fanout::Settings::from_toml(&config("wrong-id")).unwrap();
    let report = kinesis_fanout::operate::check::report(&settings, &sdk_config(&home.url))
        .await
        .unwrap()
        .render(&settings, false);
    assert!(report.contains("unreachable: ListStreams failed"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_assumes_roles_under_the_name_it_holds_leases_by() {
    use crate::helpers::cluster::{Dynamo, Worker, owners, worker_config};
    let sts = Sts::start(Duration::from_secs(900)).await;
    let home = Emulator::start().await;
    let other = Emulator::with_options(StoreOptions { aws_account_id: "222222222222".into(), ..store_options() }).await;
    create_stream(&home.client(), "in", 2).await;
    create_stream(&other.client(), "shared-orders", 1).await;
    let dynamo = Dynamo::start().await;
    let group = Group::new("^shared-.*$")
        .set("endpoint_url", &other.url)
        .set("role_arn", ROLE)
        .set("external_id", EXTERNAL_ID)
        .set("refresh_interval", "1s");
    // No worker_id: outside ECS the worker names itself (host name and a random suffix), once.
    let toml = worker_config(&home, &dynamo, "unused")
        .pattern("^out-none$")
        .without("checkpoint", "worker_id")
        .set("aws", "sts_endpoint_url", &sts.url)
        .add_group(group)
        .toml();
    assert!(!toml.contains("worker_id"), "{toml}");
    let worker = Worker::start("w", &toml, &home.url);
    wait_until("the worker holds both leases and assumed the role", || async {
        owners(&dynamo.leases("leases").await).values().sum::<usize>() == 2 && !sts.sessions.lock().unwrap().is_empty()
    })
    .await;
    let owner = owners(&dynamo.leases("leases").await).into_keys().next().unwrap();
    let sessions = sts.sessions.lock().unwrap().clone();
    worker.stop().await.unwrap();
    let expected: String = format!("kinesis-fanout-{owner}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "=,.@-_".contains(c) { c } else { '-' })
        .take(64)
        .collect();
    assert!(sessions.iter().all(|s| *s == expected), "lease owner {owner}, STS sessions {sessions:?}");
}
