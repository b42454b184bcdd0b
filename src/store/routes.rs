//! Routes registered at runtime (`POST /routes`, `PUT`/`DELETE /routes/{name}`): where they
//! are durable and how every node learns of them.
//!
//! - One node: the table `routes` of the embedded database (`super::db`), one row per
//!   route with its canonical prefix under a `UNIQUE` constraint, loaded at start.
//! - `[cluster]`: the hash `agentgate:{state}:routes` in Redis (name -> `<seq>:<JSON>`),
//!   written by a Lua script that checks the name and the prefix, writes, and publishes
//!   the change (kind `route`) on the channel the certificates use, in one step. Other
//!   nodes apply it from pub/sub (`super::sync`) and reload every route on each resync.
//!
//! Either way the specs (the body of `POST /routes`, as validated and normalised) are kept
//! in memory in [`RuntimeRoutes`], and every change, local or remote, hands the whole set
//! to the gateway's hook, which rebuilds the proxy's route table. A write is durable
//! before the index has it and before the client is answered; a refused or failed write
//! changes nothing anywhere.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, OnceLock};

use rusqlite::OptionalExtension;

use super::redis::{self, RedisError, Written, from_value};
use super::sync::{RedisSync, unix_ms};
use super::{CertStore, StoreError};
use crate::config::RawRoute;

/// What the gateway runs with every runtime route after each change.
type Hook = Box<dyn Fn(&[RawRoute]) + Send + Sync>;

/// The start of both route scripts: refuses a change when Redis holds no state, and
/// answers a retry of an attempt (same nonce, `ARGV[1]`) as its first run did, from
/// `<nonce> <seq> <outcome>` in `KEYS[4]`.
macro_rules! route_script {
    ($body:literal) => {
        concat!(
            r"
local epoch = redis.call('get', KEYS[1])
if not epoch then return redis.error_reply('AGENTGATE_NOSTATE') end
local last = redis.call('get', KEYS[4])
if last then
  local n, s, o = string.match(last, '^(%S+) (%d+) (%S+)$')
  if n == ARGV[1] then return {o, epoch, tonumber(s)} end
end
",
            $body
        )
    };
}

/// Checks the name and the prefix, writes, remembers the attempt, publishes. `ARGV`:
/// nonce, name, JSON, sent ms, publish command, channel, prefix, `create` or `replace`.
const PUT_SCRIPT: &str = route_script!(
    r"
local old = redis.call('hget', KEYS[3], ARGV[2])
if old and ARGV[8] == 'create' then return {'exists'} end
local all = redis.call('hgetall', KEYS[3])
for i = 1, #all, 2 do
  if all[i] ~= ARGV[2] then
    local ok, spec = pcall(cjson.decode, string.match(all[i + 1], '^%d+:(.*)$') or '')
    if ok and type(spec) == 'table' and spec.prefix == ARGV[7] then return {'prefix', all[i]} end
  end
end
local seq = redis.call('incr', KEYS[2])
local outcome = 'created'
if old then outcome = 'replaced' end
redis.call('hset', KEYS[3], ARGV[2], seq .. ':' .. ARGV[3])
redis.call('set', KEYS[4], ARGV[1] .. ' ' .. seq .. ' ' .. outcome)
redis.call(ARGV[5], ARGV[6], epoch .. ' ' .. seq .. ' ' .. ARGV[4] .. ' route put ' .. ARGV[2] .. '\n' .. ARGV[3])
return {outcome, epoch, seq}
"
);

/// `ARGV`: nonce, name, sent ms, publish command, channel.
const DELETE_SCRIPT: &str = route_script!(
    r"
if redis.call('hexists', KEYS[3], ARGV[2]) == 0 then return {'absent'} end
local seq = redis.call('incr', KEYS[2])
redis.call('hdel', KEYS[3], ARGV[2])
redis.call('set', KEYS[4], ARGV[1] .. ' ' .. seq .. ' deleted')
redis.call(ARGV[4], ARGV[5], epoch .. ' ' .. seq .. ' ' .. ARGV[3] .. ' route del ' .. ARGV[2] .. '\n')
return {'deleted', epoch, seq}
"
);

