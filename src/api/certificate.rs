//! Agent certificates: upload (or replace), inspect, list, delete.
//!
//! An upload is checked against every rule before anything is written; a replacement or
//! a deletion closes the Socket.IO sessions that authenticated with the old certificate,
//! and the next handshake already sees the change (the verifier reads the store).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::schema::{
    CertificateList, CertificateView, DeleteResponse, ErrorDetail, UploadResponse,
};
use super::{ApiError, ApiQuery, AppState, JsonBody, Page, PageQuery, agent_id};
use crate::clock::rfc3339_unix;
use crate::store::cert::validate_upload;
use crate::store::{PutOutcome, StoredCert};

#[derive(Deserialize, ToSchema)]
pub struct UploadBody {
    /// Must equal the certificate's CN.
    #[schema(example = "12345678")]
    agent_id: String,
    /// One PEM certificate, self-signed, currently valid, RSA of at least 2048 bits or EC /
    /// Ed25519; no private key.
    certificate: String,
}

/// Uploads (or replaces) an agent's certificate. A replacement closes the sessions that
/// authenticated with the old one.
#[utoipa::path(
    post, path = "/agent/certificate", operation_id = "upload_certificate",
    summary = "Upload or replace an agent certificate", tag = "certificates", security(("api_key" = [])),
    request_body = UploadBody,
    responses(
        (status = 200, description = "Stored", body = UploadResponse),
        (status = 400, description = "The certificate breaks an upload rule (the detail names it), or the agent id is invalid", body = ErrorDetail),
        (status = 500, description = "The store could not write; nothing was stored", body = ErrorDetail),
        (status = 503, description = "With `[cluster]`: Redis is unreachable; nothing was stored", body = ErrorDetail),
    ),
)]
pub async fn upload(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<UploadBody>,
) -> Result<Json<Value>, ApiError> {
    let now = state.clock.unix();
    let cert = validate_upload(&body.agent_id, &body.certificate, now).inspect_err(|e| {
        // The agent id is logged only once it is known to be a safe, printable id.
        let agent_id = crate::identity::AgentId::parse(&body.agent_id).ok();
        tracing::info!(?agent_id, reason = %e, "certificate upload refused");
    })?;
    let stored = store(&state, cert, "upload").await?;
    Ok(Json(json!({
        "message": "Certificate uploaded successfully",
        "agent_id": stored.agent_id,
    })))
}

/// Stores a validated certificate and closes the sessions of the one it replaces.
pub async fn store(
    state: &AppState,
    cert: StoredCert,
    via: &'static str,
) -> Result<Arc<StoredCert>, ApiError> {
    let outcome = state.store.put(cert).await?;
    Ok(stored(state, outcome, via))
}

/// After a certificate was stored: closes this node's sessions of the certificate it
/// replaced (other nodes close theirs when the change reaches them) and logs it.
pub fn stored(state: &AppState, outcome: PutOutcome, via: &'static str) -> Arc<StoredCert> {
    let stored = outcome.stored;
    match &outcome.replaced {
        Some(old) => {
            let closed = state
                .agents
                .disconnect_sessions(&old.agent_id, Some(old.fingerprint));
            tracing::info!(
                agent_id = %stored.agent_id, fingerprint = %stored.fingerprint,
                old_fingerprint = %old.fingerprint, closed_sessions = closed, via,
                "agent certificate replaced"
            );
        }
        None => tracing::info!(
            agent_id = %stored.agent_id, fingerprint = %stored.fingerprint,
            key = %stored.key_type, via, "agent certificate stored"
        ),
    }
    stored
}

/// The API's view of a stored certificate.
pub fn view(cert: &StoredCert) -> Value {
    json!({
        "agent_id": cert.agent_id,
        "fingerprint": cert.fingerprint,
        "subject": cert.subject,
        "not_before": rfc3339_unix(cert.not_before),
        "not_after": rfc3339_unix(cert.not_after),
        "key_type": cert.key_type,
        "self_signed": cert.self_signed(),
    })
}

#[utoipa::path(
    get, path = "/agent/certificate/{agent_id}", operation_id = "get_certificate",
    summary = "Inspect an agent's certificate", tag = "certificates", security(("api_key" = [])), params(("agent_id" = String, Path, description = "The agent id (the CN of its certificate)")),
    responses(
        (status = 200, description = "The stored certificate", body = CertificateView),
        (status = 400, description = "Invalid agent id", body = ErrorDetail),
        (status = 404, description = "No certificate stored for the agent", body = ErrorDetail),
    ),
)]
pub async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = agent_id(&id)?;
    let cert = state
        .store
        .by_agent(&id)
        .ok_or_else(|| ApiError::NotFound(format!("no certificate stored for agent '{id}'")))?;
    Ok(Json(view(&cert)))
}

/// `GET /agent/certificates`: one page in agent id order, read from the store's ordered
/// index (O(limit · log n)); `total` is the number of stored certificates.
#[utoipa::path(
    get, path = "/agent/certificates", operation_id = "list_certificates",
    summary = "List stored certificates (paged)", tag = "certificates", security(("api_key" = [])),
    params(
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Page size (default 100)"),
        ("after" = Option<String>, Query, description = "`next_after` of the previous page"),
    ),
    responses(
        (status = 200, description = "One page of certificates", body = CertificateList),
        (status = 400, description = "A query parameter is invalid or unknown (the detail names it)", body = ErrorDetail),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    if q.status.is_some() {
        return Err(ApiError::BadRequest(
            "status is not a filter of /agent/certificates; see /agents".into(),
        ));
    }
    let limit = q.limit();
    let fetched = state.store.page_after(q.after.as_ref(), limit + 1);
    let page = Page::cut(fetched, limit, |c| &c.agent_id);
    let certificates: Vec<Value> = page.items.iter().map(|c| view(c)).collect();
    Ok(Json(json!({
        "certificates": certificates,
        "total": state.store.len(),
        "next_after": page.next_after,
    })))
}

/// Revokes an agent: the certificate is removed (file and index), the agent's live
/// sessions are closed now, and its next handshake fails.
#[utoipa::path(
    delete, path = "/agent/certificate/{agent_id}", operation_id = "delete_certificate",
    summary = "Revoke an agent: delete its certificate, close its sessions", tag = "certificates", security(("api_key" = [])), params(("agent_id" = String, Path, description = "The agent id (the CN of its certificate)")),
    responses(
        (status = 200, description = "Revoked; the agent's sessions are closed", body = DeleteResponse),
        (status = 400, description = "Invalid agent id", body = ErrorDetail),
        (status = 404, description = "No certificate stored for the agent", body = ErrorDetail),
        (status = 500, description = "The store could not write", body = ErrorDetail),
        (status = 503, description = "With `[cluster]`: Redis is unreachable; nothing was changed", body = ErrorDetail),
    ),
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = agent_id(&id)?;
    let removed = state
        .store
        .remove(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no certificate stored for agent '{id}'")))?;
    let closed = state.agents.disconnect_sessions(&id, None);
    state.agents.registry.forget(&id);
    state.enrollment.forget(&id).await?;
    tracing::info!(agent_id = %id, fingerprint = %removed.fingerprint, closed_sessions = closed, "agent certificate deleted");
    Ok(Json(json!({
        "message": "Certificate deleted",
        "agent_id": id,
        "fingerprint": removed.fingerprint,
        "closed_sessions": closed,
    })))
}
