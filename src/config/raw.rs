//! The configuration as written: what serde reads from the TOML file and the environment,
//! with every key optional and defaulted. Nothing here is validated; [`RawConfig::validate`]
//! (in the parent module) turns it into the [`super::Config`] the gateway runs on, and
//! [`super::Config::to_raw`] turns that back for `check-config`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::LETSENCRYPT_STAGING;
use super::gateway::{RawApiKey, RawJwt, RawProxy, RawRoute};

/// The whole configuration as written. Every key and its default is documented in
/// `config.example.toml`; a test keeps the two in step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// Address of the TLS listener (agents, API and Socket.IO share it).
    pub listen: SocketAddr,
    /// Where agentgate keeps its own state (the generated self-signed certificate).
    pub data_dir: PathBuf,
    /// Bearer keys accepted by the API; several allow rotation. `API_KEY` replaces them.
    /// A plain string means every scope; a table `{name, key | sha256, scopes}` limits it.
    pub api_keys: Vec<RawApiKey>,
    /// Development switch: let Socket.IO clients without an agent certificate connect.
    pub allow_anonymous_agents: bool,
    /// Origins allowed by CORS (exact `scheme://host[:port]`); empty means no CORS headers.
    pub cors_origins: Vec<String>,
    /// A TLS handshake that does not finish in this time is dropped.
    pub handshake_timeout_secs: u64,
    /// Connections served at once; further accepts wait for a free slot.
    pub max_connections: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests get before the process exits.
    pub shutdown_grace_secs: u64,
    pub log_format: LogFormat,
    /// Serve `GET /metrics` on this separate plain-HTTP address instead of the main
    /// listener (e.g. "127.0.0.1:9090", reachable only by the local Prometheus).
    pub metrics_listen: Option<SocketAddr>,
    pub agents: RawAgents,
    pub store: RawStore,
    pub tls: RawTls,
    pub socketio: RawSocketIo,
    pub http_redirect: RawHttpRedirect,
    /// `[limits]`: what one source address may do (README, "Limits").
    pub limits: RawLimits,
    /// `[console]`: the fleet console's sign-in sessions (README, "Fleet console").
    pub console: RawConsole,
    /// `[cluster]`: several nodes sharing one Redis. Absent: one node, files, no Redis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<RawCluster>,
    /// `[jwt]`: keys and leeway for routes with `auth = "jwt"`.
    pub jwt: RawJwt,
    /// `[proxy]`: the upstream side of the routes.
    pub proxy: RawProxy,
    /// `[[routes]]`: path prefixes proxied to upstream services.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RawRoute>,
    /// `GATEWAY_JWT_SECRET`, from the environment only (never read from or shown in a file).
    #[serde(skip)]
    pub gateway_jwt_secret: Option<String>,
}

/// `[cluster]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCluster {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` (TLS). Required.
    pub redis_url: Option<String>,
    /// This node's name in listings; default: the host name and the listen port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    pub mode: ClusterMode,
    /// How often this node publishes its agents' state to Redis (the fleet view of the
    /// other nodes is at most about this much behind). Default 1000.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_interval_ms: Option<u64>,
    /// A node not heard from for this long is dead: it leaves `GET /cluster/nodes` and
    /// its agents stop being listed as connected. Default 10000.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_timeout_ms: Option<u64>,
}

/// How Redis is deployed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterMode {
    /// One Redis server (or a primary with replicas behind one address).
    #[default]
    Standalone,
    /// A Redis Cluster; `redis_url` is one seed node, the rest is discovered. Pub/sub is
    /// sharded (SSUBSCRIBE/SPUBLISH).
    Cluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAgents {
    /// A connected agent with no heartbeat (or connect) for this long is reported stale.
    pub stale_after_secs: u64,
}

impl Default for RawAgents {
    fn default() -> Self {
        // Three missed heartbeats at the 30 s interval existing agents use.
        Self {
            stale_after_secs: 90,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// Directory of `<agent_id>.pem` files; `CERT_STORAGE_DIR` overrides it.
    pub dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    pub mode: TlsMode,
    /// PEM chain (leaf first) for `mode = "files"`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `mode = "files"`.
    pub key_file: Option<PathBuf>,
    /// Subject alternative names of the generated certificate for `mode = "self-signed"`.
    pub self_signed_names: Vec<String>,
    /// Settings for `mode = "acme"`.
    pub acme: RawAcme,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// A certificate generated once with rcgen and kept in `data_dir`.
    SelfSigned,
    /// A PEM chain and key from disk, reloaded on SIGHUP.
    Files,
    /// Obtained and renewed over ACME (RFC 8555), TLS-ALPN-01 answered on `listen`.
    Acme,
}

/// `[tls.acme]`: where the certificate is ordered and where it is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAcme {
    /// DNS names of the certificate; each must resolve to this host, whose port 443 must
    /// reach `listen` (TLS-ALPN-01 validation connects there).
    pub domains: Vec<String>,
    /// Account contacts, `mailto:` URIs.
    pub contact: Vec<String>,
    /// `letsencrypt`, `letsencrypt-staging`, or the https URL of any ACME directory.
    pub directory: String,
    /// Account key and certificates; `None` means `<data_dir>/acme`.
    pub cache_dir: Option<PathBuf>,
    /// PEM root certificate(s) trusted for the directory's own HTTPS, in addition to the
    /// built-in web roots (test CAs such as Pebble).
    pub directory_ca_file: Option<PathBuf>,
}

/// `[http_redirect]`: an optional plain-HTTP listener that sends every request to https.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttpRedirect {
    /// Address of the plain-HTTP listener (e.g. `0.0.0.0:80`); `None`: no listener.
    pub listen: Option<SocketAddr>,
    /// Port written into the `Location` header; `None`: the port of `listen` (the TLS
    /// one). Set it when a port mapping (`-p 443:8443`) makes the public port differ.
    pub https_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSocketIo {
    /// Engine.IO ping interval (the client is expected to answer within the timeout).
    pub ping_interval_secs: u64,
    pub ping_timeout_secs: u64,
    /// The old name of `limits.max_packet_bytes`, still read (README, "Limits"); `None`
    /// when not written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_payload_bytes: Option<u64>,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            data_dir: PathBuf::from("./agentgate-data"),
            api_keys: Vec::new(),
            allow_anonymous_agents: false,
            cors_origins: Vec::new(),
            handshake_timeout_secs: 10,
            max_connections: 100_000,
            shutdown_grace_secs: 10,
            log_format: LogFormat::Text,
            metrics_listen: None,
            agents: RawAgents::default(),
            store: RawStore::default(),
            tls: RawTls::default(),
            socketio: RawSocketIo::default(),
            http_redirect: RawHttpRedirect::default(),
            limits: RawLimits::default(),
            console: RawConsole::default(),
            cluster: None,
            jwt: RawJwt::default(),
            proxy: RawProxy::default(),
            routes: Vec::new(),
            gateway_jwt_secret: None,
        }
    }
}

