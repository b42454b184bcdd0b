//! The certificate store: which agent certificates are allowed in, indexed for the
//! handshake (by fingerprint) and for the API (by agent id), persisted by a backend:
//! [`file`] for one node, `redis` for a cluster (`[cluster]`), where `sync` keeps the
//! index in step with Redis.
//!
//! Reads are lock-light and synchronous because the verifier runs inside rustls, which
//! cannot await; writes go to the backend first and reach the index only once durable, so
//! a failed write never leaves an agent half-stored. On Redis, changes made by other
//! nodes reach the index through pub/sub, and the gateway is told of each
//! ([`CertStore::on_remote_change`]) to close the sessions of revoked certificates.
//!
//! The other state of a node lives beside the certificates on the same backend: `db`
//! (one node's SQLite database), with `install` (install tokens and agent metadata) and
//! `tokens` (API tokens, revocations, audit) each holding its database side and its
//! Redis side together. The store also holds the in-memory set of revoked JWT ids
//! ([`CertStore::revocations`]) that `tokens` keeps in step.

pub mod cert;
pub(crate) mod db;
pub(crate) mod file;
pub mod import;
pub(crate) mod install;
pub(crate) mod redis;
pub(crate) mod routes;
pub(crate) mod sync;
pub(crate) mod tokens;
pub(crate) mod watch;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

pub use cert::{CertError, StoredCert};
pub(crate) use db::Db;
pub use db::DbError;
use file::{FileBackend, Skipped};
pub use redis::RedisError;
use redis::{RedisState, Written};
pub(crate) use sync::unix_ms;

use crate::auth::Revocations;
use crate::config::ClusterConfig;
use crate::identity::{AgentId, AgentIdentity, Fingerprint};
use crate::metrics::Metrics;

/// What the gateway runs for each change made elsewhere.
type ChangeHook = Box<dyn Fn(&Change) + Send + Sync>;

/// Cheap-to-clone handle on the shared store.
#[derive(Clone, Debug)]
pub struct CertStore {
    shared: Arc<Shared>,
}

