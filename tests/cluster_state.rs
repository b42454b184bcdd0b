//! The shared state of several nodes on Redis (issue 9, point 3): certificates uploaded,
//! replaced or deleted on one node reach the other's index and handshake, revocations cut
//! live sessions on every node, an install token is consumed once across nodes, a Redis
//! outage refuses changes with 503 and leaves nothing behind, a restart of Redis is
//! followed by a resync, `store import`, and a 3-shard Redis Cluster.
//!
//! Real redis-server processes (tests/common/redis.rs) and two in-process gateways per
//! test (tests/common/cluster.rs). Waits are bounded by `PROPAGATION_BOUND` and assert
//! on the change, never on how long it took.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

mod common;

use std::process::Command;
use std::sync::Arc;

use agentgate::config::ClusterMode;
use common::cluster::{start_node, two_nodes, wait_for};
use common::redis::{RedisCluster, RedisServer};
use common::*;
use serde_json::json;

const CERTS_KEY: &str = "agentgate:{state}:certs";
const SEQ_KEY: &str = "agentgate:{state}:seq";

/// Redis with an append-only file synced on every write: a `kill -9` loses nothing, as
/// README ("Running several nodes") advises for the certificate data.
fn persistent_redis() -> RedisServer {
    RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
}

async fn metrics_text(server: &TestServer) -> String {
    let mut conn = server.http(None).await.unwrap();
    conn.send("GET", "/metrics", &[], "").await.unwrap().text()
}

/// The value of an un-labelled counter or histogram count line of `/metrics`.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

fn connected(c: agentgate_testkit::sio::SioConnect) -> Box<SioWs> {
    match c {
        SioConnect::Ok(s) => s,
        SioConnect::Refused(r) => panic!("Socket.IO connect refused: {r}"),
    }
}

#[tokio::test]
async fn an_upload_on_one_node_is_accepted_by_the_other_nodes_next_handshake() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis.url(), ClusterMode::Standalone).await;
    let agent = a.pki.agent("up-1");
    assert_eq!(a.upload(&agent).await.0, 200);
    let id = "up-1".parse().unwrap();
    wait_for("node B to learn the upload", || {
        b.store.by_agent(&id).is_some()
    })
    .await;
    let mut sio = connected(SioWs::connect(&b, Some(&agent)).await.unwrap());
    sio.emit(
        "heartbeat",
        json!({"cpu_usage": 1, "memory_usage": 2, "disk_usage": 3}),
    )
    .await;
    assert_eq!(sio.next_event_within(10).await.unwrap().0, "heartbeat_ack");
    // B heard the change through pub/sub: its propagation histogram counted it.
    let text = metrics_text(&b).await;
    assert!(metric(&text, "agentgate_state_propagation_seconds_count") >= 1.0);
    // What Redis holds is the certificate, keyed by agent id.
    assert!(redis.cli(&["HEXISTS", CERTS_KEY, "up-1"]).ends_with('1'));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_delete_on_one_node_cuts_the_agents_live_session_on_the_other() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis.url(), ClusterMode::Standalone).await;
    let agent = a.pki.agent("del-1");
    assert_eq!(a.upload(&agent).await.0, 200);
    let id = "del-1".parse().unwrap();
    wait_for("node B to learn the upload", || {
        b.store.by_agent(&id).is_some()
    })
    .await;
    let mut on_a = connected(SioWs::connect(&a, Some(&agent)).await.unwrap());

    let (status, body) = b.api("DELETE", "/agent/certificate/del-1", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["fingerprint"], agent.fingerprint_hex());
    assert!(
        on_a.next_event_within(10).await.is_none(),
        "the session on node A outlived the deletion on node B"
    );
    assert!(a.store.by_agent(&id).is_none());
    let err = first_read_error(a.tls(Some(&agent)).await.unwrap())
        .await
        .expect("node A still accepts the deleted certificate");
    assert_eq!(
        alert_of(&err),
        Some(rustls::AlertDescription::CertificateUnknown)
    );
    // Deleted everywhere, so a second delete on A finds nothing.
    assert_eq!(
        a.api("DELETE", "/agent/certificate/del-1", None).await.0,
        404
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_replacement_on_one_node_closes_only_the_old_certificates_session_on_the_other() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis.url(), ClusterMode::Standalone).await;
    let old = a.pki.agent("rot-1");
    let new = a.pki.agent("rot-1");
    assert_eq!(a.upload(&old).await.0, 200);
    let id = "rot-1".parse().unwrap();
    wait_for("node B to learn the first certificate", || {
        b.store.by_agent(&id).is_some()
    })
    .await;
    let mut old_on_a = connected(SioWs::connect(&a, Some(&old)).await.unwrap());

    assert_eq!(b.upload(&new).await.0, 200);
    assert!(
        old_on_a.next_event_within(10).await.is_none(),
        "the old certificate's session on node A outlived its replacement on node B"
    );
    let current = a.store.by_agent(&id).unwrap();
    assert_eq!(current.fingerprint.to_hex(), new.fingerprint_hex());
    let mut new_on_a = connected(SioWs::connect(&a, Some(&new)).await.unwrap());
    new_on_a
        .emit(
            "heartbeat",
            json!({"cpu_usage": 1, "memory_usage": 2, "disk_usage": 3}),
        )
        .await;
    assert_eq!(
        new_on_a.next_event_within(10).await.unwrap().0,
        "heartbeat_ack"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn two_nodes_replacing_one_agents_certificate_at_once_end_on_the_same_one() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis.url(), ClusterMode::Standalone).await;
    let id = "race-1".parse().unwrap();
    for round in 0..10 {
        let (on_a, on_b) = (a.pki.agent("race-1"), a.pki.agent("race-1"));
        let ((sa, ba), (sb, bb)) = tokio::join!(a.upload(&on_a), b.upload(&on_b));
        assert_eq!((sa, sb), (200, 200), "round {round}: {ba} {bb}");
        // Redis ordered the two writes; the later one is what it holds.
        let winner = redis_fingerprint(&redis, "race-1");
        let fingerprint = |s: &TestServer| s.store.by_agent(&id).map(|c| c.fingerprint.to_hex());
        wait_for("both nodes to hold the certificate Redis holds", || {
            fingerprint(&a).as_ref() == Some(&winner) && fingerprint(&b).as_ref() == Some(&winner)
        })
        .await;
        assert!(
            winner == on_a.fingerprint_hex() || winner == on_b.fingerprint_hex(),
            "round {round}"
        );
    }
    a.stop().await;
    b.stop().await;
}

