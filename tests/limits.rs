//! `[limits]` (issue 11, "Limits"): unfinished handshakes per source address, failed
//! handshakes per source address, 2,000 connections that never send a ClientHello next
//! to a normal client, the idle and request head limits, API body limits per endpoint,
//! the Engine.IO packet size and per-session buffer, and the per-agent event rate (the
//! proxied body limit and the shared API-key budget are in `tests/gateway.rs`). Sources other than 127.0.0.1 are other loopback addresses
//! (127.0.0.0/8 all reach the gateway on Linux), so that one test holds several sources.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test stops loudly on failure

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection to `to` from the loopback address `from`.
async fn tcp_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// `GET /health` over TLS from `from`: the status, or `None` if the gateway closed the
/// connection before answering.
async fn health_from(server: &TestServer, from: &str) -> Option<u16> {
    let tcp = tcp_from(from, server.addr).await;
    let connector = tokio_rustls::TlsConnector::from(client_config(&server.pki, None));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.ok()?;
    tls.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Whether the gateway closes `tcp` (end of stream or reset) within 10 s.
async fn closed_by_gateway(tcp: &mut TcpStream) -> bool {
    closed_within(tcp, Duration::from_secs(10)).await
}

/// Whether the gateway closes `tcp` within `wait`.
async fn closed_within(tcp: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(wait, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_source_with_too_many_unfinished_handshakes_is_closed_at_accept() {
    let server = TestServer::start_with(|c| {
        c.handshake_timeout_secs = 60;
        c.limits.handshakes_per_source = 3;
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tcp_from("127.0.0.2", server.addr).await);
    }
    // Each silent connection holds its place only once the gateway took it; a fourth is
    // closed once all three are held (tried again until then; an attempt that was held
    // is dropped and frees its place).
    let mut closed = false;
    for _ in 0..50 {
        let mut fourth = tcp_from("127.0.0.2", server.addr).await;
        if closed_within(&mut fourth, Duration::from_millis(200)).await {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a fourth unfinished handshake from one source was held"
    );
    assert_eq!(
        health_from(&server, "127.0.0.1").await,
        Some(200),
        "another source is served"
    );
    assert!(
        server
            .metric("agentgate_limit_refusals_total{limit=\"handshakes_per_source\"}")
            .await
            >= 1.0
    );
    // One silent connection goes: its place is free again for a real client.
    drop(silent.pop());
    let mut served = false;
    for _ in 0..100 {
        if health_from(&server, "127.0.0.2").await == Some(200) {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the freed place was not given to a new handshake");
    drop(silent);
    server.stop().await;
}

#[tokio::test]
async fn a_source_past_its_failed_handshakes_is_closed_at_accept_until_the_window_ends() {
    let server = TestServer::start_with(|c| {
        c.limits.handshake_failures = 3;
        c.limits.handshake_failure_window_secs = 3600;
    })
    .await;
    for _ in 0..3 {
        // Plain HTTP on the TLS port: a failed handshake. Reading to the end means the
        // gateway has counted it (it closes after counting).
        let mut tcp = tcp_from("127.0.0.3", server.addr).await;
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(closed_by_gateway(&mut tcp).await);
    }
    assert_eq!(
        health_from(&server, "127.0.0.3").await,
        None,
        "a source past its failed handshakes was served"
    );
    assert_eq!(
        health_from(&server, "127.0.0.1").await,
        Some(200),
        "another source is served"
    );
    assert!(
        server
            .metric("agentgate_limit_refusals_total{limit=\"handshake_failures\"}")
            .await
            >= 1.0
    );
    server.stop().await;
}

#[tokio::test]
async fn two_thousand_silent_connections_do_not_hold_up_a_normal_client() {
    let server = TestServer::start_with(|c| {
        c.handshake_timeout_secs = 60;
        c.limits.handshakes_per_source = 4000;
    })
    .await;
    let mut silent = Vec::with_capacity(2000);
    for _ in 0..2000 {
        silent.push(tcp_from("127.0.0.2", server.addr).await);
    }
    let started = std::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(1), health_from(&server, "127.0.0.1"))
        .await
        .expect("the request waited more than 1 s behind 2,000 silent connections");
    println!(
        "GET /health next to 2,000 silent connections: {:?}",
        started.elapsed()
    );
    assert_eq!(status, Some(200));
    // They are still held: none was closed (their handshake timeout is 60 s).
    for tcp in silent.iter().step_by(100) {
        let mut buf = [0u8; 1];
        assert!(
            matches!(tcp.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a silent connection was closed"
        );
    }
    drop(silent);
    server.stop().await;
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let server = TestServer::start_with(|c| c.limits.http_idle_timeout_secs = 1).await;
    let mut tls = server.tls(None).await.unwrap();
    tls.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tls.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive (no `connection: close`), then idle: the gateway ends it.
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest)).await;
    assert!(end.is_ok(), "the idle connection was still open after 10 s");
    assert!(
        server
            .metric("agentgate_limit_refusals_total{limit=\"http_idle_timeout_secs\"}")
            .await
            >= 1.0
    );
    server.stop().await;
}

#[tokio::test]
async fn request_head_limits_come_from_the_config() {
    let server = TestServer::start_with(|c| {
        c.limits.max_uri_bytes = 100;
        c.limits.max_header_fields = 6;
        c.limits.max_header_bytes = 300;
    })
    .await;
    let mut conn = server.http(None).await.unwrap();
    let ok = conn.send("GET", "/health", &[], "").await.unwrap();
    assert_eq!(ok.status, 200);
    let long = format!("/health?{}", "a".repeat(100));
    let r = conn.send("GET", &long, &[], "").await.unwrap();
    assert_eq!(r.status, 414, "{}", r.text());
    assert!(r.text().contains("limits.max_uri_bytes"), "{}", r.text());
    let many: Vec<(String, String)> = (0..7).map(|i| (format!("x-f{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = conn.send("GET", "/health", &many, "").await.unwrap();
    assert_eq!(r.status, 431, "{}", r.text());
    assert!(
        r.text().contains("limits.max_header_fields"),
        "{}",
        r.text()
    );
    let big = "v".repeat(300);
    let r = conn
        .send("GET", "/health", &[("x-big", big.as_str())], "")
        .await
        .unwrap();
    assert_eq!(r.status, 431, "{}", r.text());
    assert!(r.text().contains("limits.max_header_bytes"), "{}", r.text());
    assert!(
        server
            .metric("agentgate_limit_refusals_total{limit=\"max_uri_bytes\"}")
            .await
            >= 1.0
    );
    server.stop().await;
}

/// A WebSocket session of `agent`, connected to the namespace.
async fn ws_session(
    server: &TestServer,
    agent: &AgentCert,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
    let tls = server.tls(Some(agent)).await.unwrap();
    let (ws, answer) = agentgate_testkit::sio::open(tls, server.addr.port(), None)
        .await
        .unwrap();
    assert!(
        matches!(answer, agentgate_testkit::sio::Namespace::Accepted(_)),
        "{answer:?}"
    );
    ws
}

#[tokio::test]
async fn a_websocket_client_that_stops_reading_is_disconnected_not_buffered() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start_with(|c| {
        c.socketio.ping_interval_secs = 1;
        c.socketio.ping_timeout_secs = 1;
        // A small configured send buffer: the gateway holds at most this many packets
        // for the session before it stops reading it.
        c.limits.session_send_buffer = 8;
    })
    .await;
    let agent = server.pki.agent("never-reads");
    assert_eq!(server.upload(&agent).await.0, 200);
    let id: agentgate::identity::AgentId = "never-reads".parse().unwrap();
    let mut ws = ws_session(&server, &agent).await;
    // Writes heartbeats (each answered with an ack) and never reads a byte: the answers
    // pile up in the gateway's send buffer, then in the socket buffers.
    let writer = tokio::spawn(async move {
        let frame = r#"42["heartbeat",{"cpu_usage":0.5,"memory_usage":256,"disk_usage":1024}]"#;
        let mut sent = 0u64;
        while ws.send(Message::text(frame)).await.is_ok() {
            sent += 1;
        }
        sent
    });
    let mut gone = false;
    for _ in 0..600 {
        if server.agents.registry.sessions_of(&id, None).is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gone,
        "the session of a client that never reads stayed open for 30 s"
    );
    // The gateway stopped reading it before it went (backpressure), so what it held was
    // bounded by its send buffer, not by what the client sent.
    assert!(server.metric("agentgate_socket_backpressure_total").await >= 1.0);
    let sent = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the writer was never stopped")
        .unwrap();
    println!("heartbeats written before the gateway closed the session: {sent}");
    server.stop().await;
}

#[tokio::test]
async fn an_agent_that_floods_events_past_its_rate_is_disconnected() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start_with(|c| {
        c.limits.agent_events = 50;
        c.limits.agent_event_window_secs = 3600;
    })
    .await;
    let agent = server.pki.agent("flooder");
    assert_eq!(server.upload(&agent).await.0, 200);
    let id: agentgate::identity::AgentId = "flooder".parse().unwrap();
    let ws = ws_session(&server, &agent).await;
    let (mut sink, mut stream) = ws.split();
    let frame = r#"42["heartbeat",{"cpu_usage":0.5,"memory_usage":256,"disk_usage":1024}]"#;
    let writer = tokio::spawn(async move {
        for _ in 0..200 {
            if sink.send(Message::text(frame)).await.is_err() {
                break;
            }
        }
    });
    // Acks for the events within the limit, then the end of the session.
    let acks = session_ends(&mut stream)
        .await
        .expect("the flooding session stayed open");
    assert_eq!(
        acks, 50,
        "every event within the limit, and none past it, is answered"
    );
    assert!(server.agents.registry.sessions_of(&id, None).is_empty());
    assert!(
        server
            .metric("agentgate_limit_refusals_total{limit=\"agent_events\"}")
            .await
            >= 1.0
    );
    // The count is the agent's, not the session's: a new session of the same agent
    // connects, and its first event within the window ends it.
    let again = ws_session(&server, &agent).await;
    let (mut sink, mut stream) = again.split();
    sink.send(Message::text(frame)).await.unwrap();
    assert!(
        session_ends(&mut stream).await.is_some(),
        "a reconnected session got a fresh budget"
    );
    writer.abort();
    server.stop().await;
}

/// Reads `stream` until the session ends (a Socket.IO disconnect, a close frame, or the
/// end of the connection), at most 10 s; the `heartbeat_ack`s read on the way, or `None`
/// if it stayed open.
async fn session_ends<S>(stream: &mut S) -> Option<usize>
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut acks = 0;
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(m)) = stream.next().await {
            match m {
                Message::Text(t) if t.contains("heartbeat_ack") => acks += 1,
                Message::Text(t) if t.as_str() == "41" => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| acks)
}

/// `limits.agent_events` is per agent: two sessions of one agent share one budget, so
/// each staying under it alone does not keep them both connected; the event that passes
/// it ends every session of the agent.
#[tokio::test]
async fn an_agent_with_two_sessions_shares_one_event_budget() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start_with(|c| {
        c.limits.agent_events = 60;
        c.limits.agent_event_window_secs = 3600;
    })
    .await;
    let agent = server.pki.agent("twin");
    assert_eq!(server.upload(&agent).await.0, 200);
    let id: agentgate::identity::AgentId = "twin".parse().unwrap();
    let (mut sink_a, mut stream_a) = ws_session(&server, &agent).await.split();
    let (mut sink_b, mut stream_b) = ws_session(&server, &agent).await.split();
    assert_eq!(server.agents.registry.sessions_of(&id, None).len(), 2);
    let frame = r#"42["heartbeat",{"cpu_usage":0.5,"memory_usage":256,"disk_usage":1024}]"#;
    // 40 on the first session: all answered, it stays open.
    for _ in 0..40 {
        sink_a.send(Message::text(frame)).await.unwrap();
    }
    let mut acks_a = 0;
    while acks_a < 40 {
        match tokio::time::timeout(Duration::from_secs(10), stream_a.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.contains("heartbeat_ack") => acks_a += 1,
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "2" => {
                sink_a.send(Message::text("3")).await.unwrap();
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("the first session ended after {acks_a} acks: {other:?}"),
        }
    }
    // 40 on the second: 20 fit the agent's budget, the 21st passes it.
    for _ in 0..40 {
        if sink_b.send(Message::text(frame)).await.is_err() {
            break;
        }
    }
    let acks_b = session_ends(&mut stream_b)
        .await
        .expect("the second session stayed open past the agent's budget");
    assert_eq!(
        acks_b, 20,
        "the agent's events within its budget are answered"
    );
    assert!(
        session_ends(&mut stream_a).await.is_some(),
        "the first session of the agent stayed open"
    );
    common::cluster::wait_for("the agent's sessions to be gone", || {
        server.agents.registry.sessions_of(&id, None).is_empty()
    })
    .await;
    assert_eq!(
        server
            .metric("agentgate_limit_refusals_total{limit=\"agent_events\"}")
            .await,
        1.0,
        "one refusal for the agent, however many sessions it had"
    );
    server.stop().await;
}

/// `limits.max_body_bytes` for the API's endpoints that take a key, and the separate
/// `limits.register_body_bytes` of `POST /agent/register`: 413 with a detail naming the
/// key, counted.
#[tokio::test]
async fn api_bodies_over_their_endpoint_limit_get_413_naming_the_key() {
    let server = TestServer::start_with(|c| {
        c.limits.max_body_bytes = 1024;
        c.limits.register_body_bytes = 2048;
    })
    .await;
    let mut conn = server.http(None).await.unwrap();
    let auth = format!("Bearer {API_KEY}");
    let key = [("authorization", auth.as_str())];
    let hello = |n: usize| serde_json::json!({ "name": "x".repeat(n) }).to_string();
    let r = conn
        .send("POST", "/hello-world", &key, &hello(900))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = conn
        .send("POST", "/hello-world", &key, &hello(1500))
        .await
        .unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.contains("limits.max_body_bytes") && detail.contains("1024"),
        "{detail}"
    );
    assert_eq!(
        r.headers["connection"], "close",
        "the refused body was not read"
    );
    let mut conn = server.http(None).await.unwrap();
    // The register endpoint has its own limit: 1500 bytes reach its token check.
    let register = |n: usize| {
        serde_json::json!({"install_token": "unknown", "agent_id": "a1", "certificate": "x".repeat(n)})
            .to_string()
    };
    let r = conn
        .send("POST", "/agent/register", &[], &register(1500))
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    let r = conn
        .send("POST", "/agent/register", &[], &register(3000))
        .await
        .unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(
        r.text().contains("limits.register_body_bytes"),
        "{}",
        r.text()
    );
    for limit in ["max_body_bytes", "register_body_bytes"] {
        assert_eq!(
            server
                .metric(&format!(
                    "agentgate_limit_refusals_total{{limit=\"{limit}\"}}"
                ))
                .await,
            1.0,
            "{limit}"
        );
    }
    server.stop().await;
}

/// `limits.max_packet_bytes`: a polling POST over it gets 413 naming the key, and a
/// WebSocket message over it ends the session; both counted.
#[tokio::test]
async fn engine_io_payloads_over_the_packet_limit_are_refused() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start_with(|c| c.limits.max_packet_bytes = 2048).await;
    let agent = server.pki.agent("big-packets");
    assert_eq!(server.upload(&agent).await.0, 200);
    let id: agentgate::identity::AgentId = "big-packets".parse().unwrap();
    let big = format!(
        "42{}",
        serde_json::json!(["heartbeat", {"cpu_usage": 0.5, "note": "x".repeat(3000)}])
    );
    let mut conn = server.http(Some(&agent)).await.unwrap();
    let polling = Polling::handshake(&mut conn).await;
    assert_eq!(polling.post(&mut conn, "40").await.status, 200);
    let r = polling.post(&mut conn, &big).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("limits.max_packet_bytes"), "{}", r.text());
    assert!(
        server
            .metric("agentgate_limit_refusals_total{limit=\"max_packet_bytes\"}")
            .await
            >= 1.0
    );
    // The polling session was refused one POST and stays; a WebSocket session of the same
    // agent next to it ends on its oversized message.
    let sessions = || server.agents.registry.sessions_of(&id, None).len();
    let polling_only = sessions();
    let (mut sink, mut stream) = ws_session(&server, &agent).await.split();
    assert_eq!(sessions(), polling_only + 1);
    sink.send(Message::text(big)).await.unwrap();
    assert!(
        session_ends(&mut stream).await.is_some(),
        "the session that sent an oversized message stayed open"
    );
    common::cluster::wait_for("the WebSocket session to be unregistered", || {
        sessions() == polling_only
    })
    .await;
    // Read from the frame header, refused before its payload, and counted like the POST.
    assert!(
        server
            .metric("agentgate_limit_refusals_total{limit=\"max_packet_bytes\"}")
            .await
            >= 2.0
    );
    drop(conn);
    server.stop().await;
}

#[tokio::test]
async fn connections_closed_before_any_tls_record_are_not_failed_handshakes() {
    let server = TestServer::start_with(|c| {
        c.limits.handshake_failures = 3;
        c.limits.handshake_failure_window_secs = 3600;
    })
    .await;
    // A load balancer's TCP health check: connect, close. Waiting for the gateway's close
    // means it has judged the connection.
    for _ in 0..10 {
        let mut tcp = tcp_from("127.0.0.4", server.addr).await;
        tcp.shutdown().await.unwrap();
        assert!(closed_by_gateway(&mut tcp).await);
    }
    assert_eq!(
        health_from(&server, "127.0.0.4").await,
        Some(200),
        "health checks counted as failed handshakes"
    );
    server.stop().await;
}

/// `max_connections`: past it, a client waits in the listen backlog (it is not refused)
/// until a connection ends; the wait is counted (`limit="max_connections"`).
#[tokio::test]
async fn a_client_past_max_connections_waits_until_a_connection_ends() {
    let server = TestServer::start_with(|c| c.max_connections = 2).await;
    let mut first = server.http(None).await.unwrap();
    assert_eq!(
        first.send("GET", "/health", &[], "").await.unwrap().status,
        200
    );
    let mut second = server.http(None).await.unwrap();
    let config = client_config(&server.pki, None);
    let addr = server.addr;
    let waiting = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .unwrap();
        let mut conn = HttpConn::handshake(tls).await.unwrap();
        conn.send("GET", "/health", &[], "").await.unwrap().status
    });
    // The held connections keep working; the metric read on one of them shows the wait.
    let sample = "agentgate_limit_refusals_total{limit=\"max_connections\"}";
    let mut counted = false;
    for _ in 0..200 {
        let text = second
            .send("GET", "/metrics", &[], "")
            .await
            .unwrap()
            .text();
        if text.lines().any(|l| {
            l.strip_prefix(sample)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|v| v >= 1.0)
        }) {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(counted, "the wait for a connection slot was not counted");
    assert!(!waiting.is_finished(), "a third connection was served");
    drop(first);
    let status = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting client was never served")
        .unwrap();
    assert_eq!(status, 200);
    drop(second);
    server.stop().await;
}
