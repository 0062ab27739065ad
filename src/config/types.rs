//! The typed settings of each section, as `Settings` holds them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use regex::Regex;

use super::Rate;
use crate::position::Position;

/// What to do with KPL-aggregated records, per destination group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KplMode {
    /// Regroup user records per destination shard into new aggregates routed into that shard.
    Reaggregate,
    /// Write every user record on its own, with its partition key and explicit hash key.
    Deaggregate,
    /// Copy aggregates unchanged (correct only when the shard maps match).
    Passthrough,
}

/// `destinations[].ordering`: how far a group's destinations go to keep order per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyOrder {
    /// Requests carry as many records as fit; a record retried after a partial failure can land
    /// after a newer record of its key that succeeded in the same request.
    #[default]
    Batched,
    /// A request carries at most one record per partition key (and per explicit hash key), and
    /// nothing of a key is sent while an earlier record of that key is unanswered.
    Strict,
}

impl KeyOrder {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOrder::Batched => "batched",
            KeyOrder::Strict => "strict",
        }
    }
}

/// `destinations[].filter`: which records a group takes; every condition given must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The record's partition key matches.
    pub partition_key: Option<Regex>,
    /// The record's data starts with these bytes.
    pub data_prefix: Option<Vec<u8>>,
    /// The record's data is JSON and, at each pointer, holds a matching value.
    pub json: Vec<(String, JsonMatch)>,
}

/// What a JSON value at a pointer must be. Strings compare as they are; numbers and booleans as
/// their JSON text (`3`, `true`); null, arrays and objects never match.
#[derive(Debug, Clone)]
pub enum JsonMatch {
    OneOf(Vec<String>),
    Regex(Regex),
}

impl Filter {
    /// The conditions, for people: `partition_key ~ /^order-/, json /region in [eu, uk]`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(re) = &self.partition_key {
            parts.push(format!("partition_key ~ /{re}/"));
        }
        if let Some(prefix) = &self.data_prefix {
            match std::str::from_utf8(prefix) {
                Ok(text) => parts.push(format!("data starts with {text:?}")),
                Err(_) => parts.push(format!("data starts with {} bytes (base64)", prefix.len())),
            }
        }
        for (pointer, wanted) in &self.json {
            match wanted {
                JsonMatch::OneOf(values) if values.len() == 1 => {
                    parts.push(format!("json {pointer} = {:?}", values[0]))
                }
                JsonMatch::OneOf(values) => parts.push(format!("json {pointer} in {values:?}")),
                JsonMatch::Regex(re) => parts.push(format!("json {pointer} ~ /{re}/")),
            }
        }
        parts.join(", ")
    }

    /// Whether the filter reads the data (and so cannot judge an aggregate passed through whole).
    pub fn reads_data(&self) -> bool {
        self.data_prefix.is_some() || !self.json.is_empty()
    }
}

/// Where Kinesis is reached: `[aws]` for everything by default; `[source]` and each
/// `[[destinations]]` group may name their own region and endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AwsSettings {
    /// Region; `None` falls back to the SDK's default chain.
    pub region: Option<String>,
    /// Kinesis endpoint override, for emulators and VPC endpoints.
    pub endpoint_url: Option<String>,
    /// A role to assume for these streams (another account's writer role); `None`: the
    /// service's own identity.
    pub role: Option<AssumeRole>,
}

/// A role assumed through STS, with the SDK's own provider (cached, refreshed before expiry).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AssumeRole {
    pub role_arn: String,
    pub external_id: Option<String>,
    /// `None`: `kinesis-fanout-<worker id>`.
    pub session_name: Option<String>,
}

