//! The Redis backend of the shared state (`[cluster]`): certificates, install tokens and
//! agent metadata, written by Lua scripts that change the data and publish the change in
//! one step, so a change is either in Redis and announced, or nowhere.
//!
//! # Keys
//!
//! Every key and the change channel carry the hash tag `{state}`: on a Redis Cluster they
//! all live in one slot, so each script touches keys of one slot only and its `SPUBLISH`
//! goes to the shard that holds them (Redis refuses cross-slot scripts). The price is that
//! the state of one gateway cluster lives on one shard; at about 1.5 KiB per agent that is
//! 1.5 GB for a million agents.
//!
//! | key | type | value |
//! | --- | --- | --- |
//! | `agentgate:{state}:epoch` | string | random id of this state, set once (`SET NX`) |
//! | `agentgate:{state}:seq` | string | change counter: every change takes the next number |
//! | `agentgate:{state}:certs` | hash | agent id -> `<seq>:<certificate DER>` |
//! | `agentgate:{state}:metadata` | hash | agent id -> metadata JSON (from registration) |
//! | `agentgate:{state}:token:<sha256 hex>` | hash | `agent_id`, `created_at`, `expires_at`, `used_at`, `used_by`; expires 7 days after use or expiry |
//! | `agentgate:{state}:apitoken:<jti>`, `...:apitokens`, `...:apitokens:expiry`, `...:revoked`, `...:audit` | | API tokens, revocations and their audit: see [`super::tokens`] |
//! | `agentgate:{state}:routes` | hash | route name -> `<seq>:<route JSON>` (runtime routes, see `super::routes`) |
//! | `agentgate:{state}:routes:last` | string | `<nonce> <seq> <outcome>` of the last route write (a retried script answers as the first run did) |
//!
//! Changes are announced on `agentgate:{state}:changes` (`SPUBLISH` on a Redis Cluster) as
//! `<epoch> <seq> <sent unix ms> <kind> <op> <key>\n<body>`; certificates are kind `cert`
//! (`cert put <agent_id>` with the DER as body, `cert del <agent_id>`); revocations of API
//! tokens are kind `token` (`token revoke <jti>` with the token's expiry as body); runtime
//! routes kind `route` (`route put <name>` with the route's JSON as body, `route del
//! <name>`). A later kind of shared state adds its own kind to the same channel and
//! sequence, and a node that does not know a kind steps over it. The epoch tells a node that
//! Redis holds another state than the one it followed (restored from an older backup,
//! emptied by a restart without persistence); the sequence number orders changes and shows
//! a lost message as a gap.
//!
//! The driver retries a command once after a connection error, so a script may run twice:
//! each is idempotent (a second put or delete of the same thing changes nothing a node can
//! see; a redemption carries a nonce and a repeat with the same nonce succeeds again).

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use socketioxide_redis::drivers::{ChanItem, Driver, MessageStream};

use crate::cluster::{DriverConfig, DriverError, DriverStatus, RedisDriver, Topology};
use crate::config::{ClusterConfig, ClusterMode};
use crate::digest::hex;
use crate::identity::AgentId;

/// Key prefix and hash tag of every key of the shared state.
const PREFIX: &str = "agentgate:{state}";

/// Certificates read per `HSCAN` round trip during a resync.
const SCAN_COUNT: usize = 1000;

/// Messages buffered between the connection's reader and the node's sync task; a full
/// buffer drops messages, which the sync task sees as a gap and repairs by a resync.
pub(crate) const CHANGES_BUFFER: usize = 8192;

/// How long used or expired token records are kept (for the "already used" answer).
pub(crate) const KEEP_SPENT_SECS: i64 = 7 * 86_400;

/// Refuses a change when Redis holds no agentgate state (see [`RedisError::NoState`]).
const NO_STATE: &str = "AGENTGATE_NOSTATE";

const PUT_SCRIPT: &str = r"
local epoch = redis.call('get', KEYS[1])
if not epoch then return redis.error_reply('AGENTGATE_NOSTATE') end
local seq = redis.call('incr', KEYS[2])
redis.call('hset', KEYS[3], ARGV[1], seq .. ':' .. ARGV[2])
redis.call(ARGV[4], ARGV[5], epoch .. ' ' .. seq .. ' ' .. ARGV[3] .. ' cert put ' .. ARGV[1] .. '\n' .. ARGV[2])
return {epoch, seq}
";

