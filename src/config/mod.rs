//! Configuration: a TOML file, overridden by the environment, validated completely before
//! any port is bound (an invalid configuration names its key and where it came from).
//!
//! Precedence, lowest first: built-in defaults, the file, `AGENTGATE_*` variables (nested
//! keys joined by `__`, e.g. `AGENTGATE_TLS__MODE`), then the two variables of the system
//! agentgate replaces: `API_KEY` (one key) and `CERT_STORAGE_DIR`.
//!
//! Two layers: `raw` is what serde reads (every key optional, defaulted, unchecked);
//! [`Config`] is what the gateway runs on, built by [`RawConfig::validate`], with one
//! sub-struct and one validation function per section, and no state that validation would
//! have refused (a TLS source is an enum carrying only its own mode's fields, name lists
//! that must not be empty are [`NonEmpty`]). A new section adds a raw struct, a validated
//! struct and a `validate_<section>` function.

pub(crate) mod gateway;
pub(crate) mod raw;

use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};

pub use gateway::{
    ApiKeyConfig, AuthKind, HealthCheckConfig, JwtConfig, JwtKeyConfig, KeySecret, PublicKeyAlg,
    RESERVED_SEGMENTS, RawApiKey, RawApiKeyEntry, RawHealthCheck, RawJwt, RawJwtKey, RawProxy,
    RawRoute, RouteAuth, RouteConfig, Scopes,
};
pub(crate) use gateway::{RouteError, route_to_raw, validate_route};
pub use raw::{
    ClusterMode, LogFormat, RawAcme, RawAgents, RawCluster, RawConfig, RawConsole, RawHttpRedirect,
    RawLimits, RawSocketIo, RawStore, RawTls, TlsMode,
};

/// `tls.acme.directory` names for Let's Encrypt.
pub const LETSENCRYPT: &str = "letsencrypt";
pub const LETSENCRYPT_STAGING: &str = "letsencrypt-staging";

/// Let's Encrypt has a limit of 100 names per certificate.
const MAX_ACME_DOMAINS: usize = 100;

/// The validated configuration the gateway runs on. Build it with [`Config::load`] or
/// [`RawConfig::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address of the TLS listener (agents, API and Socket.IO share it).
    pub listen: SocketAddr,
    /// Where agentgate keeps its own state (the generated self-signed certificate).
    pub data_dir: PathBuf,
    /// Bearer keys accepted by the API, each with a name and its scopes.
    pub api_keys: NonEmpty<ApiKeyConfig>,
    /// Development switch: let Socket.IO clients without an agent certificate connect.
    pub allow_anonymous_agents: bool,
    /// Origins allowed by CORS (`scheme://host[:port]`); empty means no CORS headers.
    pub cors_origins: Vec<String>,
    /// At least 1 s.
    pub handshake_timeout: Duration,
    /// Connections served at once per listener; at least 1.
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// The separate plain-HTTP metrics listener; differs from `listen`.
    pub metrics_listen: Option<SocketAddr>,
    pub agents: AgentsConfig,
    pub store: StoreConfig,
    pub limits: LimitsConfig,
    pub console: ConsoleConfig,
    pub tls: TlsSource,
    pub socketio: SocketIoConfig,
    /// The plain-HTTP redirect listener, if any.
    pub http_redirect: Option<HttpRedirectConfig>,
    /// `[cluster]`: several nodes sharing one Redis; `None` is one node on files.
    pub cluster: Option<ClusterConfig>,
    /// `[[routes]]`: path prefixes proxied to upstream services; names and prefixes unique.
    pub routes: Vec<RouteConfig>,
    /// `[jwt]` and `GATEWAY_JWT_SECRET`.
    pub jwt: JwtConfig,
    /// `[proxy]`: CA file for https upstreams (`None`: the built-in web roots).
    pub upstream_ca_file: Option<PathBuf>,
}

/// `[cluster]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// With `protocol=resp3` added; its `Display` hides the password.
    pub redis_url: crate::cluster::RedisUrl,
    /// Matches `^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$`.
    pub node_id: String,
    pub mode: ClusterMode,
    /// Period of the fleet publication (at least 50 ms).
    pub publish_interval: Duration,
    /// Silence after which a node counts as dead (at least 3 publish intervals).
    pub node_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentsConfig {
    /// At least 1 s.
    pub stale_after: Duration,
}

/// `[console]`, validated: both lifetimes at least 1 s, the idle one at most the absolute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConsoleConfig {
    pub session_idle: Duration,
    pub session_absolute: Duration,
}

/// `[limits]`, validated: every count and window at least 1.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    pub api_key_failures: u32,
    pub api_key_failure_window: Duration,
    pub handshakes_per_source: u32,
    pub handshake_failures: u32,
    pub handshake_failure_window: Duration,
    pub http_idle_timeout: Duration,
    pub head: crate::api::head_limits::HeadLimits,
    /// Per agent (an anonymous session counts alone).
    pub agent_events: u32,
    pub agent_event_window: Duration,
    /// API bodies (`max_body_bytes`, `register_body_bytes`) and proxied ones.
    pub body: BodyLimits,
    /// Largest Engine.IO payload (polling body, WebSocket message); at least 1024.
    pub max_packet_bytes: u64,
    /// engineioxide's per-session packet buffer; at least 2.
    pub session_send_buffer: usize,
    pub session_reply_queue: usize,
}

/// The request body limits of `[limits]`, in bytes; each at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    pub api: usize,
    pub register: usize,
    pub proxy: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub dir: PathBuf,
}

/// Where the server certificate comes from; each mode carries only its own settings.
#[derive(Debug, Clone, PartialEq)]
pub enum TlsSource {
    /// Generated once for `names` and kept in `data_dir`.
    SelfSigned { names: NonEmpty<String> },
    /// A PEM chain and key from disk, reloaded on SIGHUP.
    Files { cert: PathBuf, key: PathBuf },
    /// Ordered and renewed over ACME.
    Acme(AcmeConfig),
}

