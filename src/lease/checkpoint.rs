//! Checkpoints through the lease: every write is conditional on the lease counter this worker
//! holds, so a worker that lost a lease (and may not know it yet) can never move its checkpoint.
//! This is the lease table's [`CheckpointStore`].

use std::collections::{BTreeSet, HashSet};

use futures::future::BoxFuture;
use tokio::time::Instant;

use super::manager::LeaseManager;
use super::table::{CheckpointWrite, LeaseError, Position};
use crate::checkpoint::{CheckpointError, CheckpointStore, Snapshot};

impl LeaseManager {
    /// Moves a held lease's checkpoint. A lost lease stops its shard and writes nothing.
    pub async fn checkpoint(&self, shard: &str, position: &Position, children: &[String]) -> Result<(), LeaseError> {
        let write = CheckpointWrite { position: Some(position), children, destinations: None };
        self.checkpoint_as_of(shard, &write, None).await
    }

    /// As [`Self::checkpoint`], for a position taken at `as_of`: if the lease was taken again
    /// since, the position belongs to an earlier reading and is not written.
    async fn checkpoint_as_of(
        &self,
        shard: &str,
        write: &CheckpointWrite<'_>,
        as_of: Option<Instant>,
    ) -> Result<(), LeaseError> {
        let mut state = self.state.lock().await;
        let Some(counter) = state.held.get(shard).filter(|h| as_of.is_none_or(|at| h.since <= at)).map(|h| h.counter)
        else {
            return Err(LeaseError::Lost { shard: shard.to_string() });
        };
        let attempt = Instant::now();
        match self.table.write_checkpoint(shard, counter, &self.me, write).await {
            Ok(next) => {
                if write.position == Some(&Position::ShardEnd) {
                    // Done: nothing more to renew; children are taken through the table.
                    state.held.remove(shard);
                    self.unconfirm(shard);
                } else if let Some(h) = state.held.get_mut(shard) {
                    h.counter = next;
                    self.confirm(shard, attempt);
                }
                Ok(())
            }
            Err(err @ LeaseError::Lost { .. }) => {
                self.lose(&mut state, shard, "checkpoint found another owner");
                Err(err)
            }
            Err(err) => Err(err),
        }
    }
}

impl CheckpointStore for LeaseManager {
    /// Every lease's checkpoint and destination positions, as the table holds them now. Which
    /// shards this worker reads, and from where, comes with each lease it takes.
    fn load_snapshot(&self) -> BoxFuture<'_, Result<Snapshot, CheckpointError>> {
        Box::pin(async {
            let leases = self.table.scan().await.map_err(|err| self.store_error(err))?;
            let mut stored = Snapshot::default();
            for lease in leases {
                if !lease.destination_checkpoints.is_empty() {
                    stored.destinations.insert(lease.key.clone(), lease.destination_checkpoints);
                }
                stored.shards.insert(lease.key, lease.checkpoint);
            }
            Ok(stored)
        })
    }

    /// Through the lease, naming the children, so that any worker may take them.
    fn finish<'a>(&'a self, shard: &'a str, children: &'a [String]) -> BoxFuture<'a, Result<(), CheckpointError>> {
        Box::pin(async move {
            self.checkpoint(shard, &Position::ShardEnd, children).await.map_err(|err| self.store_error(err))
        })
    }

    /// One conditional write per held shard: its checkpoint and its destinations' positions.
    /// Only the shards this worker holds, and held when the snapshot was taken, are its to write.
    fn save_snapshot<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        as_of: Instant,
    ) -> BoxFuture<'a, Result<(), CheckpointError>> {
        Box::pin(async move {
            let current: HashSet<String> = {
                let state = self.state.lock().await;
                state.held.iter().filter(|(_, h)| h.since <= as_of).map(|(k, _)| k.clone()).collect()
            };
            let mut failure = None;
            let shards: BTreeSet<&String> = snapshot.shards.keys().chain(snapshot.destinations.keys()).collect();
            for shard in shards.into_iter().filter(|s| current.contains(*s)) {
                let write = CheckpointWrite {
                    position: snapshot.shards.get(shard),
                    children: &[],
                    destinations: snapshot.destinations.get(shard),
                };
                match self.checkpoint_as_of(shard, &write, Some(as_of)).await {
                    Ok(()) | Err(LeaseError::Lost { .. }) => {}
                    Err(err) => failure = Some(err),
                }
            }
            match failure {
                None => Ok(()),
                Some(err) => Err(self.store_error(err)),
            }
        })
    }
}

impl LeaseManager {
    fn store_error(&self, err: LeaseError) -> CheckpointError {
        CheckpointError::Lease { table: self.table.name().to_string(), message: err.to_string() }
    }
}
