//! The live fleet: one task per node keeps the console's table (a row per agent) and its
//! counters, and pushes what changed to every open console over Server-Sent Events
//! (`GET /ui/api/events`): first a `snapshot` event with every row, then `delta` events
//! with the rows that changed and the ids that went away.
//!
//! Changes are coalesced: the task looks every [`TICK`] (200 ms) and rebuilds the table
//! when the registry counted a change (a connect, heartbeat or disconnect; an O(1) check)
//! or, while a console is open, [`REFRESH`] has passed (staleness, certificate uploads
//! and expiry change without a registry event). With `[cluster]` the other nodes' agents change without a local event
//! too, so a clustered node rebuilds at every tick. A browser therefore sees a change of
//! its node's agents within about 200 ms (another node's: its `publish_interval` later),
//! and at most one message per tick whatever the rate of heartbeats. The rows are built from the same sources as `GET /agents`, the status
//! by the same rules (`api::agents::fleet_statuses` in a cluster).
//!
//! The task also keeps, per agent, the times of the last [`TIMELINE`] heartbeats it saw
//! (the agent page's timeline; the registry keeps only the last one).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Serialize;
use serde_json::json;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::agents::registry::{AgentState, AgentStatus};
use crate::api::AppState;
use crate::cluster::fleet::unix_ms;
use crate::identity::AgentId;

/// How often the task looks for changes: the coalescing period of the deltas.
pub(crate) const TICK: Duration = Duration::from_millis(200);
/// Longest time between two rebuilds when the registry reports no change.
const REFRESH: Duration = Duration::from_millis(1000);
/// Heartbeat times kept per agent for the timeline.
pub(crate) const TIMELINE: usize = 60;
/// Deltas buffered per console; one that falls further behind gets a fresh snapshot.
const BUFFER: usize = 64;
/// Certificates whose `notAfter` is within this are counted as expiring.
const EXPIRING_WITHIN: Duration = Duration::from_secs(30 * 86_400);

/// One agent as the console's table shows it. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Row {
    pub id: AgentId,
    pub status: &'static str,
    /// With `[cluster]`: the node of the agent's newest session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub remote_addr: Option<String>,
    pub connected_since: Option<i64>,
    pub last_heartbeat: Option<i64>,
    pub cert_not_after: Option<i64>,
}

/// The counters above the table.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Counters {
    pub total: usize,
    pub connected: usize,
    pub stale: usize,
    pub disconnected: usize,
    /// Stored certificates whose `notAfter` is within 30 days (or past).
    pub expiring_certificates: usize,
    /// Rejected TLS handshakes of the last 5 minutes, by reason.
    pub handshake_failures: BTreeMap<&'static str, u64>,
}

/// Cheap-to-clone handle on the feed.
#[derive(Clone)]
pub(crate) struct Feed {
    shared: Arc<Shared>,
}

struct Shared {
    /// A std Mutex: held while the table is swapped and its delta sent, and while a new
    /// console copies the table and subscribes, so that a console sees every change
    /// exactly once (in its snapshot or in a later delta). No `.await` inside.
    table: Mutex<Table>,
    deltas: broadcast::Sender<Arc<str>>,
    /// Cancelled when the task ends (shutdown): open event streams end with it.
    stopped: CancellationToken,
}

#[derive(Default)]
struct Table {
    seq: u64,
    rows: BTreeMap<AgentId, Row>,
    counters: Counters,
    node: Option<String>,
    timelines: HashMap<AgentId, VecDeque<i64>>,
}

impl Feed {
    pub fn new() -> Self {
        let (deltas, _) = broadcast::channel(BUFFER);
        Self {
            shared: Arc::new(Shared {
                table: Mutex::new(Table::default()),
                deltas,
                stopped: CancellationToken::new(),
            }),
        }
    }

