//! ACME (RFC 8555) for a cluster of nodes that share one Redis: one node orders and renews
//! under a lock, the account key and the certificate live in Redis, every node serves the
//! same certificate, and the TLS-ALPN-01 challenge (RFC 8737) is answered by whichever
//! node the CA reaches, because the challenge certificate is shared through Redis.
//!
//! rustls-acme's `AcmeState` keeps the challenge certificate inside its own resolver, so a
//! second node could never answer for it. This module drives rustls-acme's public
//! low-level client (`rustls_acme::acme`: `Directory`, `Account`, `Order`, `Auth`) itself
//! and keeps all shared state in Redis. Traefik dropped ACME for several instances after
//! v1; Caddy shares it through its storage; we share it through the Redis the cluster
//! already has.
//!
//! # Redis keys
//!
//! Every key carries the hash tag `{acme}`, so all of them live in one slot of a Redis
//! Cluster and the compare-and-delete script touches keys of one slot only.
//!
//! | key | value |
//! | --- | --- |
//! | `<prefix>:{acme}:account:<hash(contact, directory)>` | the account key, PKCS#8 DER |
//! | `<prefix>:{acme}:cert:<hash(domains, directory)>` | private key + chain, PEM (the layout of rustls-acme's cache files) |
//! | `<prefix>:{acme}:lock:<same hash>` | the orderer's random token, `SET NX PX`, renewed while ordering |
//! | `<prefix>:{acme}:retry:<same hash>` | present while failed orders back off (TTL = the delay) |
//! | `<prefix>:{acme}:failures:<same hash>` | consecutive failed orders |
//! | `<prefix>:{acme}:challenge:<domain>` | challenge key + certificate, PEM, short TTL |
//!
//! Notifications go over the channel `<prefix>:{acme}:events` (`cert`, `challenge <domain>`,
//! `challenge-done <domain>`). They only shorten waits: every node also re-reads the
//! certificate every `poll_interval` and after each (re)subscription, and a validation
//! handshake reads the challenge from Redis, so a lost message costs seconds, not a
//! certificate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use base64::Engine;
use base64::prelude::BASE64_URL_SAFE_NO_PAD;
use futures_util::StreamExt;
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, PKCS_ECDSA_P256_SHA256};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ring::signature::EcdsaKeyPair;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use rustls_acme::OrderError;
use rustls_acme::acme::{
    ACME_TLS_ALPN_NAME, Account, AcmeError, AuthStatus, ChallengeType, Directory, Identifier,
    OrderStatus,
};
use time::OffsetDateTime;
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::clock::rfc3339;

use crate::tls::acme::describe_order_error;

/// Releases the lock only if it still holds our token: a node whose lock expired must not
/// delete the lock another node took since (the pattern of the Redis `SET` documentation).
const RELEASE_SCRIPT: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";
/// Extends the lock only while it still holds our token.
const RENEW_SCRIPT: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";

/// Failed orders back off `2^(n-1)` seconds after the n-th consecutive failure, with the
/// exponent capped here (about 18 h), as rustls-acme's `AcmeState` does for one node.
const MAX_BACKOFF_EXPONENT: u32 = 16;

/// How long one Redis read may take on the validation path before the local copy is used.
const CHALLENGE_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// What the cluster manager needs; the gateway builds it from `tls.acme` and `[cluster]`.
#[derive(Clone)]
pub struct ClusterAcmeSettings {
    /// The names of the certificate (its SANs); the first is also the lock's scope.
    pub domains: Vec<String>,
    pub directory_url: String,
    /// `mailto:` URLs for the account.
    pub contact: Vec<String>,
    /// The HTTPS client for the directory (its roots trust the CA's API endpoint).
    pub client_config: Arc<ClientConfig>,
    pub provider: Arc<CryptoProvider>,
    /// This node's name in logs and in the lock token (a host name, a pod name).
    pub node_id: String,
    /// Key prefix before the `{acme}` hash tag; `agentgate` by default.
    pub key_prefix: String,
    pub timing: Timing,
}

/// Intervals of the manager; the defaults suit production, tests shorten them.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Re-read the certificate from Redis this often even without a notification.
    pub poll_interval: Duration,
    /// The lock's TTL; it is renewed every third of it while an order runs, so a node that
    /// dies mid-order blocks the others for at most this long.
    pub lock_ttl: Duration,
    /// How long a published challenge stays in Redis if its orderer dies before removing it.
    pub challenge_ttl: Duration,
    /// Renew this long before notAfter, or a third of the lifetime before if that is
    /// shorter (short-lived certificates, Pebble with `certificateValidityPeriod`).
    pub renew_before: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(5),
            lock_ttl: Duration::from_secs(60),
            challenge_ttl: Duration::from_secs(600),
            // Let's Encrypt's advice for 90-day certificates.
            renew_before: Duration::from_secs(30 * 86_400),
        }
    }
}

/// Why something failed; the `Order` text is the CA's problem document where it sent one.
#[derive(Debug, thiserror::Error)]
pub enum ClusterAcmeError {
    #[error("no domains configured for the cluster certificate")]
    NoDomains,
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{}", describe_order_error(.0))]
    /// Boxed: rustls-acme's error carries whole order and authorization objects.
    Order(Box<OrderError>),
    #[error("the certificate in Redis ({key}) is unusable: {reason}")]
    BadCertificate { key: String, reason: String },
    #[error("the ordering lock expired or was taken over while the order ran")]
    LockLost,
    #[error("shutting down")]
    Shutdown,
}

