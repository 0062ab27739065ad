//! Settling a PutRecords answer, entry by entry: accepted records are done for their chunk,
//! throttled and failed ones go back to the front of the queue (in their original order) after a
//! backoff with jitter, and refused ones are dead-lettered, or held when there is no dead-letter
//! stream (the destination then stops advancing, loudly, until the cause is fixed).

use std::sync::Arc;

use super::dead_letter::{Rejected, Unsent};
use super::entries::Pending;
use super::retry::EntryOutcome;
use super::writer::{Interrupt, VALIDATION_CODES, Writer};
use crate::metrics::Outcome;
use crate::record::InvalidEntry;
use crate::shutdown::Stopped;

impl Writer {
    /// Applies per-entry outcomes to the first `outcomes.len()` pending records.
    pub(super) async fn settle(&mut self, outcomes: Vec<EntryOutcome>) -> Result<(), Interrupt> {
        let sent: Vec<Pending> = self.pending.drain(..outcomes.len()).collect();
        // A queue that was long once keeps its room; give it back when it is mostly empty (the
        // memory budget counts entries, not the room they once needed).
        if self.pending.capacity() > 1024 && self.pending.len() * 4 < self.pending.capacity() {
            self.pending.shrink_to(self.pending.len() * 2);
        }
        // Entries to send again, with their place in the request: they go back in that order.
        let mut again: Vec<(usize, Pending)> = Vec::new();
        let mut rejected: Vec<(Pending, String, String)> = Vec::new();
        let mut rejected_at: Vec<usize> = Vec::new();
        let (mut ok, mut ok_bytes) = (0u64, 0u64);
        let (mut throttled, mut throttled_bytes) = (0u64, 0u64);
        let (mut retried, mut retried_bytes) = (0u64, 0u64);
        for (at, (mut p, outcome)) in sent.into_iter().zip(outcomes).enumerate() {
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
                    again.push((at, p));
                }
                EntryOutcome::Retry { .. } => {
                    retried += 1;
                    retried_bytes += size;
                    p.retry = true;
                    again.push((at, p));
                }
                EntryOutcome::Reject { code, message } => {
                    if p.invalid.is_none() && VALIDATION_CODES.contains(&code.as_str()) {
                        // Refused as invalid on its own: it is never sent again, so while it is
                        // held it cannot hold up the entries behind it.
                        p.invalid = Some(InvalidEntry::Refused { code: code.clone(), message: message.clone() });
                    }
                    rejected.push((p, code, message));
                    rejected_at.push(at);
                }
            }
        }
        self.count(Outcome::Ok, ok, ok_bytes);
        self.count(Outcome::Throttled, throttled, throttled_bytes);
        self.count(Outcome::Retried, retried, retried_bytes);

        let mut held_rejected = false;
        if !rejected.is_empty() {
            held_rejected = !self.dead_letter_or_hold(&mut rejected).await?;
            if held_rejected {
                again.extend(rejected.into_iter().zip(rejected_at).map(|((mut p, _, _), at)| {
                    p.retry = true;
                    (at, p)
                }));
                // Keep the order they were sent in: retried and held records interleave as in
                // the request (never by chunk id: a catch-up's chunk can have a higher id than
                // the live chunk queued after it).
                again.sort_by_key(|(at, _)| *at);
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
        for (_, p) in again.into_iter().rev() {
            self.pending.push_front(p);
        }
        self.update_gauges();
        let delay = if held_rejected { self.backoff.max() } else { self.backoff.next_delay(&mut rand::rng()) };
        tracing::debug!(destination = %self.task.name, throttled, retried, delay_ms = delay.as_millis() as u64, "Retrying failed records after a backoff.");
        // Shed meanwhile: the retry comes sooner, after the records it no longer owes are dropped.
        self.guard().unless_shed(tokio::time::sleep(delay)).await.map(|_| ())
    }

    /// Sends rejected records to the dead-letter stream. Returns false when there is none, after
    /// saying loudly that the destination stops advancing.
    async fn dead_letter_or_hold(&mut self, rejected: &mut Vec<(Pending, String, String)>) -> Result<bool, Interrupt> {
        let bytes: u64 = rejected.iter().map(|(p, _, _)| p.size() as u64).sum();
        let (code, message) = (rejected[0].1.clone(), rejected[0].2.clone());
        let shed = Arc::clone(&self.task.shed);
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
                explicit_hash_key: p.explicit_hash_key(),
                data: p.data(),
                shard_id: &p.chunk.shard.shard_id,
                error_code: code.clone(),
                error_message: message.clone(),
            })
            .collect();
        tracing::warn!(destination = %self.task.name, records = entries.len(), error_code = %code, dead_letter_stream = %dead_letter.stream, "Destination rejects records; sending them to the dead-letter stream.");
        let stop = self.task.stop.clone();
        // Fenced as the writer's own requests are: checked right before each request.
        let chunks: Vec<Arc<crate::progress::Chunk>> = rejected.iter().map(|(p, _, _)| Arc::clone(&p.chunk)).collect();
        let id = Arc::clone(&self.task.id);
        let fence = move || chunks.iter().all(|c| c.owed_by(&id) && c.shard.proven());
        // A dead-letter stream that refuses too keeps this write going; a shed must not wait for
        // it: the records are held for now (and dropped if no longer owed), and the wait that
        // follows is cut short too.
        let in_flight = super::send::InFlight::of(rejected.iter().map(|(p, _, _)| p));
        let written = tokio::select! {
            _ = shed.notified() => None,
            written = dead_letter.write(&self.task.source_stream, &self.task.name, &entries, &stop, &fence) => Some(written),
        };
        if !matches!(written, Some(Err(Unsent::Stopped(Stopped))) | None) {
            in_flight.answered();
        }
        drop(entries);
        let Some(written) = written else {
            shed.notify_one();
            return Ok(false);
        };
        let unwrapped = match written {
            Ok(unwrapped) => unwrapped,
            Err(Unsent::Stopped(Stopped)) => return Err(Interrupt::Stopped(Stopped)),
            // Held: the next turn drops what is no longer owed, and waits for an unproven lease.
            Err(Unsent::Fenced) => {
                tracing::debug!(destination = %self.task.name, "A dead-letter write stopped at the fence; holding its records.");
                self.guard().unless_shed(tokio::time::sleep(super::writer::UNPROVEN_PAUSE)).await?;
                return Ok(false);
            }
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
        self.ledger.done(p.chunk.id, p.size());
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
}
