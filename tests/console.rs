#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The fleet console at `/ui/`: its files and headers, sign-in sessions (cookie
//! attributes, sign-out, expiry, the failed-attempt limit, Redis with `[cluster]`), CSRF,
//! the API's scopes, the live event stream; and in headless Chromium (selenium, driven by
//! `tests/console/browser.py`): sign-in, live agents, a command, revoke, upload,
//! enrollment, sign-out, and 10,000 agents with a bounded DOM.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentgate::config::{ClusterMode, RawApiKey, RawApiKeyEntry};
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// Whether the gateway stores a certificate for `id`.
fn has_cert(server: &TestServer, id: &str) -> bool {
    server.store.by_agent(&id.parse().unwrap()).is_some()
}

/// The `detail` of an error response.
fn detail_of(r: &HttpResponse) -> String {
    r.json()["detail"].as_str().unwrap_or_default().to_owned()
}

/// A signed-in console: the cookie header value and the CSRF token.
struct Signed {
    cookie: String,
    csrf: String,
}

/// `POST /ui/api/sign-in` with `key`, as the page sends it.
async fn try_sign_in(server: &TestServer, key: &str) -> HttpResponse {
    request(
        server,
        "POST",
        "/ui/api/sign-in",
        &[("content-type", "application/json")],
        &json!({ "api_key": key }).to_string(),
    )
    .await
}

async fn sign_in(server: &TestServer, key: &str) -> Signed {
    let r = try_sign_in(server, key).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let set = r.headers["set-cookie"].to_str().unwrap().to_owned();
    let cookie = set.split(';').next().unwrap().to_owned();
    Signed {
        cookie,
        csrf: r.json()["csrf_token"].as_str().unwrap().to_owned(),
    }
}

impl Signed {
    async fn get(&self, server: &TestServer, path: &str) -> HttpResponse {
        request(server, "GET", path, &[("cookie", &self.cookie)], "").await
    }

    /// A state-changing request with the cookie and, if `csrf`, the session's token.
    async fn send(
        &self,
        server: &TestServer,
        method: &str,
        path: &str,
        csrf: bool,
        body: Option<Value>,
    ) -> HttpResponse {
        let mut headers = vec![("cookie", self.cookie.as_str())];
        if csrf {
            headers.push(("x-csrf-token", self.csrf.as_str()));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        request(server, method, path, &headers, &body).await
    }
}

#[tokio::test]
async fn console_files_come_with_types_etags_and_the_csp() {
    let server = TestServer::start().await;
    let page = request(&server, "GET", "/ui/", &[], "").await;
    assert_eq!(page.status, 200);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers["content-security-policy"], CSP);
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
    assert!(
        page.text()
            .contains(r#"<script type="module" src="app.js">"#)
    );
    let etag = page.headers["etag"].to_str().unwrap().to_owned();
    let again = request(&server, "GET", "/ui/", &[("if-none-match", &etag)], "").await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());

    for (path, ty) in [
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/fleet.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
        (
            "/ui/vendor/preact/preact.module.js",
            "text/javascript; charset=utf-8",
        ),
        (
            "/ui/vendor/preact/hooks.module.js",
            "text/javascript; charset=utf-8",
        ),
        (
            "/ui/vendor/htm/htm.module.js",
            "text/javascript; charset=utf-8",
        ),
    ] {
        let r = request(&server, "GET", path, &[], "").await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.headers["content-type"], ty, "{path}");
        assert_eq!(r.headers["content-security-policy"], CSP, "{path}");
        assert_eq!(r.headers["cache-control"], "no-cache", "{path}");
        assert!(r.headers.contains_key("etag"), "{path}");
    }
    // No inline script or style anywhere in the page (the CSP would block it).
    let html = page.text();
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "{html}"
    );

    let missing = request(&server, "GET", "/ui/nope.js", &[], "").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.headers["content-security-policy"], CSP);
    assert!(detail_of(&missing).contains("/ui/nope.js"));
    let bare = request(&server, "GET", "/ui", &[], "").await;
    assert_eq!(bare.status, 308);
    assert_eq!(bare.headers["location"], "/ui/");
}

