//! Operational endpoints, without an API key: `GET /health` (liveness), `GET /ready`
//! (readiness), `GET /ping` (Traefik's), `GET /metrics` (Prometheus text format).

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::schema::{Health, NotReady, Ready};
use crate::metrics::{ClusterSnapshot, Snapshot};

/// Traefik's health path (`/ping` answers `OK`), for monitors of the replaced gateway.
#[utoipa::path(
    get, path = "/ping", operation_id = "ping",
    summary = "Traefik's health path: answers OK", tag = "operations",
    responses((status = 200, description = "The process is up", body = String, content_type = "text/plain")),
)]
pub async fn ping() -> &'static str {
    "OK"
}

#[utoipa::path(
    get, path = "/health", operation_id = "health",
    summary = "Liveness", tag = "operations",
    responses((status = 200, description = "The process is up", body = Health)),
)]
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready once the server certificate and the store are loaded. The store is loaded before
/// the listener serves; the server certificate may still be missing (ACME before its first
/// order completes), and a load balancer should not send agents here until it is present.
///
/// With `[cluster]`, the body also reports the Redis link, but a Redis outage never makes
/// this 503: every node would leave the load balancer at once, while each can still serve
/// its own agents (README, "Running several nodes").
#[utoipa::path(
    get, path = "/ready", operation_id = "ready",
    summary = "Readiness (server certificate and store loaded)", tag = "operations",
    responses(
        (status = 200, description = "Ready for agents", body = Ready),
        (status = 503, description = "No server certificate yet", body = NotReady),
    ),
)]
pub async fn ready(State(state): State<AppState>) -> Response {
    let mut checks = json!({
        "server_certificate": state.server_cert.is_ready(),
        "certificate_store": true,
    });
    if let Some(link) = &state.agents.cluster {
        checks["redis"] = json!({
            "connected": link.status.is_connected(),
            "reconnects": link.status.reconnects(),
            "node_id": link.node_id,
            "affects_readiness": false,
        });
    }
    if state.server_cert.is_ready() {
        (
            StatusCode::OK,
            Json(json!({ "status": "ready", "checks": checks })),
        )
            .into_response()
    } else {
        let detail = "no server certificate yet; see the gateway log";
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "starting", "detail": detail, "checks": checks })),
        )
            .into_response()
    }
}

/// Prometheus text format. On the main listener only without `metrics_listen`; with it,
/// on that plain-HTTP listener instead (and then not in this document).
#[utoipa::path(
    get, path = "/metrics", operation_id = "metrics",
    summary = "Prometheus metrics", tag = "operations",
    responses((
        status = 200, description = "Prometheus text exposition format 0.0.4",
        content_type = "text/plain; version=0.0.4; charset=utf-8", body = String,
    )),
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let snapshot = Snapshot {
        connected_agents: state.agents.registry.connected_agents() as i64,
        socket_sessions: state.agents.io.local_sessions() as i64,
        store_certificates: state.store.len() as i64,
        earliest_expiry: state.store.earliest_not_after(),
        cluster: state.agents.cluster.as_ref().map(|link| ClusterSnapshot {
            redis_connected: link.status.is_connected(),
            redis_reconnects: link.status.reconnects(),
            redis_errors: link.status.errors(),
            nodes: link.fleet.nodes().len() as i64 + 1,
        }),
    };
    let body = state.metrics.render(snapshot);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
