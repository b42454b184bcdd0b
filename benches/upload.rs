//! The cost of checking an upload (`store::cert::validate_upload`: PEM, X.509, CN, key,
//! webpki parse, self-signature, validity) for the two kinds of agent certificate in the
//! field: ECDSA P-256 (`agentgate cert generate`, rcgen) and RSA-2048 (`openssl req -x509
//! -newkey rsa:2048`, the installers' recipe). The RSA certificate is made at start by the
//! `openssl` command, because rcgen on ring cannot generate RSA keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};

use agentgate::identity::AgentId;
use agentgate::store::cert::validate_upload;
use agentgate_testkit::pki::openssl_self_signed;

fn p256_pem(agent_id: &str) -> String {
    let id = AgentId::parse(agent_id).expect("valid agent id");
    agentgate::certgen::generate(&id, 30)
        .expect("rcgen generates a P-256 cert")
        .cert_pem
}

/// The installers' recipe, `openssl req -x509 -newkey rsa:BITS`, as the tests run it
/// (`agentgate_testkit::pki`).
fn openssl_rsa_pem(agent_id: &str, bits: u32) -> String {
    let dir = tempfile::tempdir().expect("temporary directory");
    let newkey = format!("rsa:{bits}");
    openssl_self_signed(agent_id, &[&newkey], dir.path()).cert_pem
}

fn bench_validate_upload(c: &mut Criterion) {
    let cases = [
        ("p256-rcgen", "agent-p256", p256_pem("agent-p256")),
        (
            "rsa2048-openssl",
            "agent-rsa2048",
            openssl_rsa_pem("agent-rsa2048", 2048),
        ),
    ];
    // After generation: openssl's notBefore is the second it ran.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    let mut group = c.benchmark_group("upload/validate_upload");
    for (name, agent_id, pem) in &cases {
        validate_upload(agent_id, pem, now).expect("the upload is accepted");
        group.bench_function(*name, |b| {
            b.iter(|| validate_upload(black_box(agent_id), black_box(pem), now).unwrap())
        });
    }
    // A refused upload must not cost more than an accepted one: the CN check comes
    // before the signature check.
    let (_, _, pem) = &cases[0];
    group.bench_function("p256-cn-mismatch", |b| {
        b.iter(|| validate_upload(black_box("someone-else"), black_box(pem), now).unwrap_err())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = bench_validate_upload
}
criterion_main!(benches);
