//! Hostile and sloppy input (issue 11, "Found, to fix"): an ambiguous certificate subject,
//! repeated `Authorization` fields, error responses without a `detail`, JSON arrays read
//! as objects, partial heartbeats, and heartbeat floods.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

mod common;

use common::*;
use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair};
use serde_json::{Value, json};

/// A self-signed P-256 certificate whose subject holds two CN attributes: `first`, then
/// `second`. rcgen keeps one value per attribute type, so the second CN goes in under the
/// CN's OID (2.5.4.3) as a custom type.
fn two_cn_agent(first: &str, second: &str) -> AgentCert {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, first);
    params
        .distinguished_name
        .push(DnType::CustomDnType(vec![2, 5, 4, 3]), second);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&key).unwrap();
    AgentCert::from_pem(first, cert.pem(), key.serialize_pem())
}

fn detail(v: &Value) -> &str {
    v["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no detail in {v}"))
}

#[tokio::test]
async fn a_subject_with_two_common_names_is_refused_at_upload_and_at_load() {
    let server = TestServer::start().await;
    let ambiguous = two_cn_agent("twocn-1", "someone-else");
    // The fixture really holds both CNs, the first equal to the agent id.
    let subject = openssl_subject(&ambiguous.cert_pem);
    assert!(
        subject.contains("CN=twocn-1") && subject.contains("CN=someone-else"),
        "{subject}"
    );
    let (status, body) = server.upload(&ambiguous).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        detail(&body).contains("subject must hold exactly one CN"),
        "{body}"
    );
    assert!(server.store.is_empty(), "nothing stored");

    // A file copied into the directory by hand is skipped with a reason, not loaded.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("twocn-1.pem"), &ambiguous.cert_pem).unwrap();
    let good = server.pki.agent("good-1");
    std::fs::write(dir.path().join("good-1.pem"), &good.cert_pem).unwrap();
    let (store, skipped) = agentgate::store::CertStore::open(dir.path()).unwrap();
    assert_eq!(store.len(), 1);
    assert_eq!(skipped.len(), 1);
    assert!(
        skipped[0].reason.contains("exactly one CN"),
        "{}",
        skipped[0].reason
    );
    server.stop().await;
}

fn openssl_subject(pem: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-nameopt", "RFC2253"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pem.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn two_authorization_fields_are_a_bad_request_whichever_comes_first() {
    let server = TestServer::start().await;
    let mut conn = server.http(None).await.unwrap();
    let right = format!("Bearer {API_KEY}");
    for pair in [
        [right.as_str(), "Bearer wrong"],
        ["Bearer wrong", right.as_str()],
        [right.as_str(), right.as_str()],
    ] {
        let r = conn
            .send(
                "POST",
                "/hello-world",
                &[("authorization", pair[0]), ("authorization", pair[1])],
                r#"{"name":"x"}"#,
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{pair:?}: {}", r.text());
        assert!(
            detail(&r.json()).contains("more than one Authorization"),
            "{}",
            r.text()
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn the_bearer_scheme_name_is_case_insensitive() {
    let server = TestServer::start().await;
    let mut conn = server.http(None).await.unwrap();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let auth = format!("{scheme} {API_KEY}");
        let r = conn
            .send(
                "POST",
                "/hello-world",
                &[("authorization", &auth)],
                r#"{"name":"x"}"#,
            )
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.json()),
            (200, json!({"message": "Hello, x!"})),
            "{scheme}"
        );
    }
    // Another scheme, or a scheme glued to the key, is still no key at all.
    for auth in [format!("Basic {API_KEY}"), format!("Bearer{API_KEY}")] {
        let r = conn
            .send(
                "POST",
                "/hello-world",
                &[("authorization", &auth)],
                r#"{"name":"x"}"#,
            )
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{auth}");
        assert!(detail(&r.json()).contains("Not authenticated"));
    }
    server.stop().await;
}

#[tokio::test]
async fn a_body_that_is_not_a_json_object_is_refused_with_422() {
    let server = TestServer::start().await;
    for (path, body, what) in [
        ("/hello-world", json!(["x"]), "an array"),
        ("/hello-world", json!("x"), "a string"),
        ("/hello-world", json!(7), "a number"),
        ("/hello-world", Value::Null, "null"),
        ("/agent/certificate", json!(["a1", "pem"]), "an array"),
        ("/install-tokens", json!(["a1", 60]), "an array"),
        ("/agents/a1/commands", json!(["reboot"]), "an array"),
    ] {
        let (status, reply) = server.api("POST", path, Some(body.clone())).await;
        assert_eq!(status, 422, "{path} {body}: {reply}");
        assert_eq!(
            detail(&reply),
            format!("invalid JSON body: the request body must be a JSON object, got {what}"),
            "{path}"
        );
    }
    // `/agent/register` needs no key; it reads its body the same way.
    let mut conn = server.http(None).await.unwrap();
    let r = conn
        .send("POST", "/agent/register", &[], r#"["t", "a1", "pem"]"#)
        .await
        .unwrap();
    assert_eq!(r.status, 422, "{}", r.text());
    let (status, reply) = server
        .api("POST", "/hello-world", Some(json!({"name": "x"})))
        .await;
    assert_eq!((status, reply), (200, json!({"message": "Hello, x!"})));
    server.stop().await;
}

/// Every error the gateway writes has a JSON body with a `detail`.
fn assert_detail(what: &str, r: &HttpResponse, status: u16) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: content-type {ct:?}"
    );
    let body: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {:?}", r.text()));
    let text = body["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no detail in {body}"));
    assert!(!text.is_empty(), "{what}: empty detail");
}