    /// Runs the feed until `shutdown`; open event streams then end.
    pub fn spawn(&self, app: AppState, shutdown: CancellationToken) {
        let feed = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seen: Option<u64> = None;
            let mut rebuilt = Instant::now();
            let refresh = if app.agents.cluster.is_some() {
                TICK
            } else {
                REFRESH
            };
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => break,
                }
                let generation = app.agents.registry.generation();
                // Without an open console only the heartbeat timelines need the table,
                // and they change with the registry.
                let watched = feed.shared.deltas.receiver_count() > 0;
                if seen == Some(generation) && !(watched && rebuilt.elapsed() >= refresh) {
                    continue;
                }
                seen = Some(generation);
                rebuilt = Instant::now();
                let (rows, counters) = build(&app);
                let n = rows.len();
                feed.apply(
                    rows,
                    counters,
                    app.agents.cluster.as_ref().map(|c| c.node_id.clone()),
                );
                tracing::debug!(
                    rows = n,
                    ms = rebuilt.elapsed().as_secs_f64() * 1e3,
                    "console feed rebuilt"
                );
            }
            // Ends every open event stream.
            feed.shared.stopped.cancel();
        });
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every critical section leaves the table whole before anything can panic.
        self.shared.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stored times of the agent's last heartbeats, oldest first.
    pub fn timeline(&self, id: &AgentId) -> Vec<i64> {
        self.lock()
            .timelines
            .get(id)
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Replaces the table and sends what changed.
    fn apply(&self, rows: Vec<Row>, counters: Counters, node: Option<String>) {
        let mut table = self.lock();
        let mut upsert = Vec::new();
        let mut next = BTreeMap::new();
        for row in rows {
            let old = table.rows.remove(&row.id);
            if let Some(at) = row.last_heartbeat
                && old.as_ref().and_then(|o| o.last_heartbeat) != Some(at)
            {
                let line = table.timelines.entry(row.id.clone()).or_default();
                if line.len() == TIMELINE {
                    line.pop_front();
                }
                line.push_back(at);
            }
            if old.as_ref() != Some(&row) {
                upsert.push(row.clone());
            }
            next.insert(row.id.clone(), row);
        }
        // What is left of the old table has gone (its certificate was deleted).
        let remove: Vec<AgentId> = std::mem::take(&mut table.rows).into_keys().collect();
        for id in &remove {
            table.timelines.remove(id);
        }
        table.rows = next;
        table.node = node;
        let counters_changed = table.counters != counters;
        table.counters = counters;
        if upsert.is_empty() && remove.is_empty() && !counters_changed {
            return;
        }
        table.seq += 1;
        let delta = json!({
            "seq": table.seq,
            "upsert": upsert,
            "remove": remove,
            "counters": table.counters,
        });
        // No receiver (no console open) is not an error.
        let _ = self.shared.deltas.send(Arc::from(delta.to_string()));
    }

    /// The table now as one `snapshot` message, and a receiver of every later delta.
    fn subscribe(&self) -> (String, broadcast::Receiver<Arc<str>>) {
        let table = self.lock();
        let rows: Vec<&Row> = table.rows.values().collect();
        let snapshot = json!({
            "seq": table.seq,
            "node": table.node,
            "rows": rows,
            "counters": table.counters,
        });
        (snapshot.to_string(), self.shared.deltas.subscribe())
    }
}

