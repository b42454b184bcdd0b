//! The API gateway: `[[routes]]` proxied to upstream services on hyper, with per-route
//! authorization ([`crate::auth`]), round-robin over healthy upstreams, retries, timeouts,
//! WebSocket pass-through, metrics and an access-log line per request.
//!
//! # Layout
//! - `table`: the routes in force (config and runtime) and longest-prefix matching;
//! - `upstream`: an upstream's place in the rotation (active checks, passive ejection);
//! - `health`: the active health-check tasks;
//! - `client`: the upstream client and each upstream's connection pool (TLS verified,
//!   never skipped);
//! - `direct`: proxied requests taken from the connection past the API's layers;
//! - `forward`: one request through: headers, retries, timeout, upgrades.

pub(crate) mod client;
pub mod direct;
pub(crate) mod forward;
pub(crate) mod health;
pub(crate) mod table;
pub(crate) mod upstream;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::auth::{ApiKeys, AuthError, JwtKeyError, JwtVerifier, Revocations};
use crate::clock::Clock;
use crate::config::{
    Config, JwtConfig, RawRoute, RouteAuth, RouteConfig, RouteError, validate_route,
};
use crate::metrics::Metrics;
pub use client::ClientError;
use client::UpstreamClient;
use table::{Route, RouteSource, RouteTable};

/// Why the gateway could not be built from a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ProxyBuildError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    JwtKey(#[from] JwtKeyError),
}

