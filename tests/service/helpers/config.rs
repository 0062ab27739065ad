//! Config files for the service under test.

use std::path::Path;

/// A config file for the emulator, with fast intervals; `extra` is appended to the first
/// destination group (e.g. `records_per_second = "5000"`).
pub fn config_toml(url: &str, source: &str, pattern: &str, checkpoint: &Path, extra: &str) -> String {
    format!(
        r#"
[aws]
region = "us-east-1"
endpoint_url = "{url}"

[source]
stream_name = "{source}"
consumer_name = "fanout-test"

[[destinations]]
pattern = "{pattern}"
refresh_interval = "1s"
linger = "20ms"
initial_backoff = "20ms"
max_backoff = "500ms"
{extra}

[checkpoint]
backend = "file"
path = "{checkpoint}"
interval = "200ms"

[metrics]
listen = "127.0.0.1:0"

[shutdown]
grace_period = "10s"
"#,
        checkpoint = checkpoint.display()
    )
}
