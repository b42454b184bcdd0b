//! Socket.IO on the gateway: who may connect, heartbeats over every transport, session
//! binding, driven by python-socketio (how existing agents connect) and a Rust client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::Arc;
use tokio_tungstenite::tungstenite::Message;

const HEARTBEAT: fn() -> Value =
    || json!({"cpu_usage": 0.5, "memory_usage": 256, "disk_usage": 1024});

async fn connected(server: &TestServer, agent: Option<&AgentCert>) -> Box<SioWs> {
    match SioWs::connect(server, agent).await.unwrap() {
        SioConnect::Ok(s) => s,
        SioConnect::Refused(v) => panic!("connect refused: {v}"),
    }
}

#[tokio::test]
async fn socket_without_certificate_is_refused_with_a_reason() {
    let server = TestServer::start().await;
    let SioConnect::Refused(reason) = SioWs::connect(&server, None).await.unwrap() else {
        panic!("anonymous socket accepted");
    };
    assert!(
        reason["message"]
            .as_str()
            .unwrap()
            .contains("agent certificate required"),
        "{reason}"
    );
    assert_eq!(server.agents.registry.anonymous_sessions(), 0);
    server.stop().await;
}

#[tokio::test]
async fn anonymous_sockets_connect_only_with_the_development_switch() {
    let server = TestServer::start_with(|c| c.allow_anonymous_agents = true).await;
    let mut sio = connected(&server, None).await;
    sio.emit("heartbeat", HEARTBEAT()).await;
    let (name, data) = sio.next_event_within(10).await.unwrap();
    assert_eq!(name, "heartbeat_ack");
    assert_eq!(data["agent_id"], Value::Null);
    assert_eq!(server.agents.registry.anonymous_sessions(), 1);
    server.stop().await;
}

#[tokio::test]
async fn heartbeat_over_websocket_is_acknowledged_and_recorded() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("hb-1");
    assert_eq!(server.upload(&agent).await.0, 200);
    let mut sio = connected(&server, Some(&agent)).await;
    sio.emit("heartbeat", json!({"cpu_usage": 0.25, "memory_usage": 100, "disk_usage": 7, "timestamp": "2025-11-13T12:00:00"})).await;
    let (name, data) = sio.next_event_within(10).await.unwrap();
    assert_eq!(name, "heartbeat_ack");
    assert_eq!(data["status"], "ok");
    assert_eq!(data["agent_id"], "hb-1");
    let received = data["received_at"].as_str().unwrap();
    time::OffsetDateTime::parse(received, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    let state = server
        .agents
        .registry
        .get(&"hb-1".parse().unwrap())
        .unwrap();
    let hb = state.last_heartbeat.expect("heartbeat recorded");
    assert_eq!(hb.payload["disk_usage"], 7);
    assert_eq!(state.sessions[0].remote_addr.ip().to_string(), "127.0.0.1");
    server.stop().await;
}

/// Two threads that spin until dropped: the server's tasks get preempted as on a busy
/// machine.
struct Spinners(
    Arc<std::sync::atomic::AtomicBool>,
    Vec<std::thread::JoinHandle<()>>,
);

impl Spinners {
    fn start(n: usize) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self(stop, threads)
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.1.drain(..) {
            let _ = t.join();
        }
    }
}

/// The session is registered and its handlers installed before the agent is told it is
/// connected (`handlers::register`, a connect middleware), so an agent that emits its
/// first heartbeat the moment it is connected, as python-socketio agents do, gets it
/// answered. socketioxide runs the connect handler after it sent the CONNECT answer, in a
/// task of its own; when the registration was there, a busy machine lost about 1 first
/// heartbeat in 60 connects. Each of 60 connects here looks at the registry the moment
/// the answer is read, with threads spinning beside the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_registered_before_it_is_told_that_it_is_connected() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("early-1");
    assert_eq!(server.upload(&agent).await.0, 200);
    let id = "early-1".parse().unwrap();
    let spinners = Spinners::start(2);
    let mut unregistered = Vec::new();
    for i in 0..60 {
        let mut sio = connected(&server, Some(&agent)).await;
        let sid = sio
            .sid
            .clone()
            .expect("a v5 CONNECT answer carries the sid");
        let sessions = server.agents.registry.sessions_of(&id, None);
        if !sessions.iter().any(|s| s.to_string() == sid) {
            unregistered.push(i);
        }
        sio.emit("heartbeat", HEARTBEAT()).await;
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), sio.next_event())
            .await
            .ok()
            .flatten();
        assert_eq!(
            answer.map(|(name, _)| name).as_deref(),
            Some("heartbeat_ack"),
            "connect {i}: the first heartbeat went unanswered"
        );
    }
    drop(spinners);
    assert!(
        unregistered.is_empty(),
        "connects told before their session was registered: {unregistered:?}"
    );
    server.stop().await;
}

