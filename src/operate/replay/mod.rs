//! `kinesis-fanout dead-letters replay`: re-sends the records of a dead-letter stream to the
//! destinations that refused them, once the cause is fixed.
//!
//! The dead-letter stream is read from its start (or `--since`) to its tip (or `--until`). Each
//! envelope's record (data, partition key, explicit hash key when kept) goes to its destination in
//! batches of at most 500 records / 5 MiB, at the destination group's rate limit, its throttled
//! and failed entries retried with backoff. A record refused again is reported with its error and
//! left where it is: the replay never writes to the dead-letter stream. What the replay has read
//! is kept per dead-letter shard in the checkpoint store (beside the file, or in the lease table
//! under a `dead-letters/` key that no shard id can take), so running it twice sends nothing
//! twice. A record that is not an envelope is reported and skipped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use base64::Engine as _;
use serde::Deserialize;

mod positions;
mod summary;
mod target;

use positions::{ALL, Marks, Positions};
pub use summary::{Counts, Summary};
use target::{Target, resolve, send};

use super::OperateError;
use crate::aws::credentials::Identities;
use crate::aws::{KinesisClients, kinesis};
use crate::config::Settings;
use crate::position::Position;
use crate::record::SequenceNumber;

/// Keys of replay positions in the lease table start with this (shard ids never do).
pub const POSITION_PREFIX: &str = crate::lease::table::NOTE_PREFIX;
/// A batch that still fails after this many attempts stops the replay (its position is not
/// kept, so the next run tries it again).
const MAX_ATTEMPTS: u32 = 10;

#[derive(Debug, Clone, Default)]
pub struct ReplayArgs {
    /// The dead-letter stream.
    pub stream: String,
    /// Only envelopes for this destination (its metric label); the others are skipped.
    pub destination: Option<String>,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    /// Only count: send nothing, keep no position.
    pub dry_run: bool,
    /// Forget the position kept by earlier runs: read from the start (or `since`) again.
    pub restart: bool,
}