#[tokio::test]
async fn sign_in_sets_a_strict_cookie_and_sign_out_makes_it_useless() {
    let server = TestServer::start().await;
    let wrong = try_sign_in(&server, "wrong").await;
    assert_eq!(wrong.status, 403);
    assert_eq!(wrong.json(), json!({"detail": "Invalid API key"}));
    assert!(!wrong.headers.contains_key("set-cookie"));
    // Only JSON: a form of another site cannot sign a browser in.
    let form = request(
        &server,
        "POST",
        "/ui/api/sign-in",
        &[("content-type", "text/plain")],
        &json!({ "api_key": API_KEY }).to_string(),
    )
    .await;
    assert_eq!(form.status, 415, "{}", form.text());

    let r = try_sign_in(&server, API_KEY).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["cache-control"], "no-store");
    let set = r.headers["set-cookie"].to_str().unwrap().to_owned();
    let attrs: Vec<&str> = set.split(';').map(str::trim).collect();
    let (name, id) = attrs[0].split_once('=').unwrap();
    assert_eq!(name, "agentgate_console");
    assert_eq!(id.len(), 64, "{set}");
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/ui"] {
        assert!(attrs.contains(&attr), "{attr} missing: {set}");
    }
    // Expires: the default absolute lifetime, 12 h.
    assert!(attrs.contains(&"Max-Age=43200"), "{set}");
    let body = r.json();
    assert_eq!(body["scopes"], Value::Null, "a plain key has every scope");
    let signed = Signed {
        cookie: attrs[0].to_owned(),
        csrf: body["csrf_token"].as_str().unwrap().to_owned(),
    };

    let info = signed.get(&server, "/ui/api/session").await;
    assert_eq!(info.status, 200);
    assert_eq!(info.json()["csrf_token"], body["csrf_token"]);
    // No cookie, a made-up cookie: 401 with a detail.
    let none = request(&server, "GET", "/ui/api/session", &[], "").await;
    assert_eq!(none.status, 401);
    assert!(detail_of(&none).contains("sign in"));
    let forged = request(
        &server,
        "GET",
        "/ui/api/session",
        &[("cookie", &format!("agentgate_console={}", "a".repeat(64)))],
        "",
    )
    .await;
    assert_eq!(forged.status, 401);

    // Sign-out needs the CSRF token like every other change.
    let no_token = signed
        .send(&server, "POST", "/ui/api/sign-out", false, None)
        .await;
    assert_eq!(no_token.status, 403);
    assert!(detail_of(&no_token).contains("X-CSRF-Token"));
    assert_eq!(signed.get(&server, "/ui/api/session").await.status, 200);
    let out = signed
        .send(&server, "POST", "/ui/api/sign-out", true, None)
        .await;
    assert_eq!(out.status, 200);
    assert!(
        out.headers["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    // The old cookie, replayed: the server has forgotten it.
    let replay = signed.get(&server, "/ui/api/session").await;
    assert_eq!(replay.status, 401);
    assert_eq!(signed.get(&server, "/ui/api/events").await.status, 401);
}

#[tokio::test]
async fn state_changing_console_requests_need_the_csrf_token() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("csrf-agent");
    assert_eq!(server.upload(&agent).await.0, 200);
    let signed = sign_in(&server, API_KEY).await;
    let cases: [(&str, &str, Option<Value>); 4] = [
        (
            "POST",
            "/ui/api/agents/csrf-agent/commands",
            Some(json!({"event": "restart"})),
        ),
        ("DELETE", "/ui/api/agent/certificate/csrf-agent", None),
        (
            "POST",
            "/ui/api/agent/certificate",
            Some(json!({"agent_id": "csrf-agent", "certificate": agent.cert_pem})),
        ),
        (
            "POST",
            "/ui/api/install-tokens",
            Some(json!({"agent_id": "csrf-agent"})),
        ),
    ];
    for (method, path, body) in cases {
        let r = signed
            .send(&server, method, path, false, body.clone())
            .await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(
            detail_of(&r).starts_with("missing X-CSRF-Token header"),
            "{}",
            r.text()
        );
        let wrong = Signed {
            cookie: signed.cookie.clone(),
            csrf: "0".repeat(64),
        };
        let r = wrong.send(&server, method, path, true, body).await;
        assert_eq!(r.status, 403, "{method} {path}");
        assert!(detail_of(&r).contains("does not match"));
    }
    // Nothing was changed: the certificate is still there.
    assert!(has_cert(&server, "csrf-agent"));
    // With the token, the same revoke goes through the API's code path.
    let r = signed
        .send(
            &server,
            "DELETE",
            "/ui/api/agent/certificate/csrf-agent",
            true,
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["message"], "Certificate deleted");
    assert!(!has_cert(&server, "csrf-agent"));
}

