//! The control plane with real mTLS Socket.IO agents: listing, commands, certificates,
//! enrollment with install tokens, metrics, readiness, graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

mod common;

use std::sync::Arc;
use std::time::Duration;

use agentgate::clock::ManualClock;
use common::*;
use serde_json::{Value, json};

/// Uploads a certificate for `id` and connects it over WebSocket.
async fn agent(server: &TestServer, id: &str) -> (AgentCert, Box<SioWs>) {
    let cert = server.pki.agent(id);
    assert_eq!(server.upload(&cert).await.0, 200);
    match SioWs::connect(server, Some(&cert)).await.unwrap() {
        SioConnect::Ok(s) => (cert, s),
        SioConnect::Refused(v) => panic!("{id} refused: {v}"),
    }
}

/// Answers the next command on `sio` with `reply`, returning what it received.
async fn answer(sio: &mut SioWs, reply: Value) -> (String, Value) {
    let (name, data, ack) = sio
        .next_event_with_ack_within(10)
        .await
        .expect("socket closed");
    sio.ack(ack.expect("command without ack id"), reply).await;
    (name, data)
}

#[tokio::test]
async fn a_command_reaches_the_right_agent_and_its_ack_comes_back() {
    let server = Arc::new(TestServer::start().await);
    let (_, mut a1) = agent(&server, "cmd-a1").await;
    let (_, mut a2) = agent(&server, "cmd-a2").await;
    let s = server.clone();
    let call = tokio::spawn(async move {
        s.api(
            "POST",
            "/agents/cmd-a2/commands",
            Some(json!({"event": "restart_runtime", "data": {"force": true}, "timeout_ms": 5000})),
        )
        .await
    });
    let (name, data) = answer(&mut a2, json!({"restarted": true})).await;
    assert_eq!(
        (name.as_str(), &data),
        ("restart_runtime", &json!({"force": true}))
    );
    let (status, body) = call.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["agent_id"], "cmd-a2");
    assert_eq!(body["reply"], json!({"restarted": true}));
    // a1 got nothing: the next thing it sees is its own command.
    let s = server.clone();
    let call = tokio::spawn(async move {
        s.api(
            "POST",
            "/agents/cmd-a1/commands",
            Some(json!({"event": "ping_plc"})),
        )
        .await
    });
    let (name, _) = answer(&mut a1, json!("pong")).await;
    assert_eq!(name, "ping_plc");
    assert_eq!(call.await.unwrap().1["reply"], "pong");
}

