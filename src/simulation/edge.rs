//! What a simulated worker reads and writes through: simulated shard readings and the put edge whose requests land after a latency, checked against who reads each shard.

use super::*;

/// The put edge of the simulated destination: a request lands (and the world checks who sent it)
/// after a random latency (5 to 200 ms, one in twenty up to the attempt timeout), whether or not
/// its sender still waits for the answer; it accepts every record.
pub(super) struct SimEdge {
    pub(super) worker: String,
    pub(super) world: Arc<Mutex<World>>,
    pub(super) rng: Mutex<StdRng>,
    pub(super) timeout: Duration,
    pub(super) slow: bool,
    pub(super) late: bool,
}

impl std::fmt::Debug for SimEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimEdge").field("worker", &self.worker).finish()
    }
}

impl PutEdge for SimEdge {
    fn put_records<'a>(
        &'a self,
        _stream: &'a str,
        entries: Vec<PutRecordsRequestEntry>,
    ) -> BoxFuture<'a, Result<Vec<EntryAnswer>, CallError>> {
        // Each record's partition key names its reading: `<shard>#<index>`.
        let readings: BTreeSet<(String, usize)> = entries
            .iter()
            .filter_map(|e| {
                let (shard, index) = e.partition_key()?.split_once('#')?;
                Some((shard.to_string(), index.parse().ok()?))
            })
            .collect();
        let records = entries.len();
        // Mostly quick; one request in twenty takes up to the attempt timeout (every one for
        // `Scenario::slow_puts`; one to four attempt timeouts for `Scenario::late_requests`).
        let timeout = self.timeout.as_millis().max(300) as u64;
        let latency = {
            let mut rng = lock(&self.rng);
            let millis = if self.late {
                rng.random_range(timeout..4 * timeout)
            } else if self.slow || rng.random_bool(0.05) {
                rng.random_range(5..timeout)
            } else {
                rng.random_range(5..200)
            };
            Duration::from_millis(millis)
        };
        let (world, worker) = (Arc::clone(&self.world), self.worker.clone());
        // On the wire: it lands even if the writer stops waiting or the worker dies.
        tokio::spawn(async move {
            tokio::time::sleep(latency).await;
            lock(&world).landed(&readings, &worker, records, Instant::now());
        });
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            Ok((0..records)
                .map(|_| EntryAnswer { error_code: None, error_message: None, shard_id: Some("shardId-0".into()) })
                .collect())
        })
    }

    fn deleted<'a>(&'a self, _stream: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async { false })
    }
}

/// The worker's writer for the simulated destination, limited to its share of the fleet-wide
/// capacity; returns the destination's handle and the writer's stop signal and task.
pub(super) fn spawn_writer(
    scenario: &Scenario,
    edge: Arc<dyn PutEdge>,
    share: watch::Receiver<f64>,
) -> (DestinationHandle, (CancellationToken, JoinHandle<Exit>)) {
    let arriving = scenario.shards as f64 / READ_EVERY.as_secs_f64();
    let rate = (arriving * scenario.write_capacity).ceil().max(1.0) as u64;
    let settings = crate::Settings::from_toml(&format!(
        "[source]\nstream_name = \"source\"\n[[destinations]]\npattern = \"^{DESTINATION}$\"\n\
         records_per_second = \"{rate}\"\nbytes_per_second = \"{}\"\nlinger = \"1s\"\n",
        rate * RECORD_BYTES as u64 * 4
    ))
    .expect("a valid simulated destination");
    let (out, queue) = DestinationHandle::new(DESTINATION.into(), DESTINATION.into(), 64 << 20);
    let stop = CancellationToken::new();
    let task = DestinationTask {
        name: DESTINATION.into(),
        stream: DESTINATION.into(),
        id: DESTINATION.into(),
        source_stream: "source".into(),
        edge,
        queue,
        open_shards: watch::channel(1).1,
        shard_map: watch::channel(Arc::new(ShardMap::default())).1,
        limits: watch::channel(crate::record::StreamLimits::default()).1,
        assignment: crate::sink::Assignment::fixed(Arc::new(settings.destinations[0].clone()), 0),
        share,
        metrics: Arc::new(Metrics::new()),
        removed: CancellationToken::new(),
        stop: stop.clone(),
        gone: tokio::sync::mpsc::unbounded_channel().0,
        remap: tokio::sync::mpsc::unbounded_channel().0,
        shed: Arc::default(),
    };
    (out, (stop, tokio::spawn(task.run())))
}

/// One simulated worker as the service runs it (`app.rs`): the lease loop, the periodic
/// checkpointer and the coordinator, then the same teardown.
pub(super) struct Node {
    pub(super) id: String,
    pub(super) manager: Arc<LeaseManager>,
    pub(super) world: Arc<Mutex<World>>,
    pub(super) progress: Arc<Progress>,
    pub(super) out: DestinationHandle,
    pub(super) checkpoint_interval: Duration,
}

