//! The routes: which handler answers which path, which need the API key and which scope,
//! the OpenAPI document built from the same list, and the separate metrics listener's
//! router. Paths no endpoint matches go to the gateway's routes ([`crate::proxy`]), which
//! answer a JSON 404 when none matches either.

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware;
use axum::routing::get;
use axum::{Extension, Router};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

use super::middleware::{require_api_key, require_scope};
use super::{
    ApiError, AppState, BodyLimit, agents, certificate, cluster, enroll, hello, openapi, ops,
    routes, tokens,
};

/// Where `GET /metrics` is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsExposure {
    /// On the main listener, next to the API (no key, like /health).
    MainListener,
    /// Only on the separate `metrics_listen` address.
    SeparateListener,
}

/// The API router (without the Socket.IO layer, which the server mounts around it), with
/// `GET /openapi.json` and Swagger UI at `GET /docs`.
///
/// Inside it, a request meets CORS first (when configured; it answers preflights itself),
/// then the route match, then, on the protected routes only, the API key check
/// (`route_layer`, so an unknown path is a 404 and never a 403), then the endpoint's scope
/// check, then the handler; a path no endpoint matches goes to the gateway's routes. The
/// server wraps this router in more layers; see [`crate::server::Gateway::start`].
pub fn router(state: AppState, cors_origins: &[String], metrics: MetricsExposure) -> Router {
    let (router, paths) = endpoints(&state, metrics).split_for_parts();
    let self_signed = state.server_cert.is_self_signed();
    let mut router = router
        .merge(openapi::docs_router(openapi::document(paths)))
        .fallback(proxy)
        .with_state(state);
    if !cors_origins.is_empty() {
        router = router.layer(cors(cors_origins));
    }
    security_headers(router, self_signed)
}

/// Headers on every response of `router`, proxied ones included unless the upstream set
/// its own: no MIME sniffing of API bodies, and (with a real certificate: files or ACME)
/// HSTS, so a browser that once reached the gateway never tries plain HTTP to it again.
/// Not with the generated self-signed certificate, whose `localhost` would pin every local
/// service of a developer's browser to HTTPS. The console's routes get them too.
pub(crate) fn security_headers<S: Clone + Send + Sync + 'static>(
    mut router: Router<S>,
    self_signed: bool,
) -> Router<S> {
    for (name, value) in security_header_values(self_signed) {
        router = router.layer(SetResponseHeaderLayer::if_not_present(name, value));
    }
    router
}

/// The headers of [`security_headers`], each set when the response has none of its own;
/// [`crate::proxy::direct`] sets the same on the proxied requests it takes.
pub(crate) fn security_header_values(self_signed: bool) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = vec![(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    )];
    if !self_signed {
        headers.push((
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        ));
    }
    headers
}

/// Every endpoint of the API, the one list both the router and the OpenAPI document are
/// built from: `routes!` takes each handler's method and path from its `#[utoipa::path]`
/// and adds the handler to the router and its operation to the document. Adding an
/// endpoint is an annotation on the handler and a line here, in the protected or the
/// public block (the annotation's `security` must agree; `tests/openapi.rs` checks it).
/// A plain `.route(..)` would be routed but not documented: the unit test below walks the
/// built router and fails on it.
fn endpoints(state: &AppState, metrics: MetricsExposure) -> OpenApiRouter<AppState> {
    let refusals = crate::limits::Refusals::new(state.metrics.clone());
    let body_limit = |bytes, key| {
        Extension(BodyLimit {
            bytes,
            key,
            refusals: refusals.clone(),
        })
    };
    let protected = OpenApiRouter::new()
        // Any valid key: the smoke test of the system agentgate replaces.
        .routes(routes!(hello::hello_world))
        .routes(scoped(routes!(certificate::upload), "certificates:write"))
        .routes(scoped(routes!(certificate::get_one), "agents:read"))
        .routes(scoped(routes!(certificate::delete), "certificates:write"))
        .routes(scoped(routes!(certificate::list), "agents:read"))
        .routes(scoped(routes!(agents::list), "agents:read"))
        .routes(scoped(routes!(agents::fan_out), "agents:command"))
        .routes(scoped(routes!(agents::get_one), "agents:read"))
        .routes(scoped(routes!(agents::command), "agents:command"))
        .routes(scoped(routes!(enroll::issue), "certificates:write"))
        .routes(scoped(routes!(cluster::nodes), "agents:read"))
        .routes(scoped(
            routes!(routes::list, routes::create),
            "routes:admin",
        ))
        .routes(scoped(routes!(routes::put, routes::delete), "routes:admin"))
        .routes(scoped(routes!(tokens::issue, tokens::list), "tokens:admin"))
        .routes(scoped(routes!(tokens::revoke), "tokens:admin"))
        .routes(scoped(routes!(tokens::audit), "tokens:admin"))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ))
        .route_layer(body_limit(state.body_limits.api, "max_body_bytes"));
    // The one body read before any key is checked gets its own, smaller limit.
    let (schemas, paths, register) = routes!(enroll::register);
    let register = register.route_layer(body_limit(
        state.body_limits.register,
        "register_body_bytes",
    ));
    let mut public = OpenApiRouter::new()
        .routes(routes!(ops::health))
        .routes(routes!(ops::ready))
        .routes(routes!(ops::ping))
        .routes((schemas, paths, register));
    if metrics == MetricsExposure::MainListener {
        public = public.routes(routes!(ops::metrics));
    }
    protected.merge(public)
}

