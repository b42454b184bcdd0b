//! The API gateway (issue 10): routes to real upstream servers on loopback, per-route
//! authorization (JWT, API key with scope, agent certificate), streaming, WebSocket
//! pass-through, failures (502, 504), health checks, retries, scoped API keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test stops loudly on failure

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use agentgate::config::{RawApiKey, RawApiKeyEntry, RawConfig, RawJwtKey, RawRoute};
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use common::*;

const SECRET: &str = "gateway-test-secret-0123456789";

/// A small upstream service: echoes what it received as JSON; `/slow` answers after 30 s,
/// `/delay` after 600 ms, `/teapot` is a 418 with a text body,
/// `/health` answers 200 or 503 as the test sets it, `/echo-body` streams the request body
/// back, `/count-body` reads the whole body before it answers its length,
/// `/download?bytes=N` streams N bytes of a known pattern.
struct Upstream {
    url: String,
    /// Requests other than health checks.
    hits: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
}

async fn upstream(name: &'static str) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let healthy = Arc::new(AtomicBool::new(true));
    let (h, ok) = (hits.clone(), healthy.clone());
    let app = axum::Router::new().fallback(move |req: Request| {
        let (hits, healthy) = (h.clone(), ok.clone());
        async move { serve_upstream(name, req, &hits, &healthy).await }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Upstream {
        url: format!("http://{addr}"),
        hits,
        healthy,
    }
}

async fn serve_upstream(
    name: &str,
    req: Request,
    hits: &AtomicUsize,
    healthy: &AtomicBool,
) -> Response {
    let path = req.uri().path().to_owned();
    if path.ends_with("/health") {
        return if healthy.load(Ordering::SeqCst) {
            "ok".into_response()
        } else {
            (http::StatusCode::SERVICE_UNAVAILABLE, "down").into_response()
        };
    }
    hits.fetch_add(1, Ordering::SeqCst);
    if path.ends_with("/teapot") {
        // An error of the upstream's own, in its own format.
        return (
            http::StatusCode::IM_A_TEAPOT,
            [(http::header::CONTENT_TYPE, "text/plain")],
            "short and stout",
        )
            .into_response();
    }
    if path.ends_with("/delay") {
        tokio::time::sleep(Duration::from_millis(600)).await;
        return "delayed".into_response();
    }
    if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_secs(30)).await;
        return "late".into_response();
    }
    if path.ends_with("/echo-body") {
        return Response::new(Body::new(req.into_body()));
    }
    if path.ends_with("/count-body") {
        return match req.into_body().collect().await {
            Ok(body) => body.to_bytes().len().to_string().into_response(),
            Err(e) => (http::StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        };
    }
    if path.ends_with("/download") {
        let n: usize = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("bytes="))
            .unwrap()
            .parse()
            .unwrap();
        return Response::new(Body::from_stream(pattern_stream(n)));
    }
    let headers: serde_json::Map<String, Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("?"))))
        .collect();
    axum::Json(json!({
        "upstream": name,
        "method": req.method().as_str(),
        "path": path,
        "query": req.uri().query(),
        "headers": headers,
    }))
    .into_response()
}

/// `n` bytes of `i % 251` in 64 KiB chunks, generated as they are sent.
fn pattern_stream(n: usize) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    const CHUNK: usize = 64 * 1024;
    futures_util::stream::unfold(0usize, move |sent| async move {
        if sent >= n {
            return None;
        }
        let len = CHUNK.min(n - sent);
        let chunk: Vec<u8> = (sent..sent + len).map(|i| (i % 251) as u8).collect();
        Some((Ok(Bytes::from(chunk)), sent + len))
    })
}

/// Reads `body` to its end checking the pattern; returns the byte count.
async fn check_pattern<B>(mut body: B) -> usize
where
    B: axum::body::HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            for (j, b) in data.iter().enumerate() {
                assert_eq!(*b, ((seen + j) % 251) as u8, "byte {} differs", seen + j);
            }
            seen += data.len();
        }
    }
    seen
}

fn route(text: &str) -> RawRoute {
    toml::from_str(text).unwrap()
}

/// `/svc` to `up`, for a key with the scope `proxy:svc`.
fn svc_route(up: &Upstream) -> RawRoute {
    route(&format!(
        "name = \"svc\"\nprefix = \"/svc\"\nupstreams = [\"{}\"]\nauth = \"api_key\"\nscope = \"proxy:svc\"",
        up.url
    ))
}

/// An address where nothing listens.
async fn closed_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

async fn get(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut conn = server.http(None).await.unwrap();
    conn.send("GET", path, headers, "").await.unwrap()
}

