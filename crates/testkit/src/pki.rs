//! The test PKI, made with rcgen at test time: a CA and a server certificate for the
//! gateway, agent certificates good and bad (rustls `TestPki`), and the agent certificate
//! of a simulated agent ([`AgentCert::generate`]).
//!
//! Test helpers panic on failure (an unwrap names the broken step); only
//! [`AgentCert::generate`], which the benchmark uses, returns its error.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

pub struct TestPki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

/// An agent certificate and key as PEM, with its DER.
#[derive(Clone)]
pub struct AgentCert {
    pub agent_id: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl AgentCert {
    /// Reads a certificate/key pair made by another tool (openssl).
    pub fn from_pem(agent_id: &str, cert_pem: String, key_pem: String) -> Self {
        let der = pem::parse(&cert_pem).unwrap().into_contents();
        Self {
            agent_id: agent_id.into(),
            cert_pem,
            key_pem,
            der,
        }
    }

    /// A self-signed ECDSA P-256 certificate with CN = `agent_id`, clientAuth, valid for
    /// `days` from five minutes ago: what `agentgate cert generate` writes.
    pub fn generate(agent_id: &str, days: i64) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let mut params = agent_params(
            agent_id,
            &AgentOpts {
                cn: None,
                not_before: now - Duration::minutes(5),
                not_after: now + Duration::days(days),
            },
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key)?;
        Ok(Self {
            agent_id: agent_id.into(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }

    /// The SHA-256 fingerprint of the DER in lowercase hex, as the gateway prints it.
    pub fn fingerprint_hex(&self) -> String {
        ring::digest::digest(&ring::digest::SHA256, &self.der)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Options for an agent certificate; defaults make a good one.
pub struct AgentOpts<'a> {
    pub cn: Option<&'a str>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Default for AgentOpts<'_> {
    fn default() -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            cn: None,
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(30),
        }
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    pub fn new() -> Self {
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "agentgate test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut sp = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        sp.distinguished_name.push(DnType::CommonName, "localhost");
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = sp.signed_by(&server_key, &ca, &ca_key).unwrap();
        Self {
            ca_pem: ca.pem(),
            server_cert_pem: server.pem(),
            server_key_pem: server_key.serialize_pem(),
            ca,
            ca_key,
        }
    }

    /// A good self-signed P-256 agent certificate with CN = `agent_id`.
    pub fn agent(&self, agent_id: &str) -> AgentCert {
        self.agent_with(agent_id, AgentOpts::default())
    }

    pub fn agent_with(&self, agent_id: &str, opts: AgentOpts<'_>) -> AgentCert {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = agent_params(opts.cn.unwrap_or(agent_id), &opts);
        let cert = params.self_signed(&key).unwrap();
        AgentCert {
            agent_id: agent_id.into(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// An agent certificate issued by the test CA: not self-signed.
    pub fn ca_signed_agent(&self, agent_id: &str) -> AgentCert {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = agent_params(agent_id, &AgentOpts::default());
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        AgentCert {
            agent_id: agent_id.into(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

fn agent_params(cn: &str, opts: &AgentOpts<'_>) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = opts.not_before;
    params.not_after = opts.not_after;
    params
}

/// Runs `openssl req -x509` the way agent installers do; `newkey` is e.g. `rsa:2048` or
/// `ec -pkeyopt ec_paramgen_curve:P-256`.
pub fn openssl_self_signed(agent_id: &str, newkey: &[&str], dir: &std::path::Path) -> AgentCert {
    let key = dir.join(format!("{agent_id}.key"));
    let crt = dir.join(format!("{agent_id}.crt"));
    let mut args = vec!["req", "-x509", "-nodes", "-days", "30", "-subj"];
    let subj = format!("/CN={agent_id}");
    args.push(&subj);
    args.push("-newkey");
    args.extend_from_slice(newkey);
    let (key_s, crt_s) = (
        key.to_str().unwrap().to_owned(),
        crt.to_str().unwrap().to_owned(),
    );
    args.extend_from_slice(&["-keyout", &key_s, "-out", &crt_s]);
    let out = std::process::Command::new("openssl")
        .args(&args)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    AgentCert::from_pem(
        agent_id,
        std::fs::read_to_string(&crt).unwrap(),
        std::fs::read_to_string(&key).unwrap(),
    )
}
