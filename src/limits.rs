//! Per-source limits (issue 11, "Limits"): a count of failures per source address over a
//! fixed window, past which the source is refused until the window ends ([`FailureWindow`]:
//! failed API-key attempts get `429` with `Retry-After`, failed handshakes get the
//! connection closed at accept), and a count of things in progress per source
//! ([`InFlight`]: unfinished TLS handshakes), and [`Refusals`], which counts a refusal by
//! any limit and logs it once per source and window.
//!
//! Fixed windows rather than sliding ones: one timestamp and one counter per source, and
//! the refusal ends at a time the client can be told (`Retry-After`). A source is logged
//! once per window, when it reaches the limit, and every refusal is counted in the
//! metrics by the caller.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Sources tracked at once before expired windows are swept; bounds the memory a scan
/// from many addresses can take (each entry is a few dozen bytes).
const SWEEP_ABOVE: usize = 65_536;

/// Failures (or events) counted per key over a window, by default per source address
/// (cheap to clone).
#[derive(Clone, Debug)]
pub struct FailureWindow<K = IpAddr> {
    shared: Arc<Shared<K>>,
}

#[derive(Debug)]
struct Shared<K> {
    max: u32,
    window: Duration,
    /// Held (no `.await` inside) for one lookup or update.
    sources: Mutex<Sources<K>>,
}

#[derive(Debug)]
struct Sources<K> {
    windows: HashMap<K, Window>,
    /// Size at which expired windows are swept next: doubles with what a sweep leaves, so
    /// that sweeping stays amortised O(1) per update however many keys are live.
    sweep_at: usize,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
}

