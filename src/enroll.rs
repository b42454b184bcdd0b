//! One-time install tokens for agent enrollment, and the metadata agents register with.
//!
//! The backend asks for a token for one agent id (`POST /install-tokens`); the agent's
//! installer presents it once with its own certificate (`POST /agent/register`). Only the
//! SHA-256 of a token is kept, so a copy of the state does not hand out tokens, and tokens
//! survive a restart. Where they are kept follows the certificate store: one node keeps
//! them in `<data_dir>/enrollment.json` (atomic writes); a cluster keeps them in Redis,
//! where one script consumes the token and stores the certificate, so two nodes redeeming
//! one token at the same instant cannot both succeed (see `crate::store::redis`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::clock::{Clock, rfc3339_unix};
use crate::digest::{hex, sha256_hex};
use crate::fsutil::write_atomic;
use crate::identity::AgentId;
use crate::store::redis::{KEEP_SPENT_SECS, Redeemed, random_hex};
use crate::store::{CertError, CertStore, PutOutcome, StoreError, StoredCert};

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
    Files {
        path: PathBuf,
        /// A tokio Mutex: held across the registration (validation, store write, file
        /// write) so that one token cannot be redeemed twice concurrently.
        state: Mutex<State>,
    },
    /// In Redis, through the store's connection.
    Shared,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    /// SHA-256 (hex) of the token -> its record.
    tokens: BTreeMap<String, TokenRecord>,
    metadata: BTreeMap<AgentId, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRecord {
    agent_id: AgentId,
    created_at: i64,
    expires_at: i64,
    used_at: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
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
    /// Opens the enrollment state that goes with `store`: `<data_dir>/enrollment.json`
    /// (creating the directory if needed) for the file store, Redis for the shared one.
    /// Token times are read from `clock`.
    pub fn open(data_dir: &Path, clock: Clock, store: CertStore) -> Result<Self, EnrollError> {
        let backend = if store.is_shared() {
            Backend::Shared
        } else {
            open_file(data_dir)?
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
            Backend::Files { state, .. } => {
                let mut state = state.lock().await;
                state.tokens.retain(|_, r| {
                    r.expires_at.max(r.used_at.unwrap_or(0)) + KEEP_SPENT_SECS > now
                });
                let record = TokenRecord {
                    agent_id,
                    created_at: now,
                    expires_at,
                    used_at: None,
                };
                state.tokens.insert(hash(&token), record);
                self.persist(&state).await?;
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
            Backend::Files { state, .. } => {
                let mut state = state.lock().await;
                let record = state.tokens.get(&token_hash);
                check(
                    record.map(|r| (r.agent_id.as_str(), r.expires_at, r.used_at.is_some())),
                    agent_id,
                    now,
                )?;
                let cert = validate()?;
                let outcome = self.inner.store.put(cert).await?;
                if let Some(record) = state.tokens.get_mut(&token_hash) {
                    record.used_at = Some(now);
                }
                state.metadata.insert(agent_id.clone(), metadata);
                self.persist(&state).await?;
                Ok(outcome)
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

    /// The metadata the agent registered with. On Redis, a failed read is logged and
    /// shown as no metadata: it decorates a view, it decides nothing.
    pub async fn metadata(&self, agent_id: &AgentId) -> Option<Value> {
        match &self.inner.backend {
            Backend::Files { state, .. } => state.lock().await.metadata.get(agent_id).cloned(),
            Backend::Shared => {
                let sync = self.shared().ok()?;
                match sync.redis.metadata(agent_id).await {
                    Ok(text) => text.and_then(|t| serde_json::from_str(&t).ok()),
                    Err(e) => {
                        sync.metrics.state_redis_error();
                        tracing::warn!(%agent_id, error = %e, "agent metadata not read from Redis");
                        None
                    }
                }
            }
        }
    }

    /// Forgets an agent's metadata (its certificate was deleted). On Redis the deletion
    /// script already removed it, in the same step as the certificate.
    pub async fn forget(&self, agent_id: &AgentId) -> Result<(), StoreError> {
        if let Backend::Files { state, .. } = &self.inner.backend {
            let mut state = state.lock().await;
            if state.metadata.remove(agent_id).is_some() {
                self.persist(&state).await?;
            }
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

    async fn persist(&self, state: &State) -> Result<(), StoreError> {
        let Backend::Files { path, .. } = &self.inner.backend else {
            return Ok(());
        };
        let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        let path = path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes, 0o600))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok(())
    }
}

fn open_file(data_dir: &Path) -> Result<Backend, EnrollError> {
    let path = data_dir.join("enrollment.json");
    let file_err = |message: String| EnrollError::File {
        path: path.clone(),
        message,
    };
    std::fs::create_dir_all(data_dir).map_err(|e| file_err(e.to_string()))?;
    let state = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| file_err(format!("not a valid enrollment file: {e}")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
        Err(e) => return Err(file_err(e.to_string())),
    };
    Ok(Backend::Files {
        path,
        state: Mutex::new(state),
    })
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
        let e = Enrollment::open(dir.path(), manual.clock(), store.clone()).unwrap();
        let a: AgentId = "a1".parse().unwrap();
        let b: AgentId = "b1".parse().unwrap();
        let (token, expires) = e.issue(a.clone(), 60).await.unwrap();
        assert_eq!(expires, 1060);
        let text = std::fs::read_to_string(dir.path().join("enrollment.json")).unwrap();
        assert!(!text.contains(&token), "token stored in clear");

        let e = Enrollment::open(dir.path(), manual.clock(), store.clone()).unwrap();
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
        let r = e.register(&token, &a, meta, || cert_for(&a)).await;
        assert_eq!(refused(r), TokenError::Used);
        assert_eq!(e.metadata(&a).await.unwrap()["site"], "x");
        let reopened = Enrollment::open(dir.path(), manual.clock(), store).unwrap();
        assert_eq!(reopened.metadata(&a).await.unwrap()["site"], "x");
    }
}
