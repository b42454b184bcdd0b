//! The verifier inside the TLS handshake, end to end on real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

mod common;

use common::*;
use rustls::AlertDescription;
use serde_json::json;

#[tokio::test]
async fn client_without_certificate_completes_handshake_and_uses_the_api() {
    let server = TestServer::start().await;
    let mut conn = server.http(None).await.unwrap();
    let auth = format!("Bearer {API_KEY}");
    let r = conn
        .send(
            "POST",
            "/hello-world",
            &[("authorization", &auth)],
            r#"{"name":"Test"}"#,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"message": "Hello, Test!"}));
    server.stop().await;
}

#[tokio::test]
async fn unknown_certificate_fails_the_handshake_with_an_alert() {
    let server = TestServer::start().await;
    let stranger = server.pki.agent("stranger");
    let err = match server.tls(Some(&stranger)).await {
        // TLS 1.3: the client's handshake finishes before the server's verdict arrives.
        Ok(tls) => first_read_error(tls)
            .await
            .expect("server must not serve an unknown certificate"),
        Err(e) => e,
    };
    assert_eq!(
        alert_of(&err),
        Some(AlertDescription::CertificateUnknown),
        "{err}"
    );
    server.stop().await;
}

#[tokio::test]
async fn unknown_certificate_is_refused_for_openssl_s_client_too() {
    let server = TestServer::start().await;
    let stranger = server.pki.agent("stranger");
    let dir = server.dir.path();
    std::fs::write(dir.join("s.crt"), &stranger.cert_pem).unwrap();
    std::fs::write(dir.join("s.key"), &stranger.key_pem).unwrap();
    let mut cmd = std::process::Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &server.addr.to_string(),
        "-servername",
        "localhost",
        "-quiet",
    ])
    .arg("-CAfile")
    .arg(server.ca_file())
    .arg("-cert")
    .arg(dir.join("s.crt"))
    .arg("-key")
    .arg(dir.join("s.key"));
    let out = output_with_stdin(
        &mut cmd,
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stderr.contains("alert certificate unknown"),
        "stderr: {stderr}"
    );
    assert!(
        !stdout.contains("200 OK"),
        "served despite refusal: {stdout}"
    );
    server.stop().await;
}

#[tokio::test]
async fn uploaded_certificate_is_accepted_at_the_next_handshake_without_restart() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("agent-1");
    let err = first_read_error(server.tls(Some(&agent)).await.unwrap()).await;
    assert!(err.is_some(), "accepted before upload");
    let (status, body) = server.upload(&agent).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"message": "Certificate uploaded successfully", "agent_id": "agent-1"})
    );
    // Same certificate, next handshake: accepted, and the Socket.IO connect sees the agent.
    let SioConnect::Ok(mut sio) = SioWs::connect(&server, Some(&agent)).await.unwrap() else {
        panic!("socket refused after upload");
    };
    let state = server
        .agents
        .registry
        .get(&"agent-1".parse().unwrap())
        .expect("agent registered");
    assert_eq!(state.sessions.len(), 1);
    sio.emit(
        "heartbeat",
        json!({"cpu_usage": 1, "memory_usage": 2, "disk_usage": 3}),
    )
    .await;
    let (name, data) = sio.next_event_within(10).await.unwrap();
    assert_eq!(name, "heartbeat_ack");
    assert_eq!(data["agent_id"], "agent-1");
    server.stop().await;
}

