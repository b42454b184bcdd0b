//! How a node's index follows the shared state in Redis: every change arrives on the
//! change channel and is applied in sequence order; a full resync (a scan of every
//! certificate, and the set of revoked API tokens) runs at start, after every reconnection to Redis (messages published
//! while a node was cut off are lost: pub/sub does not queue), after a gap in the sequence
//! numbers (a dropped message) and when Redis holds another epoch than the one followed.
//! Runtime routes (kind `route`, see `super::routes`) follow the same stream and resync.
//!
//! Correctness rests on three facts: the subscription is in place before a resync reads
//! anything (the driver resubscribes before it reports the reconnection), a change that
//! committed before the resync read the head is seen by the scan, and the per-agent
//! sequence numbers of the index refuse a change older than the one it holds.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use socketioxide_redis::drivers::{ChanItem, MessageStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::cert::{self, StoredCert};
use super::redis::{ChangeMessage, Changed, Head, RedisError, RedisState, ScanEntry};
use super::{CertStore, Change, Index, Shared, StoreError};
use crate::metrics::Metrics;

/// How often a resync that failed (Redis down, or without state) is tried again.
const RESYNC_RETRY: Duration = Duration::from_secs(1);

/// The Redis backend of a [`CertStore`]: the connection and what the node knows of the
/// change stream.
pub(crate) struct RedisSync {
    pub(crate) redis: RedisState,
    pub(crate) metrics: Metrics,
    /// A std Mutex: held only to read or update the two fields, never across `.await`.
    position: Mutex<Position>,
    /// Set when something (a local write seeing another epoch) asks for a resync.
    resync_wanted: AtomicBool,
    wake: Arc<Notify>,
    /// Stops the sync task when the store is dropped.
    stop: CancellationToken,
}

#[derive(Debug, Default)]
struct Position {
    /// The epoch the index follows; `None` before the first resync.
    epoch: Option<String>,
    /// Every change up to this sequence number is in the index (or superseded there).
    watermark: u64,
}

