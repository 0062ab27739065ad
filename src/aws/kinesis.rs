//! Every Kinesis call the service makes, each answering in the service's own terms: stream
//! summaries, shard lists, stream names, subscriptions, polling reads (catch-up), consumers,
//! PutRecords (see
//! [`crate::sink::put`] for the trait the writers use). Errors come back as [`CallError`].

use std::collections::HashMap;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{
    ConsumerStatus, PutRecordsRequestEntry, ShardIteratorType, StartingPosition, StreamStatus, SubscribeToShardEvent,
    SubscribeToShardEventStream,
};

use super::{CallError, ErrorKind};
use crate::position::Position;

/// One PutRecords entry's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryAnswer {
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// The shard the record went to (accepted entries).
    pub shard_id: Option<String>,
}

/// One shard as ListShards describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: String,
    /// Parent and adjacent parent (after a merge), when the stream still lists them.
    pub parents: Vec<String>,
    /// The shard has an ending sequence number: a reshard closed it.
    pub closed: bool,
    /// Starting and ending hash keys, when known.
    pub hash_range: Option<(String, String)>,
}

/// Names the stream of a request: by ARN when `stream` is one (a stream in another account,
/// shared by a resource policy, can only be named so), else by name.
macro_rules! stream {
    ($request:expr, $stream:expr) => {{
        let stream: &str = $stream;
        if is_arn(stream) { $request.stream_arn(stream) } else { $request.stream_name(stream) }
    }};
}

/// Whether a stream is named by its ARN.
pub fn is_arn(stream: &str) -> bool {
    stream.starts_with("arn:")
}

/// A stream's name: the part of its ARN after `stream/`, or the name itself.
pub fn stream_name_of(stream: &str) -> &str {
    match stream.split_once(":stream/") {
        Some((_, name)) if is_arn(stream) => name,
        _ => stream,
    }
}

/// What DescribeStreamSummary says of a stream that exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    pub arn: String,
    pub open_shards: u32,
    /// How long records stay readable.
    pub retention: std::time::Duration,
    /// ACTIVE or UPDATING: it takes writes and reads.
    pub writable: bool,
    pub deleting: bool,
    /// What it takes: its `MaxRecordSizeInKiB` (1 MiB when it does not say).
    pub limits: crate::record::StreamLimits,
}

/// DescribeStreamSummary; `None` when the stream does not exist.
pub async fn describe_stream(client: &Client, name: &str) -> Result<Option<StreamSummary>, CallError> {
    let out = match stream!(client.describe_stream_summary(), name).send().await {
        Ok(out) => out,
        Err(err) if super::classify(&err) == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(CallError::from_sdk(&err)),
    };
    let summary = out.stream_description_summary().ok_or_else(|| CallError {
        kind: ErrorKind::Transient,
        code: "BadResponse".into(),
        cause: "DescribeStreamSummary returned no summary".into(),
    })?;
    let status = summary.stream_status();
    Ok(Some(StreamSummary {
        arn: summary.stream_arn().to_string(),
        open_shards: summary.open_shard_count().max(0) as u32,
        retention: std::time::Duration::from_secs(summary.retention_period_hours().max(0) as u64 * 3600),
        writable: matches!(status, StreamStatus::Active | StreamStatus::Updating),
        deleting: *status == StreamStatus::Deleting,
        limits: crate::record::StreamLimits::from_kib(summary.max_record_size_in_kib()),
    }))
}

/// Whether a stream was deleted or is being deleted.
pub async fn stream_gone(client: &Client, name: &str) -> Result<bool, CallError> {
    Ok(describe_stream(client, name).await?.is_none_or(|s| s.deleting))
}

/// Every shard of a stream (paginated ListShards).
pub async fn list_shards(client: &Client, stream: &str) -> Result<Vec<ShardInfo>, CallError> {
    let mut shards = Vec::new();
    let mut next_token: Option<String> = None;
    loop {
        let request = match &next_token {
            Some(token) => client.list_shards().next_token(token),
            None => stream!(client.list_shards(), stream),
        };
        let page = request.send().await.map_err(|err| CallError::from_sdk(&err))?;
        for shard in page.shards() {
            let parents = [shard.parent_shard_id(), shard.adjacent_parent_shard_id()]
                .into_iter()
                .flatten()
                .map(str::to_string)
                .collect();
            let closed = shard.sequence_number_range().and_then(|r| r.ending_sequence_number()).is_some();
            let hash_range =
                shard.hash_key_range().map(|r| (r.starting_hash_key().to_string(), r.ending_hash_key().to_string()));
            shards.push(ShardInfo { id: shard.shard_id().to_string(), parents, closed, hash_range });
        }
        match page.next_token() {
            Some(token) => next_token = Some(token.to_string()),
            None => break,
        }
    }
    Ok(shards)
}

