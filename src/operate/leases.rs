//! `kinesis-fanout leases`: one row per lease of the lease table (or per shard of the checkpoint
//! file): owner, counter, checkpoint and each destination's own position, parents and children,
//! state, and how far behind the checkpoint is. Read-only.
//!
//! A lease is *expired as seen now* when it has an owner but its counter did not move while this
//! command watched the table (`--observe`, by default the configured failover time): the same test
//! a worker applies before it takes a lease. Lag is the age of the record after the checkpoint
//! (its ApproximateArrivalTimestamp), read with one GetRecords probe; when there is no such record
//! yet, the checkpoint is at the tip (MillisBehindLatest of the probe).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::OperateError;
use crate::aws::KinesisClients;
use crate::aws::credentials::Identities;
use crate::aws::kinesis;
use crate::checkpoint::CheckpointStore;
use crate::checkpoint::FileCheckpointStore;
use crate::config::{CheckpointBackend, Settings};
use crate::lease::LeaseTable;
use crate::position::Position;

#[derive(Debug, Serialize)]
pub struct LeaseRow {
    pub shard: String,
    pub owner: Option<String>,
    pub counter: Option<u64>,
    pub checkpoint: String,
    /// Destination stream ARN → its own position, where one is stored.
    pub destinations: BTreeMap<String, String>,
    pub parents: Vec<String>,
    pub children: Vec<String>,
    /// `owned`, `free`, `expired`, `finished`, `file` (the file backend has no owners), or
    /// `unreadable` (an item no worker can read as a lease; `lag_note` says why).
    pub state: &'static str,
    /// Age of the first record after the checkpoint; 0 at the tip; `None` when it cannot be read.
    pub lag_seconds: Option<f64>,
    /// Why there is no lag figure.
    pub lag_note: Option<String>,
    /// Why an `unreadable` item cannot be read as a lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Every lease (or checkpointed shard), in shard order.
pub async fn rows(
    settings: &Settings,
    sdk: &aws_config::SdkConfig,
    observe: Option<Duration>,
) -> Result<Vec<LeaseRow>, OperateError> {
    let identities = Identities {
        sdk: sdk.clone(),
        sts_endpoint_url: settings.sts_endpoint_url.clone(),
        worker: "leases".into(),
        metrics: Default::default(),
        health: Default::default(),
    };
    let source = &settings.source.aws;
    let credentials = identities.provider(source.role.as_ref(), source.region.as_deref(), "source").await;
    let kinesis = KinesisClients::new(sdk, source, credentials, settings.put_attempt_timeout()).control;
    let stream = &settings.source.stream_name;
    let mut rows = match &settings.checkpoint.backend {
        CheckpointBackend::File { path } => {
            let snapshot = FileCheckpointStore::new(path.clone(), stream.clone()).load_snapshot().await?;
            snapshot
                .shards
                .iter()
                .map(|(shard, position)| LeaseRow {
                    shard: shard.clone(),
                    owner: None,
                    counter: None,
                    checkpoint: position.to_string(),
                    destinations: shown(snapshot.destinations.get(shard)),
                    parents: Vec::new(),
                    children: Vec::new(),
                    state: if *position == Position::ShardEnd { "finished" } else { "file" },
                    lag_seconds: None,
                    lag_note: None,
                    problem: None,
                })
                .collect::<Vec<_>>()
        }
        CheckpointBackend::DynamoDb(lease) => {
            let aws = lease.aws(source);
            let credentials = identities.provider(aws.role.as_ref(), aws.region.as_deref(), "checkpoint").await;
            let table = LeaseTable::new(crate::aws::dynamodb_client(sdk, &aws, credentials, lease), &lease.table_name);
            let (first, _) = table.scan_with_unreadable().await?;
            let wait = observe.unwrap_or(lease.failover_time);
            let (second, unreadable) = if wait.is_zero() {
                (None, table.scan_with_unreadable().await?.1)
            } else {
                tokio::time::sleep(wait).await;
                let (leases, unreadable) = table.scan_with_unreadable().await?;
                (Some(leases), unreadable)
            };
            let counters: BTreeMap<String, u64> = first.iter().map(|l| (l.key.clone(), l.counter)).collect();
            let latest = second.unwrap_or(first);
            latest
                .into_iter()
                .map(|l| {
                    let still = observe != Some(Duration::ZERO) && counters.get(&l.key) == Some(&l.counter);
                    let state = match (&l.owner, &l.checkpoint) {
                        (_, Position::ShardEnd) => "finished",
                        (None, _) => "free",
                        (Some(_), _) if still => "expired",
                        (Some(_), _) => "owned",
                    };
                    LeaseRow {
                        shard: l.key.clone(),
                        owner: l.owner.clone(),
                        counter: Some(l.counter),
                        checkpoint: l.checkpoint.to_string(),
                        destinations: shown(Some(&l.destination_checkpoints)),
                        parents: l.parents.clone(),
                        children: l.children.clone(),
                        state,
                        lag_seconds: None,
                        lag_note: None,
                        problem: None,
                    }
                })
                .chain(unreadable.into_iter().map(|item| LeaseRow {
                    shard: item.key.unwrap_or_else(|| "(no leaseKey)".into()),
                    owner: None,
                    counter: None,
                    checkpoint: String::new(),
                    destinations: BTreeMap::new(),
                    parents: Vec::new(),
                    children: Vec::new(),
                    state: "unreadable",
                    lag_seconds: None,
                    lag_note: None,
                    problem: Some(item.reason),
                }))
                .collect()
        }
    };
    if matches!(settings.checkpoint.backend, CheckpointBackend::File { .. }) {
        // The file keeps positions only; the stream says who descends from whom.
        if let Ok(shards) = crate::source::list_shards(&kinesis, stream).await {
            for row in &mut rows {
                row.parents = shards.iter().find(|s| s.id == row.shard).map(|s| s.parents.clone()).unwrap_or_default();
                row.children = shards.iter().filter(|s| s.parents.contains(&row.shard)).map(|s| s.id.clone()).collect();
            }
        }
    }
    for row in rows.iter_mut().filter(|r| r.problem.is_none()) {
        lag(&kinesis, stream, row).await;
    }
    rows.sort_by(|a, b| a.shard.cmp(&b.shard));
    Ok(rows)
}

fn shown(positions: Option<&BTreeMap<String, crate::record::SequenceNumber>>) -> BTreeMap<String, String> {
    positions.into_iter().flatten().map(|(id, seq)| (id.clone(), seq.to_string())).collect()
}

/// Probes how far behind a row's checkpoint is (two calls on its shard).
async fn lag(client: &aws_sdk_kinesis::Client, stream: &str, row: &mut LeaseRow) {
    let Ok(position) = Position::parse(&row.checkpoint) else {
        row.lag_note = Some("checkpoint unreadable".into());
        return;
    };
    if position == Position::ShardEnd {
        row.lag_note = Some("shard read to its end".into());
        return;
    }
    let page = match kinesis::shard_iterator(client, stream, &row.shard, &position).await {
        Ok(iterator) => kinesis::get_records(client, &iterator, 1).await,
        Err(err) => Err(err),
    };
    match page {
        Ok(page) => match page.records.first().and_then(|r| r.approximate_arrival_timestamp) {
            Some(arrival) => {
                let arrival = SystemTime::try_from(arrival).unwrap_or(SystemTime::now());
                row.lag_seconds = Some(arrival.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0));
            }
            None if page.millis_behind_latest == Some(0) || page.millis_behind_latest.is_none() => {
                row.lag_seconds = Some(0.0);
            }
            None => row.lag_seconds = page.millis_behind_latest.map(|ms| ms as f64 / 1000.0),
        },
        Err(err) => row.lag_note = Some(format!("probe failed: {err}")),
    }
}

