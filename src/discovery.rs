//! Destination discovery: which streams match the configured patterns, now and as they come and go.
//! Discovery lists, selects and diffs; the destinations supervisor acts on the differences.
//!
//! ListStreams (5 TPS per account) and DescribeStreamSummary (20 TPS) are shared with every other
//! client of the account, so discovery paces itself well below both and re-reads only every
//! `refresh_interval`. The source stream and dead-letter streams are never destinations, whatever
//! the patterns say: copying a stream into itself would never end.

use std::collections::{BTreeSet, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::aws::kinesis;
use crate::config::Settings;

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

/// What a discovery round found, against the destinations written to now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A matching stream that accepts writes, new or already known, with its open shard count.
    Writable { candidate: Candidate, arn: String, open_shards: u32 },
    /// A destination that is no longer one: deleted, being deleted, or no longer listed (and
    /// confirmed gone).
    Gone { name: String, why: &'static str },
}

/// Lists the account's streams, selects the destinations, and says what changed. It starts and
/// stops nothing: the destinations supervisor ([`crate::sink::supervisor`]) does.
pub struct Discovery {
    settings: Arc<Settings>,
    client: aws_sdk_kinesis::Client,
    list_pace: DefaultDirectRateLimiter,
    describe_pace: DefaultDirectRateLimiter,
}

impl Discovery {
    pub fn new(settings: Arc<Settings>, client: aws_sdk_kinesis::Client) -> Self {
        let per_second = |n: u32| RateLimiter::direct(Quota::per_second(NonZeroU32::new(n).expect("positive")));
        Discovery { settings, client, list_pace: per_second(1), describe_pace: per_second(5) }
    }

    /// How often the account is read again.
    pub fn interval(&self) -> Duration {
        self.settings.destinations.iter().map(|g| g.refresh_interval).min().unwrap_or(Duration::from_secs(30))
    }

    /// One discovery round against the destinations written to now (`current`).
    pub async fn changes(&self, current: &BTreeSet<String>) -> Result<Vec<Change>, DiscoveryError> {
        let names = list_stream_names(&self.client, Some(&self.list_pace)).await?;
        let candidates = select(&self.settings, names);
        let wanted: HashSet<&str> = candidates.iter().map(|c| c.name.as_str()).collect();
        let mut changes = Vec::new();
        for name in current.iter().filter(|n| !wanted.contains(n.as_str())) {
            // One ListStreams answer is not proof (pagination, eventual consistency): removing a
            // destination acknowledges what it still holds, so ask the stream itself first.
            if self.confirm_gone(name).await {
                changes.push(Change::Gone {
                    name: name.clone(),
                    why: "no longer listed, and DescribeStreamSummary confirms it",
                });
            }
        }
        for candidate in candidates {
            self.describe_pace.until_ready().await;
            let name = candidate.name.clone();
            match kinesis::describe_stream(&self.client, &name).await {
                Ok(Some(summary)) if summary.writable => {
                    changes.push(Change::Writable { candidate, arn: summary.arn, open_shards: summary.open_shards })
                }
                Ok(Some(summary)) if summary.deleting => changes.push(Change::Gone { name, why: "being deleted" }),
                Ok(Some(_)) => tracing::debug!(destination = %name, "Stream is not accepting writes yet."),
                Ok(None) => changes.push(Change::Gone { name, why: "deleted" }),
                Err(err) => {
                    tracing::warn!(destination = %name, error = %err, "DescribeStreamSummary failed; will try again next round.")
                }
            }
        }
        Ok(changes)
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