#[tokio::test]
async fn console_actions_are_checked_against_the_keys_scopes() {
    let server = TestServer::start_with(|c| {
        c.api_keys.push(RawApiKey::Entry(RawApiKeyEntry {
            name: "viewer".into(),
            key: Some("viewer-key-0123456789".into()),
            sha256: None,
            scopes: vec!["agents:read".into()],
        }));
    })
    .await;
    let agent = server.pki.agent("scoped-agent");
    assert_eq!(server.upload(&agent).await.0, 200);
    let viewer = sign_in(&server, "viewer-key-0123456789").await;
    let info = viewer.get(&server, "/ui/api/session").await.json();
    assert_eq!(info["key_name"], "viewer");
    assert_eq!(info["scopes"], json!(["agents:read"]));
    let read = viewer.get(&server, "/ui/api/agents/scoped-agent").await;
    assert_eq!(read.status, 200, "{}", read.text());
    assert_eq!(
        read.json()["certificate"]["fingerprint"],
        agent.fingerprint_hex()
    );
    for (method, path, body, scope) in [
        (
            "POST",
            "/ui/api/agents/scoped-agent/commands",
            Some(json!({"event": "restart"})),
            "agents:command",
        ),
        (
            "DELETE",
            "/ui/api/agent/certificate/scoped-agent",
            None,
            "certificates:write",
        ),
        (
            "POST",
            "/ui/api/install-tokens",
            Some(json!({"agent_id": "x1"})),
            "certificates:write",
        ),
    ] {
        let r = viewer.send(&server, method, path, true, body).await;
        assert_eq!(r.status, 403, "{path}");
        assert_eq!(
            r.json(),
            json!({"detail": format!("API key lacks the scope '{scope}'")}),
            "{path}"
        );
    }
    // The API's own validation and errors: a bad agent id, an agent not connected.
    let full = sign_in(&server, API_KEY).await;
    let r = full.get(&server, "/ui/api/agents/..bad").await;
    assert_eq!(r.status, 400);
    assert!(detail_of(&r).starts_with("invalid agent_id"));
    let r = full
        .send(
            &server,
            "POST",
            "/ui/api/agents/scoped-agent/commands",
            true,
            Some(json!({"event": "restart"})),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = full
        .send(
            &server,
            "POST",
            "/ui/api/agent/certificate",
            true,
            Some(json!({"agent_id": "07048933", "certificate": server.pki.agent("12345678").cert_pem})),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["detail"],
        "Agent ID mismatch: provided '07048933' but certificate CN is '12345678'"
    );
}

#[tokio::test]
async fn wrong_console_keys_count_against_the_api_key_failure_limit() {
    let server = TestServer::start_with(|c| c.limits.api_key_failures = 2).await;
    for _ in 0..2 {
        let r = try_sign_in(&server, "guess").await;
        assert_eq!(r.status, 403);
    }
    // Past the limit, even the right key is refused, on the console and on the API.
    let r = try_sign_in(&server, API_KEY).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(server.api("GET", "/agents", None).await.0, 429);
}

#[tokio::test]
async fn console_sessions_end_when_idle_and_at_their_absolute_limit() {
    let clock = agentgate::clock::ManualClock::starting_now();
    let server = TestServer::start_with_clock(
        |c| {
            c.console.session_idle_secs = 60;
            c.console.session_absolute_secs = 150;
        },
        &clock,
    )
    .await;
    let signed = sign_in(&server, API_KEY).await;
    clock.advance(Duration::from_secs(59));
    assert_eq!(signed.get(&server, "/ui/api/session").await.status, 200);
    clock.advance(Duration::from_secs(59));
    assert_eq!(signed.get(&server, "/ui/api/session").await.status, 200);
    // Used every 59 s it never idles out, but ends 150 s after its sign-in.
    clock.advance(Duration::from_secs(33));
    assert_eq!(signed.get(&server, "/ui/api/session").await.status, 401);

    let signed = sign_in(&server, API_KEY).await;
    clock.advance(Duration::from_secs(60));
    assert_eq!(signed.get(&server, "/ui/api/session").await.status, 401);
}

/// Reads Server-Sent Events from `GET /ui/api/events` on a raw TLS stream.
struct Events {
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: String,
}

impl Events {
    async fn open(server: &TestServer, signed: &Signed) -> Events {
        let mut tls = server.tls(None).await.unwrap();
        let req = format!(
            "GET /ui/api/events HTTP/1.1\r\nhost: localhost\r\ncookie: {}\r\naccept: text/event-stream\r\n\r\n",
            signed.cookie
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        Events {
            tls,
            buf: String::new(),
        }
    }

    /// The next event `(name, data)`; panics after 10 s.
    async fn next(&mut self) -> (String, Value) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(n) = line.strip_prefix("event: ").or(line.strip_prefix("event:")) {
                        name = Some(n.trim().to_owned());
                    } else if let Some(d) =
                        line.strip_prefix("data: ").or(line.strip_prefix("data:"))
                    {
                        data.push_str(d);
                    }
                }
                if let Some(name) = name {
                    return (name, serde_json::from_str(&data).unwrap_or(Value::Null));
                }
            }
            let mut chunk = [0u8; 16384];
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, self.tls.read(&mut chunk))
                .await
                .expect("no event within 10 s")
                .unwrap();
            assert!(n > 0, "event stream closed");
            // Chunked transfer encoding: the chunk-size lines are dropped with the rest
            // of what is not an `event:` or `data:` line.
            self.buf
                .push_str(&String::from_utf8_lossy(&chunk[..n]).replace('\r', ""));
        }
    }

    /// Skips events until one whose upserted row for `id` has `status`.
    async fn until_status(&mut self, id: &str, status: &str) -> Value {
        loop {
            let (name, data) = self.next().await;
            let rows = match name.as_str() {
                "snapshot" => &data["rows"],
                "delta" => &data["upsert"],
                _ => continue,
            };
            if let Some(row) = rows
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["id"] == id && r["status"] == status)
            {
                return row.clone();
            }
        }
    }
}