/// A kept-alive client connection to the gateway whose request and response bodies
/// stream (the testkit's `HttpConn` collects them).
async fn streaming_client(server: &TestServer) -> hyper::client::conn::http1::SendRequest<Body> {
    let tls = server.tls(None).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn detail(r: &HttpResponse) -> String {
    r.json()["detail"].as_str().unwrap_or_default().to_owned()
}

fn with_jwt_secret(c: &mut RawConfig) {
    c.gateway_jwt_secret = Some(SECRET.into());
}

#[tokio::test]
async fn prefix_routing_longest_prefix_strip_and_forwarded_headers() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let routes = vec![
        route(&format!(
            "name = \"svc\"\nprefix = \"/svc\"\nupstreams = [\"{}\"]\nstrip_prefix = true\nauth = \"none\"",
            a.url
        )),
        route(&format!(
            "name = \"special\"\nprefix = \"/svc/special\"\nupstreams = [\"{}/base\"]\nauth = \"none\"",
            b.url
        )),
        route(&format!(
            "name = \"kept\"\nprefix = \"/kept\"\nupstreams = [\"{}\"]\nauth = \"none\"\npreserve_host = true",
            b.url
        )),
    ];
    let server = TestServer::start_with(|c| c.routes = routes).await;

    let r = get(
        &server,
        "/svc/x/y?q=1",
        &[
            ("x-request-id", "req-1"),
            ("x-agent-id", "forged"),
            ("x-forwarded-for", "10.9.9.9"),
            ("connection", "x-drop"),
            ("x-drop", "1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["upstream"], "a");
    assert_eq!(body["path"], "/x/y");
    assert_eq!(body["query"], "q=1");
    let h = &body["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "localhost");
    assert_eq!(h["x-request-id"], "req-1");
    assert!(
        h.get("x-agent-id").is_none(),
        "forged X-Agent-Id reached the upstream: {h}"
    );
    assert!(
        h.get("x-drop").is_none(),
        "header named by Connection was forwarded: {h}"
    );
    assert_eq!(h["host"], a.url.trim_start_matches("http://"));
    assert_eq!(r.headers["x-request-id"], "req-1");

    // The prefix alone is the upstream's root.
    assert_eq!(get(&server, "/svc", &[]).await.json()["path"], "/");
    // Longest prefix wins; without strip the path is kept, after the base URL's path.
    let r = get(&server, "/svc/special/z", &[("x-request-id", "bad id!")]).await;
    assert_eq!(r.json()["upstream"], "b");
    assert_eq!(r.json()["path"], "/base/svc/special/z");
    let fresh = r.json()["headers"]["x-request-id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(fresh.len(), 32, "an invalid request id is replaced");
    // preserve_host: the upstream sees the client's Host.
    assert_eq!(
        get(&server, "/kept/x", &[]).await.json()["headers"]["host"],
        "localhost"
    );
    // Prefixes match whole segments; anything else is a JSON 404.
    for path in ["/svcx", "/nothing/here", "/agents/x/y/z"] {
        let r = get(&server, path, &[]).await;
        assert_eq!((r.status, detail(&r)), (404, "Not Found".into()), "{path}");
    }
    // Built-in endpoints keep priority.
    assert_eq!(get(&server, "/health", &[]).await.json()["status"], "ok");
    let ping = get(&server, "/ping", &[]).await;
    assert_eq!((ping.status, ping.text()), (200, "OK".into()));

    let (status, listing) = server.api("GET", "/routes", None).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = listing["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["special", "kept", "svc"]);
    assert_eq!(listing["routes"][2]["upstreams"][0]["url"], a.url);
    assert_eq!(listing["routes"][2]["upstreams"][0]["healthy"], true);

    // Per-route metrics.
    let metrics = get(&server, "/metrics", &[]).await.text();
    assert!(
        metrics.contains(&format!(
            "agentgate_proxy_requests_total{{route=\"svc\",status_class=\"2xx\",upstream=\"{}\"}} 2",
            a.url
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("agentgate_proxy_request_duration_seconds_bucket{le="),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "agentgate_upstream_healthy{{route=\"special\",upstream=\"{}/base\"}} 1",
            b.url
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn large_body_streams_both_ways() {
    const SIZE: usize = 64 * 1024 * 1024;
    let up = upstream("big").await;
    let r = route(&format!(
        "name = \"big\"\nprefix = \"/big\"\nupstreams = [\"{}\"]\nstrip_prefix = true\nauth = \"none\"",
        up.url
    ));
    let server = TestServer::start_with(|c| {
        c.routes = vec![r];
        c.limits.proxy_max_body_bytes = 2 * SIZE as u64;
    })
    .await;
    let mut sender = streaming_client(&server).await;

    // Up and back down at once: the upstream echoes the body while it arrives.
    let req = http::Request::post("/big/echo-body")
        .header("host", "localhost")
        .body(Body::from_stream(pattern_stream(SIZE)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(check_pattern(resp.into_body()).await, SIZE);

    // Down only, on the same kept-alive connection.
    sender.ready().await.unwrap();
    let req = http::Request::get(format!("/big/download?bytes={SIZE}"))
        .header("host", "localhost")
        .body(Body::empty())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(check_pattern(resp.into_body()).await, SIZE);
}

/// `limits.proxy_max_body_bytes`: a declared length over it is refused before the
/// upstream is called; a chunked body that grows past it while it streams (never
/// buffered) is cut, and the client gets the 413 as the upstream had not answered.
#[tokio::test]
async fn proxied_bodies_over_the_limit_get_413_with_a_detail() {
    const LIMIT: usize = 4096;
    let up = upstream("small").await;
    let r = route(&format!(
        "name = \"small\"\nprefix = \"/small\"\nupstreams = [\"{}\"]\nauth = \"none\"",
        up.url
    ));
    let server = TestServer::start_with(|c| {
        c.routes = vec![r];
        c.limits.proxy_max_body_bytes = LIMIT as u64;
    })
    .await;
    let mut conn = server.http(None).await.unwrap();
    let at_limit = "x".repeat(LIMIT);
    let r = conn
        .send("POST", "/small/count-body", &[], &at_limit)
        .await
        .unwrap();
    assert_eq!((r.status, r.text()), (200, LIMIT.to_string()));
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);

    let over = "x".repeat(LIMIT + 1);
    let r = conn
        .send("POST", "/small/count-body", &[], &over)
        .await
        .unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(
        detail(&r).contains("limits.proxy_max_body_bytes") && detail(&r).contains("4096"),
        "{}",
        r.text()
    );
    assert_eq!(up.hits.load(Ordering::SeqCst), 1, "the upstream was called");

    // Chunked (no Content-Length), 1 KiB at a time: cut after the limit.
    let mut sender = streaming_client(&server).await;
    let chunks = futures_util::stream::iter(
        (0..16).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; 1024]))),
    );
    let req = http::Request::post("/small/count-body")
        .header("host", "localhost")
        .body(Body::from_stream(chunks))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("limits.proxy_max_body_bytes"),
        "{body}"
    );
    assert!(
        server
            .metric("agentgate_limit_refusals_total{limit=\"proxy_max_body_bytes\"}")
            .await
            >= 2.0
    );
}

/// A wrong key on a proxied `api_key` route counts against the same per-address budget
/// as the API's own key check: past `limits.api_key_failures` the address gets 429 with
/// Retry-After on the route and on the API alike, the right key included, and the
/// upstream sees none of those requests.
#[tokio::test]
async fn failed_keys_on_an_api_key_route_share_the_api_budget_and_get_429() {
    let up = upstream("svc").await;
    let r = svc_route(&up);
    let server = TestServer::start_with(|c| {
        c.routes = vec![r];
        c.limits.api_key_failures = 4;
        c.limits.api_key_failure_window_secs = 3600;
    })
    .await;
    let mut conn = server.http(None).await.unwrap();
    let wrong = [("authorization", "Bearer wrong-key")];
    // Two failures on the API, two on the route: four from this address.
    for _ in 0..2 {
        let r = conn.send("GET", "/agents", &wrong, "").await.unwrap();
        assert_eq!(r.status, 403, "{}", r.text());
    }
    for _ in 0..2 {
        let r = conn.send("GET", "/svc/x", &wrong, "").await.unwrap();
        assert_eq!(r.status, 401, "{}", r.text());
    }
    let right = format!("Bearer {API_KEY}");
    for (path, auth) in [
        ("/svc/x", "Bearer wrong-key"),
        ("/svc/x", right.as_str()),
        ("/agents", right.as_str()),
    ] {
        let r = conn
            .send("GET", path, &[("authorization", auth)], "")
            .await
            .unwrap();
        assert_eq!(r.status, 429, "{path}: {}", r.text());
        let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=3600).contains(&retry), "{path}: Retry-After {retry}");
        assert!(
            detail(&r).contains("limits.api_key_failures"),
            "{path}: {}",
            r.text()
        );
    }
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        0,
        "the upstream saw a refused request"
    );
    assert!(
        server
            .metric("agentgate_limit_refusals_total{limit=\"api_key_failures\"}")
            .await
            >= 3.0
    );
}

#[tokio::test]
async fn websocket_passes_through_the_gateway() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let seen_path = Arc::new(std::sync::Mutex::new(String::new()));
    let seen = seen_path.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        use tokio_tungstenite::tungstenite::handshake::server::{
            ErrorResponse, Request as WsRequest, Response as WsResponse,
        };
        #[allow(clippy::result_large_err)] // tungstenite's callback signature
        let callback = |req: &WsRequest, resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
            *seen.lock().unwrap() = req.uri().path().to_owned();
            Ok(resp)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(tcp, callback)
            .await
            .unwrap();
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_text() || msg.is_binary() {
                ws.send(msg).await.unwrap();
            }
        }
    });
    let r = route(&format!(
        "name = \"ws\"\nprefix = \"/ws\"\nupstreams = [\"http://{addr}\"]\nstrip_prefix = true\nauth = \"none\""
    ));
    let server = TestServer::start_with(|c| c.routes = vec![r]).await;
    let tls = server.tls(None).await.unwrap();
    let url = format!("wss://localhost:{}/ws/echo", server.addr.port());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(*seen_path.lock().unwrap(), "/echo");
    for text in ["hello", "through the gateway"] {
        ws.send(Message::text(text)).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no echo within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(back, Message::text(text));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let back = ws.next().await.unwrap().unwrap();
    assert_eq!(back.into_data().as_ref(), &[0u8, 1, 2, 255]);
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// An RSA key pair made by openssl (ring cannot generate RSA keys): (private, public) PEM.
fn rsa_key_pair(dir: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
    let key = dir.join("rsa.key");
    let public = dir.join("rsa.pub.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl genpkey");
    let ok = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl pkey -pubout");
    (std::fs::read(key).unwrap(), std::fs::read(public).unwrap())
}

/// Every refusal the issue lists, each answered by the gateway with the upstream never
/// called; then good tokens (HS256, RS256) pass, and a revoked jti stops passing.
#[tokio::test]
async fn jwt_failures_are_refused_before_the_upstream() {
    let up = upstream("prefect").await;
    let keys = tempfile::tempdir().unwrap();
    let (rsa_private, rsa_public) = rsa_key_pair(keys.path());
    let public_file = keys.path().join("rsa.pub.pem");
    let r = route(&format!(
        "name = \"prefect\"\nprefix = \"/captionacc/prefect\"\nupstreams = [\"{}\"]\nstrip_prefix = true\n\
         auth = \"jwt\"\nclaims = {{project = [\"captionacc\"], service = [\"prefect\", \"api\"]}}",
        up.url
    ));
    let server = TestServer::start_with(|c| {
        with_jwt_secret(c);
        c.jwt.leeway_secs = 0;
        c.jwt.keys = vec![RawJwtKey {
            alg: "RS256".into(),
            pem_file: public_file,
            kid: None,
        }];
        c.routes = vec![r];
    })
    .await;
    let t = now();
    let good = json!({"jti": "j-1", "project": "captionacc", "service": "prefect", "iat": t, "exp": t + 600});
    let with = |patch: Value| {
        let mut claims = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    };
    let unsigned = {
        use base64::Engine;
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&good)
        )
    };
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &good,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "expired",
            hs256(&with(json!({"exp": t - 60})), SECRET.as_bytes()),
            401,
            "expired",
        ),
        (
            "not yet valid",
            hs256(&with(json!({"nbf": t + 600})), SECRET.as_bytes()),
            401,
            "not valid yet",
        ),
        (
            "issued in the future",
            hs256(&with(json!({"iat": t + 600})), SECRET.as_bytes()),
            401,
            "future",
        ),
        (
            "missing exp",
            hs256(&with(json!({"exp": null})), SECRET.as_bytes()),
            401,
            "exp",
        ),
        (
            "bad signature",
            hs256(&good, b"another-secret"),
            401,
            "signature",
        ),
        (
            "wrong project",
            hs256(&with(json!({"project": "other"})), SECRET.as_bytes()),
            403,
            "project",
        ),
        (
            "wrong service",
            hs256(&with(json!({"service": "web"})), SECRET.as_bytes()),
            403,
            "service",
        ),
        ("alg none", unsigned, 401, "\"none\""),
        (
            "HS256 signed with the RSA public key",
            hs256(&good, &rsa_public),
            401,
            "signature",
        ),
        ("algorithm not configured", hs512, 401, "HS512"),
        ("not a JWT", "abc.def".into(), 401, "not a JWT"),
    ];
    for (what, token, status, needle) in &cases {
        let r = get(
            &server,
            "/captionacc/prefect/api/health-x",
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
        assert_eq!(r.status, *status, "{what}: {}", r.text());
        assert!(detail(&r).contains(needle), "{what}: {}", r.text());
    }
    let r = get(&server, "/captionacc/prefect/x", &[]).await;
    assert_eq!(r.status, 401, "no token");
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        0,
        "a refused request reached the upstream"
    );

    // Good tokens pass: HS256 with the shared secret, RS256 with the configured key.
    let token = hs256(&good, SECRET.as_bytes());
    let r = get(
        &server,
        "/captionacc/prefect/api/x",
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/api/x");
    let rs = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &with(json!({"jti": "j-rs", "service": "api"})),
        &EncodingKey::from_rsa_pem(&rsa_private).unwrap(),
    )
    .unwrap();
    let r = get(
        &server,
        "/captionacc/prefect/x",
        &[("authorization", &format!("Bearer {rs}"))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.hits.load(Ordering::SeqCst), 2);

    // Revoked: refused at once, without a restart.
    server.proxy.revocations().revoke("j-1", t + 600);
    let r = get(
        &server,
        "/captionacc/prefect/api/x",
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(
        (r.status, detail(&r)),
        (401, "token has been revoked".into())
    );
    assert_eq!(up.hits.load(Ordering::SeqCst), 2);
}

/// Tokens minted the way the replaced gateway's token function mints them (PyJWT, HS256,
/// the shared secret, claims jti/project/service/iat/exp) pass.
#[tokio::test]
async fn token_minted_by_pyjwt_is_accepted() {
    let up = upstream("prefect").await;
    let r = route(&format!(
        "name = \"prefect\"\nprefix = \"/captionacc/prefect\"\nupstreams = [\"{}\"]\nstrip_prefix = true\n\
         auth = \"jwt\"\nclaims = {{project = [\"captionacc\"], service = [\"prefect\"]}}",
        up.url
    ));
    let server = TestServer::start_with(|c| {
        with_jwt_secret(c);
        c.routes = vec![r];
    })
    .await;
    let token = pyjwt_token(SECRET, "captionacc", "prefect", None);
    let r = get(
        &server,
        "/captionacc/prefect/api/flows",
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn agent_route_needs_a_verified_certificate_and_sets_x_agent_id() {
    let up = upstream("agents").await;
    let r = route(&format!(
        "name = \"edge\"\nprefix = \"/edge\"\nupstreams = [\"{}\"]\nauth = \"agent\"",
        up.url
    ));
    let server = TestServer::start_with(|c| c.routes = vec![r]).await;
    let agent = server.pki.agent("edge-007");
    assert_eq!(server.upload(&agent).await.0, 200);

    let mut conn = server.http(Some(&agent)).await.unwrap();
    let r = conn
        .send("GET", "/edge/status", &[("x-agent-id", "someone-else")], "")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-agent-id"], "edge-007");

    let mut anonymous = server.http(None).await.unwrap();
    for headers in [vec![], vec![("x-agent-id", "edge-007")]] {
        let r = anonymous
            .send("GET", "/edge/status", &headers, "")
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{}", r.text());
        assert!(detail(&r).contains("agent certificate"), "{}", r.text());
    }
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_upstream_is_504() {
    let up = upstream("slow").await;
    let dead = closed_port().await;
    let routes = vec![
        route(&format!(
            "name = \"down\"\nprefix = \"/down\"\nupstreams = [\"{dead}\"]\nauth = \"none\""
        )),
        route(&format!(
            "name = \"slow\"\nprefix = \"/slow\"\nupstreams = [\"{}\"]\nauth = \"none\"\ntimeout_ms = 300",
            up.url
        )),
    ];
    let server = TestServer::start_with(|c| c.routes = routes).await;
    let r = get(&server, "/down/x", &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(detail(&r).contains("refused"), "{}", r.text());
    // Passively ejected, and with no other upstream the route has none left.
    let r = get(&server, "/down/x", &[]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(detail(&r).contains("no healthy upstream"), "{}", r.text());

    let r = get(&server, "/slow/slow", &[]).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(detail(&r).contains("300 ms"), "{}", r.text());
}

#[tokio::test]
async fn post_is_not_retried_and_get_is_retried_on_the_next_upstream() {
    let live = upstream("live").await;
    let (dead1, dead2) = (closed_port().await, closed_port().await);
    // Round-robin starts at the first upstream, the dead one.
    let routes = vec![
        route(&format!(
            "name = \"post\"\nprefix = \"/post\"\nupstreams = [\"{dead1}\", \"{}\"]\nauth = \"none\"\nretries = 3",
            live.url
        )),
        route(&format!(
            "name = \"get\"\nprefix = \"/get\"\nupstreams = [\"{dead2}\", \"{}\"]\nauth = \"none\"\nretries = 1",
            live.url
        )),
    ];
    let server = TestServer::start_with(|c| c.routes = routes).await;
    let mut conn = server.http(None).await.unwrap();
    let r = conn
        .send("POST", "/post/x", &[], "{\"a\": 1}")
        .await
        .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(live.hits.load(Ordering::SeqCst), 0, "the POST was retried");

    let r = conn.send("GET", "/get/x", &[], "").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["upstream"], "live");
    assert_eq!(live.hits.load(Ordering::SeqCst), 1);
    // The dead upstreams are out of the rotation now: everything goes to the live one.
    for _ in 0..3 {
        let r = conn.send("POST", "/post/x", &[], "{}").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(!upstream_healthy(&server, "post", &dead1).await);
    assert!(upstream_healthy(&server, "post", &live.url).await);
}

/// Whether `GET /routes` shows `upstream` of `route` in the rotation.
async fn upstream_healthy(server: &TestServer, route: &str, upstream: &str) -> bool {
    let (_, listing) = server.api("GET", "/routes", None).await;
    let r = listing["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == route)
        .unwrap_or_else(|| panic!("no route {route}: {listing}"));
    let u = r["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["url"] == upstream)
        .unwrap_or_else(|| panic!("no upstream {upstream}: {listing}"));
    u["healthy"].as_bool().unwrap()
}

/// Waits until `GET /routes` shows `upstream` of `route` with `healthy`.
async fn wait_health(server: &TestServer, route: &str, upstream: &str, healthy: bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while upstream_healthy(server, route, upstream).await != healthy {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{upstream} never became healthy={healthy}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn health_check_takes_an_upstream_out_and_back() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let r = route(&format!(
        "name = \"pair\"\nprefix = \"/pair\"\nupstreams = [\"{}\", \"{}\"]\nauth = \"none\"\n\
         health_check = {{path = \"/health\", interval_secs = 1}}",
        a.url, b.url
    ));
    let server = TestServer::start_with(|c| c.routes = vec![r]).await;
    let mut conn = server.http(None).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let r = conn.send("GET", "/pair/x", &[], "").await.unwrap();
        seen.insert(r.json()["upstream"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 2, "round-robin over both: {seen:?}");

    b.healthy.store(false, Ordering::SeqCst);
    wait_health(&server, "pair", &b.url, false).await;
    let before = b.hits.load(Ordering::SeqCst);
    for _ in 0..4 {
        let r = conn.send("GET", "/pair/x", &[], "").await.unwrap();
        assert_eq!(r.json()["upstream"], "a");
    }
    assert_eq!(b.hits.load(Ordering::SeqCst), before);
    let metrics = get(&server, "/metrics", &[]).await.text();
    assert!(
        metrics.contains(&format!(
            "agentgate_upstream_healthy{{route=\"pair\",upstream=\"{}\"}} 0",
            b.url
        )),
        "{metrics}"
    );

    b.healthy.store(true, Ordering::SeqCst);
    wait_health(&server, "pair", &b.url, true).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let r = conn.send("GET", "/pair/x", &[], "").await.unwrap();
        seen.insert(r.json()["upstream"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 2, "b is back in the rotation: {seen:?}");
}

/// An upstream that can be taken down (its port then refuses connections) and brought
/// back on the same port. Every connection closes after its response, so no pooled
/// connection of the gateway outlives a stop.
struct Restartable {
    name: &'static str,
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Restartable {
    async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut up = Self {
            name,
            addr: listener.local_addr().unwrap(),
            hits: Arc::new(AtomicUsize::new(0)),
            task: None,
        };
        up.serve(listener);
        up
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&mut self, listener: TcpListener) {
        let (name, hits) = (self.name, self.hits.clone());
        let healthy = Arc::new(AtomicBool::new(true));
        let app = axum::Router::new().fallback(move |req: Request| {
            let (hits, healthy) = (hits.clone(), healthy.clone());
            async move { serve_upstream(name, req, &hits, &healthy).await }
        });
        self.task = Some(tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let app = app.clone();
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(
                            hyper_util::rt::TokioIo::new(tcp),
                            hyper_util::service::TowerToHyperService::new(app),
                        )
                        .await;
                });
            }
        }));
    }

    /// Closes the listener: connections to the port are refused from now on.
    async fn stop(&mut self) {
        let task = self.task.take().unwrap();
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
    }

    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

/// Sends `method /pair/x` (a POST with a body, a GET without: retriable) and returns which
/// upstream answered (every answer must be 200).
async fn answered_by(conn: &mut HttpConn, method: &str) -> String {
    let body = if method == "POST" { "{}" } else { "" };
    let r = conn.send(method, "/pair/x", &[], body).await.unwrap();
    assert_eq!(r.status, 200, "{method}: {}", r.text());
    r.json()["upstream"].as_str().unwrap().to_owned()
}

async fn health_gauge(server: &TestServer, upstream: &str) -> String {
    let metrics = get(server, "/metrics", &[]).await.text();
    let prefix = format!("agentgate_upstream_healthy{{route=\"pair\",upstream=\"{upstream}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {metrics}"))
        .to_owned()
}

/// Passive ejection on a route without a health check: an upstream that refuses a
/// connection leaves the rotation at once; when the ejection has run out (10 s on the
/// gateway's clock, stepped over with a manual clock) it is tried again, ejected again
/// while still down, and back in the rotation for good once it answers.
#[tokio::test]
async fn refused_upstream_leaves_the_rotation_and_returns_after_it_recovers_without_a_health_check()
{
    let steady = upstream("steady").await;
    let mut flaky = Restartable::start("flaky").await;
    let r = route(&format!(
        "name = \"pair\"\nprefix = \"/pair\"\nupstreams = [\"{}\", \"{}\"]\nauth = \"none\"\nretries = 1",
        flaky.url(),
        steady.url
    ));
    let clock = agentgate::clock::ManualClock::starting_now();
    let server = TestServer::start_with_clock(|c| c.routes = vec![r], &clock).await;
    let mut conn = server.http(None).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(answered_by(&mut conn, "GET").await);
    }
    assert_eq!(seen.len(), 2, "round-robin over both: {seen:?}");
    assert_eq!(health_gauge(&server, &flaky.url()).await, "1");

    // Down: of two GETs one picks it (round-robin), is refused and retried on the other.
    flaky.stop().await;
    for _ in 0..2 {
        assert_eq!(answered_by(&mut conn, "GET").await, "steady");
    }
    assert!(!upstream_healthy(&server, "pair", &flaky.url()).await);
    assert_eq!(health_gauge(&server, &flaky.url()).await, "0");
    // Out of the rotation: POSTs, which are never retried, all reach the other upstream.
    for _ in 0..4 {
        assert_eq!(answered_by(&mut conn, "POST").await, "steady");
    }

    // The ejection runs out while it is still down: tried again, refused, out again.
    clock.advance(Duration::from_secs(11));
    assert!(upstream_healthy(&server, "pair", &flaky.url()).await);
    for _ in 0..2 {
        assert_eq!(answered_by(&mut conn, "GET").await, "steady");
    }
    assert!(!upstream_healthy(&server, "pair", &flaky.url()).await);

    // Back on its port: out until this ejection has run out too, then in the rotation.
    flaky.restart().await;
    let hits = flaky.hits.load(Ordering::SeqCst);
    for _ in 0..4 {
        assert_eq!(answered_by(&mut conn, "POST").await, "steady");
    }
    assert_eq!(flaky.hits.load(Ordering::SeqCst), hits);
    clock.advance(Duration::from_secs(11));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(answered_by(&mut conn, "POST").await);
    }
    assert_eq!(seen.len(), 2, "flaky is back in the rotation: {seen:?}");
    assert!(flaky.hits.load(Ordering::SeqCst) > hits);
    assert!(upstream_healthy(&server, "pair", &flaky.url()).await);
    assert_eq!(health_gauge(&server, &flaky.url()).await, "1");
}

#[tokio::test]
async fn api_key_without_the_scope_gets_403_naming_it() {
    let up = upstream("svc").await;
    let r = svc_route(&up);
    let server = TestServer::start_with(|c| {
        c.api_keys.push(RawApiKey::Entry(RawApiKeyEntry {
            name: "reader".into(),
            key: None,
            sha256: Some(format!(
                "sha256:{}",
                agentgate_testkit_hex(&ring::digest::digest(
                    &ring::digest::SHA256,
                    b"reader-key-123"
                ))
            )),
            scopes: vec!["agents:read".into()],
        }));
        c.routes = vec![r];
    })
    .await;
    let mut conn = server.http(None).await.unwrap();
    let reader = [("authorization", "Bearer reader-key-123")];
    let r = conn.send("GET", "/agents", &reader, "").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    for (method, path, scope) in [
        ("POST", "/agent/certificate", "certificates:write"),
        ("DELETE", "/agent/certificate/a1", "certificates:write"),
        ("POST", "/agents/a1/commands", "agents:command"),
        ("POST", "/install-tokens", "certificates:write"),
        ("GET", "/routes", "routes:admin"),
        ("GET", "/svc/x", "proxy:svc"),
    ] {
        let r = conn.send(method, path, &reader, "{}").await.unwrap();
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        assert!(
            detail(&r).contains(&format!("'{scope}'")),
            "{method} {path}: {}",
            r.text()
        );
    }
    // The plain key has every scope; the upstream never sees the gateway's key.
    let key = format!("Bearer {API_KEY}");
    let r = conn
        .send("GET", "/svc/x", &[("authorization", &key)], "")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["headers"].get("authorization").is_none());
    let r = conn.send("GET", "/svc/x", &[], "").await.unwrap();
    assert_eq!(r.status, 401);
    let r = conn
        .send("GET", "/svc/x", &[("authorization", "Bearer wrong")], "")
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);
}

fn agentgate_testkit_hex(d: &ring::digest::Digest) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// An https upstream with a certificate for `localhost` from `pki` (a private CA).
async fn tls_upstream(pki: &TestPki) -> String {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = CertificateDer::pem_slice_iter(pki.server_cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(|req: Request| async move {
        axum::Json(json!({"upstream": "tls", "path": req.uri().path()}))
    });
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(
                    hyper_util::rt::TokioIo::new(tls),
                    hyper_util::service::TowerToHyperService::new(app),
                )
                .await;
            });
        }
    });
    format!("https://localhost:{port}")
}

