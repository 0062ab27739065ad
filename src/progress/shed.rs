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
    /// Adds to `held`, per destination, the bytes of the memory budget it holds on this shard
    /// that some other destination is done with: its live chunks another destination finished,
    /// and its catch-up's chunks.
    pub fn lagging(&self, held: &mut BTreeMap<Arc<str>, usize>) {
        let state = self.state();
        for chunk in state.outstanding.iter().filter(|o| !o.done && o.owed.len() < o.owed_at_start) {
            for destination in &chunk.owed {
                *held.entry(Arc::clone(destination)).or_default() += chunk.cost;
            }
        }
        let holds = state.detached.iter().chain(state.settling.iter().map(|(d, h)| (d, h)));
        for (destination, hold) in holds {
            *held.entry(Arc::clone(destination)).or_default() += hold.held();
        }
    }

    /// Takes `destination` off everything it owes on this shard and detaches it at its own
    /// position. Returns where a new catch-up starts; `None` when it holds nothing here, when it
    /// is backfilling here (a backfill reads only while there is room, so it never holds the
    /// readers back), or when its running catch-up restarts by itself.
    pub fn shed(self: &Arc<Self>, destination: &Arc<str>) -> Option<Position> {
        let mut state = self.state();
        if self.revoked() || backfilling(&state, destination) {
            return None;
        }
        let owes_live = state.outstanding.iter().any(|o| !o.done && o.owed.contains(destination));
        let holds = state.detached.contains_key(destination) || state.settling.iter().any(|(d, _)| d == destination);
        if !owes_live && !holds {
            return None;
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
        (!running).then_some(start)
    }
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
        assert_eq!(shard.shed(&slow), Some(Position::Sequence(seq(2))), "its catch-up reads after 2");
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
        assert_eq!(shard.shed(&slow), None, "its running catch-up restarts");
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
}
