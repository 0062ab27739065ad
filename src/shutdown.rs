//! Shutdown: one signal from outside, and handles for the service's own tasks, so teardown is an
//! ordered list of `stop().await` (see `app`): stop reading, drain, stop the writers and watchers,
//! write the final checkpoint, release the leases, stop the admin port.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A wait cut short by the stop signal: what was not done stays undone, and unacknowledged, so
/// it is read again after a restart. The one way every part says "the service is stopping"
/// (outcomes that can also end otherwise carry it as their `Stopped` variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the service is stopping")]
pub struct Stopped;

/// A spawned task with a stop signal of its own.
pub struct Task {
    name: &'static str,
    /// Asks the task to stop at its next safe point.
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl Task {
    /// Spawns what `start` builds from the task's stop signal.
    pub fn spawn<F>(name: &'static str, start: impl FnOnce(CancellationToken) -> F) -> Task
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(start(stop.clone()));
        Task { name, stop, handle }
    }

    /// Asks the task to stop and waits until it has.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(err) = self.handle.await
            && err.is_panic()
        {
            tracing::error!(task = self.name, error = %err, "A task panicked.");
        }
    }
}

/// Tasks started over time (one per destination) that stop together.
#[derive(Clone, Default)]
pub struct TaskGroup {
    /// Stops every task of the group at once.
    stop: CancellationToken,
    /// Tracks them, so that stopping waits for the last one.
    tracker: TaskTracker,
}

impl TaskGroup {
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(task);
    }

    /// The group's stop signal, for tasks to watch.
    pub fn stop_signal(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stops every task of the group and waits for all of them.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