/// `[tls.acme]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AcmeConfig {
    /// Lower-case DNS names, no wildcards, no IP addresses, at most 100.
    pub domains: NonEmpty<String>,
    /// `mailto:` URIs.
    pub contact: Vec<String>,
    pub directory: AcmeDirectory,
    /// `tls.acme.cache_dir`, or `<data_dir>/acme`.
    pub cache_dir: PathBuf,
    pub directory_ca_file: Option<PathBuf>,
}

/// The ACME directory: Let's Encrypt by name, or any https URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcmeDirectory {
    LetsEncrypt,
    LetsEncryptStaging,
    /// An https URL with a host (RFC 8555 §6.1: ACME is spoken over HTTPS only).
    Url(String),
}

impl AcmeDirectory {
    pub fn url(&self) -> &str {
        match self {
            Self::LetsEncrypt => rustls_acme::acme::LETS_ENCRYPT_PRODUCTION_DIRECTORY,
            Self::LetsEncryptStaging => rustls_acme::acme::LETS_ENCRYPT_STAGING_DIRECTORY,
            Self::Url(url) => url,
        }
    }

    /// Whether certificates come from Let's Encrypt's staging CA, which nobody trusts.
    pub fn is_staging(&self) -> bool {
        self.url() == rustls_acme::acme::LETS_ENCRYPT_STAGING_DIRECTORY
    }

    /// As written in `tls.acme.directory`.
    fn as_written(&self) -> &str {
        match self {
            Self::LetsEncrypt => LETSENCRYPT,
            Self::LetsEncryptStaging => LETSENCRYPT_STAGING,
            Self::Url(url) => url,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SocketIoConfig {
    /// Both at least 1 s.
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
}

/// `[http_redirect]` when it has a `listen` address.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRedirectConfig {
    /// Differs from the TLS `listen`.
    pub listen: SocketAddr,
    /// The port written into `Location`: `https_port`, or the port of the TLS `listen`.
    pub https_port: u16,
}

/// A list with at least one element; derefs to a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonEmpty<T>(Vec<T>);

impl<T> NonEmpty<T> {
    /// `None` for an empty `items`.
    pub fn new(items: Vec<T>) -> Option<Self> {
        (!items.is_empty()).then_some(Self(items))
    }

    pub fn first(&self) -> &T {
        // `new` refuses an empty Vec, and nothing removes elements afterwards.
        &self.0[0]
    }

    pub fn to_vec(&self) -> Vec<T>
    where
        T: Clone,
    {
        self.0.clone()
    }
}

impl<'a, T> IntoIterator for &'a NonEmpty<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<T> Deref for NonEmpty<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.0
    }
}

/// A configuration that cannot be used, with the key at fault and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file that is not TOML at all (figment's text names the file and the line).
    #[error("invalid configuration: {0}")]
    Syntax(Box<figment::Error>),
    /// A value of the wrong type or an unknown key.
    #[error("invalid configuration: key `{key}` ({origin}): {message}")]
    Parse {
        key: String,
        origin: String,
        message: String,
    },
    #[error("invalid configuration: key `{key}` ({origin}): {message}")]
    Invalid {
        key: String,
        origin: String,
        message: String,
    },
}

