//! Server certificates over ACME (RFC 8555) with rustls-acme: ordered for
//! `tls.acme.domains` from Let's Encrypt or any ACME CA, validated with TLS-ALPN-01
//! (RFC 8737) on the gateway's own listener, kept in `cache_dir`, renewed in the background.
//!
//! rustls-acme's `AcmeState` is a stream: nothing is ordered or renewed unless it is
//! polled. [`Acme::run`] polls it in a task of the gateway, logs every event and keeps an
//! [`AcmeStatus`]. The timing is the library's (0.15.4, `state.rs`): a certificate is
//! renewed once two thirds of its lifetime have passed (30 days before expiry for Let's
//! Encrypt's 90 days); a failed order is retried after 1 s, 2 s, 4 s ..., doubling up to
//! 2^16 s (about 18 h); the certificate in service stays in service meanwhile.
//!
//! The certificate resolver goes into the gateway's own `ServerConfig`, so the agent
//! verifier runs on every ordinary handshake as in the other modes. Validation handshakes
//! (ALPN `acme-tls/1` and nothing else) are recognised before a config is chosen
//! ([`super::Acceptor`]) and answered with the challenge config, which asks for no client
//! certificate and has no HTTP behind it.

use std::fmt;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use base64::prelude::BASE64_URL_SAFE_NO_PAD;
use futures_util::StreamExt;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_acme::acme::{AuthStatus, Identifier, Problem};
use rustls_acme::{
    AccountCache, AcmeState, CertCache, EventError, EventOk, OrderError, ResolvesServerCertAcme,
};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::clock::rfc3339;
use crate::config::Config;

/// The library backs off `1 << n` seconds after the n-th consecutive failed order
/// (n from 0), with n capped at 16 (rustls-acme 0.15.4, `AcmeState::poll_next_infinite`).
const MAX_BACKOFF_EXPONENT: u32 = 16;

/// A refused handshake for want of a certificate is logged at most this often: a port
/// scanner must not flood the log, an operator must still see why clients fail.
const NO_CERT_WARNING_INTERVAL: Duration = Duration::from_secs(30);

/// Longest single sleep of the renewal reminder. `renew_at` is wall-clock time and
/// timers run on the monotonic clock: waking daily keeps the two from drifting apart
/// over the months between renewals.
const MAX_TIMER: Duration = Duration::from_secs(86_400);

type State = AcmeState<io::Error, io::Error>;
type Event = rustls_acme::Event<io::Error, io::Error>;

/// A configuration that cannot start ACME, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum AcmeSetupError {
    #[error("tls.acme.directory_ca_file {path}: {message}")]
    DirectoryCa { path: PathBuf, message: String },
    #[error("tls.acme.cache_dir {path}: {source}")]
    CacheDir { path: PathBuf, source: io::Error },
    #[error("ACME client TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// An ACME-managed server certificate: the resolver for the gateway's `ServerConfig`, the
/// config for validation handshakes, and the state that [`Acme::run`] polls.
/// Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Acme {
    shared: Arc<Shared>,
}

struct Shared {
    domains: Vec<String>,
    directory_url: String,
    staging: bool,
    listen_port: u16,
    cache: AcmeCache,
    resolver: Arc<AcmeResolver>,
    challenge_config: Arc<ServerConfig>,
    /// Taken by the first `run`. A std Mutex: locked only to take it, never across an await.
    state: Mutex<Option<State>>,
    status: watch::Sender<AcmeStatus>,
}

/// What the ACME task knows, for logs and for whoever embeds the gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcmeStatus {
    /// The certificate in service; `None` until the cache or an order provides one.
    pub certificate: Option<CertificateInfo>,
    /// Certificates this process obtained from the CA (first issue and renewals).
    pub issued: u64,
    /// Orders that failed in this process.
    pub failed_orders: u64,
    /// Failed orders since the last success; the next retry waits `2^(n-1)` seconds.
    pub consecutive_failures: u32,
    /// The last error, as logged.
    pub last_error: Option<String>,
}