impl From<OrderError> for ClusterAcmeError {
    fn from(e: OrderError) -> Self {
        Self::Order(Box::new(e))
    }
}

impl From<AcmeError> for ClusterAcmeError {
    fn from(e: AcmeError) -> Self {
        OrderError::Acme(e).into()
    }
}

impl From<rcgen::Error> for ClusterAcmeError {
    fn from(e: rcgen::Error) -> Self {
        OrderError::Rcgen(e).into()
    }
}

/// What the manager did, in the order it happened; each is also logged.
#[derive(Debug, Clone)]
pub enum ClusterAcmeEvent {
    /// A certificate from Redis (stored by any node) is now served by this node.
    CertificateDeployed(CertificateInfo),
    /// This node took the lock and will order.
    LockAcquired,
    /// This node generated the account key and stored it in Redis.
    AccountKeyCreated,
    /// This node placed an order (one `newOrder` request at the CA).
    OrderPlaced {
        order_url: String,
    },
    /// The challenge certificate for `domain` is in Redis; the CA is told next.
    ChallengePublished {
        domain: String,
    },
    ChallengeValidated {
        domain: String,
    },
    /// This node obtained a certificate and stored it in Redis.
    Issued(CertificateInfo),
    OrderFailed {
        error: String,
        retry_in: Duration,
    },
    RedisUnavailable {
        error: String,
    },
    RedisAvailable,
}

/// A certificate as the status and the logs describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Serial number as colon-separated hex (as `openssl x509 -serial` shows it, lower case).
    pub serial: String,
    pub names: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl CertificateInfo {
    /// When a replacement is ordered: `renew_before` ahead of notAfter, or a third of the
    /// lifetime ahead when that is shorter.
    pub fn renew_at(&self, renew_before: Duration) -> OffsetDateTime {
        let third: time::Duration = (self.not_after - self.not_before) / 3;
        let before = time::Duration::try_from(renew_before).unwrap_or(time::Duration::MAX);
        self.not_after - third.min(before)
    }
}

/// For `/ready` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterAcmeStatus {
    /// The certificate this node serves.
    pub certificate: Option<CertificateInfo>,
    /// Orders this node placed.
    pub orders_placed: u64,
    /// Certificates this node obtained.
    pub issued: u64,
    pub failed_orders: u64,
    pub last_error: Option<String>,
    /// False after a failed Redis operation, true again after the next successful one.
    pub redis_reachable: bool,
}

impl ClusterAcmeStatus {
    pub fn has_certificate(&self) -> bool {
        self.certificate.is_some()
    }
}

/// The cluster ACME manager of one node. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct ClusterAcme {
    shared: Arc<Shared>,
}

/// Answers TLS-ALPN-01 validation handshakes with the challenge certificate that the
/// ordering node (this one or another) published in Redis.
#[derive(Clone)]
pub struct ChallengeSource {
    shared: Arc<Shared>,
}

struct Shared {
    settings: ClusterAcmeSettings,
    keys: Keys,
    client: redis::Client,
    conn: ConnectionManager,
    resolver: Arc<ClusterResolver>,
    /// domain -> challenge key, fed by notifications; used when Redis cannot be read.
    /// A std Mutex: never held across an await.
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// The PEM in service, to skip unchanged reloads. A std Mutex, never held across an await.
    current_pem: Mutex<Option<Vec<u8>>>,
    lock_token: String,
    status: watch::Sender<ClusterAcmeStatus>,
    events: broadcast::Sender<ClusterAcmeEvent>,
    wake: Notify,
    redis_down: AtomicBool,
}

struct Keys {
    account: String,
    cert: String,
    lock: String,
    retry: String,
    failures: String,
    channel: String,
    challenge_prefix: String,
}

impl Keys {
    fn new(settings: &ClusterAcmeSettings) -> Self {
        let base = format!("{}:{{acme}}", settings.key_prefix);
        let scope = scope_hash(&settings.domains, &settings.directory_url);
        let account = scope_hash(&settings.contact, &settings.directory_url);
        Self {
            account: format!("{base}:account:{account}"),
            cert: format!("{base}:cert:{scope}"),
            lock: format!("{base}:lock:{scope}"),
            retry: format!("{base}:retry:{scope}"),
            failures: format!("{base}:failures:{scope}"),
            channel: format!("{base}:events"),
            challenge_prefix: format!("{base}:challenge:"),
        }
    }

    fn challenge(&self, domain: &str) -> String {
        format!("{}{}", self.challenge_prefix, domain.to_ascii_lowercase())
    }
}

/// The name rustls-acme's `DirCache` gives a cache entry: SHA-256 over each item and a
/// NUL, then the directory URL, in unpadded URL-safe base64. A staging certificate is never
/// taken for a production one, nor one for other names.
fn scope_hash(items: &[String], directory_url: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for item in items {
        ctx.update(item.as_bytes());
        ctx.update(&[0]);
    }
    ctx.update(directory_url.as_bytes());
    BASE64_URL_SAFE_NO_PAD.encode(ctx.finish())
}

