//! Socket.IO handlers for namespace `/`: who may connect, heartbeats, disconnects.

use std::fmt;
use std::sync::Arc;

use serde_json::{Value, json};
use socketioxide::ParserError;
use socketioxide::SocketError;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{MaybeHttpExtension, SocketRef, State, TryData};
use socketioxide::handler::{FromMessageParts, MessageHandler, Value as ParserValue};
use socketioxide::socket::{DisconnectReason, Socket};

use super::backpressure::ReadGate;
use super::heartbeat;
use super::registry::{Heartbeat, Session};
use super::{AgentsState, AnonymousAgents, EventSource};
use crate::clock::rfc3339;
use crate::identity::{AgentIdentity, Peer};

/// Why a Socket.IO connect was refused; the client receives the text as its
/// `connect_error` message.
#[derive(Debug)]
pub enum ConnectRefused {
    NoCertificate,
}

impl fmt::Display for ConnectRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoCertificate => {
                "agent certificate required: connect with the client certificate uploaded for this agent"
            }
        })
    }
}

/// Connect middleware: an agent identity from the TLS handshake, or the development switch.
pub async fn authenticate(
    MaybeHttpExtension(peer): MaybeHttpExtension<Peer>,
    State(state): State<AgentsState>,
) -> Result<(), ConnectRefused> {
    let remote = peer.as_ref().map(|p| p.remote_addr);
    match peer.and_then(|p| p.identity) {
        Some(_) => Ok(()),
        None => match state.anonymous {
            AnonymousAgents::AllowWithWarning => {
                tracing::warn!(
                    ?remote,
                    "anonymous Socket.IO client connected (allow_anonymous_agents = true)"
                );
                Ok(())
            }
            AnonymousAgents::Deny => {
                tracing::info!(
                    ?remote,
                    "refused Socket.IO connect without an agent certificate"
                );
                Err(ConnectRefused::NoCertificate)
            }
        },
    }
}

/// Connect middleware, run after [`authenticate`]: registers the session, joins the
/// agent's room (`agent:<id>`, which commands from any node address) and installs the
/// event handlers. Generic over the adapter: the same code runs on one node and in a
/// cluster.
///
/// A middleware, not the connect handler, because of the order socketioxide keeps:
/// middlewares run before it sends the client its namespace CONNECT packet, the handler
/// after, in a task of its own. Done in the handler, an agent that emits as soon as it is
/// connected (python-socketio agents send their first heartbeat then) could have that
/// event read before the handler had run: no `heartbeat` handler yet, the event dropped
/// unanswered, and the session unregistered for a while. On a busy machine that lost
/// about 1 first heartbeat in 60 connects (tests/cli.rs).
pub async fn register<A: Adapter>(
    socket: SocketRef<A>,
    MaybeHttpExtension(peer): MaybeHttpExtension<Peer>,
    State(state): State<AgentsState>,
) -> Result<(), ConnectRefused> {
    let Some(peer) = peer else {
        // Every request gets a Peer from the server; a socket without one cannot exist.
        return Ok(());
    };
    let identity = peer.identity.clone();
    state.registry.connect(
        identity.as_ref().map(|i| &i.agent_id),
        Session {
            sid: socket.id,
            fingerprint: identity.as_ref().map(|i| i.fingerprint),
            remote_addr: peer.remote_addr,
            connected_at: state.registry.clock().now(),
        },
    );
    if let Some(id) = &identity {
        // A local operation on every adapter: the room lives in this node's memory, and
        // the other nodes reach it through Redis requests.
        socket.join(super::agent_room(&id.agent_id));
    }
    match &identity {
        Some(id) => tracing::info!(
            agent_id = %id.agent_id, sid = %socket.id, remote = %peer.remote_addr,
            transport = ?socket.transport_type(), "agent connected"
        ),
        None => {
            tracing::info!(sid = %socket.id, remote = %peer.remote_addr, "anonymous client connected")
        }
    }
    socket.on("heartbeat", OnHeartbeat);
    socket.on_disconnect(on_disconnect::<A>);
    Ok(())
}

