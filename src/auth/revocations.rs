//! Revoked token ids (`jti`), held in memory so the JWT check never waits on storage or
//! Redis (DESIGN.md, "Several nodes"). Token management (issue 10, point 4) feeds it from
//! storage and pub/sub through [`Revocations::revoke`] and [`Revocations::replace_all`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// The set of revoked `jti`s, each with the token's expiry (Unix seconds) so that entries
/// whose token has expired anyway can be purged. Cheap to clone.
#[derive(Clone, Default)]
pub struct Revocations {
    // A std lock: held only for a map lookup or insert, never across an `.await`.
    inner: Arc<RwLock<HashMap<String, i64>>>,
}

impl Revocations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Revokes `jti`; `expires_at` is the token's `exp` (`i64::MAX` when unknown).
    pub fn revoke(&self, jti: &str, expires_at: i64) {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        map.insert(jti.to_owned(), expires_at);
    }

    pub fn is_revoked(&self, jti: &str) -> bool {
        let map = self.inner.read().unwrap_or_else(|p| p.into_inner());
        map.contains_key(jti)
    }

    /// Replaces the whole set (a node loading from storage, or resynchronising after a
    /// pub/sub gap).
    pub fn replace_all(&self, entries: impl IntoIterator<Item = (String, i64)>) {
        let fresh: HashMap<String, i64> = entries.into_iter().collect();
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        *map = fresh;
    }

    /// Drops revocations of tokens expired before `now` (Unix seconds): an expired token is
    /// refused by its `exp` already. Returns how many were dropped.
    pub fn purge_expired(&self, now: i64) -> usize {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let before = map.len();
        map.retain(|_, exp| *exp >= now);
        before - map.len()
    }

    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_until_purged_after_expiry() {
        let r = Revocations::new();
        r.revoke("a", 100);
        r.revoke("b", 300);
        assert!(r.is_revoked("a") && r.is_revoked("b") && !r.is_revoked("c"));
        assert_eq!(r.purge_expired(200), 1);
        assert!(!r.is_revoked("a") && r.is_revoked("b"));
        r.replace_all([("c".to_owned(), 1)]);
        assert!(r.is_revoked("c") && !r.is_revoked("b"));
    }
}
