//! The simulated shards and what happened to them: who read which shard when, and the checks on every step.

use super::*;

pub(super) struct ShardReading {
    pub(super) worker: String,
    pub(super) start: Instant,
    pub(super) stop: Option<Instant>,
}

pub(super) struct SimShard {
    pub(super) parents: Vec<String>,
    pub(super) children: Vec<String>,
    pub(super) closed_at: Option<Instant>,
    pub(super) hash_range: (String, String),
    /// Since when nobody reads it (from its creation, the end of a reading, or a death).
    pub(super) unread_since: Option<Instant>,
}

/// The fleet's shared truth, for the checks.
pub(super) struct World {
    pub(super) epoch: Instant,
    pub(super) shards: BTreeMap<String, SimShard>,
    pub(super) readings: BTreeMap<String, Vec<ShardReading>>,
    pub(super) violations: Vec<String>,
    pub(super) requests: usize,
    pub(super) records_written: usize,
    pub(super) records_read: usize,
    /// Shards whose reader died at the instant, not read again yet.
    pub(super) orphans: BTreeMap<String, Instant>,
    pub(super) longest_unread: Duration,
    pub(super) longest_failover: Duration,
    pub(super) bound: Duration,
    pub(super) table: Arc<MemoryTable>,
}

impl World {
    pub(super) fn at(&self, t: Instant) -> f64 {
        (t - self.epoch).as_secs_f64()
    }

    pub(super) fn infos(&self) -> Vec<ShardInfo> {
        self.shards
            .iter()
            .map(|(id, s)| ShardInfo {
                id: id.clone(),
                parents: s.parents.clone(),
                closed: s.closed_at.is_some(),
                hash_range: Some(s.hash_range.clone()),
            })
            .collect()
    }

    pub(super) fn violation(&mut self, text: String) {
        if self.violations.len() < 100 {
            self.violations.push(text);
        }
    }

    /// `worker` starts reading `shard` now: nobody else may be, and its parents must be done.
    pub(super) fn start(&mut self, shard: &str, worker: &str, now: Instant) {
        let at = self.at(now);
        let readings = self.readings.entry(shard.to_string()).or_default();
        let mut problems = Vec::new();
        for r in readings.iter().filter(|r| r.stop.is_none()) {
            problems.push(format!("{at:.1}s: {worker} starts {shard} while {} reads it", r.worker));
        }
        readings.push(ShardReading { worker: worker.to_string(), start: now, stop: None });
        let parents = self.shards.get(shard).map(|s| s.parents.clone()).unwrap_or_default();
        for parent in parents {
            let ended = self.table.ended_at(&parent).is_some_and(|t| t <= now);
            let still_read = self.readings.get(&parent).is_some_and(|rs| rs.iter().any(|r| r.stop.is_none()));
            if !ended || still_read {
                problems
                    .push(format!("{at:.1}s: {worker} starts {shard} before its parent {parent} was read to its end"));
            }
        }
        for p in problems {
            self.violation(p);
        }
        if let Some(s) = self.shards.get_mut(shard)
            && let Some(since) = s.unread_since.take()
        {
            self.longest_unread = self.longest_unread.max(now - since);
        }
        if let Some(died) = self.orphans.remove(shard) {
            self.longest_failover = self.longest_failover.max(now - died);
        }
    }

    /// `worker` stopped reading `shard` now (its requests in flight are checked as they land).
    pub(super) fn stop(&mut self, shard: &str, worker: &str, now: Instant, ended: bool) {
        if let Some(r) = self
            .readings
            .get_mut(shard)
            .and_then(|rs| rs.iter_mut().rev().find(|r| r.worker == worker && r.stop.is_none()))
        {
            r.stop = Some(now);
        }
        if !ended && let Some(s) = self.shards.get_mut(shard) {
            s.unread_since.get_or_insert(now);
        }
    }

    /// A PutRecords of `worker` carrying `records` records lands now; `readings` names the shard
    /// readings they came from (shard, index among the shard's readings). No other worker may
    /// have started reading one of those shards since.
    pub(super) fn landed(&mut self, readings: &BTreeSet<(String, usize)>, worker: &str, records: usize, now: Instant) {
        self.requests += 1;
        self.records_written += records;
        let at = self.at(now);
        let mut problems = Vec::new();
        for (shard, index) in readings {
            let later = self.readings.get(shard).and_then(|rs| rs.iter().skip(index + 1).find(|r| r.worker != worker));
            if let Some(newer) = later {
                problems.push(format!(
                    "{at:.1}s: a request of {worker} with records of {shard} lands {:.1}s after {} started reading it",
                    (now - newer.start).as_secs_f64(),
                    newer.worker
                ));
            }
        }
        for p in problems {
            self.violation(p);
        }
    }

    /// Shards `worker` reads now.
    pub(super) fn read_by(&self, worker: &str) -> Vec<String> {
        self.readings
            .iter()
            .filter(|(_, rs)| rs.iter().any(|r| r.worker == worker && r.stop.is_none()))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The record clock of a shard: the newest sequence it holds now.
    pub(super) fn head(&self, shard: &str, now: Instant) -> u64 {
        let end = self.shards.get(shard).and_then(|s| s.closed_at).map_or(now, |c| c.min(now));
        (end - self.epoch).as_millis() as u64
    }

    pub(super) fn ended(&self, shard: &str, position: u64) -> bool {
        self.shards
            .get(shard)
            .and_then(|s| s.closed_at)
            .is_some_and(|c| position >= (c - self.epoch).as_millis() as u64)
    }

    /// Splits `count` open shards (chosen by `rng`) in two.
    pub(super) fn split(&mut self, count: usize, now: Instant, rng: &mut StdRng) {
        let open: Vec<String> = self
            .shards
            .iter()
            .filter(|(_, s)| s.closed_at.is_none() && s.children.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        let mut chosen: BTreeSet<String> = BTreeSet::new();
        while chosen.len() < count.min(open.len()) {
            chosen.insert(open[rng.random_range(0..open.len())].clone());
        }
        let mut next = self.shards.len();
        for parent in chosen {
            let (lo, hi) = self.shards[&parent].hash_range.clone();
            let (lo_n, hi_n): (u128, u128) = (lo.parse().unwrap_or(0), hi.parse().unwrap_or(u128::MAX));
            let mid = lo_n + (hi_n - lo_n) / 2;
            let mut children = Vec::new();
            for range in [(lo_n, mid), (mid + 1, hi_n)] {
                let id = shard_id(next);
                next += 1;
                children.push(id.clone());
                self.shards.insert(
                    id,
                    SimShard {
                        parents: vec![parent.clone()],
                        children: Vec::new(),
                        closed_at: None,
                        hash_range: (range.0.to_string(), range.1.to_string()),
                        unread_since: Some(now),
                    },
                );
            }
            let p = self.shards.get_mut(&parent).expect("listed");
            p.closed_at = Some(now);
            p.children = children;
        }
    }
}

pub(super) fn shard_id(i: usize) -> String {
    format!("shardId-{i:012}")
}

pub(super) fn millis(position: &Position, now_ms: u64) -> Option<u64> {
    match position {
        Position::Sequence(s) | Position::At(s) => s.as_str().get(2..).and_then(|d| d.parse().ok()),
        Position::TrimHorizon | Position::AtTimestamp(_) => Some(0),
        Position::Latest => Some(now_ms),
        Position::ShardEnd => None,
    }
}
