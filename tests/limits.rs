//! `[limits]` (issue 11, "Limits"): unfinished handshakes per source address, failed
//! handshakes per source address, and 2,000 connections that never send a ClientHello
//! next to a normal client. Sources other than 127.0.0.1 are other loopback addresses
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

async fn metric(server: &TestServer, sample: &str) -> f64 {
    let mut conn = server.http(None).await.unwrap();
    let text = conn.send("GET", "/metrics", &[], "").await.unwrap().text();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
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
        metric(
            &server,
            "agentgate_limit_refusals_total{limit=\"handshakes_per_source\"}"
        )
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
        metric(
            &server,
            "agentgate_limit_refusals_total{limit=\"handshake_failures\"}"
        )
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
        metric(
            &server,
            "agentgate_limit_refusals_total{limit=\"http_idle_timeout_secs\"}"
        )
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
        metric(
            &server,
            "agentgate_limit_refusals_total{limit=\"max_uri_bytes\"}"
        )
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
    assert!(metric(&server, "agentgate_socket_backpressure_total").await >= 1.0);
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
    let mut acks = 0;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(m)) = stream.next().await {
            match m {
                Message::Text(t) if t.contains("heartbeat_ack") => acks += 1,
                Message::Text(t) if t.as_str() == "41" => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the flooding session stayed open");
    assert_eq!(
        acks, 50,
        "every event within the limit, and none past it, is answered"
    );
    assert!(server.agents.registry.sessions_of(&id, None).is_empty());
    assert!(
        metric(
            &server,
            "agentgate_limit_refusals_total{limit=\"agent_events\"}"
        )
        .await
            >= 1.0
    );
    // A new session of the same agent starts with a fresh count.
    let _again = ws_session(&server, &agent).await;
    writer.abort();
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
