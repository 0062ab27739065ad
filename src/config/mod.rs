//! Configuration: one TOML file read with the `config` crate, every key overridable from the
//! environment as `KINESIS_FANOUT__<SECTION>__<KEY>` (array entries by index:
//! `KINESIS_FANOUT__DESTINATIONS__0__PATTERN`).
//!
//! Raw values are checked once, here, into typed [`Settings`]. Every problem is collected, with the
//! key it concerns, so a user fixes a bad file in one round instead of one error at a time.

mod reader;
pub mod reload;
mod sections;
mod types;
pub mod units;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use regex::Regex;

pub use crate::position::Position;

use reader::Section;
use sections::{
    LITERAL_CREDENTIALS, checkpoint_settings, destination_group, parse_kpl, reject_access_keys, source_settings,
};
pub use types::*;
pub use units::Rate;

/// Environment variables starting with this prefix override keys of the file.
pub const ENV_PREFIX: &str = "KINESIS_FANOUT__";

/// The whole, validated configuration of one service process.
#[derive(Debug, Clone)]
pub struct Settings {
    pub aws: AwsSettings,
    /// `[aws] sts_endpoint_url`: where roles are assumed (STS VPC endpoints, tests); `None`:
    /// the SDK's regional STS endpoint.
    pub sts_endpoint_url: Option<String>,
    pub source: SourceSettings,
    pub destinations: Vec<DestinationGroup>,
    pub checkpoint: CheckpointSettings,
    pub metrics: MetricsSettings,
    pub shutdown: ShutdownSettings,
    pub idle: IdleSettings,
    pub log: LogSettings,
    /// `[memory] limit`: bytes buffered in the whole process (see `crate::memory`).
    pub memory_limit: u64,
}

/// One problem in the configuration, with the key it concerns (`destinations[0].pattern`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no configuration file: pass --config FILE or set KINESIS_FANOUT_CONFIG")]
    NoFile,
    #[error("cannot read configuration file {path}")]
    Read {
        path: String,
        #[source]
        source: Box<config::ConfigError>,
    },
    #[error("{} problem(s) in configuration {origin}:\n  {}", problems.len(), join(problems))]
    Invalid { origin: String, problems: Vec<Problem> },
}

fn join(problems: &[Problem]) -> String {
    problems.iter().map(Problem::to_string).collect::<Vec<_>>().join("\n  ")
}

impl ConfigError {
    /// The problems found in the values, empty for a file that could not be read at all.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

/// How long requests that a worker sent before it learnt it lost a lease may still land: its
/// PutRecords attempt timeout, `failover_time` within 5 to 20 s. A worker taking a lease that
/// someone held waits this long (plus the victim's renewal period, for a steal) before it reads
/// the shard.
pub fn settle_time(failover: Duration) -> Duration {
    failover.clamp(Duration::from_secs(5), Duration::from_secs(20))
}

impl Settings {
    /// The longest a PutRecords attempt may take. With a lease table, a shard's next owner
    /// waits this long before it reads a shard taken from another worker, so that requests the
    /// old owner still had in flight have settled: it follows `failover_time`, within 5 to 20 s.
    pub fn put_attempt_timeout(&self) -> Duration {
        match &self.checkpoint.backend {
            CheckpointBackend::DynamoDb(lease) => settle_time(lease.failover_time),
            CheckpointBackend::File { .. } => Duration::from_secs(20),
        }
    }

    /// Loads a file and applies overrides from the process environment.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// Loads a file and applies overrides from the given `(name, value)` pairs (tests pass their own).
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let origin = path.display().to_string();
        let file = config::File::from(path).format(config::FileFormat::Toml);
        Self::build(config::Config::builder().add_source(file), origin, env)
    }