/// Every way a proxied request fails before the upstream's answer, mapped to a status in
/// one place.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No route and no built-in endpoint: the 404 every unknown path gets.
    #[error("Not Found")]
    NoRoute(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("no healthy upstream for route '{0}'")]
    NoHealthyUpstream(String),
    #[error("upstream {upstream} refused the connection")]
    Refused { upstream: String },
    #[error("upstream {upstream} failed: {reason}")]
    Failed { upstream: String, reason: String },
    #[error("upstream {upstream} did not answer within {ms} ms")]
    Timeout { upstream: String, ms: u128 },
    #[error("cannot build the upstream request: {0}")]
    BadRequest(String),
    /// The body is, or grew while it streamed, larger than `limits.proxy_max_body_bytes`
    /// before the upstream answered.
    #[error("request body exceeds the limit of {limit} bytes (limits.proxy_max_body_bytes)")]
    BodyTooLarge { limit: u64 },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::Auth(e) => e.status(),
            Self::NoHealthyUpstream(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Refused { .. } | Self::Failed { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = crate::api::detail(status, &self.to_string());
        if let Self::BodyTooLarge { .. } = self {
            crate::api::body_left_unread(&mut response);
        }
        if let Self::Auth(AuthError::TooManyKeyFailures { retry_after_secs }) = self {
            // RFC 9110 §10.2.3, in seconds, as the API's own 429 says it.
            response.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(retry_after_secs),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750 §3: a 401 for a bearer-protected resource names the scheme.
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// The gateway half; cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Shared>,
}

struct Shared {
    table: ArcSwap<RouteTable>,
    jwt: ArcSwap<JwtVerifier>,
    revocations: Revocations,
    client: UpstreamClient,
    keys: ApiKeys,
    metrics: Metrics,
    /// `limits.proxy_max_body_bytes` (read at start, not on reload).
    max_body: u64,
    refusals: crate::limits::Refusals,
    /// Times passive ejections (a manual clock in tests).
    clock: Clock,
    /// What the table is built from. A std Mutex, held while a table is built and swapped
    /// (no `.await`), so that two rebuilds never interleave.
    sources: Mutex<Sources>,
    /// The running health checks. A std Mutex: no `.await` while held.
    checks: Mutex<HealthChecks>,
}

/// The two kinds of routes the table merges.
struct Sources {
    /// `[[routes]]` of the file (replaced on SIGHUP).
    config: Vec<RouteConfig>,
    /// `[jwt]` of the file, which runtime routes are validated against.
    jwt: JwtConfig,
    /// Registered at runtime, as stored (see `store::routes`).
    runtime: Vec<RawRoute>,
    /// Runtime routes left out of the table, with the reason, so that each reason is
    /// logged once rather than at every rebuild.
    left_out: BTreeMap<String, String>,
}

/// One task per route with a health check, kept across rebuilds while the route is
/// unchanged.
#[derive(Default)]
struct HealthChecks {
    /// Cancelled at shutdown; `None` until the checks are started.
    parent: Option<CancellationToken>,
    running: HashMap<String, (RouteConfig, CancellationToken)>,
}

impl Proxy {
    /// Builds the routes, the JWT keys and the upstream client from `config`.
    pub fn new(
        config: &Config,
        keys: ApiKeys,
        revocations: Revocations,
        metrics: Metrics,
    ) -> Result<Self, ProxyBuildError> {
        Self::new_with_clock(config, keys, revocations, metrics, Clock::system())
    }

    /// [`Proxy::new`] with the clock that times passive ejections.
    pub fn new_with_clock(
        config: &Config,
        keys: ApiKeys,
        revocations: Revocations,
        metrics: Metrics,
        clock: Clock,
    ) -> Result<Self, ProxyBuildError> {
        let client = client::build(config.upstream_ca_file.as_deref())?;
        let jwt = JwtVerifier::load(&config.jwt, revocations.clone())?;
        Ok(Self {
            inner: Arc::new(Shared {
                table: ArcSwap::from_pointee(RouteTable::new(
                    config
                        .routes
                        .iter()
                        .map(|r| (r.clone(), RouteSource::Config))
                        .collect(),
                    None,
                    &metrics,
                    &clock,
                )),
                jwt: ArcSwap::from_pointee(jwt),
                revocations,
                client,
                keys,
                max_body: config.limits.body.proxy,
                refusals: crate::limits::Refusals::new(metrics.clone()),
                metrics,
                clock,
                sources: Mutex::new(Sources {
                    config: config.routes.clone(),
                    jwt: config.jwt.clone(),
                    runtime: Vec::new(),
                    left_out: BTreeMap::new(),
                }),
                checks: Mutex::new(HealthChecks::default()),
            }),
        })
    }

    /// Reads what the configuration only names (JWT key files, the upstream CA file), for
    /// `check-config`: the errors a start would stop on.
    pub fn check_files(config: &Config) -> Result<(), ProxyBuildError> {
        client::build(config.upstream_ca_file.as_deref())?;
        JwtVerifier::load(&config.jwt, Revocations::new())?;
        Ok(())
    }

    /// The revocation set every JWT check reads (token management feeds it).
    pub fn revocations(&self) -> &Revocations {
        &self.inner.revocations
    }

    /// Starts the active health checks, and the sweep of idle upstream connections; they
    /// stop when `shutdown` is cancelled.
    pub fn start_health_checks(&self, shutdown: CancellationToken) {
        self.spawn_pool_sweep(shutdown.clone());
        // No rebuild between reading the table and starting its checks.
        let _sources = self.sources();
        {
            let mut checks = self.checks();
            if let Some(old) = checks.parent.replace(shutdown) {
                old.cancel();
            }
            checks.running.clear();
        }
        self.sync_health_checks(&self.inner.table.load());
    }

    /// Every [`client::POOL_SWEEP`], closes the pooled connections idle past the pool's
    /// idle time: checkout drops them too, but an upstream no request goes to would keep
    /// them open until it times them out itself (nginx closes its idle upstream
    /// connections on a timer, `keepalive_timeout`, likewise).
    fn spawn_pool_sweep(&self, stop: CancellationToken) {
        let proxy = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(client::POOL_SWEEP);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = std::time::Instant::now();
                for route in &proxy.inner.table.load().routes {
                    for upstream in &route.upstreams {
                        upstream.pool.prune(now);
                    }
                }
            }
        });
    }

    /// Replaces the config routes and JWT keys with those of `config` (SIGHUP); the
    /// runtime routes stay. Requests in flight finish on the routes they started with;
    /// connections are not touched; upstreams whose route and URL are unchanged keep their
    /// health. On an error nothing changes.
    pub fn reload(&self, config: &Config) -> Result<(), ProxyBuildError> {
        let jwt = JwtVerifier::load(&config.jwt, self.inner.revocations.clone())?;
        let mut sources = self.sources();
        sources.config = config.routes.clone();
        sources.jwt = config.jwt.clone();
        self.inner.jwt.store(Arc::new(jwt));
        self.rebuild(&mut sources);
        Ok(())
    }

    /// The runtime routes changed (this node's API, another node, a resync): rebuilds the
    /// table from the config routes and `runtime`.
    pub(crate) fn set_runtime_routes(&self, runtime: &[RawRoute]) {
        let mut sources = self.sources();
        sources.runtime = runtime.to_vec();
        self.rebuild(&mut sources);
    }

    /// Checks a route for `POST /routes` with the code that checks `[[routes]]`, against
    /// the `[jwt]` in force.
    pub(crate) fn validate_runtime(&self, raw: RawRoute) -> Result<RouteConfig, RouteError> {
        let jwt = self.sources().jwt.clone();
        validate_route(raw, &jwt)
    }

    /// Why a runtime route `name` (on `prefix`) cannot be registered beside the config
    /// routes: a config route of that name or prefix (a config route belongs to the file).
    pub(crate) fn config_conflict(&self, name: &str, prefix: Option<&str>) -> Option<String> {
        let sources = self.sources();
        if sources.config.iter().any(|c| c.name == name) {
            return Some(format!(
                "route {name:?} belongs to the configuration file; change it there (and send SIGHUP)"
            ));
        }
        let prefix = prefix?;
        sources.config.iter().find(|c| c.prefix == prefix).map(|c| {
            format!(
                "prefix {prefix:?} is already the prefix of route {:?} of the configuration file",
                c.name
            )
        })
    }

    /// Builds the table from `sources` and swaps it in. A config route wins over a
    /// runtime route of the same name or prefix (the runtime one is left out and logged as
    /// shadowed, and comes back when the config route goes); a runtime route that the
    /// configuration in force no longer allows (`auth = "jwt"` without a key) is left out
    /// too.
    fn rebuild(&self, sources: &mut Sources) {
        let mut routes: Vec<(RouteConfig, RouteSource)> = sources
            .config
            .iter()
            .map(|c| (c.clone(), RouteSource::Config))
            .collect();
        let mut left_out = BTreeMap::new();
        for raw in &sources.runtime {
            let reason = match validate_route(raw.clone(), &sources.jwt) {
                Err(e) => Some(format!("not valid under the configuration in force: {e}")),
                Ok(route) => match routes
                    .iter()
                    .find(|(o, _)| o.name == route.name || o.prefix == route.prefix)
                {
                    Some((o, source)) => Some(format!(
                        "shadowed by {} route {:?} (same {})",
                        source.as_str(),
                        o.name,
                        if o.name == route.name {
                            "name"
                        } else {
                            "prefix"
                        }
                    )),
                    None => {
                        routes.push((route, RouteSource::Runtime));
                        None
                    }
                },
            };
            if let Some(reason) = reason {
                if sources.left_out.get(&raw.name) != Some(&reason) {
                    tracing::warn!(route = %raw.name, %reason, "runtime route not served");
                }
                left_out.insert(raw.name.clone(), reason);
            }
        }
        for name in sources.left_out.keys() {
            if !left_out.contains_key(name)
                && routes
                    .iter()
                    .any(|(r, s)| *s == RouteSource::Runtime && r.name == *name)
            {
                tracing::info!(route = %name, "runtime route served again");
            }
        }
        sources.left_out = left_out;
        let old = self.inner.table.load_full();
        let table = Arc::new(RouteTable::new(
            routes,
            Some(&old),
            &self.inner.metrics,
            &self.inner.clock,
        ));
        self.inner.table.store(table.clone());
        self.sync_health_checks(&table);
        let upstreams = |t: &RouteTable| -> HashSet<(String, String)> {
            t.routes
                .iter()
                .flat_map(|r| {
                    r.upstreams
                        .iter()
                        .map(|u| (r.config.name.clone(), u.label.clone()))
                })
                .collect()
        };
        for (route, upstream) in upstreams(&old).difference(&upstreams(&table)) {
            self.inner.metrics.forget_upstream(route, upstream);
        }
    }

    /// Keeps the health check of every route that is unchanged, stops those of routes
    /// that changed or went, starts those of new or changed routes. A kept task goes on
    /// updating the same upstreams: the new table took them over (same name and URL).
    fn sync_health_checks(&self, table: &RouteTable) {
        let mut checks = self.checks();
        let Some(parent) = checks.parent.clone() else {
            return;
        };
        let mut kept = HashMap::new();
        for route in &table.routes {
            if route.config.health_check.is_none() {
                continue;
            }
            let name = route.config.name.clone();
            match checks.running.remove(&name) {
                Some((config, token)) if config == route.config => {
                    kept.insert(name, (config, token));
                }
                old => {
                    if let Some((_, token)) = old {
                        token.cancel();
                    }
                    let token = parent.child_token();
                    health::spawn(route.clone(), &self.inner.client, token.clone());
                    kept.insert(name, (route.config.clone(), token));
                }
            }
        }
        for (_, (_, token)) in checks.running.drain() {
            token.cancel();
        }
        checks.running = kept;
    }

    fn sources(&self) -> MutexGuard<'_, Sources> {
        // Poisoned only by a panic while building a table; the sources stay usable.
        self.inner.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn checks(&self) -> MutexGuard<'_, HealthChecks> {
        self.inner.checks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runtime routes stored but not served, each with the reason (shadowed by a config
    /// route, or not valid under the configuration in force), by name.
    pub fn not_served(&self) -> Vec<NotServedView> {
        self.sources()
            .left_out
            .iter()
            .map(|(name, reason)| NotServedView {
                name: name.clone(),
                reason: reason.clone(),
            })
            .collect()
    }

    /// `GET /routes`: each route with the health of each upstream.
    pub fn describe(&self) -> Vec<RouteView> {
        self.inner.table.load().routes.iter().map(view).collect()
    }

    /// A runtime route just stored, as in force; as stored if it is no longer in the
    /// table (deleted meanwhile), its upstreams then shown as new ones are: in the
    /// rotation.
    pub(crate) fn view_of(&self, route: &RouteConfig) -> RouteView {
        let table = self.inner.table.load();
        match table.routes.iter().find(|r| r.config.name == route.name) {
            Some(r) => view(r),
            None => view_from(
                route,
                RouteSource::Runtime,
                route
                    .upstreams
                    .iter()
                    .map(|u| UpstreamView {
                        url: u.to_string().trim_end_matches('/').to_owned(),
                        healthy: true,
                    })
                    .collect(),
            ),
        }
    }
}

