//! ACME in a cluster (`agentgate::cluster::acme`) against a real Pebble and a real
//! redis-server: several nodes in this process, each with its own TLS listener on
//! 127.0.0.1 that answers `acme-tls/1` handshakes through its `ChallengeSource` and serves
//! the managed certificate otherwise. Pebble validates TLS-ALPN-01 on node B's port only,
//! whichever node placed the order.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use agentgate::cluster::acme::{ClusterAcme, ClusterAcmeSettings, ClusterAcmeStatus, Timing};
use agentgate::config::{ClusterMode, RawCluster, RawConfig, TlsMode};
use common::pebble::{Pebble, free_port, https_get};
use common::redis::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_orders_the_other_answers_the_validation_and_a_late_node_serves_without_ordering()
{
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    // Node B's port is the one Pebble dials for TLS-ALPN-01.
    let port_b = free_port();
    let listener_b = TcpListener::bind(("127.0.0.1", port_b)).await.unwrap();
    let mut pebble = Pebble::prepare(&dir.path().join("pebble"), port_b, None);
    pebble.start().await;
    let shutdown = CancellationToken::new();

    // A starts alone and takes the lock; B starts once A's order is placed, so the order
    // is A's while the CA's validation handshake reaches B.
    let a = Node::start("node-a", any_port().await, &redis, &pebble, &shutdown);
    let placed = a
        .wait("A placed its order", |s| s.orders_placed >= 1, 60)
        .await;
    assert_eq!(placed.orders_placed, 1);
    let b = Node::start("node-b", listener_b, &redis, &pebble, &shutdown);

    let issued = a
        .wait("A obtained the certificate", |s| s.issued >= 1, 90)
        .await;
    let serial = issued
        .certificate
        .expect("A serves what it obtained")
        .serial;
    let b_status = b
        .wait(
            "B serves the certificate",
            ClusterAcmeStatus::has_certificate,
            30,
        )
        .await;
    assert_eq!(b_status.certificate.unwrap().serial, serial);
    assert_eq!(b_status.orders_placed, 0, "B never ordered");
    assert!(
        b.validations.load(Ordering::SeqCst) >= 1,
        "Pebble validated on B's port with the challenge A published"
    );
    assert_eq!(a.validations.load(Ordering::SeqCst), 0);
    assert_eq!(pebble.new_orders(), 1, "one newOrder at the CA");

    // Both listeners serve the same certificate, trusted through Pebble's root.
    let root = pebble.root_pem().await;
    let leaf_a = served_leaf(a.port, &root).await;
    let leaf_b = served_leaf(b.port, &root).await;
    assert_eq!(leaf_a, leaf_b);
    assert_eq!(serial_of(&leaf_a), serial);

    // A node started later serves it at once, without ordering.
    let c = Node::start("node-c", any_port().await, &redis, &pebble, &shutdown);
    let c_status = c
        .wait(
            "C serves the certificate",
            ClusterAcmeStatus::has_certificate,
            30,
        )
        .await;
    assert_eq!(c_status.orders_placed, 0);
    assert_eq!(served_leaf(c.port, &root).await, leaf_a);
    assert_eq!(pebble.new_orders(), 1, "still one newOrder");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_starting_together_place_one_order_and_serve_one_certificate() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let port_b = free_port();
    let listener_b = TcpListener::bind(("127.0.0.1", port_b)).await.unwrap();
    let mut pebble = Pebble::prepare(&dir.path().join("pebble"), port_b, None);
    pebble.start().await;
    let shutdown = CancellationToken::new();

    let a = Node::start("node-a", any_port().await, &redis, &pebble, &shutdown);
    let b = Node::start("node-b", listener_b, &redis, &pebble, &shutdown);
    let a_status = a
        .wait(
            "A serves a certificate",
            ClusterAcmeStatus::has_certificate,
            90,
        )
        .await;
    let b_status = b
        .wait(
            "B serves a certificate",
            ClusterAcmeStatus::has_certificate,
            90,
        )
        .await;
    assert_eq!(
        a_status.orders_placed + b_status.orders_placed,
        1,
        "exactly one node ordered: {a_status:?} {b_status:?}"
    );
    assert_eq!(pebble.new_orders(), 1);
    assert!(b.validations.load(Ordering::SeqCst) >= 1);
    let root = pebble.root_pem().await;
    assert_eq!(
        served_leaf(a.port, &root).await,
        served_leaf(b.port, &root).await
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_is_ordered_once_for_the_cluster_and_every_node_swaps_to_the_new_certificate() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let port_b = free_port();
    let listener_b = TcpListener::bind(("127.0.0.1", port_b)).await.unwrap();
    // 30 s certificates: renewal is due a third of the lifetime before notAfter (after 20 s).
    let mut pebble = Pebble::prepare(&dir.path().join("pebble"), port_b, Some(30));
    pebble.start().await;
    let shutdown = CancellationToken::new();

    let a = Node::start("node-a", any_port().await, &redis, &pebble, &shutdown);
    let b = Node::start("node-b", listener_b, &redis, &pebble, &shutdown);
    let first = a
        .wait(
            "A serves a certificate",
            ClusterAcmeStatus::has_certificate,
            90,
        )
        .await
        .certificate
        .unwrap();
    b.wait(
        "B serves the first certificate",
        |s| s.certificate.as_ref() == Some(&first),
        30,
    )
    .await;
    assert_eq!(pebble.new_orders(), 1);

    let renewed = |s: &ClusterAcmeStatus| {
        s.certificate
            .as_ref()
            .is_some_and(|c| c.serial != first.serial)
    };
    let a_status = a
        .wait("A serves the renewed certificate", renewed, 60)
        .await;
    let b_status = b
        .wait("B serves the renewed certificate", renewed, 30)
        .await;
    assert_eq!(a_status.certificate, b_status.certificate);
    assert_eq!(
        a_status.orders_placed + b_status.orders_placed,
        2,
        "one first order and one renewal for the whole cluster"
    );
    assert_eq!(pebble.new_orders(), 2);
    let root = pebble.root_pem().await;
    let leaf = served_leaf(a.port, &root).await;
    assert_eq!(serial_of(&leaf), a_status.certificate.unwrap().serial);
    assert_eq!(served_leaf(b.port, &root).await, leaf);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_the_certificate_in_service_and_a_restart_orders_nothing() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start();
    let port_b = free_port();
    let listener_b = TcpListener::bind(("127.0.0.1", port_b)).await.unwrap();
    let mut pebble = Pebble::prepare(&dir.path().join("pebble"), port_b, None);
    pebble.start().await;
    let shutdown = CancellationToken::new();

    let a = Node::start("node-a", any_port().await, &redis, &pebble, &shutdown);
    let b = Node::start("node-b", listener_b, &redis, &pebble, &shutdown);
    a.wait(
        "A serves a certificate",
        ClusterAcmeStatus::has_certificate,
        90,
    )
    .await;
    b.wait(
        "B serves a certificate",
        ClusterAcmeStatus::has_certificate,
        30,
    )
    .await;
    let root = pebble.root_pem().await;
    let leaf = served_leaf(a.port, &root).await;

    // Persist what Redis holds, then take it away.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    drop(conn);
    redis.kill();
    a.wait("A notices the outage", |s| !s.redis_reachable, 30)
        .await;
    b.wait("B notices the outage", |s| !s.redis_reachable, 30)
        .await;
    assert_eq!(served_leaf(a.port, &root).await, leaf, "still served");
    assert_eq!(served_leaf(b.port, &root).await, leaf, "still served");

    redis.restart();
    a.wait("A reaches Redis again", |s| s.redis_reachable, 30)
        .await;
    b.wait("B reaches Redis again", |s| s.redis_reachable, 30)
        .await;
    let c = Node::start("node-c", any_port().await, &redis, &pebble, &shutdown);
    c.wait(
        "C serves the certificate",
        ClusterAcmeStatus::has_certificate,
        30,
    )
    .await;
    assert_eq!(served_leaf(c.port, &root).await, leaf);
    assert_eq!(pebble.new_orders(), 1, "the outage caused no order");
    shutdown.cancel();
}

/// The whole gateway, twice: `tls.mode = "acme"` with `[cluster]` on one Redis. Pebble
/// validates on B's listener only, so a certificate at all proves that B's accept path
/// answered the challenge, whichever node placed the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_in_a_cluster_order_once_and_serve_one_certificate() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let port_b = free_port();
    let listener_b = TcpListener::bind(("127.0.0.1", port_b)).await.unwrap();
    let mut pebble = Pebble::prepare(&dir.path().join("pebble"), port_b, None);
    pebble.start().await;

    let gateway = |name: &str| {
        let mut raw = RawConfig {
            api_keys: vec!["k".into()],
            data_dir: dir.path().join(name).join("data"),
            ..RawConfig::default()
        };
        raw.store.dir = dir.path().join(name).join("certs");
        raw.tls.mode = TlsMode::Acme;
        raw.tls.acme.domains = vec!["localhost".into()];
        raw.tls.acme.directory = pebble.directory_url();
        raw.tls.acme.directory_ca_file = Some(pebble.listener_ca_file.clone());
        raw.cluster = Some(RawCluster {
            redis_url: Some(redis.url()),
            node_id: Some(name.into()),
            mode: ClusterMode::Standalone,
            ..RawCluster::default()
        });
        raw.validate("test").unwrap()
    };
    let a = agentgate::Gateway::start(gateway("node-a")).await.unwrap();
    let b = agentgate::Gateway::start(gateway("node-b")).await.unwrap();
    let (acme_a, acme_b) = (
        a.server_cert()
            .cluster_acme()
            .expect("cluster ACME")
            .clone(),
        b.server_cert()
            .cluster_acme()
            .expect("cluster ACME")
            .clone(),
    );
    let listener_a = any_port().await;
    let port_a = listener_a.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let served_a = tokio::spawn(a.serve(listener_a, stop.clone().cancelled_owned()));
    let served_b = tokio::spawn(b.serve(listener_b, stop.clone().cancelled_owned()));

    let wait = |acme: ClusterAcme, what: &'static str| async move {
        let mut status = acme.status();
        tokio::time::timeout(
            Duration::from_secs(120),
            status.wait_for(ClusterAcmeStatus::has_certificate),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: no certificate within 120 s"))
        .unwrap()
        .clone()
    };
    let status_a = wait(acme_a, "node A").await;
    let status_b = wait(acme_b, "node B").await;
    assert_eq!(
        status_a.orders_placed + status_b.orders_placed,
        1,
        "one order for the cluster: {status_a:?} {status_b:?}"
    );
    assert_eq!(pebble.new_orders(), 1, "one newOrder at the CA");
    let root = pebble.root_pem().await;
    let leaf_a = served_leaf(port_a, &root).await;
    assert_eq!(leaf_a, served_leaf(port_b, &root).await, "one certificate");
    assert_eq!(
        serial_of(&leaf_a),
        status_a.certificate.unwrap().serial,
        "the one in Redis"
    );
    for port in [port_a, port_b] {
        let (status, body) = https_get(port, "/ready", &root).await.unwrap();
        assert_eq!(status, 200, "node on {port}: {body}");
    }
    stop.cancel();
    for served in [served_a, served_b] {
        tokio::time::timeout(Duration::from_secs(20), served)
            .await
            .expect("drained")
            .unwrap()
            .unwrap();
    }
}

