//! One fleet view across nodes: each node publishes its agents' state to Redis in
//! batches, and keeps an in-memory copy of every other live node's.
//!
//! A heartbeat must not cost a Redis round trip of its own (issue 9, point 4), so the
//! registry only records *which* agents changed, and a task here publishes them once per
//! `publish_interval`:
//!
//! - `agentgate:{fleet}:agents:<node>`: a hash, agent id -> that agent's sessions and last
//!   heartbeat on this node (agents without a live session are removed), plus `~seq`, the
//!   number of the last batch written to it. Its TTL is `node_timeout`, renewed each tick.
//! - `agentgate:{fleet}:node:<node>`: this node's summary (agent and session counts, when
//!   it wrote it), with the same TTL: the key's expiry is how a killed node is noticed,
//!   by Redis' clock rather than by comparing the nodes' clocks.
//! - `agentgate:{fleet}:nodes`: the set of node ids, for discovery; an id whose summary
//!   has expired is removed by whichever node notices.
//! - channel `agentgate:{fleet}:changes`: each batch (`seq`, upserts, removals), so the
//!   other nodes apply it at once instead of re-reading the hash.
//!
//! A node reads the hash of another node when it first sees it, after a gap in its batch
//! numbers (a message lost while one side was cut off) and after its own reconnection to
//! Redis; it republishes its whole state after a reconnection (a restarted Redis may
//! have lost everything). Every key carries the `{fleet}` hash tag, so in a Redis Cluster
//! they live on one shard and a tick is one pipeline.
//!
//! Cost per tick and node: one pipeline (HSET of the changed agents, PEXPIRE, SET, SADD),
//! one PUBLISH when something changed, and one pipeline reading the node summaries.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use socketioxide_redis::drivers::Driver;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::driver::{DriverError, RedisDriver};
use crate::agents::registry::{AgentRegistry, AgentState};
use crate::identity::AgentId;

const NODES_KEY: &str = "agentgate:{fleet}:nodes";
const CHANNEL: &str = "agentgate:{fleet}:changes";
/// The hash field holding the batch number; agent ids start with a letter or digit.
const SEQ_FIELD: &str = "~seq";
/// Buffer of the changes channel (messages beyond it are dropped and healed by a resync).
const CHANNEL_BUFFER: usize = 1024;

fn node_key(node: &str) -> String {
    format!("agentgate:{{fleet}}:node:{node}")
}

fn agents_key(node: &str) -> String {
    format!("agentgate:{{fleet}}:agents:{node}")
}

/// Timing of the publication (from `[cluster]`).
#[derive(Debug, Clone, Copy)]
pub struct FleetTiming {
    pub publish_interval: Duration,
    pub node_timeout: Duration,
}

/// One agent's state on one node, as published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteAgent {
    pub sessions: Vec<RemoteSession>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<RemoteHeartbeat>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteSession {
    pub sid: String,
    pub remote_addr: String,
    /// Unix milliseconds.
    pub connected_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteHeartbeat {
    /// Unix milliseconds.
    pub received_at_ms: i64,
    pub payload: Value,
}

/// A node's summary, as it publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSummary {
    pub node_id: String,
    /// Agents with at least one live session on the node.
    pub agents: usize,
    pub sessions: usize,
    /// Unix milliseconds of the node's last publication, by its clock.
    pub heard_at_ms: i64,
    pub started_at_ms: i64,
    /// The node's last batch number: a reader that stays behind it for a whole tick
    /// lost the announcement (or it never came) and reads the hash.
    #[serde(default)]
    pub seq: u64,
}

/// One batch of changes, on the changes channel.
#[derive(Debug, Serialize, Deserialize)]
struct Batch {
    node: String,
    seq: u64,
    /// The node's whole state (replaces what the reader had).
    full: bool,
    upsert: BTreeMap<String, RemoteAgent>,
    remove: Vec<String>,
}

