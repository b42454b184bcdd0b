//! Who is connected (`GET /agents`, `GET /agents/{agent_id}`) and commands to agents
//! (`POST /agents/{agent_id}/commands`, fan-out `POST /agents/commands`).
//!
//! With `[cluster]`, the lists show the whole fleet: this node's registry merged with the
//! other nodes' agents as published through Redis ([`crate::cluster::fleet`]); each agent
//! and each session names its `node`. An agent's status is the best of its nodes'.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use futures_util::future::join_all;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::extract::StatusFilter;
use super::schema::{AgentList, AgentView, CommandResponse, ErrorDetail, FanOutResponse};
use super::{ApiError, ApiQuery, AppState, JsonBody, Page, PageQuery, agent_id};
use crate::agents::ClusterLink;
use crate::agents::commands::{self, CommandError};
use crate::agents::registry::{AgentState, AgentStatus};
use crate::clock::rfc3339;
use crate::cluster::fleet::{RemoteAgent, from_unix_ms};
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
#[utoipa::path(
    get, path = "/agents", operation_id = "list_agents",
    summary = "List agents and their status (paged)", tag = "agents", security(("api_key" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "One page of agents", body = AgentList),
        (status = 400, description = "A query parameter is invalid or unknown (the detail names it)", body = ErrorDetail),
        (status = 503, description = "With `[cluster]`: Redis is unreachable, the fleet cannot be listed", body = ErrorDetail),
    ),
)]
pub async fn list(
    State(app): State<AppState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    if let Some(link) = &app.agents.cluster {
        return cluster_list(&app, link, &q);
    }
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

#[utoipa::path(
    get, path = "/agents/{agent_id}", operation_id = "get_agent",
    summary = "One agent: sessions, last heartbeat, certificate, metadata", tag = "agents", security(("api_key" = [])), params(("agent_id" = String, Path, description = "The agent id (the CN of its certificate)")),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 400, description = "Invalid agent id", body = ErrorDetail),
        (status = 404, description = "Unknown agent (no certificate, never connected)", body = ErrorDetail),
        (status = 503, description = "With `[cluster]`: the agent is not on this node and Redis is unreachable", body = ErrorDetail),
    ),
)]
pub async fn get_one(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = agent_id(&id)?;
    if let Some(link) = &app.agents.cluster {
        let mut v = cluster_one(&app, link, &id)?;
        v["metadata"] = app.enrollment.metadata(&id).await.unwrap_or(Value::Null);
        return Ok(Json(v));
    }
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    /// The Socket.IO event to emit (printable, not a reserved name).
    #[schema(example = "restart")]
    event: String,
    /// The event's argument (any JSON; null when left out).
    #[serde(default)]
    data: Value,
    /// How long to wait for the acknowledgement (default 10000).
    #[schema(minimum = 1)]
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

#[utoipa::path(
    post, path = "/agents/{agent_id}/commands", operation_id = "send_command",
    summary = "Send a command to an agent and wait for its acknowledgement", tag = "agents", security(("api_key" = [])), params(("agent_id" = String, Path, description = "The agent id (the CN of its certificate)")),
    request_body = CommandBody,
    responses(
        (status = 200, description = "The agent's acknowledgement", body = CommandResponse),
        (status = 400, description = "Invalid agent id, event name or timeout_ms", body = ErrorDetail),
        (status = 404, description = "The agent is not connected", body = ErrorDetail),
        (status = 502, description = "The agent's connection failed during the command", body = ErrorDetail),
        (status = 503, description = "With `[cluster]`: Redis is unreachable, the agent's node cannot be reached", body = ErrorDetail),
        (status = 504, description = "No acknowledgement within timeout_ms", body = ErrorDetail),
    ),
)]
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FanOutBody {
    /// 1 to 10,000 agent ids; duplicates are sent to once.
    agent_ids: Vec<String>,
    event: String,
    #[serde(default)]
    data: Value,
    #[schema(minimum = 1)]
    timeout_ms: Option<u64>,
}

/// Sends one command to many agents concurrently; one result per distinct agent id, in
/// the order given. Always 200 when the request itself is valid.
#[utoipa::path(
    post, path = "/agents/commands", operation_id = "fan_out_command",
    summary = "Send one command to many agents", tag = "agents", security(("api_key" = [])),
    request_body = FanOutBody,
    responses(
        (status = 200, description = "One result per agent, each with its own status", body = FanOutResponse),
        (status = 400, description = "No or too many agent ids, an invalid one, or an invalid event name or timeout_ms", body = ErrorDetail),
    ),
)]
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
                    | CommandError::ClusterUnavailable { .. }
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

/// The detail of a fleet listing during a Redis outage.
const FLEET_UNAVAILABLE: &str = "Redis is unreachable: the agents of the other cluster nodes cannot be listed now (agents connected to this node keep working; retry in a few seconds)";

/// Status of an agent on other nodes, from its newest sign of life there.
pub(crate) fn remote_status(
    last: Option<time::OffsetDateTime>,
    cutoff: time::OffsetDateTime,
) -> AgentStatus {
    match last {
        None => AgentStatus::Disconnected,
        Some(t) if t >= cutoff => AgentStatus::Connected,
        Some(_) => AgentStatus::Stale,
    }
}