#[tokio::test]
async fn the_event_stream_sends_a_snapshot_then_the_changes() {
    let server = TestServer::start().await;
    let agent = server.pki.agent("live-1");
    assert_eq!(server.upload(&agent).await.0, 200);
    let signed = sign_in(&server, API_KEY).await;
    let mut events = Events::open(&server, &signed).await;
    let (name, snapshot) = events.next().await;
    assert_eq!(name, "snapshot");
    assert!(snapshot["seq"].is_u64() && snapshot["counters"].is_object());
    // A certificate upload reaches the table at the feed's next refresh (within 1 s).
    let row = events.until_status("live-1", "disconnected").await;
    assert_eq!(
        row["cert_not_after"].as_i64().unwrap(),
        server
            .store
            .by_agent(&"live-1".parse().unwrap())
            .unwrap()
            .not_after
            * 1000
    );

    let sio = SioWs::connect(&server, Some(&agent)).await.unwrap();
    let row = events.until_status("live-1", "connected").await;
    assert_eq!(
        row["remote_addr"].as_str().unwrap().split(':').next(),
        Some("127.0.0.1")
    );
    assert!(row["connected_since"].is_i64());
    drop(sio);
    events.until_status("live-1", "disconnected").await;

    // Sign-out elsewhere ends the stream with `signed_out`.
    let out = signed
        .send(&server, "POST", "/ui/api/sign-out", true, None)
        .await;
    assert_eq!(out.status, 200);
    loop {
        let (name, _) = events.next().await;
        if name == "signed_out" {
            break;
        }
    }
}

#[tokio::test]
async fn with_cluster_console_sessions_live_in_redis_for_every_node() {
    let redis = common::redis::RedisServer::start();
    let (a, b) = common::cluster::two_nodes(&redis.url(), ClusterMode::Standalone).await;
    let signed = sign_in(&a, API_KEY).await;
    // The other node behind the load balancer knows the session.
    let info = signed.get(&b, "/ui/api/session").await;
    assert_eq!(info.status, 200, "{}", info.text());
    assert_eq!(info.json()["node"], "node-b");
    // Redis holds the id's hash, under the state prefix, with a TTL; never the id.
    let id = signed.cookie.split_once('=').unwrap().1;
    let keys = redis.cli(&["--raw", "keys", "agentgate:{state}:console:*"]);
    let digest: String = ring::digest::digest(&ring::digest::SHA256, id.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        keys.trim(),
        format!("agentgate:{{state}}:console:session:{digest}")
    );
    let ttl: i64 = redis.cli(&["ttl", keys.trim()]).trim().parse().unwrap();
    assert!(ttl > 0 && ttl <= 1800, "{ttl}");
    let dump = redis.cli(&["--raw", "get", keys.trim()]);
    assert!(!dump.contains(id), "{dump}");
    // Signed out on one node, refused on the other.
    let out = signed
        .send(&b, "POST", "/ui/api/sign-out", true, None)
        .await;
    assert_eq!(out.status, 200);
    assert_eq!(signed.get(&a, "/ui/api/session").await.status, 401);
}

