//! The gateway: its listeners (TLS, and optionally the plain-HTTP redirect and metrics
//! ones, all on [`crate::listener`]), the TLS handshake under a timeout, identity attached
//! to each connection, HTTP/1.1 with upgrades served by hyper-util, and graceful shutdown
//! that drains every listener's connections.
//!
//! `Gateway::serve` takes its listener and its shutdown future as arguments, so tests
//! start it on 127.0.0.1:0 and stop it when they like (mini-redis `server::run`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use http::HeaderName;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use rustls::pki_types::UnixTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::agents::backpressure::{Gated, ReadGate};
use crate::agents::{Agents, ClusterStartError, session_guard};
use crate::api::{self, ApiKeys, ApiTokens, AppState, MetricsExposure};
use crate::clock::Clock;
use crate::cluster::fleet::FleetTiming;
use crate::config::Config;
use crate::enroll::{EnrollError, Enrollment};
use crate::identity::{AgentIdentity, Peer};
use crate::killable::Killable;
use crate::limits::{FailureWindow, InFlight};
use crate::listener;
use crate::metrics::Metrics;
use crate::proxy::direct::Direct;
use crate::proxy::{Proxy, ProxyBuildError};
use crate::store::{CertStore, StoreError};
use crate::tls::server_cert::ServerCertError;
use crate::tls::verifier::AgentCertVerifier;
use crate::tls::{self, Accepted, Acceptor, HandshakeFailure, ServerCert};

/// Client-supplied headers that claim a TLS identity; an nginx in front of the system we
/// replace set them, and a client could forge them. Identity only comes from our handshake.
const IDENTITY_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("x-ssl-client-cert"),
    HeaderName::from_static("x-ssl-client-verify"),
];

/// Time given to the `server_shutdown` notice to be written before connections are cut.
const SHUTDOWN_NOTICE_FLUSH: Duration = Duration::from_millis(200);

