//! The pub/sub driver under `socketioxide-redis`: a [`Driver`] that survives Redis restarts.
//!
//! The stock drivers (`socketioxide_redis::drivers::redis`) hold one `MultiplexedConnection`
//! (or one `ClusterConnection`) and never reconnect: after a Redis restart every
//! cross-node emit fails until the process restarts (DESIGN.md, "Several nodes"). This one
//! keeps the stock message routing (one bounded channel per subscribed channel, fed by the
//! RESP3 push sender) and puts it on connections that repair themselves:
//!
//! - standalone: redis-rs `ConnectionManager` with automatic resubscription, which replays
//!   every SUBSCRIBE it tracked on the new connection before any command runs on it;
//! - cluster: redis-rs `ClusterConnection`, which reconnects per node and resubscribes the
//!   sharded channels (SSUBSCRIBE) of a node once it is back; messages go out with
//!   SPUBLISH so each channel lives on the shard that owns its slot, as in the stock
//!   `ClusterDriver`.
//!
//! Both get short connect/response timeouts and one retry, so a publish during an outage
//! fails fast instead of queueing, and a task PINGs every second so a dead connection is
//! noticed (and repaired) even when nothing is published. [`DriverStatus`] exposes
//! connected/reconnects/errors and a `watch` that ticks on every reconnection: pub/sub
//! messages sent while a node was cut off are lost, so later code resyncs its state then.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, FromRedisValue, PushInfo, PushKind, RedisError, RedisResult};
use socketioxide_redis::drivers::{ChanItem, Driver, MessageStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::redis_url::RedisUrl;

/// Where Redis is: one server, or a Redis Cluster reached through one or more seed nodes.
#[derive(Clone, Debug)]
pub enum Topology {
    Standalone(RedisUrl),
    /// Seed nodes; the rest of the cluster is discovered from them (CLUSTER SLOTS).
    Cluster(Vec<RedisUrl>),
}

/// Timeouts of the driver. The defaults suit a LAN: an outage is noticed within about a
/// second and a publish during one fails within `response_timeout` instead of hanging.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// One TCP (+TLS) connect attempt.
    pub connect_timeout: Duration,
    /// One command's answer.
    pub response_timeout: Duration,
    /// PING period while connected.
    pub ping_interval: Duration,
    /// PING period while disconnected: each failing PING also starts a reconnect attempt.
    pub retry_interval: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_secs(1),
            ping_interval: Duration::from_secs(1),
            retry_interval: Duration::from_millis(200),
        }
    }
}

