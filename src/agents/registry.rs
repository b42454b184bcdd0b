//! Who is connected: one entry per agent with its live Socket.IO sessions and its last
//! heartbeat. Kept after the last session ends so the API can show when an agent was last
//! seen; removed with the agent's certificate.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;
use socketioxide::socket::Sid;
use time::OffsetDateTime;

use crate::identity::{AgentId, Fingerprint};

/// Cheap-to-clone handle on the registry.
#[derive(Debug, Clone, Default)]
pub struct AgentRegistry {
    /// A std Mutex: held only for map updates, never across an `.await`.
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    agents: HashMap<AgentId, AgentState>,
    anonymous: HashMap<Sid, Session>,
}

#[derive(Debug, Clone, Default)]
pub struct AgentState {
    pub sessions: Vec<Session>,
    pub last_heartbeat: Option<Heartbeat>,
    /// When the last session ended, if none is live.
    pub disconnected_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub sid: Sid,
    /// The certificate the session authenticated with (`None` for anonymous sessions).
    pub fingerprint: Option<Fingerprint>,
    pub remote_addr: SocketAddr,
    pub connected_at: OffsetDateTime,
}

#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub received_at: OffsetDateTime,
    pub payload: Value,
}

impl AgentRegistry {
    pub fn connect(&self, agent_id: Option<&AgentId>, session: Session) {
        let mut inner = self.lock();
        match agent_id {
            Some(id) => {
                let state = inner.agents.entry(id.clone()).or_default();
                state.disconnected_at = None;
                state.sessions.push(session);
            }
            None => {
                inner.anonymous.insert(session.sid, session);
            }
        }
    }

    pub fn disconnect(&self, agent_id: Option<&AgentId>, sid: Sid) {
        let mut inner = self.lock();
        match agent_id {
            Some(id) => {
                if let Some(state) = inner.agents.get_mut(id) {
                    state.sessions.retain(|s| s.sid != sid);
                    if state.sessions.is_empty() {
                        state.disconnected_at = Some(OffsetDateTime::now_utc());
                    }
                }
            }
            None => {
                inner.anonymous.remove(&sid);
            }
        }
    }

    pub fn heartbeat(&self, agent_id: &AgentId, heartbeat: Heartbeat) {
        if let Some(state) = self.lock().agents.get_mut(agent_id) {
            state.last_heartbeat = Some(heartbeat);
        }
    }

    pub fn get(&self, agent_id: &AgentId) -> Option<AgentState> {
        self.lock().agents.get(agent_id).cloned()
    }

    /// Sessions of `agent_id` that authenticated with `fingerprint`, or with any
    /// certificate when `fingerprint` is `None`.
    pub fn sessions_of(&self, agent_id: &AgentId, fingerprint: Option<Fingerprint>) -> Vec<Sid> {
        self.lock()
            .agents
            .get(agent_id)
            .map(|state| {
                state
                    .sessions
                    .iter()
                    .filter(|s| fingerprint.is_none() || s.fingerprint == fingerprint)
                    .map(|s| s.sid)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forgets an agent entirely (its certificate was deleted).
    pub fn forget(&self, agent_id: &AgentId) {
        self.lock().agents.remove(agent_id);
    }

    /// Number of agents with at least one live session.
    pub fn connected_agents(&self) -> usize {
        self.lock()
            .agents
            .values()
            .filter(|s| !s.sessions.is_empty())
            .count()
    }

    pub fn anonymous_sessions(&self) -> usize {
        self.lock().anonymous.len()
    }

    /// A copy of every agent entry, for listings.
    pub fn snapshot(&self) -> Vec<(AgentId, AgentState)> {
        let mut all: Vec<_> = self
            .lock()
            .agents
            .iter()
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section is a single map update, so a panic inside one cannot leave
        // the maps half-changed; keep serving rather than poison every later call.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
