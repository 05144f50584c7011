//! Health and metrics over HTTP: `/health/live`, `/health/ready`, `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::stream::health::Health;

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Metrics,
}

/// Binds `addr` and serves until `shutdown` fires. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let app = Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(render))
        .with_state(AppState { health, metrics });
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for health and metrics (set HTTP_ADDR to a free address)")
    })?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(bound)
}

async fn live(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.is_live() {
        (StatusCode::OK, "live\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "stuck: the processing loop has not turned for 2 minutes\n",
        )
    }
}

/// 200 while the processor processes; 503 before it is connected and while it waits out an
/// S3 outage (README, "Health": nothing restarts a processor for this, `/health/live` stays
/// 200; what the 503 tells is that nothing is being written).
async fn ready(State(s): State<AppState>) -> impl IntoResponse {
    let since = s.metrics.retry.s3_unreachable_since.get();
    if !s.health.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string())
    } else if since > 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(since, |d| d.as_secs() as i64);
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "S3 unreachable since unix time {since} ({} s): retrying, nothing is written meanwhile\n",
                now - since
            ),
        )
    } else {
        (StatusCode::OK, "ready\n".to_string())
    }
}

async fn render(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}
