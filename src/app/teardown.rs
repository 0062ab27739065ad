//! Teardown, in order, once reading has stopped: drain, the catch-ups, the writers and watchers,
//! the final checkpoint, the leases.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Pipeline, RunError};
use crate::checkpoint::Checkpointer;
use crate::fanout::Fanout;
use crate::lease::LeaseManager;
use crate::progress::Progress;
use crate::shutdown::{Task, TaskGroup};
use crate::source::SourceError;
use crate::source::catchup::CatchUps;

/// What runs beside the reading, in the order teardown stops it.
pub(super) struct Running {
    /// Stops the shard readers and the catch-ups.
    pub(super) reading: CancellationToken,
    /// Handed to the source once.
    pub(super) fanout: Option<Fanout>,
    pub(super) checkpointer: Checkpointer,
    pub(super) catch_ups: CatchUps,
    pub(super) lease_loop: Option<Task>,
    pub(super) manager: Option<Arc<LeaseManager>>,
    pub(super) writers: TaskGroup,
    pub(super) supervisor: Task,
    pub(super) idle: Task,
    pub(super) periodic: Task,
}

impl Running {
    /// Teardown, in order, once reading has stopped.
    pub(super) async fn teardown(self, pipeline: &Pipeline, outcome: Result<(), SourceError>) -> Result<(), RunError> {
        let Running {
            reading, checkpointer, catch_ups, lease_loop, manager, writers, supervisor, idle, periodic, ..
        } = self;
        // 1. Drain: destinations keep writing what was read until everything is acknowledged or
        //    the grace period runs out. Leases are renewed meanwhile, but none is taken.
        if let Some(manager) = &manager {
            manager.drain();
        }
        drain(&pipeline.progress, pipeline.settings.shutdown.grace_period).await;
        // 2. The catch-ups stop with the reading (after a fatal error, they went on through the
        //    drain): what they have not handed on stays owed in the checkpoint.
        reading.cancel();
        catch_ups.stop().await;
        // 3. Stop what writes and what watches.
        writers.stop().await;
        supervisor.stop().await;
        idle.stop().await;
        periodic.stop().await;
        // 4. The final checkpoint.
        let as_of = tokio::time::Instant::now();
        let last = pipeline.progress.snapshot();
        let saved = checkpointer.save_snapshot(&last, as_of).await;
        // 5. Only now may the leases go: they were renewed through the drain. A shard whose
        //    records were still being sent when the grace period ran out keeps its lease until
        //    it expires: its next owner then waits out those requests.
        if let Some(lease_loop) = lease_loop {
            lease_loop.stop().await;
        }
        if let Some(manager) = &manager {
            manager.release_all_except(&pipeline.progress.unsettled()).await;
        }
        match (&outcome, saved) {
            (Ok(()), Err(err)) => return Err(err.into()),
            (_, Ok(())) => tracing::info!(shards = last.shards.len(), "Final checkpoint written."),
            (Err(_), Err(err)) => tracing::error!(error = %crate::aws::chain(&err), "Final checkpoint failed."),
        }
        outcome.map_err(RunError::from)
    }
}

/// Waits until every destination accepted everything read, or the grace period ran out.
async fn drain(progress: &Progress, grace: Duration) {
    tracing::info!(
        outstanding_chunks = progress.outstanding(),
        grace_ms = grace.as_millis() as u64,
        "Reading stopped; flushing records in flight."
    );
    if tokio::time::timeout(grace, progress.drained()).await.is_err() {
        tracing::warn!(
            outstanding_chunks = progress.outstanding(),
            "Grace period ran out before every destination accepted every record; those records will be read again after restart."
        );
    }
}
