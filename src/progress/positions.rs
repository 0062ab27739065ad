//! Each destination's own position in a shard: the last record below which it has every record.
//! The shard's checkpoint is the lowest of them; each one is stored beside it
//! (`destinationCheckpoints`), so that a restart or a failover does not send a destination again
//! what it already has because another destination lagged.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Progress, ShardProgress, ShardState};
use crate::record::{SequenceNumber, SourceRecord};

use crate::position::DestinationPositions;

impl ShardProgress {
    /// Destinations that already have the records up to their position (stored by an earlier
    /// reading, ahead of the shard's checkpoint): the live feed does not send them those again.
    pub fn set_skips(&self, skips: &BTreeMap<String, SequenceNumber>) {
        self.state().skips = skips.iter().map(|(id, seq)| (Arc::from(id.as_str()), seq.clone())).collect();
    }

    /// Whether `destination` already has every record up to `last`.
    pub fn already_has(&self, destination: &str, last: &SequenceNumber) -> bool {
        has_through(&self.state(), destination, last)
    }

    /// How many of the leading `take` records form the next chunk so that no chunk straddles a
    /// destination's skip position (at least one).
    pub fn skip_boundary(&self, records: &[SourceRecord], take: usize) -> usize {
        let state = self.state();
        let Some(first) = records.first() else { return take };
        let mut take = take.min(records.len());
        for skip in state.skips.values().filter(|s| first.sequence_number <= **s) {
            let through = records[..take].iter().take_while(|r| r.sequence_number <= *skip).count();
            take = take.min(through.max(1));
        }
        take
    }

    /// Each destination's own position in this shard, where one is known.
    pub fn destination_positions(&self) -> BTreeMap<String, SequenceNumber> {
        let state = self.state();
        let mut ids: Vec<&Arc<str>> = state.seen.iter().chain(state.skips.keys()).collect();
        ids.extend(state.detached.keys());
        ids.sort();
        ids.dedup();
        ids.into_iter().filter_map(|id| own_position(&state, id).map(|seq| (id.to_string(), seq))).collect()
    }
}

/// Whether a stored position says `destination` has every record up to `last`.
pub(super) fn has_through(state: &ShardState, destination: &str, last: &SequenceNumber) -> bool {
    state.skips.get(destination).is_some_and(|skip| last <= skip)
}

/// Below this, `destination` has every record of the shard.
pub(super) fn own_position(state: &ShardState, destination: &str) -> Option<SequenceNumber> {
    // Live chunks it still owes: it has everything before the first one. A reading that has
    // registered nothing says nothing about it (a backfill that finished on an idle shard has
    // what its catch-up brought).
    let live = match state.outstanding.iter().position(|o| o.owed.iter().any(|d| &**d == destination)) {
        Some(0) => Some(state.acknowledged.clone()),
        Some(i) => Some(Some(state.outstanding[i - 1].last.clone())),
        None => state.last_registered.clone().or_else(|| state.acknowledged.clone()).map(Some),
    };
    // Records its catch-up has not handed on, or that it has not accepted yet.
    let detached = state.detached.get(destination).map(|h| h.floor());
    let settling = state.settling.iter().filter(|(d, h)| &**d == destination && !h.settled()).map(|(_, h)| h.floor());
    let mut position = live;
    for floor in detached.into_iter().chain(settling) {
        position = match (position, floor) {
            (Some(Some(a)), Some(b)) => Some(Some(a.min(b))),
            (None, floor) => Some(floor),
            _ => Some(None),
        };
    }
    let position = position.flatten();
    // A stored position ahead of this reading's is still the destination's.
    match (position, state.skips.get(destination)) {
        (Some(p), Some(skip)) => Some(p.max(skip.clone())),
        (None, Some(skip)) => Some(skip.clone()),
        (p, None) => p,
    }
}

impl Progress {
    /// What may be stored now: shard checkpoints and destination positions.
    pub fn snapshot(&self) -> super::Snapshot {
        super::Snapshot { shards: self.checkpoints(), destinations: self.destination_positions() }
    }

    /// Every shard's destination positions, for the shards that have any.
    pub fn destination_positions(&self) -> DestinationPositions {
        self.all()
            .into_iter()
            .filter(|shard| !shard.ended())
            .map(|shard| (shard.shard_id.to_string(), shard.destination_positions()))
            .filter(|(_, positions)| !positions.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::tests::records;

    fn seq(n: u64) -> SequenceNumber {
        SequenceNumber::parse(&n.to_string()).unwrap()
    }

    #[test]
    fn each_destination_keeps_its_own_position_and_the_shard_the_lowest() {
        let progress = Progress::default();
        let shard = progress.shard("s");
        let (fast, slow): (Arc<str>, Arc<str>) = ("arn:fast".into(), "arn:slow".into());
        let first = progress.begin(&shard, records(&[1, 2]), vec![fast.clone(), slow.clone()]);
        let second = progress.begin(&shard, records(&[3, 4]), vec![fast.clone(), slow.clone()]);
        first.acknowledge("arn:fast");
        second.acknowledge("arn:fast");
        let positions = shard.destination_positions();
        assert_eq!(positions.get("arn:fast"), Some(&seq(4)));
        assert_eq!(positions.get("arn:slow"), None, "the slow one has acknowledged nothing");
        first.acknowledge("arn:slow");
        let positions = shard.destination_positions();
        assert_eq!(positions.get("arn:slow"), Some(&seq(2)));
        assert_eq!(shard.acknowledged(), Some(seq(2)), "the shard's checkpoint is the lowest");

        // Detached now: the live feed goes on without it, and its position stays where it was.
        assert!(shard.detach(&slow).is_some());
        let third = progress.begin(&shard, records(&[5]), vec![fast.clone()]);
        third.acknowledge("arn:fast");
        let positions = shard.destination_positions();
        assert_eq!(positions.get("arn:fast"), Some(&seq(5)));
        assert_eq!(positions.get("arn:slow"), Some(&seq(2)), "it still owes 3-4 from the live feed");
        let snapshot = progress.snapshot();
        assert_eq!(snapshot.shards.get("s"), Some(&crate::position::Position::Sequence(seq(2))));
        assert_eq!(snapshot.destinations["s"]["arn:fast"], seq(5));
    }

    #[test]
    fn a_stored_position_ahead_is_not_sent_again_and_chunks_split_at_it() {
        let progress = Progress::default();
        let shard = progress.shard("s");
        shard.set_skips(&BTreeMap::from([("arn:ahead".to_string(), seq(3))]));
        let batch = records(&[1, 2, 3, 4, 5]);
        assert_eq!(shard.skip_boundary(&batch, 5), 3, "a chunk ends at the stored position");
        assert_eq!(shard.skip_boundary(&batch[3..], 2), 2, "past it, nothing splits");
        assert!(shard.already_has("arn:ahead", &seq(3)));
        assert!(!shard.already_has("arn:ahead", &seq(4)));
        assert!(!shard.already_has("arn:other", &seq(1)));
        // Until it is sent anything, its stored position stands.
        let chunk = progress.begin(&shard, records(&[1, 2, 3]), vec!["arn:other".into()]);
        chunk.acknowledge("arn:other");
        assert_eq!(shard.destination_positions().get("arn:ahead"), Some(&seq(3)));
        assert_eq!(shard.destination_positions().get("arn:other"), Some(&seq(3)));
    }
}
