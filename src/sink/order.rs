//! Strict order per key (`destinations[].ordering = "strict"`): a request carries at most one
//! record per key, and none of a key while an earlier record of that key waits in the queue.
//!
//! The writer has one request in flight at a time and puts whatever failed back at the front of
//! its queue, so the only way a newer record of a key can land before an older one is to travel
//! in the same request and succeed where the older one was throttled. Choosing, for each
//! request, only the first queued record of each key closes that: a throttled record is retried
//! before anything newer of its key goes out, while records of other keys fill the request.
//!
//! A key is a partition key, and an explicit hash key when the entry has one (two records of one
//! explicit hash key land in one shard in request order too). An aggregate built here counts as
//! one record of every key it holds; its own explicit hash key is its destination shard's start,
//! a route rather than a key, and does not count.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};

use super::batch::{BatchLimits, MAX_BATCH_RECORDS};
use super::entries::{Payload, Pending};

/// How many queued entries one request's choice looks at, at most: past that, a key that first
/// appears deeper in the queue waits for the entries ahead of it to go. Large, so that a hot or
/// throttled key with thousands of records queued does not hide the other keys behind them (the
/// scan stops earlier once a request is full).
pub const WINDOW: usize = 40 * MAX_BATCH_RECORDS;

/// How many keys one request's choice compares, at most (past the first entry): an aggregate can
/// hold a hundred thousand tiny user records, and a queue of them must not cost a scan of
/// millions of keys per request. Stopping early is safe: it only holds records back.
pub const KEYS_PER_SCAN: usize = 100_000;

/// The kinds of key, told apart in [`key_hash`].
pub const PARTITION_KEY: u8 = 0;
pub const EXPLICIT_HASH_KEY: u8 = 1;

/// A key as the choice compares it: a hash of its kind and text. Two keys that collide are
/// taken for one, which can only hold a record back a request longer, never let one pass.
pub fn key_hash(kind: u8, key: &str) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    kind.hash(&mut hasher);
    key.hash(&mut hasher);
    hasher.finish()
}

/// The keys one entry holds, into `keys`.
fn keys(p: &Pending, keys: &mut Vec<u64>) {
    keys.clear();
    keys.push(key_hash(PARTITION_KEY, p.partition_key()));
    // An aggregate built here has its destination shard's start for explicit hash key: a route,
    // not a key of its records (counted, it would let one aggregate per shard go at a time).
    let built_here = matches!(p.payload, Payload::Built { aggregate: Some(_), .. });
    if let Some(hash) = p.explicit_hash_key().filter(|_| !built_here) {
        keys.push(key_hash(EXPLICIT_HASH_KEY, hash));
    }
    match &p.payload {
        // An aggregate passed through holds the keys of its user records (decoded once, on read).
        Payload::Source => {
            for user in p.source().user_records.iter().flat_map(|users| users.iter()) {
                if let Some(hash) = &user.explicit_hash_key {
                    keys.push(key_hash(EXPLICIT_HASH_KEY, hash));
                }
                keys.push(key_hash(PARTITION_KEY, &user.partition_key));
            }
        }
        // An aggregate built here: its keys were read when it was built.
        Payload::Built { aggregate: Some(built), .. } => keys.extend_from_slice(&built.keys),
        _ => {}
    }
}

/// Which of the leading entries may go in the next request: the first of each key, until a
/// request's worth is chosen (an entry refused here takes no room: it is never sent), [`WINDOW`]
/// entries or [`KEYS_PER_SCAN`] keys were looked at. An entry passed over still holds its keys,
/// so nothing behind it of any of them goes either.
pub fn first_of_each_key<'a>(entries: impl Iterator<Item = &'a Pending>, limits: BatchLimits) -> Vec<bool> {
    let mut held: HashSet<u64> = HashSet::new();
    let mut chosen = Vec::new();
    let (mut taken, mut bytes, mut looked_at) = (0, 0, 0);
    let mut of_entry = Vec::new();
    for p in entries.take(WINDOW) {
        let full = taken == limits.max_records || bytes >= limits.max_bytes;
        if full || (looked_at >= KEYS_PER_SCAN && !chosen.is_empty()) {
            break;
        }
        keys(p, &mut of_entry);
        looked_at += of_entry.len();
        let free = of_entry.iter().all(|k| !held.contains(k));
        chosen.push(free);
        if free && p.invalid.is_none() {
            taken += 1;
            bytes += p.encoded_size();
        }
        held.extend(of_entry.iter().copied());
    }
    chosen
}

