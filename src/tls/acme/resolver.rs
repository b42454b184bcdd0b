//! The certificate resolver of the gateway's `ServerConfig` in ACME mode.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_acme::ResolvesServerCertAcme;
use tokio::sync::watch;

use super::AcmeStatus;

/// A refused handshake for want of a certificate is logged at most this often: a port
/// scanner must not flood the log, an operator must still see why clients fail.
const NO_CERT_WARNING_INTERVAL: Duration = Duration::from_secs(30);

/// The resolver of the gateway's `ServerConfig` in ACME mode: the library's, plus a log
/// line when there is no certificate to serve yet.
#[derive(Debug)]
pub(super) struct AcmeResolver {
    pub(super) acme: Arc<ResolvesServerCertAcme>,
    pub(super) status: watch::Sender<AcmeStatus>,
    /// When a refusal was last logged. A std Mutex: held for a comparison, no await.
    pub(super) last_warning: Mutex<Option<Instant>>,
}

impl ResolvesServerCert for AcmeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = self.acme.resolve(hello);
        if key.is_none() {
            self.warn_no_certificate();
        }
        key
    }
}

impl AcmeResolver {
    fn warn_no_certificate(&self) {
        let now = Instant::now();
        let Ok(mut last) = self.last_warning.lock() else {
            return;
        };
        if last.is_some_and(|t| now.duration_since(t) < NO_CERT_WARNING_INTERVAL) {
            return;
        }
        *last = Some(now);
        drop(last);
        let why = match &self.status.borrow().last_error {
            Some(e) => format!("the last order failed: {e}"),
            None => "the first order is still in progress".to_owned(),
        };
        tracing::warn!(
            "TLS handshake refused: no ACME certificate yet ({why}); further refusals are not logged for {} s",
            NO_CERT_WARNING_INTERVAL.as_secs()
        );
    }
}
