//! The destination a letter names, found as discovery finds it, and the batches sent to it.

use aws_sdk_kinesis::types::PutRecordsRequestEntry;

use super::{Counts, MAX_ATTEMPTS, ReplayError};
use crate::aws::credentials::Identities;
use crate::aws::{ErrorKind, KinesisClients, kinesis};
use crate::config::Settings;
use crate::discovery::{Verdict, decide};
use crate::sink::batch::{self, BatchLimits};
use crate::sink::limiter::Limiter;
use crate::sink::retry::{Backoff, EntryOutcome, classify_batch};

/// A destination found for a label: its stream name and the place's clients.
pub(super) struct Target {
    pub(super) stream: String,
    pub(super) group: usize,
    pub(super) clients: KinesisClients,
    pub(super) limiter: Limiter,
    /// What the destination takes (its `MaxRecordSizeInKiB`).
    pub(super) limits: crate::record::StreamLimits,
}

/// Finds the destination a label names (`name`, `region/name` or `account/region/name`, as the
/// service labels destinations), selecting streams exactly as discovery does
/// ([`crate::discovery::decide`]: patterns, excludes, tags). `Ok(None)`: no place has such a
/// destination; an error when a place could not tell (a tag read or DescribeStreamSummary
/// failed), so that the caller does not move past records it could not send.
pub(super) async fn resolve(
    settings: &Settings,
    identities: &Identities,
    label: &str,
) -> Result<Option<Target>, ReplayError> {
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
        // The stream of that name here (when a group of the place selects by pattern), and the
        // streams of that name its groups name by ARN (labelled by their name, as any other).
        let here = settings.destinations.iter().filter(|g| g.aws == *aws);
        let by_pattern = here.clone().any(|g| g.streams.is_empty());
        let named = here.flat_map(|g| &g.streams).filter(|arn| kinesis::stream_name_of(arn) == name);
        let candidates: Vec<&str> = by_pattern.then_some(name).into_iter().chain(named.map(String::as_str)).collect();
        for stream in candidates {
            // Is there such a stream here, and is it the one the label names (the label's region
            // and account are the stream's own, as its ARN says)? Only then ask its tags.
            let Some(summary) = kinesis::describe_stream(&clients.control, stream).await.map_err(undecided)? else {
                continue;
            };
            let (arn_region, arn_account) = crate::discovery::arn_place(&summary.arn);
            if region.is_some_and(|r| r != arn_region) || account.is_some_and(|a| a != arn_account) {
                continue;
            }
            let Verdict::Destination(group) =
                decide(settings, aws, &clients.control, stream).await.map_err(undecided)?
            else {
                continue;
            };
            if !summary.writable {
                // Being created or updated: discovery would wait for it, and so does the replay.
                return Err(ReplayError::NotWritable(label.to_string()));
            }
            let limiter = limiter(settings, group, summary.open_shards);
            let stream = stream.to_string();
            return Ok(Some(Target { stream, group, clients, limiter, limits: summary.limits }));
        }
    }
    Ok(None)
}

pub(super) fn limiter(settings: &Settings, group: usize, open_shards: u32) -> Limiter {
    let group = &settings.destinations[group];
    Limiter::new(
        group.records_per_second.resolve(open_shards, crate::sink::destination::RECORDS_PER_SHARD),
        group.bytes_per_second.resolve(open_shards, crate::sink::destination::BYTES_PER_SHARD),
    )
}

/// Sends entries in batches, retrying exactly the failed ones; refusals are reported.
pub(super) async fn send(
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
