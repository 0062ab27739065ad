//! The workers of the fleet: each one's lease manager, coordinator and writer, started, stopped and killed.

use super::*;

/// One simulated worker.
pub(super) struct Worker {
    pub(super) id: String,
    pub(super) sigterm: CancellationToken,
    pub(super) task: JoinHandle<()>,
    /// Its destination writer, a task of its own as in the service.
    pub(super) writer: AbortHandle,
    /// Started, not killed nor stopped.
    pub(super) live: bool,
}

pub(super) struct Fleet {
    pub(super) scenario: Scenario,
    pub(super) world: Arc<Mutex<World>>,
    pub(super) table: Arc<MemoryTable>,
    pub(super) workers: Vec<Worker>,
    pub(super) rng: StdRng,
    /// Workers cut off from the table now.
    pub(super) cut: BTreeSet<String>,
    /// When each worker stopped being a live, connected owner (killed, stopped or cut off).
    pub(super) gone: BTreeMap<String, Vec<(Instant, Option<Instant>)>>,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fleet {
    pub(super) fn start_worker(&mut self) {
        let n = self.workers.len();
        let id = format!("worker-{n:03}-{:08x}", self.rng.random::<u32>());
        let table = self.table.link(id.clone());
        let (manager, events, share) = LeaseManager::new(table, id.clone(), self.scenario.failover);
        let sigterm = CancellationToken::new();
        let progress = Arc::new(Progress::default());
        progress.fence_with(Arc::clone(&manager) as Arc<dyn LeaseProof>);
        let edge = SimEdge {
            worker: id.clone(),
            world: Arc::clone(&self.world),
            rng: Mutex::new(StdRng::seed_from_u64(self.rng.random())),
            // The attempt timeout, with room for the clock's granularity.
            timeout: crate::config::settle_time(self.scenario.failover) - Duration::from_millis(10),
            slow: self.scenario.slow_puts,
            late: self.scenario.late_requests,
        };
        let (out, (writer_stop, writer_task)) = spawn_writer(&self.scenario, Arc::new(edge), share);
        let writer = writer_task.abort_handle();
        let node = Node {
            id: id.clone(),
            manager,
            world: Arc::clone(&self.world),
            progress,
            out,
            checkpoint_interval: self.scenario.checkpoint_interval,
        };
        let task = tokio::spawn(node.run(events, sigterm.clone(), (writer_stop, writer_task)));
        self.workers.push(Worker { id, sigterm, task, writer, live: true });
    }

    /// SIGKILL: nothing of the worker runs on, but the requests it sent still land.
    pub(super) fn kill(&mut self, index: usize) {
        let now = Instant::now();
        let w = &mut self.workers[index];
        w.live = false;
        w.task.abort();
        w.writer.abort();
        let mut world = lock(&self.world);
        for shard in world.read_by(&w.id) {
            world.stop(&shard, &w.id, now, false);
            world.orphans.insert(shard, now);
        }
        self.gone.entry(w.id.clone()).or_default().push((now, None));
    }

    pub(super) fn sigterm(&mut self, index: usize) {
        let w = &mut self.workers[index];
        w.live = false;
        w.sigterm.cancel();
        self.gone.entry(w.id.clone()).or_default().push((Instant::now(), None));
    }

    pub(super) fn cut_off(&mut self, index: usize, cut: bool) {
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
    pub(super) fn owners(&self) -> BTreeSet<String> {
        self.workers.iter().filter(|w| w.live && !self.cut.contains(&w.id)).map(|w| w.id.clone()).collect()
    }

    /// Every active lease held by a live worker, and no worker more than one lease above another.
    pub(super) fn balanced(&self) -> bool {
        balance::balanced(&self.table.leases(), &self.owners())
    }

    /// Samples once a second until balanced (returns how long it took) or out of patience.
    pub(super) async fn until_balanced(&self, since: Instant) -> Option<f64> {
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
    pub(super) async fn run_for(&self, length: Duration) {
        let until = Instant::now() + length;
        while Instant::now() < until {
            self.check_orphans();
            tokio::time::sleep(Duration::from_secs(1).min(until - Instant::now())).await;
        }
    }

    pub(super) fn check_orphans(&self) {
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
    pub(super) fn alive_at(&self, worker: &str, at: Instant) -> bool {
        self.gone
            .get(worker)
            .is_none_or(|spans| !spans.iter().any(|(from, to)| *from <= at && to.is_none_or(|t| at < t)))
    }
}
