//! Idle detection: "is my data all there yet?"
//!
//! The service is idle when every shard is caught up (MillisBehindLatest = 0), every destination
//! accepted everything read (nothing outstanding), and no record arrived for `idle.after`. Each
//! busy-to-idle transition sets `kinesis_fanout_idle` to 1 and, when configured, POSTs one JSON
//! document to the webhook.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::IdleSettings;
use crate::fanout::DestinationSet;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::progress::Progress;

/// The document POSTed on each busy-to-idle transition.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct IdleEvent {
    pub event: String,
    pub source_stream: String,
    pub destinations: Vec<String>,
    /// Records read and accepted by every destination since the previous idle transition.
    pub records_copied: u64,
    /// Last sequence number handed on, per shard.
    pub last_sequence_numbers: BTreeMap<String, String>,
    /// When the service became idle, RFC 3339.
    pub idle_at: String,
}

pub struct IdleMonitor {
    pub settings: IdleSettings,
    pub source_stream: String,
    pub health: Arc<Health>,
    pub progress: Arc<Progress>,
    pub metrics: Arc<Metrics>,
    pub destinations: watch::Receiver<DestinationSet>,
}

impl IdleMonitor {
    fn is_idle(&self) -> bool {
        self.health.caught_up() && self.progress.outstanding() == 0 && self.health.quiet_for() >= self.settings.after
    }

    pub async fn run(self, stop: CancellationToken) {
        let tick = (self.settings.after / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().ok();
        let mut idle = false;
        let mut copied_at_last_idle = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let now_idle = self.is_idle();
            if now_idle == idle {
                continue;
            }
            idle = now_idle;
            self.metrics.idle.set(i64::from(idle));
            if !idle {
                tracing::debug!("Busy again: records arrived.");
                continue;
            }
            let total = self.health.records();
            let event = IdleEvent {
                event: "idle".into(),
                source_stream: self.source_stream.clone(),
                destinations: self.destinations.borrow().iter().map(|d| d.name.to_string()).collect(),
                records_copied: total - copied_at_last_idle,
                last_sequence_numbers: self.health.last_sequences(),
                idle_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            };
            copied_at_last_idle = total;
            tracing::info!(records_copied = event.records_copied, "Idle: every record read is in every destination.");
            if let (Some(url), Some(client)) = (&self.settings.webhook_url, &client) {
                tokio::spawn(post(client.clone(), url.clone(), event));
            }
        }
    }
}

/// POSTs the event, trying three times; failures are logged, never fatal.
async fn post(client: reqwest::Client, url: String, event: IdleEvent) {
    for attempt in 1..=3u32 {
        match client.post(&url).json(&event).send().await.and_then(|r| r.error_for_status()) {
            Ok(_) => return,
            Err(err) => {
                tracing::warn!(attempt, error = %crate::aws::chain(&err), "Idle webhook failed.");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            }
        }
    }
}
