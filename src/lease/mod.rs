//! Leases: which worker reads which shard, shared through a DynamoDB table the way the Kinesis
//! Client Library does it, so that many workers split a stream's shards and take over a dead
//! worker's shards within seconds.
//!
//! - [`table`]: the lease items (KCL attribute names), the [`LeaseStore`] that keeps them and the
//!   [`LeaseTable`] handle; every write is conditional on `leaseCounter`, the fencing token: a
//!   write succeeds only for the worker that holds the counter it read.
//! - [`dynamodb`]: the store in DynamoDB.
//! - [`balance`]: which leases to take or steal this round (pure, unit-tested).
//! - [`manager`]: the renew/take loop and graceful release.
//! - [`checkpoint`]: checkpoints through the lease, conditional on its counter.
//! - [`lifecycle`]: leases created for new shards and deleted for finished ones.
//!
//! The same table in memory and a whole fleet of workers running this code against it on a paused
//! clock are in `crate::simulation`, built only for tests and the benchmark.

pub mod balance;
pub mod checkpoint;
pub mod dynamodb;
mod item;
pub mod lifecycle;
pub mod manager;
pub mod table;

pub use manager::LeaseManager;

/// Destination id → its own stored position in a shard.
pub type DestinationSkips = std::collections::BTreeMap<String, crate::record::SequenceNumber>;

/// A change in what this worker reads, as its lease loop hands it to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    /// Read this shard from `position`, after `delay` (a stolen lease gives its previous owner one
    /// renewal period to notice and stop, so that two workers do not read it at once).
    /// `destinations`: each destination's own stored position, where it is ahead of `position`.
    Acquired {
        shard: String,
        position: crate::position::Position,
        delay: std::time::Duration,
        destinations: DestinationSkips,
    },
    /// Stop reading this shard now: another worker holds it, or this one cannot prove it does.
    Lost { shard: String },
}
pub use table::{Lease, LeaseError, LeaseStore, LeaseTable, Position};

pub use crate::config::settle_time;

/// This worker's name: the ECS task id when running on ECS, else hostname plus a random suffix.
pub async fn default_worker_id() -> String {
    if let Ok(uri) = std::env::var("ECS_CONTAINER_METADATA_URI_V4") {
        let task = async {
            let body: serde_json::Value = reqwest::get(format!("{uri}/task")).await.ok()?.json().await.ok()?;
            body.get("TaskARN")?.as_str()?.rsplit('/').next().map(str::to_string)
        };
        if let Ok(Some(id)) = tokio::time::timeout(std::time::Duration::from_secs(2), task).await {
            return id;
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}