/// `store import`: a put that writes only agents Redis has no certificate for.
const IMPORT_SCRIPT: &str = r"
local epoch = redis.call('get', KEYS[1])
if not epoch then return redis.error_reply('AGENTGATE_NOSTATE') end
if redis.call('hexists', KEYS[3], ARGV[1]) == 1 then return {epoch, 0} end
local seq = redis.call('incr', KEYS[2])
redis.call('hset', KEYS[3], ARGV[1], seq .. ':' .. ARGV[2])
redis.call(ARGV[4], ARGV[5], epoch .. ' ' .. seq .. ' ' .. ARGV[3] .. ' cert put ' .. ARGV[1] .. '\n' .. ARGV[2])
return {epoch, seq}
";

const DELETE_SCRIPT: &str = r"
local epoch = redis.call('get', KEYS[1])
if not epoch then return redis.error_reply('AGENTGATE_NOSTATE') end
local old = redis.call('hget', KEYS[3], ARGV[1])
if not old then return {epoch, 0} end
local seq = redis.call('incr', KEYS[2])
redis.call('hdel', KEYS[3], ARGV[1])
redis.call('hdel', KEYS[4], ARGV[1])
redis.call(ARGV[3], ARGV[4], epoch .. ' ' .. seq .. ' ' .. ARGV[2] .. ' cert del ' .. ARGV[1] .. '\n')
return {epoch, seq, old}
";

/// Checks and consumes an install token and stores the certificate and the metadata, in
/// one step: two nodes redeeming one token at the same instant run one after the other
/// inside Redis, and the second finds it used.
const REGISTER_SCRIPT: &str = r"
local epoch = redis.call('get', KEYS[1])
if not epoch then return redis.error_reply('AGENTGATE_NOSTATE') end
local t = redis.call('hmget', KEYS[5], 'agent_id', 'expires_at', 'used_at', 'used_by', 'seq')
if not t[1] then return {'unknown'} end
if t[3] then
  if t[4] == ARGV[7] then return {'ok', epoch, tonumber(t[5])} end
  return {'used'}
end
if t[1] ~= ARGV[1] then return {'other'} end
if tonumber(ARGV[6]) >= tonumber(t[2]) then return {'expired', t[2]} end
local seq = redis.call('incr', KEYS[2])
redis.call('hset', KEYS[5], 'used_at', ARGV[6], 'used_by', ARGV[7], 'seq', seq)
redis.call('expireat', KEYS[5], tonumber(ARGV[6]) + tonumber(ARGV[9]))
redis.call('hset', KEYS[3], ARGV[1], seq .. ':' .. ARGV[2])
redis.call('hset', KEYS[4], ARGV[1], ARGV[8])
redis.call(ARGV[4], ARGV[5], epoch .. ' ' .. seq .. ' ' .. ARGV[3] .. ' cert put ' .. ARGV[1] .. '\n' .. ARGV[2])
return {'ok', epoch, seq}
";

const ISSUE_SCRIPT: &str = r"
redis.call('hset', KEYS[1], 'agent_id', ARGV[1], 'created_at', ARGV[2], 'expires_at', ARGV[3])
redis.call('expireat', KEYS[1], tonumber(ARGV[3]) + tonumber(ARGV[4]))
return 1
";

const HEAD_SCRIPT: &str = r"
return {redis.call('get', KEYS[1]), redis.call('get', KEYS[2])}
";

/// Why the Redis backend could not do something.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("Redis is unreachable ({0})")]
    Unavailable(#[from] DriverError),
    /// The epoch key is gone: Redis was restarted without persistence or flushed. Nodes
    /// keep the certificates they know and refuse changes until an operator restores the
    /// data or re-imports it (README, "Running several nodes").
    #[error(
        "Redis holds no agentgate state (restarted without persistence, or flushed); restore its data or run `agentgate store import`"
    )]
    NoState,
    #[error("unexpected answer from Redis: {0}")]
    Protocol(String),
}

impl From<redis::RedisError> for RedisError {
    fn from(e: redis::RedisError) -> Self {
        Self::Unavailable(DriverError::from(e))
    }
}

/// One certificate entry of a scan: `(agent id, seq, DER)`, or why it is unusable.
pub(crate) type ScanEntry = Result<(AgentId, u64, Vec<u8>), String>;

