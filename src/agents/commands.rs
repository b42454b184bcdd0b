//! Commands from the API to an agent: an event emitted with an acknowledgement and a
//! timeout, to the agent's newest live session.

use std::time::Duration;

use serde_json::Value;
use socketioxide::{AckError, SendError};

use super::Agents;
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

/// Emits `event` with `data` to the newest live session of `agent_id` and waits up to
/// `timeout` for its acknowledgement.
pub(super) async fn send(
    agents: &Agents,
    agent_id: &AgentId,
    event: &str,
    data: &Value,
    timeout: Duration,
) -> Result<Value, CommandError> {
    let failed = |reason: DeliveryError| CommandError::Failed {
        agent_id: agent_id.clone(),
        event: event.to_owned(),
        reason,
    };
    // The newest session: an agent that reconnected may briefly have two.
    let socket = agents
        .registry
        .sessions_of(agent_id, None)
        .into_iter()
        .rev()
        .find_map(|sid| agents.io.get_socket(sid))
        .ok_or_else(|| CommandError::NotConnected(agent_id.clone()))?;
    let ack = socket
        .timeout(timeout)
        .emit_with_ack::<_, Value>(event, data)
        .map_err(|e| failed(e.into()))?;
    match ack.await {
        Ok(reply) => Ok(reply),
        Err(AckError::Timeout) => Err(CommandError::Timeout {
            agent_id: agent_id.clone(),
            event: event.to_owned(),
            timeout_ms: timeout.as_millis(),
        }),
        Err(AckError::Socket(_)) => Err(CommandError::NotConnected(agent_id.clone())),
        Err(e) => Err(failed(e.into())),
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
