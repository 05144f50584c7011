//! Health and metrics over HTTP: `/health/live`, `/health/ready`, `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Whether the processor is ready (connected, checks passed) and alive (its loop turns).
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
    last_tick_ms: AtomicU64,
}

/// The processing loop ticks every `stream::TICK` (and blocks at most `stream::SEEK_TIMEOUT`
/// on a seek); this long without a tick means it is stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(120);
const _: () = assert!(
    STUCK_AFTER.as_millis()
        > 10 * (crate::stream::TICK.as_millis() + crate::stream::SEEK_TIMEOUT.as_millis())
);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.tick();
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn tick(&self) {
        self.last_tick_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn is_live(&self) -> bool {
        let last = self.last_tick_ms.load(Ordering::Relaxed);
        last == 0 || now_ms().saturating_sub(last) < STUCK_AFTER.as_millis() as u64
    }
}

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

async fn ready(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
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