impl Config {
    /// Loads `file` (if given) and the environment, then validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, |name| std::env::var(name).ok(), true)
    }

    /// Like [`Config::load`] with an explicit environment, for tests.
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        read_agentgate_env: bool,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
        let origin = match file {
            Some(path) => {
                // Read it ourselves so that a missing file is an error, not an empty config.
                std::fs::metadata(path).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                figment = figment.merge(Toml::file_exact(path));
                format!("file {}", path.display())
            }
            None => "built-in defaults".to_owned(),
        };
        if read_agentgate_env {
            figment = figment.merge(Env::prefixed("AGENTGATE_").split("__"));
        }
        let mut config: RawConfig = figment.extract().map_err(parse_error)?;
        if let Some(key) = env("API_KEY") {
            if key.is_empty() {
                return Err(invalid(
                    "api_keys",
                    "environment variable API_KEY",
                    "API_KEY is set but empty",
                ));
            }
            config.api_keys = vec![RawApiKey::Plain(key)];
        }
        if let Some(dir) = env("CERT_STORAGE_DIR") {
            if dir.is_empty() {
                return Err(invalid(
                    "store.dir",
                    "environment variable CERT_STORAGE_DIR",
                    "CERT_STORAGE_DIR is set but empty",
                ));
            }
            config.store.dir = PathBuf::from(dir);
        }
        // The replaced Traefik gateway's variable; never read from the file.
        config.gateway_jwt_secret = env("GATEWAY_JWT_SECRET");
        config.validate(&origin)
    }

    /// The configuration as it would be written (the inverse of [`RawConfig::validate`]).
    pub fn to_raw(&self) -> RawConfig {
        let (mode, cert_file, key_file, self_signed_names, acme) = match &self.tls {
            TlsSource::SelfSigned { names } => (
                TlsMode::SelfSigned,
                None,
                None,
                names.to_vec(),
                RawAcme::default(),
            ),
            TlsSource::Files { cert, key } => (
                TlsMode::Files,
                Some(cert.clone()),
                Some(key.clone()),
                RawTls::default().self_signed_names,
                RawAcme::default(),
            ),
            TlsSource::Acme(acme) => (
                TlsMode::Acme,
                None,
                None,
                RawTls::default().self_signed_names,
                RawAcme {
                    domains: acme.domains.to_vec(),
                    contact: acme.contact.clone(),
                    directory: acme.directory.as_written().to_owned(),
                    cache_dir: Some(acme.cache_dir.clone()),
                    directory_ca_file: acme.directory_ca_file.clone(),
                },
            ),
        };
        RawConfig {
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            api_keys: self.api_keys.iter().map(gateway::api_key_to_raw).collect(),
            allow_anonymous_agents: self.allow_anonymous_agents,
            cors_origins: self.cors_origins.clone(),
            handshake_timeout_secs: self.handshake_timeout.as_secs(),
            max_connections: self.max_connections,
            shutdown_grace_secs: self.shutdown_grace.as_secs(),
            log_format: self.log_format,
            metrics_listen: self.metrics_listen,
            agents: RawAgents {
                stale_after_secs: self.agents.stale_after.as_secs(),
            },
            store: RawStore {
                dir: self.store.dir.clone(),
            },
            limits: RawLimits {
                api_key_failures: self.limits.api_key_failures,
                api_key_failure_window_secs: self.limits.api_key_failure_window.as_secs(),
                handshakes_per_source: self.limits.handshakes_per_source,
                handshake_failures: self.limits.handshake_failures,
                handshake_failure_window_secs: self.limits.handshake_failure_window.as_secs(),
                http_idle_timeout_secs: self.limits.http_idle_timeout.as_secs(),
                max_uri_bytes: self.limits.head.uri_bytes,
                max_header_fields: self.limits.head.header_fields,
                max_header_bytes: self.limits.head.header_bytes,
                agent_events: self.limits.agent_events,
                agent_event_window_secs: self.limits.agent_event_window.as_secs(),
                max_body_bytes: self.limits.body.api,
                register_body_bytes: self.limits.body.register,
                proxy_max_body_bytes: self.limits.body.proxy,
                max_packet_bytes: self.limits.max_packet_bytes,
                session_send_buffer: self.limits.session_send_buffer,
                session_reply_queue: self.limits.session_reply_queue,
            },
            console: RawConsole {
                session_idle_secs: self.console.session_idle.as_secs(),
                session_absolute_secs: self.console.session_absolute.as_secs(),
            },
            tls: RawTls {
                mode,
                cert_file,
                key_file,
                self_signed_names,
                acme,
            },
            socketio: RawSocketIo {
                ping_interval_secs: self.socketio.ping_interval.as_secs(),
                ping_timeout_secs: self.socketio.ping_timeout.as_secs(),
                max_payload_bytes: None,
            },
            http_redirect: match &self.http_redirect {
                Some(r) => RawHttpRedirect {
                    listen: Some(r.listen),
                    https_port: Some(r.https_port),
                },
                None => RawHttpRedirect::default(),
            },
            cluster: self.cluster.as_ref().map(|c| RawCluster {
                redis_url: Some(c.redis_url.as_secret_str().to_owned()),
                node_id: Some(c.node_id.clone()),
                mode: c.mode,
                publish_interval_ms: Some(c.publish_interval.as_millis() as u64),
                node_timeout_ms: Some(c.node_timeout.as_millis() as u64),
            }),
            routes: self.routes.iter().map(gateway::route_to_raw).collect(),
            jwt: RawJwt {
                leeway_secs: self.jwt.leeway.as_secs(),
                keys: self
                    .jwt
                    .keys
                    .iter()
                    .map(|k| RawJwtKey {
                        alg: k.alg.as_str().to_owned(),
                        pem_file: k.pem_file.clone(),
                        kid: k.kid.clone(),
                    })
                    .collect(),
                jwks_file: self.jwt.jwks_file.clone(),
            },
            proxy: RawProxy {
                ca_file: self.upstream_ca_file.clone(),
            },
            gateway_jwt_secret: self.jwt.hs256_secret.clone(),
        }
    }

    /// The effective settings as TOML, with every API key masked.
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.to_raw();
        for key in &mut shown.api_keys {
            match key {
                RawApiKey::Plain(k) => *k = mask(k),
                RawApiKey::Entry(e) => e.key = e.key.as_deref().map(mask),
            }
        }
        if let (Some(raw), Some(cluster)) = (shown.cluster.as_mut(), &self.cluster) {
            // Credentials in the URL are never shown (`check-config`, logs).
            raw.redis_url = Some(cluster.redis_url.redacted());
        }
        toml_string(&shown)
    }
}