fn view(r: &Arc<Route>) -> RouteView {
    let upstreams = r
        .upstreams
        .iter()
        .map(|u| UpstreamView {
            url: u.label.clone(),
            healthy: u.in_rotation(),
        })
        .collect();
    view_from(&r.config, r.source, upstreams)
}

fn view_from(c: &RouteConfig, source: RouteSource, upstreams: Vec<UpstreamView>) -> RouteView {
    RouteView {
        name: c.name.clone(),
        prefix: c.prefix.clone(),
        source: source.as_str(),
        auth: c.auth.kind().as_str(),
        scope: match &c.auth {
            RouteAuth::ApiKey { scope } => Some(scope.clone()),
            _ => None,
        },
        claims: match &c.auth {
            RouteAuth::Jwt { claims } => Some(claims.clone()),
            _ => None,
        },
        strip_prefix: c.strip_prefix,
        preserve_host: c.preserve_host,
        timeout_ms: c.timeout.as_millis(),
        retries: c.retries,
        health_check: c.health_check.as_ref().map(|h| HealthCheckView {
            path: h.path.clone(),
            interval_secs: h.interval.as_secs(),
        }),
        upstreams,
    }
}

#[derive(Debug, Serialize)]
pub struct RouteView {
    pub name: String,
    pub prefix: String,
    /// `config` (`[[routes]]` of the file) or `runtime` (`POST /routes`).
    pub source: &'static str,
    pub auth: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims: Option<std::collections::BTreeMap<String, Vec<String>>>,
    pub strip_prefix: bool,
    pub preserve_host: bool,
    pub timeout_ms: u128,
    pub retries: u32,
    pub health_check: Option<HealthCheckView>,
    pub upstreams: Vec<UpstreamView>,
}

