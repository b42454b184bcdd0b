//! The HTTP API: authentication, the upload rules with their exact details, body limits,
//! and that a refused upload writes nothing anywhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

mod common;

use common::*;
use serde_json::{Value, json};

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Every file under `dir`, recursively (to prove nothing was written anywhere).
fn tree(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    out.sort();
    out
}

async fn upload_raw(server: &TestServer, agent_id: Value, certificate: Value) -> (u16, Value) {
    server
        .api(
            "POST",
            "/agent/certificate",
            Some(json!({"agent_id": agent_id, "certificate": certificate})),
        )
        .await
}

fn detail(v: &Value) -> &str {
    v["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no detail in {v}"))
}

#[tokio::test]
async fn health_needs_no_key_and_everything_else_does() {
    let server = TestServer::start().await;
    let mut conn = server.http(None).await.unwrap();
    let r = conn.send("GET", "/health", &[], "").await.unwrap();
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
    let r = conn
        .send("POST", "/hello-world", &[], r#"{"name":"x"}"#)
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert!(detail(&r.json()).contains("Not authenticated"));
    let r = conn
        .send(
            "POST",
            "/hello-world",
            &[("authorization", "Bearer wrong")],
            r#"{"name":"x"}"#,
        )
        .await
        .unwrap();
    assert_eq!((r.status, detail(&r.json())), (403, "Invalid API key"));
    let r = conn
        .send(
            "POST",
            "/agent/certificate",
            &[("authorization", "Basic abc")],
            "{}",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    server.stop().await;
}

#[tokio::test]
async fn every_configured_api_key_works_for_rotation() {
    let server =
        TestServer::start_with(|c| c.api_keys = vec!["old-key".into(), API_KEY.into()]).await;
    let mut conn = server.http(None).await.unwrap();
    for key in ["old-key", API_KEY] {
        let auth = format!("Bearer {key}");
        let r = conn
            .send(
                "POST",
                "/hello-world",
                &[("authorization", &auth)],
                r#"{"name":"R"}"#,
            )
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.json()),
            (200, json!({"message": "Hello, R!"})),
            "{key}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn upload_refusals_have_precise_details_and_write_nothing() {
    let server = TestServer::start().await;
    let pki = &server.pki;
    let now = time::OffsetDateTime::now_utc();
    let good = pki.agent("12345678");
    let expired = pki.agent_with(
        "exp-1",
        AgentOpts {
            not_before: now - time::Duration::days(10),
            not_after: now - time::Duration::days(1),
            ..Default::default()
        },
    );
    let future = pki.agent_with(
        "fut-1",
        AgentOpts {
            not_before: now + time::Duration::days(1),
            not_after: now + time::Duration::days(10),
            ..Default::default()
        },
    );
    let ca_signed = pki.ca_signed_agent("ca-1");
    let two = format!("{}{}", good.cert_pem, pki.agent("12345678").cert_pem);
    let with_key = format!("{}{}", good.cert_pem, good.key_pem);
    let weak_rsa = pki::openssl_self_signed("weak-1", &["rsa:1024"], server.dir.path());
    let cases: Vec<(Value, Value, u16, &str)> = vec![
        (
            json!("07048933"),
            json!(good.cert_pem),
            400,
            "Agent ID mismatch: provided '07048933' but certificate CN is '12345678'",
        ),
        (
            json!("exp-1"),
            json!(expired.cert_pem),
            400,
            "certificate has expired",
        ),
        (
            json!("fut-1"),
            json!(future.cert_pem),
            400,
            "certificate is not yet valid",
        ),
        (
            json!("ca-1"),
            json!(ca_signed.cert_pem),
            400,
            "certificate is not self-signed",
        ),
        (json!("12345678"), json!("hello"), 400, "invalid PEM"),
        (json!("12345678"), json!(""), 400, "invalid PEM"),
        (
            json!("12345678"),
            json!(two),
            400,
            "expected exactly one certificate, found 2",
        ),
        (
            json!("12345678"),
            json!(with_key),
            400,
            "contains a private key",
        ),
        (
            json!("12345678"),
            json!(good.key_pem),
            400,
            "contains a private key",
        ),
        (
            json!("12345678"),
            json!("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
            400,
            "not a 'CERTIFICATE'",
        ),
        (
            json!("12345678"),
            json!("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            400,
            "not a valid X.509 certificate",
        ),
        (
            json!("12345678"),
            json!("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"),
            400,
            "invalid PEM",
        ),
        (
            json!("weak-1"),
            json!(weak_rsa.cert_pem),
            400,
            "RSA key of 1024 bits is too weak",
        ),
        (
            json!(12345678),
            json!(good.cert_pem),
            422,
            "invalid JSON body",
        ),
        (json!(null), json!(good.cert_pem), 422, "invalid JSON body"),
    ];
    for (agent_id, cert, status, expected) in cases {
        let (got_status, body) = upload_raw(&server, agent_id.clone(), cert).await;
        assert_eq!(got_status, status, "{agent_id}: {body}");
        assert!(
            detail(&body).contains(expected),
            "{agent_id}: expected {expected:?} in {body}"
        );
    }
    assert_eq!(
        files_in(&server.store_dir()),
        Vec::<String>::new(),
        "a refused upload wrote a file"
    );
    assert!(server.store.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn certificate_without_cn_is_refused() {
    let server = TestServer::start().await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "no cn here");
    let cert = params.self_signed(&key).unwrap();
    let (status, body) = upload_raw(&server, json!("a1"), json!(cert.pem())).await;
    assert_eq!(status, 400);
    assert_eq!(detail(&body), "certificate subject has no CN (common name)");
    server.stop().await;
}

#[tokio::test]
async fn hostile_agent_ids_are_refused_and_nothing_is_written_anywhere() {
    let server = TestServer::start().await;
    let before = tree(server.dir.path());
    let long = "a".repeat(200);
    for id in [
        "../../etc/x",
        "",
        long.as_str(),
        "a/b",
        "a\0b",
        ".hidden",
        "..",
        "a b",
    ] {
        // The certificate's CN equals the id where rcgen allows it, so only the id rule can refuse.
        let cn = if id.is_empty() || id.contains('\0') {
            "x"
        } else {
            id
        };
        let agent = server.pki.agent_with(
            id,
            AgentOpts {
                cn: Some(cn),
                ..Default::default()
            },
        );
        let (status, body) = upload_raw(&server, json!(id), json!(agent.cert_pem)).await;
        assert_eq!(status, 400, "{id:?}: {body}");
        assert!(
            detail(&body).starts_with("invalid agent_id"),
            "{id:?}: {body}"
        );
    }
    assert_eq!(tree(server.dir.path()), before, "files appeared");
    assert!(!std::path::Path::new("/etc/x.pem").exists());
    server.stop().await;
}

#[tokio::test]
async fn body_limits_and_malformed_json() {
    let server = TestServer::start().await;
    let mut conn = server.http(None).await.unwrap();
    let auth = format!("Bearer {API_KEY}");
    let h = [("authorization", auth.as_str())];
    let big = format!(
        r#"{{"agent_id":"a","certificate":"{}"}}"#,
        "A".repeat(70 * 1024)
    );
    let r = conn
        .send("POST", "/agent/certificate", &h, &big)
        .await
        .unwrap();
    assert_eq!(r.status, 413);
    let d = detail(&r.json()).to_owned();
    assert!(
        d.contains("limit of 65536 bytes") && d.contains("limits.max_body_bytes"),
        "{d}"
    );
    let mut conn = server.http(None).await.unwrap();
    for body in [
        "{not json",
        r#"{"agent_id":"a"}"#,
        r#"{"certificate":"x"}"#,
        "[]",
    ] {
        let r = conn
            .send("POST", "/agent/certificate", &h, body)
            .await
            .unwrap();
        assert_eq!(r.status, 422, "{body}: {}", r.text());
        assert!(detail(&r.json()).starts_with("invalid JSON body"), "{body}");
    }
    let r = conn
        .send("POST", "/hello-world", &h, r#"{"nom":"x"}"#)
        .await
        .unwrap();
    assert_eq!(r.status, 422);
    assert!(detail(&r.json()).contains("missing field `name`"));
    let r = conn.send("GET", "/nope", &h, "").await.unwrap();
    assert_eq!((r.status, detail(&r.json())), (404, "Not Found"));
    server.stop().await;
}

#[tokio::test]
async fn upload_writes_the_old_systems_layout() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("07048933");
    assert_eq!(server.upload(&agent).await.0, 200);
    assert_eq!(files_in(&server.store_dir()), vec!["07048933.pem"]);
    let text = std::fs::read_to_string(server.store_dir().join("07048933.pem")).unwrap();
    assert_eq!(pem::parse(&text).unwrap().contents(), agent.der.as_slice());
    server.stop().await;
}

#[tokio::test]
async fn cors_allows_only_configured_origins() {
    let server =
        TestServer::start_with(|c| c.cors_origins = vec!["https://app.example.com".into()]).await;
    let mut conn = server.http(None).await.unwrap();
    let preflight = |origin: &'static str| {
        [
            ("origin", origin),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization,content-type",
            ),
        ]
    };
    let r = conn
        .send(
            "OPTIONS",
            "/agent/certificate",
            &preflight("https://app.example.com"),
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers["access-control-max-age"], "86400");
    let r = conn
        .send(
            "OPTIONS",
            "/agent/certificate",
            &preflight("https://evil.example"),
            "",
        )
        .await
        .unwrap();
    assert!(r.headers.get("access-control-allow-origin").is_none());
    server.stop().await;
}

/// The separate metrics listener is one of the gateway's listeners: it serves while the
/// gateway runs, and on shutdown stops accepting (its port refuses) and closes its
/// kept-alive connections before `serve` returns.
#[tokio::test]
async fn metrics_listener_stops_and_drains_on_shutdown() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_tracing();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(&pki, dir.path(), |c| {
        c.metrics_listen = Some("127.0.0.1:1".parse().unwrap())
    });
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = agentgate::Gateway::start(config)
        .await
        .unwrap()
        .with_metrics_listener(metrics);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(gateway.serve(listener, async move {
        let _ = rx.await;
    }));

    let mut kept = tokio::net::TcpStream::connect(metrics_addr).await.unwrap();
    kept.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = kept.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    tx.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(15), task)
        .await
        .expect("serve() did not return")
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(metrics_addr).await.is_err(),
        "metrics port still accepting after shutdown"
    );
    // The kept-alive connection was closed by the drain (EOF, or a reset).
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        kept.read_to_end(&mut rest),
    )
    .await
    .expect("kept-alive metrics connection not closed");
    let _ = closed;
}