/// The fingerprint of the certificate Redis holds for `agent` (`<seq>:<DER>`).
fn redis_fingerprint(redis: &RedisServer, agent: &str) -> String {
    let mut conn = ::redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let value: Vec<u8> = ::redis::cmd("HGET")
        .arg(CERTS_KEY)
        .arg(agent)
        .query(&mut conn)
        .unwrap();
    let colon = value.iter().position(|&b| b == b':').unwrap();
    agentgate::identity::Fingerprint::of_der(&value[colon + 1..]).to_hex()
}

#[tokio::test]
async fn one_install_token_redeemed_on_both_nodes_at_once_succeeds_exactly_once() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis.url(), ClusterMode::Standalone).await;
    for round in 0..8 {
        let agent_id = format!("enroll-{round}");
        let agent = a.pki.agent(&agent_id);
        let (status, issued) = a
            .api(
                "POST",
                "/install-tokens",
                Some(json!({"agent_id": agent_id})),
            )
            .await;
        assert_eq!(status, 200, "{issued}");
        let body = json!({
            "install_token": issued["install_token"],
            "agent_id": agent_id,
            "certificate": agent.cert_pem,
            "metadata": {"round": round},
        });
        let ((sa, ba), (sb, bb)) = tokio::join!(register(&a, &body), register(&b, &body));
        let mut statuses = [sa, sb];
        statuses.sort();
        assert_eq!(statuses, [200, 401], "round {round}: A {ba}, B {bb}");
        let refused = if sa == 401 { &ba } else { &bb };
        assert_eq!(refused["detail"], "install token has already been used");
        let id = agent_id.parse().unwrap();
        wait_for("both nodes to hold the registered certificate", || {
            a.store.by_agent(&id).is_some() && b.store.by_agent(&id).is_some()
        })
        .await;
        // The metadata is shared too: both nodes show it, whichever took the registration.
        for server in [&a, &b] {
            let (status, view) = server
                .api("GET", &format!("/agents/{agent_id}"), None)
                .await;
            assert_eq!(status, 200, "{view}");
            assert_eq!(view["metadata"]["round"], round, "{view}");
        }
    }
    a.stop().await;
    b.stop().await;
}

