//! What runs around the handlers: the Bearer API key check ([`require_api_key`]), the
//! scope each endpoint needs ([`scope`]) and the request observer ([`observe`]: metrics,
//! in-flight tracking, access log).

use std::borrow::Cow;
use std::time::Duration;

use super::{ApiError, AppState};
use crate::auth::{ApiKey, KeyRefusal};
use crate::identity::Peer;
use crate::proxy::forward::Proxied;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Checks the Bearer key and puts the matched [`ApiKey`] (name and scopes) into the
/// request for [`require_scope`], and into the response for the access log.
pub async fn require_api_key(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    // The same check as the gateway's `api_key` routes, failed attempts included.
    let source = req.extensions().get::<Peer>().map(|p| p.remote_addr.ip());
    let key = match state
        .api_keys
        .check(req.headers(), source, std::time::Instant::now())
    {
        Ok(key) => key.clone(),
        Err(KeyRefusal::TooManyFailures { retry_after }) => {
            state.metrics.limit_refusal("api_key_failures");
            return too_many_failures(retry_after);
        }
        Err(KeyRefusal::Missing) => {
            return ApiError::Forbidden(
                "Not authenticated: send 'Authorization: Bearer <API key>'",
            )
            .into_response();
        }
        Err(KeyRefusal::Duplicate) => {
            return ApiError::BadRequest(
                "more than one Authorization header field; send exactly one 'Authorization: Bearer <API key>'"
                    .into(),
            )
            .into_response();
        }
        Err(KeyRefusal::Invalid) => {
            return ApiError::Forbidden("Invalid API key").into_response();
        }
    };
    req.extensions_mut().insert(key.clone());
    let mut response = next.run(req).await;
    response.extensions_mut().insert(key);
    response
}

/// `429` for a source past its failed API-key attempts (`[limits]`), checked before its
/// key is looked at. The console's sign-in, which presents a key without a header.
pub(crate) fn refused_source(
    state: &AppState,
    source: Option<std::net::IpAddr>,
    now: std::time::Instant,
) -> Option<Response> {
    match state.api_keys.refuse_source(source, now) {
        Err(KeyRefusal::TooManyFailures { retry_after }) => {
            state.metrics.limit_refusal("api_key_failures");
            Some(too_many_failures(retry_after))
        }
        _ => None,
    }
}

/// The key `presented` is, or `403 Invalid API key`; a wrong key counts against its
/// source's failed attempts, as in [`require_api_key`]. The console's sign-in.
pub(crate) fn check_key(
    state: &AppState,
    source: Option<std::net::IpAddr>,
    presented: &str,
    now: std::time::Instant,
) -> Result<ApiKey, ApiError> {
    state
        .api_keys
        .check_presented(presented, source, now)
        .cloned()
        .map_err(|_| ApiError::Forbidden("Invalid API key"))
}

/// `429` with `Retry-After` (RFC 9110 §10.2.3, in seconds) for a source past its failed
/// API-key attempts.
fn too_many_failures(left: std::time::Duration) -> Response {
    let secs = crate::limits::retry_after_secs(left);
    let refusal = crate::auth::AuthError::TooManyKeyFailures {
        retry_after_secs: secs,
    };
    let mut response = super::error::detail(refusal.status(), &refusal.to_string());
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
    response
}

/// Lets a request through only when its key (put there by [`require_api_key`], which
/// runs first) has `scope`; otherwise 403 naming the scope. Mounted per endpoint with
/// `from_fn_with_state(scope, require_scope)`.
pub async fn require_scope(
    State(scope): State<&'static str>,
    req: Request,
    next: Next,
) -> Response {
    match req.extensions().get::<ApiKey>() {
        Some(key) if key.allows(scope) => next.run(req).await,
        Some(key) => {
            let name = key.name.clone();
            let mut response = ApiError::MissingScope(scope).into_response();
            response.extensions_mut().insert(ApiKey {
                name,
                scopes: key.scopes.clone(),
            });
            response
        }
        // `require_api_key` runs first on every protected route; a route mounted without
        // it is refused rather than opened.
        None => ApiError::Forbidden("Not authenticated: send 'Authorization: Bearer <API key>'")
            .into_response(),
    }
}

/// Counts requests by route and status, and tracks in-flight API requests for shutdown.
/// Mounted outermost, so Socket.IO requests are counted too (route `/socket.io`).
pub async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route: Cow<'static, str> = match req.extensions().get::<MatchedPath>() {
        Some(p) => Cow::Owned(p.as_str().to_owned()),
        None if crate::agents::session_guard::is_socket_io_path(req.uri().path()) => {
            Cow::Borrowed("/socket.io")
        }
        None => Cow::Borrowed("unmatched"),
    };
    // What the access log needs is copied only when its line will be written: with the
    // default filter, a long-polling request (one per agent per ping interval) copies
    // nothing.
    let routine = matches!(
        route.as_ref(),
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
    let proxied = response.extensions().get::<Proxied>().is_some();
    // A proxied request is counted and logged by the proxy, with its route and upstream.
    let route = if proxied {
        Cow::Borrowed("proxy")
    } else {
        route
    };
    state.metrics.http_request(&method, route, status);
    if let Some((path, peer)) = access.filter(|_| !proxied) {
        let key = response
            .extensions()
            .get::<ApiKey>()
            .map(|k| k.name.clone());
        access_log(
            method.as_str(),
            &path,
            routine,
            status,
            started.elapsed(),
            peer.as_ref(),
            key.as_deref(),
        );
    }
    response
}

/// One line per request, target `agentgate::access` (silence it with
/// `RUST_LOG=info,agentgate::access=off`). Requests that come by the thousand and say
/// nothing new (Socket.IO long-polling, health checks, metric scrapes) are at debug
/// level. The query string is left out; no header, key or body is logged: an API key is
/// shown by its name.
pub(crate) fn access_log(
    method: &str,
    path: &str,
    routine: bool,
    status: u16,
    elapsed: Duration,
    peer: Option<&Peer>,
    key: Option<&str>,
) {
    let remote = peer.map(|p| &*p.remote_text);
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
                remote = remote.unwrap_or("-"),
                agent_id = agent.unwrap_or("-"),
                key = key.unwrap_or("-"),
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