impl std::fmt::Debug for ClusterAcme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ClusterAcme {
    /// Starts the manager of this node: a task that loads the certificate from Redis,
    /// orders under the lock when none is there or it is due, and one that follows the
    /// notifications. Nothing here waits on Redis: a node whose Redis is down starts, and
    /// serves once Redis answers. Both tasks end when `shutdown` is cancelled. Must be
    /// called within a tokio runtime (it spawns the tasks).
    pub fn start(
        client: redis::Client,
        settings: ClusterAcmeSettings,
        shutdown: CancellationToken,
    ) -> Result<Self, ClusterAcmeError> {
        if settings.domains.is_empty() {
            return Err(ClusterAcmeError::NoDomains);
        }
        // Short timeouts and one retry: a dead Redis must fail an operation quickly so the
        // loop can log it and try again, never hang it (DESIGN.md, spike facts).
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        let keys = Keys::new(&settings);
        let lock_token = format!("{}:{}", settings.node_id, random_hex());
        let manager = Self {
            shared: Arc::new(Shared {
                settings,
                keys,
                client,
                conn,
                resolver: Arc::new(ClusterResolver::default()),
                challenges: Mutex::default(),
                current_pem: Mutex::default(),
                lock_token,
                status: watch::Sender::new(ClusterAcmeStatus {
                    redis_reachable: true,
                    ..ClusterAcmeStatus::default()
                }),
                events: broadcast::Sender::new(64),
                wake: Notify::new(),
                redis_down: AtomicBool::new(false),
            }),
        };
        let s = &manager.shared.settings;
        tracing::info!(
            node = %s.node_id, domains = ?s.domains, directory = %s.directory_url,
            cert_key = %manager.shared.keys.cert,
            "ACME (cluster) started: the certificate is shared through Redis"
        );
        tokio::spawn(manager.clone().run(shutdown.clone()));
        tokio::spawn(manager.clone().follow_notifications(shutdown));
        Ok(manager)
    }

    /// The resolver for the gateway's `ServerConfig`: the certificate in Redis, or none
    /// (the handshake fails) until one is there.
    pub fn resolver(&self) -> Arc<dyn ResolvesServerCert> {
        self.shared.resolver.clone()
    }

    /// For the accept path: the config of TLS-ALPN-01 validation handshakes.
    pub fn challenge(&self) -> ChallengeSource {
        ChallengeSource {
            shared: self.shared.clone(),
        }
    }

    /// Follows the status; `borrow()` reads it, `wait_for` waits for a condition.
    pub fn status(&self) -> watch::Receiver<ClusterAcmeStatus> {
        self.shared.status.subscribe()
    }

    /// Every event from now on (each one is also logged).
    pub fn events(&self) -> broadcast::Receiver<ClusterAcmeEvent> {
        self.shared.events.subscribe()
    }

    pub fn describe(&self) -> String {
        let s = &self.shared.settings;
        format!(
            "acme in a cluster ({}; directory {}; node {}; Redis key {})",
            s.domains.join(", "),
            s.directory_url,
            s.node_id,
            self.shared.keys.cert
        )
    }

    async fn run(self, shutdown: CancellationToken) {
        loop {
            match self.step(&shutdown).await {
                Ok(()) => self.redis_ok(),
                Err(ClusterAcmeError::Redis(e)) => self.redis_failed(&e),
                Err(ClusterAcmeError::Shutdown) => break,
                Err(e) => {
                    tracing::error!(error = %e, "ACME (cluster) error");
                    self.shared
                        .status
                        .send_modify(|st| st.last_error = Some(e.to_string()));
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.shared.wake.notified() => {}
                _ = tokio::time::sleep(self.shared.settings.timing.poll_interval) => {}
            }
        }
        tracing::debug!("ACME (cluster) task stopped");
    }

    /// One round: serve what Redis holds; order under the lock if that is missing or due.
    async fn step(&self, shutdown: &CancellationToken) -> Result<(), ClusterAcmeError> {
        let s = &self.shared;
        let stored = self.load_and_deploy().await?;
        if !self.needs_order(&stored) {
            return Ok(());
        }
        let mut conn = s.conn.clone();
        let backing_off: bool = redis::cmd("EXISTS")
            .arg(&s.keys.retry)
            .query_async(&mut conn)
            .await?;
        if backing_off || !self.try_lock().await? {
            return Ok(());
        }
        self.emit(ClusterAcmeEvent::LockAcquired);
        let result = self.order_under_lock(shutdown).await;
        if let Err(e) = self.release_lock().await {
            // The lock expires by itself after its TTL.
            tracing::warn!(error = %e, "ACME (cluster) could not release the lock; it expires by itself");
        }
        result
    }

    /// Reads the certificate from Redis and serves it if it changed.
    async fn load_and_deploy(&self) -> Result<Stored, ClusterAcmeError> {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let pem: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&s.keys.cert)
            .query_async(&mut conn)
            .await?;
        let Some(pem) = pem else {
            return Ok(Stored::Missing);
        };
        match self.deploy(&pem) {
            Ok(info) => Ok(Stored::Usable(info)),
            Err(e) => {
                tracing::error!(error = %e, "ACME (cluster) certificate in Redis ignored; a new one will be ordered");
                s.status
                    .send_modify(|st| st.last_error = Some(e.to_string()));
                Ok(Stored::Unusable)
            }
        }
    }

    fn needs_order(&self, stored: &Stored) -> bool {
        match stored {
            Stored::Usable(info) => {
                let renew_at = info.renew_at(self.shared.settings.timing.renew_before);
                OffsetDateTime::now_utc() >= renew_at
            }
            Stored::Missing | Stored::Unusable => true,
        }
    }

