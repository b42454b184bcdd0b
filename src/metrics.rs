//! Prometheus metrics (`GET /metrics`, text format), with prometheus-client.
//!
//! Counters are bumped where things happen; gauges that describe state (connected agents,
//! store size, earliest certificate expiry) are read from their owners at scrape time, so
//! they can never drift from the truth.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub result: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProblemLabels {
    pub problem: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: Cow<'static, str>,
    pub route: Cow<'static, str>,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabels {
    pub route: String,
    /// `2xx` .. `5xx`.
    pub status_class: &'static str,
    /// The upstream's base URL, or `-` when the request was answered before one was chosen
    /// (refused by authorization, no healthy upstream).
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub route: String,
    pub upstream: String,
}

/// Cheap-to-clone handle on every metric of the process.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    handshakes: Family<HandshakeLabels, Counter>,
    heartbeats: Counter,
    heartbeats_malformed: Family<ProblemLabels, Counter>,
    socket_backpressure: Counter,
    socket_overflow_disconnects: Counter,
    emits_undelivered: Family<EventLabels, Counter>,
    commands: Family<OutcomeLabels, Counter>,
    command_seconds: Histogram,
    /// Registered only with `[cluster]`: a single node shows no Redis metrics at all.
    cluster: Option<ClusterMetrics>,
    http_requests: Family<HttpLabels, Counter>,
    connected_agents: Gauge,
    socket_sessions: Gauge,
    store_certificates: Gauge,
    earliest_expiry: Gauge,
    proxy_requests: Family<ProxyLabels, Counter>,
    proxy_seconds: Family<RouteLabels, Histogram>,
    upstream_healthy: Family<UpstreamLabels, Gauge>,
    limit_refusals: Family<LimitLabels, Counter>,
    state: StateMetrics,
    /// Rejected handshakes of the last [`RECENT_WINDOW`], for the fleet console's counter
    /// (the Prometheus counter only has totals since start).
    recent_rejections: RecentCounts,
}

/// The shared state on Redis (`[cluster]`); registered on every node, zero without it.
struct StateMetrics {
    propagation_seconds: Histogram,
    redis_errors: Counter,
    resyncs: Counter,
}

/// The metrics of a clustered node.
struct ClusterMetrics {
    command_seconds: Histogram,
    redis_connected: Gauge,
    redis_reconnects: Counter,
    redis_errors: Counter,
    nodes: Gauge,
    /// Serializes the catch-up of the Redis counters between concurrent scrapes (a std
    /// Mutex; nothing awaits while it is held).
    catching_up: std::sync::Mutex<()>,
}

/// State read at scrape time.
pub struct Snapshot {
    pub connected_agents: i64,
    pub socket_sessions: i64,
    pub store_certificates: i64,
    /// Unix seconds of the earliest `notAfter` in the store, if it is not empty.
    pub earliest_expiry: Option<i64>,
    /// With `[cluster]`: the Redis link and the number of live nodes.
    pub cluster: Option<ClusterSnapshot>,
}

/// The Redis link's state, read at scrape time.
pub struct ClusterSnapshot {
    pub redis_connected: bool,
    /// Totals since start (the counters catch up to them).
    pub redis_reconnects: u64,
    pub redis_errors: u64,
    /// Live nodes, this one included.
    pub nodes: i64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl StateMetrics {
    fn register(registry: &mut Registry) -> Self {
        // 0.1 ms .. 5 s: loopback pub/sub to a node that was busy resyncing.
        let propagation_seconds = Histogram::new([
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
        ]);
        registry.register(
            "state_propagation_seconds",
            "Time from a shared state change on one node until this node received it (wall clocks of both nodes)",
            propagation_seconds.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "state_redis_errors",
            "Shared state operations that failed on Redis (unreachable, or Redis without agentgate state)",
            redis_errors.clone(),
        );
        let resyncs = Counter::default();
        registry.register(
            "state_resyncs",
            "Full reloads of the certificate index from Redis",
            resyncs.clone(),
        );
        Self {
            propagation_seconds,
            redis_errors,
            resyncs,
        }
    }
}

impl Metrics {
    /// The metrics of a single node.
    pub fn new() -> Self {
        Self::build(false)
    }

    /// The metrics of a node with `[cluster]`: also the Redis link, the live nodes and the
    /// cross-node command latency.
    pub fn clustered() -> Self {
        Self::build(true)
    }