/// Every stream name in the account and region (paginated ListStreams), each page after
/// `pace` allows it.
pub async fn list_stream_names(
    client: &Client,
    pace: Option<&governor::DefaultDirectRateLimiter>,
) -> Result<Vec<String>, CallError> {
    let mut names: Vec<String> = Vec::new();
    let mut next_token: Option<String> = None;
    loop {
        if let Some(pace) = pace {
            pace.until_ready().await;
        }
        let request = match (&next_token, names.last()) {
            (Some(token), _) => client.list_streams().next_token(token),
            // Older endpoints page by the last name seen instead of a token.
            (None, Some(last)) => client.list_streams().exclusive_start_stream_name(last),
            (None, None) => client.list_streams().limit(1000),
        };
        let page = request.send().await.map_err(|err| CallError::from_sdk(&err))?;
        let before = names.len();
        names.extend(page.stream_names().iter().cloned());
        if !page.has_more_streams() || (page.next_token().is_none() && names.len() == before) {
            break;
        }
        next_token = page.next_token().map(str::to_string);
    }
    Ok(names)
}

/// Every tag of a stream (ListTagsForStream, page by page).
pub async fn list_tags(client: &Client, stream: &str) -> Result<HashMap<String, String>, CallError> {
    let mut tags = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = stream!(client.list_tags_for_stream(), stream)
            .set_exclusive_start_tag_key(after.clone())
            .send()
            .await
            .map_err(|err| CallError::from_sdk(&err))?;
        let last = page.tags().last().map(|t| t.key().to_string());
        tags.extend(page.tags().iter().map(|t| (t.key().to_string(), t.value().unwrap_or_default().to_string())));
        match last {
            Some(last) if page.has_more_tags() => after = Some(last),
            // More promised, and no key to go on from: a partial answer is no tag set.
            None if page.has_more_tags() => {
                return Err(CallError {
                    kind: ErrorKind::Transient,
                    code: "IncompleteTags".into(),
                    cause: format!("ListTagsForStream on {stream} said more tags follow, but gave none to go on from"),
                });
            }
            _ => return Ok(tags),
        }
    }
}

/// An open SubscribeToShard session.
pub struct Subscription(
    aws_sdk_kinesis::primitives::event_stream::EventReceiver<
        SubscribeToShardEventStream,
        aws_sdk_kinesis::types::error::SubscribeToShardEventStreamError,
    >,
);

impl Subscription {
    /// The next event; `None` when the session ended.
    pub async fn next(&mut self) -> Result<Option<SubscribeToShardEvent>, CallError> {
        loop {
            match self.0.recv().await {
                Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(event))) => return Ok(Some(event)),
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(None),
                Err(err) => return Err(CallError::from_sdk(&err)),
            }
        }
    }
}

/// SubscribeToShard from `start`.
pub async fn subscribe(
    client: &Client,
    consumer_arn: &str,
    shard_id: &str,
    start: &Position,
    meter: impl aws_sdk_kinesis::config::Intercept + 'static,
) -> Result<Subscription, CallError> {
    let output = client
        .subscribe_to_shard()
        .consumer_arn(consumer_arn)
        .shard_id(shard_id)
        .starting_position(starting_position(start))
        .customize()
        .interceptor(meter)
        .send()
        .await
        .map_err(|err| CallError::from_sdk(&err))?;
    Ok(Subscription(output.event_stream))
}

fn starting_position(point: &Position) -> StartingPosition {
    let builder = StartingPosition::builder();
    let builder = match point {
        Position::TrimHorizon => builder.r#type(ShardIteratorType::TrimHorizon),
        Position::Latest => builder.r#type(ShardIteratorType::Latest),
        Position::AtTimestamp(at) => builder.r#type(ShardIteratorType::AtTimestamp).timestamp(DateTime::from(*at)),
        Position::Sequence(seq) => builder.r#type(ShardIteratorType::AfterSequenceNumber).sequence_number(seq.as_str()),
        Position::At(seq) => builder.r#type(ShardIteratorType::AtSequenceNumber).sequence_number(seq.as_str()),
        // Never asked for (a shard read to its end is not read again); LATEST gives only the end.
        Position::ShardEnd => builder.r#type(ShardIteratorType::Latest),
    };
    builder.build().expect("type is always set")
}

