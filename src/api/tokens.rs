//! API tokens: `POST /tokens` issues one, `GET /tokens` lists the active ones,
//! `POST /tokens/{jti}/revoke` revokes one (any jti, issued here or not), `GET
//! /tokens/audit` shows who issued and revoked what. All under scope `tokens:admin`. The
//! names and shapes of `POST /tokens` are those of the replaced `generate-gateway-token`
//! function (`expiresInDays`, `expiresAt`), so its callers keep working; see
//! [`crate::auth::tokens`].

use axum::extract::{Path, State};
use axum::{Extension, Json};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::extract::limit;
use super::schema::{AuditList, ErrorDetail, TokenIssued, TokenList, TokenRevoked};
use super::{ApiError, ApiQuery, AppState, JsonBody, Page};
use crate::auth::ApiKey;
use crate::auth::tokens::{DEFAULT_DAYS, MAX_DAYS, TokenRequest};
use crate::clock::rfc3339_unix;
use crate::store::tokens::{AuditAction, AuditRecord, IssuedToken, TokenCursor};

/// Longest `project` and `service` name.
const MAX_NAME: usize = 64;
/// Longest `description` and `reason`.
const MAX_TEXT: usize = 1024;
/// Longest jti accepted for a revocation.
const MAX_JTI: usize = 128;

/// The request body of `POST /tokens` as documented; the handler reads each field itself
/// ([`IssueFields`]) so that every error names its field.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // the documented shape; `IssueFields` is what is parsed
pub(crate) struct IssueTokenBody {
    /// The `project` claim: 1 to 64 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit.
    #[schema(example = "captionacc")]
    project: String,
    /// The `service` claim, same rule as `project`.
    #[schema(example = "prefect")]
    service: String,
    /// Free text shown in the listing and the audit (at most 1024 characters).
    description: Option<String>,
    /// Lifetime in days, 1 to 365; default 90.
    #[schema(minimum = 1, maximum = 365)]
    expires_in_days: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IssueFields {
    project: Option<Value>,
    service: Option<Value>,
    description: Option<Value>,
    #[serde(rename = "expiresInDays")]
    expires_in_days: Option<Value>,
}

#[utoipa::path(
    post, path = "/tokens", operation_id = "issue_token",
    summary = "Issue an API token (HS256 JWT with jti, project, service, iat, exp)", tag = "tokens",
    security(("api_key" = [])),
    request_body = IssueTokenBody,
    responses(
        (status = 200, description = "The token (shown only here) and its claims", body = TokenIssued),
        (status = 400, description = "A field's value is out of its range or rule (the detail names it)", body = ErrorDetail),
        (status = 403, description = "The API key lacks the scope 'tokens:admin'", body = ErrorDetail),
        (status = 409, description = "The gateway has no GATEWAY_JWT_SECRET to sign with", body = ErrorDetail),
        (status = 422, description = "A field is missing, unknown or of the wrong type (the detail names it)", body = ErrorDetail),
        (status = 503, description = "With `[cluster]`: Redis is unreachable; no token was issued", body = ErrorDetail),
    ),
)]
pub(crate) async fn issue(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    JsonBody(body): JsonBody<IssueFields>,
) -> Result<Json<Value>, ApiError> {
    let request = TokenRequest {
        project: name(body.project, "project")?,
        service: name(body.service, "service")?,
        description: text(body.description, "description")?.unwrap_or_default(),
        days: days(body.expires_in_days)?,
    };
    let new = state.tokens.issue(request, &key.name).await?;
    Ok(Json(json!({
        "token": new.token,
        "jti": new.record.jti,
        "expiresAt": rfc3339_unix(new.record.expires_at),
        "project": new.record.project,
        "service": new.record.service,
    })))
}

/// `?project=&limit=&after=` of `GET /tokens`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only the tokens of this project.
    project: Option<String>,
    /// Page size (default 100).
    #[serde(default, deserialize_with = "limit")]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// `next_after` of the previous page.
    #[serde(default, deserialize_with = "token_cursor")]
    #[param(value_type = Option<String>)]
    after: Option<TokenCursor>,
}