#[tokio::test]
async fn every_error_response_carries_a_json_detail() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("errs-1");
    assert_eq!(server.upload(&agent).await.0, 200);
    let auth = format!("Bearer {API_KEY}");
    let key = [("authorization", auth.as_str())];
    let mut conn = server.http(None).await.unwrap();

    let r = conn.send("GET", "/no/such/path", &key, "").await.unwrap();
    assert_detail("unknown path", &r, 404);

    // 405 with the methods the path does answer (without the key it is the 403 below).
    for method in ["GET", "PUT", "PATCH"] {
        {
            let r = conn
                .send(method, "/agent/certificate", &key, "")
                .await
                .unwrap();
            assert_detail(&format!("{method} /agent/certificate"), &r, 405);
            assert_eq!(r.headers["allow"], "POST", "{method}");
            assert!(
                r.json()["detail"].as_str().unwrap().contains(&format!(
                    "method {method} is not allowed on /agent/certificate"
                )),
                "{}",
                r.text()
            );
        }
    }
    let r = conn.send("POST", "/health", &[], "").await.unwrap();
    assert_detail("POST /health", &r, 405);
    assert_eq!(r.headers["allow"], "GET,HEAD");

    // 413: an API body over its limit, refused unread; the connection closes after it.
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(70 * 1024));
    let r = conn.send("POST", "/hello-world", &key, &big).await.unwrap();
    assert_detail("API body too large", &r, 413);
    assert_eq!(r.headers["connection"], "close");

    // 414 and 431: the request head limits.
    let mut conn = server.http(None).await.unwrap();
    let long = format!("/agents?after={}", "a".repeat(9000));
    let r = conn.send("GET", &long, &key, "").await.unwrap();
    assert_detail("long URI", &r, 414);
    let mut conn = server.http(None).await.unwrap();
    let names: Vec<String> = (0..120).map(|i| format!("x-filler-{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let r = conn.send("GET", "/health", &many, "").await.unwrap();
    assert_detail("too many header fields", &r, 431);
    let mut conn = server.http(None).await.unwrap();
    let huge = "v".repeat(40 * 1024);
    let r = conn
        .send("GET", "/health", &[("x-huge", &huge)], "")
        .await
        .unwrap();
    assert_detail("header fields too large", &r, 431);

    // 403 and 400 of the API key check.
    let mut conn = server.http(None).await.unwrap();
    let r = conn.send("GET", "/agents", &[], "").await.unwrap();
    assert_detail("no key", &r, 403);
    let r = conn
        .send(
            "GET",
            "/agents",
            &[key[0], ("authorization", "Bearer x")],
            "",
        )
        .await
        .unwrap();
    assert_detail("two keys", &r, 400);

    // Socket.IO: the session guard's refusals, and the engine's own 400 and 413.
    let r = conn
        .send(
            "GET",
            "/socket.io/?EIO=4&transport=polling&sid=AAAAAAAAAAAAAAAA",
            &[],
            "",
        )
        .await
        .unwrap();
    assert_detail("unknown sid", &r, 400);
    let mut agent_conn = server.http(Some(&agent)).await.unwrap();
    let session = Polling::handshake(&mut agent_conn).await;
    let r = session.get(&mut conn).await;
    assert_detail("sid of another identity", &r, 403);
    let r = session.post(&mut agent_conn, "\u{1}garbage").await;
    assert_detail("bad Engine.IO packet", &r, 400);
    // The engine closed that session on the bad packet; a new one for the next refusal.
    let session = Polling::handshake(&mut agent_conn).await;
    let max = server.config.limits.max_packet_bytes as usize;
    let r = session
        .post(&mut agent_conn, &format!("4{}", "x".repeat(max + 1)))
        .await;
    assert_detail("Engine.IO payload too large", &r, 413);
    let r = conn
        .send("GET", "/socket.io/?EIO=4&transport=carrier-pigeon", &[], "")
        .await
        .unwrap();
    assert_detail("unknown transport", &r, 400);
    server.stop().await;
}

#[tokio::test]
async fn every_heartbeat_is_acknowledged_and_a_malformed_one_also_gets_an_error() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("hbp-1");
    assert_eq!(server.upload(&agent).await.0, 200);
    let mut sio = match SioWs::connect(&server, Some(&agent)).await.unwrap() {
        SioConnect::Ok(s) => s,
        SioConnect::Refused(v) => panic!("refused: {v}"),
    };
    let id = "hbp-1".parse().unwrap();
    let stored = |server: &TestServer| {
        server
            .agents
            .registry
            .get(&id)
            .unwrap()
            .last_heartbeat
            .unwrap()
            .payload
    };

    // Fewer fields, and a field this gateway does not know: ack, no error, nulls stored.
    sio.emit("heartbeat", json!({"cpu_usage": 0.5, "gpu_usage": 0.25}))
        .await;
    let (name, data) = sio.next_event_within(10).await.unwrap();
    assert_eq!(
        (name.as_str(), &data["agent_id"]),
        ("heartbeat_ack", &json!("hbp-1"))
    );
    assert_eq!(
        stored(&server),
        json!({"cpu_usage": 0.5, "memory_usage": null, "disk_usage": null, "timestamp": null, "gpu_usage": 0.25})
    );

    // A known field of the wrong type: the error event, then the ack; the rest is stored.
    sio.emit(
        "heartbeat",
        json!({"cpu_usage": "high", "memory_usage": 1, "disk_usage": 2}),
    )
    .await;
    let (name, data) = sio.next_event_within(10).await.unwrap();
    assert_eq!(name, "error", "{data}");
    assert_eq!(data["event"], "heartbeat");
    assert!(
        data["message"]
            .as_str()
            .unwrap()
            .contains("`cpu_usage` must be a number"),
        "{data}"
    );
    assert_eq!(sio.next_event_within(10).await.unwrap().0, "heartbeat_ack");
    assert_eq!(
        stored(&server),
        json!({"cpu_usage": null, "memory_usage": 1, "disk_usage": 2, "timestamp": null})
    );

    // Not an object at all: the error event, then the ack.
    for bad in [json!("text"), json!([1, 2])] {
        sio.emit("heartbeat", bad.clone()).await;
        let (name, data) = sio.next_event_within(10).await.unwrap();
        assert_eq!(name, "error", "{bad}");
        assert!(
            data["message"]
                .as_str()
                .unwrap()
                .starts_with("heartbeat payload must be a JSON object"),
            "{data}"
        );
        assert_eq!(sio.next_event_within(10).await.unwrap().0, "heartbeat_ack");
    }
    assert_eq!(
        server
            .metric(r#"agentgate_heartbeats_malformed_total{problem="wrong_type"}"#)
            .await,
        1.0
    );
    assert_eq!(
        server
            .metric(r#"agentgate_heartbeats_malformed_total{problem="not_an_object"}"#)
            .await,
        2.0
    );
    assert_eq!(server.metric("agentgate_heartbeats_total").await, 4.0);
    server.stop().await;
}

/// An agent build that sends fewer fields, driven by python-socketio over polling with the
/// upgrade, as existing agents connect: every heartbeat gets its `heartbeat_ack`.
#[tokio::test]
async fn python_agent_with_a_partial_heartbeat_gets_every_ack() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("hbp-py");
    assert_eq!(server.upload(&agent).await.0, 200);
    let (code, lines) = python_agent(
        &server,
        Some(&agent),
        &[
            "--heartbeats",
            "3",
            "--payload",
            r#"{"cpu_usage": 0.5, "uptime_s": 12}"#,
        ],
    )
    .await;
    assert_eq!(code, 0, "{lines:?}");
    let acks: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "heartbeat_ack")
        .collect();
    assert_eq!(acks.len(), 3, "{lines:?}");
    assert!(acks.iter().all(|l| l["data"]["agent_id"] == "hbp-py"));
    let hb = server
        .agents
        .registry
        .get(&"hbp-py".parse().unwrap())
        .unwrap()
        .last_heartbeat
        .unwrap();
    assert_eq!(hb.payload["uptime_s"], 12);
    assert_eq!(hb.payload["disk_usage"], Value::Null);
    server.stop().await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A new WebSocket session of `agent`, connected to the namespace.
async fn ws_session(server: &TestServer, agent: &AgentCert) -> Ws {
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

/// A session of `agent` opened over long-polling, then upgraded to a WebSocket on another
/// connection (as python-socketio does).
async fn upgraded_session(server: &TestServer, agent: &AgentCert) -> Ws {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut conn = server.http(Some(agent)).await.unwrap();
    let polling = Polling::handshake(&mut conn).await;
    assert_eq!(polling.post(&mut conn, "40").await.status, 200);
    connect_ack(&polling, &mut conn).await;
    let tls = server.tls(Some(agent)).await.unwrap();
    let url = format!(
        "wss://localhost:{}/socket.io/?EIO=4&transport=websocket&sid={}",
        server.addr.port(),
        polling.sid
    );
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    ws.send(Message::text("2probe")).await.unwrap();
    let probe = ws.next().await.unwrap().unwrap();
    assert_eq!(probe.to_text().unwrap(), "3probe");
    ws.send(Message::text("5")).await.unwrap();
    ws
}

/// What came back from a flood.
#[derive(Debug, PartialEq, Eq)]
struct Flood {
    /// `heartbeat_ack` events.
    acks: usize,
    /// Acknowledgements of heartbeats emitted with an ack id, which arrived in order.
    callbacks_in_order: usize,
    /// The session ended before every reply came.
    ended: bool,
}

/// Sends `count` heartbeats back to back on `ws` (with ack ids 0.. if `with_ack`) while
/// reading, until every reply came or the session ended.
async fn flood(ws: Ws, count: usize, with_ack: bool) -> Flood {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut sink, mut stream) = ws.split();
    let (pong_tx, mut pong_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let writer = tokio::spawn(async move {
        let payload =
            json!(["heartbeat", {"cpu_usage": 0.5, "memory_usage": 256, "disk_usage": 1024}]);
        for i in 0..count {
            // Pongs go out between heartbeats, as a client's write queue would send them.
            while pong_rx.try_recv().is_ok() {
                if sink.feed(Message::text("3")).await.is_err() {
                    return;
                }
            }
            let frame = if with_ack {
                format!("42{i}{payload}")
            } else {
                format!("42{payload}")
            };
            if sink.feed(Message::text(frame)).await.is_err() {
                return;
            }
        }
        let _ = sink.flush().await;
        while pong_rx.recv().await.is_some() {
            if sink.send(Message::text("3")).await.is_err() {
                return;
            }
        }
    });
    let mut got = Flood {
        acks: 0,
        callbacks_in_order: 0,
        ended: false,
    };
    let callbacks = if with_ack { count } else { 0 };
    // A failure bound, not a measurement: the replaced system took 20 s for 30,000.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    while got.acks < count || got.callbacks_in_order < callbacks {
        let Ok(next) = tokio::time::timeout_at(deadline, stream.next()).await else {
            panic!("{got:?} of {count} heartbeats, and the session is still open")
        };
        match next {
            Some(Ok(Message::Text(t))) => {
                let t = t.as_str();
                if t == "2" {
                    let _ = pong_tx.send(());
                } else if t.starts_with(r#"42["heartbeat_ack""#) {
                    got.acks += 1;
                } else if let Some(rest) = t.strip_prefix("43") {
                    let expected = format!("{}[", got.callbacks_in_order);
                    assert!(rest.starts_with(&expected), "ack out of order: {t}");
                    got.callbacks_in_order += 1;
                } else if t == "1" || t.starts_with("41") {
                    got.ended = true;
                    break;
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                got.ended = true;
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    drop(pong_tx);
    writer.abort();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_thousand_heartbeats_back_to_back_are_all_acknowledged() {
    // The default ping interval (25 s): engineioxide ends a session whose send buffer is
    // full when a ping is due (README, "What an agent can rely on"), which a flood of more
    // than a ping interval can meet.
    let server = TestServer::start().await;
    let agent = server.pki.agent("flood-1");
    assert_eq!(server.upload(&agent).await.0, 200);
    let ws = ws_session(&server, &agent).await;
    let got = flood(ws, 30_000, false).await;
    assert_eq!(
        got,
        Flood {
            acks: 30_000,
            callbacks_in_order: 0,
            ended: false
        }
    );
    // The buffer did fill, and the session was paused rather than its replies dropped.
    assert!(server.metric("agentgate_socket_backpressure_total").await >= 1.0);
    assert_eq!(
        server
            .metric("agentgate_socket_overflow_disconnects_total")
            .await,
        0.0
    );
    assert_eq!(server.metric("agentgate_heartbeats_total").await, 30_000.0);
    server.stop().await;
}

/// The same after the polling-to-WebSocket upgrade (the session guard records the
/// WebSocket's connection), with every heartbeat emitted with a callback: the events and
/// the acknowledgements all arrive, the acknowledgements in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_after_the_upgrade_gets_every_event_and_callback_in_order() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("flood-2");
    assert_eq!(server.upload(&agent).await.0, 200);
    let ws = upgraded_session(&server, &agent).await;
    let got = flood(ws, 10_000, true).await;
    assert_eq!(
        got,
        Flood {
            acks: 10_000,
            callbacks_in_order: 10_000,
            ended: false
        }
    );
    assert!(server.metric("agentgate_socket_backpressure_total").await >= 1.0);
    server.stop().await;
}

/// Long-polling has no connection to stop reading: a client that posts heartbeats by the
/// thousand and never polls for the answers has its session closed once its replies pass
/// the per-session limit (`limits.session_reply_queue`, small here), with the metric,
/// rather than losing replies without a word.
#[tokio::test]
async fn a_polling_client_that_never_polls_is_disconnected_not_silently_shortened() {
    // A short ping interval: engineioxide ends the session at its next ping, which finds
    // the buffer full, and only then does the registry see the agent go.
    const QUEUE: usize = 256;
    let server = TestServer::start_with(|c| {
        c.socketio.ping_interval_secs = 1;
        c.socketio.ping_timeout_secs = 1;
        c.limits.session_reply_queue = QUEUE;
    })
    .await;
    let agent = server.pki.agent("flood-poll");
    assert_eq!(server.upload(&agent).await.0, 200);
    let mut conn = server.http(Some(&agent)).await.unwrap();
    let polling = Polling::handshake(&mut conn).await;
    assert_eq!(polling.post(&mut conn, "40").await.status, 200);
    connect_ack(&polling, &mut conn).await;
    let packet = format!(
        "42{}",
        json!(["heartbeat", {"cpu_usage": 0.5, "memory_usage": 256, "disk_usage": 1024}])
    );
    let max = server.config.limits.max_packet_bytes as usize;
    let per_post = max / (packet.len() + 1);
    let batch = vec![packet.as_str(); per_post].join("\u{1e}");
    let mut posted = 0;
    let mut refused = None;
    // Enough posts to pass the configured limit of queued replies several times over.
    for _ in 0..(3 * QUEUE / per_post + 3) {
        let r = polling.post(&mut conn, &batch).await;
        if r.status != 200 {
            refused = Some(r);
            break;
        }
        posted += per_post;
    }
    let refused = refused.unwrap_or_else(|| panic!("{posted} heartbeats accepted, never polled"));
    assert_eq!(refused.status, 400, "{}", refused.text());
    // One post holds more heartbeats than the configured queue (and buffer) take: the
    // session overflowed within it, and the next post was refused.
    assert!(
        per_post > QUEUE + 128 && posted <= per_post,
        "closed after {posted} heartbeats ({per_post} a post, queue {QUEUE})"
    );
    assert_eq!(
        server
            .metric("agentgate_socket_overflow_disconnects_total")
            .await,
        1.0
    );
    // Every later request of the session is refused, polls included: with the reason
    // while the session is closing, as an unknown session once it is gone (engineioxide
    // ends it at its next ping, which may come first on a loaded machine).
    let r = polling.get(&mut conn).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("faster than it read") || r.text().contains("unknown Socket.IO session"),
        "{}",
        r.text()
    );
    let gone = async {
        while server.agents.registry.connected_agents() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), gone)
        .await
        .expect("the session was never closed");
    server.stop().await;
}

/// An agent that floods and never reads: its session's send buffer fills. A command to it
/// is answered with an error and counted, never lost without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_to_an_agent_whose_buffer_fills_is_answered_with_an_error() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start().await;
    let agent = server.pki.agent("deaf-1");
    assert_eq!(server.upload(&agent).await.0, 200);
    // A small receive window, so the gateway's writes to it block early.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config(&server.pki, Some(&agent)))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut ws, _) = agentgate_testkit::sio::open(tls, server.addr.port(), None)
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        let frame = format!(
            "42{}",
            json!(["heartbeat", {"cpu_usage": 0.5, "memory_usage": 256, "disk_usage": 1024}])
        );
        // Writes until the gateway stops reading (its backpressure), then blocks there.
        loop {
            if ws.send(Message::text(frame.clone())).await.is_err() {
                return;
            }
        }
    });
    let paused = async {
        while server.metric("agentgate_socket_backpressure_total").await < 1.0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), paused)
        .await
        .expect("the session's send buffer never filled");

    let (status, reply) = server
        .api(
            "POST",
            "/agents/deaf-1/commands",
            Some(json!({"event": "reboot", "timeout_ms": 1000})),
        )
        .await;
    // 502 when the buffer was full at the emit, 504 when the command got in while the
    // gateway's writer had just taken a batch and then could not write it: either way the
    // caller is told, and the metric counts it.
    assert!(status == 502 || status == 504, "{status} {reply}");
    assert!(detail(&reply).contains("'reboot'"), "{reply}");
    let failed = server
        .metric(r#"agentgate_commands_total{outcome="failed"}"#)
        .await;
    let timeout = server
        .metric(r#"agentgate_commands_total{outcome="timeout"}"#)
        .await;
    assert_eq!(failed + timeout, 1.0);

    server.stop().await;
    writer.abort();
}

/// The issue's scenario with the existing agents' client: python-socketio (polling, then
/// the upgrade) emits 30,000 heartbeats back to back and gets all 30,000 acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_agent_bursting_thirty_thousand_heartbeats_gets_every_ack() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("flood-py");
    assert_eq!(server.upload(&agent).await.0, 200);
    let (code, lines) = python_agent(
        &server,
        Some(&agent),
        &["--burst", "30000", "--timeout", "55"],
    )
    .await;
    let last = lines.last().cloned().unwrap_or_default();
    assert_eq!(code, 0, "{last}");
    assert_eq!(last, json!({"event": "burst", "acks": 30000}));
    assert_eq!(server.metric("agentgate_heartbeats_total").await, 30_000.0);
    server.stop().await;
}

