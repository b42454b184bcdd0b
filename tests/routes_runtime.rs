//! Routes registered at runtime (issue 10, point 1): `POST /routes`, `PUT`/`DELETE
//! /routes/{name}` against real upstream servers on loopback; validation by the config's
//! rules (422 naming the field, nothing stored), conflicts (409), the scope, and with
//! `[cluster]` a route shared by every node through Redis, and Redis down (503, nothing
//! half-written). Restarts and SIGHUP with the real binary are in `gateway_process.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test stops loudly on failure

mod common;

use std::sync::Arc;
use std::time::Instant;

use agentgate::config::{ClusterMode, RawApiKey, RawApiKeyEntry, RawConfig, RawRoute};
use serde_json::{Value, json};

use common::cluster::{start_node, wait_for};
use common::redis::{RedisCluster, RedisServer};
use common::*;

/// A config route `files` on `/files`, beside which runtime routes are registered.
fn with_config_route(upstream: &str) -> impl FnOnce(&mut RawConfig) {
    let route: RawRoute = serde_json::from_value(json!({
        "name": "files", "prefix": "/files", "upstreams": [upstream], "auth": "none"
    }))
    .unwrap();
    move |c| c.routes = vec![route]
}

fn spec(name: &str, prefix: &str, upstream: &str) -> Value {
    json!({
        "name": name, "prefix": prefix, "upstreams": [upstream],
        "strip_prefix": true, "auth": "none"
    })
}

/// `GET path` without a key; `(status, body)`.
async fn get(server: &TestServer, path: &str) -> (u16, Value) {
    let mut conn = server.http(None).await.unwrap();
    let r = conn.send("GET", path, &[], "").await.unwrap();
    (r.status, r.json())
}

fn detail(body: &Value) -> &str {
    body["detail"].as_str().unwrap_or_default()
}

/// `method path` with the API key must answer `status` with a detail that says `says`.
async fn refused(
    server: &TestServer,
    method: &str,
    path: &str,
    body: Option<Value>,
    status: u16,
    says: &str,
) {
    let (got, answer) = server.api(method, path, body.clone()).await;
    assert_eq!(got, status, "{method} {path} {body:?} -> {answer}");
    assert!(
        detail(&answer).contains(says),
        "{method} {path} {body:?}: the detail does not say {says:?}: {answer}"
    );
}