    /// Parses TOML text (no environment overrides): for tests and embedding.
    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        let file = config::File::from_str(text, config::FileFormat::Toml);
        Self::build(config::Config::builder().add_source(file), "<inline>".into(), [])
    }

    fn build(
        mut builder: config::ConfigBuilder<config::builder::DefaultState>,
        origin: String,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let read_error = |source| ConfigError::Read { path: origin.clone(), source: Box::new(source) };
        for (name, value) in env {
            if let Some(key) = env_key(&name) {
                builder = builder.set_override(key, value).map_err(read_error)?;
            }
        }
        let tree: serde_json::Value = builder.build().and_then(|c| c.try_deserialize()).map_err(read_error)?;
        let mut problems = Vec::new();
        let settings = Settings::from_tree(&tree, &mut problems);
        match settings {
            Some(settings) if problems.is_empty() => Ok(settings),
            _ => Err(ConfigError::Invalid { origin, problems }),
        }
    }

    fn from_tree(tree: &serde_json::Value, problems: &mut Vec<Problem>) -> Option<Settings> {
        reject_access_keys(tree, "", problems);
        let mut root = Section::root(tree, problems);
        let aws = root.section("aws", |s| {
            for key in LITERAL_CREDENTIALS {
                if s.string(key).is_some() {
                    s.problem(
                        key,
                        "literal AWS credentials are not accepted in the configuration; the service uses the \
                         SDK's credential chain (the task role on ECS, a profile or the environment elsewhere)",
                    );
                }
            }
            let settings =
                AwsSettings { region: s.string("region"), endpoint_url: s.string("endpoint_url"), role: None };
            (settings, s.string("sts_endpoint_url"))
        });
        let (aws, sts_endpoint_url) = aws.unzip();
        let source = root.section("source", source_settings);
        let kpl = root
            .section("records", |s| s.parsed("kpl", "reaggregate", parse_kpl))
            .flatten()
            .unwrap_or(KplMode::Reaggregate);
        let destinations = root.array("destinations", |s| destination_group(s, kpl));
        let checkpoint = root.section("checkpoint", checkpoint_settings);
        let metrics = root.section("metrics", |s| MetricsSettings {
            listen: s
                .parsed("listen", "127.0.0.1:9090", |v| {
                    v.parse::<SocketAddr>().map_err(|e| format!("`{v}` is not an address like 127.0.0.1:9090 ({e})"))
                })
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090))),
        });
        let shutdown = root.section("shutdown", |s| ShutdownSettings {
            grace_period: s.duration("grace_period", "20s").unwrap_or_default(),
        });
        let idle = root.section("idle", |s| IdleSettings {
            after: s.duration("after", "30s").unwrap_or(Duration::from_secs(30)),
            webhook_url: s.parsed_opt("webhook_url", |v| {
                if v.starts_with("http://") || v.starts_with("https://") {
                    Ok(v.to_string())
                } else {
                    Err(format!("`{v}` is not an http:// or https:// URL"))
                }
            }),
        });
        let log = root.section("log", |s| LogSettings {
            format: s
                .parsed("format", "text", |v| match v {
                    "text" => Ok(LogFormat::Text),
                    "json" => Ok(LogFormat::Json),
                    other => Err(format!("`{other}` is not a log format; use \"text\" or \"json\"")),
                })
                .unwrap_or(LogFormat::Text),
            level: s
                .parsed("level", "info", |v| {
                    tracing_subscriber::EnvFilter::try_new(v)
                        .map(|_| v.to_string())
                        .map_err(|e| format!("`{v}` is not a log level or filter ({e})"))
                })
                .unwrap_or_else(|| "info".into()),
        });
        let memory_limit = root.section("memory", |s| s.parsed_opt("limit", units::parse_bytes)).flatten();
        let aws = aws.unwrap_or_default();
        let source = source.map(|s| SourceSettings { aws: s.aws.or(&aws), ..s });
        let destinations = destinations.map(|groups| {
            groups.into_iter().map(|g| DestinationGroup { aws: g.aws.or(&aws), ..g }).collect::<Vec<_>>()
        });
        if let Some(groups) = &destinations
            && let Some(late) = groups
                .iter()
                .enumerate()
                .skip(crate::fanout::filter::MAX_FILTERED_GROUPS)
                .find(|(_, g)| g.filter.is_some())
        {
            root.problem(&format!("destinations[{}].filter", late.0), "only the first 64 groups may have a filter");
        }
        if destinations.as_ref().is_some_and(Vec::is_empty) {
            root.problem("destinations", "at least one [[destinations]] group with a pattern (or streams) is required");
        }
        root.finish();
        Some(Settings {
            aws,
            sts_endpoint_url: sts_endpoint_url.flatten(),
            source: source?,
            destinations: destinations?,
            checkpoint: checkpoint?,
            metrics: metrics?,
            shutdown: shutdown?,
            idle: idle?,
            log: log?,
            memory_limit: memory_limit.unwrap_or_else(crate::memory::default_limit),
        })
    }

    /// The destination group a stream of `place` belongs to (the first of that place's groups
    /// that matches), if any. `tags`: the stream's tags, when they were read; a group that asks
    /// for tags does not match without them.
    pub fn group_for(
        &self,
        place: &AwsSettings,
        stream_name: &str,
        tags: Option<&std::collections::HashMap<String, String>>,
    ) -> Option<usize> {
        self.destinations.iter().position(|g| {
            g.aws == *place
                && (g.streams.iter().any(|arn| arn == stream_name)
                    || (g.matches(stream_name) && (g.tags.is_empty() || tags.is_some_and(|tags| g.has_tags(tags)))))
        })
    }

    /// Whether deciding the group of this stream of `place` needs its tags: the first group
    /// whose pattern matches it asks for tags (a group that does not wins without them).
    pub fn needs_tags(&self, place: &AwsSettings, stream_name: &str) -> bool {
        let first = self.destinations.iter().find(|g| g.aws == *place && g.matches(stream_name));
        first.is_some_and(|g| !g.tags.is_empty())
    }

    /// The key of the first group in `place` (`destinations[N]`): how its credential errors
    /// name the place.
    pub fn place_label(&self, place: &AwsSettings) -> String {
        let first = self.destinations.iter().position(|g| g.aws == *place).unwrap_or_default();
        format!("destinations[{first}]")
    }

    /// Every distinct place destination groups live in, in the order groups first name them.
    pub fn destination_places(&self) -> Vec<AwsSettings> {
        let mut places: Vec<AwsSettings> = Vec::new();
        for group in &self.destinations {
            if !places.contains(&group.aws) {
                places.push(group.aws.clone());
            }
        }
        places
    }
}

