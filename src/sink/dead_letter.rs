//! The dead-letter stream: where records go that a destination can never accept (access denied,
//! KMS, validation), with their origin, so that nothing is dropped silently.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use base64::Engine as _;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::batch::{self, BatchLimits};
use super::put::{CallError, PutEdge};
use super::retry::Backoff;
use crate::aws::ErrorKind;
use crate::record::StreamLimits;
use crate::shutdown::Stopped;

/// The error code of a record larger than its destination takes (its `MaxRecordSizeInKiB`):
/// never sent, dead-lettered with both sizes in the message.
pub const TOO_LARGE_FOR_DESTINATION: &str = "too_large_for_destination";

/// The longest a text field of an envelope without data may be (characters).
const OMITTED_FIELD_CHARS: usize = 1024;

/// A rejected entry, where it came from, and why.
#[derive(Debug, Clone)]
pub struct Rejected<'a> {
    /// The source record it comes from.
    pub sequence_number: &'a str,
    pub shard_id: &'a str,
    /// What was sent: the record, one of its user records, or a re-aggregated record.
    pub partition_key: &'a str,
    /// The explicit hash key it was sent with (a user record's, or a re-aggregated record's).
    pub explicit_hash_key: Option<&'a str>,
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
    /// Kept when the record was sent with one, so that a replay routes it the same way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explicit_hash_key: Option<&'a str>,
    /// The record's data, base64-encoded; empty when [`Envelope::data_omitted`].
    pub data: String,
    /// The record is larger than the dead-letter stream takes even without its envelope: its data
    /// is left out (read it from the source shard at `sequence_number` while it is retained).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub data_omitted: bool,
    /// The size of the record's data, when it is left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_bytes: Option<usize>,
}

#[derive(Debug)]
pub struct DeadLetter {
    pub stream: String,
    edge: Arc<dyn PutEdge>,
    backoff: Backoff,
    /// What the dead-letter stream takes.
    limits: StreamLimits,
}

/// One record for the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Letter {
    pub partition_key: String,
    pub data: Vec<u8>,
    /// The envelope would not fit in a Kinesis record: these are the rejected bytes unchanged,
    /// with the origin in the partition key.
    pub unwrapped: bool,
    /// Not even the bytes would fit: an envelope without them ([`Envelope::data_omitted`]).
    pub omitted: bool,
}

/// Where a rejected record came from, as `shard/sequence number`.
fn origin(r: &Rejected<'_>) -> String {
    format!("{}/{}", r.shard_id, r.sequence_number)
}

/// A partition key Kinesis takes, made from `text`: at most 256 characters and `room` bytes.
fn key_within(text: &str, room: usize) -> String {
    let mut key = String::new();
    for c in text.chars().take(256) {
        if key.len() + c.len_utf8() > room {
            break;
        }
        key.push(c);
    }
    if key.is_empty() { "-".to_string() } else { key }
}

impl Letter {
    /// The envelope for `r`; when it would not fit in one record of a stream that takes records
    /// of up to `max_record_bytes` (at 1 MiB, a rejected record over about 780 KB, once
    /// base64-encoded), the rejected bytes themselves, keyed by their origin; when not even those
    /// fit, the envelope without the data.
    pub fn new(source_stream: &str, destination: &str, r: &Rejected<'_>, max_record_bytes: usize) -> Letter {
        let mut envelope = Envelope {
            source_stream,
            shard_id: r.shard_id,
            sequence_number: r.sequence_number,
            destination,
            error_code: &r.error_code,
            error_message: &r.error_message,
            partition_key: r.partition_key,
            explicit_hash_key: r.explicit_hash_key,
            data: String::new(),
            data_omitted: false,
            data_bytes: None,
        };
        // Base64 is a third larger than the data: no point encoding what cannot fit.
        if 4 * r.data.len().div_ceil(3) < max_record_bytes {
            envelope.data = base64::engine::general_purpose::STANDARD.encode(r.data);
        } else {
            envelope.data_omitted = true;
        }
        let data = serde_json::to_vec(&envelope).expect("envelope serialises");
        // The record's own key when Kinesis surely takes it (it may be why the record was
        // refused; 256 bytes also satisfies stores that count bytes, not characters).
        let partition_key = match crate::record::validate_entry(r.partition_key, None, 0) {
            Ok(()) if r.partition_key.len() <= 256 => r.partition_key.to_string(),
            _ => key_within(&origin(r), 256),
        };
        if !envelope.data_omitted && data.len() + partition_key.len() <= max_record_bytes {
            return Letter { partition_key, data, unwrapped: false, omitted: false };
        }
        let origin = origin(r);
        // Keyed by as much of its origin as fits: a byte at least. Not a record refused for its
        // size: its letter keeps the reason and both sizes, without the data.
        if r.data.len() < max_record_bytes && r.error_code != TOO_LARGE_FOR_DESTINATION {
            let room = max_record_bytes.saturating_sub(r.data.len()).max(1);
            return Letter {
                partition_key: key_within(&origin, room),
                data: r.data.to_vec(),
                unwrapped: true,
                omitted: false,
            };
        }
        // Without the data, and with every other field bounded, so that it always fits (a KPL user
        // record's key, refused for its length, can be any size).
        let bounded = |text: &str| text.chars().take(OMITTED_FIELD_CHARS).collect::<String>();
        let (partition_key_field, message) = (bounded(r.partition_key), bounded(&r.error_message));
        let hash_key = r.explicit_hash_key.map(bounded);
        envelope.partition_key = &partition_key_field;
        envelope.error_message = &message;
        envelope.explicit_hash_key = hash_key.as_deref();
        envelope.data = String::new();
        envelope.data_omitted = true;
        envelope.data_bytes = Some(r.data.len());
        let data = serde_json::to_vec(&envelope).expect("envelope serialises");
        Letter { partition_key, data, unwrapped: false, omitted: true }
    }

