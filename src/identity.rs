//! What a verified agent connection is: typed agent ids, certificate fingerprints, and the
//! identity the TLS handshake attaches to a connection.
//!
//! These are parsed once at the edge (upload body, file name, handshake) and passed around
//! as types, so no other module re-validates a string (STYLE.md, "parse, don't validate").

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest agent id we accept; 128 keeps `<id>.pem` far below every file system's name limit.
pub const MAX_AGENT_ID_LEN: usize = 128;

/// An agent id matching `^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`.
///
/// It is used as a file name (`<dir>/<agent_id>.pem`), so the first character may not be a
/// dot (no `..`, no hidden files) and no path separator or NUL can appear.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentIdError {
    #[error("agent_id must not be empty")]
    Empty,
    #[error("agent_id is {0} characters long; at most {MAX_AGENT_ID_LEN} are allowed")]
    TooLong(usize),
    #[error(
        "agent_id must start with a letter or digit and contain only letters, digits, '.', '_' and '-' (pattern ^[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}$)"
    )]
    BadCharacters,
}

impl AgentId {
    pub fn parse(s: &str) -> Result<Self, AgentIdError> {
        let bytes = s.as_bytes();
        let Some(first) = bytes.first() else {
            return Err(AgentIdError::Empty);
        };
        if s.chars().count() > MAX_AGENT_ID_LEN {
            return Err(AgentIdError::TooLong(s.chars().count()));
        }
        let ok_rest = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
        if !first.is_ascii_alphanumeric() || !bytes[1..].iter().all(ok_rest) {
            return Err(AgentIdError::BadCharacters);
        }
        Ok(Self(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for AgentId {
    type Err = AgentIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for AgentId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for AgentId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        AgentId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// SHA-256 of a certificate's DER encoding: the key of the store's handshake index.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of_der(der: &[u8]) -> Self {
        Self(crate::digest::sha256(der))
    }

    /// Lower-case hex, the form `openssl x509 -fingerprint -sha256` prints without colons.
    pub fn to_hex(&self) -> String {
        crate::digest::hex(&self.0)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

/// The agent a TLS connection proved to be, taken only from its handshake.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentIdentity {
    pub agent_id: AgentId,
    pub fingerprint: Fingerprint,
}

/// What every request on a connection learns about its peer; inserted as a request
/// extension by the server, after any client-supplied identity header was removed.
#[derive(Debug, Clone)]
pub struct Peer {
    pub remote_addr: SocketAddr,
    /// `remote_addr` as text (`ip:port`), for the access log.
    pub remote_text: std::sync::Arc<str>,
    /// The peer's IP as the `X-Forwarded-For` value the proxy sends upstream.
    pub forwarded_for: http::HeaderValue,
    /// `None` for a connection that presented no certificate, or whose certificate was
    /// deleted or replaced since the handshake.
    pub identity: Option<AgentIdentity>,
}

impl Peer {
    /// A peer at `remote_addr`, its texts made once (per connection: each request gets a
    /// clone, which shares them).
    pub fn new(remote_addr: SocketAddr, identity: Option<AgentIdentity>) -> Self {
        let ip = remote_addr.ip().to_string();
        Self {
            remote_addr,
            remote_text: remote_addr.to_string().into(),
            // An IP address is always a valid header value.
            forwarded_for: http::HeaderValue::from_str(&ip)
                .unwrap_or(http::HeaderValue::from_static("unknown")),
            identity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_id_accepts_the_documented_pattern() {
        for ok in ["07048933", "a", "A.b_c-d", "x".repeat(128).as_str(), "9..9"] {
            assert!(AgentId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn agent_id_refuses_paths_and_odd_characters() {
        assert_eq!(AgentId::parse(""), Err(AgentIdError::Empty));
        assert_eq!(
            AgentId::parse(&"x".repeat(129)),
            Err(AgentIdError::TooLong(129))
        );
        assert_eq!(
            AgentId::parse(&"x".repeat(200)),
            Err(AgentIdError::TooLong(200))
        );
        for bad in [
            "../../etc/x",
            ".hidden",
            "a/b",
            "a\\b",
            "a\0b",
            "-a",
            "_a",
            "a b",
            "é",
            "a\n",
        ] {
            assert_eq!(
                AgentId::parse(bad),
                Err(AgentIdError::BadCharacters),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn fingerprint_hex_is_sha256_of_der() {
        // SHA-256 of the empty string.
        assert_eq!(
            Fingerprint::of_der(b"").to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