/// A command to Redis failed (after its one retry).
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct DriverError(#[from] RedisError);

/// The [`Driver`] handed to `RedisAdapterCtr::new_with_driver`. Clones share the
/// connection, the channel handlers and the status.
#[derive(Clone)]
pub struct RedisDriver {
    conn: Conn,
    shared: Arc<Shared>,
    _ping: Arc<PingTask>,
}

/// Connection state for metrics and `/ready`; cheap to clone.
#[derive(Clone)]
pub struct DriverStatus {
    shared: Arc<Shared>,
}

#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

type HandlerMap = HashMap<String, mpsc::Sender<ChanItem>>;

struct Shared {
    /// Channel name -> the adapter's stream for it. A std lock: the push sender is a
    /// synchronous callback, and no `.await` happens while it is held.
    handlers: RwLock<HandlerMap>,
    connected: AtomicBool,
    reconnects: AtomicU64,
    errors: AtomicU64,
    /// Counts reconnections; receivers wake on each.
    reconnected: watch::Sender<u64>,
}

/// Aborts the PING task when the last driver clone goes.
struct PingTask(JoinHandle<()>);

impl Drop for PingTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl RedisDriver {
    /// Connects (failing at once when Redis is unreachable: a node should not start
    /// half-clustered) and starts the PING task.
    pub async fn connect(topology: &Topology, config: &DriverConfig) -> Result<Self, DriverError> {
        let (reconnected, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            handlers: RwLock::new(HashMap::new()),
            connected: AtomicBool::new(true),
            reconnects: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            reconnected,
        });
        let push_shared = shared.clone();
        let on_push = move |push: PushInfo| {
            push_shared.on_push(push);
            Ok::<(), std::convert::Infallible>(())
        };
        let conn = match topology {
            Topology::Standalone(url) => {
                let client = redis::Client::open(url.as_secret_str())?;
                let manager_config = ConnectionManagerConfig::new()
                    .set_push_sender(on_push)
                    .set_automatic_resubscription()
                    .set_connection_timeout(Some(config.connect_timeout))
                    .set_response_timeout(Some(config.response_timeout))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(config.retry_interval);
                Conn::Standalone(ConnectionManager::new_with_config(client, manager_config).await?)
            }
            Topology::Cluster(seeds) => {
                let nodes: Vec<&str> = seeds.iter().map(RedisUrl::as_secret_str).collect();
                let client = ClusterClientBuilder::new(nodes)
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(on_push)
                    .connection_timeout(config.connect_timeout)
                    .response_timeout(config.response_timeout)
                    .retries(1)
                    .build()?;
                Conn::Cluster(client.get_async_connection().await?)
            }
        };
        let ping = tokio::spawn(ping_loop(conn.clone(), shared.clone(), config.clone()));
        Ok(Self {
            conn,
            shared,
            _ping: Arc::new(PingTask(ping)),
        })
    }

    /// The status handle (connected, reconnects, errors, reconnection events).
    pub fn status(&self) -> DriverStatus {
        DriverStatus {
            shared: self.shared.clone(),
        }
    }

    /// Runs one command (a read, a Lua script) on the driver's connection, with the retry
    /// and the status bookkeeping of the pub/sub commands. A command that may run twice
    /// because of the retry must be idempotent (the state scripts are: see
    /// `store::redis`).
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, DriverError> {
        self.run(|conn| query::<T>(conn, cmd)).await
    }

    /// Runs a pipeline; in a Redis Cluster every key of it must hash to one slot (use
    /// one `{hash tag}`).
    pub async fn pipeline<T: FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, DriverError> {
        self.run(|conn| async move {
            match conn {
                Conn::Standalone(mut c) => pipe.query_async(&mut c).await,
                Conn::Cluster(mut c) => pipe.query_async(&mut c).await,
            }
        })
        .await
    }

    /// Runs `op` on the connection; once more if the first failure was the connection's
    /// (the manager has swapped in a fresh connection by then). Every failure counts.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, DriverError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let first = match op(self.conn.clone()).await {
            Ok(v) => {
                self.shared.mark_up();
                return Ok(v);
            }
            Err(e) => e,
        };
        self.shared.count_error(&first);
        if !is_connection_error(&first) {
            return Err(first.into());
        }
        match op(self.conn.clone()).await {
            Ok(v) => {
                self.shared.mark_up();
                Ok(v)
            }
            Err(e) => {
                self.shared.count_error(&e);
                if is_connection_error(&e) {
                    self.shared.mark_down();
                }
                Err(e.into())
            }
        }
    }
}

impl Driver for RedisDriver {
    type Error = DriverError;

    async fn publish(&self, chan: String, val: Vec<u8>) -> Result<(), Self::Error> {
        self.run(|conn| {
            let (chan, val) = (chan.clone(), val.clone());
            async move {
                match conn {
                    Conn::Standalone(mut c) => c.publish::<_, _, redis::Value>(chan, val).await,
                    Conn::Cluster(mut c) => c.spublish::<_, _, redis::Value>(chan, val).await,
                }
            }
        })
        .await
        .map(drop)
    }

