//! Test harness: an in-process ferrokinesis emulator on 127.0.0.1:0 behind a fault-injecting
//! HTTP layer, SDK clients for it, the service started in-process with its own config, and (in
//! `cluster`) a lease table and workers that can be killed.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region, SharedCredentialsProvider};

pub mod cluster;
mod config;
mod emulator;
mod records;
mod service;

// Shared with the benchmark (and the demo): the DynamoDB double and the stream reader.
#[path = "../../common/dynamo.rs"]
pub mod dynamo;
#[path = "../../common/streams.rs"]
pub mod streams;

pub use config::*;
pub use emulator::*;
pub use records::*;
pub use service::*;

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(90);

pub fn sdk_config(url: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new("test", "test", None, None, "test")))
        .region(Region::new("us-east-1"))
        .endpoint_url(url)
        .behavior_version(BehaviorVersion::latest())
        .build()
}

/// Polls `condition` every 50 ms until it holds, failing the test after `WAIT`.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let outcome = tokio::time::timeout(WAIT, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(outcome.is_ok(), "timed out after {WAIT:?} waiting for: {what}");
}

pub fn temp_checkpoint() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoints.json");
    (dir, path)
}