struct Shared {
    backend: Backend,
    /// Held (no `.await` inside) only for map operations, never across I/O.
    index: RwLock<Index>,
    /// Serialises the file backend's writers so that file order and index order agree.
    /// Redis writes need no lock: Redis orders them, and the index applies them by
    /// sequence number (a hung Redis then holds up each request, not every upload).
    write_lock: tokio::sync::Mutex<()>,
    /// Told of every change this node did not make itself (pub/sub, resync); the gateway
    /// closes the sessions of revoked certificates there.
    on_remote_change: OnceLock<ChangeHook>,
    /// Files backend of a gateway: the embedded database for everything that is not a
    /// certificate (see [`db`]). `None` on Redis, which holds that state itself, and for
    /// stores opened by tools and tests with [`CertStore::open`].
    db: Option<Db>,
    /// The revoked JWT ids every JWT check reads (memory only), fed from this store: the
    /// database at start, Redis at every resync and through pub/sub (see [`tokens`]).
    revocations: Revocations,
    /// Routes registered at runtime, as stored (see [`routes`]).
    routes: routes::RuntimeRoutes,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// Where the certificates are durable. Both feed the same index; a later kind of state
/// (API tokens, routes) adds its keys and scripts to [`redis`] and its file to the
/// embedded side, not a second store.
#[derive(Debug)]
pub(crate) enum Backend {
    /// One node: `<dir>/<agent_id>.pem`.
    Files(FileBackend),
    /// `[cluster]`: Redis is the source of truth; the index follows it through pub/sub.
    Redis(sync::RedisSync),
}

/// The in-memory index every backend feeds: the handshake reads it by fingerprint, the
/// API by agent id, in order, so that a page of certificates or agents is a range read.
#[derive(Debug, Default)]
struct Index {
    by_fingerprint: HashMap<Fingerprint, Arc<StoredCert>>,
    by_agent: BTreeMap<AgentId, Arc<StoredCert>>,
    /// Redis backend only: the sequence number of the last change applied per agent,
    /// deletions included, so that a change that arrives late never undoes a newer one.
    seqs: HashMap<AgentId, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("certificate store I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("shared state: {0}")]
    Redis(#[from] RedisError),
    #[error("{0}")]
    Db(#[from] DbError),
}

/// What `put` changed.
#[derive(Debug)]
pub struct PutOutcome {
    pub stored: Arc<StoredCert>,
    /// The certificate it replaced, if the agent had a different one.
    pub replaced: Option<Arc<StoredCert>>,
}

/// A change of an agent's certificate that another node made (or that a resync found).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub agent_id: AgentId,
    /// The fingerprint that no longer holds for the agent.
    pub old: Fingerprint,
    /// The agent's certificate now, `None` if it was deleted.
    pub new: Option<Fingerprint>,
}

impl CertStore {
    /// Opens the file store at `dir`, loading every certificate in it, without the
    /// embedded database (tools and tests that need only certificates).
    pub fn open(dir: &Path) -> Result<(Self, Vec<Skipped>), StoreError> {
        let backend = FileBackend::open(dir)?;
        let (certs, skipped) = backend.load_all()?;
        Ok((
            Self::from_parts(Backend::Files(backend), certs, None),
            skipped,
        ))
    }

    /// A gateway's single-node store: the certificates in `dir`, everything else in the
    /// embedded database at `db` (created and migrated if needed).
    pub fn open_with_db(dir: &Path, db: &Path) -> Result<(Self, Vec<Skipped>), StoreError> {
        let backend = FileBackend::open(dir)?;
        let db = Db::open(db)?;
        let (certs, skipped) = backend.load_all()?;
        Ok((
            Self::from_parts(Backend::Files(backend), certs, Some(db)),
            skipped,
        ))
    }

    /// Opens the shared store of `[cluster]`: connects to Redis (an error if it is
    /// unreachable: a node does not start without the certificates of its cluster),
    /// subscribes to changes, loads every certificate, and keeps following Redis (a full
    /// resync after every reconnection) until the last handle is dropped.
    pub async fn open_shared(
        cluster: &ClusterConfig,
        metrics: Metrics,
    ) -> Result<Self, StoreError> {
        let redis = RedisState::connect(cluster).await?;
        if redis.ensure_epoch().await? {
            tracing::info!("new shared state created in Redis (first node of this cluster)");
        }
        let changes = redis.subscribe().await?;
        let store = Self::from_parts(
            Backend::Redis(sync::RedisSync::new(redis, metrics)),
            Vec::new(),
            None,
        );
        sync::start(&store, changes).await?;
        Ok(store)
    }

    /// A store on `dir` whose index holds `certs`, which exist only in memory: they are
    /// neither read from nor written to `dir`, and are gone when the store is dropped.
    /// The directory itself is not loaded either. For benchmarks and tests that need a
    /// store of a million certificates without writing a million files; a server never
    /// opens its store this way. Later `put`/`remove` calls behave as usual.
    pub fn open_with_indexed(dir: &Path, certs: Vec<StoredCert>) -> Result<Self, StoreError> {
        Ok(Self::from_parts(
            Backend::Files(FileBackend::open(dir)?),
            certs,
            None,
        ))
    }

    fn from_parts(backend: Backend, certs: Vec<StoredCert>, db: Option<Db>) -> Self {
        let mut index = Index::with_capacity(certs.len());
        for cert in certs {
            index.insert(Arc::new(cert));
        }
        let shared = Shared {
            backend,
            index: RwLock::new(index),
            write_lock: tokio::sync::Mutex::new(()),
            on_remote_change: OnceLock::new(),
            db,
            revocations: Revocations::new(),
            routes: routes::RuntimeRoutes::default(),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The Redis connection of the shared store (`None` on files).
    pub(crate) fn redis_driver(&self) -> Option<crate::cluster::RedisDriver> {
        match &self.shared.backend {
            Backend::Redis(sync) => Some(sync.redis.driver().clone()),
            Backend::Files(_) => None,
        }
    }

    /// Whether the store is the shared one on Redis.
    pub fn is_shared(&self) -> bool {
        matches!(self.shared.backend, Backend::Redis(_))
    }

    /// Calls `f` for every change made elsewhere (another node, or found by a resync),
    /// after the index has it. Set once, by the gateway; later calls are ignored.
    pub fn on_remote_change(&self, f: impl Fn(&Change) + Send + Sync + 'static) {
        let _ = self.shared.on_remote_change.set(Box::new(f));
    }

    /// The handshake lookup: O(1), no I/O.
    pub fn by_fingerprint(&self, fp: &Fingerprint) -> Option<Arc<StoredCert>> {
        self.read().by_fingerprint.get(fp).cloned()
    }

    pub fn by_agent(&self, agent_id: &AgentId) -> Option<Arc<StoredCert>> {
        self.read().by_agent.get(agent_id).cloned()
    }

    /// Whether `identity` still names the certificate stored for its agent.
    pub fn is_current(&self, identity: &AgentIdentity) -> bool {
        self.read()
            .by_fingerprint
            .get(&identity.fingerprint)
            .is_some_and(|c| c.agent_id == identity.agent_id)
    }

    pub fn len(&self) -> usize {
        self.read().by_agent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The earliest `notAfter` among stored certificates (one pass, no copy).
    pub fn earliest_not_after(&self) -> Option<i64> {
        self.read().by_agent.values().map(|c| c.not_after).min()
    }

    /// Every stored certificate, in agent id order: a copy of the whole index, for tools
    /// and tests; the API reads pages with [`CertStore::page_after`].
    pub fn list(&self) -> Vec<Arc<StoredCert>> {
        self.read().by_agent.values().cloned().collect()
    }

    /// Up to `n` certificates whose agent id comes after `after`, in agent id order.
    /// O(n + log N).
    pub fn page_after(&self, after: Option<&AgentId>, n: usize) -> Vec<Arc<StoredCert>> {
        self.read()
            .by_agent
            .range::<AgentId, _>((after_bound(after), Bound::Unbounded))
            .take(n)
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Up to `n` agent ids with a certificate after `after`, in order. O(n + log N).
    pub fn ids_after(&self, after: Option<&AgentId>, n: usize) -> Vec<AgentId> {
        self.read()
            .by_agent
            .range::<AgentId, _>((after_bound(after), Bound::Unbounded))
            .take(n)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Stores `cert` for its agent, replacing any previous one; durable before it is
    /// visible. On Redis, a failure (unreachable, no state) changes nothing anywhere.
    pub async fn put(&self, cert: StoredCert) -> Result<PutOutcome, StoreError> {
        let cert = Arc::new(cert);
        match &self.shared.backend {
            Backend::Files(_) => {
                let _writer = self.shared.write_lock.lock().await;
                let shared = self.shared.clone();
                let to_write = cert.clone();
                tokio::task::spawn_blocking(move || match &shared.backend {
                    Backend::Files(files) => files.write(&to_write),
                    Backend::Redis(_) => unreachable_backend(),
                })
                .await
                .map_err(|e| io::Error::other(e.to_string()))??;
                let replaced = self.write().insert(cert.clone());
                Ok(outcome(cert, replaced))
            }
            Backend::Redis(sync) => {
                let written = sync
                    .redis
                    .put(&cert.agent_id, &cert.der, sync::unix_ms())
                    .await
                    .inspect_err(|_| sync.metrics.state_redis_error())?;
                Ok(self.applied_put(sync, cert, &written))
            }
        }
    }

    /// Removes the agent's certificate; returns it, or `None` if there was none.
    pub async fn remove(&self, agent_id: &AgentId) -> Result<Option<Arc<StoredCert>>, StoreError> {
        match &self.shared.backend {
            Backend::Files(_) => {
                let _writer = self.shared.write_lock.lock().await;
                if self.by_agent(agent_id).is_none() {
                    return Ok(None);
                }
                let shared = self.shared.clone();
                let id = agent_id.clone();
                tokio::task::spawn_blocking(move || match &shared.backend {
                    Backend::Files(files) => files.remove(&id),
                    Backend::Redis(_) => unreachable_backend(),
                })
                .await
                .map_err(|e| io::Error::other(e.to_string()))??;
                Ok(self.write().remove(agent_id))
            }
            Backend::Redis(sync) => {
                let written = sync
                    .redis
                    .delete(agent_id, sync::unix_ms())
                    .await
                    .inspect_err(|_| sync.metrics.state_redis_error())?;
                // Redis, the source of truth, had none: if this node still holds one, the
                // deletion has not reached it yet and will.
                let Some((written, der)) = written else {
                    return Ok(None);
                };
                sync.note_epoch(&written.epoch);
                let local = self.write().apply(agent_id, None, written.seq).flatten();
                // What Redis deleted, even if this node had not heard of it yet.
                Ok(match local {
                    Some(old) => Some(old),
                    None => cert::parse_for(agent_id.clone(), der).ok().map(Arc::new),
                })
            }
        }
    }

    /// File backend: follows hand edits of the store directory (see [`watch`]) until
    /// `stop` is cancelled. Nothing to do on Redis, the source of truth there.
    pub(crate) fn watch_dir(&self, stop: tokio_util::sync::CancellationToken) {
        if let Backend::Files(files) = &self.shared.backend {
            watch::spawn(self.clone(), files.dir().to_owned(), stop);
        }
    }

    /// Brings the index in line with the directory as it is now: `seen` holds the files'
    /// stamps at the last look (only files whose stamp changed are read), the new stamps
    /// are returned. Removed and replaced certificates go through the change hook, which
    /// closes their sessions. Holds the writers' lock, so that an upload or a deletion
    /// through the API is never taken for a hand edit half-way.
    pub(crate) async fn rescan_dir(
        &self,
        dir: &Path,
        seen: HashMap<String, watch::Stamp>,
    ) -> HashMap<String, watch::Stamp> {
        let _writer = self.shared.write_lock.lock().await;
        let this = self.clone();
        let dir: PathBuf = dir.to_owned();
        let Ok((stamps, changes)) =
            tokio::task::spawn_blocking(move || this.rescan_blocking(&dir, seen)).await
        else {
            // Only a panic while parsing gets here; start afresh at the next look.
            return HashMap::new();
        };
        for change in &changes {
            self.notify(change);
        }
        stamps
    }

    fn rescan_blocking(
        &self,
        dir: &Path,
        seen: HashMap<String, watch::Stamp>,
    ) -> (HashMap<String, watch::Stamp>, Vec<Change>) {
        let Backend::Files(files) = &self.shared.backend else {
            return (seen, Vec::new());
        };
        let listed = match watch::list(dir) {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot list the certificate store directory");
                return (seen, Vec::new());
            }
        };
        let mut stamps = HashMap::with_capacity(listed.len());
        let mut present = HashSet::with_capacity(listed.len());
        let mut changes = Vec::new();
        for (stem, (path, stamp)) in listed {
            let changed = seen.get(&stem) != Some(&stamp);
            stamps.insert(stem.clone(), stamp);
            let Ok(agent_id) = AgentId::parse(&stem) else {
                if changed {
                    tracing::warn!(path = %path.display(), reason = "file name is not an agent id", "skipped file in certificate store");
                }
                continue;
            };
            if !changed {
                present.insert(agent_id);
                continue;
            }
            match files.load_one(&path, &stem) {
                Ok(cert) => {
                    let cert = Arc::new(cert);
                    let old = self.write().insert(cert.clone());
                    match old {
                        Some(old) if old.fingerprint != cert.fingerprint => {
                            changes.push(Change {
                                agent_id: agent_id.clone(),
                                old: old.fingerprint,
                                new: Some(cert.fingerprint),
                            });
                        }
                        Some(_) => {}
                        None => tracing::info!(
                            agent_id = %agent_id, fingerprint = %cert.fingerprint,
                            "certificate added in the store directory"
                        ),
                    }
                    present.insert(agent_id);
                }
                // Not present: a file that no longer holds a valid certificate for its
                // agent revokes the one it held.
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "skipped file in certificate store");
                }
            }
        }
        let gone: Vec<AgentId> = self
            .read()
            .by_agent
            .keys()
            .filter(|id| !present.contains(*id))
            .cloned()
            .collect();
        for agent_id in gone {
            if let Some(old) = self.write().remove(&agent_id) {
                changes.push(Change {
                    agent_id,
                    old: old.fingerprint,
                    new: None,
                });
            }
        }
        (stamps, changes)
    }

    /// The embedded database (single node opened by a gateway); see [`db`].
    pub(crate) fn db(&self) -> Option<&Db> {
        self.shared.db.as_ref()
    }

    /// The store's database, or for a store opened without one (by tools, tests and
    /// benchmarks) the one in `data_dir`, opened now.
    pub(crate) fn db_or_open(&self, data_dir: &Path) -> Result<Db, DbError> {
        match self.db() {
            Some(db) => Ok(db.clone()),
            None => Db::open(&data_dir.join(crate::server::DB_FILE)),
        }
    }

    /// The revoked JWT ids, kept in step with this store (see `store::tokens`).
    pub fn revocations(&self) -> &Revocations {
        &self.shared.revocations
    }

    /// The Redis side of the shared state, when clustered.
    pub(crate) fn redis(&self) -> Option<&sync::RedisSync> {
        match &self.shared.backend {
            Backend::Files(_) => None,
            Backend::Redis(sync) => Some(sync),
        }
    }

    /// Puts into the index a certificate that Redis accepted with `written`.
    pub(crate) fn applied_put(
        &self,
        sync: &sync::RedisSync,
        cert: Arc<StoredCert>,
        written: &Written,
    ) -> PutOutcome {
        sync.note_epoch(&written.epoch);
        let replaced = self
            .write()
            .apply(&cert.agent_id, Some(cert.clone()), written.seq)
            .flatten();
        outcome(cert, replaced)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        // A poisoned lock means a panic while holding it; the maps are still consistent
        // because every mutation is a single insert/remove pair below.
        self.shared.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.shared.index.write().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, change: &Change) {
        if let Some(f) = self.shared.on_remote_change.get() {
            f(change);
        }
    }
}

/// The closures above run on the backend they matched; the other arm cannot be reached
/// because a store's backend never changes after it is opened.
fn unreachable_backend() -> io::Result<()> {
    Err(io::Error::other("store backend changed while writing"))
}

fn outcome(cert: Arc<StoredCert>, replaced: Option<Arc<StoredCert>>) -> PutOutcome {
    let replaced = replaced.filter(|old| old.fingerprint != cert.fingerprint);
    PutOutcome {
        stored: cert,
        replaced,
    }
}

fn after_bound(after: Option<&AgentId>) -> Bound<&AgentId> {
    after.map_or(Bound::Unbounded, Bound::Excluded)
}

impl Index {
    fn with_capacity(n: usize) -> Self {
        Self {
            by_fingerprint: HashMap::with_capacity(n),
            by_agent: BTreeMap::new(),
            seqs: HashMap::new(),
        }
    }

    fn insert(&mut self, cert: Arc<StoredCert>) -> Option<Arc<StoredCert>> {
        let old = self.by_agent.insert(cert.agent_id.clone(), cert.clone());
        if let Some(old) = &old {
            self.by_fingerprint.remove(&old.fingerprint);
        }
        self.by_fingerprint.insert(cert.fingerprint, cert);
        old
    }

    fn remove(&mut self, agent_id: &AgentId) -> Option<Arc<StoredCert>> {
        let old = self.by_agent.remove(agent_id)?;
        self.by_fingerprint.remove(&old.fingerprint);
        Some(old)
    }

    /// Applies change `seq` of the agent unless a newer one is already applied: `None`
    /// when it was stale, else what the agent had before.
    fn apply(
        &mut self,
        agent_id: &AgentId,
        cert: Option<Arc<StoredCert>>,
        seq: u64,
    ) -> Option<Option<Arc<StoredCert>>> {
        if self.seqs.get(agent_id).is_some_and(|&done| done >= seq) {
            return None;
        }
        self.seqs.insert(agent_id.clone(), seq);
        Some(match cert {
            Some(cert) => self.insert(cert),
            None => self.remove(agent_id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(id: &str) -> Arc<StoredCert> {
        let id = AgentId::parse(id).unwrap();
        let generated = crate::certgen::generate(&id, 30).unwrap();
        let der = cert::single_certificate_der(&generated.cert_pem).unwrap();
        Arc::new(cert::parse_for(id, der).unwrap())
    }

    #[test]
    fn a_change_older_than_the_applied_one_is_refused_deletions_included() {
        let mut index = Index::default();
        let id = AgentId::parse("seq-1").unwrap();
        let (first, second) = (stored("seq-1"), stored("seq-1"));
        assert_eq!(index.apply(&id, Some(first.clone()), 5), Some(None));
        // Change 7 (this node's own write) lands before change 6 (another node's).
        assert_eq!(
            index.apply(&id, Some(second.clone()), 7),
            Some(Some(first.clone()))
        );
        assert_eq!(index.apply(&id, None, 6), None, "older deletion applied");
        assert_eq!(index.apply(&id, Some(first.clone()), 7), None, "replayed");
        assert_eq!(index.by_fingerprint.get(&second.fingerprint), Some(&second));
        assert!(!index.by_fingerprint.contains_key(&first.fingerprint));
        // A deletion leaves its number behind, so an older upload cannot resurrect it.
        assert_eq!(index.apply(&id, None, 8), Some(Some(second)));
        assert_eq!(index.apply(&id, Some(first), 7), None);
        assert!(index.by_agent.is_empty() && index.by_fingerprint.is_empty());
    }

    #[test]
    fn open_with_indexed_fills_the_index_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let id = AgentId::parse("indexed-1").unwrap();
        let generated = crate::certgen::generate(&id, 30).unwrap();
        let der = cert::single_certificate_der(&generated.cert_pem).unwrap();
        let stored = cert::parse_for(id.clone(), der).unwrap();
        let store = CertStore::open_with_indexed(dir.path(), vec![stored.clone()]).unwrap();
        assert_eq!(store.len(), 1);
        // Working out `self_signed` on the stored copy does not make it differ from `stored`.
        assert!(store.by_agent(&id).unwrap().self_signed());
        assert_eq!(
            store.by_fingerprint(&stored.fingerprint).as_deref(),
            Some(&stored)
        );
        assert_eq!(store.by_agent(&id).as_deref(), Some(&stored));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