/// How long a client of the metrics listener may take to send request headers (slowloris
/// protection); the main listener's is `limits.http_idle_timeout_secs`.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The embedded database of a single node, in `data_dir` (see `store::db`).
pub const DB_FILE: &str = "agentgate.db";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("certificate store {dir}: {source}")]
    Store { dir: String, source: StoreError },
    /// `[cluster]`: a node does not start without its cluster's certificates.
    #[error(
        "shared state on Redis {url} (key `cluster.redis_url`): {source}; a node of a cluster does not start without Redis"
    )]
    SharedStore { url: String, source: StoreError },
    #[error("server certificate: {0}")]
    ServerCert(#[from] ServerCertError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("enrollment state: {0}")]
    Enrollment(#[from] EnrollError),
    #[error("API tokens: {0}")]
    Tokens(StoreError),
    #[error("cluster: {0}")]
    Cluster(#[from] ClusterStartError),
    #[error("gateway: {0}")]
    Proxy(#[from] ProxyBuildError),
}

/// Everything a running gateway needs, built from a validated [`Config`].
pub struct Gateway {
    config: Config,
    store: CertStore,
    server_cert: ServerCert,
    verifier: Arc<AgentCertVerifier>,
    tls: Arc<ServerConfig>,
    agents: Agents,
    metrics: Metrics,
    state: AppState,
    app: Router,
    /// Proxied requests past the API's layers (`None` with `cors_origins`: see
    /// [`crate::proxy::direct`]).
    direct: Option<Arc<Direct>>,
    redirect: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    /// With `[cluster]`: the task publishing this node's agents and following the others.
    fleet: Option<FleetTask>,
    /// The fleet console at `/ui/` (its live feed starts with `serve`).
    console: crate::console::Console,
}

/// The fleet task; aborted when the gateway is dropped without a graceful stop (as a
/// killed process would stop publishing), told to leave the fleet on a graceful one.
struct FleetTask {
    stop: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl FleetTask {
    /// Tells the task to remove this node from the fleet and waits (bounded) for it.
    async fn leave(&mut self, deadline: tokio::time::Instant) {
        self.stop.cancel();
        if let Some(handle) = self.handle.take()
            && tokio::time::timeout_at(deadline, handle).await.is_err()
        {
            tracing::warn!("leaving the fleet outlived the grace period; this node expires");
        }
    }
}

impl Drop for FleetTask {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

impl Gateway {
    /// Loads the store and the server certificate and builds the TLS and HTTP stacks.
    /// Must be called inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        Self::start_with_clock(config, Clock::system()).await
    }

    /// [`Gateway::start`] with the clock the API, the agent registry, the enrollment store
    /// and the proxy's passive ejections read "now" from (a manual one in tests of expiry,
    /// staleness and ejection).
    pub async fn start_with_clock(config: Config, clock: Clock) -> Result<Self, StartError> {
        let metrics = match config.cluster {
            Some(_) => Metrics::clustered(),
            None => Metrics::new(),
        };
        let store = open_store(&config, &metrics).await?;
        let provider = tls::provider();
        let server_cert = ServerCert::from_config(&config, provider.clone())?;
        let verifier = Arc::new(AgentCertVerifier::new(
            store.clone(),
            provider.signature_verification_algorithms,
        ));
        let tls = tls::server_config(server_cert.resolver.clone(), verifier.clone(), provider)?;
        let enrollment = Enrollment::open(&config.data_dir, clock.clone(), store.clone()).await?;
        let tokens = ApiTokens::open(
            &store,
            &config.data_dir,
            config.jwt.hs256_secret.as_deref(),
            clock.clone(),
        )
        .await
        .map_err(StartError::Tokens)?;
        let (sio_layer, agents) = match &config.cluster {
            None => Agents::build(&config, metrics.clone(), clock.clone()),
            Some(cluster) => {
                Agents::build_clustered(&config, cluster, metrics.clone(), clock.clone()).await?
            }
        };
        let fleet = match (&agents.cluster, &config.cluster) {
            (Some(link), Some(cluster)) => {
                let stop = CancellationToken::new();
                let timing = FleetTiming {
                    publish_interval: cluster.publish_interval,
                    node_timeout: cluster.node_timeout,
                };
                let handle = link
                    .fleet
                    .spawn(
                        link.driver.clone(),
                        agents.registry.clone(),
                        timing,
                        stop.clone(),
                    )
                    .await
                    .map_err(|e| ClusterStartError::Connect {
                        url: cluster.redis_url.redacted(),
                        source: e,
                    })?;
                tracing::info!(
                    node_id = %cluster.node_id, redis = %cluster.redis_url.redacted(),
                    mode = ?cluster.mode, "joined the cluster"
                );
                Some(FleetTask {
                    stop,
                    handle: Some(handle),
                })
            }
            _ => None,
        };
        close_revoked_sessions(&store, &agents);
        let api_keys = ApiKeys::new(
            &config.api_keys,
            crate::limits::FailureWindow::new(
                config.limits.api_key_failures,
                config.limits.api_key_failure_window,
            ),
        );
        let proxy = Proxy::new_with_clock(
            &config,
            api_keys.clone(),
            store.revocations().clone(),
            metrics.clone(),
            clock.clone(),
        )?;
        let hooked = proxy.clone();
        crate::store::routes::attach(&store, move |routes| hooked.set_runtime_routes(routes))
            .await
            .map_err(|source| StartError::Store {
                dir: config.store.dir.display().to_string(),
                source,
            })?;
        let state = AppState {
            store: store.clone(),
            agents: agents.clone(),
            api_keys,
            metrics: metrics.clone(),
            enrollment,
            tokens,
            server_cert: server_cert.clone(),
            clock,
            requests: TaskTracker::new(),
            proxy,
            body_limits: config.limits.body,
        };
        let exposure = match config.metrics_listen {
            Some(_) => MetricsExposure::SeparateListener,
            None => MetricsExposure::MainListener,
        };
        // `.layer` wraps what is already there, so the last layer added runs first. A
        // request meets, in order: `observe` (metrics, access log, in-flight tracking, so
        // every request is counted, refused ones too), `json_errors` (every 4xx and 5xx
        // below leaves as `{"detail": ...}`), the request head limits (414, 431), the
        // Engine.IO packet limit (413, before the guard reads a polling body), the session
        // guard (a `/socket.io/` request carrying a `sid` must come from the identity that
        // opened the session), the Socket.IO layer (which answers
        // `/socket.io/` itself), and then the API router (see `api::router` for the layers
        // inside it).
        let console = crate::console::Console::new(config.console, state.clock.clone(), &store);
        let app = sio_layer
            .wrap(
                api::router(state.clone(), &config.cors_origins, exposure)
                    .merge(crate::console::router(console.clone(), state.clone())),
            )
            .layer(axum::middleware::from_fn_with_state(
                agents.bindings.clone(),
                session_guard::guard,
            ))
            .layer(axum::middleware::from_fn_with_state(
                session_guard::PacketLimit {
                    bytes: config.limits.max_packet_bytes,
                    refusals: crate::limits::Refusals::new(metrics.clone()),
                },
                session_guard::packet_limit,
            ))
            .layer(axum::middleware::from_fn_with_state(
                api::head_limits::HeadCheck {
                    limits: config.limits.head,
                    metrics: metrics.clone(),
                },
                api::head_limits::check_head,
            ))
            .layer(axum::middleware::from_fn(api::json_errors))
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                api::observe,
            ));
        let direct = config.cors_origins.is_empty().then(|| {
            Arc::new(Direct::new(
                state.proxy.clone(),
                api::head_limits::HeadCheck {
                    limits: config.limits.head,
                    metrics: metrics.clone(),
                },
                state.requests.clone(),
                metrics.clone(),
                api::router::security_header_values(server_cert.is_self_signed()),
            ))
        });
        Ok(Self {
            config,
            store,
            server_cert,
            verifier,
            tls,
            agents,
            metrics,
            state,
            app,
            direct,
            redirect: None,
            metrics_listener: None,
            fleet,
            console,
        })
    }

    /// Also serves `listener` as the plain-HTTP listener of `metrics_listen` (`GET /metrics`
    /// only).
    pub fn with_metrics_listener(mut self, listener: TcpListener) -> Self {
        self.metrics_listener = Some(listener);
        self
    }

    /// Also serves `listener` as the plain-HTTP listener of `[http_redirect]`.
    pub fn with_redirect_listener(mut self, listener: TcpListener) -> Self {
        self.redirect = Some(listener);
        self
    }

    pub fn store(&self) -> &CertStore {
        &self.store
    }

    pub fn agents(&self) -> &Agents {
        &self.agents
    }

    pub fn server_cert(&self) -> &ServerCert {
        &self.server_cert
    }

    /// The gateway half: its routes, reloaded on SIGHUP, and its revocation set.
    pub fn proxy(&self) -> &Proxy {
        &self.state.proxy
    }

    /// Serves connections from `listener` until `shutdown` resolves, then drains.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let local = listener.local_addr()?;
        tracing::info!(
            %local, server_cert = %self.server_cert.describe(),
            anonymous_agents = ?self.agents_anonymous(), "agentgate listening"
        );
        let token = CancellationToken::new();
        let kill = CancellationToken::new();
        let tracker = TaskTracker::new();
        let ping = self.config.socketio.ping_interval + self.config.socketio.ping_timeout;
        self.agents
            .spawn_binding_pruner(token.clone(), ping.max(Duration::from_secs(60)) * 2);
        self.server_cert.spawn_background(token.clone(), &tracker);
        self.state.proxy.start_health_checks(token.child_token());
        self.store.watch_dir(token.child_token());
        self.state.tokens.spawn_purge(token.child_token());
        self.console.spawn(self.state.clone(), token.child_token());
        if let Some(redirect) = self.redirect.take() {
            // Without `[http_redirect]`, the port of the listener the caller gave.
            let https_port = self
                .config
                .http_redirect
                .as_ref()
                .map_or(local.port(), |r| r.https_port);
            tracker.spawn(crate::redirect::serve(
                redirect,
                https_port,
                self.config.max_connections,
                token.clone(),
                tracker.clone(),
            ));
        }
        if let Some(metrics) = self.metrics_listener.take() {
            tracker.spawn(serve_metrics(
                metrics,
                api::metrics_router(self.state.clone()),
                self.config.max_connections,
                token.clone(),
                tracker.clone(),
            ));
        }
        let conn = Arc::new(ConnShared {
            acceptor: Acceptor::new(self.tls.clone(), &self.server_cert),
            handshake_timeout: self.config.handshake_timeout,
            verifier: self.verifier.clone(),
            store: self.store.clone(),
            app: self.app.clone(),
            direct: self.direct.clone(),
            shutdown: token.clone(),
            kill: kill.clone(),
            metrics: self.metrics.clone(),
            limits: SourceLimits::new(&self.config.limits),
            http_idle_timeout: self.config.limits.http_idle_timeout,
            head_limits: self.config.limits.head,
        });
        // Clients past `max_connections` wait in the listen backlog; each time the loop
        // has to wait for a slot is counted, and logged once a minute.
        let refusals = crate::limits::Refusals::new(self.metrics.clone());
        let max_connections = self.config.max_connections;
        tracker.spawn(listener::accept_loop(
            listener,
            max_connections,
            token.clone(),
            tracker.clone(),
            move || {
                refusals.refused(
                    "max_connections",
                    None,
                    &format!("{max_connections} connections served at once (max_connections); further clients wait in the listen backlog"),
                );
            },
            move |tcp, remote, permit| conn.clone().serve(tcp, remote, permit),
        ));
        shutdown.await;
        self.drain(token, kill, tracker).await;
        Ok(())
    }

    /// Graceful shutdown: no new requests; in-flight API requests finish; then every agent
    /// is told and its transport closed (so it reconnects, to another node if there is
    /// one); then connections drain. All within `shutdown_grace_secs`.
    async fn drain(
        &mut self,
        token: CancellationToken,
        kill: CancellationToken,
        tracker: TaskTracker,
    ) {
        let grace = self.config.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        tracing::info!(
            connections = tracker.len(),
            api_requests = self.state.requests.len(),
            grace_secs = grace.as_secs(),
            "shutting down: no longer accepting"
        );
        token.cancel();
        tracker.close();
        self.state.requests.close();
        if tokio::time::timeout_at(deadline, self.state.requests.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.state.requests.len(),
                "in-flight API requests outlived the grace period"
            );
        }
        let sessions = self.agents.io.local_sessions();
        self.agents
            .notify_shutdown(
                "server shutting down",
                SHUTDOWN_NOTICE_FLUSH.min(deadline - tokio::time::Instant::now()),
            )
            .await;
        // Let the notice reach the agents before their connections are cut.
        tokio::time::sleep(SHUTDOWN_NOTICE_FLUSH.min(deadline - tokio::time::Instant::now())).await;
        kill.cancel();
        if tokio::time::timeout_at(deadline, self.agents.io.close())
            .await
            .is_err()
        {
            tracing::warn!("closing agent sessions outlived the grace period");
        }
        tracing::info!(sessions, "agent sessions closed");
        if let Some(fleet) = self.fleet.as_mut() {
            fleet.leave(deadline).await;
        }
        if tokio::time::timeout_at(deadline, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = tracker.len(),
                "shutdown grace period expired; dropping connections"
            );
        }
    }

    fn agents_anonymous(&self) -> bool {
        self.config.allow_anonymous_agents
    }
}