    async fn subscribe(
        &self,
        chan: String,
        size: usize,
    ) -> Result<MessageStream<ChanItem>, Self::Error> {
        // The handler goes in first: a message can follow the SUBSCRIBE reply at once.
        let (tx, rx) = mpsc::channel(size);
        self.shared.handlers_mut().insert(chan.clone(), tx);
        let subscribed = self
            .run(|conn| {
                let chan = chan.clone();
                async move {
                    match conn {
                        Conn::Standalone(mut c) => c.subscribe(chan.as_str()).await,
                        Conn::Cluster(mut c) => c.ssubscribe(chan.as_str()).await,
                    }
                }
            })
            .await;
        if let Err(e) = subscribed {
            self.shared.handlers_mut().remove(&chan);
            return Err(e);
        }
        Ok(MessageStream::new(rx))
    }

    async fn unsubscribe(&self, chan: String) -> Result<(), Self::Error> {
        self.shared.handlers_mut().remove(&chan);
        self.run(|conn| {
            let chan = chan.clone();
            async move {
                match conn {
                    Conn::Standalone(mut c) => c.unsubscribe(chan.as_str()).await,
                    Conn::Cluster(mut c) => c.sunsubscribe(chan.as_str()).await,
                }
            }
        })
        .await
    }

    /// Servers = subscribers of the adapter's request channel (as the stock drivers do):
    /// PUBSUB NUMSUB, or SHARDNUMSUB for sharded channels in a cluster.
    async fn num_serv(&self, chan: &str) -> Result<u16, Self::Error> {
        self.run(|conn| {
            let chan = chan.to_owned();
            async move {
                let sub = match conn {
                    Conn::Standalone(_) => "NUMSUB",
                    Conn::Cluster(_) => "SHARDNUMSUB",
                };
                let mut cmd = redis::cmd("PUBSUB");
                cmd.arg(sub).arg(&chan);
                let counts: HashMap<String, u16> = query(conn, &cmd).await?;
                Ok(counts.get(&chan).copied().unwrap_or(0))
            }
        })
        .await
    }
}

impl DriverStatus {
    /// False from a lost connection (a disconnection push or a failed PING) until a
    /// command succeeds again.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Times the connection came back after being lost.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Failed Redis commands, PINGs included.
    pub fn errors(&self) -> u64 {
        self.shared.errors.load(Ordering::Relaxed)
    }

    /// Ticks after every reconnection (the value is the reconnect count); the
    /// subscriptions are back by then, so a resync started on it sees new messages.
    pub fn reconnected(&self) -> watch::Receiver<u64> {
        self.shared.reconnected.subscribe()
    }
}

impl Shared {
    fn handlers_mut(&self) -> std::sync::RwLockWriteGuard<'_, HandlerMap> {
        // A poisoned lock only means a panic elsewhere while inserting; the map is fine.
        self.handlers.write().unwrap_or_else(|e| e.into_inner())
    }

    fn on_push(&self, push: PushInfo) {
        match push.kind {
            PushKind::Disconnection => self.mark_down(),
            PushKind::Message | PushKind::SMessage => match read_message(push) {
                Ok(Some((chan, msg))) => self.route(chan, msg),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "undecodable pub/sub message from redis"),
            },
            _ => {}
        }
    }

    fn route(&self, chan: String, msg: Vec<u8>) {
        let handlers = self.handlers.read().unwrap_or_else(|e| e.into_inner());
        match handlers.get(&chan) {
            // try_send: the push sender must not block the connection's reader. A full
            // buffer drops the message, as the stock driver does (the adapter's
            // `stream_buffer` sizes it).
            Some(tx) => {
                if let Err(e) = tx.try_send((chan, msg)) {
                    tracing::warn!(error = %e, "redis pub/sub message dropped");
                }
            }
            None => tracing::debug!(chan, "pub/sub message for a channel with no handler"),
        }
    }

    fn mark_down(&self) {
        if self.connected.swap(false, Ordering::Relaxed) {
            tracing::warn!("redis connection lost; reconnecting");
        }
    }

    fn mark_up(&self) {
        if !self.connected.swap(true, Ordering::Relaxed) {
            let n = self.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::info!(
                reconnects = n,
                "redis connection back; subscriptions restored"
            );
            self.reconnected.send_replace(n);
        }
    }

    fn count_error(&self, e: &RedisError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(error = %e, "redis command failed");
    }
}

