//! `POST /hello-world`: the liveness check of the API key path, kept from the system
//! agentgate replaces.

use axum::Json;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::{ApiError, JsonBody};

#[derive(Deserialize, ToSchema)]
pub struct HelloBody {
    name: String,
}

#[utoipa::path(
    post, path = "/hello-world", operation_id = "hello_world",
    summary = "Check the API key: greets `name`", tag = "hello", security(("api_key" = [])),
    request_body = HelloBody,
    responses((status = 200, description = "The greeting", body = crate::api::schema::HelloResponse)),
)]
pub async fn hello_world(JsonBody(body): JsonBody<HelloBody>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "message": format!("Hello, {}!", body.name) })))
}
