//! Server certificates over ACME (RFC 8555) with rustls-acme: ordered for
//! `tls.acme.domains` from Let's Encrypt or any ACME CA, validated with TLS-ALPN-01
//! (RFC 8737) on the gateway's own listener, kept in `cache_dir`, renewed in the background.
//!
//! rustls-acme's `AcmeState` is a stream: nothing is ordered or renewed unless it is
//! polled. [`Acme::run`] polls it in a task of the gateway, logs every event and keeps an
//! [`AcmeStatus`]. The timing is the library's (0.15.4, `state.rs`): a certificate is
//! renewed once two thirds of its lifetime have passed (30 days before expiry for Let's
//! Encrypt's 90 days); a failed order is retried after 1 s, 2 s, 4 s ..., doubling up to
//! 2^16 s (about 18 h); the certificate in service stays in service meanwhile.
//!
//! The certificate resolver goes into the gateway's own `ServerConfig`, so the agent
//! verifier runs on every ordinary handshake as in the other modes. Validation handshakes
//! (ALPN `acme-tls/1` and nothing else) are recognised before a config is chosen
//! ([`super::Acceptor`]) and answered with the challenge config, which asks for no client
//! certificate and has no HTTP behind it.

//!
//! # Layout
//!
//! - this file: [`Acme`] (setup, status), [`CertificateInfo`];
//! - `order`: the task that polls the state (orders, renewals, events, logs);
//! - `resolver`: the certificate resolver of the gateway's `ServerConfig`;
//! - `cache`: the cache directory (rustls-acme `DirCache` naming);
//! - `report`: what `check-config` prints;
//! - `problem`: the CA's problem documents in words.

mod cache;
mod order;
mod problem;
mod report;
mod resolver;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use rustls::server::ResolvesServerCert;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_acme::AcmeState;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::config::AcmeConfig;
use cache::{AcmeCache, ensure_private_dir};
use resolver::AcmeResolver;

pub use problem::describe_order_error;
pub use report::report;

type State = AcmeState<io::Error, io::Error>;
type Event = rustls_acme::Event<io::Error, io::Error>;

/// A configuration that cannot start ACME, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum AcmeSetupError {
    #[error("tls.acme.directory_ca_file {path}: {source}")]
    DirectoryCaPem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("tls.acme.directory_ca_file {path}: no CERTIFICATE block found")]
    DirectoryCaEmpty { path: PathBuf },
    #[error("tls.acme.directory_ca_file {path}: not a usable root certificate: {source}")]
    DirectoryCaRoot {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("tls.acme.cache_dir {path}: {source}")]
    CacheDir { path: PathBuf, source: io::Error },
    #[error("ACME client TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// An ACME-managed server certificate: the resolver for the gateway's `ServerConfig`, the
/// config for validation handshakes, and the state that [`Acme::run`] polls.
/// Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Acme {
    shared: Arc<Shared>,
}

struct Shared {
    domains: Vec<String>,
    directory_url: String,
    staging: bool,
    listen_port: u16,
    cache: AcmeCache,
    resolver: Arc<AcmeResolver>,
    challenge_config: Arc<ServerConfig>,
    /// Taken by the first `run`. A std Mutex: locked only to take it, never across an await.
    state: Mutex<Option<State>>,
    status: watch::Sender<AcmeStatus>,
}

/// What the ACME task knows, for logs and for whoever embeds the gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcmeStatus {
    /// The certificate in service; `None` until the cache or an order provides one.
    pub certificate: Option<CertificateInfo>,
    /// Certificates this process obtained from the CA (first issue and renewals).
    pub issued: u64,
    /// Orders that failed in this process.
    pub failed_orders: u64,
    /// Failed orders since the last success; the next retry waits `2^(n-1)` seconds.
    pub consecutive_failures: u32,
    /// The last error, as logged.
    pub last_error: Option<String>,
}

/// A certificate from the ACME cache or from an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    pub origin: CertOrigin,
    /// Serial number as colon-separated hex (as `openssl x509 -serial` shows it, in lower case).
    pub serial: String,
    /// DNS names of the subject alternative name extension.
    pub names: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertOrigin {
    /// Read from the cache at start-up: no order was placed for it.
    Cache,
    /// Issued by the CA to this process.
    Issued,
}

impl CertificateInfo {
    /// When the library orders a replacement: two thirds into the lifetime (rustls-acme
    /// 0.15.4, `AcmeState::process_cert`).
    pub fn renew_at(&self) -> OffsetDateTime {
        let at: OffsetDateTime = self.not_after - (self.not_after - self.not_before) / 3;
        // Whole seconds, as in the certificate; the library's timer is no finer in effect.
        at.replace_nanosecond(0).unwrap_or(at)
    }

    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

impl fmt::Debug for Acme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acme")
            .field("domains", &self.shared.domains)
            .field("directory", &self.shared.directory_url)
            .field("cache_dir", &self.shared.cache.dir)
            .finish_non_exhaustive()
    }
}

