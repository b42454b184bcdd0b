//! What runs around the handlers: the Bearer API key check ([`require_api_key`]) and the
//! request observer ([`observe`]: metrics, in-flight tracking, access log).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::digest::sha256;
use crate::identity::Peer;

/// The accepted API keys, kept as SHA-256 digests so that comparing a presented key takes
/// the same time whatever its length or content.
#[derive(Clone)]
pub struct ApiKeys(Arc<[[u8; 32]]>);

impl ApiKeys {
    pub fn new<S: AsRef<str>>(keys: &[S]) -> Self {
        Self(keys.iter().map(|k| sha256(k.as_ref().as_bytes())).collect())
    }

    /// Constant-time check against every key (no early exit on a match).
    pub fn accepts(&self, presented: &str) -> bool {
        let d = sha256(presented.as_bytes());
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |acc, k| acc | k.ct_eq(&d))
            .into()
    }
}

pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match bearer_token(req.headers()) {
        Err(refused) => refused.into_response(),
        Ok(key) if state.api_keys.accepts(key) => next.run(req).await,
        Ok(_) => ApiError::Forbidden("Invalid API key").into_response(),
    }
}

/// The token of the one `Authorization: Bearer <token>` field.
///
/// Authorization is a singleton field (RFC 9110 §11.6.2 grammar has no list form), so two
/// of them make the request malformed (§5.3): a 400, whichever of the two is right, as
/// nginx and FastAPI behind it never settled which one wins. The scheme name is
/// case-insensitive (RFC 9110 §11.1): `Bearer`, `bearer` and `BEARER` are the same.
fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let mut fields = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = fields.next() else {
        return Err(ApiError::Forbidden(
            "Not authenticated: send 'Authorization: Bearer <API key>'",
        ));
    };
    if fields.next().is_some() {
        return Err(ApiError::BadRequest(
            "more than one Authorization header field; send exactly one 'Authorization: Bearer <API key>'"
                .into(),
        ));
    }
    let token = value.to_str().ok().and_then(|v| {
        let (scheme, token) = v.trim_start().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    token.ok_or(ApiError::Forbidden(
        "Not authenticated: send 'Authorization: Bearer <API key>'",
    ))
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