/// The embedded store (files in `store.dir`), or the shared one on Redis with `[cluster]`.
async fn open_store(config: &Config, metrics: &Metrics) -> Result<CertStore, StartError> {
    if let Some(cluster) = &config.cluster {
        let store = CertStore::open_shared(cluster, metrics.clone())
            .await
            .map_err(|source| StartError::SharedStore {
                url: cluster.redis_url.to_string(),
                source,
            })?;
        tracing::info!(
            redis = %cluster.redis_url, node_id = %cluster.node_id, certificates = store.len(),
            "certificate store loaded from Redis (shared state)"
        );
        return Ok(store);
    }
    let db = config.data_dir.join(DB_FILE);
    let (store, skipped) =
        CertStore::open_with_db(&config.store.dir, &db).map_err(|source| StartError::Store {
            dir: config.store.dir.display().to_string(),
            source,
        })?;
    for s in &skipped {
        tracing::warn!(path = %s.path.display(), reason = %s.reason, "skipped file in certificate store");
    }
    tracing::info!(
        dir = %config.store.dir.display(), certificates = store.len(), skipped = skipped.len(),
        "certificate store loaded"
    );
    Ok(store)
}

/// A certificate replaced or deleted elsewhere (another node, a resync, or a hand edit of
/// the store directory)
/// closes this node's sessions that authenticated with it, as a local change does.
fn close_revoked_sessions(store: &CertStore, agents: &Agents) {
    let agents = agents.clone();
    store.on_remote_change(move |change| {
        let closed = agents.disconnect_sessions(&change.agent_id, Some(change.old));
        if change.new.is_none() {
            agents.registry.forget(&change.agent_id);
        }
        tracing::info!(
            agent_id = %change.agent_id, old_fingerprint = %change.old,
            deleted = change.new.is_none(), closed_sessions = closed,
            "agent certificate changed outside this node's API (another node, a resync or the store directory)"
        );
    });
}

