//! Destination discovery: which streams match the configured patterns, now and as they come and go.
//! Discovery lists, selects and diffs; the destinations supervisor acts on the differences.
//!
//! ListStreams (5 TPS per account) and DescribeStreamSummary (20 TPS) are shared with every other
//! client of the account, so discovery paces itself well below both and re-reads only every
//! `refresh_interval`. The source stream and dead-letter streams are never destinations, whatever
//! the patterns say: copying a stream into itself would never end.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::aws::kinesis;
use crate::config::{AwsSettings, Settings};

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
    /// Which of the places destinations live in (`Settings::destination_places`).
    pub place: usize,
}

/// Filters the stream names of one place down to destinations, with the group each belongs to,
/// by name only: a group that asks for tags matches nothing here (discovery reads the tags).
pub fn select(settings: &Settings, place: usize, names: impl IntoIterator<Item = String>) -> Vec<Candidate> {
    let Some(aws) = settings.destination_places().into_iter().nth(place) else { return Vec::new() };
    names
        .into_iter()
        .filter_map(|name| match explain(settings, &aws, &name, None) {
            Verdict::Destination(group) => Some(Candidate { name, group, place }),
            Verdict::Not(_) => None,
        })
        .collect()
}

/// Whether a stream of `place` is a destination, and of which group, or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Destination(usize),
    Not(String),
}

/// Decides one stream of `place` as discovery does, its tags read when a group asks for tags
/// (`dead-letters replay` resolves the destinations its letters name with it). A tag read that
/// fails decides nothing: an error, never "not a destination".
pub async fn decide(
    settings: &Settings,
    place: &AwsSettings,
    client: &aws_sdk_kinesis::Client,
    name: &str,
) -> Result<Verdict, crate::aws::CallError> {
    let tags = if settings.needs_tags(place, name) { Some(kinesis::list_tags(client, name).await?) } else { None };
    Ok(explain(settings, place, name, tags.as_ref()))
}

/// The region and account of a stream ARN (`arn:aws:kinesis:<region>:<account>:stream/<name>`).
pub fn arn_place(arn: &str) -> (&str, &str) {
    let mut parts = arn.split(':').skip(3);
    (parts.next().unwrap_or(""), parts.next().unwrap_or(""))
}

/// Decides one stream of `place` (`tags`: its tags, when read). The source stream and
/// dead-letter streams are never destinations, whatever the patterns say; a stream of the
/// source's name in another region or account is (a disaster-recovery copy).
pub fn explain(settings: &Settings, place: &AwsSettings, name: &str, tags: Option<&Tags>) -> Verdict {
    if settings.source.aws == *place && settings.source.stream_name == name {
        return Verdict::Not("the source stream itself".into());
    }
    let here = || settings.destinations.iter().enumerate().filter(|(_, g)| g.aws == *place);
    if here().any(|(_, g)| g.dead_letter_stream.as_deref() == Some(name)) {
        return Verdict::Not("a dead-letter stream".into());
    }
    if let Some(group) = settings.group_for(place, name, tags) {
        return Verdict::Destination(group);
    }
    for (i, group) in here().filter(|(_, g)| g.pattern.is_match(name)) {
        if let Some(re) = group.exclude.iter().find(|re| re.is_match(name)) {
            return Verdict::Not(format!("excluded by group {i}'s exclude `{re}`"));
        }
        if !group.tags.is_empty() {
            let wanted: Vec<String> = group.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
            return Verdict::Not(format!("lacks group {i}'s tags {}", wanted.join(", ")));
        }
    }
    Verdict::Not("matches no group's pattern".into())
}

