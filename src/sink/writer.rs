//! The send loop of one destination: fill a batch (linger until full), wait for the rate
//! limiter, PutRecords through the put edge, settle each entry (accepted, retried in front of
//! newer ones, or refused: dead-lettered or held), and split requests refused as invalid.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::batch::{self, BatchLimits};
use super::dead_letter::DeadLetter;
use super::destination::{Assignment, DestinationTask, Exit};
use super::entries::{self, Pending};
use super::ledger::Ledger;
use super::limiter::Limiter;
use super::limiter::limiter_for;
use super::retry::Backoff;
use crate::fanout::Delivery;
use crate::fanout::filter::Filters;
use crate::metrics::Outcome;
use crate::shutdown::Stopped;

pub(super) struct Writer {
    pub(super) task: DestinationTask,
    /// Entries to send, oldest first; failed ones go back to the front.
    pub(super) pending: VecDeque<Pending>,
    /// What this destination owes each chunk, and the budget each holds.
    pub(super) ledger: Ledger,
    pub(super) limiter: Limiter,
    pub(super) backoff: Backoff,
    pub(super) dead_letter: Option<DeadLetter>,
    pub(super) stalled: bool,
    pub(super) limits: BatchLimits,
    /// Set while a request refused as a whole for validation is split to find its bad entries.
    pub(super) split: Option<Split>,
    /// Source readings revoked so far, as last seen: the queue is searched for their records
    /// only when this moves.
    pub(super) revocations: u64,
    /// Its group's settings and filter, as last loaded.
    pub(super) assignment: Assignment,
}

/// The destination task runs as a writer: set up from what the task was given, torn down when it
/// stops.
impl DestinationTask {
    pub async fn run(mut self) -> Exit {
        let assignment = self.assignment.borrow_and_update().clone();
        let backoff = Backoff::for_group(&assignment.group);
        let shards = *self.open_shards.borrow();
        let share = *self.share.borrow();
        let dead_letter = dead_letter_for(&assignment, &self.edge, &backoff);
        let limits = BatchLimits::for_stream(*self.limits.borrow());
        let mut writer = Writer {
            limiter: limiter_for(&assignment.group, shards, share),
            assignment,
            ledger: Ledger::new(Arc::clone(&self.id), Arc::clone(&self.metrics)),
            task: self,
            pending: VecDeque::new(),
            backoff,
            dead_letter,
            stalled: false,
            limits,
            split: None,
            revocations: 0,
        };
        let name = Arc::clone(&writer.task.name);
        let exit = writer.run().await;
        match exit {
            Exit::Deleted => {
                tracing::info!(destination = %name, "Destination removed; its pending records no longer hold back progress.")
            }
            Exit::Stopped(Stopped) => tracing::debug!(destination = %name, "Destination writer stopped."),
        }
        writer.clear_gauges();
        exit
    }
}

/// The group's dead-letter stream, if it has one.
fn dead_letter_for(
    assignment: &Assignment,
    edge: &Arc<dyn super::put::PutEdge>,
    backoff: &Backoff,
) -> Option<DeadLetter> {
    let stream = assignment.group.dead_letter_stream.clone()?;
    Some(DeadLetter::new(stream, Arc::clone(edge), backoff.clone()).with_limits(assignment.dead_letter_limits))
}

/// PutRecords refuses a whole request for one entry it finds invalid. The leading `suspect`
/// entries are then sent in requests of at most `size`, halving on each refusal, until the
/// entries at fault are alone and refused on their own: valid entries are never dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Split {
    pub(super) suspect: usize,
    pub(super) size: usize,
}

/// Why a destination no longer owes a chunk: its reading's lease was lost, or the destination
/// was shed from it (a catch-up's lane given up by a shed is revoked too).
fn released(chunk: &crate::progress::Chunk) -> Outcome {
    if chunk.shard.revoked() && !chunk.shard.was_shed() { Outcome::LeaseLost } else { Outcome::Shed }
}

