//! `kinesis-fanout check`: what the service would do with this configuration, without doing it.
//! For the source and for each place destination groups live in (region, endpoint, identity): the
//! region and account it resolved, the identity it uses (its own, or the role it assumed), and
//! every stream listed there, matched (with its group) or not a destination and why (the source
//! itself, a dead-letter stream, an exclude, missing tags, no pattern), or unreachable. With
//! `--explain`, what every group of the place thought of every stream; with `--json`, the same
//! as one JSON document.

use std::fmt::Write as _;
use std::sync::Arc;

use serde::Serialize;

use crate::aws::KinesisClients;
use crate::aws::credentials::Identities;
use crate::aws::kinesis;
use crate::config::{AwsSettings, Settings};
use crate::discovery::{Verdict, explain, group_opinions};
use crate::source::SourceError;

/// What `check` found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub source: SourceReport,
    pub places: Vec<PlaceReport>,
}

#[derive(Debug, Serialize)]
pub struct SourceReport {
    pub stream: String,
    pub open_shards: u32,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// The role assumed, if any.
    pub role_arn: Option<String>,
}

/// One region and identity destination groups use.
#[derive(Debug, Serialize)]
pub struct PlaceReport {
    pub groups: Vec<usize>,
    /// Each group's filter (`destinations[].filter`), by group, for groups that have one.
    pub filters: std::collections::BTreeMap<usize, String>,
    /// Each group's ordering (`destinations[].ordering`: batched or strict), by group.
    pub ordering: std::collections::BTreeMap<usize, &'static str>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// From the ARN of a stream found there.
    pub account: Option<String>,
    pub role_arn: Option<String>,
    /// ListStreams failed: nothing else is known of this place.
    pub unreachable: Option<String>,
    pub streams: Vec<StreamReport>,
}

#[derive(Debug, Serialize)]
pub struct StreamReport {
    pub name: String,
    /// `destination`, `not a destination` or `unreachable`.
    pub verdict: &'static str,
    /// Its group, when a destination.
    pub group: Option<usize>,
    /// Why not a destination, or why unreachable.
    pub why: Option<String>,
    pub open_shards: Option<u32>,
    /// The largest record it takes (its `MaxRecordSizeInKiB`), when a destination.
    pub max_record_bytes: Option<usize>,
    /// What each group of the place thought of it (`--explain`).
    pub groups: Vec<GroupOpinion>,
}

#[derive(Debug, Serialize)]
pub struct GroupOpinion {
    pub group: usize,
    pub pattern: String,
    /// `None`: this group matches the stream.
    pub rejects: Option<String>,
}

/// Looks at the source and every place; an unreadable source is an error.
pub async fn report(settings: &Settings, sdk: &aws_config::SdkConfig) -> Result<Report, SourceError> {
    let identities = Identities {
        sdk: sdk.clone(),
        sts_endpoint_url: settings.sts_endpoint_url.clone(),
        worker: "check".into(),
        metrics: Arc::default(),
        health: Arc::default(),
    };
    let timeout = settings.put_attempt_timeout();
    let source = &settings.source.aws;
    let credentials = identities.provider(source.role.as_ref(), source.region.as_deref(), "source").await;
    let clients = KinesisClients::new(sdk, source, credentials, timeout);
    let stream = crate::source::resolve_stream(&clients.control, &settings.source.stream_name).await?;
    let mut places = Vec::new();
    for (index, aws) in settings.destination_places().iter().enumerate() {
        let credentials =
            identities.provider(aws.role.as_ref(), aws.region.as_deref(), &format!("destinations[{index}]")).await;
        let clients = KinesisClients::new(sdk, aws, credentials, timeout);
        places.push(place_report(settings, aws, &clients.control, &stream.arn).await);
    }
    Ok(Report {
        source: SourceReport {
            stream: stream.name,
            open_shards: stream.open_shards,
            region: source.region.clone(),
            endpoint_url: source.endpoint_url.clone(),
            role_arn: source.role.as_ref().map(|r| r.role_arn.clone()),
        },
        places,
    })
}

