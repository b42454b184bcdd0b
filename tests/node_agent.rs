//! Agents in Node: the npm `socket.io-client` 4 (tests/agents/node/agent.mjs) connecting
//! with a client certificate through its `ca`, `cert` and `key` options, over WebSocket
//! only, polling only, and polling with the upgrade to WebSocket; and refused without an
//! uploaded certificate. A peer that nobody here wrote (DESIGN.md, "Testing").
//!
//! Needs `node` on PATH and the npm packages in tests/agents/node/node_modules, which
//! `./scripts/test.sh` installs from the committed package-lock.json.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// tests/agents/node: package.json, package-lock.json, agent.mjs, node_modules/.
fn node_agent_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/agents/node")
}

/// `node` from PATH; fails (never skips) with what to do when it or the npm packages are
/// missing.
fn node() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("node"))
            .find(|p| p.is_file())
    });
    let node = found.expect(
        "`node` is not on PATH: install Node 20 (Debian: nodejs and npm), or run \
         ./scripts/test.sh, which installs it",
    );
    let client = node_agent_dir().join("node_modules/socket.io-client/package.json");
    assert!(
        client.is_file(),
        "{} is missing: run ./scripts/test.sh, which installs the Node agent's npm packages \
         (npm ci in tests/agents/node)",
        client.display()
    );
    node
}

/// Runs agent.mjs against `server` with `args`, presenting `agent`'s certificate if given
/// (written next to the server's files); returns its exit code and JSON lines.
async fn node_agent(
    server: &TestServer,
    agent: Option<&AgentCert>,
    args: &[&str],
) -> (i32, Vec<Value>) {
    let mut cmd = tokio::process::Command::new(node());
    cmd.arg(node_agent_dir().join("agent.mjs"))
        .arg("--url")
        .arg(server.url())
        .arg("--ca")
        .arg(server.ca_file());
    if let Some(a) = agent {
        let (cert, key) = write_key_pair(server.dir.path(), a);
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    cmd.args(args).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("node agent hung")
        .expect("node agent could not be started");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    if !out.status.success() {
        eprintln!(
            "agent.mjs stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (out.status.code().unwrap_or(-1), lines)
}

fn write_key_pair(dir: &Path, agent: &AgentCert) -> (PathBuf, PathBuf) {
    let stem = format!("node-{}-{}", agent.agent_id, &agent.fingerprint_hex()[..8]);
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, &agent.cert_pem).unwrap();
    std::fs::write(&key, &agent.key_pem).unwrap();
    (cert, key)
}

/// The lines whose `event` is `name`.
fn events<'a>(lines: &'a [Value], name: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["event"] == name).collect()
}

/// Checks that each heartbeat got its ack from the gateway, for `agent_id`.
fn assert_acks(lines: &[Value], n: usize, agent_id: &str) {
    let acks = events(lines, "heartbeat_ack");
    assert_eq!(acks.len(), n, "{lines:#?}");
    for ack in acks {
        assert_eq!(ack["data"]["status"], "ok", "{ack}");
        assert_eq!(ack["data"]["agent_id"], agent_id, "{ack}");
        assert!(ack["data"]["received_at"].is_string(), "{ack}");
    }
}

