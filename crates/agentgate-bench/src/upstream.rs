//! `agentgate-bench upstream`: the upstream service of the proxy benchmark, a small hyper
//! HTTP/1.1 server that answers every request at once with the same short body, so that
//! what the benchmark sees besides it is the proxy in front (agentgate or nginx).
//!
//! It listens on plain HTTP (the address the proxies forward to) and, with `--tls-listen`,
//! also with TLS, so that a client can call it directly with the same TLS work per request
//! as through a proxy: the difference between the two is the proxy's own cost.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

#[derive(clap::Args, Debug, Clone)]
pub struct UpstreamArgs {
    /// Plain HTTP listener (a loopback address; port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// A TLS listener as well (needs --cert and --key).
    #[arg(long, requires_all = ["cert", "key"])]
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for --tls-listen.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// PEM private key for --tls-listen.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Size of the response body.
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
}

/// Binds the listeners, prints `http=<addr>` (and `https=<addr>`) on one line, then serves
/// until the process is stopped.
pub async fn run(args: UpstreamArgs) -> anyhow::Result<()> {
    crate::check_loopback(args.listen)?;
    let body = Bytes::from(vec![b'x'; args.body_bytes]);
    let plain = TcpListener::bind(args.listen).await?;
    let mut line = format!("http={}", plain.local_addr()?);
    let tls = match (&args.tls_listen, &args.cert, &args.key) {
        (Some(addr), Some(cert), Some(key)) => {
            crate::check_loopback(*addr)?;
            let listener = TcpListener::bind(addr).await?;
            line.push_str(&format!(" https={}", listener.local_addr()?));
            Some((listener, acceptor(cert, key)?))
        }
        _ => None,
    };
    println!("{line}");
    if let Some((listener, acceptor)) = tls {
        let body = body.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, body) = (acceptor.clone(), body.clone());
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        serve(stream, body).await;
                    }
                });
            }
        });
    }
    loop {
        let Ok((tcp, _)) = plain.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(serve(tcp, body.clone()));
    }
}

fn acceptor(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// One keep-alive connection: every request gets `200` and `body`.
async fn serve<S>(stream: S, body: Bytes)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
        let body = body.clone();
        async move {
            let mut resp = hyper::Response::new(Full::new(body));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain"),
            );
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}
