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

/// Every alert has its Runbook entry in docs/operations.md.
#[test]
fn every_alert_has_a_runbook_entry() {
    let alerts = read("deploy/prometheus/alerts.yml");
    let readme = read("docs/operations.md");
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
    let docs = read("docs/operations.md");
    for name in kinesis_fanout::metrics::Metrics::new().names() {
        assert!(docs.contains(name.as_str()), "docs/operations.md does not document {name}");
    }
}

#[test]
fn readme_documents_every_outcome_and_resubscribe_reason() {
    let docs = read("docs/operations.md");
    for outcome in kinesis_fanout::metrics::Outcome::ALL {
        let documented = docs.contains(&format!("`{}`", outcome.as_str()));
        assert!(documented, "docs/operations.md does not document outcome {outcome:?}");
    }
    for reason in kinesis_fanout::metrics::ResubscribeReason::ALL {
        let documented = docs.contains(&format!("`{}`", reason.as_str()));
        assert!(documented, "docs/operations.md does not document reason {reason:?}");
    }
}

/// The pages a reader follows: the README and what it links to.
const PAGES: [&str; 8] = [
    "README.md",
    "CONTRIBUTING.md",
    "docs/operations.md",
    "docs/configuration.md",
    "docs/scaling.md",
    "docs/performance.md",
    "docs/design.md",
    "docs/guarantees.md",
];

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut broken = Vec::new();
    for page in PAGES {
        let text = read(page);
        let dir = Path::new(page).parent().unwrap_or(Path::new(""));
        let mut rest = text.as_str();
        while let Some(at) = rest.find("](") {
            let target: String = rest[at + 2..].chars().take_while(|c| *c != ')').collect();
            rest = &rest[at + 2..];
            if target.starts_with("http") || target.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = target.split_once('#').unwrap_or((target.as_str(), ""));
            let file = if path.is_empty() { root.join(page) } else { root.join(dir).join(path) };
            if !file.exists() {
                broken.push(format!("{page}: {target} (no such file)"));
                continue;
            }
            if !fragment.is_empty() && file.extension().is_some_and(|e| e == "md") {
                let headings = std::fs::read_to_string(&file).unwrap_or_default();
                let found = headings
                    .lines()
                    .filter_map(|l| l.strip_prefix('#'))
                    .any(|h| anchor(h.trim_start_matches('#')) == fragment);
                if !found {
                    broken.push(format!("{page}: {target} (no such heading)"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:#?}");
}

#[test]
fn the_readme_is_a_front_door() {
    let readme = read("README.md");
    assert!(readme.len() < 20 * 1024, "README.md is {} bytes: details belong in docs/", readme.len());
    // Its minimal config is config/minimal.toml, word for word, and it loads.
    let minimal = read("config/minimal.toml");
    assert!(readme.contains(minimal.trim()), "README.md shows config/minimal.toml as it is");
    let settings =
        kinesis_fanout::Settings::load_with_env(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/minimal.toml"), [])
            .expect("config/minimal.toml is valid");
    assert_eq!(settings.source.stream_name, "app-input");
    assert!(settings.destinations[0].matches("app-output-orders"));
}
