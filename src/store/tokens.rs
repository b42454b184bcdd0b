//! Where API tokens, their revocations and the audit records of both live: the
//! `api_tokens`, `token_revocations` and `audit` tables of the node's database (see
//! [`super::db`]) on one node, Redis with `[cluster]`. [`TokenStore`] is the one door to
//! both; each change is one SQLite transaction or one Lua script, the audit record
//! included, so a failure leaves neither the change nor its record behind.
//!
//! The JWT check reads only the in-memory set of revoked ids
//! ([`crate::auth::Revocations`], held by the certificate store): it is loaded at start
//! (database) or at every resync (Redis), a revocation updates it on the node that
//! answered before the answer leaves, and on Redis the revocation script publishes a
//! `token revoke <jti>` change (body: the token's expiry) that every other node applies.
//!
//! # Redis keys
//!
//! | key | type | value |
//! | --- | --- | --- |
//! | `agentgate:{state}:apitoken:<jti>` | hash | `project`, `service`, `description`, `created_at`, `expires_at`, `created_by`, `revoked_at`; Redis deletes it at the token's expiry (`EXPIREAT`) |
//! | `agentgate:{state}:apitokens` | sorted set | jti scored by `created_at`: the listing's order |
//! | `agentgate:{state}:apitokens:expiry` | sorted set | jti scored by `expires_at`: what the purge removes from the listing |
//! | `agentgate:{state}:revoked` | hash | jti -> the token's expiry (Unix seconds), the purge horizon |
//! | `agentgate:{state}:audit` | stream | `at`, `actor`, `action`, `jti`, `project`, `service`, `detail`; capped at about [`AUDIT_CAP`] entries |
//!
//! The audit is a stream rather than a list: its entry ids are ordered by time, so
//! `XREVRANGE` pages newest first with the last id seen as the cursor (stable while
//! entries are added, as keyset paging over agent ids is), and `XADD ... MAXLEN ~` caps
//! it in the same command at amortised O(1). Issuing publishes nothing: no node keeps
//! issued tokens in memory (the listing reads Redis), only revocations.

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::db::Db;
use super::redis::{RedisError, RedisState, channel, eval, from_value, key};
use super::{CertStore, StoreError};

/// About this many audit entries are kept in Redis (`XADD MAXLEN ~`); the database keeps
/// every record.
pub(crate) const AUDIT_CAP: u64 = 100_000;

/// A token this gateway issued, as stored and listed (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IssuedToken {
    pub jti: String,
    pub project: String,
    pub service: String,
    pub description: String,
    pub created_at: i64,
    pub expires_at: i64,
}

/// What a revocation found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Revoked {
    /// The token's expiry, or the purge horizon given for a jti this gateway did not issue.
    pub expires_at: i64,
    /// True when the jti was already revoked: nothing was written.
    pub already: bool,
}

/// One audit record, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuditRecord {
    /// The cursor of the record: the row id (database) or the stream id (Redis).
    pub id: String,
    pub at: i64,
    /// The name of the API key that made the change (never the key).
    pub actor: String,
    pub action: AuditAction,
    pub jti: String,
    pub project: Option<String>,
    pub service: Option<String>,
    /// The token's description (issue) or the reason (revoke).
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuditAction {
    Issue,
    Revoke,
}

impl AuditAction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Issue => "issue",
            Self::Revoke => "revoke",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "issue" => Some(Self::Issue),
            "revoke" => Some(Self::Revoke),
            _ => None,
        }
    }
}

/// Where the listing of tokens resumes: after the token created at `created_at` with
/// `jti` (newest first, ties by jti descending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenCursor {
    pub created_at: i64,
    pub jti: String,
}

/// A change of the `token` kind on the change channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenChange {
    Revoke { jti: String, expires_at: i64 },
}

impl TokenChange {
    /// Parses the fields after `token` in a change header, and the body.
    pub(super) fn parse(rest: &[&str], body: &[u8]) -> Result<Self, String> {
        match rest {
            ["revoke", jti] => {
                let expires_at = std::str::from_utf8(body)
                    .ok()
                    .and_then(|b| b.trim().parse().ok())
                    .ok_or_else(|| format!("token revoke {jti}: bad expiry in the body"))?;
                Ok(Self::Revoke {
                    jti: (*jti).to_owned(),
                    expires_at,
                })
            }
            other => Err(format!("unknown token change {other:?}")),
        }
    }
}

