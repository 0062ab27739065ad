//! Config files for the service under test, built rather than edited as text: a test names the
//! keys it changes, and a change the template cannot take fails loudly instead of doing nothing.
//!
//! ```ignore
//! let toml = TestConfig::new(&emulator.url)
//!     .checkpoint_file(&checkpoint)
//!     .group("max_in_flight_bytes", "1MiB")
//!     .set("shutdown", "grace_period", "60s")
//!     .toml();
//! ```

use std::path::Path;

/// A config for the emulator at `url`, with fast intervals. The template: source `in`, one
/// destination group `^out-.*$` (refresh 1 s, linger 20 ms, backoff 20 ms to 500 ms), file
/// checkpoints every 200 ms (the file named by `checkpoint_file`), metrics on port 0, a 10 s
/// grace period, and region us-east-1.
#[derive(Debug, Clone)]
pub struct TestConfig {
    /// Sections other than the destination groups, in the order they are written.
    sections: Vec<(String, Table)>,
    /// `[[destinations]]`, first to last (the first matching group wins).
    groups: Vec<Group>,
}

/// A `[[destinations]]` group after the first: its pattern and the keys it sets.
#[derive(Debug, Clone)]
pub struct Group(Table);

/// Keys of a table, in order, with their values as TOML.
#[derive(Debug, Clone, Default)]
struct Table(Vec<(String, String)>);

/// `value` as a TOML basic string.
fn quoted(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

impl Table {
    fn of(entries: &[(&str, &str)]) -> Table {
        let mut table = Table::default();
        for (key, value) in entries {
            table.set(key, quoted(value));
        }
        table
    }

    /// Overrides `key`, or adds it.
    fn set(&mut self, key: &str, toml: String) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = toml,
            None => self.0.push((key.to_string(), toml)),
        }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn render(&self, header: &str, out: &mut String) {
        out.push_str(&format!("\n{header}\n"));
        for (key, value) in &self.0 {
            out.push_str(&format!("{key} = {value}\n"));
        }
    }
}

impl Group {
    /// A group with only a pattern: every other key takes the service's default.
    pub fn new(pattern: &str) -> Group {
        Group(Table::of(&[("pattern", pattern)]))
    }

    /// A group with the template's fast intervals, as the first group has them.
    pub fn fast(pattern: &str) -> Group {
        Group(Table::of(&[
            ("pattern", pattern),
            ("refresh_interval", "1s"),
            ("linger", "20ms"),
            ("initial_backoff", "20ms"),
            ("max_backoff", "500ms"),
        ]))
    }

    /// A group that names its streams by ARN (`streams`, no pattern), with the fast intervals.
    pub fn of_streams(arns: &[&str]) -> Group {
        let mut group = Group::fast("-");
        group.0.0.retain(|(key, _)| key != "pattern");
        let list: Vec<String> = arns.iter().map(|arn| quoted(arn)).collect();
        group.0.set("streams", format!("[{}]", list.join(", ")));
        group
    }

    /// Sets `key` to the string `value` (overriding it if the group has it).
    pub fn set(mut self, key: &str, value: &str) -> Group {
        self.0.set(key, quoted(value));
        self
    }

    /// Sets `key` to a TOML value written out, for what is not a string (`{ fanout = "enabled" }`).
    pub fn set_raw(mut self, key: &str, toml: &str) -> Group {
        self.0.set(key, toml.to_string());
        self
    }
}

impl TestConfig {
    pub fn new(url: &str) -> TestConfig {
        let sections = [
            ("aws", Table::of(&[("region", "us-east-1"), ("endpoint_url", url)])),
            ("source", Table::of(&[("stream_name", "in"), ("consumer_name", "fanout-test")])),
            ("checkpoint", Table::of(&[("backend", "file"), ("interval", "200ms")])),
            ("metrics", Table::of(&[("listen", "127.0.0.1:0")])),
            ("shutdown", Table::of(&[("grace_period", "10s")])),
        ];
        TestConfig {
            sections: sections.into_iter().map(|(name, table)| (name.to_string(), table)).collect(),
            groups: vec![Group::fast("^out-.*$")],
        }
    }

    /// The source stream (`in` unless set).
    pub fn source(self, stream: &str) -> TestConfig {
        self.set("source", "stream_name", stream)
    }

    /// The first group's pattern (`^out-.*$` unless set).
    pub fn pattern(self, pattern: &str) -> TestConfig {
        self.group("pattern", pattern)
    }

    /// Checkpoints in this file.
    pub fn checkpoint_file(self, path: &Path) -> TestConfig {
        self.set("checkpoint", "path", &path.display().to_string())
    }

    /// Checkpoints and leases in the table `leases` at `endpoint`, as worker `worker_id`, with
    /// a 3 s failover time (instead of the checkpoint file).
    pub fn lease_table(mut self, endpoint: &str, worker_id: &str) -> TestConfig {
        *self.section("checkpoint") = Table::of(&[
            ("backend", "dynamodb"),
            ("table_name", "leases"),
            ("endpoint_url", endpoint),
            ("failover_time", "3s"),
            ("worker_id", worker_id),
            ("interval", "200ms"),
        ]);
        self
    }