impl RemoteAgent {
    /// What this node publishes for an agent; `None` without a live session.
    pub fn of(state: &AgentState) -> Option<Self> {
        if state.sessions.is_empty() {
            return None;
        }
        Some(RemoteAgent {
            sessions: state
                .sessions
                .iter()
                .map(|s| RemoteSession {
                    sid: s.sid.to_string(),
                    remote_addr: s.remote_addr.to_string(),
                    connected_at_ms: unix_ms(s.connected_at),
                    fingerprint: s.fingerprint.map(|f| f.to_hex()),
                })
                .collect(),
            last_heartbeat: state.last_heartbeat.as_ref().map(|h| RemoteHeartbeat {
                received_at_ms: unix_ms(h.received_at),
                payload: h.payload.clone(),
            }),
        })
    }

    /// The newest connect or heartbeat.
    pub fn last_sign_of_life(&self) -> Option<OffsetDateTime> {
        let connect = self.sessions.iter().map(|s| s.connected_at_ms).max()?;
        let heartbeat = self.last_heartbeat.as_ref().map(|h| h.received_at_ms);
        Some(from_unix_ms(heartbeat.map_or(connect, |h| h.max(connect))))
    }
}

pub fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

pub fn from_unix_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Cheap-to-clone handle on the view of the other nodes.
#[derive(Clone)]
pub struct Fleet {
    shared: Arc<Shared>,
}

struct Shared {
    node_id: String,
    started_at: OffsetDateTime,
    /// A std Mutex: no `.await` while it is held.
    view: Mutex<View>,
}

#[derive(Default)]
struct View {
    /// Live remote nodes.
    nodes: HashMap<String, NodeView>,
    /// Agent id -> node -> its state there (remote nodes only; only agents with sessions).
    by_agent: BTreeMap<AgentId, BTreeMap<String, RemoteAgent>>,
}

struct NodeView {
    summary: Option<NodeSummary>,
    /// The last batch applied; `None` until the hash was read.
    seq: Option<u64>,
    agents: HashSet<AgentId>,
    /// Read the node's hash at the next tick.
    resync: bool,
    /// The batch number of the node's summary at the previous tick, if this view was
    /// behind it then.
    behind: Option<u64>,
}

