//! The side of a destination that the source sees: its queue, and its byte budget
//! (`max_in_flight_bytes`).
//!
//! A chunk takes budget before it is queued. When the budget is full, the live feed still queues
//! chunks over it (an overdraft) for a while rather than wait for one destination; what the
//! destination holds, overdraft included, is its `queued` total, and the detach rule looks at
//! that (see `Fanout`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

use crate::position::Position;
use crate::progress::Chunk;

/// A chunk queued for one destination, with the share of that destination's budget it holds.
#[derive(Debug)]
pub struct Delivery {
    pub chunk: Arc<Chunk>,
    /// Returned to the budget when the destination is done with the chunk.
    pub permit: Share,
}

/// A chunk's place in one destination's budget: the permits it took (none when it was queued
/// over the budget) and its bytes in the destination's queued total, both given back on drop.
#[derive(Debug)]
pub struct Share {
    _permit: OwnedSemaphorePermit,
    bytes: usize,
    load: Arc<Load>,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.load.remove(self.bytes);
    }
}

/// Bytes queued for a destination, overdraft included, and since when they have been over its
/// budget.
#[derive(Debug)]
struct Load {
    max: usize,
    state: Mutex<(usize, Option<Instant>)>,
}

impl Load {
    fn state(&self) -> std::sync::MutexGuard<'_, (usize, Option<Instant>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, bytes: usize) {
        self.add_within(bytes, usize::MAX);
    }

    /// Adds `bytes` if the total stays within `bound` (or nothing is queued); says whether it did.
    fn add_within(&self, bytes: usize, bound: usize) -> bool {
        let mut state = self.state();
        if state.0 > 0 && state.0.saturating_add(bytes) > bound {
            return false;
        }
        state.0 += bytes;
        if state.0 > self.max {
            state.1.get_or_insert_with(Instant::now);
        }
        true
    }

    fn remove(&self, bytes: usize) {
        let mut state = self.state();
        state.0 = state.0.saturating_sub(bytes);
        if state.0 <= self.max {
            state.1 = None;
        }
    }
}

/// The side of a destination that the source sees.
#[derive(Debug, Clone)]
pub struct DestinationHandle {
    pub name: Arc<str>,
    /// The destination's identity in progress and checkpoints: its stream ARN.
    pub id: Arc<str>,
    queue: mpsc::UnboundedSender<Delivery>,
    /// Bytes queued or in flight for this destination within its budget; closed when the
    /// destination goes away so that a source waiting on it moves on.
    budget: Arc<Semaphore>,
    max_permits: u32,
    /// Everything queued for it, overdraft included.
    load: Arc<Load>,
    /// Wakes its writer from a wait when it was shed, so that it lets go of what it holds.
    shed: Arc<Notify>,
    /// How long its queued bytes may stay over its budget before a shard's live feed detaches
    /// it (`None`: the live feed waits for its budget as long as it takes).
    pub detach_after: Option<Duration>,
    /// Where it starts on a shard new to it (`Latest`: with the live feed; else a backfill).
    pub start: Position,
    /// It appeared while the service runs (not in the first discovery round).
    pub appeared_while_running: bool,
}

