//! Shedding: when the process's memory budget runs short, the destination that the others left
//! furthest behind gives back everything it holds, instead of the readers stopping for everyone.
//!
//! On each shard it is shed from, the destination is taken off every live chunk it still owes
//! (they complete for the others at once, and return their memory), its catch-up's chunks are
//! dropped, and it is detached at its own position: a catch-up reads again, from there, what it
//! had not accepted yet. Records of a request in flight when it was shed may land twice
//! (at-least-once: at most what it had queued).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::detach::{Hold, resume_from};
use super::positions::own_position;
use super::{Position, ShardProgress, ShardState};

impl ShardProgress {
    /// Adds to `held`, per destination, the bytes of the memory budget that shedding it here
    /// would give back and that another destination is already done with: its live chunks some
    /// other destination acknowledged. (Catch-ups' chunks are not counted: a destination's
    /// catch-ups read only while it has little queued and a quarter of the budget is free, so
    /// they never hold the live feed back; shedding them would only read them again.)
    pub fn lagging(&self, held: &mut BTreeMap<Arc<str>, usize>) {
        let state = self.state();
        for chunk in state.outstanding.iter().filter(|o| !o.done && o.acked > 0) {
            for destination in chunk.owed.iter().filter(|d| !backfilling(&state, d)) {
                *held.entry(Arc::clone(destination)).or_default() += chunk.cost;
            }
        }
    }

    /// Takes `destination` off everything it owes on this shard and detaches it at its own
    /// position. Nothing is done where it owes nothing live, or where it is backfilling (a
    /// backfill reads only while there is room, so it never holds the readers back).
    pub fn shed(self: &Arc<Self>, destination: &Arc<str>) -> Shed {
        let mut state = self.state();
        if self.revoked() || backfilling(&state, destination) {
            return Shed::Nothing;
        }
        if !state.outstanding.iter().any(|o| !o.done && o.owed.contains(destination)) {
            return Shed::Nothing;
        }
        let seam = own_position(&state, destination);
        let mut missed = 0u64;
        let mut done = Vec::new();
        for chunk in state.outstanding.iter_mut().filter(|o| !o.done) {
            if let Some(at) = chunk.owed.iter().position(|d| d == destination) {
                chunk.owed.remove(at);
                missed += chunk.records as u64;
                if chunk.owed.is_empty() {
                    done.push(chunk.id);
                }
            }
        }
        for id in done {
            Self::complete_in(&mut state, id);
        }
        let earlier = state.detached.remove(destination);
        let running = earlier.as_ref().is_some_and(|h| !h.caught_up());
        for hold in earlier.iter().chain(state.settling.iter().filter(|(d, _)| d == destination).map(|(_, h)| h)) {
            missed += hold.pending() + hold.unaccepted();
            hold.revoke();
        }
        state.settling.retain(|(d, _)| d != destination);
        let start = resume_from(&state, seam.as_ref());
        let mut hold = Hold::new(self, seam, false);
        hold.missed = missed;
        hold.restart = running;
        state.detached.insert(Arc::clone(destination), hold);
        drop(state);
        // Destinations look through their queues for what they no longer owe.
        self.revocations.fetch_add(1, Ordering::AcqRel);
        self.drained.notify_waiters();
        if running { Shed::Restarted } else { Shed::CatchUpFrom(start) }
    }
}

/// What shedding a destination did on one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shed {
    /// It owed nothing live here (or backfills here): nothing changed.
    Nothing,
    /// It let go; its running catch-up reads again from its own position.
    Restarted,
    /// It let go; a new catch-up reads from here.
    CatchUpFrom(Position),
}

/// Whether `destination` backfills on this shard (or still settles a backfill).
fn backfilling(state: &ShardState, destination: &Arc<str>) -> bool {
    state.detached.get(destination).is_some_and(Hold::backfill)
        || state.settling.iter().any(|(d, h)| d == destination && h.backfill() && !h.settled())
}

#[cfg(test)]
mod tests {
    use super::super::{CatchUp, Progress};
    use super::*;
    use crate::progress::Batch;
    use crate::progress::tests::records;
    use crate::record::SequenceNumber;

    fn seq(n: u64) -> SequenceNumber {
        SequenceNumber::parse(&n.to_string()).unwrap()
    }

    #[tokio::test]
    async fn a_shed_destination_lets_go_of_its_chunks_and_reads_again_from_its_own_position() {
        let progress = Progress::default();
        let shard = progress.shard("s");
        let memory = crate::memory::MemoryBudget::new(1_000);
        let (fast, slow): (Arc<str>, Arc<str>) = ("fast".into(), "slow".into());
        let both = || vec![fast.clone(), slow.clone()];
        let (first, _) =
            shard.begin_live(progress.next_id(), records(&[1, 2]), both(), Some(memory.reserve(100).await));
        let (second, _) =
            shard.begin_live(progress.next_id(), records(&[3, 4]), both(), Some(memory.reserve(200).await));
        let (third, _) = shard.begin_live(progress.next_id(), records(&[5]), both(), Some(memory.reserve(300).await));
        first.acknowledge("fast");
        first.acknowledge("slow");
        second.acknowledge("fast");
        third.acknowledge("fast");
        let mut held = BTreeMap::new();
        shard.lagging(&mut held);
        assert_eq!(held.get(&slow), Some(&500), "the slow one alone holds chunks 2 and 3");
        assert_eq!(held.get(&fast), None);
        assert_eq!(shard.acknowledged(), Some(seq(2)));

        // Shed: its chunks complete for the fast one, and their memory returns.
        assert_eq!(shard.shed(&slow), Shed::CatchUpFrom(Position::Sequence(seq(2))), "its catch-up reads after 2");
        assert!(!second.owed_by("slow") && !third.owed_by("slow"));
        drop((first, second, third));
        assert_eq!(memory.used(), 0, "nothing is held for the shed destination");
        assert!(shard.is_detached("slow"));
        assert_eq!(shard.acknowledged(), Some(seq(2)), "the checkpoint waits at the shed destination's position");
        assert_eq!(shard.destination_positions().get("fast"), Some(&seq(5)));

        // Its catch-up brings 3-5 again, and it joins.
        let mut sent = Vec::new();
        let batch = Batch { records: records(&[3, 4, 5]), shard_end: false, memory: None };
        assert_eq!(
            shard.catch_up("slow", batch, progress.next_id(), true, |c| sent.push(c)),
            CatchUp::Joined { expired: 0 }
        );
        sent[0].acknowledge("slow");
        assert_eq!(shard.acknowledged(), Some(seq(5)));
    }

