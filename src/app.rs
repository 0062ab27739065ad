//! The service assembled: source → fan-out → sinks → acknowledgement → checkpoints, around
//! discovery, metrics and shutdown.
//!
//! [`Service::run`] takes the shutdown signal as an argument, so tests run the whole service
//! in-process against emulators and stop it when they like.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::aws::KinesisClients;
use crate::aws::credentials::Identities;
use crate::checkpoint::FileCheckpointStore;
use crate::config::{CheckpointBackend, Settings};
use crate::discovery::Discovery;
use crate::fanout::Fanout;
use crate::health::Health;
use crate::lease::{LeaseError, LeaseManager, LeaseTable};
use crate::metrics::Metrics;
use crate::progress::{CheckpointError, CheckpointStore, Checkpointer, Progress, Snapshot};
use crate::shutdown::{Task, TaskGroup};
use crate::sink::supervisor::{PlaceClients, Supervisor};
use crate::source::assign::{Assignment, Leases, Listing, Plan, ShardList};
use crate::source::catchup::CatchUps;
use crate::source::{self, Source, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr} for metrics and health (metrics.listen)")]
    Admin {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
}

/// One service instance: the replication pipeline and its admin port.
pub struct Service {
    pipeline: Pipeline,
    /// Bound at construction, so that a port conflict fails fast and tests learn the port.
    admin: std::net::TcpListener,
}

/// Everything replication needs; shared state is also read by the admin port.
struct Pipeline {
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
    health: Arc<Health>,
    sdk: aws_config::SdkConfig,
}

impl Service {
    /// Builds the service from validated settings and an SDK configuration (the default chain in
    /// the binary, static test credentials in tests).
    pub fn new(settings: Settings, sdk: &aws_config::SdkConfig) -> Result<Self, RunError> {
        let addr = settings.metrics.listen;
        let admin = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| RunError::Admin { addr, source })?;
        let pipeline = Pipeline {
            settings: Arc::new(settings),
            metrics: Arc::new(Metrics::new()),
            progress: Arc::new(Progress::default()),
            health: Arc::new(Health::default()),
            sdk: sdk.clone(),
        };
        Ok(Service { pipeline, admin })
    }

    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.pipeline.health)
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        self.admin.local_addr().unwrap_or(self.pipeline.settings.metrics.listen)
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.pipeline.metrics)
    }

    pub fn progress(&self) -> Arc<Progress> {
        Arc::clone(&self.pipeline.progress)
    }

    /// Runs until `shutdown` fires (then drains within the grace period and exits cleanly) or a
    /// fatal error (source deleted, checkpoint store broken).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let addr = self.admin_addr();
        let listener =
            tokio::net::TcpListener::from_std(self.admin).map_err(|source| RunError::Admin { addr, source })?;
        tracing::info!(%addr, "Serving /metrics, /healthz and /readyz.");
        let pipeline = self.pipeline;
        let (metrics, health, progress) =
            (Arc::clone(&pipeline.metrics), Arc::clone(&pipeline.health), Arc::clone(&pipeline.progress));
        let admin = Task::spawn("admin", move |stop| crate::admin::serve(listener, metrics, health, progress, stop));
        let outcome = pipeline.replicate(shutdown).await;
        // Last: the admin port answers until everything else has stopped.
        admin.stop().await;
        outcome
    }
}

