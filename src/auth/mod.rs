//! Who may use what: Bearer API keys with scopes ([`ApiKeys`]), JWTs ([`JwtVerifier`]),
//! the in-memory revocation set ([`Revocations`]), and [`authorize`], the per-route
//! decision of the gateway (`jwt`, `api_key`, `agent`, `none`).
//!
//! # Layout
//! - `api_key`: named keys with scopes, compared in constant time;
//! - `jwt`: token verification (HS256 secret, RS256/ES256/EdDSA public keys);
//! - `revocations`: revoked `jti`s, fed by token management;
//! - `tokens`: API tokens (issue, list, revoke, audit, purge; issue 10, point 4).

pub(crate) mod api_key;
pub(crate) mod jwt;
pub(crate) mod revocations;
pub(crate) mod tokens;

use std::sync::Arc;

use http::{HeaderMap, StatusCode};

pub use api_key::{ApiKey, ApiKeys, BearerError, KeyRefusal, bearer, bearer_of};
pub use jwt::{JwtKeyError, JwtVerifier, TokenError, VerifiedToken};
pub use revocations::Revocations;
pub use tokens::{ApiTokens, IssueError};

use crate::config::RouteAuth;
use crate::identity::{AgentId, Peer};

/// Who a proxied request was let through as; the access log shows it.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A route with `auth = "none"`.
    Anonymous,
    Agent(AgentId),
    Token {
        jti: Option<String>,
    },
    Key(Arc<str>),
}

impl Caller {
    /// `agent:<id>`, `jti:<id>`, `key:<name>` or `-`; never a secret.
    pub fn describe(&self) -> String {
        match self {
            Self::Anonymous => "-".to_owned(),
            Self::Agent(id) => format!("agent:{id}"),
            Self::Token { jti: Some(jti) } => format!("jti:{jti}"),
            Self::Token { jti: None } => "jti:-".to_owned(),
            Self::Key(name) => format!("key:{name}"),
        }
    }
}

/// Why a route refused a request; the upstream never sees it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("Not authenticated: send 'Authorization: Bearer <token>'")]
    MissingBearer,
    #[error(
        "more than one Authorization header field; send exactly one 'Authorization: Bearer <token>'"
    )]
    DuplicateAuthorization,
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("Invalid API key")]
    InvalidKey,
    /// The source address used up its failed API-key attempts (`limits.api_key_failures`).
    #[error(
        "too many failed API-key attempts from this address; retry after {retry_after_secs} s (limits.api_key_failures)"
    )]
    TooManyKeyFailures { retry_after_secs: u64 },
    #[error("API key lacks the scope '{0}'")]
    MissingScope(String),
    #[error("this route requires a verified agent certificate (mutual TLS)")]
    NoAgentCertificate,
}

impl AuthError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingBearer | Self::InvalidKey => StatusCode::UNAUTHORIZED,
            Self::DuplicateAuthorization => StatusCode::BAD_REQUEST,
            Self::TooManyKeyFailures { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Token(TokenError::Claim { .. }) => StatusCode::FORBIDDEN,
            Self::Token(_) => StatusCode::UNAUTHORIZED,
            Self::MissingScope(_) | Self::NoAgentCertificate => StatusCode::FORBIDDEN,
        }
    }
}

/// The route's decision for a request with `headers` from `peer`; `now` in Unix seconds.
/// An `api_key` route takes the key through [`ApiKeys::check`], the API's own check, so
/// its failed attempts count against the same per-address budget.
pub fn authorize(
    auth: &RouteAuth,
    headers: &HeaderMap,
    peer: Option<&Peer>,
    keys: &ApiKeys,
    jwt: &JwtVerifier,
    now: i64,
) -> Result<Caller, AuthError> {
    let presented = || {
        bearer_of(headers).map_err(|e| match e {
            BearerError::Missing => AuthError::MissingBearer,
            BearerError::Duplicate => AuthError::DuplicateAuthorization,
        })
    };
    match auth {
        RouteAuth::None => Ok(Caller::Anonymous),
        RouteAuth::Agent => peer
            .and_then(|p| p.identity.as_ref())
            .map(|id| Caller::Agent(id.agent_id.clone()))
            .ok_or(AuthError::NoAgentCertificate),
        RouteAuth::ApiKey { scope } => {
            let source = peer.map(|p| p.remote_addr.ip());
            let key = keys
                .check(headers, source, std::time::Instant::now())
                .map_err(|refusal| match refusal {
                    KeyRefusal::Missing => AuthError::MissingBearer,
                    KeyRefusal::Duplicate => AuthError::DuplicateAuthorization,
                    KeyRefusal::Invalid => AuthError::InvalidKey,
                    KeyRefusal::TooManyFailures { retry_after } => AuthError::TooManyKeyFailures {
                        retry_after_secs: crate::limits::retry_after_secs(retry_after),
                    },
                })?;
            if !key.allows(scope) {
                return Err(AuthError::MissingScope(scope.clone()));
            }
            Ok(Caller::Key(key.name.clone()))
        }
        RouteAuth::Jwt { claims } => {
            let token = jwt.verify(presented()?, claims, now)?;
            Ok(Caller::Token { jti: token.jti })
        }
    }
}