/// PINGs so that a dead connection is noticed without traffic: a RESP3 connection hears
/// a reset at once, but a peer that vanished (power loss, a dropped route) only shows as a
/// command that times out. A failing PING also makes the manager start a reconnect.
async fn ping_loop(conn: Conn, shared: Arc<Shared>, config: DriverConfig) {
    loop {
        let wait = if shared.connected.load(Ordering::Relaxed) {
            config.ping_interval
        } else {
            config.retry_interval
        };
        tokio::time::sleep(wait).await;
        let pong = tokio::time::timeout(config.response_timeout, ping(conn.clone())).await;
        match pong {
            Ok(Ok(())) => shared.mark_up(),
            Ok(Err(e)) => {
                shared.count_error(&e);
                shared.mark_down();
            }
            Err(_) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                shared.mark_down();
            }
        }
    }
}

async fn ping(conn: Conn) -> RedisResult<()> {
    query::<redis::Value>(conn, &redis::cmd("PING"))
        .await
        .map(drop)
}

async fn query<T: FromRedisValue>(conn: Conn, cmd: &redis::Cmd) -> RedisResult<T> {
    match conn {
        Conn::Standalone(mut c) => cmd.query_async(&mut c).await,
        Conn::Cluster(mut c) => cmd.query_async(&mut c).await,
    }
}

fn is_connection_error(e: &RedisError) -> bool {
    e.is_unrecoverable_error() || e.is_io_error() || e.is_connection_dropped() || e.is_timeout()
}

/// `(channel, payload)` of a `message` / `smessage` push (the stock driver's `read_msg`).
fn read_message(push: PushInfo) -> RedisResult<Option<ChanItem>> {
    let mut data = push.data.into_iter();
    let (Some(chan), Some(msg)) = (data.next(), data.next()) else {
        return Ok(None);
    };
    Ok(Some((
        String::from_redis_value(chan)?,
        Vec::<u8>::from_redis_value(msg)?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            handlers: RwLock::new(HashMap::new()),
            connected: AtomicBool::new(true),
            reconnects: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            reconnected: watch::channel(0).0,
        }
    }

    fn push(kind: PushKind, chan: &str, msg: &str) -> PushInfo {
        PushInfo {
            kind,
            data: vec![
                redis::Value::BulkString(chan.into()),
                redis::Value::BulkString(msg.into()),
            ],
        }
    }

    #[test]
    fn messages_and_shard_messages_reach_their_channel() {
        let s = shared();
        let (tx, mut rx) = mpsc::channel(4);
        s.handlers_mut().insert("req#/#".into(), tx);
        s.on_push(push(PushKind::Message, "req#/#", "a"));
        s.on_push(push(PushKind::SMessage, "req#/#", "b"));
        s.on_push(push(PushKind::Message, "other", "c"));
        assert_eq!(rx.try_recv().unwrap(), ("req#/#".into(), b"a".to_vec()));
        assert_eq!(rx.try_recv().unwrap(), ("req#/#".into(), b"b".to_vec()));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn disconnection_then_success_counts_one_reconnect_and_ticks() {
        let s = shared();
        let mut rx = s.reconnected.subscribe();
        s.on_push(PushInfo {
            kind: PushKind::Disconnection,
            data: vec![],
        });
        assert!(!s.connected.load(Ordering::Relaxed));
        s.mark_down();
        s.mark_up();
        s.mark_up();
        assert_eq!(s.reconnects.load(Ordering::Relaxed), 1);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 1);
    }
}
