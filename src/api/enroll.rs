//! Enrollment with one-time install tokens: `POST /install-tokens` (API key) issues a
//! token for one agent id; `POST /agent/register` (the token is the credential) stores the
//! agent's own certificate under the same rules as an upload.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, JsonBody, agent_id};
use crate::clock::rfc3339_unix;
use crate::store::cert::validate_upload;

/// Token lifetime bounds: at least a second, at most 30 days (an installer that has not
/// run in a month should get a fresh token).
pub const MAX_TTL_SECS: i64 = 30 * 86_400;
pub const DEFAULT_TTL_SECS: i64 = 3600;

/// Largest metadata object an agent may register with, serialised.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    agent_id: String,
    ttl_s: Option<i64>,
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    install_token: String,
    agent_id: String,
    certificate: String,
    #[serde(default)]
    metadata: Option<Value>,
}

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