#[derive(Debug, Serialize)]
pub struct NotServedView {
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct HealthCheckView {
    pub path: String,
    pub interval_secs: u64,
}

#[derive(Debug, Serialize)]
pub struct UpstreamView {
    pub url: String,
    pub healthy: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenError;
    use crate::config::RawConfig;

    fn proxy_with(routes: Vec<RawRoute>) -> (Proxy, Config) {
        let config = RawConfig {
            api_keys: vec!["k".into()],
            routes,
            ..RawConfig::default()
        }
        .validate("test")
        .unwrap();
        let proxy = Proxy::new(
            &config,
            ApiKeys::new(
                &config.api_keys,
                crate::limits::FailureWindow::new(20, std::time::Duration::from_secs(60)),
            ),
            Revocations::new(),
            Metrics::new(),
        )
        .unwrap();
        (proxy, config)
    }

    fn raw(name: &str, prefix: &str, health: Option<&str>) -> RawRoute {
        let mut spec = serde_json::json!({
            "name": name, "prefix": prefix, "upstreams": ["http://127.0.0.1:1"], "auth": "none"
        });
        if let Some(path) = health {
            spec["health_check"] = serde_json::json!({"path": path, "interval_secs": 3600});
        }
        serde_json::from_value(spec).unwrap()
    }