/// What each connection task needs.
struct ConnShared {
    acceptor: Acceptor,
    handshake_timeout: Duration,
    verifier: Arc<AgentCertVerifier>,
    store: CertStore,
    app: Router,
    direct: Option<Arc<Direct>>,
    shutdown: CancellationToken,
    /// Cuts every connection's IO, upgraded ones included (see [`Killable`]).
    kill: CancellationToken,
    metrics: Metrics,
    limits: SourceLimits,
    /// `limits.http_idle_timeout_secs`.
    http_idle_timeout: Duration,
    /// `limits.max_uri_bytes`, `max_header_fields`, `max_header_bytes`.
    head_limits: api::head_limits::HeadLimits,
}

/// The `[limits]` applied to connections before and during their handshake.
struct SourceLimits {
    /// Unfinished handshakes per source (`limits.handshakes_per_source`).
    handshaking: InFlight,
    /// Sources refused for too many unfinished handshakes, logged once per minute each.
    handshaking_logged: FailureWindow,
    /// Failed handshakes per source (`limits.handshake_failures`).
    failures: FailureWindow,
}

impl SourceLimits {
    fn new(limits: &crate::config::LimitsConfig) -> Self {
        Self {
            handshaking: InFlight::new(limits.handshakes_per_source),
            handshaking_logged: FailureWindow::new(1, Duration::from_secs(60)),
            failures: FailureWindow::new(
                limits.handshake_failures,
                limits.handshake_failure_window,
            ),
        }
    }
}

