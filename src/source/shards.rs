//! The shard graph of the source stream, and which shards to read now.
//!
//! A shard is read only after every parent it has was read to its end and acknowledged by every
//! destination (checkpoint `SHARD_END`), so records of one partition key reach the destinations
//! in source order across splits and merges.

use std::collections::{HashMap, HashSet};

use crate::position::Position;
use crate::progress::Checkpoints;

pub use crate::aws::kinesis::ShardInfo;

/// Shards to start now, with their starting points. `started` holds every shard read in this
/// run (running or finished): none of them starts again, and none of them counts as history to
/// skip at LATEST, so a child waits for a parent read here to reach SHARD_END and then reads
/// from its beginning.
pub fn plan(
    shards: &[ShardInfo],
    checkpoints: &Checkpoints,
    initial: &Position,
    started: &HashSet<String>,
) -> Vec<(String, Position)> {
    let by_id: HashMap<&str, &ShardInfo> = shards.iter().map(|s| (s.id.as_str(), s)).collect();
    let done = |id: &str| -> bool {
        match checkpoints.get(id) {
            Some(Position::ShardEnd) => true,
            Some(_) => false,
            // Starting at LATEST, history is not wanted: closed shards never read are skipped.
            None => *initial == Position::Latest && !started.contains(id) && by_id.get(id).is_some_and(|s| s.closed),
        }
    };
    shards
        .iter()
        .filter(|s| !started.contains(&s.id) && !done(&s.id))
        // A parent the stream no longer lists has aged out of retention: nothing left to wait for.
        .filter(|s| s.parents.iter().all(|p| !by_id.contains_key(p.as_str()) || done(p)))
        .map(|s| {
            let start = match checkpoints.get(&s.id) {
                Some(stored) => stored.clone(),
                None if s.parents.iter().any(|p| checkpoints.contains_key(p) || started.contains(p)) => {
                    Position::TrimHorizon
                }
                None => initial.clone(),
            };
            (s.id.clone(), start)
        })
        .collect()
}

/// Whether every listed shard is closed and done: the stream holds nothing more to read.
pub fn all_done(shards: &[ShardInfo], checkpoints: &Checkpoints) -> bool {
    !shards.is_empty() && shards.iter().all(|s| checkpoints.get(&s.id) == Some(&Position::ShardEnd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SequenceNumber;

    fn shard(id: &str, parents: &[&str], closed: bool) -> ShardInfo {
        ShardInfo { id: id.into(), parents: parents.iter().map(|p| p.to_string()).collect(), closed, hash_range: None }
    }

    fn ids(plan: &[(String, Position)]) -> Vec<&str> {
        plan.iter().map(|(id, _)| id.as_str()).collect()
    }

    // 0 split into 1 and 2; 1 and 2 merged into 3; 4 untouched.
    fn graph() -> Vec<ShardInfo> {
        vec![
            shard("s0", &[], true),
            shard("s1", &["s0"], true),
            shard("s2", &["s0"], true),
            shard("s3", &["s1", "s2"], false),
            shard("s4", &[], false),
        ]
    }

    #[test]
    fn children_wait_for_every_parent() {
        let none = HashSet::new();
        let mut cps = Checkpoints::new();
        assert_eq!(ids(&plan(&graph(), &cps, &Position::TrimHorizon, &none)), vec!["s0", "s4"]);
        cps.insert("s0".into(), Position::ShardEnd);
        let next = plan(&graph(), &cps, &Position::TrimHorizon, &none);
        assert_eq!(ids(&next), vec!["s1", "s2", "s4"]);
        assert_eq!(next[0].1, Position::TrimHorizon);
        cps.insert("s1".into(), Position::ShardEnd);
        assert_eq!(ids(&plan(&graph(), &cps, &Position::TrimHorizon, &none)), vec!["s2", "s4"]);
        cps.insert("s2".into(), Position::ShardEnd);
        assert_eq!(ids(&plan(&graph(), &cps, &Position::TrimHorizon, &none)), vec!["s3", "s4"]);
    }

    #[test]
    fn checkpoints_resume_after_the_sequence_and_running_shards_are_skipped() {
        let mut cps = Checkpoints::new();
        let seq = SequenceNumber::parse("42").unwrap();
        cps.insert("s4".into(), Position::Sequence(seq.clone()));
        let running: HashSet<String> = ["s0".to_string()].into();
        let next = plan(&graph(), &cps, &Position::TrimHorizon, &running);
        assert_eq!(next, vec![("s4".to_string(), Position::Sequence(seq))]);
    }

    #[test]
    fn latest_skips_closed_history() {
        let next = plan(&graph(), &Checkpoints::new(), &Position::Latest, &HashSet::new());
        assert_eq!(next, vec![("s3".to_string(), Position::Latest), ("s4".to_string(), Position::Latest)]);
    }

    #[test]
    fn at_latest_a_parent_read_in_this_run_holds_its_children_until_it_ends() {
        // s0 was open when the run started at LATEST and is being read; a split closed it.
        let started: HashSet<String> = ["s0".to_string(), "s4".to_string()].into();
        let shards = vec![shard("s0", &[], true), shard("s1", &["s0"], false), shard("s4", &[], false)];
        let mut cps = Checkpoints::new();
        assert!(plan(&shards, &cps, &Position::Latest, &started).is_empty(), "s1 waits for s0's end");
        cps.insert("s0".into(), Position::ShardEnd);
        let next = plan(&shards, &cps, &Position::Latest, &started);
        assert_eq!(next, vec![("s1".to_string(), Position::TrimHorizon)], "from its beginning, not LATEST");
        // Read in this run but stopped before its end (no checkpoint): still not history.
        let cps = Checkpoints::new();
        let started: HashSet<String> = ["s0".to_string()].into();
        assert!(plan(&shards, &cps, &Position::Latest, &started).iter().all(|(id, _)| id != "s1"));
    }

    #[test]
    fn a_stored_starting_point_resumes_at_it() {
        let mut cps = Checkpoints::new();
        let seq = SequenceNumber::parse("42").unwrap();
        cps.insert("s4".into(), Position::At(seq.clone()));
        let next = plan(&graph(), &cps, &Position::Latest, &HashSet::new());
        assert!(next.contains(&("s4".to_string(), Position::At(seq))), "{next:?}");
    }

    #[test]
    fn everything_done_when_all_shards_ended() {
        let shards = vec![shard("a", &[], true)];
        let mut cps = Checkpoints::new();
        assert!(!all_done(&shards, &cps));
        cps.insert("a".into(), Position::ShardEnd);
        assert!(all_done(&shards, &cps));
    }
}
