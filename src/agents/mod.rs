//! The agent side: Socket.IO handlers (connect, heartbeat, disconnect), the registry of
//! connected agents, and the guard that binds Engine.IO sessions to TLS identities.

pub(crate) mod backpressure;
pub mod commands;
pub mod handlers;
pub(crate) mod heartbeat;
pub mod registry;
pub mod session_guard;

use std::str::FromStr;
use std::time::Duration;

use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::Sid;
use socketioxide::{SocketIo, TransportType};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Config;
use crate::identity::{AgentId, Fingerprint};
use crate::metrics::Metrics;
pub use registry::AgentRegistry;
pub use session_guard::SessionBindings;

/// Initial read buffer of each WebSocket (engineioxide's default is 4 KiB). Agents send
/// heartbeats of about 100 bytes, and the buffer grows for a larger message, so a small
/// one saves memory on every connected agent (BENCHMARKS.md, "Memory per agent").
const WS_READ_BUFFER: usize = 1024;

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
    pub io: SocketIo,
    pub registry: AgentRegistry,
    pub bindings: SessionBindings,
    pub metrics: Metrics,
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
}

impl Agents {
    /// Builds the Socket.IO layer (to mount on the router) and the handle; the registry
    /// stamps connects and heartbeats with `clock`.
    pub fn build(config: &Config, metrics: Metrics, clock: Clock) -> (SocketIoLayer, Agents) {
        let bindings = SessionBindings::default();
        let state = AgentsState {
            metrics,
            registry: AgentRegistry::new(clock, config.agents.stale_after),
            bindings: bindings.clone(),
            outboxes: backpressure::Outboxes::new(bindings),
            anonymous: if config.allow_anonymous_agents {
                AnonymousAgents::AllowWithWarning
            } else {
                AnonymousAgents::Deny
            },
        };
        let (layer, io) = SocketIo::builder()
            .ping_interval(config.socketio.ping_interval)
            .ping_timeout(config.socketio.ping_timeout)
            .max_payload(config.socketio.max_payload_bytes)
            // engineioxide's WebSocket limits are 64 MiB a message and 16 MiB a frame,
            // whatever `max_payload` says (it bounds polling bodies only); one limit for
            // both transports bounds what a heartbeat can make us store.
            .ws_max_message_size(ws_limit(config.socketio.max_payload_bytes))
            .ws_max_frame_size(ws_limit(config.socketio.max_payload_bytes))
            .ws_read_buffer_size(WS_READ_BUFFER)
            .with_state(state.clone())
            .build_layer();
        io.ns("/", handlers::on_connect.with(handlers::authenticate));
        let agents = Agents {
            io,
            registry: state.registry,
            bindings: state.bindings,
            metrics: state.metrics,
        };
        (layer, agents)
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
            if let Some(socket) = self.io.get_socket(sid)
                && backpressure::disconnect(socket)
            {
                closed += 1;
            }
            // The disconnect handler removes the session; do it here too in case the
            // socket was already gone and no handler will run.
            self.registry.disconnect(Some(agent_id), sid);
            self.bindings.unbind(&sid.to_string());
        }
        closed
    }

    /// Emits `event` with `data` to `agent_id` and waits for its acknowledgement.
    pub async fn command(
        &self,
        agent_id: &AgentId,
        event: &str,
        data: &serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, commands::CommandError> {
        let started = std::time::Instant::now();
        let result = commands::send(self, agent_id, event, data, timeout).await;
        let seconds = result.is_ok().then(|| started.elapsed().as_secs_f64());
        let outcome = result
            .as_ref()
            .map(|_| "ok")
            .unwrap_or_else(|e| e.outcome());
        self.metrics.command(outcome, seconds);
        result
    }

    /// Tells every connected socket that the server is going away. The server then cuts
    /// the connections (see [`crate::killable`]) so that clients reconnect by themselves.
    ///
    /// A socket whose send buffer is full is tried again for up to `within`; one that
    /// still has no room is logged and counted (`agentgate_emits_undelivered_total`), not
    /// skipped silently.
    pub async fn notify_shutdown(&self, reason: &str, within: Duration) {
        let notice = serde_json::json!({ "reason": reason, "reconnect": true });
        let undelivered =
            backpressure::emit_each(self.io.sockets(), "server_shutdown", &notice, within).await;
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
        self.io.get_socket(sid).map(|s| s.transport_type())
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
                let alive =
                    |sid: &str| Sid::from_str(sid).is_ok_and(|sid| io.get_socket(sid).is_some());
                let pruned = agents.bindings.prune(max_age, alive);
                if pruned > 0 {
                    tracing::debug!(pruned, "pruned bindings of ended Socket.IO sessions");
                }
            }
        });
    }
}

/// `max_payload_bytes` as the WebSocket message limit (a `usize`; saturates on targets
/// where it does not fit, where the limit would be moot anyway).
fn ws_limit(max_payload: u64) -> usize {
    usize::try_from(max_payload).unwrap_or(usize::MAX)
}

use socketioxide::handler::ConnectHandler as _;
