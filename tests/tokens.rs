//! API tokens (issue 10, point 4) and the storage of tokens, revocations, audit and
//! install tokens (point 6): a real gateway, a real upstream behind a `jwt` route, real
//! clients; on one node (the database in `<data_dir>/agentgate.db`) and on two nodes
//! sharing a redis-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test stops loudly on failure

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use agentgate::clock::ManualClock;
use agentgate::config::{ClusterMode, RawApiKey, RawApiKeyEntry, RawCluster, RawConfig, RawRoute};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use common::cluster::wait_for;
use common::redis::RedisServer;
use common::*;

const SECRET: &str = "tokens-test-secret-0123456789";
/// A key with only `tokens:admin`, named so that the audit can be checked.
const ADMIN_KEY: &str = "token-admin-key-0123456789";
const ADMIN_NAME: &str = "token-admin";
/// A key without `tokens:admin`.
const READER_KEY: &str = "reader-key-0123456789";

/// An upstream that answers 200 and counts the requests it saw.
async fn upstream() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            "from upstream"
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), hits)
}

/// The secret, the two keys, and a `jwt` route to `upstream` for project `captionacc`.
fn configure(c: &mut RawConfig, upstream: &str) {
    c.gateway_jwt_secret = Some(SECRET.into());
    for (name, key, scopes) in [
        (ADMIN_NAME, ADMIN_KEY, vec!["tokens:admin".to_owned()]),
        ("reader", READER_KEY, vec!["agents:read".to_owned()]),
    ] {
        c.api_keys.push(RawApiKey::Entry(RawApiKeyEntry {
            name: name.into(),
            key: Some(key.into()),
            sha256: None,
            scopes,
        }));
    }
    let route: RawRoute = toml::from_str(&format!(
        "name = \"prefect\"\nprefix = \"/captionacc/prefect\"\nupstreams = [\"{upstream}\"]\n\
         strip_prefix = true\nauth = \"jwt\"\nclaims = {{project = [\"captionacc\"], service = [\"prefect\"]}}"
    ))
    .unwrap();
    c.routes = vec![route];
}

/// `method path` with `key` as the Bearer key (none when empty).
async fn call(
    server: &TestServer,
    key: &str,
    method: &str,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let mut conn = server.http(None).await.unwrap();
    let auth = format!("Bearer {key}");
    let headers: Vec<(&str, &str)> = if key.is_empty() {
        vec![]
    } else {
        vec![("authorization", auth.as_str())]
    };
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let r = conn.send(method, path, &headers, &body).await.unwrap();
    let json = if r.text().is_empty() {
        Value::Null
    } else {
        r.json()
    };
    (r.status, json)
}

