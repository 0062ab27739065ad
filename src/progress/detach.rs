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
    pub(super) missed: u64,
    handed: u64,
    /// The destination was shed while its catch-up ran: the catch-up reads again from the seam
    /// (its lane was revoked and replaced).
    pub(super) restart: bool,
}

impl Hold {
    /// A hold of `shard`'s reading with a fresh lane for its catch-up's chunks.
    pub(super) fn new(shard: &ShardProgress, seam: Option<SequenceNumber>, backfill: bool) -> Self {
        let lane = Arc::new(ShardProgress::new(
            Arc::clone(&shard.shard_id),
            Arc::clone(&shard.revocations),
            shard.proof.clone(),
            Arc::clone(&shard.in_doubt),
        ));
        Hold { seam, lane, caught_up: false, backfill, missed: 0, handed: 0, restart: false }
    }

    /// Records its catch-up handed on that the destination has not accepted yet.
    pub(super) fn unaccepted(&self) -> u64 {
        self.lane.state().outstanding.iter().filter(|o| !o.done).map(|o| o.records as u64).sum()
    }

    /// Gives up its lane (its destination was shed): the destination drops the lane's chunks,
    /// and nothing waits for them.
    pub(super) fn revoke(&self) {
        self.lane.shed.store(true, Ordering::Release);
        self.lane.revoked.store(true, Ordering::Release);
    }

    pub(super) fn backfill(&self) -> bool {
        self.backfill
    }

    pub(super) fn caught_up(&self) -> bool {
        self.caught_up
    }

