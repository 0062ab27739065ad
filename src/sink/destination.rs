//! One destination stream's task: what it is given (queue, shard feeds, limits, put edge).
//!
//! The work itself is split by role: [`super::writer`] sets the task up as a writer and runs the
//! send loop (fill, limit, send, settle), [`super::limiter`] its rate limits, [`super::put`] the PutRecords edge, [`super::ledger`] what the destination owes each
//! chunk. Records are sent in arrival order; failed ones go back to the front of the queue so they
//! are retried before anything newer. A chunk is acknowledged to the source once every one of its
//! records was accepted (or dead-lettered), and its budget returns to the source then.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::entries::ShardMap;
use super::put::PutEdge;
use crate::config::DestinationGroup;
use crate::fanout::Delivery;
use crate::metrics::Metrics;
use crate::shutdown::Stopped;

pub use super::limiter::{BYTES_PER_SHARD, RECORDS_PER_SHARD};

/// Why a destination task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The service is stopping; unacknowledged records stay unacknowledged.
    Stopped(Stopped),
    /// The stream was deleted; everything it held was released.
    Deleted,
}

/// Everything a destination task needs, built by discovery.
pub struct DestinationTask {
    /// Its name in metrics and logs (the stream name, qualified by region or account only
    /// where two places have a stream of that name).
    pub name: Arc<str>,
    /// Its stream name, in its own account and region.
    pub stream: Arc<str>,
    /// Its stream ARN: how chunks and checkpoints know it.
    pub id: Arc<str>,
    pub source_stream: Arc<str>,
    /// Where PutRecords go (the Kinesis writer client; a fake in unit tests).
    pub edge: Arc<dyn PutEdge>,
    pub queue: mpsc::UnboundedReceiver<Delivery>,
    /// Open shard count, refreshed by discovery; `auto` rates follow it.
    pub open_shards: watch::Receiver<u32>,
    /// What the stream takes (its `MaxRecordSizeInKiB`), refreshed by discovery.
    pub limits: watch::Receiver<crate::record::StreamLimits>,
    /// The destination's shard hash ranges, for re-aggregation per shard.
    pub shard_map: watch::Receiver<Arc<ShardMap>>,
    /// This worker's share of the source's shards (1 alone): N workers together stay within
    /// the destination's limits.
    pub share: watch::Receiver<f64>,
    pub metrics: Arc<Metrics>,
    /// Discovery no longer sees the stream.
    pub removed: CancellationToken,
    /// The grace period is over: stop at once.
    pub stop: CancellationToken,
    /// Tells discovery that PutRecords found the stream gone (by stream ARN).
    pub gone: mpsc::UnboundedSender<Arc<str>>,
    /// Asks discovery for a new shard map (by stream ARN): an aggregate landed in another shard
    /// than it was built for.
    pub remap: mpsc::UnboundedSender<Arc<str>>,
    /// Wakes the writer from a rate-limiter or backoff wait when the destination was shed, so
    /// that it lets go of what it no longer owes at once.
    pub shed: Arc<tokio::sync::Notify>,
    /// Its group, as the configuration last loaded says it: a reload's changes apply from the
    /// next record the writer takes.
    pub assignment: watch::Receiver<Assignment>,
}

/// What a destination's group says, as the configuration last loaded says it. A reload replaces
/// it whole: the group's settings and the filters its index refers to always belong together.
#[derive(Clone)]
pub struct Assignment {
    pub group: Arc<DestinationGroup>,
    /// The group's index (`destinations[N]`) in this configuration and in `filters`.
    pub index: usize,
    pub filters: Option<Arc<crate::fanout::filter::Filters>>,
    /// What the group's dead-letter stream takes.
    pub dead_letter_limits: crate::record::StreamLimits,
}

impl Assignment {
    /// An assignment that never changes (a writer built outside the supervisor: tests, the
    /// simulation).
    pub fn fixed(group: Arc<DestinationGroup>, index: usize) -> watch::Receiver<Assignment> {
        let assignment =
            Assignment { group, index, filters: None, dead_letter_limits: crate::record::StreamLimits::default() };
        watch::channel(assignment).1
    }
}
