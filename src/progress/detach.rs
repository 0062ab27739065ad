//! Detached destinations: when a destination's budget stays full for longer than its
//! `detach_after`, the live feed of a shard stops waiting for it. The destination then owes the
//! records from the seam (the last record registered for it) on, and a catch-up reads them on its
//! own, into a tracker of its own (a lane). Once the catch-up has handed on everything the live
//! feed registered, the destination joins the live feed again at the next chunk: no gap, since the
//! seam check and the registration of live chunks take the same lock, and no duplicate, since the
//! catch-up hands on nothing past the live feed's last record.
//!
//! The shard's checkpoint stays the lowest position over every destination: the live feed's done
//! prefix, and each catch-up's own done prefix (or its seam while it has acknowledged nothing).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Chunk, Position, ShardProgress, ShardState};
use crate::record::{SequenceNumber, SourceRecord};

/// One detached destination on one shard.
#[derive(Debug)]
pub(super) struct Hold {
    /// The last record registered for the destination before it was detached (`None`: nothing
    /// was); the catch-up starts after it.
    seam: Option<SequenceNumber>,
    /// The catch-up's chunks.
    lane: Arc<ShardProgress>,
    /// The catch-up has handed on everything the live feed registered: the next live chunk is
    /// the destination's again.
    caught_up: bool,
    /// A backfill: the destination starts before this reading did (`start_position`, or a
    /// backfill resumed after a restart). It does not hold the shard's checkpoint back, which
    /// never moves backwards; its own position is stored beside it.
    backfill: bool,
    /// Records the live feed registered without it since it was detached, and records its
    /// catch-up handed on: what is missing when it joins expired before it could be read.
    missed: u64,
    handed: u64,
}

impl Hold {
    /// A hold of `shard`'s reading with a fresh lane for its catch-up's chunks.
    fn new(shard: &ShardProgress, seam: Option<SequenceNumber>, backfill: bool) -> Self {
        let lane = Arc::new(ShardProgress::new(Arc::clone(&shard.shard_id), Arc::clone(&shard.revocations)));
        Hold { seam, lane, caught_up: false, backfill, missed: 0, handed: 0 }
    }

    /// Below this, the destination has every record.
    pub(super) fn floor(&self) -> Option<SequenceNumber> {
        self.lane.state().acknowledged.clone().or_else(|| self.seam.clone())
    }

    pub(super) fn settled(&self) -> bool {
        self.lane.outstanding() == 0
    }
}

/// How the live feed treats a destination for a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Owed by it.
    Live,
    /// Not owed: it has these records already, or its catch-up brings them.
    Skip,
    /// New to the shard and starting before the reading: not owed; a backfill from this
    /// position brings them.
    Backfill(Position),
}

/// A catch-up's read: records after its last one, in order.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<SourceRecord>,
    /// It read everything the shard holds now.
    pub at_tip: bool,
    /// The batch's share of the process's memory budget.
    pub memory: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What a catch-up learns after handing on a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatchUp {
    /// Still behind the live feed; read on after this record (`None`: nothing handed on yet).
    Behind(Option<SequenceNumber>),
    /// Everything the live feed registered is handed on: the destination is live again from the
    /// next chunk on, and the catch-up ends. `expired`: records the live feed registered while it
    /// was detached that the catch-up never found (they left the stream's retention first).
    Joined { expired: u64 },
    /// The destination is no longer detached here (removed, or the reading revoked).
    Gone,
}

/// The lowest position every destination has reached, `None` while some destination has
/// acknowledged nothing since the reading began.
pub(super) fn floor(state: &ShardState) -> Option<SequenceNumber> {
    let mut floor = state.acknowledged.clone()?;
    let holds = state.detached.values().chain(state.settling.iter().map(|(_, h)| h).filter(|h| !h.settled()));
    for hold in holds.filter(|h| !h.backfill) {
        floor = floor.min(hold.floor()?);
    }
    Some(floor)
}

/// No catch-up of the shard has anything outstanding; with `joined`, every one has also reached
/// the live feed.
pub(super) fn settled(state: &ShardState, joined: bool) -> bool {
    state.detached.values().all(|h| (h.caught_up || !joined) && h.settled())
        && state.settling.iter().all(|(_, h)| h.settled())
}

