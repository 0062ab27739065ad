//! The lease table in DynamoDB, with the Kinesis Client Library's attribute names so that existing
//! lease-table tooling reads it: `leaseKey` (shard id), `leaseOwner`, `leaseCounter`, `checkpoint`,
//! `checkpointSubSequenceNumber`, `ownerSwitchesSinceCheckpoint`, `parentShardId`, `childShardIds`,
//! `startingHashKey`, `endingHashKey`; and one of its own beside them, `destinationCheckpoints`, a
//! map from destination stream ARN to that destination's own sequence number in the shard.
//!
//! Every write is conditional on `leaseCounter` (and the owner), the fencing token: a worker that
//! lost a lease, however slow, can no longer move its checkpoint.
//!
//! [`LeaseTable`] is the handle the rest of the service holds; what stores the items is a
//! [`LeaseStore`]: DynamoDB ([`super::dynamodb`]) in the service, or the fleet simulation's table in
//! memory (`crate::simulation`, built only for tests and the benchmark).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;

use crate::record::SequenceNumber;

pub use crate::position::Position;

/// One lease item.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lease {
    pub key: String,
    pub owner: Option<String>,
    pub counter: u64,
    pub checkpoint: Position,
    pub owner_switches: u64,
    pub parents: Vec<String>,
    pub children: Vec<String>,
    pub starting_hash_key: Option<String>,
    pub ending_hash_key: Option<String>,
    /// Each destination's own position (stream ARN → sequence number), where one was stored.
    pub destination_checkpoints: BTreeMap<String, SequenceNumber>,
}

/// What one checkpoint write changes on a held lease.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckpointWrite<'a> {
    /// The shard's checkpoint; `None` leaves it as it is.
    pub position: Option<&'a Position>,
    pub children: &'a [String],
    /// Replaces `destinationCheckpoints` when given.
    pub destinations: Option<&'a BTreeMap<String, SequenceNumber>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The condition on `leaseCounter`/`leaseOwner` failed: someone else holds the lease now.
    #[error("lease {shard} is no longer held by this worker")]
    Lost { shard: String },
    #[error("lease table {table}: {operation} failed: {message}")]
    DynamoDb { table: String, operation: &'static str, message: String, transient: bool },
    #[error("lease table {table} holds a malformed item: {reason}")]
    Malformed { table: String, reason: String },
    #[error("lease table {table} did not become ACTIVE within {waited:?}")]
    NotActive { table: String, waited: Duration },
}

/// The counter after `counter` in table `table`, refused at the top of the range.
pub(crate) fn next_counter(table: &str, key: &str, counter: u64) -> Result<u64, LeaseError> {
    counter.checked_add(1).ok_or_else(|| LeaseError::Malformed {
        table: table.to_string(),
        reason: format!("lease {key}: leaseCounter {counter} is at its maximum and cannot move on"),
    })
}

/// Items whose key starts with this are notes of the operator tools, never leases (a shard id
/// cannot start with it).
pub const NOTE_PREFIX: &str = "dead-letters/";

/// What a scan found: the leases, and the items that cannot be read as leases.
pub type Scanned = (Vec<Lease>, Vec<Unreadable>);

/// What keeps the lease items: every write conditional as [`LeaseTable`] describes it. Scans leave
/// out the notes (keys under [`NOTE_PREFIX`]) and report the items they cannot read.
pub trait LeaseStore: Send + Sync + std::fmt::Debug {
    /// The table's name, for messages.
    fn name(&self) -> &str;
    /// Creates the table when `create` and it is missing, then waits until it can be used.
    fn ensure(&self, create: bool) -> BoxFuture<'_, Result<(), LeaseError>>;
    fn note<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, LeaseError>>;
    fn set_note<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), LeaseError>>;
    /// Every lease, and every item that cannot be read as one.
    fn scan(&self, consistent: bool) -> BoxFuture<'_, Result<Scanned, LeaseError>>;
    fn create_if_absent<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<bool, LeaseError>>;
    fn take<'a>(&'a self, key: &'a str, expected: u64, me: &'a str) -> BoxFuture<'a, Result<u64, LeaseError>>;
    fn renew<'a>(&'a self, key: &'a str, counter: u64, me: &'a str) -> BoxFuture<'a, Result<u64, LeaseError>>;
    fn write_checkpoint<'a>(
        &'a self,
        key: &'a str,
        counter: u64,
        me: &'a str,
        write: &'a CheckpointWrite<'a>,
    ) -> BoxFuture<'a, Result<u64, LeaseError>>;
    fn release<'a>(&'a self, key: &'a str, counter: u64, me: &'a str) -> BoxFuture<'a, Result<(), LeaseError>>;
    fn delete_finished<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, LeaseError>>;
}

/// The lease table, as every part of the service uses it.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    store: Arc<dyn LeaseStore>,
    /// Items that cannot be read as leases, each logged and counted once.
    unreadable: Arc<UnreadableLog>,
}

/// An item of the lease table that is not a lease this service can read: skipped by every scan,
/// so no worker takes or steals it (and one bad row never stops the takeovers of the others).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// Its `leaseKey`, when it has a readable one.
    pub key: Option<String>,
    pub reason: String,
}

