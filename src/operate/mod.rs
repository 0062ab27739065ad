//! The operator subcommands beside `run`: what an on-call engineer reads and repairs without
//! writing scripts against Kinesis and DynamoDB. Each builds a report (data), rendered as text or,
//! with `--json`, as one JSON document.
//!
//! - [`check`]: which streams are destinations, and why (not).
//! - [`leases`]: one row per lease (or per checkpointed shard with the file backend).

pub mod check;
pub mod leases;

/// Why an operator command could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum OperateError {
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Lease(#[from] crate::lease::LeaseError),
    #[error(transparent)]
    Checkpoint(#[from] crate::progress::CheckpointError),
}
