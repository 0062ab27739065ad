//! The service assembled: source → fan-out → sinks → acknowledgement → checkpoints, around
//! discovery, metrics and shutdown.
//!
//! [`Service::run`] takes the shutdown signal as an argument, so tests run the whole service
//! in-process against emulators and stop it when they like.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::aws::KinesisClients;
use crate::config::{CheckpointBackend, Settings};
use crate::discovery::Discovery;
use crate::fanout::Fanout;
use crate::metrics::Metrics;
use crate::progress::checkpoint::FileCheckpointStore;
use crate::progress::{CheckpointError, CheckpointStore, Checkpoints, Progress};
use crate::source::{self, Source, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// One service instance: configuration, AWS clients and metrics.
pub struct Service {
    settings: Arc<Settings>,
    clients: KinesisClients,
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
}

impl Service {
    /// Builds the service from validated settings and an SDK configuration (the default chain in
    /// the binary, static test credentials in tests).
    pub fn new(settings: Settings, sdk: &aws_config::SdkConfig) -> Self {
        let clients = KinesisClients::new(sdk, &settings.aws);
        Service {
            settings: Arc::new(settings),
            clients,
            metrics: Arc::new(Metrics::new()),
            progress: Arc::new(Progress::default()),
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    pub fn progress(&self) -> Arc<Progress> {
        Arc::clone(&self.progress)
    }

    fn checkpoint_store(&self) -> Arc<dyn CheckpointStore> {
        match &self.settings.checkpoint.backend {
            CheckpointBackend::File { path } => {
                Arc::new(FileCheckpointStore::new(path.clone(), self.settings.source.stream_name.clone()))
            }
        }
    }

    /// Runs until `shutdown` fires (then drains within the grace period and exits cleanly) or a
    /// fatal error (source deleted, checkpoint store broken).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let settings = Arc::clone(&self.settings);
        let stream = source::resolve_stream(&self.clients.control, &settings.source.stream_name).await?;
        tracing::info!(stream = %stream.name, open_shards = stream.open_shards, "Source stream found.");
        let consumer_arn =
            source::ensure_consumer(&self.clients.control, &stream, &settings.source.consumer_name, &shutdown).await?;
        let store = self.checkpoint_store();
        let checkpoints = store.load().await?;
        tracing::info!(shards = checkpoints.len(), "Checkpoints loaded.");

        let writers_stop = CancellationToken::new();
        let writers = TaskTracker::new();
        let (mut discovery, destinations) = Discovery::new(
            Arc::clone(&settings),
            &self.clients,
            Arc::clone(&self.metrics),
            writers_stop.clone(),
            writers.clone(),
        );
        discovery.refresh_logged().await;
        tracing::info!(destinations = ?discovery.current(), "Destinations discovered.");
        let discovery_task = tokio::spawn(discovery.run(shutdown.clone()));

        let checkpointer_stop = CancellationToken::new();
        let checkpointer = tokio::spawn(checkpoint_loop(
            Arc::clone(&store),
            Arc::clone(&self.progress),
            Arc::clone(&self.metrics),
            settings.checkpoint.interval,
            checkpointer_stop.clone(),
        ));

        let reading = shutdown.child_token();
        let source = Source {
            stream,
            consumer_arn,
            initial_position: settings.source.initial_position,
            clients: self.clients.clone(),
            fanout: Fanout::new(destinations, Arc::clone(&self.progress)),
            progress: Arc::clone(&self.progress),
            metrics: Arc::clone(&self.metrics),
            store: Arc::clone(&store),
            checkpoints,
        };
        let outcome = source.run(reading).await;
        if let Err(err) = &outcome {
            tracing::error!(error = %crate::aws::chain(err), "The source cannot be read any more; stopping.");
        }

        // Drain: destinations keep writing what was read until everything is acknowledged or
        // the grace period runs out.
        let grace = settings.shutdown.grace_period;
        let outstanding = self.progress.outstanding();
        tracing::info!(
            outstanding_chunks = outstanding,
            grace_ms = grace.as_millis() as u64,
            "Reading stopped; flushing records in flight."
        );
        if tokio::time::timeout(grace, self.progress.drained()).await.is_err() {
            tracing::warn!(
                outstanding_chunks = self.progress.outstanding(),
                "Grace period ran out before every destination accepted every record; those records will be read again after restart."
            );
        }
        writers_stop.cancel();
        writers.close();
        writers.wait().await;
        discovery_task.abort();
        checkpointer_stop.cancel();
        let _ = checkpointer.await;

        let last = self.progress.checkpoints();
        let saved = save(&*store, &last, &self.metrics).await;
        match (&outcome, saved) {
            (Ok(()), Err(err)) => return Err(err.into()),
            (_, Ok(())) => tracing::info!(shards = last.len(), "Final checkpoint written."),
            (Err(_), Err(err)) => tracing::error!(error = %crate::aws::chain(&err), "Final checkpoint failed."),
        }
        outcome.map_err(RunError::from)
    }
}

async fn save(
    store: &dyn CheckpointStore,
    checkpoints: &Checkpoints,
    metrics: &Metrics,
) -> Result<(), CheckpointError> {
    match store.save(checkpoints).await {
        Ok(()) => {
            metrics.checkpoint_writes.with_label_values(&["ok"]).inc();
            Ok(())
        }
        Err(err) => {
            metrics.checkpoint_writes.with_label_values(&["error"]).inc();
            Err(err)
        }
    }
}

/// Writes what every destination has accepted, every `interval`, and keeps the lag gauge fresh.
async fn checkpoint_loop(
    store: Arc<dyn CheckpointStore>,
    progress: Arc<Progress>,
    metrics: Arc<Metrics>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut last_written = Checkpoints::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        for shard in progress.all() {
            let age = shard
                .oldest_unacknowledged_arrival()
                .and_then(|t| t.elapsed().ok())
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            metrics.oldest_unacknowledged_age_seconds.with_label_values(&[&*shard.shard_id]).set(age);
        }
        let current = progress.checkpoints();
        if current == last_written {
            continue;
        }
        match save(&*store, &current, &metrics).await {
            Ok(()) => last_written = current,
            Err(err) => tracing::error!(error = %crate::aws::chain(&err), "Checkpoint write failed; will try again."),
        }
    }
}