/// A certificate from the ACME cache or from an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    pub origin: CertOrigin,
    /// Serial number as colon-separated hex (as `openssl x509 -serial` shows it, in lower case).
    pub serial: String,
    /// DNS names of the subject alternative name extension.
    pub names: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertOrigin {
    /// Read from the cache at start-up: no order was placed for it.
    Cache,
    /// Issued by the CA to this process.
    Issued,
}

impl CertificateInfo {
    /// When the library orders a replacement: two thirds into the lifetime (rustls-acme
    /// 0.15.4, `AcmeState::process_cert`).
    pub fn renew_at(&self) -> OffsetDateTime {
        let at: OffsetDateTime = self.not_after - (self.not_after - self.not_before) / 3;
        // Whole seconds, as in the certificate; the library's timer is no finer in effect.
        at.replace_nanosecond(0).unwrap_or(at)
    }

    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

impl fmt::Debug for Acme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acme")
            .field("domains", &self.shared.domains)
            .field("directory", &self.shared.directory_url)
            .field("cache_dir", &self.shared.cache.dir)
            .finish_non_exhaustive()
    }
}

impl Acme {
    /// Prepares ACME for a validated configuration in `mode = "acme"`: creates the cache
    /// directory (mode 0700: it holds private keys) and the HTTPS client for the directory.
    /// Nothing is fetched until [`Acme::run`] polls.
    pub fn new(config: &Config, provider: Arc<CryptoProvider>) -> Result<Self, AcmeSetupError> {
        let settings = &config.tls.acme;
        let cache_dir = config.acme_cache_dir();
        ensure_private_dir(&cache_dir).map_err(|source| AcmeSetupError::CacheDir {
            path: cache_dir.clone(),
            source,
        })?;
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &settings.directory_ca_file {
            add_pem_roots(&mut roots, path)?;
        }
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let cache = AcmeCache::new(cache_dir);
        let directory_url = settings.directory_url().to_owned();
        let state: State =
            rustls_acme::AcmeConfig::new_with_client_config(&settings.domains, Arc::new(client))
                .contact(&settings.contact)
                .directory(&directory_url)
                .cache(cache.clone())
                .state();
        let challenge_config = state.challenge_rustls_config_with_provider(provider);
        let status = watch::Sender::new(AcmeStatus::default());
        let resolver = Arc::new(AcmeResolver {
            acme: state.resolver(),
            status: status.clone(),
            last_warning: Mutex::new(None),
        });
        Ok(Self {
            shared: Arc::new(Shared {
                domains: settings.domains.clone(),
                directory_url,
                staging: settings.is_staging(),
                listen_port: config.listen.port(),
                cache,
                resolver,
                challenge_config,
                state: Mutex::new(Some(state)),
                status,
            }),
        })
    }

    /// The resolver for the gateway's `ServerConfig`: the current certificate, or none
    /// (the handshake fails and a warning says why).
    pub fn resolver(&self) -> Arc<dyn ResolvesServerCert> {
        self.shared.resolver.clone()
    }

    /// The config for TLS-ALPN-01 validation handshakes (no client auth, ALPN `acme-tls/1`).
    pub fn challenge_config(&self) -> Arc<ServerConfig> {
        self.shared.challenge_config.clone()
    }

    /// Follows the status; `borrow()` reads it, `wait_for` waits for a condition.
    pub fn status(&self) -> watch::Receiver<AcmeStatus> {
        self.shared.status.subscribe()
    }

    /// Whether handshakes get a certificate (from the cache or an order).
    pub fn has_certificate(&self) -> bool {
        self.shared.status.borrow().certificate.is_some()
    }

    pub fn describe(&self) -> String {
        format!(
            "acme ({}; directory {}; cache {})",
            self.shared.domains.join(", "),
            self.shared.directory_url,
            self.shared.cache.dir.display()
        )
    }

