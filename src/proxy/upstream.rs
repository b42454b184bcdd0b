//! One upstream of a route and whether it is in the rotation: out while its active health
//! check fails, and out for a while after it refused a connection (passive ejection), back
//! when the check passes again or the ejection has run out.
//!
//! The ejection is timed on the gateway's [`Clock`] (a manual one in tests steps over it
//! instead of sleeping) and kept in an atomic, so the per-request check takes no lock.
//!
//! Each upstream owns its connection pool: a route table rebuilt with the same upstream
//! (same route name and URL) takes the `Arc<Upstream>` over, connections included.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use http::Uri;

use super::client::Pool;
use crate::clock::Clock;
use crate::metrics::Metrics;

/// How long an upstream that refused a connection stays out when the route has no active
/// health check to bring it back sooner (Envoy's outlier detection base ejection time).
pub(crate) const PASSIVE_EJECTION: Duration = Duration::from_secs(10);

/// `ejected_until` when the upstream is not ejected.
const NOT_EJECTED: i64 = i64::MIN;

pub(crate) struct Upstream {
    /// The base URL as configured (scheme, authority, optional path).
    pub base: Uri,
    /// `base` as a string, for labels and logs.
    pub label: String,
    /// The kept-alive connections to `base`.
    pub pool: Pool,
    route: String,
    /// The last active health check passed (true until a check says otherwise).
    checked_ok: AtomicBool,
    /// Passive ejection: out until this time (Unix milliseconds on `clock`), or
    /// [`NOT_EJECTED`].
    ejected_until: AtomicI64,
    clock: Clock,
    metrics: Metrics,
}

impl Upstream {
    pub fn new(route: &str, base: Uri, metrics: Metrics, clock: Clock) -> Self {
        let label = base.to_string().trim_end_matches('/').to_owned();
        metrics.upstream_health(route, &label, true);
        Self {
            pool: Pool::new(&base),
            base,
            label,
            route: route.to_owned(),
            checked_ok: AtomicBool::new(true),
            ejected_until: AtomicI64::new(NOT_EJECTED),
            clock,
            metrics,
        }
    }

    /// Whether requests may go here now.
    pub fn in_rotation(&self) -> bool {
        if !self.checked_ok.load(Ordering::Acquire) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Acquire);
        until == NOT_EJECTED || self.now_ms() >= until
    }

    /// The upstream refused a connection: out of the rotation for `duration`.
    pub fn eject(&self, duration: Duration) {
        let now = self.now_ms();
        let until = now.saturating_add(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX));
        let before = self.ejected_until.swap(until, Ordering::AcqRel);
        if before == NOT_EJECTED || now >= before {
            tracing::warn!(route = %self.route, upstream = %self.label, secs = duration.as_secs(), "upstream refused a connection; out of the rotation");
            self.metrics
                .upstream_health(&self.route, &self.label, false);
        }
    }

    /// The upstream answered a request. After a passive ejection has run out, the first
    /// answer ends it for good: the gauge and the log say it is back. An answer on an older
    /// connection during the ejection changes nothing. One atomic load per request.
    pub fn answered(&self) {
        let until = self.ejected_until.load(Ordering::Acquire);
        if until != NOT_EJECTED
            && self.now_ms() >= until
            && self
                .ejected_until
                .compare_exchange(until, NOT_EJECTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            tracing::info!(route = %self.route, upstream = %self.label, "upstream answers again; back in the rotation");
            self.metrics
                .upstream_health(&self.route, &self.label, self.in_rotation());
        }
    }

    fn now_ms(&self) -> i64 {
        i64::try_from(self.clock.now().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
    }

    /// The result of an active health check.
    pub fn set_checked(&self, ok: bool, why: &str) {
        if ok {
            // A passing check also ends a passive ejection: the upstream answers again.
            self.ejected_until.store(NOT_EJECTED, Ordering::Release);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn an_ejection_ends_on_the_clock_and_an_answer_during_it_changes_nothing() {
        let manual = ManualClock::starting_now();
        let up = Upstream::new(
            "r",
            "http://127.0.0.1:1".parse().unwrap(),
            Metrics::new(),
            manual.clock(),
        );
        assert!(up.in_rotation());
        up.eject(Duration::from_secs(10));
        assert!(!up.in_rotation());
        // An answer on a connection opened before the refusal does not end the ejection.
        up.answered();
        assert!(!up.in_rotation());
        manual.advance(Duration::from_millis(9_999));
        assert!(!up.in_rotation());
        manual.advance(Duration::from_millis(1));
        assert!(up.in_rotation());
        up.answered();
        assert_eq!(up.ejected_until.load(Ordering::Acquire), NOT_EJECTED);
        // A failing health check keeps it out whatever the ejection says.
        up.set_checked(false, "status 503");
        assert!(!up.in_rotation());
        up.set_checked(true, "ok");
        assert!(up.in_rotation());
    }
}
