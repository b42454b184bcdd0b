//! Who is connected (`GET /agents`, `GET /agents/{agent_id}`) and commands to agents
//! (`POST /agents/{agent_id}/commands`, fan-out `POST /agents/commands`).

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use futures_util::future::join_all;
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::StatusFilter;
use super::{ApiError, ApiQuery, AppState, JsonBody, Page, PageQuery, agent_id};
use crate::agents::commands::{self, CommandError};
use crate::agents::registry::{AgentState, AgentStatus};
use crate::clock::rfc3339;
use crate::identity::AgentId;

/// Largest fan-out in one request.
pub const MAX_FAN_OUT: usize = 10_000;
const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// Store ids read per step when a page of disconnected agents skips connected ones.
const DISCONNECTED_CHUNK: usize = 256;

fn view(app: &AppState, id: &AgentId, state: Option<&AgentState>, status: AgentStatus) -> Value {
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
        "connected": status != AgentStatus::Disconnected,
        "sessions": sessions,
        "last_heartbeat": last_heartbeat,
        "disconnected_at": state.and_then(|s| s.disconnected_at).map(rfc3339),
        "certificate": certificate,
    })
}

/// `GET /agents`: every agent with a certificate or a registry entry, in agent id order.
///
/// A page reads only the entries it shows from ordered indexes (the store's certificates
/// by agent id, the registry's agents by status), so it costs O(limit · log n). `total`
/// comes from counters: for `connected` and `stale` it is the number of such agents; for
/// `all` the number of stored certificates, and for `disconnected` those of them without a
/// live session (an agent listed without a certificate, one whose certificate was
/// deleted while its session was being set up, is not counted).
pub async fn list(
    State(app): State<AppState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit();
    let after = q.after.as_ref();
    let registry = &app.agents.registry;
    let wanted = q.status.unwrap_or(StatusFilter::All).status();
    let (ids, total) = match wanted {
        None => {
            let ids = merge(
                app.store.ids_after(after, limit + 1),
                registry.ids_after(None, after, limit + 1),
                limit + 1,
            );
            (ids, app.store.len())
        }
        Some(status @ (AgentStatus::Connected | AgentStatus::Stale)) => (
            registry.ids_after(Some(status), after, limit + 1),
            registry.count(status),
        ),
        Some(AgentStatus::Disconnected) => (
            disconnected_after(&app, after, limit + 1),
            app.store.len().saturating_sub(registry.connected_agents()),
        ),
    };
    let page = Page::cut(ids, limit, |id| id);
    let entries = registry.entries(&page.items);
    let agents: Vec<Value> = page
        .items
        .iter()
        .zip(entries)
        .map(|(id, (state, status))| view(&app, id, state.as_ref(), status))
        .collect();
    Ok(Json(
        json!({ "agents": agents, "total": total, "next_after": page.next_after }),
    ))
}

/// The first `n` disconnected agents after `after`: registry entries without a session,
/// and stored certificates whose agent has no session (read in chunks, skipping the
/// connected ones).
fn disconnected_after(app: &AppState, after: Option<&AgentId>, n: usize) -> Vec<AgentId> {
    let registry = &app.agents.registry;
    let idle = registry.ids_after(Some(AgentStatus::Disconnected), after, n);
    let mut from_store = Vec::with_capacity(n);
    let mut cursor = after.cloned();
    loop {
        let chunk = app
            .store
            .ids_after(cursor.as_ref(), DISCONNECTED_CHUNK.max(n));
        let Some(last) = chunk.last().cloned() else {
            break;
        };
        from_store.extend(
            registry
                .statuses(&chunk)
                .into_iter()
                .filter(|(_, s)| *s == AgentStatus::Disconnected)
                .map(|(id, _)| id.clone()),
        );
        if from_store.len() >= n || chunk.len() < DISCONNECTED_CHUNK.max(n) {
            break;
        }
        cursor = Some(last);
    }
    merge(idle, from_store, n)
}

/// The first `n` distinct ids of two sorted lists, in order.
fn merge(a: Vec<AgentId>, b: Vec<AgentId>, n: usize) -> Vec<AgentId> {
    let mut out = Vec::with_capacity(n.min(a.len() + b.len()));
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    while out.len() < n {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x < y => a.next(),
            (Some(x), Some(y)) if x > y => b.next(),
            (Some(_), Some(_)) => {
                b.next();
                a.next()
            }
            (Some(_), None) => a.next(),
            (None, _) => b.next(),
        };
        match next {
            Some(id) => out.push(id),
            None => break,
        }
    }
    out
}

pub async fn get_one(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = agent_id(&id)?;
    let (state, status) = app
        .agents
        .registry
        .entries(std::slice::from_ref(&id))
        .pop()
        .unwrap_or((None, AgentStatus::Disconnected));
    if state.is_none() && app.store.by_agent(&id).is_none() {
        return Err(ApiError::NotFound(format!("unknown agent '{id}'")));
    }
    let mut v = view(&app, &id, state.as_ref(), status);
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

    #[test]
    fn merge_keeps_order_drops_duplicates_and_stops_at_n() {
        let ids = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse().unwrap())
                .collect::<Vec<AgentId>>()
        };
        assert_eq!(
            merge(ids(&["a", "c", "d"]), ids(&["b", "c", "e"]), 4),
            ids(&["a", "b", "c", "d"])
        );
        assert_eq!(merge(ids(&[]), ids(&["x"]), 3), ids(&["x"]));
    }
}
