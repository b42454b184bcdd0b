//! The gateway half of the configuration: `[[routes]]`, `[jwt]`, `[proxy]` and the scoped
//! entries of `api_keys`, as written (`Raw*`) and validated.
//!
//! Route prefixes may not claim a built-in path: a prefix whose first segment is one of
//! [`RESERVED_SEGMENTS`] (`/agents`, `/socket.io`, `/health`, ...) is refused at
//! validation, and the proxy never forwards a path under those segments even when a route
//! for `/` exists. So a built-in endpoint can never be shadowed, and a new built-in
//! endpoint under a reserved segment cannot silently start answering a proxied path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid_owned};

/// First path segments that belong to agentgate itself.
pub const RESERVED_SEGMENTS: [&str; 17] = [
    "agent",
    "agents",
    "cluster",
    "socket.io",
    "health",
    "ready",
    "metrics",
    "ping",
    "hello-world",
    "install-tokens",
    "routes",
    "tokens",
    "api-keys",
    ".well-known",
    // The fleet console (`crate::console`).
    "ui",
    // The OpenAPI document and Swagger UI (`crate::api::openapi`).
    "openapi.json",
    "docs",
];

/// The built-in scopes; a key listed with a scope outside these and `proxy:*` names is
/// refused (a typo would otherwise lock an operator out without a word).
pub const BUILTIN_SCOPES: [&str; 6] = [
    "agents:read",
    "agents:command",
    "certificates:write",
    "tokens:admin",
    "routes:admin",
    "proxy",
];

/// One entry of `api_keys`: a plain key (every scope), or a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawApiKey {
    Plain(String),
    Entry(RawApiKeyEntry),
}

impl From<&str> for RawApiKey {
    fn from(key: &str) -> Self {
        Self::Plain(key.to_owned())
    }
}

impl From<String> for RawApiKey {
    fn from(key: String) -> Self {
        Self::Plain(key)
    }
}

/// `{name, key | sha256 = "sha256:<hex>", scopes = [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKeyEntry {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// A validated API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyConfig {
    /// What the access log shows: the entry's `name`, or `sha256:<8 hex digits>` of a
    /// plain key.
    pub name: String,
    pub secret: KeySecret,
    pub scopes: Scopes,
}

/// The key itself, or only its SHA-256 (the config file then holds no secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySecret {
    Plain(String),
    Sha256([u8; 32]),
}

impl KeySecret {
    pub fn digest(&self) -> [u8; 32] {
        match self {
            Self::Plain(k) => crate::digest::sha256(k.as_bytes()),
            Self::Sha256(d) => *d,
        }
    }
}

/// What a key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scopes {
    /// A plain string key or `API_KEY`: everything, as before scopes existed.
    All,
    Listed(BTreeSet<String>),
}

impl Scopes {
    pub fn allows(&self, scope: &str) -> bool {
        match self {
            Self::All => true,
            Self::Listed(s) => s.contains(scope),
        }
    }
}

/// `[jwt]`: keys for routes with `auth = "jwt"`. The HS256 secret comes only from the
/// environment variable `GATEWAY_JWT_SECRET` (the replaced Traefik gateway's), never
/// from the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawJwt {
    /// Seconds of clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway_secs: u64,
    /// Public keys for RS256/ES256/EdDSA, each `{alg, pem_file, kid?}`.
    pub keys: Vec<RawJwtKey>,
    /// A JWKS file (RFC 7517) with public keys; each key needs `alg` or a key type that
    /// implies one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
}

