//! The destinations supervisor: one writer task per destination stream, started, resized,
//! re-mapped and stopped as discovery's changes (and the writers' own reports) say.
//!
//! The set of destinations is published to the fan-out through a watch channel: a destination
//! receives every record read after it appeared, and one removed no longer holds anything back.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

mod reload;

pub use reload::{MakePlace, Reload, ReloadReport};

use super::entries::ShardMap;
use super::put::PutEdge;
use super::{Assignment, DestinationTask};
use crate::aws::kinesis::stream_name_of;
use crate::config::{KplMode, Settings};
use crate::discovery::{Candidate, Change, Discovery, arn_place};
use crate::fanout::{DestinationHandle, DestinationSet};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::record::StreamLimits;
use crate::shutdown::TaskGroup;

/// A running destination: its handle for the source, its shard feeds, its off switch.
struct Running {
    /// Where it lives (`Settings::destination_places`) and its stream name there.
    place: usize,
    stream: String,
    handle: DestinationHandle,
    open_shards: watch::Sender<u32>,
    /// What the stream takes, as discovery last read it.
    limits: watch::Sender<StreamLimits>,
    shard_map: watch::Sender<Arc<ShardMap>>,
    removed: CancellationToken,
    /// Its group, as the writer follows it.
    assignment: watch::Sender<Assignment>,
    /// The configuration generation its assignment comes from.
    generation: u64,
}

impl Running {
    /// Its group's KPL mode, as its writer follows it.
    fn kpl(&self) -> KplMode {
        self.assignment.borrow().group.kpl
    }
}

/// The open shards of a stream as hash key ranges.
pub async fn open_ranges(client: &aws_sdk_kinesis::Client, stream: &str) -> Option<ShardMap> {
    let shards = match crate::aws::kinesis::list_shards(client, stream).await {
        Ok(shards) => shards,
        Err(err) => {
            tracing::warn!(stream, error = %err, "ListShards on a destination failed; keeping the last known shard map.");
            return None;
        }
    };
    let ranges = shards
        .into_iter()
        .filter(|s| !s.closed)
        .filter_map(|s| {
            let (start, end) = s.hash_range?;
            Some((s.id, start.parse::<u128>().ok()?, end.parse::<u128>().ok()?))
        })
        .collect();
    Some(ShardMap::with_ids(ranges))
}

/// The clients of one place destinations live in.
#[derive(Clone)]
pub struct PlaceClients {
    /// For shard maps (ListShards).
    pub control: aws_sdk_kinesis::Client,
    /// Where the writers' PutRecords go.
    pub edge: Arc<dyn PutEdge>,
}

impl PlaceClients {
    pub fn new(clients: &crate::aws::KinesisClients) -> Self {
        PlaceClients { control: clients.control.clone(), edge: Arc::new(clients.writer.clone()) }
    }
}

/// What a dead-letter stream takes: read once, when a destination of its group starts (1 MiB,
/// the least any stream takes, when it cannot be read).
async fn dead_letter_limits(control: &aws_sdk_kinesis::Client, stream: &str) -> StreamLimits {
    match crate::aws::kinesis::describe_stream(control, stream).await {
        Ok(Some(summary)) => summary.limits,
        Ok(None) => StreamLimits::default(),
        Err(err) => {
            tracing::warn!(dead_letter_stream = stream, error = %err, "Cannot read the dead-letter stream's record size limit; assuming 1 MiB.");
            StreamLimits::default()
        }
    }
}

