//! Choosing leases to take: unowned and expired ones first, then at most one stolen per round
//! from the most loaded worker, until every worker holds about `leases / workers`.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::table::{Lease, Position};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// Unowned, or expired: its owner stopped renewing.
    Free(String),
    /// Owned by a live worker that holds more than its share.
    Steal(String),
}

/// Whether every parent of a lease has been read to its end. A parent without a lease is done
/// when a child of it has started already (a finished parent's lease is deleted only once every
/// child it named started), or when the stream no longer lists it (`listed`: it aged out). One still
/// listed, or not known to be gone (`listed` unknown), is not done: its lease is about to be
/// created, and its records come first.
fn parents_done(
    lease: &Lease,
    by_key: &BTreeMap<&str, &Lease>,
    started_children_of: &HashSet<&str>,
    listed: Option<&HashSet<String>>,
) -> bool {
    lease.parents.iter().all(|p| match by_key.get(p.as_str()) {
        Some(parent) => parent.checkpoint == Position::ShardEnd,
        // A child of it (this one, or a sibling) started: it was read to its end, and its lease
        // deleted since (the same proof that keeps a lease from being made for it again).
        None => started_children_of.contains(p.as_str()) || listed.is_some_and(|listed| !listed.contains(p)),
    })
}

/// Shards with a child whose lease has started (checkpointed past its start).
fn with_started_children(leases: &[Lease]) -> HashSet<&str> {
    leases
        .iter()
        .filter(|l| matches!(l.checkpoint, Position::Sequence(_) | Position::ShardEnd))
        .flat_map(|l| l.parents.iter().map(String::as_str))
        .collect()
}

/// The leases someone should be reading now: not read to their end, and with every parent done
/// (see [`active_in`]; without the stream's listing, a parent with no lease is taken as listed).
pub fn active(leases: &[Lease]) -> Vec<&Lease> {
    active_in(leases, None)
}

/// As [`active`], knowing which shards the stream lists now.
pub fn active_in<'a>(leases: &'a [Lease], listed: Option<&HashSet<String>>) -> Vec<&'a Lease> {
    let by_key: BTreeMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
    let started = with_started_children(leases);
    leases.iter().filter(|l| l.checkpoint != Position::ShardEnd && parents_done(l, &by_key, &started, listed)).collect()
}

/// Leases read to their end whose every child has started (checkpointed past its start): no
/// worker needs them any more (the KCL's lease cleanup). A child's missing parent counts as done.
pub fn finished(leases: &[Lease]) -> Vec<&str> {
    let mut children: BTreeMap<&str, Vec<&Lease>> = BTreeMap::new();
    for lease in leases {
        for parent in &lease.parents {
            children.entry(parent.as_str()).or_default().push(lease);
        }
    }
    leases
        .iter()
        .filter(|l| l.checkpoint == Position::ShardEnd)
        .filter(|parent| {
            let children = children.get(parent.key.as_str()).map(Vec::as_slice).unwrap_or_default();
            let named_ones_present = parent.children.iter().all(|k| children.iter().any(|c| &c.key == k));
            !children.is_empty()
                && named_ones_present
                && children.iter().all(|c| matches!(c.checkpoint, Position::Sequence(_) | Position::ShardEnd))
        })
        .map(|l| l.key.as_str())
        .collect()
}

/// Whether `workers` hold every active lease, none more than one lease above another: what the
/// fleet simulation and the fleet benchmark call balanced.
pub fn balanced(leases: &[Lease], workers: &BTreeSet<String>) -> bool {
    let mut load: BTreeMap<&str, usize> = workers.iter().map(|w| (w.as_str(), 0)).collect();
    for lease in active(leases) {
        match lease.owner.as_deref().and_then(|o| load.get_mut(o)) {
            Some(n) => *n += 1,
            None => return false,
        }
    }
    let min = load.values().min().copied().unwrap_or(0);
    let max = load.values().max().copied().unwrap_or(0);
    max - min <= 1
}

/// The owner of a lease unless it expired.
fn live_owner<'a>(lease: &'a Lease, expired: &HashSet<String>) -> Option<&'a str> {
    lease.owner.as_deref().filter(|_| !expired.contains(&lease.key))
}

