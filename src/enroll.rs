//! One-time install tokens for agent enrollment, and the metadata agents register with.
//!
//! The backend asks for a token for one agent id (`POST /install-tokens`); the agent's
//! installer presents it once with its own certificate (`POST /agent/register`). Only the
//! SHA-256 of a token is kept, so a copy of the state does not hand out tokens, and tokens
//! survive a restart. Where they are kept follows the certificate store: one node keeps
//! them in the `install_tokens` and `agent_metadata` tables of its database
//! (`<data_dir>/agentgate.db`, see `crate::store::install`), where one transaction
//! consumes the token and writes the certificate; a cluster keeps them in Redis, where one
//! script does the same. Either way two redemptions of one token at the same instant
//! cannot both succeed.
//!
//! Earlier versions kept a single node's tokens in `<data_dir>/enrollment.json`; at start
//! that file is imported into the database in one transaction and renamed to
//! `enrollment.json.migrated` (see [`Enrollment::open`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use serde_json::Value;

use crate::clock::{Clock, rfc3339_unix};
use crate::digest::{hex, sha256_hex};
use crate::identity::AgentId;
use crate::store::install::{self, ImportedToken};
use crate::store::redis::{KEEP_SPENT_SECS, Redeemed, random_hex};
use crate::store::{CertError, CertStore, Db, DbError, PutOutcome, StoreError, StoredCert};

/// The file earlier versions kept a single node's enrollment state in.
pub const LEGACY_FILE: &str = "enrollment.json";
/// What [`LEGACY_FILE`] is renamed to once imported; never read again.
pub const MIGRATED_FILE: &str = "enrollment.json.migrated";

#[derive(Clone)]
pub struct Enrollment {
    inner: Arc<Inner>,
}

struct Inner {
    /// Issue times, expiry checks and redemption times read this clock.
    clock: Clock,
    /// Where a registration stores the agent's certificate.
    store: CertStore,
    backend: Backend,
}

/// Where tokens and metadata are kept: the same choice as the certificate store's.
enum Backend {
    /// One node: the node's database.
    Db(Db),
    /// In Redis, through the store's connection.
    Shared,
}

/// The format of [`LEGACY_FILE`], as the version before the database wrote it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyState {
    /// SHA-256 (hex) of the token -> its record.
    tokens: BTreeMap<String, LegacyToken>,
    metadata: BTreeMap<AgentId, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyToken {
    agent_id: AgentId,
    created_at: i64,
    expires_at: i64,
    used_at: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Why a token was refused; each is a 401 with this text as its detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("install token is not valid")]
    Unknown,
    #[error("install token has already been used")]
    Used,
    #[error("install token was issued for another agent_id")]
    OtherAgent,
    #[error("install token expired at {0}")]
    Expired(String),
}