/// `agentgate_heartbeats_total` from `/metrics` (absent counts as 0).
async fn heartbeats_total(server: &TestServer) -> f64 {
    let (status, body) = server.api("GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let text = body.as_str().expect("metrics are text").to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("agentgate_heartbeats_total "))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn node_agent_heartbeat_over_websocket_only_is_acknowledged_with_its_agent_id() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("node-ws-1");
    assert_eq!(server.upload(&agent).await.0, 200);

    let (code, lines) = node_agent(
        &server,
        Some(&agent),
        &["--transports", "websocket", "--heartbeats", "2"],
    )
    .await;

    assert_eq!(code, 0, "{lines:#?}");
    assert_eq!(lines[0]["event"], "connected", "{lines:#?}");
    assert_eq!(lines[0]["transport"], "websocket");
    assert_eq!(lines[0]["opened_with"], "websocket");
    assert!(events(&lines, "upgraded").is_empty(), "{lines:#?}");
    assert_acks(&lines, 2, "node-ws-1");
    assert!(
        events(&lines, "heartbeat_ack")
            .iter()
            .all(|a| a["transport"] == "websocket")
    );
    assert_eq!(heartbeats_total(&server).await, 2.0);
    server.stop().await;
}

#[tokio::test]
async fn node_agent_opens_with_polling_then_upgrades_to_websocket_and_heartbeats() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("node-up-1");
    assert_eq!(server.upload(&agent).await.0, 200);

    // socket.io-client's default: polling first, then the upgrade (as python-socketio).
    let (code, lines) = node_agent(
        &server,
        Some(&agent),
        &[
            "--transports",
            "polling,websocket",
            "--wait-upgrade",
            "--heartbeats",
            "2",
        ],
    )
    .await;

    assert_eq!(code, 0, "{lines:#?}");
    let connected = events(&lines, "connected");
    assert_eq!(connected.len(), 1, "{lines:#?}");
    assert_eq!(
        connected[0]["opened_with"], "polling",
        "the session must open over polling: {lines:#?}"
    );
    let upgraded = events(&lines, "upgraded");
    assert_eq!(upgraded.len(), 1, "the upgrade must happen: {lines:#?}");
    assert_eq!(upgraded[0]["transport"], "websocket");
    assert!(events(&lines, "upgrade_error").is_empty(), "{lines:#?}");
    assert_acks(&lines, 2, "node-up-1");
    // --wait-upgrade: the heartbeats went over the upgraded session.
    assert!(
        events(&lines, "heartbeat_ack")
            .iter()
            .all(|a| a["transport"] == "websocket"),
        "{lines:#?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn node_agent_heartbeat_over_polling_only_is_acknowledged() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("node-poll-1");
    assert_eq!(server.upload(&agent).await.0, 200);

    // Every long-polling request is its own HTTPS request with the client certificate;
    // the session binding (README, "How an agent is let in", 4) lets them all through.
    let (code, lines) = node_agent(
        &server,
        Some(&agent),
        &["--transports", "polling", "--heartbeats", "2"],
    )
    .await;

    assert_eq!(code, 0, "{lines:#?}");
    assert_eq!(lines[0]["event"], "connected", "{lines:#?}");
    assert_eq!(lines[0]["transport"], "polling");
    assert!(events(&lines, "upgraded").is_empty(), "{lines:#?}");
    assert_acks(&lines, 2, "node-poll-1");
    assert!(
        events(&lines, "heartbeat_ack")
            .iter()
            .all(|a| a["transport"] == "polling")
    );
    server.stop().await;
}

#[tokio::test]
async fn node_agent_without_certificate_is_refused_and_nothing_is_acknowledged() {
    let server = TestServer::start().await;

    // No certificate: the TLS handshake completes (client auth is optional) and the
    // Socket.IO connect is refused with the reason, on either transport.
    for transports in ["websocket", "polling,websocket"] {
        let (code, lines) = node_agent(
            &server,
            None,
            &["--transports", transports, "--heartbeats", "1"],
        )
        .await;
        assert_eq!(code, 3, "{transports}: {lines:#?}");
        let refused = events(&lines, "connect_error");
        assert_eq!(refused.len(), 1, "{transports}: {lines:#?}");
        assert!(
            refused[0]["message"]
                .as_str()
                .unwrap_or("")
                .contains("agent certificate required"),
            "{transports}: {lines:#?}"
        );
        assert!(events(&lines, "connected").is_empty(), "{lines:#?}");
        assert!(events(&lines, "heartbeat_ack").is_empty(), "{lines:#?}");
    }

    // A certificate that was never uploaded: the handshake itself fails.
    let stranger = server.pki.agent("node-stranger");
    let (code, lines) = node_agent(&server, Some(&stranger), &["--transports", "websocket"]).await;
    assert_eq!(code, 3, "{lines:#?}");
    assert_eq!(events(&lines, "connect_error").len(), 1, "{lines:#?}");
    assert!(events(&lines, "heartbeat_ack").is_empty(), "{lines:#?}");

    assert_eq!(heartbeats_total(&server).await, 0.0);
    assert_eq!(server.agents.registry.anonymous_sessions(), 0);
    server.stop().await;
}
