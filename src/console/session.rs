//! Console sessions: a sign-in with an API key opens one; the browser holds only a random
//! id in an `HttpOnly; Secure; SameSite=Strict` cookie, the server keeps what the id
//! stands for (the key's name and scopes, a CSRF token, its times).
//!
//! Only the SHA-256 of the id is stored, in memory on one node, in Redis with `[cluster]`
//! (`agentgate:{state}:console:session:<hash>`, with a TTL) so that every node behind the
//! load balancer knows every session. A session ends at sign-out (the record is deleted:
//! the cookie is worthless from then on), after `session_idle` without use, and
//! `session_absolute` after its sign-in, whichever comes first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::auth::ApiKey;
use crate::clock::Clock;
use crate::cluster::RedisDriver;
use crate::config::{ConsoleConfig, Scopes};
use crate::digest::{hex, sha256_hex};

/// The cookie's name; `Path=/ui` keeps it away from every other path of the gateway.
pub(crate) const COOKIE: &str = "agentgate_console";

/// The header that carries the session's CSRF token on every state-changing request.
pub(crate) const CSRF_HEADER: &str = "x-csrf-token";

/// What the server keeps for a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Session {
    pub key_name: String,
    /// `None`: every scope (a plain key).
    pub scopes: Option<Vec<String>>,
    pub csrf_token: String,
    /// Unix seconds.
    pub created_at: i64,
    pub last_used: i64,
}

impl Session {
    /// The key the session acts as, for the same scope checks as the API's.
    pub fn api_key(&self) -> ApiKey {
        let scopes = match &self.scopes {
            None => Scopes::All,
            Some(s) => Scopes::Listed(s.iter().cloned().collect()),
        };
        ApiKey {
            name: Arc::from(self.key_name.as_str()),
            scopes: Arc::new(scopes),
        }
    }

    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn csrf_matches(&self, presented: &str) -> bool {
        bool::from(presented.as_bytes().ct_eq(self.csrf_token.as_bytes()))
    }

    /// Unix second at which the session ends unless it is used again.
    pub fn expires_at(&self, config: &ConsoleConfig) -> i64 {
        let idle = self.last_used + secs(config.session_idle);
        let absolute = self.created_at + secs(config.session_absolute);
        idle.min(absolute)
    }
}

fn secs(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 4)
}

/// Why a session could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("Redis is unreachable, console sessions cannot be checked now ({0})")]
    Redis(#[from] crate::cluster::DriverError),
    #[error("the system random source failed")]
    Random,
}

/// The sessions; cheap to clone.
#[derive(Clone)]
pub(crate) struct Sessions {
    backend: Backend,
    config: ConsoleConfig,
    clock: Clock,
}

#[derive(Clone)]
enum Backend {
    /// One node. A std Mutex: held for one map operation, never across an `.await`.
    Memory(Arc<Mutex<HashMap<String, Session>>>),
    /// `[cluster]`: the shared store's Redis connection.
    Redis(RedisDriver),
}

impl Sessions {
    /// In Redis when `redis` is given (the shared store's connection), in memory otherwise.
    pub fn new(config: ConsoleConfig, clock: Clock, redis: Option<RedisDriver>) -> Self {
        let backend = match redis {
            Some(driver) => Backend::Redis(driver),
            None => Backend::Memory(Arc::default()),
        };
        Self {
            backend,
            config,
            clock,
        }
    }

    pub fn config(&self) -> &ConsoleConfig {
        &self.config
    }

    /// Opens a session for `key`; returns the id for the cookie and the session.
    pub async fn create(&self, key: &ApiKey) -> Result<(String, Session), SessionError> {
        let id = random_hex(32)?;
        let now = self.clock.unix();
        let session = Session {
            key_name: key.name.to_string(),
            scopes: match key.scopes.as_ref() {
                Scopes::All => None,
                Scopes::Listed(s) => Some(s.iter().cloned().collect()),
            },
            csrf_token: random_hex(32)?,
            created_at: now,
            last_used: now,
        };
        self.write(&id_hash(&id), &session, now).await?;
        Ok((id, session))
    }

    /// The live session of the cookie value `id`, if any. With `touch`, its use is
    /// recorded (the idle timeout starts again).
    pub async fn find(&self, id: &str, touch: bool) -> Result<Option<Session>, SessionError> {
        if !is_session_id(id) {
            return Ok(None);
        }
        let hash = id_hash(id);
        let now = self.clock.unix();
        let Some(mut session) = self.read(&hash).await? else {
            return Ok(None);
        };
        if now >= session.expires_at(&self.config) {
            self.remove_hash(&hash).await?;
            return Ok(None);
        }
        if touch && session.last_used != now {
            session.last_used = now;
            self.write(&hash, &session, now).await?;
        }
        Ok(Some(session))
    }

    /// Forgets the session of `id` (sign-out); its cookie is refused from now on.
    pub async fn remove(&self, id: &str) -> Result<(), SessionError> {
        if is_session_id(id) {
            self.remove_hash(&id_hash(id)).await?;
        }
        Ok(())
    }

    async fn read(&self, hash: &str) -> Result<Option<Session>, SessionError> {
        match &self.backend {
            Backend::Memory(map) => Ok(lock(map).get(hash).cloned()),
            Backend::Redis(driver) => {
                let mut cmd = redis::cmd("GET");
                cmd.arg(redis_key(hash));
                let value: Option<String> = driver.query(&cmd).await?;
                // A record this version cannot read is no session (sign in again).
                Ok(value.and_then(|v| serde_json::from_str(&v).ok()))
            }
        }
    }

