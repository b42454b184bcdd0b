//! The handshake-time cost of letting an agent in: `AgentCertVerifier::decide` for a
//! stored and an unknown leaf with 10, 10^4 and 10^6 certificates in the store, the rustls
//! entry point `verify_client_cert`, the handshake signature proof, and a whole TLS 1.3
//! handshake with a client certificate in memory (no socket), for scale.
//!
//! The large stores are built with `CertStore::open_with_indexed`: the looked-up
//! certificates are real rcgen certificates, the filler are clones of one real
//! certificate with distinct agent ids and distinct pseudo-random fingerprints (the index
//! keys on the fingerprint, so the filler occupies the maps exactly as real entries do).
//!
//! Under `cargo test --all-targets` (criterion's test mode, no `--bench` argument) each
//! benchmark runs once and the store sizes stop at 10^4, so the test suite stays fast.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;

use agentgate::certgen;
use agentgate::identity::{AgentId, Fingerprint};
use agentgate::store::{CertStore, StoredCert, cert};
use agentgate::tls::verifier::AgentCertVerifier;

/// Real certificates looked up in turn by the `stored-rotating` case: enough that their
/// index entries do not all stay in the CPU caches as one repeated lookup does.
const ROTATING: usize = 4096;

fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn store_sizes() -> Vec<usize> {
    if benchmarking() {
        vec![10, 10_000, 1_000_000]
    } else {
        vec![10, 10_000]
    }
}

/// A real agent certificate: its PEM, key (PKCS#8 DER) and parsed `StoredCert`.
struct Real {
    stored: StoredCert,
    key_pkcs8: Vec<u8>,
}

fn real(agent_id: &str) -> Real {
    let id = AgentId::parse(agent_id).expect("valid agent id");
    let generated = certgen::generate(&id, 365).expect("rcgen generates a P-256 cert");
    let der = cert::single_certificate_der(&generated.cert_pem).expect("one PEM certificate");
    let stored = cert::parse_for(id, der).expect("rcgen certificate parses");
    let key_pkcs8 = pem::parse(&generated.key_pem)
        .expect("rcgen key PEM")
        .into_contents();
    Real { stored, key_pkcs8 }
}

/// `n` entries: the `real` ones, then clones of `template` with distinct ids and
/// fingerprints (splitmix64 output, so they spread over the hash table like SHA-256).
fn synthetic_store(n: usize, real: &[StoredCert], template: &StoredCert) -> CertStore {
    let mut certs: Vec<StoredCert> = real.iter().take(n).cloned().collect();
    let mut state = 0x5eed_u64;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in certs.len()..n {
        let mut fp = [0u8; 32];
        for chunk in fp.chunks_mut(8) {
            chunk.copy_from_slice(&next().to_le_bytes());
        }
        let mut filler = template.clone();
        filler.agent_id = AgentId::parse(&format!("filler-{i:07}")).expect("valid agent id");
        filler.fingerprint = Fingerprint(fp);
        certs.push(filler);
    }
    let dir = std::env::temp_dir().join("agentgate-bench-empty-store");
    CertStore::open_with_indexed(&dir, certs).expect("store directory can be created")
}

fn now() -> UnixTime {
    UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock after 1970"),
    )
}

fn verifier(store: CertStore) -> AgentCertVerifier {
    AgentCertVerifier::new(
        store,
        agentgate::tls::provider().signature_verification_algorithms,
    )
}

fn bench_decide(c: &mut Criterion) {
    let sizes = store_sizes();
    let rotating = if benchmarking() { ROTATING } else { 8 };
    let started = std::time::Instant::now();
    let reals: Vec<Real> = (0..rotating)
        .map(|i| real(&format!("agent-{i:05}")))
        .collect();
    let unknown = real("not-stored");
    eprintln!(
        "generated {} real certificates in {:.2?}",
        rotating + 1,
        started.elapsed()
    );
    let stored: Vec<StoredCert> = reals.iter().map(|r| r.stored.clone()).collect();
    let leaf = stored[0].der.clone();
    let now = now();

    let mut group = c.benchmark_group("verifier/decide");
    for &n in &sizes {
        let started = std::time::Instant::now();
        let store = synthetic_store(n, &stored, &stored[0]);
        eprintln!("built a store of {n} in {:.2?}", started.elapsed());
        assert_eq!(store.len(), n);
        let v = verifier(store);
        group.bench_with_input(BenchmarkId::new("stored", n), &n, |b, _| {
            b.iter(|| {
                v.decide(black_box(&leaf), now)
                    .expect("stored leaf is accepted")
            })
        });
        group.bench_with_input(BenchmarkId::new("unknown", n), &n, |b, _| {
            b.iter(|| {
                v.decide(black_box(&unknown.stored.der), now)
                    .expect_err("unknown leaf is refused")
            })
        });
        if n >= rotating {
            let leaves: Vec<Arc<[u8]>> = stored.iter().map(|s| s.der.clone()).collect();
            let mut i = 0;
            group.bench_with_input(BenchmarkId::new("stored-rotating", n), &n, |b, _| {
                b.iter(|| {
                    i = (i + 1) % leaves.len();
                    v.decide(black_box(&leaves[i]), now)
                        .expect("stored leaf is accepted")
                })
            });
        }
        if n == *sizes.last().expect("at least one size") {
            // The entry point rustls calls, with the error mapping around `decide`.
            let end_entity = CertificateDer::from(&leaf[..]);
            group.bench_with_input(BenchmarkId::new("verify_client_cert", n), &n, |b, _| {
                b.iter(|| {
                    v.verify_client_cert(black_box(&end_entity), &[], now)
                        .expect("stored leaf is accepted")
                })
            });
            let fingerprint_input = leaf.clone();
            group.bench_function("sha256-of-leaf", |b| {
                b.iter(|| Fingerprint::of_der(black_box(&fingerprint_input)))
            });
        }
    }
    group.finish();

    bench_signature_and_handshake(c, &reals[0], &stored, &sizes);
}

