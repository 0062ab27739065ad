//! One destination stream's writer: queue → batch → rate limit → PutRecords → retry the failed
//! records → acknowledge.
//!
//! Records are sent in arrival order; failed ones go back to the front of the queue so they are
//! retried before anything newer. A chunk is acknowledged to the source once every one of its
//! records was accepted (or dead-lettered), and its budget returns to the source then.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::batch::{self, BatchLimits};
use super::dead_letter::{DeadLetter, Rejected};
use super::entries::{self, Payload, ShardMap};
use super::limiter::Limiter;
use super::retry::{Backoff, EntryOutcome, classify_batch};
use crate::aws::{ErrorKind, classify};
use crate::config::DestinationGroup;
use crate::fanout::Delivery;
use crate::metrics::{Metrics, Outcome};
use crate::progress::Chunk;

/// Per-shard write limits of Kinesis, the base of `auto` rates.
pub const RECORDS_PER_SHARD: u64 = 1_000;
pub const BYTES_PER_SHARD: u64 = 1 << 20;

/// Why a destination task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The service is stopping; unacknowledged records stay unacknowledged.
    Stopped,
    /// The stream was deleted; everything it held was released.
    Deleted,
}

/// Everything a destination task needs, built by discovery.
pub struct DestinationTask {
    pub name: Arc<str>,
    pub source_stream: Arc<str>,
    pub client: aws_sdk_kinesis::Client,
    pub group: Arc<DestinationGroup>,
    pub queue: mpsc::UnboundedReceiver<Delivery>,
    /// Open shard count, refreshed by discovery; `auto` rates follow it.
    pub open_shards: watch::Receiver<u32>,
    /// The destination's shard hash ranges, for re-aggregation per shard.
    pub shard_map: watch::Receiver<Arc<ShardMap>>,
    /// This worker's share of the source's shards (1 alone): N workers together stay within
    /// the destination's limits.
    pub share: watch::Receiver<f64>,
    pub metrics: Arc<Metrics>,
    /// Discovery no longer sees the stream.
    pub removed: CancellationToken,
    /// The grace period is over: stop at once.
    pub stop: CancellationToken,
    /// Tells discovery that PutRecords found the stream gone.
    pub gone: mpsc::UnboundedSender<Arc<str>>,
    /// Asks discovery for a new shard map: an aggregate landed in another shard than it was
    /// built for.
    pub remap: mpsc::UnboundedSender<Arc<str>>,
}

/// One PutRecords entry waiting to be written.
struct Pending {
    chunk: Arc<Chunk>,
    /// The source record it comes from (for origins in dead letters).
    index: u32,
    payload: Payload,
    queued_at: Instant,
    retry: bool,
    /// Why Kinesis would refuse this entry: it is never sent, but refused on its own.
    invalid: Option<crate::record::InvalidEntry>,
    /// Already counted as `rejected` (held for want of a dead-letter stream): count it once.
    held: bool,
}

impl Pending {
    /// An entry to write, checked against Kinesis's limits once, here.
    fn new(chunk: Arc<Chunk>, index: u32, payload: Payload, queued_at: Instant) -> Self {
        let mut pending = Pending { chunk, index, payload, queued_at, retry: false, invalid: None, held: false };
        pending.invalid =
            crate::record::validate_entry(pending.partition_key(), pending.explicit_hash_key(), pending.data().len())
                .err();
        pending
    }

    fn source(&self) -> &crate::record::SourceRecord {
        &self.chunk.records[self.index as usize]
    }

    fn user(&self, i: u32) -> &crate::kpl::UserRecord {
        &self.source().user_records.as_ref().expect("user entries come from aggregates")[i as usize]
    }

    fn partition_key(&self) -> &str {
        match &self.payload {
            Payload::Source => &self.source().partition_key,
            Payload::User(i) => &self.user(*i).partition_key,
            Payload::Built { partition_key, .. } => partition_key,
        }
    }

    fn explicit_hash_key(&self) -> Option<&str> {
        match &self.payload {
            Payload::Source => None,
            Payload::User(i) => self.user(*i).explicit_hash_key.as_deref(),
            Payload::Built { explicit_hash_key, .. } => explicit_hash_key.as_deref(),
        }
    }

    fn data(&self) -> &bytes::Bytes {
        match &self.payload {
            Payload::Source => &self.source().data,
            Payload::User(i) => &self.user(*i).data,
            Payload::Built { data, .. } => data,
        }
    }