async fn issue(server: &TestServer, body: Value) -> Value {
    let (status, v) = call(server, ADMIN_KEY, "POST", "/tokens", body).await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn revoke(server: &TestServer, jti: &str, reason: &str) -> Value {
    let (status, v) = call(
        server,
        ADMIN_KEY,
        "POST",
        &format!("/tokens/{jti}/revoke"),
        json!({ "reason": reason }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v
}

/// The status and detail of a request to the `jwt` route with `token`.
async fn use_token(server: &TestServer, token: &str) -> (u16, String) {
    let mut conn = server.http(None).await.unwrap();
    let auth = format!("Bearer {token}");
    let r = conn
        .send(
            "GET",
            "/captionacc/prefect/api/flows",
            &[("authorization", &auth)],
            "",
        )
        .await
        .unwrap();
    let detail = if r.status == 200 {
        r.text()
    } else {
        r.json()["detail"].as_str().unwrap_or_default().to_owned()
    };
    (r.status, detail)
}

async fn listed(server: &TestServer, query: &str) -> Value {
    let (status, v) = call(
        server,
        ADMIN_KEY,
        "GET",
        &format!("/tokens{query}"),
        Value::Null,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v
}

fn jtis(list: &Value) -> Vec<String> {
    list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["jti"].as_str().unwrap().to_owned())
        .collect()
}

async fn audit(server: &TestServer) -> Vec<Value> {
    let (status, v) = call(server, ADMIN_KEY, "GET", "/tokens/audit", Value::Null).await;
    assert_eq!(status, 200, "{v}");
    v["records"].as_array().unwrap().clone()
}

fn db_count(server: &TestServer, sql: &str) -> i64 {
    let db = rusqlite::Connection::open(server.config.data_dir.join("agentgate.db")).unwrap();
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Issue -> the token opens the route -> revoke -> 401 at once; revoking again changes
/// nothing; the audit names the key; a restart keeps the token's record, the revocation
/// (still refused) and the audit.
#[tokio::test]
async fn an_issued_token_works_until_revoked_and_a_restart_keeps_everything() {
    let (up, hits) = upstream().await;
    let server = TestServer::start_with(|c| configure(c, &up)).await;
    let issued = issue(
        &server,
        json!({"project": "captionacc", "service": "prefect", "description": "Modal GPU workers token", "expiresInDays": 30}),
    )
    .await;
    let token = issued["token"].as_str().unwrap().to_owned();
    let jti = issued["jti"].as_str().unwrap().to_owned();
    assert_eq!(issued["project"], "captionacc");
    assert_eq!(issued["service"], "prefect");
    assert!(
        issued["expiresAt"].as_str().unwrap().ends_with('Z'),
        "{issued}"
    );
    // Exactly the claims of the replaced function's tokens, HS256.
    let claims = jsonwebtoken::decode::<Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256),
    )
    .unwrap()
    .claims;
    let mut names: Vec<&str> = claims
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["exp", "iat", "jti", "project", "service"]);
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        30 * 86_400
    );

    assert_eq!(
        use_token(&server, &token).await,
        (200, "from upstream".into())
    );
    let list = listed(&server, "").await;
    assert_eq!(jtis(&list), [jti.as_str()]);
    assert_eq!(list["tokens"][0]["description"], "Modal GPU workers token");

    let r = revoke(&server, &jti, "Token compromised").await;
    assert_eq!(
        (r["revoked"].clone(), r["alreadyRevoked"].clone()),
        (json!(true), json!(false))
    );
    assert_eq!(r["expiresAt"], issued["expiresAt"]);
    // Refused on this node at once: the answer came after the in-memory set had it.
    assert_eq!(
        use_token(&server, &token).await,
        (401, "token has been revoked".into())
    );
    let again = revoke(&server, &jti, "twice").await;
    assert_eq!(again["alreadyRevoked"], true);
    assert!(
        jtis(&listed(&server, "").await).is_empty(),
        "revoked tokens leave the list"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the upstream saw only the good request"
    );

    let records = audit(&server).await;
    assert_eq!(
        records.len(),
        2,
        "issue and one revocation (the repeat wrote nothing): {records:?}"
    );
    assert_eq!(records[0]["action"], "revoke");
    assert_eq!(records[0]["reason"], "Token compromised");
    assert_eq!(records[0]["project"], "captionacc");
    assert_eq!(records[1]["action"], "issue");
    assert_eq!(records[1]["description"], "Modal GPU workers token");
    for r in &records {
        assert_eq!(r["key"], ADMIN_NAME);
        assert_eq!(r["jti"], jti.as_str());
        assert!(
            !r.to_string().contains(ADMIN_KEY),
            "the key itself is never recorded"
        );
    }

    let second = issue(
        &server,
        json!({"project": "captionacc", "service": "prefect"}),
    )
    .await;
    let server = server.restart().await;
    assert_eq!(
        use_token(&server, &token).await.0,
        401,
        "a revoked token stays refused after a restart"
    );
    let second_token = second["token"].as_str().unwrap();
    assert_eq!(use_token(&server, second_token).await.0, 200);
    assert_eq!(
        jtis(&listed(&server, "").await),
        [second["jti"].as_str().unwrap()]
    );
    assert_eq!(audit(&server).await.len(), 3);
    server.stop().await;
}

