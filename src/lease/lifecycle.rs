//! The lease table follows the stream: leases are created for shards that have none (new children
//! included) and deleted once a shard was read to its end and every child started.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::{StreamExt, stream};

use super::balance;
use super::manager::LeaseManager;
use super::table::{Lease, LeaseError, Position};
use crate::aws::kinesis::ShardInfo;

impl LeaseManager {
    /// Deletes the leases no worker needs any more (read to their end, every child started), so
    /// that the table, and every round's scan of it, holds the live shards and not the history.
    /// Returns the leases that remain.
    pub(super) async fn clean_up(&self, mut leases: Vec<Lease>) -> Vec<Lease> {
        let finished: Vec<String> = balance::finished(&leases).into_iter().map(str::to_string).collect();
        for key in finished {
            match self.table.delete_finished(&key).await {
                Ok(true) => {
                    tracing::info!(shard = %key, "Lease of a shard read to its end deleted: every child has started.")
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(shard = %key, error = %err, "Deleting a finished lease failed; will try again.");
                    continue;
                }
            }
            leases.retain(|l| l.key != key);
        }
        leases
    }

    /// Creates leases for shards that have none: roots at the initial position (closed roots are
    /// skipped at LATEST), children at their beginning. A closed shard with a descendant that
    /// has started gets none: it was read to its end and its lease deleted.
    ///
    /// Parents first: a lease is created only once every listed parent has one (created in an
    /// earlier generation of the same sync, or before); when a parent's creation fails or the
    /// sync is cut off, its children wait for the next sync. Together with
    /// [`balance::active_in`], which holds back a child whose listed parent has no lease, no
    /// child is read before its parents.
    ///
    /// Which leases exist comes from the lease loop's last look at the table when it is recent
    /// (usually nothing is missing, and nothing is read); a strongly consistent scan confirms
    /// what seems missing before anything is created, so that a lease deleted since is not made
    /// again. Each generation is created side by side, in an order of this worker's own, so that
    /// workers starting together do not all try the same ones.
    pub async fn sync(&self, shards: &[ShardInfo], initial: &Position) -> Result<(), LeaseError> {
        let listed: HashSet<String> = shards.iter().map(|s| s.id.clone()).collect();
        *self.listed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(listed));
        let recent = self
            .view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|(at, _)| at.elapsed() < self.failover)
            .map(|(_, leases)| leases);
        let mut missing = match recent.map(|leases| missing(shards, initial, &leases)) {
            Some(none) if none.is_empty() => return Ok(()),
            _ => missing(shards, initial, &self.table.scan().await?),
        };
        missing.sort_by_cached_key(|l| balance::order(&self.me, 0, &l.key));
        let mut failed: HashSet<String> = HashSet::new();
        let mut first_error = None;
        while !missing.is_empty() {
            // This generation: the leases none of whose parents is still to be created.
            let waiting: HashSet<String> = missing.iter().map(|l| l.key.clone()).collect();
            let (ready, later): (Vec<Lease>, Vec<Lease>) =
                missing.into_iter().partition(|l| l.parents.iter().all(|p| !waiting.contains(p)));
            if ready.is_empty() {
                break; // a cycle in the listing: nothing can come first
            }
            let created: Vec<(Lease, Result<bool, LeaseError>)> = stream::iter(ready)
                .map(|lease| async move {
                    let created = self.table.create_if_absent(&lease).await;
                    (lease, created)
                })
                .buffer_unordered(32)
                .collect()
                .await;
            for (lease, created) in created {
                match created {
                    Ok(true) => tracing::info!(shard = %lease.key, checkpoint = %lease.checkpoint, "Lease created."),
                    Ok(false) => {}
                    Err(err) => {
                        failed.insert(lease.key.clone());
                        first_error.get_or_insert(err);
                    }
                }
            }
            // A parent whose lease could not be created keeps its descendants waiting; the rest
            // go on.
            missing = later;
            loop {
                let before = failed.len();
                let blocked: Vec<String> = missing
                    .iter()
                    .filter(|l| l.parents.iter().any(|p| failed.contains(p)))
                    .map(|l| l.key.clone())
                    .collect();
                failed.extend(blocked);
                if failed.len() == before {
                    break;
                }
            }
            missing.retain(|l| !failed.contains(&l.key));
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The leases to create for listed shards that `leases` lacks.
fn missing(shards: &[ShardInfo], initial: &Position, leases: &[Lease]) -> Vec<Lease> {
    let known: HashSet<String> = leases.iter().map(|l| l.key.clone()).collect();
    let listed: HashSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
    // Only a descendant that has started proves its ancestors were read (their leases are
    // deleted once every child started); one created and not started yet proves nothing.
    let started: HashSet<String> = leases
        .iter()
        .filter(|l| matches!(l.checkpoint, Position::Sequence(_) | Position::ShardEnd))
        .map(|l| l.key.clone())
        .collect();
    let descended = leased_descendants(shards, &started);
    shards
        .iter()
        .filter(|s| !known.contains(&s.id) && !descended.contains(s.id.as_str()))
        .map(|shard| {
            let has_parent = shard.parents.iter().any(|p| listed.contains(p.as_str()) || known.contains(p));
            let checkpoint = match initial {
                _ if has_parent => Position::TrimHorizon,
                Position::Latest if shard.closed => Position::ShardEnd,
                // The configured start: trim horizon, latest or a timestamp.
                configured => configured.clone(),
            };
            Lease {
                key: shard.id.clone(),
                checkpoint,
                parents: shard.parents.clone(),
                starting_hash_key: shard.hash_range.as_ref().map(|r| r.0.clone()),
                ending_hash_key: shard.hash_range.as_ref().map(|r| r.1.clone()),
                ..Lease::default()
            }
        })
        .collect()
}

/// Listed shards with a descendant (child, grandchild...) among `known`.
fn leased_descendants<'a>(shards: &'a [ShardInfo], known: &HashSet<String>) -> HashSet<&'a str> {
    // Walk up from every leased shard: each ancestor is covered (and visited once).
    let by_id: HashMap<&str, &ShardInfo> = shards.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut covered: HashSet<&str> = HashSet::new();
    let mut stack: Vec<&ShardInfo> = shards.iter().filter(|s| known.contains(&s.id)).collect();
    while let Some(shard) = stack.pop() {
        for parent in &shard.parents {
            if let Some(listed) = by_id.get(parent.as_str())
                && covered.insert(listed.id.as_str())
            {
                stack.push(listed);
            }
        }
    }
    covered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parents: &[&str]) -> ShardInfo {
        ShardInfo {
            id: id.into(),
            parents: parents.iter().map(|p| p.to_string()).collect(),
            closed: false,
            hash_range: None,
        }
    }

    #[test]
    fn a_listed_parent_of_a_child_that_has_not_started_gets_its_lease() {
        let shards = vec![ShardInfo { closed: true, ..shard("0", &[]) }, shard("1", &["0"]), shard("2", &["0"])];
        let child = |key: &str, checkpoint: Position| Lease {
            key: key.into(),
            checkpoint,
            parents: vec!["0".into()],
            ..Lease::default()
        };
        // The children's leases were created and the parent's was not (failed, or cut off).
        let unstarted = [child("1", Position::TrimHorizon), child("2", Position::TrimHorizon)];
        let made: Vec<String> =
            missing(&shards, &Position::TrimHorizon, &unstarted).into_iter().map(|l| l.key).collect();
        assert_eq!(made, ["0"], "the parent's retained records are read, first");
        // Once a child started, the parent was read to its end and its lease deleted.
        let seq = crate::record::SequenceNumber::parse("7").unwrap();
        let started = [child("1", Position::Sequence(seq)), child("2", Position::TrimHorizon)];
        assert!(missing(&shards, &Position::TrimHorizon, &started).is_empty());
    }

    #[test]
    fn ancestors_of_leased_shards_get_no_lease_again() {
        // 0 split into 1 and 2; 2 split into 3 and 4; 5 is unrelated. Only 3 and 4 still have leases.
        let shards = vec![
            shard("0", &[]),
            shard("1", &["0"]),
            shard("2", &["0"]),
            shard("3", &["2"]),
            shard("4", &["2"]),
            shard("5", &[]),
        ];
        let known: HashSet<String> = ["3".to_string(), "4".to_string()].into();
        let covered = leased_descendants(&shards, &known);
        assert_eq!(covered, ["0", "2"].into_iter().collect::<HashSet<&str>>(), "1 and 5 are not ancestors of a lease");
    }
}
