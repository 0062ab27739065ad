//! One function per section of the file: raw values in, typed settings out, every problem
//! collected with its key.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::reader::Section;
use super::*;

fn parse_ordering(v: &str) -> Result<KeyOrder, String> {
    match v {
        "batched" => Ok(KeyOrder::Batched),
        "strict" => Ok(KeyOrder::Strict),
        other => Err(format!("`{other}` is not an ordering; use \"batched\" or \"strict\"")),
    }
}

pub(super) fn parse_kpl(v: &str) -> Result<KplMode, String> {
    match v {
        "reaggregate" => Ok(KplMode::Reaggregate),
        "deaggregate" => Ok(KplMode::Deaggregate),
        "passthrough" => Ok(KplMode::Passthrough),
        other => Err(format!("`{other}` is not a KPL mode; use \"reaggregate\", \"deaggregate\" or \"passthrough\"")),
    }
}

/// A Kinesis stream ARN's region, or why the text is not one
/// (`arn:PARTITION:kinesis:REGION:ACCOUNT:stream/NAME`).
pub fn stream_arn_region(arn: &str) -> Result<&str, String> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let valid = parts.len() == 6
        && parts[0] == "arn"
        && !parts[1].is_empty()
        && parts[2] == "kinesis"
        && parts[3].split('-').count() >= 3
        && parts[3].bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && parts[5].strip_prefix("stream/").is_some_and(|name| {
            (1..=128).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        });
    if valid {
        Ok(parts[3])
    } else {
        Err(format!("`{arn}` is not a Kinesis stream ARN like arn:aws:kinesis:us-east-1:111122223333:stream/name"))
    }
}

/// A place named by stream ARNs: the ARNs' region unless the section names one (then they must
/// agree). `key`: where the ARNs are.
fn place_of_arns(s: &mut Section<'_>, mut aws: AwsSettings, key: &str, arns: &[String]) -> AwsSettings {
    let regions: std::collections::BTreeSet<&str> = arns.iter().filter_map(|a| stream_arn_region(a).ok()).collect();
    if regions.len() > 1 {
        let listed: Vec<&str> = regions.iter().copied().collect();
        s.problem(
            key,
            format!("names streams in several regions ({}); one place per group: split it", listed.join(", ")),
        );
        return aws;
    }
    let Some(region) = regions.into_iter().next() else { return aws };
    match &aws.region {
        None => aws.region = Some(region.to_string()),
        Some(own) if own != region => {
            s.problem(key, format!("names streams in region {region}, but `region` here says {own}"));
        }
        Some(_) => {}
    }
    aws
}

pub(super) fn source_settings(s: &mut Section<'_>) -> SourceSettings {
    let stream_name = s.required_string("stream_name").unwrap_or_default();
    let consumer_name = s.string("consumer_name").unwrap_or_else(|| "kinesis-fanout".into());
    let initial_position = start_point(s, ("initial_position", "initial_timestamp"), "trim_horizon");
    let mut aws = place(s);
    // A stream in another account, shared by a resource policy, is named by its ARN.
    if stream_name.starts_with("arn:") {
        match stream_arn_region(&stream_name) {
            Ok(_) => aws = place_of_arns(s, aws, "stream_name", std::slice::from_ref(&stream_name)),
            Err(message) => s.problem("stream_name", message),
        }
    }
    let named_consumer = s.string("consumer_name").is_some();
    let consumer_arn = s.string("consumer_arn");
    if consumer_arn.is_some() && named_consumer {
        s.problem(
            "consumer_arn",
            "with consumer_name: the service uses the consumer consumer_arn names, so give one or the other",
        );
    }
    if let Some(arn) = &consumer_arn
        && !(arn.starts_with("arn:") && arn.contains(":stream/") && arn.contains("/consumer/"))
    {
        s.problem(
            "consumer_arn",
            format!("`{arn}` is not a consumer ARN (arn:aws:kinesis:REGION:ACCOUNT:stream/NAME/consumer/NAME:TIME)"),
        );
    }
    SourceSettings { stream_name, consumer_name, consumer_arn, initial_position, aws }
}