/// Applies a change another node made (or this one: applying it twice changes nothing).
pub(super) fn apply(store: &CertStore, change: TokenChange) {
    match change {
        TokenChange::Revoke { jti, expires_at } => {
            store.revocations().revoke(&jti, expires_at);
        }
    }
}

/// Resync: the revocation set becomes what Redis holds.
pub(super) async fn reload(store: &CertStore) -> Result<(), StoreError> {
    let Some(sync) = store.redis() else {
        return Ok(());
    };
    let all = revoked_in_redis(&sync.redis)
        .await
        .inspect_err(|_| sync.metrics.state_redis_error())?;
    let n = all.len();
    store.revocations().replace_all(all);
    tracing::debug!(revocations = n, "revoked API tokens loaded from Redis");
    Ok(())
}

/// The storage of API tokens on one of the two backends; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct TokenStore {
    side: Side,
}

#[derive(Clone, Debug)]
enum Side {
    Db(Db),
    Redis(CertStore),
}

impl TokenStore {
    /// The side that goes with `store`: Redis when it is shared, else its database (or,
    /// for a store opened without one, the database in `data_dir`).
    pub(crate) fn open(store: &CertStore, data_dir: &std::path::Path) -> Result<Self, StoreError> {
        let side = if store.is_shared() {
            Side::Redis(store.clone())
        } else {
            Side::Db(store.db_or_open(data_dir)?)
        };
        Ok(Self { side })
    }

    /// Records an issued token and its audit record (`actor` issued it).
    pub(crate) async fn issue(&self, token: &IssuedToken, actor: &str) -> Result<(), StoreError> {
        match &self.side {
            Side::Db(db) => {
                let (t, actor) = (token.clone(), actor.to_owned());
                db.call(move |conn| {
                    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    tx.execute(
                        "INSERT INTO api_tokens (jti, project, service, description, created_at, expires_at, created_by)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        params![t.jti, t.project, t.service, t.description, t.created_at, t.expires_at, actor],
                    )?;
                    audit_row(&tx, t.created_at, &actor, AuditAction::Issue, &t.jti, Some((&t.project, &t.service)), &t.description)?;
                    tx.commit()
                })
                .await?;
                Ok(())
            }
            Side::Redis(store) => {
                let sync = redis_of(store)?;
                let mut cmd = eval(
                    ISSUE_SCRIPT,
                    &[
                        key("epoch"),
                        token_key(&token.jti),
                        key("apitokens"),
                        key("apitokens:expiry"),
                        key("audit"),
                    ],
                );
                cmd.arg(&token.jti)
                    .arg(&token.project)
                    .arg(&token.service)
                    .arg(&token.description)
                    .arg(token.created_at)
                    .arg(token.expires_at)
                    .arg(actor)
                    .arg(AUDIT_CAP);
                sync.redis
                    .script(&cmd)
                    .await
                    .inspect_err(|_| sync.metrics.state_redis_error())?;
                Ok(())
            }
        }
    }

