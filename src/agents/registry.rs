//! Who is connected: one entry per agent with its live Socket.IO sessions and its last
//! heartbeat. Kept after the last session ends so the API can show when an agent was last
//! seen; removed with the agent's certificate.
//!
//! Entries are ordered by agent id and indexed by status (connected, stale, disconnected),
//! so that a page of `GET /agents` reads only the entries it shows. Staleness changes
//! without any event (time passes), so the index keeps the connected agents that are
//! still fresh by their last sign of life as well, and every read first moves those
//! whose sign of life has fallen out of the `stale_after` window to the stale set: each
//! agent moves once per silence, in O(log n).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use socketioxide::socket::Sid;
use time::OffsetDateTime;

use crate::clock::Clock;
use crate::identity::{AgentId, Fingerprint};

/// What the registry says about an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    /// At least one live session, and a heartbeat or a connect within `stale_after`.
    Connected,
    /// At least one live session, silent for longer than `stale_after`.
    Stale,
    /// No live session.
    Disconnected,
}

impl AgentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Stale => "stale",
            Self::Disconnected => "disconnected",
        }
    }
}

/// Cheap-to-clone handle on the registry.
#[derive(Debug, Clone)]
pub struct AgentRegistry {
    /// A std Mutex: held only for map updates, never across an `.await`.
    inner: Arc<Mutex<Inner>>,
    clock: Clock,
    stale_after: Duration,
}

#[derive(Debug, Default)]
struct Inner {
    agents: BTreeMap<AgentId, AgentState>,
    anonymous: HashMap<Sid, Session>,
    /// Connected agents heard from within `stale_after`, by id...
    fresh: BTreeSet<AgentId>,
    /// ...and by their last sign of life, oldest first (the same agents).
    fresh_by_time: BTreeSet<(OffsetDateTime, AgentId)>,
    /// Connected agents silent for longer than `stale_after`.
    stale: BTreeSet<AgentId>,
    /// Entries without a live session.
    idle: BTreeSet<AgentId>,
    /// Agents changed since the last [`AgentRegistry::take_changed`], when the cluster
    /// publishes them (`None` on a single node: nothing to track).
    changed: Option<HashSet<AgentId>>,
    /// Counts every change of an entry (connect, heartbeat, disconnect, forget), so that a
    /// reader such as the console's live feed can tell in O(1) whether anything changed.
    generation: u64,
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

impl AgentState {
    /// The newest connect or heartbeat, if the agent has a live session.
    fn last_sign_of_life(&self) -> Option<OffsetDateTime> {
        let last_connect = self.sessions.iter().map(|s| s.connected_at).max()?;
        let last_heartbeat = self.last_heartbeat.as_ref().map(|h| h.received_at);
        Some(last_heartbeat.map_or(last_connect, |h| h.max(last_connect)))
    }
}

impl Default for AgentRegistry {
    /// The system clock and the default `stale_after` of 90 s.
    fn default() -> Self {
        Self::new(Clock::system(), Duration::from_secs(90))
    }
}

impl AgentRegistry {
    pub fn new(clock: Clock, stale_after: Duration) -> Self {
        Self {
            inner: Arc::default(),
            clock,
            stale_after,
        }
    }

    /// Starts recording which agents change, for [`AgentRegistry::take_changed`] (the
    /// cluster's fleet publication batches them instead of a Redis write per heartbeat).
    pub fn track_changes(&self) {
        self.lock().changed.get_or_insert_with(HashSet::new);
    }

    /// The agents changed since the last call (connect, heartbeat, disconnect, forget).
    pub fn take_changed(&self) -> Vec<AgentId> {
        match self.lock().changed.as_mut() {
            Some(set) => set.drain().collect(),
            None => Vec::new(),
        }
    }

    /// A number that changes whenever any entry changes (see `Inner::generation`).
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Every agent with at least one live session, with its entry (a full publication).
    pub fn live_entries(&self) -> Vec<(AgentId, AgentState)> {
        self.lock()
            .agents
            .iter()
            .filter(|(_, s)| !s.sessions.is_empty())
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect()
    }

    /// How long a connected agent may stay silent before it counts as stale.
    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }

    /// The clock the registry stamps connects, heartbeats and disconnects with.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn connect(&self, agent_id: Option<&AgentId>, session: Session) {
        let mut inner = self.lock();
        match agent_id {
            Some(id) => inner.update(id, |state| {
                state.disconnected_at = None;
                state.sessions.push(session);
            }),
            None => {
                inner.anonymous.insert(session.sid, session);
            }
        }
    }

    pub fn disconnect(&self, agent_id: Option<&AgentId>, sid: Sid) {
        let now = self.clock.now();
        let mut inner = self.lock();
        match agent_id {
            Some(id) => {
                if inner.agents.contains_key(id) {
                    inner.update(id, |state| {
                        state.sessions.retain(|s| s.sid != sid);
                        if state.sessions.is_empty() {
                            state.disconnected_at = Some(now);
                        }
                    });
                }
            }
            None => {
                inner.anonymous.remove(&sid);
            }
        }
    }

    pub fn heartbeat(&self, agent_id: &AgentId, heartbeat: Heartbeat) {
        let mut inner = self.lock();
        if inner.agents.contains_key(agent_id) {
            inner.update(agent_id, |state| state.last_heartbeat = Some(heartbeat));
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
        let mut inner = self.lock();
        inner.mark_changed(agent_id);
        inner.unplace(agent_id);
        inner.agents.remove(agent_id);
    }

    /// Number of agents with at least one live session (fresh or stale). O(1).
    pub fn connected_agents(&self) -> usize {
        let inner = self.lock();
        inner.fresh.len() + inner.stale.len()
    }

    /// Number of agents with `status` among those with a live session (`Connected`,
    /// `Stale`); for `Disconnected`, the registry entries without one. O(1) after the
    /// staleness sweep.
    pub fn count(&self, status: AgentStatus) -> usize {
        let inner = self.swept();
        match status {
            AgentStatus::Connected => inner.fresh.len(),
            AgentStatus::Stale => inner.stale.len(),
            AgentStatus::Disconnected => inner.idle.len(),
        }
    }

    pub fn anonymous_sessions(&self) -> usize {
        self.lock().anonymous.len()
    }

    /// The status of each of `ids` (registry entries or not), in one lock.
    pub fn statuses<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a AgentId>,
    ) -> Vec<(&'a AgentId, AgentStatus)> {
        let inner = self.swept();
        ids.into_iter().map(|id| (id, inner.status(id))).collect()
    }

    /// Up to `n` agent ids after `after`, in order: every entry when `status` is `None`,
    /// else the entries with that status. O(n · log N).
    pub fn ids_after(
        &self,
        status: Option<AgentStatus>,
        after: Option<&AgentId>,
        n: usize,
    ) -> Vec<AgentId> {
        let inner = self.swept();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let range = (from, Bound::Unbounded);
        match status {
            None => inner
                .agents
                .range::<AgentId, _>(range)
                .map(|(id, _)| id.clone())
                .take(n)
                .collect(),
            Some(AgentStatus::Connected) => inner
                .fresh
                .range::<AgentId, _>(range)
                .take(n)
                .cloned()
                .collect(),
            Some(AgentStatus::Stale) => inner
                .stale
                .range::<AgentId, _>(range)
                .take(n)
                .cloned()
                .collect(),
            Some(AgentStatus::Disconnected) => inner
                .idle
                .range::<AgentId, _>(range)
                .take(n)
                .cloned()
                .collect(),
        }
    }

    /// Copies of the entries of `ids` (`None` for ids without one), with their status.
    pub fn entries(&self, ids: &[AgentId]) -> Vec<(Option<AgentState>, AgentStatus)> {
        let inner = self.swept();
        ids.iter()
            .map(|id| (inner.agents.get(id).cloned(), inner.status(id)))
            .collect()
    }

    fn swept(&self) -> MutexGuard<'_, Inner> {
        let mut inner = self.lock();
        inner.sweep(self.clock.now() - self.stale_after);
        inner
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent before it can panic (each
        // update removes an agent from the status index, changes it, and puts it back), so
        // keep serving rather than poison every later call.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    /// Changes an agent's entry (created if missing) and re-indexes it.
    fn update(&mut self, id: &AgentId, change: impl FnOnce(&mut AgentState)) {
        self.mark_changed(id);
        self.unplace(id);
        change(self.agents.entry(id.clone()).or_default());
        self.place(id);
    }

    fn mark_changed(&mut self, id: &AgentId) {
        self.generation = self.generation.wrapping_add(1);
        if let Some(set) = self.changed.as_mut()
            && !set.contains(id)
        {
            set.insert(id.clone());
        }
    }

    /// Takes `id` out of the status index (before its entry changes).
    fn unplace(&mut self, id: &AgentId) {
        let Some(state) = self.agents.get(id) else {
            return;
        };
        match state.last_sign_of_life() {
            Some(t) => {
                self.fresh_by_time.remove(&(t, id.clone()));
                self.fresh.remove(id);
                self.stale.remove(id);
            }
            None => {
                self.idle.remove(id);
            }
        }
    }

    /// Puts `id` into the status index: fresh if it has a live session (the next sweep
    /// moves it to stale if its sign of life is already old), else idle.
    fn place(&mut self, id: &AgentId) {
        let Some(state) = self.agents.get(id) else {
            return;
        };
        match state.last_sign_of_life() {
            Some(t) => {
                self.fresh_by_time.insert((t, id.clone()));
                self.fresh.insert(id.clone());
            }
            None => {
                self.idle.insert(id.clone());
            }
        }
    }

    /// Moves every fresh agent last heard from before `cutoff` to the stale set.
    fn sweep(&mut self, cutoff: OffsetDateTime) {
        while let Some((t, _)) = self.fresh_by_time.first()
            && *t < cutoff
        {
            if let Some((_, id)) = self.fresh_by_time.pop_first() {
                self.fresh.remove(&id);
                self.stale.insert(id);
            }
        }
    }

    /// The status of `id`; valid after a sweep.
    fn status(&self, id: &AgentId) -> AgentStatus {
        if self.fresh.contains(id) {
            AgentStatus::Connected
        } else if self.stale.contains(id) {
            AgentStatus::Stale
        } else {
            AgentStatus::Disconnected
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn session(connected_at: OffsetDateTime) -> Session {
        Session {
            sid: Sid::new(),
            fingerprint: None,
            remote_addr: "127.0.0.1:1".parse().unwrap(),
            connected_at,
        }
    }

    fn id(s: &str) -> AgentId {
        AgentId::parse(s).unwrap()
    }

    #[test]
    fn stale_when_connected_and_silent_for_longer_than_the_window() {
        let manual = ManualClock::starting_now();
        let clock = manual.clock();
        let registry = AgentRegistry::new(clock.clone(), Duration::from_secs(90));
        let a = id("a");
        let status = |r: &AgentRegistry| r.statuses([&a])[0].1;
        assert_eq!(status(&registry), AgentStatus::Disconnected);
        let s = session(clock.now());
        let sid = s.sid;
        registry.connect(Some(&a), s);
        assert_eq!(status(&registry), AgentStatus::Connected);
        manual.advance(Duration::from_secs(90));
        assert_eq!(
            status(&registry),
            AgentStatus::Connected,
            "exactly at the window"
        );
        manual.advance(Duration::from_secs(1));
        assert_eq!(status(&registry), AgentStatus::Stale);
        assert_eq!(registry.count(AgentStatus::Stale), 1);
        registry.heartbeat(
            &a,
            Heartbeat {
                received_at: clock.now(),
                payload: Value::Null,
            },
        );
        assert_eq!(status(&registry), AgentStatus::Connected);
        assert_eq!(
            (
                registry.count(AgentStatus::Connected),
                registry.count(AgentStatus::Stale)
            ),
            (1, 0)
        );
        registry.disconnect(Some(&a), sid);
        assert_eq!(status(&registry), AgentStatus::Disconnected);
        assert_eq!(registry.count(AgentStatus::Disconnected), 1);
        assert_eq!(registry.get(&a).unwrap().disconnected_at, Some(clock.now()));
        registry.forget(&a);
        assert_eq!(registry.count(AgentStatus::Disconnected), 0);
        assert!(registry.get(&a).is_none());
    }

    #[test]
    fn pages_by_status_come_in_id_order_after_the_cursor() {
        let manual = ManualClock::starting_now();
        let clock = manual.clock();
        let registry = AgentRegistry::new(clock.clone(), Duration::from_secs(90));
        let old = clock.now() - Duration::from_secs(300);
        for (name, at) in [
            ("d", old),
            ("b", clock.now()),
            ("a", old),
            ("c", clock.now()),
        ] {
            registry.connect(Some(&id(name)), session(at));
        }
        let gone = session(clock.now());
        let gone_sid = gone.sid;
        registry.connect(Some(&id("e")), gone);
        registry.disconnect(Some(&id("e")), gone_sid);
        let ids = |v: Vec<AgentId>| v.iter().map(|i| i.to_string()).collect::<Vec<_>>();
        assert_eq!(
            ids(registry.ids_after(None, None, 10)),
            ["a", "b", "c", "d", "e"]
        );
        assert_eq!(ids(registry.ids_after(None, Some(&id("b")), 2)), ["c", "d"]);
        assert_eq!(
            ids(registry.ids_after(Some(AgentStatus::Connected), None, 10)),
            ["b", "c"]
        );
        assert_eq!(
            ids(registry.ids_after(Some(AgentStatus::Stale), Some(&id("a")), 10)),
            ["d"]
        );
        assert_eq!(
            ids(registry.ids_after(Some(AgentStatus::Disconnected), None, 10)),
            ["e"]
        );
    }
}