/// The routes of `GET /routes` as `(name, source)`.
async fn listed(server: &TestServer) -> Vec<(String, String)> {
    let (status, body) = server.api("GET", "/routes", None).await;
    assert_eq!(status, 200, "{body}");
    let mut routes: Vec<(String, String)> = body["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["source"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    routes.sort();
    routes
}

/// Rows of the single node's database table `routes` (read beside the running gateway;
/// WAL lets a second reader in).
fn stored_rows(server: &TestServer) -> i64 {
    let db = rusqlite::Connection::open(server.config.data_dir.join("agentgate.db")).unwrap();
    db.query_row("SELECT count(*) FROM routes", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn a_posted_route_is_proxied_with_strip_prefix_listed_replaced_and_deleted() {
    let up = echo_upstream().await;
    let other = echo_upstream().await;
    let server = TestServer::start_with(with_config_route(&up)).await;
    assert_eq!(get(&server, "/svc/x").await.0, 404);

    let (status, body) = server
        .api("POST", "/routes", Some(spec("svc", "/svc/", &up)))
        .await;
    assert_eq!(status, 201, "{body}");
    // The route as stored: the prefix in its canonical form, the defaults filled in.
    assert_eq!(body["prefix"], "/svc");
    assert_eq!(body["source"], "runtime");
    assert_eq!(body["timeout_ms"], 30000);
    assert_eq!(body["upstreams"][0]["url"], up.as_str());
    let (status, body) = get(&server, "/svc/x/y?q=1").await;
    assert_eq!(
        (status, body["path"].clone()),
        (200, json!("/x/y")),
        "{body}"
    );
    assert_eq!(
        listed(&server).await,
        vec![
            ("files".to_owned(), "config".to_owned()),
            ("svc".to_owned(), "runtime".to_owned())
        ]
    );
    assert_eq!(stored_rows(&server), 1);

    // PUT replaces a runtime route (200) or creates one (201); the name may come from
    // the path alone.
    let mut replaced = spec("svc", "/svc", &other);
    replaced["strip_prefix"] = json!(false);
    let (status, body) = server.api("PUT", "/routes/svc", Some(replaced)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["upstreams"][0]["url"], other.as_str());
    let (status, body) = get(&server, "/svc/x").await;
    assert_eq!((status, body["path"].clone()), (200, json!("/svc/x")));
    // The health gauge follows the table: the replaced upstream's series went.
    let gauge = |upstream: &str| {
        format!("agentgate_upstream_healthy{{route=\"svc\",upstream=\"{upstream}\"}} 1")
    };
    let metrics = get(&server, "/metrics").await.1;
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains(&gauge(&other)), "{metrics}");
    assert!(!metrics.contains(&gauge(&up)), "{metrics}");
    let mut nameless = spec("ignored", "/svc2", &up);
    nameless.as_object_mut().unwrap().remove("name");
    let (status, body) = server.api("PUT", "/routes/svc2", Some(nameless)).await;
    assert_eq!(
        (status, body["name"].clone()),
        (201, json!("svc2")),
        "{body}"
    );
    assert_eq!(get(&server, "/svc2/z").await.1["path"], "/z");

    let (status, _) = server.api("DELETE", "/routes/svc", None).await;
    assert_eq!(status, 204);
    let (status, body) = get(&server, "/svc/x").await;
    assert_eq!((status, detail(&body)), (404, "Not Found"));
    let metrics = get(&server, "/metrics").await.1;
    assert!(
        !metrics
            .as_str()
            .unwrap()
            .contains("agentgate_upstream_healthy{route=\"svc\""),
        "{metrics}"
    );
    let (status, body) = server.api("DELETE", "/routes/svc", None).await;
    assert_eq!(status, 404, "{body}");
    assert!(detail(&body).contains("svc"), "{body}");
    assert_eq!(stored_rows(&server), 1, "svc2 is left");
    // The config route was never touched.
    assert_eq!(get(&server, "/files/a").await.1["path"], "/files/a");
    server.stop().await;
}

#[tokio::test]
async fn invalid_bodies_are_422_naming_the_field_and_nothing_is_stored() {
    let up = echo_upstream().await;
    let server = TestServer::start_with(with_config_route(&up)).await;
    let with = |field: &str, value: Value| {
        let mut body = spec("bad", "/bad", &up);
        body[field] = value;
        body
    };
    let mut no_name = spec("bad", "/bad", &up);
    no_name.as_object_mut().unwrap().remove("name");
    let cases = [
        (
            with("upstreams", json!(["ftp://127.0.0.1:1"])),
            "upstreams[0]",
        ),
        (
            with("upstreams", json!([up.clone(), "not a url"])),
            "upstreams[1]",
        ),
        (with("upstreams", json!([])), "upstreams"),
        (with("prefix", json!("/agents/x")), "prefix"),
        (with("prefix", json!("/a/../b")), "prefix"),
        (with("auth", json!("magic")), "auth"),
        // `auth = "jwt"` without any JWT key configured: the config's rule.
        (with("auth", json!("jwt")), "auth"),
        (with("timeout_ms", json!(0)), "timeout_ms"),
        (with("timeout_ms", json!("soon")), "timeout_ms"),
        (with("scope", json!("proxy")), "scope"),
        (with("claims", json!({"project": ["a"]})), "claims"),
        (
            with("health_check", json!({"path": "health"})),
            "health_check.path",
        ),
        (with("name", json!("has space")), "name"),
        (no_name, "name"),
        (with("colour", json!("blue")), "colour"),
    ];
    for (body, field) in cases {
        refused(&server, "POST", "/routes", Some(body.clone()), 422, field).await;
        // PUT checks the same way (a body without a name takes the path's, so that case
        // is a valid PUT and left out here).
        if body.get("name").is_some() {
            refused(&server, "PUT", "/routes/bad", Some(body), 422, field).await;
        }
    }
    // A name in the body that is not the path's.
    let other = Some(spec("bad", "/bad", &up));
    refused(&server, "PUT", "/routes/other", other, 422, "name").await;
    for body in ["[]", "not json", ""] {
        let mut conn = server.http(None).await.unwrap();
        let auth = format!("Bearer {API_KEY}");
        let r = conn
            .send("POST", "/routes", &[("authorization", &auth)], body)
            .await
            .unwrap();
        assert_eq!(r.status, 422, "{body:?}: {}", r.text());
    }
    assert_eq!(stored_rows(&server), 0);
    assert_eq!(
        listed(&server).await,
        vec![("files".to_owned(), "config".to_owned())]
    );
    server.stop().await;
}

#[tokio::test]
async fn taken_names_and_prefixes_and_config_routes_are_409() {
    let up = echo_upstream().await;
    let server = TestServer::start_with(with_config_route(&up)).await;
    let (status, _) = server
        .api("POST", "/routes", Some(spec("svc", "/svc", &up)))
        .await;
    assert_eq!(status, 201);
    let conflicts = [
        // The same name again: POST does not replace.
        (spec("svc", "/elsewhere", &up), "already exists"),
        // The same prefix, written differently.
        (spec("svc-2", "/svc/", &up), "\"svc\""),
        // A config route's name or prefix.
        (spec("files", "/f2", &up), "configuration file"),
        (spec("files-2", "/files", &up), "\"files\""),
    ];
    for (body, says) in conflicts {
        refused(&server, "POST", "/routes", Some(body), 409, says).await;
    }
    let files = Some(spec("files", "/files", &up));
    refused(
        &server,
        "PUT",
        "/routes/files",
        files,
        409,
        "configuration file",
    )
    .await;
    refused(
        &server,
        "DELETE",
        "/routes/files",
        None,
        409,
        "configuration file",
    )
    .await;
    // PUT of another runtime route onto a taken prefix.
    let taken = Some(spec("svc-3", "/svc", &up));
    refused(&server, "PUT", "/routes/svc-3", taken, 409, "\"svc\"").await;
    assert_eq!(stored_rows(&server), 1);
    assert_eq!(get(&server, "/files/x").await.1["path"], "/files/x");
    assert_eq!(get(&server, "/svc/x").await.1["path"], "/x");
    server.stop().await;
}

#[tokio::test]
async fn a_key_without_the_routes_admin_scope_gets_403_naming_it() {
    let up = echo_upstream().await;
    let reader = "reader-key-0123456789";
    let server = TestServer::start_with(|c| {
        c.api_keys.push(RawApiKey::Entry(RawApiKeyEntry {
            name: "reader".into(),
            key: Some(reader.into()),
            sha256: None,
            scopes: vec!["agents:read".into()],
        }));
    })
    .await;
    let auth = format!("Bearer {reader}");
    let body = spec("svc", "/svc", &up).to_string();
    for (method, path, body) in [
        ("GET", "/routes", ""),
        ("POST", "/routes", body.as_str()),
        ("PUT", "/routes/svc", body.as_str()),
        ("DELETE", "/routes/svc", ""),
    ] {
        let mut conn = server.http(None).await.unwrap();
        let r = conn
            .send(method, path, &[("authorization", &auth)], body)
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        assert!(
            detail(&r.json()).contains("routes:admin"),
            "{method} {path}: {}",
            r.text()
        );
    }
    assert_eq!(stored_rows(&server), 0);
    assert_eq!(get(&server, "/svc/x").await.0, 404);
    server.stop().await;
}

/// Polls `node`'s route table (no request, no Redis) until `name` is in it or not, and
/// prints how long that took (the propagation from the node that answered, when called
/// right after another node's answer).
async fn wait_route(node: &TestServer, name: &str, present: bool) {
    let what = format!(
        "route {name} {} on {}",
        if present { "served" } else { "gone" },
        node.addr
    );
    let started = Instant::now();
    wait_for(&what, || {
        node.proxy.describe().iter().any(|r| r.name == name) == present
    })
    .await;
    eprintln!("{what} after {:?}", started.elapsed());
}

/// Nodes A and B on one Redis (`seed`, `mode`): a route added on A serves on B, B refuses
/// its name and prefix as A would, a node C started later serves it at once (the load at
/// start), and a delete on B stops it on A and C.
async fn a_route_is_shared_by_every_node(seed: &str, mode: ClusterMode) {
    let pki = Arc::new(TestPki::new());
    let up = echo_upstream().await;
    let a = start_node(&pki, seed, "node-a", mode).await;
    let b = start_node(&pki, seed, "node-b", mode).await;

    let (status, body) = a
        .api("POST", "/routes", Some(spec("svc", "/svc", &up)))
        .await;
    assert_eq!(status, 201, "{body}");
    // Served on A as it answers.
    assert_eq!(get(&a, "/svc/x").await.1["path"], "/x");
    wait_route(&b, "svc", true).await;
    let (status, body) = get(&b, "/svc/x").await;
    assert_eq!((status, body["path"].clone()), (200, json!("/x")), "{body}");
    let same_name = Some(spec("svc", "/o", &up));
    refused(&b, "POST", "/routes", same_name, 409, "already exists").await;
    let same_prefix = Some(spec("svc-b", "/svc", &up));
    refused(&b, "POST", "/routes", same_prefix, 409, "\"svc\"").await;
    let c = start_node(&pki, seed, "node-c", mode).await;
    assert_eq!(get(&c, "/svc/y").await.1["path"], "/y");

    let (status, _) = b.api("DELETE", "/routes/svc", None).await;
    assert_eq!(status, 204);
    assert_eq!(get(&b, "/svc/x").await.0, 404);
    wait_route(&a, "svc", false).await;
    let (status, body) = get(&a, "/svc/x").await;
    assert_eq!((status, detail(&body)), (404, "Not Found"));
    wait_route(&c, "svc", false).await;
    for node in [a, b, c] {
        node.stop().await;
    }
}

#[tokio::test]
async fn with_cluster_a_route_added_on_one_node_serves_on_the_others_and_a_delete_stops_it() {
    let redis = RedisServer::start();
    a_route_is_shared_by_every_node(&redis.url(), ClusterMode::Standalone).await;
    assert_eq!(redis.cli(&["HLEN", "agentgate:{state}:routes"]), "0");
}

#[tokio::test]
async fn on_a_three_shard_redis_cluster_a_route_is_shared_the_same_way() {
    let redis = RedisCluster::start();
    a_route_is_shared_by_every_node(&redis.urls()[1], ClusterMode::Cluster).await;
}

/// A node on a persistent Redis with the runtime route `name` on `/<name>`, then Redis
/// killed; returns Redis (to restart), the node and the upstream's URL.
async fn node_with_route_then_redis_killed(name: &str) -> (RedisServer, TestServer, String) {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes"]);
    let pki = Arc::new(TestPki::new());
    let up = echo_upstream().await;
    let node = start_node(&pki, &redis.url(), "node-a", ClusterMode::Standalone).await;
    let prefix = format!("/{name}");
    let (status, body) = node
        .api("POST", "/routes", Some(spec(name, &prefix, &up)))
        .await;
    assert_eq!(status, 201, "{body}");
    redis.kill();
    (redis, node, up)
}

/// Changes a node missed (Redis restored with other routes while it was cut off) arrive
/// with the resync after the reconnection: a route added is served, a route removed is not.
#[tokio::test]
async fn with_cluster_route_changes_missed_during_an_outage_arrive_with_the_resync() {
    let (mut redis, node, up) = node_with_route_then_redis_killed("gone").await;
    let missed = format!("1000:{}", spec("missed", "/missed", &up));
    redis.edit_offline(|port| {
        common::redis::cli_at(port, &["HDEL", "agentgate:{state}:routes", "gone"]);
        common::redis::cli_at(port, &["SET", "agentgate:{state}:seq", "1000"]);
        common::redis::cli_at(
            port,
            &["HSET", "agentgate:{state}:routes", "missed", &missed],
        );
    });
    redis.restart();
    wait_route(&node, "missed", true).await;
    wait_route(&node, "gone", false).await;
    assert_eq!(get(&node, "/missed/x").await.1["path"], "/x");
    assert_eq!(get(&node, "/gone/x").await.0, 404);
    node.stop().await;
}

#[tokio::test]
async fn with_cluster_redis_down_is_503_and_nothing_is_half_written() {
    let (mut redis, node, up) = node_with_route_then_redis_killed("kept").await;
    let svc = Some(spec("svc", "/svc", &up));
    refused(&node, "POST", "/routes", svc, 503, "Redis").await;
    refused(&node, "DELETE", "/routes/kept", None, 503, "Redis").await;
    // Invalid input is still a 422, not a 503: it never reaches Redis.
    let reserved = Some(spec("x", "/agents", &up));
    refused(&node, "POST", "/routes", reserved, 422, "prefix").await;
    // The node goes on serving what it has.
    assert_eq!(get(&node, "/kept/x").await.1["path"], "/x");
    assert_eq!(get(&node, "/svc/x").await.0, 404);

    redis.restart();
    assert_eq!(redis.cli(&["HKEYS", "agentgate:{state}:routes"]), "kept");
    // Once the node is reconnected the same request goes through.
    let deadline = Instant::now() + common::cluster::PROPAGATION_BOUND;
    loop {
        let (status, body) = node
            .api("POST", "/routes", Some(spec("svc", "/svc", &up)))
            .await;
        if status == 201 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "never reconnected: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(get(&node, "/svc/x").await.1["path"], "/x");
    assert_eq!(get(&node, "/kept/x").await.1["path"], "/x");
    node.stop().await;
}