    /// Serves `pem` (key + chain) unless it is the one in service already.
    fn deploy(&self, pem: &[u8]) -> Result<CertificateInfo, ClusterAcmeError> {
        let s = &self.shared;
        let bad = |reason: String| ClusterAcmeError::BadCertificate {
            key: s.keys.cert.clone(),
            reason,
        };
        let info = certificate_info(pem).map_err(bad)?;
        let unchanged = s
            .current_pem
            .lock()
            .map(|current| current.as_deref() == Some(pem))
            .unwrap_or(false);
        if unchanged {
            return Ok(info);
        }
        let key =
            certified_key(pem, &s.settings.provider, KeyCheck::KeyMatchesLeaf).map_err(bad)?;
        s.resolver.current.store(Some(Arc::new(key)));
        if let Ok(mut current) = s.current_pem.lock() {
            *current = Some(pem.to_vec());
        }
        s.status
            .send_modify(|st| st.certificate = Some(info.clone()));
        self.emit(ClusterAcmeEvent::CertificateDeployed(info.clone()));
        Ok(info)
    }

    async fn try_lock(&self) -> Result<bool, ClusterAcmeError> {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let set: redis::Value = redis::cmd("SET")
            .arg(&s.keys.lock)
            .arg(&s.lock_token)
            .arg("NX")
            .arg("PX")
            .arg(millis(s.settings.timing.lock_ttl))
            .query_async(&mut conn)
            .await?;
        Ok(!matches!(set, redis::Value::Nil))
    }

