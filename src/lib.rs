//! agentgate: one binary that terminates TLS for a fleet of orchestrator agents, checks
//! each agent's self-signed client certificate inside the handshake against the
//! certificates uploaded through its API, and carries heartbeats over Socket.IO; several
//! nodes act as one through Redis, and it routes HTTP to upstream services.
//!
//! # Layout
//!
//! - [`config`]: the TOML file and environment, validated before anything binds.
//! - [`tls`]: rustls server configuration, server certificate sources, the handshake
//!   ([`tls::Acceptor`]), [`tls::verifier`] (the agent certificate verifier) and
//!   [`tls::acme`] (certificates over ACME, TLS-ALPN-01 on the same listener).
//! - [`store`]: the certificate store: the in-memory index the handshake reads, fed by
//!   one of two backends (files for one node, Redis for a cluster, followed through
//!   pub/sub), the upload rules, `store import`, and the watch of the store directory
//!   (hand edits); with one node, the embedded database (`<data_dir>/agentgate.db`,
//!   SQLite) of install tokens, API tokens, revocations and their audit, which Redis
//!   holds instead for a cluster.
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
//! - `console`: the fleet console at `/ui/` (embedded page, sign-in sessions, the live
//!   table over Server-Sent Events), acting through the API's handlers.
//! - [`proxy`]: the API gateway: `[[routes]]` and routes registered at runtime (stored
//!   beside the certificates: the embedded database, or Redis) to upstream services
//!   (longest prefix, round-robin over healthy upstreams, retries, timeouts, WebSocket
//!   pass-through).
//! - [`auth`]: API keys with scopes, JWT verification, revoked token ids, API tokens
//!   (issue, revoke, purge), and the per-route decision (`jwt`, `api_key`, `agent`, `none`).
//! - [`agents`]: Socket.IO handlers, the registry of connected agents, session binding,
//!   commands to agents.
//! - [`enroll`]: one-time install tokens and registered agent metadata.
//! - [`limits`]: per-source limits of `[limits]` (failed API-key attempts).
//! - [`metrics`]: Prometheus metrics.
//! - [`log_fields`]: the text log's field formatter (`DefaultFields`' output, cheaper).
//! - [`cluster`]: several nodes on one Redis: the URL, a reconnecting pub/sub driver for
//!   socketioxide-redis, emit-with-ack that ends when every answer is in, the fleet view
//!   every node publishes and follows, and one ACME certificate for all nodes.
//! - [`certgen`]: `agentgate cert generate`.
//! - [`signal`](mod@signal): SIGINT/SIGTERM/SIGHUP.

pub mod agents;
pub mod api;
pub mod auth;
pub mod certgen;
pub mod clock;
pub mod cluster;
pub mod config;
pub(crate) mod console;
pub(crate) mod digest;
pub mod enroll;
pub(crate) mod fsutil;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod identity;
pub(crate) mod killable;
pub mod limits;
pub(crate) mod listener;
pub mod log_fields;
pub mod log_writer;
pub mod metrics;
pub mod proxy;
pub(crate) mod redirect;
pub(crate) mod server;
pub mod signal;
pub mod store;
pub mod tls;

use std::future::Future;
use std::path::PathBuf;

pub use config::Config;
pub use server::{Gateway, StartError};

/// Runs the gateway for `config` (read from `config_file`, if any) until `shutdown`
/// resolves: builds it, binds the listener, and on SIGHUP reloads the server certificate
/// files and re-reads the routes from `config_file`.
pub async fn run(
    config: Config,
    config_file: Option<PathBuf>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
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
    let proxy = gateway.proxy().clone();
    signal::on_hangup(move || {
        match server_cert.reload() {
            Ok(true) => {
                tracing::info!(cert = %server_cert.describe(), "server certificate reloaded")
            }
            Ok(false) => tracing::info!("SIGHUP: nothing to reload for this certificate source"),
            Err(e) => {
                tracing::error!(error = %e, "server certificate reload failed; keeping the current one")
            }
        }
        reload_routes(&proxy, config_file.as_deref());
    });
    gateway.serve(listener, shutdown).await?;
    tracing::info!("agentgate stopped");
    Ok(())
}

/// SIGHUP: the configuration file is read and validated again, and its `[[routes]]` and
/// `[jwt]` keys replace the running ones. A file with any error is refused as a whole
/// (the log names the key) and the running routes stay. Other sections need a restart.
fn reload_routes(proxy: &proxy::Proxy, config_file: Option<&std::path::Path>) {
    let Some(path) = config_file else {
        tracing::info!("SIGHUP: no configuration file; routes unchanged");
        return;
    };
    let config = match Config::load(Some(path)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: configuration refused; the running routes stay");
            return;
        }
    };
    match proxy.reload(&config) {
        Ok(()) => tracing::info!(
            routes = config.routes.len(),
            file = %path.display(),
            "SIGHUP: routes reloaded"
        ),
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: routes refused; the running routes stay")
        }
    }
}
