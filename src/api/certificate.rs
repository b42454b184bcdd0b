//! `POST /agent/certificate`: upload (or replace) an agent's certificate.
//!
//! The upload is checked against every rule before anything is written; a replacement
//! closes the Socket.IO sessions that authenticated with the old certificate, and the next
//! handshake already sees the new one (the verifier reads the store directly).

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, JsonBody};
use crate::store::cert::validate_upload;

#[derive(Deserialize)]
pub struct UploadBody {
    agent_id: String,
    certificate: String,
}

pub async fn upload(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<UploadBody>,
) -> Result<Json<Value>, ApiError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let cert = validate_upload(&body.agent_id, &body.certificate, now).inspect_err(|e| {
        // The agent id is logged only once it is known to be a safe, printable id.
        let agent_id = crate::identity::AgentId::parse(&body.agent_id).ok();
        tracing::info!(?agent_id, reason = %e, "certificate upload refused");
    })?;
    let outcome = state.store.put(cert).await?;
    let stored = &outcome.stored;
    match &outcome.replaced {
        Some(old) => {
            let closed = state
                .agents
                .disconnect_sessions(&old.agent_id, Some(old.fingerprint));
            tracing::info!(
                agent_id = %stored.agent_id, fingerprint = %stored.fingerprint,
                old_fingerprint = %old.fingerprint, closed_sessions = closed,
                "agent certificate replaced"
            );
        }
        None => tracing::info!(
            agent_id = %stored.agent_id, fingerprint = %stored.fingerprint,
            key = %stored.key_type, "agent certificate uploaded"
        ),
    }
    Ok(Json(json!({
        "message": "Certificate uploaded successfully",
        "agent_id": stored.agent_id,
    })))
}
