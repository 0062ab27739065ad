//! Choosing leases to take: unowned and expired ones first, then at most one stolen per round
//! from the most loaded worker, until every worker holds about `leases / workers`.

use std::collections::{BTreeMap, HashSet};

use super::table::{Lease, Position};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// Unowned, or expired: its owner stopped renewing.
    Free(String),
    /// Owned by a live worker that holds more than its share.
    Steal(String),
}

/// Whether every parent of a lease has been read to its end (a missing parent has aged out).
fn parents_done(lease: &Lease, by_key: &BTreeMap<&str, &Lease>) -> bool {
    lease.parents.iter().all(|p| by_key.get(p.as_str()).is_none_or(|parent| parent.checkpoint == Position::ShardEnd))
}

/// The leases someone should be reading now: not read to their end, and with every parent done.
pub fn active(leases: &[Lease]) -> Vec<&Lease> {
    let by_key: BTreeMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
    leases.iter().filter(|l| l.checkpoint != Position::ShardEnd && parents_done(l, &by_key)).collect()
}

/// Leases read to their end whose every child has started (checkpointed past its start): no
/// worker needs them any more (the KCL's lease cleanup). A child's missing parent counts as done.
pub fn finished(leases: &[Lease]) -> Vec<&str> {
    leases
        .iter()
        .filter(|l| l.checkpoint == Position::ShardEnd)
        .filter(|parent| {
            let children: Vec<&Lease> = leases.iter().filter(|c| c.parents.contains(&parent.key)).collect();
            let named_ones_present = parent.children.iter().all(|k| children.iter().any(|c| &c.key == k));
            !children.is_empty()
                && named_ones_present
                && children.iter().all(|c| matches!(c.checkpoint, Position::Sequence(_) | Position::ShardEnd))
        })
        .map(|l| l.key.as_str())
        .collect()
}

/// The owner of a lease unless it expired.
fn live_owner<'a>(lease: &'a Lease, expired: &HashSet<String>) -> Option<&'a str> {
    lease.owner.as_deref().filter(|_| !expired.contains(&lease.key))
}

/// The leases this worker should try to take now.
pub fn choose(leases: &[Lease], me: &str, expired: &HashSet<String>) -> Vec<Take> {
    let active = active(leases);
    if active.is_empty() {
        return Vec::new();
    }
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    load.insert(me, 0);
    for lease in &active {
        if let Some(owner) = live_owner(lease, expired) {
            *load.entry(owner).or_default() += 1;
        }
    }
    let workers = load.len();
    let target = active.len().div_ceil(workers);
    let mine = load[me];
    if mine >= target {
        return Vec::new();
    }
    let free: Vec<Take> = active
        .iter()
        .filter(|l| live_owner(l, expired).is_none())
        .take(target - mine)
        .map(|l| Take::Free(l.key.clone()))
        .collect();
    if !free.is_empty() {
        return free;
    }
    // Steal one from the most loaded worker, if it holds more than its share.
    let (victim, victim_load) = load
        .iter()
        .filter(|(owner, _)| **owner != me)
        .max_by_key(|(owner, n)| (**n, std::cmp::Reverse(**owner)))
        .map(|(o, n)| (*o, *n))
        .unwrap_or((me, 0));
    if victim_load <= target || victim_load <= mine + 1 {
        return Vec::new();
    }
    active
        .iter()
        .filter(|l| live_owner(l, expired) == Some(victim))
        .max_by_key(|l| l.key.as_str())
        .map(|l| vec![Take::Steal(l.key.clone())])
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str, owner: Option<&str>) -> Lease {
        Lease { key: key.into(), owner: owner.map(String::from), ..Lease::default() }
    }

    fn simulate(leases: &mut [Lease], worker: &str) {
        for take in choose(leases, worker, &HashSet::new()) {
            let key = match take {
                Take::Free(k) | Take::Steal(k) => k,
            };
            let lease = leases.iter_mut().find(|l| l.key == key).unwrap();
            lease.owner = Some(worker.to_string());
        }
    }

    fn count(leases: &[Lease], worker: &str) -> usize {
        leases.iter().filter(|l| l.owner.as_deref() == Some(worker)).count()
    }

    #[test]
    fn three_workers_balance_eight_shards() {
        let mut leases: Vec<Lease> = (0..8).map(|i| lease(&format!("s{i}"), None)).collect();
        simulate(&mut leases, "a");
        assert_eq!(count(&leases, "a"), 8, "alone, a worker takes everything");
        for _ in 0..10 {
            for w in ["b", "c", "a"] {
                simulate(&mut leases, w);
            }
        }
        let mut counts = vec![count(&leases, "a"), count(&leases, "b"), count(&leases, "c")];
        counts.sort();
        assert_eq!(counts, vec![2, 3, 3]);
    }

    #[test]
    fn expired_leases_are_free_and_steals_are_one_per_round() {
        let leases: Vec<Lease> = (0..4).map(|i| lease(&format!("s{i}"), Some("dead"))).collect();
        let expired: HashSet<String> = leases.iter().map(|l| l.key.clone()).collect();
        assert_eq!(choose(&leases, "me", &expired).len(), 4);
        let steals = choose(&leases, "me", &HashSet::new());
        assert_eq!(steals, vec![Take::Steal("s3".into())]);
    }

    #[test]
    fn a_finished_lease_goes_once_every_child_has_started() {
        let mut parent = lease("p", None);
        parent.checkpoint = Position::ShardEnd;
        parent.children = vec!["c1".into(), "c2".into()];
        let mut c1 = lease("c1", Some("w"));
        c1.parents = vec!["p".into()];
        let mut c2 = c1.clone();
        c2.key = "c2".into();
        assert!(finished(&[parent.clone(), c1.clone(), c2.clone()]).is_empty(), "children not started");
        c1.checkpoint = Position::Sequence(crate::record::SequenceNumber::parse("5").unwrap());
        assert!(finished(&[parent.clone(), c1.clone(), c2.clone()]).is_empty(), "c2 not started");
        assert!(finished(&[parent.clone(), c1.clone()]).is_empty(), "c2 has no lease yet");
        c2.checkpoint = Position::ShardEnd;
        assert_eq!(finished(&[parent.clone(), c1, c2]), vec!["p"]);
        assert!(finished(&[parent]).is_empty(), "no child lease at all");
    }

    #[test]
    fn children_wait_for_their_parents() {
        let mut parent = lease("p", Some("x"));
        let mut child = lease("c", None);
        child.parents = vec!["p".into()];
        let leases = vec![parent.clone(), child.clone()];
        assert!(choose(&leases, "me", &HashSet::new()).iter().all(|t| *t != Take::Free("c".into())));
        parent.checkpoint = Position::ShardEnd;
        child.parents = vec!["p".into()];
        assert_eq!(choose(&[parent, child], "me", &HashSet::new()), vec![Take::Free("c".into())]);
    }
}
