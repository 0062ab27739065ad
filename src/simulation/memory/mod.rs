//! An in-memory lease table with DynamoDB's semantics, for the fleet simulation: conditional
//! writes on `leaseCounter`/`leaseOwner`, paginated scans (1 MB pages, strongly or eventually
//! consistent), and DynamoDB's request units counted the way on-demand billing counts them (a write
//! is 1 unit per KB of the larger of the old and new item, charged even when its condition fails; a
//! scan page is 1 unit per 4 KB read, half that when eventually consistent).
//!
//! It also keeps what the simulation checks: every change of owner, and a checkpoint that moves
//! backwards. Faults: a latency per call, throttling of a share of calls (seeded), and clients cut
//! off from the table (their calls time out).

mod billing;
mod store;

pub use billing::item_bytes;
use billing::write_units;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::lease::table::{
    CheckpointWrite, Lease, LeaseError, LeaseTable, NOTE_PREFIX, Position, Scanned, next_counter,
};

/// DynamoDB's largest scan page.
const PAGE_BYTES: usize = 1 << 20;

/// Request units used, and calls made, since the table was created.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub read_units: f64,
    pub write_units: f64,
    pub read_calls: u64,
    pub write_calls: u64,
    pub throttled: u64,
    pub timed_out: u64,
}

/// A lease changed owner.
#[derive(Debug, Clone)]
pub struct Takeover {
    pub at: Instant,
    pub shard: String,
    pub from: Option<String>,
    pub to: String,
}

/// What the table can be made to do wrong.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Every call takes this long.
    pub latency: Duration,
    /// Share of attempts refused with a throttling error (0.0 to 1.0); a call is retried as the
    /// SDK does.
    pub throttle: f64,
    /// Clients whose calls time out after `timeout`.
    pub cut_off: BTreeSet<String>,
    pub timeout: Duration,
    /// Accept every write whatever its condition (only to prove the simulation notices).
    pub ignore_conditions: bool,
}

#[derive(Debug)]
struct Inner {
    items: BTreeMap<String, Lease>,
    notes: BTreeMap<String, String>,
    faults: Faults,
    rng: StdRng,
    usage: Usage,
    takeovers: Vec<Takeover>,
    /// When each shard's checkpoint was set to SHARD_END.
    ended: BTreeMap<String, Instant>,
    violations: Vec<String>,
}

/// The table, shared by every simulated worker.
#[derive(Debug)]
pub struct MemoryTable {
    inner: Mutex<Inner>,
}

/// How one worker reaches the memory table.
#[derive(Debug, Clone)]
struct MemoryLink {
    table: Arc<MemoryTable>,
    client: String,
}

/// Where a checkpoint stands, for "never backwards": starting points, then records, then the end.
fn rank(position: &Position) -> (u8, Option<&crate::record::SequenceNumber>) {
    match position {
        Position::TrimHorizon | Position::Latest | Position::AtTimestamp(_) => (0, None),
        Position::At(seq) | Position::Sequence(seq) => (1, Some(seq)),
        Position::ShardEnd => (2, None),
    }
}

enum Kind {
    Read,
    Write,
}

impl MemoryTable {
    pub fn new(seed: u64, faults: Faults) -> Arc<Self> {
        Arc::new(MemoryTable {
            inner: Mutex::new(Inner {
                items: BTreeMap::new(),
                notes: BTreeMap::new(),
                faults,
                rng: StdRng::seed_from_u64(seed),
                usage: Usage::default(),
                takeovers: Vec::new(),
                ended: BTreeMap::new(),
                violations: Vec::new(),
            }),
        })
    }

