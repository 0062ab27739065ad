//! Reloading the configuration while the service runs: a new file is checked whole, compared
//! with the running one, and its destination groups handed to the destinations supervisor
//! (`sink::supervisor::reload`), which applies them between discovery rounds.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::config::reload::{groups_changed, restart_keys};
use crate::config::{ConfigError, Settings};
use crate::metrics::Metrics;
use crate::sink::supervisor::{Reload, ReloadReport};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the new configuration is refused and the running one stays")]
    Invalid(#[source] ConfigError),
    #[error(
        "the new configuration changes {} (only a restart changes these); it is refused and the running one stays",
        keys.join(", ")
    )]
    RestartRequired { keys: Vec<&'static str> },
    #[error("the service is not running (stopping, or stopped); nothing changed")]
    NotRunning,
}

impl ReloadError {
    /// The `result` label of `kinesis_fanout_config_reloads_total`.
    fn result(&self) -> &'static str {
        match self {
            ReloadError::Invalid(_) => "invalid",
            ReloadError::RestartRequired { .. } => "restart_required",
            ReloadError::NotRunning => "failed",
        }
    }
}

/// Hands new configurations to a running service. Cheap to clone; reloads are applied one at a
/// time, in the order they were asked for.
#[derive(Clone)]
pub struct Reloader {
    running: Arc<Mutex<Arc<Settings>>>,
    apply: mpsc::Sender<Reload>,
    metrics: Arc<Metrics>,
}

impl Reloader {
    pub(super) fn new(running: Arc<Settings>, metrics: Arc<Metrics>) -> (Reloader, mpsc::Receiver<Reload>) {
        let (apply, reloads) = mpsc::channel(1);
        (Reloader { running: Arc::new(Mutex::new(running)), apply, metrics }, reloads)
    }

    /// Applies `new` (a file just loaded, or why it could not be) if only destination groups
    /// changed, and returns what changed (`None`: nothing did). A file with any problem, or
    /// one that changes a key only a restart changes, is refused whole and changes nothing.
    pub async fn reload(&self, new: Result<Settings, ConfigError>) -> Result<Option<ReloadReport>, ReloadError> {
        let outcome = self.apply(new).await;
        let result = match &outcome {
            Ok(Some(_)) => "applied",
            Ok(None) => "unchanged",
            Err(err) => err.result(),
        };
        self.metrics.config_reloads.with_label_values(&[result]).inc();
        outcome
    }

    async fn apply(&self, new: Result<Settings, ConfigError>) -> Result<Option<ReloadReport>, ReloadError> {
        let new = new.map_err(ReloadError::Invalid)?;
        let mut running = self.running.lock().await;
        let keys = restart_keys(&running, &new);
        if !keys.is_empty() {
            return Err(ReloadError::RestartRequired { keys });
        }
        if !groups_changed(&running, &new) {
            return Ok(None);
        }
        let new = Arc::new(new);
        let (done, report) = oneshot::channel();
        let reload = Reload { settings: Arc::clone(&new), done };
        self.apply.send(reload).await.map_err(|_| ReloadError::NotRunning)?;
        // Handed over: the supervisor applies it even if this caller stops waiting.
        *running = new;
        let report = report.await.map_err(|_| ReloadError::NotRunning)?;
        Ok(Some(report))
    }
}