impl Acme {
    /// Prepares ACME for the validated `[tls.acme]` of a gateway listening on
    /// `listen_port` (for the port-443 reminder): creates the cache
    /// directory (mode 0700: it holds private keys) and the HTTPS client for the directory.
    /// Nothing is fetched until [`Acme::run`] polls.
    pub fn new(
        settings: &AcmeConfig,
        listen_port: u16,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, AcmeSetupError> {
        let cache_dir = settings.cache_dir.clone();
        ensure_private_dir(&cache_dir).map_err(|source| AcmeSetupError::CacheDir {
            path: cache_dir.clone(),
            source,
        })?;
        let client = directory_client(settings, provider.clone())?;
        let cache = AcmeCache::new(cache_dir);
        let directory_url = settings.directory.url().to_owned();
        let state: State =
            rustls_acme::AcmeConfig::new_with_client_config(&settings.domains, client)
                .contact(&settings.contact)
                .directory(&directory_url)
                .cache(cache.clone())
                .state();
        let challenge_config = state.challenge_rustls_config_with_provider(provider);
        let status = watch::Sender::new(AcmeStatus::default());
        let resolver = Arc::new(AcmeResolver {
            acme: state.resolver(),
            status: status.clone(),
            last_warning: Mutex::new(None),
        });
        Ok(Self {
            shared: Arc::new(Shared {
                domains: settings.domains.to_vec(),
                directory_url,
                staging: settings.directory.is_staging(),
                listen_port,
                cache,
                resolver,
                challenge_config,
                state: Mutex::new(Some(state)),
                status,
            }),
        })
    }

    /// The resolver for the gateway's `ServerConfig`: the current certificate, or none
    /// (the handshake fails and a warning says why).
    pub fn resolver(&self) -> Arc<dyn ResolvesServerCert> {
        self.shared.resolver.clone()
    }

    /// The config for TLS-ALPN-01 validation handshakes (no client auth, ALPN `acme-tls/1`).
    pub fn challenge_config(&self) -> Arc<ServerConfig> {
        self.shared.challenge_config.clone()
    }

    /// Follows the status; `borrow()` reads it, `wait_for` waits for a condition.
    pub fn status(&self) -> watch::Receiver<AcmeStatus> {
        self.shared.status.subscribe()
    }

    /// Whether handshakes get a certificate (from the cache or an order).
    pub fn has_certificate(&self) -> bool {
        self.shared.status.borrow().certificate.is_some()
    }

    pub fn describe(&self) -> String {
        format!(
            "acme ({}; directory {}; cache {})",
            self.shared.domains.join(", "),
            self.shared.directory_url,
            self.shared.cache.dir.display()
        )
    }
}

/// The HTTPS client for the ACME directory: the web PKI roots, plus
/// `tls.acme.directory_ca_file` when set (a private CA, Pebble in the tests).
pub fn directory_client(
    settings: &AcmeConfig,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>, AcmeSetupError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &settings.directory_ca_file {
        add_pem_roots(&mut roots, path)?;
    }
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(client))
}

fn add_pem_roots(roots: &mut RootCertStore, path: &Path) -> Result<(), AcmeSetupError> {
    let pem_err = |source| AcmeSetupError::DirectoryCaPem {
        path: path.to_owned(),
        source,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<_, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(AcmeSetupError::DirectoryCaEmpty {
            path: path.to_owned(),
        });
    }
    for cert in certs {
        roots
            .add(cert)
            .map_err(|source| AcmeSetupError::DirectoryCaRoot {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(())
}

/// Why a cached or issued certificate cannot be described.
#[derive(Debug, thiserror::Error)]
pub enum CertInfoError {
    #[error("bad PEM: {0}")]
    Pem(#[from] pem::PemError),
    #[error("no CERTIFICATE block")]
    NoCertificate,
    #[error("bad certificate: {0}")]
    X509(#[from] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("validity out of range: {0}")]
    Time(#[from] time::error::ComponentRange),
    #[error("no certificate passed through the cache")]
    NothingCached,
    #[error("cache bookkeeping poisoned")]
    Poisoned,
}

/// Describes the cached certificate: the PEM the library writes is the private key
/// followed by the chain, leaf first.
pub fn certificate_info(pem: &[u8], origin: CertOrigin) -> Result<CertificateInfo, CertInfoError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let blocks = pem::parse_many(pem)?;
    let leaf = blocks
        .iter()
        .find(|b| b.tag() == "CERTIFICATE")
        .ok_or(CertInfoError::NoCertificate)?;
    let (_, x509) = X509Certificate::from_der(leaf.contents())?;
    let time = |t: x509_parser::time::ASN1Time| OffsetDateTime::from_unix_timestamp(t.timestamp());
    let names = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(CertificateInfo {
        origin,
        serial: x509.raw_serial_as_string(),
        names,
        not_before: time(x509.validity().not_before)?,
        not_after: time(x509.validity().not_after)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_info_reads_the_cache_format() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["gw.example.com".into()]).unwrap();
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        params.not_before = now - time::Duration::days(30);
        params.not_after = now + time::Duration::days(60);
        let cert = params.self_signed(&key).unwrap();
        let pem = format!("{}\n{}", key.serialize_pem(), cert.pem());
        let info = certificate_info(pem.as_bytes(), CertOrigin::Cache).unwrap();
        assert_eq!(info.names, vec!["gw.example.com"]);
        assert_eq!(info.not_after, now + time::Duration::days(60));
        assert_eq!(info.renew_at(), now + time::Duration::days(30));
        assert!(info.is_valid_at(now));
        assert!(certificate_info(b"garbage", CertOrigin::Cache).is_err());
    }
}
