//! Active health checks: every `interval_secs`, `GET <upstream><path>` on each upstream of
//! a route; a 2xx or 3xx within the interval (and the route's timeout) keeps or brings it
//! into the rotation, anything else takes it out.

use std::sync::Arc;

use http::{Method, Request};
use tokio_util::sync::CancellationToken;

use super::client::UpstreamClient;
use super::table::{Route, upstream_path};

/// Starts the health check of `route` (nothing if it has none); it ends when `stop` is
/// cancelled.
pub(crate) fn spawn(route: Arc<Route>, client: &UpstreamClient, stop: CancellationToken) {
    if route.config.health_check.is_some() {
        tokio::spawn(run(route, client.clone(), stop));
    }
}

async fn run(route: Arc<Route>, client: UpstreamClient, stop: CancellationToken) {
    let Some(check) = route.config.health_check.clone() else {
        return;
    };
    let limit = check.interval.min(route.config.timeout);
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for upstream in &route.upstreams {
            // Origin-form, on the upstream's own pool (Host: the upstream's authority).
            let path = upstream_path(upstream.base.path(), "", &check.path, false);
            let Ok(req) = Request::builder()
                .method(Method::GET)
                .uri(path)
                .header(http::header::USER_AGENT, "agentgate-health-check")
                .body(axum::body::Body::empty())
            else {
                upstream.set_checked(false, "health check URL is invalid");
                continue;
            };
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout(limit, client.send(&upstream.pool, req)) => r,
            };
            match result {
                Ok(Ok(resp)) if resp.status().is_success() || resp.status().is_redirection() => {
                    upstream.set_checked(true, "ok");
                }
                Ok(Ok(resp)) => {
                    upstream.set_checked(false, &format!("status {}", resp.status().as_u16()));
                }
                Ok(Err(e)) => upstream.set_checked(false, &super::forward::error_chain(&e)),
                Err(_) => upstream.set_checked(false, "no answer within the interval"),
            }
        }
    }
}