#[tokio::test]
async fn replaced_certificate_fails_the_handshake_and_its_session_is_closed() {
    let server = TestServer::start().await;
    let old = server.pki.agent("rot-1");
    let new = server.pki.agent("rot-1");
    assert_eq!(server.upload(&old).await.0, 200);
    let SioConnect::Ok(mut old_session) = SioWs::connect(&server, Some(&old)).await.unwrap() else {
        panic!("old certificate refused before rotation");
    };
    // A kept-alive HTTP connection made with the old certificate.
    let mut kept = server.http(Some(&old)).await.unwrap();
    assert_eq!(
        kept.send("GET", "/health", &[], "").await.unwrap().status,
        200
    );

    assert_eq!(server.upload(&new).await.0, 200);

    // The old session is closed by the server.
    assert!(
        old_session.next_event_within(5).await.is_none(),
        "old session still open"
    );
    // The old certificate no longer completes a handshake; the new one does.
    let err = first_read_error(server.tls(Some(&old)).await.unwrap())
        .await
        .expect("old certificate accepted");
    assert_eq!(alert_of(&err), Some(AlertDescription::CertificateUnknown));
    assert!(matches!(
        SioWs::connect(&server, Some(&new)).await.unwrap(),
        SioConnect::Ok(_)
    ));
    // The kept-alive connection no longer carries the agent identity: a Socket.IO connect
    // over it is refused like an anonymous one.
    let mut conn = kept;
    let polling = Polling::handshake(&mut conn).await;
    assert_eq!(polling.post(&mut conn, "40").await.status, 200);
    let reply = polling.get(&mut conn).await.text();
    assert!(
        reply.split('\x1e').any(|p| p.starts_with("44")),
        "connect over the stale connection must be refused: {reply}"
    );
    server.stop().await;
}

#[tokio::test]
async fn openssl_req_x509_certificates_are_accepted_and_work_rsa_and_p256() {
    let server = TestServer::start().await;
    let dir = server.dir.path();
    for (id, newkey) in [
        ("ossl-rsa", &["rsa:2048"][..]),
        (
            "ossl-p256",
            &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"][..],
        ),
    ] {
        let agent = pki::openssl_self_signed(id, newkey, dir);
        // openssl marks these CA:TRUE; the upload must still accept them.
        let mut cmd = std::process::Command::new("openssl");
        cmd.args(["x509", "-noout", "-text"]);
        let text = output_with_stdin(&mut cmd, agent.cert_pem.as_bytes()).await;
        assert!(
            String::from_utf8_lossy(&text.stdout).contains("CA:TRUE"),
            "{id}: expected a CA:TRUE certificate"
        );
        let (status, body) = server.upload(&agent).await;
        assert_eq!(status, 200, "{id}: {body}");
        let SioConnect::Ok(mut sio) = SioWs::connect(&server, Some(&agent)).await.unwrap() else {
            panic!("{id}: refused after upload");
        };
        sio.emit(
            "heartbeat",
            json!({"cpu_usage": 1, "memory_usage": 2, "disk_usage": 3}),
        )
        .await;
        let (_, data) = sio.next_event_within(10).await.unwrap();
        assert_eq!(data["agent_id"], id);
    }
    server.stop().await;
}

#[tokio::test]
async fn forged_client_cert_header_grants_nothing() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("victim");
    assert_eq!(server.upload(&agent).await.0, 200);
    let escaped: String = agent.cert_pem.replace('\n', "%0A").replace(' ', "%20");
    let mut conn = server.http(None).await.unwrap();
    let forged = [
        ("x-ssl-client-cert", escaped.as_str()),
        ("x-ssl-client-verify", "SUCCESS"),
    ];
    // Socket.IO connect on a certificate-less connection carrying the headers: refused.
    let r = conn
        .send("GET", "/socket.io/?EIO=4&transport=polling", &forged, "")
        .await
        .unwrap();
    let text = r.text();
    let sid =
        serde_json::from_str::<serde_json::Value>(text.strip_prefix('0').unwrap()).unwrap()["sid"]
            .as_str()
            .unwrap()
            .to_owned();
    let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    assert_eq!(
        conn.send("POST", &path, &forged, "40")
            .await
            .unwrap()
            .status,
        200
    );
    let reply = conn.send("GET", &path, &forged, "").await.unwrap().text();
    assert!(
        reply.split('\x1e').any(|p| p.starts_with("44")),
        "forged header let a socket in: {reply}"
    );
    assert!(
        server
            .agents
            .registry
            .get(&"victim".parse().unwrap())
            .is_none()
    );
    // And the API key is still required.
    let r = conn
        .send("POST", "/hello-world", &forged, r#"{"name":"x"}"#)
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    server.stop().await;
}