impl Pipeline {
    async fn replicate(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let Pipeline { settings, metrics, progress, health, sdk } = self;
        // This worker's one id: the lease owner, and the STS session name of roles it assumes.
        let worker = match &settings.checkpoint.backend {
            CheckpointBackend::DynamoDb(lease) if lease.worker_id.is_some() => {
                lease.worker_id.clone().unwrap_or_default()
            }
            _ => crate::lease::default_worker_id().await,
        };
        let identities = Identities {
            sdk: sdk.clone(),
            sts_endpoint_url: settings.sts_endpoint_url.clone(),
            worker,
            metrics: Arc::clone(&metrics),
            health: Arc::clone(&health),
        };
        let timeout = settings.put_attempt_timeout();
        let source_aws = &settings.source.aws;
        let credentials = identities.provider(source_aws.role.as_ref(), source_aws.region.as_deref(), "source").await;
        let clients = KinesisClients::new(&sdk, source_aws, credentials, timeout);
        let stream = source::resolve_stream(&clients.control, &settings.source.stream_name).await?;
        tracing::info!(stream = %stream.name, open_shards = stream.open_shards, "Source stream found.");
        metrics.source_retention_seconds.set(stream.retention.as_secs() as i64);
        let consumer_arn =
            match source::ensure_consumer(&clients.control, &stream, &settings.source.consumer_name, &shutdown).await {
                Ok(arn) => arn,
                // Asked to stop before anything was read: nothing to flush.
                Err(SourceError::Cancelled) => return Ok(()),
                Err(err) => return Err(err.into()),
            };
        health.consumer_active();
        let backend = Backend::open(&settings, &identities, &clients, &stream, &metrics).await?;
        // With a lease table, a destination sends a shard's records only while this worker can
        // prove it holds the shard's lease (checked right before each PutRecords).
        if let Some(manager) = &backend.manager {
            progress.fence_with(Arc::clone(manager) as Arc<dyn crate::progress::LeaseProof>);
        }
        let checkpointer = Checkpointer::new(Arc::clone(&backend.store), Arc::clone(&metrics));
        let lease_loop = backend.manager.clone().map(|m| Task::spawn("leases", move |stop| m.run(stop)));

        let writers = TaskGroup::default();
        // Each place destinations live in (region, endpoint) has its own clients.
        let mut places = Vec::new();
        for aws in settings.destination_places() {
            let first = settings.destinations.iter().position(|g| g.aws == aws).unwrap_or_default();
            let group = format!("destinations[{first}]");
            let credentials = identities.provider(aws.role.as_ref(), aws.region.as_deref(), &group).await;
            places.push(KinesisClients::new(&sdk, &aws, credentials, timeout));
        }
        let (mut supervisor, destinations) = Supervisor::new(
            Arc::clone(&settings),
            clients.control.clone(),
            places.iter().map(PlaceClients::new).collect(),
            Arc::clone(&metrics),
            Arc::clone(&health),
            backend.share.clone(),
            writers.clone(),
        );
        let discovery = Discovery::new(Arc::clone(&settings), places.iter().map(|p| p.control.clone()).collect());
        supervisor.follow(&discovery).await;
        tracing::info!(destinations = ?supervisor.current(), "Destinations discovered.");
        let idle_monitor = crate::idle::IdleMonitor {
            settings: settings.idle.clone(),
            source_stream: settings.source.stream_name.clone(),
            health: Arc::clone(&health),
            progress: Arc::clone(&progress),
            metrics: Arc::clone(&metrics),
            destinations: destinations.clone(),
        };
        let idle = Task::spawn("idle", move |stop| idle_monitor.run(stop));
        // Destinations stop coming and going with the shutdown signal (none comes or goes during
        // the drain), or at teardown after a fatal error.
        let supervisor = Task::spawn("destinations", {
            let shutdown = shutdown.clone();
            move |stop| async move {
                tokio::select! {
                    _ = supervisor.run(discovery, shutdown) => {}
                    _ = stop.cancelled() => {}
                }
            }
        });
        let periodic = Task::spawn("checkpointer", {
            let (checkpointer, progress) = (checkpointer.clone(), Arc::clone(&progress));
            let interval = settings.checkpoint.interval;
            move |stop| checkpointer.run(progress, interval, stop)
        });

        let reading = shutdown.child_token();
        let memory = crate::memory::MemoryBudget::for_process(settings.memory_limit);
        metrics.memory_limit_bytes.set(settings.memory_limit as i64);
        metrics.memory_budget_bytes.set(i64::try_from(memory.limit()).unwrap_or(i64::MAX));
        let _ = metrics.memory.set(memory.clone());
        tracing::info!(
            limit_bytes = settings.memory_limit,
            buffers_bytes = memory.limit(),
            "Memory budget for everything buffered."
        );
        let catch_ups: Arc<dyn crate::fanout::CatchUpStarter> = Arc::new(CatchUps {
            client: clients.control.clone(),
            stream: settings.source.stream_name.clone(),
            progress: Arc::clone(&progress),
            metrics: Arc::clone(&metrics),
            stop: reading.clone(),
            memory: memory.clone(),
        });
        // When readers wait for memory, the destination the others left behind lets go of it.
        let relief = crate::fanout::Relief::new(
            destinations.clone(),
            Arc::clone(&progress),
            Arc::clone(&catch_ups),
            Arc::clone(&metrics),
        );
        memory.on_short(Arc::new(move |used| {
            relief.relieve(used);
        }));
        let source = Source {
            stream,
            consumer_arn,
            clients: clients.clone(),
            fanout: Fanout::new(destinations, Arc::clone(&progress))
                .with_catch_up(catch_ups)
                .with_memory(memory.clone()),
            progress: Arc::clone(&progress),
            metrics: Arc::clone(&metrics),
            health: Arc::clone(&health),
            checkpointer: checkpointer.clone(),
        };
        let listing = Listing {
            shards: ShardList::Kinesis(clients.control.clone()),
            stream: settings.source.stream_name.clone(),
            initial: settings.source.initial_position.clone(),
        };
        let outcome = match (backend.manager.clone(), backend.events) {
            (Some(manager), Some(events)) => {
                let leases = Leases::new(listing, manager, events, checkpointer.clone(), &health);
                source.run(leases, reading).await
            }
            _ => {
                let plan = Plan::new(listing, backend.stored, checkpointer.clone(), Arc::clone(&health));
                source.run(plan, reading).await
            }
        };
        if let Err(err) = &outcome {
            tracing::error!(error = %crate::aws::chain(err), "The source cannot be read any more; stopping.");
        }

        // Teardown, in order. Reading has stopped.
        // 1. Drain: destinations keep writing what was read until everything is acknowledged or
        //    the grace period runs out. Leases are renewed meanwhile, but none is taken.
        if let Some(manager) = &backend.manager {
            manager.drain();
        }
        drain(&progress, settings.shutdown.grace_period).await;
        // 2. Stop what writes and what watches.
        writers.stop().await;
        supervisor.stop().await;
        idle.stop().await;
        periodic.stop().await;
        // 3. The final checkpoint.
        let as_of = tokio::time::Instant::now();
        let last = progress.snapshot();
        let saved = checkpointer.save_snapshot(&last, as_of).await;
        // 4. Only now may the leases go: they were renewed through the drain. A shard whose
        //    records were still being sent when the grace period ran out keeps its lease until
        //    it expires: its next owner then waits out those requests.
        if let Some(lease_loop) = lease_loop {
            lease_loop.stop().await;
        }
        if let Some(manager) = &backend.manager {
            manager.release_all_except(&progress.unsettled()).await;
        }
        match (&outcome, saved) {
            (Ok(()), Err(err)) => return Err(err.into()),
            (_, Ok(())) => tracing::info!(shards = last.shards.len(), "Final checkpoint written."),
            (Err(_), Err(err)) => tracing::error!(error = %crate::aws::chain(&err), "Final checkpoint failed."),
        }
        outcome.map_err(RunError::from)
    }
}

/// Where progress lives, and for a lease table, which shards this worker reads.
struct Backend {
    store: Arc<dyn CheckpointStore>,
    manager: Option<Arc<LeaseManager>>,
    events: Option<mpsc::UnboundedReceiver<Assignment>>,
    /// File backend: what the file holds, for the single-worker plan. (With a lease table each
    /// lease brings its own checkpoint and destination positions.)
    stored: Snapshot,
    share: watch::Receiver<f64>,
    /// Keeps the share of a single worker (always 1) alive.
    _alone: Option<watch::Sender<f64>>,
}

impl Backend {
    async fn open(
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