impl RawConfig {
    /// Checks everything and builds the [`Config`]; `origin` says where the values came
    /// from, for the error.
    pub fn validate(self, origin: &str) -> Result<Config, ConfigError> {
        let err = |key, message: &str| invalid(key, origin, message);
        let api_keys = validate_api_keys(self.api_keys, origin)?;
        let jwt = gateway::validate_jwt(self.jwt, self.gateway_jwt_secret, origin)?;
        let routes = gateway::validate_routes(self.routes, &jwt, origin)?;
        if self.handshake_timeout_secs == 0 {
            return Err(err("handshake_timeout_secs", "must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(err("max_connections", "must be at least 1"));
        }
        validate_cors_origins(&self.cors_origins, origin)?;
        if self.metrics_listen == Some(self.listen) {
            return Err(err("metrics_listen", "must differ from listen"));
        }
        let agents = validate_agents(self.agents, origin)?;
        let limits = validate_limits(
            &packet_alias(self.limits, self.socketio.max_payload_bytes, origin)?,
            origin,
        )?;
        let socketio = validate_socketio(self.socketio, origin)?;
        let console = validate_console(&self.console, origin)?;
        let tls = validate_tls(self.tls, &self.data_dir, origin)?;
        let http_redirect = validate_http_redirect(self.http_redirect, self.listen, origin)?;
        let cluster = match self.cluster {
            Some(raw) => Some(validate_cluster(raw, self.listen, origin)?),
            None => None,
        };
        if matches!(tls, TlsSource::Acme(_))
            && cluster
                .as_ref()
                .is_some_and(|c| c.mode == ClusterMode::Cluster)
        {
            return Err(err(
                "cluster.mode",
                "tls.mode = \"acme\" shares its certificate through a standalone Redis (or a \
                 primary behind Sentinel/HAProxy); with a Redis Cluster (mode = \"cluster\") use \
                 tls.mode = \"files\" and a certificate from your own ACME client",
            ));
        }
        Ok(Config {
            listen: self.listen,
            data_dir: self.data_dir,
            api_keys,
            allow_anonymous_agents: self.allow_anonymous_agents,
            cors_origins: self.cors_origins,
            handshake_timeout: Duration::from_secs(self.handshake_timeout_secs),
            max_connections: self.max_connections,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            log_format: self.log_format,
            metrics_listen: self.metrics_listen,
            agents,
            store: StoreConfig {
                dir: self.store.dir,
            },
            limits,
            console,
            tls,
            socketio,
            http_redirect,
            cluster,
            routes,
            jwt,
            upstream_ca_file: self.proxy.ca_file,
        })
    }
}

fn validate_cluster(
    raw: RawCluster,
    listen: SocketAddr,
    origin: &str,
) -> Result<ClusterConfig, ConfigError> {
    let Some(url) = raw.redis_url else {
        return Err(invalid(
            "cluster.redis_url",
            origin,
            "is required in [cluster] (e.g. \"redis://10.0.0.5:6379\")",
        ));
    };
    let redis_url = crate::cluster::RedisUrl::parse(&url)
        .map_err(|e| invalid("cluster.redis_url", origin, &e.to_string()))?;
    let node_id = match raw.node_id {
        Some(id) => id,
        None => format!("{}:{}", host_name(), listen.port()),
    };
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
    let first_ok = node_id
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || node_id.len() > 128 || !node_id.chars().all(valid_char) {
        return Err(invalid(
            "cluster.node_id",
            origin,
            &format!(
                "{node_id:?} must be 1 to 128 of A-Z a-z 0-9 . _ : - starting with a letter or digit"
            ),
        ));
    }
    let publish_interval = Duration::from_millis(raw.publish_interval_ms.unwrap_or(1000));
    if publish_interval < Duration::from_millis(50) {
        return Err(invalid(
            "cluster.publish_interval_ms",
            origin,
            "must be at least 50",
        ));
    }
    let node_timeout = Duration::from_millis(raw.node_timeout_ms.unwrap_or(10_000));
    if node_timeout < publish_interval * 3 {
        return Err(invalid(
            "cluster.node_timeout_ms",
            origin,
            "must be at least 3 times cluster.publish_interval_ms (a node must miss several publications before it counts as dead)",
        ));
    }
    Ok(ClusterConfig {
        redis_url,
        node_id,
        mode: raw.mode,
        publish_interval,
        node_timeout,
    })
}

/// The kernel's host name (Linux), for the default node id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "agentgate".to_owned())
}

fn validate_api_keys(
    keys: Vec<RawApiKey>,
    origin: &str,
) -> Result<NonEmpty<ApiKeyConfig>, ConfigError> {
    NonEmpty::new(gateway::validate_api_keys(keys, origin)?).ok_or_else(|| {
        invalid(
            "api_keys",
            origin,
            "no API key configured: set the API_KEY environment variable or api_keys in the configuration file",
        )
    })
}

fn validate_cors_origins(origins: &[String], origin: &str) -> Result<(), ConfigError> {
    for value in origins {
        // An origin is scheme://host[:port] and nothing more: a browser never sends a
        // path, so an entry with one would silently match nothing.
        let host = value
            .strip_prefix("https://")
            .or_else(|| value.strip_prefix("http://"));
        let ok = host.is_some_and(|h| !h.is_empty() && !h.contains(['/', '?', '#', '@', '*']))
            && http::HeaderValue::from_str(value).is_ok();
        if !ok {
            return Err(invalid(
                "cors_origins",
                origin,
                &format!("{value:?} is not an origin like \"https://app.example.com\""),
            ));
        }
    }
    Ok(())
}

fn validate_agents(raw: RawAgents, origin: &str) -> Result<AgentsConfig, ConfigError> {
    if raw.stale_after_secs == 0 {
        return Err(invalid(
            "agents.stale_after_secs",
            origin,
            "must be at least 1",
        ));
    }
    Ok(AgentsConfig {
        stale_after: Duration::from_secs(raw.stale_after_secs),
    })
}

fn validate_console(raw: &RawConsole, origin: &str) -> Result<ConsoleConfig, ConfigError> {
    if raw.session_idle_secs == 0 {
        return Err(invalid(
            "console.session_idle_secs",
            origin,
            "must be at least 1",
        ));
    }
    if raw.session_absolute_secs < raw.session_idle_secs {
        return Err(invalid(
            "console.session_absolute_secs",
            origin,
            "must be at least console.session_idle_secs",
        ));
    }
    Ok(ConsoleConfig {
        session_idle: Duration::from_secs(raw.session_idle_secs),
        session_absolute: Duration::from_secs(raw.session_absolute_secs),
    })
}

fn validate_limits(raw: &RawLimits, origin: &str) -> Result<LimitsConfig, ConfigError> {
    for (key, value) in [
        ("limits.api_key_failures", u64::from(raw.api_key_failures)),
        (
            "limits.api_key_failure_window_secs",
            raw.api_key_failure_window_secs,
        ),
        (
            "limits.handshakes_per_source",
            u64::from(raw.handshakes_per_source),
        ),
        (
            "limits.handshake_failures",
            u64::from(raw.handshake_failures),
        ),
        (
            "limits.handshake_failure_window_secs",
            raw.handshake_failure_window_secs,
        ),
        ("limits.http_idle_timeout_secs", raw.http_idle_timeout_secs),
        ("limits.agent_events", u64::from(raw.agent_events)),
        (
            "limits.agent_event_window_secs",
            raw.agent_event_window_secs,
        ),
        ("limits.proxy_max_body_bytes", raw.proxy_max_body_bytes),
        ("limits.session_reply_queue", raw.session_reply_queue as u64),
    ] {
        if value == 0 {
            return Err(invalid(key, origin, "must be at least 1"));
        }
    }
    // Upper bounds keep hyper's per-connection read buffer (sized from these) small.
    for (key, value, max) in [
        ("limits.max_uri_bytes", raw.max_uri_bytes, 1 << 20),
        ("limits.max_header_fields", raw.max_header_fields, 10_000),
        ("limits.max_header_bytes", raw.max_header_bytes, 1 << 20),
        // The API reads a JSON body whole before parsing it: bounded in memory.
        ("limits.max_body_bytes", raw.max_body_bytes, 64 << 20),
        (
            "limits.register_body_bytes",
            raw.register_body_bytes,
            64 << 20,
        ),
        // engineioxide allocates the buffer per session, and backpressure moves half of
        // it per step (`agents::backpressure`).
        (
            "limits.session_send_buffer",
            raw.session_send_buffer,
            1 << 16,
        ),
    ] {
        if !(1..=max).contains(&value) {
            return Err(invalid_owned(
                key.to_owned(),
                origin,
                format!("must be between 1 and {max}"),
            ));
        }
    }
    if raw.session_send_buffer < 2 {
        return Err(invalid(
            "limits.session_send_buffer",
            origin,
            "must be at least 2 (a reply and the Engine.IO ping)",
        ));
    }
    if raw.max_packet_bytes < 1024 {
        return Err(invalid(
            "limits.max_packet_bytes",
            origin,
            "must be at least 1024",
        ));
    }
    Ok(LimitsConfig {
        api_key_failures: raw.api_key_failures,
        api_key_failure_window: Duration::from_secs(raw.api_key_failure_window_secs),
        handshakes_per_source: raw.handshakes_per_source,
        handshake_failures: raw.handshake_failures,
        handshake_failure_window: Duration::from_secs(raw.handshake_failure_window_secs),
        http_idle_timeout: Duration::from_secs(raw.http_idle_timeout_secs),
        head: crate::api::head_limits::HeadLimits {
            uri_bytes: raw.max_uri_bytes,
            header_fields: raw.max_header_fields,
            header_bytes: raw.max_header_bytes,
        },
        agent_events: raw.agent_events,
        agent_event_window: Duration::from_secs(raw.agent_event_window_secs),
        body: BodyLimits {
            api: raw.max_body_bytes,
            register: raw.register_body_bytes,
            proxy: raw.proxy_max_body_bytes,
        },
        max_packet_bytes: raw.max_packet_bytes,
        session_send_buffer: raw.session_send_buffer,
        session_reply_queue: raw.session_reply_queue,
    })
}

/// `socketio.max_payload_bytes`, the old name of `limits.max_packet_bytes`, documented
/// before the Engine.IO limits moved to `[limits]`: still read, so that a configuration
/// written for it keeps its limit. Written with a different value next to a
/// `limits.max_packet_bytes` that is not the default, it is refused rather than guessed.
fn packet_alias(
    mut limits: RawLimits,
    old: Option<u64>,
    origin: &str,
) -> Result<RawLimits, ConfigError> {
    let Some(old) = old else {
        return Ok(limits);
    };
    let default = RawLimits::default().max_packet_bytes;
    if limits.max_packet_bytes != default && limits.max_packet_bytes != old {
        return Err(invalid_owned(
            "socketio.max_payload_bytes".to_owned(),
            origin,
            format!(
                "is the old name of limits.max_packet_bytes, which is set to {} here; keep only limits.max_packet_bytes",
                limits.max_packet_bytes
            ),
        ));
    }
    limits.max_packet_bytes = old;
    Ok(limits)
}

fn validate_socketio(raw: RawSocketIo, origin: &str) -> Result<SocketIoConfig, ConfigError> {
    if raw.ping_interval_secs == 0 || raw.ping_timeout_secs == 0 {
        return Err(invalid(
            "socketio.ping_interval_secs",
            origin,
            "ping interval and timeout must be at least 1 second",
        ));
    }
    Ok(SocketIoConfig {
        ping_interval: Duration::from_secs(raw.ping_interval_secs),
        ping_timeout: Duration::from_secs(raw.ping_timeout_secs),
    })
}

fn validate_tls(raw: RawTls, data_dir: &Path, origin: &str) -> Result<TlsSource, ConfigError> {
    let required = |key| {
        invalid(
            key,
            origin,
            &format!("required when tls.mode = \"{}\"", raw.mode),
        )
    };
    match raw.mode {
        TlsMode::Files => {
            let cert = raw
                .cert_file
                .clone()
                .ok_or_else(|| required("tls.cert_file"))?;
            let key = raw
                .key_file
                .clone()
                .ok_or_else(|| required("tls.key_file"))?;
            Ok(TlsSource::Files { cert, key })
        }
        TlsMode::SelfSigned => match NonEmpty::new(raw.self_signed_names) {
            Some(names) => Ok(TlsSource::SelfSigned { names }),
            None => Err(invalid(
                "tls.self_signed_names",
                origin,
                "at least one name is required",
            )),
        },
        TlsMode::Acme => validate_acme(raw.acme, data_dir, origin).map(TlsSource::Acme),
    }
}

fn validate_acme(raw: RawAcme, data_dir: &Path, origin: &str) -> Result<AcmeConfig, ConfigError> {
    let err = |key, message: String| invalid(key, origin, &message);
    if raw.domains.len() > MAX_ACME_DOMAINS {
        return Err(err(
            "tls.acme.domains",
            format!("at most {MAX_ACME_DOMAINS} names fit in one certificate"),
        ));
    }
    for domain in &raw.domains {
        if let Some(problem) = acme_domain_problem(domain) {
            return Err(err("tls.acme.domains", format!("{domain:?} {problem}")));
        }
    }
    let domains = NonEmpty::new(raw.domains).ok_or_else(|| {
        err(
            "tls.acme.domains",
            "at least one DNS name is required when tls.mode = \"acme\"".into(),
        )
    })?;
    for contact in &raw.contact {
        // RFC 8555 §7.3 allows other URI schemes; Let's Encrypt accepts only mailto.
        let ok = contact
            .strip_prefix("mailto:")
            .is_some_and(|addr| addr.contains('@') && !addr.contains(char::is_whitespace));
        if !ok {
            return Err(err(
                "tls.acme.contact",
                format!("{contact:?} is not like \"mailto:ops@example.com\""),
            ));
        }
    }
    let directory = match raw.directory.as_str() {
        LETSENCRYPT => AcmeDirectory::LetsEncrypt,
        LETSENCRYPT_STAGING => AcmeDirectory::LetsEncryptStaging,
        url => {
            // RFC 8555 §6.1: ACME is spoken over HTTPS only.
            let https = url.parse::<http::Uri>().ok().filter(|u| {
                u.scheme_str() == Some("https") && u.host().is_some_and(|h| !h.is_empty())
            });
            if https.is_none() {
                return Err(err(
                    "tls.acme.directory",
                    format!(
                        "{url:?} is neither \"{LETSENCRYPT}\", \"{LETSENCRYPT_STAGING}\" nor an https:// URL"
                    ),
                ));
            }
            AcmeDirectory::Url(url.to_owned())
        }
    };
    Ok(AcmeConfig {
        domains,
        contact: raw.contact,
        directory,
        cache_dir: raw.cache_dir.unwrap_or_else(|| data_dir.join("acme")),
        directory_ca_file: raw.directory_ca_file,
    })
}

fn validate_http_redirect(
    raw: RawHttpRedirect,
    listen: SocketAddr,
    origin: &str,
) -> Result<Option<HttpRedirectConfig>, ConfigError> {
    if raw.listen == Some(listen) {
        return Err(invalid(
            "http_redirect.listen",
            origin,
            "must differ from `listen` (the TLS listener)",
        ));
    }
    if raw.https_port == Some(0) {
        return Err(invalid(
            "http_redirect.https_port",
            origin,
            "must be a port from 1 to 65535",
        ));
    }
    Ok(raw.listen.map(|redirect| HttpRedirectConfig {
        listen: redirect,
        https_port: raw.https_port.unwrap_or(listen.port()),
    }))
}

/// Why `name` cannot be a TLS-ALPN-01 identifier, if it cannot.
fn acme_domain_problem(name: &str) -> Option<&'static str> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Some("is an IP address; ACME here orders certificates for DNS names only");
    }
    if name.contains('*') {
        // RFC 8737 §3: TLS-ALPN-01 cannot prove control of a wildcard name.
        return Some("is a wildcard; TLS-ALPN-01 validation cannot issue wildcards");
    }
    if name.ends_with('.') || name.chars().any(|c| c.is_ascii_uppercase()) {
        return Some("must be written in lower case without a trailing dot");
    }
    if rustls::pki_types::DnsName::try_from(name).is_err() {
        return Some("is not a valid DNS name");
    }
    None
}