impl AwsSettings {
    /// These settings, with the region and endpoint they leave unset taken from `defaults` (a
    /// role is never inherited).
    pub fn or(&self, defaults: &AwsSettings) -> AwsSettings {
        AwsSettings {
            region: self.region.clone().or_else(|| defaults.region.clone()),
            endpoint_url: self.endpoint_url.clone().or_else(|| defaults.endpoint_url.clone()),
            role: self.role.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SourceSettings {
    pub stream_name: String,
    pub consumer_name: String,
    /// An Enhanced Fan-Out consumer registered by someone else, used instead of registering
    /// `consumer_name` (`source.consumer_arn`).
    pub consumer_arn: Option<String>,
    /// Where the source stream lives (`[source] region` / `endpoint_url`, else `[aws]`).
    pub aws: AwsSettings,
    /// Where to start a shard that has no checkpoint and no parent: `TrimHorizon`, `Latest` or
    /// `AtTimestamp`.
    pub initial_position: Position,
}

/// One `[[destinations]]` group: the streams whose names match `pattern` and none of `exclude`.
#[derive(Debug, Clone)]
pub struct DestinationGroup {
    pub pattern: Regex,
    pub exclude: Vec<Regex>,
    pub refresh_interval: Duration,
    pub records_per_second: Rate,
    pub bytes_per_second: Rate,
    pub max_in_flight_bytes: u64,
    pub linger: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub dead_letter_stream: Option<String>,
    /// `destinations[].kpl`, else `records.kpl`.
    pub kpl: KplMode,
    /// How long a destination's full buffer may hold a shard's live feed before the destination
    /// is detached and catches up on its own; `None` (`"off"`): the feed waits for it.
    pub detach_after: Option<Duration>,
    /// Where a destination new to a shard starts: `Latest` (records read after it appeared),
    /// `TrimHorizon` or `AtTimestamp` (backfilled through a catch-up while the live feed goes on).
    pub start_position: Position,
    /// Where the group's streams live (`region` / `endpoint_url` of the group, else `[aws]`).
    pub aws: AwsSettings,
    /// Only streams carrying every one of these tags (with these values) belong to the group.
    pub tags: std::collections::BTreeMap<String, String>,
    /// `destinations[].filter`: `None` takes every record.
    pub filter: Option<Filter>,
    /// `destinations[].ordering`.
    pub ordering: KeyOrder,
    /// `destinations[].streams`: the group's streams by ARN (streams in another account shared by
    /// a resource policy, which ListStreams never lists), instead of a pattern; then `pattern`
    /// matches no name.
    pub streams: Vec<String>,
}

impl DestinationGroup {
    /// How the group chooses its streams, for people: its pattern, or its ARNs.
    pub fn selection(&self) -> String {
        if self.streams.is_empty() { self.pattern.to_string() } else { format!("streams {}", self.streams.join(", ")) }
    }

    /// Whether a stream of this name belongs to the group.
    pub fn matches(&self, stream_name: &str) -> bool {
        self.pattern.is_match(stream_name) && !self.exclude.iter().any(|re| re.is_match(stream_name))
    }

    /// Whether a stream carrying `tags` has every tag the group asks for.
    pub fn has_tags(&self, tags: &std::collections::HashMap<String, String>) -> bool {
        self.tags.iter().all(|(key, value)| tags.get(key) == Some(value))
    }
}

#[derive(Debug, Clone)]
pub struct CheckpointSettings {
    pub backend: CheckpointBackend,
    pub interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointBackend {
    /// One JSON file, written atomically. For a single worker.
    File { path: PathBuf },
    /// A DynamoDB lease table shared by many workers, KCL-style.
    DynamoDb(LeaseSettings),
}

impl LeaseSettings {
    /// Where and as whom the table is reached: its own `region` and `role_arn`, else the
    /// source's (its endpoint is `endpoint_url`, never the Kinesis one).
    pub fn aws(&self, source: &AwsSettings) -> AwsSettings {
        AwsSettings {
            region: self.region.clone().or_else(|| source.region.clone()),
            endpoint_url: None,
            role: self.role.clone().or_else(|| source.role.clone()),
        }
    }
}

/// The lease table and how this worker takes part in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    pub table_name: String,
    /// DynamoDB endpoint override, for emulators.
    pub endpoint_url: Option<String>,
    /// Create the table (on-demand, hash key `leaseKey`) when missing.
    pub create_table: bool,
    /// A lease whose counter did not move for this long, as seen by this worker, is expired.
    pub failover_time: Duration,
    /// `None`: the ECS task id, else hostname plus a random suffix.
    pub worker_id: Option<String>,
    /// `[checkpoint] region` / `role_arn`: where and as whom the table is reached (`None`: as
    /// the source is).
    pub region: Option<String>,
    pub role: Option<AssumeRole>,
}

#[derive(Debug, Clone)]
pub struct MetricsSettings {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct ShutdownSettings {
    pub grace_period: Duration,
}

/// "Is my data all there yet?": the service is idle when every shard is caught up, every
/// destination accepted everything read, and nothing new arrived for `after`.
#[derive(Debug, Clone)]
pub struct IdleSettings {
    pub after: Duration,
    /// Receives one JSON document per busy-to-idle transition.
    pub webhook_url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing filter (`info`, `kinesis_fanout=debug,warn`); `RUST_LOG` overrides it.
    pub level: String,
}