impl std::fmt::Debug for RedisSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSync")
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisSync {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RedisSync {
    pub(crate) fn new(redis: RedisState, metrics: Metrics) -> Self {
        Self {
            redis,
            metrics,
            position: Mutex::new(Position::default()),
            resync_wanted: AtomicBool::new(false),
            wake: Arc::new(Notify::new()),
            stop: CancellationToken::new(),
        }
    }

    /// A write answered with `epoch`: if it is not the one followed, Redis was replaced
    /// under this node, which resyncs.
    pub(crate) fn note_epoch(&self, epoch: &str) {
        if self.position().epoch.as_deref() != Some(epoch) {
            self.resync_wanted.store(true, Ordering::Relaxed);
            self.wake.notify_one();
        }
    }

    fn position(&self) -> std::sync::MutexGuard<'_, Position> {
        // Poisoned only by a panic between two field writes; the fields stay usable.
        self.position.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Loads the index from Redis (an error if that fails: the node does not start without
/// its cluster's certificates) and spawns the task that keeps it in step.
pub(crate) async fn start(
    store: &CertStore,
    changes: MessageStream<ChanItem>,
) -> Result<(), StoreError> {
    let sync = store
        .redis()
        .ok_or_else(|| StoreError::Io(std::io::Error::other("the store is not on Redis")))?;
    let reconnected = sync.redis.status().reconnected();
    resync(store).await?;
    tokio::spawn(follow(
        Arc::downgrade(&store.shared),
        changes,
        reconnected,
        sync.stop.clone(),
        sync.wake.clone(),
    ));
    Ok(())
}

/// The sync task: applies messages, resyncs when asked. Holds the store only weakly
/// while it waits, so it ends with the last handle.
async fn follow(
    shared: Weak<Shared>,
    mut changes: MessageStream<ChanItem>,
    mut reconnected: tokio::sync::watch::Receiver<u64>,
    stop: CancellationToken,
    wake: Arc<Notify>,
) {
    enum Event {
        Message(Vec<u8>),
        Reconnected,
        Retry,
        Woken,
    }
    let mut pending = false;
    let mut failures = 0u32;
    let mut retry = tokio::time::interval(RESYNC_RETRY);
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            msg = changes.next() => match msg {
                Some((_, payload)) => Event::Message(payload),
                None => return,
            },
            changed = reconnected.changed() => match changed {
                Ok(()) => Event::Reconnected,
                Err(_) => return,
            },
            _ = retry.tick(), if pending => Event::Retry,
            _ = wake.notified() => Event::Woken,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let store = CertStore { shared };
        let Some(sync) = store.redis() else { return };
        match event {
            Event::Message(payload) => pending |= !apply_message(&store, &payload),
            Event::Reconnected => {
                tracing::info!("Redis reconnected: resyncing the shared state");
                pending = true;
            }
            Event::Retry | Event::Woken => {}
        }
        pending |= sync.resync_wanted.swap(false, Ordering::Relaxed);
        if pending {
            match resync(&store).await {
                Ok(()) => {
                    pending = false;
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 && matches!(e, StoreError::Redis(RedisError::NoState)) {
                        tracing::error!(error = %e, "this node keeps the certificates it knows and refuses changes until Redis has agentgate state again");
                    } else if failures == 1 {
                        tracing::warn!(error = %e, "shared state resync failed; retrying every second");
                    } else {
                        tracing::debug!(error = %e, failures, "shared state resync failed again");
                    }
                }
            }
        }
    }
}

/// Applies one change message; false when the node must resync instead (another epoch, a
/// gap in the sequence).
fn apply_message(store: &CertStore, payload: &[u8]) -> bool {
    let Some(sync) = store.redis() else {
        return true;
    };
    let msg = match ChangeMessage::parse(payload) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "undecodable shared state change; resyncing");
            return false;
        }
    };
    sync.metrics
        .state_propagation((unix_ms() - msg.sent_ms).max(0) as f64 / 1000.0);
    {
        let mut position = sync.position();
        if position.epoch.as_deref() != Some(msg.epoch.as_str()) {
            tracing::warn!(epoch = %msg.epoch, "shared state change from another epoch; resyncing");
            return false;
        }
        if msg.seq <= position.watermark {
            return true;
        }
        if msg.seq > position.watermark + 1 {
            tracing::warn!(
                expected = position.watermark + 1,
                got = msg.seq,
                "shared state changes were lost (gap in the sequence); resyncing"
            );
            return false;
        }
        position.watermark = msg.seq;
    }
    let (agent_id, der) = match msg.change {
        Changed::Cert { agent_id, der } => (agent_id, der),
        Changed::Token(change) => {
            super::tokens::apply(store, change);
            return true;
        }
        Changed::Route { name, spec } => {
            super::routes::apply_message(store, &name, spec, msg.seq);
            return true;
        }
        Changed::Unknown(kind) => {
            tracing::debug!(
                kind,
                seq = msg.seq,
                "shared state change of a kind this version does not keep"
            );
            return true;
        }
    };
    let cert = match der {
        None => None,
        Some(der) => match cert::parse_for(agent_id.clone(), der) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                // Only a node of another version could have written it; the agent
                // cannot be served from it either way.
                tracing::warn!(%agent_id, error = %e, "unusable certificate in a shared state change; treating it as a deletion");
                None
            }
        },
    };
    let new = cert.as_ref().map(|c| c.fingerprint);
    let old = store.write().apply(&agent_id, cert, msg.seq).flatten();
    if let Some(old) = old
        && Some(old.fingerprint) != new
    {
        store.notify(&Change {
            agent_id,
            old: old.fingerprint,
            new,
        });
    }
    true
}

