//! The routes in force: built from the validated configuration and the runtime routes,
//! matched by longest prefix on whole path segments, swapped as a whole on SIGHUP and on
//! every runtime change.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::upstream::Upstream;
use crate::clock::Clock;
use crate::config::{RESERVED_SEGMENTS, RouteConfig};
use crate::metrics::{Metrics, ProxySeries};

/// Where a route comes from: `[[routes]]` of the file, or `POST /routes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteSource {
    Config,
    Runtime,
}

impl RouteSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Runtime => "runtime",
        }
    }
}

pub(crate) struct Route {
    pub config: RouteConfig,
    pub source: RouteSource,
    pub upstreams: Vec<Arc<Upstream>>,
    /// The route's metric series, by upstream index.
    pub series: ProxySeries,
    next: AtomicUsize,
}

impl Route {
    /// `previous`: the same-named route of the table being replaced, whose upstreams keep
    /// their health state when their URL is unchanged.
    fn new(
        config: RouteConfig,
        source: RouteSource,
        previous: Option<&Route>,
        metrics: &Metrics,
        clock: &Clock,
    ) -> Self {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                previous
                    .and_then(|p| p.upstreams.iter().find(|o| o.base == *u))
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Upstream::new(
                            &config.name,
                            u.clone(),
                            metrics.clone(),
                            clock.clone(),
                        ))
                    })
            })
            .collect::<Vec<Arc<Upstream>>>();
        let series = ProxySeries::new(
            metrics,
            &config.name,
            upstreams.iter().map(|u| u.label.clone()).collect(),
        );
        Self {
            config,
            source,
            upstreams,
            series,
            next: AtomicUsize::new(0),
        }
    }

    /// The next upstream in the rotation after round-robin, skipping those out of it and
    /// those in `tried`; `None` when none is left.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.upstreams.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .find(|i| !tried.contains(i) && self.upstreams[*i].in_rotation())
    }

    /// Whether `path` is under this route's prefix (whole segments only).
    fn matches(&self, path: &str) -> bool {
        let prefix = self.config.prefix.as_str();
        prefix == "/"
            || path == prefix
            || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
    }
}

/// Every route, longest prefix first.
#[derive(Default)]
pub(crate) struct RouteTable {
    pub routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// The table for `configs`; upstreams unchanged since `previous` (same route name and
    /// URL) keep their place in or out of the rotation across a reload.
    pub fn new(
        configs: Vec<(RouteConfig, RouteSource)>,
        previous: Option<&RouteTable>,
        metrics: &Metrics,
        clock: &Clock,
    ) -> Self {
        let mut routes: Vec<Arc<Route>> = configs
            .into_iter()
            .map(|(c, source)| {
                let old = previous
                    .and_then(|t| t.routes.iter().find(|r| r.config.name == c.name))
                    .map(|r| r.as_ref());
                Arc::new(Route::new(c, source, old, metrics, clock))
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.config.prefix.len()));
        Self { routes }
    }

    /// The route for `path`: the longest matching prefix. Paths under a built-in segment
    /// never match, even a `/` route (config/gateway.rs explains why).
    pub fn find(&self, path: &str) -> Option<&Arc<Route>> {
        let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
        if RESERVED_SEGMENTS.contains(&first) {
            return None;
        }
        self.routes.iter().find(|r| r.matches(path))
    }
}

/// The path the upstream sees: the base URL's path, then the request path with the
/// prefix removed when the route strips it (`/p/x` -> `/x`, `/p` -> `/`).
pub(crate) fn upstream_path(base_path: &str, prefix: &str, path: &str, strip: bool) -> String {
    let rest = if strip && prefix != "/" {
        let r = &path[prefix.len().min(path.len())..];
        if r.is_empty() { "/" } else { r }
    } else {
        path
    };
    let base = base_path.trim_end_matches('/');
    let mut path = String::with_capacity(base.len() + rest.len() + 1);
    path.push_str(base);
    path.push_str(rest);
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn route(name: &str, prefix: &str) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            prefix: prefix.into(),
            upstreams: vec!["http://127.0.0.1:1".parse().unwrap()],
            strip_prefix: false,
            auth: crate::config::RouteAuth::None,
            timeout: Duration::from_secs(1),
            retries: 0,
            preserve_host: false,
            health_check: None,
        }
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let t = RouteTable::new(
            vec![
                (route("a", "/p"), RouteSource::Config),
                (route("b", "/p/q"), RouteSource::Runtime),
                (route("root", "/"), RouteSource::Config),
            ],
            None,
            &Metrics::new(),
            &Clock::system(),
        );
        let name = |path| t.find(path).map(|r| r.config.name.clone());
        assert_eq!(name("/p/q/r").as_deref(), Some("b"));
        assert_eq!(name("/p/q").as_deref(), Some("b"));
        assert_eq!(name("/p/qq").as_deref(), Some("a"));
        assert_eq!(name("/p").as_deref(), Some("a"));
        assert_eq!(name("/px").as_deref(), Some("root"));
        assert_eq!(name("/agents/x/y"), None);
        assert_eq!(name("/health"), None);
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash() {
        assert_eq!(upstream_path("", "/p", "/p/x", true), "/x");
        assert_eq!(upstream_path("", "/p", "/p", true), "/");
        assert_eq!(upstream_path("/base/", "/p", "/p/x", true), "/base/x");
        assert_eq!(upstream_path("/", "/p", "/p/x", false), "/p/x");
        assert_eq!(upstream_path("", "/", "/x", true), "/x");
    }
}