/// A live chunk of `records` records is registered for `owed`: every destination detached (and
/// not backfilling) misses it, and its catch-up must bring it.
pub(super) fn count_missed(state: &mut ShardState, owed: &[Arc<str>], records: usize) {
    for (destination, hold) in state.detached.iter_mut() {
        if !hold.backfill && !hold.caught_up && !owed.contains(destination) {
            hold.missed += records as u64;
        }
    }
}

/// The reading was revoked: so are its catch-ups' chunks.
pub(super) fn revoke_catch_ups(state: &ShardState) {
    for hold in state.detached.values().chain(state.settling.iter().map(|(_, h)| h)) {
        hold.lane.revoked.store(true, Ordering::Release);
    }
}

impl ShardProgress {
    /// Stops waiting for `destination` on this shard. Returns where its catch-up starts, or `None`
    /// when it is detached already.
    pub fn detach(self: &Arc<Self>, destination: &Arc<str>) -> Option<Position> {
        let mut state = self.state();
        if state.detached.contains_key(destination) {
            return None;
        }
        let seam = state.last_registered.clone();
        let start = match (&seam, &state.anchor) {
            (Some(seq), _) => Position::Sequence(seq.clone()),
            (None, Some(at)) => Position::At(at.clone()),
            (None, None) => state.start.clone().unwrap_or(Position::TrimHorizon),
        };
        state.detached.insert(Arc::clone(destination), Hold::new(self, seam, false));
        Some(start)
    }

    /// How the live feed treats `destination` for a chunk ending at `last`. `wanted`: where the
    /// destination starts when it is new to the shard (its group's `start_position`); `new`: it
    /// appeared while the service runs.
    pub fn route(&self, destination: &Arc<str>, last: &SequenceNumber, wanted: &Position, new: bool) -> Route {
        let mut state = self.state();
        if state.detached.contains_key(destination) {
            return Route::Skip;
        }
        if super::positions::has_through(&state, destination, last) {
            return Route::Skip;
        }
        if state.seen.contains(destination) {
            return Route::Live;
        }
        match self.backfill(&mut state, destination, wanted, new) {
            Some(start) => Route::Backfill(start),
            None => Route::Live,
        }
    }

    /// A destination that just appeared, on a shard that may be idle: where its backfill starts,
    /// if it needs one (see [`Self::route`]).
    pub fn introduce(&self, destination: &Arc<str>, wanted: &Position, new: bool) -> Option<Position> {
        let mut state = self.state();
        if state.detached.contains_key(destination) || state.seen.contains(destination) {
            return None;
        }
        self.backfill(&mut state, destination, wanted, new)
    }

    /// Starts a backfill of `destination` when it starts before this reading: new to the shard
    /// with a `start_position` other than latest, or a backfill cut short by a restart.
    fn backfill(
        &self,
        state: &mut ShardState,
        destination: &Arc<str>,
        wanted: &Position,
        new: bool,
    ) -> Option<Position> {
        let reading_start = match &state.start {
            Some(Position::Sequence(s) | Position::At(s)) => Some(s.clone()),
            _ => None,
        };
        let start = match state.skips.get(destination) {
            // A backfill cut short by a restart: on from where it got to.
            Some(skip) if reading_start.as_ref().is_some_and(|r| skip < r) => Position::Sequence(skip.clone()),
            Some(_) => return None,
            // New here: when other destinations have stored positions and this one has none, it
            // was added since; so was one discovered while running.
            None if *wanted != Position::Latest && (new || !state.skips.is_empty()) => {
                // A reading from the trim horizon that has handed nothing on brings it all anyway.
                if state.last_registered.is_none() && state.start == Some(Position::TrimHorizon) {
                    return None;
                }
                wanted.clone()
            }
            None => return None,
        };
        state.detached.insert(Arc::clone(destination), Hold::new(self, None, true));
        Some(start)
    }

    /// Whether the live feed skips `destination` on this shard (detached here).
    pub fn is_detached(&self, destination: &str) -> bool {
        self.state().detached.contains_key(destination)
    }

    /// The destination went away: it owes nothing here any more.
    pub fn forget(&self, destination: &str) {
        self.state().detached.remove(destination);
    }

