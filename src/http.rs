//! The worker's HTTP surface: `/metrics` (Prometheus), `/healthz` (the
//! process answers) and `/readyz` (it can do its work, see
//! [`crate::metrics::Readiness`]), on one axum router that later endpoints
//! join. Each connection is its own task, so a slow or malformed client costs
//! that connection only, never the worker.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::{header, StatusCode};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::metrics::{install_recorder, READINESS};

/// The routes, over a recorder's handle.
pub fn router(metrics: PrometheusHandle) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = crate::metrics::render(&metrics);
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
}

async fn readyz() -> (StatusCode, String) {
    match READINESS.check() {
        Ok(owned) => (StatusCode::OK, format!("ready: {owned} owned\n")),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Installs the Prometheus recorder and serves [`router`] on `listen`.
/// Binds before returning, so a taken port fails the start. Must run inside
/// the tokio runtime.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("invalid configuration: metrics.listen: cannot bind {listen}"))?;
    let bound = listener
        .local_addr()
        .context("the metrics listener's address")?;
    let handle = install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    tracing::info!(listen = %bound, "serving /metrics, /healthz and /readyz");
    let app = router(handle);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    Ok(bound)
}