#[utoipa::path(
    get, path = "/tokens", operation_id = "list_tokens",
    summary = "List active API tokens, newest first (paged; never the token itself)", tag = "tokens",
    security(("api_key" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "One page of active tokens (not expired, not revoked)", body = TokenList),
        (status = 400, description = "A query parameter is invalid or unknown (the detail names it)", body = ErrorDetail),
        (status = 403, description = "The API key lacks the scope 'tokens:admin'", body = ErrorDetail),
        (status = 503, description = "With `[cluster]`: Redis is unreachable", body = ErrorDetail),
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(super::extract::DEFAULT_PAGE);
    let fetched = state
        .tokens
        .list(q.project.as_deref(), q.after.as_ref(), limit + 1)
        .await?;
    let fetched: Vec<(String, IssuedToken)> = fetched
        .into_iter()
        .map(|t| (format!("{}:{}", t.created_at, t.jti), t))
        .collect();
    let page: Page<_, String> = Page::cut(fetched, limit, |(cursor, _)| cursor);
    let tokens: Vec<Value> = page
        .items
        .iter()
        .map(|(_, t)| {
            json!({
                "jti": t.jti,
                "project": t.project,
                "service": t.service,
                "description": t.description,
                "createdAt": rfc3339_unix(t.created_at),
                "expiresAt": rfc3339_unix(t.expires_at),
            })
        })
        .collect();
    Ok(Json(
        json!({ "tokens": tokens, "next_after": page.next_after }),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevokeBody {
    /// Why (at most 1024 characters); kept in the audit.
    #[schema(example = "Token compromised")]
    reason: String,
}

/// Revokes a token by its jti: refused by every JWT route at once on this node, on the
/// others within a second. Works for tokens this gateway did not issue (minted by the
/// replaced system with the same secret): kept for 365 days, the longest lifetime a token
/// can have. Revoking again changes nothing.
#[utoipa::path(
    post, path = "/tokens/{jti}/revoke", operation_id = "revoke_token",
    summary = "Revoke an API token by its jti", tag = "tokens", security(("api_key" = [])),
    params(("jti" = String, Path, description = "The token's `jti` claim")),
    request_body = RevokeBody,
    responses(
        (status = 200, description = "Revoked (or already revoked)", body = TokenRevoked),
        (status = 400, description = "The jti or the reason breaks its rule", body = ErrorDetail),
        (status = 403, description = "The API key lacks the scope 'tokens:admin'", body = ErrorDetail),
        (status = 503, description = "With `[cluster]`: Redis is unreachable; nothing was revoked", body = ErrorDetail),
    ),
)]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    Path(jti): Path<String>,
    JsonBody(body): JsonBody<RevokeBody>,
) -> Result<Json<Value>, ApiError> {
    if jti.is_empty() || jti.len() > MAX_JTI || !jti.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::BadRequest(format!(
            "jti must be 1 to {MAX_JTI} visible ASCII characters"
        )));
    }
    let reason = text(Some(Value::String(body.reason)), "reason")?.unwrap_or_default();
    if reason.is_empty() {
        return Err(ApiError::BadRequest("reason must not be empty".into()));
    }
    let revoked = state.tokens.revoke(&jti, &reason, &key.name).await?;
    Ok(Json(json!({
        "jti": jti,
        "revoked": true,
        "alreadyRevoked": revoked.already,
        "expiresAt": rfc3339_unix(revoked.expires_at),
    })))
}

/// `?limit=&after=` of `GET /tokens/audit`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct AuditQuery {
    /// Page size (default 100).
    #[serde(default, deserialize_with = "limit")]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// `next_after` of the previous page.
    #[serde(default, deserialize_with = "audit_cursor")]
    #[param(value_type = Option<String>)]
    after: Option<String>,
}

#[utoipa::path(
    get, path = "/tokens/audit", operation_id = "token_audit",
    summary = "Audit records of token issues and revocations, newest first (paged)", tag = "tokens",
    security(("api_key" = [])),
    params(AuditQuery),
    responses(
        (status = 200, description = "One page of audit records", body = AuditList),
        (status = 400, description = "A query parameter is invalid or unknown (the detail names it)", body = ErrorDetail),
        (status = 403, description = "The API key lacks the scope 'tokens:admin'", body = ErrorDetail),
        (status = 503, description = "With `[cluster]`: Redis is unreachable", body = ErrorDetail),
    ),
)]
pub(crate) async fn audit(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(super::extract::DEFAULT_PAGE);
    let fetched = state.tokens.audit(q.after.as_deref(), limit + 1).await?;
    let page: Page<_, String> = Page::cut(fetched, limit, |r: &AuditRecord| &r.id);
    let records: Vec<Value> = page.items.iter().map(audit_view).collect();
    Ok(Json(
        json!({ "records": records, "next_after": page.next_after }),
    ))
}