/// How long a writer waits before it looks again at a lease that is not proven.
pub(super) const UNPROVEN_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Request-level error codes that mean "something in this request is invalid".
pub(super) const VALIDATION_CODES: [&str; 2] = ["ValidationException", "InvalidArgumentException"];

pub(super) enum Interrupt {
    Stopped(Stopped),
    Removed,
}

pub(super) struct Guard {
    stop: CancellationToken,
    removed: CancellationToken,
    shed: Arc<tokio::sync::Notify>,
}

impl Guard {
    /// As [`Guard::run`], and `None` when the destination is shed meanwhile: a wait (the rate
    /// limiter, a backoff) that must not keep it from letting go of what it holds.
    pub(super) async fn unless_shed<T>(self, work: impl Future<Output = T>) -> Result<Option<T>, Interrupt> {
        let shed = Arc::clone(&self.shed);
        self.run(async move {
            tokio::select! {
                _ = shed.notified() => None,
                out = work => Some(out),
            }
        })
        .await
    }

    pub(super) async fn run<T>(self, work: impl Future<Output = T>) -> Result<T, Interrupt> {
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => Err(Interrupt::Stopped(Stopped)),
            _ = self.removed.cancelled() => Err(Interrupt::Removed),
            out = work => Ok(out),
        }
    }
}

impl Writer {
    pub(super) async fn run(&mut self) -> Exit {
        loop {
            if let Err(interrupt) = self.fill().await {
                return self.interrupted(interrupt);
            }
            if let Err(interrupt) = self.send_batch().await {
                return self.interrupted(interrupt);
            }
        }
    }

    fn interrupted(&mut self, interrupt: Interrupt) -> Exit {
        match interrupt {
            Interrupt::Stopped(Stopped) => Exit::Stopped(Stopped),
            Interrupt::Removed => {
                self.release_everything();
                Exit::Deleted
            }
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.task.name
    }

    /// Waits until there is something to send and the batch is full or has lingered long enough.
    async fn fill(&mut self) -> Result<(), Interrupt> {
        let shards_changed = self.task.open_shards.has_changed().unwrap_or(false);
        let share_changed = self.task.share.has_changed().unwrap_or(false);
        if self.task.limits.has_changed().unwrap_or(false) {
            self.follow_limits();
        }
        self.follow_assignment();
        if shards_changed || share_changed {
            let shards = *self.task.open_shards.borrow_and_update();
            let share = *self.task.share.borrow_and_update();
            self.limiter = limiter_for(&self.assignment.group, shards, share);
            tracing::info!(destination = %self.task.name, open_shards = shards, share, rates = ?self.limiter.rates(), "Destination rate limits follow its shard count and this worker's share.");
        }
        while self.pending.is_empty() {
            let delivery = self.next_delivery(None).await?;
            if let Some(delivery) = delivery {
                self.accept(delivery);
            }
        }
        let front = self.pending.front().expect("not empty");
        let deadline = if front.retry { Instant::now() } else { front.queued_at + self.assignment.group.linger };
        loop {
            while let Ok(delivery) = self.task.queue.try_recv() {
                self.accept(delivery);
            }
            if self.batch_full() || Instant::now() >= deadline {
                return Ok(());
            }
            match self.next_delivery(Some(deadline)).await? {
                Some(delivery) => self.accept(delivery),
                None => return Ok(()),
            }
        }
    }

    /// The next delivery, or `None` at the deadline.
    async fn next_delivery(&mut self, deadline: Option<Instant>) -> Result<Option<Delivery>, Interrupt> {
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = self.task.stop.cancelled() => Err(Interrupt::Stopped(Stopped)),
            _ = self.task.removed.cancelled() => Err(Interrupt::Removed),
            delivery = self.task.queue.recv() => match delivery {
                Some(d) => Ok(Some(d)),
                None => Err(Interrupt::Stopped(Stopped)),
            },
            _ = sleep => Ok(None),
        }
    }