/// The connection and key layout of one node's shared state. Cheap to clone.
#[derive(Clone)]
pub(crate) struct RedisState {
    pub(super) driver: RedisDriver,
    /// `PUBLISH`, or `SPUBLISH` on a Redis Cluster (sharded pub/sub).
    pub(super) publish: &'static str,
    pub(crate) node_id: String,
}

impl fmt::Debug for RedisState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisState")
            .field("node_id", &self.node_id)
            .field("publish", &self.publish)
            .finish_non_exhaustive()
    }
}

/// What a token record says, for the check before a registration does any work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenRecord {
    pub agent_id: String,
    pub expires_at: i64,
    pub used: bool,
}

/// The answer of the registration script.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Redeemed {
    Done(Written),
    Unknown,
    Used,
    OtherAgent,
    Expired(i64),
}

/// A change Redis accepted: the epoch it belongs to and its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Written {
    pub epoch: String,
    pub seq: u64,
}

/// One change as announced on the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChangeMessage {
    pub epoch: String,
    pub seq: u64,
    pub sent_ms: i64,
    pub change: Changed,
}

/// What a change message changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Changed {
    Cert {
        agent_id: AgentId,
        /// `None` for a deletion.
        der: Option<Vec<u8>>,
    },
    /// A revocation of an API token (see [`super::tokens`]).
    Token(super::tokens::TokenChange),
    /// A runtime route (`route put <name>` with its JSON as body, `route del <name>`).
    Route {
        name: String,
        /// `None` for a deletion.
        spec: Option<Vec<u8>>,
    },
    /// A kind of state this version does not keep (written by a newer node).
    Unknown(String),
}

/// The position of the state at one instant: changes up to `seq` are visible to a scan
/// started after it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    pub epoch: String,
    pub seq: u64,
}

impl RedisState {
    /// Connects to Redis (failing at once when it is unreachable) and makes sure it holds
    /// an agentgate state: the first node of a new cluster creates the epoch.
    pub(crate) async fn connect(cluster: &ClusterConfig) -> Result<Self, RedisError> {
        let topology = match cluster.mode {
            ClusterMode::Standalone => Topology::Standalone(cluster.redis_url.clone()),
            ClusterMode::Cluster => Topology::Cluster(vec![cluster.redis_url.clone()]),
        };
        let publish = match cluster.mode {
            ClusterMode::Standalone => "publish",
            ClusterMode::Cluster => "spublish",
        };
        let driver = RedisDriver::connect(&topology, &DriverConfig::default()).await?;
        Ok(Self {
            driver,
            publish,
            node_id: cluster.node_id.clone(),
        })
    }

    pub(crate) fn status(&self) -> DriverStatus {
        self.driver.status()
    }

    /// The connection, for other state under the `agentgate:{state}:` prefix that needs
    /// no change announcement (the console's sessions).
    pub(crate) fn driver(&self) -> &RedisDriver {
        &self.driver
    }

