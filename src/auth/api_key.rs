//! Bearer API keys with names and scopes (`api_keys` in the configuration), and the one
//! key check ([`ApiKeys::check`]) that the API and the gateway's `api_key` routes share,
//! with the failed attempts per source address (`limits.api_key_failures`) counted in one
//! place, so a guess on either side uses up the same budget.
//!
//! Keys are held as SHA-256 digests and every presented key is compared with every digest
//! in constant time, so neither the match nor its position leaks through timing.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::config::{ApiKeyConfig, Scopes};
use crate::digest::sha256;
use crate::limits::FailureWindow;

/// The accepted keys and the failed attempts per source address; cheap to clone (every
/// clone counts into the same window).
#[derive(Clone)]
pub struct ApiKeys {
    entries: Arc<[Entry]>,
    failures: FailureWindow,
}

/// Why [`ApiKeys::check`] let a request not through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    /// No `Authorization: Bearer <key>` field.
    Missing,
    /// More than one `Authorization` field (RFC 9110 §5.3).
    Duplicate,
    /// A key that is none of ours; counted against the source address.
    Invalid,
    /// The source address used up its failed attempts (`limits.api_key_failures`): refused
    /// whatever the key, until the window ends.
    TooManyFailures { retry_after: Duration },
}

struct Entry {
    digest: [u8; 32],
    key: ApiKey,
}

/// A key that matched: its name (for logs) and scopes, never the key itself.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub name: Arc<str>,
    pub scopes: Arc<Scopes>,
}

impl ApiKeys {
    /// `keys`, with at most `failures.max()` failed attempts per source address and window.
    pub fn new(keys: &[ApiKeyConfig], failures: FailureWindow) -> Self {
        Self {
            entries: keys
                .iter()
                .map(|k| Entry {
                    digest: k.secret.digest(),
                    key: ApiKey {
                        name: Arc::from(k.name.as_str()),
                        scopes: Arc::new(k.scopes.clone()),
                    },
                })
                .collect(),
            failures,
        }
    }

    /// Plain keys with every scope and the default failure limit (benchmarks and tests that
    /// need no scopes).
    pub fn all_scopes<S: AsRef<str>>(keys: &[S]) -> Self {
        let defaults = crate::config::RawLimits::default();
        Self {
            entries: keys
                .iter()
                .enumerate()
                .map(|(i, k)| Entry {
                    digest: sha256(k.as_ref().as_bytes()),
                    key: ApiKey {
                        name: Arc::from(format!("key{i}")),
                        scopes: Arc::new(Scopes::All),
                    },
                })
                .collect(),
            failures: FailureWindow::new(
                defaults.api_key_failures,
                Duration::from_secs(defaults.api_key_failure_window_secs),
            ),
        }
    }

    /// The key check of every place that takes an API key: a `source` past its failed
    /// attempts is refused before its key is looked at (so guessing stops there, the
    /// right key among the guesses included); a wrong key counts against `source`, and
    /// the one that reaches the limit is logged (once per window). Counting the refusals
    /// in the metrics is the caller's, which knows its own metrics.
    pub fn check(
        &self,
        headers: &http::HeaderMap,
        source: Option<IpAddr>,
        now: Instant,
    ) -> Result<&ApiKey, KeyRefusal> {
        self.refuse_source(source, now)?;
        let presented = bearer_of(headers).map_err(|e| match e {
            BearerError::Missing => KeyRefusal::Missing,
            BearerError::Duplicate => KeyRefusal::Duplicate,
        })?;
        self.check_presented(presented, source, now)
    }

    /// `TooManyFailures` when `source` used up its failed attempts (checked before any
    /// key is looked at).
    pub fn refuse_source(&self, source: Option<IpAddr>, now: Instant) -> Result<(), KeyRefusal> {
        match source.and_then(|ip| self.failures.refused(ip, now)) {
            Some(left) => Err(KeyRefusal::TooManyFailures { retry_after: left }),
            None => Ok(()),
        }
    }

    /// The key `presented` is, or `Invalid`, which counts against `source` (the console's
    /// sign-in form presents a key without a header; [`ApiKeys::check`] for a request).
    pub fn check_presented(
        &self,
        presented: &str,
        source: Option<IpAddr>,
        now: Instant,
    ) -> Result<&ApiKey, KeyRefusal> {
        if let Some(key) = self.find(presented) {
            return Ok(key);
        }
        if let Some(ip) = source
            && self.failures.fail(ip, now)
        {
            tracing::warn!(
                source = %ip, limit = "api_key_failures",
                window_secs = self.failures.window().as_secs(),
                "source reached the failed API-key attempts limit; refused with 429 until the window ends"
            );
        }
        Err(KeyRefusal::Invalid)
    }

    /// The key `presented` is, if any. Every digest is compared (no early exit).
    pub fn find(&self, presented: &str) -> Option<&ApiKey> {
        let d = sha256(presented.as_bytes());
        let mut found = None;
        for entry in self.entries.iter() {
            if bool::from(entry.digest.ct_eq(&d)) {
                found = Some(&entry.key);
            }
        }
        found
    }

    /// Whether `presented` is any accepted key.
    pub fn accepts(&self, presented: &str) -> bool {
        self.find(presented).is_some()
    }
}

impl ApiKey {
    pub fn allows(&self, scope: &str) -> bool {
        self.scopes.allows(scope)
    }
}

/// The token of an `Authorization: Bearer <token>` header value (scheme case-insensitive,
/// RFC 9110 §11.1).
pub fn bearer(value: &http::HeaderValue) -> Option<&str> {
    let v = value.to_str().ok()?;
    let (scheme, token) = v.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Why a request carries no usable Bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerError {
    /// No `Authorization` field, or not `Bearer <token>`.
    Missing,
    /// More than one `Authorization` field: malformed (RFC 9110 §5.3), whichever is right.
    Duplicate,
}

/// The token of the one `Authorization: Bearer <token>` field of `headers`.
///
/// Authorization is a singleton field (RFC 9110 §11.6.2 grammar has no list form), so two
/// of them make the request malformed (§5.3), as nginx and FastAPI behind it never settled
/// which one wins. The scheme name is case-insensitive (RFC 9110 §11.1).
pub fn bearer_of(headers: &http::HeaderMap) -> Result<&str, BearerError> {
    let mut fields = headers.get_all(http::header::AUTHORIZATION).iter();
    let value = fields.next().ok_or(BearerError::Missing)?;
    if fields.next().is_some() {
        return Err(BearerError::Duplicate);
    }
    bearer(value).ok_or(BearerError::Missing)
}