    fn served(proxy: &Proxy) -> Vec<(String, String, &'static str)> {
        let mut routes: Vec<_> = proxy
            .describe()
            .into_iter()
            .map(|r| (r.name, r.prefix, r.source))
            .collect();
        routes.sort();
        routes
    }

    #[tokio::test]
    async fn a_config_route_shadows_a_runtime_route_of_its_name_or_prefix_until_it_goes() {
        let (proxy, _) = proxy_with(vec![raw("a", "/a", None)]);
        proxy.set_runtime_routes(&[
            raw("a", "/other", None),
            raw("b", "/a", None),
            raw("c", "/c", None),
        ]);
        let config = |name: &str, prefix: &str, source| (name.into(), prefix.into(), source);
        assert_eq!(
            served(&proxy),
            vec![config("a", "/a", "config"), config("c", "/c", "runtime")]
        );
        // SIGHUP with a file without route `a`: both runtime routes are served again
        // (the runtime routes are kept, and were never lost).
        let (_, without) = proxy_with(vec![raw("z", "/z", None)]);
        proxy.reload(&without).unwrap();
        assert_eq!(
            served(&proxy),
            vec![
                config("a", "/other", "runtime"),
                config("b", "/a", "runtime"),
                config("c", "/c", "runtime"),
                config("z", "/z", "config"),
            ]
        );
        // A runtime `jwt` route is served only while the file configures a JWT key.
        let mut jwt = raw("j", "/j", None);
        jwt.auth = crate::config::AuthKind::Jwt;
        proxy.set_runtime_routes(&[jwt]);
        assert_eq!(served(&proxy), vec![config("z", "/z", "config")]);
        let mut with_secret = without.clone();
        with_secret.jwt.hs256_secret = Some("s".into());
        proxy.reload(&with_secret).unwrap();
        assert_eq!(
            served(&proxy),
            vec![config("j", "/j", "runtime"), config("z", "/z", "config")]
        );
    }