/// Polls until the namespace connect is acknowledged (`40`), answering the Engine.IO
/// ping that engineioxide sends at once after the handshake and that may come first.
async fn connect_ack(polling: &Polling, conn: &mut HttpConn) {
    for _ in 0..5 {
        let text = polling.get(conn).await.text();
        if text.split('\u{1e}').any(|p| p.starts_with("40")) {
            return;
        }
        if text.split('\u{1e}').any(|p| p == "2") {
            assert_eq!(polling.post(conn, "3").await.status, 200);
        }
    }
    panic!("no connect acknowledgement in five polls");
}

/// Waits (10 s at most, a bound for a loaded machine, not a timing claim) until `done`.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

/// Reads `ws` until the gateway ends the session (a Socket.IO disconnect packet, a close
/// frame, the end of the stream or an error); `false` if it is still open after 10 s.
async fn session_closed(ws: &mut Ws) -> bool {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let read_until_end = async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(Message::Text(t))) if t.as_str() == "41" => return,
                // Engine.IO pings and anything else the session still sends.
                Some(Ok(_)) => {}
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read_until_end)
        .await
        .is_ok()
}

#[tokio::test]
async fn a_certificate_file_removed_by_hand_ends_handshakes_resumptions_and_the_session() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start().await;
    let agent = server.pki.agent("hand-rm-1");
    assert_eq!(server.upload(&agent).await.0, 200);
    let mut ws = ws_session(&server, &agent).await;
    // A client whose session cache holds a ticket from a full handshake made while the
    // file was there.
    let config = client_config(&server.pki, Some(&agent));
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

    std::fs::remove_file(server.store_dir().join("hand-rm-1.pem")).unwrap();
    eventually("the removed file leaves the store", || {
        server
            .store
            .by_agent(&"hand-rm-1".parse().unwrap())
            .is_none()
    })
    .await;
    assert!(
        session_closed(&mut ws).await,
        "the live session stayed open"
    );
    let refused = first_read_error(server.tls(Some(&agent)).await.unwrap()).await;
    assert!(refused.is_some(), "a full handshake was accepted");
    let mut resumed = connect().await;
    assert_eq!(
        resumed.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    let _ = resumed.write_all(request).await;
    let mut buf = Vec::new();
    let _ = resumed.read_to_end(&mut buf).await;
    assert!(
        buf.is_empty(),
        "a resumed session of a removed certificate was served: {}",
        String::from_utf8_lossy(&buf)
    );
    server.stop().await;
}

