//! Configuration: a TOML file, overridden by the environment, validated completely before
//! any port is bound (an invalid configuration names its key and where it came from).
//!
//! Precedence, lowest first: built-in defaults, the file, `AGENTGATE_*` variables (nested
//! keys joined by `__`, e.g. `AGENTGATE_TLS__MODE`), then the two variables of the system
//! agentgate replaces: `API_KEY` (one key) and `CERT_STORAGE_DIR`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The whole configuration. Every key and its default is documented in
/// `config.example.toml`; a test keeps the two in step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the TLS listener (agents, API and Socket.IO share it).
    pub listen: SocketAddr,
    /// Where agentgate keeps its own state (the generated self-signed certificate).
    pub data_dir: PathBuf,
    /// Bearer keys accepted by the API; several allow rotation. `API_KEY` replaces them.
    pub api_keys: Vec<String>,
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
    pub agents: AgentsConfig,
    pub store: StoreConfig,
    pub tls: TlsConfig,
    pub socketio: SocketIoConfig,
    pub http_redirect: HttpRedirectConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// A connected agent with no heartbeat (or connect) for this long is reported stale.
    pub stale_after_secs: u64,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        // Three missed heartbeats at the 30 s interval existing agents use.
        Self {
            stale_after_secs: 90,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Directory of `<agent_id>.pem` files; `CERT_STORAGE_DIR` overrides it.
    pub dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub mode: TlsMode,
    /// PEM chain (leaf first) for `mode = "files"`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `mode = "files"`.
    pub key_file: Option<PathBuf>,
    /// Subject alternative names of the generated certificate for `mode = "self-signed"`.
    pub self_signed_names: Vec<String>,
    /// Settings for `mode = "acme"`.
    pub acme: AcmeConfig,
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
pub struct AcmeConfig {
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
pub struct HttpRedirectConfig {
    /// Address of the plain-HTTP listener (e.g. `0.0.0.0:80`); `None`: no listener.
    pub listen: Option<SocketAddr>,
    /// Port written into the `Location` header; `None`: the port of `listen` (the TLS
    /// one). Set it when a port mapping (`-p 443:8443`) makes the public port differ.
    pub https_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketIoConfig {
    /// Engine.IO ping interval (the client is expected to answer within the timeout).
    pub ping_interval_secs: u64,
    pub ping_timeout_secs: u64,
    /// Largest Engine.IO payload accepted from an agent.
    pub max_payload_bytes: u64,
}

impl Default for Config {
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
            agents: AgentsConfig::default(),
            store: StoreConfig::default(),
            tls: TlsConfig::default(),
            socketio: SocketIoConfig::default(),
            http_redirect: HttpRedirectConfig::default(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./certs"),
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            mode: TlsMode::SelfSigned,
            cert_file: None,
            key_file: None,
            self_signed_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            acme: AcmeConfig::default(),
        }
    }
}

impl Default for AcmeConfig {
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

impl Default for SocketIoConfig {
    fn default() -> Self {
        // The Engine.IO v4 defaults of the reference server (python-socketio) and socket.io.
        Self {
            ping_interval_secs: 25,
            ping_timeout_secs: 20,
            max_payload_bytes: 100_000,
        }
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
    /// A value of the wrong type, an unknown key, or a file that is not TOML.
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration: key `{key}` ({origin}): {message}")]
    Invalid {
        key: &'static str,
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
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
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
        let mut config: Config = figment.extract().map_err(parse_error)?;
        if let Some(key) = env("API_KEY") {
            if key.is_empty() {
                return Err(invalid(
                    "api_keys",
                    "environment variable API_KEY",
                    "API_KEY is set but empty",
                ));
            }
            config.api_keys = vec![key];
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
        config.validate(&origin)?;
        Ok(config)
    }

    /// Checks what types alone cannot; `origin` says where the values came from.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let err = |key, message: &str| Err(invalid(key, origin, message));
        if self.api_keys.is_empty() {
            return err(
                "api_keys",
                "no API key configured: set the API_KEY environment variable or api_keys in the configuration file",
            );
        }
        for key in &self.api_keys {
            if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return err(
                    "api_keys",
                    "an API key is empty or contains whitespace or control characters",
                );
            }
        }
        if self.handshake_timeout_secs == 0 {
            return err("handshake_timeout_secs", "must be at least 1");
        }
        if self.max_connections == 0 {
            return err("max_connections", "must be at least 1");
        }
        for origin_value in &self.cors_origins {
            // An origin is scheme://host[:port] and nothing more: a browser never sends a
            // path, so an entry with one would silently match nothing.
            let host = origin_value
                .strip_prefix("https://")
                .or_else(|| origin_value.strip_prefix("http://"));
            let ok = host.is_some_and(|h| !h.is_empty() && !h.contains(['/', '?', '#', '@', '*']))
                && http::HeaderValue::from_str(origin_value).is_ok();
            if !ok {
                return err(
                    "cors_origins",
                    &format!("{origin_value:?} is not an origin like \"https://app.example.com\""),
                );
            }
        }
        if self.agents.stale_after_secs == 0 {
            return err("agents.stale_after_secs", "must be at least 1");
        }
        if self.metrics_listen == Some(self.listen) {
            return err("metrics_listen", "must differ from listen");
        }
        if self.socketio.ping_interval_secs == 0 || self.socketio.ping_timeout_secs == 0 {
            return err(
                "socketio.ping_interval_secs",
                "ping interval and timeout must be at least 1 second",
            );
        }
        if self.socketio.max_payload_bytes < 1024 {
            return err("socketio.max_payload_bytes", "must be at least 1024");
        }
        match self.tls.mode {
            TlsMode::Files => {
                if self.tls.cert_file.is_none() {
                    return err("tls.cert_file", "required when tls.mode = \"files\"");
                }
                if self.tls.key_file.is_none() {
                    return err("tls.key_file", "required when tls.mode = \"files\"");
                }
            }
            TlsMode::SelfSigned => {
                if self.tls.self_signed_names.is_empty() {
                    return err("tls.self_signed_names", "at least one name is required");
                }
            }
            TlsMode::Acme => self.tls.acme.validate(origin)?,
        }
        if self.http_redirect.listen == Some(self.listen) {
            return err(
                "http_redirect.listen",
                "must differ from `listen` (the TLS listener)",
            );
        }
        if self.http_redirect.https_port == Some(0) {
            return err("http_redirect.https_port", "must be a port from 1 to 65535");
        }
        Ok(())
    }

    /// Where ACME state is kept: `tls.acme.cache_dir`, or `<data_dir>/acme`.
    pub fn acme_cache_dir(&self) -> PathBuf {
        self.tls
            .acme
            .cache_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("acme"))
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }

    pub fn stale_after(&self) -> Duration {
        Duration::from_secs(self.agents.stale_after_secs)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The effective settings as TOML, with every API key masked.
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        shown.api_keys = self.api_keys.iter().map(|k| mask(k)).collect();
        toml_string(&shown)
    }
}

/// `tls.acme.directory` names for Let's Encrypt.
pub const LETSENCRYPT: &str = "letsencrypt";
pub const LETSENCRYPT_STAGING: &str = "letsencrypt-staging";

/// Let's Encrypt has a limit of 100 names per certificate.
const MAX_ACME_DOMAINS: usize = 100;

impl AcmeConfig {
    /// The directory URL that `directory` stands for.
    pub fn directory_url(&self) -> &str {
        match self.directory.as_str() {
            LETSENCRYPT => rustls_acme::acme::LETS_ENCRYPT_PRODUCTION_DIRECTORY,
            LETSENCRYPT_STAGING => rustls_acme::acme::LETS_ENCRYPT_STAGING_DIRECTORY,
            url => url,
        }
    }

    /// Whether certificates come from Let's Encrypt's staging CA, which nobody trusts.
    pub fn is_staging(&self) -> bool {
        self.directory_url() == rustls_acme::acme::LETS_ENCRYPT_STAGING_DIRECTORY
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let err = |key, message: String| Err(invalid(key, origin, &message));
        if self.domains.is_empty() {
            return err(
                "tls.acme.domains",
                "at least one DNS name is required when tls.mode = \"acme\"".into(),
            );
        }
        if self.domains.len() > MAX_ACME_DOMAINS {
            return err(
                "tls.acme.domains",
                format!("at most {MAX_ACME_DOMAINS} names fit in one certificate"),
            );
        }
        for domain in &self.domains {
            if let Some(problem) = acme_domain_problem(domain) {
                return err("tls.acme.domains", format!("{domain:?} {problem}"));
            }
        }
        for contact in &self.contact {
            // RFC 8555 §7.3 allows other URI schemes; Let's Encrypt accepts only mailto.
            let ok = contact
                .strip_prefix("mailto:")
                .is_some_and(|addr| addr.contains('@') && !addr.contains(char::is_whitespace));
            if !ok {
                return err(
                    "tls.acme.contact",
                    format!("{contact:?} is not like \"mailto:ops@example.com\""),
                );
            }
        }
        let url = self.directory_url();
        // RFC 8555 §6.1: ACME is spoken over HTTPS only.
        let https = url
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.scheme_str() == Some("https") && u.host().is_some_and(|h| !h.is_empty()));
        if https.is_none() {
            return err(
                "tls.acme.directory",
                format!(
                    "{url:?} is neither \"{LETSENCRYPT}\", \"{LETSENCRYPT_STAGING}\" nor an https:// URL"
                ),
            );
        }
        Ok(())
    }
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
        // A file that is not TOML at all: figment's text names the file and the line.
        return ConfigError::Parse(e.to_string());
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
    ConfigError::Parse(format!("key `{key}` ({origin}): {}", e.kind))
}

fn invalid(key: &'static str, origin: &str, message: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        origin: origin.to_owned(),
        message: message.to_owned(),
    }
}

