//! TLS termination: the rustls server configuration, where its certificate comes from
//! (self-signed, files, or [`acme`]), the agent verifier that runs inside every handshake,
//! and [`Acceptor`], which takes a TCP connection through the handshake.

pub mod acme;
pub mod server_cert;
pub mod verifier;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::ResolvesServerCert;
use rustls::{CertificateError, ServerConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::{Config, TlsSource};
use acme::Acme;
use server_cert::{ServerCertError, SwappableCert};
use verifier::{AgentCertVerifier, Rejection};

/// The one crypto provider of the process (ring: no C toolchain for aws-lc-sys needed).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server certificate in use and how to refresh it.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub resolver: Arc<dyn ResolvesServerCert>,
    source: CertSource,
    provider: Arc<CryptoProvider>,
}

#[derive(Debug, Clone)]
enum CertSource {
    SelfSigned {
        path: PathBuf,
    },
    Files {
        cert: PathBuf,
        key: PathBuf,
        swappable: Arc<SwappableCert>,
    },
    Acme(Acme),
}

impl ServerCert {
    pub fn from_config(
        config: &Config,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, ServerCertError> {
        let (resolver, source): (Arc<dyn ResolvesServerCert>, _) = match &config.tls {
            TlsSource::SelfSigned { names } => {
                let (key, path) = server_cert::self_signed(&config.data_dir, names, &provider)?;
                (
                    Arc::new(SwappableCert::new(key)),
                    CertSource::SelfSigned { path },
                )
            }
            TlsSource::Files { cert, key } => {
                let loaded = server_cert::load_files(cert, key, &provider)?;
                let swappable = Arc::new(SwappableCert::new(loaded));
                (
                    swappable.clone(),
                    CertSource::Files {
                        cert: cert.clone(),
                        key: key.clone(),
                        swappable,
                    },
                )
            }
            TlsSource::Acme(settings) => {
                let acme = Acme::new(settings, config.listen.port(), provider.clone())?;
                (acme.resolver(), CertSource::Acme(acme))
            }
        };
        Ok(Self {
            resolver,
            source,
            provider,
        })
    }

    /// The ACME machinery, in `mode = "acme"`.
    pub fn acme(&self) -> Option<&Acme> {
        match &self.source {
            CertSource::Acme(acme) => Some(acme),
            CertSource::SelfSigned { .. } | CertSource::Files { .. } => None,
        }
    }

    /// Re-reads the files (SIGHUP). On error the current certificate stays in service.
    pub fn reload(&self) -> Result<bool, ServerCertError> {
        match &self.source {
            CertSource::Files {
                cert,
                key,
                swappable,
            } => {
                let fresh = server_cert::load_files(cert, key, &self.provider)?;
                swappable.replace(fresh);
                Ok(true)
            }
            // ACME renews by itself; there is no file to re-read.
            CertSource::SelfSigned { .. } | CertSource::Acme(_) => Ok(false),
        }
    }

    /// Whether a certificate is available for handshakes: always for files and
    /// self-signed, once the cache or an order provided one for ACME.
    pub fn is_ready(&self) -> bool {
        match &self.source {
            CertSource::SelfSigned { .. } | CertSource::Files { .. } => true,
            CertSource::Acme(acme) => acme.has_certificate(),
        }
    }

    pub fn describe(&self) -> String {
        match &self.source {
            CertSource::SelfSigned { path } => format!("self-signed ({})", path.display()),
            CertSource::Files { cert, .. } => format!("files ({})", cert.display()),
            CertSource::Acme(acme) => acme.describe(),
        }
    }
}

/// Takes TCP connections through the TLS handshake: ordinary handshakes with the gateway's
/// config, ACME TLS-ALPN-01 validation handshakes (in `acme` mode) with the challenge config.
#[derive(Clone)]
pub struct Acceptor {
    main: Arc<ServerConfig>,
    acme_challenge: Option<Arc<ServerConfig>>,
}

/// The outcome of a successful [`Acceptor::accept`].
// Returned once per connection and unpacked at once: boxing the stream would cost an
// allocation per connection to save a move.
#[allow(clippy::large_enum_variant)]
pub enum Accepted {
    /// An ordinary connection, for HTTP.
    Connection(TlsStream<TcpStream>),
    /// A validation handshake of the ACME CA, answered and closed; nothing else to do.
    AcmeChallenge,
}

impl Acceptor {
    pub fn new(main: Arc<ServerConfig>, server_cert: &ServerCert) -> Self {
        Self {
            main,
            acme_challenge: server_cert.acme().map(Acme::challenge_config),
        }
    }

    /// Runs the handshake on `tcp`. The ClientHello is read first: one that offers exactly
    /// the ALPN protocol `acme-tls/1` (RFC 8737 §3) is a validation and gets the challenge
    /// certificate; any other gets the main config, agent verifier included. Errors are
    /// those of tokio-rustls, for [`HandshakeFailure::classify`].
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Accepted> {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        if let Some(challenge) = &self.acme_challenge
            && rustls_acme::is_tls_alpn_challenge(&start.client_hello())
        {
            let mut tls = start.into_stream(challenge.clone()).await?;
            // The CA needs the handshake only; a close_notify ends it politely.
            let _ = tls.shutdown().await;
            return Ok(Accepted::AcmeChallenge);
        }
        start
            .into_stream(self.main.clone())
            .await
            .map(Accepted::Connection)
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