    async fn release_lock(&self) -> Result<(), redis::RedisError> {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let _: i64 = redis::cmd("EVAL")
            .arg(RELEASE_SCRIPT)
            .arg(1)
            .arg(&s.keys.lock)
            .arg(&s.lock_token)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Renews the lock every third of its TTL; returns only when it is lost: taken over,
    /// or not confirmed by Redis for a whole TTL.
    async fn keep_lock(&self) -> ClusterAcmeError {
        let s = &self.shared;
        let ttl = s.settings.timing.lock_ttl;
        let mut confirmed = Instant::now();
        loop {
            tokio::time::sleep(ttl / 3).await;
            let mut conn = s.conn.clone();
            let renewed: Result<i64, _> = redis::cmd("EVAL")
                .arg(RENEW_SCRIPT)
                .arg(1)
                .arg(&s.keys.lock)
                .arg(&s.lock_token)
                .arg(millis(ttl))
                .query_async(&mut conn)
                .await;
            match renewed {
                Ok(1) => confirmed = Instant::now(),
                Ok(_) => return ClusterAcmeError::LockLost,
                Err(e) if confirmed.elapsed() >= ttl => {
                    tracing::warn!(error = %e, "ACME (cluster) lock not renewed for its whole TTL");
                    return ClusterAcmeError::LockLost;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ACME (cluster) lock renewal failed; retrying")
                }
            }
        }
    }

    async fn order_under_lock(&self, shutdown: &CancellationToken) -> Result<(), ClusterAcmeError> {
        let s = &self.shared;
        // Another node may have stored a certificate between our read and our lock.
        let stored = self.load_and_deploy().await?;
        if !self.needs_order(&stored) {
            return Ok(());
        }
        let outcome = tokio::select! {
            r = self.order() => r,
            e = self.keep_lock() => Err(e),
            _ = shutdown.cancelled() => Err(ClusterAcmeError::Shutdown),
        };
        let mut conn = s.conn.clone();
        match outcome {
            Ok(pem) => {
                // Served here at once, even if storing fails below.
                let info = self.deploy(&pem)?;
                let _: () = redis::cmd("SET")
                    .arg(&s.keys.cert)
                    .arg(&pem)
                    .query_async(&mut conn)
                    .await?;
                let _: () = redis::cmd("DEL")
                    .arg(&s.keys.failures)
                    .arg(&s.keys.retry)
                    .query_async(&mut conn)
                    .await?;
                s.status.send_modify(|st| {
                    st.issued += 1;
                    st.last_error = None;
                });
                self.emit(ClusterAcmeEvent::Issued(info));
                self.publish("cert").await;
                Ok(())
            }
            Err(ClusterAcmeError::Shutdown) => Err(ClusterAcmeError::Shutdown),
            Err(e) => {
                let failures: u32 = redis::cmd("INCR")
                    .arg(&s.keys.failures)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or(1);
                let retry_in = Duration::from_secs(
                    1u64 << failures.saturating_sub(1).min(MAX_BACKOFF_EXPONENT),
                );
                let _: Result<(), _> = redis::cmd("SET")
                    .arg(&s.keys.retry)
                    .arg(failures)
                    .arg("PX")
                    .arg(millis(retry_in))
                    .query_async(&mut conn)
                    .await;
                let error = e.to_string();
                s.status.send_modify(|st| {
                    st.failed_orders += 1;
                    st.last_error = Some(error.clone());
                });
                self.emit(ClusterAcmeEvent::OrderFailed { error, retry_in });
                Ok(())
            }
        }
    }

    /// One order from `newOrder` to the downloaded chain; returns key + chain as PEM.
    async fn order(&self) -> Result<Vec<u8>, ClusterAcmeError> {
        let s = &self.shared;
        let client = &s.settings.client_config;
        let directory = Directory::discover(client, &s.settings.directory_url).await?;
        let key = self.account_key().await?;
        let account =
            Account::create_with_keypair(client, directory, &s.settings.contact, &key).await?;

        let mut params = CertificateParams::new(s.settings.domains.clone())?;
        params.distinguished_name = DistinguishedName::new();
        let cert_key = rcgen::KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let csr = params.serialize_request(&cert_key)?;

        let (order_url, mut order) = account
            .new_order(client, s.settings.domains.clone())
            .await?;
        s.status.send_modify(|st| st.orders_placed += 1);
        self.emit(ClusterAcmeEvent::OrderPlaced {
            order_url: order_url.clone(),
        });
        let mut processing_polls = 0u32;
        loop {
            order = match order.status {
                OrderStatus::Pending => {
                    for url in &order.authorizations {
                        self.authorize(&account, url).await?;
                    }
                    account.order(client, &order_url).await?
                }
                OrderStatus::Processing => {
                    // 0.25 s doubling, ten polls (about 4 min), as rustls-acme polls.
                    if processing_polls == 10 {
                        return Err(OrderError::ProcessingTimeout(order).into());
                    }
                    tokio::time::sleep(Duration::from_millis(250 << processing_polls)).await;
                    processing_polls += 1;
                    account.order(client, &order_url).await?
                }
                OrderStatus::Ready => account.finalize(client, &order.finalize, csr.der()).await?,
                OrderStatus::Valid { certificate } => {
                    let chain = account.certificate(client, certificate).await?;
                    return Ok(format!("{}\n{chain}", cert_key.serialize_pem()).into_bytes());
                }
                OrderStatus::Invalid => return Err(OrderError::BadOrder(order).into()),
            };
        }
    }

    /// The account key from Redis, or a new one stored there (`SET NX`: when two nodes
    /// race, both use the one that won).
    async fn account_key(&self) -> Result<Vec<u8>, ClusterAcmeError> {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let get = redis::cmd("GET").arg(&s.keys.account).clone();
        if let Some(key) = get.query_async::<Option<Vec<u8>>>(&mut conn).await? {
            return Ok(key);
        }
        let generated = Account::generate_key_pair();
        let set: redis::Value = redis::cmd("SET")
            .arg(&s.keys.account)
            .arg(&generated)
            .arg("NX")
            .query_async(&mut conn)
            .await?;
        if !matches!(set, redis::Value::Nil) {
            self.emit(ClusterAcmeEvent::AccountKeyCreated);
            return Ok(generated);
        }
        let stored: Option<Vec<u8>> = get.query_async(&mut conn).await?;
        stored.ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::Client,
                "the account key vanished right after SET NX refused ours",
            ))
            .into()
        })
    }

    /// One authorization over TLS-ALPN-01: the challenge certificate goes to Redis and to
    /// every node *before* the CA is told to validate, so whichever node it dials can answer.
    async fn authorize(&self, account: &Account, url: &str) -> Result<(), ClusterAcmeError> {
        let client = &self.shared.settings.client_config;
        let auth = account.auth(client, url).await?;
        let (domain, challenge_url) = match auth.status {
            AuthStatus::Pending => {
                let Identifier::Dns(domain) = auth.identifier.clone();
                let challenge = auth
                    .challenges
                    .iter()
                    .find(|c| c.typ == ChallengeType::TlsAlpn01)
                    .ok_or(AcmeError::NoTlsAlpn01Challenge)?;
                let pem = challenge_cert_pem(&account.key_pair, &challenge.token, &domain)?;
                self.publish_challenge(&domain, &pem).await?;
                if let Err(e) = account.challenge(client, &challenge.url).await {
                    self.withdraw_challenge(&domain).await;
                    return Err(e.into());
                }
                (domain, challenge.url.clone())
            }
            AuthStatus::Valid => return Ok(()),
            _ => return Err(OrderError::BadAuth(auth).into()),
        };
        let result = self
            .await_validation(account, url, &domain, &challenge_url)
            .await;
        self.withdraw_challenge(&domain).await;
        result
    }

    async fn await_validation(
        &self,
        account: &Account,
        url: &str,
        domain: &str,
        challenge_url: &str,
    ) -> Result<(), ClusterAcmeError> {
        let client = &self.shared.settings.client_config;
        // 0.25 s doubling, eight polls (about a minute in all).
        for i in 0..8u32 {
            tokio::time::sleep(Duration::from_millis(250 << i)).await;
            let auth = account.auth(client, url).await?;
            match auth.status {
                // Asking again is harmless and helps a CA that dropped the first request
                // (rustls-acme does the same).
                AuthStatus::Pending => account.challenge(client, challenge_url).await?,
                AuthStatus::Valid => {
                    self.emit(ClusterAcmeEvent::ChallengeValidated {
                        domain: domain.to_owned(),
                    });
                    return Ok(());
                }
                _ => return Err(OrderError::BadAuth(auth).into()),
            }
        }
        Err(OrderError::TooManyAttemptsAuth(domain.to_owned()).into())
    }

    async fn publish_challenge(&self, domain: &str, pem: &str) -> Result<(), ClusterAcmeError> {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let _: () = redis::cmd("SET")
            .arg(s.keys.challenge(domain))
            .arg(pem)
            .arg("PX")
            .arg(millis(s.settings.timing.challenge_ttl))
            .query_async(&mut conn)
            .await?;
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&s.keys.channel)
            .arg(format!("challenge {domain}"))
            .query_async(&mut conn)
            .await?;
        self.emit(ClusterAcmeEvent::ChallengePublished {
            domain: domain.to_owned(),
        });
        Ok(())
    }

    /// Best effort: the key's TTL removes it anyway.
    async fn withdraw_challenge(&self, domain: &str) {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let deleted: Result<i64, _> = redis::cmd("DEL")
            .arg(s.keys.challenge(domain))
            .query_async(&mut conn)
            .await;
        if let Err(e) = deleted {
            tracing::warn!(%domain, error = %e, "ACME (cluster) challenge not removed from Redis; it expires by itself");
        }
        self.publish(&format!("challenge-done {domain}")).await;
    }

    /// Best effort: every node polls as well.
    async fn publish(&self, message: &str) {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let published: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(&s.keys.channel)
            .arg(message)
            .query_async(&mut conn)
            .await;
        if let Err(e) = published {
            tracing::warn!(error = %e, message, "ACME (cluster) notification not published; other nodes see the change at their next poll");
        }
    }

    /// Subscribes to the channel, resubscribing after every loss; each (re)subscription
    /// triggers a reload, which catches whatever was published while it was down.
    async fn follow_notifications(self, shutdown: CancellationToken) {
        let s = &self.shared;
        let mut delay = Duration::from_millis(100);
        loop {
            let subscribed = tokio::time::timeout(Duration::from_secs(5), async {
                let mut pubsub = s.client.get_async_pubsub().await?;
                pubsub.subscribe(&s.keys.channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            match subscribed {
                Ok(Ok(pubsub)) => {
                    delay = Duration::from_millis(100);
                    s.wake.notify_one();
                    let mut messages = pubsub.into_on_message();
                    loop {
                        let message = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            m = messages.next() => m,
                        };
                        let Some(message) = message else { break };
                        let text =
                            String::from_utf8_lossy(message.get_payload_bytes()).into_owned();
                        self.on_notification(&text).await;
                    }
                    tracing::warn!("ACME (cluster) notification subscription lost; resubscribing");
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "ACME (cluster) cannot subscribe yet"),
                Err(_) => tracing::debug!("ACME (cluster) subscribing timed out"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn on_notification(&self, text: &str) {
        let s = &self.shared;
        if text == "cert" {
            s.wake.notify_one();
        } else if let Some(domain) = text.strip_prefix("challenge ") {
            // A copy for when Redis cannot be read at validation time.
            let _ = self.challenge().fetch(domain).await;
        } else if let Some(domain) = text.strip_prefix("challenge-done ")
            && let Ok(mut cache) = s.challenges.lock()
        {
            cache.remove(&domain.to_ascii_lowercase());
        }
    }

    fn redis_ok(&self) {
        if self.shared.redis_down.swap(false, Ordering::SeqCst) {
            self.shared.status.send_modify(|st| {
                st.redis_reachable = true;
                if st
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("Redis: "))
                {
                    st.last_error = None;
                }
            });
            self.emit(ClusterAcmeEvent::RedisAvailable);
        }
    }

    /// Logged once per outage, not at every poll.
    fn redis_failed(&self, e: &redis::RedisError) {
        if !self.shared.redis_down.swap(true, Ordering::SeqCst) {
            self.shared.status.send_modify(|st| {
                st.redis_reachable = false;
                st.last_error = Some(format!("Redis: {e}"));
            });
            self.emit(ClusterAcmeEvent::RedisUnavailable {
                error: e.to_string(),
            });
        }
    }

    fn emit(&self, event: ClusterAcmeEvent) {
        let node = &self.shared.settings.node_id;
        match &event {
            ClusterAcmeEvent::CertificateDeployed(info) => tracing::info!(
                %node, serial = %info.serial, not_after = %rfc3339(info.not_after),
                renew_at = %rfc3339(info.renew_at(self.shared.settings.timing.renew_before)),
                "ACME (cluster) serving the certificate from Redis"
            ),
            ClusterAcmeEvent::LockAcquired => tracing::info!(
                %node, lock = %self.shared.keys.lock,
                "ACME (cluster) lock taken: this node orders"
            ),
            ClusterAcmeEvent::AccountKeyCreated => tracing::info!(
                %node, key = %self.shared.keys.account,
                "ACME (cluster) account key generated and stored in Redis"
            ),
            ClusterAcmeEvent::OrderPlaced { order_url } => tracing::info!(
                %node, domains = ?self.shared.settings.domains, order = %order_url,
                "ACME (cluster) order placed"
            ),
            ClusterAcmeEvent::ChallengePublished { domain } => tracing::info!(
                %node, %domain,
                "ACME (cluster) TLS-ALPN-01 challenge published in Redis; asking the CA to validate"
            ),
            ClusterAcmeEvent::ChallengeValidated { domain } => {
                tracing::info!(%node, %domain, "ACME (cluster) authorization valid")
            }
            ClusterAcmeEvent::Issued(info) => tracing::info!(
                %node, serial = %info.serial, not_after = %rfc3339(info.not_after),
                "ACME (cluster) certificate issued and stored in Redis"
            ),
            ClusterAcmeEvent::OrderFailed { error, retry_in } => tracing::error!(
                %node, %error, retry_in_secs = retry_in.as_secs(),
                "ACME (cluster) order failed; no node orders again before the delay"
            ),
            ClusterAcmeEvent::RedisUnavailable { error } => tracing::warn!(
                %node, %error,
                "ACME (cluster) Redis unavailable: the certificate in service stays, no order meanwhile"
            ),
            ClusterAcmeEvent::RedisAvailable => {
                tracing::info!(%node, "ACME (cluster) Redis reachable again")
            }
        }
        let _ = self.shared.events.send(event);
    }
}

impl ChallengeSource {
    /// The config for a validation handshake (ALPN `acme-tls/1`, no client auth) carrying
    /// the challenge certificate for `server_name`, or `None` when no challenge is open for
    /// it. Reads Redis (this is the CA, not an agent: waiting is fine) and falls back to
    /// the copy a notification brought when Redis does not answer.
    pub async fn config_for(&self, server_name: Option<&str>) -> Option<Arc<ServerConfig>> {
        let domain = server_name?;
        let key = match tokio::time::timeout(CHALLENGE_READ_TIMEOUT, self.fetch(domain)).await {
            Ok(Ok(Some(found))) => found,
            Ok(Ok(None)) => {
                // Debug only: anyone can offer `acme-tls/1`, and must not fill the log.
                tracing::debug!(%domain, "ACME (cluster) validation handshake, but no challenge is open for this name");
                return None;
            }
            Ok(Err(e)) => {
                tracing::warn!(%domain, error = %e, "ACME (cluster) challenge not read from Redis; trying the copy from the last notification");
                self.cached(domain)?
            }
            Err(_) => {
                tracing::warn!(%domain, "ACME (cluster) challenge read from Redis timed out; trying the copy from the last notification");
                self.cached(domain)?
            }
        };
        let mut config = ServerConfig::builder_with_provider(self.shared.settings.provider.clone())
            .with_safe_default_protocol_versions()
            .ok()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(FixedCert(key)));
        config.alpn_protocols = vec![ACME_TLS_ALPN_NAME.to_vec()];
        Some(Arc::new(config))
    }

    fn cached(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        let cache = self.shared.challenges.lock().ok()?;
        cache.get(&domain.to_ascii_lowercase()).cloned()
    }

    /// Reads the challenge for `domain` from Redis into the local copy.
    async fn fetch(&self, domain: &str) -> Result<Option<Arc<CertifiedKey>>, ClusterAcmeError> {
        let s = &self.shared;
        let domain = domain.to_ascii_lowercase();
        let mut conn = s.conn.clone();
        let pem: Option<Vec<u8>> = redis::cmd("GET")
            .arg(s.keys.challenge(&domain))
            .query_async(&mut conn)
            .await?;
        let key = match pem {
            Some(pem) => Some(Arc::new(
                certified_key(&pem, &s.settings.provider, KeyCheck::None).map_err(|reason| {
                    ClusterAcmeError::BadCertificate {
                        key: s.keys.challenge(&domain),
                        reason,
                    }
                })?,
            )),
            None => None,
        };
        if let Ok(mut cache) = s.challenges.lock() {
            match &key {
                Some(key) => cache.insert(domain, key.clone()),
                None => cache.remove(&domain),
            };
        }
        Ok(key)
    }
}

/// What Redis holds for the configured names.
#[derive(Debug)]
enum Stored {
    Missing,
    /// Present but not parseable, or key and certificate do not match: replaced by an order.
    Unusable,
    Usable(CertificateInfo),
}

/// The certificate in service; swapped without a lock on the handshake path.
#[derive(Debug, Default)]
struct ClusterResolver {
    current: ArcSwapOption<CertifiedKey>,
}

impl ResolvesServerCert for ClusterResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The TLS-ALPN-01 certificate exactly as rustls-acme's `Account::tls_alpn_01` makes it
/// (RFC 8737 §3: the domain as its only SAN, the critical acmeIdentifier extension holding
/// SHA-256 of the key authorization), but with a key we can store in Redis: the library
/// keeps its key inside a `CertifiedKey`, out of reach. PEM: key first, then certificate.
fn challenge_cert_pem(
    account_key: &EcdsaKeyPair,
    token: &str,
    domain: &str,
) -> Result<String, rcgen::Error> {
    let digest = key_authorization_sha256(account_key, token);
    let mut params = CertificateParams::new(vec![domain.to_owned()])?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest.as_ref())];
    let key = rcgen::KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    Ok(format!("{}{}", key.serialize_pem(), cert.pem()))
}

/// SHA-256 of `token.thumbprint` (RFC 8555 §8.1), the thumbprint being RFC 7638's over the
/// P-256 JWK: its required members in lexicographic order, no whitespace (what
/// rustls-acme's private `jose::key_authorization_sha256` computes).
fn key_authorization_sha256(account_key: &EcdsaKeyPair, token: &str) -> ring::digest::Digest {
    use ring::signature::KeyPair as _;
    // An uncompressed P-256 point: 0x04, then x and y of 32 bytes each.
    let (x, y) = account_key.public_key().as_ref()[1..].split_at(32);
    let jwk = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        BASE64_URL_SAFE_NO_PAD.encode(x),
        BASE64_URL_SAFE_NO_PAD.encode(y)
    );
    let thumbprint = ring::digest::digest(&ring::digest::SHA256, jwk.as_bytes());
    let key_authorization = format!("{token}.{}", BASE64_URL_SAFE_NO_PAD.encode(thumbprint));
    ring::digest::digest(&ring::digest::SHA256, key_authorization.as_bytes())
}