/// A place to start: `keys.0` = trim_horizon | latest | at_timestamp, with the RFC 3339 time in
/// `keys.1`, required with (and only with) at_timestamp. A bad value falls back to `default`
/// after its problem is noted.
fn start_point(s: &mut Section<'_>, keys: (&str, &str), default: &str) -> Position {
    let (position_key, timestamp_key) = keys;
    let timestamp = s.parsed_opt(timestamp_key, |v| {
        humantime::parse_rfc3339_weak(v)
            .map_err(|e| format!("`{v}` is not an RFC 3339 timestamp like 2026-11-01T00:00:00Z ({e})"))
    });
    let parse = |v: &str| match v {
        "trim_horizon" => Ok(Position::TrimHorizon),
        "latest" => Ok(Position::Latest),
        "at_timestamp" => Ok(Position::AtTimestamp(SystemTime::UNIX_EPOCH)),
        other => Err(format!("`{other}` is not one of trim_horizon, latest, at_timestamp")),
    };
    let fallback = parse(default).expect("a valid default");
    let position = s.parsed(position_key, default, parse).unwrap_or_else(|| fallback.clone());
    match (position, timestamp) {
        (Position::AtTimestamp(_), Some(at)) => Position::AtTimestamp(at),
        (Position::AtTimestamp(_), None) => {
            s.problem(timestamp_key, format!("required when {position_key} = \"at_timestamp\""));
            fallback
        }
        (other, Some(_)) => {
            s.problem(timestamp_key, format!("only allowed with {position_key} = \"at_timestamp\""));
            other
        }
        (other, None) => other,
    }
}

/// Where a section's streams live and as whom: `region`, `endpoint_url`, and `role_arn` with
/// its `external_id` and `session_name`.
fn place(s: &mut Section<'_>) -> AwsSettings {
    let role_arn = s.parsed_opt("role_arn", |v| {
        let parts: Vec<&str> = v.split(':').collect();
        let valid = parts.len() == 6
            && parts[0] == "arn"
            && parts[2] == "iam"
            && parts[4].len() == 12
            && parts[4].bytes().all(|b| b.is_ascii_digit())
            && parts[5].starts_with("role/");
        if valid {
            Ok(v.to_string())
        } else {
            Err(format!("`{v}` is not an IAM role ARN like arn:aws:iam::222222222222:role/name"))
        }
    });
    let external_id = s.string("external_id");
    let session_name = s.parsed_opt("session_name", |v| {
        let ok = (2..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"=,.@-_".contains(&b));
        if ok {
            Ok(v.to_string())
        } else {
            Err(format!("`{v}` is not a role session name (2 to 64 of A-Z a-z 0-9 =,.@-_)"))
        }
    });
    if role_arn.is_none() {
        for key in ["external_id", "session_name"] {
            if s.string(key).is_some() {
                s.problem(key, "only allowed with role_arn");
            }
        }
    }
    let role = role_arn.map(|role_arn| AssumeRole { role_arn, external_id, session_name });
    AwsSettings { region: s.string("region"), endpoint_url: s.string("endpoint_url"), role }
}