/// The better of two statuses: connected anywhere beats stale beats disconnected.
pub(crate) fn best(a: AgentStatus, b: AgentStatus) -> AgentStatus {
    let rank = |s| match s {
        AgentStatus::Connected => 2,
        AgentStatus::Stale => 1,
        AgentStatus::Disconnected => 0,
    };
    if rank(a) >= rank(b) { a } else { b }
}

pub(crate) fn stale_cutoff(app: &AppState) -> time::OffsetDateTime {
    app.clock.now() - app.agents.registry.stale_after()
}

/// The fleet-wide status of each of `ids`.
pub(crate) fn fleet_statuses(
    app: &AppState,
    link: &ClusterLink,
    ids: &[AgentId],
) -> Vec<AgentStatus> {
    let cutoff = stale_cutoff(app);
    let local = app.agents.registry.statuses(ids);
    let remote = link.fleet.signs_of_life(ids);
    local
        .into_iter()
        .zip(remote)
        .map(|((_, l), r)| best(l, remote_status(r, cutoff)))
        .collect()
}

/// `GET /agents` in a cluster. Pages are cut from ordered sources as on one node; a
/// status filter reads candidates in chunks and keeps those whose fleet-wide status
/// matches. `total` for `connected`/`stale` walks the other nodes' agents once
/// (O(agents on other nodes)).
fn cluster_list(
    app: &AppState,
    link: &ClusterLink,
    q: &PageQuery,
) -> Result<Json<Value>, ApiError> {
    if !link.status.is_connected() {
        return Err(ApiError::ClusterUnavailable(FLEET_UNAVAILABLE.into()));
    }
    let limit = q.limit();
    let after = q.after.as_ref();
    let registry = &app.agents.registry;
    let cutoff = stale_cutoff(app);
    let wanted = q.status.unwrap_or(StatusFilter::All).status();
    let ids = match wanted {
        None => merge(
            merge(
                app.store.ids_after(after, limit + 1),
                registry.ids_after(None, after, limit + 1),
                limit + 1,
            ),
            link.fleet.ids_after(after, limit + 1, |_| true),
            limit + 1,
        ),
        Some(status) => {
            let chunk = (limit + 1).max(DISCONNECTED_CHUNK);
            let mut out = Vec::with_capacity(limit + 1);
            let mut cursor = after.cloned();
            loop {
                let c = cursor.as_ref();
                let candidates = match status {
                    AgentStatus::Connected | AgentStatus::Stale => merge(
                        registry.ids_after(Some(status), c, chunk),
                        link.fleet
                            .ids_after(c, chunk, |t| remote_status(t, cutoff) == status),
                        chunk,
                    ),
                    AgentStatus::Disconnected => merge(
                        registry.ids_after(Some(AgentStatus::Disconnected), c, chunk),
                        app.store.ids_after(c, chunk),
                        chunk,
                    ),
                };
                let statuses = fleet_statuses(app, link, &candidates);
                out.extend(
                    candidates
                        .iter()
                        .zip(statuses)
                        .filter(|(_, s)| *s == status)
                        .map(|(id, _)| id.clone()),
                );
                // Fewer than a chunk: both sources are exhausted.
                if out.len() > limit || candidates.len() < chunk {
                    break;
                }
                cursor = candidates.last().cloned();
            }
            out.truncate(limit + 1);
            out
        }
    };
    let total = fleet_total(app, link, wanted, cutoff);
    let page = Page::cut(ids, limit, |id| id);
    let entries = registry.entries(&page.items);
    let statuses = fleet_statuses(app, link, &page.items);
    let agents: Vec<Value> = page
        .items
        .iter()
        .zip(entries)
        .zip(statuses)
        .map(|((id, (state, _)), status)| {
            cluster_view(app, link, id, state.as_ref(), status, link.fleet.remote(id))
        })
        .collect();
    Ok(Json(
        json!({ "agents": agents, "total": total, "next_after": page.next_after }),
    ))
}

/// `total` of a fleet listing: as on one node, with each agent counted once under its
/// fleet-wide status.
fn fleet_total(
    app: &AppState,
    link: &ClusterLink,
    wanted: Option<AgentStatus>,
    cutoff: time::OffsetDateTime,
) -> usize {
    let registry = &app.agents.registry;
    let remote: Vec<(AgentId, AgentStatus)> = link
        .fleet
        .signs_of_life_all()
        .into_iter()
        .map(|(id, t)| (id, remote_status(t, cutoff)))
        .collect();
    let ids: Vec<AgentId> = remote.iter().map(|(id, _)| id.clone()).collect();
    let local = registry.statuses(&ids);
    let (mut connected, mut stale) = (
        registry.count(AgentStatus::Connected),
        registry.count(AgentStatus::Stale),
    );
    for ((_, r), (_, l)) in remote.iter().zip(local) {
        let fleet = best(*r, l);
        if fleet == l {
            continue;
        }
        match l {
            AgentStatus::Connected => connected -= 1,
            AgentStatus::Stale => stale -= 1,
            AgentStatus::Disconnected => {}
        }
        match fleet {
            AgentStatus::Connected => connected += 1,
            AgentStatus::Stale => stale += 1,
            AgentStatus::Disconnected => {}
        }
    }
    match wanted {
        None => app.store.len(),
        Some(AgentStatus::Connected) => connected,
        Some(AgentStatus::Stale) => stale,
        Some(AgentStatus::Disconnected) => app.store.len().saturating_sub(connected + stale),
    }
}