#[tokio::test]
async fn a_certificate_file_copied_in_or_replaced_by_hand_takes_effect() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("hand-cp-1");
    // Written in place, as `cp` does (truncate, then write).
    std::fs::write(server.store_dir().join("hand-cp-1.pem"), &agent.cert_pem).unwrap();
    let id: agentgate::identity::AgentId = "hand-cp-1".parse().unwrap();
    eventually("the copied file reaches the store", || {
        server.store.by_agent(&id).is_some()
    })
    .await;
    let mut ws = ws_session(&server, &agent).await;

    // Replaced by another certificate for the same agent: the old one's session ends, the
    // new one is let in, the old one no longer.
    let renewed = server.pki.agent("hand-cp-1");
    std::fs::write(server.store_dir().join("hand-cp-1.pem"), &renewed.cert_pem).unwrap();
    let new_fp = agentgate::identity::Fingerprint::of_der(&renewed.der);
    eventually("the replaced file reaches the store", || {
        server
            .store
            .by_agent(&id)
            .is_some_and(|c| c.fingerprint == new_fp)
    })
    .await;
    assert!(
        session_closed(&mut ws).await,
        "the old certificate's session stayed open"
    );
    let _ws = ws_session(&server, &renewed).await;
    assert!(
        first_read_error(server.tls(Some(&agent)).await.unwrap())
            .await
            .is_some(),
        "the replaced certificate was still accepted"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_bad_file_in_the_store_directory_is_skipped_and_revokes_what_it_replaced() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("hand-bad-1");
    let other = server.pki.agent("someone-else");
    assert_eq!(server.upload(&agent).await.0, 200);
    let id: agentgate::identity::AgentId = "hand-bad-1".parse().unwrap();
    // The certificate of another agent under this agent's name: fails the upload rules.
    std::fs::write(server.store_dir().join("hand-bad-1.pem"), &other.cert_pem).unwrap();
    // A valid certificate under a name of the gateway's temporary files.
    let tmp_agent = server.pki.agent("tmp-agent");
    std::fs::write(
        server.store_dir().join(".agentgate-tmp-99-1"),
        &tmp_agent.cert_pem,
    )
    .unwrap();
    eventually("the bad file revokes what the agent had", || {
        server.store.by_agent(&id).is_none()
    })
    .await;
    assert!(
        server
            .store
            .by_fingerprint(&agentgate::identity::Fingerprint::of_der(&other.der))
            .is_none()
            && server
                .store
                .by_fingerprint(&agentgate::identity::Fingerprint::of_der(&tmp_agent.der))
                .is_none(),
        "a file that fails the rules, or a temporary file, was loaded"
    );
    assert!(
        server.store_dir().join(".agentgate-tmp-99-1").exists(),
        "a temporary file was removed"
    );
    server.stop().await;
}