    fn entry(&self) -> PutRecordsRequestEntry {
        PutRecordsRequestEntry::builder()
            .data(Blob::new(self.data.clone()))
            .partition_key(&self.partition_key)
            .build()
            .expect("data and partition key are set")
    }

    fn encoded_size(&self) -> usize {
        batch::encoded_size(self.partition_key.len(), self.data.len())
    }
}

/// Why a dead-letter write ended before every record was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsent {
    /// The service is stopping.
    Stopped(Stopped),
    /// A record is no longer owed, or its shard's lease is not proven now.
    Fenced,
}

impl DeadLetter {
    pub fn new(stream: String, edge: Arc<dyn PutEdge>, backoff: Backoff) -> Self {
        DeadLetter { stream, edge, backoff, limits: StreamLimits::default() }
    }

    /// What the dead-letter stream takes (its `MaxRecordSizeInKiB`).
    pub fn with_limits(mut self, limits: StreamLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Writes every rejected record, in requests within Kinesis's limits (500 records, 5 MiB),
    /// retrying until all are accepted or `stop` fires. Returns how many went unwrapped.
    ///
    /// `fence` is asked right before each request, as the destination writer asks before each
    /// PutRecords: when it says no (a record is no longer owed, or its lease is not proven now),
    /// nothing more is sent and the records are held.
    pub async fn write(
        &mut self,
        source_stream: &str,
        destination: &str,
        rejected: &[Rejected<'_>],
        stop: &CancellationToken,
        fence: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<u64, Unsent> {
        let max_record_bytes = self.limits.max_record_bytes;
        let mut letters: Vec<Letter> =
            rejected.iter().map(|r| Letter::new(source_stream, destination, r, max_record_bytes)).collect();
        let mut unwrapped = 0;
        for (letter, r) in letters.iter().zip(rejected) {
            if letter.unwrapped {
                unwrapped += 1;
                tracing::warn!(
                    destination,
                    dead_letter_stream = %self.stream,
                    origin = %origin(r),
                    error_code = %r.error_code,
                    bytes = r.data.len(),
                    "A rejected record is too large for an envelope; writing its bytes unchanged to the dead-letter stream, keyed by its origin."
                );
            }
            if letter.omitted {
                tracing::warn!(
                    destination,
                    dead_letter_stream = %self.stream,
                    origin = %origin(r),
                    error_code = %r.error_code,
                    bytes = r.data.len(),
                    dead_letter_max_record_bytes = max_record_bytes,
                    "A rejected record is larger than the dead-letter stream takes; its envelope names its origin without its data: read it from the source shard while it is retained."
                );
            }
        }
        while !letters.is_empty() {
            let take = batch::fits(letters.iter().map(Letter::encoded_size), BatchLimits::for_stream(self.limits));
            if !fence() {
                return Err(Unsent::Fenced);
            }
            let batch: Vec<Letter> = letters.drain(..take).collect();
            let request = self.edge.put_records(&self.stream, batch.iter().map(Letter::entry).collect());
            let result = tokio::select! {
                _ = stop.cancelled() => return Err(Unsent::Stopped(Stopped)),
                r = request => r,
            };
            let failed: Vec<Letter> = match result {
                Ok(answers) => {
                    // Answers are matched to entries by place: a different count says nothing of
                    // which entry was written, so the whole request is written again (a duplicate
                    // dead letter costs less than a lost one).
                    let mismatched = answers.len() != batch.len();
                    if mismatched {
                        tracing::warn!(stream = %self.stream, sent = batch.len(), answered = answers.len(), "PutRecords answered a different number of entries; writing them all again.");
                    }
                    let failed: Vec<Letter> = batch
                        .into_iter()
                        .enumerate()
                        .filter(|(i, _)| mismatched || answers[*i].error_code.is_some())
                        .map(|(_, letter)| letter)
                        .collect();
                    if failed.is_empty() {
                        self.backoff.reset();
                        continue;
                    }
                    failed
                }
                Err(CallError { kind, cause, .. }) => {
                    let permanent = kind != ErrorKind::Transient;
                    if permanent {
                        tracing::error!(stream = %self.stream, error = %cause, "The dead-letter stream rejects writes; rejected records are held until it accepts them.");
                    } else {
                        tracing::warn!(stream = %self.stream, error = %cause, "Writing to the dead-letter stream failed; retrying.");
                    }
                    batch
                }
            };
            letters.splice(0..0, failed);
            let delay = self.backoff.next_delay(&mut rand::rng()).max(Duration::from_millis(10));
            tokio::select! {
                _ = stop.cancelled() => return Err(Unsent::Stopped(Stopped)),
                _ = tokio::time::sleep(delay) => {}
            }
        }
        Ok(unwrapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::MAX_RECORD_BYTES;
    use crate::sink::put::EntryAnswer;

    fn rejected<'a>(data: &'a bytes::Bytes, partition_key: &'a str) -> Rejected<'a> {
        Rejected {
            sequence_number: "49590338271490256608559692538361571095921575989136588898",
            shard_id: "shardId-000000000003",
            partition_key,
            explicit_hash_key: None,
            data,
            error_code: "AccessDeniedException".into(),
            error_message: "no".into(),
        }
    }

    #[test]
    fn small_records_travel_in_envelopes_under_their_own_key() {
        let data = bytes::Bytes::from_static(b"hello");
        let letter = Letter::new("in", "out", &rejected(&data, "pk-1"), MAX_RECORD_BYTES);
        assert!(!letter.unwrapped);
        assert_eq!(letter.partition_key, "pk-1");
        let envelope: serde_json::Value = serde_json::from_slice(&letter.data).unwrap();
        assert_eq!(envelope["destination"], "out");
        assert!(envelope.get("explicit_hash_key").is_none(), "none was used");
        let with_key =
            Rejected { explicit_hash_key: Some("170141183460469231731687303715884105728"), ..rejected(&data, "pk-1") };
        let envelope: serde_json::Value =
            serde_json::from_slice(&Letter::new("in", "out", &with_key, MAX_RECORD_BYTES).data).unwrap();
        assert_eq!(envelope["explicit_hash_key"], "170141183460469231731687303715884105728", "kept for a replay");
    }

    #[test]
    fn an_invalid_key_is_replaced_by_the_origin() {
        let data = bytes::Bytes::from_static(b"hello");
        let long = "k".repeat(300);
        let letter = Letter::new("in", "out", &rejected(&data, &long), MAX_RECORD_BYTES);
        assert!(letter.partition_key.starts_with("shardId-000000000003/4959"), "{}", letter.partition_key);
        assert!(crate::record::validate_entry(&letter.partition_key, None, letter.data.len()).is_ok());
    }

    #[test]
    fn records_too_large_for_an_envelope_go_unchanged_keyed_by_origin() {
        for size in [800_000, MAX_RECORD_BYTES - 1] {
            let data = bytes::Bytes::from(vec![7u8; size]);
            let letter = Letter::new("in", "out", &rejected(&data, "k"), MAX_RECORD_BYTES);
            assert!(letter.unwrapped, "{size}");
            assert_eq!(letter.data, data.to_vec());
            let origin = "shardId-000000000003/49590338271490256608559692538361571095921575989136588898";
            assert!(origin.starts_with(&letter.partition_key), "keyed by (as much as fits of) its origin");
            assert!(crate::record::validate_entry(&letter.partition_key, None, letter.data.len()).is_ok(), "{size}");
        }
    }

    #[test]
    fn a_dead_letter_stream_follows_its_own_maximum_and_names_what_it_cannot_hold() {
        let large = bytes::Bytes::from(vec![7u8; 6 << 20]);
        let too_large = Rejected { error_code: "too_large_for_destination".into(), ..rejected(&large, "k") };
        // A dead-letter stream raised to 10 MiB holds the envelope, data included.
        let letter = Letter::new("in", "out", &too_large, 10 << 20);
        assert!(!letter.unwrapped && !letter.omitted);
        let envelope: serde_json::Value = serde_json::from_slice(&letter.data).unwrap();
        assert_eq!(envelope["error_code"], "too_large_for_destination");
        assert_eq!(envelope["data"].as_str().unwrap().len(), 4 * (6usize << 20).div_ceil(3));
        assert!(envelope.get("data_omitted").is_none());
        // One at 1 MiB cannot hold the record at all: the envelope names its origin and size.
        let letter = Letter::new("in", "out", &too_large, MAX_RECORD_BYTES);
        assert!(letter.omitted && !letter.unwrapped);
        assert!(letter.data.len() < 4096);
        let envelope: serde_json::Value = serde_json::from_slice(&letter.data).unwrap();
        assert_eq!(envelope["data_omitted"], true);
        assert_eq!(envelope["data_bytes"], 6 << 20);
        assert_eq!(envelope["data"], "");
        assert_eq!(envelope["shard_id"], "shardId-000000000003");
        assert_eq!(envelope["sequence_number"], "49590338271490256608559692538361571095921575989136588898");
        assert_eq!(letter.partition_key, "k");
        // Refused for its size, a record the dead-letter stream could hold bare still gets the
        // envelope with the reason and both sizes, not its bytes keyed by origin.
        let small = bytes::Bytes::from(vec![7u8; 900_000]);
        let refused = Rejected { error_code: TOO_LARGE_FOR_DESTINATION.into(), ..rejected(&small, "k") };
        let letter = Letter::new("in", "out", &refused, MAX_RECORD_BYTES);
        assert!(letter.omitted && !letter.unwrapped);
        // Every field of an envelope without data is bounded: it always fits.
        let key = "k".repeat(3 << 20);
        let message = "m".repeat(2 << 20);
        let huge =
            Rejected { error_code: TOO_LARGE_FOR_DESTINATION.into(), error_message: message, ..rejected(&large, &key) };
        let letter = Letter::new("in", "out", &huge, MAX_RECORD_BYTES);
        assert!(letter.omitted);
        assert!(letter.data.len() < 4096, "{} bytes", letter.data.len());
        assert!(crate::record::validate_entry(&letter.partition_key, None, letter.data.len()).is_ok());
    }

    /// A put edge whose first answer covers only the first entry; every later answer is whole.
    /// It remembers the partition keys of every request.
    #[derive(Debug, Default)]
    struct ShortFirst {
        requests: std::sync::Mutex<Vec<Vec<String>>>,
    }

    impl PutEdge for ShortFirst {
        fn put_records<'a>(
            &'a self,
            _stream: &'a str,
            entries: Vec<aws_sdk_kinesis::types::PutRecordsRequestEntry>,
        ) -> futures::future::BoxFuture<'a, Result<Vec<EntryAnswer>, CallError>> {
            let keys: Vec<String> = entries.iter().map(|e| e.partition_key().unwrap_or_default().to_string()).collect();
            let mut requests = self.requests.lock().unwrap();
            let answered = if requests.is_empty() { 1 } else { keys.len() };
            requests.push(keys);
            Box::pin(async move { Ok(vec![EntryAnswer::default(); answered]) })
        }

        fn deleted<'a>(&'a self, _stream: &'a str) -> futures::future::BoxFuture<'a, bool> {
            Box::pin(async { false })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_answer_writes_the_whole_request_again() {
        let edge = Arc::new(ShortFirst::default());
        let backoff = Backoff::try_new(Duration::from_millis(1), Duration::from_millis(5)).unwrap();
        let mut dead_letter = DeadLetter::new("dlq".into(), Arc::clone(&edge) as Arc<dyn PutEdge>, backoff);
        let data = bytes::Bytes::from_static(b"hello");
        let rejected = [rejected(&data, "pk-1"), rejected(&data, "pk-2"), rejected(&data, "pk-3")];
        let written = dead_letter.write("in", "out", &rejected, &CancellationToken::new(), &|| true).await;
        assert_eq!(written, Ok(0));
        let requests = edge.requests.lock().unwrap().clone();
        assert_eq!(
            requests,
            vec![vec!["pk-1", "pk-2", "pk-3"], vec!["pk-1", "pk-2", "pk-3"]],
            "a short answer says nothing of which entry was written: all of them, again"
        );
    }
}
