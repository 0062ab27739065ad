//! A deterministic simulation of a fleet sharing one lease table: the real [`LeaseManager`]s
//! (balancing, renewal, watchdog, checkpoints, lease creation and clean-up) of many workers against
//! one [`MemoryTable`], on tokio's paused clock, with a seed.
//!
//! Run [`run`] inside a current-thread runtime started paused (`start_paused(true)`: tokio's
//! `test-util`), so that hours of fleet time pass in seconds and every run of a seed is the same.
//!
//! Each simulated worker reads its shards the way the service's coordinator does: it starts a
//! shard after the delay its lease came with, stops it when the lease is lost, checkpoints every
//! [`Scenario::checkpoint_interval`] through the lease, records a shard's end (with its children)
//! and syncs the table with the shard list. A shard's records are its clock: the record at
//! millisecond `t` of the run has sequence number `t`; a reader catches up at four times real time.
//!
//! Checked at every step: no two workers read one shard in overlapping time (a stopped reader's
//! requests may land until [`super::settle_time`] after it learnt, a drained one's until its drain
//! ended); no checkpoint moves backwards (the table notes it); no child is read before its parents
//! were read to their end; a shard whose reader died is read again within [`failover_bound`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::LeaseManager;
use super::balance;
use super::memory::{Faults, MemoryTable, Usage};
use super::table::{LeaseTable, Position};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::progress::{CheckpointStore, Checkpointer, Snapshot};
use crate::record::SequenceNumber;
use crate::source::assign::{Assignment, Assignments, Leases, Listing, ShardList};
use crate::source::shards::ShardInfo;

/// On-demand prices used for the cost figures (us-east-1, per million request units, since the
/// November 2024 price change).
pub const PRICE_PER_MILLION_READS: f64 = 0.125;
pub const PRICE_PER_MILLION_WRITES: f64 = 0.625;
const SECONDS_PER_MONTH: f64 = 30.0 * 24.0 * 3600.0;

/// How long a SIGTERMed worker takes to drain what it read.
const DRAIN: Duration = Duration::from_secs(1);
/// A reader catches up this many times faster than records arrive.
const CATCH_UP: u64 = 4;

/// The longest a shard may stay unread after its owner dies: the owner's counter must be seen
/// unchanged for a failover time by a worker's scans (up to one scan period after its last
/// renewal, then more than a failover time), the next round takes it, and the taker waits out
/// the dead owner's in-flight requests ([`super::settle_time`]).
pub fn failover_bound(failover: Duration) -> Duration {
    let renew = failover / 3;
    let scan = super::manager::scan_interval(failover);
    failover + 2 * scan + renew + super::settle_time(failover) + Duration::from_secs(1)
}

/// What happens to the fleet.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Every worker starts at once.
    Start,
    /// `added` workers join a balanced fleet of the others.
    Add { added: usize },
    /// `killed` workers of a balanced fleet die at once (SIGKILL: no release, requests in flight).
    Kill { killed: usize },
    /// Each worker is replaced in turn: a new one starts, the old one is SIGTERMed.
    RollingDeploy { pace: Duration },
    /// One worker cannot reach the table for `failovers` failover times, then can again.
    CutOff { failovers: u32 },
    /// A share of every call to the table is throttled, from the start.
    Throttle { share: f64 },
    /// `split` shards split in two while the fleet starts and balances.
    Reshard { split: usize },
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub case: String,
    pub shards: usize,
    pub workers: usize,
    pub event: Event,
    pub seed: u64,
    pub failover: Duration,
    pub checkpoint_interval: Duration,
    /// Latency of every call to the table.
    pub latency: Duration,
    /// How long the fleet runs balanced for the steady-state figures.
    pub steady: Duration,
    /// Give up waiting for balance after this long (per phase).
    pub patience: Duration,
    /// Prove the checks work: the table accepts every write whatever its condition.
    pub ignore_conditions: bool,
}