impl ConnShared {
    /// Counts a failed handshake of `remote`; logs when the source reaches the limit.
    fn handshake_failed(&self, remote: SocketAddr) {
        if self
            .limits
            .failures
            .fail(remote.ip(), std::time::Instant::now())
        {
            tracing::warn!(
                source = %remote.ip(), limit = "handshake_failures",
                window_secs = self.limits.failures.window().as_secs(),
                "source reached the failed handshakes limit; its connections are closed at accept until the window ends"
            );
        }
    }

    async fn serve(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        _permit: OwnedSemaphorePermit,
    ) {
        // Closed before any TLS work: a source past its failed handshakes, or with too
        // many handshakes unfinished (silent connections that would hold a slot each
        // until the handshake timeout).
        let now = std::time::Instant::now();
        if self.limits.failures.refused(remote.ip(), now).is_some() {
            self.metrics.limit_refusal("handshake_failures");
            return;
        }
        let Some(handshaking) = self.limits.handshaking.enter(remote.ip()) else {
            self.metrics.limit_refusal("handshakes_per_source");
            if self.limits.handshaking_logged.fail(remote.ip(), now) {
                tracing::warn!(
                    source = %remote.ip(), limit = "handshakes_per_source",
                    "source has too many unfinished TLS handshakes; closing its new connections at accept (logged once a minute)"
                );
            }
            return;
        };
        let _ = tcp.set_nodelay(true);
        let tls = match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(tcp))
            .await
        {
            Ok(Ok(Accepted::Connection(tls))) => tls,
            Ok(Ok(Accepted::AcmeChallenge)) => {
                self.metrics.handshake("accepted", "acme_challenge");
                tracing::info!(peer = %remote, "answered an ACME TLS-ALPN-01 validation handshake");
                return;
            }
            Ok(Err(e)) => {
                let (kind, reason) = HandshakeFailure::classify(&e);
                self.metrics.handshake("rejected", kind.as_str());
                // A connection closed or reset before a handshake (a load balancer's TCP
                // health check, a port scan's connect) is not an attempt that failed.
                if kind != HandshakeFailure::Io {
                    self.handshake_failed(remote);
                }
                if kind.is_certificate_rejection() {
                    tracing::warn!(peer = %remote, kind = kind.as_str(), %reason, "TLS handshake rejected");
                } else {
                    tracing::debug!(peer = %remote, kind = kind.as_str(), %reason, "TLS handshake failed");
                }
                return;
            }
            Err(_) => {
                self.metrics
                    .handshake("rejected", HandshakeFailure::Timeout.as_str());
                self.handshake_failed(remote);
                tracing::debug!(peer = %remote, "TLS handshake timed out");
                return;
            }
        };
        drop(handshaking);
        // A resumed session skips the verifier, so the decision is taken again here against
        // the store as it is now: a deleted or expired certificate does not come back in
        // through a session ticket.
        let identity: Option<AgentIdentity> = match tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
        {
            None => None,
            Some(leaf) => match self.verifier.decide(leaf, UnixTime::now()) {
                Ok(identity) => Some(identity),
                Err(e) => {
                    self.metrics.handshake("rejected", "resumed_revoked");
                    tracing::warn!(peer = %remote, reason = %e, "TLS session resumed with a certificate no longer accepted; closing");
                    return;
                }
            },
        };
        self.metrics.handshake(
            "accepted",
            if identity.is_some() {
                "agent"
            } else {
                "no_certificate"
            },
        );
        // Backpressure of the Socket.IO session this connection may carry (see
        // `agents::backpressure`): the session pauses reading here when its replies wait.
        let gate = ReadGate::default();
        let this = self.clone();
        let request_gate = gate.clone();
        let peer = Peer::new(remote, None);
        let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            let headers = req.headers_mut();
            for name in &IDENTITY_HEADERS {
                headers.remove(name);
            }
            // Per request, so that a deleted or replaced certificate stops counting on a
            // connection that is kept alive.
            let identity = identity.clone().filter(|id| this.store.is_current(id));
            let peer = Peer {
                identity,
                ..peer.clone()
            };
            // A configured route's request goes straight to the proxy, the peer handed
            // over as it is; everything else (built-in endpoints, Socket.IO, the 404 of a
            // path nothing serves) through the API stack, which finds the peer and the
            // Socket.IO read gate among the request's extensions.
            let direct = this
                .direct
                .as_ref()
                .and_then(|d| Some((d.clone(), d.route_for(req.uri().path())?)));
            match direct {
                Some((direct, route)) => futures_util::future::Either::Left(async move {
                    Ok::<_, std::convert::Infallible>(direct.serve(route, req, peer).await)
                }),
                None => {
                    req.extensions_mut().insert(peer);
                    req.extensions_mut().insert(request_gate.clone());
                    futures_util::future::Either::Right(this.app.clone().oneshot(req))
                }
            }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // hyper starts this timer whenever it waits for a request head, the wait between
            // two requests of a kept-alive connection included (hyper 1.x,
            // `proto::h1::conn::poll_read_head`): it is the idle keep-alive timeout as well
            // as the slowloris bound. Upgraded connections (WebSocket) leave hyper and
            // have Engine.IO's ping timeout instead.
            .header_read_timeout(self.http_idle_timeout)
            .max_headers(self.head_limits.hyper_max_headers())
            .max_buf_size(self.head_limits.hyper_max_buf());
        let io = Gated::new(Killable::new(tls, self.kill.clone()), gate);
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        let mut conn = std::pin::pin!(conn);
        let mut cancelled = std::pin::pin!(self.shutdown.cancelled());
        let mut draining = false;
        let result = loop {
            tokio::select! {
                result = conn.as_mut() => break result,
                _ = &mut cancelled, if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        };
        if let Err(e) = result {
            let timed_out = e
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout);
            if timed_out {
                self.metrics.limit_refusal("http_idle_timeout_secs");
                tracing::debug!(peer = %remote, "connection closed: idle or request head too slow (limits.http_idle_timeout_secs)");
            } else {
                tracing::debug!(peer = %remote, error = %e, "connection ended with an error");
            }
        }
    }
}

/// The separate metrics listener: plain HTTP, `GET /metrics` only, drained like the others.
async fn serve_metrics(
    listener: TcpListener,
    router: Router,
    max_connections: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    if let Ok(local) = listener.local_addr() {
        tracing::info!(%local, "metrics listening (plain HTTP)");
    }
    let conn_shutdown = shutdown.clone();
    listener::accept_loop(
        listener,
        max_connections,
        shutdown,
        tracker,
        || {},
        move |tcp, _peer, permit| {
            let service = TowerToHyperService::new(router.clone());
            let shutdown = conn_shutdown.clone();
            async move {
                let _permit = permit;
                listener::serve_plain_http(tcp, service, HEADER_READ_TIMEOUT, shutdown).await;
            }
        },
    )
    .await;
}