/// `https://` upstreams are verified: against `[proxy] ca_file` when set, else against the
/// web roots, which do not know the test CA (so the upstream is refused with a 502).
#[tokio::test]
async fn https_upstream_is_verified_against_the_configured_ca() {
    let upstream_pki = TestPki::new();
    let url = tls_upstream(&upstream_pki).await;
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &upstream_pki.ca_pem).unwrap();
    let r = route(&format!(
        "name = \"tls\"\nprefix = \"/tls\"\nupstreams = [\"{url}\"]\nstrip_prefix = true\nauth = \"none\""
    ));
    let (r2, ca_path) = (r.clone(), ca.path().to_owned());
    let trusted = TestServer::start_with(|c| {
        c.routes = vec![r2];
        c.proxy.ca_file = Some(ca_path);
    })
    .await;
    let resp = get(&trusted, "/tls/x", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["path"], "/x");

    let untrusted = TestServer::start_with(|c| c.routes = vec![r]).await;
    let resp = get(&untrusted, "/tls/x", &[]).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert!(detail(&resp).contains("certificate"), "{}", resp.text());
}

/// A proxied request is served past the API's layers when no CORS is configured, and
/// through them when it is; both ways it gets the same treatment: the upstream's own error
/// response as the upstream sent it (never rewritten into `{"detail"}`), the security
/// headers, the request head limits before the upstream, the HTTP request metric, and a
/// graceful shutdown that waits for it.
#[tokio::test]
async fn proxied_requests_are_answered_alike_past_the_api_layers_and_through_them() {
    let up = upstream("both").await;
    let open = route(&format!(
        "name = \"svc\"\nprefix = \"/svc\"\nupstreams = [\"{}\"]\nstrip_prefix = true\nauth = \"none\"",
        up.url
    ));
    for cors in [false, true] {
        let routes = vec![open.clone()];
        let server = Arc::new(
            TestServer::start_with(|c| {
                c.routes = routes;
                c.shutdown_grace_secs = 10;
                if cors {
                    c.cors_origins = vec!["https://app.example.com".into()];
                }
            })
            .await,
        );
        let r = get(&server, "/svc/teapot", &[]).await;
        assert_eq!(r.status, 418, "cors {cors}");
        assert_eq!(
            r.text(),
            "short and stout",
            "cors {cors}: the body was rewritten"
        );
        assert_eq!(r.headers["content-type"], "text/plain", "cors {cors}");
        let r = get(&server, "/svc/x", &[("origin", "https://app.example.com")]).await;
        assert_eq!(r.status, 200, "cors {cors}");
        assert_eq!(
            r.headers["x-content-type-options"], "nosniff",
            "cors {cors}"
        );
        assert_eq!(
            r.headers["strict-transport-security"], "max-age=31536000",
            "cors {cors}"
        );
        assert_eq!(
            r.headers.contains_key("access-control-allow-origin"),
            cors,
            "cors {cors}: {:?}",
            r.headers
        );
        // The head limits come before the upstream: 414 with a detail naming the key.
        let hits = up.hits.load(Ordering::SeqCst);
        let long = format!("/svc/{}", "a".repeat(9000));
        let r = get(&server, &long, &[]).await;
        assert_eq!(r.status, 414, "cors {cors}");
        assert!(detail(&r).contains("limits.max_uri_bytes"), "{}", r.text());
        assert_eq!(up.hits.load(Ordering::SeqCst), hits, "the upstream saw it");
        let metrics = get(&server, "/metrics", &[]).await.text();
        for sample in [
            r#"agentgate_http_requests_total{method="GET",route="proxy",status="418"} 1"#,
            r#"agentgate_http_requests_total{method="GET",route="proxy",status="200"} 1"#,
            r#"agentgate_http_requests_total{method="GET",route="unmatched",status="414"} 1"#,
        ] {
            assert!(
                metrics.contains(sample),
                "cors {cors}: no {sample} in {metrics}"
            );
        }
        // A request in flight when the shutdown begins is answered before serve returns.
        let s = server.clone();
        let slow = tokio::spawn(async move { get(&s, "/svc/delay", &[]).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.begin_shutdown();
        let r = slow.await.unwrap();
        assert_eq!((r.status, r.text()), (200, "delayed".into()), "cors {cors}");
        assert!(server.wait_stopped(Duration::from_secs(15)).await);
    }
}

/// An upstream on hyper that counts the connections it accepts. `/stream` sends `first`,
/// then the rest of its body only when `release` is notified; anything else answers `ok`,
/// after reading the request body.
struct Counted {
    url: String,
    accepted: Arc<AtomicUsize>,
    release: Arc<tokio::sync::Notify>,
}

async fn counted_upstream() -> Counted {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let (count, held) = (accepted.clone(), release.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let held = held.clone();
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let held = held.clone();
                    async move {
                        if req.uri().path() == "/stream" {
                            let chunks = futures_util::stream::unfold(0, move |step| {
                                let held = held.clone();
                                async move {
                                    match step {
                                        0 => {
                                            Some((Ok::<_, std::io::Error>(Bytes::from("first")), 1))
                                        }
                                        1 => {
                                            held.notified().await;
                                            Some((Ok(Bytes::from(" rest")), 2))
                                        }
                                        _ => None,
                                    }
                                }
                            });
                            return Ok::<_, hyper::Error>(Response::new(Body::from_stream(chunks)));
                        }
                        req.into_body().collect().await?;
                        Ok(Response::new(Body::from("ok")))
                    }
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Counted {
        url,
        accepted,
        release,
    }
}

fn pool_route(name: &str, url: &str) -> RawRoute {
    route(&format!(
        "name = \"{name}\"\nprefix = \"/{name}\"\nupstreams = [\"{url}\"]\nstrip_prefix = true\nauth = \"none\""
    ))
}

/// Kept-alive reuse: one client connection's sequential requests, GET and POST, all go
/// over one upstream connection.
#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let up = counted_upstream().await;
    let server = TestServer::start_with(|c| c.routes = vec![pool_route("pool", &up.url)]).await;
    get_and_post_in_turn(&server, "/pool/x", 40, |_| "ok").await;
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
}

/// `n` requests on one client connection, GET and POST (with a body) in turn, each
/// answered `200` with the body `expected(request body)`.
async fn get_and_post_in_turn(
    server: &TestServer,
    path: &str,
    n: usize,
    expected: impl Fn(&str) -> &str,
) {
    let mut conn = server.http(None).await.unwrap();
    for i in 0..n {
        let (method, body) = if i % 2 == 0 {
            ("GET", "")
        } else {
            ("POST", "{\"post\": true}")
        };
        let r = conn.send(method, path, &[], body).await.unwrap();
        assert_eq!(r.status, 200, "{method} {i}: {}", r.text());
        assert_eq!(r.text(), expected(body), "{method} {i}");
    }
}

/// An upstream that closes every connection after its first answer: with
/// `Connection: close`, or silently (as one whose keep-alive timeout is zero). The
/// gateway never sends on such a connection, or sends the request again on a new one
/// when the pooled connection gave it back unsent. Returns the URL and the accept count.
async fn one_answer_per_connection(announce: bool) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let head_end = loop {
                    let mut chunk = [0u8; 4096];
                    let n = tcp.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "connection closed before a request");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while buf.len() < head_end + length {
                    let mut chunk = [0u8; 4096];
                    let n = tcp.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "connection closed within the body");
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = &buf[head_end..head_end + length];
                let close = if announce {
                    "connection: close\r\n"
                } else {
                    ""
                };
                let response = format!(
                    "HTTP/1.1 200 OK\r\n{close}content-length: {}\r\n\r\n",
                    body.len()
                );
                tcp.write_all(response.as_bytes()).await.unwrap();
                tcp.write_all(body).await.unwrap();
                // Dropped: the socket closes right after the answer.
            });
        }
    });
    (url, accepted)
}