/// `GET /agents/{id}` in a cluster. Served from this node's registry alone when the
/// agent is connected here (so it works during a Redis outage); otherwise the fleet view
/// is needed, and a Redis outage answers 503.
fn cluster_one(app: &AppState, link: &ClusterLink, id: &AgentId) -> Result<Value, ApiError> {
    let (state, _) = app
        .agents
        .registry
        .entries(std::slice::from_ref(id))
        .pop()
        .unwrap_or((None, AgentStatus::Disconnected));
    let local_live = state.as_ref().is_some_and(|s| !s.sessions.is_empty());
    if !local_live && !link.status.is_connected() {
        return Err(ApiError::ClusterUnavailable(format!(
            "agent '{id}' is not connected to this node, and Redis is unreachable: the other cluster nodes cannot be asked now"
        )));
    }
    let remote = link.fleet.remote(id);
    if state.is_none() && remote.is_empty() && app.store.by_agent(id).is_none() {
        return Err(ApiError::NotFound(format!("unknown agent '{id}'")));
    }
    let status = fleet_statuses(app, link, std::slice::from_ref(id))
        .pop()
        .unwrap_or(AgentStatus::Disconnected);
    Ok(cluster_view(app, link, id, state.as_ref(), status, remote))
}

/// [`view`] with the sessions of every node, each naming its node, and the agent's `node`
/// (that of its newest session).
fn cluster_view(
    app: &AppState,
    link: &ClusterLink,
    id: &AgentId,
    state: Option<&AgentState>,
    status: AgentStatus,
    remote: Vec<(String, RemoteAgent)>,
) -> Value {
    let mut v = view(app, id, state, status);
    let mut sessions: Vec<(i64, Value)> = Vec::new();
    if let Some(Value::Array(local)) = v.get_mut("sessions").map(Value::take) {
        let times = state.map(|s| s.sessions.as_slice()).unwrap_or_default();
        for (mut sess, t) in local.into_iter().zip(times) {
            sess["node"] = json!(link.node_id);
            sessions.push((crate::cluster::fleet::unix_ms(t.connected_at), sess));
        }
    }
    let mut heartbeat = state.and_then(|s| s.last_heartbeat.as_ref()).map(|h| {
        let mut shown = v["last_heartbeat"].take();
        shown["node"] = json!(link.node_id);
        (crate::cluster::fleet::unix_ms(h.received_at), shown)
    });
    for (node, agent) in remote {
        for sess in agent.sessions {
            sessions.push((
                sess.connected_at_ms,
                json!({
                    "sid": sess.sid,
                    "transport": Value::Null,
                    "remote_addr": sess.remote_addr,
                    "connected_since": rfc3339(from_unix_ms(sess.connected_at_ms)),
                    "fingerprint": sess.fingerprint,
                    "node": node,
                }),
            ));
        }
        if let Some(h) = agent.last_heartbeat
            && heartbeat
                .as_ref()
                .is_none_or(|(t, _)| h.received_at_ms > *t)
        {
            heartbeat = Some((
                h.received_at_ms,
                json!({
                    "received_at": rfc3339(from_unix_ms(h.received_at_ms)),
                    "payload": h.payload,
                    "node": node,
                }),
            ));
        }
    }
    sessions.sort_by_key(|(t, _)| *t);
    let node = sessions.last().map(|(_, s)| s["node"].clone());
    v["node"] = node.unwrap_or(Value::Null);
    v["sessions"] = Value::Array(sessions.into_iter().map(|(_, s)| s).collect());
    v["last_heartbeat"] = heartbeat.map_or(Value::Null, |(_, h)| h);
    if status != AgentStatus::Disconnected {
        v["disconnected_at"] = Value::Null;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_status_is_the_best_of_the_nodes() {
        use AgentStatus::*;
        let now = time::OffsetDateTime::now_utc();
        let cutoff = now - Duration::from_secs(90);
        assert_eq!(remote_status(None, cutoff), Disconnected);
        assert_eq!(remote_status(Some(now), cutoff), Connected);
        assert_eq!(remote_status(Some(cutoff), cutoff), Connected);
        assert_eq!(
            remote_status(Some(cutoff - Duration::from_secs(1)), cutoff),
            Stale
        );
        for (a, b, want) in [
            (Disconnected, Connected, Connected),
            (Stale, Connected, Connected),
            (Stale, Disconnected, Stale),
            (Disconnected, Disconnected, Disconnected),
        ] {
            assert_eq!(best(a, b), want);
            assert_eq!(best(b, a), want);
        }
    }

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