/// Keeps one writer per destination stream that exists.
pub struct Supervisor {
    settings: Arc<Settings>,
    /// The source's control client (its shard map, for the passthrough check).
    source: aws_sdk_kinesis::Client,
    /// One per place of `Settings::destination_places`, in order.
    places: Vec<PlaceClients>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// By stream ARN.
    running: BTreeMap<Arc<str>, Running>,
    publish: watch::Sender<DestinationSet>,
    /// Writers whose PutRecords found their stream deleted.
    gone_tx: mpsc::UnboundedSender<Arc<str>>,
    gone_rx: mpsc::UnboundedReceiver<Arc<str>>,
    /// Writers whose records landed in other shards than their map says ask for a new map here.
    remap_tx: mpsc::UnboundedSender<Arc<str>>,
    remap_rx: mpsc::UnboundedReceiver<Arc<str>>,
    /// This worker's share of the source, for fleet-wide rate limits.
    share: watch::Receiver<f64>,
    /// Passthrough destinations already warned about a shard map mismatch.
    passthrough_warned: HashSet<Arc<str>>,
    /// Every writer; stopped together at the end of the grace period.
    writers: TaskGroup,
    /// The first discovery round is over: destinations found from now on appeared while running.
    first_round_done: bool,
    /// The source stream's ARN, once known ([`Supervisor::exclude_source`]).
    source_arn: Option<String>,
    /// Every group's filter, shared by every writer (`None`: no group has one).
    filters: Option<Arc<crate::fanout::filter::Filters>>,
    /// Builds the clients of a place a reloaded configuration brings.
    make_place: Option<Arc<dyn MakePlace>>,
    /// Reloaded configurations, applied between discovery rounds.
    reloads: Option<mpsc::Receiver<Reload>>,
    /// Counts the configurations applied: a destination whose assignment is older follows the
    /// current one at the next round that selects it.
    generation: u64,
}

impl Supervisor {
    pub fn new(
        settings: Arc<Settings>,
        source: aws_sdk_kinesis::Client,
        places: Vec<PlaceClients>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        share: watch::Receiver<f64>,
        writers: TaskGroup,
    ) -> (Self, watch::Receiver<DestinationSet>) {
        let (publish, subscribe) = watch::channel(Arc::new(Vec::new()));
        let (gone_tx, gone_rx) = mpsc::unbounded_channel();
        let (remap_tx, remap_rx) = mpsc::unbounded_channel();
        let filters = crate::fanout::filter::Filters::new(&settings).map(Arc::new);
        let supervisor = Supervisor {
            settings,
            source,
            places,
            metrics,
            health,
            running: BTreeMap::new(),
            publish,
            gone_tx,
            gone_rx,
            remap_tx,
            remap_rx,
            share,
            passthrough_warned: HashSet::new(),
            writers,
            first_round_done: false,
            filters,
            source_arn: None,
            make_place: None,
            reloads: None,
            generation: 0,
        };
        (supervisor, subscribe)
    }

    /// Takes reloaded configurations from `reloads`, building the clients of new places with
    /// `make_place`.
    pub fn with_reloads(mut self, reloads: mpsc::Receiver<Reload>, make_place: Arc<dyn MakePlace>) -> Self {
        self.reloads = Some(reloads);
        self.make_place = Some(make_place);
        self
    }

