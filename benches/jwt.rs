//! The per-request cost of a JWT route's check: `JwtVerifier::verify` on an HS256 token as
//! the replaced gateway's token function mints them (jti, project, service, iat, exp),
//! with the route's two claims, and on a token refused for its signature. Issue 10's
//! target: under 5 µs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{EncodingKey, Header};

use agentgate::auth::{JwtVerifier, Revocations};
use agentgate::config::JwtConfig;

fn bench(c: &mut Criterion) {
    let secret = "bench-secret-0123456789abcdef";
    let revocations = Revocations::new();
    // A realistic revocation set: a few thousand revoked tokens.
    for i in 0..5_000 {
        revocations.revoke(&format!("revoked-{i}"), i64::MAX);
    }
    let verifier = JwtVerifier::load(
        &JwtConfig {
            leeway: Duration::from_secs(5),
            hs256_secret: Some(secret.into()),
            keys: Vec::new(),
            jwks_file: None,
        },
        revocations,
    )
    .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = serde_json::json!({
        "jti": "6f1c1c3e-6d4f-4b7e-9b8a-2f4f1b2c3d4e", "project": "captionacc",
        "service": "prefect", "iat": now, "exp": now + 90 * 86400,
    });
    let token = jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let forged = jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(b"another secret"),
    )
    .unwrap();
    let route: BTreeMap<String, Vec<String>> = [
        ("project".to_owned(), vec!["captionacc".to_owned()]),
        (
            "service".to_owned(),
            vec!["prefect".to_owned(), "api".to_owned()],
        ),
    ]
    .into_iter()
    .collect();
    assert!(verifier.verify(&token, &route, now).is_ok());
    assert!(verifier.verify(&forged, &route, now).is_err());
    let mut group = c.benchmark_group("jwt");
    group.bench_function("hs256_accepted", |b| {
        b.iter(|| verifier.verify(black_box(&token), &route, now).unwrap())
    });
    group.bench_function("hs256_bad_signature", |b| {
        b.iter(|| {
            verifier
                .verify(black_box(&forged), &route, now)
                .unwrap_err()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
