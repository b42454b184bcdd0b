//! Bearer API keys with names and scopes (`api_keys` in the configuration).
//!
//! Keys are held as SHA-256 digests and every presented key is compared with every digest
//! in constant time, so neither the match nor its position leaks through timing.

use std::sync::Arc;

use subtle::ConstantTimeEq;

use crate::config::{ApiKeyConfig, Scopes};
use crate::digest::sha256;

/// The accepted keys; cheap to clone.
#[derive(Clone)]
pub struct ApiKeys(Arc<[Entry]>);

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
    pub fn new(keys: &[ApiKeyConfig]) -> Self {
        Self(
            keys.iter()
                .map(|k| Entry {
                    digest: k.secret.digest(),
                    key: ApiKey {
                        name: Arc::from(k.name.as_str()),
                        scopes: Arc::new(k.scopes.clone()),
                    },
                })
                .collect(),
        )
    }

    /// Plain keys with every scope (benchmarks and tests that need no scopes).
    pub fn all_scopes<S: AsRef<str>>(keys: &[S]) -> Self {
        Self(
            keys.iter()
                .enumerate()
                .map(|(i, k)| Entry {
                    digest: sha256(k.as_ref().as_bytes()),
                    key: ApiKey {
                        name: Arc::from(format!("key{i}")),
                        scopes: Arc::new(Scopes::All),
                    },
                })
                .collect(),
        )
    }

    /// The key `presented` is, if any. Every digest is compared (no early exit).
    pub fn find(&self, presented: &str) -> Option<&ApiKey> {
        let d = sha256(presented.as_bytes());
        let mut found = None;
        for entry in self.0.iter() {
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