/// A token minted by the replaced system (PyJWT, same secret) is accepted, and revoking
/// its jti here refuses it; the revocation is kept for 365 days, the longest lifetime.
#[tokio::test]
async fn a_token_minted_elsewhere_is_refused_once_its_jti_is_revoked() {
    let (up, hits) = upstream().await;
    let server = TestServer::start_with(|c| configure(c, &up)).await;
    let jti = "4a1c6a1e-5b7e-4f0e-9d55-0c1f1e9a1b2c";
    let token = pyjwt_token(SECRET, "captionacc", "prefect", Some(jti));
    assert_eq!(use_token(&server, &token).await.0, 200);
    let r = revoke(&server, jti, "issued by the old gateway").await;
    let until = time::OffsetDateTime::parse(
        r["expiresAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let days = (until - time::OffsetDateTime::now_utc()).whole_days();
    assert!((364..=365).contains(&days), "{r}");
    assert_eq!(
        use_token(&server, &token).await,
        (401, "token has been revoked".into())
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let records = audit(&server).await;
    assert_eq!(records[0]["jti"], jti);
    assert_eq!(
        (records[0]["project"].clone(), records[0]["service"].clone()),
        (Value::Null, Value::Null)
    );
    server.stop().await;
}

/// The listing shows active tokens only (never the token), newest first, by project,
/// paged; expiry is read from the injected clock.
#[tokio::test]
async fn the_listing_filters_by_project_pages_and_drops_revoked_and_expired_tokens() {
    let (up, _) = upstream().await;
    let clock = ManualClock::starting_now();
    let server = TestServer::start_with_clock(|c| configure(c, &up), &clock).await;
    let mut tokens = Vec::new();
    for (project, days) in [
        ("captionacc", 1),
        ("captionacc", 30),
        ("other", 30),
        ("captionacc", 30),
    ] {
        tokens.push(
            issue(
                &server,
                json!({"project": project, "service": "api", "expiresInDays": days}),
            )
            .await,
        );
        clock.advance(Duration::from_secs(1));
    }
    let jti = |i: usize| tokens[i]["jti"].as_str().unwrap().to_owned();
    let all = listed(&server, "").await;
    assert_eq!(jtis(&all), [jti(3), jti(2), jti(1), jti(0)], "newest first");
    for (i, t) in tokens.iter().enumerate() {
        assert!(
            !all.to_string().contains(t["token"].as_str().unwrap()),
            "token {i} shown"
        );
    }
    assert!(
        all["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.get("token").is_none())
    );
    assert_eq!(
        jtis(&listed(&server, "?project=captionacc").await),
        [jti(3), jti(1), jti(0)]
    );
    assert!(jtis(&listed(&server, "?project=nobody").await).is_empty());

    let first = listed(&server, "?project=captionacc&limit=2").await;
    assert_eq!(jtis(&first), [jti(3), jti(1)]);
    let after = first["next_after"].as_str().unwrap();
    let rest = listed(
        &server,
        &format!("?project=captionacc&limit=2&after={after}"),
    )
    .await;
    assert_eq!(jtis(&rest), [jti(0)]);
    assert!(rest["next_after"].is_null());

    revoke(&server, &jti(1), "rotated").await;
    assert_eq!(
        jtis(&listed(&server, "?project=captionacc").await),
        [jti(3), jti(0)]
    );
    clock.advance(Duration::from_secs(86_400));
    assert_eq!(
        jtis(&listed(&server, "?project=captionacc").await),
        [jti(3)],
        "the 1-day token expired"
    );
    server.stop().await;
}

/// Bad bodies and parameters are 4xx naming what is wrong; nothing is issued.
#[tokio::test]
async fn bad_requests_are_refused_naming_the_field() {
    let (up, _) = upstream().await;
    let server = TestServer::start_with(|c| configure(c, &up)).await;
    let good = json!({"project": "captionacc", "service": "prefect"});
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b
    };
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("project");
    for (body, status, names) in [
        (with("expiresInDays", json!(0)), 400, "expiresInDays"),
        (with("expiresInDays", json!(366)), 400, "expiresInDays"),
        (with("expiresInDays", json!("x")), 422, "expiresInDays"),
        (missing, 422, "project"),
        (with("service", json!(7)), 422, "service"),
        (with("project", json!("a b")), 400, "project"),
        (
            with("description", json!("d".repeat(1025))),
            400,
            "description",
        ),
        (with("unknown", json!(1)), 422, "unknown"),
    ] {
        let (s, v) = call(&server, ADMIN_KEY, "POST", "/tokens", body.clone()).await;
        assert_eq!(s, status, "{body}: {v}");
        assert!(v["detail"].as_str().unwrap().contains(names), "{body}: {v}");
    }
    for (query, names) in [
        ("?limit=0", "limit"),
        ("?after=nope", "after"),
        ("?offset=1", "offset"),
    ] {
        let (s, v) = call(
            &server,
            ADMIN_KEY,
            "GET",
            &format!("/tokens{query}"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 400, "{query}: {v}");
        assert!(
            v["detail"].as_str().unwrap().contains(names),
            "{query}: {v}"
        );
    }
    let (s, v) = call(
        &server,
        ADMIN_KEY,
        "GET",
        "/tokens/audit?after=x",
        Value::Null,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = call(&server, ADMIN_KEY, "POST", "/tokens/j1/revoke", json!({})).await;
    assert_eq!(s, 422, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("reason"), "{v}");
    let (s, v) = call(
        &server,
        ADMIN_KEY,
        "POST",
        "/tokens/j1/revoke",
        json!({"reason": ""}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let long = "j".repeat(129);
    let (s, v) = call(
        &server,
        ADMIN_KEY,
        "POST",
        &format!("/tokens/{long}/revoke"),
        json!({"reason": "r"}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("jti"), "{v}");
    assert!(jtis(&listed(&server, "").await).is_empty());
    assert!(
        audit(&server).await.is_empty(),
        "nothing refused was recorded"
    );
    server.stop().await;

    // Without GATEWAY_JWT_SECRET a token cannot be signed: 409 saying so.
    let server = TestServer::start_with(|c| {
        configure(c, &up);
        c.gateway_jwt_secret = None;
        c.routes.clear();
    })
    .await;
    let (s, v) = call(&server, ADMIN_KEY, "POST", "/tokens", good).await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("GATEWAY_JWT_SECRET"),
        "{v}"
    );
    server.stop().await;
}

/// Every token endpoint needs `tokens:admin`: 403 naming it for a key without it.
#[tokio::test]
async fn without_the_tokens_admin_scope_every_token_endpoint_is_403_naming_it() {
    let (up, _) = upstream().await;
    let server = TestServer::start_with(|c| configure(c, &up)).await;
    for (method, path, body) in [
        ("POST", "/tokens", json!({"project": "p", "service": "s"})),
        ("GET", "/tokens", Value::Null),
        ("POST", "/tokens/j1/revoke", json!({"reason": "r"})),
        ("GET", "/tokens/audit", Value::Null),
    ] {
        let (s, v) = call(&server, READER_KEY, method, path, body.clone()).await;
        assert_eq!(s, 403, "{method} {path}: {v}");
        assert!(
            v["detail"].as_str().unwrap().contains("'tokens:admin'"),
            "{v}"
        );
        let (s, _) = call(&server, "", method, path, body).await;
        assert_eq!(s, 403, "{method} {path} without a key");
    }
    assert!(audit(&server).await.is_empty());
    server.stop().await;
}

/// Revocations of expired tokens go by themselves: the purge runs at start and then
/// periodically, in the database and in memory; revocations of jtis not issued here stay
/// for 365 days.
#[tokio::test]
async fn revocations_of_expired_tokens_are_purged() {
    let (up, _) = upstream().await;
    let clock = ManualClock::starting_now();
    let server = TestServer::start_with_clock(|c| configure(c, &up), &clock).await;
    let short = issue(
        &server,
        json!({"project": "captionacc", "service": "prefect", "expiresInDays": 1}),
    )
    .await;
    revoke(&server, short["jti"].as_str().unwrap(), "done").await;
    revoke(&server, "minted-elsewhere", "old system").await;
    assert_eq!(server.proxy.revocations().len(), 2);
    assert_eq!(
        db_count(&server, "SELECT count(*) FROM token_revocations"),
        2
    );

    clock.advance(Duration::from_secs(2 * 86_400));
    let (pki, dir, config) = (
        server.pki.clone(),
        server.dir.clone(),
        server.config.clone(),
    );
    server.stop().await;
    let server = TestServer::start_in_with_clock(pki, dir, config, clock.clock())
        .await
        .unwrap();
    wait_for("the purge at start", || {
        server.proxy.revocations().len() == 1
    })
    .await;
    assert!(server.proxy.revocations().is_revoked("minted-elsewhere"));
    assert_eq!(
        db_count(&server, "SELECT count(*) FROM token_revocations"),
        1
    );
    assert_eq!(
        db_count(&server, "SELECT count(*) FROM api_tokens"),
        0,
        "the expired token went too"
    );
    assert_eq!(audit(&server).await.len(), 3, "the audit stays");
    server.stop().await;
}

/// The fixture was written by the version that kept install tokens in
/// `enrollment.json` (fixtures/upgrade/README.md): after the upgrade its unused token
/// registers, its used token still says used, its metadata is still shown, and the file
/// is renamed so it is never read again.
#[tokio::test]
async fn install_tokens_issued_before_the_upgrade_still_redeem_after_it() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/upgrade");
    let tokens: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("tokens.json")).unwrap())
            .unwrap();
    let legacy: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("enrollment.json")).unwrap())
            .unwrap();
    let issued_at = legacy["tokens"]
        .as_object()
        .unwrap()
        .values()
        .map(|t| t["created_at"].as_i64().unwrap())
        .max()
        .unwrap();
    let at = time::OffsetDateTime::from_unix_timestamp(issued_at + 3600).unwrap();
    let clock = ManualClock::new(at);

    let pki = Arc::new(TestPki::new());
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = test_config(&pki, dir.path(), |_| {});
    std::fs::create_dir_all(&config.data_dir).unwrap();
    std::fs::copy(
        fixtures.join("enrollment.json"),
        config.data_dir.join("enrollment.json"),
    )
    .unwrap();
    // The store directory of the old version, with the certificate registered before.
    std::fs::create_dir_all(&config.store.dir).unwrap();
    std::fs::write(
        config.store.dir.join("upgrade-used.pem"),
        tokens["used_certificate_pem"].as_str().unwrap(),
    )
    .unwrap();
    let server =
        TestServer::start_in_with_clock(pki.clone(), dir.clone(), config.clone(), clock.clock())
            .await
            .unwrap();
    assert!(!config.data_dir.join("enrollment.json").exists());
    assert!(config.data_dir.join("enrollment.json.migrated").exists());

    let valid_then = |id: &str| {
        pki.agent_with(
            id,
            AgentOpts {
                cn: None,
                not_before: at - time::Duration::days(1),
                not_after: at + time::Duration::days(30),
            },
        )
    };
    let unused = valid_then("upgrade-unused");
    let (s, v) = register(&server, &tokens["unused"], &unused).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["agent_id"], "upgrade-unused");
    let used = valid_then("upgrade-used");
    let (s, v) = register(&server, &tokens["used"], &used).await;
    assert_eq!(
        (s, v["detail"].as_str().unwrap()),
        (401, "install token has already been used")
    );
    let (s, v) = call(&server, API_KEY, "GET", "/agents/upgrade-used", Value::Null).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["metadata"], json!({"site": "plant-4", "rack": 7}));

    // The next start reads the database only.
    server.stop().await;
    let server = TestServer::start_in_with_clock(pki, dir, config, clock.clock())
        .await
        .unwrap();
    let (s, v) = register(&server, &tokens["unused"], &unused).await;
    assert_eq!(
        (s, v["detail"].as_str().unwrap()),
        (401, "install token has already been used")
    );
    let (_, v) = call(&server, API_KEY, "GET", "/agents/upgrade-used", Value::Null).await;
    assert_eq!(v["metadata"]["site"], "plant-4");
    server.stop().await;
}