    /// Follows discovery every refresh interval, the writers' reports and reloaded
    /// configurations, until `shutdown`.
    pub async fn run(mut self, mut discovery: Discovery, shutdown: CancellationToken) {
        let mut reloads = self.reloads.take();
        loop {
            let interval = discovery.interval();
            let reload = async {
                match reloads.as_mut() {
                    Some(reloads) => reloads.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => self.follow(&discovery).await,
                Some(gone) = self.gone_rx.recv() => self.remove(&gone, "PutRecords found the stream deleted"),
                Some(stale) = self.remap_rx.recv() => self.refresh_map(&stale).await,
                Some(reload) = reload => discovery = self.reload(reload).await,
            }
        }
    }

    /// One discovery round, applied. A failed round keeps the destinations known so far.
    pub async fn follow(&mut self, discovery: &Discovery) {
        let current: BTreeSet<(usize, String)> = self.running.values().map(|r| (r.place, r.stream.clone())).collect();
        // (A destination a reload left without a place, `usize::MAX`, is in no place's view.)
        match discovery.changes(&current).await {
            Ok(changes) => {
                for change in changes {
                    match change {
                        Change::Writable { candidate, arn, open_shards, limits } => {
                            self.upsert(&candidate, &arn, open_shards, limits).await
                        }
                        Change::Gone { place, name, why } => {
                            let id = self.running.iter().find(|(_, r)| r.place == place && r.stream == name);
                            if let Some(id) = id.map(|(id, _)| Arc::clone(id)) {
                                self.remove(&id, why);
                            }
                        }
                    }
                }
                self.check_passthrough().await;
                self.first_round_done = true;
            }
            Err(err) => {
                tracing::warn!(error = %crate::aws::chain(&err), "Destination discovery failed; keeping the destinations known so far.")
            }
        }
    }

    /// Passing aggregates through is only right when a destination's shards split the hash space
    /// like the source's: say so once per destination when they do not.
    async fn check_passthrough(&mut self) {
        let unchecked: Vec<Arc<str>> = self
            .running
            .iter()
            .filter(|(id, r)| r.kpl() == KplMode::Passthrough && !self.passthrough_warned.contains(*id))
            .map(|(id, _)| Arc::clone(id))
            .collect();
        if unchecked.is_empty() {
            return;
        }
        let Some(source) = open_ranges(&self.source, &self.settings.source.stream_name).await else { return };
        for id in unchecked {
            let running = &self.running[&id];
            let map = Arc::clone(&running.shard_map.borrow());
            if map.ranges() != source.ranges() {
                tracing::warn!(
                    destination = %running.handle.name,
                    "kpl = \"passthrough\" but this destination's shards do not match the source's: aggregates land \
                     where their outer key hashes, and KCL consumers drop sub-records outside their shard. Use \"reaggregate\"."
                );
                self.passthrough_warned.insert(id);
            }
        }
    }

    async fn upsert(&mut self, candidate: &Candidate, arn: &str, open_shards: u32, limits: StreamLimits) {
        // The source itself, however the configuration names either, is never a destination.
        if self.source_arn.as_deref() == Some(arn) {
            return;
        }
        if let Some(running) = self.running.get_mut(arn) {
            // A reload moved its group to another place (role, endpoint): its writer keeps the
            // clients it started with; discovery and shard maps use the new place's.
            running.place = candidate.place;
        }
        if self.running.get(arn).is_some_and(|r| r.generation != self.generation) {
            self.reassign(arn, candidate.group).await;
        }
        if let Some(running) = self.running.get(arn) {
            running.limits.send_if_modified(|current| std::mem::replace(current, limits) != limits);
            let changed =
                running.open_shards.send_if_modified(|current| std::mem::replace(current, open_shards) != open_shards);
            // A split and a merge keep the count but move the ranges: re-aggregation routes by
            // the map, so it is read again every round (and retried next round when it fails).
            if changed || running.kpl() == KplMode::Reaggregate {
                self.refresh_map(arn).await;
            }
            return;
        }
        self.start(candidate, arn, open_shards, limits).await;
    }

    async fn start(&mut self, candidate: &Candidate, arn: &str, open_shards: u32, limits: StreamLimits) {
        let place = &self.places[candidate.place];
        let assignment = self.assignment(candidate.place, candidate.group).await;
        let (limits_tx, limits_rx) = watch::channel(limits);
        let map = open_ranges(&place.control, &candidate.name).await.unwrap_or_default();
        let (shard_map_tx, shard_map_rx) = watch::channel(Arc::new(map));
        let group = Arc::clone(&assignment.group);
        let (assignment_tx, assignment_rx) = watch::channel(assignment);
        let name = self.label(&candidate.name, arn);
        let id: Arc<str> = arn.into();
        let (mut handle, queue) = DestinationHandle::new(Arc::clone(&name), Arc::clone(&id), group.max_in_flight_bytes);
        handle.detach_after = group.detach_after;
        handle.start = group.start_position.clone();
        handle.appeared_while_running = self.first_round_done;
        let (open_shards_tx, open_shards_rx) = watch::channel(open_shards);
        let removed = CancellationToken::new();
        let task = DestinationTask {
            name: Arc::clone(&name),
            stream: candidate.name.as_str().into(),
            id: Arc::clone(&id),
            source_stream: self.settings.source.stream_name.as_str().into(),
            edge: Arc::clone(&place.edge),
            queue,
            open_shards: open_shards_rx,
            shard_map: shard_map_rx,
            limits: limits_rx,
            assignment: assignment_rx,
            share: self.share.clone(),
            metrics: Arc::clone(&self.metrics),
            removed: removed.clone(),
            stop: self.writers.stop_signal(),
            gone: self.gone_tx.clone(),
            remap: self.remap_tx.clone(),
            shed: handle.shed_signal(),
        };
        self.writers.spawn(async move {
            task.run().await;
        });
        tracing::info!(destination = %name, arn, open_shards, group = candidate.group, max_record_bytes = limits.max_record_bytes, "Destination discovered; it receives every record read from now on.");
        self.running.insert(
            id,
            Running {
                place: candidate.place,
                stream: candidate.name.clone(),
                handle,
                open_shards: open_shards_tx,
                limits: limits_tx,
                shard_map: shard_map_tx,
                removed,
                assignment: assignment_tx,
                generation: self.generation,
            },
        );
        self.publish_set();
    }

    /// Never takes the source stream (by its ARN) as a destination, even where a pattern or an
    /// ARN list names it in another way than the source's own setting.
    pub fn exclude_source(&mut self, arn: &str) {
        self.source_arn = Some(arn.to_string());
    }

    /// A destination's name in metrics and logs: its stream name, unless a destination of that
    /// name in another place is known already; then `region/name`, or `account/region/name`
    /// when the regions are the same.
    fn label(&self, stream: &str, arn: &str) -> Arc<str> {
        // A stream named by ARN is labelled by its name, as any other.
        let stream = stream_name_of(stream);
        let Some(other) = self.running.iter().find(|(id, r)| stream_name_of(&r.stream) == stream && &***id != arn)
        else {
            return stream.into();
        };
        let (region, account) = arn_place(arn);
        let taken = |label: &str| self.running.iter().any(|(id, r)| &**id != arn && &*r.handle.name == label);
        let regional = format!("{region}/{stream}");
        if arn_place(other.0).0 != region && !taken(&regional) {
            regional.into()
        } else {
            format!("{account}/{region}/{stream}").into()
        }
    }

    /// Reads a destination's shard map again; publishes it when its shards changed.
    async fn refresh_map(&self, id: &str) {
        let Some(running) = self.running.get(id) else { return };
        let name = &running.handle.name;
        let Some(place) = self.places.get(running.place) else { return };
        if let Some(map) = open_ranges(&place.control, &running.stream).await {
            let changed = running.shard_map.send_if_modified(|current| {
                let changed = **current != map;
                if changed {
                    *current = Arc::new(map);
                }
                changed
            });
            if changed {
                tracing::info!(destination = %name, "Destination shard map changed; re-aggregation follows it.");
            }
        }
    }

    fn remove(&mut self, id: &str, why: &str) {
        if let Some(running) = self.running.remove(id) {
            tracing::info!(destination = %running.handle.name, reason = why, "Destination removed; the others carry on.");
            running.handle.close();
            running.removed.cancel();
            self.publish_set();
        }
    }

    fn publish_set(&self) {
        let set: Vec<DestinationHandle> = self.running.values().map(|r| r.handle.clone()).collect();
        self.metrics.destinations.set(set.len() as i64);
        self.health.set_destinations(set.len());
        self.publish.send_replace(Arc::new(set));
    }

    /// Names of the destinations written to now.
    pub fn current(&self) -> Vec<String> {
        self.running.values().map(|r| r.handle.name.to_string()).collect()
    }
}