/// Free leases taken in one round by a worker holding none: it does not know yet how many
/// workers share the table (a worker is seen only once it owns leases), so it takes a few, and
/// twice as many as it holds in each later round ("slow start"). Workers starting together then
/// see each other after a round instead of all grabbing every lease and stealing them back.
pub const FIRST_TAKE: usize = 16;

/// Where `key` falls in `me`'s order of free leases: each worker tries them in an order of its
/// own, so that workers taking at once rarely race for the same lease.
pub(super) fn order(me: &str, salt: u64, key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same order on every run, a different one per worker and round.
    let mut hasher = std::hash::DefaultHasher::new();
    (me, salt, key).hash(&mut hasher);
    hasher.finish()
}

/// The leases this worker should try to take now: free and expired ones first (at most
/// [`FIRST_TAKE`] or as many as it holds, in an order of its own), else leases stolen from the
/// most loaded workers, a quarter of its share at most per round, and only from a worker holding
/// at least two more than this one (so that no two workers pass a lease back and forth). Leases in
/// `settling` changed owner moments ago (their new owner may not even read them yet): they are
/// not stolen, and a worker's load here counts only the leases that could be stolen from it.
pub fn choose(
    leases: &[Lease],
    me: &str,
    expired: &HashSet<String>,
    settling: &HashSet<String>,
    salt: u64,
    listed: Option<&HashSet<String>>,
) -> Vec<Take> {
    let active = active_in(leases, listed);
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
    let mut mine = load[me];
    if mine >= target {
        return Vec::new();
    }
    let mut free: Vec<&&Lease> = active.iter().filter(|l| live_owner(l, expired).is_none()).collect();
    if !free.is_empty() {
        free.sort_by_cached_key(|l| order(me, salt, &l.key));
        let room = (target - mine).min(FIRST_TAKE.max(mine));
        return free.into_iter().take(room).map(|l| Take::Free(l.key.clone())).collect();
    }
    // Steal from the most loaded workers, one lease at a time, while it evens things out.
    let budget = target.div_ceil(4).max(1);
    let mut victims: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for lease in &active {
        if let Some(owner) = live_owner(lease, expired).filter(|o| *o != me) {
            let keys = victims.entry(owner).or_default();
            if !settling.contains(&lease.key) {
                keys.push(lease.key.as_str());
            }
        }
    }
    for keys in victims.values_mut() {
        keys.sort_by_key(|k| std::cmp::Reverse(order(me, salt, k)));
    }
    let mut stolen = Vec::new();
    while mine < target && stolen.len() < budget {
        let Some((_, keys)) = victims.iter_mut().max_by_key(|(owner, keys)| (keys.len(), std::cmp::Reverse(**owner)))
        else {
            break;
        };
        if keys.len() <= mine + 1 {
            break;
        }
        let Some(key) = keys.pop() else { break };
        stolen.push(Take::Steal(key.to_string()));
        mine += 1;
    }
    stolen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str, owner: Option<&str>) -> Lease {
        Lease { key: key.into(), owner: owner.map(String::from), ..Lease::default() }
    }

    fn simulate(leases: &mut [Lease], worker: &str) {
        for take in choose(leases, worker, &HashSet::new(), &HashSet::new(), 0, None) {
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
    fn expired_leases_are_free_and_steals_are_bounded_per_round() {
        let leases: Vec<Lease> = (0..4).map(|i| lease(&format!("s{i}"), Some("dead"))).collect();
        let expired: HashSet<String> = leases.iter().map(|l| l.key.clone()).collect();
        assert_eq!(choose(&leases, "me", &expired, &HashSet::new(), 0, None).len(), 4);
        let steals = choose(&leases, "me", &HashSet::new(), &HashSet::new(), 0, None);
        assert_eq!(steals.len(), 1, "a quarter of a share of two: one");
        assert!(matches!(&steals[0], Take::Steal(_)));
    }

    #[test]
    fn a_worker_alone_takes_a_few_then_twice_what_it_holds() {
        let mut leases: Vec<Lease> = (0..100).map(|i| lease(&format!("s{i:03}"), None)).collect();
        let mut taken = Vec::new();
        for _ in 0..4 {
            simulate(&mut leases, "a");
            taken.push(count(&leases, "a"));
        }
        assert_eq!(taken, vec![FIRST_TAKE, 2 * FIRST_TAKE, 4 * FIRST_TAKE, 100]);
    }

    #[test]
    fn workers_take_free_leases_in_orders_of_their_own() {
        let leases: Vec<Lease> = (0..100).map(|i| lease(&format!("s{i:03}"), None)).collect();
        let a = choose(&leases, "a", &HashSet::new(), &HashSet::new(), 1, None);
        let b = choose(&leases, "b", &HashSet::new(), &HashSet::new(), 1, None);
        let overlap = a.iter().filter(|t| b.contains(t)).count();
        assert!(overlap < FIRST_TAKE / 2, "{overlap} of {FIRST_TAKE} alike");
        assert_eq!(
            a,
            choose(&leases, "a", &HashSet::new(), &HashSet::new(), 1, None),
            "the same order for the same worker and round"
        );
    }

    #[test]
    fn a_worker_two_below_the_others_steals_even_when_they_hold_the_rounded_up_share() {
        // 28 leases, 6 workers: a share of 5 rounded up. Five hold 5, one holds 3: it must steal one.
        let mut leases = Vec::new();
        for (w, n) in [("a", 5), ("b", 5), ("c", 5), ("d", 5), ("e", 5), ("f", 3)] {
            for i in 0..n {
                leases.push(lease(&format!("{w}{i}"), Some(w)));
            }
        }
        let steals = choose(&leases, "f", &HashSet::new(), &HashSet::new(), 0, None);
        assert_eq!(steals.len(), 1, "{steals:?}");
        assert!(choose(&leases, "a", &HashSet::new(), &HashSet::new(), 0, None).is_empty(), "a holds its share");
        // Leases that changed owner moments ago are not stolen.
        let settling: HashSet<String> =
            leases.iter().filter(|l| l.owner.as_deref() != Some("f")).map(|l| l.key.clone()).collect();
        assert!(choose(&leases, "f", &HashSet::new(), &settling, 0, None).is_empty());
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
        assert!(
            choose(&leases, "me", &HashSet::new(), &HashSet::new(), 0, None)
                .iter()
                .all(|t| *t != Take::Free("c".into()))
        );
        parent.checkpoint = Position::ShardEnd;
        child.parents = vec!["p".into()];
        assert_eq!(
            choose(&[parent, child], "me", &HashSet::new(), &HashSet::new(), 0, None),
            vec![Take::Free("c".into())]
        );
    }

    #[test]
    fn a_parent_without_a_lease_holds_its_unstarted_child_back_while_the_stream_lists_it() {
        let mut child = lease("c", None);
        child.parents = vec!["p".into()];
        let alone = [child.clone()];
        let listed: HashSet<String> = ["p".to_string(), "c".to_string()].into();
        assert!(active_in(&alone, Some(&listed)).is_empty(), "p is listed: its lease comes, and its records first");
        assert!(active(&alone).is_empty(), "without the listing, p is taken as listed");
        let aged_out: HashSet<String> = ["c".to_string()].into();
        assert_eq!(active_in(&alone, Some(&aged_out)).len(), 1, "p aged out of the stream: nothing to wait for");
        // A sibling that started proves the parent was read to its end (and its lease deleted),
        // even when this child's lease came later (its creation was cut off).
        let mut sibling = lease("s", None);
        sibling.parents = vec!["p".into()];
        sibling.checkpoint = Position::Sequence(crate::record::SequenceNumber::parse("9").unwrap());
        assert_eq!(active_in(&[child.clone(), sibling], Some(&listed)).len(), 2, "a sibling started: p is done");
        child.checkpoint = Position::Sequence(crate::record::SequenceNumber::parse("9").unwrap());
        assert_eq!(active_in(&[child], Some(&listed)).len(), 1, "a started child's parent was finished and deleted");
    }
}
