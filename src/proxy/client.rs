//! The upstream client: one small pool of HTTP/1.1 connections per upstream, over hyper's
//! low-level `client::conn::http1`, speaking TLS for `https://` upstreams. Server
//! certificates are verified against the built-in web roots (webpki-roots) or, when
//! `[proxy] ca_file` is set, against that file alone; there is deliberately no way to skip
//! verification.
//!
//! Why not hyper-util's legacy `Client`: per request it boxed a future, hashed a
//! `(scheme, authority)` key under a global lock twice, derived `Host` from the URI and
//! spawned a task to put the connection back (about 11k instructions of the 89k a proxied
//! request cost, BENCHMARKS.md "Proxy"). Here each [`Pool`] belongs to its upstream, the
//! `Host` value is computed once, and a connection goes back into the pool as soon as the
//! response head arrives: hyper marks it ready again when it has read that response's body
//! to the end, and checkout skips it until then.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A TCP connect that takes longer than this fails (a black-holed upstream); the route's
/// `timeout_ms` still bounds the whole wait for the response head.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle pooled connections are not used after this (below the 60 s many servers use, so
/// the pool rarely picks a connection the upstream is closing).
const POOL_IDLE: Duration = Duration::from_secs(50);

/// Pooled connections kept per upstream; one returned beyond this closes the oldest
/// (nginx's `keepalive` directive caps its upstream cache the same way).
const POOL_CAP: usize = 128;

/// How often the proxy sweeps every pool for connections idle past [`POOL_IDLE`].
pub(crate) const POOL_SWEEP: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid configuration: key `proxy.ca_file` ({path}): {reason}")]
    CaFile { path: String, reason: String },
    #[error("upstream TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why an upstream request failed; the source chain carries the cause (an `io::Error`
/// for connect and TLS failures, hyper's error with the request body's error inside).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("TCP connect failed")]
    Connect(#[source] std::io::Error),
    #[error("TCP connect timed out after {} s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout,
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("HTTP/1.1 handshake failed")]
    Handshake(#[source] hyper::Error),
    #[error("request failed")]
    Request(#[source] hyper::Error),
}

impl SendError {
    /// Nothing listens at the upstream's address.
    pub fn is_connection_refused(&self) -> bool {
        matches!(self, Self::Connect(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    }

    /// The request failed because the client's body passed `limits.proxy_max_body_bytes`
    /// (the `Limited` body's error, somewhere in the chain).
    pub fn is_body_over_limit(&self) -> bool {
        let mut source: Option<&(dyn std::error::Error + 'static)> =
            std::error::Error::source(self);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return true;
            }
            source = s.source();
        }
        false
    }
}

/// Opens upstream connections (TCP, TLS for `https://`); cheap to clone. The pools live
/// in the upstreams ([`super::upstream::Upstream`]), so a route table rebuilt with an
/// unchanged upstream keeps its connections, and a removed upstream closes them.
#[derive(Clone)]
pub(crate) struct UpstreamClient {
    tls: TlsConnector,
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
    let mut tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(UpstreamClient {
        tls: TlsConnector::from(Arc::new(tls)),
    })
}

impl UpstreamClient {
    /// Sends `req` (origin-form URI) to the upstream of `pool`, on a pooled connection
    /// when one is ready, else on a new one. `Host` is the upstream's unless `req` has one.
    ///
    /// A request that a pooled connection gives back unsent (the upstream closed it just
    /// then) goes on the next one, whatever its method: it was never sent. This is the one
    /// retry hyper-util's legacy client made on its own.
    pub async fn send(
        &self,
        pool: &Pool,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut()
                .insert(header::HOST, pool.target.host_header.clone());
        }
        while let Some(mut sender) = pool.checkout(Instant::now()) {
            match sender.try_send_request(req).await {
                Ok(response) => {
                    pool.checkin(sender, Instant::now());
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(SendError::Request(e.into_error())),
                },
            }
        }
        let mut sender = self.connect(&pool.target).await?;
        let response = sender.send_request(req).await.map_err(SendError::Request)?;
        pool.checkin(sender, Instant::now());
        Ok(response)
    }

    async fn connect(&self, target: &Target) -> Result<SendRequest<Body>, SendError> {
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| SendError::ConnectTimeout)?
        .map_err(SendError::Connect)?;
        tcp.set_nodelay(true).map_err(SendError::Connect)?;
        match &target.tls {
            None => handshake(tcp).await,
            Some(Ok(name)) => {
                let tls = self
                    .tls
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(SendError::Tls)?;
                handshake(tls).await
            }
            Some(Err(reason)) => Err(SendError::Tls(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                reason.clone(),
            ))),
        }
    }
}