impl Default for RawJwt {
    fn default() -> Self {
        Self {
            leeway_secs: 5,
            keys: Vec::new(),
            jwks_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwtKey {
    /// `RS256`, `ES256` or `EdDSA`.
    pub alg: String,
    pub pem_file: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
}

/// `[jwt]`, validated (the key files are read when the gateway starts, see
/// `crate::auth::jwt`).
#[derive(Debug, Clone, PartialEq)]
pub struct JwtConfig {
    pub leeway: Duration,
    /// From `GATEWAY_JWT_SECRET`; at least 1 byte.
    pub hs256_secret: Option<String>,
    pub keys: Vec<JwtKeyConfig>,
    pub jwks_file: Option<PathBuf>,
}

impl JwtConfig {
    /// Whether any key at all is configured.
    pub fn has_keys(&self) -> bool {
        self.hs256_secret.is_some() || !self.keys.is_empty() || self.jwks_file.is_some()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct JwtKeyConfig {
    pub alg: PublicKeyAlg,
    pub pem_file: PathBuf,
    pub kid: Option<String>,
}

/// The asymmetric algorithms accepted; HS256 is configured by its secret alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicKeyAlg {
    Rs256,
    Es256,
    EdDsa,
}

impl PublicKeyAlg {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "RS256" => Some(Self::Rs256),
            "ES256" => Some(Self::Es256),
            "EdDSA" => Some(Self::EdDsa),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
            Self::EdDsa => "EdDSA",
        }
    }
}

/// `[proxy]`: the upstream side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProxy {
    /// PEM CA certificate(s) trusted for `https://` upstreams instead of the built-in web
    /// roots. There is no option to skip verification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// One `[[routes]]` table as written, and the body of `POST /routes` (the same fields,
/// defaults and validation: `validate_route`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RouteSpec)]
pub struct RawRoute {
    /// 1 to 64 of `A-Z a-z 0-9 . _ -`; unique among all routes.
    #[schema(example = "prefect")]
    pub name: String,
    /// A path prefix matched on whole segments (longest wins); not under a built-in path.
    #[schema(example = "/captionacc/prefect")]
    pub prefix: String,
    /// One or more `http://` or `https://` base URLs, round-robin over the healthy ones.
    #[schema(example = json!(["http://127.0.0.1:4200"]))]
    pub upstreams: Vec<String>,
    /// Remove the prefix from the path the upstream sees (default false).
    #[serde(default)]
    pub strip_prefix: bool,
    pub auth: AuthKind,
    /// `auth = "jwt"` only: claim name -> allowed values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, Vec<String>>,
    /// 1 to 3600000 (default 30000).
    #[serde(default = "default_timeout_ms")]
    #[schema(default = 30000, minimum = 1, maximum = 3600000)]
    pub timeout_ms: u64,
    /// Retries of idempotent requests on another upstream, at most 10 (default 0).
    #[serde(default)]
    #[schema(maximum = 10)]
    pub retries: u32,
    /// Pass the client's `Host` to the upstream (default false).
    #[serde(default)]
    pub preserve_host: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<RawHealthCheck>,
    /// For `auth = "api_key"`: the scope a key needs (default `proxy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

fn default_timeout_ms() -> u64 {
    30_000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = HealthCheckSpec)]
pub struct RawHealthCheck {
    /// Appended to each upstream's base URL; a 2xx or 3xx keeps it in the rotation.
    pub path: String,
    /// 1 to 3600 (default 10).
    #[serde(default = "default_interval")]
    #[schema(default = 10, minimum = 1, maximum = 3600)]
    pub interval_secs: u64,
}

fn default_interval() -> u64 {
    10
}

/// How a route authorizes a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuthKind {
    Jwt,
    ApiKey,
    Agent,
    None,
}

impl AuthKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::ApiKey => "api_key",
            Self::Agent => "agent",
            Self::None => "none",
        }
    }
}

/// A validated route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    /// Starts with `/`, no trailing `/` (except the root route `/`), no `//`, `.` or `..`
    /// segment, no `?` or `#`.
    pub prefix: String,
    pub upstreams: Vec<http::Uri>,
    pub strip_prefix: bool,
    pub auth: RouteAuth,
    pub timeout: Duration,
    pub retries: u32,
    pub preserve_host: bool,
    pub health_check: Option<HealthCheckConfig>,
}

/// A route's authorization, carrying only what its kind needs.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteAuth {
    /// Claim name -> allowed values (the Traefik plugin's `customClaims`).
    Jwt {
        claims: BTreeMap<String, Vec<String>>,
    },
    ApiKey {
        scope: String,
    },
    Agent,
    None,
}