async fn register(server: &TestServer, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let mut conn = server.http(None).await.unwrap();
    let r = conn
        .send("POST", "/agent/register", &[], &body.to_string())
        .await
        .unwrap();
    (r.status, r.json())
}

#[tokio::test]
async fn changes_while_redis_is_down_are_refused_with_503_and_leave_nothing_behind() {
    let mut redis = persistent_redis();
    let (a, b) = two_nodes(&redis.url(), ClusterMode::Standalone).await;
    let kept = a.pki.agent("kept-1");
    assert_eq!(a.upload(&kept).await.0, 200);
    let kept_id = "kept-1".parse().unwrap();
    wait_for("node B to learn the upload", || {
        b.store.by_agent(&kept_id).is_some()
    })
    .await;

    redis.kill();
    let refused = a.pki.agent("outage-1");
    let (status, body) = a.upload(&refused).await;
    assert_eq!(status, 503, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("Redis is unreachable"), "{detail}");
    assert!(detail.contains("nothing was changed"), "{detail}");
    let (status, body) = b.api("DELETE", "/agent/certificate/kept-1", None).await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = a
        .api(
            "POST",
            "/install-tokens",
            Some(json!({"agent_id": "outage-2"})),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    // Nothing in either index; the agents known before keep being served.
    let outage_id = "outage-1".parse().unwrap();
    assert!(a.store.by_agent(&outage_id).is_none());
    assert!(b.store.by_agent(&kept_id).is_some());
    connected(SioWs::connect(&b, Some(&kept)).await.unwrap());
    let text = metrics_text(&a).await;
    assert!(metric(&text, "agentgate_state_redis_errors_total") >= 1.0);

    redis.restart();
    // Nothing of the refused upload reached Redis either.
    assert!(
        redis
            .cli(&["HEXISTS", CERTS_KEY, "outage-1"])
            .ends_with('0')
    );
    // The same nodes take changes again, without a restart, once they have reconnected.
    let again = a.pki.agent("after-1");
    wait_for_upload(&a, &again).await;
    let after_id = "after-1".parse().unwrap();
    wait_for("node B to learn the upload after the outage", || {
        b.store.by_agent(&after_id).is_some()
    })
    .await;
    assert!(a.store.by_agent(&outage_id).is_none());
    assert!(b.store.by_agent(&outage_id).is_none());
    a.stop().await;
    b.stop().await;
}

/// Uploads `agent` on `server` until Redis takes it: right after Redis comes back, a node
/// may still answer 503 until its connection is repaired; any other answer fails.
async fn wait_for_upload(server: &TestServer, agent: &AgentCert) {
    let deadline = std::time::Instant::now() + common::cluster::PROPAGATION_BOUND;
    loop {
        let (status, body) = server.upload(agent).await;
        if status == 200 {
            return;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "uploads still refused after Redis came back: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_deletion_a_node_missed_while_cut_off_is_found_by_its_resync_and_cuts_the_session() {
    let mut redis = persistent_redis();
    let pki = Arc::new(TestPki::new());
    let a = start_node(&pki, &redis.url(), "node-a", ClusterMode::Standalone).await;
    let agent = pki.agent("missed-1");
    let other = pki.agent("missed-2");
    assert_eq!(a.upload(&agent).await.0, 200);
    assert_eq!(a.upload(&other).await.0, 200);
    let mut session = connected(SioWs::connect(&a, Some(&agent)).await.unwrap());

    // While node A is cut off, missed-1 is deleted and missed-2 replaced: no message
    // about either can reach A, only the resync after its reconnection.
    redis.kill();
    let replacement = pki.agent("missed-2");
    let replacement_value = {
        let seq = "1000";
        let mut v = format!("{seq}:").into_bytes();
        v.extend_from_slice(&replacement.der);
        v
    };
    let value_file = a.dir.path().join("value.bin");
    std::fs::write(&value_file, &replacement_value).unwrap();
    redis.edit_offline(|port| {
        common::redis::cli_at(port, &["HDEL", CERTS_KEY, "missed-1"]);
        common::redis::cli_at(port, &["SET", SEQ_KEY, "1000"]);
        // A binary value goes in through redis-cli -x (the value is its stdin).
        let set = format!(
            "redis-cli -p {port} -x HSET '{CERTS_KEY}' missed-2 < '{}'",
            value_file.display()
        );
        let ok = Command::new("sh")
            .args(["-c", &set])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "redis-cli -x HSET failed");
    });
    redis.restart();

    assert!(
        session.next_event_within(10).await.is_none(),
        "the session of the certificate deleted during the outage is still open"
    );
    let id = "missed-1".parse().unwrap();
    wait_for("the resync to remove missed-1", || {
        a.store.by_agent(&id).is_none()
    })
    .await;
    let id2 = "missed-2".parse().unwrap();
    wait_for("the resync to replace missed-2", || {
        a.store
            .by_agent(&id2)
            .is_some_and(|c| c.fingerprint.to_hex() == replacement.fingerprint_hex())
    })
    .await;
    let text = metrics_text(&a).await;
    assert!(metric(&text, "agentgate_state_resyncs_total") >= 2.0);
    // Changes made after the resync reach the node as usual.
    let later = pki.agent("missed-3");
    wait_for_upload(&a, &later).await;
    a.stop().await;
}

#[tokio::test]
async fn redis_restored_from_an_older_backup_is_followed_again_by_every_node() {
    let mut redis = persistent_redis();
    let (a, b) = two_nodes(&redis.url(), ClusterMode::Standalone).await;
    let agents: Vec<AgentCert> = (1..=3).map(|i| a.pki.agent(&format!("bk-{i}"))).collect();
    for agent in &agents {
        assert_eq!(a.upload(agent).await.0, 200);
    }
    let id = |n: usize| format!("bk-{n}").parse().unwrap();
    wait_for("node B to learn the three uploads", || {
        (1..=3).all(|n| b.store.by_agent(&id(n)).is_some())
    })
    .await;

    // The backup was taken after the first upload: the sequence goes back to 1.
    redis.kill();
    redis.edit_offline(|port| {
        common::redis::cli_at(port, &["HDEL", CERTS_KEY, "bk-2", "bk-3"]);
        common::redis::cli_at(port, &["SET", SEQ_KEY, "1"]);
    });
    redis.restart();
    for node in [&a, &b] {
        wait_for("the nodes to follow the restored state", || {
            node.store.by_agent(&id(1)).is_some()
                && node.store.by_agent(&id(2)).is_none()
                && node.store.by_agent(&id(3)).is_none()
        })
        .await;
    }
    // Changes after the restore take numbers the nodes had already passed; they still
    // reach the other node.
    let after = a.pki.agent("bk-4");
    wait_for_upload(&a, &after).await;
    wait_for("node B to learn an upload made after the restore", || {
        b.store.by_agent(&id(4)).is_some()
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn store_import_loads_a_directory_once_and_running_nodes_see_it() {
    let redis = RedisServer::start();
    let pki = Arc::new(TestPki::new());
    let a = start_node(&pki, &redis.url(), "node-a", ClusterMode::Standalone).await;
    let from = tempfile::tempdir().unwrap();
    let agents: Vec<AgentCert> = (0..3).map(|i| pki.agent(&format!("imp-{i}"))).collect();
    for agent in &agents {
        std::fs::write(
            from.path().join(format!("{}.pem", agent.agent_id)),
            &agent.cert_pem,
        )
        .unwrap();
    }
    std::fs::write(from.path().join("broken.pem"), "not a certificate").unwrap();
    // An agent already in Redis keeps what Redis has, not the file's older certificate.
    let newer = pki.agent("imp-0");
    assert_eq!(a.upload(&newer).await.0, 200);

    let config = from.path().join("agentgate.toml");
    std::fs::write(
        &config,
        format!(
            "api_keys = [\"k\"]\n[tls]\nmode = \"self-signed\"\n[cluster]\nredis_url = \"{}\"\n",
            redis.url()
        ),
    )
    .unwrap();
    let run = || {
        let out = common::agentgate_command()
            .args(["store", "import", "--from"])
            .arg(from.path())
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stdout}{stderr}");
        (stdout, stderr)
    };
    let (first, stderr) = run();
    assert!(
        first.contains("imported 2 certificates")
            && first.contains("skipped 1 already there and 1 unreadable"),
        "{first}"
    );
    assert!(stderr.contains("broken.pem"), "{stderr}");
    let (second, _) = run();
    assert!(
        second.contains("imported 0 certificates") && second.contains("skipped 3 already there"),
        "{second}"
    );

    for agent in &agents[1..] {
        let id = agent.agent_id.parse().unwrap();
        wait_for("the running node to see the import", || {
            a.store.by_agent(&id).is_some()
        })
        .await;
    }
    let kept = a.store.by_agent(&"imp-0".parse().unwrap()).unwrap();
    assert_eq!(kept.fingerprint.to_hex(), newer.fingerprint_hex());
    // A node started afterwards loads them too.
    let b = start_node(&pki, &redis.url(), "node-b", ClusterMode::Standalone).await;
    assert_eq!(b.store.len(), 3);
    connected(SioWs::connect(&b, Some(&agents[2])).await.unwrap());
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn redis_back_without_its_data_keeps_the_known_agents_and_refuses_changes_with_503() {
    // No persistence: a restart empties Redis, as a careless deployment would.
    let mut redis = RedisServer::start();
    let (a, b) = two_nodes(&redis.url(), ClusterMode::Standalone).await;
    let agent = a.pki.agent("known-1");
    assert_eq!(a.upload(&agent).await.0, 200);
    let id = "known-1".parse().unwrap();
    wait_for("node B to learn the upload", || {
        b.store.by_agent(&id).is_some()
    })
    .await;

    redis.restart();
    let later = a.pki.agent("later-1");
    let deadline = std::time::Instant::now() + common::cluster::PROPAGATION_BOUND;
    let detail = loop {
        let (status, body) = a.upload(&later).await;
        assert_eq!(status, 503, "{body}");
        let detail = body["detail"].as_str().unwrap().to_owned();
        // Until the connection is repaired the answer is "unreachable"; then Redis
        // answers, without state.
        if detail.contains("holds no agentgate state") {
            break detail;
        }
        assert!(std::time::Instant::now() < deadline, "{detail}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(detail.contains("store import"), "{detail}");
    // The empty Redis did not revoke anyone: both nodes still let the agent in.
    assert!(a.store.by_agent(&id).is_some() && b.store.by_agent(&id).is_some());
    connected(SioWs::connect(&b, Some(&agent)).await.unwrap());
    assert!(redis.cli(&["HLEN", CERTS_KEY]).ends_with('0'));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_node_does_not_start_when_redis_is_unreachable() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    redis.kill();
    let pki = TestPki::new();
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = test_config(&pki, dir.path(), |c| {
        c.cluster = Some(agentgate::config::RawCluster {
            redis_url: Some(url.clone()),
            node_id: Some("node-a".into()),
            mode: ClusterMode::Standalone,
            ..agentgate::config::RawCluster::default()
        });
    });
    let err = match TestServer::start_in(Arc::new(pki), dir, config).await {
        Ok(_) => panic!("a node started without Redis"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("cluster.redis_url"), "{err}");
    assert!(err.contains("does not start without Redis"), "{err}");
}

#[tokio::test]
async fn uploads_and_deletions_reach_the_other_node_on_a_three_shard_redis_cluster() {
    let redis = RedisCluster::start();
    let seed = redis.urls()[1].clone();
    let (a, b) = two_nodes(&seed, ClusterMode::Cluster).await;
    let agent = a.pki.agent("shard-1");
    assert_eq!(a.upload(&agent).await.0, 200);
    let id = "shard-1".parse().unwrap();
    wait_for("node B to learn the upload through sharded pub/sub", || {
        b.store.by_agent(&id).is_some()
    })
    .await;
    let mut on_b = connected(SioWs::connect(&b, Some(&agent)).await.unwrap());
    let (status, body) = a.api("DELETE", "/agent/certificate/shard-1", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(on_b.next_event_within(10).await.is_none());
    assert!(b.store.by_agent(&id).is_none());
    a.stop().await;
    b.stop().await;
}