    /// Polls the ACME state until `shutdown` is cancelled: loads the cache, orders,
    /// renews, logs each event. Meant to be spawned once; a second call returns at once.
    pub async fn run(self, shutdown: CancellationToken) {
        let state = self
            .shared
            .state
            .lock()
            .map(|mut s| s.take())
            .ok()
            .flatten();
        let Some(mut state) = state else {
            tracing::error!("ACME task started twice; this one does nothing");
            return;
        };
        self.log_start().await;
        let mut run = RunState::default();
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sleep_towards(run.renewal_due) => {
                    if run.renewal_due.is_some_and(|due| due <= OffsetDateTime::now_utc()) {
                        run.renewal_due = None;
                        tracing::info!(
                            domains = ?self.shared.domains, directory = %self.shared.directory_url,
                            "ACME renewal due: ordering a new certificate"
                        );
                    }
                    continue;
                }
                event = state.next() => event,
            };
            // The state is an endless stream; `None` would mean the library changed that.
            let Some(event) = event else { break };
            self.on_event(event, &mut run);
        }
        tracing::debug!("ACME task stopped");
    }

    async fn log_start(&self) {
        let s = &self.shared;
        let cached = s.cache.read_cert(&s.domains, &s.directory_url).await;
        let cached = match cached {
            Ok(Some(pem)) => certificate_info(&pem, CertOrigin::Cache).map_err(|e| {
                format!("the cached certificate cannot be read ({e}); placing an order now")
            }),
            Ok(None) => Err("no certificate in the cache: placing an order now".to_owned()),
            Err(e) => Err(format!(
                "reading the cache failed ({e}); placing an order now"
            )),
        };
        let plan = match &cached {
            Ok(info) if info.renew_at() <= OffsetDateTime::now_utc() => {
                "the cached certificate is due for renewal: placing an order now".to_owned()
            }
            Ok(info) => format!(
                "serving the cached certificate; next order at {}",
                rfc3339(info.renew_at())
            ),
            Err(plan) => plan.clone(),
        };
        tracing::info!(
            domains = ?s.domains, directory = %s.directory_url, cache_dir = %s.cache.dir.display(),
            "ACME started: {plan}"
        );
        if s.staging {
            tracing::warn!(
                "ACME directory is Let's Encrypt staging: clients do not trust its certificates; \
                 set tls.acme.directory = \"letsencrypt\" once issuance works"
            );
        }
        if s.listen_port != 443 {
            tracing::info!(
                listen_port = s.listen_port,
                "TLS-ALPN-01 validation connects to port 443 of each domain: it must be forwarded to this listener"
            );
        }
    }

    fn on_event(&self, event: Event, run: &mut RunState) {
        let s = &self.shared;
        match event {
            Ok(EventOk::DeployedCachedCert) => match s.cache.last_cert_info(CertOrigin::Cache) {
                Ok(info) => {
                    tracing::info!(
                        serial = %info.serial, not_after = %rfc3339(info.not_after),
                        renew_at = %rfc3339(info.renew_at()),
                        "ACME serving the certificate from the cache"
                    );
                    run.renewal_due = Some(info.renew_at());
                    s.status.send_modify(|st| st.certificate = Some(info));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ACME serving the cached certificate, which agentgate cannot describe")
                }
            },
            Ok(EventOk::DeployedNewCert) => {
                run.pending_issue = Some(s.status.borrow().certificate.is_some());
                s.status.send_modify(|st| {
                    st.issued += 1;
                    st.consecutive_failures = 0;
                    st.last_error = None;
                });
            }
            Ok(EventOk::CertCacheStore) => self.log_issued(run, None),
            Err(EventError::CertCacheStore(e)) => self.log_issued(run, Some(e)),
            Ok(EventOk::AccountCacheStore) => tracing::info!(
                cache_dir = %s.cache.dir.display(),
                "ACME account key generated and stored; the account is registered with the CA by the order"
            ),
            Err(EventError::AccountCacheStore(e)) => tracing::error!(
                cache_dir = %s.cache.dir.display(), error = %e,
                "ACME account key could not be stored; a restart will register a new account"
            ),
            Err(EventError::Order(e)) => {
                let message = describe_order_error(&e);
                let mut failures = 0;
                s.status.send_modify(|st| {
                    st.failed_orders += 1;
                    st.consecutive_failures += 1;
                    st.last_error = Some(message.clone());
                    failures = st.consecutive_failures;
                });
                let retry_in_secs = 1u64 << (failures.saturating_sub(1)).min(MAX_BACKOFF_EXPONENT);
                match s.status.borrow().certificate.as_ref() {
                    Some(current) => tracing::warn!(
                        error = %message, retry_in_secs, failures,
                        serving_until = %rfc3339(current.not_after),
                        "ACME order failed; the current certificate stays in service"
                    ),
                    None => tracing::error!(
                        error = %message, retry_in_secs, failures,
                        "ACME order failed; no certificate yet, so TLS handshakes are refused until an order succeeds"
                    ),
                }
            }
            Err(EventError::CertCacheLoad(e)) => tracing::error!(
                cache_dir = %s.cache.dir.display(), error = %e,
                "ACME cache: reading the certificate failed; ordering a new one"
            ),
            Err(EventError::AccountCacheLoad(e)) => tracing::error!(
                cache_dir = %s.cache.dir.display(), error = %e,
                "ACME cache: reading the account key failed; a new account will be registered"
            ),
            Err(EventError::CachedCertParse(e)) => tracing::warn!(
                cache_dir = %s.cache.dir.display(), error = %e,
                "ACME cache: the cached certificate is unusable; ordering a new one"
            ),
            Err(EventError::NewCertParse(e)) => {
                let message = format!("the CA returned a certificate that cannot be used: {e}");
                tracing::error!(error = %message, "ACME order failed");
                s.status.send_modify(|st| {
                    st.failed_orders += 1;
                    st.last_error = Some(message.clone());
                });
            }
        }
    }

    /// Logs a new certificate once the library has handed it to the cache (the event that
    /// announces it carries no certificate; the cache write that follows does).
    fn log_issued(&self, run: &mut RunState, store_error: Option<io::Error>) {
        let s = &self.shared;
        let Some(renewal) = run.pending_issue.take() else {
            if let Some(e) = store_error {
                tracing::error!(error = %e, "ACME cache: storing a certificate failed");
            }
            return;
        };
        let what = if renewal {
            "ACME certificate renewed"
        } else {
            "ACME certificate issued"
        };
        match s.cache.last_cert_info(CertOrigin::Issued) {
            Ok(info) => {
                run.renewal_due = Some(info.renew_at());
                match &store_error {
                    None => tracing::info!(
                        serial = %info.serial, names = ?info.names,
                        not_after = %rfc3339(info.not_after), renew_at = %rfc3339(info.renew_at()),
                        "{what} and stored in the cache"
                    ),
                    Some(e) => tracing::error!(
                        serial = %info.serial, not_after = %rfc3339(info.not_after), error = %e,
                        "{what} but not stored in the cache: a restart will order again"
                    ),
                }
                s.status.send_modify(|st| st.certificate = Some(info));
            }
            Err(e) => tracing::warn!(error = %e, "{what}, but agentgate cannot describe it"),
        }
    }
}

