//! `agentgate store import --from DIR`: loads a one-node certificate directory (the
//! `CERT_STORAGE_DIR` layout, `<agent_id>.pem`) into the shared state on Redis, once.
//!
//! An agent Redis already has is left alone (Redis is the source of truth once clustered,
//! and a later upload must not be undone by an old file), so running it twice imports
//! nothing the second time. Running nodes see each imported certificate at once: the
//! import publishes each change as an upload does.

use std::path::Path;

use super::file::{FileBackend, Skipped};
use super::redis::RedisState;
use super::{StoreError, sync};
use crate::config::ClusterConfig;

/// What an import did.
#[derive(Debug)]
pub struct ImportReport {
    /// Certificates written to Redis.
    pub imported: usize,
    /// Certificates of agents Redis already had a certificate for (left as they are).
    pub already_present: usize,
    /// Files that are not a loadable certificate for the agent their name says.
    pub unreadable: Vec<Skipped>,
}

/// Imports every certificate of `dir` into the Redis of `cluster`.
pub async fn import(cluster: &ClusterConfig, dir: &Path) -> Result<ImportReport, StoreError> {
    if !dir.is_dir() {
        return Err(StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is not a directory", dir.display()),
        )));
    }
    let dir_owned = dir.to_owned();
    let (certs, unreadable) = tokio::task::spawn_blocking(move || {
        FileBackend::open(&dir_owned).and_then(|f| f.load_all())
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))??;
    let redis = RedisState::connect(cluster).await?;
    if redis.ensure_epoch().await? {
        tracing::info!("new shared state created in Redis");
    }
    let mut report = ImportReport {
        imported: 0,
        already_present: 0,
        unreadable,
    };
    for cert in certs {
        match redis
            .import(&cert.agent_id, &cert.der, sync::unix_ms())
            .await?
        {
            Some(_) => report.imported += 1,
            None => report.already_present += 1,
        }
    }
    Ok(report)
}
