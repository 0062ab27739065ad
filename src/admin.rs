//! The admin port: `/metrics` (Prometheus text), `/healthz` (the process answers) and `/readyz`
//! (consumer ACTIVE, subscriptions established, destinations discovered; 503 with a reason).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::progress::Progress;

#[derive(Clone)]
struct Admin {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    progress: Arc<Progress>,
}

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    progress: Arc<Progress>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Admin { metrics, health, progress });
    let served = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
    if let Err(err) = served {
        tracing::error!(error = %err, "The admin server stopped.");
    }
}

async fn render_metrics(State(admin): State<Admin>) -> impl IntoResponse {
    admin.metrics.observe_progress(&admin.progress);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], admin.metrics.render())
}

async fn ready(State(admin): State<Admin>) -> impl IntoResponse {
    match admin.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}
