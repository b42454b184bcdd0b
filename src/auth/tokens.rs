//! API tokens (issue 10, point 4): what replaces the token-issuing function and the SQL
//! functions of the Traefik gateway (`generate-gateway-token`, `revoke_gateway_token`,
//! `cleanup_expired_revocations`, the `gateway_tokens` table).
//!
//! A token is an HS256 JWT signed with `GATEWAY_JWT_SECRET` carrying exactly the claims
//! that function put in (`jti`, `project`, `service`, `iat`, `exp`), so a route's `claims`
//! check treats old and new tokens alike. Tokens are recorded (never the token itself,
//! only its claims and description) for the listing; revocations go to storage and to the
//! in-memory set every JWT check reads ([`Revocations`]) before the revocation is
//! answered. Storage is [`crate::store::tokens`]: the node's database, or Redis with
//! `[cluster]`.
//!
//! A jti this gateway did not issue (a token of the replaced system, signed with the same
//! secret) can be revoked too: its expiry is unknown here, so the revocation is kept for
//! the longest lifetime a token can have ([`MAX_DAYS`], counted from the revocation),
//! after which any such token has expired by itself.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::Revocations;
use crate::clock::Clock;
use crate::store::tokens::{AuditRecord, IssuedToken, Revoked, TokenCursor, TokenStore};
use crate::store::{CertStore, StoreError};

/// Lifetime of a token when `expiresInDays` is not given, and the longest allowed (as the
/// replaced function: default 90, at most 365).
pub(crate) const DEFAULT_DAYS: i64 = 90;
pub(crate) const MAX_DAYS: i64 = 365;

const DAY_SECS: i64 = 86_400;

/// How often revocations of expired tokens (and expired tokens) are purged; also once at
/// start. Until then an expired entry costs a little memory and nothing else: its token
/// is refused by its `exp` anyway.
const PURGE_INTERVAL: Duration = Duration::from_secs(600);

/// Issues, lists and revokes API tokens; cheap to clone.
#[derive(Clone)]
pub struct ApiTokens {
    clock: Clock,
    store: TokenStore,
    revocations: Revocations,
    /// `GATEWAY_JWT_SECRET` as a signing key; `None` without it (issuing is refused).
    signing: Option<std::sync::Arc<EncodingKey>>,
}

/// What `POST /tokens` asks for, validated.
#[derive(Debug, Clone)]
pub(crate) struct TokenRequest {
    pub project: String,
    pub service: String,
    pub description: String,
    pub days: i64,
}

/// A token just issued: the only time the token itself is shown.
#[derive(Debug, Clone)]
pub(crate) struct NewToken {
    pub token: String,
    pub record: IssuedToken,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(
        "token issuing needs GATEWAY_JWT_SECRET (the HS256 secret the tokens are signed with); \
         set it in the gateway's environment and restart"
    )]
    NoSecret,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("token could not be signed: {0}")]
    Sign(String),
}

/// The claims of a token, exactly those of the replaced function's tokens.
#[derive(Serialize)]
struct Claims<'a> {
    jti: &'a str,
    project: &'a str,
    service: &'a str,
    iat: i64,
    exp: i64,
}

impl ApiTokens {
    /// Opens the token storage that goes with `store` (its database, or the one in
    /// `data_dir` for a store opened without one; Redis when shared) and, on one node,
    /// loads the revocation set from it (on Redis the store's resync loads it).
    pub async fn open(
        store: &CertStore,
        data_dir: &std::path::Path,
        secret: Option<&str>,
        clock: Clock,
    ) -> Result<Self, StoreError> {
        let tokens = TokenStore::open(store, data_dir)?;
        let revocations = store.revocations().clone();
        if !store.is_shared() {
            let all = tokens.revocations().await?;
            tracing::info!(revocations = all.len(), "revoked API tokens loaded");
            revocations.replace_all(all);
        }
        Ok(Self {
            clock,
            store: tokens,
            revocations,
            signing: secret.map(|s| std::sync::Arc::new(EncodingKey::from_secret(s.as_bytes()))),
        })
    }