    /// Bytes against Kinesis limits and buffers.
    fn size(&self) -> usize {
        self.data().len() + self.partition_key().len()
    }

    fn encoded_size(&self) -> usize {
        let keys = self.partition_key().len() + self.explicit_hash_key().map_or(0, str::len);
        batch::encoded_size(keys, self.data().len())
    }

    fn entry(&self) -> PutRecordsRequestEntry {
        PutRecordsRequestEntry::builder()
            .data(Blob::new(self.data().to_vec()))
            .partition_key(self.partition_key())
            .set_explicit_hash_key(self.explicit_hash_key().map(str::to_string))
            .build()
            .expect("data and partition key are set")
    }
}

/// What this destination still owes a chunk.
struct Ticket {
    remaining: usize,
    chunk: Arc<Chunk>,
    _permit: OwnedSemaphorePermit,
}

struct Writer {
    task: DestinationTask,
    pending: VecDeque<Pending>,
    tickets: HashMap<u64, Ticket>,
    limiter: Limiter,
    backoff: Backoff,
    dead_letter: Option<DeadLetter>,
    buffered_bytes: usize,
    stalled: bool,
    limits: BatchLimits,
    /// Set while a request refused as a whole for validation is split to find its bad entries.
    split: Option<Split>,
    /// Source readings revoked so far, as last seen: the queue is searched for their records
    /// only when this moves.
    revocations: u64,
}

/// PutRecords refuses a whole request for one entry it finds invalid. The leading `suspect`
/// entries are then sent in requests of at most `size`, halving on each refusal, until the
/// entries at fault are alone and refused on their own: valid entries are never dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Split {
    suspect: usize,
    size: usize,
}

/// Request-level error codes that mean "something in this request is invalid".
const VALIDATION_CODES: [&str; 2] = ["ValidationException", "InvalidArgumentException"];

enum Interrupt {
    Stop,
    Removed,
}

struct Guard {
    stop: CancellationToken,
    removed: CancellationToken,
}

impl Guard {
    async fn run<T>(self, work: impl Future<Output = T>) -> Result<T, Interrupt> {
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => Err(Interrupt::Stop),
            _ = self.removed.cancelled() => Err(Interrupt::Removed),
            out = work => Ok(out),
        }
    }
}

impl DestinationTask {
    pub async fn run(self) -> Exit {
        let group = Arc::clone(&self.group);
        let backoff = Backoff::try_new(group.initial_backoff, group.max_backoff)
            .unwrap_or_else(|_| Backoff::try_new(Duration::from_millis(100), Duration::from_secs(10)).expect("valid"));
        let shards = *self.open_shards.borrow();
        let share = *self.share.borrow();
        let dead_letter = group
            .dead_letter_stream
            .clone()
            .map(|stream| DeadLetter::new(stream, self.client.clone(), backoff.clone()));
        let mut writer = Writer {
            limiter: limiter_for(&group, shards, share),
            task: self,
            pending: VecDeque::new(),
            tickets: HashMap::new(),
            backoff,
            dead_letter,
            buffered_bytes: 0,
            stalled: false,
            limits: BatchLimits::default(),
            split: None,
            revocations: 0,
        };
        let name = Arc::clone(&writer.task.name);
        let exit = writer.run().await;
        match exit {
            Exit::Deleted => {
                tracing::info!(destination = %name, "Destination removed; its pending records no longer hold back progress.")
            }
            Exit::Stopped => tracing::debug!(destination = %name, "Destination writer stopped."),
        }
        writer.clear_gauges();
        exit
    }
}

fn limiter_for(group: &DestinationGroup, open_shards: u32, share: f64) -> Limiter {
    let share = if share.is_finite() && share > 0.0 { share.min(1.0) } else { 1.0 };
    let scaled = |rate: u64| ((rate as f64 * share).ceil() as u64).max(1);
    Limiter::new(
        scaled(group.records_per_second.resolve(open_shards, RECORDS_PER_SHARD)),
        scaled(group.bytes_per_second.resolve(open_shards, BYTES_PER_SHARD)),
    )
}

