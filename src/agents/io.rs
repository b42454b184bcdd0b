//! The Socket.IO server of the agents, on one node (socketioxide's local adapter) or on
//! several sharing one Redis (`socketioxide-redis` on [`crate::cluster::RedisDriver`]).
//!
//! socketioxide makes the adapter a type parameter (`SocketIo<A>`), and the handlers are
//! generic over it; this enum is the one place that chooses. Without `[cluster]` the
//! local variant runs exactly as before and nothing touches Redis.

use std::time::Duration;

use axum::Router;
use serde_json::Value;
use socketioxide::adapter::{Adapter, Emitter, LocalAdapter};
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::Sid;
use socketioxide::{AckError, SendError, SocketIo, TransportType};
use socketioxide_redis::CustomRedisAdapter;

use crate::cluster::RedisDriver;

/// The adapter of a clustered node.
pub type ClusterAdapter = CustomRedisAdapter<Emitter, RedisDriver>;

/// The agents' Socket.IO server.
#[derive(Clone)]
pub enum AgentIo {
    Local(SocketIo<LocalAdapter>),
    Cluster(SocketIo<ClusterAdapter>),
}

/// The Socket.IO layer to mount on the router.
pub enum AgentsLayer {
    Local(SocketIoLayer<LocalAdapter>),
    Cluster(SocketIoLayer<ClusterAdapter>),
}

impl AgentsLayer {
    /// `router.layer(self)`.
    pub fn wrap(self, router: Router) -> Router {
        match self {
            Self::Local(layer) => router.layer(layer),
            Self::Cluster(layer) => router.layer(layer),
        }
    }
}

impl AgentIo {
    /// Live Socket.IO sessions on this node.
    pub fn local_sessions(&self) -> usize {
        match self {
            Self::Local(io) => io.sockets().len(),
            Self::Cluster(io) => io.local().sockets().len(),
        }
    }

    pub fn is_alive(&self, sid: Sid) -> bool {
        match self {
            Self::Local(io) => io.get_socket(sid).is_some(),
            Self::Cluster(io) => io.get_socket(sid).is_some(),
        }
    }

    /// The transport a live session on this node uses now (it changes on upgrade).
    pub fn transport_of(&self, sid: Sid) -> Option<TransportType> {
        match self {
            Self::Local(io) => io.get_socket(sid).map(|s| s.transport_type()),
            Self::Cluster(io) => io.get_socket(sid).map(|s| s.transport_type()),
        }
    }

    /// Disconnects one session of this node, retried while its send buffer is full (see
    /// `backpressure::disconnect`); false if it was not live.
    pub fn disconnect(&self, sid: Sid) -> bool {
        match self {
            Self::Local(io) => io
                .get_socket(sid)
                .is_some_and(super::backpressure::disconnect),
            Self::Cluster(io) => io
                .get_socket(sid)
                .is_some_and(super::backpressure::disconnect),
        }
    }

    /// Emits `event` to one session of this node and waits up to `timeout` for its ack;
    /// `None` if the session is not live here.
    pub async fn emit_with_ack_to(
        &self,
        sid: Sid,
        event: &str,
        data: &Value,
        timeout: Duration,
    ) -> Option<Result<Result<Value, AckError>, SendError>> {
        match self {
            Self::Local(io) => Some(ack_of(io.get_socket(sid)?, event, data, timeout).await),
            Self::Cluster(io) => Some(ack_of(io.get_socket(sid)?, event, data, timeout).await),
        }
    }

    /// Emits to every session of this node, retrying sessions whose send buffer is full
    /// for up to `within`; returns how many never had room (see
    /// `super::backpressure::emit_each`).
    pub async fn emit_each_local(
        &self,
        event: &'static str,
        data: &Value,
        within: Duration,
    ) -> usize {
        match self {
            Self::Local(io) => {
                super::backpressure::emit_each(io.sockets(), event, data, within).await
            }
            Self::Cluster(io) => {
                super::backpressure::emit_each(io.sockets(), event, data, within).await
            }
        }
    }

    /// Closes every session of this node.
    pub async fn close(&self) {
        match self {
            Self::Local(io) => io.close().await,
            Self::Cluster(io) => io.close().await,
        }
    }
}

async fn ack_of<A: Adapter>(
    socket: socketioxide::extract::SocketRef<A>,
    event: &str,
    data: &Value,
    timeout: Duration,
) -> Result<Result<Value, AckError>, SendError> {
    let ack = socket
        .timeout(timeout)
        .emit_with_ack::<_, Value>(event, data)?;
    Ok(ack.await)
}
