//! Commands from the API to an agent: an event emitted with an acknowledgement and a
//! timeout, to the agent's newest live session on this node, or, in a cluster, to the
//! agent's room (`agent:<id>`) on every other node through Redis.

use std::time::Duration;

use serde_json::Value;
use socketioxide::{AckError, SendError};

use super::{AgentIo, Agents, ClusterLink, agent_room};
use crate::cluster;
use crate::identity::AgentId;

/// Socket.IO's own event names plus ours: an agent must never receive one of these as a
/// command (the client library treats the first group specially, the second is protocol).
pub const RESERVED_EVENTS: [&str; 10] = [
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
    "heartbeat",
    "heartbeat_ack",
    "error",
    "server_shutdown",
];

/// Longest event name accepted.
pub const MAX_EVENT_LEN: usize = 128;

/// Bounds of a command's acknowledgement timeout.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("agent '{0}' is not connected")]
    NotConnected(AgentId),
    #[error("agent '{agent_id}' did not acknowledge '{event}' within {timeout_ms} ms")]
    Timeout {
        agent_id: AgentId,
        event: String,
        timeout_ms: u128,
    },
    /// The agent is not on this node, and Redis (the way to the others) is unreachable.
    #[error(
        "agent '{agent_id}' is not connected to this node, and the other nodes cannot be reached: {reason}"
    )]
    ClusterUnavailable { agent_id: AgentId, reason: String },
    #[error("could not deliver '{event}' to agent '{agent_id}': {reason}")]
    Failed {
        agent_id: AgentId,
        event: String,
        reason: DeliveryError,
    },
}

/// Why Socket.IO could not carry a command or its acknowledgement.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Send(#[from] SendError),
    #[error(transparent)]
    Ack(#[from] AckError),
}

/// An event name the API refuses to emit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventNameError {
    #[error("event name must not be empty")]
    Empty,
    #[error("event name is longer than {MAX_EVENT_LEN} characters")]
    TooLong,
    #[error("event name must not contain control characters")]
    ControlCharacter,
    #[error("event name '{0}' is reserved")]
    Reserved(String),
}

impl CommandError {
    /// The label used in fan-out results and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::NotConnected(_) => "not_connected",
            Self::Timeout { .. } => "timeout",
            Self::ClusterUnavailable { .. } => "cluster_unavailable",
            Self::Failed { .. } => "failed",
        }
    }
}

/// Checks an event name from the API: printable, bounded, not reserved.
pub fn check_event_name(event: &str) -> Result<(), EventNameError> {
    if event.is_empty() {
        return Err(EventNameError::Empty);
    }
    if event.chars().count() > MAX_EVENT_LEN {
        return Err(EventNameError::TooLong);
    }
    if event.chars().any(char::is_control) {
        return Err(EventNameError::ControlCharacter);
    }
    if RESERVED_EVENTS.contains(&event) {
        return Err(EventNameError::Reserved(event.to_owned()));
    }
    Ok(())
}

/// Where a command went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A session on this node.
    Local,
    /// Through Redis to another node.
    Remote,
}

/// Emits `event` with `data` to `agent_id` and waits up to `timeout` for its
/// acknowledgement: to its newest session on this node if it has one (no Redis involved,
/// so this works during a Redis outage), else, in a cluster, to its room on the others.
pub(super) async fn send(
    agents: &Agents,
    agent_id: &AgentId,
    event: &str,
    data: &Value,
    timeout: Duration,
) -> (Route, Result<Value, CommandError>) {
    // The newest session first: an agent that reconnected may briefly have two.
    for sid in agents
        .registry
        .sessions_of(agent_id, None)
        .into_iter()
        .rev()
    {
        if let Some(sent) = agents.io.emit_with_ack_to(sid, event, data, timeout).await {
            return (Route::Local, local_result(agent_id, event, timeout, sent));
        }
    }
    match (&agents.io, &agents.cluster) {
        (AgentIo::Cluster(io), Some(link)) => (
            Route::Remote,
            send_remote(io, link, agent_id, event, data, timeout).await,
        ),
        _ => (
            Route::Local,
            Err(CommandError::NotConnected(agent_id.clone())),
        ),
    }
}

fn local_result(
    agent_id: &AgentId,
    event: &str,
    timeout: Duration,
    sent: Result<Result<Value, AckError>, SendError>,
) -> Result<Value, CommandError> {
    let failed = |reason: DeliveryError| CommandError::Failed {
        agent_id: agent_id.clone(),
        event: event.to_owned(),
        reason,
    };
    match sent {
        Err(e) => Err(failed(e.into())),
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(AckError::Timeout)) => Err(timed_out(agent_id, event, timeout)),
        Ok(Err(AckError::Socket(_))) => Err(CommandError::NotConnected(agent_id.clone())),
        Ok(Err(e)) => Err(failed(e.into())),
    }
}

fn timed_out(agent_id: &AgentId, event: &str, timeout: Duration) -> CommandError {
    CommandError::Timeout {
        agent_id: agent_id.clone(),
        event: event.to_owned(),
        timeout_ms: timeout.as_millis(),
    }
}

/// The agent's room on every other node. An agent connected nowhere is told apart from
/// one that did not answer without waiting: every node answers with the number of
/// sockets it reached, and the collector ends once all have ([`cluster::ack`]).
async fn send_remote(
    io: &socketioxide::SocketIo<super::ClusterAdapter>,
    link: &ClusterLink,
    agent_id: &AgentId,
    event: &str,
    data: &Value,
    timeout: Duration,
) -> Result<Value, CommandError> {
    let unavailable = |reason: String| CommandError::ClusterUnavailable {
        agent_id: agent_id.clone(),
        reason,
    };
    if !link.status.is_connected() {
        return Err(unavailable("Redis is unreachable".into()));
    }
    let collected =
        cluster::emit_with_ack::<_, _, Value>(io.to(agent_room(agent_id)), event, data, timeout)
            .await
            .map_err(|e| unavailable(format!("Redis request failed: {e}")))?;
    if collected.is_empty_room() {
        return Err(CommandError::NotConnected(agent_id.clone()));
    }
    let mut last_error = None;
    for (_, answer) in collected.answers {
        match answer {
            Ok(reply) => return Ok(reply),
            Err(e) => last_error = Some(e),
        }
    }
    match last_error {
        Some(AckError::Socket(_)) => Err(CommandError::NotConnected(agent_id.clone())),
        Some(AckError::Timeout) | None => Err(timed_out(agent_id, event, timeout)),
        Some(e) => Err(CommandError::Failed {
            agent_id: agent_id.clone(),
            event: event.to_owned(),
            reason: e.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names() {
        assert!(check_event_name("restart_runtime").is_ok());
        assert!(check_event_name("plc:start").is_ok());
        assert_eq!(
            check_event_name("connect").unwrap_err().to_string(),
            "event name 'connect' is reserved"
        );
        assert!(check_event_name("").is_err());
        assert!(check_event_name("a\nb").is_err());
        assert!(check_event_name(&"x".repeat(129)).is_err());
    }
}
