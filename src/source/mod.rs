//! The read side: the source stream's shards, read through Enhanced Fan-Out.
//!
//! [`coordinate`] is the coordinator: it starts a reading for each shard an
//! [`assign::Assignments`] source hands it (the single-worker plan or the lease table), stops it
//! when the shard is lost, and reports a shard read to its end back to the same source, which
//! records `SHARD_END` durably before any child starts. [`Source::run`] runs it with
//! [`reader::ShardReader`]s.

pub mod assign;
pub mod catchup;
pub mod consumer;
pub mod metered;
pub mod reader;
pub mod shards;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{CheckpointError, Checkpointer};
use crate::fanout::Fanout;
use crate::metrics::Metrics;
use crate::position::Position;
use crate::progress::Progress;
use crate::shutdown::Stopped;
use assign::{Assignment, Assignments};
pub use consumer::{SourceStream, ensure_consumer, resolve_stream, source_consumer};
use reader::{ReaderExit, ShardReader};
use shards::ShardInfo;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source stream `{stream}` does not exist")]
    StreamNotFound { stream: String },
    #[error("source stream `{stream}` was deleted")]
    StreamDeleted { stream: String },
    #[error("cannot describe source stream `{stream}`")]
    Describe {
        stream: String,
        #[source]
        source: BoxError,
    },
    #[error("cannot register or describe Enhanced Fan-Out consumer `{consumer}` of stream `{stream}`")]
    Consumer {
        consumer: String,
        stream: String,
        #[source]
        source: BoxError,
    },
    #[error("Enhanced Fan-Out consumer `{consumer}` did not become ACTIVE within {waited:?}")]
    ConsumerNotActive { consumer: String, waited: Duration },
    #[error(
        "cannot register Enhanced Fan-Out consumer `{consumer}`: stream `{stream}` is at its consumer limit (LimitExceededException; 20 per stream, 50 with On-demand Advantage) with {count} consumers registered: {names}. Deregister one that is no longer used, or share one with source.consumer_arn"
    )]
    ConsumerLimit { consumer: String, stream: String, count: String, names: String },
    #[error(
        "source.consumer_arn `{consumer_arn}` is not a consumer of source stream `{stream}` (its ARN starts with the stream's ARN and /consumer/)"
    )]
    ConsumerOfAnotherStream { consumer_arn: String, stream: String },
    #[error("source.consumer_arn `{consumer_arn}`: no such consumer is registered on stream `{stream}`")]
    ConsumerMissing { consumer_arn: String, stream: String },
    #[error("cannot list the shards of source stream `{stream}`")]
    ListShards {
        stream: String,
        #[source]
        source: BoxError,
    },
    #[error("SubscribeToShard on shard {shard} failed with an error retrying cannot fix: {message}")]
    Subscribe { shard: String, message: String },
    #[error("cannot record the end of shard {shard}")]
    Checkpoint {
        shard: String,
        #[source]
        source: CheckpointError,
    },
    #[error("a shard reader failed unexpectedly: {0}")]
    Reader(String),
    /// Not a failure: asked to stop before the source was ready (built explicitly, never by `?`,
    /// so that a stop inside a reader cannot turn into a fatal error).
    #[error("stopped before the source was ready")]
    Stopped(Stopped),
}

/// Every shard of a stream.
pub async fn list_shards(client: &aws_sdk_kinesis::Client, stream: &str) -> Result<Vec<ShardInfo>, SourceError> {
    crate::aws::kinesis::list_shards(client, stream)
        .await
        .map_err(|err| SourceError::ListShards { stream: stream.to_string(), source: Box::new(err) })
}

/// Everything the coordinator needs.
pub struct Source {
    pub stream: SourceStream,
    pub consumer_arn: String,
    pub clients: crate::aws::KinesisClients,
    pub fanout: Fanout,
    pub progress: Arc<Progress>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<crate::health::Health>,
    /// Where a reading started at LATEST or AT_TIMESTAMP stores its place.
    pub checkpointer: Checkpointer,
}

/// The readings under way: each has a generation, so that a late exit of an earlier reading of a
/// shard cannot cancel a newer one.
#[derive(Default)]
struct Readers {
    tasks: JoinSet<(String, u64, ReaderExit)>,
    running: HashMap<String, (u64, CancellationToken)>,
    generation: u64,
}

