//! TLS termination: the rustls server configuration, where its certificate comes from,
//! and the agent verifier that runs inside every handshake.

pub mod server_cert;
pub mod verifier;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::ResolvesServerCert;
use rustls::{CertificateError, ServerConfig};

use crate::config::{Config, TlsMode};
use server_cert::{ServerCertError, SwappableCert};
use verifier::{AgentCertVerifier, Rejection};

/// The one crypto provider of the process (ring: no C toolchain for aws-lc-sys needed).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server certificate in use and how to refresh it.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub resolver: Arc<SwappableCert>,
    source: CertSource,
    provider: Arc<CryptoProvider>,
}

#[derive(Debug, Clone)]
enum CertSource {
    SelfSigned { path: PathBuf },
    Files { cert: PathBuf, key: PathBuf },
}

impl ServerCert {
    pub fn from_config(
        config: &Config,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, ServerCertError> {
        let (key, source) = match config.tls.mode {
            TlsMode::SelfSigned => {
                let (key, path) = server_cert::self_signed(
                    &config.data_dir,
                    &config.tls.self_signed_names,
                    &provider,
                )?;
                (key, CertSource::SelfSigned { path })
            }
            TlsMode::Files => {
                // Validation guarantees both paths in files mode.
                let cert = config.tls.cert_file.clone().unwrap_or_default();
                let key_path = config.tls.key_file.clone().unwrap_or_default();
                let key = server_cert::load_files(&cert, &key_path, &provider)?;
                (
                    key,
                    CertSource::Files {
                        cert,
                        key: key_path,
                    },
                )
            }
        };
        Ok(Self {
            resolver: Arc::new(SwappableCert::new(key)),
            source,
            provider,
        })
    }

    /// Re-reads the files (SIGHUP). On error the current certificate stays in service.
    pub fn reload(&self) -> Result<bool, ServerCertError> {
        match &self.source {
            CertSource::Files { cert, key } => {
                let fresh = server_cert::load_files(cert, key, &self.provider)?;
                self.resolver.replace(fresh);
                Ok(true)
            }
            CertSource::SelfSigned { .. } => Ok(false),
        }
    }

    /// Whether a certificate is available for handshakes (always, for these sources).
    pub fn is_ready(&self) -> bool {
        match self.source {
            CertSource::SelfSigned { .. } | CertSource::Files { .. } => true,
        }
    }

    pub fn describe(&self) -> String {
        match &self.source {
            CertSource::SelfSigned { path } => format!("self-signed ({})", path.display()),
            CertSource::Files { cert, .. } => format!("files ({})", cert.display()),
        }
    }
}

/// TLS 1.2 and 1.3 only, client auth offered through `verifier`, HTTP/1.1 by ALPN.
///
/// h2 is not offered: Socket.IO's WebSocket transport needs HTTP/1.1 Upgrade (socketioxide
/// has no RFC 8441 extended CONNECT), and a client that negotiated h2 would lose it.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    verifier: Arc<AgentCertVerifier>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A failed handshake, classified for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    UnknownCertificate,
    ExpiredCertificate,
    NotYetValidCertificate,
    BadSignature,
    OtherCertificate,
    Protocol,
    Io,
    Timeout,
}

impl HandshakeFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownCertificate => "unknown_certificate",
            Self::ExpiredCertificate => "expired_certificate",
            Self::NotYetValidCertificate => "not_yet_valid_certificate",
            Self::BadSignature => "bad_signature",
            Self::OtherCertificate => "bad_certificate",
            Self::Protocol => "protocol",
            Self::Io => "io",
            Self::Timeout => "timeout",
        }
    }

    /// Classifies the error tokio-rustls returns, with a human-readable reason.
    pub fn classify(err: &io::Error) -> (Self, String) {
        let Some(tls) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return (Self::Io, err.to_string());
        };
        match tls {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                match other.0.downcast_ref::<Rejection>() {
                    Some(r @ Rejection::Unknown(_)) => (Self::UnknownCertificate, r.to_string()),
                    None => (Self::OtherCertificate, tls.to_string()),
                }
            }
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => (Self::ExpiredCertificate, tls.to_string()),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
            ) => (Self::NotYetValidCertificate, tls.to_string()),
            rustls::Error::InvalidCertificate(
                CertificateError::BadSignature
                | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
                | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. },
            ) => (Self::BadSignature, tls.to_string()),
            rustls::Error::InvalidCertificate(_) => (Self::OtherCertificate, tls.to_string()),
            // A handshake signature that does not verify: the client does not hold the key
            // of the certificate it presented.
            rustls::Error::PeerMisbehaved(_) | rustls::Error::InvalidMessage(_) => {
                (Self::Protocol, tls.to_string())
            }
            _ => (Self::Protocol, tls.to_string()),
        }
    }

    /// Whether the peer presented a certificate we refused (as opposed to a broken or
    /// abandoned handshake, which port scanners produce by the thousand).
    pub fn is_certificate_rejection(self) -> bool {
        matches!(
            self,
            Self::UnknownCertificate
                | Self::ExpiredCertificate
                | Self::NotYetValidCertificate
                | Self::BadSignature
                | Self::OtherCertificate
        )
    }
}
