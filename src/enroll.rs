//! One-time install tokens for agent enrollment, and the metadata agents register with.
//!
//! The backend asks for a token for one agent id (`POST /install-tokens`); the agent's
//! installer presents it once with its own certificate (`POST /agent/register`). Only the
//! SHA-256 of a token is kept, in `<data_dir>/enrollment.json` (atomic writes), so a copy
//! of the file does not hand out tokens, and tokens survive a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Mutex, MutexGuard};

use crate::clock::{Clock, rfc3339_unix};
use crate::digest::{hex, sha256_hex};
use crate::fsutil::write_atomic;
use crate::identity::AgentId;

/// How long used or expired token records are kept (for the "already used" answer).
const KEEP_SPENT_SECS: i64 = 7 * 86_400;

#[derive(Clone)]
pub struct Enrollment {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Issue times, expiry checks and redemption times read this clock.
    clock: Clock,
    /// A tokio Mutex: held across the registration (validation, store write, file write)
    /// so that one token cannot be redeemed twice concurrently.
    state: Mutex<State>,
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

impl Enrollment {
    /// Opens `<data_dir>/enrollment.json`, creating the directory if needed; token times
    /// are read from `clock`.
    pub fn open(data_dir: &Path, clock: Clock) -> Result<Self, EnrollError> {
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
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                clock,
                state: Mutex::new(state),
            }),
        })
    }

    /// Issues a token for `agent_id` valid for `ttl_secs` from now; returns it and its
    /// expiry.
    pub async fn issue(&self, agent_id: AgentId, ttl_secs: i64) -> std::io::Result<(String, i64)> {
        let now = self.inner.clock.unix();
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| std::io::Error::other("system random source failed"))?;
        let token = format!("agt_{}", hex(&bytes));
        let expires_at = now + ttl_secs;
        let mut state = self.inner.state.lock().await;
        state
            .tokens
            .retain(|_, r| r.expires_at.max(r.used_at.unwrap_or(0)) + KEEP_SPENT_SECS > now);
        let record = TokenRecord {
            agent_id,
            created_at: now,
            expires_at,
            used_at: None,
        };
        state.tokens.insert(hash(&token), record);
        self.persist(&state).await?;
        Ok((token, expires_at))
    }

    /// Locks enrollment for one registration.
    pub async fn begin(&self) -> Registration<'_> {
        Registration {
            enrollment: self,
            state: self.inner.state.lock().await,
        }
    }

    pub async fn metadata(&self, agent_id: &AgentId) -> Option<Value> {
        self.inner
            .state
            .lock()
            .await
            .metadata
            .get(agent_id)
            .cloned()
    }

    /// Forgets an agent's metadata (its certificate was deleted).
    pub async fn forget(&self, agent_id: &AgentId) -> std::io::Result<()> {
        let mut state = self.inner.state.lock().await;
        if state.metadata.remove(agent_id).is_some() {
            self.persist(&state).await?;
        }
        Ok(())
    }

    async fn persist(&self, state: &State) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes, 0o600))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }
}

/// One registration in progress: check the token, do the work, then redeem it.
pub struct Registration<'a> {
    enrollment: &'a Enrollment,
    state: MutexGuard<'a, State>,
}

impl Registration<'_> {
    /// Whether `token` may register `agent_id` now; consumes nothing.
    pub fn check(&self, token: &str, agent_id: &AgentId) -> Result<(), TokenError> {
        let now = self.enrollment.inner.clock.unix();
        let record = self
            .state
            .tokens
            .get(&hash(token))
            .ok_or(TokenError::Unknown)?;
        if record.used_at.is_some() {
            return Err(TokenError::Used);
        }
        if &record.agent_id != agent_id {
            return Err(TokenError::OtherAgent);
        }
        if now >= record.expires_at {
            return Err(TokenError::Expired(rfc3339_unix(record.expires_at)));
        }
        Ok(())
    }

    /// Marks `token` used and records the agent's metadata, durably.
    pub async fn redeem(
        mut self,
        token: &str,
        agent_id: &AgentId,
        metadata: Value,
    ) -> std::io::Result<()> {
        let now = self.enrollment.inner.clock.unix();
        if let Some(record) = self.state.tokens.get_mut(&hash(token)) {
            record.used_at = Some(now);
        }
        self.state.metadata.insert(agent_id.clone(), metadata);
        self.enrollment.persist(&self.state).await
    }
}

fn hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;

    #[tokio::test]
    async fn a_token_works_once_for_its_agent_until_it_expires_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let manual = ManualClock::new(time::OffsetDateTime::from_unix_timestamp(1000).unwrap());
        let e = Enrollment::open(dir.path(), manual.clock()).unwrap();
        let a: AgentId = "a1".parse().unwrap();
        let b: AgentId = "b1".parse().unwrap();
        let (token, expires) = e.issue(a.clone(), 60).await.unwrap();
        assert_eq!(expires, 1060);
        let text = std::fs::read_to_string(dir.path().join("enrollment.json")).unwrap();
        assert!(!text.contains(&token), "token stored in clear");

        let e = Enrollment::open(dir.path(), manual.clock()).unwrap();
        manual.advance(Duration::from_secs(59));
        let reg = e.begin().await;
        assert_eq!(reg.check("agt_nope", &a), Err(TokenError::Unknown));
        assert_eq!(reg.check(&token, &b), Err(TokenError::OtherAgent));
        assert_eq!(reg.check(&token, &a), Ok(()), "one second before expiry");
        manual.advance(Duration::from_secs(1));
        assert_eq!(
            reg.check(&token, &a),
            Err(TokenError::Expired("1970-01-01T00:17:40Z".into())),
            "at expiry"
        );
        drop(reg);

        let (token, _) = e.issue(a.clone(), 60).await.unwrap();
        let reg = e.begin().await;
        assert_eq!(reg.check(&token, &a), Ok(()));
        reg.redeem(&token, &a, serde_json::json!({"site": "x"}))
            .await
            .unwrap();
        assert_eq!(e.begin().await.check(&token, &a), Err(TokenError::Used));
        assert_eq!(e.metadata(&a).await.unwrap()["site"], "x");
    }
}
