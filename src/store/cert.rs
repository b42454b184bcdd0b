//! Parsing agent certificates and the upload rules of DESIGN.md ("The certificate store").
//!
//! The same parser reads uploads and files adopted from disk; only uploads get the strict
//! rules (self-signed, currently valid), because a directory written by the system we
//! replace may hold certificates that never passed them and must still load.

use std::sync::{Arc, OnceLock};

use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::pem::Pem;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::clock::rfc3339_unix;
use crate::identity::{AgentId, AgentIdError, Fingerprint};

/// Smallest RSA modulus we store: NIST SP 800-131A disallows anything below 2048 bits.
pub const MIN_RSA_BITS: usize = 2048;

/// One stored agent certificate, with what the verifier and the API need precomputed.
#[derive(Debug, Clone)]
pub struct StoredCert {
    pub agent_id: AgentId,
    pub fingerprint: Fingerprint,
    pub der: Arc<[u8]>,
    /// RFC 4514 form, e.g. `CN=07048933`.
    pub subject: String,
    /// Unix seconds, inclusive bounds of the validity period.
    pub not_before: i64,
    pub not_after: i64,
    /// `ECDSA P-256`, `RSA 2048`, ...: shown by the API and in logs.
    pub key_type: String,
    /// Whether the certificate's signature verifies with its own key; see
    /// [`StoredCert::self_signed`].
    self_signed: OnceLock<bool>,
}

/// Two stored certificates are the same when they are the same DER for the same agent:
/// every other field is derived from those two, and the `self_signed` cache must not make
/// a certificate differ from itself before and after the API first looked at it.
impl PartialEq for StoredCert {
    fn eq(&self, other: &Self) -> bool {
        self.agent_id == other.agent_id && self.der == other.der
    }
}

impl Eq for StoredCert {}

impl StoredCert {
    /// Whether the certificate's signature verifies with its own key. Uploads are checked
    /// at once (a rule of DESIGN.md); for files loaded at start-up it is worked out the
    /// first time the API shows it: the ECDSA check is about 90 % of the cost of loading
    /// a file, and the handshake never needs it.
    pub fn self_signed(&self) -> bool {
        *self.self_signed.get_or_init(|| {
            parse_x509(&self.der).is_ok_and(|x509| x509.verify_signature(None).is_ok())
        })
    }

    /// The canonical PEM that the file backend writes.
    pub fn to_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.der)
    }
}

/// Why a certificate was refused. The `Display` text is the API's `detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("invalid agent_id: {0}")]
    AgentId(#[from] AgentIdError),
    #[error(
        "the upload contains a private key; send only the certificate (the private key never leaves the agent)"
    )]
    PrivateKey,
    #[error("invalid PEM: {0}")]
    InvalidPem(String),
    #[error("the PEM block is a '{0}', not a 'CERTIFICATE'")]
    NotACertificate(String),
    #[error("expected exactly one certificate, found {0}")]
    MultipleCertificates(usize),
    #[error("not a valid X.509 certificate: {0}")]
    InvalidX509(String),
    #[error("certificate subject has no CN (common name)")]
    NoCommonName,
    #[error(
        "certificate subject must hold exactly one CN (common name), found {0}: the agent identity would be ambiguous"
    )]
    MultipleCommonNames(usize),
    #[error("Agent ID mismatch: provided '{provided}' but certificate CN is '{cn}'")]
    CnMismatch { provided: String, cn: String },
    #[error(
        "certificate is not self-signed: its signature does not verify with its own key (issuer '{issuer}')"
    )]
    NotSelfSigned { issuer: String },
    #[error("certificate has expired (notAfter {0})")]
    Expired(String),
    #[error("certificate is not yet valid (notBefore {0})")]
    NotYetValid(String),
    #[error("RSA key of {0} bits is too weak; at least {MIN_RSA_BITS} bits are required")]
    WeakRsaKey(usize),
    #[error(
        "unsupported public key type {0}; use ECDSA P-256/P-384, Ed25519 or RSA of at least {MIN_RSA_BITS} bits"
    )]
    UnsupportedKey(String),
    #[error("certificate cannot be used for TLS client authentication: {0}")]
    UnusableForTls(String),
}