/// The connect handler: [`authenticate`] and [`register`] did everything before the
/// client was told it is connected.
pub async fn on_connect() {}

/// The `heartbeat` handler, run inline where socketioxide would spawn a task.
///
/// socketioxide 0.18 accepts only async handler functions and spawns a tokio task for
/// every event they handle; this one never awaits, and the spawn was 5 % of the
/// heartbeat path's instructions under callgrind (BENCHMARKS.md). Implementing
/// [`MessageHandler`] ourselves runs it on the connection's own task, with the same
/// extractors.
#[derive(Clone, Copy)]
struct OnHeartbeat;

/// Marks our [`MessageHandler`] implementation apart from socketioxide's blanket ones.
struct Inline;

impl<A: Adapter> MessageHandler<A, Inline> for OnHeartbeat {
    fn call(&self, s: Arc<Socket<A>>, mut v: ParserValue, ack_id: Option<i64>) {
        // None of these extractors fails (the state is always set, `TryData` carries a
        // parse error as a value); should one, the event is dropped, as socketioxide does.
        let extracted = (|| {
            let State(state) =
                State::<AgentsState>::from_message_parts(&s, &mut v, &ack_id).ok()?;
            let MaybeHttpExtension(peer) =
                MaybeHttpExtension::<Peer>::from_message_parts(&s, &mut v, &ack_id).ok()?;
            let TryData(data) = TryData::<Value>::from_message_parts(&s, &mut v, &ack_id).ok()?;
            Some((state, peer, data))
        })();
        if let Some((state, peer, data)) = extracted {
            on_heartbeat(&s, data, peer, state, ack_id);
        }
    }
}

/// Every heartbeat is acknowledged and stored (see [`heartbeat`](super::heartbeat)); a
/// malformed one also gets an `error` event, sent first so the agent reads why before the
/// acknowledgement, and is counted. Replies that find the session's send buffer full wait
/// for room while the session is not read ([`backpressure`](super::backpressure)).
fn on_heartbeat<A: Adapter>(
    socket: &Arc<Socket<A>>,
    data: Result<Value, ParserError>,
    peer: Option<Peer>,
    state: AgentsState,
    ack_id: Option<i64>,
) {
    let identity = peer.and_then(|p| p.identity);
    // Backpressure already throttles a flood to what the agent reads of its replies; past
    // `limits.agent_events` per window, counted over all the agent's sessions, they are cut.
    let source = match &identity {
        Some(id) => EventSource::Agent(id.agent_id.clone()),
        None => EventSource::Session(socket.id),
    };
    let count = state.event_rate.count(source, std::time::Instant::now());
    if count > state.event_rate.max() {
        over_event_rate(socket, identity.as_ref(), count, &state);
        return;
    }
    let gate = || session_gate(socket, &state);
    let reading = heartbeat::read(data.map_err(|e| e.to_string()));
    if let Some(problem) = &reading.problem {
        let message = problem.message();
        tracing::debug!(sid = %socket.id, reason = %message, "malformed heartbeat");
        state.metrics.heartbeat_malformed(problem.label());
        let error = json!({ "event": "heartbeat", "message": message });
        state
            .outboxes
            .emit(socket, "error", &error, gate, &state.metrics);
    }
    let received_at = state.registry.clock().now();
    state.metrics.heartbeat();
    if let Some(id) = &identity {
        state.registry.heartbeat(
            &id.agent_id,
            Heartbeat {
                received_at,
                payload: reading.stored,
            },
        );
    }
    let reply = HeartbeatAck {
        status: "ok",
        agent_id: identity.as_ref().map(|i| i.agent_id.as_str()),
        received_at: rfc3339(received_at),
    };
    state
        .outboxes
        .emit(socket, "heartbeat_ack", &reply, gate, &state.metrics);
    // Agents that emit with a callback get the same reply as their acknowledgement.
    state
        .outboxes
        .ack(socket, ack_id, &reply, gate, &state.metrics);
}