impl Scenario {
    pub fn new(case: &str, shards: usize, workers: usize, event: Event, seed: u64) -> Self {
        Scenario {
            case: case.into(),
            shards,
            workers,
            event,
            seed,
            failover: Duration::from_secs(10),
            checkpoint_interval: Duration::from_secs(5),
            latency: Duration::from_millis(5),
            steady: Duration::from_secs(60),
            patience: Duration::from_secs(1800),
            ignore_conditions: false,
        }
    }
}

/// What a run shows.
#[derive(Debug, Clone)]
pub struct Report {
    pub case: String,
    pub shards: usize,
    pub workers: usize,
    pub seed: u64,
    pub invariant_violations: Vec<String>,
    /// From the event (or the start) until every active lease is held by a live worker and no
    /// worker holds more than one lease more than another; `None` if that never happened.
    pub seconds_to_balance: Option<f64>,
    /// Leases taken from a live owner.
    pub steals: usize,
    /// Every change of owner (steals, expired and released leases).
    pub takeovers: usize,
    /// Request units per second over the steady window, and what a month of that costs.
    pub table_reads_per_s: f64,
    pub table_writes_per_s: f64,
    pub dollars_per_month: f64,
    /// The longest time a shard was read by nobody (from the start, a stop or a death, to the
    /// next reading).
    pub longest_unread_s: f64,
    /// The longest a shard waited to be read again after its reader died.
    pub longest_failover_s: f64,
    pub failover_bound_s: f64,
    pub simulated_s: f64,
    pub usage: Usage,
}

struct Reading {
    worker: String,
    stop: Option<Instant>,
    /// When the last request of the reading may have landed.
    settled: Option<Instant>,
}

struct SimShard {
    parents: Vec<String>,
    children: Vec<String>,
    closed_at: Option<Instant>,
    hash_range: (String, String),
    /// Since when nobody reads it (from its creation, the end of a reading, or a death).
    unread_since: Option<Instant>,
}

/// The fleet's shared truth, for the checks.
struct World {
    epoch: Instant,
    shards: BTreeMap<String, SimShard>,
    readings: BTreeMap<String, Vec<Reading>>,
    violations: Vec<String>,
    /// Shards whose reader died at the instant, not read again yet.
    orphans: BTreeMap<String, Instant>,
    longest_unread: Duration,
    longest_failover: Duration,
    bound: Duration,
    table: Arc<MemoryTable>,
}

impl World {
    fn at(&self, t: Instant) -> f64 {
        (t - self.epoch).as_secs_f64()
    }