/// What each group of `place` thinks of a stream: `None` when it matches, else why not (its
/// pattern, an exclude, its tags). The source and dead-letter streams are decided before any
/// group is asked ([`explain`]).
pub fn group_opinions(
    settings: &Settings,
    place: &AwsSettings,
    name: &str,
    tags: Option<&Tags>,
) -> Vec<(usize, Option<String>)> {
    let here = settings.destinations.iter().enumerate().filter(|(_, g)| g.aws == *place);
    here.map(|(i, group)| {
        let why = if !group.streams.is_empty() {
            (!group.streams.iter().any(|arn| arn == name)).then(|| "not one of the streams it names by ARN".to_string())
        } else if !group.pattern.is_match(name) {
            Some(format!("pattern `{}` does not match", group.pattern))
        } else if let Some(re) = group.exclude.iter().find(|re| re.is_match(name)) {
            Some(format!("excluded by `{re}`"))
        } else if !group.tags.is_empty() && !tags.is_some_and(|t| group.has_tags(t)) {
            let wanted: Vec<String> = group.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
            Some(format!("lacks the tags {}", wanted.join(", ")))
        } else {
            None
        };
        (i, why)
    })
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
    Writable { candidate: Candidate, arn: String, open_shards: u32, limits: crate::record::StreamLimits },
    /// A destination that is no longer one: deleted, being deleted, or no longer listed (and
    /// confirmed gone).
    Gone { place: usize, name: String, why: &'static str },
}

/// A stream's tags, by key.
pub type Tags = HashMap<String, String>;

/// One place destinations live in, read with its own client and its own pace (ListStreams,
/// ListTagsForStream and DescribeStreamSummary limits are per account and region).
struct Place {
    aws: AwsSettings,
    client: aws_sdk_kinesis::Client,
    list_pace: DefaultDirectRateLimiter,
    describe_pace: DefaultDirectRateLimiter,
    tags_pace: DefaultDirectRateLimiter,
    /// Each stream's tags as last read, and when: read again only every refresh interval.
    tags: Mutex<HashMap<String, (tokio::time::Instant, Tags)>>,
}

/// Lists each place's streams, selects the destinations, and says what changed. It starts and
/// stops nothing: the destinations supervisor ([`crate::sink::supervisor`]) does.
pub struct Discovery {
    settings: Arc<Settings>,
    places: Vec<Place>,
}

impl Discovery {
    /// `clients`: one control client per place of `settings.destination_places()`, in order.
    pub fn new(settings: Arc<Settings>, clients: Vec<aws_sdk_kinesis::Client>) -> Self {
        let per_second = |n: u32| RateLimiter::direct(Quota::per_second(NonZeroU32::new(n).expect("positive")));
        let places = settings
            .destination_places()
            .into_iter()
            .zip(clients)
            .map(|(aws, client)| Place {
                aws,
                client,
                list_pace: per_second(1),
                describe_pace: per_second(5),
                tags_pace: per_second(2),
                tags: Mutex::default(),
            })
            .collect();
        Discovery { settings, places }
    }

    /// How often the places are read again.
    pub fn interval(&self) -> Duration {
        self.settings.destinations.iter().map(|g| g.refresh_interval).min().unwrap_or(Duration::from_secs(30))
    }

    /// One discovery round against the destinations written to now (`current`: place and
    /// stream name). A place that cannot be listed keeps its destinations; the others go on (an
    /// error only when no place could be listed).
    pub async fn changes(&self, current: &BTreeSet<(usize, String)>) -> Result<Vec<Change>, DiscoveryError> {
        let mut changes = Vec::new();
        let (mut listed, mut failure) = (false, None);
        for (index, place) in self.places.iter().enumerate() {
            let here: BTreeSet<String> = current.iter().filter(|(p, _)| *p == index).map(|(_, n)| n.clone()).collect();
            match self.place_changes(index, place, &here).await {
                Ok(found) => {
                    listed = true;
                    changes.extend(found);
                }
                Err(err) => {
                    tracing::warn!(place = ?self.settings.destination_places().get(index), error = %crate::aws::chain(&err), "Cannot list this place's streams; keeping its destinations known so far.");
                    failure = Some(err);
                }
            }
        }
        match failure {
            Some(err) if !listed => Err(err),
            _ => Ok(changes),
        }
    }

    async fn place_changes(
        &self,
        index: usize,
        place: &Place,
        current: &BTreeSet<String>,
    ) -> Result<Vec<Change>, DiscoveryError> {
        // A place whose groups all name their streams by ARN lists nothing (its identity may
        // hold no ListStreams permission at all: a resource policy grants only what it names).
        let by_pattern = self.settings.destinations.iter().any(|g| g.aws == place.aws && g.streams.is_empty());
        let names =
            if by_pattern { list_stream_names(&place.client, Some(&place.list_pace)).await? } else { Vec::new() };
        let listed: HashSet<String> = names.iter().cloned().collect();
        // The tags of a destination left out of one answer are kept: one answer is no proof.
        place
            .tags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| listed.contains(name) || current.contains(name));
        let (mut candidates, unknown) = self.candidates(index, place, names).await;
        // Streams named by ARN are never listed (another account's, shared by a resource
        // policy): they are candidates every round, and go only when DescribeStreamSummary says
        // they were deleted.
        let here = self.settings.destinations.iter().filter(|g| g.aws == place.aws);
        for arn in here.flat_map(|g| &g.streams) {
            if candidates.iter().any(|c| &c.name == arn) {
                continue;
            }
            if let Verdict::Destination(group) = explain(&self.settings, &place.aws, arn, None) {
                candidates.push(Candidate { name: arn.clone(), group, place: index });
            }
        }
        let wanted: HashSet<&str> = candidates.iter().map(|c| c.name.as_str()).collect();
        let mut changes = Vec::new();
        for name in current.iter().filter(|n| !wanted.contains(n.as_str())) {
            if unknown.contains(name) {
                // Its tags could not be read: nothing says they changed.
                tracing::warn!(destination = %name, "The tags of this destination could not be read; keeping it until they can.");
                continue;
            }
            // No group names it or matches its name any more (a reloaded configuration): gone
            // from the selection whether listed or not (a stream named by ARN never is).
            let named = self.settings.destinations.iter().any(|g| {
                g.aws == place.aws
                    && (g.streams.iter().any(|arn| arn == name) || (g.streams.is_empty() && g.matches(name)))
            });
            if !named {
                changes.push(Change::Gone {
                    place: index,
                    name: name.clone(),
                    why: "no group of the configuration selects it any more",
                });
                continue;
            }
            if listed.contains(name) {
                // Listed but not selected: its tags (read this round or last read within the
                // refresh interval) no longer say it belongs to its group, or a reloaded
                // configuration's groups do not select it.
                changes.push(Change::Gone {
                    place: index,
                    name: name.clone(),
                    why: "no group selects it any more (its tags, or a reloaded configuration)",
                });
                continue;
            }
            // One ListStreams answer is not proof (pagination, eventual consistency): removing a
            // destination acknowledges what it still holds, so ask the stream itself first.
            if confirm_gone(place, name).await {
                changes.push(Change::Gone {
                    place: index,
                    name: name.clone(),
                    why: "no longer listed, and DescribeStreamSummary confirms it",
                });
            }
        }
        for candidate in candidates {
            place.describe_pace.until_ready().await;
            let name = candidate.name.clone();
            match kinesis::describe_stream(&place.client, &name).await {
                Ok(Some(summary)) if summary.writable => changes.push(Change::Writable {
                    candidate,
                    arn: summary.arn,
                    open_shards: summary.open_shards,
                    limits: summary.limits,
                }),
                Ok(Some(summary)) if summary.deleting => {
                    changes.push(Change::Gone { place: index, name, why: "being deleted" })
                }
                Ok(Some(_)) => tracing::debug!(destination = %name, "Stream is not accepting writes yet."),
                Ok(None) => changes.push(Change::Gone { place: index, name, why: "deleted" }),
                Err(err) => {
                    tracing::warn!(destination = %name, error = %err, "DescribeStreamSummary failed; will try again next round.")
                }
            }
        }
        Ok(changes)
    }
}