/// Bookkeeping of one `run`.
#[derive(Default)]
struct RunState {
    /// A new certificate was deployed and is about to be stored: `Some(is_renewal)`.
    pending_issue: Option<bool>,
    /// When the library will order the next renewal, for the log line that says so.
    renewal_due: Option<OffsetDateTime>,
}

/// Sleeps until `due` (in steps of at most a day), or forever without one.
async fn sleep_towards(due: Option<OffsetDateTime>) {
    let Some(due) = due else {
        return std::future::pending().await;
    };
    let left = (due - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
    let left = Duration::try_from(left).unwrap_or(MAX_TIMER).min(MAX_TIMER);
    tokio::time::sleep(left).await;
}

/// The resolver of the gateway's `ServerConfig` in ACME mode: the library's, plus a log
/// line when there is no certificate to serve yet.
#[derive(Debug)]
struct AcmeResolver {
    acme: Arc<ResolvesServerCertAcme>,
    status: watch::Sender<AcmeStatus>,
    /// When a refusal was last logged. A std Mutex: held for a comparison, no await.
    last_warning: Mutex<Option<Instant>>,
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

/// The cache directory: rustls-acme's `DirCache` file naming (so either can read the
/// other's files), with atomic writes of mode 0600, and a note of the last certificate
/// read or written so that the task can describe what the library deployed.
#[derive(Clone)]
struct AcmeCache {
    dir: Arc<PathBuf>,
    /// A std Mutex: held to copy bytes in or out, never across an await.
    last_cert: Arc<Mutex<Option<Vec<u8>>>>,
}

impl AcmeCache {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir: Arc::new(dir),
            last_cert: Arc::default(),
        }
    }

    async fn read_cert(
        &self,
        domains: &[String],
        directory_url: &str,
    ) -> io::Result<Option<Vec<u8>>> {
        read_if_exists(cached_cert_path(&self.dir, domains, directory_url)).await
    }

    fn remember(&self, pem: Option<&[u8]>) {
        if let Ok(mut last) = self.last_cert.lock() {
            *last = pem.map(<[u8]>::to_vec);
        }
    }

    fn last_cert_info(&self, origin: CertOrigin) -> Result<CertificateInfo, String> {
        let pem = self
            .last_cert
            .lock()
            .map_err(|_| "cache bookkeeping poisoned".to_owned())?
            .clone()
            .ok_or_else(|| "no certificate passed through the cache".to_owned())?;
        certificate_info(&pem, origin)
    }

    async fn write(&self, path: PathBuf, contents: &[u8]) -> io::Result<()> {
        let dir = self.dir.clone();
        let contents = contents.to_vec();
        tokio::task::spawn_blocking(move || {
            ensure_private_dir(&dir)?;
            crate::fsutil::write_atomic(&path, &contents, 0o600)
        })
        .await
        .map_err(io::Error::other)?
    }
}