/// How much [`certified_key`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyCheck {
    /// The served certificate: the key must match the leaf (rustls parses the leaf).
    KeyMatchesLeaf,
    /// A challenge certificate: rustls' parser refuses its critical acmeIdentifier
    /// extension (`UnsupportedCriticalExtension`), so the pair is taken as the ordering
    /// node made it, as rustls-acme does with its own.
    None,
}

/// Key (PKCS#8) + chain from PEM.
fn certified_key(
    pem: &[u8],
    provider: &CryptoProvider,
    check: KeyCheck,
) -> Result<CertifiedKey, String> {
    let blocks = pem::parse_many(pem).map_err(|e| format!("bad PEM: {e}"))?;
    let key = blocks
        .iter()
        .find(|b| b.tag() == "PRIVATE KEY")
        .ok_or("no PRIVATE KEY block")?;
    let chain: Vec<CertificateDer<'static>> = blocks
        .iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.contents().to_vec()))
        .collect();
    if chain.is_empty() {
        return Err("no CERTIFICATE block".into());
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.contents().to_vec()));
    match check {
        KeyCheck::KeyMatchesLeaf => {
            CertifiedKey::from_der(chain, key, provider).map_err(|e| e.to_string())
        }
        KeyCheck::None => {
            let key = provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| e.to_string())?;
            Ok(CertifiedKey::new(chain, key))
        }
    }
}