/// One endpoint behind the check that the request's key (checked by `require_api_key`,
/// which runs first) has `scope`: 403 naming the scope otherwise.
fn scoped(
    (schemas, paths, method_router): UtoipaMethodRouter<AppState>,
    scope: &'static str,
) -> UtoipaMethodRouter<AppState> {
    let check = middleware::from_fn_with_state(scope, require_scope);
    (schemas, paths, method_router.route_layer(check))
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
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::agents::Agents;
    use crate::api::ApiKeys;
    use crate::clock::Clock;
    use crate::config::RawConfig;
    use crate::enroll::Enrollment;
    use crate::metrics::Metrics;
    use crate::store::CertStore;
    use crate::tls::ServerCert;

    async fn state(dir: &std::path::Path) -> AppState {
        let config = RawConfig {
            api_keys: vec!["k".into()],
            data_dir: dir.join("data"),
            ..RawConfig::default()
        }
        .validate("test")
        .unwrap();
        let (store, _) = CertStore::open(&dir.join("certs")).unwrap();
        let metrics = Metrics::new();
        let (_layer, agents) = Agents::build(&config, metrics.clone(), Clock::system());
        let api_keys = ApiKeys::new(
            &config.api_keys,
            crate::limits::FailureWindow::new(
                config.limits.api_key_failures,
                config.limits.api_key_failure_window,
            ),
        );
        let proxy = crate::proxy::Proxy::new(
            &config,
            api_keys.clone(),
            crate::auth::Revocations::new(),
            metrics.clone(),
        )
        .unwrap();
        AppState {
            enrollment: Enrollment::open(&config.data_dir, Clock::system(), store.clone())
                .await
                .unwrap(),
            tokens: crate::auth::ApiTokens::open(&store, &config.data_dir, None, Clock::system())
                .await
                .unwrap(),
            server_cert: ServerCert::from_config(&config, crate::tls::provider()).unwrap(),
            store,
            agents,
            api_keys,
            metrics,
            clock: Clock::system(),
            requests: TaskTracker::new(),
            proxy,
            body_limits: config.limits.body,
        }
    }

    /// The paths of an axum router. axum has no API that lists routes; its `Debug` output
    /// names every path of its path router (`RouteId(n): "/path"`) before its fallback
    /// router (which holds the fallback's own "/"), and this reads them. Should that
    /// format change, the paths found differ and the test below fails rather than passing.
    fn routed_paths(router: &Router) -> BTreeSet<String> {
        let text = format!("{router:?}");
        let routes = text.split("fallback_router").next().unwrap_or_default();
        let mut paths = BTreeSet::new();
        let mut rest = routes;
        while let Some(at) = rest.find("): \"/") {
            // `tail` starts at the opening quote.
            let tail = &rest[at + 3..];
            let end = tail[1..].find('"').map(|e| e + 1).unwrap_or(tail.len());
            let path = &tail[1..end];
            if !path.contains("__private__axum") {
                paths.insert(path.to_owned());
            }
            rest = &tail[end..];
        }
        paths
    }

    /// Every path the router answers is under a reserved first segment, which no route
    /// may claim: so a request whose path a route matches is never one for a built-in
    /// endpoint, and `proxy::direct` may serve it without asking the router.
    #[tokio::test]
    async fn every_routed_path_is_under_a_reserved_segment() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        let console = crate::console::Console::new(
            crate::config::ConsoleConfig {
                session_idle: Duration::from_secs(60),
                session_absolute: Duration::from_secs(600),
            },
            Clock::system(),
            &state.store,
        );
        let app = router(state.clone(), &[], MetricsExposure::MainListener)
            .merge(crate::console::router(console, state));
        let paths = routed_paths(&app);
        assert!(paths.len() > 20, "{paths:?}");
        for path in paths {
            let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
            assert!(
                crate::config::RESERVED_SEGMENTS.contains(&first),
                "{path} is routed but /{first} is not reserved"
            );
        }
    }

    /// Every path the built router answers is in the OpenAPI document (and the reverse),
    /// apart from the document and Swagger UI themselves. A route added to `router` or
    /// `endpoints` with a plain `.route(..)` instead of `routes!` fails here.
    #[tokio::test]
    async fn every_routed_path_is_documented() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        for exposure in [
            MetricsExposure::MainListener,
            MetricsExposure::SeparateListener,
        ] {
            let routed = routed_paths(&router(state.clone(), &[], exposure));
            let doc = openapi::document(endpoints(&state, exposure).into_openapi());
            let documented: BTreeSet<String> = doc.paths.paths.keys().cloned().collect();
            let own = [
                openapi::OPENAPI_PATH.to_owned(),
                openapi::DOCS_PATH.to_owned(),
                format!("{}/", openapi::DOCS_PATH),
                format!("{}/{{*rest}}", openapi::DOCS_PATH),
            ];
            for path in &own {
                assert!(routed.contains(path), "{path} is not routed: {routed:?}");
            }
            let api: BTreeSet<String> = routed.into_iter().filter(|p| !own.contains(p)).collect();
            assert!(documented.len() >= 14, "{documented:?}");
            assert_eq!(api, documented, "{exposure:?}");
        }
    }
}
