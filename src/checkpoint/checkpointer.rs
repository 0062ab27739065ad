//! Where progress is written: every checkpoint the service stores goes through [`Checkpointer`],
//! the periodic one, a reading's starting point, a shard's end and the final one at shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{CheckpointError, CheckpointStore, Checkpoints, Snapshot};
use crate::metrics::Metrics;
use crate::progress::Progress;

/// The checkpoint store, with every write counted in `checkpoint_writes_total`.
#[derive(Clone)]
pub struct Checkpointer {
    store: Arc<dyn CheckpointStore>,
    metrics: Arc<Metrics>,
}

impl Checkpointer {
    pub fn new(store: Arc<dyn CheckpointStore>, metrics: Arc<Metrics>) -> Self {
        Checkpointer { store, metrics }
    }

    /// Stores positions taken at `as_of` (see [`CheckpointStore::save`]).
    pub async fn save(&self, checkpoints: &Checkpoints, as_of: Instant) -> Result<(), CheckpointError> {
        let saved = self.store.save(checkpoints, as_of).await;
        self.count(&saved);
        saved
    }

    /// Stores shard checkpoints and every destination's own position.
    pub async fn save_snapshot(&self, snapshot: &Snapshot, as_of: Instant) -> Result<(), CheckpointError> {
        let saved = self.store.save_snapshot(snapshot, as_of).await;
        self.count(&saved);
        saved
    }

    /// Records that `shard` was read to its end (see [`CheckpointStore::finish`]).
    pub async fn finish(&self, shard: &str, children: &[String]) -> Result<(), CheckpointError> {
        let saved = self.store.finish(shard, children).await;
        self.count(&saved);
        saved
    }

    fn count(&self, saved: &Result<(), CheckpointError>) {
        let outcome = if saved.is_ok() { "ok" } else { "error" };
        self.metrics.checkpoint_writes.with_label_values(&[outcome]).inc();
    }

    /// Writes what every destination has accepted, every `interval`, until `stop`.
    pub async fn run(self, progress: Arc<Progress>, interval: Duration, stop: CancellationToken) {
        let mut last_written = Snapshot::default();
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let as_of = Instant::now();
            let current = progress.snapshot();
            if current == last_written {
                continue;
            }
            match self.save_snapshot(&current, as_of).await {
                Ok(()) => last_written = current,
                Err(err) => {
                    tracing::error!(error = %crate::aws::chain(&err), "Checkpoint write failed; will try again.")
                }
            }
        }
    }
}
