//! The pooled upstream client: hyper-util's legacy client over an HTTP connector that
//! speaks TLS for `https://` upstreams. Server certificates are verified against the
//! built-in web roots (webpki-roots) or, when `[proxy] ca_file` is set, against that file
//! alone; there is deliberately no way to skip verification.

use std::path::Path;
use std::time::Duration;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

pub(crate) type UpstreamClient = Client<HttpsConnector<HttpConnector>, axum::body::Body>;

/// A TCP connect that takes longer than this fails (a black-holed upstream); the route's
/// `timeout_ms` still bounds the whole wait for the response head.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle pooled connections are closed after this (below the 60 s many servers use, so the
/// pool rarely picks a connection the upstream is closing).
const POOL_IDLE: Duration = Duration::from_secs(50);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid configuration: key `proxy.ca_file` ({path}): {reason}")]
    CaFile { path: String, reason: String },
    #[error("upstream TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

pub(crate) fn build(ca_file: Option<&Path>) -> Result<UpstreamClient, ClientError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let err = |reason: String| ClientError::CaFile {
                path: path.display().to_string(),
                reason,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| err(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err(e.to_string()))?;
            if certs.is_empty() {
                return Err(err("no PEM certificate in the file".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| err(e.to_string()))?;
            }
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .build(https))
}
