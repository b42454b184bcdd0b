//! [`ApiError`]: every way an API request can fail, mapped to a status in one place,
//! [`detail`], the one way to build a `{"detail": ...}` response, and [`json_errors`], which
//! puts the error responses of everything else (axum's 405, socketioxide's 400 and 413)
//! in that shape.

use axum::Json;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use crate::agents::commands::CommandError;
use crate::auth::IssueError;
use crate::enroll::{RegisterError, TokenError};
use crate::store::{CertError, RedisError, StoreError};

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
    /// The request is valid but the gateway is not set up for it.
    #[error("{0}")]
    Conflict(String),
    /// Over the endpoint's body limit; `key` is the `[limits]` key that sets it.
    #[error("request body exceeds the limit of {limit} bytes (limits.{key})")]
    BodyTooLarge { limit: usize, key: &'static str },
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
    /// A cluster-wide operation while Redis is unreachable.
    #[error("{0}")]
    ClusterUnavailable(String),
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
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadBody(_) => StatusCode::BAD_REQUEST,
            Self::InvalidJson(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Token(_) => StatusCode::UNAUTHORIZED,
            Self::Certificate(_) => StatusCode::BAD_REQUEST,
            Self::Command(CommandError::NotConnected(_)) => StatusCode::NOT_FOUND,
            Self::Command(CommandError::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
            // Redis, the way to the other nodes, is down: retry later (or on another node).
            Self::Command(CommandError::ClusterUnavailable { .. })
            | Self::ClusterUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            // The agent's socket failed mid-command: the upstream failed, not the request.
            Self::Command(CommandError::Failed { .. }) => StatusCode::BAD_GATEWAY,
            // Redis down or without state: the cluster cannot take changes now; nothing
            // was changed, and the same request can be sent again later.
            Self::Store(StoreError::Redis(RedisError::Unavailable(_) | RedisError::NoState)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            // The disk or the database failed: nothing the client can fix.
            Self::Store(
                StoreError::Io(_) | StoreError::Redis(RedisError::Protocol(_)) | StoreError::Db(_),
            )
            | Self::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<IssueError> for ApiError {
    fn from(e: IssueError) -> Self {
        match e {
            IssueError::NoSecret => Self::Conflict(e.to_string()),
            IssueError::Store(e) => e.into(),
            IssueError::Sign(_) => Self::Io {
                context: "token could not be signed",
                source: std::io::Error::other(e.to_string()),
            },
        }
    }
}

impl From<RegisterError> for ApiError {
    fn from(e: RegisterError) -> Self {
        match e {
            RegisterError::Token(e) => e.into(),
            RegisterError::Certificate(e) => e.into(),
            RegisterError::Store(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let text = match &self {
            Self::Store(StoreError::Redis(
                e @ (RedisError::Unavailable(_) | RedisError::NoState),
            )) => {
                tracing::warn!(error = %e, "shared state change refused");
                format!("{e}; nothing was changed, try again when Redis is back")
            }
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
        let mut response = detail(status, &text);
        if let Self::BodyTooLarge { .. } = self {
            body_left_unread(&mut response);
        }
        response
    }
}

/// Marks a response to a request whose body was refused unread (a 413): the connection
/// closes after it (`Connection: close`, RFC 9112 §9.6), as nginx closes after its 413,
/// since the rest of the body would otherwise be read as the next request.
pub(crate) fn body_left_unread(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// `{"detail": "..."}` with `status`: the shape of every error response, including those
/// of the Socket.IO session guard.
pub fn detail(status: StatusCode, detail: &str) -> Response {
    (status, Json(serde_json::json!({ "detail": detail }))).into_response()
}

/// Largest error body [`json_errors`] reads to reuse as the detail or to add a detail to;
/// a larger or unsized one is replaced by a detail made from the status.
const MAX_ERROR_BODY: u64 = 4096;

/// axum middleware: every 4xx and 5xx leaves with a `{"detail": ...}` body.
///
/// Our handlers and guards already answer that way; what does not is answered by code we
/// do not own: axum's method router (405 with an empty body, and the `Allow` header, which
/// is kept), socketioxide (an empty 400 or 413; `{"code", "message"}` JSON for an unknown
/// session, to which a `detail` is added so Engine.IO clients keep their fields), axum's
/// own extractor rejections (plain text, which becomes the detail). Other headers are
/// kept (`Allow`, `Retry-After`).
pub(crate) async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = next.run(req).await;
    let status = response.status();
    // An upstream's own error goes to the client as the upstream sent it (the gateway's
    // errors about a proxied request are `{"detail": ...}` already).
    if !(status.is_client_error() || status.is_server_error())
        || response
            .extensions()
            .get::<crate::proxy::forward::Proxied>()
            .is_some()
    {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let small = hyper::body::Body::size_hint(&body)
        .upper()
        .is_some_and(|n| n <= MAX_ERROR_BODY);
    let bytes = if small {
        // The body is a complete in-memory error body; collecting it cannot wait on a peer.
        body.collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default()
    } else {
        Default::default()
    };
    let is_json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let body = if is_json {
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(o)) if o.contains_key("detail") => {
                return Response::from_parts(parts, Body::from(bytes));
            }
            Ok(serde_json::Value::Object(mut o)) => {
                let text = o
                    .get("message")
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
                    .unwrap_or_else(|| fallback_detail(status, &method, &path, &parts.headers));
                o.insert("detail".into(), text.into());
                serde_json::Value::Object(o)
            }
            _ => serde_json::json!({
                "detail": fallback_detail(status, &method, &path, &parts.headers)
            }),
        }
    } else {
        let text = std::str::from_utf8(&bytes)
            .ok()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| fallback_detail(status, &method, &path, &parts.headers));
        serde_json::json!({ "detail": text })
    };
    let bytes = body.to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(bytes))
}

/// The detail of an error response that came without one.
fn fallback_detail(
    status: StatusCode,
    method: &axum::http::Method,
    path: &str,
    headers: &HeaderMap,
) -> String {
    let reason = status.canonical_reason().unwrap_or("error");
    match status {
        // axum adds `Allow` outside the route's layers, so it is usually not there yet.
        StatusCode::METHOD_NOT_ALLOWED => {
            match headers.get(header::ALLOW).and_then(|v| v.to_str().ok()) {
                Some(allowed) => {
                    format!("method {method} is not allowed on {path}; allowed: {allowed}")
                }
                None => format!(
                    "method {method} is not allowed on {path}; the Allow header lists the methods it answers"
                ),
            }
        }
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!("{reason}: the request body of {method} {path} exceeds its limit")
        }
        _ => format!("{reason} ({method} {path})"),
    }
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
            (ApiError::Conflict("x".into()), StatusCode::CONFLICT),
            (IssueError::NoSecret.into(), StatusCode::CONFLICT),
            (
                ApiError::BodyTooLarge {
                    limit: 1,
                    key: "max_body_bytes",
                },
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
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
                CommandError::ClusterUnavailable {
                    agent_id: agent.clone(),
                    reason: "Redis is unreachable".into(),
                }
                .into(),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                ApiError::ClusterUnavailable("x".into()),
                StatusCode::SERVICE_UNAVAILABLE,
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
                StoreError::Redis(RedisError::Unavailable(
                    redis::RedisError::from(io()).into(),
                ))
                .into(),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                StoreError::Redis(RedisError::NoState).into(),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                StoreError::Redis(RedisError::Protocol("x".into())).into(),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                StoreError::Db(crate::store::DbError::Stopped {
                    path: "agentgate.db".into(),
                })
                .into(),
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

    /// What `json_errors` makes of error responses written by code we do not own.
    #[tokio::test]
    async fn error_responses_from_elsewhere_get_a_detail() {
        use axum::Router;
        use axum::routing::{get, post};
        use http_body_util::BodyExt;
        use tower::ServiceExt;

        let app = Router::new()
            .route("/post-only", post(|| async { "ok" }))
            .route(
                "/plain",
                get(|| async { (StatusCode::BAD_REQUEST, "Invalid URL: bad segment") }),
            )
            .route(
                "/engine",
                get(|| async {
                    (
                        StatusCode::BAD_REQUEST,
                        [(header::CONTENT_TYPE, "application/json")],
                        r#"{"code":"1","message":"Session ID unknown"}"#,
                    )
                }),
            )
            .route("/empty", get(|| async { StatusCode::PAYLOAD_TOO_LARGE }))
            .route("/fine", get(|| async { "fine" }))
            .layer(axum::middleware::from_fn(json_errors));
        let call = |method: &str, path: &str| {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .unwrap();
            let app = app.clone();
            async move {
                let r = app.oneshot(req).await.unwrap();
                let status = r.status();
                let ct = r.headers().get(header::CONTENT_TYPE).cloned();
                let body = r.into_body().collect().await.unwrap().to_bytes();
                (status, ct, body)
            }
        };
        let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();

        let (status, ct, body) = call("GET", "/post-only").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(ct.unwrap(), "application/json");
        let detail = json(&body)["detail"].as_str().unwrap().to_owned();
        assert!(
            detail.starts_with("method GET is not allowed on /post-only"),
            "{detail}"
        );

        let (status, _, body) = call("GET", "/plain").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            json(&body),
            serde_json::json!({"detail": "Invalid URL: bad segment"})
        );

        let (_, _, body) = call("GET", "/engine").await;
        assert_eq!(
            json(&body),
            serde_json::json!({"code": "1", "message": "Session ID unknown", "detail": "Session ID unknown"})
        );

        let (status, _, body) = call("GET", "/empty").await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            json(&body)["detail"]
                .as_str()
                .unwrap()
                .contains("exceeds its limit"),
            "{body:?}"
        );

        // A success passes untouched.
        let (status, _, body) = call("GET", "/fine").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"fine"[..]));
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
