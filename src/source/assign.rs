//! Which shards this worker reads, and from where.
//!
//! An [`Assignments`] source tells the coordinator "shard acquired at position P" and "shard lost",
//! and records the end of a shard so that its children may follow. There are two:
//! - [`Plan`], a single worker with the file backend: every shard, parents before children;
//! - [`Leases`], the lease table, which shares the shards among the workers of a fleet.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::shards::{self, ShardInfo};
use super::{SourceError, list_shards};
use crate::checkpoint::{CheckpointError, Checkpointer};
use crate::health::Health;
use crate::lease::LeaseManager;
use crate::position::Position;
use crate::progress::{Checkpoints, DestinationPositions, Snapshot};

pub use crate::lease::DestinationSkips;
use crate::sink::retry::Backoff;

/// How often the shard list is read again even when no shard ended (a fallback for missed
/// ChildShards announcements).
const RELIST_INTERVAL: Duration = Duration::from_secs(30);

pub use crate::lease::Assignment;

/// Where assignments come from.
pub trait Assignments: Send {
    /// Waits for the next change. Cancel-safe: dropping the future loses no change.
    fn next(&mut self) -> impl Future<Output = Result<Assignment, SourceError>> + Send;

    /// `shard` was read to its end and every record of it acknowledged: record that durably, so
    /// that its children may be read.
    fn finished(&mut self, shard: &str) -> impl Future<Output = Result<(), SourceError>> + Send;
}

/// Where the shard list comes from: Kinesis, or a function (the fleet simulation; only in tests
/// and the benchmark).
#[derive(Clone)]
pub enum ShardList {
    Kinesis(aws_sdk_kinesis::Client),
    #[cfg(any(test, feature = "simulation"))]
    Simulated(Arc<dyn Fn() -> Vec<ShardInfo> + Send + Sync>),
}

impl ShardList {
    async fn list(&self, stream: &str) -> Result<Vec<ShardInfo>, SourceError> {
        match self {
            ShardList::Kinesis(control) => list_shards(control, stream).await,
            #[cfg(any(test, feature = "simulation"))]
            ShardList::Simulated(list) => Ok(list()),
        }
    }
}

/// Where the source's shards are listed, and what the shard list is read for.
pub struct Listing {
    pub shards: ShardList,
    pub stream: String,
    /// `source.initial_position`: where shards without a checkpoint start.
    pub initial: Position,
}

/// A single worker reads every shard, in the order [`shards::plan`] allows.
pub struct Plan {
    listing: Listing,
    checkpoints: Checkpoints,
    destinations: DestinationPositions,
    checkpointer: Checkpointer,
    health: Arc<Health>,
    /// Every shard started in this run, ended or not: none starts twice, and a child waits for a
    /// parent read here to end, whatever the initial position says about closed shards.
    started: HashSet<String>,
    ready: VecDeque<Assignment>,
    next_list: Instant,
    list_backoff: Backoff,
    announced_done: bool,
}

impl Plan {
    pub fn new(listing: Listing, stored: Snapshot, checkpointer: Checkpointer, health: Arc<Health>) -> Self {
        Plan {
            listing,
            checkpoints: stored.shards,
            destinations: stored.destinations,
            checkpointer,
            health,
            started: HashSet::new(),
            ready: VecDeque::new(),
            next_list: Instant::now(),
            list_backoff: Backoff::try_new(Duration::from_millis(500), RELIST_INTERVAL).expect("valid bounds"),
            announced_done: false,
        }
    }

    async fn list(&mut self) {
        match self.listing.shards.list(&self.listing.stream).await {
            Ok(shards) => {
                self.list_backoff.reset();
                let plan = shards::plan(&shards, &self.checkpoints, &self.listing.initial, &self.started);
                for (shard, position) in plan {
                    self.started.insert(shard.clone());
                    let destinations = self.destinations.remove(&shard).unwrap_or_default();
                    self.ready.push_back(Assignment::Acquired { shard, position, delay: Duration::ZERO, destinations });
                }
                self.health.shards_assigned();
                if shards::all_done(&shards, &self.checkpoints) && !self.announced_done {
                    tracing::warn!(stream = %self.listing.stream, "Every shard of the source is closed and fully copied; nothing more to read.");
                    self.announced_done = true;
                }
                self.next_list = Instant::now() + RELIST_INTERVAL;
            }
            Err(err) => {
                tracing::warn!(error = %crate::aws::chain(&err), "ListShards failed; trying again shortly.");
                self.next_list = Instant::now() + self.list_backoff.next_delay(&mut rand::rng());
            }
        }
    }
}