pub(super) fn destination_group(s: &mut Section<'_>, default_kpl: KplMode) -> Option<DestinationGroup> {
    // Streams named by ARN (shared by a resource policy; ListStreams never lists them), or a
    // pattern over the names ListStreams gives: one or the other.
    let streams = s.string_list("streams");
    let named = streams.as_ref().is_some_and(|v| !v.is_empty());
    let pattern = if named {
        if s.string("pattern").is_some() {
            s.problem("streams", "a group names its streams by ARN or by pattern, not both: split it in two groups");
        }
        Some(Regex::new("[^\\s\\S]").expect("a pattern that matches nothing"))
    } else {
        s.required_regex("pattern")
    };
    if let Some(arns) = &streams {
        for (i, arn) in arns.iter().enumerate() {
            if let Err(message) = stream_arn_region(arn) {
                s.problem(&format!("streams[{i}]"), message);
            }
        }
    }
    let exclude = s.regex_list("exclude");
    if named && exclude.as_ref().is_some_and(|e| !e.is_empty()) {
        s.problem("exclude", "only with a pattern: a group named by ARN lists exactly its streams");
    }
    let refresh_interval = s.duration("refresh_interval", "30s");
    let records_per_second = s.parsed("records_per_second", "auto", units::parse_record_rate);
    let bytes_per_second = s.parsed("bytes_per_second", "auto", units::parse_byte_rate);
    let max_in_flight_bytes = s.parsed("max_in_flight_bytes", "32MiB", |v| {
        let n = units::parse_bytes(v)?;
        if n < crate::record::MAX_RECORD_BYTES as u64 {
            return Err(format!("`{v}` is below 1MiB: the buffer must hold at least one record of the maximum size"));
        }
        Ok(n)
    });
    let linger = s.duration("linger", "50ms");
    let initial_backoff = s.duration("initial_backoff", "100ms");
    let max_backoff = s.duration("max_backoff", "10s");
    let dead_letter_stream = s.string("dead_letter_stream");
    let kpl = s.parsed_opt("kpl", parse_kpl).unwrap_or(default_kpl);
    let ordering = s.parsed_opt("ordering", parse_ordering).unwrap_or_default();
    let start_position = start_point(s, ("start_position", "start_timestamp"), "latest");
    let mut aws = place(s);
    if named {
        aws = place_of_arns(s, aws, "streams", streams.as_deref().unwrap_or_default());
    }
    let tags = s.string_map("tags");
    if named && tags.as_ref().is_some_and(|t| !t.is_empty()) {
        s.problem("tags", "only with a pattern: a group named by ARN lists exactly its streams");
    }
    if let Some(tags) = &tags {
        for (key, value) in tags {
            if key.is_empty() || key.chars().count() > 128 || value.chars().count() > 256 {
                s.problem(&format!("tags.{key}"), "a Kinesis tag key has 1 to 128 characters and a value at most 256");
            }
        }
    }
    let filter = s.section("filter", filter).flatten();
    if let (Some(filter), Some(KplMode::Passthrough)) = (&filter, Some(kpl))
        && filter.reads_data()
    {
        let keys = [("filter.data_prefix", filter.data_prefix.is_some()), ("filter.json", !filter.json.is_empty())];
        for (key, _) in keys.iter().filter(|(_, given)| *given) {
            s.problem(key, "cannot be checked with kpl = \"passthrough\": an aggregate passes whole, so only filter.partition_key can be (use \"deaggregate\" or \"reaggregate\")");
        }
    }
    let detach_after = s.parsed("detach_after", "10s", |v| match v {
        "off" => Ok(None),
        other => units::parse_duration(other).map(Some),
    });
    if initial_backoff.is_some_and(|d| d.is_zero()) {
        s.problem("initial_backoff", "must be more than 0: retries would not back off at all");
    }
    if let (Some(min), Some(max)) = (initial_backoff, max_backoff)
        && min > max
    {
        s.problem("initial_backoff", "must not exceed max_backoff");
    }
    if refresh_interval.is_some_and(|d| d < Duration::from_secs(1)) {
        s.problem("refresh_interval", "must be at least 1s: ListStreams allows 5 calls per second per account");
    }
    Some(DestinationGroup {
        pattern: pattern?,
        exclude: exclude?,
        refresh_interval: refresh_interval?,
        records_per_second: records_per_second?,
        bytes_per_second: bytes_per_second?,
        max_in_flight_bytes: max_in_flight_bytes?,
        linger: linger?,
        initial_backoff: initial_backoff?,
        max_backoff: max_backoff?,
        dead_letter_stream,
        kpl,
        detach_after: detach_after?,
        start_position,
        aws,
        tags: tags?,
        streams: streams?,
        filter,
        ordering,
    })
}

pub(super) fn checkpoint_settings(s: &mut Section<'_>) -> CheckpointSettings {
    let dynamodb = s.parsed("backend", "file", |v| match v {
        "file" => Ok(false),
        "dynamodb" => Ok(true),
        other => Err(format!("`{other}` is not a checkpoint backend; use \"file\" or \"dynamodb\"")),
    });
    let path = s.string("path").unwrap_or_else(|| "./data/checkpoints.json".into());
    let interval = s.duration("interval", "5s");
    if interval.is_some_and(|d| d.is_zero()) {
        s.problem("interval", "must be more than zero");
    }
    let table_name = s.string("table_name");
    let endpoint_url = s.string("endpoint_url");
    let create_table =
        s.parsed("create_table", "true", |v| v.parse::<bool>().map_err(|_| format!("`{v}` is not true or false")));
    let failover_time = s.duration("failover_time", "10s");
    if failover_time.is_some_and(|d| d < Duration::from_secs(1)) {
        s.problem("failover_time", "must be at least 1s");
    }
    let worker_id = s.string("worker_id");
    let region = s.string("region");
    let role = s.parsed_opt("role_arn", |v| {
        if v.starts_with("arn:") && v.contains(":role/") {
            Ok(AssumeRole { role_arn: v.to_string(), external_id: None, session_name: None })
        } else {
            Err(format!("`{v}` is not an IAM role ARN like arn:aws:iam::222222222222:role/name"))
        }
    });
    let backend = if dynamodb == Some(true) {
        if table_name.is_none() {
            s.problem("table_name", "is required with backend = \"dynamodb\"");
        }
        CheckpointBackend::DynamoDb(LeaseSettings {
            table_name: table_name.unwrap_or_default(),
            endpoint_url,
            create_table: create_table.unwrap_or(true),
            failover_time: failover_time.unwrap_or(Duration::from_secs(10)),
            worker_id,
            region,
            role,
        })
    } else {
        CheckpointBackend::File { path: PathBuf::from(path) }
    };
    CheckpointSettings { backend, interval: interval.unwrap_or(Duration::from_secs(5)) }
}

