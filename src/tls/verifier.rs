//! The agent certificate verifier: a rustls `ClientCertVerifier` backed by the store.
//!
//! It departs from rustls' `WebPkiClientVerifier` in one way: there is no chain building
//! and no trust anchor. An agent's self-signed leaf is pinned: it is accepted when its
//! SHA-256 fingerprint is stored and it is inside its validity period, and the handshake
//! signature proves possession of its key (rustls' own signature functions). Client auth is
//! offered and optional: a client without a certificate completes the handshake and is
//! simply not an agent.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::identity::{AgentIdentity, Fingerprint};
use crate::store::CertStore;

#[derive(Debug)]
pub struct AgentCertVerifier {
    store: CertStore,
    algorithms: WebPkiSupportedAlgorithms,
}

/// Why a presented certificate was refused; carried through rustls to the accept loop,
/// which logs it with the peer address.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Rejection {
    #[error("certificate {0} is not in the store")]
    Unknown(Fingerprint),
}

impl AgentCertVerifier {
    pub fn new(store: CertStore, algorithms: WebPkiSupportedAlgorithms) -> Self {
        Self { store, algorithms }
    }

    /// The decision for one leaf, without the signature proof (which rustls asks for
    /// separately). Public for the benchmarks.
    pub fn decide(&self, leaf: &[u8], now: UnixTime) -> Result<AgentIdentity, CertificateError> {
        let fingerprint = Fingerprint::of_der(leaf);
        let Some(stored) = self.store.by_fingerprint(&fingerprint) else {
            // certificate_unknown: "some other issue ... rendering it unacceptable"
            // (RFC 8446 6.2); the certificate may be perfectly formed, it is just not ours.
            return Err(CertificateError::Other(OtherError(Arc::new(
                Rejection::Unknown(fingerprint),
            ))));
        };
        let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let at = |secs: i64| {
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs.max(0) as u64))
        };
        if now_secs < stored.not_before {
            return Err(CertificateError::NotValidYetContext {
                time: now,
                not_before: at(stored.not_before),
            });
        }
        if now_secs > stored.not_after {
            return Err(CertificateError::ExpiredContext {
                time: now,
                not_after: at(stored.not_after),
            });
        }
        Ok(AgentIdentity {
            agent_id: stored.agent_id.clone(),
            fingerprint,
        })
    }
}

impl ClientCertVerifier for AgentCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No CA names: agents' certificates are self-signed, and OpenSSL-based clients
        // (Python's ssl, curl) send their configured certificate without hints.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.decide(end_entity, now)
            .map(|_| ClientCertVerified::assertion())
            .map_err(rustls::Error::InvalidCertificate)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::identity::AgentId;
    use crate::store::cert;

    fn verifier_with_one_cert() -> (
        AgentCertVerifier,
        crate::store::StoredCert,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let id = AgentId::parse("boundary-1").unwrap();
        let generated = crate::certgen::generate(&id, 30).unwrap();
        let der = cert::single_certificate_der(&generated.cert_pem).unwrap();
        let stored = cert::parse_for(id, der).unwrap();
        let store = CertStore::open_with_indexed(dir.path(), vec![stored.clone()]).unwrap();
        let verifier = AgentCertVerifier::new(
            store,
            crate::tls::provider().signature_verification_algorithms,
        );
        (verifier, stored, dir)
    }

    fn at(secs: i64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(secs).unwrap()))
    }

    #[test]
    fn valid_from_not_before_through_not_after_inclusive() {
        let (verifier, stored, _dir) = verifier_with_one_cert();
        let (nb, na) = (stored.not_before, stored.not_after);
        assert!(matches!(
            verifier.decide(&stored.der, at(nb - 1)),
            Err(CertificateError::NotValidYetContext { .. })
        ));
        let identity = verifier.decide(&stored.der, at(nb)).unwrap();
        assert_eq!(identity.agent_id, stored.agent_id);
        assert_eq!(identity.fingerprint, stored.fingerprint);
        assert!(verifier.decide(&stored.der, at(na)).is_ok());
        assert!(matches!(
            verifier.decide(&stored.der, at(na + 1)),
            Err(CertificateError::ExpiredContext { .. })
        ));
    }

    #[test]
    fn a_leaf_that_is_not_stored_is_unknown_whatever_the_time() {
        let (verifier, stored, _dir) = verifier_with_one_cert();
        let other = crate::certgen::generate(&AgentId::parse("other").unwrap(), 30).unwrap();
        let der = cert::single_certificate_der(&other.cert_pem).unwrap();
        assert!(matches!(
            verifier.decide(&der, at(stored.not_before)),
            Err(CertificateError::Other(_))
        ));
    }
}