impl RouteAuth {
    pub fn kind(&self) -> AuthKind {
        match self {
            Self::Jwt { .. } => AuthKind::Jwt,
            Self::ApiKey { .. } => AuthKind::ApiKey,
            Self::Agent => AuthKind::Agent,
            Self::None => AuthKind::None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// Starts with `/`; appended to each upstream's base URL.
    pub path: String,
    pub interval: Duration,
}

pub(super) fn validate_api_keys(
    raw: Vec<RawApiKey>,
    origin: &str,
) -> Result<Vec<ApiKeyConfig>, ConfigError> {
    let mut keys = Vec::with_capacity(raw.len());
    let mut names = BTreeSet::new();
    for (i, entry) in raw.into_iter().enumerate() {
        let err = |message: String| invalid_owned(format!("api_keys[{i}]"), origin, message);
        let key = match entry {
            RawApiKey::Plain(key) => {
                check_plain_key(&key).map_err(|m| err(m.into()))?;
                // A plain key has no name; the first 8 hex digits of its SHA-256 tell
                // keys apart in the access log without revealing anything of the key.
                let digest = crate::digest::hex(&crate::digest::sha256(key.as_bytes()));
                ApiKeyConfig {
                    name: format!("sha256:{}", &digest[..8]),
                    secret: KeySecret::Plain(key),
                    scopes: Scopes::All,
                }
            }
            RawApiKey::Entry(e) => {
                check_name(&e.name).map_err(|m| err(format!("name {m}")))?;
                let secret = match (e.key, e.sha256) {
                    (Some(key), None) => {
                        check_plain_key(&key).map_err(|m| err(m.into()))?;
                        KeySecret::Plain(key)
                    }
                    (None, Some(digest)) => {
                        KeySecret::Sha256(parse_sha256(&digest).ok_or_else(|| {
                            err("sha256 must be \"sha256:\" and 64 hex digits".into())
                        })?)
                    }
                    _ => return Err(err("give exactly one of `key` and `sha256`".into())),
                };
                let mut scopes = BTreeSet::new();
                for scope in e.scopes {
                    if !is_known_scope(&scope) {
                        return Err(err(format!(
                            "unknown scope {scope:?}; known: {}, or proxy:<name>",
                            BUILTIN_SCOPES.join(", ")
                        )));
                    }
                    scopes.insert(scope);
                }
                ApiKeyConfig {
                    name: e.name,
                    secret,
                    scopes: Scopes::Listed(scopes),
                }
            }
        };
        if !names.insert(key.name.clone()) {
            return Err(err(format!("name {:?} is used twice", key.name)));
        }
        keys.push(key);
    }
    Ok(keys)
}

/// The names of keys and routes, which the access log and the metrics' labels show.
fn check_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(allowed) {
        return Err(format!("{name:?} must be 1 to 64 of A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

fn check_plain_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("an API key must not be empty");
    }
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("an API key must not contain whitespace or control characters");
    }
    Ok(())
}

/// `sha256:<64 hex digits>`.
pub fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn is_known_scope(scope: &str) -> bool {
    BUILTIN_SCOPES.contains(&scope)
        || scope.strip_prefix("proxy:").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        })
}

pub(super) fn validate_jwt(
    raw: RawJwt,
    secret: Option<String>,
    origin: &str,
) -> Result<JwtConfig, ConfigError> {
    if raw.leeway_secs > 3600 {
        return Err(invalid_owned(
            "jwt.leeway_secs".into(),
            origin,
            "at most 3600".into(),
        ));
    }
    if secret.as_deref() == Some("") {
        return Err(invalid_owned(
            "jwt".into(),
            "environment variable GATEWAY_JWT_SECRET",
            "GATEWAY_JWT_SECRET is set but empty".into(),
        ));
    }
    let mut keys = Vec::new();
    for (i, key) in raw.keys.into_iter().enumerate() {
        let alg = PublicKeyAlg::parse(&key.alg).ok_or_else(|| {
            invalid_owned(
                format!("jwt.keys[{i}].alg"),
                origin,
                format!("{:?} is not one of RS256, ES256, EdDSA", key.alg),
            )
        })?;
        keys.push(JwtKeyConfig {
            alg,
            pem_file: key.pem_file,
            kid: key.kid,
        });
    }
    Ok(JwtConfig {
        leeway: Duration::from_secs(raw.leeway_secs),
        hs256_secret: secret,
        keys,
        jwks_file: raw.jwks_file,
    })
}