/// `POST /agent/register` with `issued` (an answer of `POST /install-tokens`) for `agent`.
async fn register(server: &TestServer, issued: &Value, agent: &AgentCert) -> (u16, Value) {
    let body = json!({"install_token": issued["install_token"], "agent_id": agent.agent_id,
        "certificate": agent.cert_pem});
    call(server, "", "POST", "/agent/register", body).await
}

async fn cluster_node(pki: &Arc<TestPki>, redis: &str, node_id: &str, up: &str) -> TestServer {
    cluster_node_in(pki, redis, node_id, up, ClusterMode::Standalone).await
}

async fn cluster_node_in(
    pki: &Arc<TestPki>,
    redis: &str,
    node_id: &str,
    up: &str,
    mode: ClusterMode,
) -> TestServer {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = test_config(pki, dir.path(), |c| {
        configure(c, up);
        c.cluster = Some(RawCluster {
            redis_url: Some(redis.to_owned()),
            node_id: Some(node_id.to_owned()),
            mode,
            ..RawCluster::default()
        });
    });
    TestServer::start_in(pki.clone(), dir, config)
        .await
        .unwrap()
}

/// Two nodes on one Redis: a token issued on A works on B; revoked on A it is refused
/// on A at once and on B within the issue's one second; both list and audit the same; a
/// node started later loads the revocations; PyJWT tokens revoke across nodes too.
#[tokio::test]
async fn a_revocation_reaches_every_node_within_a_second() {
    let redis = RedisServer::start();
    let (up, _) = upstream().await;
    let pki = Arc::new(TestPki::new());
    let a = cluster_node(&pki, &redis.url(), "node-a", &up).await;
    let b = cluster_node(&pki, &redis.url(), "node-b", &up).await;
    let issued = issue(
        &a,
        json!({"project": "captionacc", "service": "prefect", "description": "shared"}),
    )
    .await;
    let token = issued["token"].as_str().unwrap();
    let jti = issued["jti"].as_str().unwrap();
    assert_eq!(use_token(&b, token).await.0, 200);
    assert_eq!(jtis(&listed(&b, "?project=captionacc").await), [jti]);

    revoke(&a, jti, "leaked").await;
    assert_eq!(use_token(&a, token).await.0, 401);
    let revoked_at = Instant::now();
    while !b.proxy.revocations().is_revoked(jti) {
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "node B did not hear of the revocation within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        use_token(&b, token).await,
        (401, "token has been revoked".into())
    );
    assert!(jtis(&listed(&b, "").await).is_empty());
    let records = audit(&b).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(
        (records[0]["action"].as_str(), records[0]["key"].as_str()),
        (Some("revoke"), Some(ADMIN_NAME))
    );
    assert_eq!(records[1]["description"], "shared");
    // Paged newest first by the stream id.
    let (_, one) = call(&b, ADMIN_KEY, "GET", "/tokens/audit?limit=1", Value::Null).await;
    let after = one["next_after"].as_str().unwrap();
    let (_, rest) = call(
        &b,
        ADMIN_KEY,
        "GET",
        &format!("/tokens/audit?after={after}"),
        Value::Null,
    )
    .await;
    assert_eq!(rest["records"][0]["action"], "issue");
    assert!(rest["next_after"].is_null());

    let old = pyjwt_token(SECRET, "captionacc", "prefect", Some("old-system-jti"));
    assert_eq!(use_token(&a, &old).await.0, 200);
    revoke(&b, "old-system-jti", "old").await;
    wait_for("node A to hear of the second revocation", || {
        a.proxy.revocations().is_revoked("old-system-jti")
    })
    .await;
    assert_eq!(use_token(&a, &old).await.0, 401);

    // A node that starts now loads the set from Redis.
    let c = cluster_node(&pki, &redis.url(), "node-c", &up).await;
    assert_eq!(use_token(&c, token).await.0, 401);
    assert_eq!(use_token(&c, &old).await.0, 401);
    assert_eq!(redis.cli(&["HLEN", "agentgate:{state}:revoked"]), "2");
    assert!(
        !a.config.data_dir.join("agentgate.db").exists(),
        "a node of a cluster keeps no database"
    );
    for node in [a, b, c] {
        node.stop().await;
    }
}

