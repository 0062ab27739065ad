//! The service assembled: source → fan-out → sinks → acknowledgement → checkpoints, around
//! discovery, metrics and shutdown.
//!
//! [`Service::run`] takes the shutdown signal as an argument, so tests run the whole service
//! in-process against emulators and stop it when they like.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod backend;
mod reload;
mod teardown;

pub use reload::{ReloadError, Reloader};

use crate::aws::KinesisClients;
use crate::aws::credentials::Identities;
use crate::checkpoint::{CheckpointError, Checkpointer};
use crate::config::{CheckpointBackend, Settings};
use crate::discovery::Discovery;
use crate::fanout::Fanout;
use crate::health::Health;
use crate::lease::LeaseError;
use crate::metrics::Metrics;
use crate::progress::Progress;
use crate::shutdown::{Stopped, Task, TaskGroup};
use crate::sink::supervisor::{MakePlace, PlaceClients, Supervisor};
use crate::source::assign::{Leases, Listing, Plan, ShardList};
use crate::source::catchup::CatchUps;
use crate::source::{self, Source, SourceError};
use backend::Backend;
use teardown::Running;

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
    reloader: Reloader,
}

/// Everything replication needs; shared state is also read by the admin port.
struct Pipeline {
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
    health: Arc<Health>,
    sdk: aws_config::SdkConfig,
    /// Reloaded configurations, for the destinations supervisor.
    reloads: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<crate::sink::supervisor::Reload>>>,
}

