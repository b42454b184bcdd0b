//! Where the server certificate comes from: generated once (self-signed) or PEM files
//! reloaded on SIGHUP. Both sit behind a resolver whose key can be swapped while
//! connections are live. ACME (`super::acme`) brings its own resolver.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::NonEmpty;

/// Why the server certificate cannot be loaded, generated or reloaded.
#[derive(Debug, thiserror::Error)]
pub enum ServerCertError {
    #[error("{path}: {source}")]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path}: no CERTIFICATE block found")]
    NoCertificate { path: PathBuf },
    #[error("server key does not match the certificate or is unsupported: {0}")]
    Key(#[source] rustls::Error),
    #[error("generating the self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing the self-signed certificate: {0}")]
    Write(#[source] io::Error),
    #[error(transparent)]
    Acme(#[from] super::acme::AcmeSetupError),
    #[error("ACME in a cluster: {0}")]
    ClusterAcme(#[from] crate::cluster::acme::ClusterAcmeError),
}

/// A resolver holding one certificate that can be replaced atomically; handshakes in
/// progress keep the key they started with.
#[derive(Debug)]
pub struct SwappableCert {
    current: ArcSwap<CertifiedKey>,
}

impl SwappableCert {
    pub fn new(key: CertifiedKey) -> Self {
        Self {
            current: ArcSwap::from_pointee(key),
        }
    }

    pub fn replace(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Loads a PEM chain (leaf first) and its private key.
pub fn load_files(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, ServerCertError> {
    let pem_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ServerCertError::Pem { path, source }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(pem_err(cert_file))?
        .collect::<Result<_, _>>()
        .map_err(pem_err(cert_file))?;
    if chain.is_empty() {
        return Err(ServerCertError::NoCertificate {
            path: cert_file.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(pem_err(key_file))?;
    certified_key(chain, key, provider)
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, ServerCertError> {
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(ServerCertError::Key)?;
    let ck = CertifiedKey::new(chain, signing_key);
    ck.keys_match().map_err(ServerCertError::Key)?;
    Ok(ck)
}

/// The self-signed certificate for `names`, generated on first use and kept in
/// `<data_dir>/self-signed/` so that clients that pinned it keep working across restarts.
/// A kept certificate that expired or was made for other names is replaced.
pub fn self_signed(
    data_dir: &Path,
    names: &NonEmpty<String>,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, PathBuf), ServerCertError> {
    let dir = data_dir.join("self-signed");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if let Ok(ck) = load_files(&cert_path, &key_path, provider) {
        if kept_cert_fits(&ck, names) {
            return Ok((ck, cert_path));
        }
        tracing::info!(path = %cert_path.display(), "kept self-signed certificate expired or names changed; generating a new one");
    }
    let io_err = ServerCertError::Write;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names.first().clone());
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    fs::create_dir_all(&dir).map_err(io_err)?;
    crate::fsutil::write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
        .map_err(io_err)?;
    crate::fsutil::write_atomic(&cert_path, cert.pem().as_bytes(), 0o644).map_err(io_err)?;
    tracing::info!(path = %cert_path.display(), names = ?names, "generated self-signed server certificate");
    let ck = load_files(&cert_path, &key_path, provider)?;
    Ok((ck, cert_path))
}

fn kept_cert_fits(ck: &CertifiedKey, names: &[String]) -> bool {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Some(leaf) = ck.cert.first() else {
        return false;
    };
    let Ok((_, x509)) = X509Certificate::from_der(leaf) else {
        return false;
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    // Renew a month before expiry rather than serve an expired certificate one day.
    if x509.validity().not_after.timestamp() < now + 30 * 86_400 {
        return false;
    }
    let Ok(Some(san)) = x509.subject_alternative_name() else {
        return false;
    };
    let present: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::IPAddress(ip) => ip_to_string(ip),
            _ => None,
        })
        .collect();
    names
        .iter()
        .all(|n| present.iter().any(|p| normalize(p) == normalize(n)))
}

fn normalize(name: &str) -> String {
    name.parse::<std::net::IpAddr>()
        .map(|ip| ip.to_string())
        .unwrap_or_else(|_| name.to_ascii_lowercase())
}

fn ip_to_string(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).to_string()),
        _ => None,
    }
}