    /// Revokes `jti` at `now` (by `actor`, for `reason`): the revocation lasts until the
    /// token's expiry, or `horizon` for a jti this gateway did not issue. A jti revoked
    /// already is left as it is. The in-memory set is the caller's to update.
    pub(crate) async fn revoke(
        &self,
        jti: &str,
        now: i64,
        horizon: i64,
        actor: &str,
        reason: &str,
    ) -> Result<Revoked, StoreError> {
        match &self.side {
            Side::Db(db) => {
                let (jti, actor, reason) = (jti.to_owned(), actor.to_owned(), reason.to_owned());
                let revoked = db
                    .call(move |conn| {
                        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                        let old: Option<i64> = tx
                            .query_row(
                                "SELECT expires_at FROM token_revocations WHERE jti = ?1",
                                [&jti],
                                |r| r.get(0),
                            )
                            .optional()?;
                        if let Some(expires_at) = old {
                            return Ok(Revoked {
                                expires_at,
                                already: true,
                            });
                        }
                        let issued: Option<(String, String, i64)> = tx
                            .query_row(
                                "SELECT project, service, expires_at FROM api_tokens WHERE jti = ?1",
                                [&jti],
                                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                            )
                            .optional()?;
                        let expires_at = issued.as_ref().map_or(horizon, |t| t.2);
                        tx.execute(
                            "INSERT INTO token_revocations (jti, expires_at, revoked_at, revoked_by, reason)
                             VALUES (?1, ?2, ?3, ?4, ?5)",
                            params![jti, expires_at, now, actor, reason],
                        )?;
                        let names = issued.as_ref().map(|(p, s, _)| (p.as_str(), s.as_str()));
                        audit_row(&tx, now, &actor, AuditAction::Revoke, &jti, names, &reason)?;
                        tx.commit()?;
                        Ok(Revoked {
                            expires_at,
                            already: false,
                        })
                    })
                    .await?;
                Ok(revoked)
            }
            Side::Redis(store) => {
                let sync = redis_of(store)?;
                let mut cmd = eval(
                    REVOKE_SCRIPT,
                    &[
                        key("epoch"),
                        key("seq"),
                        key("revoked"),
                        token_key(jti),
                        key("audit"),
                    ],
                );
                cmd.arg(jti)
                    .arg(now)
                    .arg(horizon)
                    .arg(actor)
                    .arg(reason)
                    .arg(super::unix_ms())
                    .arg(sync.redis.publish)
                    .arg(channel())
                    .arg(AUDIT_CAP);
                let answer = sync
                    .redis
                    .script(&cmd)
                    .await
                    .inspect_err(|_| sync.metrics.state_redis_error())?;
                let redis::Value::Array(items) = answer else {
                    return Err(
                        RedisError::Protocol(format!("revoke script returned {answer:?}")).into(),
                    );
                };
                let mut items = items.into_iter();
                let status: String = from_value(items.next())?;
                let expires_at: i64 = from_value(items.next())?;
                if status == "revoked" {
                    let epoch: String = from_value(items.next())?;
                    sync.note_epoch(&epoch);
                }
                Ok(Revoked {
                    expires_at,
                    already: status == "already",
                })
            }
        }
    }

    /// Up to `n` active tokens (not expired at `now`, not revoked) after `after`, newest
    /// first, of `project` only when given.
    pub(crate) async fn list(
        &self,
        now: i64,
        project: Option<&str>,
        after: Option<&TokenCursor>,
        n: usize,
    ) -> Result<Vec<IssuedToken>, StoreError> {
        match &self.side {
            Side::Db(db) => {
                let project = project.map(str::to_owned);
                let cursor =
                    after.map_or((None, None), |a| (Some(a.created_at), Some(a.jti.clone())));
                let rows = db
                    .call(move |conn| {
                        rows(
                            conn,
                            "SELECT jti, project, service, description, created_at, expires_at
                             FROM api_tokens
                             WHERE expires_at > ?1
                               AND NOT EXISTS (SELECT 1 FROM token_revocations r WHERE r.jti = api_tokens.jti)
                               AND (?2 IS NULL OR project = ?2)
                               AND (?3 IS NULL OR created_at < ?3 OR (created_at = ?3 AND jti < ?4))
                             ORDER BY created_at DESC, jti DESC
                             LIMIT ?5",
                            params![now, project, cursor.0, cursor.1, n as i64],
                            |r| {
                                Ok(IssuedToken {
                                    jti: r.get(0)?,
                                    project: r.get(1)?,
                                    service: r.get(2)?,
                                    description: r.get(3)?,
                                    created_at: r.get(4)?,
                                    expires_at: r.get(5)?,
                                })
                            },
                        )
                    })
                    .await?;
                Ok(rows)
            }
            Side::Redis(store) => {
                let sync = redis_of(store)?;
                let mut cmd = eval(LIST_SCRIPT, &[key("apitokens"), key("apitoken:")]);
                cmd.arg(now)
                    .arg(project.unwrap_or(""))
                    .arg(after.map_or(String::new(), |a| a.created_at.to_string()))
                    .arg(after.map_or("", |a| a.jti.as_str()))
                    .arg(n);
                let rows: Vec<Vec<String>> = read(sync, &cmd).await?;
                rows.into_iter()
                    .map(|row| match <[String; 6]>::try_from(row) {
                        Ok([jti, project, service, description, created_at, expires_at]) => {
                            Ok(IssuedToken {
                                jti,
                                project,
                                service,
                                description,
                                created_at: number(&created_at)?,
                                expires_at: number(&expires_at)?,
                            })
                        }
                        Err(row) => Err(RedisError::Protocol(format!(
                            "token listing returned a row of {} fields",
                            row.len()
                        ))
                        .into()),
                    })
                    .collect()
            }
        }
    }

