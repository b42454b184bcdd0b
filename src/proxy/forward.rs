//! One request through the gateway: route, authorization, header rewriting, the upstream
//! call with retries and a timeout, WebSocket upgrades, metrics and the access log.
//!
//! Header rules (RFC 9110 §7.6.1 for hop-by-hop headers; Traefik's and nginx's
//! `X-Forwarded-*` behaviour for an edge proxy):
//! - hop-by-hop headers, and any header the `Connection` header names, are removed both
//!   ways; an upgrade keeps `Connection: upgrade` and `Upgrade`;
//! - `X-Forwarded-For` is set to the client's address, replacing any client-sent value
//!   (agentgate is the edge: the load balancer in front of it works at TCP level), with
//!   `X-Forwarded-Proto: https` and `X-Forwarded-Host` the client's `Host`;
//! - `X-Request-Id` is kept when the client's is 1-128 of `A-Za-z0-9._:-`, else a new
//!   one; it is returned to the client as well;
//! - `X-Agent-Id` from the client is always removed; on `agent` routes the gateway sets it
//!   from the verified certificate;
//! - on `api_key` routes the `Authorization` header (the gateway's own key) is removed.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::table::{Route, upstream_path};
use super::upstream::PASSIVE_EJECTION;
use super::{Proxy, ProxyError};
use crate::auth::{AuthError, Caller, authorize};
use crate::config::RouteAuth;
use crate::identity::Peer;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_AGENT_ID: HeaderName = HeaderName::from_static("x-agent-id");

/// RFC 9110 §7.6.1 and the ones every proxy also drops (`Proxy-Connection`, RFC 9112
/// Appendix C.2.2; `Keep-Alive`).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
];

/// What only the gateway sets (or withholds): a client-sent copy is always removed.
const GATEWAY_SET: [HeaderName; 5] = [
    X_AGENT_ID,
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    header::FORWARDED,
];

/// Marks a response the proxy produced, so the request observer leaves the access log to
/// the proxy's own, richer line.
#[derive(Debug, Clone, Copy)]
pub struct Proxied;

/// The fallback of the router: every path no built-in endpoint matched.
pub async fn handle(proxy: Proxy, req: Request) -> Response {
    let route = proxy.inner.table.load().find(req.uri().path()).cloned();
    match route {
        Some(route) => {
            let peer = req.extensions().get::<Peer>().cloned();
            let mut response = handle_route(proxy, route, req, peer).await;
            response.extensions_mut().insert(Proxied);
            response
        }
        None => ProxyError::NoRoute(req.uri().path().to_owned()).into_response(),
    }
}

/// One request from `peer` on `route` (found by [`handle`] or by
/// [`super::direct::Direct`]).
pub(crate) async fn handle_route(
    proxy: Proxy,
    route: Arc<Route>,
    mut req: Request,
    peer: Option<Peer>,
) -> Response {
    let started = Instant::now();
    let path = req.uri().path().to_owned();
    let request_id = request_id(req.headers());
    let method = req.method().clone();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let jwt = proxy.inner.jwt.load();
    let authorized = authorize(
        &route.config.auth,
        req.headers(),
        peer.as_ref(),
        &proxy.inner.keys,
        &jwt,
        now,
    );
    let (result, caller) = match authorized {
        Ok(_) if declared_length(req.headers()).is_some_and(|n| n > proxy.inner.max_body) => (
            Err((
                ProxyError::BodyTooLarge {
                    limit: proxy.inner.max_body,
                },
                None,
            )),
            "-".to_owned(),
        ),
        Ok(caller) => {
            let client_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
            let upgrade = client_upgrade.is_some();
            let r = forward(
                &proxy,
                &route,
                req,
                upgrade,
                peer.as_ref(),
                &caller,
                &request_id,
            )
            .await;
            let r = r.map(|(resp, upstream)| (upgrade_or_plain(resp, client_upgrade), upstream));
            (r, caller.describe())
        }
        Err(e) => {
            if matches!(e, AuthError::TooManyKeyFailures { .. }) {
                proxy.inner.metrics.limit_refusal("api_key_failures");
            }
            (Err((ProxyError::from(e), None)), "-".to_owned())
        }
    };
    let (mut response, upstream) = match result {
        Ok((response, upstream)) => (response, Some(upstream)),
        Err((e, upstream)) => {
            if let ProxyError::BodyTooLarge { .. } = e {
                let source = peer.as_ref().map(|p| p.remote_addr.ip());
                let detail = e.to_string();
                proxy
                    .inner
                    .refusals
                    .refused("proxy_max_body_bytes", source, &detail);
            }
            (e.into_response(), upstream)
        }
    };
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    route
        .series
        .proxied(upstream, status, elapsed.as_secs_f64());
    let upstream = upstream.map_or("-", |i| route.upstreams[i].label.as_str());
    tracing::info!(
        target: "agentgate::access",
        route = %route.config.name,
        upstream,
        method = %method,
        path = %path,
        status,
        ms = elapsed.as_secs_f64() * 1e3,
        remote = peer.as_ref().map_or("", |p| &*p.remote_text),
        identity = %caller,
        request_id = request_id.to_str().unwrap_or("-"),
        "proxied"
    );
    response.headers_mut().insert(X_REQUEST_ID, request_id);
    response
}

