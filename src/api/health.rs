//! `GET /health`: liveness, without an API key (for load balancers and systemd checks).

use axum::Json;
use serde_json::{Value, json};

pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}