    /// Creates the epoch if there is none; true if this call created it.
    pub(crate) async fn ensure_epoch(&self) -> Result<bool, RedisError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key("epoch")).arg(random_hex(16)?).arg("NX");
        let set: Option<String> = self.driver.query(&cmd).await?;
        Ok(set.is_some())
    }

    /// Subscribes to the change channel; the driver resubscribes after a reconnection.
    pub(crate) async fn subscribe(&self) -> Result<MessageStream<ChanItem>, RedisError> {
        Ok(self.driver.subscribe(channel(), CHANGES_BUFFER).await?)
    }

    /// The epoch and the last sequence number, read together.
    pub(crate) async fn head(&self) -> Result<Head, RedisError> {
        let (epoch, seq): (Option<String>, Option<u64>) = self
            .driver
            .query(&eval(HEAD_SCRIPT, &[key("epoch"), key("seq")]))
            .await?;
        Ok(Head {
            epoch: epoch.ok_or(RedisError::NoState)?,
            seq: seq.unwrap_or(0),
        })
    }

    /// Every stored certificate as `(agent id, seq, DER)`, read `SCAN_COUNT` at a time.
    /// Entries Redis holds in a shape this version does not know are returned as errors
    /// with the agent id, so one bad entry does not hide the others.
    pub(crate) async fn scan_certs(&self) -> Result<Vec<ScanEntry>, RedisError> {
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("HSCAN");
            cmd.arg(key("certs"))
                .arg(cursor)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let (next, flat): (u64, Vec<Vec<u8>>) = self.driver.query(&cmd).await?;
            for pair in flat.chunks(2) {
                let [field, value] = pair else {
                    return Err(RedisError::Protocol("HSCAN returned an odd list".into()));
                };
                out.push(parse_entry(field, value));
            }
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    pub(crate) async fn put(
        &self,
        agent_id: &AgentId,
        der: &[u8],
        sent_ms: i64,
    ) -> Result<Written, RedisError> {
        let mut cmd = eval(PUT_SCRIPT, &[key("epoch"), key("seq"), key("certs")]);
        cmd.arg(agent_id.as_str())
            .arg(der)
            .arg(sent_ms)
            .arg(self.publish)
            .arg(channel());
        written(self.script(&cmd).await?)
    }

    /// Stores the certificate only if Redis has none for the agent; `None` if it had one.
    pub(crate) async fn import(
        &self,
        agent_id: &AgentId,
        der: &[u8],
        sent_ms: i64,
    ) -> Result<Option<Written>, RedisError> {
        let mut cmd = eval(IMPORT_SCRIPT, &[key("epoch"), key("seq"), key("certs")]);
        cmd.arg(agent_id.as_str())
            .arg(der)
            .arg(sent_ms)
            .arg(self.publish)
            .arg(channel());
        let w = written(self.script(&cmd).await?)?;
        Ok((w.seq != 0).then_some(w))
    }

    /// Deletes the agent's certificate and metadata; returns the change and the DER it
    /// deleted, `None` if Redis had no certificate.
    pub(crate) async fn delete(
        &self,
        agent_id: &AgentId,
        sent_ms: i64,
    ) -> Result<Option<(Written, Vec<u8>)>, RedisError> {
        let mut cmd = eval(
            DELETE_SCRIPT,
            &[key("epoch"), key("seq"), key("certs"), key("metadata")],
        );
        cmd.arg(agent_id.as_str())
            .arg(sent_ms)
            .arg(self.publish)
            .arg(channel());
        let answer = self.script(&cmd).await?;
        let redis::Value::Array(items) = answer else {
            return Err(RedisError::Protocol(format!(
                "delete script returned {answer:?}"
            )));
        };
        let mut items = items.into_iter();
        let epoch: String = from_value(items.next())?;
        let seq: u64 = from_value(items.next())?;
        if seq == 0 {
            return Ok(None);
        }
        let old: Vec<u8> = from_value(items.next())?;
        let (_, _, der) =
            parse_entry(agent_id.as_str().as_bytes(), &old).map_err(RedisError::Protocol)?;
        Ok(Some((Written { epoch, seq }, der)))
    }

    /// Records a token (by its hash) for `agent_id`.
    pub(crate) async fn issue_token(
        &self,
        token_hash: &str,
        agent_id: &AgentId,
        created_at: i64,
        expires_at: i64,
    ) -> Result<(), RedisError> {
        let mut cmd = eval(ISSUE_SCRIPT, &[token_key(token_hash)]);
        cmd.arg(agent_id.as_str())
            .arg(created_at)
            .arg(expires_at)
            .arg(KEEP_SPENT_SECS);
        let _: i64 = self.driver.query(&cmd).await?;
        Ok(())
    }

    pub(crate) async fn token(&self, token_hash: &str) -> Result<Option<TokenRecord>, RedisError> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(token_key(token_hash))
            .arg("agent_id")
            .arg("expires_at")
            .arg("used_at");
        let (agent_id, expires_at, used_at): (Option<String>, Option<i64>, Option<i64>) =
            self.driver.query(&cmd).await?;
        Ok(match (agent_id, expires_at) {
            (Some(agent_id), Some(expires_at)) => Some(TokenRecord {
                agent_id,
                expires_at,
                used: used_at.is_some(),
            }),
            _ => None,
        })
    }

    /// Consumes the token and stores the certificate and the metadata (one script).
    /// `nonce` identifies this attempt, so the driver's retry of it succeeds again.
    #[allow(clippy::too_many_arguments)] // one per script argument, each named at the call
    pub(crate) async fn register(
        &self,
        token_hash: &str,
        agent_id: &AgentId,
        der: &[u8],
        metadata: &str,
        now: i64,
        nonce: &str,
        sent_ms: i64,
    ) -> Result<Redeemed, RedisError> {
        let mut cmd = eval(
            REGISTER_SCRIPT,
            &[
                key("epoch"),
                key("seq"),
                key("certs"),
                key("metadata"),
                token_key(token_hash),
            ],
        );
        cmd.arg(agent_id.as_str())
            .arg(der)
            .arg(sent_ms)
            .arg(self.publish)
            .arg(channel())
            .arg(now)
            .arg(nonce)
            .arg(metadata)
            .arg(KEEP_SPENT_SECS);
        let answer = self.script(&cmd).await?;
        let redis::Value::Array(items) = answer else {
            return Err(RedisError::Protocol(format!(
                "registration script returned {answer:?}"
            )));
        };
        let mut items = items.into_iter();
        let status: String = from_value(items.next())?;
        Ok(match status.as_str() {
            "ok" => Redeemed::Done(Written {
                epoch: from_value(items.next())?,
                seq: from_value(items.next())?,
            }),
            "unknown" => Redeemed::Unknown,
            "used" => Redeemed::Used,
            "other" => Redeemed::OtherAgent,
            "expired" => Redeemed::Expired(from_value(items.next())?),
            other => {
                return Err(RedisError::Protocol(format!(
                    "registration script answered {other:?}"
                )));
            }
        })
    }

    pub(crate) async fn metadata(&self, agent_id: &AgentId) -> Result<Option<String>, RedisError> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(key("metadata")).arg(agent_id.as_str());
        Ok(self.driver.query(&cmd).await?)
    }

    /// Runs a state script, turning its `AGENTGATE_NOSTATE` refusal into [`RedisError::NoState`].
    pub(super) async fn script(&self, cmd: &redis::Cmd) -> Result<redis::Value, RedisError> {
        match self.driver.query::<redis::Value>(cmd).await {
            Ok(v) => Ok(v),
            Err(e) if e.to_string().contains(NO_STATE) => Err(RedisError::NoState),
            Err(e) => Err(e.into()),
        }
    }
}