/// Malformed heartbeats get an `error` event beside their acknowledgement (issue 11,
/// point 6; tests/hardening.rs has the stored values and the metric).
#[tokio::test]
async fn malformed_heartbeat_gets_an_error_event_and_the_socket_stays_up() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("hb-2");
    assert_eq!(server.upload(&agent).await.0, 200);
    let mut sio = connected(&server, Some(&agent)).await;
    for bad in [
        json!("text"),
        json!({"cpu_usage": "high", "memory_usage": 1, "disk_usage": 1}),
    ] {
        sio.emit("heartbeat", bad.clone()).await;
        let (name, data) = sio.next_event_within(10).await.unwrap();
        assert_eq!(name, "error", "{bad}");
        assert!(
            data["message"].as_str().unwrap().starts_with("heartbeat"),
            "{data}"
        );
        assert_eq!(sio.next_event_within(10).await.unwrap().0, "heartbeat_ack");
    }
    sio.emit("heartbeat", HEARTBEAT()).await;
    assert_eq!(sio.next_event_within(10).await.unwrap().0, "heartbeat_ack");
    server.stop().await;
}

/// Opens an agent's polling session and joins the namespace; returns it with its connection.
async fn polling_agent(server: &TestServer, agent: &AgentCert) -> (HttpConn, Polling) {
    let mut conn = server.http(Some(agent)).await.unwrap();
    let polling = Polling::handshake(&mut conn).await;
    assert_eq!(polling.post(&mut conn, "40").await.status, 200);
    let reply = polling.get(&mut conn).await.text();
    // Engine.IO v4 joins packets of one polling response with the record separator.
    assert!(
        reply.split('\x1e').any(|p| p.starts_with("40")),
        "{reply:?}"
    );
    (conn, polling)
}

#[tokio::test]
async fn a_sid_from_another_connection_identity_is_refused_and_never_reaches_the_session() {
    let server = TestServer::start().await;
    let victim = server.pki.agent("victim-1");
    let other = server.pki.agent("other-1");
    assert_eq!(server.upload(&victim).await.0, 200);
    assert_eq!(server.upload(&other).await.0, 200);
    let (mut victim_conn, session) = polling_agent(&server, &victim).await;

    let mut anonymous = server.http(None).await.unwrap();
    let mut impostor = server.http(Some(&other)).await.unwrap();
    for (who, conn) in [
        ("anonymous", &mut anonymous),
        ("other agent", &mut impostor),
    ] {
        let r = session.get(conn).await;
        assert_eq!(r.status, 403, "{who}: GET with a stolen sid: {}", r.text());
        let r = session
            .post(conn, &format!("42{}", json!(["heartbeat", HEARTBEAT()])))
            .await;
        assert_eq!(r.status, 403, "{who}: POST with a stolen sid: {}", r.text());
        // The WebSocket upgrade with the stolen sid is refused too.
        let tls = server
            .tls(if who == "anonymous" {
                None
            } else {
                Some(&other)
            })
            .await
            .unwrap();
        let url = format!(
            "wss://localhost:{}/socket.io/?EIO=4&transport=websocket&sid={}",
            server.addr.port(),
            session.sid
        );
        assert!(
            tokio_tungstenite::client_async(url, tls).await.is_err(),
            "{who}: upgrade with a stolen sid"
        );
    }
    let id = "victim-1".parse().unwrap();
    assert!(
        server
            .agents
            .registry
            .get(&id)
            .unwrap()
            .last_heartbeat
            .is_none(),
        "impostor heartbeat recorded"
    );

    // The rightful owner still uses its session.
    let r = session
        .post(
            &mut victim_conn,
            &format!("42{}", json!(["heartbeat", HEARTBEAT()])),
        )
        .await;
    assert_eq!(r.status, 200);
    let reply = session.get(&mut victim_conn).await.text();
    assert!(
        reply.contains("heartbeat_ack") && reply.contains("victim-1"),
        "{reply}"
    );
    assert!(
        server
            .agents
            .registry
            .get(&id)
            .unwrap()
            .last_heartbeat
            .is_some()
    );
    server.stop().await;
}

#[tokio::test]
async fn rust_client_heartbeat_over_polling_then_upgrade_to_websocket() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("upg-1");
    assert_eq!(server.upload(&agent).await.0, 200);
    let (mut conn, session) = polling_agent(&server, &agent).await;
    // Heartbeat over long-polling.
    session
        .post(
            &mut conn,
            &format!("42{}", json!(["heartbeat", HEARTBEAT()])),
        )
        .await;
    let reply = session.get(&mut conn).await.text();
    assert!(
        reply.contains("heartbeat_ack") && reply.contains("upg-1"),
        "{reply}"
    );
    // Upgrade (Engine.IO v4): probe over the WebSocket, then "5".
    let tls = server.tls(Some(&agent)).await.unwrap();
    let url = format!(
        "wss://localhost:{}/socket.io/?EIO=4&transport=websocket&sid={}",
        server.addr.port(),
        session.sid
    );
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    ws.send(Message::text("2probe")).await.unwrap();
    let probe = ws.next().await.unwrap().unwrap();
    assert_eq!(probe.to_text().unwrap(), "3probe");
    ws.send(Message::text("5")).await.unwrap();
    ws.send(Message::text(format!(
        "42{}",
        json!(["heartbeat", HEARTBEAT()])
    )))
    .await
    .unwrap();
    loop {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let text = msg.to_text().unwrap().to_owned();
        if text.starts_with("42") {
            assert!(
                text.contains("heartbeat_ack") && text.contains("upg-1"),
                "{text}"
            );
            break;
        }
    }
    let sid = session.sid.parse().unwrap();
    assert_eq!(
        server.agents.transport_of(sid),
        Some(socketioxide::TransportType::Websocket)
    );
    server.stop().await;
}