/// `[console]` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConsole {
    /// A console session unused for this long is signed out.
    pub session_idle_secs: u64,
    /// A console session ends this long after its sign-in, however much it is used.
    pub session_absolute_secs: u64,
}

impl Default for RawConsole {
    fn default() -> Self {
        // OWASP's session management guidance: 15-30 minutes idle for most applications,
        // an absolute limit of a working day.
        Self {
            session_idle_secs: 30 * 60,
            session_absolute_secs: 12 * 3600,
        }
    }
}

/// `[limits]` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Failed API-key attempts one source address may make per window; the next requests
    /// from it that need a key get `429` with `Retry-After` until the window ends.
    pub api_key_failures: u32,
    pub api_key_failure_window_secs: u64,
    /// Unfinished TLS handshakes one source address may have at once; further
    /// connections from it are closed at accept.
    pub handshakes_per_source: u32,
    /// Failed TLS handshakes (refused, broken or timed out) one source address may have
    /// per window; its further connections are closed at accept until the window ends.
    pub handshake_failures: u32,
    pub handshake_failure_window_secs: u64,
    /// An HTTP/1.1 connection idle between requests, or this slow to send a request head,
    /// is closed.
    pub http_idle_timeout_secs: u64,
    /// Longest request target (path and query), in bytes: `414` past it.
    pub max_uri_bytes: usize,
    /// Most header fields in one request: `431` past it.
    pub max_header_fields: usize,
    /// Largest sum of header field names and values, in bytes: `431` past it.
    pub max_header_bytes: usize,
    /// Events one agent may send per window, over all its Socket.IO sessions; past it,
    /// every session of the agent is disconnected (backpressure throttles it before that).
    pub agent_events: u32,
    pub agent_event_window_secs: u64,
    /// Largest JSON request body of the API's endpoints that take an API key: `413` past it.
    pub max_body_bytes: usize,
    /// Largest request body of `POST /agent/register`, the one endpoint that takes a body
    /// without an API key.
    pub register_body_bytes: usize,
    /// Largest request body proxied to a route's upstream, counted while it streams:
    /// nginx's `client_max_body_size`, Caddy's `request_body max_size`.
    pub proxy_max_body_bytes: u64,
    /// Largest Engine.IO payload an agent may send (a polling POST body, a WebSocket
    /// message); `socketio.max_payload_bytes` is its old name.
    pub max_packet_bytes: u64,
    /// Packets waiting to be written to one Engine.IO session (engineioxide's
    /// `max_buffer_size`); a full buffer pauses reading the session.
    pub session_send_buffer: usize,
    /// Replies one session may have waiting for room in its send buffer; past it, the
    /// session is closed.
    pub session_reply_queue: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            api_key_failures: 20,
            api_key_failure_window_secs: 60,
            handshakes_per_source: 64,
            handshake_failures: 100,
            handshake_failure_window_secs: 60,
            http_idle_timeout_secs: 30,
            max_uri_bytes: 8 * 1024,
            max_header_fields: 100,
            max_header_bytes: 32 * 1024,
            agent_events: 100_000,
            agent_event_window_secs: 10,
            max_body_bytes: 64 * 1024,
            register_body_bytes: 32 * 1024,
            proxy_max_body_bytes: 10 * 1024 * 1024,
            max_packet_bytes: 100_000,
            session_send_buffer: 128,
            session_reply_queue: 4096,
        }
    }
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./certs"),
        }
    }
}

impl Default for RawTls {
    fn default() -> Self {
        Self {
            mode: TlsMode::SelfSigned,
            cert_file: None,
            key_file: None,
            self_signed_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            acme: RawAcme::default(),
        }
    }
}

impl Default for RawAcme {
    fn default() -> Self {
        // Staging by default: a first deployment that goes wrong must not burn the
        // production rate limits (Let's Encrypt: 5 failed validations per hour).
        Self {
            domains: Vec::new(),
            contact: Vec::new(),
            directory: LETSENCRYPT_STAGING.to_owned(),
            cache_dir: None,
            directory_ca_file: None,
        }
    }
}

impl Default for RawSocketIo {
    fn default() -> Self {
        // The Engine.IO v4 defaults of the reference server (python-socketio) and socket.io.
        Self {
            ping_interval_secs: 25,
            ping_timeout_secs: 20,
            max_payload_bytes: None,
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::SelfSigned => "self-signed",
            TlsMode::Files => "files",
            TlsMode::Acme => "acme",
        })
    }
}
