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
use serde::{Deserialize, Serialize};

use super::OperateError;
use crate::aws::credentials::Identities;
use crate::aws::{ErrorKind, KinesisClients, kinesis};
use crate::config::{AwsSettings, CheckpointBackend, Settings};
use crate::discovery::{Verdict, decide};
use crate::lease::LeaseTable;
use crate::position::Position;
use crate::record::SequenceNumber;
use crate::sink::batch::{self, BatchLimits};
use crate::sink::limiter::Limiter;
use crate::sink::retry::{Backoff, EntryOutcome, classify_batch};

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

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub replayed: u64,
    pub rejected_again: u64,
    /// Filtered out by `--destination`.
    pub skipped: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    /// Dead-letter records read.
    pub read: u64,
    pub destinations: BTreeMap<String, Counts>,
    /// Records that are not envelopes, or name no destination there is: `shard/sequence: why`.
    pub unreadable: Vec<String>,
    /// Records refused again: `shard/sequence -> destination: code: message`.
    pub refused: Vec<String>,
}

impl Summary {
    /// One line of progress: what was read, replayed, refused and unreadable so far.
    pub fn progress_line(&self) -> String {
        let replayed: u64 = self.destinations.values().map(|c| c.replayed).sum();
        format!(
            "{} read, {replayed} replayed, {} refused again, {} unreadable",
            self.read,
            self.refused.len(),
            self.unreadable.len()
        )
    }

