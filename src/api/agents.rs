//! Who is connected (`GET /agents`, `GET /agents/{agent_id}`) and commands to agents
//! (`POST /agents/{agent_id}/commands`, fan-out `POST /agents/commands`).

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use futures_util::future::join_all;
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{ApiError, ApiQuery, AppState, JsonBody, PageQuery, agent_id};
use crate::agents::commands::{self, CommandError};
use crate::agents::registry::AgentState;
use crate::identity::AgentId;

/// Largest fan-out in one request.
pub const MAX_FAN_OUT: usize = 10_000;
const DEFAULT_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Connected,
    Stale,
    Disconnected,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Stale => "stale",
            Self::Disconnected => "disconnected",
        }
    }
}

/// Connected with a heartbeat (or a connect) within `stale_after`; stale when connected
/// but silent for longer; disconnected without a live session.
fn status_of(state: Option<&AgentState>, stale_after: Duration, now: OffsetDateTime) -> Status {
    let Some(state) = state.filter(|s| !s.sessions.is_empty()) else {
        return Status::Disconnected;
    };
    let last_connect = state.sessions.iter().map(|s| s.connected_at).max();
    let last_heartbeat = state.last_heartbeat.as_ref().map(|h| h.received_at);
    let last_sign_of_life = last_connect.max(last_heartbeat).unwrap_or(now);
    if now - last_sign_of_life > stale_after {
        Status::Stale
    } else {
        Status::Connected
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn view(app: &AppState, id: &AgentId, state: Option<&AgentState>, now: OffsetDateTime) -> Value {
    let status = status_of(state, app.stale_after, now);
    let sessions: Vec<Value> = state
        .map(|s| {
            s.sessions
                .iter()
                .map(|sess| {
                    let transport = app
                        .agents
                        .transport_of(sess.sid)
                        .map(|t| format!("{t:?}").to_lowercase());
                    json!({
                        "sid": sess.sid.to_string(),
                        "transport": transport,
                        "remote_addr": sess.remote_addr.to_string(),
                        "connected_since": rfc3339(sess.connected_at),
                        "fingerprint": sess.fingerprint,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let last_heartbeat = state
        .and_then(|s| s.last_heartbeat.as_ref())
        .map(|h| json!({ "received_at": rfc3339(h.received_at), "payload": h.payload }));
    let certificate = app.store.by_agent(id).map(|c| super::certificate::view(&c));
    json!({
        "agent_id": id,
        "status": status.as_str(),
        "connected": status != Status::Disconnected,
        "sessions": sessions,
        "last_heartbeat": last_heartbeat,
        "disconnected_at": state.and_then(|s| s.disconnected_at).map(rfc3339),
        "certificate": certificate,
    })
}

pub async fn list(
    State(app): State<AppState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit()?;
    let wanted = match q.status.as_deref().unwrap_or("all") {
        "all" => None,
        "connected" => Some(Status::Connected),
        "stale" => Some(Status::Stale),
        "disconnected" => Some(Status::Disconnected),
        other => {
            return Err(ApiError::BadRequest(format!(
                "status must be one of all, connected, stale, disconnected; got '{other}'"
            )));
        }
    };
    let now = OffsetDateTime::now_utc();
    let registry: std::collections::BTreeMap<AgentId, AgentState> =
        app.agents.registry.snapshot().into_iter().collect();
    // Every agent the gateway knows: those with a certificate and those seen connected.
    let ids: BTreeSet<AgentId> = app
        .store
        .list()
        .iter()
        .map(|c| c.agent_id.clone())
        .chain(registry.keys().cloned())
        .collect();
    let matching: Vec<&AgentId> = ids
        .iter()
        .filter(|id| wanted.is_none_or(|w| status_of(registry.get(*id), app.stale_after, now) == w))
        .collect();
    let total = matching.len();
    let page: Vec<&AgentId> = matching
        .into_iter()
        .filter(|id| q.after.as_deref().is_none_or(|after| id.as_str() > after))
        .take(limit + 1)
        .collect();
    let next = (page.len() > limit).then(|| page[limit - 1].to_string());
    let agents: Vec<Value> = page
        .iter()
        .take(limit)
        .map(|id| view(&app, id, registry.get(*id), now))
        .collect();
    Ok(Json(
        json!({ "agents": agents, "total": total, "next_after": next }),
    ))
}

pub async fn get_one(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = agent_id(&id)?;
    let state = app.agents.registry.get(&id);
    if state.is_none() && app.store.by_agent(&id).is_none() {
        return Err(ApiError::NotFound(format!("unknown agent '{id}'")));
    }
    let mut v = view(&app, &id, state.as_ref(), OffsetDateTime::now_utc());
    v["metadata"] = app.enrollment.metadata(&id).await.unwrap_or(Value::Null);
    Ok(Json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    event: String,
    #[serde(default)]
    data: Value,
    timeout_ms: Option<u64>,
}

fn checked_timeout(timeout_ms: Option<u64>) -> Result<Duration, ApiError> {
    let ms = timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    let t = Duration::from_millis(ms);
    if t < commands::MIN_TIMEOUT || t > commands::MAX_TIMEOUT {
        return Err(ApiError::BadRequest(format!(
            "timeout_ms must be between {} and {}, got {ms}",
            commands::MIN_TIMEOUT.as_millis(),
            commands::MAX_TIMEOUT.as_millis()
        )));
    }
    Ok(t)
}

pub async fn command(
    State(app): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<CommandBody>,
) -> Result<Json<Value>, ApiError> {
    let id = agent_id(&id)?;
    commands::check_event_name(&body.event).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let timeout = checked_timeout(body.timeout_ms)?;
    let reply = app
        .agents
        .command(&id, &body.event, &body.data, timeout)
        .await?;
    Ok(Json(json!({ "agent_id": id, "reply": reply })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FanOutBody {
    agent_ids: Vec<String>,
    event: String,
    #[serde(default)]
    data: Value,
    timeout_ms: Option<u64>,
}

/// Sends one command to many agents concurrently; one result per distinct agent id, in
/// the order given. Always 200 when the request itself is valid.
pub async fn fan_out(
    State(app): State<AppState>,
    JsonBody(body): JsonBody<FanOutBody>,
) -> Result<Json<Value>, ApiError> {
    if body.agent_ids.is_empty() || body.agent_ids.len() > MAX_FAN_OUT {
        return Err(ApiError::BadRequest(format!(
            "agent_ids must hold 1 to {MAX_FAN_OUT} agent ids"
        )));
    }
    let mut seen = BTreeSet::new();
    let mut ids = Vec::with_capacity(body.agent_ids.len());
    for raw in &body.agent_ids {
        let id = agent_id(raw)?;
        if seen.insert(id.clone()) {
            ids.push(id);
        }
    }
    commands::check_event_name(&body.event).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let timeout = checked_timeout(body.timeout_ms)?;
    let results = join_all(ids.iter().map(|id| {
        let app = &app;
        let (event, data) = (&body.event, &body.data);
        async move {
            match app.agents.command(id, event, data, timeout).await {
                Ok(reply) => json!({ "agent_id": id, "status": "ok", "reply": reply }),
                Err(
                    e @ (CommandError::NotConnected(_)
                    | CommandError::Timeout { .. }
                    | CommandError::Failed { .. }),
                ) => {
                    json!({ "agent_id": id, "status": e.outcome(), "detail": e.to_string() })
                }
            }
        }
    }))
    .await;
    Ok(Json(json!({ "results": results })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::registry::{Heartbeat, Session};

    fn session(connected_at: OffsetDateTime) -> Session {
        Session {
            sid: socketioxide::socket::Sid::new(),
            fingerprint: None,
            remote_addr: "127.0.0.1:1".parse().unwrap(),
            connected_at,
        }
    }

    #[test]
    fn stale_when_connected_and_silent_for_longer_than_the_window() {
        let now = OffsetDateTime::now_utc();
        let window = Duration::from_secs(90);
        assert_eq!(status_of(None, window, now), Status::Disconnected);
        let mut s = AgentState {
            sessions: vec![session(now - Duration::from_secs(10))],
            ..Default::default()
        };
        assert_eq!(status_of(Some(&s), window, now), Status::Connected);
        s.sessions = vec![session(now - Duration::from_secs(300))];
        assert_eq!(status_of(Some(&s), window, now), Status::Stale);
        s.last_heartbeat = Some(Heartbeat {
            received_at: now - Duration::from_secs(5),
            payload: Value::Null,
        });
        assert_eq!(status_of(Some(&s), window, now), Status::Connected);
        s.sessions.clear();
        assert_eq!(status_of(Some(&s), window, now), Status::Disconnected);
    }
}