#[tokio::test]
async fn command_errors_not_connected_timeout_and_bad_requests() {
    let server = TestServer::start().await;
    let (status, body) = server
        .api(
            "POST",
            "/agents/nobody/commands",
            Some(json!({"event": "x"})),
        )
        .await;
    assert_eq!(
        (status, body["detail"].as_str().unwrap()),
        (404, "agent 'nobody' is not connected")
    );
    let (_, _silent) = agent(&server, "silent-1").await;
    let (status, body) = server
        .api(
            "POST",
            "/agents/silent-1/commands",
            Some(json!({"event": "x", "timeout_ms": 300})),
        )
        .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(
        body["detail"],
        "agent 'silent-1' did not acknowledge 'x' within 300 ms"
    );
    for (req, expected) in [
        (
            json!({"event": "connect"}),
            "event name 'connect' is reserved",
        ),
        (
            json!({"event": "heartbeat_ack"}),
            "event name 'heartbeat_ack' is reserved",
        ),
        (json!({"event": ""}), "event name must not be empty"),
        (
            json!({"event": "x", "timeout_ms": 0}),
            "timeout_ms must be between 1 and 60000, got 0",
        ),
        (
            json!({"event": "x", "timeout_ms": 60001}),
            "timeout_ms must be between 1 and 60000, got 60001",
        ),
    ] {
        let (status, body) = server
            .api("POST", "/agents/silent-1/commands", Some(req.clone()))
            .await;
        assert_eq!(
            (status, body["detail"].as_str().unwrap()),
            (400, expected),
            "{req}"
        );
    }
    let (status, _) = server
        .api(
            "POST",
            "/agents/silent-1/commands",
            Some(json!({"data": 1})),
        )
        .await;
    assert_eq!(status, 422);
    let (status, body) = server
        .api(
            "POST",
            "/agents/..%2Fx/commands",
            Some(json!({"event": "x"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn fan_out_returns_one_result_per_agent_and_reaches_every_agent_before_any_answers() {
    let server = Arc::new(TestServer::start().await);
    let (_, mut ok) = agent(&server, "fan-ok").await;
    let (_, mut ok2) = agent(&server, "fan-ok2").await;
    let (_, _silent) = agent(&server, "fan-silent").await;
    let s = server.clone();
    let call = tokio::spawn(async move {
        s.api(
            "POST",
            "/agents/commands",
            Some(json!({"agent_ids": ["fan-ok", "fan-ok2", "fan-silent", "fan-absent", "fan-ok"], "event": "status", "timeout_ms": 2000})),
        )
        .await
    });
    // Concurrent: both agents hold the command before either has answered. Sent one after
    // the other, the second would get it only once the first had acknowledged.
    let (name, _, first) = ok
        .next_event_with_ack_within(10)
        .await
        .expect("socket closed");
    let (name2, _, second) = ok2
        .next_event_with_ack_within(10)
        .await
        .expect("socket closed");
    assert_eq!((name.as_str(), name2.as_str()), ("status", "status"));
    ok.ack(first.expect("ack id"), json!({"state": "running"}))
        .await;
    ok2.ack(second.expect("ack id"), json!({"state": "idle"}))
        .await;
    let (status, body) = call.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 4, "one result per distinct agent: {body}");
    assert_eq!(
        results[0],
        json!({"agent_id": "fan-ok", "status": "ok", "reply": {"state": "running"}})
    );
    assert_eq!(results[1]["reply"], json!({"state": "idle"}));
    assert_eq!(results[2]["status"], "timeout");
    assert_eq!(results[3]["status"], "not_connected");
    let (status, _) = server
        .api(
            "POST",
            "/agents/commands",
            Some(json!({"agent_ids": [], "event": "x"})),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = server
        .api(
            "POST",
            "/agents/commands",
            Some(json!({"agent_ids": ["../x"], "event": "x"})),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn agents_listing_shows_sessions_heartbeats_certificates_and_staleness() {
    let clock = ManualClock::starting_now();
    let server = TestServer::start_with_clock(|c| c.agents.stale_after_secs = 90, &clock).await;
    let (cert, mut live) = agent(&server, "list-live").await;
    let (_, _quiet) = agent(&server, "list-quiet").await;
    let offline = server.pki.agent("list-offline");
    assert_eq!(server.upload(&offline).await.0, 200);
    clock.advance(Duration::from_secs(91));
    live.emit(
        "heartbeat",
        json!({"cpu_usage": 0.5, "memory_usage": 1, "disk_usage": 2}),
    )
    .await;
    assert_eq!(live.next_event_within(10).await.unwrap().0, "heartbeat_ack");

    let (status, body) = server.api("GET", "/agents/list-live", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "connected");
    assert_eq!(body["sessions"][0]["transport"], "websocket");
    assert!(
        body["sessions"][0]["remote_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(body["sessions"][0]["connected_since"].is_string());
    assert_eq!(body["last_heartbeat"]["payload"]["disk_usage"], 2);
    assert_eq!(body["certificate"]["fingerprint"], cert.fingerprint_hex());
    assert!(body["certificate"]["not_after"].is_string());

    let status_of = |v: &Value, id: &str| {
        v["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["agent_id"] == id)
            .map(|a| a["status"].clone())
    };
    let (_, all) = server.api("GET", "/agents", None).await;
    assert_eq!(all["total"], 3);
    assert_eq!(status_of(&all, "list-quiet"), Some(json!("stale")));
    assert_eq!(status_of(&all, "list-offline"), Some(json!("disconnected")));
    for (filter, expected) in [
        ("connected", "list-live"),
        ("stale", "list-quiet"),
        ("disconnected", "list-offline"),
    ] {
        let (_, page) = server
            .api("GET", &format!("/agents?status={filter}"), None)
            .await;
        assert_eq!(page["total"], 1, "{filter}: {page}");
        assert_eq!(page["agents"][0]["agent_id"], expected);
    }
    // Keyset pagination.
    let (_, p1) = server.api("GET", "/agents?limit=2", None).await;
    assert_eq!(p1["agents"].as_array().unwrap().len(), 2);
    let next = p1["next_after"].as_str().unwrap().to_owned();
    let (_, p2) = server
        .api("GET", &format!("/agents?limit=2&after={next}"), None)
        .await;
    assert_eq!(p2["agents"].as_array().unwrap().len(), 1);
    assert_eq!(p2["next_after"], Value::Null);
    for bad in [
        "/agents?status=zombie",
        "/agents?limit=0",
        "/agents?limit=1001",
        "/agents?limit=x",
        "/agents?bogus=1",
    ] {
        assert_eq!(server.api("GET", bad, None).await.0, 400, "{bad}");
    }
    assert_eq!(server.api("GET", "/agents/never-seen", None).await.0, 404);
    server.stop().await;
}

#[tokio::test]
async fn certificate_inspect_list_and_delete_which_closes_the_session_and_the_next_handshake_fails()
{
    let server = TestServer::start().await;
    let (cert, mut sio) = agent(&server, "del-1").await;
    let (status, body) = server.api("GET", "/agent/certificate/del-1", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["fingerprint"], cert.fingerprint_hex());
    assert_eq!(body["subject"], "CN=del-1");
    assert!(body["not_before"].is_string() && body["not_after"].is_string());
    for i in 0..3 {
        assert_eq!(
            server
                .upload(&server.pki.agent(&format!("del-x{i}")))
                .await
                .0,
            200
        );
    }
    let (_, p1) = server.api("GET", "/agent/certificates?limit=3", None).await;
    assert_eq!(p1["total"], 4);
    assert_eq!(p1["certificates"].as_array().unwrap().len(), 3);
    let (_, p2) = server
        .api(
            "GET",
            &format!(
                "/agent/certificates?after={}",
                p1["next_after"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(p2["certificates"].as_array().unwrap().len(), 1);

    let (status, body) = server.api("DELETE", "/agent/certificate/del-1", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["closed_sessions"], 1);
    let closed = tokio::time::timeout(Duration::from_secs(1), sio.next_event()).await;
    assert!(
        matches!(closed, Ok(None)),
        "session not closed within a second"
    );
    let err = first_read_error(server.tls(Some(&cert)).await.unwrap())
        .await
        .expect("deleted certificate accepted");
    assert_eq!(
        alert_of(&err),
        Some(rustls::AlertDescription::CertificateUnknown)
    );
    assert!(!server.store_dir().join("del-1.pem").exists());
    assert_eq!(
        server.api("GET", "/agent/certificate/del-1", None).await.0,
        404
    );
    assert_eq!(
        server
            .api("DELETE", "/agent/certificate/del-1", None)
            .await
            .0,
        404
    );
    assert_eq!(server.api("GET", "/agents/del-1", None).await.0, 404);
    server.stop().await;
}

async fn register(
    server: &TestServer,
    token: &str,
    cert: &AgentCert,
    metadata: Value,
) -> (u16, Value) {
    // No API key: the token is the credential.
    let mut conn = server.http(None).await.unwrap();
    let body = json!({"install_token": token, "agent_id": cert.agent_id, "certificate": cert.cert_pem, "metadata": metadata});
    let r = conn
        .send("POST", "/agent/register", &[], &body.to_string())
        .await
        .unwrap();
    (r.status, r.json())
}

async fn token(server: &TestServer, id: &str, ttl: i64) -> String {
    let (status, body) = server
        .api(
            "POST",
            "/install-tokens",
            Some(json!({"agent_id": id, "ttl_s": ttl})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["expires_at"].is_string());
    body["install_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn install_tokens_work_once_for_their_agent_until_expiry_and_survive_a_restart() {
    let clock = ManualClock::starting_now();
    let server = TestServer::start_with_clock(|_| {}, &clock).await;
    let cert = server.pki.agent("enr-1");
    let t = token(&server, "enr-1", 600).await;
    let (status, body) = register(
        &server,
        &t,
        &cert,
        json!({"site": "plant-4", "model": "x9"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["agent_id"], "enr-1");
    assert_eq!(body["fingerprint"], cert.fingerprint_hex());
    let (_, shown) = server.api("GET", "/agents/enr-1", None).await;
    assert_eq!(shown["metadata"], json!({"site": "plant-4", "model": "x9"}));
    assert!(matches!(
        SioWs::connect(&server, Some(&cert)).await.unwrap(),
        SioConnect::Ok(_)
    ));

    // Used twice.
    let (status, body) = register(&server, &t, &cert, json!({})).await;
    assert_eq!(
        (status, body["detail"].as_str().unwrap()),
        (401, "install token has already been used")
    );
    // Another agent's token.
    let t2 = token(&server, "enr-2", 600).await;
    let other = server.pki.agent("enr-3");
    let (status, body) = register(&server, &t2, &other, json!({})).await;
    assert_eq!(
        (status, body["detail"].as_str().unwrap()),
        (401, "install token was issued for another agent_id")
    );
    // Unknown.
    let (status, body) = register(&server, "agt_0000", &other, json!({})).await;
    assert_eq!(
        (status, body["detail"].as_str().unwrap()),
        (401, "install token is not valid")
    );
    // Expired: valid up to the second before its expiry, refused from that second on.
    let t4 = token(&server, "enr-4", 60).await;
    clock.advance(Duration::from_secs(59));
    let wrong_cn = server.pki.agent_with(
        "enr-4",
        AgentOpts {
            cn: Some("someone"),
            ..Default::default()
        },
    );
    let (status, body) = register(&server, &t4, &wrong_cn, json!({})).await;
    assert_eq!(
        status, 400,
        "the token passed, the certificate did not: {body}"
    );
    clock.advance(Duration::from_secs(1));
    let (status, body) = register(&server, &t4, &server.pki.agent("enr-4"), json!({})).await;
    assert_eq!(status, 401);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .starts_with("install token expired at "),
        "{body}"
    );
    // A bad certificate with a good token: 400, and the token stays usable.
    let t5 = token(&server, "enr-5", 600).await;
    let wrong_cn = server.pki.agent_with(
        "enr-5",
        AgentOpts {
            cn: Some("someone"),
            ..Default::default()
        },
    );
    let (status, body) = register(&server, &t5, &wrong_cn, json!({})).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = register(&server, &t5, &server.pki.agent("enr-5"), json!([1])).await;
    assert_eq!(status, 400, "metadata must be an object");
    // Bad requests for tokens.
    assert_eq!(
        server
            .api("POST", "/install-tokens", Some(json!({"agent_id": "../x"})))
            .await
            .0,
        400
    );
    assert_eq!(
        server
            .api(
                "POST",
                "/install-tokens",
                Some(json!({"agent_id": "a", "ttl_s": 0}))
            )
            .await
            .0,
        400
    );
    let mut anon = server.http(None).await.unwrap();
    assert_eq!(
        anon.send("POST", "/install-tokens", &[], r#"{"agent_id":"a"}"#)
            .await
            .unwrap()
            .status,
        403
    );

    // Tokens survive a restart (and the database holds only their hashes).
    let t6 = token(&server, "enr-6", 600).await;
    let db = rusqlite::Connection::open(server.config.data_dir.join("agentgate.db")).unwrap();
    let stored: Vec<String> = db
        .prepare("SELECT token_sha256 FROM install_tokens")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(!stored.is_empty() && !stored.contains(&t6));
    assert!(!server.config.data_dir.join("enrollment.json").exists());
    let server = server.restart().await;
    let (status, body) = register(&server, &t6, &server.pki.agent("enr-6"), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = register(&server, &t5, &server.pki.agent("enr-5"), json!({"ok": 1})).await;
    assert_eq!(
        status, 200,
        "token unused by the failed attempt still works after restart"
    );
    let (_, shown) = server.api("GET", "/agents/enr-1", None).await;
    assert_eq!(
        shown["metadata"]["site"], "plant-4",
        "metadata survives a restart"
    );
    server.stop().await;
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_change_as_handshakes_heartbeats_and_commands_happen() {
    let server = Arc::new(TestServer::start().await);
    let scrape = || async {
        let mut conn = server.http(None).await.unwrap();
        let r = conn.send("GET", "/metrics", &[], "").await.unwrap();
        assert_eq!(r.status, 200);
        assert!(
            r.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        r.text()
    };
    let before = scrape().await;
    let (_, mut sio) = agent(&server, "met-1").await;
    let _ = first_read_error(
        server
            .tls(Some(&server.pki.agent("met-stranger")))
            .await
            .unwrap(),
    )
    .await;
    sio.emit(
        "heartbeat",
        json!({"cpu_usage": 1, "memory_usage": 1, "disk_usage": 1}),
    )
    .await;
    sio.next_event_within(10).await.unwrap();
    let s = server.clone();
    let call = tokio::spawn(async move {
        s.api(
            "POST",
            "/agents/met-1/commands",
            Some(json!({"event": "x"})),
        )
        .await
    });
    answer(&mut sio, json!(1)).await;
    assert_eq!(call.await.unwrap().0, 200);
    server
        .api(
            "POST",
            "/agents/met-none/commands",
            Some(json!({"event": "x"})),
        )
        .await;
    let after = scrape().await;
    let delta = |p: &str| metric(&after, p) - metric(&before, p);
    assert_eq!(
        delta(r#"agentgate_tls_handshakes_total{result="accepted",reason="agent"}"#),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta(r#"agentgate_tls_handshakes_total{result="rejected",reason="unknown_certificate"}"#),
        1.0
    );
    assert_eq!(delta("agentgate_heartbeats_total"), 1.0);
    assert_eq!(delta(r#"agentgate_commands_total{outcome="ok"}"#), 1.0);
    assert_eq!(
        delta(r#"agentgate_commands_total{outcome="not_connected"}"#),
        1.0
    );
    assert_eq!(delta("agentgate_command_duration_seconds_count"), 1.0);
    assert_eq!(metric(&after, "agentgate_connected_agents"), 1.0);
    assert_eq!(metric(&after, "agentgate_store_certificates"), 1.0);
    assert!(
        metric(
            &after,
            "agentgate_certificate_earliest_expiry_timestamp_seconds"
        ) > 1.7e9
    );
    assert!(
        delta(
            r#"agentgate_http_requests_total{method="POST",route="/agent/certificate",status="200"}"#
        ) >= 1.0
    );
    assert!(
        delta(
            r#"agentgate_http_requests_total{method="POST",route="/agents/{agent_id}/commands",status="404"}"#
        ) >= 1.0
    );
}

#[tokio::test]
async fn ready_and_metrics_need_no_key_and_metrics_can_move_off_the_main_listener() {
    let server = TestServer::start().await;
    let mut conn = server.http(None).await.unwrap();
    let r = conn.send("GET", "/ready", &[], "").await.unwrap();
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("ready"))
    );
    server.stop().await;

    let server =
        TestServer::start_with(|c| c.metrics_listen = Some("127.0.0.1:1".parse().unwrap())).await;
    let mut conn = server.http(None).await.unwrap();
    assert_eq!(
        conn.send("GET", "/metrics", &[], "").await.unwrap().status,
        404
    );
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish_and_disconnects_agents_with_a_reason() {
    let server = Arc::new(TestServer::start_with(|c| c.shutdown_grace_secs = 10).await);
    let (_, mut sio) = agent(&server, "bye-1").await;
    let s = server.clone();
    let call = tokio::spawn(async move {
        s.api(
            "POST",
            "/agents/bye-1/commands",
            Some(json!({"event": "slow_job", "timeout_ms": 10000})),
        )
        .await
    });
    // The command is in flight; shut down while the agent is still working on it.
    let (name, _, ack) = sio.next_event_with_ack_within(10).await.unwrap();
    assert_eq!(name, "slow_job");
    server.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        TestServer::tls(&server, None).await.is_err() || server.is_stopped(),
        "still accepting after shutdown"
    );
    sio.ack(ack.unwrap(), json!({"done": true})).await;
    let (status, body) = call.await.unwrap();
    assert_eq!(
        (status, &body["reply"]),
        (200, &json!({"done": true})),
        "{body}"
    );
    // Then the agent is told why and its transport closed, so it reconnects elsewhere.
    let (name, data) = sio.next_event_within(10).await.expect("no shutdown notice");
    assert_eq!(name, "server_shutdown");
    assert_eq!(data["reconnect"], true);
    assert!(
        sio.next_event_within(10).await.is_none(),
        "agent not disconnected"
    );
    assert!(
        server.wait_stopped(Duration::from_secs(15)).await,
        "serve() did not return within the grace period"
    );
}