/// One node: a cluster ACME manager and a TLS listener using it.
struct Node {
    port: u16,
    acme: ClusterAcme,
    /// Validation handshakes (ALPN `acme-tls/1`) this listener completed.
    validations: Arc<AtomicUsize>,
}

impl Node {
    fn start(
        name: &str,
        listener: TcpListener,
        redis: &RedisServer,
        pebble: &Pebble,
        shutdown: &CancellationToken,
    ) -> Node {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&pebble.listener_ca_file).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let client_config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let settings = ClusterAcmeSettings {
            domains: vec!["localhost".into()],
            directory_url: pebble.directory_url(),
            contact: vec!["mailto:ops@example.com".into()],
            client_config: Arc::new(client_config),
            provider: provider.clone(),
            node_id: name.into(),
            key_prefix: "agentgate".into(),
            timing: Timing {
                poll_interval: Duration::from_secs(1),
                lock_ttl: Duration::from_secs(15),
                challenge_ttl: Duration::from_secs(60),
                ..Timing::default()
            },
        };
        let client = redis::Client::open(redis.url()).unwrap();
        let acme = ClusterAcme::start(client, settings, shutdown.child_token()).unwrap();
        let server_config = Arc::new(
            ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(acme.resolver()),
        );
        let validations = Arc::new(AtomicUsize::new(0));
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(serve(
            listener,
            server_config,
            acme.clone(),
            validations.clone(),
            shutdown.child_token(),
        ));
        Node {
            port,
            acme,
            validations,
        }
    }

    async fn wait(
        &self,
        what: &str,
        pred: impl FnMut(&ClusterAcmeStatus) -> bool,
        secs: u64,
    ) -> ClusterAcmeStatus {
        let mut status = self.acme.status();
        match tokio::time::timeout(Duration::from_secs(secs), status.wait_for(pred)).await {
            Ok(seen) => seen.unwrap().clone(),
            Err(_) => panic!(
                "not within {secs} s: {what}; status {:?}",
                self.acme.status().borrow()
            ),
        }
    }
}