#[tokio::test]
async fn an_upstream_closing_each_connection_after_answering_still_gets_every_request() {
    for announce in [true, false] {
        let (url, accepted) = one_answer_per_connection(announce).await;
        let server = TestServer::start_with(|c| c.routes = vec![pool_route("once", &url)]).await;
        // The upstream echoes the body.
        get_and_post_in_turn(&server, "/once/x", 30, |body| body).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            30,
            "Connection: close sent: {announce}"
        );
    }
}

/// A response whose body is still streaming keeps its upstream connection busy; a second
/// request meanwhile gets a connection of its own instead of waiting for it.
#[tokio::test]
async fn a_streaming_response_does_not_hold_up_a_concurrent_request() {
    let up = counted_upstream().await;
    let server = TestServer::start_with(|c| c.routes = vec![pool_route("pool", &up.url)]).await;
    let mut sender = streaming_client(&server).await;
    let req = http::Request::get("/pool/stream")
        .header("host", "localhost")
        .body(Body::empty())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first");

    // The stream is held open; this one must not wait for it.
    let r = tokio::time::timeout(Duration::from_secs(10), get(&server, "/pool/x", &[]))
        .await
        .expect("the second request waited for the streaming one");
    assert_eq!(r.status, 200);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);

    up.release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b" rest");
}
