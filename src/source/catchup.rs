//! Catch-up reads: a destination detached from a shard's live feed reads what it owes with
//! GetRecords, from its own position, until it reaches the live feed and joins it again (see
//! `progress::detach` for the seam).
//!
//! GetRecords shares a shard's read quota (5 calls/s, 2 MB/s) with every other polling consumer,
//! so a catch-up makes at most 2 calls a second per shard, 1 when it is near the tip, backs off on
//! ProvisionedThroughputExceeded, and reads no faster than its destination writes: a page, sized to
//! an eighth of the memory budget by what records cost so far, is read only while the destination
//! has at most half its budget (and at most that eighth) queued, and once the memory budget
//! reserved it with a quarter left for the live feed. It waits for that room holding nothing, so a
//! destination that refuses everything costs the others little memory, and never their quarter.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::reader::source_record;
use crate::aws::{ErrorKind, kinesis};
use crate::fanout::{CatchUpStarter, Delivery, DestinationHandle};
use crate::metrics::Metrics;
use crate::position::Position;
use crate::progress::{Batch, CatchUp, Progress, ShardProgress};
use crate::record::{SequenceNumber, SourceRecord};
use crate::sink::retry::Backoff;

/// Records a catch-up asks for in one call.
const PAGE: i32 = 1_000;
/// Between calls that returned records.
const BUSY_PAUSE: Duration = Duration::from_millis(500);
/// Between calls near the tip, or at the end of a closed shard.
const IDLE_PAUSE: Duration = Duration::from_secs(1);
/// Between looks for room in the destination's budget and the memory budget.
const ROOM_PAUSE: Duration = Duration::from_millis(200);
/// What a record is expected to cost before a page was read.
const RECORD_GUESS: usize = 1 << 10;
/// A page may cost this share of the memory budget (and a destination's catch-ups together may
/// hold this share queued): several catch-ups and the live feed fit beside each other.
const PAGE_DIVISOR: u64 = 8;

/// Starts catch-ups as the fan-out detaches destinations, and waits for them at teardown.
#[derive(Debug, Clone)]
pub struct CatchUps {
    client: aws_sdk_kinesis::Client,
    stream: String,
    progress: Arc<Progress>,
    metrics: Arc<Metrics>,
    /// Reading stops (shutdown): catch-ups stop too; what they owe stays in the checkpoint.
    stop: CancellationToken,
    /// What catch-ups read counts against the process's memory budget.
    memory: crate::memory::MemoryBudget,
    /// The catch-ups under way, for [`CatchUps::stop`].
    tasks: TaskTracker,
}

impl CatchUps {
    pub fn new(
        client: aws_sdk_kinesis::Client,
        stream: String,
        progress: Arc<Progress>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        memory: crate::memory::MemoryBudget,
    ) -> Self {
        CatchUps { client, stream, progress, metrics, stop, memory, tasks: TaskTracker::new() }
    }

    /// Stops every catch-up (with the reading's stop signal) and waits until each has.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl CatchUpStarter for CatchUps {
    fn start(&self, shard: Arc<ShardProgress>, destination: DestinationHandle, start: Position) {
        let reader = Reader { up: self.clone(), shard, destination, start };
        reader.up.metrics.destination_detached.with_label_values(&[&*reader.destination.name]).inc();
        self.tasks.spawn(reader.run());
    }
}

/// How often a catch-up stuck at a malformed record says so again.
const STUCK_LOG_EVERY: Duration = Duration::from_secs(60);

/// A page a catch-up cannot hand on: GetRecords returned a record whose sequence number is none.
struct Stuck {
    sequence_number: String,
}

struct Reader {
    up: CatchUps,
    shard: Arc<ShardProgress>,
    destination: DestinationHandle,
    start: Position,
}

impl Reader {
    async fn run(self) {
        let name = Arc::clone(&self.destination.name);
        let stop = self.up.stop.clone();
        let outcome = tokio::select! {
            _ = stop.cancelled() => None,
            outcome = self.read() => Some(outcome),
        };
        let metrics = &self.up.metrics;
        metrics.destination_detached.with_label_values(&[&*name]).dec();
        if metrics.destination_detached.with_label_values(&[&*name]).get() <= 0 {
            metrics.destination_lag_seconds.with_label_values(&[&*name]).set(0.0);
        }
        if outcome == Some(CatchUp::Gone) {
            self.shard.forget(&self.destination.id);
        }
    }