/// An event past `limits.agent_events`: dropped, and its session ended. The first one of
/// the window is logged and counted, and ends every session of the agent on this node
/// (the others of the window meet a session of it opened since, or one already closing).
fn over_event_rate<A: Adapter>(
    socket: &Arc<Socket<A>>,
    identity: Option<&AgentIdentity>,
    count: u32,
    state: &AgentsState,
) {
    let this = SocketRef::from(socket.clone());
    if count != state.event_rate.max().saturating_add(1) {
        end_session(this, state);
        return;
    }
    state.metrics.limit_refusal("agent_events");
    let sessions = match identity {
        Some(id) => this.within(super::agent_room(&id.agent_id)).sockets(),
        None => vec![this.clone()],
    };
    tracing::warn!(
        agent_id = ?identity.map(|i| i.agent_id.as_str()), sid = %socket.id,
        sessions = sessions.len(), limit = "agent_events",
        window_secs = state.event_rate.window().as_secs(),
        "agent sent more events than limits.agent_events allows in one window; disconnecting all its sessions"
    );
    end_session(this, state);
    for other in sessions.into_iter().filter(|s| s.id != socket.id) {
        end_session(other, state);
    }
}

/// Ends a session: a Socket.IO disconnect written after the replies already in its send
/// buffer, so the agent reads every answer it was given and then why it was cut. A
/// session whose buffer is full (it floods faster than it reads) has its WebSocket's
/// connection cut instead, and a polling one is disconnected as soon as there is room.
fn end_session<A: Adapter>(socket: SocketRef<A>, state: &AgentsState) {
    if !socket.connected() {
        return;
    }
    match socket.clone().disconnect() {
        Ok(()) | Err(SocketError::Closed) => {}
        Err(SocketError::InternalChannelFull) => {
            let sid = socket.id.to_string();
            if state.bindings.is_closed(&sid) {
                return;
            }
            state.bindings.close(&sid);
            match session_gate(&socket, state) {
                Some(gate) => gate.cut(),
                None => {
                    super::backpressure::disconnect(socket);
                }
            }
        }
    }
}

/// The connection a session's WebSocket runs on: recorded by the session guard when the
/// session upgraded from polling, or the connection that opened it over WebSocket. A
/// polling session has none.
fn session_gate<A: Adapter>(socket: &Socket<A>, state: &AgentsState) -> Option<ReadGate> {
    if let Some(gate) = state.bindings.gate_of(&socket.id.to_string()) {
        return Some(gate);
    }
    let parts = socket.req_parts();
    let opened_over_websocket = parts
        .uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "transport=websocket"));
    opened_over_websocket
        .then(|| parts.extensions.get::<ReadGate>().cloned())
        .flatten()
}

/// `heartbeat_ack`: serialized straight from this struct rather than through a
/// `serde_json::Value` map built and dropped for every heartbeat.
#[derive(serde::Serialize)]
struct HeartbeatAck<'a> {
    status: &'static str,
    agent_id: Option<&'a str>,
    received_at: String,
}

async fn on_disconnect<A: Adapter>(
    socket: SocketRef<A>,
    reason: DisconnectReason,
    MaybeHttpExtension(peer): MaybeHttpExtension<Peer>,
    State(state): State<AgentsState>,
) {
    let identity = peer.and_then(|p| p.identity);
    state
        .registry
        .disconnect(identity.as_ref().map(|i| &i.agent_id), socket.id);
    state.bindings.unbind(&socket.id.to_string());
    state.outboxes.forget(socket.id);
    // An agent's count outlives its sessions (a reconnect does not start a new budget);
    // an anonymous session's ends with it.
    state.event_rate.forget(&EventSource::Session(socket.id));
    match identity {
        Some(id) => {
            tracing::info!(agent_id = %id.agent_id, sid = %socket.id, %reason, "agent disconnected")
        }
        None => tracing::info!(sid = %socket.id, %reason, "anonymous client disconnected"),
    }
}