/// Keys people reach for when pasting credentials into a config file.
pub(super) const LITERAL_CREDENTIALS: [&str; 5] =
    ["access_key_id", "secret_access_key", "session_token", "aws_access_key_id", "aws_secret_access_key"];

/// Reports (without echoing it) any value that looks like an AWS access key id.
pub(super) fn reject_access_keys(value: &serde_json::Value, path: &str, problems: &mut Vec<Problem>) {
    match value {
        serde_json::Value::String(text) => {
            let looks_like_key = text.len() == 20
                && (text.starts_with("AKIA") || text.starts_with("ASIA"))
                && text.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
            if looks_like_key {
                problems.push(Problem {
                    key: path.to_string(),
                    message: "holds what looks like an AWS access key id; credentials come from the SDK's chain, \
                              never from the configuration"
                        .into(),
                });
            }
        }
        serde_json::Value::Object(map) => {
            for (key, child) in map {
                let path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                reject_access_keys(child, &path, problems);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                reject_access_keys(child, &format!("{path}[{i}]"), problems);
            }
        }
        _ => {}
    }
}

/// `destinations[].filter`; `None` when the table names no condition.
fn filter(s: &mut Section<'_>) -> Option<Filter> {
    let partition_key = s.parsed_opt("partition_key", |v| {
        Regex::new(v).map_err(|e| format!("`{v}` is not a valid regular expression: {e}"))
    });
    let data_prefix = s.parsed_opt("data_prefix", |v| match v.strip_prefix("base64:") {
        Some(encoded) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| format!("`{v}` is not base64 after `base64:` ({e})"))
        }
        None => Ok(v.as_bytes().to_vec()),
    });
    let mut json = Vec::new();
    match s.raw("json") {
        None => {}
        Some(serde_json::Value::Object(conditions)) => {
            for (pointer, wanted) in conditions {
                let key = format!("json.\"{pointer}\"");
                if !(pointer.is_empty() || pointer.starts_with('/')) {
                    s.problem(&key, "a JSON pointer starts with / (like \"/type\" or \"/order/region\")");
                    continue;
                }
                let text = |v: &serde_json::Value| match v {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    serde_json::Value::Bool(b) => Some(b.to_string()),
                    _ => None,
                };
                let matched = match wanted {
                    serde_json::Value::Array(values) if values.is_empty() => {
                        s.problem(&key, "is an empty list: no record would match");
                        continue;
                    }
                    serde_json::Value::Array(values) => {
                        values.iter().map(text).collect::<Option<Vec<_>>>().map(JsonMatch::OneOf).ok_or(())
                    }
                    serde_json::Value::Object(table) if table.len() == 1 && table.contains_key("regex") => {
                        match table.get("regex").and_then(|r| r.as_str()).map(Regex::new) {
                            Some(Ok(re)) => Ok(JsonMatch::Regex(re)),
                            Some(Err(e)) => {
                                s.problem(&key, format!("not a valid regular expression: {e}"));
                                continue;
                            }
                            None => Err(()),
                        }
                    }
                    other => text(other).map(|v| JsonMatch::OneOf(vec![v])).ok_or(()),
                };
                match matched {
                    Ok(m) => json.push((pointer.clone(), m)),
                    Err(()) => s.problem(
                        &key,
                        "must be a value, a list of values, or { regex = \"...\" } (values are text, numbers or booleans)",
                    ),
                }
            }
        }
        Some(_) => s.problem("json", "must be a table of JSON pointers to values, like { \"/type\" = \"order\" }"),
    }
    if data_prefix.as_ref().is_some_and(Vec::is_empty) {
        s.problem("data_prefix", "is empty: every record would match; leave the key out instead");
    }
    if let Some(serde_json::Value::Object(conditions)) = s.raw("json")
        && conditions.is_empty()
    {
        s.problem("json", "names no condition: leave the key out, or name a JSON pointer and its value");
    }
    let any = partition_key.is_some() || data_prefix.is_some() || !json.is_empty();
    if !any
        && s.present()
        && s.raw("partition_key").is_none()
        && s.raw("data_prefix").is_none()
        && s.raw("json").is_none()
    {
        // `filter = {}`: a filter that names nothing would take every record, silently.
        s.problem("", "names no condition: give partition_key, data_prefix or json, or leave the filter out");
    }
    any.then_some(Filter { partition_key, data_prefix, json })
}