impl Fleet {
    pub fn new(node_id: String, started_at: OffsetDateTime) -> Self {
        Self {
            shared: Arc::new(Shared {
                node_id,
                started_at,
                view: Mutex::new(View::default()),
            }),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// The agent's state on every other live node.
    pub fn remote(&self, id: &AgentId) -> Vec<(String, RemoteAgent)> {
        self.view()
            .by_agent
            .get(id)
            .map(|m| m.iter().map(|(n, a)| (n.clone(), a.clone())).collect())
            .unwrap_or_default()
    }

    /// Up to `n` ids after `after`, in order, of agents connected to another node whose
    /// newest sign of life there passes `keep`.
    pub fn ids_after(
        &self,
        after: Option<&AgentId>,
        n: usize,
        keep: impl Fn(Option<OffsetDateTime>) -> bool,
    ) -> Vec<AgentId> {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.view()
            .by_agent
            .range::<AgentId, _>((from, Bound::Unbounded))
            .filter(|(_, nodes)| keep(newest(nodes)))
            .map(|(id, _)| id.clone())
            .take(n)
            .collect()
    }

    /// The newest sign of life of each of `ids` on any other node (`None`: connected to
    /// no other node).
    pub fn signs_of_life(&self, ids: &[AgentId]) -> Vec<Option<OffsetDateTime>> {
        let view = self.view();
        ids.iter()
            .map(|id| view.by_agent.get(id).and_then(newest))
            .collect()
    }

    /// Every agent connected to another node, with its newest sign of life there.
    /// O(agents of the other nodes).
    pub fn signs_of_life_all(&self) -> Vec<(AgentId, Option<OffsetDateTime>)> {
        self.view()
            .by_agent
            .iter()
            .map(|(id, nodes)| (id.clone(), newest(nodes)))
            .collect()
    }

    /// The live remote nodes' summaries, by node id.
    pub fn nodes(&self) -> Vec<NodeSummary> {
        let mut nodes: Vec<NodeSummary> = self
            .view()
            .nodes
            .values()
            .filter_map(|n| n.summary.clone())
            .collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        nodes
    }

    /// This node's summary from its registry.
    pub fn own_summary(
        &self,
        registry: &AgentRegistry,
        now: OffsetDateTime,
        seq: u64,
    ) -> NodeSummary {
        let live = registry.live_entries();
        NodeSummary {
            node_id: self.shared.node_id.clone(),
            agents: live.len(),
            sessions: live.iter().map(|(_, s)| s.sessions.len()).sum(),
            heard_at_ms: unix_ms(now),
            started_at_ms: unix_ms(self.shared.started_at),
            seq,
        }
    }

    /// Starts publishing `registry` and following the other nodes, until `shutdown`; then
    /// removes this node's keys (a graceful stop leaves at once rather than after
    /// `node_timeout`). Subscribes before returning, so no batch published after this
    /// point is missed.
    pub async fn spawn(
        &self,
        driver: RedisDriver,
        registry: AgentRegistry,
        timing: FleetTiming,
        shutdown: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, DriverError> {
        registry.track_changes();
        let messages = driver.subscribe(CHANNEL.to_owned(), CHANNEL_BUFFER).await?;
        let mut task = Publisher {
            fleet: self.clone(),
            driver,
            registry,
            timing,
            seq: 0,
            need_full: true,
        };
        Ok(tokio::spawn(async move {
            task.run(messages, shutdown).await;
        }))
    }

    fn view(&self) -> MutexGuard<'_, View> {
        // Every critical section leaves the view consistent; a panic elsewhere must not
        // stop the listing.
        self.shared.view.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn newest(nodes: &BTreeMap<String, RemoteAgent>) -> Option<OffsetDateTime> {
    nodes
        .values()
        .filter_map(RemoteAgent::last_sign_of_life)
        .max()
}

impl View {
    /// Replaces everything known about `node`'s agents.
    fn replace(&mut self, node: &str, seq: u64, agents: BTreeMap<String, RemoteAgent>) {
        self.clear_agents(node);
        let entry = self.node_entry(node);
        entry.seq = Some(seq);
        entry.resync = false;
        entry.behind = None;
        for (id, agent) in agents {
            if let Ok(id) = AgentId::parse(&id) {
                self.upsert(node, id, agent);
            }
        }
    }

    fn apply(&mut self, batch: Batch) {
        let node = batch.node.clone();
        let entry = self.node_entry(&node);
        if batch.full {
            self.replace(&node, batch.seq, batch.upsert);
            return;
        }
        match entry.seq {
            Some(seq) if seq + 1 == batch.seq => entry.seq = Some(batch.seq),
            // Already contained in a hash read after it was written.
            Some(seq) if batch.seq <= seq => return,
            // A gap (a lost message) or a node not read yet: read its hash.
            _ => {
                entry.resync = true;
                return;
            }
        }
        for id in batch.remove {
            if let Ok(id) = AgentId::parse(&id) {
                self.remove(&node, &id);
            }
        }
        for (id, agent) in batch.upsert {
            if let Ok(id) = AgentId::parse(&id) {
                self.upsert(&node, id, agent);
            }
        }
    }

    fn node_entry(&mut self, node: &str) -> &mut NodeView {
        self.nodes
            .entry(node.to_owned())
            .or_insert_with(|| NodeView {
                summary: None,
                seq: None,
                agents: HashSet::new(),
                resync: true,
                behind: None,
            })
    }

    fn upsert(&mut self, node: &str, id: AgentId, agent: RemoteAgent) {
        self.node_entry(node).agents.insert(id.clone());
        self.by_agent
            .entry(id)
            .or_default()
            .insert(node.to_owned(), agent);
    }

    fn remove(&mut self, node: &str, id: &AgentId) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.agents.remove(id);
        }
        if let Some(nodes) = self.by_agent.get_mut(id) {
            nodes.remove(node);
            if nodes.is_empty() {
                self.by_agent.remove(id);
            }
        }
    }

    fn clear_agents(&mut self, node: &str) {
        let ids: Vec<AgentId> = self
            .nodes
            .get_mut(node)
            .map(|n| n.agents.drain().collect())
            .unwrap_or_default();
        for id in ids {
            if let Some(nodes) = self.by_agent.get_mut(&id) {
                nodes.remove(node);
                if nodes.is_empty() {
                    self.by_agent.remove(&id);
                }
            }
        }
    }

    /// A node whose summary expired: it and its agents leave the view.
    fn drop_node(&mut self, node: &str) {
        self.clear_agents(node);
        self.nodes.remove(node);
    }
}

/// The background task: publishes this node, follows the others.
struct Publisher {
    fleet: Fleet,
    driver: RedisDriver,
    registry: AgentRegistry,
    timing: FleetTiming,
    /// Number of the last batch this node wrote.
    seq: u64,
    /// The next publication writes the whole state (at start, after a failure or a
    /// reconnection).
    need_full: bool,
}

impl Publisher {
    async fn run(
        &mut self,
        mut messages: socketioxide_redis::drivers::MessageStream<
            socketioxide_redis::drivers::ChanItem,
        >,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.timing.publish_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reconnected = self.driver.status().reconnected();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.publish().await {
                        tracing::debug!(error = %e, "fleet publication failed; retrying in full");
                        self.need_full = true;
                        continue;
                    }
                    if let Err(e) = self.refresh().await {
                        tracing::debug!(error = %e, "reading the other nodes failed");
                    }
                }
                Some((_, payload)) = messages.next() => self.receive(&payload),
                Ok(()) = reconnected.changed() => {
                    // Messages were lost while cut off, and a restarted Redis may hold
                    // nothing: write everything, read everyone.
                    self.need_full = true;
                    for node in self.fleet.view().nodes.values_mut() {
                        node.resync = true;
                    }
                }
                _ = shutdown.cancelled() => {
                    self.leave().await;
                    return;
                }
            }
        }
    }

    /// Writes the changed agents (or all of them) and this node's summary, then
    /// announces the batch.
    async fn publish(&mut self) -> Result<(), DriverError> {
        let me = self.fleet.node_id().to_owned();
        let full = self.need_full;
        let (upsert, remove) = if full {
            // Changes recorded so far are contained in the full state.
            self.registry.take_changed();
            let upsert = self
                .registry
                .live_entries()
                .iter()
                .filter_map(|(id, s)| RemoteAgent::of(s).map(|a| (id.to_string(), a)))
                .collect::<BTreeMap<_, _>>();
            (upsert, Vec::new())
        } else {
            let mut upsert = BTreeMap::new();
            let mut remove = Vec::new();
            for id in self.registry.take_changed() {
                match self.registry.get(&id).as_ref().and_then(RemoteAgent::of) {
                    Some(agent) => {
                        upsert.insert(id.to_string(), agent);
                    }
                    None => remove.push(id.to_string()),
                }
            }
            (upsert, remove)
        };
        let changed = full || !upsert.is_empty() || !remove.is_empty();
        let seq = if changed { self.seq + 1 } else { self.seq };
        let ttl = self.timing.node_timeout.as_millis() as u64;
        let key = agents_key(&me);
        let mut pipe = redis::pipe();
        if full {
            pipe.del(&key).ignore();
        }
        if changed {
            let mut fields: Vec<(String, String)> = Vec::with_capacity(upsert.len() + 1);
            fields.push((SEQ_FIELD.to_owned(), seq.to_string()));
            for (id, agent) in &upsert {
                fields.push((id.clone(), json(agent)));
            }
            pipe.hset_multiple(&key, &fields).ignore();
            if !remove.is_empty() {
                pipe.hdel(&key, &remove).ignore();
            }
        }
        let summary = self
            .fleet
            .own_summary(&self.registry, OffsetDateTime::now_utc(), seq);
        pipe.pexpire(&key, ttl as i64)
            .ignore()
            .pset_ex(node_key(&me), json(&summary), ttl)
            .ignore()
            .sadd(NODES_KEY, &me)
            .ignore();
        self.driver.pipeline::<()>(&pipe).await?;
        self.seq = seq;
        self.need_full = false;
        if changed {
            let batch = Batch {
                node: me,
                seq,
                full,
                upsert,
                remove,
            };
            // A lost announcement is healed by the readers' gap detection.
            let _ = self
                .driver
                .publish(CHANNEL.to_owned(), json(&batch).into_bytes())
                .await;
        }
        Ok(())
    }

    /// Reads the summaries of every node, drops the expired ones, reads the hash of
    /// those that need it.
    async fn refresh(&mut self) -> Result<(), DriverError> {
        let me = self.fleet.node_id().to_owned();
        let ids: Vec<String> = self
            .driver
            .query(redis::cmd("SMEMBERS").arg(NODES_KEY))
            .await?;
        let others: Vec<String> = ids.into_iter().filter(|id| *id != me).collect();
        tracing::trace!(?others, "fleet: other nodes");
        let mut pipe = redis::pipe();
        for id in &others {
            pipe.get(node_key(id));
        }
        let summaries: Vec<Option<String>> = if others.is_empty() {
            Vec::new()
        } else {
            self.driver.pipeline(&pipe).await?
        };
        tracing::trace!(?summaries, "fleet: summaries");
        let mut gone = Vec::new();
        let mut to_read = Vec::new();
        {
            let mut view = self.fleet.view();
            let known: Vec<String> = view.nodes.keys().cloned().collect();
            for (id, summary) in others.iter().zip(summaries) {
                match summary.and_then(|s| serde_json::from_str::<NodeSummary>(&s).ok()) {
                    Some(summary) => {
                        let entry = view.node_entry(id);
                        let applied = entry.seq.unwrap_or(0);
                        if applied >= summary.seq {
                            entry.behind = None;
                        } else {
                            // Still missing a batch that was written a tick ago: its
                            // announcement is lost.
                            if entry.behind.is_some_and(|seen| applied < seen) {
                                entry.resync = true;
                            }
                            entry.behind = Some(summary.seq);
                        }
                        // The same node id started again: its batch numbers restarted.
                        if entry
                            .summary
                            .as_ref()
                            .is_some_and(|old| old.started_at_ms != summary.started_at_ms)
                        {
                            entry.resync = true;
                        }
                        entry.summary = Some(summary);
                        if entry.resync {
                            to_read.push(id.clone());
                        }
                    }
                    None => gone.push(id.clone()),
                }
            }
            // Nodes that are in the view but no longer in the set.
            for id in known {
                if !others.contains(&id) {
                    gone.push(id);
                }
            }
            for id in &gone {
                if view.nodes.contains_key(id) {
                    tracing::info!(node = %id, "cluster node gone (not heard from within node_timeout)");
                }
                view.drop_node(id);
            }
        }
        if !gone.is_empty() {
            let mut pipe = redis::pipe();
            for id in &gone {
                pipe.srem(NODES_KEY, id).ignore();
            }
            // Another node may have come back meanwhile: its next tick adds it again.
            self.driver.pipeline::<()>(&pipe).await?;
        }
        for id in to_read {
            tracing::debug!(node = %id, "fleet: reading a node's agents in full");
            let fields: HashMap<String, String> = self
                .driver
                .query(redis::cmd("HGETALL").arg(agents_key(&id)))
                .await?;
            let seq = fields
                .get(SEQ_FIELD)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let agents = fields
                .into_iter()
                .filter(|(k, _)| k != SEQ_FIELD)
                .filter_map(|(k, v)| serde_json::from_str(&v).ok().map(|a| (k, a)))
                .collect();
            self.fleet.view().replace(&id, seq, agents);
        }
        Ok(())
    }

    fn receive(&self, payload: &[u8]) {
        match serde_json::from_slice::<Batch>(payload) {
            Ok(batch) if batch.node == self.fleet.node_id() => {}
            Ok(batch) => self.fleet.view().apply(batch),
            Err(e) => tracing::warn!(error = %e, "undecodable fleet batch"),
        }
    }

    /// Graceful stop: this node's agents leave the other nodes' view at their next tick.
    async fn leave(&self) {
        let me = self.fleet.node_id();
        let mut pipe = redis::pipe();
        pipe.del(agents_key(me))
            .ignore()
            .del(node_key(me))
            .ignore()
            .srem(NODES_KEY, me)
            .ignore();
        if let Err(e) = self.driver.pipeline::<()>(&pipe).await {
            tracing::debug!(error = %e, "could not remove this node from the fleet; it expires");
        }
    }
}

