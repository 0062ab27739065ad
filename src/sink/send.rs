//! One request of a destination's send loop: take what fits, check the fence, PutRecords
//! through the put edge (split when refused as invalid), and check where each record landed.

use std::sync::Arc;

use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use tokio::time::Instant;

use super::batch;
use super::dead_letter::TOO_LARGE_FOR_DESTINATION;
use super::entries::{Payload, Pending};
use super::put::{CallError, EntryAnswer};
use super::retry::{EntryOutcome, classify_batch};
use super::writer::{Interrupt, Split, UNPROVEN_PAUSE, VALIDATION_CODES, Writer};
use crate::aws::ErrorKind;
use crate::record::InvalidEntry;

/// The shards a request carries records of. Dropped before its answer (the writer stops or is
/// removed meanwhile), it marks them in doubt: the request may still land, so their leases are
/// left to expire rather than released.
pub(super) struct InFlight(Vec<Arc<crate::progress::ShardProgress>>);

impl InFlight {
    pub(super) fn of<'p>(entries: impl Iterator<Item = &'p Pending>) -> Self {
        let mut shards: Vec<Arc<crate::progress::ShardProgress>> = Vec::new();
        for p in entries {
            if !shards.iter().any(|s| Arc::ptr_eq(s, &p.chunk.shard)) {
                shards.push(Arc::clone(&p.chunk.shard));
            }
        }
        InFlight(shards)
    }

    pub(super) fn answered(mut self) {
        self.0.clear();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        for shard in &self.0 {
            shard.mark_in_doubt();
        }
    }
}

impl Writer {
    pub(super) async fn send_batch(&mut self) -> Result<(), Interrupt> {
        self.drop_released();
        // Strict order: only the first queued record of each key goes, brought to the front.
        let lead = match self.assignment.group.ordering {
            crate::config::KeyOrder::Strict => {
                let chosen = super::order::first_of_each_key(self.pending.iter(), self.limits);
                super::order::bring_forward(&mut self.pending, &chosen)
            }
            crate::config::KeyOrder::Batched => usize::MAX,
        };
        // An entry refused here is never sent: it takes no room (a queue led by many of them,
        // held for want of a dead-letter stream, still sends what is behind them).
        let sizes = self.pending.iter().map(|p| p.invalid.is_none().then(|| p.encoded_size()));
        let mut count = batch::fits_sent(sizes, self.limits).min(lead);
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
    pub(super) async fn put(&mut self, count: usize) -> Result<Option<Vec<EntryOutcome>>, Interrupt> {
        let batch: Vec<&Pending> = self.pending.iter().take(count).collect();
        let refused = |p: &Pending| {
            p.invalid.as_ref().map(|problem| EntryOutcome::Reject {
                code: match problem {
                    InvalidEntry::TooLarge { .. } => TOO_LARGE_FOR_DESTINATION.into(),
                    _ => "ValidationException".into(),
                },
                message: problem.to_string(),
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

        // Shed while it waits: nothing is sent; the next turn drops what it no longer owes.
        let Some(waited) = self.guard().unless_shed(self.limiter.acquire(sent, bytes)).await? else {
            return Ok(None);
        };
        // The fence, at the moment of sending (the wait can outlast a lease): every record still
        // owed, and its shard's lease proven by this worker's own clock. Else nothing is sent:
        // the next turn drops what is no longer owed, and a lease not proven is waited for.
        if !self.fenced(count).await? {
            return Ok(None);
        }
        self.task.metrics.rate_limiter_wait_seconds.with_label_values(&[self.name()]).inc_by(waited.as_secs_f64());

        let started = Instant::now();
        let in_flight = InFlight::of(self.pending.iter().take(count));
        let request = self.task.edge.put_records(&self.task.stream, entries);
        let result = self.guard().run(request).await?;
        in_flight.answered();
        self.task
            .metrics
            .put_records_seconds
            .with_label_values(&[self.name()])
            .observe(started.elapsed().as_secs_f64());
        let answers = match result {
            Ok(answers) => {
                let outcomes =
                    classify_batch(answers.iter().map(|e| (e.error_code.as_deref(), e.error_message.as_deref())));
                self.check_routing(self.pending.iter().take(count).filter(|p| p.invalid.is_none()), &answers);
                if outcomes.len() != sent {
                    tracing::warn!(destination = %self.task.name, sent, answered = outcomes.len(), "PutRecords answered a different number of entries; retrying them all.");
                    vec![EntryOutcome::Retry { code: "MismatchedResponse".into() }; sent]
                } else {
                    outcomes
                }
            }
            Err(CallError { kind, code, cause }) => match kind {
                ErrorKind::Permanent if sent > 1 && VALIDATION_CODES.contains(&code.as_str()) => {
                    let suspect = self.split.map_or(count, |s| s.suspect);
                    let size = (count / 2).max(1);
                    tracing::warn!(destination = %self.task.name, records = sent, error = %cause, "PutRecords refused the request for an invalid entry; splitting it to find the entry at fault.");
                    self.split = Some(Split { suspect, size });
                    return Ok(None);
                }
                ErrorKind::NotFound => {
                    if self.confirm_deleted().await? {
                        let _ = self.task.gone.send(Arc::clone(&self.task.id));
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
            },
        };
        let batch: Vec<&Pending> = self.pending.iter().take(count).collect();
        Ok(Some(merge(answers, &batch)))
    }

    /// Whether the first `count` entries may be sent now: still owed, and their shards' leases
    /// proven. When a lease is not proven (the table has not confirmed it lately), waits a
    /// moment before the writer tries again.
    pub(super) async fn fenced(&mut self, count: usize) -> Result<bool, Interrupt> {
        #[cfg(test)]
        if super::writer::tests::UNFENCED.with(std::cell::Cell::get) {
            return Ok(true);
        }
        let batch = || self.pending.iter().take(count);
        if batch().any(|p| !p.chunk.owed_by(&self.task.id)) {
            // The next turn looks through the whole queue.
            self.revocations = u64::MAX;
            return Ok(false);
        }
        if batch().all(|p| p.chunk.shard.proven()) {
            return Ok(true);
        }
        tracing::debug!(destination = %self.task.name, "A lease is not proven now; waiting before sending its records.");
        self.guard().unless_shed(tokio::time::sleep(UNPROVEN_PAUSE)).await?;
        Ok(false)
    }

    /// Aggregates are built for one destination shard: one that landed elsewhere says the shard
    /// map is stale. Counted, and a new map is asked for.
    pub(super) fn check_routing<'p>(&self, sent: impl Iterator<Item = &'p Pending>, results: &[EntryAnswer]) {
        let misrouted = sent
            .zip(results)
            .filter(|(p, r)| match (&p.payload, r.shard_id.as_deref()) {
                (Payload::Built { aggregate: Some(built), .. }, Some(landed)) => {
                    built.shard.as_deref().is_some_and(|expected| expected != landed)
                }
                _ => false,
            })
            .count();
        if misrouted > 0 {
            self.task.metrics.misrouted_records.with_label_values(&[self.name()]).inc_by(misrouted as u64);
            tracing::warn!(destination = %self.task.name, records = misrouted, "Aggregates landed in other shards than they were built for; reading the destination's shard map again.");
            let _ = self.task.remap.send(Arc::clone(&self.task.id));
        }
    }
}
