//! Records the git commit in the binary (build info metric). `KINESIS_FANOUT_GIT_SHA` wins (the
//! Docker build passes it, having no .git); otherwise `git rev-parse`; otherwise "unknown".

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=KINESIS_FANOUT_GIT_SHA");
    println!("cargo:rerun-if-changed=.git/HEAD");
    let sha = std::env::var("KINESIS_FANOUT_GIT_SHA").ok().filter(|s| !s.is_empty()).or_else(|| {
        Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
    });
    println!("cargo:rustc-env=KINESIS_FANOUT_GIT_SHA={}", sha.unwrap_or_else(|| "unknown".into()));
}
