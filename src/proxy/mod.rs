//! The API gateway: `[[routes]]` proxied to upstream services on hyper, with per-route
//! authorization ([`crate::auth`]), round-robin over healthy upstreams, retries, timeouts,
//! WebSocket pass-through, metrics and an access-log line per request.
//!
//! # Layout
//! - `table`: the routes in force and longest-prefix matching;
//! - `upstream`: an upstream's place in the rotation (active checks, passive ejection);
//! - `health`: the active health-check tasks;
//! - `client`: the pooled upstream client (TLS verified, never skipped);
//! - `forward`: one request through: headers, retries, timeout, upgrades.

pub(crate) mod client;
pub(crate) mod forward;
pub(crate) mod health;
pub(crate) mod table;
pub(crate) mod upstream;

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::auth::{ApiKeys, AuthError, JwtKeyError, JwtVerifier, Revocations};
use crate::clock::Clock;
use crate::config::{Config, RouteAuth};
use crate::metrics::Metrics;
pub use client::ClientError;
use client::UpstreamClient;
use table::RouteTable;

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
    /// The running health checks (cancelled and replaced on reload) and the parent they
    /// hang off (cancelled at shutdown). A std Mutex: no `.await` while held.
    checks: Mutex<Option<(CancellationToken, CancellationToken)>>,
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
        let table = RouteTable::new(&config.routes, None, &metrics, &clock);
        Ok(Self {
            inner: Arc::new(Shared {
                table: ArcSwap::from_pointee(table),
                jwt: ArcSwap::from_pointee(jwt),
                revocations,
                client,
                keys,
                max_body: config.limits.body.proxy,
                refusals: crate::limits::Refusals::new(metrics.clone()),
                metrics,
                clock,
                checks: Mutex::new(None),
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

    /// Starts the active health checks; they stop when `shutdown` is cancelled.
    pub fn start_health_checks(&self, shutdown: CancellationToken) {
        let current = shutdown.child_token();
        health::spawn(&self.inner.table.load(), &self.inner.client, &current);
        let mut checks = self.inner.checks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((old, _)) = checks.replace((current, shutdown)) {
            old.cancel();
        }
    }

    /// Replaces the routes and JWT keys with those of `config` (SIGHUP). Requests in flight
    /// finish on the routes they started with; connections are not touched; upstreams whose
    /// route and URL are unchanged keep their health. On an error nothing changes.
    pub fn reload(&self, config: &Config) -> Result<(), ProxyBuildError> {
        let jwt = JwtVerifier::load(&config.jwt, self.inner.revocations.clone())?;
        let table = Arc::new(RouteTable::new(
            &config.routes,
            Some(&self.inner.table.load()),
            &self.inner.metrics,
            &self.inner.clock,
        ));
        self.inner.jwt.store(Arc::new(jwt));
        self.inner.table.store(table.clone());
        let mut checks = self.inner.checks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((old, parent)) = checks.take() {
            old.cancel();
            let current = parent.child_token();
            health::spawn(&table, &self.inner.client, &current);
            *checks = Some((current, parent));
        }
        Ok(())
    }

    /// `GET /routes`: each route with the health of each upstream.
    pub fn describe(&self) -> Vec<RouteView> {
        self.inner
            .table
            .load()
            .routes
            .iter()
            .map(|r| RouteView {
                name: r.config.name.clone(),
                prefix: r.config.prefix.clone(),
                auth: r.config.auth.kind().as_str(),
                scope: match &r.config.auth {
                    RouteAuth::ApiKey { scope } => Some(scope.clone()),
                    _ => None,
                },
                claims: match &r.config.auth {
                    RouteAuth::Jwt { claims } => Some(claims.clone()),
                    _ => None,
                },
                strip_prefix: r.config.strip_prefix,
                preserve_host: r.config.preserve_host,
                timeout_ms: r.config.timeout.as_millis(),
                retries: r.config.retries,
                health_check: r.config.health_check.as_ref().map(|h| HealthCheckView {
                    path: h.path.clone(),
                    interval_secs: h.interval.as_secs(),
                }),
                upstreams: r
                    .upstreams
                    .iter()
                    .map(|u| UpstreamView {
                        url: u.label.clone(),
                        healthy: u.in_rotation(),
                    })
                    .collect(),
            })
            .collect()
    }
}

#[derive(Debug, Serialize)]
pub struct RouteView {
    pub name: String,
    pub prefix: String,
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
