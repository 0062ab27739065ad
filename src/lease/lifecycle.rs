//! The lease table follows the stream: leases are created for shards that have none (new children
//! included) and deleted once a shard was read to its end and every child started.

use std::collections::{HashMap, HashSet};

use futures::{StreamExt, stream};

use super::balance;
use super::manager::LeaseManager;
use super::table::{Lease, LeaseError, Position};
use crate::source::shards::ShardInfo;

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
    /// skipped at LATEST), children at their beginning. A closed shard with a descendant that has
    /// a lease gets none: it was read to its end and its lease deleted.
    ///
    /// Which leases exist comes from the lease loop's last look at the table when it is recent
    /// (usually nothing is missing, and nothing is read); a strongly consistent scan confirms
    /// what seems missing before anything is created, so that a lease deleted since is not made
    /// again. Leases are created side by side, in an order of this worker's own, so that workers
    /// starting together do not all try the same ones.
    pub async fn sync(&self, shards: &[ShardInfo], initial: &Position) -> Result<(), LeaseError> {
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
        let created: Vec<(Lease, Result<bool, LeaseError>)> = stream::iter(missing)
            .map(|lease| async move {
                let created = self.table.create_if_absent(&lease).await;
                (lease, created)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for (lease, created) in created {
            if created? {
                tracing::info!(shard = %lease.key, checkpoint = %lease.checkpoint, "Lease created.");
            }
        }
        Ok(())
    }
}

/// The leases to create for listed shards that `leases` lacks.
fn missing(shards: &[ShardInfo], initial: &Position, leases: &[Lease]) -> Vec<Lease> {
    let known: HashSet<String> = leases.iter().map(|l| l.key.clone()).collect();
    let listed: HashSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
    let descended = leased_descendants(shards, &known);
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

/// Listed shards with a descendant (child, grandchild...) that has a lease.
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