/// The envelope as written by `sink::dead_letter` (unknown fields ignored).
#[derive(Debug, Deserialize)]
struct Envelope {
    destination: String,
    partition_key: String,
    #[serde(default)]
    explicit_hash_key: Option<String>,
    data: String,
    /// The record was larger than the dead-letter stream takes: the envelope names its origin
    /// in the source without its data.
    #[serde(default)]
    data_omitted: bool,
    #[serde(default)]
    shard_id: String,
    #[serde(default)]
    sequence_number: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("`{0}` is not the dead_letter_stream of any destination group")]
    UnknownDeadLetterStream(String),
    #[error("`{0}` is not a destination: no stream of that name matches a destination group")]
    UnknownDestination(String),
    #[error(
        "destination `{0}` does not take writes now (being created, updated or deleted); nothing of this page was sent, and the replay position stays before it"
    )]
    NotWritable(String),
    #[error(
        "cannot tell whether `{destination}` is a destination now; nothing of this page was sent, and the replay position stays before it"
    )]
    Undecided {
        destination: String,
        #[source]
        cause: crate::aws::CallError,
    },
    #[error("reading the dead-letter stream failed")]
    Read(#[source] crate::aws::CallError),
    #[error("PutRecords to {destination} kept failing after {attempts} attempts: {cause}")]
    Stuck { destination: String, attempts: u32, cause: String },
    #[error("cannot keep the replay position in {path}")]
    Position {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the dead-letter stream and re-sends its records; `progress` hears of every page.
pub async fn replay(
    settings: &Settings,
    sdk: &aws_config::SdkConfig,
    args: &ReplayArgs,
    mut progress: impl FnMut(&Summary),
) -> Result<Summary, OperateError> {
    let identities = Identities {
        sdk: sdk.clone(),
        sts_endpoint_url: settings.sts_endpoint_url.clone(),
        worker: "replay".into(),
        metrics: Default::default(),
        health: Default::default(),
    };
    let timeout = settings.put_attempt_timeout();
    let group = settings
        .destinations
        .iter()
        .find(|g| g.dead_letter_stream.as_deref() == Some(args.stream.as_str()))
        .ok_or_else(|| ReplayError::UnknownDeadLetterStream(args.stream.clone()))?;
    let dlq_aws = group.aws.clone();
    let credentials = identities.provider(dlq_aws.role.as_ref(), dlq_aws.region.as_deref(), "dead-letters").await;
    let reader = KinesisClients::new(sdk, &dlq_aws, credentials, timeout).control;

    let mut targets: BTreeMap<String, Option<Target>> = BTreeMap::new();
    if let Some(name) = &args.destination {
        let found = resolve(settings, &identities, name).await?;
        if found.is_none() {
            return Err(ReplayError::UnknownDestination(name.clone()).into());
        }
        targets.insert(name.clone(), found);
    }
    let positions = Positions::open(settings, &identities, sdk, &args.stream).await?;
    let mut summary = Summary::default();
    let mut shards = kinesis::list_shards(&reader, &args.stream).await.map_err(ReplayError::Read)?;
    shards.sort_by(|a, b| a.id.cmp(&b.id));
    for shard in shards {
        // What earlier runs replayed here: `*` for runs over every destination, a destination's
        // label for runs filtered to it.
        let mut marks = if args.restart { Marks::new() } else { positions.get(&shard.id).await? };
        let mark = |key: &str, marks: &Marks| marks.get(key).and_then(|t| SequenceNumber::parse(t).ok());
        let mine = args.destination.as_deref().unwrap_or(ALL);
        let stored = mark(ALL, &marks).max(mark(mine, &marks));
        let start = match (stored, args.since) {
            (Some(seq), _) => Position::Sequence(seq),
            (None, Some(at)) => Position::AtTimestamp(at),
            (None, None) => Position::TrimHorizon,
        };
        let mut iterator =
            kinesis::shard_iterator(&reader, &args.stream, &shard.id, &start).await.map_err(ReplayError::Read)?;
        loop {
            let page = kinesis::get_records(&reader, &iterator, 500).await.map_err(ReplayError::Read)?;
            let mut last = None;
            let mut by_destination: BTreeMap<String, Vec<(String, PutRecordsRequestEntry)>> = BTreeMap::new();
            let mut past_until = false;
            for record in &page.records {
                let arrival = record.approximate_arrival_timestamp.and_then(|t| SystemTime::try_from(t).ok());
                if args.until.zip(arrival).is_some_and(|(until, arrived)| arrived > until) {
                    past_until = true;
                    break;
                }
                summary.read += 1;
                last = Some(record.sequence_number.clone());
                let origin = format!("{}/{}", shard.id, record.sequence_number);
                let envelope = match serde_json::from_slice::<Envelope>(record.data.as_ref()) {
                    Ok(envelope) => envelope,
                    Err(err) => {
                        summary.unreadable.push(format!("{origin}: not a dead-letter envelope ({err})"));
                        continue;
                    }
                };
                if envelope.data_omitted {
                    summary.destinations.entry(envelope.destination.clone()).or_default().rejected_again += 1;
                    summary.refused.push(format!(
                        "{origin} -> {}: the envelope holds no data (the record was larger than the dead-letter stream takes); read it from the source, shard {} at sequence number {}, while it is retained",
                        envelope.destination, envelope.shard_id, envelope.sequence_number
                    ));
                    continue;
                }
                let data = match base64::engine::general_purpose::STANDARD.decode(&envelope.data) {
                    Ok(data) => data,
                    Err(err) => {
                        summary.unreadable.push(format!("{origin}: the envelope's data is not base64 ({err})"));
                        continue;
                    }
                };
                // Filtered out, or sent already by a run filtered to its destination.
                let seq = SequenceNumber::parse(&record.sequence_number).ok();
                let sent = args.destination.is_none() && seq.is_some() && seq <= mark(&envelope.destination, &marks);
                if sent || args.destination.as_ref().is_some_and(|d| *d != envelope.destination) {
                    summary.destinations.entry(envelope.destination).or_default().skipped += 1;
                    continue;
                }
                // One entry Kinesis would refuse would fail its whole request: caught here.
                let ehk = envelope.explicit_hash_key.as_deref();
                // (The size is checked against the destination's own limit once it is resolved.)
                let largest = crate::record::LARGEST_RECORD_BYTES;
                if let Err(invalid) =
                    crate::record::validate_entry_within(&envelope.partition_key, ehk, data.len(), largest)
                {
                    summary.destinations.entry(envelope.destination.clone()).or_default().rejected_again += 1;
                    summary.refused.push(format!("{origin} -> {}: invalid entry: {invalid}", envelope.destination));
                    continue;
                }
                let entry = PutRecordsRequestEntry::builder()
                    .data(Blob::new(data))
                    .partition_key(&envelope.partition_key)
                    .set_explicit_hash_key(envelope.explicit_hash_key.clone())
                    .build();
                match entry {
                    Ok(entry) => by_destination.entry(envelope.destination).or_default().push((origin, entry)),
                    Err(err) => summary.unreadable.push(format!("{origin}: {err}")),
                }
            }
            // Every destination of the page is resolved before anything is sent: a page whose
            // destinations cannot all be told stops the run where it began.
            for destination in by_destination.keys() {
                if !targets.contains_key(destination) {
                    let found = resolve(settings, &identities, destination).await?;
                    targets.insert(destination.clone(), found);
                }
            }
            for (destination, entries) in by_destination {
                let Some(target) = targets.get_mut(&destination).and_then(Option::as_mut) else {
                    // Reported as refused: a run moves past it only saying so.
                    let counts = summary.destinations.entry(destination.clone()).or_default();
                    counts.rejected_again += entries.len() as u64;
                    for (origin, _) in entries {
                        summary
                            .refused
                            .push(format!("{origin} -> {destination}: no existing stream is that destination"));
                    }
                    continue;
                };
                let counts = summary.destinations.entry(destination.clone()).or_default();
                if args.dry_run {
                    counts.replayed += entries.len() as u64;
                    continue;
                }
                send(settings, target, &destination, entries, counts, &mut summary.refused).await?;
            }
            if let (Some(last), false) = (&last, args.dry_run) {
                marks.insert(mine.to_string(), last.clone());
                if args.destination.is_none() {
                    // Marks of filtered runs below the one of all destinations say nothing more.
                    let all = mark(ALL, &marks);
                    marks.retain(|key, seq| key == ALL || SequenceNumber::parse(seq).ok() > all);
                }
                positions.set(&shard.id, &marks).await?;
            }
            progress(&summary);
            let at_tip = page.records.is_empty() && page.millis_behind_latest.is_none_or(|ms| ms == 0);
            match page.next {
                Some(next) if !past_until && !at_tip => iterator = next,
                _ => break,
            }
        }
    }
    Ok(summary)
}
