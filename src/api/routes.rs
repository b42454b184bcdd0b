//! The gateway's routes (scope `routes:admin`): `GET /routes` lists the config routes and
//! the runtime ones with each upstream's health; `POST /routes` registers a route at
//! runtime, `PUT /routes/{name}` creates or replaces one, `DELETE /routes/{name}` removes
//! one (the admin API of the module registry and of Traefik/Caddy that agentgate replaces).
//!
//! A body has exactly the fields of a `[[routes]]` entry, with the same defaults, and is
//! checked by the same code (`config::validate_route`); a runtime route is stored (see
//! `store::routes`: the database on one node, Redis with `[cluster]`) before it is
//! served or answered. Config routes belong to the file: a runtime route cannot take a
//! config route's name or prefix, and a config route cannot be replaced or deleted here.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::schema::{ErrorDetail, RouteDoc, RouteList};
use super::{ApiError, AppState, JsonBody};
use crate::config::{RawRoute, route_to_raw};
use crate::store::routes::{self, Mode, Outcome, RouteWriteError};

/// `GET /routes`: the routes in force, longest prefix first, with each upstream's health,
/// and the runtime routes stored but not served here, with the reason.
#[utoipa::path(
    get, path = "/routes", operation_id = "list_routes",
    summary = "List the gateway's routes (config and runtime) with each upstream's health (scope routes:admin)",
    tag = "gateway", security(("api_key" = [])),
    responses(
        (status = 200, description = "The routes in force, longest prefix first, and the runtime routes left out", body = RouteList),
        (status = 403, description = "The key lacks the scope routes:admin (the detail names it)", body = ErrorDetail),
    ),
)]
pub async fn list(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "routes": state.proxy.describe(),
        "not_served": state.proxy.not_served(),
    }))
}

/// `POST /routes`: registers a route; a name already taken is a 409 (`PUT` replaces).
#[utoipa::path(
    post, path = "/routes", operation_id = "create_route",
    summary = "Register a route at runtime (scope routes:admin)",
    tag = "gateway", security(("api_key" = [])),
    request_body = RawRoute,
    responses(
        (status = 201, description = "Stored and served (on every node with `[cluster]`)", body = RouteDoc),
        (status = 403, description = "The key lacks the scope routes:admin (the detail names it)", body = ErrorDetail),
        (status = 409, description = "The name or the prefix is taken (the detail names the route), or belongs to the configuration file", body = ErrorDetail),
        (status = 422, description = "The route breaks a rule (the detail names the field, e.g. `upstreams[0]`); nothing was stored", body = ErrorDetail),
        (status = 500, description = "The database could not write; nothing was stored", body = ErrorDetail),
        (status = 503, description = "With `[cluster]`: Redis is unreachable; nothing was stored", body = ErrorDetail),
    ),
)]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    write(&state, parse(body)?, Mode::Create).await
}

/// `PUT /routes/{name}`: creates the route or replaces the runtime route of that name.
#[utoipa::path(
    put, path = "/routes/{name}", operation_id = "put_route",
    summary = "Create or replace a runtime route (scope routes:admin)",
    tag = "gateway", security(("api_key" = [])),
    params(("name" = String, Path, description = "The route's name; the body's `name` may be left out, or must be the same")),
    request_body = RawRoute,
    responses(
        (status = 200, description = "Replaced", body = RouteDoc),
        (status = 201, description = "Created", body = RouteDoc),
        (status = 403, description = "The key lacks the scope routes:admin (the detail names it)", body = ErrorDetail),
        (status = 409, description = "The prefix is taken, or the name belongs to a route of the configuration file", body = ErrorDetail),
        (status = 422, description = "The route breaks a rule (the detail names the field); nothing was stored", body = ErrorDetail),
        (status = 500, description = "The database could not write; nothing was stored", body = ErrorDetail),
        (status = 503, description = "With `[cluster]`: Redis is unreachable; nothing was stored", body = ErrorDetail),
    ),
)]
pub async fn put(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(mut body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    match body.get("name") {
        None => {
            if let Some(o) = body.as_object_mut() {
                o.insert("name".into(), Value::String(name));
            }
        }
        Some(given) if given.as_str() == Some(name.as_str()) => {}
        Some(given) => {
            return Err(ApiError::InvalidJson(format!(
                "invalid route: name: {given} differs from the name in the path, {name:?}"
            )));
        }
    }
    write(&state, parse(body)?, Mode::Replace).await
}

/// `DELETE /routes/{name}`: removes a runtime route.
#[utoipa::path(
    delete, path = "/routes/{name}", operation_id = "delete_route",
    summary = "Delete a runtime route (scope routes:admin)",
    tag = "gateway", security(("api_key" = [])),
    params(("name" = String, Path, description = "The route's name")),
    responses(
        (status = 204, description = "Deleted; its prefix answers 404 (on every node with `[cluster]`)"),
        (status = 403, description = "The key lacks the scope routes:admin (the detail names it)", body = ErrorDetail),
        (status = 404, description = "No runtime route of that name", body = ErrorDetail),
        (status = 409, description = "The route belongs to the configuration file", body = ErrorDetail),
        (status = 500, description = "The database could not write; nothing was deleted", body = ErrorDetail),
        (status = 503, description = "With `[cluster]`: Redis is unreachable; nothing was deleted", body = ErrorDetail),
    ),
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    // A config route is refused before any write: the answer does not depend on Redis.
    // A runtime route of the same name (shadowed by it since a SIGHUP) is deleted.
    if !routes::contains(&state.store, &name)
        && let Some(conflict) = state.proxy.config_conflict(&name, None)
    {
        return Err(ApiError::Conflict(conflict));
    }
    if routes::delete(&state.store, &name).await? {
        tracing::info!(route = %name, "runtime route deleted");
        return Ok(StatusCode::NO_CONTENT);
    }
    Err(ApiError::NotFound(format!(
        "no runtime route named {name:?}"
    )))
}

/// The body as a route, or a 422 naming the field at fault (`auth: unknown variant ...`,
/// `unknown field ...`, `missing field ...`).
fn parse(body: Value) -> Result<RawRoute, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ApiError::InvalidJson(if path == "." {
            format!("invalid route: {inner}")
        } else {
            format!("invalid route: {path}: {inner}")
        })
    })
}

/// Validates, checks against the config routes, stores, answers with the route in force.
async fn write(state: &AppState, raw: RawRoute, mode: Mode) -> Result<Response, ApiError> {
    let route = state
        .proxy
        .validate_runtime(raw)
        .map_err(|e| ApiError::InvalidJson(format!("invalid route: {e}")))?;
    if let Some(conflict) = state
        .proxy
        .config_conflict(&route.name, Some(&route.prefix))
    {
        return Err(ApiError::Conflict(conflict));
    }
    let outcome = routes::put(&state.store, route_to_raw(&route), mode)
        .await
        .map_err(|e| match e {
            RouteWriteError::Store(e) => ApiError::Store(e),
            conflict @ (RouteWriteError::Exists(_) | RouteWriteError::PrefixTaken { .. }) => {
                ApiError::Conflict(conflict.to_string())
            }
        })?;
    tracing::info!(route = %route.name, prefix = %route.prefix, ?outcome, "runtime route stored");
    let status = match outcome {
        Outcome::Created => StatusCode::CREATED,
        Outcome::Replaced => StatusCode::OK,
    };
    Ok((status, Json(state.proxy.view_of(&route))).into_response())
}