    /// Up to `n` audit records older than the one with id `after`, newest first.
    pub(crate) async fn audit(
        &self,
        after: Option<&str>,
        n: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        match &self.side {
            Side::Db(db) => {
                let after: Option<i64> = match after.map(str::parse) {
                    None => None,
                    Some(Ok(id)) => Some(id),
                    // A cursor of the other backend (a Redis stream id): no row comes
                    // after it here.
                    Some(Err(_)) => return Ok(Vec::new()),
                };
                let rows = db
                    .call(move |conn| {
                        rows(
                            conn,
                            "SELECT id, at, actor, action, jti, project, service, detail FROM audit
                             WHERE ?1 IS NULL OR id < ?1 ORDER BY id DESC LIMIT ?2",
                            params![after, n as i64],
                            |r| {
                                let action: String = r.get(3)?;
                                Ok(AuditRecord {
                                    id: r.get::<_, i64>(0)?.to_string(),
                                    at: r.get(1)?,
                                    actor: r.get(2)?,
                                    action: AuditAction::parse(&action).ok_or_else(|| {
                                        rusqlite::Error::FromSqlConversionFailure(
                                            3,
                                            rusqlite::types::Type::Text,
                                            format!("unknown audit action {action:?}").into(),
                                        )
                                    })?,
                                    jti: r.get(4)?,
                                    project: r.get(5)?,
                                    service: r.get(6)?,
                                    detail: r.get(7)?,
                                })
                            },
                        )
                    })
                    .await?;
                Ok(rows)
            }
            Side::Redis(store) => {
                let sync = redis_of(store)?;
                let mut cmd = redis::cmd("XREVRANGE");
                cmd.arg(key("audit"));
                match after {
                    // Exclusive start (Redis 6.2+): the entry after the cursor.
                    Some(id) => cmd.arg(format!("({id}")),
                    None => cmd.arg("+"),
                };
                cmd.arg("-").arg("COUNT").arg(n);
                let entries: Vec<(String, Vec<(String, String)>)> = read(sync, &cmd).await?;
                entries
                    .into_iter()
                    .map(|(id, fields)| audit_entry(id, fields))
                    .collect()
            }
        }
    }

    /// Every revocation: `(jti, expiry)`.
    pub(crate) async fn revocations(&self) -> Result<Vec<(String, i64)>, StoreError> {
        match &self.side {
            Side::Db(db) => Ok(db
                .call(|conn| {
                    rows(
                        conn,
                        "SELECT jti, expires_at FROM token_revocations",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                })
                .await?),
            Side::Redis(store) => {
                let sync = redis_of(store)?;
                Ok(revoked_in_redis(&sync.redis).await?)
            }
        }
    }

    /// Deletes the revocations of tokens expired before `now`, and expired tokens; returns
    /// how many revocations went.
    pub(crate) async fn purge(&self, now: i64) -> Result<usize, StoreError> {
        match &self.side {
            Side::Db(db) => {
                let n = db
                    .call(move |conn| {
                        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                        let n = tx.execute(
                            "DELETE FROM token_revocations WHERE expires_at < ?1",
                            [now],
                        )?;
                        tx.execute("DELETE FROM api_tokens WHERE expires_at < ?1", [now])?;
                        tx.commit()?;
                        Ok(n)
                    })
                    .await?;
                Ok(n)
            }
            Side::Redis(store) => {
                let sync = redis_of(store)?;
                let mut cmd = eval(
                    PURGE_SCRIPT,
                    &[key("revoked"), key("apitokens"), key("apitokens:expiry")],
                );
                cmd.arg(now);
                let n: usize = read(sync, &cmd).await?;
                Ok(n)
            }
        }
    }
}

/// Every row `sql` selects, each made by `f`.
fn rows<T, P: rusqlite::Params>(
    conn: &rusqlite::Connection,
    sql: &str,
    params: P,
    f: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    conn.prepare_cached(sql)?.query_map(params, f)?.collect()
}

/// A read from Redis, counted as a Redis error when it fails.
async fn read<T: redis::FromRedisValue>(
    sync: &super::sync::RedisSync,
    cmd: &redis::Cmd,
) -> Result<T, StoreError> {
    let answer = sync.redis.driver.query(cmd).await.map_err(RedisError::from);
    Ok(answer.inspect_err(|_| sync.metrics.state_redis_error())?)
}

/// One audit row, inside the caller's transaction.
fn audit_row(
    tx: &rusqlite::Transaction<'_>,
    at: i64,
    actor: &str,
    action: AuditAction,
    jti: &str,
    names: Option<(&str, &str)>,
    detail: &str,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO audit (at, actor, action, jti, project, service, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            at,
            actor,
            action.as_str(),
            jti,
            names.map(|n| n.0),
            names.map(|n| n.1),
            detail
        ],
    )?;
    Ok(())
}