/// Replaces the index by what Redis holds now, telling the gateway of every certificate
/// that changed or went.
async fn resync(store: &CertStore) -> Result<(), StoreError> {
    let Some(sync) = store.redis() else {
        return Ok(());
    };
    let head: Head = sync
        .redis
        .head()
        .await
        .inspect_err(|_| sync.metrics.state_redis_error())?;
    let entries = sync
        .redis
        .scan_certs()
        .await
        .inspect_err(|_| sync.metrics.state_redis_error())?;
    super::tokens::reload(store).await?;
    let routes = super::routes::scan(sync).await?;
    let parsed = tokio::task::spawn_blocking(move || parse_all(entries))
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
    // Redis restored from an older backup keeps the epoch but goes back in sequence:
    // numbers this node holds would then refuse the changes written after the restore,
    // so it is handled as another epoch.
    let same_epoch = {
        let position = sync.position();
        let same = position.epoch.as_deref() == Some(head.epoch.as_str());
        if same && head.seq < position.watermark {
            tracing::warn!(
                redis_seq = head.seq,
                followed_seq = position.watermark,
                "Redis went back in its change sequence (restored from a backup?); reloading everything"
            );
        }
        same && head.seq >= position.watermark
    };
    let mut changes = Vec::new();
    let total = parsed.len();
    {
        let mut index = store.write();
        if !same_epoch {
            // Sequence numbers of another epoch mean nothing here.
            index.seqs.clear();
        }
        let mut present = HashSet::with_capacity(parsed.len());
        for (seq, cert) in parsed {
            let id = cert.agent_id.clone();
            let new = cert.fingerprint;
            present.insert(id.clone());
            if let Some(Some(old)) = index.apply(&id, Some(Arc::new(cert)), seq)
                && old.fingerprint != new
            {
                changes.push(Change {
                    agent_id: id,
                    old: old.fingerprint,
                    new: Some(new),
                });
            }
        }
        // An agent the scan did not return is gone, unless this node applied a change of
        // it after the head was read (the scan may or may not show such a change).
        let gone: Vec<_> = index
            .by_agent
            .keys()
            .filter(|id| {
                !present.contains(*id)
                    && (!same_epoch || index.seqs.get(*id).is_none_or(|&s| s <= head.seq))
            })
            .cloned()
            .collect();
        for id in gone {
            if let Some(old) = index.remove(&id) {
                index.seqs.insert(id.clone(), head.seq);
                changes.push(Change {
                    agent_id: id,
                    old: old.fingerprint,
                    new: None,
                });
            }
        }
    }
    super::routes::resync(store, routes, head.seq, same_epoch);
    let watermark = {
        let mut position = sync.position();
        position.watermark = if same_epoch {
            position.watermark.max(head.seq)
        } else {
            head.seq
        };
        position.epoch = Some(head.epoch);
        position.watermark
    };
    {
        // A deleted agent's sequence number only matters against changes newer than the
        // watermark (older messages are skipped anyway), so tombstones below it go.
        let mut index = store.write();
        let Index { by_agent, seqs, .. } = &mut *index;
        seqs.retain(|id, seq| *seq > watermark || by_agent.contains_key(id));
    }
    sync.metrics.state_resync();
    tracing::info!(
        certificates = total,
        changed = changes.len(),
        "shared state loaded from Redis"
    );
    for change in &changes {
        store.notify(change);
    }
    Ok(())
}

/// Fewest entries per parsing thread: below this a thread costs more than it saves.
const PARSE_CHUNK_MIN: usize = 256;

/// Parses what a scan returned on every core (a node serves nothing before its first
/// resync, as with the file backend's load); unusable entries are logged and left out.
fn parse_all(entries: Vec<ScanEntry>) -> Vec<(u64, StoredCert)> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(entries.len().div_ceil(PARSE_CHUNK_MIN))
        .max(1);
    let chunk = entries.len().div_ceil(threads).max(1);
    let mut entries = entries;
    let mut parts = Vec::with_capacity(threads);
    while entries.len() > chunk {
        let rest = entries.split_off(chunk);
        parts.push(entries);
        entries = rest;
    }
    parts.push(entries);
    std::thread::scope(|s| {
        let workers: Vec<_> = parts
            .into_iter()
            .map(|part| s.spawn(move || part.into_iter().filter_map(parse_one).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            // A worker only panics if parsing does, which would do the same on this
            // thread; re-raise it here rather than lose the certificates.
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

fn parse_one(entry: ScanEntry) -> Option<(u64, StoredCert)> {
    let parsed = entry.and_then(|(id, seq, der)| {
        cert::parse_for(id.clone(), der)
            .map(|c| (seq, c))
            .map_err(|e| format!("{id}: {e}"))
    });
    parsed
        .inspect_err(|e| tracing::warn!(error = %e, "unusable certificate in Redis; skipped"))
        .ok()
}

/// Wall-clock milliseconds, carried in change messages for the propagation metric.
pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
