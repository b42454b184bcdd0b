//! `agentgate bench`: the fleet simulator and the handshake benchmark run against a real
//! gateway with a small fleet, and their JSON reports say what happened. No timing is
//! asserted (timings live in BENCHMARKS.md); a broken simulator fails here.

mod common;

use std::process::Command;

use serde_json::Value;

use common::*;

/// Runs `agentgate bench <args>` in a child process (so `--shards` can start its own
/// shard processes) and returns its JSON report.
async fn bench(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentgate"));
    cmd.arg("bench")
        .args(args)
        .arg("--json")
        .arg(&json)
        .env_remove("API_KEY");
    let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "bench failed: {}\n{}",
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
    let server = TestServer::start().await;
    let target = server.addr.to_string();
    let pid = std::process::id().to_string();
    let report = bench(&[
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
        "60",
    ])
    .await;
    assert_eq!(report["failures"], serde_json::json!({}), "{report:#}");
    assert_eq!(num(&report, "/uploads/count"), 20.0);
    assert_eq!(num(&report, "/connect/connected"), 20.0);
    assert_eq!(num(&report, "/connected_at_end"), 20.0);
    assert!(num(&report, "/connect/latency/p50_ms") > 0.0);
    assert!(num(&report, "/connect/rate/per_sec") > 0.0);
    // 20 agents, one heartbeat every 0.5 s for 3 s: about 120, each acked.
    let sent = num(&report, "/heartbeats/sent");
    assert!(sent >= 80.0, "{report:#}");
    assert_eq!(num(&report, "/heartbeats/acked"), sent);
    assert!(num(&report, "/heartbeats/latency/p99_ms") > 0.0);
    assert_eq!(num(&report, "/commands/sent"), 15.0);
    assert_eq!(num(&report, "/commands/ok"), 15.0);
    assert_eq!(num(&report, "/commands/acked_by_agents"), 15.0);
    assert!(num(&report, "/commands/latency/max_ms") > 0.0);
    assert!(num(&report, "/gateway/peak_rss_kib") > 0.0);
    // The agents were really in the gateway's registry.
    assert_eq!(server.store.len(), 20);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_upload_their_certificate_and_complete_full_handshakes() {
    let server = TestServer::start().await;
    let target = server.addr.to_string();
    let report = bench(&[
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
    ])
    .await;
    assert_eq!(report["failures"], serde_json::json!({}), "{report:#}");
    assert!(num(&report, "/rate/count") > 0.0, "{report:#}");
    assert!(num(&report, "/handshake_latency/p50_ms") > 0.0);
    assert!(num(&report, "/total_latency/max_ms") > 0.0);
    server.stop().await;
}

#[test]
fn targets_off_this_machine_are_refused() {
    let output = Command::new(env!("CARGO_BIN_EXE_agentgate"))
        .args([
            "bench",
            "handshakes",
            "--target",
            "192.0.2.1:443",
            "--secs",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("only loopback targets"));
}