/// Brings the `chosen` leading entries of `queue` to its front, each side keeping its order:
/// the order per key is unchanged (an entry moves ahead only of entries of other keys).
/// Returns how many lead.
pub fn bring_forward(queue: &mut std::collections::VecDeque<Pending>, chosen: &[bool]) -> usize {
    let lead = chosen.iter().filter(|c| **c).count();
    if chosen.iter().take(lead).all(|c| *c) {
        return lead;
    }
    let window: Vec<Pending> = queue.drain(..chosen.len()).collect();
    let (first, rest): (Vec<_>, Vec<_>) = window.into_iter().zip(chosen).partition(|(_, c)| **c);
    for (p, _) in rest.into_iter().rev().chain(first.into_iter().rev()) {
        queue.push_front(p);
    }
    lead
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use proptest::prelude::*;
    use tokio::time::Instant;

    use super::*;
    use crate::progress::Progress;
    use crate::record::{SequenceNumber, SourceRecord};

    /// A queue of entries with these partition keys (and explicit hash keys), in order.
    fn queue(keys: &[(&str, Option<&str>)]) -> VecDeque<Pending> {
        let progress = Progress::default();
        let shard = progress.shard("shardId-0");
        let records = keys
            .iter()
            .enumerate()
            .map(|(i, (key, _))| SourceRecord {
                sequence_number: SequenceNumber::parse(&format!("{}", 100 + i)).unwrap(),
                partition_key: (*key).into(),
                data: bytes::Bytes::from(format!("{i}")),
                arrival: None,
                user_records: None,
            })
            .collect();
        let chunk = shard.begin(1, records, vec!["out".into()]);
        keys.iter()
            .enumerate()
            .map(|(i, (key, hash))| {
                let payload = match hash {
                    None => Payload::Source,
                    Some(hash) => Payload::Built {
                        partition_key: (*key).into(),
                        explicit_hash_key: Some((*hash).into()),
                        data: bytes::Bytes::from(format!("{i}")),
                        aggregate: None,
                    },
                };
                Pending::new(Arc::clone(&chunk), i as u32, payload, Instant::now(), 1 << 20)
            })
            .collect()
    }

    fn order(queue: &VecDeque<Pending>) -> Vec<String> {
        queue.iter().map(|p| String::from_utf8_lossy(p.data()).into_owned()).collect()
    }

    #[test]
    fn the_first_of_each_key_leads_and_nothing_passes_an_earlier_record_of_its_key() {
        let mut q = queue(&[("a", None), ("a", None), ("b", None), ("c", Some("7")), ("d", Some("7")), ("e", None)]);
        let chosen = first_of_each_key(q.iter(), BatchLimits::default());
        assert_eq!(chosen, [true, false, true, true, false, true]);
        assert_eq!(bring_forward(&mut q, &chosen), 4);
        assert_eq!(order(&q), ["0", "2", "3", "5", "1", "4"]);
    }

    #[test]
    fn a_key_thousands_deep_does_not_hide_the_keys_behind_it() {
        let mut spec = vec![("hot", None); 3_000];
        spec.push(("cold", None));
        let mut q = queue(&spec);
        let chosen = first_of_each_key(q.iter(), BatchLimits::default());
        assert_eq!(bring_forward(&mut q, &chosen), 2);
        assert_eq!(order(&q)[..2], ["0", "3000"]);
    }

    #[test]
    fn an_aggregate_built_here_holds_every_key_inside_it() {
        use crate::config::KplMode;
        use crate::kpl::UserRecord;
        use crate::sink::entries::{ShardMap, build, every};
        // A source aggregate of x and y, re-aggregated for a one-shard destination.
        let user = |key: &str| UserRecord {
            partition_key: key.into(),
            explicit_hash_key: None,
            data: bytes::Bytes::from(key.to_string()),
        };
        let aggregate = SourceRecord {
            sequence_number: SequenceNumber::parse("1").unwrap(),
            partition_key: "a".into(),
            data: bytes::Bytes::from_static(b"outer"),
            arrival: None,
            user_records: Some(vec![user("x"), user("y")].into()),
        };
        let progress = Progress::default();
        let chunk = progress.shard("shardId-1").begin(1, vec![aggregate], vec!["out".into()]);
        let map = ShardMap::new(vec![(0, u128::MAX)]);
        let built = build(&chunk, KplMode::Reaggregate, &map, 1 << 20, &every).0;
        let [(index, payload)] = &built[..] else { panic!("one aggregate: {built:?}") };
        let Payload::Built { aggregate: Some(keys), .. } = payload else { panic!("built here: {payload:?}") };
        assert_eq!(keys.keys.len(), 2, "x and y");
        // The aggregate, then records of y and of z: y waits for the aggregate, z goes beside it.
        let mut q = queue(&[("y", None), ("z", None)]);
        q.push_front(Pending::new(Arc::clone(&chunk), *index, payload.clone(), Instant::now(), 1 << 20));
        assert_eq!(first_of_each_key(q.iter(), BatchLimits::default()), [true, false, true]);
    }

    /// An aggregate built here for the one shard, holding `keys` (its partition key the first).
    fn built(keys: &[&str]) -> Payload {
        let first = keys[0].to_string();
        let keys = keys.iter().map(|k| key_hash(PARTITION_KEY, k)).collect();
        let aggregate = crate::sink::entries::Aggregate { shard: Some("shardId-0".into()), keys };
        Payload::Built {
            partition_key: first,
            explicit_hash_key: Some("0".into()),
            data: bytes::Bytes::from_static(b"aggregate"),
            aggregate: Some(Arc::new(aggregate)),
        }
    }

    #[test]
    fn aggregates_of_one_shard_go_together_unless_they_share_a_key() {
        let mut q = queue(&[("a", None), ("b", None), ("c", None)]);
        for (at, keys) in [(0, &["x", "y"][..]), (1, &["z"][..]), (2, &["y", "w"][..])] {
            q[at].payload = built(keys);
        }
        // Their shard's start is a route, not a key: the first two go, the third waits for y.
        assert_eq!(first_of_each_key(q.iter(), BatchLimits::default()), [true, true, false]);
    }

    #[test]
    fn a_scan_stops_after_enough_keys_and_a_request_worth_of_bytes() {
        let mut q = queue(&[("a", None), ("b", None), ("c", None)]);
        let many: Vec<String> = (0..KEYS_PER_SCAN + 1).map(|i| format!("k{i}")).collect();
        q[0].payload = built(&many.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(first_of_each_key(q.iter(), BatchLimits::default()), [true], "the rest waits a request");
        let q = queue(&[("a", None), ("b", None), ("c", None)]);
        let small = BatchLimits { max_bytes: 1, ..BatchLimits::default() };
        assert_eq!(first_of_each_key(q.iter(), small), [true], "a request's worth is chosen");
    }

    proptest! {
        /// Whatever the keys: the chosen lead holds each key once, and per key the queue keeps
        /// its order.
        #[test]
        fn a_request_holds_one_record_per_key_and_order_per_key_holds(keys in proptest::collection::vec(0u8..6, 1..60)) {
            let names: Vec<String> = keys.iter().map(|k| format!("k{k}")).collect();
            let spec: Vec<(&str, Option<&str>)> = names.iter().map(|n| (n.as_str(), None)).collect();
            let mut q = queue(&spec);
            let chosen = first_of_each_key(q.iter(), BatchLimits::default());
            let lead = bring_forward(&mut q, &chosen);
            let leading: Vec<&str> = q.iter().take(lead).map(|p| p.partition_key()).collect();
            let distinct: HashSet<&str> = leading.iter().copied().collect();
            prop_assert_eq!(distinct.len(), leading.len());
            prop_assert_eq!(distinct.len(), names.iter().collect::<HashSet<_>>().len());
            for key in &names {
                let before: Vec<usize> = (0..names.len()).filter(|i| &names[*i] == key).collect();
                let after: Vec<usize> = q.iter().filter(|p| p.partition_key() == key).map(|p| p.index as usize).collect();
                prop_assert_eq!(before, after);
            }
        }
    }
}