    /// The summary as text: per destination, then every refused and unreadable record.
    pub fn render(&self, stream: &str, dry_run: bool) -> String {
        use std::fmt::Write;
        let verb = if dry_run { "would replay" } else { "replayed" };
        let mut out = format!("{} dead-letter records read from {stream}\n", self.read);
        for (destination, counts) in &self.destinations {
            let _ = writeln!(
                out,
                "  {destination}: {verb} {}, refused again {}, skipped (filtered) {}",
                counts.replayed, counts.rejected_again, counts.skipped
            );
        }
        for line in &self.refused {
            let _ = writeln!(out, "  refused again: {line}");
        }
        for line in &self.unreadable {
            let _ = writeln!(out, "  unreadable: {line}");
        }
        out
    }
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

/// A destination found for a label: its stream name and the place's clients.
struct Target {
    stream: String,
    group: usize,
    clients: KinesisClients,
    limiter: Limiter,
    /// What the destination takes (its `MaxRecordSizeInKiB`).
    limits: crate::record::StreamLimits,
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

/// Finds the destination a label names (`name`, `region/name` or `account/region/name`, as the
/// service labels destinations), selecting streams exactly as discovery does
/// ([`crate::discovery::decide`]: patterns, excludes, tags). `Ok(None)`: no place has such a
/// destination; an error when a place could not tell (a tag read or DescribeStreamSummary
/// failed), so that the caller does not move past records it could not send.
async fn resolve(settings: &Settings, identities: &Identities, label: &str) -> Result<Option<Target>, ReplayError> {
    let parts: Vec<&str> = label.split('/').collect();
    let (account, region, name) = match parts.as_slice() {
        [name] => (None, None, *name),
        [region, name] => (None, Some(*region), *name),
        [account, region, name] => (Some(*account), Some(*region), *name),
        _ => return Ok(None),
    };
    let undecided = |cause: crate::aws::CallError| ReplayError::Undecided { destination: label.to_string(), cause };
    for (index, aws) in settings.destination_places().iter().enumerate() {
        let group_label = format!("destinations[{index}]");
        let credentials = identities.provider(aws.role.as_ref(), aws.region.as_deref(), &group_label).await;
        let clients = KinesisClients::new(&identities.sdk, aws, credentials, settings.put_attempt_timeout());
        // Is there such a stream here, and is it the one the label names (the label's region
        // and account are the stream's own, as its ARN says)? Only then ask its tags.
        let Some(summary) = kinesis::describe_stream(&clients.control, name).await.map_err(undecided)? else {
            continue;
        };
        let (arn_region, arn_account) = crate::discovery::arn_place(&summary.arn);
        if region.is_some_and(|r| r != arn_region) || account.is_some_and(|a| a != arn_account) {
            continue;
        }
        let Verdict::Destination(group) = decide(settings, aws, &clients.control, name).await.map_err(undecided)?
        else {
            continue;
        };
        if !summary.writable {
            // Being created or updated: discovery would wait for it, and so does the replay.
            return Err(ReplayError::NotWritable(label.to_string()));
        }
        let limiter = limiter(settings, group, summary.open_shards);
        return Ok(Some(Target { stream: name.to_string(), group, clients, limiter, limits: summary.limits }));
    }
    Ok(None)
}

fn limiter(settings: &Settings, group: usize, open_shards: u32) -> Limiter {
    let group = &settings.destinations[group];
    Limiter::new(
        group.records_per_second.resolve(open_shards, crate::sink::destination::RECORDS_PER_SHARD),
        group.bytes_per_second.resolve(open_shards, crate::sink::destination::BYTES_PER_SHARD),
    )
}

/// Sends entries in batches, retrying exactly the failed ones; refusals are reported.
async fn send(
    settings: &Settings,
    target: &mut Target,
    destination: &str,
    mut entries: Vec<(String, PutRecordsRequestEntry)>,
    counts: &mut Counts,
    refused: &mut Vec<String>,
) -> Result<(), ReplayError> {
    let group = &settings.destinations[target.group];
    let mut backoff = Backoff::for_group(group);
    // A record larger than the destination takes is refused here, alone: never sent.
    let max_record_bytes = target.limits.max_record_bytes;
    entries.retain(|(origin, e)| {
        let bytes = e.data().as_ref().len() + e.partition_key().map_or(0, str::len);
        if bytes <= max_record_bytes {
            return true;
        }
        counts.rejected_again += 1;
        refused.push(format!(
            "{origin} -> {destination}: {}",
            crate::record::InvalidEntry::TooLarge { bytes, limit: max_record_bytes }
        ));
        false
    });
    while !entries.is_empty() {
        let sizes: Vec<usize> = entries
            .iter()
            .map(|(_, e)| batch::encoded_size(e.partition_key().map_or(0, str::len), e.data().as_ref().len()))
            .collect();
        let take = batch::fits(sizes.iter().copied(), BatchLimits::for_stream(target.limits)).max(1);
        let bytes: usize = sizes[..take].iter().sum();
        target.limiter.acquire(take, bytes).await;
        let mut pending: Vec<(String, PutRecordsRequestEntry)> = entries.drain(..take).collect();
        let mut attempts = 0;
        while !pending.is_empty() {
            attempts += 1;
            let request: Vec<PutRecordsRequestEntry> = pending.iter().map(|(_, e)| e.clone()).collect();
            let retry = match kinesis::put_records(&target.clients.writer, &target.stream, request).await {
                Ok(answers) if answers.len() == pending.len() => {
                    let outcomes =
                        classify_batch(answers.iter().map(|a| (a.error_code.as_deref(), a.error_message.as_deref())));
                    let mut again = Vec::new();
                    for ((origin, entry), outcome) in pending.into_iter().zip(outcomes) {
                        match outcome {
                            EntryOutcome::Accepted => counts.replayed += 1,
                            EntryOutcome::Throttled | EntryOutcome::Retry { .. } => again.push((origin, entry)),
                            EntryOutcome::Reject { code, message } => {
                                counts.rejected_again += 1;
                                refused.push(format!("{origin} -> {destination}: {code}: {message}"));
                            }
                        }
                    }
                    pending = again;
                    Err("some entries failed".to_string())
                }
                Ok(_) => Err("PutRecords answered a different number of entries".to_string()),
                Err(err) if err.kind == ErrorKind::Transient => Err(err.cause),
                Err(err) => {
                    for (origin, _) in pending.drain(..) {
                        counts.rejected_again += 1;
                        refused.push(format!("{origin} -> {destination}: {}: {}", err.code, err.cause));
                    }
                    Ok(())
                }
            };
            if let Err(cause) = retry {
                if pending.is_empty() {
                    break;
                }
                if attempts >= MAX_ATTEMPTS {
                    return Err(ReplayError::Stuck { destination: destination.to_string(), attempts, cause });
                }
                tokio::time::sleep(backoff.next_delay(&mut rand::rng())).await;
            }
        }
        backoff.reset();
    }
    Ok(())
}

/// The mark of runs over every destination.
const ALL: &str = "*";

/// Per dead-letter shard: the last record replayed, by `*` (every destination) or by the
/// destination a run was filtered to.
type Marks = BTreeMap<String, String>;

/// Where a replay keeps what it has read, per dead-letter shard.
enum Positions {
    /// A JSON file beside the checkpoint file.
    File(PathBuf),
    Table(LeaseTable, String),
}

impl Positions {
    async fn open(
        settings: &Settings,
        identities: &Identities,
        sdk: &aws_config::SdkConfig,
        stream: &str,
    ) -> Result<Positions, OperateError> {
        Ok(match &settings.checkpoint.backend {
            CheckpointBackend::File { path } => {
                let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                name.push(format!(".dead-letters-{stream}.json"));
                Positions::File(path.with_file_name(name))
            }
            CheckpointBackend::DynamoDb(lease) => {
                let aws: AwsSettings = lease.aws(&settings.source.aws);
                let credentials = identities.provider(aws.role.as_ref(), aws.region.as_deref(), "checkpoint").await;
                let table =
                    LeaseTable::new(crate::aws::dynamodb_client(sdk, &aws, credentials, lease), &lease.table_name);
                Positions::Table(table, format!("{POSITION_PREFIX}{stream}/"))
            }
        })
    }

    async fn get(&self, shard: &str) -> Result<Marks, OperateError> {
        Ok(match self {
            Positions::File(path) => self.file(path)?.remove(shard).unwrap_or_default(),
            Positions::Table(table, prefix) => table
                .note(&format!("{prefix}{shard}"))
                .await?
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or_default(),
        })
    }

    async fn set(&self, shard: &str, marks: &Marks) -> Result<(), OperateError> {
        match self {
            Positions::File(path) => {
                let mut all = self.file(path)?;
                all.insert(shard.to_string(), marks.clone());
                let text = serde_json::to_vec_pretty(&all).expect("a map of strings serialises");
                let partial = path.with_extension("partial");
                std::fs::write(&partial, text)
                    .and_then(|()| std::fs::rename(&partial, path))
                    .map_err(|source| ReplayError::Position { path: path.clone(), source })?;
            }
            Positions::Table(table, prefix) => {
                let text = serde_json::to_string(marks).expect("a map of strings serialises");
                table.set_note(&format!("{prefix}{shard}"), &text).await?
            }
        }
        Ok(())
    }

    fn file(&self, path: &PathBuf) -> Result<BTreeMap<String, Marks>, ReplayError> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).unwrap_or_default()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(source) => Err(ReplayError::Position { path: path.clone(), source }),
        }
    }
}