/// A shard iterator for a polling read from `start`.
pub async fn shard_iterator(
    client: &Client,
    stream: &str,
    shard_id: &str,
    start: &Position,
) -> Result<String, CallError> {
    let point = starting_position(start);
    let mut request = stream!(client.get_shard_iterator(), stream).shard_id(shard_id).shard_iterator_type(point.r#type);
    if let Some(seq) = point.sequence_number {
        request = request.starting_sequence_number(seq);
    }
    if let Some(at) = point.timestamp {
        request = request.timestamp(at);
    }
    let output = request.send().await.map_err(|err| CallError::from_sdk(&err))?;
    output.shard_iterator.ok_or_else(|| CallError {
        kind: ErrorKind::Transient,
        code: "NoShardIterator".into(),
        cause: format!("GetShardIterator on {shard_id} answered without an iterator"),
    })
}

/// One page of a polling read.
pub struct Page {
    pub records: Vec<aws_sdk_kinesis::types::Record>,
    /// `None` at the end of a closed shard.
    pub next: Option<String>,
    pub millis_behind_latest: Option<i64>,
}

/// GetRecords: at most `limit` records from `iterator`.
pub async fn get_records(client: &Client, iterator: &str, limit: i32) -> Result<Page, CallError> {
    let output = client
        .get_records()
        .shard_iterator(iterator)
        .limit(limit)
        .send()
        .await
        .map_err(|err| CallError::from_sdk(&err))?;
    Ok(Page {
        millis_behind_latest: output.millis_behind_latest,
        next: output.next_shard_iterator,
        records: output.records,
    })
}

/// An Enhanced Fan-Out consumer as DescribeStreamConsumer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    pub arn: String,
    pub active: bool,
    pub status: String,
}

/// A consumer as DescribeStreamConsumer describes it.
fn consumer(c: &aws_sdk_kinesis::types::ConsumerDescription) -> Consumer {
    Consumer {
        arn: c.consumer_arn().to_string(),
        active: *c.consumer_status() == ConsumerStatus::Active,
        status: c.consumer_status().as_str().to_string(),
    }
}

/// DescribeStreamConsumer; `None` when no consumer of that name is registered.
pub async fn describe_consumer(client: &Client, stream_arn: &str, name: &str) -> Result<Option<Consumer>, CallError> {
    match client.describe_stream_consumer().stream_arn(stream_arn).consumer_name(name).send().await {
        Ok(out) => Ok(out.consumer_description().map(consumer)),
        Err(err) if super::classify(&err) == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(CallError::from_sdk(&err)),
    }
}

/// DescribeStreamConsumer by the consumer's ARN; `None` when there is no such consumer.
pub async fn describe_consumer_arn(client: &Client, consumer_arn: &str) -> Result<Option<Consumer>, CallError> {
    match client.describe_stream_consumer().consumer_arn(consumer_arn).send().await {
        Ok(out) => Ok(out.consumer_description().map(consumer)),
        Err(err) if super::classify(&err) == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(CallError::from_sdk(&err)),
    }
}

/// The names of the consumers registered on a stream (paginated ListStreamConsumers).
pub async fn list_consumers(client: &Client, stream_arn: &str) -> Result<Vec<String>, CallError> {
    let mut names = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let request = client.list_stream_consumers().stream_arn(stream_arn).set_next_token(next.take());
        let out = request.send().await.map_err(|err| CallError::from_sdk(&err))?;
        names.extend(out.consumers().iter().map(|c| c.consumer_name().to_string()));
        match out.next_token() {
            Some(token) if !token.is_empty() => next = Some(token.to_string()),
            _ => return Ok(names),
        }
    }
}

/// DeregisterStreamConsumer.
pub async fn deregister_consumer(client: &Client, stream_arn: &str, name: &str) -> Result<(), CallError> {
    match client.deregister_stream_consumer().stream_arn(stream_arn).consumer_name(name).send().await {
        Ok(_) => Ok(()),
        Err(err) => Err(CallError::from_sdk(&err)),
    }
}

/// RegisterStreamConsumer.
pub async fn register_consumer(client: &Client, stream_arn: &str, name: &str) -> Result<(), CallError> {
    match client.register_stream_consumer().stream_arn(stream_arn).consumer_name(name).send().await {
        Ok(_) => Ok(()),
        Err(err) => Err(CallError::from_sdk(&err)),
    }
}

/// One PutRecords call: an answer per entry, in order.
pub async fn put_records(
    client: &Client,
    stream: &str,
    entries: Vec<PutRecordsRequestEntry>,
) -> Result<Vec<EntryAnswer>, CallError> {
    let output = stream!(client.put_records(), stream)
        .set_records(Some(entries))
        .send()
        .await
        .map_err(|err| CallError::from_sdk(&err))?;
    Ok(output
        .records()
        .iter()
        .map(|e| EntryAnswer {
            error_code: e.error_code().map(str::to_string),
            error_message: e.error_message().map(str::to_string),
            shard_id: e.shard_id().map(str::to_string),
        })
        .collect())
}