    /// `client`'s way into the table.
    pub fn link(self: &Arc<Self>, client: impl Into<String>) -> LeaseTable {
        LeaseTable::with_store(Arc::new(MemoryLink { table: Arc::clone(self), client: client.into() }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    pub fn usage(&self) -> Usage {
        self.lock().usage
    }

    pub fn leases(&self) -> Vec<Lease> {
        self.lock().items.values().cloned().collect()
    }

    pub fn lease(&self, key: &str) -> Option<Lease> {
        self.lock().items.get(key).cloned()
    }

    pub fn takeovers(&self) -> Vec<Takeover> {
        self.lock().takeovers.clone()
    }

    /// When the shard's checkpoint became SHARD_END, if it did.
    pub fn ended_at(&self, key: &str) -> Option<Instant> {
        self.lock().ended.get(key).copied()
    }

    /// Checkpoints that moved backwards.
    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }
}

impl MemoryLink {
    fn error(&self, operation: &'static str, message: &str) -> LeaseError {
        LeaseError::DynamoDb { table: "memory".into(), operation, message: message.into(), transient: true }
    }

    /// Waits the call's latency (or timeout), then decides whether it is throttled. A throttled
    /// attempt is retried as the SDK's standard retry mode does (three attempts in all, with
    /// backoff); the call fails only when every attempt was throttled.
    async fn call(&self, operation: &'static str, kind: Kind) -> Result<(), LeaseError> {
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            // Decided under the lock, waited for outside it.
            let (cut, throttled, wait) = {
                let mut inner = self.table.lock();
                if attempt == 1 {
                    match kind {
                        Kind::Read => inner.usage.read_calls += 1,
                        Kind::Write => inner.usage.write_calls += 1,
                    }
                }
                let share = inner.faults.throttle.clamp(0.0, 1.0);
                if inner.faults.cut_off.contains(&self.client) {
                    inner.usage.timed_out += 1;
                    (true, false, inner.faults.timeout)
                } else if share > 0.0 && inner.rng.random_bool(share) {
                    inner.usage.throttled += 1;
                    (false, true, inner.faults.latency)
                } else {
                    (false, false, inner.faults.latency)
                }
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            if cut {
                return Err(self.error(operation, "timed out: the table cannot be reached"));
            }
            if !throttled {
                return Ok(());
            }
            if attempt == ATTEMPTS {
                return Err(self.error(operation, "ProvisionedThroughputExceededException: throttled (simulated)"));
            }
            // The SDK's backoff, doubling from 40 ms (without jitter: a seed's run stays the same).
            tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
        }
        unreachable!("the last attempt returns")
    }

    async fn note(&self, key: &str) -> Result<Option<String>, LeaseError> {
        self.call("GetItem", Kind::Read).await?;
        let mut inner = self.table.lock();
        inner.usage.read_units += 1.0;
        Ok(inner.notes.get(key).cloned())
    }

    async fn set_note(&self, key: &str, value: &str) -> Result<(), LeaseError> {
        self.call("PutItem", Kind::Write).await?;
        let mut inner = self.table.lock();
        inner.usage.write_units += 1.0;
        inner.notes.insert(key.to_string(), value.to_string());
        Ok(())
    }

    /// One page of a scan from after `start`.
    async fn scan_page(
        &self,
        start: Option<&str>,
        consistent: bool,
    ) -> Result<(Vec<Lease>, Option<String>), LeaseError> {
        self.call("Scan", Kind::Read).await?;
        let mut inner = self.table.lock();
        let mut bytes = 0;
        let mut page = Vec::new();
        let mut last = None;
        let from = match start {
            Some(key) => std::ops::Bound::Excluded(key.to_string()),
            None => std::ops::Bound::Unbounded,
        };
        for (key, lease) in inner.items.range((from, std::ops::Bound::Unbounded)) {
            if bytes >= PAGE_BYTES {
                last = page.last().map(|l: &Lease| l.key.clone());
                break;
            }
            bytes += item_bytes(lease);
            page.push(lease.clone());
            let _ = key;
        }
        let units = bytes.div_ceil(4096).max(1) as f64;
        inner.usage.read_units += if consistent { units } else { units / 2.0 };
        Ok((page, last))
    }

    /// Every lease, page by page as DynamoDB would answer (and bill) the scan.
    async fn scan_all(&self, consistent: bool) -> Result<Scanned, LeaseError> {
        let mut leases = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let (page, next) = self.scan_page(start.as_deref(), consistent).await?;
            leases.extend(page.into_iter().filter(|l| !l.key.starts_with(NOTE_PREFIX)));
            match next {
                Some(key) => start = Some(key),
                None => return Ok((leases, Vec::new())),
            }
        }
    }

    async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError> {
        self.call("PutItem", Kind::Write).await?;
        let mut inner = self.table.lock();
        let fresh = Lease { owner: None, counter: 0, owner_switches: 0, children: Vec::new(), ..lease.clone() };
        inner.usage.write_units += write_units(item_bytes(&fresh));
        if inner.items.contains_key(&lease.key) && !inner.faults.ignore_conditions {
            return Ok(false);
        }
        inner.items.insert(lease.key.clone(), fresh);
        Ok(true)
    }

    /// A conditional update: `expected` counter (and owner, when given), then `change`.
    async fn update(
        &self,
        key: &str,
        expected: u64,
        owner: Option<&str>,
        change: impl FnOnce(&mut Lease),
    ) -> Result<u64, LeaseError> {
        self.call("UpdateItem", Kind::Write).await?;
        let now = Instant::now();
        let mut inner = self.table.lock();
        let inner = &mut *inner;
        let lost = || LeaseError::Lost { shard: key.to_string() };
        let Some(lease) = inner.items.get_mut(key) else {
            inner.usage.write_units += 1.0;
            return Err(lost());
        };
        let before = item_bytes(lease);
        let holds = lease.counter == expected && owner.is_none_or(|o| lease.owner.as_deref() == Some(o));
        if !holds && !inner.faults.ignore_conditions {
            inner.usage.write_units += write_units(before);
            return Err(lost());
        }
        let next = next_counter("memory", key, expected)?;
        let previous = lease.clone();
        change(lease);
        lease.counter = next;
        inner.usage.write_units += write_units(before.max(item_bytes(lease)));
        if lease.owner != previous.owner
            && let Some(to) = &lease.owner
        {
            inner.takeovers.push(Takeover {
                at: now,
                shard: key.to_string(),
                from: previous.owner.clone(),
                to: to.clone(),
            });
        }
        if lease.checkpoint != previous.checkpoint {
            if rank(&lease.checkpoint) < rank(&previous.checkpoint) {
                inner.violations.push(format!(
                    "checkpoint of {key} moved backwards from {} to {} (written by {:?})",
                    previous.checkpoint, lease.checkpoint, owner
                ));
            }
            if lease.checkpoint == Position::ShardEnd {
                inner.ended.insert(key.to_string(), now);
            }
        }
        Ok(lease.counter)
    }

    async fn take(&self, key: &str, expected: u64, me: &str) -> Result<u64, LeaseError> {
        self.update(key, expected, None, |l| {
            l.owner = Some(me.to_string());
            l.owner_switches += 1;
        })
        .await
    }

    async fn renew(&self, key: &str, counter: u64, me: &str) -> Result<u64, LeaseError> {
        self.update(key, counter, Some(me), |_| {}).await
    }

    async fn write_checkpoint(
        &self,
        key: &str,
        counter: u64,
        me: &str,
        write: &CheckpointWrite<'_>,
    ) -> Result<u64, LeaseError> {
        self.update(key, counter, Some(me), |l| {
            if let Some(position) = write.position {
                l.checkpoint = position.clone();
                l.owner_switches = 0;
            }
            if !write.children.is_empty() {
                l.children = write.children.to_vec();
            }
            if let Some(destinations) = write.destinations {
                l.destination_checkpoints = destinations.clone();
            }
        })
        .await
    }

    async fn release(&self, key: &str, counter: u64, me: &str) -> Result<(), LeaseError> {
        self.update(key, counter, Some(me), |l| l.owner = None).await.map(|_| ())
    }

    async fn delete_finished(&self, key: &str) -> Result<bool, LeaseError> {
        self.call("DeleteItem", Kind::Write).await?;
        let mut inner = self.table.lock();
        let Some((bytes, ended)) = inner.items.get(key).map(|l| (item_bytes(l), l.checkpoint == Position::ShardEnd))
        else {
            inner.usage.write_units += 1.0;
            return Ok(false);
        };
        inner.usage.write_units += write_units(bytes);
        if !ended && !inner.faults.ignore_conditions {
            return Ok(false);
        }
        inner.items.remove(key);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(table: &Arc<MemoryTable>, client: &str) -> MemoryLink {
        MemoryLink { table: Arc::clone(table), client: client.into() }
    }

    #[tokio::test]
    async fn writes_are_conditional_on_the_counter_and_owner() {
        let table = MemoryTable::new(1, Faults::default());
        let a = link(&table, "a");
        assert!(a.create_if_absent(&Lease { key: "s".into(), ..Lease::default() }).await.unwrap());
        assert!(!a.create_if_absent(&Lease { key: "s".into(), ..Lease::default() }).await.unwrap());
        assert_eq!(a.take("s", 0, "a").await.unwrap(), 1);
        assert!(matches!(a.take("s", 0, "b").await, Err(LeaseError::Lost { .. })), "stale counter");
        assert!(matches!(a.renew("s", 1, "b").await, Err(LeaseError::Lost { .. })), "not the owner");
        assert_eq!(a.renew("s", 1, "a").await.unwrap(), 2);
        assert_eq!(table.takeovers().len(), 1);
        assert!(!a.delete_finished("s").await.unwrap(), "not read to its end");
        let usage = table.usage();
        assert_eq!(usage.write_calls, 7);
        assert!(usage.write_units >= 7.0, "failed conditions are charged too: {usage:?}");
    }

    #[tokio::test]
    async fn a_checkpoint_moving_backwards_is_noted() {
        let table = MemoryTable::new(1, Faults::default());
        let a = link(&table, "a");
        a.create_if_absent(&Lease { key: "s".into(), ..Lease::default() }).await.unwrap();
        let c = a.take("s", 0, "a").await.unwrap();
        let seq = |s: &str| Position::Sequence(crate::record::SequenceNumber::parse(s).unwrap());
        fn write(p: &Position) -> CheckpointWrite<'_> {
            CheckpointWrite { position: Some(p), ..CheckpointWrite::default() }
        }
        let c = a.write_checkpoint("s", c, "a", &write(&seq("20"))).await.unwrap();
        assert!(table.violations().is_empty());
        a.write_checkpoint("s", c, "a", &write(&seq("10"))).await.unwrap();
        assert_eq!(table.violations().len(), 1);
    }

    #[tokio::test]
    async fn scans_are_paged_and_charged_per_4_kb() {
        let table = MemoryTable::new(1, Faults::default());
        let a = link(&table, "a");
        for i in 0..5000 {
            let key = format!("shardId-{i:012}");
            a.create_if_absent(&Lease { key, ..Lease::default() }).await.unwrap();
        }
        let before = table.usage().read_units;
        let (mut all, mut next) = a.scan_page(None, false).await.unwrap();
        let mut pages = 1;
        while let Some(start) = next {
            let (page, after) = a.scan_page(Some(&start), false).await.unwrap();
            all.extend(page);
            next = after;
            pages += 1;
        }
        assert_eq!(all.len(), 5000);
        let bytes: usize = all.iter().map(item_bytes).sum();
        assert!(pages >= bytes / PAGE_BYTES, "{pages} pages for {bytes} bytes");
        let units = table.usage().read_units - before;
        assert!((units - bytes as f64 / 8192.0).abs() <= pages as f64, "{units} units for {bytes} bytes");
    }
}
