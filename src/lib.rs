//! agentgate: one binary that terminates TLS for a fleet of orchestrator agents, checks
//! each agent's self-signed client certificate inside the handshake against the
//! certificates uploaded through its API, and carries heartbeats over Socket.IO.
//!
//! # Layout
//!
//! - [`config`]: the TOML file and environment, validated before anything binds.
//! - [`tls`]: rustls server configuration, server certificate sources, the handshake
//!   ([`tls::Acceptor`]), [`tls::verifier`] (the agent certificate verifier) and
//!   [`tls::acme`] (certificates over ACME, TLS-ALPN-01 on the same listener).
//! - [`cluster`]: several nodes sharing one Redis ([`cluster::acme`]: one ACME
//!   certificate for all of them).
//! - [`store`]: the certificate store: the in-memory index the handshake reads, fed by
//!   one of two backends (files for one node, Redis for a cluster, followed through
//!   pub/sub), the upload rules, and `store import`. Install tokens ([`enroll`]) live in
//!   the same backend.
//! - [`identity`]: agent ids, fingerprints, the identity a handshake proves.
//! - `digest`: SHA-256 and hex (fingerprints, API key digests, install token hashes).
//! - [`clock`]: where "now" comes from (system, or manual in tests) and the one RFC 3339
//!   formatter.
//! - `listener`: the accept loop every listener uses (backlog, connection limit,
//!   accept-error backoff, stop on shutdown).
//! - `server`: the gateway's listeners, handshake, per-connection identity, graceful
//!   shutdown; `killable` lets shutdown cut upgraded connections.
//! - `redirect`: the optional plain-HTTP listener that answers with 301 to https.
//! - [`api`]: the HTTP API: router, middleware, extractors, errors, one file per resource.
//! - [`agents`]: Socket.IO handlers, the registry of connected agents, session binding,
//!   commands to agents.
//! - [`enroll`]: one-time install tokens and registered agent metadata.
//! - [`metrics`]: Prometheus metrics.
//! - [`cluster`]: several nodes on one Redis: the URL, a reconnecting pub/sub driver for
//!   socketioxide-redis, emit-with-ack that ends when every answer is in, the fleet view
//!   every node publishes and follows, and one ACME certificate for all nodes.
//! - [`certgen`]: `agentgate cert generate`.
//! - [`signal`](mod@signal): SIGINT/SIGTERM/SIGHUP.

pub mod agents;
pub mod api;
pub mod certgen;
pub mod clock;
pub mod cluster;
pub mod config;
pub(crate) mod digest;
pub mod enroll;
pub(crate) mod fsutil;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod identity;
pub(crate) mod killable;
pub(crate) mod listener;
pub mod metrics;
pub(crate) mod redirect;
pub(crate) mod server;
pub mod signal;
pub mod store;
pub mod tls;

use std::future::Future;

pub use config::Config;
pub use server::{Gateway, StartError};

/// Runs the gateway for `config` until `shutdown` resolves: builds it, binds the listener,
/// reloads the server certificate files on SIGHUP.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let mut gateway = Gateway::start(config.clone()).await?;
    let listener = listener::bind(config.listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (key `listen`): {e}", config.listen))?;
    if let Some(addr) = config.metrics_listen {
        let metrics = listener::bind(addr)
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (key `metrics_listen`): {e}"))?;
        gateway = gateway.with_metrics_listener(metrics);
    }
    if let Some(addr) = config.http_redirect.as_ref().map(|r| r.listen) {
        let redirect = listener::bind(addr).map_err(|e| {
            anyhow::anyhow!("cannot listen on {addr} (key `http_redirect.listen`): {e}")
        })?;
        gateway = gateway.with_redirect_listener(redirect);
    }
    let server_cert = gateway.server_cert().clone();
    signal::on_hangup(move || match server_cert.reload() {
        Ok(true) => tracing::info!(cert = %server_cert.describe(), "server certificate reloaded"),
        Ok(false) => tracing::info!("SIGHUP: nothing to reload for this certificate source"),
        Err(e) => {
            tracing::error!(error = %e, "server certificate reload failed; keeping the current one")
        }
    });
    gateway.serve(listener, shutdown).await?;
    Ok(())
}