    fn accept(&mut self, delivery: Delivery) {
        // A reload's new filter applies from the next record taken.
        self.follow_assignment();
        let Delivery { chunk, permit } = delivery;
        if !chunk.owed_by(&self.task.id) {
            self.count(released(&chunk), chunk.records.len() as u64, chunk.bytes as u64);
            return;
        }
        let now = Instant::now();
        let map = Arc::clone(&self.task.shard_map.borrow());
        let max_record_bytes = self.limits.max_record_bytes;
        // Which records this destination's group takes: decided once per chunk for every group,
        // and only asked by a destination whose group has a filter.
        let filtered_group = self.assignment.group.filter.is_some();
        let routed;
        let routes = match self.assignment.filters.as_ref().filter(|_| filtered_group) {
            None => None,
            Some(filters) => {
                let cached = chunk.routes.get_or_init(|| {
                    let (routes, not_json) = filters.route(&chunk.records);
                    self.task.metrics.records_not_json.inc_by(not_json);
                    routes
                });
                if cached.by == filters.id() {
                    Some(cached)
                } else {
                    // Judged by another configuration's filters (a writer that has not yet seen
                    // a reload, or has): judged again by this one's, for this destination only.
                    routed = filters.route(&chunk.records).0;
                    Some(&routed)
                }
            }
        };
        let group = self.assignment.index;
        let take = |record: u32, user: Option<u32>| {
            routes.is_none_or(|r| {
                let verdicts = match user {
                    None => r.records[record as usize],
                    Some(user) => r.users[record as usize][user as usize],
                };
                Filters::takes(verdicts, group)
            })
        };
        let (entries, filtered) = entries::build(&chunk, self.assignment.group.kpl, &map, max_record_bytes, &take);
        if filtered > 0 {
            self.task.metrics.destination_records_filtered.with_label_values(&[&*self.task.name]).inc_by(filtered);
        }
        let before = self.pending.len();
        self.pending.extend(
            entries
                .into_iter()
                .map(|(index, payload)| Pending::new(Arc::clone(&chunk), index, payload, now, max_record_bytes)),
        );
        let added = self.pending.len() - before;
        let too_large = self.pending.iter().skip(before).filter(|p| p.too_large()).count();
        if too_large > 0 {
            self.count_too_large(too_large);
        }
        let bytes = self.pending.iter().skip(before).map(Pending::size).sum();
        self.ledger.open(chunk, permit, added, bytes);
        self.update_gauges();
    }

    /// Takes a reloaded configuration's assignment, if there is one: the group's settings and
    /// filter, its backoff and dead-letter stream, and its rate limits (the limiter is rebuilt
    /// only when they changed: a reload that leaves them alone keeps its bucket).
    fn follow_assignment(&mut self) {
        if !self.task.assignment.has_changed().unwrap_or(false) {
            return;
        }
        let new = self.task.assignment.borrow_and_update().clone();
        let (old, group) = (&self.assignment.group, &new.group);
        let rates_changed =
            old.records_per_second != group.records_per_second || old.bytes_per_second != group.bytes_per_second;
        if old.initial_backoff != group.initial_backoff || old.max_backoff != group.max_backoff {
            self.backoff = Backoff::for_group(group);
        }
        let letters_changed = old.dead_letter_stream != group.dead_letter_stream
            || self.assignment.dead_letter_limits != new.dead_letter_limits;
        if letters_changed {
            self.dead_letter = dead_letter_for(&new, &self.task.edge, &self.backoff);
        }
        tracing::info!(destination = %self.task.name, group = new.index, "Destination follows its group as the reloaded configuration says it.");
        self.assignment = new;
        if rates_changed {
            let (shards, share) = (*self.task.open_shards.borrow(), *self.task.share.borrow());
            self.limiter = limiter_for(&self.assignment.group, shards, share);
        }
    }

    /// Records larger than the destination takes: counted once each, as they are found.
    fn count_too_large(&self, n: usize) {
        self.task.metrics.destination_records_too_large.with_label_values(&[&*self.task.name]).inc_by(n as u64);
        tracing::warn!(
            destination = %self.task.name,
            records = n,
            max_record_bytes = self.limits.max_record_bytes,
            "Records larger than this destination takes (its MaxRecordSizeInKiB); they go to the dead-letter stream as too_large_for_destination."
        );
    }