    /// Registers a live chunk owed by `owed`, plus every caught-up destination, which joins the
    /// live feed with this chunk. Returns the chunk and the destinations that joined.
    pub fn begin_live(
        self: &Arc<Self>,
        id: u64,
        records: Vec<SourceRecord>,
        mut owed: Vec<Arc<str>>,
        memory: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> (Arc<Chunk>, Vec<Arc<str>>) {
        let mut state = self.state();
        state.settling.retain(|(_, h)| !h.settled());
        let joined: Vec<Arc<str>> =
            state.detached.iter().filter(|(_, h)| h.caught_up).map(|(name, _)| Arc::clone(name)).collect();
        for name in &joined {
            if let Some(hold) = state.detached.remove(name) {
                state.settling.push((Arc::clone(name), hold));
            }
        }
        owed.extend(joined.iter().cloned());
        let chunk = self.register(&mut state, id, records, owed, memory);
        (chunk, joined)
    }

    /// A catch-up of `destination` read `records` (after its last one, in order). Hands on, as
    /// chunk `id` of its lane through `send`, those the live feed has registered already; the
    /// rest the live feed brings. `room`: the destination's buffer has room to join the live feed.
    /// `at_tip`: the catch-up read everything the shard holds.
    pub fn catch_up(
        &self,
        destination: &str,
        batch: Batch,
        id: u64,
        room: bool,
        send: impl FnOnce(Arc<Chunk>),
    ) -> CatchUp {
        let Batch { records, at_tip, memory } = batch;
        let mut state = self.state();
        if self.revoked() {
            return CatchUp::Gone;
        }
        let live = state.last_registered.clone();
        let Some(hold) = state.detached.get_mut(destination) else { return CatchUp::Gone };
        let owed: Vec<SourceRecord> =
            records.into_iter().filter(|r| live.as_ref().is_some_and(|l| r.sequence_number <= *l)).collect();
        let last = owed.last().map(|r| r.sequence_number.clone());
        if !owed.is_empty() {
            hold.handed += owed.len() as u64;
            let mut lane = hold.lane.state();
            let chunk = hold.lane.register(&mut lane, id, owed, vec![Arc::from(destination)], memory);
            drop(lane);
            send(chunk);
        }
        let reached = last.clone().or_else(|| hold.lane.state().last_registered.clone()).or_else(|| hold.seam.clone());
        // The catch-up handed on up to the live feed, or read everything there is; for a detached
        // destination, also when nothing was registered live since the seam.
        let mut caught_up = at_tip || (reached.is_some() && reached >= live);
        if !hold.backfill {
            caught_up |= live.is_none() || live == hold.seam;
        }
        if caught_up && room {
            hold.caught_up = true;
            let expired = if hold.backfill { 0 } else { hold.missed.saturating_sub(hold.handed) };
            return CatchUp::Joined { expired };
        }
        CatchUp::Behind(reached)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Progress;
    use super::*;
    use crate::progress::tests::records;

    fn batch(records: Vec<SourceRecord>) -> Batch {
        Batch { records, at_tip: false, memory: None }
    }

    fn seq(n: u64) -> Option<SequenceNumber> {
        Some(SequenceNumber::parse(&n.to_string()).unwrap())
    }

    #[test]
    fn a_detached_destination_holds_the_checkpoint_at_its_own_position_until_it_catches_up() {
        let progress = Progress::default();
        let shard = progress.shard("s");
        let slow: Arc<str> = "slow".into();
        // Both destinations have records 1-2.
        let fast: Arc<str> = "fast".into();
        let (first, _) = shard.begin_live(progress.next_id(), records(&[1, 2]), vec![fast.clone(), slow.clone()], None);
        first.acknowledge("fast");
        first.acknowledge("slow");
        assert_eq!(shard.acknowledged(), seq(2));
        // The slow one is detached: the live feed goes on with the other one alone.
        assert_eq!(shard.detach(&slow), Some(Position::Sequence(SequenceNumber::parse("2").unwrap())));
        assert_eq!(shard.detach(&slow), None, "detached once");
        let (live, joined) = shard.begin_live(progress.next_id(), records(&[3, 4]), vec![fast.clone()], None);
        assert!(joined.is_empty());
        live.acknowledge("fast");
        assert_eq!(shard.acknowledged(), seq(2), "the slow destination has only up to 2");

        // Its catch-up reads 3-6, but only 3-4 are registered live: it hands on those, and joins.
        let mut sent = Vec::new();
        let outcome = shard.catch_up("slow", batch(records(&[3, 4, 5, 6])), progress.next_id(), true, |c| sent.push(c));
        assert_eq!(outcome, CatchUp::Joined { expired: 0 });
        assert_eq!(sent.len(), 1);
        let seqs: Vec<&str> = sent[0].records.iter().map(|r| r.sequence_number.as_str()).collect();
        assert_eq!(seqs, ["3", "4"], "nothing past the live feed: the live feed brings it");
        assert_eq!(shard.acknowledged(), seq(2), "the catch-up's records are not accepted yet");

        // The next live chunk is owed by both again.
        let (next, joined) = shard.begin_live(progress.next_id(), records(&[5]), vec![fast.clone()], None);
        assert_eq!(joined, vec![slow.clone()]);
        assert!(!shard.is_detached("slow"));
        assert!(!next.acknowledge("fast"), "owed by two destinations");
        assert!(next.acknowledge("slow"));
        assert_eq!(shard.acknowledged(), seq(2), "the catch-up's chunk still holds it back");
        sent[0].acknowledge("slow");
        assert_eq!(shard.acknowledged(), seq(5));
        assert_eq!(progress.checkpoints().get("s"), Some(&Position::Sequence(SequenceNumber::parse("5").unwrap())));
    }

    #[test]
    fn a_catch_up_without_room_or_behind_the_live_feed_stays_detached() {
        let progress = Progress::default();
        let shard = progress.shard("s");
        let slow: Arc<str> = "slow".into();
        shard.set_start(Position::TrimHorizon);
        assert_eq!(shard.detach(&slow), Some(Position::TrimHorizon), "nothing registered: from the reading's start");
        let (live, _) = shard.begin_live(progress.next_id(), records(&[1, 2, 3]), Vec::new(), None);
        assert!(live.records.len() == 3);
        let mut sent = Vec::new();
        let behind = shard.catch_up("slow", batch(records(&[1, 2])), progress.next_id(), true, |c| sent.push(c));
        assert_eq!(behind, CatchUp::Behind(seq(2)));
        assert_eq!(shard.acknowledged(), None, "the slow destination has acknowledged nothing");
        let full = shard.catch_up("slow", batch(records(&[3])), progress.next_id(), false, |c| sent.push(c));
        assert_eq!(full, CatchUp::Behind(seq(3)), "caught up, but its buffer is too full to join");
        let joined = shard.catch_up("slow", batch(Vec::new()), progress.next_id(), true, |c| sent.push(c));
        assert_eq!(joined, CatchUp::Joined { expired: 0 });
        assert_eq!(sent.len(), 2);
        assert_eq!(shard.catch_up("other", batch(Vec::new()), 0, true, |_| {}), CatchUp::Gone);
        shard.forget("slow");
        assert!(!shard.is_detached("slow"));
    }

    #[test]
    fn records_the_catch_up_never_finds_are_counted_as_expired_when_it_joins() {
        let progress = Progress::default();
        let shard = progress.shard("s");
        let slow: Arc<str> = "slow".into();
        let (first, _) = shard.begin_live(progress.next_id(), records(&[1]), vec![slow.clone()], None);
        first.acknowledge("slow");
        assert!(shard.detach(&slow).is_some());
        // The live feed reads 2-5 without it; by the time its catch-up reads, 2 and 3 are gone.
        let _ = shard.begin_live(progress.next_id(), records(&[2, 3]), Vec::new(), None);
        let _ = shard.begin_live(progress.next_id(), records(&[4, 5]), Vec::new(), None);
        let mut sent = Vec::new();
        let outcome = shard.catch_up("slow", batch(records(&[4, 5])), progress.next_id(), true, |c| sent.push(c));
        assert_eq!(outcome, CatchUp::Joined { expired: 2 });
        assert_eq!(sent.len(), 1);
    }
}