#[tokio::test]
async fn failed_api_key_attempts_from_one_address_get_429_with_retry_after() {
    let server = TestServer::start_with(|c| {
        c.limits.api_key_failures = 3;
        c.limits.api_key_failure_window_secs = 3600;
    })
    .await;
    let mut conn = server.http(None).await.unwrap();
    let wrong = [("authorization", "Bearer wrong-key")];
    for _ in 0..3 {
        let r = conn
            .send("GET", "/agent/certificates", &wrong, "")
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{}", r.text());
    }
    // Past the limit the address is refused, the right key included, on any connection.
    let right = format!("Bearer {API_KEY}");
    let mut other = server.http(None).await.unwrap();
    for (c, auth) in [
        (&mut conn, "Bearer wrong-key"),
        (&mut other, right.as_str()),
    ] {
        let r = c
            .send("GET", "/agent/certificates", &[("authorization", auth)], "")
            .await
            .unwrap();
        assert_eq!(r.status, 429, "{}", r.text());
        let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=3600).contains(&retry), "Retry-After {retry}");
        assert!(
            detail(&r.json()).contains("limits.api_key_failures"),
            "{}",
            r.text()
        );
    }
    // Endpoints without a key are not affected.
    assert_eq!(
        other.send("GET", "/health", &[], "").await.unwrap().status,
        200
    );
    assert!(
        server
            .metric("agentgate_limit_refusals_total{limit=\"api_key_failures\"}")
            .await
            >= 2.0
    );
    server.stop().await;
}

/// Every response of the TLS listener says `nosniff`, and with a real certificate (here
/// `tls.mode = "files"`) carries HSTS: the HTTP-header findings of testssl.sh.
#[tokio::test]
async fn responses_carry_nosniff_and_hsts_with_a_real_certificate() {
    let server = TestServer::start().await;
    let mut conn = server.http(None).await.unwrap();
    for (path, status) in [("/health", 200), ("/no-such-path", 404)] {
        let r = conn.send("GET", path, &[], "").await.unwrap();
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert_eq!(
            r.headers
                .get("x-content-type-options")
                .map(|v| v.as_bytes()),
            Some(&b"nosniff"[..]),
            "{path}"
        );
        assert_eq!(
            r.headers
                .get("strict-transport-security")
                .map(|v| v.as_bytes()),
            Some(&b"max-age=31536000"[..]),
            "{path}"
        );
    }
    server.stop().await;
}