/// Redis down: every token operation is a 503 with a detail, and nothing is half-written
/// (no token record, no audit entry, no revocation in memory); once Redis is back the
/// same requests succeed.
#[tokio::test]
async fn redis_down_is_503_and_nothing_is_half_written() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes"]);
    let (up, _) = upstream().await;
    let pki = Arc::new(TestPki::new());
    let a = cluster_node(&pki, &redis.url(), "node-a", &up).await;
    let before = issue(&a, json!({"project": "captionacc", "service": "prefect"})).await;
    redis.kill();
    let body = json!({"project": "captionacc", "service": "prefect", "description": "while down"});
    let (s, v) = call(&a, ADMIN_KEY, "POST", "/tokens", body).await;
    assert_eq!(s, 503, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("Redis"), "{v}");
    let jti = before["jti"].as_str().unwrap();
    let (s, v) = call(
        &a,
        ADMIN_KEY,
        "POST",
        &format!("/tokens/{jti}/revoke"),
        json!({"reason": "r"}),
    )
    .await;
    assert_eq!(s, 503, "{v}");
    assert!(
        !a.proxy.revocations().is_revoked(jti),
        "not revoked in memory when not stored"
    );
    assert_eq!(
        use_token(&a, before["token"].as_str().unwrap()).await.0,
        200,
        "the JWT check needs no Redis"
    );
    for path in ["/tokens", "/tokens/audit"] {
        let (s, v) = call(&a, ADMIN_KEY, "GET", path, Value::Null).await;
        assert_eq!(s, 503, "{path}: {v}");
    }

    redis.restart();
    let deadline = Instant::now() + common::cluster::PROPAGATION_BOUND;
    let list = loop {
        let (s, v) = call(&a, ADMIN_KEY, "GET", "/tokens", Value::Null).await;
        if s == 200 {
            break v;
        }
        assert!(Instant::now() < deadline, "Redis never came back: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(jtis(&list), [jti], "the refused issue left no token");
    assert_eq!(audit(&a).await.len(), 1, "and no audit entry");
    assert_eq!(redis.cli(&["HLEN", "agentgate:{state}:revoked"]), "0");
    revoke(&a, jti, "now").await;
    assert_eq!(
        use_token(&a, before["token"].as_str().unwrap()).await.0,
        401
    );
    a.stop().await;
}

/// On a Redis Cluster (every key in the `{state}` slot, sharded pub/sub): issue, paged
/// listing, revocation reaching the other node, audit.
#[tokio::test]
async fn tokens_work_on_a_redis_cluster() {
    let redis = common::redis::RedisCluster::start();
    let seed = redis.urls()[1].clone();
    let (up, _) = upstream().await;
    let pki = Arc::new(TestPki::new());
    let a = cluster_node_in(&pki, &seed, "node-a", &up, ClusterMode::Cluster).await;
    let b = cluster_node_in(&pki, &seed, "node-b", &up, ClusterMode::Cluster).await;
    let mut issued = Vec::new();
    for _ in 0..3 {
        issued.push(issue(&a, json!({"project": "captionacc", "service": "prefect"})).await);
    }
    let jti = |i: usize| issued[i]["jti"].as_str().unwrap().to_owned();
    let first = listed(&b, "?limit=2").await;
    let after = first["next_after"].as_str().unwrap();
    let rest = listed(&b, &format!("?limit=2&after={after}")).await;
    let mut seen = jtis(&first);
    seen.extend(jtis(&rest));
    let mut all = vec![jti(0), jti(1), jti(2)];
    all.sort();
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, all, "each token once over the pages: {seen:?}");
    assert!(rest["next_after"].is_null());

    revoke(&b, &jti(1), "leaked").await;
    wait_for("node A to hear of the revocation", || {
        a.proxy.revocations().is_revoked(&jti(1))
    })
    .await;
    assert_eq!(
        use_token(&a, issued[1]["token"].as_str().unwrap()).await.0,
        401
    );
    assert_eq!(
        use_token(&a, issued[0]["token"].as_str().unwrap()).await.0,
        200
    );
    assert_eq!(listed(&a, "").await["tokens"].as_array().unwrap().len(), 2);
    assert_eq!(audit(&a).await.len(), 4);
    a.stop().await;
    b.stop().await;
}

/// Concurrent registrations with one install token on one node: the database runs their
/// transactions one after the other, so exactly one stores its certificate.
#[tokio::test]
async fn concurrent_redemptions_of_one_install_token_store_exactly_one_certificate() {
    let server = Arc::new(TestServer::start().await);
    let (s, issued) = call(
        &server,
        API_KEY,
        "POST",
        "/install-tokens",
        json!({"agent_id": "race-1"}),
    )
    .await;
    assert_eq!(s, 200, "{issued}");
    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let (server, issued) = (server.clone(), issued.clone());
            tokio::spawn(async move {
                let agent = server.pki.agent("race-1");
                register(&server, &issued, &agent).await
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for attempt in attempts {
        let (s, v) = attempt.await.unwrap();
        if s != 200 {
            assert_eq!(v["detail"], "install token has already been used", "{v}");
        }
        statuses.push(s);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 401, 401, 401, 401, 401, 401, 401]);
    assert_eq!(server.store.len(), 1);
}