#[tokio::test]
async fn expired_stored_certificate_fails_the_handshake_with_certificate_expired() {
    // A certificate adopted from disk that has expired since: stored, but refused.
    let pki = std::sync::Arc::new(TestPki::new());
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let now = time::OffsetDateTime::now_utc();
    let expired = pki.agent_with(
        "old-agent",
        AgentOpts {
            not_before: now - time::Duration::days(10),
            not_after: now - time::Duration::days(1),
            ..Default::default()
        },
    );
    std::fs::create_dir_all(dir.path().join("certs")).unwrap();
    std::fs::write(dir.path().join("certs/old-agent.pem"), &expired.cert_pem).unwrap();
    let config = test_config(&pki, dir.path(), |_| {});
    let server = TestServer::start_in(pki, dir, config).await.unwrap();
    assert_eq!(server.store.len(), 1);
    let err = first_read_error(server.tls(Some(&expired)).await.unwrap())
        .await
        .expect("expired accepted");
    assert_eq!(
        alert_of(&err),
        Some(AlertDescription::CertificateExpired),
        "{err}"
    );
    server.stop().await;
}

#[tokio::test]
async fn stalled_handshake_is_dropped_after_the_timeout() {
    use tokio::io::AsyncReadExt;
    let server = TestServer::start_with(|c| c.handshake_timeout_secs = 1).await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Send nothing: the server must close the connection after about a second.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("server kept a silent connection open")
        .unwrap_or(0);
    assert_eq!(n, 0);
    server.stop().await;
}

#[tokio::test]
async fn only_tls_1_2_and_1_3_are_offered() {
    let server = TestServer::start().await;
    for (flag, ok) in [("-tls1_1", false), ("-tls1_2", true), ("-tls1_3", true)] {
        let mut cmd = std::process::Command::new("openssl");
        cmd.args([
            "s_client",
            "-connect",
            &server.addr.to_string(),
            "-servername",
            "localhost",
            flag,
        ])
        .arg("-CAfile")
        .arg(server.ca_file());
        let out = output_with_stdin(&mut cmd, b"").await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let negotiated = stdout.contains("Cipher is") && !stdout.contains("Cipher is (NONE)");
        assert_eq!(negotiated, ok, "{flag}: {stdout}");
    }
    server.stop().await;
}

/// Runs a command with `input` on stdin and returns its output, without blocking the
/// runtime that serves the gateway.
async fn output_with_stdin(cmd: &mut std::process::Command, input: &[u8]) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    let mut child =
        tokio::process::Command::from(std::mem::replace(cmd, std::process::Command::new("true")))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).await.unwrap();
    // s_client sends what it read and then waits for the server; give it time before EOF.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    drop(stdin);
    tokio::time::timeout(std::time::Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("command hung")
        .unwrap()
}

#[tokio::test]
async fn resumed_session_with_a_replaced_certificate_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start().await;
    let old = server.pki.agent("resume-1");
    assert_eq!(server.upload(&old).await.0, 200);
    // One client configuration, so its session cache carries the ticket to the next connect.
    let config = client_config(&server.pki, Some(&old));
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        tokio_rustls::TlsConnector::from(config.clone())
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap()
    };
    let request = b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
    let mut first = connect().await;
    first.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    first.read_to_end(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    // Control: while the certificate is stored, resumption works and is served.
    let mut second = connect().await;
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    second.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    second.read_to_end(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"),
        "resumed session not served"
    );

    assert_eq!(server.upload(&server.pki.agent("resume-1")).await.0, 200);
    let mut third = connect().await;
    assert_eq!(
        third.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    let _ = third.write_all(request).await;
    let mut buf = Vec::new();
    let _ = third.read_to_end(&mut buf).await;
    assert!(
        buf.is_empty(),
        "a resumed session for a replaced certificate was served: {}",
        String::from_utf8_lossy(&buf)
    );
    server.stop().await;
}
