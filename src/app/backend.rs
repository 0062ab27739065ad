//! Where progress lives, chosen by `[checkpoint] backend`: a file for one worker, or the lease
//! table shared by a fleet (whose leases also say which shards this worker reads). The stores
//! themselves are in [`crate::checkpoint`] and [`crate::lease`]; the choice is made here, where
//! both are wired, so that neither room imports the other's.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::RunError;
use crate::aws::KinesisClients;
use crate::aws::credentials::Identities;
use crate::checkpoint::{CheckpointStore, FileCheckpointStore, Snapshot};
use crate::config::{CheckpointBackend, Settings};
use crate::lease::{Assignment, LeaseManager, LeaseTable};
use crate::metrics::Metrics;
use crate::source;

/// Where progress lives, and for a lease table, which shards this worker reads.
pub(super) struct Backend {
    pub(super) store: Arc<dyn CheckpointStore>,
    pub(super) manager: Option<Arc<LeaseManager>>,
    pub(super) events: Option<mpsc::UnboundedReceiver<Assignment>>,
    /// File backend: what the file holds, for the single-worker plan. (With a lease table each
    /// lease brings its own checkpoint and destination positions.)
    pub(super) stored: Snapshot,
    pub(super) share: watch::Receiver<f64>,
    /// Keeps the share of a single worker (always 1) alive.
    _alone: Option<watch::Sender<f64>>,
}

impl Backend {
    pub(super) async fn open(
        settings: &Settings,
        identities: &Identities,
        clients: &KinesisClients,
        stream: &source::SourceStream,
        metrics: &Metrics,
    ) -> Result<Backend, RunError> {
        match &settings.checkpoint.backend {
            CheckpointBackend::File { path } => {
                let (alone, share) = watch::channel(1.0);
                let store = FileCheckpointStore::new(path.clone(), settings.source.stream_name.clone());
                let stored = store.load_snapshot().await?;
                tracing::info!(shards = stored.shards.len(), "Checkpoints loaded.");
                Ok(Backend { store: Arc::new(store), manager: None, events: None, stored, share, _alone: Some(alone) })
            }
            CheckpointBackend::DynamoDb(lease) => {
                // The lease table is reached as the source is, unless [checkpoint] says otherwise.
                let aws = lease.aws(&settings.source.aws);
                let credentials = identities.provider(aws.role.as_ref(), aws.region.as_deref(), "checkpoint").await;
                let client = crate::aws::dynamodb_client(&identities.sdk, &aws, credentials, lease);
                let table = LeaseTable::new(client, lease.table_name.clone())
                    .count_unreadable(metrics.lease_items_unreadable.clone());
                table.ensure(lease.create_table).await?;
                // The worker id was settled once (`replicate`): the lease owner and the STS
                // session name are the same.
                let me = identities.worker.clone();
                tracing::info!(worker = %me, table = %lease.table_name, failover_ms = lease.failover_time.as_millis() as u64, "Sharing shards through the lease table.");
                let (manager, events, share) = LeaseManager::new(table, me, lease.failover_time);
                let shards = source::list_shards(&clients.control, &stream.name).await?;
                manager.sync(&shards, &settings.source.initial_position).await?;
                Ok(Backend {
                    store: Arc::clone(&manager) as Arc<dyn CheckpointStore>,
                    manager: Some(manager),
                    events: Some(events),
                    stored: Snapshot::default(),
                    share,
                    _alone: None,
                })
            }
        }
    }
}