/// Why a registration did not happen; nothing was stored or consumed in any case.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Certificate(#[from] CertError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Enrollment {
    /// Opens the enrollment state that goes with `store`: Redis for the shared store,
    /// else the store's database (or, for a store opened without one, the database in
    /// `data_dir`), into which an `enrollment.json` left by an earlier version is
    /// imported first. Token times are read from `clock`.
    pub async fn open(
        data_dir: &Path,
        clock: Clock,
        store: CertStore,
    ) -> Result<Self, EnrollError> {
        let backend = if store.is_shared() {
            Backend::Shared
        } else {
            let db = store.db_or_open(data_dir)?;
            import_legacy(&db, data_dir).await?;
            Backend::Db(db)
        };
        Ok(Self {
            inner: Arc::new(Inner {
                clock,
                store,
                backend,
            }),
        })
    }

    /// Issues a token for `agent_id` valid for `ttl_secs` from now; returns it and its
    /// expiry.
    pub async fn issue(
        &self,
        agent_id: AgentId,
        ttl_secs: i64,
    ) -> Result<(String, i64), StoreError> {
        let now = self.inner.clock.unix();
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| std::io::Error::other("system random source failed"))?;
        let token = format!("agt_{}", hex(&bytes));
        let expires_at = now + ttl_secs;
        match &self.inner.backend {
            Backend::Db(db) => {
                install::issue(
                    db,
                    hash(&token),
                    agent_id.to_string(),
                    now,
                    expires_at,
                    KEEP_SPENT_SECS,
                )
                .await?;
            }
            Backend::Shared => {
                let sync = self.shared()?;
                sync.redis
                    .issue_token(&hash(&token), &agent_id, now, expires_at)
                    .await
                    .inspect_err(|_| sync.metrics.state_redis_error())?;
            }
        }
        Ok((token, expires_at))
    }

    /// Registers an agent with `token`: checks the token, then the certificate
    /// (`validate`, so that a bad token is told before a bad certificate), stores the
    /// certificate, consumes the token and records `metadata`.
    pub async fn register(
        &self,
        token: &str,
        agent_id: &AgentId,
        metadata: Value,
        validate: impl FnOnce() -> Result<StoredCert, CertError>,
    ) -> Result<PutOutcome, RegisterError> {
        let now = self.inner.clock.unix();
        let token_hash = hash(token);
        match &self.inner.backend {
            Backend::Db(db) => {
                let record = install::token(db, token_hash.clone()).await?;
                check(
                    record
                        .as_ref()
                        .map(|r| (r.agent_id.as_str(), r.expires_at, r.used)),
                    agent_id,
                    now,
                )?;
                let cert = validate()?;
                // Checked again inside the transaction: another redemption may have
                // consumed the token since the read above.
                let for_agent = agent_id.clone();
                let redeemed = self
                    .inner
                    .store
                    .redeem(db, token_hash, metadata.to_string(), now, cert, move |r| {
                        check(
                            r.map(|r| (r.agent_id.as_str(), r.expires_at, r.used)),
                            &for_agent,
                            now,
                        )
                    })
                    .await?;
                Ok(redeemed?)
            }
            Backend::Shared => {
                let sync = self.shared()?;
                let record = sync
                    .redis
                    .token(&token_hash)
                    .await
                    .inspect_err(|_| sync.metrics.state_redis_error())
                    .map_err(StoreError::from)?;
                check(
                    record
                        .as_ref()
                        .map(|r| (r.agent_id.as_str(), r.expires_at, r.used)),
                    agent_id,
                    now,
                )?;
                let cert = validate()?;
                let metadata = metadata.to_string();
                let nonce = random_hex(16).map_err(StoreError::from)?;
                let redeemed = sync
                    .redis
                    .register(
                        &token_hash,
                        agent_id,
                        &cert.der,
                        &metadata,
                        now,
                        &nonce,
                        crate::store::unix_ms(),
                    )
                    .await
                    .inspect_err(|_| sync.metrics.state_redis_error())
                    .map_err(StoreError::from)?;
                match redeemed {
                    Redeemed::Done(written) => {
                        Ok(self.inner.store.applied_put(sync, Arc::new(cert), &written))
                    }
                    Redeemed::Unknown => Err(TokenError::Unknown.into()),
                    Redeemed::Used => Err(TokenError::Used.into()),
                    Redeemed::OtherAgent => Err(TokenError::OtherAgent.into()),
                    Redeemed::Expired(at) => Err(TokenError::Expired(rfc3339_unix(at)).into()),
                }
            }
        }
    }

    /// The metadata the agent registered with. A failed read is logged and shown as no
    /// metadata: it decorates a view, it decides nothing.
    pub async fn metadata(&self, agent_id: &AgentId) -> Option<Value> {
        let text = match &self.inner.backend {
            Backend::Db(db) => install::metadata(db, agent_id.to_string())
                .await
                .inspect_err(|e| {
                    tracing::warn!(%agent_id, error = %e, "agent metadata not read from the database");
                })
                .ok()?,
            Backend::Shared => {
                let sync = self.shared().ok()?;
                sync.redis
                    .metadata(agent_id)
                    .await
                    .inspect_err(|e| {
                        sync.metrics.state_redis_error();
                        tracing::warn!(%agent_id, error = %e, "agent metadata not read from Redis");
                    })
                    .ok()?
            }
        };
        text.and_then(|t| serde_json::from_str(&t).ok())
    }

    /// Forgets an agent's metadata (its certificate was deleted). On Redis the deletion
    /// script already removed it, in the same step as the certificate.
    pub async fn forget(&self, agent_id: &AgentId) -> Result<(), StoreError> {
        if let Backend::Db(db) = &self.inner.backend {
            install::forget(db, agent_id.to_string()).await?;
        }
        Ok(())
    }

    fn shared(&self) -> Result<&crate::store::sync::RedisSync, StoreError> {
        self.inner.store.redis().ok_or_else(|| {
            // `open` chose `Shared` because the store is on Redis, and a store's backend
            // never changes.
            StoreError::Io(std::io::Error::other(
                "enrollment on Redis without a shared store",
            ))
        })
    }
}