pub(super) fn validate_routes(
    raw: Vec<RawRoute>,
    jwt: &JwtConfig,
    origin: &str,
) -> Result<Vec<RouteConfig>, ConfigError> {
    let mut routes: Vec<RouteConfig> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let err = |field: &str, message: String| {
            invalid_owned(format!("routes[{i}].{field}"), origin, message)
        };
        let route = validate_route(r, jwt).map_err(|e| err(&e.field, e.message))?;
        if routes.iter().any(|o| o.name == route.name) {
            return Err(err(
                "name",
                format!("{:?} is used by another route", route.name),
            ));
        }
        if let Some(o) = routes.iter().find(|o| o.prefix == route.prefix) {
            return Err(err(
                "prefix",
                format!(
                    "{:?} is already the prefix of route {:?}",
                    route.prefix, o.name
                ),
            ));
        }
        routes.push(route);
    }
    Ok(routes)
}

/// Why one route cannot be used: the field at fault, relative to the route
/// (`upstreams[0]`, `health_check.path`), and the rule it breaks. A `[[routes]]` entry
/// reports it as `routes[i].<field>`, `POST /routes` as a 422 detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RouteError {
    pub field: String,
    pub message: String,
}

/// Checks one route, from the configuration file or from `POST /routes` alike (uniqueness
/// among routes is the caller's: the file checks its own list, the API its store).
pub fn validate_route(r: RawRoute, jwt: &JwtConfig) -> Result<RouteConfig, RouteError> {
    let err = |field: &str, message: String| RouteError {
        field: field.to_owned(),
        message,
    };
    check_name(&r.name).map_err(|m| err("name", m))?;
    let prefix = normalize_prefix(&r.prefix).map_err(|m| err("prefix", m))?;
    if r.upstreams.is_empty() {
        return Err(err(
            "upstreams",
            "at least one upstream URL is required".into(),
        ));
    }
    let mut upstreams = Vec::with_capacity(r.upstreams.len());
    for (j, u) in r.upstreams.iter().enumerate() {
        upstreams.push(parse_upstream(u).map_err(|m| err(&format!("upstreams[{j}]"), m))?);
    }
    if r.timeout_ms == 0 || r.timeout_ms > 3_600_000 {
        return Err(err(
            "timeout_ms",
            "must be from 1 to 3600000 (one hour)".into(),
        ));
    }
    if r.retries > 10 {
        return Err(err("retries", "at most 10".into()));
    }
    let auth = match r.auth {
        AuthKind::Jwt => {
            if !jwt.has_keys() {
                return Err(err(
                    "auth",
                    "\"jwt\" needs a key: set GATEWAY_JWT_SECRET, [[jwt.keys]] or jwt.jwks_file"
                        .into(),
                ));
            }
            for (claim, values) in &r.claims {
                if values.is_empty() {
                    return Err(err(
                        "claims",
                        format!("claim {claim:?} lists no allowed value"),
                    ));
                }
            }
            RouteAuth::Jwt { claims: r.claims }
        }
        other => {
            if !r.claims.is_empty() {
                return Err(err(
                    "claims",
                    format!(
                        "only routes with auth = \"jwt\" check claims, not {:?}",
                        other.as_str()
                    ),
                ));
            }
            match other {
                AuthKind::ApiKey => {
                    let scope = r.scope.clone().unwrap_or_else(|| "proxy".to_owned());
                    if !is_known_scope(&scope) {
                        return Err(err(
                            "scope",
                            format!(
                                "{scope:?} is neither \"proxy\" nor \"proxy:<name>\" nor a built-in scope"
                            ),
                        ));
                    }
                    RouteAuth::ApiKey { scope }
                }
                AuthKind::Agent => RouteAuth::Agent,
                AuthKind::None => RouteAuth::None,
                AuthKind::Jwt => RouteAuth::Jwt {
                    claims: BTreeMap::new(),
                },
            }
        }
    };
    if r.scope.is_some() && !matches!(auth, RouteAuth::ApiKey { .. }) {
        return Err(err(
            "scope",
            "only routes with auth = \"api_key\" take a scope".into(),
        ));
    }
    let health_check = match r.health_check {
        None => None,
        Some(h) => {
            if !h.path.starts_with('/') || h.path.parse::<http::uri::PathAndQuery>().is_err() {
                return Err(err(
                    "health_check.path",
                    format!("{:?} must be a path starting with '/'", h.path),
                ));
            }
            if h.interval_secs == 0 || h.interval_secs > 3600 {
                return Err(err(
                    "health_check.interval_secs",
                    "must be from 1 to 3600".into(),
                ));
            }
            Some(HealthCheckConfig {
                path: h.path,
                interval: Duration::from_secs(h.interval_secs),
            })
        }
    };
    Ok(RouteConfig {
        name: r.name,
        prefix,
        upstreams,
        strip_prefix: r.strip_prefix,
        auth,
        timeout: Duration::from_millis(r.timeout_ms),
        retries: r.retries,
        preserve_host: r.preserve_host,
        health_check,
    })
}