/// Builds every row and the counters from the store, the registry and (with
/// `[cluster]`) the fleet view.
fn build(app: &AppState) -> (Vec<Row>, Counters) {
    let now = app.clock.now();
    let certs = app.store.list();
    let registry = &app.agents.registry;
    let mut ids: Vec<AgentId> = registry.ids_after(None, None, usize::MAX);
    let entries = registry.entries(&ids);
    let mut local: HashMap<AgentId, (Option<AgentState>, AgentStatus)> =
        ids.iter().cloned().zip(entries).collect();
    ids.extend(certs.iter().map(|c| c.agent_id.clone()));
    let link = app.agents.cluster.as_ref();
    if let Some(link) = link {
        ids.extend(link.fleet.signs_of_life_all().into_iter().map(|(id, _)| id));
    }
    ids.sort_unstable();
    ids.dedup();
    let statuses: Vec<AgentStatus> = match link {
        Some(link) => crate::api::agents::fleet_statuses(app, link, &ids),
        None => registry
            .statuses(&ids)
            .into_iter()
            .map(|(_, s)| s)
            .collect(),
    };
    let not_after: HashMap<&AgentId, i64> =
        certs.iter().map(|c| (&c.agent_id, c.not_after)).collect();
    let mut counters = Counters::default();
    let rows: Vec<Row> = ids
        .iter()
        .zip(statuses)
        .map(|(id, status)| {
            match status {
                AgentStatus::Connected => counters.connected += 1,
                AgentStatus::Stale => counters.stale += 1,
                AgentStatus::Disconnected => counters.disconnected += 1,
            }
            let state = local.remove(id).and_then(|(s, _)| s);
            let mut row = Row {
                id: id.clone(),
                status: status.as_str(),
                node: None,
                remote_addr: None,
                connected_since: None,
                last_heartbeat: state
                    .as_ref()
                    .and_then(|s| s.last_heartbeat.as_ref())
                    .map(|h| unix_ms(h.received_at)),
                cert_not_after: not_after.get(id).map(|s| s.saturating_mul(1000)),
            };
            // The newest session, on this node or (with `[cluster]`) another.
            let mut newest: Option<(i64, String, Option<String>)> = state
                .as_ref()
                .and_then(|s| s.sessions.iter().max_by_key(|s| s.connected_at))
                .map(|s| {
                    (
                        unix_ms(s.connected_at),
                        s.remote_addr.to_string(),
                        link.map(|l| l.node_id.clone()),
                    )
                });
            if let Some(link) = link {
                for (node, agent) in link.fleet.remote(id) {
                    for s in &agent.sessions {
                        if newest
                            .as_ref()
                            .is_none_or(|(t, _, _)| s.connected_at_ms > *t)
                        {
                            newest = Some((
                                s.connected_at_ms,
                                s.remote_addr.clone(),
                                Some(node.clone()),
                            ));
                        }
                    }
                    if let Some(h) = agent.last_heartbeat
                        && row.last_heartbeat.is_none_or(|t| h.received_at_ms > t)
                    {
                        row.last_heartbeat = Some(h.received_at_ms);
                    }
                }
            }
            if status != AgentStatus::Disconnected
                && let Some((since, addr, node)) = newest
            {
                row.connected_since = Some(since);
                row.remote_addr = Some(addr);
                row.node = node;
            }
            row
        })
        .collect();
    counters.total = rows.len();
    let horizon = (now + EXPIRING_WITHIN).unix_timestamp();
    counters.expiring_certificates = certs.iter().filter(|c| c.not_after <= horizon).count();
    counters.handshake_failures = app
        .metrics
        .recent_handshake_rejections()
        .into_iter()
        .collect();
    (rows, counters)
}

/// `GET /ui/api/events`: the table as a `snapshot` event, then `delta` events. A console
/// that falls behind by more than the buffer gets a new snapshot; the stream ends with a
/// `signed_out` event when its session ends, and when the gateway shuts down.
pub(crate) fn events(
    feed: Feed,
    still_signed_in: impl Fn() -> futures_util::future::BoxFuture<'static, bool> + Send + 'static,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (snapshot, rx) = feed.subscribe();
    let state = EventStream {
        feed,
        rx,
        pending: Some(Event::default().event("snapshot").data(snapshot)),
        check: tokio::time::interval_at(tokio::time::Instant::now() + SESSION_CHECK, SESSION_CHECK),
        still_signed_in: Box::new(still_signed_in),
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if let Some(event) = st.pending.take() {
            return Some((Ok(event), st));
        }
        if st.done {
            return None;
        }
        loop {
            tokio::select! {
                _ = st.feed.shared.stopped.cancelled() => return None,
                msg = st.rx.recv() => match msg {
                    Ok(delta) => {
                        return Some((Ok(Event::default().event("delta").data(&*delta)), st));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let (snapshot, rx) = st.feed.subscribe();
                        st.rx = rx;
                        return Some((Ok(Event::default().event("snapshot").data(snapshot)), st));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = st.check.tick() => {
                    if !(st.still_signed_in)().await {
                        st.done = true;
                        return Some((Ok(Event::default().event("signed_out").data("{}")), st));
                    }
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// How often an open event stream checks that its session still exists (sign-out on
/// another tab or node, expiry).
const SESSION_CHECK: Duration = Duration::from_secs(2);

/// The state of one event stream.
struct EventStream {
    feed: Feed,
    rx: broadcast::Receiver<Arc<str>>,
    pending: Option<Event>,
    check: tokio::time::Interval,
    still_signed_in: Box<dyn Fn() -> futures_util::future::BoxFuture<'static, bool> + Send>,
    done: bool,
}