impl Assignments for Plan {
    async fn next(&mut self) -> Result<Assignment, SourceError> {
        loop {
            if let Some(assignment) = self.ready.pop_front() {
                return Ok(assignment);
            }
            tokio::time::sleep_until(self.next_list).await;
            self.list().await;
        }
    }

    /// Durable before any child starts: a restart must not read a child before its parent.
    async fn finished(&mut self, shard: &str) -> Result<(), SourceError> {
        self.checkpointer
            .finish(shard, &[])
            .await
            .map_err(|source| SourceError::Checkpoint { shard: shard.to_string(), source })?;
        self.checkpoints.insert(shard.to_string(), Position::ShardEnd);
        tracing::info!(shard = %shard, "Shard fully copied; starting its children.");
        self.next_list = Instant::now();
        Ok(())
    }
}

/// The lease table decides: shards come and go as this worker's leases do.
pub struct Leases {
    listing: Arc<Listing>,
    manager: Arc<LeaseManager>,
    events: mpsc::UnboundedReceiver<Assignment>,
    checkpointer: Checkpointer,
    next_list: Instant,
    /// The shard sync under way, if any: it runs beside the coordinator, so that a slow control
    /// plane or lease table (a stream of thousands of shards lists in several pages) never keeps
    /// the coordinator from hearing a lost lease, and is never cut short by it.
    syncing: Option<JoinHandle<Option<Vec<ShardInfo>>>>,
}

impl Leases {
    pub fn new(
        listing: Listing,
        manager: Arc<LeaseManager>,
        events: mpsc::UnboundedReceiver<Assignment>,
        checkpointer: Checkpointer,
        health: &Health,
    ) -> Self {
        health.shards_assigned();
        Leases {
            listing: Arc::new(listing),
            manager,
            events,
            checkpointer,
            next_list: Instant::now() + RELIST_INTERVAL,
            syncing: None,
        }
    }

    /// Starts a shard sync unless one runs: lists the shards and creates leases for those that
    /// have none (new children included); its result is the shards.
    fn start_sync(&mut self) {
        if self.syncing.is_some() {
            return;
        }
        let (listing, manager) = (Arc::clone(&self.listing), Arc::clone(&self.manager));
        self.syncing = Some(tokio::spawn(async move {
            let shards = match listing.shards.list(&listing.stream).await {
                Ok(shards) => shards,
                Err(err) => {
                    tracing::warn!(error = %crate::aws::chain(&err), "ListShards failed; trying again later.");
                    return None;
                }
            };
            if let Err(err) = manager.sync(&shards, &listing.initial).await {
                tracing::warn!(error = %err, "Creating leases failed; trying again later.");
            }
            Some(shards)
        }));
    }

    /// Waits up to `bound` for the sync under way; its shards if it ended.
    async fn synced(&mut self, bound: Duration) -> Option<Vec<ShardInfo>> {
        let running = self.syncing.as_mut()?;
        match tokio::time::timeout(bound, running).await {
            Ok(result) => {
                self.syncing = None;
                result.ok().flatten()
            }
            Err(_) => {
                tracing::warn!(waited = ?bound, "The shard sync is slow; it goes on beside the coordinator.");
                None
            }
        }
    }
}

impl Drop for Leases {
    fn drop(&mut self) {
        if let Some(running) = self.syncing.take() {
            running.abort();
        }
    }
}

impl Assignments for Leases {
    async fn next(&mut self) -> Result<Assignment, SourceError> {
        loop {
            let syncing = self.syncing.is_some();
            tokio::select! {
                biased;
                event = self.events.recv() => match event {
                    Some(Assignment::Acquired { shard, position, delay, destinations }) => {
                        if let Some(position) = starting_point(&position, &self.listing.initial) {
                            return Ok(Assignment::Acquired { shard, position, delay, destinations });
                        }
                    }
                    Some(lost) => return Ok(lost),
                    None => return Err(SourceError::Reader("the lease loop is gone".into())),
                },
                _ = async { self.syncing.as_mut().expect("running").await }, if syncing => {
                    self.syncing = None;
                }
                _ = tokio::time::sleep_until(self.next_list), if !syncing => {
                    self.next_list = Instant::now() + RELIST_INTERVAL;
                    self.start_sync();
                }
            }
        }
    }

