//! One page of the list endpoints, `GET /agent/certificates` and `GET /agents`, with
//! 10^6 stored certificates and 10^5 agents in the registry (half of them connected and
//! fresh, half connected and stale), through the API router (`tower::ServiceExt::oneshot`,
//! no socket): first page, a page from the middle, and each status filter.
//!
//! The certificates are clones of one real rcgen certificate with distinct agent ids and
//! fingerprints, indexed in memory with `CertStore::open_with_indexed` (no file written).
//!
//! Under `cargo test --all-targets` (criterion's test mode, no `--bench` argument) each
//! benchmark runs once with 10^3 certificates and 10^2 agents.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

use std::hint::black_box;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use time::OffsetDateTime;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use agentgate::agents::Agents;
use agentgate::agents::registry::{Heartbeat, Session};
use agentgate::api::{self, ApiKeys, AppState, MetricsExposure};
use agentgate::certgen;
use agentgate::clock::Clock;
use agentgate::config::RawConfig;
use agentgate::enroll::Enrollment;
use agentgate::identity::{AgentId, Fingerprint};
use agentgate::metrics::Metrics;
use agentgate::store::{CertStore, StoredCert, cert};
use agentgate::tls::ServerCert;

const KEY: &str = "bench-key";

fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// (certificates, registered agents)
fn sizes() -> (usize, usize) {
    if benchmarking() {
        (1_000_000, 100_000)
    } else {
        (1_000, 100)
    }
}

fn agent_id(i: usize) -> AgentId {
    AgentId::parse(&format!("agent-{i:07}")).expect("valid agent id")
}

fn template() -> StoredCert {
    let id = AgentId::parse("template").expect("valid agent id");
    let generated = certgen::generate(&id, 365).expect("rcgen generates a P-256 cert");
    let der = cert::single_certificate_der(&generated.cert_pem).expect("one PEM certificate");
    cert::parse_for(id, der).expect("rcgen certificate parses")
}

fn router(rt: &tokio::runtime::Runtime, certs: usize, agents: usize) -> Router {
    let _guard = rt.enter();
    let template = template();
    let stored: Vec<StoredCert> = (0..certs)
        .map(|i| {
            let mut c = template.clone();
            c.agent_id = agent_id(i);
            let mut fp = [0u8; 32];
            fp[..8].copy_from_slice(&(i as u64).to_le_bytes());
            c.fingerprint = Fingerprint(fp);
            c
        })
        .collect();
    let dir = tempfile::tempdir().expect("temporary directory");
    let store =
        CertStore::open_with_indexed(&dir.path().join("certs"), stored).expect("store directory");
    let config = RawConfig {
        api_keys: vec!["bench-api-key".into()],
        data_dir: dir.path().join("data"),
        ..RawConfig::default()
    }
    .validate("bench")
    .expect("bench configuration");
    let metrics = Metrics::new();
    let (_layer, handle) = Agents::build(&config, metrics.clone(), Clock::system());
    let now = OffsetDateTime::now_utc();
    // Every (certs / agents)-th agent is registered; odd ones went silent 5 minutes ago.
    let step = certs / agents;
    for n in 0..agents {
        let id = agent_id(n * step);
        let at = if n % 2 == 0 {
            now
        } else {
            now - Duration::from_secs(300)
        };
        let session = Session {
            sid: socketioxide::socket::Sid::new(),
            fingerprint: None,
            remote_addr: "127.0.0.1:1".parse().expect("socket address"),
            connected_at: at,
        };
        handle.registry.connect(Some(&id), session);
        let payload =
            serde_json::json!({"cpu_usage": 0.5, "memory_usage": 256, "disk_usage": 1024});
        handle.registry.heartbeat(
            &id,
            Heartbeat {
                received_at: at,
                payload,
            },
        );
    }
    let enrollment = rt
        .block_on(Enrollment::open(
            &config.data_dir,
            Clock::system(),
            store.clone(),
        ))
        .expect("enrollment database");
    let tokens = rt
        .block_on(agentgate::api::ApiTokens::open(
            &store,
            &config.data_dir,
            None,
            Clock::system(),
        ))
        .expect("token database");
    let revocations = store.revocations().clone();
    let state = AppState {
        store,
        agents: handle,
        api_keys: ApiKeys::all_scopes(&[KEY]),
        metrics,
        enrollment,
        tokens,
        server_cert: ServerCert::from_config(&config, agentgate::tls::provider())
            .expect("self-signed server certificate"),
        clock: Clock::system(),
        requests: TaskTracker::new(),
        body_limits: config.limits.body,
        proxy: agentgate::proxy::Proxy::new(
            &config,
            ApiKeys::all_scopes(&[KEY]),
            revocations,
            Metrics::new(),
        )
        .expect("gateway without routes"),
    };
    // The temporary directory holds only the self-signed server certificate and an empty
    // store directory; the in-memory index does not need it after this point.
    std::mem::forget(dir);
    api::router(state, &[], MetricsExposure::MainListener)
}

async fn get(router: &Router, uri: &str) -> usize {
    let req = Request::get(uri)
        .header("authorization", format!("Bearer {KEY}"))
        .body(Body::empty())
        .expect("request");
    let res = router
        .clone()
        .oneshot(req)
        .await
        .expect("infallible router");
    assert_eq!(res.status(), StatusCode::OK, "{uri}");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    body.len()
}

fn bench_pages(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (certs, agents) = sizes();
    let started = std::time::Instant::now();
    let router = router(&rt, certs, agents);
    eprintln!(
        "{certs} certificates and {agents} agents indexed in {:.2?}",
        started.elapsed()
    );
    let middle = format!("{}", agent_id(certs / 2));
    let cases = [
        (
            "certificates-first",
            "/agent/certificates?limit=100".to_owned(),
        ),
        (
            "certificates-middle",
            format!("/agent/certificates?limit=100&after={middle}"),
        ),
        ("agents-all-first", "/agents?limit=100".to_owned()),
        (
            "agents-all-middle",
            format!("/agents?limit=100&after={middle}"),
        ),
        (
            "agents-connected",
            "/agents?limit=100&status=connected".to_owned(),
        ),
        ("agents-stale", "/agents?limit=100&status=stale".to_owned()),
        (
            "agents-disconnected",
            "/agents?limit=100&status=disconnected".to_owned(),
        ),
    ];
    let mut group = c.benchmark_group(format!("pages/{certs}-certs-{agents}-agents"));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    for (name, uri) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| black_box(rt.block_on(get(&router, uri))))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_pages);
criterion_main!(benches);