    /// The destination's limits changed (discovery read its `MaxRecordSizeInKiB` again): batches
    /// follow, and queued entries are checked again against the new record size.
    fn follow_limits(&mut self) {
        let limits = *self.task.limits.borrow_and_update();
        let batch = BatchLimits::for_stream(limits);
        if batch == self.limits {
            return;
        }
        self.limits = batch;
        tracing::info!(destination = %self.task.name, max_record_bytes = limits.max_record_bytes, max_request_bytes = limits.max_request_bytes(), "Destination record size limit changed; batches follow it.");
        let was: usize = self.pending.iter().filter(|p| p.too_large()).count();
        let now = self.pending.iter_mut().map(|p| p.check(limits.max_record_bytes)).filter(|large| *large).count();
        if now > was {
            self.count_too_large(now - was);
        }
    }

    fn batch_full(&self) -> bool {
        let mut bytes = 0;
        let mut count = 0;
        for p in &self.pending {
            bytes += p.encoded_size();
            count += 1;
            if batch::is_full(count, bytes, self.limits) {
                return true;
            }
        }
        false
    }

    /// The signals that cut a wait short, owned so the wait may borrow the writer.
    pub(super) fn guard(&self) -> Guard {
        Guard { stop: self.task.stop.clone(), removed: self.task.removed.clone(), shed: Arc::clone(&self.task.shed) }
    }

    /// Drops the records this destination no longer owes: those of source readings whose lease
    /// this worker lost (the new owner reads them again from the stored checkpoint and sends
    /// them), and those it was shed from (its catch-up reads them again). A request already in
    /// flight settles within the PutRecords attempt timeout, which a new owner waits out.
    pub(super) fn drop_released(&mut self) {
        let Some(front) = self.pending.front() else { return };
        let revocations = front.chunk.shard.revocations();
        if revocations == self.revocations {
            return;
        }
        self.revocations = revocations;
        let id = Arc::clone(&self.task.id);
        let (mut lost, mut shed, mut bytes) = ((0u64, 0u64), (0u64, 0u64), 0u64);
        // Entries of one chunk stand together: ask each chunk once.
        let mut last: Option<(u64, bool)> = None;
        self.pending.retain(|p| {
            let owed = match last {
                Some((chunk, owed)) if chunk == p.chunk.id => owed,
                _ => p.chunk.owed_by(&id),
            };
            last = Some((p.chunk.id, owed));
            if !owed {
                let count = if released(&p.chunk) == Outcome::LeaseLost { &mut lost } else { &mut shed };
                count.0 += 1;
                count.1 += p.size() as u64;
                bytes += p.size() as u64;
            }
            owed
        });
        if lost.0 + shed.0 == 0 {
            return;
        }
        self.ledger.forget_released(bytes as usize);
        self.count(Outcome::LeaseLost, lost.0, lost.1);
        self.count(Outcome::Shed, shed.0, shed.1);
        self.update_gauges();
        tracing::info!(destination = %self.task.name, lease_lost = lost.0, shed = shed.0, "Dropped queued records this destination no longer owes: of shards whose lease this worker lost (their new owner sends them), or that it was shed from (its catch-up reads them again).");
    }

    pub(super) fn count(&self, outcome: Outcome, records: u64, bytes: u64) {
        if records > 0 {
            let labels = [&*self.task.name, outcome.as_str()];
            self.task.metrics.records_written.with_label_values(&labels).inc_by(records);
            self.task.metrics.bytes_written.with_label_values(&labels).inc_by(bytes);
        }
    }

