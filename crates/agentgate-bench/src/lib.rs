//! `agentgate-bench`: load generators that measure a running gateway from the outside.
//!
//! A crate of its own, beside the gateway: the client side needs a verifier that accepts
//! any server certificate (the loopback gateway's is self-signed), a WebSocket client and
//! hyper's client, none of which belongs in the binary on port 443.
//!
//! # Layout
//!
//! - [`fleet`]: `agentgate-bench fleet`, N simulated agents: certificates uploaded through
//!   the API, a connect phase at a target rate, a steady phase of heartbeats, optional
//!   commands; split over several processes (`--shards`) when one process's file
//!   descriptors do not suffice. One file per phase.
//! - [`agent`]: one simulated agent: mTLS and a WebSocket with the Engine.IO / Socket.IO
//!   framing of `agentgate-testkit` (`sio`), lean so the client costs little next to the
//!   gateway.
//! - [`handshakes`]: `agentgate-bench handshakes`, full mTLS handshakes per second against
//!   any TLS server (the gateway, or nginx as the reference).
//! - [`proxy`]: `agentgate-bench proxy`, request latency at fixed rates (open loop)
//!   against several targets in one run: an upstream directly, through agentgate, through
//!   nginx.
//! - [`upstream`]: `agentgate-bench upstream`, the small HTTP server those requests end at.
//! - [`propagation`]: `agentgate-bench propagation`, how long an upload or a deletion on
//!   one node of a cluster takes to reach another node's index.
//! - [`api`]: the HTTP API client (certificate uploads, commands).
//! - [`report`]: latency samples, percentiles, the printed table and the JSON.
//! - [`sys`]: the file-descriptor limit, source addresses in 127.0.0.0/8, and the
//!   gateway's CPU time and memory from `/proc`.
//!
//! Targets must be loopback addresses: this is a benchmark for one machine, not a load
//! tool to point at someone else's server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test and bench tooling: a failure should stop loudly

pub mod agent;
pub mod api;
pub mod fleet;
pub mod handshakes;
pub mod propagation;
pub mod proxy;
pub mod report;
pub mod sys;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use agentgate_testkit::pki::AgentCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// The server name the simulated clients send (SNI and `Host`).
pub const SERVER_NAME: &str = "localhost";

/// Refuses targets that are not on this machine.
pub fn check_loopback(target: SocketAddr) -> anyhow::Result<()> {
    anyhow::ensure!(
        target.ip().is_loopback(),
        "--target {target}: only loopback targets are allowed (this is a single-machine benchmark)"
    );
    Ok(())
}

/// A client configuration with `client_cert` (if any), without session resumption, so
/// that every connection is a full handshake, as a fleet's first connect is.
///
/// The server certificate is not checked against roots: the target is the loopback
/// gateway or nginx with a self-signed certificate. The handshake signature is still
/// verified, so the server does all the work a verifying client demands.
pub fn client_config(
    client_cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)));
    let mut config = match client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key)?,
        None => builder.with_no_client_auth(),
    };
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts any server certificate but verifies the handshake signature with it.
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A freshly generated agent certificate as the simulator uses it.
pub struct BenchCert {
    pub agent_id: String,
    pub cert_pem: String,
    pub tls: Arc<ClientConfig>,
}

/// Generates `agent_id`'s self-signed certificate (as `agentgate cert generate` does:
/// ECDSA P-256, CN = agent id, 30 days) and the client configuration that presents it.
pub fn bench_cert(agent_id: &str) -> anyhow::Result<BenchCert> {
    let cert = AgentCert::generate(agent_id, 30)
        .map_err(|e| anyhow::anyhow!("certificate for {agent_id}: {e}"))?;
    let der = CertificateDer::from(cert.der);
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("generated key: {e}"))?;
    Ok(BenchCert {
        agent_id: cert.agent_id,
        cert_pem: cert.cert_pem,
        tls: client_config(Some((der, key)))?,
    })
}
