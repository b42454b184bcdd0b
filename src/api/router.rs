//! The routes: which handler answers which path, which need the API key and which scope,
//! and the separate metrics listener's router. Paths no endpoint matches go to the
//! gateway's routes ([`crate::proxy`]), which answer a JSON 404 when none matches either.

use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, Method, header};
use axum::middleware;
use axum::routing::{delete, get, post};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::middleware::{require_api_key, require_scope};
use super::{ApiError, AppState, agents, certificate, cluster, enroll, hello, ops};

/// Where `GET /metrics` is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsExposure {
    /// On the main listener, next to the API (no key, like /health).
    MainListener,
    /// Only on the separate `metrics_listen` address.
    SeparateListener,
}

/// The API router (without the Socket.IO layer, which the server mounts around it).
///
/// Inside it, a request meets CORS first (when configured; it answers preflights itself),
/// then the route match, then, on the protected routes only, the API key check
/// (`route_layer`, so an unknown path is a 404 and never a 403), then the handler. The
/// server wraps this router in more layers; see [`crate::server::Gateway::start`].
/// The scope check of one endpoint (the key itself was checked by `require_api_key`).
macro_rules! scoped {
    ($scope:literal) => {
        middleware::from_fn_with_state($scope, require_scope)
    };
}

pub fn router(state: AppState, cors_origins: &[String], metrics: MetricsExposure) -> Router {
    let protected = Router::new()
        // Any valid key: the smoke test of the system agentgate replaces.
        .route("/hello-world", post(hello::hello_world))
        .route(
            "/agent/certificate",
            post(certificate::upload).route_layer(scoped!("certificates:write")),
        )
        .route(
            "/agent/certificate/{agent_id}",
            get(certificate::get_one)
                .route_layer(scoped!("agents:read"))
                .merge(delete(certificate::delete).route_layer(scoped!("certificates:write"))),
        )
        .route(
            "/agent/certificates",
            get(certificate::list).route_layer(scoped!("agents:read")),
        )
        .route(
            "/agents",
            get(agents::list).route_layer(scoped!("agents:read")),
        )
        .route(
            "/agents/commands",
            post(agents::fan_out).route_layer(scoped!("agents:command")),
        )
        .route(
            "/agents/{agent_id}",
            get(agents::get_one).route_layer(scoped!("agents:read")),
        )
        .route(
            "/agents/{agent_id}/commands",
            post(agents::command).route_layer(scoped!("agents:command")),
        )
        .route(
            "/install-tokens",
            post(enroll::issue).route_layer(scoped!("certificates:write")),
        )
        .route(
            "/routes",
            get(ops::routes).route_layer(scoped!("routes:admin")),
        )
        .route(
            "/cluster/nodes",
            get(cluster::nodes).route_layer(scoped!("agents:read")),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let mut public = Router::new()
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/ping", get(ops::ping))
        .route("/agent/register", post(enroll::register));
    if metrics == MetricsExposure::MainListener {
        public = public.route("/metrics", get(ops::metrics));
    }
    let mut router = protected.merge(public).fallback(proxy).with_state(state);
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
        .layer(middleware::from_fn(super::json_errors))
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

/// Every path no endpoint matched: the gateway's routes, or a JSON 404.
async fn proxy(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
) -> axum::response::Response {
    crate::proxy::forward::handle(state.proxy.clone(), req).await
}

async fn not_found() -> ApiError {
    ApiError::NotFound("Not Found".into())
}