    /// The stream is gone: nothing it holds may hold back progress any more.
    fn release_everything(&mut self) {
        let released = self.pending.len();
        self.pending.clear();
        self.ledger.release_all();
        self.task.queue.close();
        let mut late = 0usize;
        while let Ok(delivery) = self.task.queue.try_recv() {
            late += delivery.chunk.records.len();
            delivery.chunk.acknowledge(&self.task.id);
        }
        let dropped = (released + late) as u64;
        if dropped > 0 {
            self.task
                .metrics
                .records_written
                .with_label_values(&[&*self.task.name, Outcome::DestinationDeleted.as_str()])
                .inc_by(dropped);
        }
    }

    pub(super) async fn confirm_deleted(&self) -> Result<bool, Interrupt> {
        self.guard().run(self.task.edge.deleted(&self.task.stream)).await
    }

    pub(super) fn update_gauges(&self) {
        let m = &self.task.metrics;
        m.buffered_records.with_label_values(&[&*self.task.name]).set(self.pending.len() as i64);
        m.buffered_bytes.with_label_values(&[&*self.task.name]).set(self.ledger.buffered_bytes() as i64);
    }

    pub(super) fn clear_gauges(&self) {
        let m = &self.task.metrics;
        let label = [&*self.task.name];
        let _ = m.buffered_records.remove_label_values(&label);
        let _ = m.buffered_bytes.remove_label_values(&label);
        let _ = m.destination_stalled.remove_label_values(&label);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use bytes::Bytes;
    use futures::future::BoxFuture;
    use tokio::sync::{mpsc, watch};

    use super::*;
    use crate::aws::ErrorKind;
    use crate::metrics::Metrics;
    use crate::progress::{LeaseProof, Progress};
    use crate::record::{SequenceNumber, SourceRecord};
    use crate::sink::entries::ShardMap;
    use crate::sink::put::PutEdge;
    use crate::sink::put::{CallError, EntryAnswer};
    use aws_sdk_kinesis::types::PutRecordsRequestEntry;

    type Respond = dyn Fn(&[String]) -> Result<Vec<EntryAnswer>, CallError> + Send + Sync;

    thread_local! {
        /// Writers on this thread send without their fence: for the fleet simulation's proof that
        /// it sees what the fence prevents.
        pub(crate) static UNFENCED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A put edge that answers by the partition keys of each request, and remembers them.
    struct Fake {
        respond: Box<Respond>,
        requests: Mutex<Vec<Vec<String>>>,
    }

    impl std::fmt::Debug for Fake {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Fake")
        }
    }

    impl PutEdge for Fake {
        fn put_records<'a>(
            &'a self,
            _stream: &'a str,
            entries: Vec<PutRecordsRequestEntry>,
        ) -> BoxFuture<'a, Result<Vec<EntryAnswer>, CallError>> {
            let keys: Vec<String> = entries.iter().map(|e| e.partition_key().unwrap_or_default().to_string()).collect();
            self.requests.lock().unwrap().push(keys.clone());
            let answer = (self.respond)(&keys);
            Box::pin(async move { answer })
        }