/// The runtime routes a node knows, and who to tell when they change. Lives in the
/// certificate store's shared part, so the Redis sync task reaches it.
#[derive(Default)]
pub(crate) struct RuntimeRoutes {
    /// A std Mutex: map operations only, never held across `.await`.
    index: Mutex<Index>,
    /// Serialises the database's writers, so that database order and index order agree
    /// (Redis orders its writes itself; the index applies them by sequence number).
    writer: tokio::sync::Mutex<()>,
    /// Serialises calls of the hook, each with the set as it is when the call starts, so
    /// that the last call the gateway gets carries the newest set.
    notifying: Mutex<()>,
    on_change: OnceLock<Hook>,
}

impl std::fmt::Debug for RuntimeRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeRoutes").finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Index {
    routes: BTreeMap<String, RawRoute>,
    /// The sequence number of the last change applied per name, deletions included, so
    /// that a change that arrives late never undoes a newer one (Redis: the change's
    /// number; the database: `local_seq`).
    seqs: HashMap<String, u64>,
    /// The database's writes, numbered here (they are serialised by `writer`).
    local_seq: u64,
}

impl Index {
    /// Applies change `seq` of `name` unless a newer one is applied; true if the set
    /// changed.
    fn apply(&mut self, name: &str, spec: Option<RawRoute>, seq: u64) -> bool {
        if self.seqs.get(name).is_some_and(|&done| done >= seq) {
            return false;
        }
        self.seqs.insert(name.to_owned(), seq);
        match spec {
            Some(spec) => self.routes.insert(name.to_owned(), spec.clone()) != Some(spec),
            None => self.routes.remove(name).is_some(),
        }
    }
}

/// Why a route was not written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RouteWriteError {
    #[error("route {0:?} already exists; PUT /routes/{0} replaces it")]
    Exists(String),
    #[error("prefix {prefix:?} is already the prefix of runtime route {by:?}")]
    PrefixTaken { prefix: String, by: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `POST` creates only; `PUT` creates or replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Create,
    Replace,
}

/// What a successful write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Created,
    Replaced,
}

impl RuntimeRoutes {
    fn index(&self) -> MutexGuard<'_, Index> {
        // Poisoned only by a panic inside a map operation; the maps stay usable.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every runtime route, by name.
    pub(crate) fn list(&self) -> Vec<RawRoute> {
        self.index().routes.values().cloned().collect()
    }

    /// Applies one change and tells the gateway if the set changed.
    fn apply(&self, name: &str, spec: Option<RawRoute>, seq: u64) {
        let changed = self.index().apply(name, spec, seq);
        if changed {
            self.notify();
        }
    }

    fn notify(&self) {
        let _order = self.notifying.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hook) = self.on_change.get() {
            hook(&self.list());
        }
    }
}

/// Whether a runtime route `name` is stored (as this node knows).
pub(crate) fn contains(store: &CertStore, name: &str) -> bool {
    store.shared.routes.index().routes.contains_key(name)
}

/// Hands the runtime routes to `hook` now (on one node, after loading them from the
/// database) and after every change. Set once, by the gateway.
pub(crate) async fn attach(
    store: &CertStore,
    hook: impl Fn(&[RawRoute]) + Send + Sync + 'static,
) -> Result<(), StoreError> {
    let routes = &store.shared.routes;
    let _ = routes.on_change.set(Box::new(hook));
    if let Some(db) = store.db() {
        let rows: Vec<(String, String)> = db
            .call(|conn| {
                let mut stmt = conn.prepare("SELECT name, spec FROM routes ORDER BY name")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })
            .await?;
        let mut index = routes.index();
        for (name, spec) in rows {
            match serde_json::from_str::<RawRoute>(&spec) {
                Ok(spec) => {
                    index.local_seq += 1;
                    let seq = index.local_seq;
                    index.apply(&name, Some(spec), seq);
                }
                Err(e) => {
                    tracing::warn!(route = %name, error = %e, "unreadable runtime route in the database; skipped")
                }
            }
        }
    }
    routes.notify();
    Ok(())
}