/// The destination went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl DestinationHandle {
    /// A handle and the receiving end of its queue.
    pub fn new(name: Arc<str>, id: Arc<str>, max_in_flight_bytes: u64) -> (Self, mpsc::UnboundedReceiver<Delivery>) {
        let max_permits = u32::try_from(max_in_flight_bytes)
            .unwrap_or(u32::MAX)
            .min(u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX));
        let (queue, rx) = mpsc::unbounded_channel();
        let handle = DestinationHandle {
            name,
            id,
            queue,
            budget: Arc::new(Semaphore::new(max_permits as usize)),
            max_permits,
            load: Arc::new(Load { max: max_permits as usize, state: Mutex::default() }),
            shed: Arc::default(),
            detach_after: None,
            start: Position::Latest,
            appeared_while_running: false,
        };
        (handle, rx)
    }

    /// Stops accepting chunks: waiting sources give up on this destination.
    pub fn close(&self) {
        self.budget.close();
    }

    /// Permits for `bytes`: at least one, at most the whole budget.
    fn permits_for(&self, bytes: usize) -> u32 {
        u32::try_from(bytes).unwrap_or(u32::MAX).clamp(1, self.max_permits)
    }

    fn share(&self, permit: OwnedSemaphorePermit, bytes: usize) -> Share {
        self.load.add(bytes);
        Share { _permit: permit, bytes, load: Arc::clone(&self.load) }
    }

    /// Waits for `bytes` of budget (at most the whole budget).
    pub async fn reserve(&self, bytes: usize) -> Result<Share, Closed> {
        let permit = Arc::clone(&self.budget).acquire_many_owned(self.permits_for(bytes)).await.map_err(|_| Closed)?;
        Ok(self.share(permit, bytes))
    }

    /// Budget for `bytes` if it is free now; `None` when the budget is full.
    pub fn try_reserve(&self, bytes: usize) -> Result<Option<Share>, Closed> {
        match Arc::clone(&self.budget).try_acquire_many_owned(self.permits_for(bytes)) {
            Ok(permit) => Ok(Some(self.share(permit, bytes))),
            Err(tokio::sync::TryAcquireError::NoPermits) => Ok(None),
            Err(tokio::sync::TryAcquireError::Closed) => Err(Closed),
        }
    }

    /// A share for `bytes` queued over the budget, if the queued total stays within `bound`
    /// (checked and added at once, so readers of several shards cannot pass it together).
    pub fn overdraft_within(&self, bytes: usize, bound: usize) -> Result<Option<Share>, Closed> {
        let permit = Arc::clone(&self.budget).try_acquire_many_owned(0).map_err(|_| Closed)?;
        if !self.load.add_within(bytes, bound) {
            return Ok(None);
        }
        Ok(Some(Share { _permit: permit, bytes, load: Arc::clone(&self.load) }))
    }

    /// Budget for a chunk that must go now (a destination joining the live feed again, a
    /// catch-up's page): what is free of `bytes`, possibly nothing; the rest is overdraft.
    pub fn reserve_now(&self, bytes: usize) -> Result<Share, Closed> {
        let free = u32::try_from(self.budget.available_permits()).unwrap_or(u32::MAX);
        let permit =
            Arc::clone(&self.budget).try_acquire_many_owned(self.permits_for(bytes).min(free)).map_err(|_| Closed)?;
        Ok(self.share(permit, bytes))
    }

    /// The destination went away.
    pub fn closed(&self) -> bool {
        self.budget.is_closed()
    }

    /// Its budget, `max_in_flight_bytes`.
    pub fn budget(&self) -> usize {
        self.max_permits as usize
    }

    /// Bytes queued for it now, overdraft included.
    pub fn queued(&self) -> usize {
        self.load.state().0
    }

    /// How long its queued bytes have stayed over its budget.
    pub fn over_budget_for(&self) -> Duration {
        self.load.state().1.map(|since| since.elapsed()).unwrap_or_default()
    }

    /// Whether at most half its budget is queued: a catch-up reads, and joins the live feed,
    /// only then.
    pub fn has_room(&self) -> bool {
        self.queued() * 2 <= self.budget()
    }

    /// Queues a chunk; a destination gone meanwhile owes nothing of it.
    pub fn send(&self, delivery: Delivery) {
        if let Err(returned) = self.queue.send(delivery) {
            returned.0.chunk.acknowledge(&self.id);
        }
    }

    /// What wakes its writer when it was shed.
    pub fn shed_signal(&self) -> Arc<Notify> {
        Arc::clone(&self.shed)
    }

    /// Tells its writer to let go of the chunks it no longer owes.
    pub fn notify_shed(&self) {
        self.shed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn queued_bytes_count_the_overdraft_and_the_clock_runs_only_while_over_the_budget() {
        let (handle, _queue) = DestinationHandle::new("d".into(), "arn:d".into(), 1_000);
        let within = handle.try_reserve(800).unwrap().expect("free");
        assert!(handle.try_reserve(400).unwrap().is_none(), "only 200 free");
        let over = handle.overdraft_within(400, 2_000).unwrap().expect("within twice the budget");
        assert!(handle.overdraft_within(900, 2_000).unwrap().is_none(), "past twice the budget");
        assert_eq!(handle.queued(), 1_200);
        assert!(!handle.has_room());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(handle.over_budget_for(), Duration::from_secs(3));
        drop(within);
        assert_eq!(handle.queued(), 400);
        assert_eq!(handle.over_budget_for(), Duration::ZERO, "back within its budget: the clock stops");
        assert!(handle.has_room());
        drop(over);
        assert_eq!(handle.queued(), 0);
    }
}
