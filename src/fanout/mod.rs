//! Fan-out: every chunk read from the source goes to every destination known at that moment.
//!
//! Each destination has a queue and a byte budget (`max_in_flight_bytes`, see [`handle`]); a
//! chunk takes budget before it is queued. One destination never holds the live feed back (with
//! a `detach_after`; with `detach_after = "off"` the live feed waits for its budget instead:
//! backpressure, as in a single pipeline). The rule, stated once:
//!
//! - a destination whose budget is full still gets chunks, over its budget (an overdraft), up to
//!   [`OVERDRAFT_FACTOR`] times its budget in all;
//! - a shard's live feed detaches it when its queued bytes (overdraft included) have stayed over
//!   its budget for `detach_after`; at the overdraft bound the live feed waits for its room, but
//!   only until then; it then catches up on its own (`source::catchup`);
//! - when the process's memory budget runs short, the destination holding the most of it that
//!   another destination is already done with is shed: it lets go of everything it holds and
//!   catches up from its own position ([`relief`]), rather than stop the readers for everyone.

mod handle;
pub mod relief;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio_util::sync::CancellationToken;

pub mod filter;

pub use handle::{Closed, Delivery, DestinationHandle, Share};
pub use relief::Relief;

use crate::memory::MemoryBudget;
use crate::position::Position;
use crate::progress::{Progress, Route, ShardProgress};
use crate::record::SourceRecord;
use crate::shutdown::Stopped;

/// A destination holds at most this many times its budget, overdraft included, before the live
/// feed detaches it.
pub const OVERDRAFT_FACTOR: usize = 2;

/// Starts a catch-up for a destination the live feed of `shard` stopped waiting for: it reads
/// from `start` until it reaches the live feed.
pub trait CatchUpStarter: Send + Sync + std::fmt::Debug {
    fn start(&self, shard: Arc<ShardProgress>, destination: DestinationHandle, start: Position);
}

/// What one record queued for one destination costs beside the record itself: the size of the
/// destination writer's entry (`sink::entries::Pending`, whose test keeps them equal). Defined
/// here, where the budget is counted, so that the fan-out does not reach into the sink.
pub const QUEUED_ENTRY_BYTES: usize = 168;

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
    /// Without one, the live feed waits for every destination however long it takes.
    catch_up: Option<Arc<dyn CatchUpStarter>>,
    /// The process's budget of buffered bytes.
    memory: MemoryBudget,
}

impl Fanout {
    pub fn new(destinations: watch::Receiver<DestinationSet>, progress: Arc<Progress>) -> Self {
        Fanout { destinations, progress, catch_up: None, memory: MemoryBudget::default() }
    }

    /// Destinations with a `detach_after` are detached when their budget stays full that long,
    /// and caught up by `starter`.
    pub fn with_catch_up(mut self, starter: Arc<dyn CatchUpStarter>) -> Self {
        self.catch_up = Some(starter);
        self
    }

    /// Everything read counts against `memory`.
    pub fn with_memory(mut self, memory: MemoryBudget) -> Self {
        self.memory = memory;
        self
    }

    /// What records cost against the memory budget: their own footprint, and an entry in the
    /// send queue of every destination for each of them (or for each user record of an aggregate).
    fn cost(&self, records: &[SourceRecord]) -> usize {
        let destinations = self.destinations.borrow().len().max(1);
        let entries: usize = records.iter().map(|r| r.user_records.as_ref().map_or(1, |u| u.len().max(1))).sum();
        records.iter().map(SourceRecord::footprint).sum::<usize>() + entries * destinations * QUEUED_ENTRY_BYTES
    }

    /// The process's memory budget, which everything read counts against.
    pub fn memory(&self) -> &MemoryBudget {
        &self.memory
    }