fn redis_of(store: &CertStore) -> Result<&super::sync::RedisSync, StoreError> {
    // `TokenStore::new` chose Redis because the store is shared; a store's backend never
    // changes.
    store.redis().ok_or_else(|| {
        StoreError::Io(std::io::Error::other(
            "API tokens on Redis without a shared store",
        ))
    })
}

async fn revoked_in_redis(redis: &RedisState) -> Result<Vec<(String, i64)>, RedisError> {
    let mut cmd = redis::cmd("HGETALL");
    cmd.arg(key("revoked"));
    let all: Vec<(String, String)> = redis.driver.query(&cmd).await?;
    let mut out = Vec::with_capacity(all.len());
    for (jti, exp) in all {
        match exp.parse() {
            Ok(exp) => out.push((jti, exp)),
            // Only another version could have written it; a revocation is kept rather
            // than dropped, until the longest lifetime a token can have.
            Err(_) => {
                tracing::warn!(%jti, value = %exp, "revocation with an unreadable expiry in Redis; kept");
                out.push((jti, i64::MAX));
            }
        }
    }
    Ok(out)
}

fn audit_entry(id: String, fields: Vec<(String, String)>) -> Result<AuditRecord, StoreError> {
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let bad = |what: &str| RedisError::Protocol(format!("audit entry {id}: {what}"));
    let action = get("action")
        .as_deref()
        .and_then(AuditAction::parse)
        .ok_or_else(|| bad("unknown action"))?;
    let at = get("at")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| bad("bad time"))?;
    let named = |name: &str| get(name).filter(|v| !v.is_empty());
    Ok(AuditRecord {
        at,
        actor: get("actor").unwrap_or_default(),
        action,
        jti: get("jti").unwrap_or_default(),
        project: named("project"),
        service: named("service"),
        detail: get("detail").unwrap_or_default(),
        id,
    })
}

fn number(s: &str) -> Result<i64, StoreError> {
    s.parse()
        .map_err(|_| RedisError::Protocol(format!("not a number in a token record: {s:?}")).into())
}

fn token_key(jti: &str) -> String {
    key(&format!("apitoken:{jti}"))
}

/// Records a token, its places in the listing, and the audit entry. A second run (the
/// driver's retry) finds the token and changes nothing.
const ISSUE_SCRIPT: &str = r"
if not redis.call('get', KEYS[1]) then return redis.error_reply('AGENTGATE_NOSTATE') end
if redis.call('exists', KEYS[2]) == 1 then return 0 end
redis.call('hset', KEYS[2], 'project', ARGV[2], 'service', ARGV[3], 'description', ARGV[4],
  'created_at', ARGV[5], 'expires_at', ARGV[6], 'created_by', ARGV[7])