/// Figment's error in our words: `key `tls.mode` (file gw.toml): unknown variant ...`,
/// without figment's profile prefix (`default.`) and naming the environment variable when
/// the value came from one.
fn parse_error(e: figment::Error) -> ConfigError {
    let Some(metadata) = e.metadata.as_ref().filter(|_| !e.path.is_empty()) else {
        return ConfigError::Syntax(Box::new(e));
    };
    let key = e.path.join(".");
    let origin = match &metadata.source {
        Some(figment::Source::File(path)) => format!("file {}", path.display()),
        _ if metadata.name.contains("environment") => format!(
            "environment variable AGENTGATE_{}",
            e.path.join("__").to_uppercase()
        ),
        _ => metadata.name.to_string(),
    };
    ConfigError::Parse {
        key,
        origin,
        message: e.kind.to_string(),
    }
}

fn invalid(key: &'static str, origin: &str, message: &str) -> ConfigError {
    invalid_owned(key.to_owned(), origin, message.to_owned())
}

fn invalid_owned(key: String, origin: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        key,
        origin: origin.to_owned(),
        message,
    }
}

/// Shows the length and nothing of the secret itself.
fn mask(secret: &str) -> String {
    format!("<masked, {} characters>", secret.chars().count())
}

fn toml_string(config: &RawConfig) -> String {
    // Serialising plain data into a TOML string only fails for non-string map keys or
    // values after tables, neither of which `RawConfig` has.
    toml::to_string_pretty(config).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("agentgate.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn plain_keys(c: &Config) -> Vec<String> {
        c.api_keys
            .iter()
            .map(|k| match &k.secret {
                KeySecret::Plain(s) => s.clone(),
                KeySecret::Sha256(d) => crate::digest::hex(d),
            })
            .collect()
    }

    #[test]
    fn scoped_keys_and_routes_are_validated_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| {
            let path = write(dir.path(), text);
            Config::load_with_env(Some(&path), env_of(&[("GATEWAY_JWT_SECRET", "s")]), false)
        };
        let digest = crate::digest::hex(&crate::digest::sha256(b"reader-key"));
        let c = load(&format!(
            "api_keys = [\"plain\", {{name = \"reader\", sha256 = \"sha256:{digest}\", scopes = [\"agents:read\"]}}]\n\
             [[routes]]\nname = \"prefect\"\nprefix = \"/captionacc/prefect/\"\nupstreams = [\"http://127.0.0.1:4200\"]\n\
             strip_prefix = true\nauth = \"jwt\"\nclaims = {{project = [\"captionacc\"]}}\n"
        ))
        .unwrap();
        assert_eq!(c.api_keys[1].name, "reader");
        assert!(c.api_keys[1].scopes.allows("agents:read"));
        assert!(!c.api_keys[1].scopes.allows("agents:command"));
        assert!(c.api_keys[0].scopes.allows("agents:command"));
        assert_eq!(c.routes[0].prefix, "/captionacc/prefect");
        assert_eq!(c.to_raw().validate("again").unwrap(), c);
        for (text, key) in [
            ("api_keys = [{name = \"a\", scopes = []}]", "api_keys[0]"),
            (
                "api_keys = [{name = \"a\", key = \"k\", scopes = [\"agents:raed\"]}]",
                "api_keys[0]",
            ),
            (
                "api_keys = [\"k\"]\n[[routes]]\nname = \"a\"\nprefix = \"/agents/x\"\nupstreams = [\"http://h\"]\nauth = \"none\"",
                "routes[0].prefix",
            ),
            (
                "api_keys = [\"k\"]\n[[routes]]\nname = \"a\"\nprefix = \"/x\"\nupstreams = [\"ftp://h\"]\nauth = \"none\"",
                "routes[0].upstreams[0]",
            ),
            (
                "api_keys = [\"k\"]\n[[routes]]\nname = \"a\"\nprefix = \"/x\"\nupstreams = [\"http://h\"]\nauth = \"none\"\nclaims = {p = [\"x\"]}",
                "routes[0].claims",
            ),
            (
                "api_keys = [\"k\"]\n[[routes]]\nname = \"a\"\nprefix = \"/x\"\nupstreams = [\"http://h\"]\nauth = \"none\"\n[[routes]]\nname = \"b\"\nprefix = \"/x/\"\nupstreams = [\"http://h\"]\nauth = \"none\"",
                "routes[1].prefix",
            ),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{key}`")) && e.contains("agentgate.toml"),
                "{text}: {e}"
            );
        }
        let path = write(
            dir.path(),
            "api_keys = [\"k\"]\n[[routes]]\nname = \"a\"\nprefix = \"/x\"\nupstreams = [\"http://h\"]\nauth = \"jwt\"",
        );
        let e = Config::load_with_env(Some(&path), env_of(&[]), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`routes[0].auth`") && e.contains("GATEWAY_JWT_SECRET"),
            "{e}"
        );
    }

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn no_file_and_api_key_gives_local_default() {
        let c = Config::load_with_env(None, env_of(&[("API_KEY", "k1")]), false).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(c.store.dir, PathBuf::from("./certs"));
        assert!(matches!(c.tls, TlsSource::SelfSigned { .. }));
        assert_eq!(plain_keys(&c), vec!["k1"]);
    }

    #[test]
    fn missing_api_key_names_the_key() {
        let e = Config::load_with_env(None, env_of(&[]), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`api_keys`") && e.contains("API_KEY"), "{e}");
    }

    #[test]
    fn unknown_key_names_the_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "api_keys = [\"a\"]\n[tls]\nmodee = \"files\"\n");
        let e = Config::load_with_env(Some(&path), env_of(&[]), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("modee") && e.contains("agentgate.toml"), "{e}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "api_keys = [\"a\"]\nlisten = \"not an address\"\n",
        );
        let e = Config::load_with_env(Some(&path), env_of(&[]), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen") && e.contains("agentgate.toml"), "{e}");
        let path = write(dir.path(), "api_keys = [\"a\"]\n[tls]\nmode = \"files\"\n");
        let e = Config::load_with_env(Some(&path), env_of(&[]), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls.cert_file"), "{e}");
    }

    #[test]
    fn acme_mode_validates_each_key_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let load = |acme: &str| {
            let path = write(
                dir.path(),
                &format!("api_keys = [\"a\"]\n[tls]\nmode = \"acme\"\n[tls.acme]\n{acme}"),
            );
            Config::load_with_env(Some(&path), env_of(&[]), false)
        };
        let c = load("domains = [\"gw.example.com\"]\ncontact = [\"mailto:ops@example.com\"]\n")
            .unwrap();
        let TlsSource::Acme(acme) = &c.tls else {
            panic!("not acme: {:?}", c.tls)
        };
        assert!(
            acme.directory.is_staging(),
            "staging is the default directory"
        );
        assert_eq!(acme.cache_dir, c.data_dir.join("acme"));
        let c = load("domains = [\"gw.example.com\"]\ndirectory = \"letsencrypt\"\n").unwrap();
        let TlsSource::Acme(acme) = &c.tls else {
            panic!("not acme: {:?}", c.tls)
        };
        assert_eq!(
            acme.directory.url(),
            "https://acme-v02.api.letsencrypt.org/directory"
        );
        for (acme, key) in [
            ("", "tls.acme.domains"),
            ("domains = [\"*.example.com\"]", "tls.acme.domains"),
            ("domains = [\"192.0.2.1\"]", "tls.acme.domains"),
            ("domains = [\"Gw.example.com\"]", "tls.acme.domains"),
            ("domains = [\"a..b\"]", "tls.acme.domains"),
            (
                "domains = [\"a.example\"]\ncontact = [\"ops@example.com\"]",
                "tls.acme.contact",
            ),
            (
                "domains = [\"a.example\"]\ndirectory = \"http://acme.example/dir\"",
                "tls.acme.directory",
            ),
            (
                "domains = [\"a.example\"]\ndirectory = \"letsencrypt-prod\"",
                "tls.acme.directory",
            ),
        ] {
            let e = load(acme).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{acme}: {e}");
        }
    }

    #[test]
    fn redirect_listener_must_not_take_the_tls_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "api_keys = [\"a\"]\nlisten = \"127.0.0.1:8443\"\n[http_redirect]\nlisten = \"127.0.0.1:8443\"\n",
        );
        let e = Config::load_with_env(Some(&path), env_of(&[]), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`http_redirect.listen`"), "{e}");
        let path = write(
            dir.path(),
            "api_keys = [\"a\"]\n[http_redirect]\nlisten = \"0.0.0.0:80\"\nhttps_port = 443\n",
        );
        let c = Config::load_with_env(Some(&path), env_of(&[]), false).unwrap();
        assert_eq!(c.http_redirect.map(|r| r.https_port), Some(443));
    }

    #[test]
    fn environment_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "api_keys = [\"a\", \"b\"]\n[store]\ndir = \"/x\"\n",
        );
        let env = env_of(&[
            ("API_KEY", "z"),
            ("CERT_STORAGE_DIR", "/var/orchestrator/certs"),
        ]);
        let c = Config::load_with_env(Some(&path), env, false).unwrap();
        assert_eq!(plain_keys(&c), vec!["z"]);
        assert_eq!(c.store.dir, PathBuf::from("/var/orchestrator/certs"));
        let c = Config::load_with_env(Some(&path), env_of(&[]), false).unwrap();
        assert_eq!(plain_keys(&c), vec!["a", "b"]);
    }

    #[test]
    fn masked_output_hides_keys() {
        let c = RawConfig {
            api_keys: vec![
                "super-secret-key".into(),
                RawApiKey::Entry(RawApiKeyEntry {
                    name: "ci".into(),
                    key: Some("other-secret-key".into()),
                    sha256: None,
                    scopes: vec!["agents:read".into()],
                }),
            ],
            ..RawConfig::default()
        };
        let shown = c.validate("test").unwrap().to_masked_toml();
        assert!(!shown.contains("super-secret-key"));
        assert!(!shown.contains("other-secret-key"), "{shown}");
        assert!(shown.contains("<masked, 16 characters>"));
    }

    #[test]
    fn cluster_section_is_validated_and_its_password_never_shown() {
        let c: RawConfig = toml::from_str(
            "api_keys = [\"k\"]\n[cluster]\nredis_url = \"redis://agw:hunter2@10.0.0.5:6379\"\n",
        )
        .unwrap();
        let config = c.validate("test").unwrap();
        let cluster = config.cluster.as_ref().unwrap();
        assert_eq!(cluster.mode, ClusterMode::Standalone);
        assert!(cluster.node_id.ends_with(":8443"), "{}", cluster.node_id);
        assert!(cluster.redis_url.as_secret_str().contains("protocol=resp3"));
        let shown = config.to_masked_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("[cluster]"), "{shown}");
        // Without [cluster], nothing about Redis appears.
        let single: RawConfig = toml::from_str("api_keys = [\"k\"]\n").unwrap();
        let single = single.validate("test").unwrap();
        assert!(single.cluster.is_none());
        assert!(!single.to_masked_toml().contains("cluster"));
    }

    #[test]
    fn example_config_documents_every_key_with_its_default() {
        let text = include_str!("../../config.example.toml");
        // Every key of the example parses (no stale names) ...
        let example: toml::Table = toml::from_str(text).unwrap();
        let mut parsed: RawConfig = toml::from_str(text).unwrap();
        // ... and apart from the example API key, equals the built-in defaults.
        parsed.api_keys.clear();
        assert_eq!(parsed, RawConfig::default());
        // ... and every key of the defaults appears in it.
        let defaults: toml::Table = toml::from_str(&toml_string(&RawConfig::default())).unwrap();
        assert_same_keys(&defaults, &example, "");
    }

    fn assert_same_keys(defaults: &toml::Table, example: &toml::Table, prefix: &str) {
        for (k, v) in defaults {
            let e = example
                .get(k)
                .unwrap_or_else(|| panic!("config.example.toml lacks {prefix}{k}"));
            if let (toml::Value::Table(d), toml::Value::Table(e)) = (v, e) {
                assert_same_keys(d, e, &format!("{prefix}{k}."));
            }
        }
    }

    /// `socketio.max_payload_bytes`, documented before the Engine.IO limits moved to
    /// `[limits]`, still sets the packet limit; it is refused only next to a different
    /// non-default `limits.max_packet_bytes`, and never written back.
    #[test]
    fn the_old_packet_limit_key_is_read_as_limits_max_packet_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| {
            let path = write(dir.path(), &format!("api_keys = [\"k\"]\n{text}"));
            Config::load_with_env(Some(&path), env_of(&[]), false)
        };
        let c = load("[socketio]\nmax_payload_bytes = 50000\n").unwrap();
        assert_eq!(c.limits.max_packet_bytes, 50_000);
        assert!(!c.to_masked_toml().contains("max_payload_bytes"));
        assert_eq!(c.to_raw().validate("again").unwrap(), c);
        let c = load("[socketio]\nmax_payload_bytes = 50000\n[limits]\nmax_packet_bytes = 50000\n")
            .unwrap();
        assert_eq!(c.limits.max_packet_bytes, 50_000);
        let e = load("[socketio]\nmax_payload_bytes = 50000\n[limits]\nmax_packet_bytes = 60000\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`socketio.max_payload_bytes`") && e.contains("agentgate.toml"),
            "{e}"
        );
        let e = load("[socketio]\nmax_payload_bytes = 100\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`limits.max_packet_bytes`"), "{e}");
    }

    /// `to_raw` is the inverse of `validate`, so `check-config` shows what runs.
    #[test]
    fn validated_config_renders_back_to_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            "api_keys = [\"a\"]\n",
            "api_keys = [\"a\"]\n[tls]\nmode = \"files\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n",
            "api_keys = [\"a\"]\n[tls]\nmode = \"acme\"\n[tls.acme]\ndomains = [\"gw.example.com\"]\ncache_dir = \"/acme\"\n",
            "api_keys = [\"a\"]\n[http_redirect]\nlisten = \"0.0.0.0:80\"\nhttps_port = 443\n",
        ] {
            let path = write(dir.path(), text);
            let c = Config::load_with_env(Some(&path), env_of(&[]), false).unwrap();
            assert_eq!(c.to_raw().validate("again").unwrap(), c, "{text}");
        }
    }
}