    #[test]
    fn shedding_a_detached_destination_restarts_its_catch_up_from_what_it_accepted() {
        let progress = Progress::default();
        let shard = progress.shard("s");
        let (fast, slow): (Arc<str>, Arc<str>) = ("fast".into(), "slow".into());
        let (first, _) = shard.begin_live(progress.next_id(), records(&[1, 2]), vec![fast.clone(), slow.clone()], None);
        first.acknowledge("fast");
        assert!(shard.detach(&slow).is_some(), "detached with 1-2 still queued");
        let (live, _) = shard.begin_live(progress.next_id(), records(&[3, 4]), vec![fast.clone()], None);
        live.acknowledge("fast");
        let mut sent = Vec::new();
        let batch = Batch { records: records(&[3]), shard_end: false, memory: None };
        assert_eq!(
            shard.catch_up("slow", batch, progress.next_id(), true, |c| sent.push(c)),
            CatchUp::Behind(Some(seq(3)))
        );

        // Shed: the queued live chunk and the catch-up's chunk are given up; it accepted nothing.
        assert_eq!(shard.shed(&slow), Shed::Restarted, "its running catch-up restarts");
        assert_eq!(shard.shed(&slow), Shed::Nothing, "nothing left to let go of");
        assert!(!first.owed_by("slow"));
        assert!(!sent[0].owed_by("slow"), "the catch-up's chunk is dropped too");
        assert_eq!(shard.acknowledged(), None, "it has nothing of this reading");
        let batch = Batch { records: records(&[4]), shard_end: false, memory: None };
        let outcome = shard.catch_up("slow", batch, progress.next_id(), true, |c| sent.push(c));
        assert_eq!(outcome, CatchUp::Restart(Position::TrimHorizon), "the batch read after 3 is not handed on");
        assert_eq!(sent.len(), 1);
        let batch = Batch { records: records(&[1, 2, 3, 4]), shard_end: false, memory: None };
        let outcome = shard.catch_up("slow", batch, progress.next_id(), true, |c| sent.push(c));
        assert_eq!(outcome, CatchUp::Joined { expired: 0 }, "every record it missed was read again");
        let again: Vec<&str> = sent[1].records.iter().map(|r| r.sequence_number.as_str()).collect();
        assert_eq!(again, ["1", "2", "3", "4"]);
    }

    #[tokio::test]
    async fn only_what_another_destination_acknowledged_counts_and_never_a_backfill() {
        let progress = Progress::default();
        let shard = progress.shard("s");
        let memory = crate::memory::MemoryBudget::new(10_000);
        let (a, b, slow): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "slow".into());
        let all = || vec![a.clone(), b.clone(), slow.clone()];
        let (first, _) = shard.begin_live(progress.next_id(), records(&[1]), all(), Some(memory.reserve(100).await));
        let (second, _) = shard.begin_live(progress.next_id(), records(&[2]), all(), Some(memory.reserve(200).await));
        first.acknowledge("a");
        // Shed before anyone finished the second chunk: the others owing it are not behind.
        assert!(matches!(shard.shed(&slow), Shed::CatchUpFrom(_)));
        let mut held = BTreeMap::new();
        shard.lagging(&mut held);
        assert_eq!(held.get(&b), Some(&100), "b owes only the chunk a finished");
        assert_eq!(held.get(&a), None);
        drop(second);

        // A backfill settling on this shard owes live chunks, but is never shed: not counted.
        let new: Arc<str> = "new".into();
        shard.set_skips(&BTreeMap::from([("a".to_string(), seq(1))]));
        assert!(shard.introduce(&new, &Position::TrimHorizon, true).is_some());
        let batch = Batch { records: records(&[1, 2]), shard_end: false, memory: None };
        let mut lane = Vec::new();
        assert_eq!(
            shard.catch_up("new", batch, progress.next_id(), true, |c| lane.push(c)),
            CatchUp::Joined { expired: 0 }
        );
        let (third, joined) = shard.begin_live(progress.next_id(), records(&[3]), vec![a.clone()], None);
        assert_eq!(joined, vec![new.clone()]);
        third.acknowledge("a");
        let mut held = BTreeMap::new();
        shard.lagging(&mut held);
        assert_eq!(held.get(&new), None, "a settling backfill is not a candidate");
        assert_eq!(shard.shed(&new), Shed::Nothing);
    }
}