#[async_trait]
impl CertCache for AcmeCache {
    type EC = io::Error;

    async fn load_cert(
        &self,
        domains: &[String],
        directory_url: &str,
    ) -> io::Result<Option<Vec<u8>>> {
        let found = self.read_cert(domains, directory_url).await?;
        self.remember(found.as_deref());
        Ok(found)
    }

    async fn store_cert(
        &self,
        domains: &[String],
        directory_url: &str,
        cert: &[u8],
    ) -> io::Result<()> {
        self.remember(Some(cert));
        self.write(cached_cert_path(&self.dir, domains, directory_url), cert)
            .await
    }
}

#[async_trait]
impl AccountCache for AcmeCache {
    type EA = io::Error;

    async fn load_account(
        &self,
        contact: &[String],
        directory_url: &str,
    ) -> io::Result<Option<Vec<u8>>> {
        read_if_exists(cached_account_path(&self.dir, contact, directory_url)).await
    }

    async fn store_account(
        &self,
        contact: &[String],
        directory_url: &str,
        account: &[u8],
    ) -> io::Result<()> {
        self.write(
            cached_account_path(&self.dir, contact, directory_url),
            account,
        )
        .await
    }
}

/// The cache file of the certificate for `domains` from `directory_url`: a staging
/// certificate is never taken for a production one, nor one for other names.
pub fn cached_cert_path(dir: &Path, domains: &[String], directory_url: &str) -> PathBuf {
    dir.join(format!("cached_cert_{}", cache_key(domains, directory_url)))
}

fn cached_account_path(dir: &Path, contact: &[String], directory_url: &str) -> PathBuf {
    dir.join(format!(
        "cached_account_{}",
        cache_key(contact, directory_url)
    ))
}

/// rustls-acme `DirCache`: SHA-256 over each item and a NUL, then the directory URL,
/// in unpadded URL-safe base64.
fn cache_key(items: &[String], directory_url: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for item in items {
        ctx.update(item.as_bytes());
        ctx.update(&[0]);
    }
    ctx.update(directory_url.as_bytes());
    BASE64_URL_SAFE_NO_PAD.encode(ctx.finish())
}

async fn read_if_exists(path: PathBuf) -> io::Result<Option<Vec<u8>>> {
    match tokio::fs::read(&path).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

/// Creates `dir` with mode 0700 if missing; warns when an existing one is open to others.
fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            cache_dir = %dir.display(), mode = format!("{:o}", mode & 0o777),
            "ACME cache directory is readable by others; it holds private keys (chmod 700 it)"
        );
    }
    Ok(())
}

fn add_pem_roots(roots: &mut RootCertStore, path: &Path) -> Result<(), AcmeSetupError> {
    let err = |message: String| AcmeSetupError::DirectoryCa {
        path: path.to_owned(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| err(format!("not a usable root certificate: {e}")))?;
    }
    Ok(())
}