/// The proof of possession rustls asks for after `verify_client_cert`, and a whole
/// handshake, to put the decision's cost in proportion.
fn bench_signature_and_handshake(
    c: &mut Criterion,
    agent: &Real,
    stored: &[StoredCert],
    sizes: &[usize],
) {
    use rustls::internal::msgs::codec::Codec;
    use rustls::{DigitallySignedStruct, SignatureScheme};

    let n = *sizes.last().expect("at least one size");
    let v = Arc::new(verifier(synthetic_store(n, stored, &stored[0])));
    let mut group = c.benchmark_group("verifier/handshake");

    // A TLS 1.3 CertificateVerify signature: 64 spaces, context string, 0, transcript hash.
    let mut message = vec![0x20u8; 64];
    message.extend_from_slice(b"TLS 1.3, client CertificateVerify\0");
    message.extend_from_slice(&[0xab; 32]);
    let rng = ring::rand::SystemRandom::new();
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &agent.key_pkcs8,
        &rng,
    )
    .expect("rcgen P-256 key");
    let sig = key.sign(&rng, &message).expect("signing works");
    // DigitallySignedStruct has no public constructor; decode its wire form
    // (scheme u16, length u16, signature).
    let mut wire = u16::from(SignatureScheme::ECDSA_NISTP256_SHA256)
        .to_be_bytes()
        .to_vec();
    wire.extend_from_slice(&u16::try_from(sig.as_ref().len()).unwrap().to_be_bytes());
    wire.extend_from_slice(sig.as_ref());
    let dss = DigitallySignedStruct::read_bytes(&wire).expect("well-formed");
    let leaf = CertificateDer::from(agent.stored.der.to_vec());
    group.bench_function("verify_tls13_signature/p256", |b| {
        b.iter(|| {
            v.verify_tls13_signature(black_box(&message), &leaf, &dss)
                .expect("signature verifies")
        })
    });

    let (server_config, client_config) = handshake_configs(v.clone(), agent);
    group.sample_size(20);
    group.bench_with_input(
        BenchmarkId::new("tls13-full-handshake-with-client-cert", n),
        &n,
        |b, _| b.iter(|| handshake(&server_config, &client_config)),
    );
    group.finish();
}

fn handshake_configs(
    verifier: Arc<AgentCertVerifier>,
    agent: &Real,
) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let provider = agentgate::tls::provider();
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let server_cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    let certified = rustls::sign::CertifiedKey::from_der(
        vec![server_cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        &provider,
    )
    .unwrap();
    let resolver = Arc::new(agentgate::tls::server_cert::SwappableCert::new(certified));
    let server_config =
        agentgate::tls::server_config(resolver, verifier, provider.clone()).unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let mut client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from(agent.stored.der.to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(agent.key_pkcs8.clone())),
        )
        .unwrap();
    // Resumption skips the client certificate verifier; every iteration must be a full
    // handshake.
    client_config.resumption = rustls::client::Resumption::disabled();
    client_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (server_config, Arc::new(client_config))
}

/// Client and server in one thread, records passed through memory until both are done.
fn handshake(server_config: &Arc<rustls::ServerConfig>, client_config: &Arc<rustls::ClientConfig>) {
    let mut client =
        rustls::ClientConnection::new(client_config.clone(), "localhost".try_into().unwrap())
            .unwrap();
    let mut server = rustls::ServerConnection::new(server_config.clone()).unwrap();
    let mut buf = Vec::with_capacity(4096);
    while client.is_handshaking() || server.is_handshaking() {
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
            server
                .process_new_packets()
                .expect("server accepts the agent");
        }
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client
                .process_new_packets()
                .expect("client accepts the server");
        }
    }
    assert!(server.peer_certificates().is_some());
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_decide
}
criterion_main!(benches);