impl Discovery {
    /// The destinations among a place's streams, reading the tags of those whose group asks for
    /// tags (once, then again only every refresh interval; the last tags known stand in when a
    /// read fails), and the streams whose tags are needed but unknown (a read failed and none
    /// was read before): those are neither selected nor removed.
    async fn candidates(&self, index: usize, place: &Place, names: Vec<String>) -> (Vec<Candidate>, HashSet<String>) {
        let (mut out, mut unknown) = (Vec::new(), HashSet::new());
        for name in names {
            let tags = if self.settings.needs_tags(&place.aws, &name) {
                let tags = self.tags_of(place, &name).await;
                if tags.is_none() {
                    unknown.insert(name.clone());
                    continue;
                }
                tags
            } else {
                None
            };
            if let Verdict::Destination(group) = explain(&self.settings, &place.aws, &name, tags.as_ref()) {
                out.push(Candidate { name, group, place: index });
            }
        }
        (out, unknown)
    }

    async fn tags_of(&self, place: &Place, name: &str) -> Option<Tags> {
        let known = place.tags.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned();
        if let Some((read_at, tags)) = &known
            && read_at.elapsed() < self.interval()
        {
            return Some(tags.clone());
        }
        place.tags_pace.until_ready().await;
        match kinesis::list_tags(&place.client, name).await {
            Ok(tags) => {
                let now = tokio::time::Instant::now();
                place.tags.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), (now, tags.clone()));
                Some(tags)
            }
            Err(err) => {
                tracing::warn!(stream = %name, error = %err, "ListTagsForStream failed; using the tags last read, if any, and trying again next round.");
                known.map(|(_, tags)| tags)
            }
        }
    }
}

/// Whether a stream missing from ListStreams is really gone (deleted or being deleted); a
/// failed check keeps the destination until the next round.
async fn confirm_gone(place: &Place, name: &str) -> bool {
    place.describe_pace.until_ready().await;
    match kinesis::stream_gone(&place.client, name).await {
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
        let selected: Vec<String> = select(&settings, 0, names.map(String::from)).into_iter().map(|c| c.name).collect();
        assert_eq!(selected, vec!["app-output-a".to_string()]);
    }

    #[test]
    fn the_sources_name_in_another_region_is_a_destination() {
        let settings = Settings::from_toml(
            r#"
            [aws]
            region = "us-east-1"
            [source]
            stream_name = "orders"
            [[destinations]]
            pattern = "^orders$"
            [[destinations]]
            pattern = "^orders$"
            region = "eu-west-1"
            dead_letter_stream = "orders-dlq"
            "#,
        )
        .unwrap();
        let home = select(&settings, 0, ["orders".to_string()]);
        assert!(home.is_empty(), "the source itself is never a destination");
        let dr = select(&settings, 1, ["orders".to_string(), "orders-dlq".to_string()]);
        assert_eq!(dr, vec![Candidate { name: "orders".into(), group: 1, place: 1 }]);
    }
}
