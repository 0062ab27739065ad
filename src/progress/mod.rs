//! Acknowledgement: which source records every destination has accepted.
//!
//! Records travel in [`Chunk`]s (one per SubscribeToShard event). A chunk counts the destinations
//! that still owe it; when the last one acknowledges, the chunk is done. Per shard,
//! [`ShardProgress`] keeps the chunks in read order, and the checkpoint is the last sequence number
//! of the longest run of done chunks from the front: nothing behind an undelivered record is ever
//! checkpointed.

mod detach;
mod positions;
mod shard;
mod shed;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::Notify;
use tokio::time::Instant;

pub use crate::position::{Checkpoints, DestinationPositions, Position, Snapshot};
use crate::record::{SequenceNumber, SourceRecord};
pub use detach::{Batch, CatchUp, Route};
pub use shed::Shed;

/// A run of records read from one shard, shared by every destination it is copied to.
#[derive(Debug)]
pub struct Chunk {
    /// Unique in the process, so destinations can key their bookkeeping by it.
    pub id: u64,
    pub shard: Arc<ShardProgress>,
    pub records: Vec<SourceRecord>,
    /// Sum of the records' sizes.
    pub bytes: usize,
    pub last: SequenceNumber,
    /// When the chunk was read: end-to-end latency is measured from here.
    pub read_at: Instant,
    /// Which groups take which records, decided by the first destination that asks
    /// (`fanout::filter`), when any group has a filter.
    pub routes: std::sync::OnceLock<crate::record::Routes>,
    /// Its share of the process's memory budget, returned when the last holder drops it.
    _memory: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Chunk {
    /// `destination` (its id) is done with the chunk (accepted, dead-lettered, or deleted).
    /// Returns true when that was the last destination: the chunk is now done everywhere.
    pub fn acknowledge(&self, destination: &str) -> bool {
        self.shard.acknowledge(self.id, destination)
    }

    /// Whether `destination` still owes the chunk: not when its reading was revoked, when the
    /// destination was shed from it (its catch-up brings the records again), or when it is done.
    pub fn owed_by(&self, destination: &str) -> bool {
        !self.shard.revoked() && self.shard.owes(self.id, destination)
    }
}

/// Read order and acknowledgement state of one source shard.
#[derive(Debug)]
pub struct ShardProgress {
    pub shard_id: Arc<str>,
    state: Mutex<ShardState>,
    /// Wakes whoever waits for the shard to drain (shard end, shutdown).
    drained: Notify,
    /// The lease of this reading was lost: its records are the new owner's to send, and
    /// destinations drop what they still hold of it.
    revoked: AtomicBool,
    /// A catch-up's lane given up because its destination was shed (revoked too).
    shed: AtomicBool,
    /// Revocations so far in the process (shared by every tracker), so a destination looks
    /// through its queue only when something was revoked.
    revocations: Arc<AtomicU64>,
    /// Whether this worker can prove now that it holds the shard's lease (none without a lease
    /// table): a destination sends the shard's records only then.
    proof: Option<Arc<dyn LeaseProof>>,
    /// Shards (of every tracker in the process) a request was given up on before its answer: it
    /// may still land, so their leases are left to expire rather than released.
    in_doubt: InDoubt,
}

type InDoubt = Arc<Mutex<BTreeSet<Arc<str>>>>;

/// Proof, by this process's own monotonic clock, that it still holds a shard's lease: the lease
/// table confirmed the hold recently enough that no other worker can have taken it yet.
pub trait LeaseProof: Send + Sync {
    fn proven(&self, shard: &str) -> bool;
}

impl std::fmt::Debug for dyn LeaseProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseProof")
    }
}

#[derive(Debug, Default)]
struct ShardState {
    /// Chunks handed to destinations and not yet done, oldest first.
    outstanding: VecDeque<Outstanding>,
    /// Highest sequence number below which every record is done.
    acknowledged: Option<SequenceNumber>,
    /// Where a reading from LATEST or a timestamp began, kept until something is acknowledged.
    anchor: Option<SequenceNumber>,
    /// The shard was read to its end and everything was acknowledged.
    ended: bool,
    /// The last record registered for the live feed: where a destination detached now would
    /// resume, and what a catch-up must reach to join the live feed again.
    last_registered: Option<SequenceNumber>,
    /// Where this reading started, for a destination detached before anything was registered.
    start: Option<Position>,
    /// Destinations the live feed no longer waits for on this shard, each with its catch-up.
    detached: BTreeMap<Arc<str>, detach::Hold>,
    /// Catch-ups that joined the live feed again and still owe records read before the seam.
    settling: Vec<(Arc<str>, detach::Hold)>,
    /// Every destination that was owed a chunk of this reading.
    seen: std::collections::BTreeSet<Arc<str>>,
    /// Destinations that already have the records up to here (their own checkpoint, ahead of
    /// the shard's): the live feed does not send them those again.
    skips: BTreeMap<Arc<str>, SequenceNumber>,
}