    fn build(clustered: bool) -> Self {
        let mut registry = Registry::with_prefix("agentgate");
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes by result (accepted/rejected) and rejection reason",
            handshakes.clone(),
        );
        let heartbeats = Counter::default();
        registry.register(
            "heartbeats",
            "Heartbeats received from agents",
            heartbeats.clone(),
        );
        let heartbeats_malformed = Family::<ProblemLabels, Counter>::default();
        registry.register(
            "heartbeats_malformed",
            "Heartbeats acknowledged with an error event: payload not an object, or a known field of the wrong type",
            heartbeats_malformed.clone(),
        );
        let socket_backpressure = Counter::default();
        registry.register(
            "socket_backpressure",
            "Times a Socket.IO session's send buffer was full: its replies queued and its connection no longer read until they were out",
            socket_backpressure.clone(),
        );
        let socket_overflow_disconnects = Counter::default();
        registry.register(
            "socket_overflow_disconnects",
            "Socket.IO sessions closed because replies piled up past the per-session limit",
            socket_overflow_disconnects.clone(),
        );
        let emits_undelivered = Family::<EventLabels, Counter>::default();
        registry.register(
            "emits_undelivered",
            "Server-initiated events that could not be handed to a session (buffer still full at the deadline, or session gone)",
            emits_undelivered.clone(),
        );
        let commands = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "commands",
            "Commands sent to agents by outcome",
            commands.clone(),
        );
        // 1 ms .. ~65 s: a command round trip on a LAN to the 60 s timeout ceiling.
        let command_seconds = Histogram::new([
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ]);
        registry.register(
            "command_duration_seconds",
            "Command round trip until the agent's ack",
            command_seconds.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by method, route and status",
            http_requests.clone(),
        );
        let connected_agents = Gauge::default();
        registry.register(
            "connected_agents",
            "Agents with at least one live Socket.IO session",
            connected_agents.clone(),
        );
        let socket_sessions = Gauge::default();
        registry.register(
            "socket_sessions",
            "Live Socket.IO sessions (agents and anonymous)",
            socket_sessions.clone(),
        );
        let store_certificates = Gauge::default();
        registry.register(
            "store_certificates",
            "Agent certificates in the store",
            store_certificates.clone(),
        );
        let earliest_expiry = Gauge::default();
        registry.register(
            "certificate_earliest_expiry_timestamp_seconds",
            "Unix time of the earliest notAfter among stored agent certificates (0 when the store is empty)",
            earliest_expiry.clone(),
        );
        let cluster = clustered.then(|| ClusterMetrics::register(&mut registry));
        let state = StateMetrics::register(&mut registry);
        let proxy_requests = Family::<ProxyLabels, Counter>::default();
        registry.register(
            "proxy_requests",
            "Proxied requests by route, status class and upstream",
            proxy_requests.clone(),
        );
        // 0.5 ms .. 60 s: a loopback upstream to the longest sensible route timeout.
        let proxy_seconds = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ])
        });
        registry.register(
            "proxy_request_duration_seconds",
            "Time from a proxied request's arrival to its response head, by route",
            proxy_seconds.clone(),
        );
        let upstream_healthy = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_healthy",
            "1 while an upstream is in its route's rotation, 0 while it is out",
            upstream_healthy.clone(),
        );
        let limit_refusals = Family::<LimitLabels, Counter>::default();
        registry.register(
            "limit_refusals",
            "Requests and connections refused by a [limits] setting, by limit (the config key)",
            limit_refusals.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                limit_refusals,
                proxy_requests,
                proxy_seconds,
                upstream_healthy,
                registry,
                handshakes,
                heartbeats,
                heartbeats_malformed,
                socket_backpressure,
                socket_overflow_disconnects,
                emits_undelivered,
                commands,
                command_seconds,
                cluster,
                http_requests,
                connected_agents,
                socket_sessions,
                store_certificates,
                earliest_expiry,
                state,
                recent_rejections: RecentCounts::default(),
            }),
        }
    }

    pub fn handshake(&self, result: &'static str, reason: &'static str) {
        if result == "rejected" {
            self.inner
                .recent_rejections
                .add(reason, std::time::Instant::now());
        }
        self.inner
            .handshakes
            .get_or_create(&HandshakeLabels { result, reason })
            .inc();
    }

    /// Rejected TLS handshakes of the last [`RECENT_WINDOW`] by reason, most first.
    pub fn recent_handshake_rejections(&self) -> Vec<(&'static str, u64)> {
        self.inner
            .recent_rejections
            .by_key(std::time::Instant::now())
    }

    /// One refusal by the `[limits]` setting `limit`.
    pub fn limit_refusal(&self, limit: &'static str) {
        self.inner
            .limit_refusals
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    pub fn heartbeat(&self) {
        self.inner.heartbeats.inc();
    }

    /// A heartbeat that also got an `error` event; `problem` is `not_an_object` or
    /// `wrong_type`.
    pub fn heartbeat_malformed(&self, problem: &'static str) {
        self.inner
            .heartbeats_malformed
            .get_or_create(&ProblemLabels { problem })
            .inc();
    }

    pub fn socket_backpressure(&self) {
        self.inner.socket_backpressure.inc();
    }

    pub fn socket_overflow_disconnect(&self) {
        self.inner.socket_overflow_disconnects.inc();
    }

    /// `n` sessions that did not get `event`.
    pub fn emits_undelivered(&self, event: &'static str, n: u64) {
        self.inner
            .emits_undelivered
            .get_or_create(&EventLabels { event })
            .inc_by(n);
    }

    /// A command's outcome; `remote` when it went through Redis to another node (its
    /// round trip also goes to the cross-node histogram).
    pub fn command(&self, outcome: &'static str, remote: bool, seconds: Option<f64>) {
        self.inner
            .commands
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        if let Some(s) = seconds {
            self.inner.command_seconds.observe(s);
            if let (true, Some(c)) = (remote, &self.inner.cluster) {
                c.command_seconds.observe(s);
            }
        }
    }

    /// A change of the shared state reached this node `seconds` after a node sent it.
    pub fn state_propagation(&self, seconds: f64) {
        self.inner.state.propagation_seconds.observe(seconds);
    }

    /// A shared state operation failed on Redis (unreachable, no state).
    pub fn state_redis_error(&self) {
        self.inner.state.redis_errors.inc();
    }

    /// The index was reloaded from Redis (start, reconnection, gap, new epoch).
    pub fn state_resync(&self) {
        self.inner.state.resyncs.inc();
    }

    /// One request counted by method, route and status. A borrowed `route` (`proxy`,
    /// `unmatched`, `/socket.io`) with a standard method makes the label set without
    /// allocating.
    pub fn http_request(&self, method: &http::Method, route: Cow<'static, str>, status: u16) {
        let labels = HttpLabels {
            method: method_label(method),
            route,
            status,
        };
        self.inner.http_requests.get_or_create(&labels).inc();
    }

    /// The `proxy_requests` series of (`route`, `status_class`, `upstream`), created now if
    /// it is new: a handle on the same counter as the family's.
    fn proxy_counter(&self, route: &str, status_class: &'static str, upstream: &str) -> Counter {
        self.inner
            .proxy_requests
            .get_or_create(&ProxyLabels {
                route: route.to_owned(),
                status_class,
                upstream: upstream.to_owned(),
            })
            .clone()
    }

    fn proxy_histogram(&self, route: &str) -> Histogram {
        self.inner
            .proxy_seconds
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .clone()
    }

    /// An upstream entered (`true`) or left its route's rotation.
    pub fn upstream_health(&self, route: &str, upstream: &str, healthy: bool) {
        self.inner
            .upstream_healthy
            .get_or_create(&UpstreamLabels {
                route: route.to_owned(),
                upstream: upstream.to_owned(),
            })
            .set(i64::from(healthy));
    }

    /// An upstream that left the route table (its route deleted or changed, SIGHUP or
    /// the runtime API): its gauge goes rather than staying at its last value.
    pub fn forget_upstream(&self, route: &str, upstream: &str) {
        self.inner.upstream_healthy.remove(&UpstreamLabels {
            route: route.to_owned(),
            upstream: upstream.to_owned(),
        });
    }

    /// The text exposition, after setting the state gauges from `snapshot`.
    pub fn render(&self, snapshot: Snapshot) -> String {
        self.inner.connected_agents.set(snapshot.connected_agents);
        self.inner.socket_sessions.set(snapshot.socket_sessions);
        self.inner
            .store_certificates
            .set(snapshot.store_certificates);
        self.inner
            .earliest_expiry
            .set(snapshot.earliest_expiry.unwrap_or(0));
        if let (Some(m), Some(c)) = (&self.inner.cluster, snapshot.cluster) {
            m.redis_connected.set(i64::from(c.redis_connected));
            // Counters only go up: add what happened since the last scrape.
            let _one_at_a_time = m.catching_up.lock();
            catch_up(&m.redis_reconnects, c.redis_reconnects);
            catch_up(&m.redis_errors, c.redis_errors);
            m.nodes.set(c.nodes);
        }
        let mut out = String::new();
        // Encoding into a String only fails if fmt::Write fails, which String never does.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}

impl ClusterMetrics {
    fn register(registry: &mut Registry) -> Self {
        let command_seconds = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0,
        ]);
        registry.register(
            "cluster_command_duration_seconds",
            "Command round trip until the ack, for agents on another node (through Redis)",
            command_seconds.clone(),
        );
        let redis_connected = Gauge::default();
        registry.register(
            "redis_connected",
            "1 while the cluster's Redis link is up, 0 during an outage (absent without [cluster])",
            redis_connected.clone(),
        );
        let redis_reconnects = Counter::default();
        registry.register(
            "redis_reconnects",
            "Times the Redis link came back after an outage",
            redis_reconnects.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "redis_errors",
            "Failed Redis commands (pings included)",
            redis_errors.clone(),
        );
        let nodes = Gauge::default();
        registry.register(
            "cluster_nodes",
            "Live nodes of the cluster as this node sees them (itself included)",
            nodes.clone(),
        );
        ClusterMetrics {
            command_seconds,
            redis_connected,
            redis_reconnects,
            redis_errors,
            nodes,
            catching_up: std::sync::Mutex::new(()),
        }
    }
}