/// Shows the length and nothing of the secret itself.
fn mask(secret: &str) -> String {
    format!("<masked, {} characters>", secret.chars().count())
}

fn toml_string(config: &Config) -> String {
    // Serialising plain data into a TOML string only fails for non-string map keys or
    // values after tables, neither of which `Config` has.
    toml::to_string_pretty(config).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("agentgate.toml");
        std::fs::write(&path, text).unwrap();
        path
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
        assert_eq!(c.tls.mode, TlsMode::SelfSigned);
        assert_eq!(c.api_keys, vec!["k1"]);
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
        assert_eq!(c.tls.mode, TlsMode::Acme);
        assert!(c.tls.acme.is_staging(), "staging is the default directory");
        assert_eq!(c.acme_cache_dir(), c.data_dir.join("acme"));
        let c = load("domains = [\"gw.example.com\"]\ndirectory = \"letsencrypt\"\n").unwrap();
        assert_eq!(
            c.tls.acme.directory_url(),
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
        assert_eq!(c.http_redirect.https_port, Some(443));
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
        assert_eq!(c.api_keys, vec!["z"]);
        assert_eq!(c.store.dir, PathBuf::from("/var/orchestrator/certs"));
        let c = Config::load_with_env(Some(&path), env_of(&[]), false).unwrap();
        assert_eq!(c.api_keys, vec!["a", "b"]);
    }

    #[test]
    fn masked_output_hides_keys() {
        let c = Config {
            api_keys: vec!["super-secret-key".into()],
            ..Config::default()
        };
        let shown = c.to_masked_toml();
        assert!(!shown.contains("super-secret-key"));
        assert!(shown.contains("<masked, 16 characters>"));
    }

    #[test]
    fn example_config_documents_every_key_with_its_default() {
        let text = include_str!("../config.example.toml");
        // Every key of the example parses (no stale names) ...
        let example: toml::Table = toml::from_str(text).unwrap();
        let mut parsed: Config = toml::from_str(text).unwrap();
        // ... and apart from the example API key, equals the built-in defaults.
        parsed.api_keys.clear();
        assert_eq!(parsed, Config::default());
        // ... and every key of the defaults appears in it.
        let defaults: toml::Table = toml::from_str(&toml_string(&Config::default())).unwrap();
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
}
