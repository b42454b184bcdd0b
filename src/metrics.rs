//! Prometheus metrics (`GET /metrics`, text format), with prometheus-client.
//!
//! Counters are bumped where things happen; gauges that describe state (connected agents,
//! store size, earliest certificate expiry) are read from their owners at scrape time, so
//! they can never drift from the truth.

use std::sync::Arc;

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
pub struct HttpLabels {
    pub method: String,
    pub route: String,
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
    commands: Family<OutcomeLabels, Counter>,
    command_seconds: Histogram,
    http_requests: Family<HttpLabels, Counter>,
    connected_agents: Gauge,
    socket_sessions: Gauge,
    store_certificates: Gauge,
    earliest_expiry: Gauge,
    proxy_requests: Family<ProxyLabels, Counter>,
    proxy_seconds: Family<RouteLabels, Histogram>,
    upstream_healthy: Family<UpstreamLabels, Gauge>,
}

/// State read at scrape time.
pub struct Snapshot {
    pub connected_agents: i64,
    pub socket_sessions: i64,
    pub store_certificates: i64,
    /// Unix seconds of the earliest `notAfter` in the store, if it is not empty.
    pub earliest_expiry: Option<i64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
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
        Self {
            inner: Arc::new(Inner {
                proxy_requests,
                proxy_seconds,
                upstream_healthy,
                registry,
                handshakes,
                heartbeats,
                commands,
                command_seconds,
                http_requests,
                connected_agents,
                socket_sessions,
                store_certificates,
                earliest_expiry,
            }),
        }
    }

    pub fn handshake(&self, result: &'static str, reason: &'static str) {
        self.inner
            .handshakes
            .get_or_create(&HandshakeLabels { result, reason })
            .inc();
    }

    pub fn heartbeat(&self) {
        self.inner.heartbeats.inc();
    }

    pub fn command(&self, outcome: &'static str, seconds: Option<f64>) {
        self.inner
            .commands
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        if let Some(s) = seconds {
            self.inner.command_seconds.observe(s);
        }
    }

    pub fn http_request(&self, method: &str, route: &str, status: u16) {
        let labels = HttpLabels {
            method: method.to_owned(),
            route: route.to_owned(),
            status,
        };
        self.inner.http_requests.get_or_create(&labels).inc();
    }

    /// One proxied request, counted when its response head is sent.
    pub fn proxied(&self, route: &str, status: u16, upstream: &str, seconds: f64) {
        let status_class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.inner
            .proxy_requests
            .get_or_create(&ProxyLabels {
                route: route.to_owned(),
                status_class,
                upstream: upstream.to_owned(),
            })
            .inc();
        self.inner
            .proxy_seconds
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(seconds);
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
        let mut out = String::new();
        // Encoding into a String only fails if fmt::Write fails, which String never does.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}