/// The upstream's response and the upstream's index in the route.
type Forwarded = (hyper::Response<Incoming>, usize);

/// Sends the request to an upstream of `route`, retrying as the route allows; `upgrade`:
/// the client asked for a protocol upgrade ([`is_upgrade`]).
async fn forward(
    proxy: &Proxy,
    route: &Route,
    req: Request,
    upgrade: bool,
    peer: Option<&Peer>,
    caller: &Caller,
    request_id: &HeaderValue,
) -> Result<Forwarded, (ProxyError, Option<usize>)> {
    let (mut parts, body) = req.into_parts();
    let headers = std::mem::take(&mut parts.headers);
    let mut headers = Some(upstream_headers(
        headers, upgrade, &parts.uri, route, peer, caller, request_id,
    ));
    // A request without a body can be sent again as it was; one with a body was streamed
    // and is gone (the body is never buffered).
    let retriable = is_idempotent(&parts.method) && body.is_end_stream();
    let attempts = if retriable {
        1 + route.config.retries
    } else {
        1
    };
    // Counted while it streams, never buffered: past the limit the body ends in an error,
    // which fails the upstream request (a 413 below) unless the upstream answered first.
    let limit = usize::try_from(proxy.inner.max_body).unwrap_or(usize::MAX);
    let mut body = Some(Body::new(http_body_util::Limited::new(body, limit)));
    let deadline = tokio::time::Instant::now() + route.config.timeout;
    // The upstreams tried, for the attempts after the first (the first allocates nothing).
    let mut tried = Vec::new();
    let mut last = None;
    for attempt in 1..=attempts {
        let Some(i) = route.pick(&tried) else {
            break;
        };
        if attempt < attempts {
            tried.push(i);
        }
        let upstream = &route.upstreams[i];
        let label = &upstream.label;
        let uri = match upstream_uri(
            upstream.base.path(),
            &route.config.prefix,
            &parts.uri,
            route.config.strip_prefix,
        ) {
            Ok(uri) => uri,
            Err(e) => return Err((e, Some(i))),
        };
        let mut builder = http::Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .version(Version::HTTP_11);
        // The last attempt takes the headers; only one that may be retried sends a copy.
        let these = if attempt == attempts {
            headers.take()
        } else {
            headers.clone()
        };
        if let (Some(h), Some(these)) = (builder.headers_mut(), these) {
            *h = these;
        }
        let this_body = match body.take() {
            Some(b) if !retriable => b,
            _ => Body::empty(),
        };
        let request = match builder.body(this_body) {
            Ok(r) => r,
            Err(e) => return Err((ProxyError::BadRequest(e.to_string()), Some(i))),
        };
        match tokio::time::timeout_at(deadline, proxy.inner.client.send(&upstream.pool, request))
            .await
        {
            Err(_) => {
                return Err((
                    ProxyError::Timeout {
                        upstream: label.clone(),
                        ms: route.config.timeout.as_millis(),
                    },
                    Some(i),
                ));
            }
            Ok(Ok(response)) => {
                upstream.answered();
                return Ok((response, i));
            }
            Ok(Err(e)) if e.is_body_over_limit() => {
                return Err((
                    ProxyError::BodyTooLarge {
                        limit: proxy.inner.max_body,
                    },
                    Some(i),
                ));
            }
            Ok(Err(e)) => {
                let error = if e.is_connection_refused() {
                    let ejection = route
                        .config
                        .health_check
                        .as_ref()
                        .map_or(PASSIVE_EJECTION, |h| h.interval.max(Duration::from_secs(1)));
                    upstream.eject(ejection);
                    ProxyError::Refused {
                        upstream: label.clone(),
                    }
                } else {
                    ProxyError::Failed {
                        upstream: label.clone(),
                        reason: error_chain(&e),
                    }
                };
                tracing::debug!(route = %route.config.name, upstream = %label, error = %error, "upstream attempt failed");
                last = Some((error, Some(i)));
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        (
            ProxyError::NoHealthyUpstream(route.config.name.clone()),
            None,
        )
    }))
}