#[tokio::test]
async fn python_socketio_agent_heartbeats_over_polling_with_upgrade_and_over_websocket() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("py-agent-1");
    assert_eq!(server.upload(&agent).await.0, 200);
    for transports in ["polling,websocket", "websocket"] {
        let (code, lines) = python_agent(
            &server,
            Some(&agent),
            &["--transports", transports, "--heartbeats", "2"],
        )
        .await;
        assert_eq!(code, 0, "{transports}: {lines:?}");
        assert_eq!(lines[0]["event"], "connected", "{transports}");
        assert_eq!(
            lines[0]["transport"], "websocket",
            "{transports}: the upgrade must happen"
        );
        let acks: Vec<_> = lines
            .iter()
            .filter(|l| l["event"] == "heartbeat_ack")
            .collect();
        assert_eq!(acks.len(), 2, "{transports}: {lines:?}");
        assert_eq!(acks[0]["data"]["agent_id"], "py-agent-1");
        assert_eq!(acks[0]["data"]["status"], "ok");
    }
    server.stop().await;
}

#[tokio::test]
async fn python_agent_without_certificate_or_with_unknown_one_cannot_connect() {
    let server = TestServer::start().await;
    let (code, lines) = python_agent(&server, None, &[]).await;
    assert_eq!(code, 3, "{lines:?}");
    assert!(
        lines[0]["data"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("agent certificate required"),
        "{lines:?}"
    );
    let stranger = server.pki.agent("stranger");
    let (code, lines) = python_agent(&server, Some(&stranger), &[]).await;
    assert_eq!(code, 3, "{lines:?}");
    server.stop().await;
}

#[tokio::test]
async fn python_agent_session_is_closed_when_its_certificate_is_replaced() {
    let server = TestServer::start().await;
    let old = server.pki.agent("py-rot");
    assert_eq!(server.upload(&old).await.0, 200);
    let s = std::sync::Arc::new(server);
    let s2 = s.clone();
    let old2 = old.clone();
    let agent = tokio::spawn(async move {
        python_agent(
            &s2,
            Some(&old2),
            &["--heartbeats", "1", "--wait-disconnect", "--timeout", "30"],
        )
        .await
    });
    // Wait for the agent to be connected, then rotate.
    let id = "py-rot".parse().unwrap();
    for _ in 0..200 {
        if s.agents
            .registry
            .get(&id)
            .is_some_and(|st| st.last_heartbeat.is_some())
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(s.upload(&s.pki.agent("py-rot")).await.0, 200);
    let (code, lines) = agent.await.unwrap();
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(lines.last().unwrap()["event"], "disconnected");
}

#[tokio::test]
async fn python_agent_answers_a_command_through_the_api() {
    let server = std::sync::Arc::new(TestServer::start().await);
    let cert = server.pki.agent("py-cmd");
    assert_eq!(server.upload(&cert).await.0, 200);
    let s = server.clone();
    let c = cert.clone();
    let agent = tokio::spawn(async move {
        python_agent(
            &s,
            Some(&c),
            &[
                "--heartbeats",
                "1",
                "--commands",
                "--wait-disconnect",
                "--timeout",
                "30",
            ],
        )
        .await
    });
    let id = "py-cmd".parse().unwrap();
    for _ in 0..300 {
        if server
            .agents
            .registry
            .get(&id)
            .is_some_and(|st| st.last_heartbeat.is_some())
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (status, body) = server
        .api(
            "POST",
            "/agents/py-cmd/commands",
            Some(json!({"event": "start_plc", "data": {"program": "main.st"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["reply"],
        json!({"ok": true, "event": "start_plc", "data": {"program": "main.st"}})
    );
    // Revoking the agent ends its session; the agent reports what it saw.
    assert_eq!(
        server
            .api("DELETE", "/agent/certificate/py-cmd", None)
            .await
            .0,
        200
    );
    let (code, lines) = agent.await.unwrap();
    assert_eq!(code, 0, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "command" && l["data"]["name"] == "start_plc"),
        "{lines:?}"
    );
    assert_eq!(lines.last().unwrap()["event"], "disconnected");
}
