//! The operator subcommands beside `run`: what an on-call engineer reads and repairs without
//! writing scripts against Kinesis and DynamoDB. Each builds a report (data), rendered as text or,
//! with `--json`, as one JSON document.
//!
//! - [`check`]: which streams are destinations, and why (not).
//! - [`leases`]: one row per lease (or per checkpointed shard with the file backend).
//! - [`replay`]: re-sends a dead-letter stream's records to their destinations.

pub mod check;
pub mod leases;
pub mod replay;

/// Why an operator command could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum OperateError {
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Lease(#[from] crate::lease::LeaseError),
    #[error(transparent)]
    Checkpoint(#[from] crate::progress::CheckpointError),
    #[error(transparent)]
    Replay(#[from] replay::ReplayError),
}