    /// Through the lease, naming the children, so that any worker may take them. A failure is not
    /// fatal: whoever holds the lease next reads the shard's tail again. The coordinator waits
    /// half a renewal period for the shard sync and half a one for the end-of-shard checkpoint at
    /// most, so that it hears lost leases in time.
    async fn finished(&mut self, shard: &str) -> Result<(), SourceError> {
        // One listing serves both: leases for the children, and their names on the parent.
        let bound = self.manager.renew_interval() / 2;
        self.start_sync();
        let children: Vec<String> = match self.synced(bound).await {
            Some(shards) => shards.into_iter().filter(|s| s.parents.iter().any(|p| p == shard)).map(|s| s.id).collect(),
            None => Vec::new(),
        };
        let finished = tokio::time::timeout(bound, self.checkpointer.finish(shard, &children))
            .await
            .unwrap_or(Err(CheckpointError::TimedOut { waited: bound }));
        match finished {
            Ok(()) => tracing::info!(shard = %shard, ?children, "Shard fully copied; its children may start."),
            Err(err) => {
                tracing::warn!(shard = %shard, error = %err, "Could not record the end of the shard; whoever holds it next reads its tail again.")
            }
        }
        Ok(())
    }
}

/// Where a leased shard starts reading; `None` for a shard already read to its end. The KCL's
/// bare `AT_TIMESTAMP` sentinel (read as the epoch) takes the configured time.
fn starting_point(position: &Position, initial: &Position) -> Option<Position> {
    match position {
        Position::ShardEnd => None,
        Position::AtTimestamp(at) if *at == std::time::UNIX_EPOCH => Some(match initial {
            Position::AtTimestamp(_) => initial.clone(),
            _ => Position::TrimHorizon,
        }),
        other => Some(other.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::simulation::memory::{Faults, MemoryTable};

    /// A worker whose lease table stops answering must still hear about lost leases in time: the
    /// end of a shard (a shard sync and the end-of-shard checkpoint, both on the table) gives up
    /// after half a renewal period each instead of waiting out the table client's timeout.
    #[tokio::test(start_paused = true)]
    async fn the_end_of_a_shard_waits_on_an_unreachable_table_half_a_renewal_period_at_most() {
        let failover = Duration::from_secs(3);
        let faults = Faults { timeout: Duration::from_secs(5), ..Faults::default() };
        let table = MemoryTable::new(1, faults.clone());
        let (manager, events, _share) = LeaseManager::new(table.link("me"), "me".into(), failover);
        let parent = ShardInfo { id: "shard-0".into(), parents: vec![], closed: true, hash_range: None };
        let child =
            ShardInfo { id: "shard-1".into(), parents: vec!["shard-0".into()], closed: false, hash_range: None };
        let shards = vec![parent, child];
        manager.sync(&shards[..1], &Position::TrimHorizon).await.unwrap();
        manager.round().await;
        assert_eq!(manager.held().await, vec!["shard-0".to_string()]);

        let listed = shards.clone();
        let listing = Listing {
            shards: ShardList::Simulated(Arc::new(move || listed.clone())),
            stream: "source".into(),
            initial: Position::TrimHorizon,
        };
        let store = Arc::clone(&manager) as Arc<dyn crate::checkpoint::CheckpointStore>;
        let checkpointer = Checkpointer::new(store, Arc::new(Metrics::new()));
        let mut leases = Leases::new(listing, Arc::clone(&manager), events, checkpointer, &Health::default());
        table.set_faults(Faults { cut_off: ["me".to_string()].into(), ..faults });

        let started = Instant::now();
        leases.finished("shard-0").await.unwrap();
        let waited = started.elapsed();
        assert!(waited <= manager.renew_interval(), "the end of a shard held the coordinator for {waited:?}");
    }
}