/// The client's response: a `101` joins the two upgraded connections in a task; anything
/// else streams the upstream's body through with hop-by-hop headers removed.
fn upgrade_or_plain(
    mut response: hyper::Response<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let mut client = TokioIo::new(client);
                    let mut upstream = TokioIo::new(upstream);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                    {
                        tracing::debug!(error = %e, "upgraded connection ended with an error");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "upgrade through the proxy failed"),
            }
        });
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Body::new(body))
}

/// The client's headers made into the upstream request's (in place: no copy of the map);
/// `upgrade`: they ask for a protocol upgrade ([`is_upgrade`], already looked at).
fn upstream_headers(
    mut headers: HeaderMap,
    upgrade: bool,
    uri: &Uri,
    route: &Route,
    peer: Option<&Peer>,
    caller: &Caller,
    request_id: &HeaderValue,
) -> HeaderMap {
    let upgrade = upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    // The upstream client writes the upstream's authority when Host is absent.
    let client_host = if route.config.preserve_host {
        headers.get(header::HOST).cloned()
    } else {
        headers.remove(header::HOST)
    };
    let host = client_host.or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    strip_hop_by_hop(&mut headers);
    // `insert` below replaces every value of its name, but not every one of these is
    // always inserted: all are removed, in one pass over the names present when there is
    // one (most requests carry none).
    if headers.keys().any(|name| GATEWAY_SET.contains(name)) {
        for name in &GATEWAY_SET {
            headers.remove(name);
        }
    }
    if let Some(peer) = peer {
        headers.insert(X_FORWARDED_FOR, peer.forwarded_for.clone());
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host);
    }
    headers.insert(X_REQUEST_ID, request_id.clone());
    if matches!(route.config.auth, RouteAuth::ApiKey { .. }) {
        headers.remove(header::AUTHORIZATION);
    }
    if let Caller::Agent(id) = caller
        && let Ok(v) = HeaderValue::from_str(id.as_str())
    {
        headers.insert(X_AGENT_ID, v);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
    headers
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them (HTTP/1.1 keeps connections alive without a
    // `Connection` header): one pass over the few names present, instead of a hashed
    // removal per hop-by-hop name, twice per proxied request.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.into_iter().chain(HOP_BY_HOP) {
        headers.remove(name);
    }
}

/// `Connection: upgrade` with an `Upgrade` header (RFC 9110 §7.8).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// RFC 9110 §9.2.2.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The upstream request's target in origin-form (RFC 9112 §3.2.1: `/path?query`): the
/// pooled connection already says which upstream it is.
fn upstream_uri(base_path: &str, prefix: &str, uri: &Uri, strip: bool) -> Result<Uri, ProxyError> {
    let mut path = upstream_path(base_path, prefix, uri.path(), strip);
    if let Some(q) = uri.query() {
        path.push('?');
        path.push_str(q);
    }
    let target = PathAndQuery::try_from(path)
        .map_err(|e: http::uri::InvalidUri| ProxyError::BadRequest(e.to_string()))?;
    Ok(Uri::from(target))
}

/// The client's `X-Request-Id` if it is 1-128 of `A-Za-z0-9._:-`, else 32 random hex
/// digits.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    let valid = |v: &&HeaderValue| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
    };
    if let Some(v) = headers.get(X_REQUEST_ID).filter(valid) {
        return v.clone();
    }
    // The thread's ChaCha generator, seeded from the OS: no system call per request (ring's
    // SystemRandom made one `getrandom` per id).
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes[..]);
    let mut text = [0u8; 32];
    crate::digest::hex_into(&bytes, &mut text);
    HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static("-"))
}

/// The `Content-Length` the client declared, if it declared a valid one (hyper refuses a
/// request with an invalid one before it gets here).
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The error and its causes on one line, for the detail and the log.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn request_id_is_kept_only_when_valid() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("a b"));
        let fresh = request_id(&h);
        assert_eq!(fresh.len(), 32);
        assert_ne!(fresh, request_id(&h));
    }
}