        fn deleted<'a>(&'a self, _stream: &'a str) -> BoxFuture<'a, bool> {
            Box::pin(async { false })
        }
    }

    struct Harness {
        fake: Arc<Fake>,
        metrics: Arc<Metrics>,
        progress: Arc<Progress>,
        stop: CancellationToken,
        writer: tokio::task::JoinHandle<Exit>,
    }

    /// A writer for "out" fed one chunk of records with the given partition keys.
    fn start(keys: &[&str], respond: Box<Respond>) -> Harness {
        start_fenced(keys, respond, None)
    }

    /// As [`start`], the shard's lease proven (or not) by `proof`.
    fn start_fenced(keys: &[&str], respond: Box<Respond>, proof: Option<Arc<dyn LeaseProof>>) -> Harness {
        start_configured(keys, respond, proof, "")
    }

    /// As [`start_fenced`], with more of the destination group's settings (`extra`: TOML lines).
    fn start_configured(
        keys: &[&str],
        respond: Box<Respond>,
        proof: Option<Arc<dyn LeaseProof>>,
        extra: &str,
    ) -> Harness {
        start_chunks(&[(1, keys)], respond, proof, extra)
    }

    /// As [`start_configured`], fed chunks (id, partition keys) in this order, each of its own
    /// tracker (`shardId-<n>`), their records numbered in this order too.
    fn start_chunks(
        chunks: &[(u64, &[&str])],
        respond: Box<Respond>,
        proof: Option<Arc<dyn LeaseProof>>,
        extra: &str,
    ) -> Harness {
        let settings = crate::Settings::from_toml(&format!(
            r#"
            [source]
            stream_name = "in"
            [[destinations]]
            pattern = "^out$"
            linger = "1ms"
            initial_backoff = "1ms"
            max_backoff = "5ms"
            records_per_second = "100000"
            {extra}
            "#
        ))
        .unwrap();
        let fake = Arc::new(Fake { respond, requests: Mutex::new(Vec::new()) });
        let metrics = Arc::new(Metrics::new());
        let (queue_tx, queue) = mpsc::unbounded_channel();
        let (gone, _) = mpsc::unbounded_channel();
        let (remap, _) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let task = DestinationTask {
            name: "out".into(),
            stream: "out".into(),
            id: "out".into(),
            source_stream: "in".into(),
            edge: Arc::clone(&fake) as Arc<dyn PutEdge>,
            queue,
            open_shards: watch::channel(1).1,
            shard_map: watch::channel(Arc::new(ShardMap::default())).1,
            limits: watch::channel(crate::record::StreamLimits::default()).1,
            assignment: crate::sink::Assignment::fixed(Arc::new(settings.destinations[0].clone()), 0),
            share: watch::channel(1.0).1,
            metrics: Arc::clone(&metrics),
            removed: CancellationToken::new(),
            stop: stop.clone(),
            gone,
            remap,
            shed: Arc::default(),
        };
        let progress = Arc::new(Progress::default());
        if let Some(proof) = proof {
            progress.fence_with(proof);
        }
        let (handle, _) = crate::fanout::DestinationHandle::new("out".into(), "out".into(), 1 << 20);
        let mut sequence = 0;
        for (n, (id, keys)) in chunks.iter().enumerate() {
            // Each chunk on a tracker of its own, as a catch-up lane's chunks are.
            let shard = progress.shard(&format!("shardId-{n}"));
            let records = keys
                .iter()
                .map(|k| {
                    sequence += 1;
                    SourceRecord {
                        sequence_number: SequenceNumber::parse(&sequence.to_string()).unwrap(),
                        partition_key: k.to_string(),
                        data: Bytes::from_static(b"data"),
                        arrival: None,
                        user_records: None,
                    }
                })
                .collect();
            let chunk = shard.begin(*id, records, vec!["out".into()]);
            let permit = handle.reserve_now(1).unwrap();
            queue_tx.send(Delivery { chunk, permit }).unwrap();
        }
        // The queue stays open: the writer waits for more instead of stopping.
        std::mem::forget(queue_tx);
        let writer = tokio::spawn(task.run());
        Harness { fake, metrics, progress, stop, writer }
    }

    impl Harness {
        fn count(&self, outcome: Outcome) -> u64 {
            self.metrics.records_written.with_label_values(&["out", outcome.as_str()]).get()
        }

        async fn until(&self, what: &str, done: impl Fn(&Harness) -> bool) {
            let waited = tokio::time::timeout(Duration::from_secs(10), async {
                while !done(self) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
            assert!(
                waited.is_ok(),
                "timed out waiting for: {what}; ok {} rejected {} requests {:?}",
                self.count(Outcome::Ok),
                self.count(Outcome::Rejected),
                self.fake.requests.lock().unwrap().iter().take(12).collect::<Vec<_>>()
            );
        }

        async fn stop(self) -> Vec<Vec<String>> {
            self.stop.cancel();
            assert_eq!(self.writer.await.unwrap(), Exit::Stopped(Stopped));
            self.fake.requests.lock().unwrap().clone()
        }
    }

    fn answer(error_code: Option<&str>) -> EntryAnswer {
        EntryAnswer { error_code: error_code.map(str::to_string), ..EntryAnswer::default() }
    }

    #[tokio::test]
    async fn only_the_failed_entries_are_sent_again() {
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let respond = Box::new(move |keys: &[String]| {
            let first = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            Ok(keys
                .iter()
                .map(|k| match (first, k.as_str()) {
                    (true, "k1") => answer(Some("ProvisionedThroughputExceededException")),
                    (true, "k3") => answer(Some("InternalFailure")),
                    _ => answer(None),
                })
                .collect())
        });
        let h = start(&["k0", "k1", "k2", "k3", "k4"], respond);
        h.until("every record accepted", |h| h.count(Outcome::Ok) == 5).await;
        assert_eq!(h.progress.outstanding(), 0, "the chunk is acknowledged");
        assert_eq!((h.count(Outcome::Throttled), h.count(Outcome::Retried)), (1, 1));
        let requests = h.stop().await;
        assert_eq!(requests, vec![vec!["k0", "k1", "k2", "k3", "k4"], vec!["k1", "k3"]]);
    }

    /// A destination that refuses a request holding the entry of key "bad" as a whole (a
    /// ValidationException), unless that entry is alone: then it is refused on its own.
    fn refuses_bad() -> Box<Respond> {
        Box::new(|keys: &[String]| {
            if keys.len() > 1 && keys.iter().any(|k| k == "bad") {
                return Err(CallError {
                    kind: ErrorKind::Permanent,
                    code: "ValidationException".into(),
                    cause: "1 validation error detected".into(),
                });
            }
            Ok(keys.iter().map(|k| answer((k == "bad").then_some("ValidationException"))).collect())
        })
    }

    #[tokio::test]
    async fn a_request_refused_as_invalid_is_split_until_the_bad_entry_is_alone() {
        let keys = ["a", "b", "c", "d", "e", "bad", "f", "g"];
        let h = start(&keys, refuses_bad());
        h.until("the valid ones accepted and the bad one held", |h| {
            h.count(Outcome::Ok) == 7 && h.count(Outcome::Rejected) == 1
        })
        .await;
        assert_eq!(h.count(Outcome::DeadLettered), 0);
        let requests = h.stop().await;
        assert_eq!(requests[0].len(), 8, "the first request holds everything");
        assert!(requests.iter().any(|r| r == &vec!["bad".to_string()]), "the bad entry ends up alone: {requests:?}");
        let accepted_twice = keys.iter().filter(|k| **k != "bad").any(|k| {
            requests
                .iter()
                .filter(|r| r.len() == 1 || !r.contains(&"bad".to_string()))
                .filter(|r| r.contains(&k.to_string()))
                .count()
                > 1
        });
        assert!(!accepted_twice, "a valid entry is sent in one accepted request only: {requests:?}");
    }

    #[tokio::test]
    async fn in_strict_order_a_request_split_for_an_invalid_entry_still_holds_one_record_per_key() {
        let keys = ["a", "a", "b", "c", "bad", "a", "b", "d", "c", "e"];
        let h = start_configured(&keys, refuses_bad(), None, "ordering = \"strict\"");
        h.until("the valid ones accepted and the bad one held", |h| {
            h.count(Outcome::Ok) == 9 && h.count(Outcome::Rejected) == 1
        })
        .await;
        let requests = h.stop().await;
        assert_eq!(requests[0], ["a", "b", "c", "bad", "d", "e"], "the first of each key leads");
        for request in &requests {
            let distinct: std::collections::HashSet<&String> = request.iter().collect();
            assert_eq!(distinct.len(), request.len(), "one record per key in every request: {requests:?}");
        }
        assert!(requests.iter().any(|r| r == &vec!["bad".to_string()]), "the bad entry ends up alone: {requests:?}");
    }

    #[tokio::test]
    async fn records_refused_here_never_fill_a_request_in_either_ordering() {
        for ordering in ["batched", "strict"] {
            // 600 records with keys Kinesis refuses (over 256 characters), no dead-letter stream:
            // held, never sent, they take no room, and the records behind them go.
            let long: Vec<String> = (0..600).map(|i| format!("{i}{}", "k".repeat(300))).collect();
            let mut keys: Vec<&str> = long.iter().map(String::as_str).collect();
            keys.extend(["a", "b"]);
            let respond = Box::new(|keys: &[String]| Ok(keys.iter().map(|_| answer(None)).collect()));
            let h = start_configured(&keys, respond, None, &format!("ordering = \"{ordering}\""));
            h.until(&format!("{ordering}: the valid records accepted"), |h| h.count(Outcome::Ok) == 2).await;
            assert_eq!(h.count(Outcome::Rejected), 600, "{ordering}: each held record counted once");
            assert_eq!(h.stop().await, vec![vec!["a", "b"]], "{ordering}: only the valid ones are sent");
        }
    }

    /// A lease proof switched by the test.
    #[derive(Default)]
    struct Switch(std::sync::atomic::AtomicBool);

    impl LeaseProof for Switch {
        fn proven(&self, _shard: &str) -> bool {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_sent_while_the_shard_s_lease_is_not_proven() {
        let proof = Arc::new(Switch::default());
        let respond = Box::new(|keys: &[String]| Ok(keys.iter().map(|_| answer(None)).collect()));
        let h = start_fenced(&["a", "b"], respond, Some(Arc::clone(&proof) as Arc<dyn LeaseProof>));
        // A minute of an unconfirmed lease (a lease table out of reach, a paused process): the
        // writer looks again and again, and sends nothing.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(h.fake.requests.lock().unwrap().is_empty(), "sent while the lease was not proven");
        assert_eq!(h.progress.outstanding(), 1);
        proof.0.store(true, std::sync::atomic::Ordering::SeqCst);
        h.until("both records accepted once the lease is proven", |h| h.count(Outcome::Ok) == 2).await;
        assert_eq!(h.stop().await, vec![vec!["a", "b"]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_letter_write_stops_at_the_fence() {
        let proof = Arc::new(Switch(true.into()));
        // The destination refuses the record for good; the dead-letter stream throttles it.
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let respond = Box::new(move |keys: &[String]| {
            let code = match calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0 => "AccessDeniedException",
                _ => "ProvisionedThroughputExceededException",
            };
            Ok(keys.iter().map(|_| answer(Some(code))).collect())
        });
        let h = start_configured(
            &["a"],
            respond,
            Some(Arc::clone(&proof) as Arc<dyn LeaseProof>),
            "dead_letter_stream = \"dlq\"",
        );
        let requests = |h: &Harness| h.fake.requests.lock().unwrap().len();
        h.until("the dead-letter stream is retried", |h| requests(h) >= 3).await;
        // The lease is no longer proven: nothing more goes out, to the dead-letter stream either.
        proof.0.store(false, std::sync::atomic::Ordering::SeqCst);
        let sent = requests(&h);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(requests(&h) <= sent + 1, "{} requests after the lease stopped being proven", requests(&h) - sent);
        assert_eq!(h.progress.outstanding(), 1, "the record is held, not dead-lettered");
    }

    #[tokio::test(start_paused = true)]
    async fn held_records_keep_their_order_whatever_their_chunks_ids() {
        // A catch-up's chunk can take a higher id than the live chunk queued after it (the live
        // feed takes its id before the shard's lock): order is the queue's, never the ids'.
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let respond = Box::new(move |keys: &[String]| {
            let code = match calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0 => Some("AccessDeniedException"),
                _ => None,
            };
            Ok(keys.iter().map(|_| answer(code)).collect())
        });
        let h = start_chunks(&[(10, &["k1", "k2"]), (5, &["k3", "k4"])], respond, None, "");
        h.until("every record accepted once the cause is fixed", |h| h.count(Outcome::Ok) == 4).await;
        let requests = h.stop().await;
        assert_eq!(requests.last().unwrap(), &vec!["k1", "k2", "k3", "k4"], "{requests:?}");
    }
}