    #[tokio::test]
    async fn a_runtime_change_restarts_only_the_health_checks_of_changed_routes() {
        let (proxy, _) = proxy_with(Vec::new());
        let shutdown = CancellationToken::new();
        proxy.start_health_checks(shutdown.clone());
        let token = |name: &str| proxy.checks().running.get(name).map(|(_, t)| t.clone());
        proxy.set_runtime_routes(&[raw("a", "/a", Some("/h")), raw("b", "/b", Some("/h"))]);
        let (a, b) = (token("a").unwrap(), token("b").unwrap());
        proxy.set_runtime_routes(&[
            raw("a", "/a", Some("/h")),
            raw("b", "/b", Some("/other")),
            raw("c", "/c", None),
        ]);
        assert!(!a.is_cancelled(), "unchanged route's check was restarted");
        assert!(b.is_cancelled(), "changed route's old check still runs");
        let b2 = token("b").unwrap();
        assert!(!b2.is_cancelled());
        assert!(token("c").is_none(), "a check for a route without one");
        proxy.set_runtime_routes(&[raw("a", "/a", Some("/h"))]);
        assert!(b2.is_cancelled(), "deleted route's check still runs");
        assert!(token("b").is_none());
        assert_eq!(token("a").map(|t| t.is_cancelled()), Some(false));
        shutdown.cancel();
        assert!(a.is_cancelled(), "checks outlive the shutdown");
    }

    /// Every variant with the status it must map to; a new variant fails to compile in
    /// `ProxyError::status` (no catch-all arm) and belongs here too.
    #[test]
    fn every_proxy_error_maps_to_its_status() {
        let up = || "http://127.0.0.1:1".to_owned();
        let table: Vec<(ProxyError, StatusCode)> = vec![
            (ProxyError::NoRoute("/x".into()), StatusCode::NOT_FOUND),
            (AuthError::MissingBearer.into(), StatusCode::UNAUTHORIZED),
            (AuthError::InvalidKey.into(), StatusCode::UNAUTHORIZED),
            (
                AuthError::TooManyKeyFailures {
                    retry_after_secs: 7,
                }
                .into(),
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (
                AuthError::Token(TokenError::Expired).into(),
                StatusCode::UNAUTHORIZED,
            ),
            (
                AuthError::Token(TokenError::Revoked).into(),
                StatusCode::UNAUTHORIZED,
            ),
            (
                AuthError::Token(TokenError::Claim {
                    claim: "project".into(),
                    allowed: vec!["a".into()],
                })
                .into(),
                StatusCode::FORBIDDEN,
            ),
            (
                AuthError::MissingScope("proxy".into()).into(),
                StatusCode::FORBIDDEN,
            ),
            (AuthError::NoAgentCertificate.into(), StatusCode::FORBIDDEN),
            (
                ProxyError::NoHealthyUpstream("r".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                ProxyError::Refused { upstream: up() },
                StatusCode::BAD_GATEWAY,
            ),
            (
                ProxyError::Failed {
                    upstream: up(),
                    reason: "reset".into(),
                },
                StatusCode::BAD_GATEWAY,
            ),
            (
                ProxyError::Timeout {
                    upstream: up(),
                    ms: 5,
                },
                StatusCode::GATEWAY_TIMEOUT,
            ),
            (ProxyError::BadRequest("x".into()), StatusCode::BAD_REQUEST),
            (
                ProxyError::BodyTooLarge { limit: 1 },
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
        ];
        for (error, status) in table {
            let shown = format!("{error:?}");
            assert_eq!(error.status(), status, "{shown}");
            let response = error.into_response();
            assert_eq!(response.status(), status, "{shown}");
            assert_eq!(
                response
                    .headers()
                    .contains_key(http::header::WWW_AUTHENTICATE),
                status == StatusCode::UNAUTHORIZED,
                "{shown}"
            );
        }
    }
}
