//! The service running in-process, with its metrics, progress and health at hand.

use std::sync::Arc;

use kinesis_fanout::metrics::Metrics;
use kinesis_fanout::{Service, Settings};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{WAIT, sdk_config, wait_until};

/// The service running in-process.
pub struct Running {
    pub metrics: Arc<Metrics>,
    /// Address of /metrics, /healthz, /readyz.
    pub admin: std::net::SocketAddr,
    pub progress: Arc<kinesis_fanout::progress::Progress>,
    pub health: Arc<kinesis_fanout::health::Health>,
    /// Hands it new configurations, as SIGHUP does in the binary.
    pub reloader: kinesis_fanout::app::Reloader,
    stop: CancellationToken,
    handle: JoinHandle<Result<(), kinesis_fanout::RunError>>,
}

impl Running {
    pub fn start(toml: &str, url: &str) -> Running {
        // Service logs show in a failing test's output (RUST_LOG to tune).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("kinesis_fanout=info")),
            )
            .with_test_writer()
            .try_init();
        let settings = Settings::from_toml(toml).expect("test config is valid");
        let service = Service::new(settings, &sdk_config(url)).expect("admin port binds");
        let admin = service.admin_addr();
        let metrics = service.metrics();
        let progress = service.progress();
        let health = service.health();
        let reloader = service.reloader();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(service.run(stop.clone()));
        Running { metrics, progress, health, admin, reloader, stop, handle }
    }

    /// GET an admin path: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://{}{path}", self.admin)).await.expect("admin port answers");
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// Records accepted by a destination so far.
    pub fn accepted(&self, destination: &str) -> u64 {
        self.metrics.records_written.with_label_values(&[destination, "ok"]).get()
    }

    pub fn counter(&self, destination: &str, outcome: &str) -> u64 {
        self.metrics.records_written.with_label_values(&[destination, outcome]).get()
    }

    pub async fn wait_accepted(&self, destination: &str, n: u64) {
        wait_until(&format!("{destination} accepted {n} records"), || async { self.accepted(destination) >= n }).await;
    }

    /// Stops gracefully and returns the service's result.
    pub async fn stop(self) -> Result<(), kinesis_fanout::RunError> {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("service stops within the wait")
            .expect("service task did not panic")
    }

    /// Waits for the service to end by itself (a fatal error).
    pub async fn finished(self) -> Result<(), kinesis_fanout::RunError> {
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("service ends within the wait")
            .expect("service task did not panic")
    }
}
