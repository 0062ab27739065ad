//! `kinesis-fanout check`: what the service would do with this configuration, without doing it.
//! For the source and for each place destination groups live in (region, endpoint, identity): the
//! region and account it resolved, the identity it uses (its own, or the role it assumed), and
//! every stream listed there, matched (with its group) or not a destination and why (the source
//! itself, a dead-letter stream, an exclude, missing tags, no pattern), or unreachable.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::aws::KinesisClients;
use crate::aws::credentials::Identities;
use crate::aws::kinesis;
use crate::config::{AwsSettings, Settings};
use crate::discovery::{Verdict, explain};
use crate::source::SourceError;

/// The check's report, one line per fact; an unreadable source is an error.
pub async fn report(settings: &Settings, sdk: &aws_config::SdkConfig) -> Result<String, SourceError> {
    let identities = Identities {
        sdk: sdk.clone(),
        sts_endpoint_url: settings.sts_endpoint_url.clone(),
        worker: "check".into(),
        metrics: Arc::default(),
        health: Arc::default(),
    };
    let timeout = settings.put_attempt_timeout();
    let mut out = String::new();
    let source = &settings.source.aws;
    let credentials = identities.provider(source.role.as_ref(), source.region.as_deref(), "source").await;
    let clients = KinesisClients::new(sdk, source, credentials, timeout);
    let stream = crate::source::resolve_stream(&clients.control, &settings.source.stream_name).await?;
    let _ = writeln!(
        out,
        "source: {} ({} open shards) in {}, as {}",
        stream.name,
        stream.open_shards,
        where_(source, None),
        who(source)
    );
    for (index, aws) in settings.destination_places().iter().enumerate() {
        let groups: Vec<String> = settings
            .destinations
            .iter()
            .enumerate()
            .filter(|(_, g)| g.aws == *aws)
            .map(|(i, g)| format!("{i} ({})", g.pattern))
            .collect();
        let label = format!("destinations[{index}]");
        let credentials = identities.provider(aws.role.as_ref(), aws.region.as_deref(), &label).await;
        let clients = KinesisClients::new(sdk, aws, credentials, timeout);
        let names = match kinesis::list_stream_names(&clients.control, None).await {
            Ok(names) => names,
            Err(err) => {
                let _ = writeln!(out, "groups {} in {}, as {}:", groups.join(", "), where_(aws, None), who(aws));
                let _ = writeln!(out, "  unreachable: ListStreams failed: {err}");
                continue;
            }
        };
        let mut lines = Vec::new();
        let mut account = None;
        for name in names {
            let tags = if settings.needs_tags(aws, &name) {
                match kinesis::list_tags(&clients.control, &name).await {
                    Ok(tags) => Some(tags),
                    Err(err) => {
                        lines.push(format!("  {name}: unreachable: ListTagsForStream failed: {err}"));
                        continue;
                    }
                }
            } else {
                None
            };
            match explain(settings, aws, &name, tags.as_ref()) {
                Verdict::Destination(group) => match kinesis::describe_stream(&clients.control, &name).await {
                    Ok(Some(summary)) => {
                        account = account.or_else(|| summary.arn.split(':').nth(4).map(str::to_string));
                        let state = if summary.writable { "" } else { ", not accepting writes yet" };
                        lines.push(format!(
                            "  {name}: destination (group {group}: {}), {} open shards{state}",
                            settings.destinations[group].pattern, summary.open_shards
                        ));
                    }
                    Ok(None) => lines.push(format!("  {name}: unreachable: the stream does not exist any more")),
                    Err(err) => lines.push(format!("  {name}: unreachable: DescribeStreamSummary failed: {err}")),
                },
                Verdict::Not(why) => lines.push(format!("  {name}: not a destination: {why}")),
            }
        }
        let _ = writeln!(out, "groups {} in {}, as {}:", groups.join(", "), where_(aws, account.as_deref()), who(aws));
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
    }
    Ok(out)
}

/// "region eu-west-1 (account 222222222222) at http://..." as far as known.
fn where_(aws: &AwsSettings, account: Option<&str>) -> String {
    let mut text = format!("region {}", aws.region.as_deref().unwrap_or("from the SDK's default chain"));
    if let Some(account) = account {
        let _ = write!(text, " (account {account})");
    }
    if let Some(url) = &aws.endpoint_url {
        let _ = write!(text, " at {url}");
    }
    text
}

/// The identity calls are made with.
fn who(aws: &AwsSettings) -> String {
    match &aws.role {
        Some(role) => format!("assumed role {}", role.role_arn),
        None => "the service's own credentials (the SDK's default chain)".into(),
    }
}