impl ChangeMessage {
    /// Parses `<epoch> <seq> <sent ms> <kind> <op> <key>\n<body>`.
    pub(crate) fn parse(payload: &[u8]) -> Result<Self, String> {
        let split = payload
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("no header line")?;
        let (header, body) = (&payload[..split], &payload[split + 1..]);
        let header = std::str::from_utf8(header).map_err(|_| "header is not UTF-8")?;
        let fields: Vec<&str> = header.split(' ').collect();
        let [epoch, seq, sent_ms, kind, rest @ ..] = &fields[..] else {
            return Err(format!("header {header:?} has fewer than 4 fields"));
        };
        let seq = seq.parse().map_err(|_| format!("bad sequence {seq:?}"))?;
        let sent_ms = sent_ms
            .parse()
            .map_err(|_| format!("bad time {sent_ms:?}"))?;
        let change = match (*kind, rest) {
            ("cert", [op, agent_id]) => {
                let agent_id = AgentId::parse(agent_id).map_err(|e| e.to_string())?;
                let der = match *op {
                    "put" => Some(body.to_vec()),
                    "del" => None,
                    other => return Err(format!("unknown certificate operation {other:?}")),
                };
                Changed::Cert { agent_id, der }
            }
            ("cert", _) => return Err(format!("header {header:?}: bad certificate change")),
            ("token", rest) => Changed::Token(super::tokens::TokenChange::parse(rest, body)?),
            ("route", [op, name]) if !name.is_empty() => Changed::Route {
                name: (*name).to_owned(),
                spec: match *op {
                    "put" => Some(body.to_vec()),
                    "del" => None,
                    other => return Err(format!("unknown route operation {other:?}")),
                },
            },
            ("route", _) => return Err(format!("header {header:?}: bad route change")),
            (other, _) => Changed::Unknown(other.to_owned()),
        };
        Ok(Self {
            epoch: (*epoch).to_owned(),
            seq,
            sent_ms,
            change,
        })
    }
}

/// A random id in hex (epochs, redemption nonces).
pub(crate) fn random_hex(bytes: usize) -> Result<String, RedisError> {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| RedisError::Protocol("the system random source failed".into()))?;
    Ok(hex(&buf))
}

