//! Enrollment with one-time install tokens: `POST /install-tokens` (API key) issues a
//! token for one agent id; `POST /agent/register` (the token is the credential) stores the
//! agent's own certificate under the same rules as an upload.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::schema::{ErrorDetail, InstallToken, RegisterResponse};
use super::{ApiError, AppState, JsonBody, agent_id};
use crate::clock::rfc3339_unix;
use crate::store::cert::validate_upload;

/// Token lifetime bounds: at least a second, at most 30 days (an installer that has not
/// run in a month should get a fresh token).
pub const MAX_TTL_SECS: i64 = 30 * 86_400;
pub const DEFAULT_TTL_SECS: i64 = 3600;

/// Largest metadata object an agent may register with, serialised.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    agent_id: String,
    /// Lifetime in seconds, 1 to 2592000 (30 days); default 3600.
    #[schema(minimum = 1, maximum = 2592000)]
    ttl_s: Option<i64>,
}

#[utoipa::path(
    post, path = "/install-tokens", operation_id = "issue_install_token",
    summary = "Issue a one-time install token for an agent id", tag = "enrollment", security(("api_key" = [])),
    request_body = IssueBody,
    responses(
        (status = 200, description = "A one-time token for the agent", body = InstallToken),
        (status = 400, description = "Invalid agent id or ttl_s", body = ErrorDetail),
        (status = 500, description = "The token could not be stored", body = ErrorDetail),
        (status = 503, description = "With `[cluster]`: Redis is unreachable; no token was issued", body = ErrorDetail),
    ),
)]
pub async fn issue(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<IssueBody>,
) -> Result<Json<Value>, ApiError> {
    let id = agent_id(&body.agent_id)?;
    let ttl = body.ttl_s.unwrap_or(DEFAULT_TTL_SECS);
    if !(1..=MAX_TTL_SECS).contains(&ttl) {
        return Err(ApiError::BadRequest(format!(
            "ttl_s must be between 1 and {MAX_TTL_SECS}, got {ttl}"
        )));
    }
    let (token, expires_at) = state.enrollment.issue(id.clone(), ttl).await?;
    tracing::info!(agent_id = %id, expires_at = %rfc3339_unix(expires_at), "install token issued");
    Ok(Json(
        json!({ "install_token": token, "agent_id": id, "expires_at": rfc3339_unix(expires_at) }),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// From `POST /install-tokens`; valid once, for this agent id.
    install_token: String,
    agent_id: String,
    /// The agent's own certificate, under the rules of `POST /agent/certificate`.
    certificate: String,
    /// A JSON object of at most 16 KiB, shown in `GET /agents/{agent_id}`.
    #[serde(default)]
    metadata: Option<Value>,
}

/// The agent registers its own certificate; the install token is the credential (no API
/// key).
#[utoipa::path(
    post, path = "/agent/register", operation_id = "register_agent",
    summary = "Register an agent's own certificate with an install token", tag = "enrollment",
    request_body = RegisterBody,
    responses(
        (status = 200, description = "Registered", body = RegisterResponse),
        (status = 400, description = "Invalid agent id or metadata, or the certificate breaks an upload rule", body = ErrorDetail),
        (status = 401, description = "The install token is unknown, used, expired or for another agent", body = ErrorDetail),
        (status = 500, description = "The store could not write; nothing was stored", body = ErrorDetail),
        (status = 503, description = "With `[cluster]`: Redis is unreachable; nothing was stored", body = ErrorDetail),
    ),
)]
pub async fn register(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Result<Json<Value>, ApiError> {
    let id = agent_id(&body.agent_id)?;
    let metadata = match body.metadata {
        None | Some(Value::Null) => json!({}),
        Some(m @ Value::Object(_)) => m,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "metadata must be a JSON object".into(),
            ));
        }
    };
    if metadata.to_string().len() > MAX_METADATA_BYTES {
        return Err(ApiError::BadRequest(format!(
            "metadata exceeds {MAX_METADATA_BYTES} bytes"
        )));
    }
    let now = state.clock.unix();
    let outcome = state
        .enrollment
        .register(&body.install_token, &id, metadata, || {
            validate_upload(id.as_str(), &body.certificate, now)
        })
        .await
        .inspect_err(|e| {
            tracing::info!(agent_id = %id, reason = %e, "agent registration refused");
        })?;
    let stored = super::certificate::stored(&state, outcome, "register");
    Ok(Json(json!({
        "agent_id": stored.agent_id,
        "fingerprint": stored.fingerprint,
        "message": "Agent registered",
    })))
}
