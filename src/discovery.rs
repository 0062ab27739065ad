//! Destination discovery: which streams match the configured patterns, now and as they come and go.
//!
//! ListStreams (5 TPS per account) and DescribeStreamSummary (20 TPS) are shared with every other
//! client of the account, so discovery paces itself well below both and re-reads only every
//! `refresh_interval`. The source stream and dead-letter streams are never destinations, whatever
//! the patterns say: copying a stream into itself would never end.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::aws::kinesis;
use crate::config::{KplMode, Settings};
use crate::fanout::{DestinationHandle, DestinationSet};
use crate::metrics::Metrics;
use crate::shutdown::TaskGroup;
use crate::sink::DestinationTask;
use crate::sink::entries::ShardMap;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("ListStreams failed")]
    ListStreams(#[source] crate::aws::CallError),
}

/// A stream that matches a destination group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub group: usize,
}

/// Streams that are never destinations: the source and every dead-letter stream.
pub fn never_destinations(settings: &Settings) -> HashSet<String> {
    std::iter::once(settings.source.stream_name.clone())
        .chain(settings.destinations.iter().filter_map(|g| g.dead_letter_stream.clone()))
        .collect()
}

/// Filters stream names down to destinations, with the group each belongs to.
pub fn select(settings: &Settings, names: impl IntoIterator<Item = String>) -> Vec<Candidate> {
    let excluded = never_destinations(settings);
    names
        .into_iter()
        .filter(|name| !excluded.contains(name))
        .filter_map(|name| settings.group_for(&name).map(|group| Candidate { name, group }))
        .collect()
}

/// Every stream name in the account and region, each page after `pace` allows it.
pub async fn list_stream_names(
    client: &aws_sdk_kinesis::Client,
    pace: Option<&DefaultDirectRateLimiter>,
) -> Result<Vec<String>, DiscoveryError> {
    kinesis::list_stream_names(client, pace).await.map_err(DiscoveryError::ListStreams)
}

/// A running destination: its handle for the source, its shard feeds, its off switch.
struct Running {
    handle: DestinationHandle,
    open_shards: watch::Sender<u32>,
    shard_map: watch::Sender<Arc<ShardMap>>,
    removed: CancellationToken,
    kpl: KplMode,
}

