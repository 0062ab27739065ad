//! What can be checked of the deployment files without Docker or AWS: the Dockerfile copies
//! paths that exist and keeps its contract, the Grafana dashboard parses and queries real
//! metrics, and the alerts name real metrics. (cfn-lint and promtool run from .ci/run.)

use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn dockerfile_copies_existing_paths_and_keeps_its_contract() {
    let dockerfile = read("Dockerfile");
    for line in dockerfile.lines().map(str::trim).filter(|l| l.starts_with("COPY ") && !l.contains("--from=")) {
        let words: Vec<&str> = line.split_whitespace().filter(|w| !w.starts_with("--")).collect();
        for source in &words[1..words.len() - 1] {
            assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join(source).exists(), "Dockerfile copies missing {source}");
        }
    }
    for needle in [
        "EXPOSE 9090",
        "STOPSIGNAL SIGTERM",
        "HEALTHCHECK",
        "\"healthcheck\"",
        "USER nonroot",
        "/etc/kinesis-fanout/config.toml",
        "FROM rust:1.95",
    ] {
        assert!(dockerfile.contains(needle), "Dockerfile lacks {needle}");
    }
}

/// The binary keeps its own memory promise: it brings its allocator and the allocator's settings
/// (compiled in), so neither the image, the ECS task, the benchmark nor the crash tests set
/// allocator variables, and its resident-memory figures hold wherever it runs.
#[test]
fn the_binary_configures_its_own_allocator_and_nothing_else_does() {
    let main = read("src/main.rs");
    assert!(
        main.contains("#[global_allocator]") && main.contains("tikv_jemallocator::Jemalloc"),
        "main.rs sets jemalloc"
    );
    assert!(read("Dockerfile").contains("COPY .cargo ./.cargo"), "the image builds with the allocator's settings");
    let cargo_config = read(".cargo/config.toml");
    assert!(cargo_config.contains("JEMALLOC_SYS_WITH_MALLOC_CONF") && cargo_config.contains("background_thread:true"));
    for file in
        ["Dockerfile", "deploy/cloudformation/kinesis-fanout.yaml", "examples/bench/main.rs", "tests/service/crash.rs"]
    {
        for variable in ["MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_CONF"] {
            assert!(
                !read(file).contains(variable),
                "{file} sets {variable}: the binary's figures must not depend on it"
            );
        }
    }
}

/// Every alert has its Runbook entry in the README.
#[test]
fn every_alert_has_a_runbook_entry() {
    let alerts = read("deploy/prometheus/alerts.yml");
    let readme = read("README.md");
    let runbook = readme.split("## Runbook").nth(1).expect("a Runbook section").split("\n## ").next().unwrap();
    let names: Vec<&str> = alerts.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert!(names.len() >= 9, "{names:?}");
    for name in names {
        assert!(runbook.contains(&format!("| `{name}` |")), "the Runbook lacks {name}");
    }
}

/// Every `kinesis_fanout_*` name used by a deployment file is a metric the service exports.
fn assert_known_metrics(file: &str, text: &str) {
    let metrics = kinesis_fanout::metrics::Metrics::new();
    let exported = metrics.names();
    let mut rest = text;
    while let Some(at) = rest.find("kinesis_fanout_") {
        let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
        assert!(exported.iter().any(|n| n == base), "{file} uses unknown metric {name}");
        rest = &rest[at + name.len()..];
    }
}

#[test]
fn grafana_dashboard_parses_and_uses_real_metrics() {
    let text = read("deploy/grafana/kinesis-fanout.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 4));
    assert_known_metrics("dashboard", &text);
}

#[test]
fn alerts_use_real_metrics() {
    assert_known_metrics("alerts", &read("deploy/prometheus/alerts.yml"));
}

#[test]
fn readme_documents_every_metric() {
    let readme = read("README.md");
    for name in kinesis_fanout::metrics::Metrics::new().names() {
        assert!(readme.contains(name.as_str()), "README.md does not document {name}");
    }
}

#[test]
fn readme_documents_every_outcome_and_resubscribe_reason() {
    let readme = read("README.md");
    for outcome in kinesis_fanout::metrics::Outcome::ALL {
        assert!(readme.contains(&format!("`{}`", outcome.as_str())), "README.md does not document outcome {outcome:?}");
    }
    for reason in kinesis_fanout::metrics::ResubscribeReason::ALL {
        assert!(readme.contains(&format!("`{}`", reason.as_str())), "README.md does not document reason {reason:?}");
    }
}