    async fn write(&self, hash: &str, session: &Session, now: i64) -> Result<(), SessionError> {
        match &self.backend {
            Backend::Memory(map) => {
                let mut map = lock(map);
                // Expired sessions nobody comes back for are dropped as new ones arrive,
                // so the map holds live sessions only (amortised over sign-ins).
                if !map.contains_key(hash) {
                    map.retain(|_, s| now < s.expires_at(&self.config));
                }
                map.insert(hash.to_owned(), session.clone());
                Ok(())
            }
            Backend::Redis(driver) => {
                let ttl = (session.expires_at(&self.config) - now).max(1);
                let mut cmd = redis::cmd("SET");
                cmd.arg(redis_key(hash))
                    .arg(serde_json::to_string(session).unwrap_or_default())
                    .arg("EX")
                    .arg(ttl);
                let _: () = driver.query(&cmd).await?;
                Ok(())
            }
        }
    }

    async fn remove_hash(&self, hash: &str) -> Result<(), SessionError> {
        match &self.backend {
            Backend::Memory(map) => {
                lock(map).remove(hash);
                Ok(())
            }
            Backend::Redis(driver) => {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(redis_key(hash));
                let _: i64 = driver.query(&cmd).await?;
                Ok(())
            }
        }
    }
}

fn lock(
    map: &Mutex<HashMap<String, Session>>,
) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
    // Each operation is a single map call: a panic cannot leave the map half changed.
    map.lock().unwrap_or_else(|p| p.into_inner())
}

fn redis_key(hash: &str) -> String {
    crate::store::redis::key(&format!("console:session:{hash}"))
}

/// What is stored for an id: its SHA-256, so that a copy of the store (a Redis dump, a
/// `MONITOR` session) holds nothing a browser would accept.
fn id_hash(id: &str) -> String {
    sha256_hex(id.as_bytes())
}

/// Session ids are 64 lowercase hex digits; anything else is not looked up at all.
fn is_session_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn random_hex(bytes: usize) -> Result<String, SessionError> {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| SessionError::Random)?;
    Ok(hex(&buf))
}

/// The `Set-Cookie` value that gives the browser `id`: `Max-Age` is the absolute
/// lifetime (the server ends idle sessions itself).
pub(crate) fn set_cookie(id: &str, config: &ConsoleConfig) -> String {
    format!(
        "{COOKIE}={id}; Path=/ui; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
        config.session_absolute.as_secs()
    )
}

/// The `Set-Cookie` value that removes the cookie (sign-out).
pub(crate) fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/ui; Max-Age=0; HttpOnly; Secure; SameSite=Strict")
}

/// The session id of the request's `Cookie` header fields, if any.
pub(crate) fn cookie_of(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;

    fn config() -> ConsoleConfig {
        ConsoleConfig {
            session_idle: Duration::from_secs(60),
            session_absolute: Duration::from_secs(300),
        }
    }

    fn key() -> ApiKey {
        ApiKey {
            name: Arc::from("ops"),
            scopes: Arc::new(Scopes::Listed(["agents:read".to_owned()].into())),
        }
    }

    #[tokio::test]
    async fn a_session_ends_when_idle_at_its_absolute_limit_and_at_sign_out() {
        let manual = ManualClock::starting_now();
        let sessions = Sessions::new(config(), manual.clock(), None);
        let (id, session) = sessions.create(&key()).await.unwrap();
        assert!(session.api_key().allows("agents:read"));
        assert!(!session.api_key().allows("agents:command"));
        // Used every 50 s: the idle timeout (60 s) never strikes, the absolute one does.
        for _ in 0..5 {
            manual.advance(Duration::from_secs(50));
            assert!(sessions.find(&id, true).await.unwrap().is_some());
        }
        manual.advance(Duration::from_secs(50));
        assert!(sessions.find(&id, true).await.unwrap().is_none(), "300 s");

        let (id, _) = sessions.create(&key()).await.unwrap();
        manual.advance(Duration::from_secs(59));
        // A read without `touch` (the live feed) does not keep the session alive.
        assert!(sessions.find(&id, false).await.unwrap().is_some());
        manual.advance(Duration::from_secs(1));
        assert!(sessions.find(&id, false).await.unwrap().is_none(), "idle");

        let (id, _) = sessions.create(&key()).await.unwrap();
        sessions.remove(&id).await.unwrap();
        assert!(
            sessions.find(&id, true).await.unwrap().is_none(),
            "signed out"
        );
        assert!(sessions.find("not-an-id", true).await.unwrap().is_none());
    }

    #[test]
    fn the_cookie_is_found_among_others_and_its_attributes_are_strict() {
        let mut headers = http::HeaderMap::new();
        headers.append(
            http::header::COOKIE,
            "a=1; agentgate_console=abc".parse().unwrap(),
        );
        assert_eq!(cookie_of(&headers).as_deref(), Some("abc"));
        let set = set_cookie("abc", &config());
        for attr in [
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
            "Path=/ui",
            "Max-Age=300",
        ] {
            assert!(set.contains(attr), "{set}");
        }
    }
}
