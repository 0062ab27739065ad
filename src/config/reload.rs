//! What a reload may change. Destination groups change while the service runs (the destinations
//! supervisor applies them); every other key is read once, at start, by the part it configures,
//! and a file that changes one is refused whole, naming it.

use super::Settings;

/// The keys whose value differs between the running configuration and a new one, among those
/// only a restart changes: the source, the checkpoint store, the admin port, the memory limit,
/// the grace period, idle detection, logging and the `[aws]` defaults the source reads with.
pub fn restart_keys(running: &Settings, new: &Settings) -> Vec<&'static str> {
    // Debug output compares values that hold regular expressions and durations alike; both sides
    // come from the same parser, so equal settings print equally.
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let (a, b) = (running, new);
    let keys: [(&'static str, bool); 16] = [
        ("aws (region, endpoint_url, role_arn)", a.aws != b.aws),
        ("aws.sts_endpoint_url", a.sts_endpoint_url != b.sts_endpoint_url),
        ("source.stream_name", a.source.stream_name != b.source.stream_name),
        ("source.consumer_name", a.source.consumer_name != b.source.consumer_name),
        ("source.consumer_arn", a.source.consumer_arn != b.source.consumer_arn),
        ("source (region, endpoint_url, role_arn)", a.source.aws != b.source.aws),
        ("source.initial_position", differs(&a.source.initial_position, &b.source.initial_position)),
        ("checkpoint (backend, path, table and lease settings)", a.checkpoint.backend != b.checkpoint.backend),
        ("checkpoint.interval", a.checkpoint.interval != b.checkpoint.interval),
        ("metrics.listen", a.metrics.listen != b.metrics.listen),
        ("memory.limit", a.memory_limit != b.memory_limit),
        ("shutdown.grace_period", a.shutdown.grace_period != b.shutdown.grace_period),
        ("idle.after", a.idle.after != b.idle.after),
        ("idle.webhook_url", a.idle.webhook_url != b.idle.webhook_url),
        ("log.format", a.log.format != b.log.format),
        ("log.level", a.log.level != b.log.level),
    ];
    keys.into_iter().filter(|(_, differ)| *differ).map(|(key, _)| key).collect()
}

/// Whether a new configuration changes any destination group (else a reload has nothing to do).
pub fn groups_changed(running: &Settings, new: &Settings) -> bool {
    format!("{:?}", running.destinations) != format!("{:?}", new.destinations)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[aws]
region = "us-east-1"

[source]
stream_name = "in"

[[destinations]]
pattern = "^out-"

[checkpoint]
backend = "file"
path = "/tmp/cp.json"
"#;

    fn settings(text: &str) -> Settings {
        Settings::from_toml(text).expect("valid")
    }

    #[test]
    fn groups_change_without_a_restart_and_every_other_section_names_its_key() {
        let running = settings(BASE);
        let groups = settings(&BASE.replace("^out-", "^app-").replace(
            "[checkpoint]",
            "[[destinations]]\npattern = \"^b-\"\nfilter = { partition_key = \"^k\" }\n\n[checkpoint]",
        ));
        assert!(restart_keys(&running, &groups).is_empty());
        assert!(groups_changed(&running, &groups));
        assert!(!groups_changed(&running, &settings(BASE)));

        let both = settings(&BASE.replace("\"in\"", "\"other\"").replace("/tmp/cp.json", "/tmp/b.json"));
        assert_eq!(
            restart_keys(&running, &both),
            ["source.stream_name", "checkpoint (backend, path, table and lease settings)"]
        );
        let listen = settings(&format!("{BASE}\n[metrics]\nlisten = \"127.0.0.1:1\"\n[memory]\nlimit = \"64MiB\"\n"));
        assert_eq!(restart_keys(&running, &listen), ["metrics.listen", "memory.limit"]);
    }
}