/// Stores `spec` (validated and normalised by the caller) under its name.
pub(crate) async fn put(
    store: &CertStore,
    spec: RawRoute,
    mode: Mode,
) -> Result<Outcome, RouteWriteError> {
    let routes = &store.shared.routes;
    let json = serde_json::to_string(&spec)
        .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
    if let Some(db) = store.db() {
        let _writer = routes.writer.lock().await;
        let (name, prefix) = (spec.name.clone(), spec.prefix.clone());
        let now = unix_ms() / 1000;
        let written = db
            .call(move |conn| {
                let tx = conn.transaction()?;
                let exists = tx
                    .query_row("SELECT 1 FROM routes WHERE name = ?1", [&name], |_| Ok(()))
                    .optional()?
                    .is_some();
                if exists && mode == Mode::Create {
                    return Ok(Err(RouteWriteError::Exists(name)));
                }
                let taken: Option<String> = tx
                    .query_row(
                        "SELECT name FROM routes WHERE prefix = ?1 AND name <> ?2",
                        [&prefix, &name],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(by) = taken {
                    return Ok(Err(RouteWriteError::PrefixTaken { prefix, by }));
                }
                tx.execute(
                    "INSERT INTO routes (name, prefix, spec, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?4)
                     ON CONFLICT (name) DO UPDATE
                     SET prefix = excluded.prefix, spec = excluded.spec, updated_at = excluded.updated_at",
                    rusqlite::params![name, prefix, json, now],
                )?;
                tx.commit()?;
                Ok(Ok(if exists {
                    Outcome::Replaced
                } else {
                    Outcome::Created
                }))
            })
            .await
            .map_err(StoreError::from)??;
        let seq = {
            let mut index = routes.index();
            index.local_seq += 1;
            index.local_seq
        };
        routes.apply(&spec.name.clone(), Some(spec), seq);
        return Ok(written);
    }
    let sync = redis_of(store)?;
    let mut cmd = script_cmd(PUT_SCRIPT)?;
    cmd.arg(&spec.name)
        .arg(&json)
        .arg(unix_ms())
        .arg(sync.redis.publish)
        .arg(redis::channel())
        .arg(&spec.prefix)
        .arg(match mode {
            Mode::Create => "create",
            Mode::Replace => "replace",
        });
    let answer = script(sync, &cmd).await?;
    let mut items = answer.into_iter();
    let status: String = from_value(items.next()).map_err(StoreError::from)?;
    let outcome = match status.as_str() {
        "created" => Outcome::Created,
        "replaced" => Outcome::Replaced,
        "exists" => return Err(RouteWriteError::Exists(spec.name)),
        "prefix" => {
            return Err(RouteWriteError::PrefixTaken {
                prefix: spec.prefix,
                by: from_value(items.next()).map_err(StoreError::from)?,
            });
        }
        other => return Err(protocol(format!("route script answered {other:?}")).into()),
    };
    let written = written_of(items)?;
    sync.note_epoch(&written.epoch);
    routes.apply(&spec.name.clone(), Some(spec), written.seq);
    Ok(outcome)
}

/// Deletes the runtime route `name`; false if there was none.
pub(crate) async fn delete(store: &CertStore, name: &str) -> Result<bool, StoreError> {
    let routes = &store.shared.routes;
    if let Some(db) = store.db() {
        let _writer = routes.writer.lock().await;
        let owned = name.to_owned();
        let deleted = db
            .call(move |conn| conn.execute("DELETE FROM routes WHERE name = ?1", [owned]))
            .await?
            > 0;
        if deleted {
            let seq = {
                let mut index = routes.index();
                index.local_seq += 1;
                index.local_seq
            };
            routes.apply(name, None, seq);
        }
        return Ok(deleted);
    }
    let sync = redis_of(store)?;
    let mut cmd = script_cmd(DELETE_SCRIPT)?;
    cmd.arg(name)
        .arg(unix_ms())
        .arg(sync.redis.publish)
        .arg(redis::channel());
    let mut items = script(sync, &cmd).await?.into_iter();
    let status: String = from_value(items.next())?;
    match status.as_str() {
        "absent" => Ok(false),
        "deleted" => {
            let written = written_of(items)?;
            sync.note_epoch(&written.epoch);
            routes.apply(name, None, written.seq);
            Ok(true)
        }
        other => Err(protocol(format!("route script answered {other:?}"))),
    }
}

/// A `route` change from the channel (its sequence number already checked by the sync
/// task). A body this version cannot read is applied as a deletion: the route cannot be
/// served from it either way.
pub(crate) fn apply_message(store: &CertStore, name: &str, spec: Option<Vec<u8>>, seq: u64) {
    let spec = spec.and_then(|body| {
        serde_json::from_slice::<RawRoute>(&body)
            .inspect_err(|e| {
                tracing::warn!(route = %name, error = %e, "unreadable runtime route in a shared state change; treating it as a deletion")
            })
            .ok()
    });
    store.shared.routes.apply(name, spec, seq);
}

/// Part of a resync, before anything is applied: every runtime route Redis holds, as
/// `(name, value)`.
pub(crate) async fn scan(sync: &RedisSync) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut cmd = ::redis::cmd("HGETALL");
    cmd.arg(redis::key("routes"));
    Ok(sync
        .redis
        .driver
        .query(&cmd)
        .await
        .map_err(RedisError::from)
        .inspect_err(|_| sync.metrics.state_redis_error())?)
}

