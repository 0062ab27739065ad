//! Leases: which worker reads which shard, shared through a DynamoDB table the way the Kinesis
//! Client Library does it, so that many workers split a stream's shards and take over a dead
//! worker's shards within seconds.
//!
//! - [`table`]: the DynamoDB items (KCL attribute names) and conditional writes on `leaseCounter`,
//!   the fencing token: a write succeeds only for the worker that holds the counter it read.
//! - [`balance`]: which leases to take or steal this round (pure, unit-tested).
//! - [`manager`]: the renew/take loop, checkpoints through the lease, graceful release.

pub mod balance;
pub mod manager;
pub mod table;

pub use manager::{LeaseEvent, LeaseManager};
pub use table::{Lease, LeaseError, LeaseTable, Position};

/// How long requests that a worker sent before it learnt it lost a lease may still land: its
/// PutRecords attempt timeout. A worker taking a lease that someone held waits this long (plus
/// the victim's renewal period, for a steal) before it reads the shard.
pub fn settle_time(failover: std::time::Duration) -> std::time::Duration {
    failover.clamp(std::time::Duration::from_secs(5), std::time::Duration::from_secs(20))
}
