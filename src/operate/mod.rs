//! The operator subcommands beside `run`: what an on-call engineer reads and repairs without
//! writing scripts against Kinesis and DynamoDB. Each builds a report (data), rendered as text or,
//! with `--json`, as one JSON document.
//!
//! - [`check`]: which streams are destinations, and why (not).
//! - [`leases`]: one row per lease (or per checkpointed shard with the file backend).
//! - [`replay`]: re-sends a dead-letter stream's records to their destinations.
//! - [`consumer`]: deregisters the service's Enhanced Fan-Out consumer after a decommission.
//! - [`reset_checkpoints`] (`run --reset-checkpoints`) and [`probe_health`] (`healthcheck`).

pub mod check;
pub mod consumer;
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
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Replay(#[from] replay::ReplayError),
    #[error(transparent)]
    Consumer(#[from] consumer::ConsumerError),
}

pub use crate::checkpoint::reset_checkpoints;

/// GET /healthz over plain HTTP/1.0 with short timeouts (container health checks: distroless
/// has no curl): `Ok` when it answers 200, else why not.
pub fn probe_health(addr: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let timeout = std::time::Duration::from_secs(2);
    let probe = || -> std::io::Result<String> {
        let target = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to no address")))?;
        let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(format!("GET /healthz HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut response = String::new();
        stream.take(4096).read_to_string(&mut response)?;
        Ok(response)
    };
    match probe() {
        Ok(response) if response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200") => Ok(()),
        Ok(response) => Err(format!("{addr}/healthz answered {}", response.lines().next().unwrap_or(""))),
        Err(err) => Err(format!("cannot reach http://{addr}/healthz: {err}")),
    }
}