    pub(super) fn pending(&self) -> u64 {
        self.missed.saturating_sub(self.handed)
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
    /// It read to the end of a closed shard: no record follows these. (An empty page at the tip
    /// of an open shard proves nothing: GetRecords may see a record later than Enhanced Fan-Out
    /// delivered it.)
    pub shard_end: bool,
    /// The batch's share of the process's memory budget.
    pub memory: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What a catch-up owes before its destination may join the live feed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owed {
    /// Every record up to and including this one.
    Through(SequenceNumber),
    /// Nothing: the live feed registered nothing without the destination.
    Nothing,
    /// Not known yet (a reading from LATEST or a timestamp before its first event): hand on
    /// nothing and wait.
    Unknown,
}

impl Owed {
    /// What `hold`'s catch-up owes in `state`: up to the live feed's last registered record; while
    /// the live feed registered nothing, a detached destination owes nothing and a backfill owes
    /// what lies before the reading's own start (it is the only reader of that range).
    fn of(state: &ShardState, backfill: bool) -> Owed {
        if let Some(live) = &state.last_registered {
            return Owed::Through(live.clone());
        }
        if !backfill {
            return Owed::Nothing;
        }
        // An anchor with nothing registered after it is a continuation sequence number (or a
        // stored place): the live feed may never hand that record on, so the backfill brings it
        // too (at worst once more than needed), never neither.
        match (&state.anchor, &state.start) {
            (Some(at), _) | (None, Some(Position::At(at))) => Owed::Through(at.clone()),
            (None, Some(Position::Sequence(after))) => Owed::Through(after.clone()),
            (None, Some(Position::TrimHorizon)) => Owed::Nothing,
            _ => Owed::Unknown,
        }
    }

    fn covers(&self, seq: &SequenceNumber) -> bool {
        match self {
            Owed::Through(last) => seq <= last,
            Owed::Nothing | Owed::Unknown => false,
        }
    }

    /// Whether everything owed was handed on: the catch-up handed on the last owed record, or
    /// read a record past what is owed (records come in order, so none owed can follow).
    fn reached(&self, handed: Option<&SequenceNumber>, read: Option<&SequenceNumber>) -> bool {
        match self {
            Owed::Through(last) => handed.is_some_and(|h| h >= last) || read.is_some_and(|r| r > last),
            Owed::Nothing => true,
            Owed::Unknown => false,
        }
    }
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
    /// The destination was shed: what the catch-up handed on was dropped; it reads again from
    /// here.
    Restart(Position),
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

/// Where a catch-up whose destination has every record up to `seam` starts reading.
pub(super) fn resume_from(state: &ShardState, seam: Option<&SequenceNumber>) -> Position {
    match (seam, &state.anchor) {
        (Some(seq), _) => Position::Sequence(seq.clone()),
        (None, Some(at)) => Position::At(at.clone()),
        (None, None) => state.start.clone().unwrap_or(Position::TrimHorizon),
    }
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
        let start = resume_from(&state, seam.as_ref());
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
        // Shed since the live feed routed the chunk: its catch-up brings it (its writer drops it).
        owed.retain(|d| state.detached.get(d).is_none_or(|h| h.caught_up));
        let joined: Vec<Arc<str>> =
            state.detached.iter().filter(|(_, h)| h.caught_up).map(|(name, _)| Arc::clone(name)).collect();
        for name in &joined {
            if let Some(hold) = state.detached.remove(name) {
                state.settling.push((Arc::clone(name), hold));
            }
        }
        owed.retain(|d| !joined.contains(d));
        owed.extend(joined.iter().cloned());
        let chunk = self.register(&mut state, id, records, owed, memory);
        (chunk, joined)
    }

    /// A catch-up of `destination` read `records` (after its last one, in order). Hands on, as
    /// chunk `id` of its lane through `send`, those the live feed has registered already; the
    /// rest the live feed brings. `room`: the destination's buffer has room to join the live feed.
    /// It joins only once it has handed on everything owed (see [`Owed`]).
    pub fn catch_up(
        &self,
        destination: &str,
        batch: Batch,
        id: u64,
        room: bool,
        send: impl FnOnce(Arc<Chunk>),
    ) -> CatchUp {
        let Batch { records, shard_end, memory } = batch;
        let mut state = self.state();
        if self.revoked() {
            return CatchUp::Gone;
        }
        let Some(backfill) = state.detached.get(destination).map(|h| h.backfill) else { return CatchUp::Gone };
        let due = Owed::of(&state, backfill);
        let restart = state.detached.get(destination).filter(|h| h.restart).map(|h| h.seam.clone());
        if let Some(seam) = restart {
            // Shed meanwhile: this batch was read from a position the destination gave up.
            let from = resume_from(&state, seam.as_ref());
            state.detached.get_mut(destination).expect("looked up above").restart = false;
            return CatchUp::Restart(from);
        }
        let hold = state.detached.get_mut(destination).expect("looked up above");
        let read = records.last().map(|r| r.sequence_number.clone());
        let owed: Vec<SourceRecord> = records.into_iter().filter(|r| due.covers(&r.sequence_number)).collect();
        let last = owed.last().map(|r| r.sequence_number.clone());
        if !owed.is_empty() {
            hold.handed += owed.len() as u64;
            let mut lane = hold.lane.state();
            let chunk = hold.lane.register(&mut lane, id, owed, vec![Arc::from(destination)], memory);
            drop(lane);
            send(chunk);
        }
        let reached = last.clone().or_else(|| hold.lane.state().last_registered.clone()).or_else(|| hold.seam.clone());
        // Joined only on proof that nothing owed is left: the last owed record handed on, a record
        // past it read, or the end of a closed shard. An empty page proves nothing.
        let caught_up = shard_end || due.reached(reached.as_ref(), read.as_ref());
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
        Batch { records, shard_end: false, memory: None }
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

    #[test]
    fn an_empty_page_at_the_tip_is_no_proof_that_the_catch_up_has_everything() {
        let progress = Progress::default();
        let shard = progress.shard("s");
        let (fast, slow): (Arc<str>, Arc<str>) = ("fast".into(), "slow".into());
        let (first, _) = shard.begin_live(progress.next_id(), records(&[1, 2]), vec![fast.clone(), slow.clone()], None);
        first.acknowledge("fast");
        first.acknowledge("slow");
        assert!(shard.detach(&slow).is_some());
        // Records 3-4 arrive and are registered live without it, just after its GetRecords call
        // came back empty at the tip (or GetRecords sees them later than Enhanced Fan-Out did).
        let (live, _) = shard.begin_live(progress.next_id(), records(&[3, 4]), vec![fast.clone()], None);
        live.acknowledge("fast");
        let empty = Batch { records: Vec::new(), shard_end: false, memory: None };
        let outcome = shard.catch_up("slow", empty, progress.next_id(), true, |_| {});
        assert_eq!(outcome, CatchUp::Behind(seq(2)), "3-4 are in neither the catch-up nor the live chunks");
        assert!(shard.is_detached("slow"));
        assert_eq!(shard.acknowledged(), seq(2), "the checkpoint stays below what it lacks");
        let mut sent = Vec::new();
        let outcome = shard.catch_up("slow", batch(records(&[3, 4])), progress.next_id(), true, |c| sent.push(c));
        assert_eq!(outcome, CatchUp::Joined { expired: 0 });
        assert_eq!(sent.len(), 1);
    }

    /// A reading restarted at the shard checkpoint 10 on an idle shard, where destination "new"
    /// has its own position 5 (its backfill was cut short by the stop) and "old" has 10.
    fn restarted_at_10_with_a_backfill_at_5(progress: &Progress) -> Arc<ShardProgress> {
        let shard = progress.shard("s");
        shard.set_start(Position::Sequence(SequenceNumber::parse("10").unwrap()));
        shard.set_skips(&std::collections::BTreeMap::from([
            ("new".to_string(), SequenceNumber::parse("5").unwrap()),
            ("old".to_string(), SequenceNumber::parse("10").unwrap()),
        ]));
        shard
    }

    #[test]
    fn a_backfill_on_a_reading_that_registered_nothing_moves_on_to_the_reading_start() {
        let progress = Progress::default();
        let shard = restarted_at_10_with_a_backfill_at_5(&progress);
        let new: Arc<str> = "new".into();
        let from = shard.introduce(&new, &Position::TrimHorizon, false);
        assert_eq!(from, Some(Position::Sequence(SequenceNumber::parse("5").unwrap())));
        let mut sent = Vec::new();
        let outcome = shard.catch_up("new", batch(records(&[6, 7])), progress.next_id(), true, |c| sent.push(c));
        assert_eq!(outcome, CatchUp::Behind(seq(7)), "it is the only reader of 6-10: it hands them on");
        let outcome = shard.catch_up("new", batch(records(&[8, 10, 11])), progress.next_id(), true, |c| sent.push(c));
        assert_eq!(outcome, CatchUp::Joined { expired: 0 });
        let handed: Vec<&str> =
            sent.iter().flat_map(|c| c.records.iter().map(|r| r.sequence_number.as_str())).collect();
        assert_eq!(handed, ["6", "7", "8", "10"], "nothing past the reading's start: the live feed brings 11");
    }

    #[test]
    fn a_backfill_of_a_closed_shard_joins_at_the_shard_end() {
        // A reading anchored at 20 (from LATEST: its first event had no record, so 20 is its
        // continuation) on a shard closed since; the backfill owes up to 20, and the shard holds
        // nothing more.
        let progress = Progress::default();
        let shard = progress.shard("s");
        shard.set_start(Position::Latest);
        shard.anchor(SequenceNumber::parse("20").unwrap());
        shard.set_skips(&std::collections::BTreeMap::from([("old".to_string(), SequenceNumber::parse("3").unwrap())]));
        let new: Arc<str> = "new".into();
        assert!(shard.introduce(&new, &Position::TrimHorizon, true).is_some());
        let mut sent = Vec::new();
        let outcome = shard.catch_up("new", batch(records(&[1, 2, 3])), progress.next_id(), true, |c| sent.push(c));
        assert_eq!(outcome, CatchUp::Behind(seq(3)), "records before the anchor are handed on");
        let end = Batch { records: Vec::new(), shard_end: true, memory: None };
        let outcome = shard.catch_up("new", end, progress.next_id(), true, |c| sent.push(c));
        assert_eq!(outcome, CatchUp::Joined { expired: 0 }, "the end of a closed shard proves nothing follows");
        let past = shard.introduce(&"other".into(), &Position::TrimHorizon, true);
        assert!(past.is_some());
        let mut handed = Vec::new();
        let outcome = shard.catch_up("other", batch(records(&[19, 20])), progress.next_id(), true, |c| handed.push(c));
        assert_eq!(outcome, CatchUp::Joined { expired: 0 }, "the record at the anchor handed on proves the rest was");
        assert_eq!(handed[0].records.len(), 2, "the anchor's own record too: the live feed may never hand it on");
    }

    #[test]
    fn a_backfill_finished_on_an_idle_shard_keeps_its_position() {
        let progress = Progress::default();
        let shard = restarted_at_10_with_a_backfill_at_5(&progress);
        assert!(shard.introduce(&"new".into(), &Position::TrimHorizon, false).is_some());
        let mut sent = Vec::new();
        let outcome = shard.catch_up("new", batch(records(&[6, 10, 11])), progress.next_id(), true, |c| sent.push(c));
        assert_eq!(outcome, CatchUp::Joined { expired: 0 });
        sent[0].acknowledge("new");
        assert_eq!(shard.destination_positions().get("new"), seq(10).as_ref(), "a restart does not backfill it again");
    }
}
