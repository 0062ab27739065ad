//! What the service knows about its own state, for `/readyz` and idle detection: whether the
//! consumer is ACTIVE, when each shard's subscription last delivered an event, how far behind
//! each shard is, and when the last record arrived.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::record::SequenceNumber;

/// Reading spans kept for inspection (tests and debugging); older closed ones are forgotten.
const MAX_SPANS: usize = 4096;

/// A subscription that delivered nothing for this long does not count as established
/// (Kinesis sends an event at least every 5 seconds).
pub const SUBSCRIPTION_STALE: Duration = Duration::from_secs(15);

#[derive(Debug, Default)]
struct ShardStatus {
    /// Reading now (a reader runs for it).
    reading: bool,
    /// Waiting for buffer space in a destination (backpressure): no event is expected meanwhile.
    paused: bool,
    last_event: Option<Instant>,
    millis_behind: i64,
    last_sequence: Option<SequenceNumber>,
}

#[derive(Debug)]
pub struct Health {
    started: Instant,
    consumer_active: AtomicBool,
    /// The source decided which shards this worker reads (all, or its leases).
    assigned: AtomicBool,
    destinations: AtomicUsize,
    shards: Mutex<BTreeMap<String, ShardStatus>>,
    /// Records handed to fan-out since start.
    records: AtomicU64,
    last_record: Mutex<Option<Instant>>,
    /// When each shard was read, for operators' debugging and for tests proving that no two
    /// workers read one shard at once.
    spans: Mutex<Vec<ReadingSpan>>,
    /// Groups whose role could not be assumed at the last try, with why.
    credentials: Mutex<BTreeMap<String, String>>,
}

/// One reading of one shard by this process.
#[derive(Debug, Clone)]
pub struct ReadingSpan {
    pub shard: String,
    pub started: Instant,
    pub stopped: Option<Instant>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            started: Instant::now(),
            consumer_active: AtomicBool::new(false),
            assigned: AtomicBool::new(false),
            destinations: AtomicUsize::new(0),
            shards: Mutex::new(BTreeMap::new()),
            records: AtomicU64::new(0),
            last_record: Mutex::new(None),
            spans: Mutex::new(Vec::new()),
            credentials: Mutex::new(BTreeMap::new()),
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

    pub fn shards_assigned(&self) {
        self.assigned.store(true, Ordering::Relaxed);
    }

    pub fn set_destinations(&self, n: usize) {
        self.destinations.store(n, Ordering::Relaxed);
    }

    pub fn reader_started(&self, shard: &str) {
        let mut shards = self.shards();
        let status = shards.entry(shard.to_string()).or_default();
        status.reading = true;
        status.last_event = None;
        drop(shards);
        let span = ReadingSpan { shard: shard.to_string(), started: Instant::now(), stopped: None };
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        // A service runs for months and leases move: keep the recent history only, never an
        // open span.
        if spans.len() >= MAX_SPANS
            && let Some(oldest_closed) = spans.iter().position(|s| s.stopped.is_some())
        {
            spans.remove(oldest_closed);
        }
        spans.push(span);
    }

    /// Every reading of a shard so far (open ones have no `stopped`).
    pub fn reading_spans(&self) -> Vec<ReadingSpan> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn reader_stopped(&self, shard: &str) {
        if let Some(status) = self.shards().get_mut(shard) {
            status.reading = false;
            status.millis_behind = 0;
        }
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(span) = spans.iter_mut().rev().find(|s| s.shard == shard && s.stopped.is_none()) {
            span.stopped = Some(Instant::now());
        }
    }

    /// The shard's reader waits for buffer space (`true`) or goes on (`false`): a paused shard
    /// receives no event, and is healthy.
    pub fn paused(&self, shard: &str, paused: bool) {
        let mut shards = self.shards();
        let status = shards.entry(shard.to_string()).or_default();
        status.paused = paused;
        if !paused {
            // Waiting was not silence: the next event is due from now on.
            status.last_event = Some(Instant::now());
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

    /// The last attempt to assume `group`'s role failed (with why), or succeeded (`None`).
    pub fn credentials(&self, group: &str, failure: Option<String>) {
        let mut failing = self.credentials.lock().unwrap_or_else(|e| e.into_inner());
        match failure {
            Some(why) => failing.insert(group.to_string(), why),
            None => failing.remove(group),
        };
    }

    /// `Ok` when the service is ready, else a short reason.
    pub fn readiness(&self) -> Result<(), String> {
        if let Some((group, why)) = self.credentials.lock().unwrap_or_else(|e| e.into_inner()).iter().next() {
            return Err(format!("cannot assume the role of {group}: {why}"));
        }
        if !self.consumer_active.load(Ordering::Relaxed) {
            return Err("Enhanced Fan-Out consumer is not ACTIVE yet".into());
        }
        if self.destinations.load(Ordering::Relaxed) == 0 {
            return Err("no destination stream discovered".into());
        }
        if !self.assigned.load(Ordering::Relaxed) {
            return Err("shards not assigned yet".into());
        }
        // A worker holding no lease (more workers than shards) reads nothing and is still ready.
        let shards = self.shards();
        let reading: Vec<(&String, &ShardStatus)> = shards.iter().filter(|(_, s)| s.reading).collect();
        let stale: Vec<&str> = reading
            .iter()
            .filter(|(_, s)| !s.paused && s.last_event.is_none_or(|t| t.elapsed() > SUBSCRIPTION_STALE))
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
        assert!(health.readiness().unwrap_err().contains("assigned"));
        health.shards_assigned();
        assert_eq!(health.readiness(), Ok(()), "nothing to read yet is not a failure");
        health.reader_started("shardId-1");
        assert!(health.readiness().unwrap_err().contains("shardId-1"));
        health.event("shardId-1", 0, 0, None);
        assert_eq!(health.readiness(), Ok(()));
    }

    #[test]
    fn a_shard_paused_by_backpressure_is_not_stale() {
        let health = Health::default();
        health.consumer_active();
        health.set_destinations(1);
        health.shards_assigned();
        health.reader_started("s");
        health.paused("s", true);
        assert_eq!(health.readiness(), Ok(()), "waiting for buffer space is ordinary");
        health.paused("s", false);
        assert_eq!(health.readiness(), Ok(()), "the wait counts as activity");
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

    #[test]
    fn reading_history_is_bounded_and_keeps_open_spans() {
        let health = Health::default();
        health.reader_started("open");
        for _ in 0..MAX_SPANS + 10 {
            health.reader_started("moving");
            health.reader_stopped("moving");
        }
        let spans = health.reading_spans();
        assert_eq!(spans.len(), MAX_SPANS);
        assert!(spans.iter().any(|s| s.shard == "open" && s.stopped.is_none()));
    }
}