/// The open shards of a stream as hash key ranges.
pub async fn open_ranges(client: &aws_sdk_kinesis::Client, stream: &str) -> Option<ShardMap> {
    let shards = match crate::source::list_shards(client, stream).await {
        Ok(shards) => shards,
        Err(err) => {
            tracing::warn!(stream, error = %crate::aws::chain(&err), "ListShards failed; keeping the last known shard map.");
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

/// Keeps the set of destination writers in line with the streams that exist.
pub struct Discovery {
    settings: Arc<Settings>,
    client: aws_sdk_kinesis::Client,
    writer_client: aws_sdk_kinesis::Client,
    metrics: Arc<Metrics>,
    health: Arc<crate::health::Health>,
    running: BTreeMap<String, Running>,
    publish: watch::Sender<DestinationSet>,
    gone_tx: mpsc::UnboundedSender<Arc<str>>,
    gone_rx: mpsc::UnboundedReceiver<Arc<str>>,
    /// Writers whose records landed in other shards than their map says ask for a new map here.
    remap_tx: mpsc::UnboundedSender<Arc<str>>,
    remap_rx: mpsc::UnboundedReceiver<Arc<str>>,
    list_pace: DefaultDirectRateLimiter,
    describe_pace: DefaultDirectRateLimiter,
    /// This worker's share of the source, for fleet-wide rate limits.
    share: watch::Receiver<f64>,
    /// Passthrough destinations already warned about a shard map mismatch.
    passthrough_warned: HashSet<String>,
    /// Stops every destination writer (end of the grace period).
    writers: TaskGroup,
}

impl Discovery {
    pub fn new(
        settings: Arc<Settings>,
        clients: &crate::aws::KinesisClients,
        metrics: Arc<Metrics>,
        health: Arc<crate::health::Health>,
        share: watch::Receiver<f64>,
        writers: TaskGroup,
    ) -> (Self, watch::Receiver<DestinationSet>) {
        let (publish, subscribe) = watch::channel(Arc::new(Vec::new()));
        let (gone_tx, gone_rx) = mpsc::unbounded_channel();
        let (remap_tx, remap_rx) = mpsc::unbounded_channel();
        let per_second = |n: u32| RateLimiter::direct(Quota::per_second(NonZeroU32::new(n).expect("positive")));
        let discovery = Discovery {
            settings,
            client: clients.control.clone(),
            writer_client: clients.writer.clone(),
            metrics,
            health,
            running: BTreeMap::new(),
            publish,
            gone_tx,
            gone_rx,
            remap_tx,
            remap_rx,
            list_pace: per_second(1),
            describe_pace: per_second(5),
            share,
            passthrough_warned: HashSet::new(),
            writers,
        };
        (discovery, subscribe)
    }

    fn interval(&self) -> Duration {
        self.settings.destinations.iter().map(|g| g.refresh_interval).min().unwrap_or(Duration::from_secs(30))
    }

    /// Re-reads the account every refresh interval until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let interval = self.interval();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => self.refresh_logged().await,
                Some(gone) = self.gone_rx.recv() => self.remove(&gone, "PutRecords found the stream deleted"),
                Some(stale) = self.remap_rx.recv() => self.refresh_map(&stale).await,
            }
        }
    }

    pub async fn refresh_logged(&mut self) {
        if let Err(err) = self.refresh().await {
            tracing::warn!(error = %crate::aws::chain(&err), "Destination discovery failed; keeping the destinations known so far.");
        }
    }

    /// One discovery round: start writers for new streams, stop those of vanished ones, refresh
    /// shard counts.
    pub async fn refresh(&mut self) -> Result<(), DiscoveryError> {
        let names = list_stream_names(&self.client, Some(&self.list_pace)).await?;
        let candidates = select(&self.settings, names);
        let wanted: HashSet<&str> = candidates.iter().map(|c| c.name.as_str()).collect();
        let vanished: Vec<String> = self.running.keys().filter(|n| !wanted.contains(n.as_str())).cloned().collect();
        for name in vanished {
            // One ListStreams answer is not proof (pagination, eventual consistency): removing a
            // destination acknowledges what it still holds, so ask the stream itself first.
            if self.confirm_gone(&name).await {
                self.remove(&name, "no longer listed, and DescribeStreamSummary confirms it");
            }
        }
        for candidate in &candidates {
            self.describe_pace.until_ready().await;
            match kinesis::describe_stream(&self.client, &candidate.name).await {
                Ok(Some(summary)) if summary.writable => self.upsert(candidate, summary.open_shards).await,
                Ok(Some(summary)) if summary.deleting => self.remove(&candidate.name, "being deleted"),
                Ok(Some(_)) => tracing::debug!(destination = %candidate.name, "Stream is not accepting writes yet."),
                Ok(None) => self.remove(&candidate.name, "deleted"),
                Err(err) => {
                    tracing::warn!(destination = %candidate.name, error = %err, "DescribeStreamSummary failed; will try again next round.")
                }
            }
        }
        self.check_passthrough().await;
        Ok(())
    }

    /// Whether a stream missing from ListStreams is really gone (deleted or being deleted); a
    /// failed check keeps the destination until the next round.
    async fn confirm_gone(&self, name: &str) -> bool {
        self.describe_pace.until_ready().await;
        match kinesis::stream_gone(&self.client, name).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(destination = %name, "ListStreams did not name this destination, but it exists; keeping it.");
                false
            }
            Err(err) => {
                tracing::warn!(destination = %name, error = %err, "ListStreams did not name this destination and DescribeStreamSummary failed; keeping it until the next round.");
                false
            }
        }
    }

    /// Passing aggregates through is only right when a destination's shards split the hash space
    /// like the source's: say so once per destination when they do not.
    async fn check_passthrough(&mut self) {
        let unchecked: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| r.kpl == KplMode::Passthrough && !self.passthrough_warned.contains(*name))
            .map(|(name, _)| name.clone())
            .collect();
        if unchecked.is_empty() {
            return;
        }
        let Some(source) = open_ranges(&self.client, &self.settings.source.stream_name).await else { return };
        for name in unchecked {
            let map = Arc::clone(&self.running[&name].shard_map.borrow());
            if map.ranges() != source.ranges() {
                tracing::warn!(
                    destination = %name,
                    "kpl = \"passthrough\" but this destination's shards do not match the source's: aggregates land \
                     where their outer key hashes, and KCL consumers drop sub-records outside their shard. Use \"reaggregate\"."
                );
                self.passthrough_warned.insert(name);
            }
        }
    }

    async fn upsert(&mut self, candidate: &Candidate, open_shards: u32) {
        if let Some(running) = self.running.get(&candidate.name) {
            let changed =
                running.open_shards.send_if_modified(|current| std::mem::replace(current, open_shards) != open_shards);
            // A split and a merge keep the count but move the ranges: re-aggregation routes by
            // the map, so it is read again every round (and retried next round when it fails).
            if changed || running.kpl == KplMode::Reaggregate {
                self.refresh_map(&candidate.name).await;
            }
            return;
        }
        let map = open_ranges(&self.client, &candidate.name).await.unwrap_or_default();
        let (shard_map_tx, shard_map_rx) = watch::channel(Arc::new(map));
        let group = Arc::new(self.settings.destinations[candidate.group].clone());
        let kpl = group.kpl;
        let name: Arc<str> = candidate.name.as_str().into();
        let (handle, queue) = DestinationHandle::new(Arc::clone(&name), group.max_in_flight_bytes);
        let (open_shards_tx, open_shards_rx) = watch::channel(open_shards);
        let removed = CancellationToken::new();
        let task = DestinationTask {
            name: Arc::clone(&name),
            source_stream: self.settings.source.stream_name.as_str().into(),
            edge: Arc::new(self.writer_client.clone()),
            group,
            queue,
            open_shards: open_shards_rx,
            shard_map: shard_map_rx,
            share: self.share.clone(),
            metrics: Arc::clone(&self.metrics),
            removed: removed.clone(),
            stop: self.writers.stop_signal(),
            gone: self.gone_tx.clone(),
            remap: self.remap_tx.clone(),
        };
        self.writers.spawn(async move {
            task.run().await;
        });
        tracing::info!(destination = %name, open_shards, group = candidate.group, "Destination discovered; it receives every record read from now on.");
        self.running.insert(
            candidate.name.clone(),
            Running { handle, open_shards: open_shards_tx, shard_map: shard_map_tx, removed, kpl },
        );
        self.publish_set();
    }

    /// Reads a destination's shard map again; publishes it when its shards changed.
    async fn refresh_map(&self, name: &str) {
        let Some(running) = self.running.get(name) else { return };
        if let Some(map) = open_ranges(&self.client, name).await {
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

    fn remove(&mut self, name: &str, why: &str) {
        if let Some(running) = self.running.remove(name) {
            tracing::info!(destination = %name, reason = why, "Destination removed; the others carry on.");
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
        self.running.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_and_dead_letter_streams_are_never_destinations() {
        let settings = Settings::from_toml(
            r#"
            [source]
            stream_name = "app-output-source"
            [[destinations]]
            pattern = "^app-output-.*$"
            exclude = ["-test$"]
            dead_letter_stream = "app-output-dlq"
            "#,
        )
        .unwrap();
        let names = ["app-output-source", "app-output-dlq", "app-output-a", "app-output-b-test", "other"];
        let selected: Vec<String> = select(&settings, names.map(String::from)).into_iter().map(|c| c.name).collect();
        assert_eq!(selected, vec!["app-output-a".to_string()]);
    }
}
