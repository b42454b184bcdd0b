//! The HTTP API (axum): routes, the Bearer API key check, JSON bodies and errors.
//!
//! Every error is `{"detail": "..."}` with a 4xx that names what is wrong; the one 5xx is
//! a store that cannot write, logged once here and shown to the client without internals.

pub mod certificate;
pub mod health;
pub mod hello;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, body::Bytes};
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::agents::Agents;
use crate::store::{CertError, CertStore, StoreError};

/// Largest request body the API reads (an agent certificate is 1-2 KiB of PEM).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: CertStore,
    pub agents: Agents,
    pub api_keys: ApiKeys,
}

/// The accepted API keys, kept as SHA-256 digests so that comparing a presented key takes
/// the same time whatever its length or content.
#[derive(Clone)]
pub struct ApiKeys(Arc<[[u8; 32]]>);

impl ApiKeys {
    pub fn new<S: AsRef<str>>(keys: &[S]) -> Self {
        Self(keys.iter().map(|k| digest(k.as_ref().as_bytes())).collect())
    }

    /// Constant-time check against every key (no early exit on a match).
    pub fn accepts(&self, presented: &str) -> bool {
        let d = digest(presented.as_bytes());
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |acc, k| acc | k.ct_eq(&d))
            .into()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    crate::identity::Fingerprint::of_der(bytes).0
}

/// The API router (without the Socket.IO layer, which the server mounts around it).
pub fn router(state: AppState, cors_origins: &[String]) -> Router {
    let protected = Router::new()
        .route("/hello-world", post(hello::hello_world))
        .route("/agent/certificate", post(certificate::upload))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let public = Router::new().route("/health", get(health::health));
    let mut router = protected
        .merge(public)
        .fallback(not_found)
        .with_state(state);
    if !cors_origins.is_empty() {
        router = router.layer(cors(cors_origins));
    }
    router
}

/// CORS as the system it replaces had it: listed origins only, preflight cached 24 h.
fn cors(origins: &[String]) -> CorsLayer {
    // Origins were validated as header values when the configuration was loaded.
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(Duration::from_secs(24 * 3600))
}

async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match presented {
        None => ApiError::Forbidden("Not authenticated: send 'Authorization: Bearer <API key>'")
            .into_response(),
        Some(key) if state.api_keys.accepts(key) => next.run(req).await,
        Some(_) => ApiError::Forbidden("Invalid API key").into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("Not Found".into())
}

/// Every way an API request can fail, mapped to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("request body exceeds {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    #[error("{0}")]
    BadBody(String),
    #[error("{0}")]
    InvalidJson(String),
    #[error(transparent)]
    Certificate(#[from] CertError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadBody(_) => StatusCode::BAD_REQUEST,
            Self::InvalidJson(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Certificate(_) => StatusCode::BAD_REQUEST,
            Self::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = match &self {
            Self::Store(e) => {
                tracing::error!(error = %e, "certificate store failure");
                "certificate store failure; see the gateway log".to_owned()
            }
            other => other.to_string(),
        };
        (status, Json(serde_json::json!({ "detail": detail }))).into_response()
    }
}

/// A JSON body with this API's errors: 413 over [`MAX_BODY_BYTES`], 422 for malformed JSON
/// or missing fields (as FastAPI answered), whatever the Content-Type says.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let req = req
            .map(|body| axum::body::Body::new(http_body_util::Limited::new(body, MAX_BODY_BYTES)));
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::BodyTooLarge
            } else {
                ApiError::BadBody(format!(
                    "could not read the request body: {}",
                    rejection.body_text()
                ))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::InvalidJson(format!("invalid JSON body: {e}")))
    }
}
