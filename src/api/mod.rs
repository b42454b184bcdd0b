//! The HTTP API (axum): routes, the Bearer API key check, JSON bodies and errors.
//!
//! Every error is `{"detail": "..."}` with a 4xx that names what is wrong; the one 5xx is
//! a store that cannot write, logged once here and shown to the client without internals.

pub mod agents;
pub mod certificate;
pub mod enroll;
pub mod hello;
pub mod ops;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, body::Bytes};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;
use tokio_util::task::TaskTracker;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::agents::Agents;
use crate::agents::commands::CommandError;
use crate::enroll::{Enrollment, TokenError};
use crate::identity::{AgentId, Peer};
use crate::metrics::Metrics;
use crate::store::{CertError, CertStore, StoreError};
use crate::tls::ServerCert;

/// Largest request body the API reads (an agent certificate is 1-2 KiB of PEM).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: CertStore,
    pub agents: Agents,
    pub api_keys: ApiKeys,
    pub metrics: Metrics,
    pub enrollment: Enrollment,
    pub server_cert: ServerCert,
    /// An agent whose last heartbeat (or connect) is older than this is reported stale.
    pub stale_after: Duration,
    /// In-flight API requests (not Socket.IO), drained first on shutdown.
    pub requests: TaskTracker,
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

/// Where `GET /metrics` is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsExposure {
    /// On the main listener, next to the API (no key, like /health).
    MainListener,
    /// Only on the separate `metrics_listen` address.
    SeparateListener,
}

/// The API router (without the Socket.IO layer, which the server mounts around it).
pub fn router(state: AppState, cors_origins: &[String], metrics: MetricsExposure) -> Router {
    let protected = Router::new()
        .route("/hello-world", post(hello::hello_world))
        .route("/agent/certificate", post(certificate::upload))
        .route(
            "/agent/certificate/{agent_id}",
            get(certificate::get_one).delete(certificate::delete),
        )
        .route("/agent/certificates", get(certificate::list))
        .route("/agents", get(agents::list))
        .route("/agents/commands", post(agents::fan_out))
        .route("/agents/{agent_id}", get(agents::get_one))
        .route("/agents/{agent_id}/commands", post(agents::command))
        .route("/install-tokens", post(enroll::issue))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let mut public = Router::new()
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/agent/register", post(enroll::register));
    if metrics == MetricsExposure::MainListener {
        public = public.route("/metrics", get(ops::metrics));
    }
    let mut router = protected
        .merge(public)
        .fallback(not_found)
        .with_state(state);
    if !cors_origins.is_empty() {
        router = router.layer(cors(cors_origins));
    }
    router
}

/// The router of the separate plain-HTTP metrics listener. It answers `/health` and
/// `/ready` too: with ACME, before the first certificate arrives the TLS listener cannot
/// complete a handshake, and this is where a load balancer or an operator sees why.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(ops::metrics))
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .fallback(not_found)
        .with_state(state)
}

/// Counts requests by route and status, and tracks in-flight API requests for shutdown.
/// Mounted outermost, so Socket.IO requests are counted too (route `/socket.io`).
pub async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let route = match req.extensions().get::<MatchedPath>() {
        Some(p) => p.as_str().to_owned(),
        None if crate::agents::session_guard::is_socket_io_path(req.uri().path()) => {
            "/socket.io".to_owned()
        }
        None => "unmatched".to_owned(),
    };
    // What the access log needs is copied only when its line will be written: with the
    // default filter, a long-polling request (one per agent per ping interval) copies
    // nothing.
    let routine = matches!(
        route.as_str(),
        "/socket.io" | "/health" | "/ready" | "/metrics"
    );
    let logged = if routine {
        tracing::enabled!(target: "agentgate::access", tracing::Level::DEBUG)
    } else {
        tracing::enabled!(target: "agentgate::access", tracing::Level::INFO)
    };
    let access = logged.then(|| {
        let peer = req.extensions().get::<Peer>().cloned();
        (req.uri().path().to_owned(), peer)
    });
    let started = std::time::Instant::now();
    let response = if route == "/socket.io" {
        // Long-polling requests last up to a ping interval; they are ended by closing the
        // sessions, not awaited as in-flight API work.
        next.run(req).await
    } else {
        state.requests.track_future(next.run(req)).await
    };
    let status = response.status().as_u16();
    state.metrics.http_request(&method, &route, status);
    if let Some((path, peer)) = access {
        access_log(
            &method,
            &path,
            routine,
            status,
            started.elapsed(),
            peer.as_ref(),
        );
    }
    response
}

/// One line per request, target `agentgate::access` (silence it with
/// `RUST_LOG=info,agentgate::access=off`). Requests that come by the thousand and say
/// nothing new (Socket.IO long-polling, health checks, metric scrapes) are at debug
/// level. The query string is left out; no header, key or body is logged.
fn access_log(
    method: &str,
    path: &str,
    routine: bool,
    status: u16,
    elapsed: Duration,
    peer: Option<&Peer>,
) {
    let remote = peer.map(|p| p.remote_addr.to_string());
    let agent = peer
        .and_then(|p| p.identity.as_ref())
        .map(|i| i.agent_id.as_str());
    let ms = elapsed.as_secs_f64() * 1e3;
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                target: "agentgate::access",
                method,
                path,
                status,
                ms,
                remote = remote.as_deref().unwrap_or("-"),
                agent_id = agent.unwrap_or("-"),
                "request"
            )
        };
    }
    if routine {
        line!(debug);
    } else {
        line!(info);
    }
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

/// Parses an agent id from a path or body, as a 400 with the rule when it is invalid.
pub fn agent_id(s: &str) -> Result<AgentId, ApiError> {
    AgentId::parse(s).map_err(|e| ApiError::BadRequest(format!("invalid agent_id: {e}")))
}

/// Query parameters with this API's errors (400 with a detail).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))
    }
}

/// Largest page size of the list endpoints.
pub const MAX_PAGE: usize = 1000;

/// `?limit=N&after=<agent_id>`: keyset pagination over agent ids (stable while the set
/// changes, unlike offsets).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub limit: Option<usize>,
    pub after: Option<String>,
    pub status: Option<String>,
}

impl PageQuery {
    pub fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(100),
            Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            Some(n) => Err(ApiError::BadRequest(format!(
                "limit must be between 1 and {MAX_PAGE}, got {n}"
            ))),
        }
    }
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
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
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
        let detail = match &self {
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