/// The accept path the gateway will have: a validation handshake is recognised on the
/// ClientHello and answered with the shared challenge; anything else gets the certificate.
async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    acme: ClusterAcme,
    validations: Arc<AtomicUsize>,
    shutdown: CancellationToken,
) {
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
        };
        let (config, challenge, validations) =
            (config.clone(), acme.challenge(), validations.clone());
        tokio::spawn(async move {
            let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
            let Ok(start) = acceptor.await else { return };
            let hello = start.client_hello();
            let validation = rustls_acme::is_tls_alpn_challenge(&hello);
            let server_name = hello.server_name().map(str::to_owned);
            if validation {
                let Some(config) = challenge.config_for(server_name.as_deref()).await else {
                    eprintln!("validation handshake for {server_name:?}: no challenge open");
                    return;
                };
                match start.into_stream(config).await {
                    Ok(_) => {
                        validations.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => eprintln!("validation handshake for {server_name:?} failed: {e}"),
                }
            } else if let Ok(mut tls) = start.into_stream(config).await {
                // Hold the connection until the client closes it.
                let _ = tls.read(&mut [0u8; 1]).await;
            }
        });
    }
}

async fn any_port() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// The leaf DER a listener serves for `localhost`, to a client trusting `root_pem` only.
async fn served_leaf(port: u16, root_pem: &str) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake trusting Pebble's root");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn serial_of(der: &[u8]) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(der)
        .unwrap()
        .1
        .raw_serial_as_string()
}