fn audit_view(r: &AuditRecord) -> Value {
    let (description, reason) = match r.action {
        AuditAction::Issue => (Some(&r.detail), None),
        AuditAction::Revoke => (None, Some(&r.detail)),
    };
    json!({
        "id": r.id,
        "at": rfc3339_unix(r.at),
        "key": r.actor,
        "action": r.action.as_str(),
        "jti": r.jti,
        "project": r.project,
        "service": r.service,
        "description": description,
        "reason": reason,
    })
}

/// A required `project` or `service`: a string of 1 to 64 of `A-Z a-z 0-9 . _ -`,
/// starting with a letter or digit (what a route's `claims` can name, and safe in a
/// Redis key).
fn name(value: Option<Value>, field: &str) -> Result<String, ApiError> {
    let Some(value) = value else {
        return Err(ApiError::InvalidJson(format!("{field} is required")));
    };
    let Value::String(s) = value else {
        return Err(ApiError::InvalidJson(format!(
            "{field} must be a string, got {value}"
        )));
    };
    let ok = s.len() <= MAX_NAME
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(ApiError::BadRequest(format!(
            "{field} must be 1 to {MAX_NAME} of A-Z a-z 0-9 . _ - starting with a letter or digit, got {s:?}"
        )));
    }
    Ok(s)
}

/// An optional free text of at most [`MAX_TEXT`] characters.
fn text(value: Option<Value>, field: &str) -> Result<Option<String>, ApiError> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= MAX_TEXT => Ok(Some(s)),
        Some(Value::String(_)) => Err(ApiError::BadRequest(format!(
            "{field} exceeds {MAX_TEXT} characters"
        ))),
        Some(other) => Err(ApiError::InvalidJson(format!(
            "{field} must be a string, got {other}"
        ))),
    }
}

/// `expiresInDays`: a whole number from 1 to 365, 90 when absent.
fn days(value: Option<Value>) -> Result<i64, ApiError> {
    let message = |got: &Value| {
        format!("expiresInDays must be a whole number of days from 1 to {MAX_DAYS}, got {got}")
    };
    match value {
        None => Ok(DEFAULT_DAYS),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(d) if (1..=MAX_DAYS).contains(&d) => Ok(d),
            _ => Err(ApiError::BadRequest(message(&Value::Number(n)))),
        },
        Some(other) => Err(ApiError::InvalidJson(message(&other))),
    }
}

fn token_cursor<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TokenCursor>, D::Error> {
    use serde::de::Error as _;
    let text = String::deserialize(d)?;
    text.split_once(':')
        .and_then(|(created_at, jti)| {
            Some(TokenCursor {
                created_at: created_at.parse().ok()?,
                jti: jti.to_owned(),
            })
        })
        .filter(|c| !c.jti.is_empty())
        .map(Some)
        .ok_or_else(|| {
            D::Error::custom(format!(
                "after must be the next_after of a previous page, got '{text}'"
            ))
        })
}

fn audit_cursor<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error as _;
    let text = String::deserialize(d)?;
    // A row id (database) or a stream id `<ms>-<n>` (Redis).
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let ok = match text.split_once('-') {
        Some((a, b)) => digits(a) && digits(b),
        None => digits(&text),
    };
    if ok {
        Ok(Some(text))
    } else {
        Err(D::Error::custom(format!(
            "after must be the next_after of a previous page, got '{text}'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bad_field_is_refused_naming_it() {
        for (value, status) in [
            (json!(0), 400),
            (json!(366), 400),
            (json!(1.5), 400),
            (json!("x"), 422),
            (json!(null), 422),
        ] {
            let e = days(Some(value.clone())).unwrap_err();
            assert_eq!(e.status().as_u16(), status, "{value}");
            assert!(e.to_string().contains("expiresInDays"), "{e}");
        }
        assert_eq!(days(None).unwrap(), 90);
        assert_eq!(days(Some(json!(365))).unwrap(), 365);
        let e = name(None, "project").unwrap_err();
        assert_eq!(
            (e.status().as_u16(), e.to_string().as_str()),
            (422, "project is required")
        );
        assert!(
            name(Some(json!("a b")), "service")
                .unwrap_err()
                .to_string()
                .contains("service")
        );
        assert!(name(Some(json!("-a")), "project").is_err());
        assert_eq!(
            name(Some(json!("captionacc")), "project").unwrap(),
            "captionacc"
        );
        assert!(text(Some(json!("x".repeat(1025))), "description").is_err());
    }
}