/// The prefix in its one canonical form, or why it cannot be a prefix.
fn normalize_prefix(prefix: &str) -> Result<String, String> {
    if !prefix.starts_with('/') {
        return Err(format!("{prefix:?} must start with '/'"));
    }
    if prefix.contains(['?', '#', '%', ' ']) || prefix.chars().any(|c| c.is_control()) {
        return Err(format!(
            "{prefix:?} must be a plain path (no '?', '#', '%', spaces)"
        ));
    }
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".to_owned());
    }
    let segments: Vec<&str> = trimmed[1..].split('/').collect();
    if segments
        .iter()
        .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return Err(format!("{prefix:?} has an empty, '.' or '..' segment"));
    }
    if let Some(first) = segments.first()
        && RESERVED_SEGMENTS.contains(first)
    {
        return Err(format!(
            "{prefix:?} starts with /{first}, which belongs to agentgate's built-in endpoints (reserved: /{})",
            RESERVED_SEGMENTS.join(", /")
        ));
    }
    Ok(trimmed.to_owned())
}

fn parse_upstream(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("{url:?} must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("{url:?} must not have a query string"));
    }
    if url.contains('@') {
        return Err(format!("{url:?} must not carry credentials"));
    }
    Ok(uri)
}

/// The route as written, for `check-config`.
pub fn route_to_raw(r: &RouteConfig) -> RawRoute {
    let (claims, scope) = match &r.auth {
        RouteAuth::Jwt { claims } => (claims.clone(), None),
        RouteAuth::ApiKey { scope } => (BTreeMap::new(), Some(scope.clone())),
        RouteAuth::Agent | RouteAuth::None => (BTreeMap::new(), None),
    };
    RawRoute {
        name: r.name.clone(),
        prefix: r.prefix.clone(),
        upstreams: r
            .upstreams
            .iter()
            .map(|u| u.to_string().trim_end_matches('/').to_owned())
            .collect(),
        strip_prefix: r.strip_prefix,
        auth: r.auth.kind(),
        claims,
        timeout_ms: r.timeout.as_millis().try_into().unwrap_or(u64::MAX),
        retries: r.retries,
        preserve_host: r.preserve_host,
        health_check: r.health_check.as_ref().map(|h| RawHealthCheck {
            path: h.path.clone(),
            interval_secs: h.interval.as_secs(),
        }),
        scope,
    }
}

pub fn api_key_to_raw(k: &ApiKeyConfig) -> RawApiKey {
    match (&k.secret, &k.scopes) {
        (KeySecret::Plain(key), Scopes::All) => RawApiKey::Plain(key.clone()),
        (secret, scopes) => RawApiKey::Entry(RawApiKeyEntry {
            name: k.name.clone(),
            key: match secret {
                KeySecret::Plain(key) => Some(key.clone()),
                KeySecret::Sha256(_) => None,
            },
            sha256: match secret {
                KeySecret::Plain(_) => None,
                KeySecret::Sha256(d) => Some(format!("sha256:{}", crate::digest::hex(d))),
            },
            scopes: match scopes {
                Scopes::All => BUILTIN_SCOPES.iter().map(|s| (*s).to_owned()).collect(),
                Scopes::Listed(s) => s.iter().cloned().collect(),
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_normalized_and_reserved_segments_refused() {
        assert_eq!(normalize_prefix("/a/b/").unwrap(), "/a/b");
        assert_eq!(normalize_prefix("/").unwrap(), "/");
        for bad in [
            "a",
            "/a//b",
            "/a/../b",
            "/agents",
            "/socket.io/x",
            "/ping",
            "/ui",
            "/ui/x",
            "/docs",
            "/docs/x",
            "/openapi.json",
            "/a?b",
        ] {
            assert!(normalize_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sha256_keys_parse() {
        let d = crate::digest::sha256(b"k");
        let s = format!("sha256:{}", crate::digest::hex(&d));
        assert_eq!(parse_sha256(&s), Some(d));
        assert_eq!(parse_sha256("sha256:zz"), None);
        assert_eq!(parse_sha256(&crate::digest::hex(&d)), None);
    }
}