impl Service {
    /// Builds the service from validated settings and an SDK configuration (the default chain in
    /// the binary, static test credentials in tests).
    pub fn new(settings: Settings, sdk: &aws_config::SdkConfig) -> Result<Self, RunError> {
        let addr = settings.metrics.listen;
        let admin = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| RunError::Admin { addr, source })?;
        let settings = Arc::new(settings);
        let metrics = Arc::new(Metrics::new());
        let (reloader, reloads) = Reloader::new(Arc::clone(&settings), Arc::clone(&metrics));
        let pipeline = Pipeline {
            settings,
            metrics,
            progress: Arc::new(Progress::default()),
            health: Arc::new(Health::default()),
            sdk: sdk.clone(),
            reloads: std::sync::Mutex::new(Some(reloads)),
        };
        Ok(Service { pipeline, admin, reloader })
    }

    /// Hands new configurations to this service once it runs (SIGHUP in the binary).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
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
    /// Reads the source until `shutdown` or a fatal error, then tears down in order.
    async fn replicate(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let identities = self.identities().await;
        let source_aws = &self.settings.source.aws;
        let credentials = identities.provider(source_aws.role.as_ref(), source_aws.region.as_deref(), "source").await;
        let clients = KinesisClients::new(&self.sdk, source_aws, credentials, self.settings.put_attempt_timeout());
        let stream = source::resolve_stream(&clients.control, &self.settings.source.stream_name).await?;
        tracing::info!(stream = %stream.name, open_shards = stream.open_shards, max_record_bytes = stream.limits.max_record_bytes, "Source stream found.");
        self.metrics.source_retention_seconds.set(stream.retention.as_secs() as i64);
        let consumer_arn =
            match source::source_consumer(&clients.control, &stream, &self.settings.source, &shutdown).await {
                Ok(arn) => arn,
                // Asked to stop before anything was read: nothing to flush.
                Err(SourceError::Stopped(Stopped)) => return Ok(()),
                Err(err) => return Err(err.into()),
            };
        self.health.consumer_active();
        let backend = Backend::open(&self.settings, &identities, &clients, &stream, &self.metrics).await?;
        let mut running = self.start(&identities, &clients, &backend, &stream, &shutdown).await;
        let source = Source {
            stream,
            consumer_arn,
            clients: clients.clone(),
            fanout: running.fanout.take().expect("taken once"),
            progress: Arc::clone(&self.progress),
            metrics: Arc::clone(&self.metrics),
            health: Arc::clone(&self.health),
            checkpointer: running.checkpointer.clone(),
        };
        let outcome = self.read(source, backend, &clients, &running).await;
        if let Err(err) = &outcome {
            tracing::error!(error = %crate::aws::chain(err), "The source cannot be read any more; stopping.");
        }
        running.teardown(&self, outcome).await
    }

    /// This worker's one id: the lease owner, and the STS session name of roles it assumes.
    async fn identities(&self) -> Identities {
        let worker = match &self.settings.checkpoint.backend {
            CheckpointBackend::DynamoDb(lease) if lease.worker_id.is_some() => {
                lease.worker_id.clone().unwrap_or_default()
            }
            _ => crate::lease::default_worker_id().await,
        };
        Identities {
            sdk: self.sdk.clone(),
            sts_endpoint_url: self.settings.sts_endpoint_url.clone(),
            worker,
            metrics: Arc::clone(&self.metrics),
            health: Arc::clone(&self.health),
        }
    }

    /// Starts everything around the reading: the lease loop and the fence, the destinations and
    /// their writers, the watchers, the memory budget and its relief, the catch-ups.
    async fn start(
        &self,
        identities: &Identities,
        clients: &KinesisClients,
        backend: &Backend,
        source: &source::SourceStream,
        shutdown: &CancellationToken,
    ) -> Running {
        let Pipeline { settings, metrics, progress, health, .. } = self;
        // With a lease table, a destination sends a shard's records only while this worker can
        // prove it holds the shard's lease (checked right before each PutRecords).
        if let Some(manager) = &backend.manager {
            progress.fence_with(Arc::clone(manager) as Arc<dyn crate::progress::LeaseProof>);
        }
        let checkpointer = Checkpointer::new(Arc::clone(&backend.store), Arc::clone(metrics));
        let lease_loop = backend.manager.clone().map(|m| Task::spawn("leases", move |stop| m.run(stop)));

        let writers = TaskGroup::default();
        let (supervisor, destinations) =
            self.destinations(identities, clients, &source.arn, backend.share.clone(), &writers, shutdown).await;
        let idle_monitor = crate::idle::IdleMonitor {
            settings: settings.idle.clone(),
            source_stream: settings.source.stream_name.clone(),
            health: Arc::clone(health),
            progress: Arc::clone(progress),
            metrics: Arc::clone(metrics),
            destinations: destinations.clone(),
        };
        let idle = Task::spawn("idle", move |stop| idle_monitor.run(stop));
        let periodic = Task::spawn("checkpointer", {
            let (checkpointer, progress) = (checkpointer.clone(), Arc::clone(progress));
            let interval = settings.checkpoint.interval;
            move |stop| checkpointer.run(progress, interval, stop)
        });

        let reading = shutdown.child_token();
        let memory = self.memory_budget(source.limits);
        let catch_ups = CatchUps::new(
            clients.control.clone(),
            settings.source.stream_name.clone(),
            Arc::clone(progress),
            Arc::clone(metrics),
            reading.clone(),
            memory.clone(),
        );
        let starter: Arc<dyn crate::fanout::CatchUpStarter> = Arc::new(catch_ups.clone());
        // When readers wait for memory, the destination the others left behind lets go of it.
        let relief = crate::fanout::Relief::new(
            destinations.clone(),
            Arc::clone(progress),
            Arc::clone(&starter),
            Arc::clone(metrics),
        );
        memory.on_short(Arc::new(move |used| {
            relief.relieve(used);
        }));
        let fanout = Fanout::new(destinations, Arc::clone(progress)).with_catch_up(starter).with_memory(memory);
        Running {
            reading,
            fanout: Some(fanout),
            checkpointer,
            catch_ups,
            lease_loop,
            manager: backend.manager.clone(),
            writers,
            supervisor,
            idle,
            periodic,
        }
    }

    /// The destinations as discovery finds them, each with its writer in `writers`: the clients of
    /// each place destinations live in, and the task that keeps following discovery.
    async fn destinations(
        &self,
        identities: &Identities,
        clients: &KinesisClients,
        source_arn: &str,
        share: watch::Receiver<f64>,
        writers: &TaskGroup,
        shutdown: &CancellationToken,
    ) -> (Task, watch::Receiver<crate::fanout::DestinationSet>) {
        let settings = &self.settings;
        // Each place destinations live in (region, endpoint) has its own clients.
        let maker = Arc::new(Places { identities: identities.clone(), timeout: settings.put_attempt_timeout() });
        let mut places = Vec::new();
        for aws in settings.destination_places() {
            places.push(maker.make(&aws, settings.place_label(&aws)).await);
        }
        let (supervisor, destinations) = Supervisor::new(
            Arc::clone(settings),
            clients.control.clone(),
            places.clone(),
            Arc::clone(&self.metrics),
            Arc::clone(&self.health),
            share,
            writers.clone(),
        );
        let reloads = self.reloads.lock().unwrap_or_else(|e| e.into_inner()).take().expect("replicate runs once");
        let mut supervisor = supervisor.with_reloads(reloads, maker);
        let discovery = Discovery::new(Arc::clone(settings), places.iter().map(|p| p.control.clone()).collect());
        supervisor.exclude_source(source_arn);
        supervisor.follow(&discovery).await;
        tracing::info!(destinations = ?supervisor.current(), "Destinations discovered.");
        // Destinations stop coming and going with the shutdown signal (none comes or goes during
        // the drain), or at teardown after a fatal error.
        let task = Task::spawn("destinations", {
            let shutdown = shutdown.clone();
            move |stop| async move {
                tokio::select! {
                    _ = supervisor.run(discovery, shutdown) => {}
                    _ = stop.cancelled() => {}
                }
            }
        });
        (task, destinations)
    }

    /// The budget for everything buffered, within `memory.limit`.
    fn memory_budget(&self, source: crate::record::StreamLimits) -> crate::memory::MemoryBudget {
        let (settings, metrics) = (&self.settings, &self.metrics);
        let memory = crate::memory::MemoryBudget::for_process(settings.memory_limit);
        metrics.memory_limit_bytes.set(settings.memory_limit as i64);
        metrics.memory_budget_bytes.set(i64::try_from(memory.limit()).unwrap_or(i64::MAX));
        let _ = metrics.memory.set(memory.clone());
        tracing::info!(
            limit_bytes = settings.memory_limit,
            buffers_bytes = memory.limit(),
            "Memory budget for everything buffered."
        );
        // A record is buffered whole: a budget of a few of the source's largest records lets one
        // wait for memory without stopping everything else.
        let largest = source.max_record_bytes as u64;
        if memory.limit() < 4 * largest {
            tracing::warn!(
                buffers_bytes = memory.limit(),
                source_max_record_bytes = largest,
                "The source takes records so large that the memory budget holds fewer than four of them; raise memory.limit so that a large record does not hold every shard back."
            );
        }
        memory
    }

    /// Reads the shards this worker holds (or, alone, every shard) until reading stops.
    async fn read(
        &self,
        source: Source,
        backend: Backend,
        clients: &KinesisClients,
        running: &Running,
    ) -> Result<(), SourceError> {
        let listing = Listing {
            shards: ShardList::Kinesis(clients.control.clone()),
            stream: self.settings.source.stream_name.clone(),
            initial: self.settings.source.initial_position.clone(),
        };
        let reading = running.reading.clone();
        let checkpointer = running.checkpointer.clone();
        match (backend.manager, backend.events) {
            (Some(manager), Some(events)) => {
                let leases = Leases::new(listing, manager, events, checkpointer, &self.health);
                source.run(leases, reading).await
            }
            _ => {
                let plan = Plan::new(listing, backend.stored, checkpointer, Arc::clone(&self.health));
                source.run(plan, reading).await
            }
        }
    }
}

/// Builds each place's clients, with the credentials of the role its groups name.
struct Places {
    identities: Identities,
    timeout: std::time::Duration,
}

impl MakePlace for Places {
    fn make<'a>(
        &'a self,
        aws: &'a crate::config::AwsSettings,
        group: String,
    ) -> std::pin::Pin<Box<dyn Future<Output = PlaceClients> + Send + 'a>> {
        Box::pin(async move {
            let credentials = self.identities.provider(aws.role.as_ref(), aws.region.as_deref(), &group).await;
            PlaceClients::new(&KinesisClients::new(&self.identities.sdk, aws, credentials, self.timeout))
        })
    }
}
