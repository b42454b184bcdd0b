//! `agentgate cert generate`: a self-signed ECDSA P-256 agent certificate (CN = agent id,
//! extended key usage clientAuth) and its key, what an operator or installer runs.

use std::path::{Path, PathBuf};

use crate::fsutil::write_atomic;
use crate::identity::{AgentId, Fingerprint};

#[derive(Debug, thiserror::Error)]
pub enum CertGenError {
    #[error("--days must be between 1 and 36500")]
    Days,
    #[error("{0} already exists; remove it or choose another --out directory")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generating the certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// A freshly generated agent certificate.
pub struct AgentCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub fingerprint: Fingerprint,
}

/// Generates the certificate in memory.
pub fn generate(agent_id: &AgentId, days: u32) -> Result<AgentCert, CertGenError> {
    if !(1..=36_500).contains(&days) {
        return Err(CertGenError::Days);
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, agent_id.as_str());
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    // Backdated a little: an agent whose clock runs behind must not see "not yet valid".
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(i64::from(days));
    let cert = params.self_signed(&key)?;
    Ok(AgentCert {
        fingerprint: Fingerprint::of_der(cert.der()),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes `<out>/<agent_id>.crt` (0644) and `<out>/<agent_id>.key` (0600); refuses to
/// overwrite either, because replacing an agent's key silently locks it out.
pub fn write(
    out: &Path,
    agent_id: &AgentId,
    cert: &AgentCert,
) -> Result<(PathBuf, PathBuf), CertGenError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertGenError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let cert_path = out.join(format!("{agent_id}.crt"));
    let key_path = out.join(format!("{agent_id}.key"));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CertGenError::Exists(p.clone()));
        }
    }
    write_atomic(&key_path, cert.key_pem.as_bytes(), 0o600).map_err(io(&key_path))?;
    write_atomic(&cert_path, cert.cert_pem.as_bytes(), 0o644).map_err(io(&cert_path))?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_certificate_passes_the_upload_rules() {
        let id = AgentId::parse("agent-7").unwrap();
        let cert = generate(&id, 30).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let stored = crate::store::cert::validate_upload("agent-7", &cert.cert_pem, now).unwrap();
        assert_eq!(stored.fingerprint, cert.fingerprint);
        assert_eq!(stored.key_type, "ECDSA P-256");
    }

    #[test]
    fn key_file_is_private_and_nothing_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let id = AgentId::parse("a1").unwrap();
        let cert = generate(&id, 1).unwrap();
        let (_, key) = write(dir.path(), &id, &cert).unwrap();
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            write(dir.path(), &id, &cert),
            Err(CertGenError::Exists(_))
        ));
        assert!(matches!(generate(&id, 0), Err(CertGenError::Days)));
    }
}
