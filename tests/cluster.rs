//! Several gateway nodes on one real redis-server (or a 3-shard Redis Cluster): commands
//! across nodes, one fleet view, a killed node leaving it, a Redis outage and recovery,
//! a foreign Engine.IO sid, and failover through HAProxy with `kill -9`.
//!
//! Every wait is for an event (a listing, a status), with a deadline only as a failure
//! bound; nothing asserts on how long something took (DESIGN.md, "Testing"). Each node
//! has its own file store, so an agent's certificate is uploaded to the node(s) it
//! connects to (the shared store on Redis is another piece of issue 9).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentgate::config::{ClusterMode, RawCluster};
use common::redis::{RedisCluster, RedisServer};
use common::*;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Failure bound of every wait.
const WITHIN: Duration = Duration::from_secs(20);

/// Publication period and node timeout of the test nodes: short, so that a killed node
/// leaves the fleet quickly; no assertion depends on them.
const PUBLISH_MS: u64 = 100;
const NODE_TIMEOUT_MS: u64 = 1000;

fn cluster_section(url: &str, node_id: &str, mode: ClusterMode) -> RawCluster {
    RawCluster {
        redis_url: Some(url.to_owned()),
        node_id: Some(node_id.to_owned()),
        mode,
        publish_interval_ms: Some(PUBLISH_MS),
        node_timeout_ms: Some(NODE_TIMEOUT_MS),
    }
}

/// A gateway node in this process, on `url`'s Redis, sharing `pki` with the others.
async fn node(pki: &Arc<TestPki>, url: &str, node_id: &str, mode: ClusterMode) -> TestServer {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let section = cluster_section(url, node_id, mode);
    let config = test_config(pki, dir.path(), |raw| raw.cluster = Some(section));
    TestServer::start_in(pki.clone(), dir, config)
        .await
        .expect("cluster node starts")
}

/// A wait for an event, polled: fails after [`WITHIN`] naming what it waited for.
struct Patience {
    what: String,
    until: Instant,
}

impl Patience {
    fn new(what: impl Into<String>) -> Self {
        Patience {
            what: what.into(),
            until: Instant::now() + WITHIN,
        }
    }

