//! The dead-letter stream: where records go that a destination can never accept (access denied,
//! KMS, validation), with their origin, so that nothing is dropped silently.

use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use base64::Engine as _;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::retry::Backoff;
use crate::aws::{ErrorKind, classify};

/// A rejected entry, where it came from, and why.
#[derive(Debug, Clone)]
pub struct Rejected<'a> {
    /// The source record it comes from.
    pub sequence_number: &'a str,
    pub shard_id: &'a str,
    /// What was sent: the record, one of its user records, or a re-aggregated record.
    pub partition_key: &'a str,
    pub data: &'a bytes::Bytes,
    pub error_code: String,
    pub error_message: String,
}

/// The JSON document written to the dead-letter stream, one per rejected record.
#[derive(Debug, Serialize)]
pub struct Envelope<'a> {
    pub source_stream: &'a str,
    pub shard_id: &'a str,
    pub sequence_number: &'a str,
    pub destination: &'a str,
    pub error_code: &'a str,
    pub error_message: &'a str,
    pub partition_key: &'a str,
    /// The record's data, base64-encoded.
    pub data: String,
}

#[derive(Debug)]
pub struct DeadLetter {
    pub stream: String,
    client: aws_sdk_kinesis::Client,
    backoff: Backoff,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

impl DeadLetter {
    pub fn new(stream: String, client: aws_sdk_kinesis::Client, backoff: Backoff) -> Self {
        DeadLetter { stream, client, backoff }
    }

    /// Writes every rejected record, retrying until all are accepted or `stop` fires.
    pub async fn write(
        &mut self,
        source_stream: &str,
        destination: &str,
        rejected: &[Rejected<'_>],
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        let mut entries: Vec<PutRecordsRequestEntry> = rejected
            .iter()
            .map(|r| {
                let envelope = Envelope {
                    source_stream,
                    shard_id: r.shard_id,
                    sequence_number: r.sequence_number,
                    destination,
                    error_code: &r.error_code,
                    error_message: &r.error_message,
                    partition_key: r.partition_key,
                    data: base64::engine::general_purpose::STANDARD.encode(r.data),
                };
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(serde_json::to_vec(&envelope).expect("envelope serialises")))
                    .partition_key(r.partition_key)
                    .build()
                    .expect("data and partition key are set")
            })
            .collect();
        while !entries.is_empty() {
            // Envelopes are larger than the records: send at most 100 per request.
            let take = entries.len().min(100);
            let batch: Vec<_> = entries.drain(..take).collect();
            let result = tokio::select! {
                _ = stop.cancelled() => return Err(Stopped),
                r = self.client.put_records().stream_name(&self.stream).set_records(Some(batch.clone())).send() => r,
            };
            let failed: Vec<PutRecordsRequestEntry> = match result {
                Ok(out) if out.failed_record_count().unwrap_or(0) == 0 => {
                    self.backoff.reset();
                    continue;
                }
                Ok(out) => batch
                    .into_iter()
                    .zip(out.records())
                    .filter(|(_, r)| r.error_code().is_some())
                    .map(|(e, _)| e)
                    .collect(),
                Err(err) => {
                    let permanent = classify(&err) != ErrorKind::Transient;
                    let cause = crate::aws::chain(&err);
                    if permanent {
                        tracing::error!(stream = %self.stream, error = %cause, "The dead-letter stream rejects writes; rejected records are held until it accepts them.");
                    } else {
                        tracing::warn!(stream = %self.stream, error = %cause, "Writing to the dead-letter stream failed; retrying.");
                    }
                    batch
                }
            };
            entries.splice(0..0, failed);
            let delay = self.backoff.next_delay(&mut rand::rng()).max(Duration::from_millis(10));
            tokio::select! {
                _ = stop.cancelled() => return Err(Stopped),
                _ = tokio::time::sleep(delay) => {}
            }
        }
        Ok(())
    }
}