    /// Sets `key` of `[section]` to the string `value`: overrides the template's value, or adds
    /// the key (and the section, if the template has none: `[memory]`, `[idle]`). The service
    /// refuses keys it does not know, so a misspelt one fails the test.
    pub fn set(self, section: &str, key: &str, value: &str) -> TestConfig {
        self.set_raw(section, key, &quoted(value))
    }

    /// As [`TestConfig::set`], with a TOML value written out, for what is not a string.
    pub fn set_raw(mut self, section: &str, key: &str, toml: &str) -> TestConfig {
        assert_ne!(section, "destinations", "destination groups are set with group() and add_group()");
        if !self.sections.iter().any(|(name, _)| name == section) {
            self.sections.push((section.to_string(), Table::default()));
        }
        self.section(section).set(key, toml.to_string());
        self
    }

    /// Removes `key` from `[section]`; panics if the template does not have it.
    pub fn without(mut self, section: &str, key: &str) -> TestConfig {
        let table = self.section(section);
        let before = table.0.len();
        table.0.retain(|(k, _)| k != key);
        assert!(table.0.len() < before, "the test config has no `{key}` in [{section}] to remove");
        self
    }

    /// Sets `key` of the first destination group to the string `value` (overriding it if the
    /// template has it).
    pub fn group(mut self, key: &str, value: &str) -> TestConfig {
        self.groups[0].0.set(key, quoted(value));
        self
    }

    /// As [`TestConfig::group`], with a TOML value written out (`tags`, `exclude`).
    pub fn group_raw(mut self, key: &str, toml: &str) -> TestConfig {
        self.groups[0].0.set(key, toml.to_string());
        self
    }

    /// Another destination group, after those there are.
    pub fn add_group(mut self, group: Group) -> TestConfig {
        self.groups.push(group);
        self
    }

    /// These destination groups instead of the template's.
    pub fn groups(mut self, groups: impl IntoIterator<Item = Group>) -> TestConfig {
        self.groups = groups.into_iter().collect();
        assert!(!self.groups.is_empty(), "a config needs a destination group");
        self
    }

    fn section(&mut self, name: &str) -> &mut Table {
        match self.sections.iter_mut().find(|(n, _)| n == name) {
            Some((_, table)) => table,
            None => panic!("the test config has no [{name}] section"),
        }
    }

    /// The config file's text.
    pub fn toml(&self) -> String {
        let checkpoint = &self.sections.iter().find(|(name, _)| name == "checkpoint").expect("[checkpoint]").1;
        assert!(
            checkpoint.get("backend") != Some("\"file\"") || checkpoint.get("path").is_some(),
            "a file checkpoint needs checkpoint_file(path)"
        );
        let mut out = String::new();
        for (name, table) in &self.sections {
            table.render(&format!("[{name}]"), &mut out);
        }
        for group in &self.groups {
            group.0.render("[[destinations]]", &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TestConfig {
        TestConfig::new("http://127.0.0.1:1").checkpoint_file(Path::new("/tmp/checkpoints.json"))
    }

    #[test]
    fn the_template_is_a_valid_config() {
        kinesis_fanout::Settings::from_toml(&config().toml()).expect("valid");
        let lease_table = config().lease_table("http://127.0.0.1:2", "w1").toml();
        kinesis_fanout::Settings::from_toml(&lease_table).expect("valid with the lease table");
        assert!(!lease_table.contains("path ="), "{lease_table}");
    }

    #[test]
    fn a_setter_overrides_the_templates_key_and_adds_what_it_lacks() {
        let toml = config()
            .set("shutdown", "grace_period", "60s")
            .group("refresh_interval", "1h")
            .group_raw("tags", "{ fanout = \"enabled\" }")
            .set("memory", "limit", "4MiB")
            .without("aws", "region")
            .add_group(Group::new("^other$"))
            .toml();
        for line in ["grace_period = \"60s\"", "refresh_interval = \"1h\"", "tags = { fanout = \"enabled\" }"] {
            assert!(toml.contains(line), "`{line}` in:\n{toml}");
        }
        for gone in ["grace_period = \"10s\"", "refresh_interval = \"1s\"", "region ="] {
            assert!(!toml.contains(gone), "no `{gone}` in:\n{toml}");
        }
        assert!(toml.contains("\n[memory]\nlimit = \"4MiB\"\n"), "{toml}");
        assert_eq!(toml.matches("[[destinations]]").count(), 2, "{toml}");
        kinesis_fanout::Settings::from_toml(&toml).expect("valid");
    }

    #[test]
    #[should_panic(expected = "no `worker_id` in [aws]")]
    fn removing_a_key_the_template_lacks_panics() {
        let _ = config().without("aws", "worker_id");
    }

    #[test]
    fn a_misspelt_key_is_refused_by_the_service() {
        let toml = config().set("shutdown", "grace_periods", "60s").toml();
        assert!(kinesis_fanout::Settings::from_toml(&toml).is_err(), "{toml}");
    }
}