/// Describes the cached certificate: the PEM the library writes is the private key
/// followed by the chain, leaf first.
pub fn certificate_info(pem: &[u8], origin: CertOrigin) -> Result<CertificateInfo, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let blocks = pem::parse_many(pem).map_err(|e| format!("bad PEM: {e}"))?;
    let leaf = blocks
        .iter()
        .find(|b| b.tag() == "CERTIFICATE")
        .ok_or("no CERTIFICATE block")?;
    let (_, x509) =
        X509Certificate::from_der(leaf.contents()).map_err(|e| format!("bad certificate: {e}"))?;
    let time = |t: x509_parser::time::ASN1Time| {
        OffsetDateTime::from_unix_timestamp(t.timestamp()).map_err(|e| e.to_string())
    };
    let names = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(CertificateInfo {
        origin,
        serial: x509.raw_serial_as_string(),
        names,
        not_before: time(x509.validity().not_before)?,
        not_after: time(x509.validity().not_after)?,
    })
}

/// What `agentgate check-config` prints about ACME: the settings, and whether the cache
/// holds a certificate that a start would serve without ordering, and until when.
pub fn report(config: &Config) -> String {
    let acme = &config.tls.acme;
    let url = acme.directory_url();
    let dir = config.acme_cache_dir();
    let mut out = String::from("\n# ACME (tls.mode = \"acme\"):\n");
    let mut line = |k: &str, v: &str| out.push_str(&format!("#   {k}: {v}\n"));
    let kind = match acme.directory.as_str() {
        crate::config::LETSENCRYPT => " (Let's Encrypt production)",
        crate::config::LETSENCRYPT_STAGING => {
            " (Let's Encrypt staging: certificates are not trusted by clients)"
        }
        _ => "",
    };
    line("directory", &format!("{url}{kind}"));
    line("domains", &acme.domains.join(", "));
    let contact = if acme.contact.is_empty() {
        "(none)".to_owned()
    } else {
        acme.contact.join(", ")
    };
    line("contact", &contact);
    line("cache_dir", &dir.display().to_string());
    let path = cached_cert_path(&dir, &acme.domains, url);
    let account = cached_account_path(&dir, &acme.contact, url);
    line(
        "account key",
        if account.exists() {
            "present in the cache"
        } else {
            "none yet (created by the first order)"
        },
    );
    let now = OffsetDateTime::now_utc();
    let cert = match std::fs::read(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            "none in the cache: the first start places an order".to_owned()
        }
        Err(e) => format!(
            "unreadable ({}: {e}): a start places an order",
            path.display()
        ),
        Ok(pem) => match certificate_info(&pem, CertOrigin::Cache) {
            Err(e) => format!(
                "unusable ({}: {e}): a start places an order",
                path.display()
            ),
            Ok(info) if !info.is_valid_at(now) => format!(
                "not valid now (valid {} to {}; {}): a start places an order",
                rfc3339(info.not_before),
                rfc3339(info.not_after),
                path.display()
            ),
            Ok(info) => format!(
                "valid until {} (serial {}, names {}; renewal from {}; {})",
                rfc3339(info.not_after),
                info.serial,
                info.names.join(", "),
                rfc3339(info.renew_at()),
                path.display()
            ),
        },
    };
    line("cached certificate", &cert);
    out
}

/// The server's own words for a failed order: the problem document (RFC 8555 §6.7) of an
/// error response, or of the failed challenge or order, where the library exposes one.
pub fn describe_order_error(e: &OrderError) -> String {
    match e {
        OrderError::BadAuth(auth) => {
            let Identifier::Dns(name) = &auth.identifier;
            let problems: Vec<String> = auth
                .challenges
                .iter()
                .filter_map(|c| c.error.as_ref())
                .map(describe_problem)
                .collect();
            let status = match auth.status {
                AuthStatus::Pending => "pending",
                AuthStatus::Valid => "valid",
                AuthStatus::Invalid => "invalid",
                AuthStatus::Revoked => "revoked",
                AuthStatus::Expired => "expired",
                AuthStatus::Deactivated => "deactivated",
            };
            if problems.is_empty() {
                format!("authorization for {name} is {status}")
            } else {
                format!(
                    "authorization for {name} is {status}: {}",
                    problems.join("; ")
                )
            }
        }
        OrderError::BadOrder(order) => match &order.error {
            Some(p) => format!("order is invalid: {}", describe_problem(p)),
            None => "order is invalid".to_owned(),
        },
        OrderError::Acme(acme) => {
            let text = acme.to_string();
            http_problem(&text).unwrap_or(text)
        }
        OrderError::Rcgen(_)
        | OrderError::TooManyAttemptsAuth(_)
        | OrderError::ProcessingTimeout(_) => e.to_string(),
    }
}