/// `KINESIS_FANOUT__DESTINATIONS__0__PATTERN` → `destinations[0].pattern`.
fn env_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    let mut key = String::new();
    for part in rest.split("__").map(str::to_ascii_lowercase) {
        if part.is_empty() {
            return None;
        }
        if part.chars().all(|c| c.is_ascii_digit()) && !key.is_empty() {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(&part);
        }
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [source]
        stream_name = "app-input"
        [[destinations]]
        pattern = "^app-output-.*$"
    "#;

    #[test]
    fn streams_named_by_arn_take_their_region_and_every_mistake_names_its_key() {
        let arn = "arn:aws:kinesis:eu-west-1:222222222222:stream/orders";
        let s = Settings::from_toml(&format!(
            "[aws]\nregion = \"us-east-1\"\n[source]\nstream_name = \"arn:aws:kinesis:us-west-2:111111111111:stream/in\"\n\
             [[destinations]]\nstreams = [\"{arn}\"]\n"
        ))
        .unwrap();
        assert_eq!(s.destinations[0].streams, vec![arn.to_string()]);
        assert_eq!(s.destinations[0].aws.region.as_deref(), Some("eu-west-1"), "the ARN's region");
        assert_eq!(s.source.aws.region.as_deref(), Some("us-west-2"));
        assert!(!s.destinations[0].matches("orders"), "no pattern: only the ARN");
        assert_eq!(s.group_for(&s.destinations[0].aws, arn, None), Some(0));
        let problems = |text: &str| match Settings::from_toml(text) {
            Err(err) => err.to_string(),
            Ok(_) => panic!("refused: {text}"),
        };
        let base = "[source]\nstream_name = \"in\"\n[[destinations]]\n";
        let both = problems(&format!("{base}pattern = \"^a$\"\nstreams = [\"{arn}\"]\n"));
        assert!(both.contains("destinations[0].streams: a group names its streams by ARN or by pattern"), "{both}");
        let bad = problems(&format!("{base}streams = [\"arn:aws:kinesis:eu-west-1:2222:stream/x\"]\n"));
        assert!(bad.contains("destinations[0].streams[0]") && bad.contains("is not a Kinesis stream ARN"), "{bad}");
        let elsewhere = problems(&format!("{base}streams = [\"{arn}\"]\nregion = \"us-east-1\"\n"));
        assert!(
            elsewhere.contains("names streams in region eu-west-1, but `region` here says us-east-1"),
            "{elsewhere}"
        );
        let tagged = problems(&format!("{base}streams = [\"{arn}\"]\ntags = {{ a = \"b\" }}\n"));
        assert!(tagged.contains("destinations[0].tags: only with a pattern"), "{tagged}");
        let consumer =
            problems("[source]\nstream_name = \"in\"\nconsumer_arn = \"fanout\"\n[[destinations]]\npattern = \"a\"\n");
        assert!(consumer.contains("source.consumer_arn") && consumer.contains("is not a consumer ARN"), "{consumer}");
    }

    #[test]
    fn filters_are_read_and_every_mistake_names_its_key() {
        let base = "[source]\nstream_name = \"in\"\n[[destinations]]\npattern = \"a\"\n";
        let s = Settings::from_toml(&format!(
            "{base}filter = {{ partition_key = \"^o-\", data_prefix = \"base64:eyI=\", json = {{ \"/r\" = [\"eu\", 3], \"/t\" = {{ regex = \"^1\" }} }} }}\n"
        ))
        .unwrap();
        let filter = s.destinations[0].filter.as_ref().expect("a filter");
        assert_eq!(filter.data_prefix.as_deref(), Some(&b"{\""[..]));
        assert_eq!(filter.json.len(), 2);
        assert!(filter.describe().contains("json /r in [\"eu\", \"3\"]"), "{}", filter.describe());
        let problems = |extra: &str| match Settings::from_toml(&format!("{base}{extra}")) {
            Err(err) => err.to_string(),
            Ok(_) => panic!("refused: {extra}"),
        };
        let passthrough = problems("kpl = \"passthrough\"\nfilter = { json = { \"/r\" = \"eu\" } }\n");
        assert!(
            passthrough.contains("destinations[0].filter.json: cannot be checked with kpl = \"passthrough\""),
            "{passthrough}"
        );
        let pointer = problems("filter = { json = { \"r\" = \"eu\" } }\n");
        assert!(pointer.contains("destinations[0].filter.json.\"r\": a JSON pointer starts with /"), "{pointer}");
        let regex = problems("filter = { partition_key = \"(\" }\n");
        assert!(regex.contains("destinations[0].filter.partition_key"), "{regex}");
        let base64 = problems("filter = { data_prefix = \"base64:%%\" }\n");
        assert!(base64.contains("destinations[0].filter.data_prefix") && base64.contains("not base64"), "{base64}");
        let shape = problems("filter = { json = { \"/r\" = { nested = 1 } } }\n");
        assert!(shape.contains("must be a value, a list of values, or { regex"), "{shape}");
        let empty = problems("filter = {}\n");
        assert!(empty.contains("destinations[0].filter: names no condition"), "{empty}");
        let none = problems("filter = { json = { \"/r\" = [] } }\n");
        assert!(none.contains("is an empty list"), "{none}");
        let everything = problems("filter = { data_prefix = \"\" }\n");
        assert!(everything.contains("destinations[0].filter.data_prefix: is empty"), "{everything}");
        let both = problems("kpl = \"passthrough\"\nfilter = { data_prefix = \"{\", json = { \"/r\" = \"eu\" } }\n");
        assert!(both.contains("filter.data_prefix: cannot") && both.contains("filter.json: cannot"), "{both}");
        let unknown = problems("filter = { colour = \"red\" }\n");
        assert!(unknown.contains("destinations[0].filter.colour: unknown key"), "{unknown}");
    }

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let s = Settings::from_toml(MINIMAL).unwrap();
        assert_eq!(s.source.consumer_name, "kinesis-fanout");
        assert_eq!(s.source.initial_position, Position::TrimHorizon);
        let g = &s.destinations[0];
        assert_eq!(g.refresh_interval, Duration::from_secs(30));
        assert_eq!(g.records_per_second, Rate::Auto);
        assert_eq!(g.max_in_flight_bytes, 32 << 20);
        assert_eq!(g.linger, Duration::from_millis(50));
        assert_eq!(g.detach_after, Some(Duration::from_secs(10)));
        let off = Settings::from_toml(&MINIMAL.replace("[[destinations]]", "[[destinations]]\ndetach_after = \"off\""));
        assert_eq!(off.unwrap().destinations[0].detach_after, None);
        assert_eq!(s.checkpoint.interval, Duration::from_secs(5));
        assert_eq!(s.shutdown.grace_period, Duration::from_secs(20));
        assert!(g.matches("app-output-orders"));
        assert!(!g.matches("app-input"));
    }

    #[test]
    fn the_source_and_each_group_live_where_they_say_else_where_aws_says() {
        let s = Settings::from_toml(
            r#"
            [aws]
            region = "us-east-1"
            endpoint_url = "http://home"
            [source]
            stream_name = "in"
            [[destinations]]
            pattern = "^a-"
            [[destinations]]
            pattern = "^b-"
            region = "eu-west-1"
            [[destinations]]
            pattern = "^c-"
            region = "eu-west-1"
            "#,
        )
        .unwrap();
        let home =
            AwsSettings { region: Some("us-east-1".into()), endpoint_url: Some("http://home".into()), role: None };
        let dr = AwsSettings { region: Some("eu-west-1".into()), endpoint_url: Some("http://home".into()), role: None };
        assert_eq!(s.source.aws, home);
        assert_eq!(s.destinations[0].aws, home);
        assert_eq!(s.destinations[1].aws, dr);
        assert_eq!(s.destination_places(), vec![home.clone(), dr.clone()], "one place per distinct region");
        assert_eq!(s.group_for(&dr, "c-1", None), Some(2));
        assert_eq!(s.group_for(&home, "c-1", None), None, "a group matches only the streams of its own region");
    }

    #[test]
    fn a_group_that_asks_for_tags_matches_only_streams_carrying_them_and_others_take_the_rest() {
        let s = Settings::from_toml(
            r#"
            [source]
            stream_name = "in"
            [[destinations]]
            pattern = "^out-"
            tags = { fanout = "enabled", team = "search" }
            [[destinations]]
            pattern = "^out-"
            "#,
        )
        .unwrap();
        let place = AwsSettings::default();
        let tags = |pairs: &[(&str, &str)]| -> std::collections::HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert!(s.needs_tags(&place, "out-a"));
        assert!(!s.needs_tags(&place, "other"));
        let all = tags(&[("fanout", "enabled"), ("team", "search"), ("x", "y")]);
        assert_eq!(s.group_for(&place, "out-a", Some(&all)), Some(0));
        assert_eq!(s.group_for(&place, "out-a", Some(&tags(&[("fanout", "enabled")]))), Some(1), "falls through");
        assert_eq!(s.group_for(&place, "out-a", None), Some(1), "tags unknown: not the tagged group");
        let err =
            Settings::from_toml("[source]\nstream_name = \"in\"\n[[destinations]]\npattern = \"^o\"\ntags = [\"a\"]\n")
                .unwrap_err();
        assert!(err.to_string().contains("destinations[0].tags"), "{err}");
    }

    #[test]
    fn the_lease_table_is_reached_as_the_source_unless_checkpoint_says_otherwise() {
        let base = r#"
            [source]
            stream_name = "in"
            region = "eu-west-1"
            role_arn = "arn:aws:iam::111111111111:role/reader"
            [[destinations]]
            pattern = "^out-"
            [checkpoint]
            backend = "dynamodb"
            table_name = "leases"
            "#;
        let lease = |toml: &str| match Settings::from_toml(toml).unwrap().checkpoint.backend {
            CheckpointBackend::DynamoDb(lease) => lease,
            other => panic!("{other:?}"),
        };
        let s = Settings::from_toml(base).unwrap();
        let aws = lease(base).aws(&s.source.aws);
        assert_eq!(aws.region.as_deref(), Some("eu-west-1"));
        assert_eq!(aws.role.map(|r| r.role_arn).as_deref(), Some("arn:aws:iam::111111111111:role/reader"));
        let own = format!("{base}region = \"us-east-1\"\nrole_arn = \"arn:aws:iam::333333333333:role/leases\"\n");
        let aws = lease(&own).aws(&s.source.aws);
        assert_eq!(aws.region.as_deref(), Some("us-east-1"));
        assert_eq!(aws.role.map(|r| r.role_arn).as_deref(), Some("arn:aws:iam::333333333333:role/leases"));
        let err = Settings::from_toml(&format!("{base}external_id = \"x\"\n")).unwrap_err().to_string();
        assert!(err.contains("checkpoint.external_id"), "{err}");
        let err = Settings::from_toml(
            &base.replace("role_arn = \"arn:aws:iam::111111111111:role/reader\"", "external_id = \"x\""),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("source.external_id: only allowed with role_arn"), "{err}");
    }

    #[test]
    fn a_backoff_that_would_not_back_off_is_refused_with_its_key() {
        for (initial, max) in [("0s", "10s"), ("2s", "1s")] {
            let err = Settings::from_toml(&format!(
                "[source]\nstream_name = \"in\"\n[[destinations]]\npattern = \"^out$\"\n\
                 initial_backoff = \"{initial}\"\nmax_backoff = \"{max}\"\n"
            ))
            .unwrap_err();
            let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
            assert_eq!(keys, vec!["destinations[0].initial_backoff"], "{initial}..{max}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let err = Settings::from_toml(
            r#"
            [source]
            initial_position = "at_timestamp"
            colour = "blue"
            [[destinations]]
            pattern = "(unclosed"
            linger = "soon"
            [checkpoint]
            backend = "floppy"
            "#,
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "source.stream_name",
            "source.initial_timestamp",
            "source.colour",
            "destinations[0].pattern",
            "destinations[0].linger",
            "checkpoint.backend",
        ] {
            assert!(keys.contains(&expected), "{expected} not in {keys:?}");
        }
    }

    #[test]
    fn literal_credentials_are_rejected_without_echoing_them() {
        let err = Settings::from_toml(&format!(
            "{MINIMAL}\n[aws]\nsecret_access_key = \"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\"\nregion = \"AKIAIOSFODNN7EXAMPLE\"\n"
        ))
        .unwrap_err();
        let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"aws.secret_access_key") && keys.contains(&"aws.region"), "{keys:?}");
        let text = err.to_string();
        assert!(!text.contains("wJalrXUtnFEMI") && !text.contains("AKIAIOSFODNN7EXAMPLE"), "{text}");
    }

    #[test]
    fn environment_overrides_any_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let env = [
            ("KINESIS_FANOUT__SOURCE__STREAM_NAME".to_string(), "other-input".to_string()),
            ("KINESIS_FANOUT__DESTINATIONS__0__LINGER".to_string(), "5ms".to_string()),
            ("KINESIS_FANOUT_CONFIG".to_string(), "ignored".to_string()),
        ];
        let s = Settings::load_with_env(&path, env).unwrap();
        assert_eq!(s.source.stream_name, "other-input");
        assert_eq!(s.destinations[0].linger, Duration::from_millis(5));
    }

    #[test]
    fn env_keys_map_to_config_paths() {
        assert_eq!(env_key("KINESIS_FANOUT__AWS__REGION").as_deref(), Some("aws.region"));
        assert_eq!(
            env_key("KINESIS_FANOUT__DESTINATIONS__1__EXCLUDE__0").as_deref(),
            Some("destinations[1].exclude[0]")
        );
        assert_eq!(env_key("KINESIS_FANOUT_CONFIG"), None);
        assert_eq!(env_key("OTHER"), None);
    }
}