redis.call('expireat', KEYS[2], tonumber(ARGV[6]))
redis.call('zadd', KEYS[3], tonumber(ARGV[5]), ARGV[1])
redis.call('zadd', KEYS[4], tonumber(ARGV[6]), ARGV[1])
redis.call('xadd', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 'at', ARGV[5], 'actor', ARGV[7],
  'action', 'issue', 'jti', ARGV[1], 'project', ARGV[2], 'service', ARGV[3], 'detail', ARGV[4])
return 1
";

/// Revokes a jti (until its token's expiry, or the horizon given for a jti not issued
/// here), writes the audit entry and publishes the change; a jti revoked already is left
/// alone (`already`, with its expiry).
const REVOKE_SCRIPT: &str = r"
local epoch = redis.call('get', KEYS[1])
if not epoch then return redis.error_reply('AGENTGATE_NOSTATE') end
local old = redis.call('hget', KEYS[3], ARGV[1])
if old then return {'already', old} end
local t = redis.call('hmget', KEYS[4], 'project', 'service', 'expires_at')
local exp = ARGV[3]
if t[3] then exp = t[3] end
local seq = redis.call('incr', KEYS[2])
redis.call('hset', KEYS[3], ARGV[1], exp)
if t[3] then redis.call('hset', KEYS[4], 'revoked_at', ARGV[2]) end
redis.call('xadd', KEYS[5], 'MAXLEN', '~', ARGV[9], '*', 'at', ARGV[2], 'actor', ARGV[4],
  'action', 'revoke', 'jti', ARGV[1], 'project', t[1] or '', 'service', t[2] or '', 'detail', ARGV[5])
redis.call(ARGV[7], ARGV[8], epoch .. ' ' .. seq .. ' ' .. ARGV[6] .. ' token revoke ' .. ARGV[1] .. '\n' .. exp)
return {'revoked', exp, epoch, seq}
";

/// Walks the listing newest first from the cursor, in batches, and returns up to
/// `ARGV[5]` tokens that are not expired, not revoked, and of the project when one is
/// given. The token hashes share the `{state}` hash tag of the declared keys, so they live
/// in the same slot on a Redis Cluster.
const LIST_SCRIPT: &str = r"
local now, project, cscore, cjti, n = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local max = '+inf'
if cscore ~= '' then max = cscore end
local out, offset = {}, 0
while #out < n do
  local batch = redis.call('zrevrangebyscore', KEYS[1], max, '-inf', 'WITHSCORES', 'LIMIT', offset, 200)
  if #batch == 0 then break end
  for i = 1, #batch, 2 do
    local jti, score = batch[i], batch[i + 1]
    if not (cscore ~= '' and tonumber(score) == tonumber(cscore) and jti >= cjti) then
      local t = redis.call('hmget', KEYS[2] .. jti, 'project', 'service', 'description', 'created_at', 'expires_at', 'revoked_at')
      if t[1] and not t[6] and tonumber(t[5]) > now and (project == '' or t[1] == project) then
        out[#out + 1] = {jti, t[1], t[2], t[3], t[4], t[5]}
        if #out >= n then break end
      end
    end
  end
  offset = offset + 200
end
return out
";

/// Deletes revocations whose token expired before `ARGV[1]` and takes expired tokens out
/// of the listing (Redis deleted their hashes itself at expiry).
const PURGE_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local n = 0
local all = redis.call('hgetall', KEYS[1])
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) < now then
    redis.call('hdel', KEYS[1], all[i])
    n = n + 1
  end
end
local gone = redis.call('zrangebyscore', KEYS[3], '-inf', '(' .. ARGV[1])
for _, jti in ipairs(gone) do redis.call('zrem', KEYS[2], jti) end
redis.call('zremrangebyscore', KEYS[3], '-inf', '(' .. ARGV[1])
return n
";

#[cfg(test)]
mod tests {
    use super::*;

    fn token(jti: &str, project: &str, created_at: i64, expires_at: i64) -> IssuedToken {
        IssuedToken {
            jti: jti.into(),
            project: project.into(),
            service: "svc".into(),
            description: format!("token {jti}"),
            created_at,
            expires_at,
        }
    }