/// Which unreadable items were reported already.
#[derive(Debug, Default)]
struct UnreadableLog {
    seen: Mutex<BTreeSet<String>>,
    counter: OnceLock<prometheus::IntCounter>,
}

impl UnreadableLog {
    fn note(&self, table: &str, item: &Unreadable) {
        let id = item.key.clone().unwrap_or_else(|| format!("(no leaseKey) {}", item.reason));
        if !self.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(id) {
            return;
        }
        if let Some(counter) = self.counter.get() {
            counter.inc();
        }
        tracing::warn!(table, key = item.key.as_deref().unwrap_or("(none)"), reason = %item.reason, "A lease table item cannot be read; it is skipped: no worker takes or steals it. Fix or delete it.");
    }
}

impl LeaseTable {
    pub fn with_store(store: Arc<dyn LeaseStore>) -> Self {
        LeaseTable { store, unreadable: Arc::default() }
    }

    /// Counts unreadable items (each once) in `counter`.
    pub fn count_unreadable(self, counter: prometheus::IntCounter) -> Self {
        let _ = self.unreadable.counter.set(counter);
        self
    }

    pub fn name(&self) -> &str {
        self.store.name()
    }

    /// Creates the table (on-demand, hash key `leaseKey`) when `create` and it is missing, then
    /// waits until it is ACTIVE.
    pub async fn ensure(&self, create: bool) -> Result<(), LeaseError> {
        self.store.ensure(create).await
    }

    /// A note kept in the table under `key` (which must start with [`NOTE_PREFIX`]).
    pub async fn note(&self, key: &str) -> Result<Option<String>, LeaseError> {
        self.store.note(key).await
    }

    /// Keeps a note under `key` (which must start with [`NOTE_PREFIX`]: never a shard's lease).
    pub async fn set_note(&self, key: &str, value: &str) -> Result<(), LeaseError> {
        debug_assert!(key.starts_with(NOTE_PREFIX));
        self.store.set_note(key, value).await
    }

    /// Every lease (paginated, strongly consistent scan).
    pub async fn scan(&self) -> Result<Vec<Lease>, LeaseError> {
        Ok(self.scan_with_unreadable().await?.0)
    }

    /// Every lease, as an eventually consistent scan sees them (half the read units: the lease
    /// loop's periodic look at the table, where every write it then makes is conditional anyway).
    pub async fn scan_eventually(&self) -> Result<Vec<Lease>, LeaseError> {
        Ok(self.scan_all(false).await?.0)
    }

    /// Every lease, and every item that cannot be read as one (strongly consistent), for the
    /// operator's `leases` command.
    pub async fn scan_with_unreadable(&self) -> Result<Scanned, LeaseError> {
        self.scan_all(true).await
    }

    async fn scan_all(&self, consistent: bool) -> Result<Scanned, LeaseError> {
        let (mut leases, unreadable) = self.store.scan(consistent).await?;
        // Every store leaves the notes out; a new one that forgot would hand them out as leases.
        leases.retain(|l| !l.key.starts_with(NOTE_PREFIX));
        for item in &unreadable {
            self.unreadable.note(self.name(), item);
        }
        Ok((leases, unreadable))
    }

    /// Creates a lease unless one exists for the shard.
    pub async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError> {
        self.store.create_if_absent(lease).await
    }

    /// Takes a lease whose counter is `expected` (free, expired, or stolen). Returns the new counter.
    pub async fn take(&self, key: &str, expected: u64, me: &str) -> Result<u64, LeaseError> {
        self.store.take(key, expected, me).await
    }

    /// Proves this worker is alive: bumps the counter it holds.
    pub async fn renew(&self, key: &str, counter: u64, me: &str) -> Result<u64, LeaseError> {
        self.store.renew(key, counter, me).await
    }

    /// Moves the checkpoint of a lease this worker holds (KCL: sub-sequence 0 for whole records).
    pub async fn checkpoint(
        &self,
        key: &str,
        counter: u64,
        me: &str,
        position: &Position,
        children: &[String],
    ) -> Result<u64, LeaseError> {
        let write = CheckpointWrite { position: Some(position), children, destinations: None };
        self.write_checkpoint(key, counter, me, &write).await
    }

    /// As [`Self::checkpoint`], with destination positions, or those alone.
    pub async fn write_checkpoint(
        &self,
        key: &str,
        counter: u64,
        me: &str,
        write: &CheckpointWrite<'_>,
    ) -> Result<u64, LeaseError> {
        let write = *write;
        self.store.write_checkpoint(key, counter, me, &write).await
    }

    /// Gives a lease up so that another worker takes it at once.
    pub async fn release(&self, key: &str, counter: u64, me: &str) -> Result<(), LeaseError> {
        self.store.release(key, counter, me).await
    }

    /// Deletes a lease read to its end (conditional on `SHARD_END`, so nothing else is ever
    /// deleted). Returns false when it was gone or changed already.
    pub async fn delete_finished(&self, key: &str) -> Result<bool, LeaseError> {
        self.store.delete_finished(key).await
    }
}
