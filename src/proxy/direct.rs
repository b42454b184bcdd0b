//! Proxied requests taken straight from the connection, past the API's layers.
//!
//! A request for a configured route needs none of the API stack: not the Socket.IO layer
//! or its session guard and packet limit (`/socket.io` is a reserved segment, never a
//! route), not the API router's match (a route's first segment is never a built-in one,
//! see [`crate::config::RESERVED_SEGMENTS`]), not `json_errors` (an upstream's own error
//! response goes to the client as the upstream sent it). What the stack does for a
//! proxied request is done here, in the same order and by the same code:
//! - the request head limits (414, 431: [`HeadCheck::refuse`]), with the API's access line
//!   for such a refusal (a proxied request has the proxy's own line);
//! - in-flight tracking, so a graceful shutdown waits for the request;
//! - `agentgate_http_requests_total{route="proxy"}`;
//! - the security headers ([`crate::api::router::security_header_values`]).
//!
//! With `cors_origins` configured, proxied requests keep going through the whole stack
//! (the CORS layer answers preflights and adds its headers there).
//!
//! Each layer of the stack clones its inner service and boxes a future per request; the
//! proxy benchmark (BENCHMARKS.md, "Proxy") measured what skipping them saves.

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use http::{HeaderName, HeaderValue, Request};
use tokio_util::task::TaskTracker;

use super::Proxy;
use super::table::Route;
use crate::api::head_limits::HeadCheck;
use crate::identity::Peer;
use crate::metrics::Metrics;

/// What a proxied request meets instead of the API stack; one per listener.
pub struct Direct {
    proxy: Proxy,
    head: HeadCheck,
    requests: TaskTracker,
    metrics: Metrics,
    security_headers: Vec<(HeaderName, HeaderValue)>,
}

impl Direct {
    pub(crate) fn new(
        proxy: Proxy,
        head: HeadCheck,
        requests: TaskTracker,
        metrics: Metrics,
        security_headers: Vec<(HeaderName, HeaderValue)>,
    ) -> Self {
        Self {
            proxy,
            head,
            requests,
            metrics,
            security_headers,
        }
    }

    /// The route of `path`, when a route serves it; `None` leaves the request to the
    /// API stack (a built-in endpoint, or the JSON 404 of a path nothing serves).
    pub(crate) fn route_for(&self, path: &str) -> Option<Arc<Route>> {
        self.proxy.inner.table.load().find(path).cloned()
    }

    /// Serves `req` from `peer` on `route`.
    pub(crate) async fn serve(
        self: Arc<Self>,
        route: Arc<Route>,
        req: Request<hyper::body::Incoming>,
        peer: Peer,
    ) -> Response {
        let started = std::time::Instant::now();
        let req = req.map(Body::new);
        let method = req.method().clone();
        let (mut response, label) = match self.head.refuse(&req) {
            // Refused before any route: the API's access line, as `api::observe` writes it.
            Some(refused) => {
                crate::api::middleware::access_log(
                    method.as_str(),
                    req.uri().path(),
                    false,
                    refused.status().as_u16(),
                    started.elapsed(),
                    Some(&peer),
                    None,
                );
                // As `api::observe` labels it: refused before routing.
                (refused, "unmatched")
            }
            None => {
                let response = self
                    .requests
                    .track_future(super::forward::handle_route(
                        self.proxy.clone(),
                        route,
                        req,
                        Some(peer),
                    ))
                    .await;
                (response, "proxy")
            }
        };
        let headers = response.headers_mut();
        for (name, value) in &self.security_headers {
            if !headers.contains_key(name) {
                headers.insert(name.clone(), value.clone());
            }
        }
        self.metrics.http_request(
            &method,
            std::borrow::Cow::Borrowed(label),
            response.status().as_u16(),
        );
        response
    }
}