async fn place_report(
    settings: &Settings,
    aws: &AwsSettings,
    client: &aws_sdk_kinesis::Client,
    source_arn: &str,
) -> PlaceReport {
    let mut place = PlaceReport {
        groups: settings.destinations.iter().enumerate().filter(|(_, g)| g.aws == *aws).map(|(i, _)| i).collect(),
        filters: settings
            .destinations
            .iter()
            .enumerate()
            .filter(|(_, g)| g.aws == *aws)
            .filter_map(|(i, g)| Some((i, g.filter.as_ref()?.describe())))
            .collect(),
        ordering: settings
            .destinations
            .iter()
            .enumerate()
            .filter(|(_, g)| g.aws == *aws)
            .map(|(i, g)| (i, g.ordering.as_str()))
            .collect(),
        region: aws.region.clone(),
        endpoint_url: aws.endpoint_url.clone(),
        account: None,
        role_arn: aws.role.as_ref().map(|r| r.role_arn.clone()),
        unreachable: None,
        streams: Vec::new(),
    };
    // As discovery: a place whose groups all name their streams by ARN lists nothing.
    let by_pattern = settings.destinations.iter().any(|g| g.aws == *aws && g.streams.is_empty());
    let mut names = if by_pattern {
        match kinesis::list_stream_names(client, None).await {
            Ok(names) => names,
            Err(err) => {
                place.unreachable = Some(format!("ListStreams failed: {err}"));
                return place;
            }
        }
    } else {
        Vec::new()
    };
    // Streams named by ARN are never listed: each is described (reachable, writable, limits).
    for arn in settings.destinations.iter().filter(|g| g.aws == *aws).flat_map(|g| &g.streams) {
        if !names.contains(arn) {
            names.push(arn.clone());
        }
    }
    for name in names {
        let mut stream = StreamReport {
            name,
            verdict: "",
            group: None,
            why: None,
            open_shards: None,
            max_record_bytes: None,
            groups: Vec::new(),
        };
        let tags = if settings.needs_tags(aws, &stream.name) {
            match kinesis::list_tags(client, &stream.name).await {
                Ok(tags) => Some(tags),
                Err(err) => {
                    stream.verdict = "unreachable";
                    stream.why = Some(format!("ListTagsForStream failed: {err}"));
                    place.streams.push(stream);
                    continue;
                }
            }
        } else {
            None
        };
        stream.groups = group_opinions(settings, aws, &stream.name, tags.as_ref())
            .into_iter()
            .map(|(group, rejects)| GroupOpinion { group, pattern: settings.destinations[group].selection(), rejects })
            .collect();
        match explain(settings, aws, &stream.name, tags.as_ref()) {
            Verdict::Destination(group) => match kinesis::describe_stream(client, &stream.name).await {
                // The source, named in another way (by ARN, or by name): as the service, never a
                // destination.
                Ok(Some(summary)) if summary.arn == source_arn => {
                    stream.verdict = "not a destination";
                    stream.why = Some("the source stream itself".into());
                }
                Ok(Some(summary)) => {
                    place.account = place.account.or_else(|| summary.arn.split(':').nth(4).map(str::to_string));
                    stream.verdict = "destination";
                    stream.group = Some(group);
                    stream.open_shards = Some(summary.open_shards);
                    stream.max_record_bytes = Some(summary.limits.max_record_bytes);
                    if !summary.writable {
                        stream.why = Some("not accepting writes yet".into());
                    }
                }
                Ok(None) => {
                    stream.verdict = "unreachable";
                    stream.why = Some("the stream does not exist any more".into());
                }
                Err(err) => {
                    stream.verdict = "unreachable";
                    stream.why = Some(format!("DescribeStreamSummary failed: {err}"));
                }
            },
            Verdict::Not(why) => {
                stream.verdict = "not a destination";
                stream.why = Some(why);
            }
        }
        place.streams.push(stream);
    }
    place
}

impl Report {
    /// The human report; `explain`: with every group's opinion of every stream.
    pub fn render(&self, settings: &Settings, explain: bool) -> String {
        let mut out = String::new();
        let s = &self.source;
        let _ = writeln!(
            out,
            "source: {} ({} open shards) in {}, as {}",
            s.stream,
            s.open_shards,
            where_(s.region.as_deref(), None, s.endpoint_url.as_deref()),
            who(s.role_arn.as_deref())
        );
        for place in &self.places {
            let groups: Vec<String> =
                place.groups.iter().map(|i| format!("{i} ({})", settings.destinations[*i].selection())).collect();
            let _ = writeln!(
                out,
                "groups {} in {}, as {}:",
                groups.join(", "),
                where_(place.region.as_deref(), place.account.as_deref(), place.endpoint_url.as_deref()),
                who(place.role_arn.as_deref())
            );
            for (group, filter) in &place.filters {
                let _ = writeln!(out, "  group {group} takes only records with: {filter}");
            }
            for (group, ordering) in place.ordering.iter().filter(|(_, o)| explain || **o == "strict") {
                let how = match *ordering {
                    "strict" => "one record per key in flight (strict)",
                    _ => "requests as full as they fit (batched)",
                };
                let _ = writeln!(out, "  group {group} ordering: {how}");
            }
            if let Some(why) = &place.unreachable {
                let _ = writeln!(out, "  unreachable: {why}");
            }
            for stream in &place.streams {
                let line = match (stream.verdict, stream.group) {
                    ("destination", Some(group)) => format!(
                        "destination (group {group}: {}), {} open shards, records up to {}{}",
                        settings.destinations[group].selection(),
                        stream.open_shards.unwrap_or_default(),
                        stream.max_record_bytes.map_or("1 MiB".to_string(), |b| format!("{} KiB", b / 1024)),
                        stream.why.as_deref().map(|w| format!(", {w}")).unwrap_or_default()
                    ),
                    (verdict, _) => format!("{verdict}: {}", stream.why.as_deref().unwrap_or_default()),
                };
                let _ = writeln!(out, "  {}: {line}", stream.name);
                if explain {
                    let won = stream.group;
                    for opinion in &stream.groups {
                        let view = match (&opinion.rejects, won) {
                            (None, Some(w)) if w == opinion.group => "matches: the stream is this group's".to_string(),
                            (None, Some(w)) => {
                                format!("matches too, but group {w} came first: the first matching group wins")
                            }
                            (None, None) => "matches".to_string(),
                            (Some(why), _) => format!("does not match: {why}"),
                        };
                        let _ = writeln!(out, "      group {} ({}): {view}", opinion.group, opinion.pattern);
                    }
                }
            }
        }
        out
    }
}

/// "region eu-west-1 (account 222222222222) at http://..." as far as known.
fn where_(region: Option<&str>, account: Option<&str>, endpoint: Option<&str>) -> String {
    let mut text = format!("region {}", region.unwrap_or("from the SDK's default chain"));
    if let Some(account) = account {
        let _ = write!(text, " (account {account})");
    }
    if let Some(url) = endpoint {
        let _ = write!(text, " at {url}");
    }
    text
}

/// The identity calls are made with.
fn who(role: Option<&str>) -> String {
    match role {
        Some(role) => format!("assumed role {role}"),
        None => "the service's own credentials (the SDK's default chain)".into(),
    }
}