/// The rows as a text table.
pub fn render(rows: &[LeaseRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:<22} {:<9} {:<24} {:>8} {:>9}  checkpoint", "shard", "state", "owner", "counter", "lag");
    for row in rows {
        let lag = match (row.lag_seconds, &row.lag_note) {
            (Some(s), _) => format!("{s:.1}s"),
            (None, Some(_)) | (None, None) => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<22} {:<9} {:<24} {:>8} {:>9}  {}",
            row.shard,
            row.state,
            row.owner.as_deref().unwrap_or("-"),
            row.counter.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            lag,
            row.checkpoint
        );
        for (destination, position) in &row.destinations {
            let _ = writeln!(out, "{:<22}   destination {destination}: {position}", "");
        }
        if !row.parents.is_empty() {
            let _ = writeln!(out, "{:<22}   parents: {}", "", row.parents.join(", "));
        }
        if !row.children.is_empty() {
            let _ = writeln!(out, "{:<22}   children: {}", "", row.children.join(", "));
        }
        if let Some(note) = &row.lag_note {
            let _ = writeln!(out, "{:<22}   lag: {note}", "");
        }
        if let Some(problem) = &row.problem {
            let _ = writeln!(out, "{:<22}   unreadable: {problem}", "");
        }
    }
    out
}