fn certificate_info(pem: &[u8]) -> Result<CertificateInfo, String> {
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
        serial: x509.raw_serial_as_string(),
        names,
        not_before: time(x509.validity().not_before)?,
        not_after: time(x509.validity().not_after)?,
    })
}

fn random_hex() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    // SystemRandom fails only without an OS entropy source; a clock-derived token is still
    // unique enough to tell two nodes' locks apart.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
        bytes = nanos.to_le_bytes();
    }
    crate::digest::hex(&bytes)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p256_account_key() -> EcdsaKeyPair {
        let pkcs8 = Account::generate_key_pair();
        EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap()
    }

    /// The acmeIdentifier extension (OID 1.3.6.1.5.5.7.1.31) of a certificate.
    fn acme_identifier(der: &[u8]) -> Vec<u8> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical, "RFC 8737 §3: the extension is critical");
        ext.value.to_vec()
    }

    #[test]
    fn challenge_certificate_matches_the_one_rustls_acme_makes() {
        let account = Account {
            key_pair: p256_account_key(),
            directory: Directory {
                new_nonce: String::new(),
                new_account: String::new(),
                new_order: String::new(),
            },
            kid: String::new(),
        };
        let challenge: rustls_acme::acme::Challenge = serde_json::from_value(
            serde_json::json!({"type": "tls-alpn-01", "url": "https://ca/c/1", "token": "tok-123"}),
        )
        .unwrap();
        let (_, theirs) = account
            .tls_alpn_01(std::slice::from_ref(&challenge), "gw.example.com".into())
            .unwrap();
        let ours = challenge_cert_pem(&account.key_pair, "tok-123", "gw.example.com").unwrap();
        let provider = rustls::crypto::ring::default_provider();
        let ours = certified_key(ours.as_bytes(), &provider, KeyCheck::None).unwrap();
        assert_eq!(
            acme_identifier(&ours.cert[0]),
            acme_identifier(&theirs.cert[0])
        );
        let info = certificate_info(
            pem::encode(&pem::Pem::new("CERTIFICATE", ours.cert[0].to_vec())).as_bytes(),
        )
        .unwrap();
        assert_eq!(info.names, vec!["gw.example.com"]);
        // Another token gives another digest.
        let other = challenge_cert_pem(&account.key_pair, "tok-456", "gw.example.com").unwrap();
        let other = certified_key(other.as_bytes(), &provider, KeyCheck::None).unwrap();
        assert_ne!(
            acme_identifier(&other.cert[0]),
            acme_identifier(&theirs.cert[0])
        );
    }

    #[test]
    fn renewal_is_30_days_ahead_or_a_third_of_a_short_lifetime() {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let days = |n| time::Duration::days(n);
        let long = CertificateInfo {
            serial: "01".into(),
            names: vec![],
            not_before: now,
            not_after: now + days(90),
        };
        let month = Duration::from_secs(30 * 86_400);
        assert_eq!(long.renew_at(month), now + days(60));
        let five_years = CertificateInfo {
            not_after: now + days(5 * 365),
            ..long.clone()
        };
        assert_eq!(five_years.renew_at(month), now + days(5 * 365 - 30));
        let short = CertificateInfo {
            not_after: now + time::Duration::seconds(30),
            ..long
        };
        assert_eq!(short.renew_at(month), now + time::Duration::seconds(20));
    }

    #[test]
    fn keys_share_one_hash_tag_and_separate_directories() {
        let settings = |directory: &str| ClusterAcmeSettings {
            domains: vec!["gw.example.com".into()],
            directory_url: directory.into(),
            contact: vec!["mailto:ops@example.com".into()],
            client_config: Arc::new(
                ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            ),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            node_id: "n1".into(),
            key_prefix: "agentgate".into(),
            timing: Timing::default(),
        };
        let prod = Keys::new(&settings(
            rustls_acme::acme::LETS_ENCRYPT_PRODUCTION_DIRECTORY,
        ));
        let staging = Keys::new(&settings(rustls_acme::acme::LETS_ENCRYPT_STAGING_DIRECTORY));
        for key in [
            &prod.account,
            &prod.cert,
            &prod.lock,
            &prod.retry,
            &prod.failures,
            &prod.challenge("GW.example.com"),
        ] {
            assert!(key.starts_with("agentgate:{acme}:"), "{key}");
        }
        assert_eq!(
            prod.challenge("GW.example.com"),
            "agentgate:{acme}:challenge:gw.example.com"
        );
        assert_ne!(prod.cert, staging.cert);
        assert_ne!(prod.account, staging.account);
    }
}
