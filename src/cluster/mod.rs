//! Several nodes acting as one (DESIGN.md, "Several nodes (Redis)"): the pieces that sit
//! between socketioxide and a shared Redis.
//!
//! - [`redis_url`]: the operator's Redis URL, validated, with RESP3 and a redacted form.
//! - [`driver`]: a `socketioxide-redis` driver that reconnects and resubscribes after a
//!   Redis restart, standalone or Redis Cluster, with a status handle.
//! - [`acme`]: one server certificate for the whole cluster over ACME: one node orders
//!   under a Redis lock, every node serves the certificate from Redis, and whichever node
//!   the CA reaches answers the TLS-ALPN-01 challenge.
//! - [`fleet`]: one fleet view: each node publishes its agents' state in batches and
//!   follows the other nodes' (`GET /agents`, `GET /cluster/nodes` on any node).
//! - [`ack`]: emit-with-ack to a room that ends as soon as every answer is in (works
//!   around the ack-stream stall) and tells an empty room at once.

pub mod ack;
pub mod acme;
pub mod driver;
pub mod fleet;
pub mod redis_url;

pub use ack::{AckCollection, emit_with_ack};
pub use driver::{DriverConfig, DriverError, DriverStatus, RedisDriver, Topology};
pub use redis_url::{RedisUrl, RedisUrlError};