/// Imports `<data_dir>/enrollment.json` (the state of the version before the database)
/// into `db` in one transaction, then renames it to `enrollment.json.migrated`. A start
/// that crashed between the two imports again: rows already there are kept, so the
/// second import changes nothing.
async fn import_legacy(db: &Db, data_dir: &Path) -> Result<(), EnrollError> {
    let path = data_dir.join(LEGACY_FILE);
    let file_err = |message: String| EnrollError::File {
        path: path.clone(),
        message,
    };
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(file_err(e.to_string())),
    };
    let state: LegacyState = serde_json::from_slice(&bytes)
        .map_err(|e| file_err(format!("not a valid enrollment file: {e}")))?;
    let (tokens, metadata) = (state.tokens.len(), state.metadata.len());
    let rows = state
        .tokens
        .into_iter()
        .map(|(token_sha256, t)| ImportedToken {
            token_sha256,
            agent_id: t.agent_id.to_string(),
            created_at: t.created_at,
            expires_at: t.expires_at,
            used_at: t.used_at,
        })
        .collect();
    let entries = state
        .metadata
        .into_iter()
        .map(|(id, v)| (id.to_string(), v.to_string()))
        .collect();
    let (new_tokens, new_metadata) = install::import(db, rows, entries).await?;
    let migrated = data_dir.join(MIGRATED_FILE);
    std::fs::rename(&path, &migrated)
        .and_then(|()| std::fs::File::open(data_dir)?.sync_all())
        .map_err(|e| file_err(format!("imported, but not renamed to {MIGRATED_FILE}: {e}")))?;
    tracing::info!(
        from = %path.display(), renamed_to = %migrated.display(), tokens, metadata,
        new_tokens, new_metadata,
        "install tokens and agent metadata imported from enrollment.json into the database"
    );
    Ok(())
}

/// Whether a token whose record is `(agent_id, expires_at, used)` may register
/// `agent_id` at `now`; the same rules for both backends.
fn check(
    record: Option<(&str, i64, bool)>,
    agent_id: &AgentId,
    now: i64,
) -> Result<(), TokenError> {
    let (for_agent, expires_at, used) = record.ok_or(TokenError::Unknown)?;
    if used {
        return Err(TokenError::Used);
    }
    if for_agent != agent_id.as_str() {
        return Err(TokenError::OtherAgent);
    }
    if now >= expires_at {
        return Err(TokenError::Expired(rfc3339_unix(expires_at)));
    }
    Ok(())
}