impl Readers {
    fn start(&mut self, shard: String, reading: Reading, delay: Duration, token: CancellationToken) {
        self.stop(&shard);
        self.generation += 1;
        let generation = self.generation;
        self.running.insert(shard.clone(), (generation, token.clone()));
        self.tasks.spawn(async move {
            if !delay.is_zero() {
                tokio::select! {
                    biased;
                    _ = token.cancelled() => return (shard, generation, ReaderExit::Stopped(Stopped)),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            (shard, generation, reading(token).await)
        });
    }

    fn stop(&mut self, shard: &str) {
        if let Some((_, token)) = self.running.remove(shard) {
            token.cancel();
        }
    }

    /// The next reading to end: its shard and why it ended.
    async fn next_exit(&mut self) -> Result<(String, ReaderExit), SourceError> {
        let joined = self.tasks.join_next().await.expect("only polled while readings run");
        let (shard, generation, exit) = joined.map_err(|err| SourceError::Reader(err.to_string()))?;
        if self.running.get(&shard).is_some_and(|(g, _)| *g == generation) {
            self.running.remove(&shard);
        }
        Ok((shard, exit))
    }
}

/// A shard's reading, started when the coordinator is ready (after the delay its lease came with)
/// and stopped by cancelling its token.
pub type Reading = Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, ReaderExit> + Send>;

/// What the coordinator starts for each shard it is handed: the service reads through Enhanced
/// Fan-Out; the fleet simulation (`crate::simulation`) reads simulated shards.
pub trait Readings {
    fn reading(&self, shard: &str, start: Position, destinations: &assign::DestinationSkips) -> Reading;
}

/// The coordinator: reads the shards `assignments` hands out until `stop`, or until a fatal
/// error. A lost shard's reading stops and what destinations still hold of it is revoked (the new
/// owner sends it); a shard read to its end is reported back, which records `SHARD_END` durably
/// before any child starts.
pub async fn coordinate(
    mut assignments: impl Assignments,
    readings: &impl Readings,
    progress: &Progress,
    stop: CancellationToken,
) -> Result<(), SourceError> {
    let readers_stop = stop.child_token();
    let mut readers = Readers::default();
    let result = loop {
        let exit = tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            assignment = assignments.next() => match assignment {
                Ok(Assignment::Acquired { shard, position, delay, destinations }) => {
                    let reading = readings.reading(&shard, position, &destinations);
                    readers.start(shard, reading, delay, readers_stop.child_token());
                    continue;
                }
                Ok(Assignment::Lost { shard }) => {
                    readers.stop(&shard);
                    // What destinations still hold of it is the new owner's to send.
                    progress.revoke(&shard);
                    continue;
                }
                Err(err) => break Err(err),
            },
            exit = readers.next_exit(), if !readers.tasks.is_empty() => exit,
        };
        match exit {
            Ok((shard, ReaderExit::Ended)) => {
                if let Err(err) = assignments.finished(&shard).await {
                    break Err(err);
                }
            }
            Ok((_, ReaderExit::Stopped(Stopped))) => {}
            Ok((_, ReaderExit::Fatal(err))) | Err(err) => break Err(err),
        }
    };
    readers_stop.cancel();
    while readers.tasks.join_next().await.is_some() {}
    result
}

impl Source {
    /// Reads the shards `assignments` hands out until `stop`, or until a fatal error.
    pub async fn run(self, assignments: impl Assignments, stop: CancellationToken) -> Result<(), SourceError> {
        let progress = Arc::clone(&self.progress);
        coordinate(assignments, &self, &progress, stop).await
    }

    /// A reading of `shard` from `start`, with a fresh tracker: an earlier reading of the shard,
    /// if any, no longer holds its progress back.
    fn reader(&self, shard_id: &str, start: Position, destinations: &assign::DestinationSkips) -> ShardReader {
        let progress = self.progress.restart(shard_id);
        progress.set_start(start.clone());
        progress.set_skips(destinations);
        ShardReader {
            stream_name: self.stream.name.clone(),
            consumer_arn: self.consumer_arn.clone(),
            progress,
            shard_id: shard_id.to_string(),
            start,
            subscriber: self.clients.subscriber.clone(),
            control: self.clients.control.clone(),
            fanout: self.fanout.clone(),
            metrics: Arc::clone(&self.metrics),
            health: Arc::clone(&self.health),
            last_malformed_warning: None,
            checkpointer: self.checkpointer.clone(),
            started_at: tokio::time::Instant::now(),
        }
    }
}

impl Readings for Source {
    fn reading(&self, shard: &str, start: Position, destinations: &assign::DestinationSkips) -> Reading {
        let reader = self.reader(shard, start, destinations);
        Box::new(move |token| Box::pin(reader.run(token)))
    }
}