    /// Called when the event has not happened yet.
    /// `last` is what was seen instead of the event.
    async fn again(&self, last: impl std::fmt::Debug) {
        assert!(
            Instant::now() < self.until,
            "gave up waiting for: {}; last seen: {last:?}",
            self.what
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A WebSocket agent connected to `server`, heartbeat acknowledged (so the session is
/// registered and in its room).
async fn ws_agent(server: &TestServer, agent: &AgentCert) -> Box<SioWs> {
    let SioConnect::Ok(mut sio) = SioWs::connect(server, Some(agent)).await.unwrap() else {
        panic!("agent {} refused", agent.agent_id);
    };
    sio.emit("heartbeat", heartbeat()).await;
    let (event, _) = sio.next_event_within(10).await.expect("heartbeat_ack");
    assert_eq!(event, "heartbeat_ack");
    sio
}

fn heartbeat() -> Value {
    json!({"cpu_usage": 0.5, "memory_usage": 256, "disk_usage": 1024})
}

/// Answers the next command with `{"done": <its data>}`; returns the event name.
fn answer_one(mut sio: Box<SioWs>) -> tokio::task::JoinHandle<(String, Box<SioWs>)> {
    tokio::spawn(async move {
        let (event, data, ack) = sio
            .next_event_with_ack_within(WITHIN.as_secs())
            .await
            .expect("a command");
        sio.ack(ack.expect("an ack id"), json!({ "done": data }))
            .await;
        (event, sio)
    })
}

/// Answers every command on `sio` with `{"done": <data>}` (events without an ack id are
/// read and left) until the task is aborted. For commands sent while Redis heals: a try
/// that fails with 503 or 504 is tried again, and one that reached the agent must not use
/// up the agent's only answer.
fn answer_all(mut sio: Box<SioWs>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some((_, data, ack)) = sio.next_event_with_ack().await {
            if let Some(id) = ack {
                sio.ack(id, json!({ "done": data })).await;
            }
        }
    })
}

/// The agents of a `GET /agents` page, by id.
fn agents_of(body: &Value) -> Vec<(String, Value)> {
    body["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["agent_id"].as_str().unwrap().to_owned(), a.clone()))
        .collect()
}

/// The sum of the samples of a metric (by name prefix) in a Prometheus text page.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics_of(server: &TestServer) -> String {
    let mut conn = server.http(None).await.unwrap();
    conn.send("GET", "/metrics", &[], "").await.unwrap().text()
}

/// Waits until `server` lists `n` live nodes (itself included).
async fn wait_nodes(server: &TestServer, n: usize) {
    let patience = Patience::new(format!("{n} nodes in the node list"));
    loop {
        let (status, body) = server.api("GET", "/cluster/nodes", None).await;
        if status == 200 && body["nodes"].as_array().unwrap().len() == n {
            return;
        }
        patience.again((status, body)).await;
    }
}

/// Waits until `server`'s `GET /agents?status=connected` counts `n` agents.
async fn wait_connected(server: &TestServer, n: usize) {
    let patience = Patience::new(format!("{n} connected agents listed"));
    loop {
        let (status, body) = server.api("GET", "/agents?status=connected", None).await;
        if status == 200 && body["total"] == n {
            return;
        }
        patience.again((status, body)).await;
    }
}

#[tokio::test]
async fn a_command_through_node_a_reaches_the_agent_on_node_b_and_its_ack_returns() {
    let redis = RedisServer::start();
    let pki = Arc::new(TestPki::new());
    let a = node(&pki, &redis.url(), "node-a", ClusterMode::Standalone).await;
    let b = node(&pki, &redis.url(), "node-b", ClusterMode::Standalone).await;
    let agent = pki.agent("plc-b1");
    assert_eq!(b.upload(&agent).await.0, 200);
    let sio = ws_agent(&b, &agent).await;

    let answering = answer_one(sio);
    let (status, body) = a
        .api(
            "POST",
            "/agents/plc-b1/commands",
            Some(json!({"event": "restart_runtime", "data": {"program": "main.st"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reply"], json!({"done": {"program": "main.st"}}));
    let (event, sio) = answering.await.unwrap();
    assert_eq!(event, "restart_runtime");

    // The fan-out through A reaches it as well, next to an agent connected nowhere.
    let answering = answer_one(sio);
    let (status, body) = a
        .api(
            "POST",
            "/agents/commands",
            Some(json!({"agent_ids": ["plc-b1", "nowhere-1"], "event": "sync", "data": 7})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["status"], "ok", "{body}");
    assert_eq!(body["results"][0]["reply"], json!({"done": 7}));
    assert_eq!(body["results"][1]["status"], "not_connected", "{body}");
    answering.await.unwrap();

    let text = metrics_of(&a).await;
    assert!(
        metric(&text, "agentgate_cluster_command_duration_seconds_count") >= 2.0,
        "{text}"
    );
    assert_eq!(metric(&text, "agentgate_redis_connected"), 1.0);
}

#[tokio::test]
async fn an_agent_connected_nowhere_gets_404_from_every_node() {
    let redis = RedisServer::start();
    let pki = Arc::new(TestPki::new());
    let a = node(&pki, &redis.url(), "node-a", ClusterMode::Standalone).await;
    let b = node(&pki, &redis.url(), "node-b", ClusterMode::Standalone).await;
    // Known (its certificate is stored) but not connected, and entirely unknown.
    let known = pki.agent("idle-1");
    assert_eq!(a.upload(&known).await.0, 200);
    for server in [&a, &b] {
        for id in ["idle-1", "ghost-1"] {
            let asked = Instant::now();
            let (status, body) = server
                .api(
                    "POST",
                    &format!("/agents/{id}/commands"),
                    // A long ack timeout: the answer must not wait for it.
                    Some(json!({"event": "ping", "timeout_ms": 60000})),
                )
                .await;
            // Measured (TLS connect included), not asserted; `--nocapture` shows it.
            println!("404 for {id} in {:?}", asked.elapsed());
            assert_eq!(status, 404, "{id}: {body}");
            assert_eq!(
                body["detail"],
                format!("agent '{id}' is not connected"),
                "{body}"
            );
        }
    }
}

#[tokio::test]
async fn get_agents_on_either_node_lists_both_nodes_agents_and_a_killed_nodes_agents_leave() {
    let redis = RedisServer::start();
    let pki = Arc::new(TestPki::new());
    let a = node(&pki, &redis.url(), "node-a", ClusterMode::Standalone).await;
    let b = node(&pki, &redis.url(), "node-b", ClusterMode::Standalone).await;
    let on_a = pki.agent("fleet-a1");
    let on_b = pki.agent("fleet-b1");
    // Both certificates on both nodes, as a shared store would have them.
    for server in [&a, &b] {
        assert_eq!(server.upload(&on_a).await.0, 200);
        assert_eq!(server.upload(&on_b).await.0, 200);
    }
    let _sio_a = ws_agent(&a, &on_a).await;
    let _sio_b = ws_agent(&b, &on_b).await;
    let connected_at = Instant::now();

    for (server, name) in [(&a, "A"), (&b, "B")] {
        let patience = Patience::new(format!("node {name} lists both agents as connected"));
        let agents = loop {
            let (status, body) = server.api("GET", "/agents?status=connected", None).await;
            assert_eq!(status, 200, "{body}");
            let agents = agents_of(&body);
            // Connected, and each one's heartbeat published too (a later batch).
            let heartbeats = agents
                .iter()
                .all(|(_, a)| a["last_heartbeat"]["received_at"].is_string());
            if agents.len() == 2 && body["total"] == 2 && heartbeats {
                println!(
                    "node {name} lists both {:?} after the last connect",
                    connected_at.elapsed()
                );
                break agents;
            }
            patience.again(body).await;
        };
        assert_eq!(agents[0].0, "fleet-a1");
        assert_eq!(agents[0].1["node"], "node-a");
        assert_eq!(agents[0].1["sessions"][0]["node"], "node-a");
        assert_eq!(agents[1].0, "fleet-b1");
        assert_eq!(agents[1].1["node"], "node-b");
        assert_eq!(agents[1].1["status"], "connected");
        assert_eq!(agents[1].1["last_heartbeat"]["node"], "node-b");
        // One agent per page: paging walks the merged list.
        let (_, first) = server.api("GET", "/agents?limit=1", None).await;
        assert_eq!(agents_of(&first)[0].0, "fleet-a1");
        let next = first["next_after"].as_str().unwrap().to_owned();
        let (_, second) = server
            .api("GET", &format!("/agents?limit=1&after={next}"), None)
            .await;
        assert_eq!(agents_of(&second)[0].0, "fleet-b1", "{second}");
        let (status, one) = server.api("GET", "/agents/fleet-b1", None).await;
        assert_eq!(status, 200, "{one}");
        assert_eq!(one["node"], "node-b");
    }
    // A node's summary (its counts) is read with its next publication, up to one
    // interval after the agent data the loop above waited for.
    let patience = Patience::new("node A's view of node B counts B's agent");
    let nodes = loop {
        let (status, nodes) = a.api("GET", "/cluster/nodes", None).await;
        assert_eq!(status, 200, "{nodes}");
        if nodes["nodes"][1]["agents"] == 1 {
            break nodes;
        }
        patience.again(nodes).await;
    };
    let ids: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["node-a", "node-b"], "{nodes}");
    assert_eq!(nodes["nodes"][1]["agents"], 1);
    assert!(nodes["nodes"][1]["last_heard"].is_string());

    // Node B dies without a word (its task is aborted; nothing leaves the fleet for it).
    drop(b);
    wait_nodes(&a, 1).await;
    let (_, body) = a.api("GET", "/agents?status=connected", None).await;
    let connected: Vec<String> = agents_of(&body).into_iter().map(|(id, _)| id).collect();
    assert_eq!(connected, ["fleet-a1"], "{body}");
    let (status, one) = a.api("GET", "/agents/fleet-b1", None).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["status"], "disconnected", "{one}");
    assert_eq!(one["node"], Value::Null);
}

#[tokio::test]
async fn a_gracefully_stopped_node_leaves_the_fleet_at_once() {
    let redis = RedisServer::start();
    let pki = Arc::new(TestPki::new());
    let a = node(&pki, &redis.url(), "node-a", ClusterMode::Standalone).await;
    let b = node(&pki, &redis.url(), "node-b", ClusterMode::Standalone).await;
    wait_nodes(&a, 2).await;
    b.stop().await;
    // Its keys are gone from Redis as soon as it stopped.
    assert_eq!(redis.cli(&["EXISTS", "agentgate:{fleet}:node:node-b"]), "0");
    assert_eq!(
        redis.cli(&["SISMEMBER", "agentgate:{fleet}:nodes", "node-b"]),
        "0"
    );
    wait_nodes(&a, 1).await;
}

#[tokio::test]
async fn a_redis_outage_keeps_local_agents_serving_answers_503_for_cluster_operations_and_heals() {
    let mut redis = RedisServer::start();
    let pki = Arc::new(TestPki::new());
    let a = node(&pki, &redis.url(), "node-a", ClusterMode::Standalone).await;
    let b = node(&pki, &redis.url(), "node-b", ClusterMode::Standalone).await;
    let on_a = pki.agent("outage-a1");
    let on_b = pki.agent("outage-b1");
    assert_eq!(a.upload(&on_a).await.0, 200);
    assert_eq!(b.upload(&on_b).await.0, 200);
    let mut sio_a = ws_agent(&a, &on_a).await;
    let sio_b = ws_agent(&b, &on_b).await;
    wait_connected(&a, 2).await;

    redis.kill();
    let patience = Patience::new("A's cluster listing answers 503");
    loop {
        let (status, body) = a.api("GET", "/cluster/nodes", None).await;
        if status == 503 {
            break;
        }
        patience.again((status, body)).await;
    }
    // Cluster operations: 503 with a detail.
    let (status, body) = a
        .api(
            "POST",
            "/agents/outage-b1/commands",
            Some(json!({"event": "ping", "timeout_ms": 1000})),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("other nodes"),
        "{body}"
    );
    let (status, body) = a.api("GET", "/agents", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("Redis"), "{body}");
    // Local agents: heartbeats, a local command, and the agent's own entry.
    for _ in 0..3 {
        sio_a.emit("heartbeat", heartbeat()).await;
        let (event, data) = sio_a.next_event_within(10).await.unwrap();
        assert_eq!(event, "heartbeat_ack", "{data}");
    }
    let answering = answer_one(sio_a);
    let (status, body) = a
        .api(
            "POST",
            "/agents/outage-a1/commands",
            Some(json!({"event": "local", "data": 1})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, sio_a) = answering.await.unwrap();
    let (status, one) = a.api("GET", "/agents/outage-a1", None).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["status"], "connected");
    // Readiness holds; its body and the metrics tell the outage.
    let mut conn = a.http(None).await.unwrap();
    let ready = conn.send("GET", "/ready", &[], "").await.unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["checks"]["redis"]["connected"], false);
    let patience = Patience::new("the Redis metrics tell the outage");
    loop {
        let text = metrics_of(&a).await;
        if metric(&text, "agentgate_redis_connected") == 0.0
            && metric(&text, "agentgate_redis_errors_total") >= 1.0
        {
            break;
        }
        patience.again(text).await;
    }

    // Redis comes back on the same port (empty: no persistence); nothing is restarted.
    redis.restart();
    let answering = answer_all(sio_b);
    let patience = Patience::new("a cross-node command works again");
    let body = loop {
        let (status, body) = a
            .api(
                "POST",
                "/agents/outage-b1/commands",
                Some(json!({"event": "after", "data": 2, "timeout_ms": 5000})),
            )
            .await;
        if status == 200 {
            break body;
        }
        patience.again((status, body)).await;
    };
    assert_eq!(body["reply"], json!({"done": 2}));
    answering.abort();
    wait_connected(&a, 2).await;
    let text = metrics_of(&a).await;
    assert_eq!(metric(&text, "agentgate_redis_connected"), 1.0, "{text}");
    assert!(
        metric(&text, "agentgate_redis_reconnects_total") >= 1.0,
        "{text}"
    );
    drop(sio_a);
}

#[tokio::test]
async fn a_redis_cluster_of_three_shards_carries_commands_and_the_fleet_view() {
    let redis = RedisCluster::start();
    let seed = redis.urls()[0].clone();
    let pki = Arc::new(TestPki::new());
    let a = node(&pki, &seed, "node-a", ClusterMode::Cluster).await;
    let b = node(&pki, &seed, "node-b", ClusterMode::Cluster).await;
    let agent = pki.agent("sharded-b1");
    assert_eq!(b.upload(&agent).await.0, 200);
    let sio = ws_agent(&b, &agent).await;
    let answering = answer_one(sio);
    let (status, body) = a
        .api(
            "POST",
            "/agents/sharded-b1/commands",
            Some(json!({"event": "over_shards", "data": "x"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reply"], json!({"done": "x"}));
    // The agent stays connected (dropping it would disconnect it).
    let (_, _sio) = answering.await.unwrap();
    let (status, body) = a
        .api(
            "POST",
            "/agents/nowhere-9/commands",
            Some(json!({"event": "x"})),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let patience = Patience::new("A lists B's agent with its node");
    loop {
        let (status, body) = a.api("GET", "/agents/sharded-b1", None).await;
        if body["node"] == "node-b" {
            break;
        }
        patience.again((status, body)).await;
    }
}

#[tokio::test]
async fn a_polling_request_whose_sid_lives_on_another_node_gets_an_engine_io_error_at_once() {
    let redis = RedisServer::start();
    let pki = Arc::new(TestPki::new());
    let a = node(&pki, &redis.url(), "node-a", ClusterMode::Standalone).await;
    let b = node(&pki, &redis.url(), "node-b", ClusterMode::Standalone).await;
    let agent = pki.agent("poll-1");
    assert_eq!(a.upload(&agent).await.0, 200);
    assert_eq!(b.upload(&agent).await.0, 200);
    let mut on_a = a.http(Some(&agent)).await.unwrap();
    let session = Polling::handshake(&mut on_a).await;
    assert_eq!(session.post(&mut on_a, "40").await.status, 200);

    // The same agent, the same sid, the other node (a balancer without affinity).
    let mut on_b = b.http(Some(&agent)).await.unwrap();
    for response in [
        tokio::time::timeout(WITHIN, session.get(&mut on_b)).await,
        tokio::time::timeout(WITHIN, session.post(&mut on_b, "3")).await,
    ] {
        let response = response.expect("the foreign sid is answered, not left hanging");
        assert_eq!(response.status, 400, "{}", response.text());
        let body = response.json();
        assert_eq!(body["code"], 1, "{body}");
        assert_eq!(body["message"], "Session ID unknown", "{body}");
        assert!(
            body["detail"].as_str().unwrap().contains("another node"),
            "{body}"
        );
    }
    // The session on A is untouched.
    let reply = session.get(&mut on_a).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// A gateway process (for `kill -9`); killed when dropped.
struct ProcNode {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for ProcNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ProcNode {
    /// `agentgate serve` on a free port with `[cluster]` (its store is the shared one in
    /// Redis).
    fn start(pki: &TestPki, redis_url: &str, node_id: &str) -> ProcNode {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let section = cluster_section(redis_url, node_id, ClusterMode::Standalone);
        let config = test_config(pki, dir.path(), |raw| {
            raw.listen = format!("127.0.0.1:{port}").parse().unwrap();
            raw.cluster = Some(section);
        });
        let file = dir.path().join("agentgate.toml");
        std::fs::write(&file, toml::to_string(&config.to_raw()).unwrap()).unwrap();
        let child = common::agentgate_command()
            .args(["serve", "--config"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        ProcNode {
            port,
            child,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGKILL: no shutdown notice, no leaving the fleet.
    fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One API request (with the API key) to the gateway at `addr`; `None` if it cannot be
/// reached.
async fn api_at(
    pki: &TestPki,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Option<(u16, Value)> {
    let connector = TlsConnector::from(client_config(pki, None));
    let tcp = TcpStream::connect(addr).await.ok()?;
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .ok()?;
    let mut conn = HttpConn::handshake(tls).await.ok()?;
    let auth = format!("Bearer {API_KEY}");
    let body = body.map(|b| b.to_string());
    let resp = conn
        .send(
            method,
            path,
            &[("authorization", &auth)],
            body.as_deref().unwrap_or(""),
        )
        .await
        .ok()?;
    Some((resp.status, resp.json()))
}

/// HAProxy with the shipped `deploy/haproxy.cfg`, only its addresses changed to loopback
/// ports; killed when dropped.
struct Haproxy {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Haproxy {
    fn start(nodes: [SocketAddr; 2]) -> Haproxy {
        let shipped =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg"))
                .unwrap();
        let port = free_port();
        let config = shipped
            .replace("bind :443", &format!("bind 127.0.0.1:{port}"))
            .replace("10.0.0.11:443", &nodes[0].to_string())
            .replace("10.0.0.12:443", &nodes[1].to_string())
            // The test's stdout is not HAProxy's log.
            .replace("log stdout format raw local0", "")
            // This machine's file limit (20000) is below what 100000 connections need.
            .replace("maxconn 100000", "maxconn 4000");
        assert!(
            config.contains(&nodes[1].to_string()),
            "deploy/haproxy.cfg changed shape"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, config).unwrap();
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&file)
            .output()
            .expect("haproxy (Debian package haproxy)");
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Haproxy {
            port,
            child,
            _dir: dir,
        }
    }
}

#[tokio::test]
async fn failover_through_haproxy_moves_a_python_agent_to_the_surviving_node_after_kill_9() {
    let redis = RedisServer::start();
    let pki = Arc::new(TestPki::new());
    let agent = pki.agent("failover-1");
    let mut nodes = [
        ProcNode::start(&pki, &redis.url(), "node-1"),
        ProcNode::start(&pki, &redis.url(), "node-2"),
    ];
    for n in &nodes {
        let patience = Patience::new(format!("node on port {} serves and sees the other", n.port));
        loop {
            let seen = api_at(&pki, n.addr(), "GET", "/cluster/nodes", None).await;
            if seen
                .as_ref()
                .is_some_and(|(s, b)| *s == 200 && b["nodes"].as_array().unwrap().len() == 2)
            {
                break;
            }
            patience.again(seen).await;
        }
    }
    // One upload, on either node: the certificate store is the cluster's.
    let body = json!({"agent_id": agent.agent_id, "certificate": agent.cert_pem});
    let uploaded = api_at(
        &pki,
        nodes[0].addr(),
        "POST",
        "/agent/certificate",
        Some(body),
    )
    .await;
    assert_eq!(
        uploaded.as_ref().map(|(s, _)| *s),
        Some(200),
        "{uploaded:?}"
    );
    let haproxy = Haproxy::start([nodes[0].addr(), nodes[1].addr()]);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let url = format!("https://localhost:{}", haproxy.port);
    let mut python = python_agent_command(
        &url,
        &ca,
        dir.path(),
        Some(&agent),
        &[
            "--heartbeats",
            "1",
            "--wait-disconnect",
            "--reconnect",
            "--commands",
            "--commands-after-reconnect",
            "1",
            "--timeout",
            "60",
        ],
    );
    let mut python = python
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Which node did HAProxy pick? Either node's fleet view says.
    let patience = Patience::new("the agent is connected through HAProxy");
    let first = loop {
        let seen = api_at(&pki, nodes[0].addr(), "GET", "/agents/failover-1", None).await;
        match seen.as_ref().and_then(|(_, body)| body["node"].as_str()) {
            Some("node-1") => break 0,
            Some("node-2") => break 1,
            _ => patience.again(&seen).await,
        }
    };
    let survivor = 1 - first;
    let survivor_id = format!("node-{}", survivor + 1);
    let survivor_addr = nodes[survivor].addr();
    nodes[first].kill_9();
    let killed_at = Instant::now();
    let patience = Patience::new("the agent reconnects to the surviving node");
    loop {
        let seen = api_at(&pki, survivor_addr, "GET", "/agents/failover-1", None).await;
        if seen
            .as_ref()
            .is_some_and(|(_, b)| b["node"] == survivor_id.as_str() && b["status"] == "connected")
        {
            break;
        }
        patience.again(seen).await;
    }
    // Measured, not asserted (DESIGN.md, "Testing"); `--nocapture` shows it.
    println!(
        "agent back on {survivor_id} {:?} after kill -9",
        killed_at.elapsed()
    );
    let (status, body) = api_at(
        &pki,
        survivor_addr,
        "POST",
        "/agents/failover-1/commands",
        Some(json!({"event": "after_failover", "data": {"n": 1}})),
    )
    .await
    .unwrap();
    if status != 200 {
        let _ = python.start_kill();
    }
    let out = tokio::time::timeout(WITHIN * 3, python.wait_with_output())
        .await
        .expect("python agent finishes")
        .unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        status,
        200,
        "{body}\n{lines:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        body["reply"],
        json!({"ok": true, "event": "after_failover", "data": {"n": 1}})
    );
    assert!(
        out.status.success(),
        "{lines:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lines.iter().any(|l| l["event"] == "reconnected"),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "command" && l["data"]["name"] == "after_failover"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn without_a_cluster_section_cluster_nodes_is_a_404_that_says_why() {
    let server = TestServer::start().await;
    let (status, body) = server.api("GET", "/cluster/nodes", None).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("without [cluster]"),
        "{body}"
    );
    let mut conn = server.http(None).await.unwrap();
    let ready = conn.send("GET", "/ready", &[], "").await.unwrap().json();
    assert!(ready["checks"].get("redis").is_none(), "{ready}");
    let text = metrics_of(&server).await;
    assert!(!text.contains("agentgate_redis_connected "), "{text}");
}
