//! kinesis-fanout copies every record of one Kinesis stream to every stream whose name matches a
//! pattern, at least once, in order per partition key.
//!
//! The path of a record, module by module:
//! - [`source`]: Enhanced Fan-Out subscriptions, one reader per shard, resharding in order;
//! - [`fanout`]: each chunk of records queued for every destination, with byte budgets as
//!   backpressure;
//! - [`sink`]: per destination, batched, rate-limited PutRecords that retry exactly the failed
//!   records, with a dead-letter stream for what can never succeed;
//! - [`progress`]: a chunk is done when every destination accepted it;
//! - [`checkpoint`]: what every destination accepted, stored (a file, or the lease table).
//!
//! What travels: a [`record`] (a source record, sequence numbers, what PutRecords accepts) and its
//! [`kpl`] aggregates; a [`position`] in a shard. What bounds it: the [`memory`] budget. Who reads
//! which shard: [`lease`]s in a DynamoDB table shared by the workers.
//!
//! Around it: [`discovery`] of destination streams, [`config`], [`metrics`] and the [`admin`]
//! port with [`health`] and [`idle`] detection, the AWS edge in [`aws`], [`shutdown`] handles, and
//! [`app`], which wires it all and tears it down in order. The operator subcommands (`check`,
//! `leases`, `dead-letters replay`) are in [`operate`].
//!
//! Built only for tests and the benchmark (feature `simulation`, which the dev-dependencies turn
//! on): `simulation`, the lease table in memory and a fleet of workers on a paused clock.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod aws;
pub mod checkpoint;
pub mod config;
pub mod discovery;
pub mod fanout;
pub mod health;
pub mod idle;
pub mod kpl;
pub mod lease;
pub mod memory;
pub mod metrics;
pub mod operate;
pub mod position;
pub mod progress;
pub mod record;
pub mod shutdown;
#[cfg(any(test, feature = "simulation"))]
pub mod simulation;
pub mod sink;
pub mod source;

pub use app::{RunError, Service};
pub use config::Settings;
