//! One upstream of a route and whether it is in the rotation: out while its active health
//! check fails, and out for a while after it refused a connection (passive ejection), back
//! when the check passes again or the ejection has run out.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::Uri;

use crate::metrics::Metrics;

/// How long an upstream that refused a connection stays out when the route has no active
/// health check to bring it back sooner (Envoy's outlier detection base ejection time).
pub(crate) const PASSIVE_EJECTION: Duration = Duration::from_secs(10);

pub(crate) struct Upstream {
    /// The base URL as configured (scheme, authority, optional path).
    pub base: Uri,
    /// `base` as a string, for labels and logs.
    pub label: String,
    route: String,
    /// The last active health check passed (true until a check says otherwise).
    checked_ok: AtomicBool,
    /// Passive ejection: out until this instant. A std Mutex: held for a read or a write,
    /// never across an `.await`.
    ejected_until: Mutex<Option<Instant>>,
    metrics: Metrics,
}

impl Upstream {
    pub fn new(route: &str, base: Uri, metrics: Metrics) -> Self {
        let label = base.to_string().trim_end_matches('/').to_owned();
        metrics.upstream_health(route, &label, true);
        Self {
            base,
            label,
            route: route.to_owned(),
            checked_ok: AtomicBool::new(true),
            ejected_until: Mutex::new(None),
            metrics,
        }
    }

    /// Whether requests may go here now.
    pub fn in_rotation(&self) -> bool {
        if !self.checked_ok.load(Ordering::Acquire) {
            return false;
        }
        let ejected = self.ejected_until.lock().unwrap_or_else(|p| p.into_inner());
        ejected.is_none_or(|until| Instant::now() >= until)
    }

    /// The upstream refused a connection: out of the rotation for `duration`.
    pub fn eject(&self, duration: Duration) {
        let mut ejected = self.ejected_until.lock().unwrap_or_else(|p| p.into_inner());
        let was_in = ejected.is_none_or(|until| Instant::now() >= until);
        *ejected = Some(Instant::now() + duration);
        drop(ejected);
        if was_in {
            tracing::warn!(route = %self.route, upstream = %self.label, secs = duration.as_secs(), "upstream refused a connection; out of the rotation");
            self.metrics
                .upstream_health(&self.route, &self.label, false);
        }
    }

    /// The result of an active health check.
    pub fn set_checked(&self, ok: bool, why: &str) {
        if ok {
            // A passing check also ends a passive ejection: the upstream answers again.
            *self.ejected_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        let before = self.checked_ok.swap(ok, Ordering::AcqRel);
        if before != ok {
            if ok {
                tracing::info!(route = %self.route, upstream = %self.label, "upstream passed its health check; back in the rotation");
            } else {
                tracing::warn!(route = %self.route, upstream = %self.label, reason = why, "upstream failed its health check; out of the rotation");
            }
        }
        self.metrics
            .upstream_health(&self.route, &self.label, self.in_rotation());
    }
}
