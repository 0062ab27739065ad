//! What the service knows about its own state, for `/readyz` and idle detection: whether the
//! consumer is ACTIVE, when each shard's subscription last delivered an event, how far behind
//! each shard is, and when the last record arrived.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::record::SequenceNumber;

/// A subscription that delivered nothing for this long does not count as established
/// (Kinesis sends an event at least every 5 seconds).
pub const SUBSCRIPTION_STALE: Duration = Duration::from_secs(15);

#[derive(Debug, Default)]
struct ShardStatus {
    /// Reading now (a reader runs for it).
    reading: bool,
    last_event: Option<Instant>,
    millis_behind: i64,
    last_sequence: Option<SequenceNumber>,
}

#[derive(Debug)]
pub struct Health {
    started: Instant,
    consumer_active: AtomicBool,
    destinations: AtomicUsize,
    shards: Mutex<BTreeMap<String, ShardStatus>>,
    /// Records handed to fan-out since start.
    records: AtomicU64,
    last_record: Mutex<Option<Instant>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            started: Instant::now(),
            consumer_active: AtomicBool::new(false),
            destinations: AtomicUsize::new(0),
            shards: Mutex::new(BTreeMap::new()),
            records: AtomicU64::new(0),
            last_record: Mutex::new(None),
        }
    }
}

impl Health {
    fn shards(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ShardStatus>> {
        self.shards.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn consumer_active(&self) {
        self.consumer_active.store(true, Ordering::Relaxed);
    }

    pub fn set_destinations(&self, n: usize) {
        self.destinations.store(n, Ordering::Relaxed);
    }

    pub fn reader_started(&self, shard: &str) {
        let mut shards = self.shards();
        let status = shards.entry(shard.to_string()).or_default();
        status.reading = true;
        status.last_event = None;
    }

    pub fn reader_stopped(&self, shard: &str) {
        if let Some(status) = self.shards().get_mut(shard) {
            status.reading = false;
            status.millis_behind = 0;
        }
    }

    /// One SubscribeToShard event arrived (once per event, not per record).
    pub fn event(&self, shard: &str, millis_behind: i64, records: usize, last: Option<&SequenceNumber>) {
        let now = Instant::now();
        {
            let mut shards = self.shards();
            let status = shards.entry(shard.to_string()).or_default();
            status.last_event = Some(now);
            status.millis_behind = millis_behind;
            if let Some(last) = last {
                status.last_sequence = Some(last.clone());
            }
        }
        if records > 0 {
            self.records.fetch_add(records as u64, Ordering::Relaxed);
            *self.last_record.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        }
    }

    /// `Ok` when the service is ready, else a short reason.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.consumer_active.load(Ordering::Relaxed) {
            return Err("Enhanced Fan-Out consumer is not ACTIVE yet".into());
        }
        if self.destinations.load(Ordering::Relaxed) == 0 {
            return Err("no destination stream discovered".into());
        }
        let shards = self.shards();
        let reading: Vec<(&String, &ShardStatus)> = shards.iter().filter(|(_, s)| s.reading).collect();
        if reading.is_empty() {
            return Err("no shard subscription established".into());
        }
        let stale: Vec<&str> = reading
            .iter()
            .filter(|(_, s)| s.last_event.is_none_or(|t| t.elapsed() > SUBSCRIPTION_STALE))
            .map(|(id, _)| id.as_str())
            .collect();
        if !stale.is_empty() {
            return Err(format!("no subscription event for {} shard(s): {}", stale.len(), stale.join(", ")));
        }
        Ok(())
    }

    /// Every shard being read is caught up (MillisBehindLatest = 0 on its last event).
    pub fn caught_up(&self) -> bool {
        self.shards().values().filter(|s| s.reading).all(|s| s.last_event.is_some() && s.millis_behind == 0)
    }

    /// Time since the last record arrived (or since start, when none has).
    pub fn quiet_for(&self) -> Duration {
        let last = *self.last_record.lock().unwrap_or_else(|p| p.into_inner());
        last.unwrap_or(self.started).elapsed()
    }

    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// The last sequence number handed on, per shard.
    pub fn last_sequences(&self) -> BTreeMap<String, String> {
        self.shards()
            .iter()
            .filter_map(|(id, s)| s.last_sequence.as_ref().map(|seq| (id.clone(), seq.to_string())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_consumer_destinations_and_subscriptions_are_there() {
        let health = Health::default();
        assert!(health.readiness().unwrap_err().contains("consumer"));
        health.consumer_active();
        assert!(health.readiness().unwrap_err().contains("destination"));
        health.set_destinations(2);
        assert!(health.readiness().unwrap_err().contains("subscription"));
        health.reader_started("shardId-1");
        assert!(health.readiness().unwrap_err().contains("shardId-1"));
        health.event("shardId-1", 0, 0, None);
        assert_eq!(health.readiness(), Ok(()));
    }

    #[test]
    fn caught_up_follows_millis_behind() {
        let health = Health::default();
        health.reader_started("a");
        assert!(!health.caught_up(), "no event yet");
        health.event("a", 1200, 5, Some(&SequenceNumber::parse("9").unwrap()));
        assert!(!health.caught_up());
        health.event("a", 0, 0, None);
        assert!(health.caught_up());
        assert_eq!(health.records(), 5);
        assert_eq!(health.last_sequences().get("a").map(String::as_str), Some("9"));
    }
}