    /// Queues `records` for every current destination, in chunks small enough that a budget holds
    /// several of them, waiting on full budgets (backpressure) and while no destination exists at
    /// all (records are never acknowledged to nobody).
    ///
    /// `reserved` is what the event was given of the memory budget when it arrived (see
    /// `source::metered`); without it the event's share is reserved here.
    pub async fn deliver(
        &mut self,
        shard: &Arc<ShardProgress>,
        mut records: Vec<SourceRecord>,
        reserved: Option<OwnedSemaphorePermit>,
        cancel: &CancellationToken,
    ) -> Result<(), Stopped> {
        // The whole event counts against the process's memory budget from here; each chunk
        // keeps its share until every destination is done with it.
        let event_bytes = self.cost(&records);
        let mut memory = match reserved {
            // Decoding is over: keep what the records need (or what was reserved, if less).
            Some(mut memory) => {
                drop(memory.split(memory.num_permits().saturating_sub(event_bytes)));
                memory
            }
            None => tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Stopped),
                memory = self.memory.reserve(event_bytes) => memory,
            },
        };
        while !records.is_empty() {
            let take = shard.skip_boundary(&records, chunk_len(&records));
            // Drained, not split off: a chunk split off the front would keep the capacity of the
            // whole rest of the event (quadratic memory for an event of 10,000 records).
            let chunk: Vec<SourceRecord> = records.drain(..take).collect();
            let bytes: usize = chunk.iter().map(SourceRecord::size).sum();
            let cost = self.cost(&chunk);
            // The last chunk takes what is left (all of it when the event was larger than the budget).
            let share = if records.is_empty() { memory.num_permits() } else { cost.min(memory.num_permits()) };
            self.deliver_chunk(shard, chunk, bytes, memory.split(share), cancel).await?;
        }
        Ok(())
    }

    async fn deliver_chunk(
        &mut self,
        shard: &Arc<ShardProgress>,
        records: Vec<SourceRecord>,
        bytes: usize,
        memory: Option<OwnedSemaphorePermit>,
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
        let last = records.last().expect("a chunk holds at least one record").sequence_number.clone();
        let mut permits = Vec::with_capacity(set.len());
        for destination in set.iter() {
            match shard.route(&destination.id, &last, &destination.start, destination.appeared_while_running) {
                Route::Live => {}
                Route::Skip => continue,
                Route::Backfill(from) => {
                    let why = "Destination is new to this shard; backfilling it from its start_position while the live feed goes on.";
                    if self.start_catch_up(shard, destination, from, why) {
                        continue;
                    }
                }
            }
            let Some(detach_after) = destination.detach_after.filter(|_| self.catch_up.is_some()) else {
                // Backpressure: the live feed waits for room, however long it takes.
                let acquired = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Err(Stopped),
                    permit = destination.reserve(bytes) => permit,
                };
                // A closed budget: the destination went away while we waited, and owes nothing.
                if let Ok(permit) = acquired {
                    permits.push((destination, permit));
                }
                continue;
            };
            // The live feed does not wait for one destination: a full one still gets the chunk, over
            // its budget, until it has held more than its budget for `detach_after`; then it is
            // detached and catches up alone.
            if destination.over_budget_for() >= detach_after {
                self.detach(shard, destination);
                continue;
            }
            let bound = destination.budget().saturating_mul(OVERDRAFT_FACTOR);
            let share = match destination.try_reserve(bytes) {
                Ok(None) => destination.overdraft_within(bytes, bound),
                other => other,
            };
            match share {
                Ok(Some(share)) => permits.push((destination, share)),
                // It holds the most it may: the live feed waits for its room, but only until it
                // has been over its budget for `detach_after` (a burst does not detach a healthy
                // destination; a slow one holds the others back that long at most).
                Ok(None) => {
                    let left = detach_after.saturating_sub(destination.over_budget_for());
                    let room = tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return Err(Stopped),
                        permit = destination.reserve(bytes) => Some(permit),
                        _ = tokio::time::sleep(left) => None,
                    };
                    match room {
                        Some(Ok(permit)) => permits.push((destination, permit)),
                        Some(Err(Closed)) => {}
                        None => self.detach(shard, destination),
                    }
                }
                Err(Closed) => {}
            }
        }
        let owed = permits.iter().map(|(d, _)| Arc::clone(&d.id)).collect();
        let (chunk, joined) = shard.begin_live(self.progress.next_id(), records, owed, memory);
        let sent: Vec<Arc<str>> = permits.iter().map(|(d, _)| Arc::clone(&d.id)).collect();
        for (destination, permit) in permits {
            destination.send(Delivery { chunk: Arc::clone(&chunk), permit });
        }
        // A destination that joins with this chunk and was routed to it already (it was shed and
        // caught up again meanwhile) gets it once.
        for id in joined.into_iter().filter(|id| !sent.contains(id)) {
            let permit = set.iter().find(|d| d.id == id).map(|d| (d, d.reserve_now(bytes)));
            match permit {
                Some((destination, Ok(permit))) => {
                    tracing::info!(destination = %destination.name, shard = %shard.shard_id, "Destination caught up; it follows the live feed again.");
                    destination.send(Delivery { chunk: Arc::clone(&chunk), permit });
                }
                _ => {
                    chunk.acknowledge(&id);
                }
            }
        }
        Ok(())
    }
}

