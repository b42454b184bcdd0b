//! Replays every fuzz input kept in the repository through the fuzz entry points
//! (`agentgate::fuzzing`, feature `fuzzing`), in the normal test run: the seeds each target
//! starts from (`fuzz/seeds/<target>/`) and every input that once crashed or hung a target
//! (`fixtures/fuzz/<target>/`, kept after the fix). A panic is a regression.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("upload", agentgate::fuzzing::upload),
    ("config", agentgate::fuzzing::config),
    ("verifier", agentgate::fuzzing::verifier),
    ("socketio", agentgate::fuzzing::socketio),
    ("jwt", agentgate::fuzzing::jwt),
];

#[test]
fn every_kept_fuzz_input_runs_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut replayed = 0;
    for (name, target) in TARGETS {
        for dir in [
            root.join("fuzz/seeds").join(name),
            root.join("fixtures/fuzz").join(name),
        ] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let input = std::fs::read(&path).unwrap();
                if std::panic::catch_unwind(|| target(&input)).is_err() {
                    panic!("{name}: {} panics", path.display());
                }
                replayed += 1;
            }
        }
    }
    assert!(
        replayed >= 20,
        "only {replayed} inputs found: seeds missing?"
    );
}

/// The seeds exercise what they are there for: an accepted certificate, a valid config.
#[test]
fn the_seeds_reach_the_accepting_paths() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pem = std::fs::read(root.join("fuzz/seeds/upload/pem")).unwrap();
    let text = String::from_utf8(pem[1..].to_vec()).unwrap();
    agentgate::store::cert::validate_upload("agent-1", &text, 1_811_808_000)
        .expect("the PEM seed is an acceptable agent-1 certificate");
    let example = std::fs::read(root.join("fuzz/seeds/config/example.toml")).unwrap();
    agentgate::fuzzing::config(&example);
}

/// The JWT seeds reach both sides of the check with the fuzz target's keys: the valid
/// tokens of each algorithm are accepted, the classic attacks (alg none, HS256 signed
/// with the RSA public key, a header naming another algorithm) and a token without `exp`
/// are refused.
#[test]
fn the_jwt_seeds_are_accepted_and_refused_as_named() {
    use agentgate::config::{JwtConfig, JwtKeyConfig, PublicKeyAlg};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let key = |file: &str, alg| JwtKeyConfig {
        alg,
        pem_file: root.join("fuzz/keys").join(file),
        kid: None,
    };
    let verifier = agentgate::auth::JwtVerifier::load(
        &JwtConfig {
            leeway: std::time::Duration::from_secs(60),
            hs256_secret: Some("fuzz-secret".to_owned()),
            keys: vec![
                key("rs256.pub.pem", PublicKeyAlg::Rs256),
                key("es256.pub.pem", PublicKeyAlg::Es256),
            ],
            jwks_file: None,
        },
        agentgate::auth::Revocations::new(),
    )
    .unwrap();
    let verify = |name: &str| {
        let token = std::fs::read_to_string(root.join("fuzz/seeds/jwt").join(name)).unwrap();
        verifier.verify(&token, &Default::default(), 1_811_808_000)
    };
    for name in [
        "hs256-valid",
        "rs256-valid",
        "es256-valid",
        "rs256-unknown-kid",
    ] {
        let token = verify(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(token.jti.as_deref(), Some("seed-1"), "{name}");
    }
    for name in [
        "alg-none",
        "alg-none-mixed-case",
        "hs256-signed-with-rsa-public-key",
        "rs256-header-hs256-signature",
        "hs256-expired",
        "hs256-without-exp",
        "hs256-issued-in-future",
        "payload-array",
        "two-parts",
    ] {
        assert!(verify(name).is_err(), "{name} accepted");
    }
}
