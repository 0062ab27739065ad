//! One shard's acknowledgements: its chunks in read order, what each destination still owes,
//! and the checkpoint that follows from them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Chunk, InDoubt, LeaseProof, Outstanding, ShardProgress, ShardState, detach};
use crate::position::Position;
use crate::record::{SequenceNumber, SourceRecord};

impl ShardProgress {
    pub(super) fn new(
        shard_id: Arc<str>,
        revocations: Arc<AtomicU64>,
        proof: Option<Arc<dyn LeaseProof>>,
        in_doubt: InDoubt,
    ) -> Self {
        ShardProgress {
            proof,
            in_doubt,
            shard_id,
            state: Mutex::new(ShardState::default()),
            drained: Notify::new(),
            revoked: AtomicBool::new(false),
            shed: AtomicBool::new(false),
            revocations,
        }
    }

    /// A request carrying records of this shard was given up before its answer (the service
    /// stops, a destination was shed or removed): it may still land.
    pub fn mark_in_doubt(&self) {
        self.in_doubt.lock().unwrap_or_else(|p| p.into_inner()).insert(Arc::clone(&self.shard_id));
    }

    /// Whether this worker can prove now that it holds the shard's lease (always, without a
    /// lease table). Not proven is not lost: the lease may be confirmed again, or be revoked.
    pub fn proven(&self) -> bool {
        self.proof.as_ref().is_none_or(|proof| proof.proven(&self.shard_id))
    }

    /// Whether this reading's lease was lost.
    pub fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// Whether this is a catch-up's lane given up because its destination was shed.
    pub fn was_shed(&self) -> bool {
        self.shed.load(Ordering::Acquire)
    }

    /// How many readings were revoked in this process so far.
    pub fn revocations(&self) -> u64 {
        self.revocations.load(Ordering::Acquire)
    }

    pub(super) fn state(&self) -> MutexGuard<'_, ShardState> {
        // A panic while holding this lock cannot leave the queue half-updated in a way that loses
        // records (the worst is a stale checkpoint), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers records read from this shard, owed by the destinations `owed` (by id).
    pub fn begin(self: &Arc<Self>, id: u64, records: Vec<SourceRecord>, owed: Vec<Arc<str>>) -> Arc<Chunk> {
        let mut state = self.state();
        self.register(&mut state, id, records, owed, None)
    }

    pub(super) fn register(
        self: &Arc<Self>,
        state: &mut ShardState,
        id: u64,
        records: Vec<SourceRecord>,
        owed: Vec<Arc<str>>,
        memory: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Arc<Chunk> {
        let last = records.last().expect("a chunk holds at least one record").sequence_number.clone();
        let bytes = records.iter().map(SourceRecord::size).sum();
        let arrival = records.first().and_then(|r| r.arrival);
        let nobody = owed.is_empty();
        state.seen.extend(owed.iter().cloned());
        detach::count_missed(state, &owed, records.len());
        let cost = memory.as_ref().map_or(0, |m| m.num_permits());
        state.outstanding.push_back(Outstanding {
            id,
            last: last.clone(),
            done: false,
            records: records.len(),
            cost,
            acked: 0,
            arrival,
            owed,
        });
        state.last_registered = Some(last.clone());
        let chunk = Arc::new(Chunk {
            id,
            shard: Arc::clone(self),
            records,
            bytes,
            last,
            read_at: Instant::now(),
            routes: std::sync::OnceLock::new(),
            _memory: memory,
        });
        if nobody {
            Self::complete_in(state, id);
        }
        chunk
    }

    pub(super) fn owes(&self, id: u64, destination: &str) -> bool {
        let state = self.state();
        let Ok(index) = state.outstanding.binary_search_by_key(&id, |o| o.id) else { return false };
        state.outstanding[index].owed.iter().any(|d| &**d == destination)
    }

    /// `destination` is done with chunk `id`; true when nobody owes it any more.
    pub(super) fn acknowledge(&self, id: u64, destination: &str) -> bool {
        let mut state = self.state();
        let Ok(index) = state.outstanding.binary_search_by_key(&id, |o| o.id) else { return false };
        let entry = &mut state.outstanding[index];
        let before = entry.owed.len();
        entry.owed.retain(|d| &**d != destination);
        if entry.owed.len() == before {
            return false;
        }
        entry.acked += 1;
        if !entry.owed.is_empty() {
            return false;
        }
        let empty = Self::complete_in(&mut state, id);
        drop(state);
        if empty {
            self.drained.notify_waiters();
        }
        true
    }

    /// Marks a chunk done; returns whether nothing is outstanding any more.
    pub(super) fn complete_in(state: &mut ShardState, id: u64) -> bool {
        if let Ok(index) = state.outstanding.binary_search_by_key(&id, |o| o.id) {
            state.outstanding[index].done = true;
        }
        while state.outstanding.front().is_some_and(|o| o.done) {
            let done = state.outstanding.pop_front().expect("front exists");
            state.acknowledged = Some(done.last);
        }
        state.outstanding.is_empty()
    }

    /// The checkpoint this shard may write now: below it, every destination has every record,
    /// detached ones included.
    pub fn acknowledged(&self) -> Option<SequenceNumber> {
        detach::floor(&self.state())
    }

    /// Number of chunks not yet done.
    pub fn outstanding(&self) -> usize {
        self.state().outstanding.len()
    }

    /// Arrival time of the oldest record not yet accepted everywhere, when known.
    pub fn oldest_unacknowledged_arrival(&self) -> Option<SystemTime> {
        self.state().outstanding.front().and_then(|o| o.arrival)
    }

    /// Waits until every chunk handed on so far is done, by the live feed and by every catch-up.
    pub async fn drained(&self) {
        self.wait_until(|state| detach::settled(state, false)).await
    }

    /// Waits until every destination has every record read so far: drained, and every catch-up
    /// has reached the live feed (the end of a shard).
    pub async fn complete_everywhere(&self) {
        self.wait_until(|state| detach::settled(state, true)).await
    }

    pub(super) async fn wait_until(&self, catch_ups_done: impl Fn(&ShardState) -> bool) {
        loop {
            let notified = self.drained.notified();
            // A revoked reading is nobody's to wait for any more.
            if self.revoked() || (self.outstanding() == 0 && catch_ups_done(&self.state())) {
                return;
            }
            // Catch-ups complete chunks on their own trackers: look again now and then.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(100), notified).await;
        }
    }

    /// Where this reading started (for a destination detached before anything was registered).
    pub fn set_start(&self, start: Position) {
        self.state().start = Some(start);
    }

    /// Where a reading from LATEST or a timestamp began: the checkpoint until a record is
    /// acknowledged.
    pub fn anchor(&self, at: SequenceNumber) {
        self.state().anchor = Some(at);
    }

    /// Marks the shard as read to its end, with everything acknowledged.
    pub fn mark_ended(&self) {
        self.state().ended = true;
    }

    pub fn ended(&self) -> bool {
        self.state().ended
    }
}