impl Fanout {
    /// Destinations that appeared since this shard last looked start their backfill now, even
    /// while the shard is idle (called on every subscription event).
    pub fn introduce_new(&mut self, shard: &Arc<ShardProgress>) {
        if !self.destinations.has_changed().unwrap_or(false) {
            return;
        }
        let set = self.destinations.borrow_and_update().clone();
        for destination in set.iter() {
            if let Some(from) = shard.introduce(&destination.id, &destination.start, destination.appeared_while_running)
            {
                let why = "Destination is new to this shard; backfilling it from its start_position.";
                let _ = self.start_catch_up(shard, destination, from, why);
            }
        }
    }

    fn detach(&self, shard: &Arc<ShardProgress>, destination: &DestinationHandle) {
        if self.catch_up.is_none() {
            return;
        }
        if let Some(start) = shard.detach(&destination.id) {
            let why = "Destination's buffer stayed full; the others go on without it, and it catches up on its own.";
            let _ = self.start_catch_up(shard, destination, start, why);
        }
    }

    /// Starts a catch-up; false when there is no way to (no starter): the destination stays live.
    fn start_catch_up(
        &self,
        shard: &Arc<ShardProgress>,
        destination: &DestinationHandle,
        from: Position,
        why: &str,
    ) -> bool {
        let Some(starter) = &self.catch_up else {
            shard.forget(&destination.id);
            return false;
        };
        tracing::warn!(destination = %destination.name, shard = %shard.shard_id, %from, "{why}");
        starter.start(Arc::clone(shard), destination.clone(), from);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::mpsc::UnboundedReceiver;

    use super::*;
    use crate::record::SequenceNumber;

    fn records(n: u64) -> Vec<SourceRecord> {
        (1..=n)
            .map(|seq| SourceRecord {
                sequence_number: SequenceNumber::parse(&seq.to_string()).unwrap(),
                partition_key: "key".into(),
                data: bytes::Bytes::from_static(&[7; 100]),
                arrival: None,
                user_records: None,
            })
            .collect()
    }

    /// Records `from..from+n` of 1,000 bytes each.
    fn event(from: u64, n: u64) -> Vec<SourceRecord> {
        (from..from + n)
            .map(|seq| SourceRecord {
                sequence_number: SequenceNumber::parse(&seq.to_string()).unwrap(),
                partition_key: format!("key-{}", seq % 7),
                data: bytes::Bytes::from(vec![7; 1_000]),
                arrival: None,
                user_records: None,
            })
            .collect()
    }

    /// Remembers the catch-ups it was asked to start.
    #[derive(Debug, Default)]
    struct Starts(std::sync::Mutex<Vec<(String, String)>>);

    impl CatchUpStarter for Starts {
        fn start(&self, shard: Arc<ShardProgress>, destination: DestinationHandle, _start: Position) {
            self.0.lock().unwrap().push((shard.shard_id.to_string(), destination.name.to_string()));
        }
    }

    impl Starts {
        fn of(&self, name: &str) -> usize {
            self.0.lock().unwrap().iter().filter(|(_, d)| d == name).count()
        }
    }

    fn destination(
        name: &str,
        budget: u64,
        detach_after: Duration,
    ) -> (DestinationHandle, UnboundedReceiver<Delivery>) {
        let (mut handle, queue) = DestinationHandle::new(name.into(), format!("arn:{name}").into(), budget);
        handle.detach_after = Some(detach_after);
        (handle, queue)
    }

    /// Takes up to `n` deliveries off a queue, acknowledging them as written.
    fn drain(queue: &mut UnboundedReceiver<Delivery>, id: &str, n: usize) {
        for _ in 0..n {
            let Ok(delivery) = queue.try_recv() else { return };
            delivery.chunk.acknowledge(id);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_destination_that_still_drains_is_detached_and_its_overdraft_is_bounded() {
        let (fast, mut fast_queue) = destination("fast", 64 << 10, Duration::from_secs(2));
        let (slow, mut slow_queue) = destination("slow", 64 << 10, Duration::from_secs(2));
        let (_set, destinations) = watch::channel(Arc::new(vec![fast, slow.clone()]));
        let progress = Arc::new(Progress::default());
        let starts = Arc::new(Starts::default());
        let mut fanout = Fanout::new(destinations, Arc::clone(&progress))
            .with_catch_up(Arc::clone(&starts) as Arc<dyn CatchUpStarter>)
            .with_memory(MemoryBudget::new(64 << 20));
        let shard = progress.shard("s");
        let cancel = CancellationToken::new();
        // 100 KB/s read; the fast destination writes everything, the slow one a third of it:
        // it frees budget every 300 ms, but its queue only grows.
        let mut peak = 0;
        let mut detached_at = None;
        for tick in 0..100u64 {
            fanout.deliver(&shard, event(tick * 10 + 1, 10), None, &cancel).await.unwrap();
            drain(&mut fast_queue, "arn:fast", usize::MAX);
            if tick % 3 == 0 {
                drain(&mut slow_queue, "arn:slow", 1);
            }
            peak = peak.max(slow.queued());
            if detached_at.is_none() && starts.of("slow") > 0 {
                detached_at = Some(tick);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let detached_at = detached_at.expect("the slow destination is detached although it drains now and then");
        assert!(detached_at <= 40, "detached after {detached_at} ticks: over its budget from about tick 7, plus 2 s");
        assert!(peak <= 2 * (64 << 10) + 10_000, "its queue stays within twice its budget: {peak} bytes");
        assert_eq!(starts.of("fast"), 0, "the fast destination follows the live feed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusing_destination_is_shed_when_memory_runs_short_before_its_detach_after() {
        let memory = MemoryBudget::new(200_000);
        let (ok, mut ok_queue) = destination("ok", 32 << 20, Duration::from_secs(600));
        let (broken, mut broken_queue) = destination("broken", 32 << 20, Duration::from_secs(600));
        let (_set, destinations) = watch::channel(Arc::new(vec![broken.clone(), ok]));
        let progress = Arc::new(Progress::default());
        let starts = Arc::new(Starts::default());
        let catch_up = Arc::clone(&starts) as Arc<dyn CatchUpStarter>;
        let relief = Relief::new(
            destinations.clone(),
            Arc::clone(&progress),
            Arc::clone(&catch_up),
            Arc::new(crate::metrics::Metrics::new()),
        );
        memory.on_short(Arc::new(move |used| {
            relief.relieve(used);
        }));
        let mut fanout =
            Fanout::new(destinations, Arc::clone(&progress)).with_catch_up(catch_up).with_memory(memory.clone());
        // The broken destination's writer: it writes nothing, and lets go of what it was shed from.
        let shed = broken.shed_signal();
        let writer = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                shed.notified().await;
                while let Ok(delivery) = broken_queue.try_recv() {
                    held.push(delivery);
                }
                held.retain(|d: &Delivery| d.chunk.owed_by("arn:broken"));
            }
        });
        let shard = progress.shard("s");
        let cancel = CancellationToken::new();
        // 2 MB read through a 200 KB budget: ten times what memory holds.
        let read = async {
            for n in 0..100u64 {
                fanout.deliver(&shard, event(n * 20 + 1, 20), None, &cancel).await.unwrap();
                drain(&mut ok_queue, "arn:ok", usize::MAX);
            }
        };
        tokio::time::timeout(Duration::from_secs(120), read)
            .await
            .expect("the readers never stop for the broken destination");
        assert!(starts.of("broken") > 0, "it was shed and catches up on its own");
        assert!(memory.used() <= 200_000);
        writer.abort();
    }

    #[tokio::test]
    async fn a_large_event_is_chunked_without_keeping_the_rest_of_it_and_counted_whole() {
        let (destination, mut queue) = DestinationHandle::new("d".into(), "arn:d".into(), 64 << 20);
        let (_set, destinations) = watch::channel(Arc::new(vec![destination]));
        let progress = Arc::new(Progress::default());
        let memory = MemoryBudget::new(256 << 20);
        let mut fanout = Fanout::new(destinations, Arc::clone(&progress)).with_memory(memory.clone());
        let shard = progress.shard("s");
        let event = records(10_000);
        let footprint: usize = event.iter().map(SourceRecord::footprint).sum::<usize>() + 10_000 * QUEUED_ENTRY_BYTES;
        fanout.deliver(&shard, event, None, &CancellationToken::new()).await.unwrap();

        let mut chunks = Vec::new();
        while let Ok(delivery) = queue.try_recv() {
            chunks.push(delivery);
        }
        let delivered: usize = chunks.iter().map(|d| d.chunk.records.len()).sum();
        assert_eq!(delivered, 10_000);
        assert!(chunks.len() > 1, "the event is cut into chunks");
        let slots: usize = chunks.iter().map(|d| d.chunk.records.capacity()).sum();
        assert!(slots <= 10_000 + chunks.len(), "chunks keep {slots} record slots for 10,000 records");
        assert_eq!(memory.used(), footprint as u64, "the event counts with its records' own fields and queue entries");
        assert!(footprint > 10_000 * 103, "the footprint counts more than data and key");
        drop(chunks);
        assert_eq!(memory.used(), 0, "every chunk returns its share");
    }
}
