//! Start-up load: `CertStore::open` on a directory of 10^5 certificate files, each a
//! distinct self-signed ECDSA P-256 certificate whose CN is its file name (what load
//! checks), as `agentgate cert generate` makes them.
//!
//! Generating 10^5 certificates takes a while, so the directory is made once under the
//! target directory (`target/bench-fixtures/store-100000`) and reused by later runs; a
//! `COMPLETE` marker (not a `.pem`, so load ignores it) says the generation finished.
//! Delete the directory to regenerate. Files are read from the page cache after the
//! first sample: this measures parsing and indexing, not the disk.
//!
//! Under `cargo test --all-targets` (criterion's test mode, no `--bench` argument) the
//! directory holds 100 files instead, so the test suite stays fast.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};

use agentgate::identity::AgentId;
use agentgate::store::CertStore;

fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// `target/` (or `CARGO_TARGET_DIR`): the bench executable is `<target>/<profile>/deps/x`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the bench executable");
    exe.ancestors()
        .nth(3)
        .expect("the executable lies in <target>/<profile>/deps")
        .to_path_buf()
}

/// The fixture of `n` files, generated on the first run with every core.
fn fixture(n: usize) -> PathBuf {
    let dir = target_dir()
        .join("bench-fixtures")
        .join(format!("store-{n}"));
    let marker = dir.join("COMPLETE");
    if marker.exists() {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fixture directory can be created");
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for t in 0..threads {
            let dir = &dir;
            s.spawn(move || {
                for i in (t..n).step_by(threads) {
                    write_agent(dir, &format!("agent-{i:06}"));
                }
            });
        }
    });
    std::fs::write(&marker, n.to_string()).expect("marker can be written");
    eprintln!(
        "generated {n} certificate files in {:.2?} ({threads} threads) into {}",
        started.elapsed(),
        dir.display()
    );
    dir
}

fn write_agent(dir: &Path, agent_id: &str) {
    let id = AgentId::parse(agent_id).expect("valid agent id");
    // Ten years, so that a cached fixture stays valid (load does not check validity).
    let cert = agentgate::certgen::generate(&id, 3650).expect("rcgen generates a cert");
    std::fs::write(dir.join(format!("{agent_id}.pem")), cert.cert_pem)
        .expect("fixture file can be written");
}

fn bench_open(c: &mut Criterion) {
    let n = if benchmarking() { 100_000 } else { 100 };
    let dir = fixture(n);
    let mut group = c.benchmark_group("startup_load");
    // A multi-second operation: ten samples of one load each (flat sampling; the default
    // linear mode would run 1 + 2 + ... + 10 loads).
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(20));
    group.bench_with_input(BenchmarkId::new("CertStore::open", n), &n, |b, &n| {
        b.iter(|| {
            let (store, skipped) = CertStore::open(&dir).expect("fixture directory opens");
            assert_eq!((store.len(), skipped.len()), (n, 0));
            store
        })
    });
    group.finish();
}

criterion_group!(benches, bench_open);
criterion_main!(benches);