    /// Issues a token for `request`, recorded with its audit entry naming `actor` (the
    /// API key's name) before it is returned.
    pub(crate) async fn issue(
        &self,
        request: TokenRequest,
        actor: &str,
    ) -> Result<NewToken, IssueError> {
        let key = self.signing.as_ref().ok_or(IssueError::NoSecret)?;
        let now = self.clock.unix();
        let record = IssuedToken {
            jti: uuid_v4().map_err(|e| IssueError::Store(StoreError::Io(e)))?,
            project: request.project,
            service: request.service,
            description: request.description,
            created_at: now,
            expires_at: now + request.days * DAY_SECS,
        };
        let claims = Claims {
            jti: &record.jti,
            project: &record.project,
            service: &record.service,
            iat: record.created_at,
            exp: record.expires_at,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
            .map_err(|e| IssueError::Sign(e.to_string()))?;
        self.store.issue(&record, actor).await?;
        tracing::info!(
            jti = %record.jti, project = %record.project, service = %record.service,
            key = actor, expires_at = record.expires_at, "API token issued"
        );
        Ok(NewToken { token, record })
    }

    /// Revokes `jti` (idempotent): stored with its audit entry, then in this node's memory,
    /// before it returns; other nodes hear of it through Redis.
    pub(crate) async fn revoke(
        &self,
        jti: &str,
        reason: &str,
        actor: &str,
    ) -> Result<Revoked, StoreError> {
        let now = self.clock.unix();
        let horizon = now + MAX_DAYS * DAY_SECS;
        let revoked = self.store.revoke(jti, now, horizon, actor, reason).await?;
        self.revocations.revoke(jti, revoked.expires_at);
        tracing::info!(
            %jti, key = actor, already = revoked.already, until = revoked.expires_at,
            "API token revoked"
        );
        Ok(revoked)
    }

    /// Active tokens (not expired, not revoked), newest first.
    pub(crate) async fn list(
        &self,
        project: Option<&str>,
        after: Option<&TokenCursor>,
        n: usize,
    ) -> Result<Vec<IssuedToken>, StoreError> {
        self.store.list(self.clock.unix(), project, after, n).await
    }

    /// Audit records, newest first.
    pub(crate) async fn audit(
        &self,
        after: Option<&str>,
        n: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.store.audit(after, n).await
    }

    /// Purges revocations of tokens expired by now, in storage and in memory, and expired
    /// tokens; returns how many revocations storage dropped.
    pub(crate) async fn purge_expired(&self) -> Result<usize, StoreError> {
        let now = self.clock.unix();
        let stored = self.store.purge(now).await?;
        let in_memory = self.revocations.purge_expired(now);
        if stored + in_memory > 0 {
            tracing::info!(
                stored,
                in_memory,
                "revocations of expired API tokens purged"
            );
        }
        Ok(stored)
    }

    /// Purges now and every [`PURGE_INTERVAL`] until `stop`; a failure (Redis down) is
    /// logged and tried again at the next tick.
    pub(crate) fn spawn_purge(&self, stop: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PURGE_INTERVAL);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = this.purge_expired().await {
                    tracing::warn!(error = %e, "purging expired API token revocations failed; retrying later");
                }
            }
        });
    }
}

/// A random (version 4) UUID, the form of the replaced function's jtis
/// (`crypto.randomUUID()`), RFC 9562 §5.4.
fn uuid_v4() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| std::io::Error::other("system random source failed"))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = crate::digest::hex(&b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn jtis_are_version_4_uuids() {
        let a = uuid_v4().unwrap();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
        assert_ne!(a, uuid_v4().unwrap());
    }

    /// Issue, revoke (in memory at once), purge once expired (storage and memory).
    #[tokio::test]
    async fn revocations_reach_memory_at_once_and_leave_after_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertStore::open_with_indexed(&dir.path().join("certs"), vec![]).unwrap();
        let manual = ManualClock::starting_now();
        let tokens = ApiTokens::open(&store, dir.path(), Some("s3cret"), manual.clock())
            .await
            .unwrap();
        let request = TokenRequest {
            project: "p".into(),
            service: "s".into(),
            description: "d".into(),
            days: 1,
        };
        let issued = tokens.issue(request, "admin").await.unwrap();
        assert_eq!(issued.token.split('.').count(), 3);
        tokens
            .revoke(&issued.record.jti, "r", "admin")
            .await
            .unwrap();
        tokens.revoke("foreign", "r", "admin").await.unwrap();
        assert!(store.revocations().is_revoked(&issued.record.jti));
        // A second handle loads the set from the database, as a restart does.
        let other = CertStore::open_with_indexed(&dir.path().join("certs"), vec![]).unwrap();
        ApiTokens::open(&other, dir.path(), None, manual.clock())
            .await
            .unwrap();
        assert_eq!(other.revocations().len(), 2);
        manual.advance(Duration::from_secs(2 * 86_400));
        assert_eq!(tokens.purge_expired().await.unwrap(), 1);
        assert!(!store.revocations().is_revoked(&issued.record.jti));
        assert!(
            store.revocations().is_revoked("foreign"),
            "kept for 365 days"
        );
        let without = ApiTokens::open(&store, dir.path(), None, manual.clock())
            .await
            .unwrap();
        let request = TokenRequest {
            project: "p".into(),
            service: "s".into(),
            description: String::new(),
            days: 1,
        };
        assert!(matches!(
            without.issue(request, "admin").await,
            Err(IssueError::NoSecret)
        ));
    }
}