#[derive(Debug)]
struct Outstanding {
    id: u64,
    last: SequenceNumber,
    done: bool,
    /// How many records the chunk holds, and its share of the memory budget.
    records: usize,
    cost: usize,
    /// How many destinations acknowledged it so far: a destination that still owes a chunk
    /// another one finished is behind (taking a shed destination off it does not count).
    acked: usize,
    /// Source arrival of the chunk's first record (the lag an operator alerts on).
    arrival: Option<SystemTime>,
    /// Destinations (ids) that have not yet accepted every record of the chunk.
    owed: Vec<Arc<str>>,
}

/// Every shard's progress in this process.
#[derive(Debug, Default)]
pub struct Progress {
    shards: Mutex<HashMap<Arc<str>, Arc<ShardProgress>>>,
    next_chunk: AtomicU64,
    revocations: Arc<AtomicU64>,
    /// Set once when readings are fenced by a lease table.
    proof: std::sync::OnceLock<Arc<dyn LeaseProof>>,
    in_doubt: InDoubt,
}

impl Progress {
    fn shards(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<ShardProgress>>> {
        self.shards.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Readings of this process send only what `proof` says this worker holds.
    pub fn fence_with(&self, proof: Arc<dyn LeaseProof>) {
        let _ = self.proof.set(proof);
    }

    fn tracker(&self, id: &Arc<str>) -> Arc<ShardProgress> {
        Arc::new(ShardProgress::new(
            Arc::clone(id),
            Arc::clone(&self.revocations),
            self.proof.get().cloned(),
            Arc::clone(&self.in_doubt),
        ))
    }

    /// The tracker of a shard, created on first use.
    pub fn shard(&self, shard_id: &str) -> Arc<ShardProgress> {
        let mut shards = self.shards();
        if let Some(existing) = shards.get(shard_id) {
            return Arc::clone(existing);
        }
        let id: Arc<str> = shard_id.into();
        let tracker = self.tracker(&id);
        shards.insert(id, Arc::clone(&tracker));
        tracker
    }

    /// A fresh tracker for a shard read again from its stored checkpoint (a lease taken anew):
    /// an earlier reading, if any, is revoked and no longer holds it back.
    pub fn restart(&self, shard_id: &str) -> Arc<ShardProgress> {
        let id: Arc<str> = shard_id.into();
        let tracker = self.tracker(&id);
        let earlier = self.shards().insert(id, Arc::clone(&tracker));
        if let Some(earlier) = earlier {
            self.revoked(&earlier);
        }
        tracker
    }

    /// The lease of a shard was lost: its reading is forgotten here (no checkpoint, no drain
    /// waits for it), and destinations drop its records they have not sent yet.
    pub fn revoke(&self, shard_id: &str) {
        let earlier = self.shards().remove(shard_id);
        if let Some(earlier) = earlier {
            self.revoked(&earlier);
        }
    }

    fn revoked(&self, tracker: &ShardProgress) {
        detach::revoke_catch_ups(&tracker.state());
        if !tracker.revoked.swap(true, Ordering::AcqRel) {
            self.revocations.fetch_add(1, Ordering::AcqRel);
            tracker.drained.notify_waiters();
        }
    }

    /// A chunk id, unique in the process.
    pub fn next_id(&self) -> u64 {
        self.next_chunk.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a chunk of records of `shard`, owed by the destinations `owed`.
    pub fn begin(&self, shard: &Arc<ShardProgress>, records: Vec<SourceRecord>, owed: Vec<Arc<str>>) -> Arc<Chunk> {
        shard.begin(self.next_id(), records, owed)
    }

    pub fn all(&self) -> Vec<Arc<ShardProgress>> {
        self.shards().values().cloned().collect()
    }

    /// What may be checkpointed now: every shard that acknowledged something, ended, or has an
    /// anchored starting point.
    pub fn checkpoints(&self) -> Checkpoints {
        let mut out = BTreeMap::new();
        for shard in self.all() {
            let state = shard.state();
            if state.ended {
                out.insert(shard.shard_id.to_string(), Position::ShardEnd);
            } else if let Some(seq) = detach::floor(&state) {
                out.insert(shard.shard_id.to_string(), Position::Sequence(seq));
            } else if let Some(at) = &state.anchor {
                out.insert(shard.shard_id.to_string(), Position::At(at.clone()));
            }
        }
        out
    }

    /// Chunks not yet done, over all shards.
    pub fn outstanding(&self) -> usize {
        self.all().iter().map(|s| s.outstanding()).sum()
    }

    /// Shards whose records may still be on their way: chunks not done by the live feed or by a
    /// catch-up (what [`Progress::drained`] waits for), or a request given up before its answer.
    pub fn unsettled(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .all()
            .into_iter()
            .filter(|s| !s.revoked() && (s.outstanding() > 0 || !detach::settled(&s.state(), false)))
            .map(|s| s.shard_id.to_string())
            .collect();
        out.extend(self.in_doubt.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|s| s.to_string()));
        out
    }

    /// Waits until every shard has drained.
    pub async fn drained(&self) {
        for shard in self.all() {
            shard.drained().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// Destinations d0, d1, ... owing a chunk.
    fn owed(n: usize) -> Vec<Arc<str>> {
        (0..n).map(|i| Arc::from(format!("d{i}"))).collect()
    }

    /// One-byte records with these sequence numbers (shared by the progress tests).
    pub(super) fn records(seqs: &[u64]) -> Vec<SourceRecord> {
        seqs.iter()
            .map(|s| SourceRecord {
                sequence_number: SequenceNumber::parse(&s.to_string()).unwrap(),
                partition_key: "k".into(),
                data: Bytes::from_static(b"x"),
                arrival: None,
                user_records: None,
            })
            .collect()
    }

    #[test]
    fn checkpoint_waits_for_the_oldest_chunk() {
        let progress = Progress::default();
        let shard = progress.shard("shardId-0");
        let first = progress.begin(&shard, records(&[1, 2]), owed(2));
        let second = progress.begin(&shard, records(&[3]), owed(2));
        second.acknowledge("d0");
        second.acknowledge("d1");
        assert_eq!(shard.acknowledged(), None, "the first chunk still owes two destinations");
        first.acknowledge("d0");
        assert_eq!(shard.acknowledged(), None);
        first.acknowledge("d1");
        assert_eq!(shard.acknowledged().unwrap().as_str(), "3");
        assert_eq!(shard.outstanding(), 0);
    }

    #[test]
    fn a_shard_is_unsettled_while_records_of_it_may_still_land() {
        let progress = Progress::default();
        let (a, b, c) = (progress.shard("a"), progress.shard("b"), progress.shard("c"));
        let _waiting = progress.begin(&a, records(&[1]), owed(1));
        progress.begin(&b, records(&[2]), owed(1)).acknowledge("d0");
        progress.begin(&c, records(&[3]), owed(1)).acknowledge("d0");
        // Done for every destination, but a request with its records was given up before its
        // answer (a shed destination's writer stopped at teardown): it may still land.
        c.mark_in_doubt();
        let _lost = progress.begin(&progress.shard("d"), records(&[4]), owed(1));
        progress.revoke("d");
        assert_eq!(progress.unsettled(), BTreeSet::from(["a".to_string(), "c".to_string()]));
    }

    #[test]
    fn checkpoints_report_ended_shards() {
        let progress = Progress::default();
        let a = progress.shard("a");
        let chunk = progress.begin(&a, records(&[5]), owed(1));
        chunk.acknowledge("d0");
        a.mark_ended();
        let b = progress.shard("b");
        let _pending = progress.begin(&b, records(&[9]), owed(1));
        let checkpoints = progress.checkpoints();
        assert_eq!(checkpoints.get("a"), Some(&Position::ShardEnd));
        assert_eq!(checkpoints.get("b"), None);
    }

    #[tokio::test]
    async fn drained_resolves_when_the_last_chunk_completes() {
        let progress = Arc::new(Progress::default());
        let shard = progress.shard("s");
        let chunk = progress.begin(&shard, records(&[1]), owed(1));
        let waiter = tokio::spawn({
            let shard = Arc::clone(&shard);
            async move { shard.drained().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        chunk.acknowledge("d0");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
    }
}
