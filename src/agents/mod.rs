//! The agent side: Socket.IO handlers (connect, heartbeat, disconnect), the registry of
//! connected agents, and the guard that binds Engine.IO sessions to TLS identities.

pub(crate) mod backpressure;
pub(crate) mod commands;
pub(crate) mod handlers;
pub(crate) mod heartbeat;
pub(crate) mod io;
pub mod registry;
pub(crate) mod session_guard;
pub(crate) mod ws_frames;

use std::str::FromStr;
use std::time::Duration;

use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use socketioxide::socket::Sid;
use socketioxide::{SocketIoBuilder, TransportType};
use socketioxide_redis::{RedisAdapterConfig, RedisAdapterCtr};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::cluster::fleet::Fleet;
use crate::cluster::{DriverConfig, DriverError, DriverStatus, RedisDriver, Topology};
use crate::config::{ClusterConfig, ClusterMode, Config};
use crate::identity::{AgentId, Fingerprint};
use crate::metrics::Metrics;
pub use io::{AgentIo, AgentsLayer, ClusterAdapter};
pub use registry::AgentRegistry;
pub use session_guard::SessionBindings;

/// Initial read buffer of each WebSocket (engineioxide's default is 4 KiB). Agents send
/// heartbeats of about 100 bytes, and the buffer grows for a larger message, so a small
/// one saves memory on every connected agent (BENCHMARKS.md, "Memory per agent").
const WS_READ_BUFFER: usize = 1024;

/// How long a node waits for the other nodes' answers to a cluster request (socketioxide-
/// redis' `request_timeout`); the ack collector ends earlier once every answer is in.
const CLUSTER_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether Socket.IO clients without an agent certificate may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnonymousAgents {
    /// The production rule: no certificate, no socket.
    Deny,
    /// Development only; every such connect is logged as a warning.
    AllowWithWarning,
}

/// Cheap-to-clone handle on everything agent-facing.
#[derive(Clone)]
pub struct Agents {
    pub io: AgentIo,
    pub registry: AgentRegistry,
    pub bindings: SessionBindings,
    pub metrics: Metrics,
    /// Set with `[cluster]`: the Redis link and the view of the other nodes.
    pub cluster: Option<ClusterLink>,
}

/// What a clustered node knows of the others.
#[derive(Clone)]
pub struct ClusterLink {
    pub node_id: String,
    pub fleet: Fleet,
    pub status: DriverStatus,
    pub driver: RedisDriver,
}

/// Why a clustered node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterStartError {
    #[error("cannot reach Redis at {url} (key `cluster.redis_url`): {source}")]
    Connect { url: String, source: DriverError },
    #[error("Socket.IO namespace on Redis: {0}")]
    Namespace(String),
}

/// The name of the room every session of an agent joins, on whatever node.
pub fn agent_room(agent_id: &AgentId) -> String {
    format!("agent:{agent_id}")
}

/// What the Socket.IO handlers share (socketioxide state).
#[derive(Clone)]
pub struct AgentsState {
    pub registry: AgentRegistry,
    pub bindings: SessionBindings,
    /// Replies waiting for room in their session's send buffer.
    pub(crate) outboxes: backpressure::Outboxes,
    pub anonymous: AnonymousAgents,
    pub metrics: Metrics,
    /// Events per agent per window (`limits.agent_events`): past it, every session of the
    /// agent is disconnected.
    pub(crate) event_rate: crate::limits::FailureWindow<EventSource>,
}

/// Whose events [`AgentsState::event_rate`] counts: an agent over all its sessions, so
/// that opening more sessions does not multiply its budget; an anonymous session (the
/// development switch) alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum EventSource {
    Agent(AgentId),
    Session(Sid),
}

impl AgentsState {
    fn new(config: &Config, metrics: Metrics, clock: Clock) -> Self {
        let bindings = SessionBindings::default();
        AgentsState {
            event_rate: crate::limits::FailureWindow::new(
                config.limits.agent_events,
                config.limits.agent_event_window,
            ),
            metrics,
            registry: AgentRegistry::new(clock, config.agents.stale_after),
            bindings: bindings.clone(),
            outboxes: backpressure::Outboxes::new(
                bindings,
                config.limits.session_reply_queue,
                config.limits.session_send_buffer,
            ),
            anonymous: if config.allow_anonymous_agents {
                AnonymousAgents::AllowWithWarning
            } else {
                AnonymousAgents::Deny
            },
        }
    }

    fn into_agents(self, io: AgentIo, cluster: Option<ClusterLink>) -> Agents {
        Agents {
            io,
            registry: self.registry,
            bindings: self.bindings,
            metrics: self.metrics,
            cluster,
        }
    }
}

fn builder<A: Adapter>(config: &Config, builder: SocketIoBuilder<A>) -> SocketIoBuilder<A> {
    builder
        .ping_interval(config.socketio.ping_interval)
        .ping_timeout(config.socketio.ping_timeout)
        .max_payload(config.limits.max_packet_bytes)
        // engineioxide's WebSocket limits are 64 MiB a message and 16 MiB a frame,
        // whatever `max_payload` says (it bounds polling bodies only); one limit for
        // both transports bounds what a heartbeat can make us store.
        .ws_max_message_size(ws_limit(config.limits.max_packet_bytes))
        .ws_max_frame_size(ws_limit(config.limits.max_packet_bytes))
        .max_buffer_size(config.limits.session_send_buffer)
        .ws_read_buffer_size(WS_READ_BUFFER)
}