impl<K: Hash + Eq + Clone> FailureWindow<K> {
    /// At most `max` failures per key in `window`.
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                max,
                window,
                sources: Mutex::new(Sources {
                    windows: HashMap::new(),
                    sweep_at: SWEEP_ABOVE,
                }),
            }),
        }
    }

    /// How long `source` stays refused, if it has reached the limit in its current window.
    pub(crate) fn refused(&self, source: K, now: Instant) -> Option<Duration> {
        let sources = self.lock();
        let w = sources.windows.get(&source)?;
        let end = w.start + self.shared.window;
        (w.failures >= self.shared.max && now < end).then(|| end - now)
    }

    /// Counts a failure of `source`; `true` when this one reached the limit (the moment to
    /// log, once per window).
    pub(crate) fn fail(&self, source: K, now: Instant) -> bool {
        self.count(source, now) == self.shared.max
    }

    /// Counts one more for `source` and returns its count in the current window.
    pub(crate) fn count(&self, source: K, now: Instant) -> u32 {
        let window = self.shared.window;
        let mut sources = self.lock();
        if sources.windows.len() >= sources.sweep_at {
            sources.windows.retain(|_, w| now < w.start + window);
            sources.sweep_at = SWEEP_ABOVE.max(2 * sources.windows.len());
        }
        let w = sources.windows.entry(source).or_insert(Window {
            start: now,
            failures: 0,
        });
        if now >= w.start + window {
            *w = Window {
                start: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
        w.failures
    }

    /// The count allowed per window.
    pub(crate) fn max(&self) -> u32 {
        self.shared.max
    }

    pub(crate) fn window(&self) -> Duration {
        self.shared.window
    }

    /// Drops what is counted for `source` (a session that ended).
    pub(crate) fn forget(&self, source: &K) {
        self.lock().windows.remove(source);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sources<K>> {
        // A panic while holding the lock leaves a map of plain counters, still usable.
        self.shared
            .sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// Things in progress per source address, at most `max` each (cheap to clone).
#[derive(Clone, Debug)]
pub(crate) struct InFlight {
    shared: Arc<InFlightShared>,
}

#[derive(Debug)]
struct InFlightShared {
    max: u32,
    /// Held (no `.await` inside) for one increment or decrement; a source with nothing in
    /// progress has no entry, so the map holds at most as many entries as connections.
    sources: Mutex<HashMap<IpAddr, u32>>,
}

/// One thing in progress for a source; ends when dropped.
#[derive(Debug)]
pub(crate) struct InFlightGuard {
    shared: Arc<InFlightShared>,
    source: IpAddr,
}

impl InFlight {
    pub(crate) fn new(max: u32) -> Self {
        Self {
            shared: Arc::new(InFlightShared {
                max,
                sources: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Counts one more for `source`, or `None` when it already has `max` in progress.
    pub(crate) fn enter(&self, source: IpAddr) -> Option<InFlightGuard> {
        let mut sources = self.shared.lock();
        let n = sources.entry(source).or_insert(0);
        if *n >= self.shared.max {
            return None;
        }
        *n += 1;
        Some(InFlightGuard {
            shared: self.shared.clone(),
            source,
        })
    }
}

impl InFlightShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        // A panic while holding the lock leaves a map of plain counters, still usable.
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut sources = self.shared.lock();
        if let Some(n) = sources.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                sources.remove(&self.source);
            }
        }
    }
}

/// How often a source refused by one limit is logged: once a minute, whatever the count.
const LOG_WINDOW: Duration = Duration::from_secs(60);

/// Counts refusals by limit in `agentgate_limit_refusals_total{limit}` and logs the first
/// of each source and limit per minute, so that a client retrying in a loop writes one
/// line, not one per request (cheap to clone).
#[derive(Clone)]
pub(crate) struct Refusals {
    metrics: crate::metrics::Metrics,
    logged: FailureWindow<(Option<IpAddr>, &'static str)>,
}

impl Refusals {
    pub(crate) fn new(metrics: crate::metrics::Metrics) -> Self {
        Self {
            metrics,
            logged: FailureWindow::new(1, LOG_WINDOW),
        }
    }

    /// `limit` (the `[limits]` key, without `limits.`) refused a request of `source`.
    pub(crate) fn refused(&self, limit: &'static str, source: Option<IpAddr>, detail: &str) {
        self.metrics.limit_refusal(limit);
        if self.logged.count((source, limit), Instant::now()) == 1 {
            tracing::warn!(
                source = ?source, limit, detail,
                "request refused by a limit (logged once a minute per address and limit)"
            );
        }
    }
}

/// `Retry-After` in whole seconds, rounded up so that a client that waits that long is
/// let in.
pub(crate) fn retry_after_secs(left: Duration) -> u64 {
    left.as_secs() + u64::from(left.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_refused_from_the_limit_until_its_window_ends() {
        let limit = FailureWindow::new(3, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        assert!(!limit.fail(a, t0));
        assert!(!limit.fail(a, t0));
        assert_eq!(limit.refused(a, t0), None);
        assert!(limit.fail(a, t0), "the third failure reaches the limit");
        assert!(!limit.fail(a, t0), "reported once per window");
        assert_eq!(
            limit.refused(a, t0 + Duration::from_secs(20)),
            Some(Duration::from_secs(40))
        );
        assert_eq!(limit.refused(b, t0), None, "another source is not refused");
        let later = t0 + Duration::from_secs(60);
        assert_eq!(limit.refused(a, later), None);
        assert!(!limit.fail(a, later), "a new window starts from zero");
    }

    #[test]
    fn in_flight_counts_per_source_and_frees_on_drop() {
        let limit = InFlight::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = limit.enter(a).unwrap();
        let _second = limit.enter(a).unwrap();
        assert!(limit.enter(a).is_none(), "a third at once is refused");
        assert!(limit.enter(b).is_some(), "another source has its own count");
        drop(first);
        assert!(limit.enter(a).is_some(), "a finished one frees its place");
    }

    #[test]
    fn a_refusal_is_logged_once_per_source_limit_and_window() {
        let refusals = Refusals::new(crate::metrics::Metrics::new());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(refusals.logged.count((Some(a), "max_body_bytes"), t0), 1);
        assert_eq!(refusals.logged.count((Some(a), "max_body_bytes"), t0), 2);
        assert_eq!(refusals.logged.count((Some(a), "max_uri_bytes"), t0), 1);
        assert_eq!(
            refusals
                .logged
                .count((Some(a), "max_body_bytes"), t0 + LOG_WINDOW),
            1,
            "logged again in the next window"
        );
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(40_001)), 41);
        assert_eq!(retry_after_secs(Duration::from_secs(40)), 40);
    }
}