/// Parses and checks an uploaded certificate for `agent_id` against every upload rule.
pub fn validate_upload(agent_id: &str, pem: &str, now_unix: i64) -> Result<StoredCert, CertError> {
    let agent_id = AgentId::parse(agent_id)?;
    // Checked on the raw text first so that a key is refused whatever shape it comes in
    // (PKCS#1, PKCS#8, encrypted, or a block our PEM reader would not even recognise).
    if pem.contains("PRIVATE KEY") {
        return Err(CertError::PrivateKey);
    }
    let der = single_certificate_der(pem)?;
    let cert = parse_for(agent_id, der)?;
    if !cert.self_signed() {
        let issuer = parse_x509(&cert.der)?.issuer().to_string();
        return Err(CertError::NotSelfSigned { issuer });
    }
    if now_unix < cert.not_before {
        return Err(CertError::NotYetValid(rfc3339_unix(cert.not_before)));
    }
    if now_unix > cert.not_after {
        return Err(CertError::Expired(rfc3339_unix(cert.not_after)));
    }
    Ok(cert)
}

/// Parses a certificate stored for `agent_id` (upload or adopted file): one X.509
/// certificate whose CN is `agent_id`, with a key the handshake can verify.
pub fn parse_for(agent_id: AgentId, der: Vec<u8>) -> Result<StoredCert, CertError> {
    let x509 = parse_x509(&der)?;
    let cn = common_name(&x509)?;
    if cn != agent_id.as_str() {
        return Err(CertError::CnMismatch {
            provided: agent_id.to_string(),
            cn,
        });
    }
    let key_type = check_key(&x509)?;
    // The verifier hands the leaf to rustls' signature check, which parses it with webpki;
    // refusing here what webpki cannot parse keeps an accepted upload from failing later
    // in every handshake with an opaque error.
    webpki::EndEntityCert::try_from(&rustls::pki_types::CertificateDer::from(der.as_slice()))
        .map_err(|e| CertError::UnusableForTls(format!("{e:?}")))?;
    let subject = x509.subject().to_string();
    let not_before = x509.validity().not_before.timestamp();
    let not_after = x509.validity().not_after.timestamp();
    drop(x509);
    Ok(StoredCert {
        fingerprint: Fingerprint::of_der(&der),
        agent_id,
        der: der.into(),
        subject,
        not_before,
        not_after,
        key_type,
        self_signed: OnceLock::new(),
    })
}

/// Extracts the DER of the one certificate in `pem`, refusing anything else.
pub fn single_certificate_der(pem: &str) -> Result<Vec<u8>, CertError> {
    let mut certs = Vec::new();
    for block in Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| CertError::InvalidPem(e.to_string()))?;
        if block.label != "CERTIFICATE" {
            return Err(CertError::NotACertificate(block.label));
        }
        certs.push(block.contents);
    }
    match certs.len() {
        0 => Err(CertError::InvalidPem(
            "no '-----BEGIN CERTIFICATE-----' block found".into(),
        )),
        1 => Ok(certs.remove(0)),
        n => Err(CertError::MultipleCertificates(n)),
    }
}

fn parse_x509(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    match X509Certificate::from_der(der) {
        Ok((rest, _)) if !rest.is_empty() => Err(CertError::InvalidX509(format!(
            "{} unexpected bytes after the certificate",
            rest.len()
        ))),
        Ok((_, cert)) => Ok(cert),
        Err(e) => Err(CertError::InvalidX509(e.to_string())),
    }
}

/// The one CN of the subject. A second CN is refused rather than ignored: software that
/// reads the last CN (or all of them) would see another agent than the one we stored.
fn common_name(cert: &X509Certificate<'_>) -> Result<String, CertError> {
    let mut cns = cert.subject().iter_common_name();
    let cn = cns.next().ok_or(CertError::NoCommonName)?;
    let extra = cns.count();
    if extra > 0 {
        return Err(CertError::MultipleCommonNames(1 + extra));
    }
    cn.as_str()
        .map(str::to_owned)
        .map_err(|_| CertError::InvalidX509("the CN is not a text string".into()))
}

/// Accepts the key types rustls can verify a handshake signature with.
fn check_key(cert: &X509Certificate<'_>) -> Result<String, CertError> {
    let spki = cert.public_key();
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => return Err(CertError::InvalidX509("malformed RSA public key".into())),
        };
        if bits < MIN_RSA_BITS {
            return Err(CertError::WeakRsaKey(bits));
        }
        return Ok(format!("RSA {bits}"));
    }
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => Ok("ECDSA P-256".into()),
            Some(c) if c == OID_NIST_EC_P384 => Ok("ECDSA P-384".into()),
            Some(c) => Err(CertError::UnsupportedKey(format!("EC curve {c}"))),
            None => Err(CertError::UnsupportedKey(
                "EC key without a named curve".into(),
            )),
        };
    }
    if *alg == OID_SIG_ED25519 {
        return Ok("Ed25519".into());
    }
    Err(CertError::UnsupportedKey(alg.to_id_string()))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