    /// Reads until the destination joined the live feed, went away, or the reading was revoked.
    async fn read(&self) -> CatchUp {
        let shard_id = self.shard.shard_id.to_string();
        let name: &str = &self.destination.name;
        let mut last: Option<SequenceNumber> = None;
        let mut start = self.start.clone();
        let mut iterator: Option<String> = None;
        // A page is sized to a share of the memory budget by what records cost so far, and read
        // only once that much is reserved.
        let page_bytes = usize::try_from(self.up.memory.limit() / PAGE_DIVISOR).unwrap_or(usize::MAX).max(1);
        let mut per_record = RECORD_GUESS;
        let mut backoff = Backoff::try_new(Duration::from_millis(500), Duration::from_secs(10)).expect("valid bounds");
        let mut stuck_warning: Option<tokio::time::Instant> = None;
        tracing::info!(destination = name, shard = %shard_id, from = %self.start, "Catch-up started.");
        loop {
            if self.shard.revoked() {
                return CatchUp::Gone;
            }
            if self.destination.closed() {
                return CatchUp::Gone;
            }
            // Read only with room to hand on: nothing is held while waiting for it.
            let limit = (page_bytes / per_record).clamp(1, PAGE as usize);
            let Some(memory) = self.room(page_bytes, limit * per_record) else {
                tokio::time::sleep(ROOM_PAUSE).await;
                continue;
            };
            let from = last.clone().map(Position::Sequence).unwrap_or_else(|| start.clone());
            let current = match iterator.take() {
                Some(it) => it,
                None => match kinesis::shard_iterator(&self.up.client, &self.up.stream, &shard_id, &from).await {
                    Ok(it) => it,
                    Err(err) => {
                        self.pause_after(&err, &mut backoff).await;
                        continue;
                    }
                },
            };
            let page = match kinesis::get_records(&self.up.client, &current, limit as i32).await {
                Ok(page) => page,
                Err(err) => {
                    // An expired iterator is asked for again from the last record handed on.
                    self.pause_after(&err, &mut backoff).await;
                    continue;
                }
            };
            backoff.reset();
            let records = match self.fresh(page.records, last.as_ref()) {
                Ok(records) => records,
                Err(Stuck { sequence_number }) => {
                    // Never past it: the page is read again, from the last record handed on,
                    // after a backoff; the destination stays detached here meanwhile.
                    self.up.metrics.catch_up_errors.with_label_values(&[name, "malformed_sequence_number"]).inc();
                    if stuck_warning.is_none_or(|at: tokio::time::Instant| at.elapsed() >= STUCK_LOG_EVERY) {
                        stuck_warning = Some(tokio::time::Instant::now());
                        tracing::error!(
                            destination = name,
                            shard = %shard_id,
                            sequence_number = %sequence_number,
                            "GetRecords returned a record with a malformed sequence number: this catch-up stops there and reads the page again after a backoff; the destination stays detached on this shard and the shard's checkpoint behind it."
                        );
                    }
                    iterator = None;
                    let delay = backoff.next_delay(&mut rand::rng());
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let read_through = records.last().map(|r| r.sequence_number.clone());
            let shard_end = page.next.is_none();
            let busy = !records.is_empty() && page.millis_behind_latest.is_some_and(|ms| ms > 0);
            let cost: usize = records.iter().map(SourceRecord::footprint).sum();
            if !records.is_empty() {
                per_record = (cost / records.len()).max(1);
            }
            let memory = self.fit(memory, cost);
            match self.hand_on(records, shard_end, memory) {
                CatchUp::Behind(reached) => last = reached.or(last),
                CatchUp::Restart(from) => {
                    tracing::info!(destination = name, shard = %shard_id, %from, "Destination was shed; its catch-up reads again from its own position.");
                    (start, last, iterator) = (from, None, None);
                    continue;
                }
                CatchUp::Joined { expired } if expired > 0 => {
                    self.up.metrics.records_expired.with_label_values(&[name]).inc_by(expired);
                    tracing::error!(
                        destination = name,
                        shard = %shard_id,
                        expired,
                        after = %self.start,
                        "Records expired from the source before this destination got them: the live feed read them while it was detached, and they left the stream's retention before its catch-up could read them again."
                    );
                    return CatchUp::Joined { expired };
                }
                done => {
                    tracing::info!(destination = name, shard = %shard_id, "Catch-up reached the live feed.");
                    return done;
                }
            }
            // At the end of a closed shard, wait for the live feed to register the same records.
            iterator = next_iterator(page.next.unwrap_or(current), read_through.as_ref(), last.as_ref());
            tokio::time::sleep(if busy { BUSY_PAUSE } else { IDLE_PAUSE }).await;
        }
    }

    /// Records newer than the last one handed on, decoded. A record whose sequence number
    /// cannot be read cannot be placed in the shard's order: nothing of the page is handed on.
    fn fresh(
        &self,
        page: Vec<aws_sdk_kinesis::types::Record>,
        last: Option<&SequenceNumber>,
    ) -> Result<Vec<SourceRecord>, Stuck> {
        let mut out = Vec::with_capacity(page.len());
        for record in page {
            let Ok(seq) = SequenceNumber::parse(&record.sequence_number) else {
                return Err(Stuck { sequence_number: record.sequence_number });
            };
            if last.is_some_and(|l| seq <= *l) {
                continue;
            }
            let arrival = record.approximate_arrival_timestamp.and_then(|t| SystemTime::try_from(t).ok());
            let (record, bad) = source_record(seq, arrival, record);
            if bad.is_some() {
                self.up.metrics.kpl_malformed_records.with_label_values(&[&*self.shard.shard_id]).inc();
            }
            out.push(record);
        }
        Ok(out)
    }

    /// Room to read a page expected to cost `expected`: the destination's catch-ups hold at most
    /// half its budget, and at most `page_bytes` (a share of the memory budget), queued; and the
    /// memory budget has `expected` to spare with a quarter left for the live feed. The page's
    /// share of the memory budget, reserved.
    fn room(&self, page_bytes: usize, expected: usize) -> Option<OwnedSemaphorePermit> {
        let cap = (self.destination.budget() / 2).min(page_bytes);
        if self.destination.queued() > cap {
            return None;
        }
        self.up.memory.try_reserve_spare(expected)
    }

    /// The reservation made for a page, fitted to what it cost: the surplus given back, or what
    /// is free of the excess taken (a page dearer than expected is let through, counted as far
    /// as the budget allows; the next one is sized by it).
    fn fit(&self, mut memory: OwnedSemaphorePermit, cost: usize) -> Option<OwnedSemaphorePermit> {
        if cost == 0 {
            return None;
        }
        let held = memory.num_permits();
        if held > cost {
            drop(memory.split(held - cost));
        } else if cost > held {
            memory.merge(self.up.memory.reserve_now(cost - held));
        }
        Some(memory)
    }

    /// Queues what the live feed registered already; says whether the destination joined it.
    /// It never waits: the page was read only once there was room for it.
    fn hand_on(&self, records: Vec<SourceRecord>, shard_end: bool, memory: Option<OwnedSemaphorePermit>) -> CatchUp {
        let name: &str = &self.destination.name;
        if let Some(age) = records.first().and_then(|r| r.arrival).and_then(|a| a.elapsed().ok()) {
            self.up.metrics.destination_lag_seconds.with_label_values(&[name]).set(age.as_secs_f64());
        }
        let batch = Batch { records, shard_end, memory };
        let id = self.up.progress.next_id();
        let room = self.destination.has_room();
        let mut handed = 0u64;
        let outcome = self.shard.catch_up(&self.destination.id, batch, id, room, |chunk| {
            handed = chunk.records.len() as u64;
            // The destination's budget counts what it was handed, not the whole page.
            match self.destination.reserve_now(chunk.bytes) {
                Ok(permit) => self.destination.send(Delivery { chunk, permit }),
                Err(_) => {
                    chunk.acknowledge(&self.destination.id);
                }
            }
        });
        if handed > 0 {
            self.up.metrics.catch_up_records.with_label_values(&[name]).inc_by(handed);
        }
        outcome
    }

    async fn pause_after(&self, err: &crate::aws::CallError, backoff: &mut Backoff) {
        let delay = backoff.next_delay(&mut rand::rng());
        let level_warn =
            !matches!(err.kind, ErrorKind::Transient) || err.code != "ProvisionedThroughputExceededException";
        if level_warn {
            tracing::warn!(destination = %self.destination.name, shard = %self.shard.shard_id, error = %err, "Catch-up read failed; trying again.");
        }
        tokio::time::sleep(delay).await;
    }
}

/// The iterator to read on with, or `None` to ask for a new one after the last record handed on.
/// An iterator is only good while everything it read was handed on: records read past that (the
/// live feed has not registered them yet) must be read again, or the destination never gets them.
fn next_iterator(
    next: String,
    read_through: Option<&SequenceNumber>,
    handed_through: Option<&SequenceNumber>,
) -> Option<String> {
    match read_through {
        Some(read) if handed_through.is_none_or(|handed| read > handed) => None,
        _ => Some(next),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: u64) -> SequenceNumber {
        SequenceNumber::parse(&n.to_string()).unwrap()
    }

    #[test]
    fn records_read_past_what_was_handed_on_are_read_again() {
        let it = || "iterator".to_string();
        // Everything read was handed on (or nothing was read): read on.
        assert_eq!(next_iterator(it(), Some(&seq(5)), Some(&seq(5))), Some(it()));
        assert_eq!(next_iterator(it(), None, Some(&seq(5))), Some(it()));
        assert_eq!(next_iterator(it(), None, None), Some(it()));
        // 6-9 were read but the live feed had registered only up to 5: read again after 5.
        assert_eq!(next_iterator(it(), Some(&seq(9)), Some(&seq(5))), None);
        // Read, but nothing handed on yet: read again from the catch-up's start.
        assert_eq!(next_iterator(it(), Some(&seq(9)), None), None);
    }
}