pub(crate) fn key(name: &str) -> String {
    format!("{PREFIX}:{name}")
}

fn token_key(token_hash: &str) -> String {
    format!("{PREFIX}:token:{token_hash}")
}

pub(super) fn channel() -> String {
    key("changes")
}

/// `EVAL` with the script text: the scripts are a few hundred bytes, and `EVAL` needs no
/// `NOSCRIPT` fallback after a Redis restart emptied the script cache.
pub(super) fn eval(script: &str, keys: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for k in keys {
        cmd.arg(k);
    }
    cmd
}

fn written(answer: redis::Value) -> Result<Written, RedisError> {
    let (epoch, seq): (String, u64) = redis::FromRedisValue::from_redis_value(answer)
        .map_err(|e| RedisError::Protocol(e.to_string()))?;
    Ok(Written { epoch, seq })
}

pub(super) fn from_value<T: redis::FromRedisValue>(
    v: Option<redis::Value>,
) -> Result<T, RedisError> {
    let v = v.ok_or_else(|| RedisError::Protocol("short answer from a script".into()))?;
    T::from_redis_value(v).map_err(|e| RedisError::Protocol(e.to_string()))
}

fn parse_entry(field: &[u8], value: &[u8]) -> Result<(AgentId, u64, Vec<u8>), String> {
    let name = String::from_utf8_lossy(field);
    let agent_id = AgentId::parse(&name).map_err(|e| format!("{name:?}: {e}"))?;
    let colon = value
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| format!("{agent_id}: no sequence number"))?;
    let seq = std::str::from_utf8(&value[..colon])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{agent_id}: bad sequence number"))?;
    Ok((agent_id, seq, value[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_messages_parse_and_bad_ones_say_why() {
        let mut put = b"e1 7 1700000000000 cert put a-1\n".to_vec();
        put.extend_from_slice(&[0x30, 0x0a, 0x00]);
        let m = ChangeMessage::parse(&put).unwrap();
        assert_eq!(
            (m.epoch.as_str(), m.seq, m.sent_ms),
            ("e1", 7, 1_700_000_000_000)
        );
        let Changed::Cert { agent_id, der } = m.change else {
            panic!("not a certificate change");
        };
        assert_eq!(agent_id.as_str(), "a-1");
        assert_eq!(der.as_deref(), Some(&[0x30, 0x0a, 0x00][..]));
        let del = ChangeMessage::parse(b"e1 8 5 cert del a-1\n").unwrap();
        assert!(matches!(del.change, Changed::Cert { der: None, .. }));
        // A kind a newer node writes is stepped over, not an error.
        let later = ChangeMessage::parse(b"e1 9 5 quota put a-1\n").unwrap();
        assert_eq!(later.change, Changed::Unknown("quota".into()));
        let route = ChangeMessage::parse(b"e1 10 5 route put api\n{}").unwrap();
        assert_eq!(
            route.change,
            Changed::Route {
                name: "api".into(),
                spec: Some(b"{}".to_vec())
            }
        );
        let gone = ChangeMessage::parse(b"e1 11 5 route del api\n").unwrap();
        assert!(matches!(gone.change, Changed::Route { spec: None, .. }));
        assert!(ChangeMessage::parse(b"e1 12 5 route zap api\n").is_err());
        assert!(ChangeMessage::parse(b"e1 8 5 cert del a-1").is_err());
        assert!(ChangeMessage::parse(b"e1 x 5 cert del a-1\n").is_err());
        assert!(ChangeMessage::parse(b"e1 8 5 cert zap a-1\n").is_err());
        assert!(ChangeMessage::parse(b"e1 8 5 cert del ../x\n").is_err());
        assert!(ChangeMessage::parse(b"e1 8 5 cert del\n").is_err());
    }

    #[test]
    fn entries_split_at_the_first_colon_only() {
        let (id, seq, der) = parse_entry(b"a1", b"12:\x30:\x01").unwrap();
        assert_eq!((id.as_str(), seq), ("a1", 12));
        assert_eq!(der, b"\x30:\x01");
        assert!(parse_entry(b"a1", b"no-seq").is_err());
        assert!(parse_entry(b"/etc", b"1:x").is_err());
    }
}
