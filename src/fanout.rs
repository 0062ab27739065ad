//! Fan-out: every chunk read from the source goes to every destination known at that moment.
//!
//! Each destination has an unbounded queue whose size is bounded by a byte budget (a semaphore of
//! `max_in_flight_bytes` permits). The source takes permits before queueing, so a slow destination
//! pauses the source instead of growing memory: backpressure without a second buffer.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::progress::{Chunk, Progress, ShardProgress};
use crate::record::SourceRecord;
use crate::shutdown::Stopped;

/// A chunk queued for one destination, with the share of that destination's budget it holds.
#[derive(Debug)]
pub struct Delivery {
    pub chunk: Arc<Chunk>,
    /// Returned to the budget when the destination is done with the chunk.
    pub permit: OwnedSemaphorePermit,
}

/// The side of a destination that the source sees.
#[derive(Debug, Clone)]
pub struct DestinationHandle {
    pub name: Arc<str>,
    queue: mpsc::UnboundedSender<Delivery>,
    /// Bytes queued or in flight for this destination; closed when the destination goes away so
    /// that a source waiting on it moves on.
    budget: Arc<Semaphore>,
    max_permits: u32,
}

impl DestinationHandle {
    /// A handle and the receiving end of its queue.
    pub fn new(name: Arc<str>, max_in_flight_bytes: u64) -> (Self, mpsc::UnboundedReceiver<Delivery>) {
        let max_permits = u32::try_from(max_in_flight_bytes)
            .unwrap_or(u32::MAX)
            .min(u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX));
        let (queue, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(max_permits as usize));
        (DestinationHandle { name, queue, budget, max_permits }, rx)
    }

    /// Stops accepting chunks: waiting sources give up on this destination.
    pub fn close(&self) {
        self.budget.close();
    }
}

/// A chunk holds at most this many records or bytes (a SubscribeToShard event can hold far more).
pub const MAX_CHUNK_RECORDS: usize = 500;
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// How many leading records form the next chunk (at least one).
pub fn chunk_len(records: &[SourceRecord]) -> usize {
    let mut bytes = 0;
    let mut count = 0;
    for record in records.iter().take(MAX_CHUNK_RECORDS) {
        bytes += record.size();
        if count > 0 && bytes > MAX_CHUNK_BYTES {
            break;
        }
        count += 1;
    }
    count.max(usize::from(!records.is_empty()))
}

/// The destinations in force now, sorted by name (the order every reader takes budgets in).
pub type DestinationSet = Arc<Vec<DestinationHandle>>;

/// The source's entry into fan-out.
#[derive(Debug, Clone)]
pub struct Fanout {
    destinations: watch::Receiver<DestinationSet>,
    progress: Arc<Progress>,
}

impl Fanout {
    pub fn new(destinations: watch::Receiver<DestinationSet>, progress: Arc<Progress>) -> Self {
        Fanout { destinations, progress }
    }

    /// Queues `records` for every current destination, in chunks small enough that a budget holds
    /// several of them, waiting on full budgets (backpressure) and while no destination exists at
    /// all (records are never acknowledged to nobody).
    pub async fn deliver(
        &mut self,
        shard: &Arc<ShardProgress>,
        mut records: Vec<SourceRecord>,
        cancel: &CancellationToken,
    ) -> Result<(), Stopped> {
        while !records.is_empty() {
            let take = chunk_len(&records);
            let rest = records.split_off(take);
            self.deliver_chunk(shard, records, cancel).await?;
            records = rest;
        }
        Ok(())
    }

    async fn deliver_chunk(
        &mut self,
        shard: &Arc<ShardProgress>,
        records: Vec<SourceRecord>,
        cancel: &CancellationToken,
    ) -> Result<(), Stopped> {
        let set = loop {
            let set = self.destinations.borrow_and_update().clone();
            if !set.is_empty() {
                break set;
            }
            tracing::warn!(shard = %shard.shard_id, "No destination stream matches the pattern yet; reading is paused.");
            tokio::select! {
                _ = cancel.cancelled() => return Err(Stopped),
                changed = self.destinations.changed() => if changed.is_err() { return Err(Stopped) },
            }
        };
        // Budget first, everywhere, and only then register and queue: a reader cancelled while it
        // waits leaves no chunk that some destinations have and others never will (it would hold
        // the drain for the whole grace period, and the checkpoint before records already written).
        // Every reader takes budgets in the same order (by name), so readers holding one budget
        // while waiting for the next cannot wait on each other.
        let bytes: usize = records.iter().map(SourceRecord::size).sum();
        let wanted = u32::try_from(bytes).unwrap_or(u32::MAX).max(1);
        let mut permits = Vec::with_capacity(set.len());
        for destination in set.iter() {
            let acquired = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Stopped),
                permit = Arc::clone(&destination.budget).acquire_many_owned(wanted.min(destination.max_permits)) => permit,
            };
            // A closed budget: the destination went away while we waited, and owes nothing.
            if let Ok(permit) = acquired {
                permits.push((destination, permit));
            }
        }
        let chunk = self.progress.begin(shard, records, permits.len());
        for (destination, permit) in permits {
            if destination.queue.send(Delivery { chunk: Arc::clone(&chunk), permit }).is_err() {
                chunk.acknowledge();
            }
        }
        Ok(())
    }
}