/// Brings `counter` up to `total` (scrapes can race; a counter never goes down).
fn catch_up(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// The window of [`Metrics::recent_handshake_rejections`].
pub const RECENT_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

/// One-second buckets, oldest first: the second and the counts per key in it.
type Buckets = std::collections::VecDeque<(u64, Vec<(&'static str, u64)>)>;

/// Counts per key over the last [`RECENT_WINDOW`], in one-second buckets: at most 300
/// buckets of a few keys each, whatever the rate (a handshake flood adds to a bucket).
#[derive(Default)]
struct RecentCounts {
    /// Buckets oldest first: the second (since `origin`) and the counts in it. A std
    /// Mutex: held for one update or read, no `.await`.
    buckets: std::sync::Mutex<Buckets>,
    origin: std::sync::OnceLock<std::time::Instant>,
}

impl RecentCounts {
    fn second(&self, now: std::time::Instant) -> u64 {
        let origin = *self.origin.get_or_init(|| now);
        now.saturating_duration_since(origin).as_secs()
    }

    fn lock(&self, now_s: u64) -> std::sync::MutexGuard<'_, Buckets> {
        // A bucket list is consistent after every statement; a panic elsewhere cannot
        // leave it half changed.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let keep_from = (now_s + 1).saturating_sub(RECENT_WINDOW.as_secs());
        while buckets.front().is_some_and(|(s, _)| *s < keep_from) {
            buckets.pop_front();
        }
        buckets
    }

    fn add(&self, key: &'static str, now: std::time::Instant) {
        let now_s = self.second(now);
        let mut buckets = self.lock(now_s);
        if buckets.back().is_none_or(|(s, _)| *s != now_s) {
            buckets.push_back((now_s, Vec::new()));
        }
        if let Some((_, counts)) = buckets.back_mut() {
            match counts.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => counts.push((key, 1)),
            }
        }
    }

    fn by_key(&self, now: std::time::Instant) -> Vec<(&'static str, u64)> {
        let now_s = self.second(now);
        let buckets = self.lock(now_s);
        let mut totals: Vec<(&'static str, u64)> = Vec::new();
        for (key, n) in buckets.iter().flat_map(|(_, counts)| counts.iter()) {
            match totals.iter_mut().find(|(k, _)| k == key) {
                Some((_, t)) => *t += n,
                None => totals.push((key, *n)),
            }
        }
        totals.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        totals
    }
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The index in [`STATUS_CLASSES`] of `status`'s class (anything else counts as `5xx`).
fn status_class(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// The method as a label, borrowed for the standard ones.
fn method_label(method: &http::Method) -> Cow<'static, str> {
    use http::Method;
    let known = match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => return Cow::Owned(method.as_str().to_owned()),
    };
    Cow::Borrowed(known)
}

/// The `proxy_requests` and `proxy_request_duration_seconds` series of one route, each
/// looked up in its family on first use and then held: a proxied request increments a
/// counter and observes a histogram without building, hashing and comparing a label set
/// (and allocating its strings) per request. The series are the families' own (a family
/// hands out handles on its series), so the exposition is the same as without this, and a
/// series appears when its first request is counted, as before.
pub struct ProxySeries {
    metrics: Metrics,
    route: String,
    /// `[upstream][status class]`; the last row is the upstream `-` (answered before an
    /// upstream was chosen).
    requests: Vec<[OnceLock<Counter>; 5]>,
    upstreams: Vec<String>,
    seconds: OnceLock<Histogram>,
}

impl ProxySeries {
    pub fn new(metrics: &Metrics, route: &str, upstreams: Vec<String>) -> Self {
        Self {
            metrics: metrics.clone(),
            route: route.to_owned(),
            requests: (0..=upstreams.len()).map(|_| Default::default()).collect(),
            upstreams,
            seconds: OnceLock::new(),
        }
    }

    /// One request answered with `status` by upstream number `upstream` of the route
    /// (`None`: by the gateway before one was chosen), `seconds` after it arrived.
    pub fn proxied(&self, upstream: Option<usize>, status: u16, seconds: f64) {
        let row = upstream
            .filter(|i| *i < self.upstreams.len())
            .unwrap_or(self.upstreams.len());
        let class = status_class(status);
        let label = self.upstreams.get(row).map_or("-", String::as_str);
        self.requests[row][class]
            .get_or_init(|| {
                self.metrics
                    .proxy_counter(&self.route, STATUS_CLASSES[class], label)
            })
            .inc();
        self.seconds
            .get_or_init(|| self.metrics.proxy_histogram(&self.route))
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_counts_forget_what_left_the_window() {
        use std::time::{Duration, Instant};
        let recent = RecentCounts::default();
        let t0 = Instant::now();
        recent.add("unknown_certificate", t0);
        recent.add("unknown_certificate", t0 + Duration::from_millis(10));
        recent.add("expired", t0 + Duration::from_secs(100));
        assert_eq!(
            recent.by_key(t0 + Duration::from_secs(100)),
            [("unknown_certificate", 2), ("expired", 1)]
        );
        // 300 s after the first two, only the later one is left.
        assert_eq!(recent.by_key(t0 + RECENT_WINDOW), [("expired", 1)]);
        assert_eq!(recent.by_key(t0 + Duration::from_secs(401)), []);
    }

    /// A route's series are the families' own: counted through `ProxySeries` (two tables'
    /// worth, as a reload makes a new one), they show in the exposition by upstream,
    /// status class and `-`, and only once counted.
    #[test]
    fn proxy_series_count_into_the_families() {
        let metrics = Metrics::new();
        let upstreams = vec!["http://a:1".to_owned(), "http://b:2".to_owned()];
        let first = ProxySeries::new(&metrics, "svc", upstreams.clone());
        first.proxied(Some(0), 200, 0.001);
        first.proxied(Some(1), 503, 0.002);
        first.proxied(None, 401, 0.0001);
        let reloaded = ProxySeries::new(&metrics, "svc", upstreams);
        reloaded.proxied(Some(0), 204, 0.001);
        reloaded.proxied(Some(7), 101, 0.001);
        let text = metrics.render(Snapshot {
            connected_agents: 0,
            socket_sessions: 0,
            store_certificates: 0,
            earliest_expiry: None,
            cluster: None,
        });
        for line in [
            r#"agentgate_proxy_requests_total{route="svc",status_class="2xx",upstream="http://a:1"} 2"#,
            r#"agentgate_proxy_requests_total{route="svc",status_class="5xx",upstream="http://b:2"} 1"#,
            r#"agentgate_proxy_requests_total{route="svc",status_class="4xx",upstream="-"} 1"#,
            r#"agentgate_proxy_requests_total{route="svc",status_class="1xx",upstream="-"} 1"#,
            r#"agentgate_proxy_request_duration_seconds_count{route="svc"} 5"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains(r#"status_class="3xx""#), "{text}");
        assert_eq!(
            text.matches("agentgate_proxy_requests_total{").count(),
            4,
            "{text}"
        );
    }
}