fn hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;
    use crate::store::cert;

    fn cert_for(id: &AgentId) -> Result<StoredCert, CertError> {
        let generated = crate::certgen::generate(id, 30).unwrap();
        let der = cert::single_certificate_der(&generated.cert_pem)?;
        cert::parse_for(id.clone(), der)
    }

    #[tokio::test]
    async fn a_token_works_once_for_its_agent_until_it_expires_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertStore::open_with_indexed(&dir.path().join("certs"), vec![]).unwrap();
        let manual = ManualClock::new(time::OffsetDateTime::from_unix_timestamp(1000).unwrap());
        let e = Enrollment::open(dir.path(), manual.clock(), store.clone())
            .await
            .unwrap();
        let a: AgentId = "a1".parse().unwrap();
        let b: AgentId = "b1".parse().unwrap();
        let (token, expires) = e.issue(a.clone(), 60).await.unwrap();
        assert_eq!(expires, 1060);
        let db = std::fs::read(dir.path().join(crate::server::DB_FILE)).unwrap();
        assert!(
            !db.windows(token.len()).any(|w| w == token.as_bytes()),
            "token stored in clear"
        );
        drop(e);

        let e = Enrollment::open(dir.path(), manual.clock(), store.clone())
            .await
            .unwrap();
        manual.advance(Duration::from_secs(59));
        let refused = |r: Result<PutOutcome, RegisterError>| match r {
            Err(RegisterError::Token(t)) => t,
            other => panic!("expected a token error, got {other:?}"),
        };
        let meta = serde_json::json!({"site": "x"});
        let r = e
            .register("agt_nope", &a, meta.clone(), || cert_for(&a))
            .await;
        assert_eq!(refused(r), TokenError::Unknown);
        let r = e.register(&token, &b, meta.clone(), || cert_for(&b)).await;
        assert_eq!(refused(r), TokenError::OtherAgent);
        manual.advance(Duration::from_secs(1));
        let r = e.register(&token, &a, meta.clone(), || cert_for(&a)).await;
        assert_eq!(
            refused(r),
            TokenError::Expired("1970-01-01T00:17:40Z".into()),
            "at expiry"
        );
        assert!(store.is_empty(), "nothing stored by a refused registration");

        let (token, _) = e.issue(a.clone(), 60).await.unwrap();
        let done = e.register(&token, &a, meta.clone(), || cert_for(&a)).await;
        assert_eq!(done.unwrap().stored.agent_id, a);
        assert!(
            dir.path().join("certs").join("a1.pem").exists(),
            "certificate file written"
        );
        let r = e.register(&token, &a, meta, || cert_for(&a)).await;
        assert_eq!(refused(r), TokenError::Used);
        assert_eq!(e.metadata(&a).await.unwrap()["site"], "x");
        let reopened = Enrollment::open(dir.path(), manual.clock(), store.clone())
            .await
            .unwrap();
        assert_eq!(reopened.metadata(&a).await.unwrap()["site"], "x");
        reopened.forget(&a).await.unwrap();
        assert_eq!(reopened.metadata(&a).await, None);
    }

    /// Many redemptions of one token at once: the database runs their transactions one
    /// after the other, and only the first finds the token unused.
    #[tokio::test]
    async fn concurrent_redemptions_of_one_token_store_exactly_one_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertStore::open_with_indexed(&dir.path().join("certs"), vec![]).unwrap();
        let e = Enrollment::open(dir.path(), Clock::system(), store.clone())
            .await
            .unwrap();
        let a: AgentId = "race-1".parse().unwrap();
        let (token, _) = e.issue(a.clone(), 600).await.unwrap();
        let attempts: Vec<_> = (0..16)
            .map(|_| {
                let (e, a, token) = (e.clone(), a.clone(), token.clone());
                tokio::spawn(async move {
                    e.register(&token, &a, serde_json::json!({}), || cert_for(&a))
                        .await
                })
            })
            .collect();
        let mut done = 0;
        for attempt in attempts {
            match attempt.await.unwrap() {
                Ok(_) => done += 1,
                Err(RegisterError::Token(TokenError::Used)) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(done, 1);
        assert_eq!(store.len(), 1);
    }

    /// The file of the version before the database is imported once, renamed, and an
    /// import interrupted before the rename runs again without changing anything.
    #[tokio::test]
    async fn enrollment_json_is_imported_once_and_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertStore::open_with_indexed(&dir.path().join("certs"), vec![]).unwrap();
        let legacy = serde_json::json!({
            "tokens": {
                hash("agt_old"): {"agent_id": "old-1", "created_at": 100, "expires_at": 10_000, "used_at": null},
                hash("agt_spent"): {"agent_id": "old-2", "created_at": 100, "expires_at": 10_000, "used_at": 150},
            },
            "metadata": {"old-2": {"site": "s"}},
        });
        let file = dir.path().join(LEGACY_FILE);
        std::fs::write(&file, legacy.to_string()).unwrap();
        let manual = ManualClock::new(time::OffsetDateTime::from_unix_timestamp(200).unwrap());
        let e = Enrollment::open(dir.path(), manual.clock(), store.clone())
            .await
            .unwrap();
        assert!(!file.exists());
        assert!(dir.path().join(MIGRATED_FILE).exists());
        let old2: AgentId = "old-2".parse().unwrap();
        assert_eq!(e.metadata(&old2).await.unwrap()["site"], "s");
        let r = e
            .register("agt_spent", &old2, serde_json::json!({}), || {
                cert_for(&old2)
            })
            .await;
        assert!(
            matches!(r, Err(RegisterError::Token(TokenError::Used))),
            "{r:?}"
        );
        // As if the rename had not happened: the second import keeps what is there.
        std::fs::write(&file, legacy.to_string()).unwrap();
        let old1: AgentId = "old-1".parse().unwrap();
        e.register("agt_old", &old1, serde_json::json!({"n": 1}), || {
            cert_for(&old1)
        })
        .await
        .unwrap();
        drop(e);
        let e = Enrollment::open(dir.path(), manual.clock(), store)
            .await
            .unwrap();
        let r = e
            .register("agt_old", &old1, serde_json::json!({}), || cert_for(&old1))
            .await;
        assert!(
            matches!(r, Err(RegisterError::Token(TokenError::Used))),
            "{r:?}"
        );
        assert_eq!(e.metadata(&old1).await.unwrap()["n"], 1);
        // A file that is not the old format stops the start, naming the file.
        std::fs::write(&file, "{\"tokens\": 1}").unwrap();
        let err = Enrollment::open(
            dir.path(),
            Clock::system(),
            CertStore::open_with_indexed(&dir.path().join("c2"), vec![]).unwrap(),
        )
        .await
        .err()
        .unwrap();
        assert!(err.to_string().contains("enrollment.json"), "{err}");
    }
}