    #[test]
    fn token_changes_parse_and_bad_ones_say_why() {
        assert_eq!(
            TokenChange::parse(&["revoke", "j-1"], b"1700000000").unwrap(),
            TokenChange::Revoke {
                jti: "j-1".into(),
                expires_at: 1_700_000_000
            }
        );
        assert!(TokenChange::parse(&["revoke", "j-1"], b"soon").is_err());
        assert!(TokenChange::parse(&["revoke"], b"1").is_err());
        assert!(TokenChange::parse(&["issue", "j-1"], b"1").is_err());
    }

    /// The database side: listing order, paging, filters; revocation with and without an
    /// issued token, idempotent; audit newest first; purge.
    #[tokio::test]
    async fn database_side_lists_revokes_audits_and_purges() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertStore::open_with_indexed(&dir.path().join("certs"), vec![]).unwrap();
        let tokens = TokenStore::open(&store, dir.path()).unwrap();
        for t in [
            token("a", "p1", 100, 1000),
            token("b", "p1", 200, 1000),
            token("c", "p2", 200, 1000),
            token("d", "p1", 300, 400),
        ] {
            tokens.issue(&t, "admin").await.unwrap();
        }
        let jtis = |v: Vec<IssuedToken>| v.into_iter().map(|t| t.jti).collect::<Vec<_>>();
        assert_eq!(
            jtis(tokens.list(350, None, None, 10).await.unwrap()),
            ["d", "c", "b", "a"]
        );
        let page = tokens.list(350, None, None, 2).await.unwrap();
        assert_eq!(jtis(page.clone()), ["d", "c"]);
        let cursor = TokenCursor {
            created_at: page[1].created_at,
            jti: page[1].jti.clone(),
        };
        assert_eq!(
            jtis(tokens.list(350, None, Some(&cursor), 2).await.unwrap()),
            ["b", "a"]
        );
        assert_eq!(
            jtis(tokens.list(350, Some("p1"), None, 10).await.unwrap()),
            ["d", "b", "a"]
        );
        // Expired at 400: gone from the listing at 400.
        assert_eq!(
            jtis(tokens.list(400, Some("p1"), None, 10).await.unwrap()),
            ["b", "a"]
        );

        let r = tokens
            .revoke("b", 350, 9999, "ops", "leaked")
            .await
            .unwrap();
        assert_eq!(
            r,
            Revoked {
                expires_at: 1000,
                already: false
            }
        );
        let again = tokens.revoke("b", 360, 9999, "ops", "again").await.unwrap();
        assert!(again.already && again.expires_at == 1000);
        let foreign = tokens
            .revoke("minted-elsewhere", 360, 9999, "ops", "old system")
            .await
            .unwrap();
        assert_eq!(foreign.expires_at, 9999);
        assert_eq!(
            jtis(tokens.list(350, Some("p1"), None, 10).await.unwrap()),
            ["d", "a"]
        );

        let audit = tokens.audit(None, 100).await.unwrap();
        assert_eq!(audit.len(), 6, "four issues, two revocations: {audit:?}");
        assert_eq!(audit[0].jti, "minted-elsewhere");
        assert_eq!(
            (audit[0].project.as_deref(), audit[0].action),
            (None, AuditAction::Revoke)
        );
        assert_eq!(audit[1].project.as_deref(), Some("p1"));
        assert_eq!(
            (audit[1].actor.as_str(), audit[1].detail.as_str()),
            ("ops", "leaked")
        );
        let older = tokens.audit(Some(&audit[1].id), 100).await.unwrap();
        assert_eq!(older.len(), 4);
        assert!(
            older
                .iter()
                .all(|a| a.action == AuditAction::Issue && a.actor == "admin")
        );

        let mut all = tokens.revocations().await.unwrap();
        all.sort();
        assert_eq!(
            all,
            [
                ("b".to_owned(), 1000),
                ("minted-elsewhere".to_owned(), 9999)
            ]
        );
        assert_eq!(tokens.purge(1001).await.unwrap(), 1);
        assert_eq!(
            tokens.revocations().await.unwrap(),
            [("minted-elsewhere".to_owned(), 9999)]
        );
        assert!(tokens.list(1001, None, None, 10).await.unwrap().is_empty());
        assert_eq!(
            tokens.audit(None, 100).await.unwrap().len(),
            6,
            "audit is kept"
        );
    }
}