fn describe_problem(p: &Problem) -> String {
    match (&p.typ, &p.detail) {
        (Some(t), Some(d)) => format!("{t}: {d}"),
        (Some(t), None) => t.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => "no detail given".to_owned(),
    }
}

/// rustls-acme reports an error response only as text,
/// `http request error: non 2xx http status: 429 "{\"type\": ...}"` (the body in Rust's
/// `Debug` quoting); this recovers `HTTP 429: <type>: <detail>` from it.
fn http_problem(text: &str) -> Option<String> {
    const MARK: &str = "non 2xx http status: ";
    let rest = &text[text.find(MARK)? + MARK.len()..];
    let (status, quoted) = rest.split_once(' ')?;
    let body = unquote_debug(quoted)?;
    let problem: Problem = serde_json::from_str(&body).ok()?;
    Some(format!("HTTP {status}: {}", describe_problem(&problem)))
}

/// Reverses `format!("{:?}", s)` for the escapes it produces.
fn unquote_debug(quoted: &str) -> Option<String> {
    let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            '0' => out.push('\0'),
            'u' => {
                let hex: String = chars.by_ref().skip(1).take_while(|&c| c != '}').collect();
                out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
            }
            other => out.push(other),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_responses_give_the_servers_problem_document() {
        let body = r#"{"type":"urn:ietf:params:acme:error:rateLimited","detail":"too many certificates (5) already issued for \"example.com\""}"#;
        let text = format!("acme error: http request error: non 2xx http status: 429 {body:?}");
        assert_eq!(
            http_problem(&text).unwrap(),
            "HTTP 429: urn:ietf:params:acme:error:rateLimited: too many certificates (5) already issued for \"example.com\""
        );
        assert_eq!(http_problem("io error: connection refused"), None);
        assert_eq!(
            unquote_debug(&format!("{:?}", "a\u{7}b\n\\")).unwrap(),
            "a\u{7}b\n\\"
        );
    }

    #[test]
    fn cache_file_names_follow_rustls_acme_dir_cache() {
        // The name rustls-acme 0.15.4's DirCache gives ["example.com"] at the staging directory.
        let domains = vec!["example.com".to_owned()];
        let url = rustls_acme::acme::LETS_ENCRYPT_STAGING_DIRECTORY;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"example.com\0");
        ctx.update(url.as_bytes());
        let expected = format!(
            "cached_cert_{}",
            BASE64_URL_SAFE_NO_PAD.encode(ctx.finish())
        );
        let path = cached_cert_path(Path::new("/c"), &domains, url);
        assert_eq!(path, Path::new("/c").join(expected));
        let production = rustls_acme::acme::LETS_ENCRYPT_PRODUCTION_DIRECTORY;
        assert_ne!(
            path,
            cached_cert_path(Path::new("/c"), &domains, production)
        );
    }

    #[test]
    fn certificate_info_reads_the_cache_format() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["gw.example.com".into()]).unwrap();
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        params.not_before = now - time::Duration::days(30);
        params.not_after = now + time::Duration::days(60);
        let cert = params.self_signed(&key).unwrap();
        let pem = format!("{}\n{}", key.serialize_pem(), cert.pem());
        let info = certificate_info(pem.as_bytes(), CertOrigin::Cache).unwrap();
        assert_eq!(info.names, vec!["gw.example.com"]);
        assert_eq!(info.not_after, now + time::Duration::days(60));
        assert_eq!(info.renew_at(), now + time::Duration::days(30));
        assert!(info.is_valid_at(now));
        assert!(certificate_info(b"garbage", CertOrigin::Cache).is_err());
    }
}
