//! `POST /hello-world`: the liveness check of the API key path, kept from the system
//! agentgate replaces.

use axum::Json;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, JsonBody};

#[derive(Deserialize)]
pub struct HelloBody {
    name: String,
}

pub async fn hello_world(JsonBody(body): JsonBody<HelloBody>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "message": format!("Hello, {}!", body.name) })))
}