// ------------------------------------------------------------------ in the browser

/// What the browser tests need: Chromium, its driver, selenium in the test venv. The test
/// command installs them (scripts/test.sh); missing, the test fails saying so.
fn browser_ready() {
    for tool in ["chromium", "chromedriver"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap()
            .status
            .success();
        assert!(
            found,
            "{tool} is not installed: run ./scripts/test.sh (it installs the Debian packages chromium and chromium-driver)"
        );
    }
    let selenium = std::process::Command::new(python())
        .args(["-c", "import selenium"])
        .status()
        .unwrap()
        .success();
    assert!(
        selenium,
        "selenium is missing from the test venv: run ./scripts/test.sh"
    );
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes an agent's certificate and key; returns `id,cert,key` for browser.py.
fn agent_files(dir: &std::path::Path, agent: &AgentCert) -> String {
    let cert = dir.join(format!("{}.crt", agent.agent_id));
    let key = dir.join(format!("{}.key", agent.agent_id));
    std::fs::write(&cert, &agent.cert_pem).unwrap();
    std::fs::write(&key, &agent.key_pem).unwrap();
    format!("{},{},{}", agent.agent_id, cert.display(), key.display())
}

/// Runs browser.py; returns its steps by name. Fails the test with its stderr if it
/// failed.
async fn run_browser(
    server: &TestServer,
    args: &[String],
) -> std::collections::HashMap<String, Value> {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(repo().join("tests/console/browser.py"))
        .args(args)
        .arg("--url")
        .arg(server.url())
        .arg("--ca")
        .arg(server.ca_file())
        .arg("--api-key")
        .arg(API_KEY)
        .arg("--agent-script")
        .arg(repo().join("tests/agents/agent.py"))
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("browser.py hung")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser.py failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| (v["step"].as_str().unwrap_or_default().to_owned(), v))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_headless_chromium() {
    browser_ready();
    let server = TestServer::start().await;
    let files = tempfile::tempdir().unwrap();
    let leaver = server.pki.agent("plc-leaver");
    let agent = server.pki.agent("plc-0042");
    // A few more agents, so that the screenshot shows a fleet.
    for id in ["plc-0007", "plc-0013", "plc-0100", "plc-0101"] {
        assert_eq!(server.upload(&server.pki.agent(id)).await.0, 200);
    }
    assert_eq!(server.upload(&leaver).await.0, 200);
    assert_eq!(server.upload(&agent).await.0, 200);
    let new = server.pki.agent("plc-0200");
    let new_cert = files.path().join("plc-0200.pem");
    std::fs::write(&new_cert, &new.cert_pem).unwrap();
    std::fs::create_dir_all(repo().join("docs")).unwrap();
    let screenshot = repo().join("docs/console.png");

    let steps = run_browser(
        &server,
        &[
            "flow".into(),
            "--leaver".into(),
            agent_files(files.path(), &leaver),
            "--agent".into(),
            agent_files(files.path(), &agent),
            "--upload".into(),
            format!("plc-0200,{}", new_cert.display()),
            "--screenshot".into(),
            screenshot.display().to_string(),
        ],
    )
    .await;
    let step = |name: &str| {
        steps
            .get(name)
            .unwrap_or_else(|| panic!("browser.py did not report {name}: {steps:?}"))
            .clone()
    };
    assert_eq!(step("wrong_key")["error"], "Invalid API key");
    assert!(
        step("signed_in")["who"]
            .as_str()
            .unwrap()
            .contains("signed in as")
    );
    assert_eq!(step("agent_appeared")["agent_id"], "plc-leaver");
    assert_eq!(step("agent_left")["agent_id"], "plc-leaver");
    assert_eq!(step("filtered")["shown"], "1 of 6 agents");

    let page = step("agent_page");
    assert!(
        page["certificate"]
            .as_str()
            .unwrap()
            .contains(&agent.fingerprint_hex())
    );
    assert_eq!(page["payload"]["cpu_usage"], 0.5);
    assert_eq!(page["sessions"], 1);

    // The agent's own ack, shown on the page.
    let command = step("command");
    assert_eq!(
        command["reply"],
        json!({"ok": true, "event": "restart", "data": {"reason": "console test"}})
    );
    assert_eq!(command["agent_saw"]["event"], "command");

    let csrf = step("csrf_refused");
    assert_eq!(csrf["status"], 403);
    assert!(
        csrf["detail"]
            .as_str()
            .unwrap()
            .starts_with("missing X-CSRF-Token header")
    );

    let revoked = step("revoked");
    assert_eq!(revoked["agent_saw"]["event"], "disconnected");
    assert_eq!(revoked["agent_exit"], 0);
    assert!(!has_cert(&server, "plc-0042"));
    // Cut for good: its certificate fails the next handshake.
    assert!(
        first_read_error(server.tls(Some(&agent)).await.unwrap())
            .await
            .is_some()
    );

    let upload = step("upload");
    assert_eq!(
        upload["refused"],
        "Agent ID mismatch: provided 'someone-else' but certificate CN is 'plc-0200'"
    );
    assert!(
        upload["uploaded"]
            .as_str()
            .unwrap()
            .starts_with("Certificate uploaded successfully")
    );
    assert!(has_cert(&server, "plc-0200"));

    // The install token works once, as one from the API does.
    let token = step("install_token")["token"].as_str().unwrap().to_owned();
    let enrolled = server.pki.agent("enrolled-1");
    let mut conn = server.http(None).await.unwrap();
    let r = conn
        .send(
            "POST",
            "/agent/register",
            &[],
            &json!({"install_token": token, "agent_id": "enrolled-1", "certificate": enrolled.cert_pem})
                .to_string(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    assert_eq!(step("csp")["violations"], json!([]));

    let out = step("signed_out");
    assert_eq!(out["http_only"], true);
    assert_eq!(out["secure"], true);
    assert_eq!(out["same_site"], "Strict");
    assert_eq!(out["path"], "/ui");
    // The browser's old cookie, replayed by a plain HTTP client after sign-out.
    let replay = request(
        &server,
        "GET",
        "/ui/api/session",
        &[(
            "cookie",
            &format!("agentgate_console={}", out["cookie"].as_str().unwrap()),
        )],
        "",
    )
    .await;
    assert_eq!(replay.status, 401);
    assert!(screenshot.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_agents_keep_the_tables_dom_bounded() {
    browser_ready();
    const AGENTS: usize = 10_000;
    let pki = Arc::new(TestPki::new());
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = test_config(&pki, dir.path(), |_| {});
    // Certificates in bulk, written where the store loads them at start.
    std::fs::create_dir_all(&config.store.dir).unwrap();
    for i in 0..AGENTS {
        let id = format!("bulk-{i:05}");
        let cert = AgentCert::generate(&id, 365).unwrap();
        std::fs::write(config.store.dir.join(format!("{id}.pem")), &cert.cert_pem).unwrap();
    }
    let server = TestServer::start_in(pki, dir, config).await.unwrap();
    assert_eq!(server.store.len(), AGENTS);
    let last = format!("bulk-{:05}", AGENTS - 1);
    let steps = run_browser(
        &server,
        &[
            "bulk".into(),
            "--expect-total".into(),
            AGENTS.to_string(),
            "--last-id".into(),
            last.clone(),
        ],
    )
    .await;
    let bulk = &steps["bulk"];
    eprintln!("browser.py: {bulk}");
    assert_eq!(bulk["total"], AGENTS);
    assert_eq!(bulk["first"], "bulk-00000");
    // Only the rows in view (about 20 at this window size) and the overscan are in the
    // DOM, at the top and at the end of 10,000.
    for at in ["rows_top", "rows_end"] {
        let rows = bulk[at].as_u64().unwrap();
        assert!((10..=80).contains(&rows), "{at}: {rows} rows in the DOM");
    }
    assert_eq!(bulk["searched"], format!("1 of {AGENTS} agents"));
    assert_eq!(bulk["violations"], json!([]));
}