/// Part of a resync: replaces the runtime routes by what [`scan`] found. `head_seq` is
/// the sequence number read before the scan; `same_epoch` whether the node followed this
/// state before (else the sequence numbers it holds mean nothing).
pub(crate) fn resync(
    store: &CertStore,
    entries: Vec<(String, Vec<u8>)>,
    head_seq: u64,
    same_epoch: bool,
) {
    let routes = &store.shared.routes;
    let changed = {
        let mut index = routes.index();
        if !same_epoch {
            index.seqs.clear();
        }
        let mut changed = false;
        let mut present = HashSet::with_capacity(entries.len());
        for (name, value) in entries {
            match parse_entry(&value) {
                Ok((seq, spec)) => {
                    present.insert(name.clone());
                    changed |= index.apply(&name, Some(spec), seq);
                }
                Err(e) => {
                    tracing::warn!(route = %name, error = %e, "unusable runtime route in Redis; skipped")
                }
            }
        }
        // A route the scan did not return is gone, unless this node applied a change of
        // it after the head was read (the scan may or may not show such a change).
        let gone: Vec<String> = index
            .routes
            .keys()
            .filter(|name| {
                !present.contains(*name)
                    && (!same_epoch || index.seqs.get(*name).is_none_or(|&s| s <= head_seq))
            })
            .cloned()
            .collect();
        for name in gone {
            index.routes.remove(&name);
            index.seqs.insert(name, head_seq);
            changed = true;
        }
        let Index { routes, seqs, .. } = &mut *index;
        seqs.retain(|name, seq| *seq > head_seq || routes.contains_key(name));
        changed
    };
    if changed {
        routes.notify();
    }
}

fn parse_entry(value: &[u8]) -> Result<(u64, RawRoute), String> {
    let colon = value
        .iter()
        .position(|&b| b == b':')
        .ok_or("no sequence number")?;
    let seq = std::str::from_utf8(&value[..colon])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("bad sequence number")?;
    let spec = serde_json::from_slice(&value[colon + 1..]).map_err(|e| e.to_string())?;
    Ok((seq, spec))
}

/// `EVAL` of a route script with its keys and a fresh nonce as `ARGV[1]`.
fn script_cmd(script: &str) -> Result<::redis::Cmd, StoreError> {
    let mut cmd = redis::eval(
        script,
        &[
            redis::key("epoch"),
            redis::key("seq"),
            redis::key("routes"),
            redis::key("routes:last"),
        ],
    );
    cmd.arg(redis::random_hex(16)?);
    Ok(cmd)
}