impl Agents {
    /// Builds the Socket.IO layer (to mount on the router) and the handle for one node;
    /// the registry stamps connects and heartbeats with `clock`.
    pub fn build(config: &Config, metrics: Metrics, clock: Clock) -> (AgentsLayer, Agents) {
        let state = AgentsState::new(config, metrics, clock);
        let (layer, io) = builder(config, SocketIo::builder())
            .with_state(state.clone())
            .build_layer();
        // With the local adapter, initialising a namespace cannot fail or wait.
        io.ns(
            "/",
            handlers::on_connect
                .with(handlers::register::<socketioxide::adapter::LocalAdapter>)
                .with(handlers::authenticate),
        );
        (
            AgentsLayer::Local(layer),
            state.into_agents(AgentIo::Local(io), None),
        )
    }

    /// [`Agents::build`] for a node of a cluster: connects to Redis (failing at once when
    /// it is unreachable, so a node never starts half-clustered) and puts Socket.IO on
    /// socketioxide-redis.
    pub async fn build_clustered(
        config: &Config,
        cluster: &ClusterConfig,
        metrics: Metrics,
        clock: Clock,
    ) -> Result<(AgentsLayer, Agents), ClusterStartError> {
        let topology = match cluster.mode {
            ClusterMode::Standalone => Topology::Standalone(cluster.redis_url.clone()),
            ClusterMode::Cluster => Topology::Cluster(vec![cluster.redis_url.clone()]),
        };
        let driver = RedisDriver::connect(&topology, &DriverConfig::default())
            .await
            .map_err(|source| ClusterStartError::Connect {
                url: cluster.redis_url.redacted(),
                source,
            })?;
        let state = AgentsState::new(config, metrics, clock);
        let adapter = RedisAdapterCtr::new_with_driver(
            driver.clone(),
            RedisAdapterConfig::new().with_request_timeout(CLUSTER_REQUEST_TIMEOUT),
        );
        let (layer, io) = builder(config, SocketIo::builder())
            .with_adapter::<ClusterAdapter>(adapter)
            .with_state(state.clone())
            .build_layer();
        // With a remote adapter the namespace exists only once this resolves (DESIGN.md).
        io.ns(
            "/",
            handlers::on_connect
                .with(handlers::register::<ClusterAdapter>)
                .with(handlers::authenticate),
        )
        .await
        .map_err(|e| ClusterStartError::Namespace(e.to_string()))?;
        let link = ClusterLink {
            node_id: cluster.node_id.clone(),
            fleet: Fleet::new(cluster.node_id.clone(), state.registry.clock().now()),
            status: driver.status(),
            driver,
        };
        Ok((
            AgentsLayer::Cluster(layer),
            state.into_agents(AgentIo::Cluster(io), Some(link)),
        ))
    }

    /// Disconnects the live sessions of `agent_id` that authenticated with `fingerprint`
    /// (or all of them with `None`); returns how many were closed.
    pub fn disconnect_sessions(
        &self,
        agent_id: &AgentId,
        fingerprint: Option<Fingerprint>,
    ) -> usize {
        let mut closed = 0;
        for sid in self.registry.sessions_of(agent_id, fingerprint) {
            if self.io.disconnect(sid) {
                closed += 1;
            }
            // The disconnect handler removes the session; do it here too in case the
            // socket was already gone and no handler will run.
            self.registry.disconnect(Some(agent_id), sid);
            self.bindings.unbind(&sid.to_string());
        }
        closed
    }

    /// Emits `event` with `data` to `agent_id` (on this node or, in a cluster, any node)
    /// and waits for its acknowledgement.
    pub async fn command(
        &self,
        agent_id: &AgentId,
        event: &str,
        data: &serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, commands::CommandError> {
        let started = std::time::Instant::now();
        let (route, result) = commands::send(self, agent_id, event, data, timeout).await;
        let seconds = result.is_ok().then(|| started.elapsed().as_secs_f64());
        let outcome = result
            .as_ref()
            .map(|_| "ok")
            .unwrap_or_else(|e| e.outcome());
        self.metrics
            .command(outcome, route == commands::Route::Remote, seconds);
        result
    }

    /// Tells every connected socket that the server is going away. The server then cuts
    /// the connections (see `crate::killable`) so that clients reconnect by themselves.
    ///
    /// A socket whose send buffer is full is tried again for up to `within`; one that
    /// still has no room is logged and counted (`agentgate_emits_undelivered_total`), not
    /// skipped silently.
    pub async fn notify_shutdown(&self, reason: &str, within: Duration) {
        let notice = serde_json::json!({ "reason": reason, "reconnect": true });
        let undelivered = self
            .io
            .emit_each_local("server_shutdown", &notice, within)
            .await;
        if undelivered > 0 {
            self.metrics
                .emits_undelivered("server_shutdown", undelivered as u64);
            tracing::warn!(
                undelivered,
                "server_shutdown notice not delivered: those sessions' send buffers stayed full"
            );
        }
    }

    /// The transport a live session uses now (it changes on upgrade).
    pub fn transport_of(&self, sid: Sid) -> Option<TransportType> {
        self.io.transport_of(sid)
    }

    /// Periodically forgets session bindings of Engine.IO sessions that are gone.
    pub fn spawn_binding_pruner(&self, shutdown: CancellationToken, max_age: Duration) {
        let agents = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(max_age);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                let io = agents.io.clone();
                let alive = |sid: &str| Sid::from_str(sid).is_ok_and(|sid| io.is_alive(sid));
                let pruned = agents.bindings.prune(max_age, alive);
                if pruned > 0 {
                    tracing::debug!(pruned, "pruned bindings of ended Socket.IO sessions");
                }
            }
        });
    }
}

/// `limits.max_packet_bytes` as the WebSocket message limit (a `usize`; saturates on targets
/// where it does not fit, where the limit would be moot anyway).
fn ws_limit(max_payload: u64) -> usize {
    usize::try_from(max_payload).unwrap_or(usize::MAX)
}

use socketioxide::handler::ConnectHandler as _;