/// The HTTP/1.1 handshake over `io`; the connection is driven by a task of its own, with
/// upgrades, so a `101` response hands the connection to `hyper::upgrade::on`.
async fn handshake<T>(io: T) -> Result<SendRequest<Body>, SendError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(SendError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// Where an upstream's connections go, worked out once from its base URL.
struct Target {
    /// The host to connect to (an IPv6 address without its brackets).
    host: String,
    port: u16,
    /// `None` for `http://`; for `https://` the SNI name and the name the certificate must
    /// have (an IP address is fine for rustls), or why the host is no such name.
    tls: Option<Result<ServerName<'static>, String>>,
    /// `Host` for requests that do not keep the client's: the authority, without the
    /// scheme's default port (as curl and hyper-util send it).
    host_header: HeaderValue,
}

impl Target {
    fn new(base: &Uri) -> Self {
        let https = base.scheme_str() == Some("https");
        let default_port = if https { 443 } else { 80 };
        let authority_host = base.host().unwrap_or_default();
        let host = authority_host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = base.port_u16().unwrap_or(default_port);
        let host_header = if port == default_port {
            HeaderValue::from_str(authority_host)
        } else {
            HeaderValue::from_str(&format!("{authority_host}:{port}"))
        }
        // The config accepts only URLs whose authority is a valid URI authority, which is
        // a valid header value; an empty Host is what RFC 9112 §3.2 asks for otherwise.
        .unwrap_or(HeaderValue::from_static(""));
        let tls = https.then(|| ServerName::try_from(host.clone()).map_err(|e| e.to_string()));
        Self {
            host,
            port,
            tls,
            host_header,
        }
    }
}

/// The kept-alive connections to one upstream.
pub(crate) struct Pool {
    target: Target,
    /// Oldest first, so checkout takes from the end: the most recently used connection,
    /// whose upstream side is least likely to be timing out. Includes connections whose
    /// response body is still streaming (not ready yet). A std Mutex: held only to push
    /// or take, never across an `.await`.
    idle: Mutex<Vec<Idle>>,
    cap: usize,
    idle_timeout: Duration,
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

impl Pool {
    pub fn new(base: &Uri) -> Self {
        Self::with_limits(base, POOL_CAP, POOL_IDLE)
    }

    fn with_limits(base: &Uri, cap: usize, idle_timeout: Duration) -> Self {
        Self {
            target: Target::new(base),
            idle: Mutex::new(Vec::new()),
            cap,
            idle_timeout,
        }
    }

    /// The most recently used connection that is ready for a request. Closed ones and
    /// ones unused for longer than the idle time are dropped (which closes them); busy
    /// ones stay.
    fn checkout(&self, now: Instant) -> Option<SendRequest<Body>> {
        let mut idle = self.idle();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let entry = &idle[i];
            if self.is_spent(entry, now) {
                idle.remove(i);
            } else if entry.sender.is_ready() {
                return Some(idle.remove(i).sender);
            }
        }
        None
    }

    /// Puts a connection back right after its response head arrived; beyond the cap the
    /// oldest goes.
    fn checkin(&self, sender: SendRequest<Body>, now: Instant) {
        let mut idle = self.idle();
        if idle.len() >= self.cap {
            idle.remove(0);
        }
        idle.push(Idle { sender, since: now });
    }

    /// Drops the connections unused for longer than the idle time, and closed ones, with
    /// no request to trigger it (the proxy's sweep, every few seconds).
    pub fn prune(&self, now: Instant) {
        self.idle().retain(|e| !self.is_spent(e, now));
    }

    /// Closed, or unused for longer than the idle time: to be dropped, not used.
    fn is_spent(&self, entry: &Idle, now: Instant) -> bool {
        entry.sender.is_closed() || now.duration_since(entry.since) > self.idle_timeout
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        // Poisoned only by a panic while pushing or taking; the list stays usable.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::net::TcpListener;

    /// An upstream that answers every request `200` with the request body, and counts
    /// the connections it accepted and those that have ended.
    struct Counting {
        base: Uri,
        accepted: Arc<AtomicUsize>,
        ended: Arc<AtomicUsize>,
    }

    async fn counting_upstream() -> Counting {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base: Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (a, e) = (accepted.clone(), ended.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                let e = e.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: Request<Incoming>| async {
                        let body = req.into_body().collect().await?.to_bytes();
                        Ok::<_, hyper::Error>(Response::new(http_body_util::Full::new(body)))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                    e.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Counting {
            base,
            accepted,
            ended,
        }
    }

    async fn wait_until(what: &str, done: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("not within 10 s: {what}"));
    }

    fn client() -> UpstreamClient {
        build(None).unwrap()
    }

    fn post(body: &'static str) -> Request<Body> {
        Request::post("/echo").body(Body::from(body)).unwrap()
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_or_past_the_idle_time_are_closed() {
        let up = counting_upstream().await;
        let pool = Pool::with_limits(&up.base, 2, Duration::from_secs(50));
        let client = client();
        let t0 = Instant::now();
        let mut senders = Vec::new();
        for _ in 0..3 {
            senders.push(client.connect(&pool.target).await.unwrap());
        }
        for s in senders {
            pool.checkin(s, t0);
        }
        // The third one pushed the first out: the upstream sees that connection end.
        wait_until("one connection closed", || {
            up.ended.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(pool.idle().len(), 2);
        // Within the idle time they are used.
        let reused = pool
            .checkout(t0 + Duration::from_secs(50))
            .expect("a ready connection within the idle time");
        pool.checkin(reused, t0);
        assert_eq!(pool.idle().len(), 2);
        // Past it, checkout drops them, and their connections close.
        assert!(pool.checkout(t0 + Duration::from_secs(51)).is_none());
        assert_eq!(pool.idle().len(), 0);
        wait_until("all connections closed", || {
            up.ended.load(Ordering::SeqCst) == 3
        })
        .await;
        assert_eq!(up.accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn the_sweep_closes_idle_connections_without_a_request() {
        let up = counting_upstream().await;
        let pool = Pool::with_limits(&up.base, 8, Duration::from_secs(50));
        let client = client();
        let response = client.send(&pool, post("x")).await.unwrap();
        response.into_body().collect().await.unwrap();
        pool.prune(Instant::now());
        assert_eq!(pool.idle().len(), 1, "a fresh connection stays");
        pool.prune(Instant::now() + Duration::from_secs(51));
        assert_eq!(pool.idle().len(), 0);
        wait_until("the connection closed", || {
            up.ended.load(Ordering::SeqCst) == 1
        })
        .await;
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let up = counting_upstream().await;
        let pool = Pool::new(&up.base);
        let client = client();
        for i in 0..20 {
            let response = client.send(&pool, post("hello")).await.unwrap();
            assert_eq!(response.status(), 200, "request {i}");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"hello");
            // hyper marks the connection ready once its task has read the body's end.
            wait_until("the connection is ready again", || {
                pool.idle().iter().any(|e| e.sender.is_ready())
            })
            .await;
        }
        assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
    }

    /// A pooled connection that closes with the request queued but not written gives it
    /// back; the POST goes out on a new connection and its body arrives whole.
    #[tokio::test]
    async fn a_request_a_closing_connection_did_not_send_goes_on_a_new_one() {
        let up = counting_upstream().await;
        let pool = Pool::new(&up.base);
        let client = client();
        let tcp = TcpStream::connect((pool.target.host.as_str(), pool.target.port))
            .await
            .unwrap();
        let (sender, connection) = http1::handshake::<_, Body>(TokioIo::new(tcp))
            .await
            .unwrap();
        let mut connection = Box::pin(connection);
        // One poll: the connection asks for a request, so the sender is ready.
        std::future::poll_fn(|cx| {
            let _ = connection.as_mut().poll(cx);
            std::task::Poll::Ready(())
        })
        .await;
        assert!(sender.is_ready() && !sender.is_closed());
        pool.checkin(sender, Instant::now());
        let (response, ()) = tokio::join!(client.send(&pool, post("never lost")), async {
            // The request is queued on the pooled connection now; it ends unwritten.
            tokio::task::yield_now().await;
            drop(connection);
        });
        let response = response.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"never lost");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn host_header_leaves_out_the_default_port() {
        let host = |url: &str| Target::new(&url.parse().unwrap()).host_header;
        assert_eq!(host("http://a.example"), "a.example");
        assert_eq!(host("http://a.example:80/x"), "a.example");
        assert_eq!(host("https://a.example:443"), "a.example");
        assert_eq!(host("https://a.example:8443"), "a.example:8443");
        assert_eq!(host("http://[::1]:8080"), "[::1]:8080");
        let v6 = Target::new(&"https://[::1]:8443".parse().unwrap());
        assert_eq!(v6.host, "::1");
        assert!(matches!(v6.tls, Some(Ok(ServerName::IpAddress(_)))));
    }
}