fn redis_of(store: &CertStore) -> Result<&RedisSync, StoreError> {
    store.redis().ok_or_else(|| {
        StoreError::Io(std::io::Error::other(
            "runtime routes need the gateway's database or [cluster]",
        ))
    })
}

/// Runs a route script; its answer is always a list.
async fn script(sync: &RedisSync, cmd: &::redis::Cmd) -> Result<Vec<::redis::Value>, StoreError> {
    let answer = sync
        .redis
        .script(cmd)
        .await
        .inspect_err(|_| sync.metrics.state_redis_error())?;
    match answer {
        ::redis::Value::Array(items) => Ok(items),
        other => Err(protocol(format!("route script returned {other:?}"))),
    }
}

fn written_of(mut items: impl Iterator<Item = ::redis::Value>) -> Result<Written, StoreError> {
    Ok(Written {
        epoch: from_value(items.next())?,
        seq: from_value(items.next())?,
    })
}

fn protocol(message: String) -> StoreError {
    StoreError::Redis(RedisError::Protocol(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, prefix: &str) -> RawRoute {
        serde_json::from_value(serde_json::json!({
            "name": name, "prefix": prefix, "upstreams": ["http://127.0.0.1:1"], "auth": "none"
        }))
        .unwrap()
    }

    #[test]
    fn a_change_older_than_the_applied_one_is_refused_deletions_included() {
        let mut index = Index::default();
        assert!(index.apply("a", Some(spec("a", "/a")), 5));
        assert!(index.apply("a", Some(spec("a", "/b")), 7));
        assert!(!index.apply("a", None, 6), "older deletion applied");
        assert_eq!(index.routes["a"].prefix, "/b");
        assert!(
            !index.apply("a", Some(spec("a", "/b")), 8),
            "same spec is no change"
        );
        assert!(index.apply("a", None, 9));
        assert!(!index.apply("a", Some(spec("a", "/a")), 8), "resurrected");
        assert!(index.routes.is_empty());
    }

    #[test]
    fn entries_are_seq_colon_json() {
        let json = serde_json::to_vec(&spec("a", "/a")).unwrap();
        let mut value = b"12:".to_vec();
        value.extend_from_slice(&json);
        let (seq, parsed) = parse_entry(&value).unwrap();
        assert_eq!((seq, parsed), (12, spec("a", "/a")));
        assert!(parse_entry(b"x:{}").is_err());
        assert!(parse_entry(b"12:{").is_err());
    }

    #[tokio::test]
    async fn database_routes_survive_a_reopen_and_refuse_a_taken_name_or_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            CertStore::open_with_db(&dir.path().join("certs"), &dir.path().join("agentgate.db"))
                .unwrap()
                .0
        };
        let store = open();
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        attach(&store, move |r| record.lock().unwrap().push(r.len()))
            .await
            .unwrap();
        assert_eq!(
            put(&store, spec("a", "/a"), Mode::Create).await.unwrap(),
            Outcome::Created
        );
        assert!(matches!(
            put(&store, spec("a", "/x"), Mode::Create).await,
            Err(RouteWriteError::Exists(n)) if n == "a"
        ));
        assert!(matches!(
            put(&store, spec("b", "/a"), Mode::Replace).await,
            Err(RouteWriteError::PrefixTaken { by, .. }) if by == "a"
        ));
        assert_eq!(
            put(&store, spec("a", "/a2"), Mode::Replace).await.unwrap(),
            Outcome::Replaced
        );
        put(&store, spec("b", "/a"), Mode::Create).await.unwrap();
        assert!(delete(&store, "b").await.unwrap());
        assert!(!delete(&store, "b").await.unwrap());
        assert_eq!(*seen.lock().unwrap(), vec![0, 1, 1, 2, 1]);
        drop(store);

        let store = open();
        attach(&store, |_| {}).await.unwrap();
        assert_eq!(store.shared.routes.list(), vec![spec("a", "/a2")]);
    }
}
