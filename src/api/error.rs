//! [`ApiError`]: every way an API request can fail, mapped to a status in one place, and
//! [`detail`], the one way to build a `{"detail": ...}` response.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::MAX_BODY_BYTES;
use crate::agents::commands::CommandError;
use crate::enroll::TokenError;
use crate::store::{CertError, StoreError};

/// Every way an API request can fail, mapped to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Forbidden(&'static str),
    /// The key is valid but lacks the scope the endpoint needs.
    #[error("API key lacks the scope '{0}'")]
    MissingScope(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("request body exceeds {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    #[error("{0}")]
    BadBody(String),
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Certificate(#[from] CertError),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Forbidden(_) | Self::MissingScope(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadBody(_) => StatusCode::BAD_REQUEST,
            Self::InvalidJson(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Token(_) => StatusCode::UNAUTHORIZED,
            Self::Certificate(_) => StatusCode::BAD_REQUEST,
            Self::Command(CommandError::NotConnected(_)) => StatusCode::NOT_FOUND,
            Self::Command(CommandError::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
            // The agent's socket failed mid-command: the upstream failed, not the request.
            Self::Command(CommandError::Failed { .. }) => StatusCode::BAD_GATEWAY,
            Self::Store(_) | Self::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let text = match &self {
            Self::Store(e) => {
                tracing::error!(error = %e, "certificate store failure");
                "certificate store failure; see the gateway log".to_owned()
            }
            Self::Io { context, source } => {
                tracing::error!(error = %source, "{context}");
                format!("{context}; see the gateway log")
            }
            other => other.to_string(),
        };
        detail(status, &text)
    }
}

/// `{"detail": "..."}` with `status`: the shape of every error response, including those
/// of the Socket.IO session guard.
pub fn detail(status: StatusCode, detail: &str) -> Response {
    (status, Json(serde_json::json!({ "detail": detail }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::AgentId;

    /// Every variant, each with the status it must map to. A new variant fails to compile
    /// in `ApiError::status` (no catch-all arm) and belongs in this table too.
    #[test]
    fn every_api_error_maps_to_its_status() {
        let agent = AgentId::parse("a1").unwrap();
        let io = || std::io::Error::other("disk full");
        let table: Vec<(ApiError, StatusCode)> = vec![
            (
                ApiError::Forbidden("Invalid API key"),
                StatusCode::FORBIDDEN,
            ),
            (ApiError::MissingScope("agents:read"), StatusCode::FORBIDDEN),
            (ApiError::NotFound("x".into()), StatusCode::NOT_FOUND),
            (ApiError::BodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE),
            (ApiError::BadBody("x".into()), StatusCode::BAD_REQUEST),
            (
                ApiError::InvalidJson("x".into()),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (ApiError::BadRequest("x".into()), StatusCode::BAD_REQUEST),
            (TokenError::Unknown.into(), StatusCode::UNAUTHORIZED),
            (TokenError::Used.into(), StatusCode::UNAUTHORIZED),
            (TokenError::OtherAgent.into(), StatusCode::UNAUTHORIZED),
            (
                TokenError::Expired("t".into()).into(),
                StatusCode::UNAUTHORIZED,
            ),
            (CertError::NoCommonName.into(), StatusCode::BAD_REQUEST),
            (
                CommandError::NotConnected(agent.clone()).into(),
                StatusCode::NOT_FOUND,
            ),
            (
                CommandError::Timeout {
                    agent_id: agent.clone(),
                    event: "e".into(),
                    timeout_ms: 1,
                }
                .into(),
                StatusCode::GATEWAY_TIMEOUT,
            ),
            (
                CommandError::Failed {
                    agent_id: agent,
                    event: "e".into(),
                    reason: crate::agents::commands::DeliveryError::Ack(
                        socketioxide::AckError::Timeout,
                    ),
                }
                .into(),
                StatusCode::BAD_GATEWAY,
            ),
            (
                StoreError::Io(io()).into(),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                ApiError::Io {
                    context: "could not write",
                    source: io(),
                },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (error, status) in table {
            let shown = format!("{error:?}");
            assert_eq!(error.status(), status, "{shown}");
            assert_eq!(error.into_response().status(), status, "{shown}");
        }
    }

    #[tokio::test]
    async fn internal_errors_show_no_internals() {
        use http_body_util::BodyExt;
        let response =
            ApiError::Store(StoreError::Io(std::io::Error::other("/secret/path"))).into_response();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"detail": "certificate store failure; see the gateway log"})
        );
    }
}
