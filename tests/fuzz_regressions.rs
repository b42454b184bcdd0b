//! Replays every fuzz input kept in the repository through the fuzz entry points
//! (`agentgate::fuzzing`, feature `fuzzing`), in the normal test run: the seeds each target
//! starts from (`fuzz/seeds/<target>/`) and every input that once crashed or hung a target
//! (`fixtures/fuzz/<target>/`, kept after the fix). A panic is a regression.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 4] = [
    ("upload", agentgate::fuzzing::upload),
    ("config", agentgate::fuzzing::config),
    ("verifier", agentgate::fuzzing::verifier),
    ("socketio", agentgate::fuzzing::socketio),
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
