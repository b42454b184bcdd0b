//! `agentgate-bench`: the fleet simulator, the handshake benchmark and the proxy benchmark
//! run against a real gateway (in this process, so `--gateway-pid` is our own pid) with a
//! small fleet or a few requests, and their JSON reports must add up: every agent uploaded
//! and connected, every heartbeat, command and proxied request answered, no failure. Nothing about speed is asserted: timings and
//! throughput live in BENCHMARKS.md, and a slow machine must not fail here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

use std::path::Path;
use std::process::Command;

use agentgate::config::RawConfig;
use agentgate::store::CertStore;
use serde_json::{Value, json};
use tokio::sync::oneshot;

const API_KEY: &str = "bench-test-api-key-0123456789";

/// A gateway on 127.0.0.1:0 with the embedded default (a self-signed server certificate
/// in its data directory: the simulator does not check the server certificate).
struct Gateway {
    addr: std::net::SocketAddr,
    store: CertStore,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A gateway whose configuration `adjust` may change first.
    async fn start_with(adjust: impl FnOnce(&mut RawConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut raw = RawConfig {
            api_keys: vec![API_KEY.into()],
            data_dir: dir.path().join("data"),
            ..RawConfig::default()
        };
        raw.store.dir = dir.path().join("certs");
        adjust(&mut raw);
        let config = raw.validate("test").unwrap();
        let gateway = agentgate::Gateway::start(config).await.unwrap();
        let store = gateway.store().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.serve(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            store,
            stop,
            task,
            _dir: dir,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Runs `agentgate-bench <args>` in a child process (so `--shards` can start its own shard
/// processes) and returns its JSON report.
async fn bench(args: &[&str], dir: &Path) -> Value {
    let json = dir.join("report.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentgate-bench"));
    cmd.args(args)
        .arg("--json")
        .arg(&json)
        .env_remove("API_KEY");
    let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "agentgate-bench failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn num(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} missing in {v:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_fleet_in_two_shards_connects_heartbeats_and_acks_commands() {
    let gateway = Gateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let target = gateway.addr.to_string();
    let pid = std::process::id().to_string();
    let report = bench(
        &[
            "fleet",
            "--target",
            &target,
            "--api-key",
            API_KEY,
            "--agents",
            "20",
            "--shards",
            "2",
            "--connect-rate",
            "200",
            "--heartbeat-secs",
            "0.5",
            "--steady-secs",
            "3",
            "--command-rate",
            "5",
            "--gateway-pid",
            &pid,
            "--max-secs",
            "120",
        ],
        dir.path(),
    )
    .await;
    assert_eq!(report["failures"], json!({}), "{report:#}");
    assert_eq!(num(&report, "/uploads/count"), 20.0);
    assert_eq!(num(&report, "/connect/attempted"), 20.0);
    assert_eq!(num(&report, "/connect/connected"), 20.0);
    assert_eq!(num(&report, "/connect/latency/count"), 20.0);
    assert_eq!(num(&report, "/connected_at_end"), 20.0);
    // Every heartbeat sent was acknowledged and timed (how many were sent is a rate:
    // BENCHMARKS.md).
    let sent = num(&report, "/heartbeats/sent");
    assert!(sent > 0.0, "{report:#}");
    assert_eq!(num(&report, "/heartbeats/acked"), sent);
    assert_eq!(num(&report, "/heartbeats/latency/count"), sent);
    // 5 commands per second for 3 s: the count is fixed, whatever the speed.
    assert_eq!(num(&report, "/commands/sent"), 15.0);
    assert_eq!(num(&report, "/commands/ok"), 15.0);
    assert_eq!(num(&report, "/commands/acked_by_agents"), 15.0);
    assert_eq!(num(&report, "/commands/latency/count"), 15.0);
    assert_eq!(num(&report, "/gateway/pid"), f64::from(std::process::id()));
    assert!(num(&report, "/gateway/peak_rss_kib") > 0.0);
    // The agents were really in the gateway's store.
    assert_eq!(gateway.store.len(), 20);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_upload_their_certificate_and_complete_full_handshakes() {
    let gateway = Gateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let target = gateway.addr.to_string();
    let report = bench(
        &[
            "handshakes",
            "--target",
            &target,
            "--api-key",
            API_KEY,
            "--label",
            "agentgate",
            "--concurrency",
            "4",
            "--secs",
            "1",
        ],
        dir.path(),
    )
    .await;
    assert_eq!(report["failures"], json!({}), "{report:#}");
    let completed = num(&report, "/rate/count");
    assert!(completed > 0.0, "{report:#}");
    assert_eq!(num(&report, "/handshake_latency/count"), completed);
    assert_eq!(num(&report, "/total_latency/count"), completed);
    assert_eq!(gateway.store.len(), 1);
    gateway.stop().await;
}

/// `agentgate-bench upstream` in a child process (killed on drop), and its address.
struct UpstreamProc(std::process::Child);

impl UpstreamProc {
    fn start() -> (Self, String) {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_agentgate-bench"))
            .args(["upstream", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().strip_prefix("http=").unwrap().to_owned();
        (Self(child), addr)
    }
}

impl Drop for UpstreamProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The proxy benchmark's two halves: its upstream, and the open-loop generator against it
/// directly and through a gateway route; every request answered, in both rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_latency_direct_and_through_a_route() {
    let (_upstream, addr) = UpstreamProc::start();
    let route = serde_json::from_value(json!({
        "name": "open", "prefix": "/open", "upstreams": [format!("http://{addr}")],
        "strip_prefix": true, "auth": "none",
    }))
    .unwrap();
    let gateway = Gateway::start_with(|raw| raw.routes = vec![route]).await;
    let dir = tempfile::tempdir().unwrap();
    let direct = format!("direct=http://{addr}/x");
    let through = format!("agentgate=https://{}/open/x", gateway.addr);
    let report = bench(
        &[
            "proxy",
            "--target",
            &direct,
            "--target",
            &through,
            "--rates",
            "40,80",
            "--secs",
            "0.5",
            "--warmup-secs",
            "0.1",
            "--rounds",
            "2",
            "--connections",
            "2",
        ],
        dir.path(),
    )
    .await;
    let measurements = report["measurements"].as_array().unwrap();
    assert_eq!(measurements.len(), 2 * 2 * 2, "{report:#}");
    for m in measurements {
        assert_eq!(m["failures"], json!({}), "{report:#}");
        // Every released request is answered: the count is the rate times the time.
        let expected = num(m, "/rate") * 0.5;
        assert_eq!(num(m, "/count"), expected, "{m:#}");
        assert!(num(m, "/latency_us/p50") > 0.0, "{m:#}");
    }
    let compared = report["compared"].as_array().unwrap();
    assert_eq!(compared.len(), 4, "{report:#}");
    assert_eq!(report["baseline"], "direct");
    gateway.stop().await;
}

#[test]
fn targets_off_this_machine_are_refused() {
    for mode in ["handshakes", "fleet"] {
        let output = Command::new(env!("CARGO_BIN_EXE_agentgate-bench"))
            .args([mode, "--target", "192.0.2.1:443", "--api-key", "k"])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("only loopback targets"), "{mode}: {stderr}");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_agentgate-bench"))
        .args(["proxy", "--target", "x=http://192.0.2.1:80/"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("only loopback targets"), "proxy: {stderr}");
}