fn json<T: Serialize>(v: &T) -> String {
    // Serializing these plain structs (strings, numbers, JSON values) cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(ms: i64) -> RemoteAgent {
        RemoteAgent {
            sessions: vec![RemoteSession {
                sid: "s".into(),
                remote_addr: "127.0.0.1:1".into(),
                connected_at_ms: ms,
                fingerprint: None,
            }],
            last_heartbeat: None,
        }
    }

    fn batch(seq: u64, upsert: &[(&str, i64)], remove: &[&str]) -> Batch {
        Batch {
            node: "b".into(),
            seq,
            full: false,
            upsert: upsert
                .iter()
                .map(|(id, ms)| (id.to_string(), agent(*ms)))
                .collect(),
            remove: remove.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn ids(view: &View) -> Vec<String> {
        view.by_agent.keys().map(|k| k.to_string()).collect()
    }

    #[test]
    fn batches_apply_in_order_and_a_gap_asks_for_a_resync() {
        let mut view = View::default();
        // Unknown node: nothing applied until its hash is read.
        view.apply(batch(1, &[("x", 1)], &[]));
        assert!(view.by_agent.is_empty());
        assert!(view.nodes["b"].resync);
        view.replace("b", 1, [("x".to_owned(), agent(1))].into());
        view.apply(batch(2, &[("y", 2)], &["x"]));
        assert_eq!(ids(&view), ["y"]);
        // Already in the hash that was read.
        view.apply(batch(2, &[("z", 3)], &[]));
        assert_eq!(ids(&view), ["y"]);
        // Batch 3 lost.
        view.apply(batch(4, &[("z", 3)], &[]));
        assert_eq!(ids(&view), ["y"]);
        assert!(view.nodes["b"].resync);
    }

    #[test]
    fn a_dropped_node_takes_its_agents_but_not_another_nodes() {
        let mut view = View::default();
        view.replace("b", 1, [("x".to_owned(), agent(1))].into());
        view.replace(
            "c",
            1,
            [("x".to_owned(), agent(5)), ("y".to_owned(), agent(2))].into(),
        );
        assert_eq!(
            newest(&view.by_agent[&AgentId::parse("x").unwrap()]),
            Some(from_unix_ms(5))
        );
        view.drop_node("c");
        assert_eq!(ids(&view), ["x"]);
        assert_eq!(
            newest(&view.by_agent[&AgentId::parse("x").unwrap()]),
            Some(from_unix_ms(1))
        );
        view.drop_node("b");
        assert!(view.by_agent.is_empty());
    }
}