impl Node {
    pub(super) async fn run(
        self,
        events: tokio::sync::mpsc::UnboundedReceiver<Assignment>,
        sigterm: CancellationToken,
        (writer_stop, writer): (CancellationToken, JoinHandle<Exit>),
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
        let leases = Leases::new(listing, Arc::clone(&self.manager), events, checkpointer.clone(), &Health::default());
        // The lease loop and the checkpoints run in this task, so that killing the worker kills them.
        let lease_stop = CancellationToken::new();
        let lease_loop = Arc::clone(&self.manager).run(lease_stop.clone());
        let periodic_stop = CancellationToken::new();
        let periodic =
            checkpointer.clone().run(Arc::clone(&self.progress), self.checkpoint_interval, periodic_stop.clone());
        let readings = SimReadings {
            worker: self.id.clone(),
            world: Arc::clone(&self.world),
            progress: Arc::clone(&self.progress),
            out: self.out.clone(),
        };
        let reading = async {
            let _ = crate::source::coordinate(leases, &readings, &self.progress, sigterm.clone()).await;
            // The service's teardown: drain within the grace period, stop writing, write the
            // final checkpoint, and only then let the leases go.
            self.manager.drain();
            let _ = tokio::time::timeout(GRACE, self.progress.drained()).await;
            writer_stop.cancel();
            let _ = writer.await;
            periodic_stop.cancel();
            let _ = checkpointer.save_snapshot(&self.progress.snapshot(), Instant::now()).await;
            lease_stop.cancel();
        };
        tokio::join!(lease_loop, reading, periodic);
        self.manager.release_all_except(&self.progress.unsettled()).await;
    }
}

/// Simulated shard readings: a record every [`READ_EVERY`] (faster while catching up), handed to
/// the worker's writer through its budget; a shard read to its end ends once the destination
/// accepted all of it, as the service's reader does.
pub(super) struct SimReadings {
    pub(super) worker: String,
    pub(super) world: Arc<Mutex<World>>,
    pub(super) progress: Arc<Progress>,
    pub(super) out: DestinationHandle,
}

impl Readings for SimReadings {
    fn reading(&self, shard: &str, start: Position, _destinations: &DestinationSkips) -> Reading {
        let tracker = self.progress.restart(shard);
        tracker.set_start(start.clone());
        let (shard, worker, world, progress, out) = (
            shard.to_string(),
            self.worker.clone(),
            Arc::clone(&self.world),
            Arc::clone(&self.progress),
            self.out.clone(),
        );
        Box::new(move |token: CancellationToken| {
            Box::pin(async move {
                let stopped = |world: &Mutex<World>| {
                    lock(world).stop(&shard, &worker, Instant::now(), false);
                    ReaderExit::Stopped(Stopped)
                };
                let now = Instant::now();
                let (now_ms, key) = {
                    let mut w = lock(&world);
                    w.start(&shard, &worker, now);
                    let index = w.readings.get(&shard).map_or(0, |rs| rs.len() - 1);
                    ((now - w.epoch).as_millis() as u64, format!("{shard}#{index}"))
                };
                let Some(mut position) = millis(&start, now_ms) else { return stopped(&world) };
                loop {
                    tokio::select! {
                        biased;
                        _ = token.cancelled() => return stopped(&world),
                        _ = tokio::time::sleep(READ_EVERY) => {}
                    }
                    let (next, ended) = {
                        let w = lock(&world);
                        let head = w.head(&shard, Instant::now());
                        let next = head.min(position + CATCH_UP * READ_EVERY.as_millis() as u64);
                        (next, w.ended(&shard, next))
                    };
                    // A record for every READ_EVERY of the shard's clock: up to CATCH_UP at once
                    // while catching up.
                    while next > position {
                        position = (position + READ_EVERY.as_millis() as u64).min(next);
                        let record = SourceRecord {
                            sequence_number: SequenceNumber::parse(&format!("49{position:054}")).expect("digits"),
                            partition_key: key.clone(),
                            data: Bytes::from_static(&[0; RECORD_BYTES]),
                            arrival: None,
                            user_records: None,
                        };
                        let permit = tokio::select! {
                            biased;
                            _ = token.cancelled() => return stopped(&world),
                            permit = out.reserve(RECORD_BYTES) => permit,
                        };
                        let Ok(permit) = permit else { return stopped(&world) };
                        lock(&world).records_read += 1;
                        let chunk = progress.begin(&tracker, vec![record], vec![DESTINATION.into()]);
                        out.send(Delivery { chunk, permit });
                    }
                    if ended {
                        tokio::select! {
                            biased;
                            _ = token.cancelled() => return stopped(&world),
                            _ = tracker.complete_everywhere() => {}
                        }
                        tracker.mark_ended();
                        lock(&world).stop(&shard, &worker, Instant::now(), true);
                        return ReaderExit::Ended;
                    }
                }
            }) as BoxFuture<'static, ReaderExit>
        })
    }
}
