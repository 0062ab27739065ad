//! The read side: the source stream's shards, read through Enhanced Fan-Out.
//!
//! [`run`] is the coordinator: it lists the shards, starts a [`reader::ShardReader`] for each shard
//! that may be read now (see [`shards::plan`]), records `SHARD_END` durably when a shard is done,
//! and then starts its children.

pub mod consumer;
pub mod reader;
pub mod shards;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::fanout::Fanout;
use crate::lease::{LeaseEvent, LeaseManager};
use crate::metrics::Metrics;
use crate::position::Position;
use crate::progress::{CheckpointError, CheckpointStore, Checkpoints, Progress};
pub use consumer::{SourceStream, ensure_consumer, resolve_stream};
use reader::{ReaderExit, ShardReader};
use shards::ShardInfo;

/// Where a leased shard starts reading; `None` for a shard already read to its end. The KCL's
/// bare `AT_TIMESTAMP` sentinel (read as the epoch) takes the configured time.
fn starting_point(position: &Position, initial: &Position) -> Option<Position> {
    match position {
        Position::ShardEnd => None,
        Position::AtTimestamp(at) if *at == std::time::UNIX_EPOCH => Some(match initial {
            Position::AtTimestamp(_) => initial.clone(),
            _ => Position::TrimHorizon,
        }),
        other => Some(other.clone()),
    }
}

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
    #[error("stopped before the source was ready")]
    Cancelled,
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
    pub initial_position: Position,
    pub clients: crate::aws::KinesisClients,
    pub fanout: Fanout,
    pub progress: Arc<Progress>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<crate::health::Health>,
    pub store: Arc<dyn CheckpointStore>,
    pub checkpoints: Checkpoints,
    /// With a lease table: which shards this worker reads comes from here, not from the plan.
    pub leases: Option<(Arc<LeaseManager>, mpsc::UnboundedReceiver<LeaseEvent>)>,
}

/// How often the shard list is read again even when no shard ended (a fallback for missed
/// ChildShards announcements).
const RELIST_INTERVAL: Duration = Duration::from_secs(30);

