//! The certificate store: which agent certificates are allowed in, indexed for the
//! handshake (by fingerprint) and for the API (by agent id), persisted by a backend.
//!
//! Reads are lock-light and synchronous because the verifier runs inside rustls, which
//! cannot await; writes go to the backend first and reach the index only once durable, so
//! a failed write never leaves an agent half-stored.

pub mod cert;
pub(crate) mod file;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, RwLock};

pub use cert::{CertError, StoredCert};
use file::{FileBackend, Skipped};

use crate::identity::{AgentId, AgentIdentity, Fingerprint};

/// Cheap-to-clone handle on the shared store.
#[derive(Clone, Debug)]
pub struct CertStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    backend: FileBackend,
    /// Held (no `.await` inside) only for map operations, never across I/O.
    index: RwLock<Index>,
    /// Serialises writers so that backend order and index order agree.
    write_lock: tokio::sync::Mutex<()>,
}

/// The in-memory index every backend feeds: the handshake reads it by fingerprint, the
/// API by agent id, in order, so that a page of certificates or agents is a range read.
#[derive(Debug, Default)]
struct Index {
    by_fingerprint: HashMap<Fingerprint, Arc<StoredCert>>,
    by_agent: BTreeMap<AgentId, Arc<StoredCert>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("certificate store I/O error: {0}")]
    Io(#[from] io::Error),
}

/// What `put` changed.
#[derive(Debug)]
pub struct PutOutcome {
    pub stored: Arc<StoredCert>,
    /// The certificate it replaced, if the agent had a different one.
    pub replaced: Option<Arc<StoredCert>>,
}

impl CertStore {
    /// Opens the file store at `dir`, loading every certificate in it.
    pub fn open(dir: &Path) -> Result<(Self, Vec<Skipped>), StoreError> {
        let backend = FileBackend::open(dir)?;
        let (certs, skipped) = backend.load_all()?;
        Ok((Self::from_parts(backend, certs), skipped))
    }

    /// A store on `dir` whose index holds `certs`, which exist only in memory: they are
    /// neither read from nor written to `dir`, and are gone when the store is dropped.
    /// The directory itself is not loaded either. For benchmarks and tests that need a
    /// store of a million certificates without writing a million files; a server never
    /// opens its store this way. Later `put`/`remove` calls behave as usual.
    pub fn open_with_indexed(dir: &Path, certs: Vec<StoredCert>) -> Result<Self, StoreError> {
        Ok(Self::from_parts(FileBackend::open(dir)?, certs))
    }

    fn from_parts(backend: FileBackend, certs: Vec<StoredCert>) -> Self {
        let mut index = Index::with_capacity(certs.len());
        for cert in certs {
            index.insert(Arc::new(cert));
        }
        let shared = Shared {
            backend,
            index: RwLock::new(index),
            write_lock: tokio::sync::Mutex::new(()),
        };
        Self {
            shared: Arc::new(shared),
        }
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

    /// Stores `cert` for its agent, replacing any previous one; durable before it is visible.
    pub async fn put(&self, cert: StoredCert) -> Result<PutOutcome, StoreError> {
        let _writer = self.shared.write_lock.lock().await;
        let cert = Arc::new(cert);
        let shared = self.shared.clone();
        let to_write = cert.clone();
        tokio::task::spawn_blocking(move || shared.backend.write(&to_write))
            .await
            .map_err(|e| io::Error::other(e.to_string()))??;
        let replaced = self.write().insert(cert.clone());
        let replaced = replaced.filter(|old| old.fingerprint != cert.fingerprint);
        Ok(PutOutcome {
            stored: cert,
            replaced,
        })
    }

    /// Removes the agent's certificate; returns it, or `None` if there was none.
    pub async fn remove(&self, agent_id: &AgentId) -> Result<Option<Arc<StoredCert>>, StoreError> {
        let _writer = self.shared.write_lock.lock().await;
        if self.by_agent(agent_id).is_none() {
            return Ok(None);
        }
        let shared = self.shared.clone();
        let id = agent_id.clone();
        tokio::task::spawn_blocking(move || shared.backend.remove(&id))
            .await
            .map_err(|e| io::Error::other(e.to_string()))??;
        Ok(self.write().remove(agent_id))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        // A poisoned lock means a panic while holding it; the maps are still consistent
        // because every mutation is a single insert/remove pair below.
        self.shared.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.shared.index.write().unwrap_or_else(|p| p.into_inner())
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