    fn infos(&self) -> Vec<ShardInfo> {
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

    fn violation(&mut self, text: String) {
        if self.violations.len() < 100 {
            self.violations.push(text);
        }
    }

    /// `worker` starts reading `shard` now: nobody else may be, and its parents must be done.
    fn start(&mut self, shard: &str, worker: &str, now: Instant) {
        let at = self.at(now);
        let readings = self.readings.entry(shard.to_string()).or_default();
        let mut problems = Vec::new();
        for r in readings.iter() {
            match (r.stop, r.settled) {
                (None, _) => problems.push(format!("{at:.1}s: {worker} starts {shard} while {} reads it", r.worker)),
                (Some(_), Some(settled)) if settled > now => problems.push(format!(
                    "{at:.1}s: {worker} starts {shard} {:.1}s before the requests of {} settle",
                    (settled - now).as_secs_f64(),
                    r.worker
                )),
                _ => {}
            }
        }
        readings.push(Reading { worker: worker.to_string(), stop: None, settled: None });
        let parents = self.shards.get(shard).map(|s| s.parents.clone()).unwrap_or_default();
        for parent in parents {
            let ended = self.table.ended_at(&parent).is_some_and(|t| t <= now);
            let still_read = self
                .readings
                .get(&parent)
                .is_some_and(|rs| rs.iter().any(|r| r.stop.is_none() || r.settled > Some(now)));
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

    /// `worker` stopped reading `shard` now; its requests land until `settled`.
    fn stop(&mut self, shard: &str, worker: &str, now: Instant, settled: Instant, ended: bool) {
        if let Some(r) = self
            .readings
            .get_mut(shard)
            .and_then(|rs| rs.iter_mut().rev().find(|r| r.worker == worker && r.stop.is_none()))
        {
            r.stop = Some(now);
            r.settled = Some(settled);
        }
        if !ended && let Some(s) = self.shards.get_mut(shard) {
            s.unread_since.get_or_insert(now);
        }
    }

    /// Shards `worker` reads now.
    fn read_by(&self, worker: &str) -> Vec<String> {
        self.readings
            .iter()
            .filter(|(_, rs)| rs.iter().any(|r| r.worker == worker && r.stop.is_none()))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The record clock of a shard: the newest sequence it holds now.
    fn head(&self, shard: &str, now: Instant) -> u64 {
        let end = self.shards.get(shard).and_then(|s| s.closed_at).map_or(now, |c| c.min(now));
        (end - self.epoch).as_millis() as u64
    }

    fn ended(&self, shard: &str, position: u64) -> bool {
        self.shards
            .get(shard)
            .and_then(|s| s.closed_at)
            .is_some_and(|c| position >= (c - self.epoch).as_millis() as u64)
    }

    /// Splits `count` open shards (chosen by `rng`) in two.
    fn split(&mut self, count: usize, now: Instant, rng: &mut StdRng) {
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

fn shard_id(i: usize) -> String {
    format!("shardId-{i:012}")
}

fn sequence(ms: u64) -> Position {
    Position::Sequence(SequenceNumber::parse(&format!("49{ms:054}")).expect("digits"))
}

fn millis(position: &Position, now_ms: u64) -> Option<u64> {
    match position {
        Position::Sequence(s) | Position::At(s) => s.as_str().get(2..).and_then(|d| d.parse().ok()),
        Position::TrimHorizon | Position::AtTimestamp(_) => Some(0),
        Position::Latest => Some(now_ms),
        Position::ShardEnd => None,
    }
}

/// One simulated worker.
struct Worker {
    id: String,
    sigterm: CancellationToken,
    task: JoinHandle<()>,
    /// Started, not killed nor stopped.
    live: bool,
}

struct Fleet {
    scenario: Scenario,
    world: Arc<Mutex<World>>,
    table: Arc<MemoryTable>,
    workers: Vec<Worker>,
    rng: StdRng,
    /// Workers cut off from the table now.
    cut: BTreeSet<String>,
    /// When each worker stopped being a live, connected owner (killed, stopped or cut off).
    gone: BTreeMap<String, Vec<(Instant, Option<Instant>)>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fleet {
    fn start_worker(&mut self) {
        let n = self.workers.len();
        let id = format!("worker-{n:03}-{:08x}", self.rng.random::<u32>());
        let table = LeaseTable::in_memory(Arc::clone(&self.table), id.clone());
        let (manager, events, _share) = LeaseManager::new(table, id.clone(), self.scenario.failover);
        let sigterm = CancellationToken::new();
        let lease_stop = CancellationToken::new();
        let reader = Reader {
            id: id.clone(),
            manager: Arc::clone(&manager),
            world: Arc::clone(&self.world),
            reading: Default::default(),
            pending: BTreeMap::new(),
            settle: super::settle_time(self.scenario.failover),
            checkpoint_interval: self.scenario.checkpoint_interval,
        };
        let task = tokio::spawn(reader.run(events, sigterm.clone(), lease_stop));
        self.workers.push(Worker { id, sigterm, task, live: true });
    }

    /// SIGKILL: the worker's requests in flight land until the settle time passes.
    fn kill(&mut self, index: usize) {
        let now = Instant::now();
        let w = &mut self.workers[index];
        w.live = false;
        w.task.abort();
        let settle = super::settle_time(self.scenario.failover);
        let mut world = lock(&self.world);
        for shard in world.read_by(&w.id) {
            world.stop(&shard, &w.id, now, now + settle, false);
            world.orphans.insert(shard, now);
        }
        self.gone.entry(w.id.clone()).or_default().push((now, None));
    }

    fn sigterm(&mut self, index: usize) {
        let w = &mut self.workers[index];
        w.live = false;
        w.sigterm.cancel();
        self.gone.entry(w.id.clone()).or_default().push((Instant::now(), None));
    }

    fn cut_off(&mut self, index: usize, cut: bool) {
        let id = self.workers[index].id.clone();
        let now = Instant::now();
        if cut {
            self.cut.insert(id.clone());
            self.gone.entry(id.clone()).or_default().push((now, None));
            let mut world = lock(&self.world);
            for shard in world.read_by(&id) {
                world.orphans.insert(shard, now);
            }
        } else {
            self.cut.remove(&id);
            if let Some(last) = self.gone.get_mut(&id).and_then(|g| g.last_mut()) {
                last.1 = Some(now);
            }
        }
        let mut faults = self.table.faults();
        faults.cut_off = self.cut.clone();
        self.table.set_faults(faults);
    }

    /// Live, connected workers.
    fn owners(&self) -> BTreeSet<String> {
        self.workers.iter().filter(|w| w.live && !self.cut.contains(&w.id)).map(|w| w.id.clone()).collect()
    }

    /// Every active lease held by a live worker, and no worker more than one lease above another.
    fn balanced(&self) -> bool {
        balance::balanced(&self.table.leases(), &self.owners())
    }

    /// Samples once a second until balanced (returns how long it took) or out of patience.
    async fn until_balanced(&self, since: Instant) -> Option<f64> {
        let deadline = since + self.scenario.patience;
        loop {
            self.check_orphans();
            if self.balanced() {
                return Some((Instant::now() - since).as_secs_f64());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Runs `length` more, sampling the checks once a second.
    async fn run_for(&self, length: Duration) {
        let until = Instant::now() + length;
        while Instant::now() < until {
            self.check_orphans();
            tokio::time::sleep(Duration::from_secs(1).min(until - Instant::now())).await;
        }
    }

    fn check_orphans(&self) {
        let now = Instant::now();
        let mut world = lock(&self.world);
        let bound = world.bound;
        let late: Vec<(String, Instant)> =
            world.orphans.iter().filter(|(_, died)| now - **died > bound).map(|(s, d)| (s.clone(), *d)).collect();
        for (shard, died) in late {
            let at = world.at(died);
            world.violation(format!(
                "{shard}: not read again within {:.1}s of its reader's death at {at:.1}s",
                bound.as_secs_f64()
            ));
            world.orphans.remove(&shard);
            world.longest_failover = world.longest_failover.max(now - died);
        }
    }

    /// Whether `worker` was a live, connected owner at `at`.
    fn alive_at(&self, worker: &str, at: Instant) -> bool {
        self.gone
            .get(worker)
            .is_none_or(|spans| !spans.iter().any(|(from, to)| *from <= at && to.is_none_or(|t| at < t)))
    }
}

/// The reading side of one simulated worker: the service's coordinator in small. Shards come
/// and go through the real [`Leases`] assignments source; a shard read to its end is reported to
/// it (which names the children on the lease); checkpoints are written every interval by a loop
/// of their own, as the service's periodic checkpointer does.
struct Reader {
    id: String,
    manager: Arc<LeaseManager>,
    world: Arc<Mutex<World>>,
    /// Shard → position read (milliseconds of the record clock).
    reading: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Shard → when to start, and from where.
    pending: BTreeMap<String, (Instant, u64)>,
    settle: Duration,
    checkpoint_interval: Duration,
}

impl Reader {
    fn now_ms(&self) -> u64 {
        let world = lock(&self.world);
        (Instant::now() - world.epoch).as_millis() as u64
    }

    async fn run(
        mut self,
        events: tokio::sync::mpsc::UnboundedReceiver<Assignment>,
        sigterm: CancellationToken,
        lease_stop: CancellationToken,
    ) {
        let world = Arc::clone(&self.world);
        let list = ShardList::Simulated(Arc::new(move || lock(&world).infos()));
        // As the service starts: create the leases the table lacks, then run the lease loop.
        loop {
            let shards = lock(&self.world).infos();
            match self.manager.sync(&shards, &Position::TrimHorizon).await {
                Ok(()) => break,
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
        let checkpointer =
            Checkpointer::new(Arc::clone(&self.manager) as Arc<dyn CheckpointStore>, Arc::new(Metrics::new()));
        let listing = Listing { shards: list, stream: "source".into(), initial: Position::TrimHorizon };
        let mut leases =
            Leases::new(listing, Arc::clone(&self.manager), events, checkpointer.clone(), &Health::default());
        // The lease loop and the checkpoints run in this task, so that killing the worker kills them.
        let lease_loop = Arc::clone(&self.manager).run(lease_stop.clone());
        let stop_checkpoints = CancellationToken::new();
        let (positions, interval) = (Arc::clone(&self.reading), self.checkpoint_interval);
        let checkpoints = async {
            loop {
                tokio::select! {
                    biased;
                    _ = stop_checkpoints.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                checkpoint(&checkpointer, &positions).await;
            }
        };
        let reading = async {
            self.read(&mut leases, &sigterm).await;
            // SIGTERM: stop reading, take nothing more, drain, write the final checkpoint, release.
            self.manager.drain();
            stop_checkpoints.cancel();
            let now = Instant::now();
            {
                let mut world = lock(&self.world);
                for shard in lock(&self.reading).keys() {
                    world.stop(shard, &self.id, now, now + DRAIN, false);
                }
            }
            tokio::time::sleep(DRAIN).await;
            checkpoint(&checkpointer, &self.reading).await;
            lease_stop.cancel();
        };
        tokio::join!(lease_loop, reading, checkpoints);
        self.manager.release_all().await;
    }

    /// Reads until SIGTERM.
    async fn read(&mut self, leases: &mut Leases, sigterm: &CancellationToken) {
        let mut tick = Instant::now() + Duration::from_secs(1);
        loop {
            let next_start = self.pending.values().map(|(at, _)| *at).min().unwrap_or(tick).min(tick);
            tokio::select! {
                biased;
                _ = sigterm.cancelled() => return,
                event = leases.next() => match event {
                    Ok(Assignment::Acquired { shard, position, delay, .. }) => {
                        if let Some(from) = millis(&position, self.now_ms()) {
                            self.pending.insert(shard, (Instant::now() + delay, from));
                        }
                    }
                    Ok(Assignment::Lost { shard }) => {
                        self.pending.remove(&shard);
                        if lock(&self.reading).remove(&shard).is_some() {
                            let now = Instant::now();
                            lock(&self.world).stop(&shard, &self.id, now, now + self.settle, false);
                        }
                    }
                    Err(_) => return,
                },
                _ = tokio::time::sleep_until(next_start) => {
                    let now = Instant::now();
                    let due: Vec<String> =
                        self.pending.iter().filter(|(_, (at, _))| *at <= now).map(|(k, _)| k.clone()).collect();
                    for shard in due {
                        let (_, from) = self.pending.remove(&shard).expect("due");
                        lock(&self.world).start(&shard, &self.id, now);
                        lock(&self.reading).insert(shard, from);
                    }
                    if now >= tick {
                        tick = now + Duration::from_secs(1);
                        self.advance(leases).await;
                    }
                }
            }
        }
    }

    /// Reads on: each shard's position moves towards its head; a shard read to its end is
    /// reported finished, as the coordinator does.
    async fn advance(&mut self, leases: &mut Leases) {
        let now = Instant::now();
        let mut finished = Vec::new();
        {
            let world = lock(&self.world);
            for (shard, position) in lock(&self.reading).iter_mut() {
                let head = world.head(shard, now);
                *position = head.min(*position + CATCH_UP * 1000);
                if world.ended(shard, *position) {
                    finished.push(shard.clone());
                }
            }
        }
        for shard in finished {
            lock(&self.reading).remove(&shard);
            let _ = leases.finished(&shard).await;
            let now = Instant::now();
            let ended = self.world_ended(&shard);
            let settled = if ended { now } else { now + self.settle };
            lock(&self.world).stop(&shard, &self.id, now, settled, ended);
        }
    }

    fn world_ended(&self, shard: &str) -> bool {
        lock(&self.world).table.lease(shard).is_none_or(|l| l.checkpoint == Position::ShardEnd)
    }
}

async fn checkpoint(checkpointer: &Checkpointer, reading: &Mutex<BTreeMap<String, u64>>) {
    let snapshot = Snapshot {
        shards: lock(reading).iter().map(|(k, ms)| (k.clone(), sequence(*ms))).collect(),
        ..Snapshot::default()
    };
    if !snapshot.shards.is_empty() {
        let _ = checkpointer.save_snapshot(&snapshot, Instant::now()).await;
    }
}

/// Runs one scenario (inside a paused current-thread runtime) and reports.
pub async fn run(scenario: &Scenario) -> Report {
    let epoch = Instant::now();
    let mut rng = StdRng::seed_from_u64(scenario.seed);
    let faults = Faults {
        latency: scenario.latency,
        // The lease table client's whole-call timeout (see `aws::dynamodb_client`).
        timeout: (scenario.failover / 3).clamp(Duration::from_millis(300), Duration::from_secs(5)),
        ignore_conditions: scenario.ignore_conditions,
        ..Faults::default()
    };
    let table = MemoryTable::new(rng.random(), faults);
    let step = u128::MAX / scenario.shards.max(1) as u128;
    let shards = (0..scenario.shards)
        .map(|i| {
            let lo = step * i as u128;
            let hi = if i + 1 == scenario.shards { u128::MAX } else { lo + step - 1 };
            let shard = SimShard {
                parents: Vec::new(),
                children: Vec::new(),
                closed_at: None,
                hash_range: (lo.to_string(), hi.to_string()),
                unread_since: Some(epoch),
            };
            (shard_id(i), shard)
        })
        .collect();
    let world = World {
        epoch,
        shards,
        readings: BTreeMap::new(),
        violations: Vec::new(),
        orphans: BTreeMap::new(),
        longest_unread: Duration::ZERO,
        longest_failover: Duration::ZERO,
        bound: failover_bound(scenario.failover),
        table: Arc::clone(&table),
    };
    let mut fleet = Fleet {
        scenario: scenario.clone(),
        world: Arc::new(Mutex::new(world)),
        table: Arc::clone(&table),
        workers: Vec::new(),
        rng: StdRng::seed_from_u64(rng.random()),
        cut: BTreeSet::new(),
        gone: BTreeMap::new(),
    };
    let n = scenario.workers;
    let balanced = match &scenario.event {
        Event::Start => {
            start_together(&mut fleet, n, &mut rng).await;
            fleet.until_balanced(epoch).await
        }
        Event::Throttle { share } => {
            let mut faults = table.faults();
            faults.throttle = *share;
            table.set_faults(faults);
            start_together(&mut fleet, n, &mut rng).await;
            fleet.until_balanced(epoch).await
        }
        Event::Reshard { split } => {
            start_together(&mut fleet, n, &mut rng).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = Instant::now();
            lock(&fleet.world).split(*split, now, &mut rng);
            let balanced = fleet.until_balanced(epoch).await;
            // Every parent read to its end, every child read.
            let deadline = Instant::now() + scenario.patience;
            while !all_children_read(&fleet) && Instant::now() < deadline {
                fleet.run_for(Duration::from_secs(1)).await;
            }
            if !all_children_read(&fleet) {
                lock(&fleet.world).violation("some children of split shards were never read".into());
            }
            balanced
        }
        Event::Add { added } => {
            start_together(&mut fleet, n - added, &mut rng).await;
            fleet.until_balanced(epoch).await;
            let now = Instant::now();
            for _ in 0..*added {
                fleet.start_worker();
            }
            fleet.until_balanced(now).await
        }
        Event::Kill { killed } => {
            start_together(&mut fleet, n, &mut rng).await;
            fleet.until_balanced(epoch).await;
            fleet.run_for(scenario.failover).await;
            let now = Instant::now();
            let mut victims: BTreeSet<usize> = BTreeSet::new();
            while victims.len() < (*killed).min(n) {
                victims.insert(rng.random_range(0..n));
            }
            for v in victims {
                fleet.kill(v);
            }
            fleet.until_balanced(now).await
        }
        Event::CutOff { failovers } => {
            start_together(&mut fleet, n, &mut rng).await;
            fleet.until_balanced(epoch).await;
            fleet.run_for(scenario.failover).await;
            let victim = rng.random_range(0..n);
            fleet.cut_off(victim, true);
            fleet.run_for(scenario.failover * *failovers).await;
            fleet.cut_off(victim, false);
            let now = Instant::now();
            fleet.until_balanced(now).await
        }
        Event::RollingDeploy { pace } => {
            start_together(&mut fleet, n, &mut rng).await;
            fleet.until_balanced(epoch).await;
            for old in 0..n {
                fleet.start_worker();
                fleet.run_for(*pace / 2).await;
                fleet.sigterm(old);
                fleet.run_for(*pace / 2).await;
            }
            let now = Instant::now();
            fleet.until_balanced(now).await
        }
    };
    // Steady state: what the fleet costs when nothing happens.
    let before = table.usage();
    fleet.run_for(scenario.steady).await;
    let after = table.usage();
    let window = scenario.steady.as_secs_f64().max(1.0);
    let reads = (after.read_units - before.read_units) / window;
    let writes = (after.write_units - before.write_units) / window;
    let end = Instant::now();
    for w in &fleet.workers {
        w.task.abort();
    }
    let takeovers = table.takeovers();
    let steals = takeovers.iter().filter(|t| t.from.as_deref().is_some_and(|from| fleet.alive_at(from, t.at))).count();
    let mut world = lock(&fleet.world);
    let unread_now: Vec<Duration> =
        world.shards.values().filter_map(|s| s.unread_since.map(|since| end - since)).collect();
    let longest_unread = unread_now.into_iter().fold(world.longest_unread, Duration::max);
    let mut violations = std::mem::take(&mut world.violations);
    violations.extend(table.violations());
    Report {
        case: scenario.case.clone(),
        shards: scenario.shards,
        workers: scenario.workers,
        seed: scenario.seed,
        invariant_violations: violations,
        seconds_to_balance: balanced,
        steals,
        takeovers: takeovers.len(),
        table_reads_per_s: reads,
        table_writes_per_s: writes,
        dollars_per_month: dollars_per_month(reads, writes),
        longest_unread_s: longest_unread.as_secs_f64(),
        longest_failover_s: world.longest_failover.as_secs_f64(),
        failover_bound_s: world.bound.as_secs_f64(),
        simulated_s: (end - epoch).as_secs_f64(),
        usage: table.usage(),
    }
}

/// What a month of this many request units per second costs on demand.
pub fn dollars_per_month(reads_per_s: f64, writes_per_s: f64) -> f64 {
    (reads_per_s * PRICE_PER_MILLION_READS + writes_per_s * PRICE_PER_MILLION_WRITES) * SECONDS_PER_MONTH / 1e6
}

/// Starts `n` workers within the same second (ECS starts a service's tasks about together).
async fn start_together(fleet: &mut Fleet, n: usize, rng: &mut StdRng) {
    let mut offsets: Vec<Duration> = (0..n).map(|_| Duration::from_millis(rng.random_range(0..1000))).collect();
    offsets.sort();
    let begin = Instant::now();
    for offset in offsets {
        tokio::time::sleep_until(begin + offset).await;
        fleet.start_worker();
    }
}

fn all_children_read(fleet: &Fleet) -> bool {
    let world = lock(&fleet.world);
    world
        .shards
        .iter()
        .filter(|(_, s)| !s.parents.is_empty())
        .all(|(id, _)| world.readings.get(id).is_some_and(|r| !r.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn paused(scenario: &Scenario) -> Report {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        runtime.block_on(run(scenario))
    }

    fn small(case: &str, shards: usize, workers: usize, event: Event, seed: u64) -> Scenario {
        Scenario {
            steady: Duration::from_secs(20),
            patience: Duration::from_secs(900),
            ..Scenario::new(case, shards, workers, event, seed)
        }
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Start),
            (1usize..3).prop_map(|added| Event::Add { added }),
            (1usize..3).prop_map(|killed| Event::Kill { killed }),
            (5u64..30).prop_map(|s| Event::RollingDeploy { pace: Duration::from_secs(s) }),
            (1u32..4).prop_map(|failovers| Event::CutOff { failovers }),
            (0.05f64..0.3).prop_map(|share| Event::Throttle { share }),
            (1usize..8).prop_map(|split| Event::Reshard { split }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Small fleets, every kind of event, random seeds: the invariants hold at every step, and
        /// the fleet balances again.
        #[test]
        fn small_fleets_keep_the_invariants(seed in any::<u64>(), shards in 4usize..40, workers in 3usize..8, event in event()) {
            let report = paused(&small("property", shards, workers, event.clone(), seed));
            prop_assert!(report.invariant_violations.is_empty(), "{event:?}: {:?}", report.invariant_violations);
            prop_assert!(report.seconds_to_balance.is_some(), "{event:?}: never balanced");
            prop_assert!(report.longest_failover_s <= report.failover_bound_s, "{event:?}");
        }
    }

    #[test]
    fn a_seed_runs_the_same_every_time() {
        let scenario = small("same", 30, 5, Event::Kill { killed: 2 }, 42);
        let (a, b) = (paused(&scenario), paused(&scenario));
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    #[test]
    fn the_checks_catch_a_table_that_ignores_its_conditions() {
        let scenario = Scenario { ignore_conditions: true, ..small("broken", 24, 6, Event::Kill { killed: 2 }, 3) };
        let report = paused(&scenario);
        assert!(
            report.invariant_violations.iter().any(|v| v.contains("while") || v.contains("settle")),
            "two workers read one shard at once: {:?}",
            report.invariant_violations
        );
    }

    #[test]
    fn every_kind_of_event_balances_a_small_fleet_safely() {
        for (event, case) in [
            (Event::Start, "start"),
            (Event::Kill { killed: 2 }, "kill"),
            (Event::Add { added: 2 }, "add"),
            (Event::CutOff { failovers: 3 }, "cut"),
            (Event::Throttle { share: 0.2 }, "throttle"),
            (Event::Reshard { split: 4 }, "reshard"),
            (Event::RollingDeploy { pace: Duration::from_secs(10) }, "deploy"),
        ] {
            let report = paused(&small(case, 24, 6, event, 7));
            assert!(report.invariant_violations.is_empty(), "{case}: {:?}", report.invariant_violations);
            assert!(report.seconds_to_balance.is_some(), "{case}");
            assert!(report.takeovers > 0, "{case}");
        }
    }
}