impl Source {
    /// Reads the source until `stop`, or until a fatal error.
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), SourceError> {
        match self.leases.take() {
            Some((manager, events)) => self.run_leased(manager, events, stop).await,
            None => self.run_all(stop).await,
        }
    }

    fn reader(&self, shard_id: &str, start: Position, progress: Arc<crate::progress::ShardProgress>) -> ShardReader {
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
            store: Arc::clone(&self.store),
            started_at: tokio::time::Instant::now(),
        }
    }

    /// Creates leases for shards that have none (new children included).
    async fn sync_leases(&self, manager: &LeaseManager) -> Option<Vec<ShardInfo>> {
        let shards = match list_shards(&self.clients.control, &self.stream.name).await {
            Ok(shards) => shards,
            Err(err) => {
                tracing::warn!(error = %crate::aws::chain(&err), "ListShards failed; trying again later.");
                return None;
            }
        };
        if let Err(err) = manager.sync(&shards, &self.initial_position).await {
            tracing::warn!(error = %err, "Creating leases failed; trying again later.");
        }
        Some(shards)
    }

    /// Reads the shards this worker holds leases for, as leases come and go.
    async fn run_leased(
        self,
        manager: Arc<LeaseManager>,
        mut events: mpsc::UnboundedReceiver<LeaseEvent>,
        stop: CancellationToken,
    ) -> Result<(), SourceError> {
        let readers_stop = stop.child_token();
        // Each reading of a shard has a generation, so a late exit of an earlier reading cannot
        // cancel a newer one.
        let mut readers: JoinSet<(String, u64, ReaderExit)> = JoinSet::new();
        let mut running: HashMap<String, (u64, CancellationToken)> = HashMap::new();
        let mut generation = 0u64;
        self.health.shards_assigned();
        let result = loop {
            let joined = tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                _ = tokio::time::sleep(RELIST_INTERVAL) => {
                    self.sync_leases(&manager).await;
                    continue;
                }
                Some(event) = events.recv() => {
                    match event {
                        LeaseEvent::Acquired { shard, position, delay } => {
                            let Some(start) = starting_point(&position, &self.initial_position) else { continue };
                            if let Some((_, old)) = running.remove(&shard) {
                                old.cancel();
                            }
                            generation += 1;
                            let token = readers_stop.child_token();
                            running.insert(shard.clone(), (generation, token.clone()));
                            let reader = self.reader(&shard, start, self.progress.restart(&shard));
                            let current = generation;
                            readers.spawn(async move {
                                if !delay.is_zero() {
                                    tokio::select! {
                                        _ = token.cancelled() => return (shard, current, ReaderExit::Stopped),
                                        _ = tokio::time::sleep(delay) => {}
                                    }
                                }
                                (shard, current, reader.run(token).await)
                            });
                        }
                        LeaseEvent::Lost { shard } => {
                            if let Some((_, token)) = running.remove(&shard) {
                                token.cancel();
                            }
                            // What destinations still hold of it is the new owner's to send.
                            self.progress.revoke(&shard);
                        }
                    }
                    continue;
                }
                Some(joined) = readers.join_next(), if !readers.is_empty() => joined,
            };
            let (shard, ended_generation, exit) = match joined {
                Ok(done) => done,
                Err(join_error) => break Err(SourceError::Reader(join_error.to_string())),
            };
            if running.get(&shard).is_some_and(|(g, _)| *g == ended_generation) {
                running.remove(&shard);
            }
            match exit {
                ReaderExit::Ended => {
                    // One listing serves both: leases for the children, and their names on the parent.
                    let children: Vec<String> = match self.sync_leases(&manager).await {
                        Some(shards) => {
                            shards.iter().filter(|s| s.parents.contains(&shard)).map(|s| s.id.clone()).collect()
                        }
                        None => Vec::new(),
                    };
                    match manager.checkpoint(&shard, &Position::ShardEnd, &children).await {
                        Ok(()) => {
                            self.metrics.checkpoint_writes.with_label_values(&["ok"]).inc();
                            tracing::info!(shard = %shard, ?children, "Shard fully copied; its children may start.");
                        }
                        Err(err) => {
                            self.metrics.checkpoint_writes.with_label_values(&["error"]).inc();
                            tracing::warn!(shard = %shard, error = %err, "Could not record the end of the shard; whoever holds it next reads its tail again.");
                        }
                    }
                }
                ReaderExit::Stopped => {}
                ReaderExit::Fatal(err) => break Err(err),
            }
        };
        readers_stop.cancel();
        while readers.join_next().await.is_some() {}
        result
    }

    /// Reads every shard (single worker), in the order [`shards::plan`] allows.
    async fn run_all(mut self, stop: CancellationToken) -> Result<(), SourceError> {
        let readers_stop = stop.child_token();
        let mut readers: JoinSet<(String, ReaderExit)> = JoinSet::new();
        // Every shard started in this run, ended or not: none starts twice, and a child waits for
        // a parent read here to end, whatever the initial position says about closed shards.
        let mut started: HashSet<String> = HashSet::new();
        let mut announced_done = false;
        let mut list_backoff =
            crate::sink::retry::Backoff::try_new(Duration::from_millis(500), RELIST_INTERVAL).expect("valid bounds");
        let result = loop {
            let relist_after = match list_shards(&self.clients.control, &self.stream.name).await {
                Ok(shards) => {
                    list_backoff.reset();
                    for (shard_id, start) in shards::plan(&shards, &self.checkpoints, &self.initial_position, &started)
                    {
                        started.insert(shard_id.clone());
                        let reader = self.reader(&shard_id, start, self.progress.shard(&shard_id));
                        let token = readers_stop.clone();
                        readers.spawn(async move { (shard_id, reader.run(token).await) });
                    }
                    self.health.shards_assigned();
                    if readers.is_empty() && shards::all_done(&shards, &self.checkpoints) && !announced_done {
                        tracing::warn!(stream = %self.stream.name, "Every shard of the source is closed and fully copied; nothing more to read.");
                        announced_done = true;
                    }
                    RELIST_INTERVAL
                }
                Err(err) => {
                    tracing::warn!(error = %crate::aws::chain(&err), "ListShards failed; trying again shortly.");
                    list_backoff.next_delay(&mut rand::rng())
                }
            };
            let joined = tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                _ = tokio::time::sleep(relist_after) => continue,
                Some(joined) = readers.join_next(), if !readers.is_empty() => joined,
            };
            match joined {
                Ok((shard_id, ReaderExit::Ended)) => {
                    // Durable before any child starts: a restart must not read a child before its parent.
                    let mut end = Checkpoints::new();
                    end.insert(shard_id.clone(), Position::ShardEnd);
                    if let Err(source) = self.store.save(&end, tokio::time::Instant::now()).await {
                        break Err(SourceError::Checkpoint { shard: shard_id, source });
                    }
                    self.metrics.checkpoint_writes.with_label_values(&["ok"]).inc();
                    self.checkpoints.insert(shard_id.clone(), Position::ShardEnd);
                    tracing::info!(shard = %shard_id, "Shard fully copied; starting its children.");
                }
                Ok((_, ReaderExit::Stopped)) => {}
                Ok((_, ReaderExit::Fatal(err))) => break Err(err),
                Err(join_error) => break Err(SourceError::Reader(join_error.to_string())),
            }
        };
        readers_stop.cancel();
        while readers.join_next().await.is_some() {}
        result
    }
}