impl Writer {
    async fn run(&mut self) -> Exit {
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
            Interrupt::Stop => Exit::Stopped,
            Interrupt::Removed => {
                self.release_everything();
                Exit::Deleted
            }
        }
    }

    fn name(&self) -> &str {
        &self.task.name
    }

    /// Waits until there is something to send and the batch is full or has lingered long enough.
    async fn fill(&mut self) -> Result<(), Interrupt> {
        let shards_changed = self.task.open_shards.has_changed().unwrap_or(false);
        let share_changed = self.task.share.has_changed().unwrap_or(false);
        if shards_changed || share_changed {
            let shards = *self.task.open_shards.borrow_and_update();
            let share = *self.task.share.borrow_and_update();
            self.limiter = limiter_for(&self.task.group, shards, share);
            tracing::info!(destination = %self.task.name, open_shards = shards, share, rates = ?self.limiter.rates(), "Destination rate limits follow its shard count and this worker's share.");
        }
        while self.pending.is_empty() {
            let delivery = self.next_delivery(None).await?;
            if let Some(delivery) = delivery {
                self.accept(delivery);
            }
        }
        let front = self.pending.front().expect("not empty");
        let deadline = if front.retry { Instant::now() } else { front.queued_at + self.task.group.linger };
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
            _ = self.task.stop.cancelled() => Err(Interrupt::Stop),
            _ = self.task.removed.cancelled() => Err(Interrupt::Removed),
            delivery = self.task.queue.recv() => match delivery {
                Some(d) => Ok(Some(d)),
                None => Err(Interrupt::Stop),
            },
            _ = sleep => Ok(None),
        }
    }

    fn accept(&mut self, delivery: Delivery) {
        let Delivery { chunk, permit } = delivery;
        if chunk.shard.revoked() {
            self.count(Outcome::LeaseLost, chunk.records.len() as u64, chunk.bytes as u64);
            return;
        }
        let now = Instant::now();
        let map = Arc::clone(&self.task.shard_map.borrow());
        let entries = entries::build(&chunk, self.task.group.kpl, &map);
        if entries.is_empty() {
            // Only empty aggregates: nothing to write, nothing owed.
            self.complete(&chunk);
            return;
        }
        let before = self.pending.len();
        self.pending
            .extend(entries.into_iter().map(|(index, payload)| Pending::new(Arc::clone(&chunk), index, payload, now)));
        let added = self.pending.len() - before;
        self.buffered_bytes += self.pending.iter().skip(before).map(Pending::size).sum::<usize>();
        self.tickets.insert(chunk.id, Ticket { remaining: added, chunk, _permit: permit });
        self.update_gauges();
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
    fn guard(&self) -> Guard {
        Guard { stop: self.task.stop.clone(), removed: self.task.removed.clone() }
    }

    /// Drops the records of source readings whose lease this worker lost: the new owner reads
    /// them again from the stored checkpoint and sends them. A request already in flight
    /// settles within the PutRecords attempt timeout, which the new owner waits out.
    fn drop_revoked(&mut self) {
        let Some(front) = self.pending.front() else { return };
        let revocations = front.chunk.shard.revocations();
        if revocations == self.revocations {
            return;
        }
        self.revocations = revocations;
        let (mut records, mut bytes) = (0u64, 0u64);
        self.pending.retain(|p| {
            let keep = !p.chunk.shard.revoked();
            if !keep {
                records += 1;
                bytes += p.size() as u64;
            }
            keep
        });
        if records == 0 {
            return;
        }
        // Their budgets go back to the source; nothing is acknowledged for them.
        self.tickets.retain(|_, t| !t.chunk.shard.revoked());
        self.buffered_bytes = self.buffered_bytes.saturating_sub(bytes as usize);
        self.count(Outcome::LeaseLost, records, bytes);
        self.update_gauges();
        tracing::info!(destination = %self.task.name, records, "Dropped queued records of shards whose lease this worker lost; their new owner sends them.");
    }

    fn count(&self, outcome: Outcome, records: u64, bytes: u64) {
        if records > 0 {
            let labels = [&*self.task.name, outcome.as_str()];
            self.task.metrics.records_written.with_label_values(&labels).inc_by(records);
            self.task.metrics.bytes_written.with_label_values(&labels).inc_by(bytes);
        }
    }

    async fn send_batch(&mut self) -> Result<(), Interrupt> {
        self.drop_revoked();
        let mut count = batch::fits(self.pending.iter().map(Pending::encoded_size), self.limits);
        if let Some(split) = self.split {
            count = count.min(split.size).min(split.suspect);
        }
        if count == 0 {
            return Ok(());
        }
        // `None`: refused as a whole for an invalid entry; sent again in smaller requests.
        let Some(outcomes) = self.put(count).await? else { return Ok(()) };
        self.settle(outcomes).await?;
        if let Some(split) = &mut self.split {
            split.suspect = split.suspect.saturating_sub(count);
            if split.suspect == 0 {
                self.split = None;
            }
        }
        Ok(())
    }

    /// Sends the valid entries among the first `count` and returns every entry's outcome (invalid
    /// ones refused without sending), or `None` when the request must be split first.
    async fn put(&mut self, count: usize) -> Result<Option<Vec<EntryOutcome>>, Interrupt> {
        let batch: Vec<&Pending> = self.pending.iter().take(count).collect();
        let refused = |p: &Pending| {
            p.invalid.as_ref().map(|problem| EntryOutcome::Reject {
                code: "ValidationException".into(),
                message: format!("not sent: {problem}"),
            })
        };
        let entries: Vec<PutRecordsRequestEntry> =
            batch.iter().filter(|p| p.invalid.is_none()).map(|p| p.entry()).collect();
        let sent = entries.len();
        let bytes: usize = batch.iter().filter(|p| p.invalid.is_none()).map(|p| p.size()).sum();
        if sent == 0 {
            return Ok(Some(batch.into_iter().map(|p| refused(p).expect("invalid")).collect()));
        }
        // Outcomes of the sent entries, placed back among the refused ones.
        let merge = |answers: Vec<EntryOutcome>, batch: &[&Pending]| -> Vec<EntryOutcome> {
            let mut answers = answers.into_iter();
            batch
                .iter()
                .map(|p| refused(p).unwrap_or_else(|| answers.next().expect("one answer per sent entry")))
                .collect()
        };

        let waited = self.guard().run(self.limiter.acquire(sent, bytes)).await?;
        self.task.metrics.rate_limiter_wait_seconds.with_label_values(&[self.name()]).inc_by(waited.as_secs_f64());

        let started = Instant::now();
        let request = self.task.client.put_records().stream_name(&*self.task.name).set_records(Some(entries)).send();
        let result = self.guard().run(request).await?;
        self.task
            .metrics
            .put_records_seconds
            .with_label_values(&[self.name()])
            .observe(started.elapsed().as_secs_f64());
        let batch: Vec<&Pending> = self.pending.iter().take(count).collect();

        let answers = match result {
            Ok(output) => {
                let outcomes = classify_batch(output.records().iter().map(|e| (e.error_code(), e.error_message())));
                self.check_routing(batch.iter().copied().filter(|p| p.invalid.is_none()), output.records());
                if outcomes.len() != sent {
                    tracing::warn!(destination = %self.task.name, sent, answered = outcomes.len(), "PutRecords answered a different number of entries; retrying them all.");
                    vec![EntryOutcome::Retry { code: "MismatchedResponse".into() }; sent]
                } else {
                    outcomes
                }
            }
            Err(err) => {
                let kind = classify(&err);
                let code = crate::aws::error_code(&err);
                let cause = crate::aws::chain(&err);
                match kind {
                    ErrorKind::Permanent if sent > 1 && VALIDATION_CODES.contains(&code.as_str()) => {
                        let suspect = self.split.map_or(count, |s| s.suspect);
                        let size = (count / 2).max(1);
                        tracing::warn!(destination = %self.task.name, records = sent, error = %cause, "PutRecords refused the request for an invalid entry; splitting it to find the entry at fault.");
                        self.split = Some(Split { suspect, size });
                        return Ok(None);
                    }
                    ErrorKind::NotFound => {
                        if self.confirm_deleted().await? {
                            let _ = self.task.gone.send(Arc::clone(&self.task.name));
                            return Err(Interrupt::Removed);
                        }
                        tracing::warn!(destination = %self.task.name, error = %cause, "PutRecords said the stream was not found, but it exists; retrying.");
                        vec![EntryOutcome::Retry { code }; sent]
                    }
                    ErrorKind::Permanent => vec![EntryOutcome::Reject { code, message: cause }; sent],
                    ErrorKind::Transient | ErrorKind::InUse => {
                        tracing::warn!(destination = %self.task.name, records = sent, error = %cause, "PutRecords failed as a whole; retrying with backoff.");
                        vec![EntryOutcome::Retry { code }; sent]
                    }
                }
            }
        };
        Ok(Some(merge(answers, &batch)))
    }

    /// Aggregates are built for one destination shard: one that landed elsewhere says the shard
    /// map is stale. Counted, and a new map is asked for.
    fn check_routing<'p>(
        &self,
        sent: impl Iterator<Item = &'p Pending>,
        results: &[aws_sdk_kinesis::types::PutRecordsResultEntry],
    ) {
        let misrouted = sent
            .zip(results)
            .filter(|(p, r)| match (&p.payload, r.shard_id()) {
                (Payload::Built { shard: Some(expected), .. }, Some(landed)) => **expected != *landed,
                _ => false,
            })
            .count();
        if misrouted > 0 {
            self.task.metrics.misrouted_records.with_label_values(&[self.name()]).inc_by(misrouted as u64);
            tracing::warn!(destination = %self.task.name, records = misrouted, "Aggregates landed in other shards than they were built for; reading the destination's shard map again.");
            let _ = self.task.remap.send(Arc::clone(&self.task.name));
        }
    }

    /// Applies per-entry outcomes to the first `outcomes.len()` pending records.
    async fn settle(&mut self, outcomes: Vec<EntryOutcome>) -> Result<(), Interrupt> {
        let sent: Vec<Pending> = self.pending.drain(..outcomes.len()).collect();
        let mut again: Vec<Pending> = Vec::new();
        let mut rejected: Vec<(Pending, String, String)> = Vec::new();
        let (mut ok, mut ok_bytes) = (0u64, 0u64);
        let (mut throttled, mut throttled_bytes) = (0u64, 0u64);
        let (mut retried, mut retried_bytes) = (0u64, 0u64);
        for (mut p, outcome) in sent.into_iter().zip(outcomes) {
            let size = p.size() as u64;
            match outcome {
                EntryOutcome::Accepted => {
                    ok += 1;
                    ok_bytes += size;
                    self.done_with(&p);
                }
                EntryOutcome::Throttled => {
                    throttled += 1;
                    throttled_bytes += size;
                    p.retry = true;
                    again.push(p);
                }
                EntryOutcome::Retry { .. } => {
                    retried += 1;
                    retried_bytes += size;
                    p.retry = true;
                    again.push(p);
                }
                EntryOutcome::Reject { code, message } => rejected.push((p, code, message)),
            }
        }
        self.count(Outcome::Ok, ok, ok_bytes);
        self.count(Outcome::Throttled, throttled, throttled_bytes);
        self.count(Outcome::Retried, retried, retried_bytes);

        let mut held_rejected = false;
        if !rejected.is_empty() {
            held_rejected = !self.dead_letter_or_hold(&mut rejected).await?;
            if held_rejected {
                again.extend(rejected.into_iter().map(|(mut p, _, _)| {
                    p.retry = true;
                    p
                }));
                // Keep the original order: retried and held records interleave as they were sent.
                again.sort_by_key(|p| (p.chunk.id, p.index));
            }
        }

        if throttled > 0 {
            self.limiter.penalize(throttled as usize, throttled_bytes as usize);
        }
        if again.is_empty() {
            self.backoff.reset();
            self.set_stalled(false);
            self.update_gauges();
            return Ok(());
        }
        for p in again.into_iter().rev() {
            self.pending.push_front(p);
        }
        self.update_gauges();
        let delay = if held_rejected { self.backoff.max() } else { self.backoff.next_delay(&mut rand::rng()) };
        tracing::debug!(destination = %self.task.name, throttled, retried, delay_ms = delay.as_millis() as u64, "Retrying failed records after a backoff.");
        self.guard().run(tokio::time::sleep(delay)).await
    }

    /// Sends rejected records to the dead-letter stream. Returns false when there is none, after
    /// saying loudly that the destination stops advancing.
    async fn dead_letter_or_hold(&mut self, rejected: &mut Vec<(Pending, String, String)>) -> Result<bool, Interrupt> {
        let bytes: u64 = rejected.iter().map(|(p, _, _)| p.size() as u64).sum();
        let (code, message) = (rejected[0].1.clone(), rejected[0].2.clone());
        let Some(dead_letter) = self.dead_letter.as_mut() else {
            self.set_stalled(true);
            let newly_held = rejected.iter_mut().filter(|(p, _, _)| !p.held).map(|(p, _, _)| p.held = true).count();
            self.task
                .metrics
                .records_written
                .with_label_values(&[&*self.task.name, Outcome::Rejected.as_str()])
                .inc_by(newly_held as u64);
            tracing::error!(
                destination = %self.task.name,
                records = rejected.len(),
                error_code = %code,
                error = %message,
                "Destination rejects records with an error that retrying cannot fix, and no dead_letter_stream is configured: \
                 it stops advancing (and holds back checkpoints) until the cause is fixed."
            );
            return Ok(false);
        };
        let entries: Vec<Rejected<'_>> = rejected
            .iter()
            .map(|(p, code, message)| Rejected {
                sequence_number: p.source().sequence_number.as_str(),
                partition_key: p.partition_key(),
                data: p.data(),
                shard_id: &p.chunk.shard.shard_id,
                error_code: code.clone(),
                error_message: message.clone(),
            })
            .collect();
        tracing::warn!(destination = %self.task.name, records = entries.len(), error_code = %code, dead_letter_stream = %dead_letter.stream, "Destination rejects records; sending them to the dead-letter stream.");
        let stop = self.task.stop.clone();
        let written = dead_letter.write(&self.task.source_stream, &self.task.name, &entries, &stop).await;
        drop(entries);
        let Ok(unwrapped) = written else {
            return Err(Interrupt::Stop);
        };
        if unwrapped > 0 {
            self.task.metrics.dead_letters_unwrapped.with_label_values(&[&*self.task.name]).inc_by(unwrapped);
        }
        self.task
            .metrics
            .records_written
            .with_label_values(&[&*self.task.name, Outcome::DeadLettered.as_str()])
            .inc_by(rejected.len() as u64);
        self.task
            .metrics
            .bytes_written
            .with_label_values(&[&*self.task.name, Outcome::DeadLettered.as_str()])
            .inc_by(bytes);
        for (p, _, _) in rejected.drain(..) {
            self.done_with(&p);
        }
        Ok(true)
    }

    /// One record of a chunk is done for this destination.
    fn done_with(&mut self, p: &Pending) {
        self.buffered_bytes = self.buffered_bytes.saturating_sub(p.size());
        let id = p.chunk.id;
        let finished = match self.tickets.get_mut(&id) {
            Some(ticket) => {
                ticket.remaining -= 1;
                ticket.remaining == 0
            }
            None => false,
        };
        if finished && let Some(ticket) = self.tickets.remove(&id) {
            self.complete(&ticket.chunk);
        }
    }

    fn complete(&self, chunk: &Chunk) {
        if !chunk.acknowledge() {
            return;
        }
        self.task.metrics.delivery_seconds.observe(chunk.read_at.elapsed().as_secs_f64());
        if let Some(age) = chunk.records.first().and_then(|r| r.arrival).and_then(|a| a.elapsed().ok()) {
            self.task.metrics.end_to_end_seconds.observe(age.as_secs_f64());
        }
    }

    /// The stream is gone: nothing it holds may hold back progress any more.
    fn release_everything(&mut self) {
        let released = self.pending.len();
        self.pending.clear();
        // Done as far as this destination goes; no latency sample for records it never got.
        for (_, ticket) in self.tickets.drain() {
            ticket.chunk.acknowledge();
        }
        self.task.queue.close();
        let mut late = 0usize;
        while let Ok(delivery) = self.task.queue.try_recv() {
            late += delivery.chunk.records.len();
            delivery.chunk.acknowledge();
        }
        let dropped = (released + late) as u64;
        if dropped > 0 {
            self.task
                .metrics
                .records_written
                .with_label_values(&[&*self.task.name, Outcome::DestinationDeleted.as_str()])
                .inc_by(dropped);
        }
        self.buffered_bytes = 0;
    }

    async fn confirm_deleted(&self) -> Result<bool, Interrupt> {
        let describe = self.task.client.describe_stream_summary().stream_name(&*self.task.name).send();
        match self.guard().run(describe).await? {
            Err(err) => Ok(classify(&err) == ErrorKind::NotFound),
            Ok(out) => Ok(out
                .stream_description_summary()
                .is_some_and(|s| *s.stream_status() == aws_sdk_kinesis::types::StreamStatus::Deleting)),
        }
    }

    fn set_stalled(&mut self, stalled: bool) {
        if self.stalled != stalled {
            self.stalled = stalled;
            self.task.metrics.destination_stalled.with_label_values(&[&*self.task.name]).set(i64::from(stalled));
            if !stalled {
                tracing::info!(destination = %self.task.name, "Destination accepts records again.");
            }
        }
    }

    fn update_gauges(&self) {
        let m = &self.task.metrics;
        m.buffered_records.with_label_values(&[&*self.task.name]).set(self.pending.len() as i64);
        m.buffered_bytes.with_label_values(&[&*self.task.name]).set(self.buffered_bytes as i64);
    }

    fn clear_gauges(&self) {
        let m = &self.task.metrics;
        let label = [&*self.task.name];
        let _ = m.buffered_records.remove_label_values(&label);
        let _ = m.buffered_bytes.remove_label_values(&label);
        let _ = m.destination_stalled.remove_label_values(&label);
    }
}
