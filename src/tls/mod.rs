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
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::acme::{ChallengeSource, ClusterAcme, ClusterAcmeSettings, Timing};
use crate::config::{AcmeConfig, ClusterConfig, Config, TlsSource};
use acme::Acme;
use server_cert::{ServerCertError, SwappableCert};
use verifier::{AgentCertVerifier, Rejection};

/// The one crypto provider of the process (ring: no C toolchain for aws-lc-sys needed).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server certificate in use and how to refresh it. Cheap to clone (every API and
/// proxied request clones the state that holds it): the source, with its paths, is shared.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub resolver: Arc<dyn ResolvesServerCert>,
    source: Arc<CertSource>,
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
    /// `mode = "acme"` with `[cluster]`: one certificate for every node, through Redis.
    /// `stop` ends the manager's tasks (they start with the gateway, before it serves).
    ClusterAcme {
        acme: ClusterAcme,
        stop: CancellationToken,
    },
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
            TlsSource::Acme(settings) => match &config.cluster {
                None => {
                    let acme = Acme::new(settings, config.listen.port(), provider.clone())?;
                    (acme.resolver(), CertSource::Acme(acme))
                }
                Some(cluster) => {
                    let stop = CancellationToken::new();
                    let acme = start_cluster_acme(settings, cluster, &provider, stop.clone())?;
                    (acme.resolver(), CertSource::ClusterAcme { acme, stop })
                }
            },
        };
        Ok(Self {
            resolver,
            source: Arc::new(source),
            provider,
        })
    }

    /// The ACME machinery, in `mode = "acme"` on a single node.
    pub fn acme(&self) -> Option<&Acme> {
        match self.source.as_ref() {
            CertSource::Acme(acme) => Some(acme),
            _ => None,
        }
    }

    /// The ACME machinery, in `mode = "acme"` with `[cluster]`.
    pub fn cluster_acme(&self) -> Option<&ClusterAcme> {
        match self.source.as_ref() {
            CertSource::ClusterAcme { acme, .. } => Some(acme),
            _ => None,
        }
    }

    /// Runs what keeps the certificate fresh (ACME orders and renewals) until `shutdown`,
    /// in tasks of `tracker` so that the gateway's drain waits for them.
    pub(crate) fn spawn_background(&self, shutdown: CancellationToken, tracker: &TaskTracker) {
        match self.source.as_ref() {
            CertSource::Acme(acme) => {
                tracker.spawn(acme.clone().run(shutdown));
            }
            CertSource::ClusterAcme { stop, .. } => {
                let stop = stop.clone();
                tracker.spawn(async move {
                    shutdown.cancelled().await;
                    stop.cancel();
                });
            }
            CertSource::SelfSigned { .. } | CertSource::Files { .. } => {}
        }
    }

    /// Whether the certificate is the generated self-signed one (no real host name).
    pub fn is_self_signed(&self) -> bool {
        matches!(*self.source, CertSource::SelfSigned { .. })
    }

    /// Re-reads the files (SIGHUP). On error the current certificate stays in service.
    pub fn reload(&self) -> Result<bool, ServerCertError> {
        match self.source.as_ref() {
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
            CertSource::SelfSigned { .. }
            | CertSource::Acme(_)
            | CertSource::ClusterAcme { .. } => Ok(false),
        }
    }

    /// Whether a certificate is available for handshakes: always for files and
    /// self-signed, once the cache or an order provided one for ACME.
    pub fn is_ready(&self) -> bool {
        match self.source.as_ref() {
            CertSource::SelfSigned { .. } | CertSource::Files { .. } => true,
            CertSource::Acme(acme) => acme.has_certificate(),
            CertSource::ClusterAcme { acme, .. } => acme.status().borrow().has_certificate(),
        }
    }

    pub fn describe(&self) -> String {
        match self.source.as_ref() {
            CertSource::SelfSigned { path } => format!("self-signed ({})", path.display()),
            CertSource::Files { cert, .. } => format!("files ({})", cert.display()),
            CertSource::Acme(acme) => acme.describe(),
            CertSource::ClusterAcme { acme, .. } => acme.describe(),
        }
    }
}

/// Starts this node's part of the cluster's ACME (DESIGN.md, "Several nodes"): the account
/// key, the certificate and the open TLS-ALPN-01 challenges live in `[cluster]`'s Redis.
/// Nothing here waits on Redis; the node serves once the certificate is there.
fn start_cluster_acme(
    settings: &AcmeConfig,
    cluster: &ClusterConfig,
    provider: &Arc<CryptoProvider>,
    stop: CancellationToken,
) -> Result<ClusterAcme, ServerCertError> {
    let client = redis::Client::open(cluster.redis_url.as_secret_str())
        .map_err(crate::cluster::acme::ClusterAcmeError::from)?;
    let settings = ClusterAcmeSettings {
        domains: settings.domains.to_vec(),
        directory_url: settings.directory.url().to_owned(),
        contact: settings.contact.clone(),
        client_config: acme::directory_client(settings, provider.clone())?,
        provider: provider.clone(),
        node_id: cluster.node_id.clone(),
        key_prefix: "agentgate".to_owned(),
        timing: Timing::default(),
    };
    Ok(ClusterAcme::start(client, settings, stop)?)
}

/// Takes TCP connections through the TLS handshake: ordinary handshakes with the gateway's
/// config, ACME TLS-ALPN-01 validation handshakes (in `acme` mode) with the challenge config.
#[derive(Clone)]
pub struct Acceptor {
    main: Arc<ServerConfig>,
    acme_challenge: Option<Challenge>,
}

/// Where a TLS-ALPN-01 validation handshake gets its certificate.
#[derive(Clone)]
enum Challenge {
    /// One node: the config rustls-acme keeps for the order in progress.
    Local(Arc<ServerConfig>),
    /// A cluster: whichever node placed the order published the challenge in Redis.
    Cluster(ChallengeSource),
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
            acme_challenge: match server_cert.source.as_ref() {
                CertSource::Acme(acme) => Some(Challenge::Local(acme.challenge_config())),
                CertSource::ClusterAcme { acme, .. } => Some(Challenge::Cluster(acme.challenge())),
                CertSource::SelfSigned { .. } | CertSource::Files { .. } => None,
            },
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
            let config = match challenge {
                Challenge::Local(config) => config.clone(),
                Challenge::Cluster(source) => {
                    let name = start.client_hello().server_name().map(str::to_owned);
                    source.config_for(name.as_deref()).await.ok_or_else(|| {
                        io::Error::other("TLS-ALPN-01 validation for a name with no open challenge")
                    })?
                }
            };
            let mut tls = start.into_stream(config).await?;
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
    // The server's cipher suite order (the provider's, strongest first) rather than the
    // client's: every suite offered is forward secret and AEAD, but a scanner (testssl.sh,
    // "cipher order") rates a client-chosen order as a finding.
    config.ignore_client_order = true;
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
