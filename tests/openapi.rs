//! The OpenAPI document against the running gateway: every documented operation is routed
//! with the documented security and methods, and real responses (good and bad input, every
//! operation) have a documented status and a body that validates against its schema.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use agentgate::config::ClusterMode;
use common::cluster::{PROPAGATION_BOUND, start_node};
use common::redis::RedisServer;
use common::*;
use serde_json::{Value, json};

/// Every `(method, path)` of the document, upper-case method, with whether it names the
/// Bearer scheme.
fn operations(doc: &Value) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if !["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                continue;
            }
            let secured = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("api_key").is_some()));
            out.push((method.to_uppercase(), path.clone(), secured));
        }
    }
    out
}

async fn fetch_document(server: &TestServer) -> Value {
    let r = request(server, "GET", "/openapi.json", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["openapi"], "3.1.0");
    doc
}

/// A request path for a documented path: `{agent_id}` (and `{jti}`, a route's `{name}`) filled in.
fn concrete(path: &str, agent_id: &str) -> String {
    path.replace("{agent_id}", agent_id)
        .replace("{jti}", agent_id)
        .replace("{name}", agent_id)
}

/// Is this the router's fallback (no route for the path) rather than a handler's 404?
fn is_fallback(r: &HttpResponse) -> bool {
    r.status == 404 && r.json()["detail"] == "Not Found"
}

/// Every operation of the document reaches a handler, behind the API key exactly when
/// the document says so; each documented path answers exactly the documented methods
/// (the `Allow` of a 405); and `/metrics` is documented exactly where it is routed.
#[tokio::test]
async fn the_document_and_the_router_list_the_same_endpoints() {
    for separate_metrics in [false, true] {
        let server = TestServer::start_with(|c| {
            if separate_metrics {
                c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
            }
        })
        .await;
        let doc = fetch_document(&server).await;
        let ops = operations(&doc);
        // The API as of this test: a document that lost its paths must not pass.
        assert!(ops.len() >= 14, "{ops:?}");
        // Client generators name their functions after operationId, which must be unique
        // (OpenAPI 3.1 §4.8.10): utoipa's default is the handler's name (`list` twice).
        let mut ids = BTreeSet::new();
        for (method, path, _) in &ops {
            let op = &doc["paths"][path][method.to_lowercase()];
            let id = op["operationId"].as_str().unwrap_or_default();
            assert!(
                ids.insert(id.to_owned()),
                "{method} {path}: operationId '{id}' repeats"
            );
            assert!(op["summary"].is_string(), "{method} {path} has no summary");
        }
        let auth = format!("Bearer {API_KEY}");
        let mut methods: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (method, path, secured) in &ops {
            methods
                .entry(path.clone())
                .or_default()
                .insert(method.clone());
            let real = concrete(path, "never-seen-agent");
            let body = if method == "POST" { "{}" } else { "" };
            let anonymous = request(&server, method, &real, &[], body).await;
            let keyed = request(&server, method, &real, &[("authorization", &auth)], body).await;
            for r in [&anonymous, &keyed] {
                assert!(
                    !is_fallback(r) && r.status != 405,
                    "{method} {path} is documented but not routed: {} {}",
                    r.status,
                    r.text()
                );
            }
            if *secured {
                assert_eq!(
                    anonymous.status,
                    403,
                    "{method} {path}: {}",
                    anonymous.text()
                );
                assert!(
                    anonymous.json()["detail"]
                        .as_str()
                        .unwrap()
                        .starts_with("Not authenticated"),
                    "{method} {path}: {}",
                    anonymous.text()
                );
                assert_ne!(keyed.status, 403, "{method} {path}: {}", keyed.text());
            } else {
                assert_ne!(
                    anonymous.status,
                    403,
                    "{method} {path} is documented without the API key but refuses requests without one: {}",
                    anonymous.text()
                );
            }
        }
        for (path, documented) in &methods {
            // No endpoint answers PATCH: the 405 lists what the router has on this path.
            let r = request(
                &server,
                "PATCH",
                &concrete(path, "a1"),
                &[("authorization", &auth)],
                "",
            )
            .await;
            assert_eq!(r.status, 405, "PATCH {path}: {}", r.text());
            let allow = r.headers["allow"].to_str().unwrap();
            let routed: BTreeSet<String> = allow
                .split(',')
                .map(|m| m.trim().to_owned())
                // axum answers HEAD wherever it answers GET.
                .filter(|m| m != "HEAD")
                .collect();
            assert_eq!(&routed, documented, "{path}: Allow: {allow}");
        }
        let metrics = request(&server, "GET", "/metrics", &[], "").await;
        assert_eq!(
            methods.contains_key("/metrics"),
            !separate_metrics,
            "/metrics documented: {:?}",
            methods.keys()
        );
        assert_eq!(metrics.status == 200, !separate_metrics);
        server.stop().await;
    }
}

/// The schema of `status`'s response of `method path`, `None` when the response has no
/// body; panics when the document does not list that status for the operation.
fn response_schema(doc: &Value, method: &str, path: &str, status: u16) -> Option<(String, Value)> {
    let op = &doc["paths"][path][method.to_lowercase()];
    assert!(op.is_object(), "{method} {path} is not documented");
    let response = &op["responses"][status.to_string()];
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which the document does not list for it: {}",
        op["responses"]
    );
    let content = response["content"].as_object()?;
    let (media, schema) = content.iter().next().expect("one media type");
    Some((media.clone(), schema["schema"].clone()))
}

/// The document's schemas, each object closed (`additionalProperties: false`) unless it
/// says otherwise, so that a field a handler adds without documenting it fails too.
fn closed_components(doc: &Value) -> Value {
    let mut components = doc["components"].clone();
    fn close(v: &mut Value) {
        match v {
            Value::Object(o) => {
                if o.get("type") == Some(&json!("object"))
                    && o.contains_key("properties")
                    && !o.contains_key("additionalProperties")
                {
                    o.insert("additionalProperties".into(), json!(false));
                }
                o.values_mut().for_each(close);
            }
            Value::Array(a) => a.iter_mut().for_each(close),
            _ => {}
        }
    }
    close(&mut components["schemas"]);
    components
}

/// Checks one real response against the document: a documented status, the documented
/// media type, and a body valid under the schema.
fn check(doc: &Value, components: &Value, method: &str, path: &str, r: &HttpResponse) {
    let Some((media, schema)) = response_schema(doc, method, path, r.status) else {
        assert!(
            r.body.is_empty(),
            "{method} {path} {}: documented without a body: {}",
            r.status,
            r.text()
        );
        return;
    };
    let content_type = r
        .headers
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let essence = |m: &str| m.split(';').next().unwrap_or("").trim().to_owned();
    assert_eq!(
        essence(&content_type),
        essence(&media),
        "{method} {path} {}",
        r.status
    );
    let instance = if media.starts_with("application/json") {
        serde_json::from_slice(&r.body).unwrap_or_else(|e| {
            panic!("{method} {path} {}: not JSON ({e}): {}", r.status, r.text())
        })
    } else {
        Value::String(r.text())
    };
    let root = json!({ "allOf": [schema], "components": components });
    let validator = jsonschema::draft202012::new(&root)
        .unwrap_or_else(|e| panic!("{method} {path}: the document's schema is invalid: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {}: {errors:?}\nbody: {instance:#}",
        r.status
    );
}

/// Sends requests to one gateway, checks each response against the document, and
/// records which statuses each operation answered.
struct Calls<'a> {
    server: &'a TestServer,
    doc: &'a Value,
    components: &'a Value,
    seen: BTreeMap<(String, String), BTreeSet<u16>>,
}

impl Calls<'_> {
    /// `method path` (an instance of the documented `doc_path`) must answer `want`, with
    /// a response the document allows.
    async fn call(
        &mut self,
        method: &str,
        doc_path: &str,
        path: impl AsRef<str>,
        headers: &[(&str, &str)],
        body: impl AsRef<str>,
        want: u16,
    ) -> HttpResponse {
        let path = path.as_ref();
        let r = request(self.server, method, path, headers, body.as_ref()).await;
        assert_eq!(r.status, want, "{method} {path}: {}", r.text());
        self.record(method, doc_path, &r);
        r
    }

    fn record(&mut self, method: &str, doc_path: &str, r: &HttpResponse) {
        check(self.doc, self.components, method, doc_path, r);
        self.seen
            .entry((method.to_owned(), doc_path.to_owned()))
            .or_default()
            .insert(r.status);
    }
}

/// Good and bad requests to every operation of a running gateway (an agent connected
/// over Socket.IO, with a heartbeat, answering a command), then to a node of a two-node
/// cluster on Redis (the views that name nodes): each response's status must be
/// documented for the operation and its body must validate against the schema. Every
/// operation must be exercised with at least one success and one error.
#[tokio::test]
async fn real_responses_match_the_documented_schemas() {
    // With a JWT secret, so that `POST /tokens` can issue.
    let server =
        TestServer::start_with(|c| c.gateway_jwt_secret = Some("openapi-secret".into())).await;
    let doc = fetch_document(&server).await;
    let components = closed_components(&doc);
    let auth = format!("Bearer {API_KEY}");
    let key: &[(&str, &str)] = &[("authorization", &auth)];
    let mut c = Calls {
        server: &server,
        doc: &doc,
        components: &components,
        seen: BTreeMap::new(),
    };

    let agent = server.pki.agent("a1");
    let upload = json!({"agent_id": "a1", "certificate": agent.cert_pem}).to_string();
    c.call(
        "POST",
        "/agent/certificate",
        "/agent/certificate",
        key,
        upload,
        200,
    )
    .await;
    let other = server.pki.agent("someone-else");
    let mismatch = json!({"agent_id": "a2", "certificate": other.cert_pem}).to_string();
    c.call(
        "POST",
        "/agent/certificate",
        "/agent/certificate",
        key,
        mismatch,
        400,
    )
    .await;
    c.call(
        "POST",
        "/agent/certificate",
        "/agent/certificate",
        key,
        "[1]",
        422,
    )
    .await;
    let huge = json!({"agent_id": "a3", "certificate": "x".repeat(70 * 1024)}).to_string();
    c.call(
        "POST",
        "/agent/certificate",
        "/agent/certificate",
        key,
        huge,
        413,
    )
    .await;

    // A connected agent with a heartbeat, so the agent views carry sessions and payloads.
    let SioConnect::Ok(mut sio) = SioWs::connect(&server, Some(&agent)).await.unwrap() else {
        panic!("agent a1 was refused");
    };
    sio.emit(
        "heartbeat",
        json!({"cpu_usage": 1.5, "memory_usage": 512, "disk_usage": 2048}),
    )
    .await;
    assert_eq!(sio.next_event_within(10).await.unwrap().0, "heartbeat_ack");

    c.call(
        "POST",
        "/hello-world",
        "/hello-world",
        key,
        r#"{"name":"Test"}"#,
        200,
    )
    .await;
    c.call(
        "POST",
        "/hello-world",
        "/hello-world",
        &[],
        r#"{"name":"Test"}"#,
        403,
    )
    .await;
    let wrong = [("authorization", "Bearer wrong")];
    c.call(
        "POST",
        "/hello-world",
        "/hello-world",
        &wrong,
        r#"{"name":"T"}"#,
        403,
    )
    .await;
    let twice = [
        ("authorization", auth.as_str()),
        ("authorization", auth.as_str()),
    ];
    c.call(
        "POST",
        "/hello-world",
        "/hello-world",
        &twice,
        r#"{"name":"T"}"#,
        400,
    )
    .await;
    c.call("POST", "/hello-world", "/hello-world", key, "{}", 422)
        .await;

    let one = "/agent/certificate/{agent_id}";
    c.call("GET", one, "/agent/certificate/a1", key, "", 200)
        .await;
    c.call("GET", one, "/agent/certificate/nobody", key, "", 404)
        .await;
    c.call("GET", one, "/agent/certificate/-bad", key, "", 400)
        .await;

    let certs = "/agent/certificates";
    c.call("GET", certs, "/agent/certificates?limit=1", key, "", 200)
        .await;
    c.call("GET", certs, "/agent/certificates?limit=0", key, "", 400)
        .await;
    c.call(
        "GET",
        certs,
        "/agent/certificates?status=stale",
        key,
        "",
        400,
    )
    .await;

    c.call("GET", "/agents", "/agents", key, "", 200).await;
    c.call(
        "GET",
        "/agents",
        "/agents?status=connected&limit=5",
        key,
        "",
        200,
    )
    .await;
    c.call("GET", "/agents", "/agents?status=sleeping", key, "", 400)
        .await;

    let agent_one = "/agents/{agent_id}";
    c.call("GET", agent_one, "/agents/a1", key, "", 200).await;
    c.call("GET", agent_one, "/agents/nobody", key, "", 404)
        .await;
    c.call("GET", agent_one, "/agents/-bad", key, "", 400).await;

    // A command the agent acknowledges, while the request waits for it.
    let command = "/agents/{agent_id}/commands";
    let body = json!({"event": "restart", "data": {"now": true}, "timeout_ms": 5000}).to_string();
    let (r, ()) = tokio::join!(
        request(&server, "POST", "/agents/a1/commands", key, &body),
        async {
            let (name, data, ack) = sio.next_event_with_ack_within(10).await.unwrap();
            assert_eq!((name.as_str(), &data), ("restart", &json!({"now": true})));
            sio.ack(ack.unwrap(), json!({"restarted": true})).await;
        }
    );
    assert_eq!(r.status, 200, "{}", r.text());
    c.record("POST", command, &r);
    let body = json!({"event": "restart", "timeout_ms": 100}).to_string();
    let (r, ()) = tokio::join!(
        request(&server, "POST", "/agents/a1/commands", key, &body),
        async {
            // The agent receives the command and never answers it.
            sio.next_event_with_ack_within(10).await.unwrap();
        }
    );
    assert_eq!(r.status, 504, "{}", r.text());
    c.record("POST", command, &r);
    let ghost = json!({"event": "restart"}).to_string();
    c.call("POST", command, "/agents/ghost/commands", key, ghost, 404)
        .await;
    let reserved = json!({"event": "connect"}).to_string();
    c.call("POST", command, "/agents/a1/commands", key, reserved, 400)
        .await;
    let extra = json!({"event": "restart", "unknown": 1}).to_string();
    c.call("POST", command, "/agents/a1/commands", key, extra, 422)
        .await;

    let fan = "/agents/commands";
    let body = json!({"agent_ids": ["ghost", "ghost2"], "event": "restart"}).to_string();
    let r = c.call("POST", fan, fan, key, body, 200).await;
    assert_eq!(r.json()["results"][0]["status"], "not_connected");
    let none = json!({"agent_ids": [], "event": "restart"}).to_string();
    c.call("POST", fan, fan, key, none, 400).await;

    let tokens = "/install-tokens";
    let r = c
        .call(
            "POST",
            tokens,
            tokens,
            key,
            json!({"agent_id": "b1"}).to_string(),
            200,
        )
        .await;
    let token = r.json()["install_token"].as_str().unwrap().to_owned();
    let bad_ttl = json!({"agent_id": "b1", "ttl_s": 0}).to_string();
    c.call("POST", tokens, tokens, key, bad_ttl, 400).await;

    let register = "/agent/register";
    let b1 = server.pki.agent("b1");
    let body = json!({"install_token": token, "agent_id": "b1", "certificate": b1.cert_pem,
        "metadata": {"site": "plant-7"}})
    .to_string();
    c.call("POST", register, register, &[], body.clone(), 200)
        .await;
    // The token was used up by the registration above.
    c.call("POST", register, register, &[], body, 401).await;
    let not_object = json!({"install_token": "t", "agent_id": "b2", "certificate": "x",
        "metadata": [1]})
    .to_string();
    c.call("POST", register, register, &[], not_object, 400)
        .await;
    let b1_view = c.call("GET", agent_one, "/agents/b1", key, "", 200).await;
    assert_eq!(b1_view.json()["metadata"], json!({"site": "plant-7"}));

    c.call("GET", "/cluster/nodes", "/cluster/nodes", key, "", 404)
        .await;
    c.call("GET", "/cluster/nodes", "/cluster/nodes", &[], "", 403)
        .await;

    c.call("DELETE", one, "/agent/certificate/a1", key, "", 200)
        .await;
    c.call("DELETE", one, "/agent/certificate/a1", key, "", 404)
        .await;
    c.call("DELETE", one, "/agent/certificate/-bad", key, "", 400)
        .await;

    c.call("GET", "/health", "/health", &[], "", 200).await;
    c.call("GET", "/ready", "/ready", &[], "", 200).await;
    c.call("GET", "/metrics", "/metrics", &[], "", 200).await;
    let ping = c.call("GET", "/ping", "/ping", &[], "", 200).await;
    assert_eq!(ping.text(), "OK");
    let routes = c.call("GET", "/routes", "/routes", key, "", 200).await;
    assert_eq!(routes.json()["routes"], json!([]));
    c.call("GET", "/routes", "/routes", &[], "", 403).await;
    let up = echo_upstream().await;
    let route = |name: &str, prefix: &str| {
        json!({"name": name, "prefix": prefix, "upstreams": [up], "auth": "none"}).to_string()
    };
    let named = "/routes/{name}";
    for (method, doc_path, path, body, want) in [
        ("POST", "/routes", "/routes", route("svc", "/svc"), 201),
        ("POST", "/routes", "/routes", route("svc", "/o"), 409),
        ("POST", "/routes", "/routes", route("x", "/agents"), 422),
        ("PUT", named, "/routes/svc", route("svc", "/svc"), 200),
        ("PUT", named, "/routes/svc2", route("svc2", "/s2"), 201),
        ("PUT", named, "/routes/svc2", route("svc2", "/svc"), 409),
        ("PUT", named, "/routes/svc2", route("x", "/s2"), 422),
    ] {
        c.call(method, doc_path, path, key, body, want).await;
    }
    let routes = c.call("GET", "/routes", "/routes", key, "", 200).await;
    assert_eq!(routes.json()["routes"][0]["source"], "runtime");
    // The body of POST and PUT is the `[[routes]]` entry, under a name for API users.
    for method in ["post", "put"] {
        let path = if method == "post" { "/routes" } else { named };
        let body = &doc["paths"][path][method]["requestBody"]["content"]["application/json"];
        assert_eq!(
            body["schema"]["$ref"], "#/components/schemas/RouteSpec",
            "{body}"
        );
    }
    let spec = &doc["components"]["schemas"]["RouteSpec"];
    assert_eq!(
        spec["required"],
        json!(["name", "prefix", "upstreams", "auth"]),
        "{spec}"
    );
    c.call("DELETE", named, "/routes/svc", key, "", 204).await;
    c.call("DELETE", named, "/routes/svc", key, "", 404).await;

    let tokens = "/tokens";
    let body = json!({"project": "p", "service": "s", "description": "d"}).to_string();
    let issued = c.call("POST", tokens, tokens, key, body, 200).await.json();
    let bad_days = json!({"project": "p", "service": "s", "expiresInDays": 0}).to_string();
    c.call("POST", tokens, tokens, key, bad_days, 400).await;
    let no_project = json!({"service": "s"}).to_string();
    c.call("POST", tokens, tokens, key, no_project, 422).await;
    c.call("GET", tokens, "/tokens?project=p&limit=1", key, "", 200)
        .await;
    c.call("GET", tokens, "/tokens?limit=0", key, "", 400).await;
    let revoke = "/tokens/{jti}/revoke";
    let jti = issued["jti"].as_str().unwrap();
    let reason = json!({"reason": "r"}).to_string();
    c.call(
        "POST",
        revoke,
        format!("/tokens/{jti}/revoke"),
        key,
        reason.clone(),
        200,
    )
    .await;
    c.call(
        "POST",
        revoke,
        format!("/tokens/{jti}/revoke"),
        key,
        "{}",
        422,
    )
    .await;
    c.call("POST", revoke, "/tokens/j%20x/revoke", key, reason, 400)
        .await;
    let audit = "/tokens/audit";
    c.call("GET", audit, "/tokens/audit?limit=1", key, "", 200)
        .await;
    c.call("GET", audit, "/tokens/audit?after=x", key, "", 400)
        .await;

    // Limits every operation shares: a request target over 8 KiB (414), header fields
    // over 32 KiB (431).
    let long_query = format!("?q={}", "x".repeat(9 * 1024));
    let big_header = "y".repeat(33 * 1024);
    for (method, path, _) in operations(&doc) {
        let real = concrete(&path, "a1");
        let uri = format!("{real}{long_query}");
        c.call(method.as_str(), path.as_str(), uri, key, "", 414)
            .await;
        let headers = [
            ("authorization", auth.as_str()),
            ("x-padding", big_header.as_str()),
        ];
        c.call(
            method.as_str(),
            path.as_str(),
            real.clone(),
            &headers,
            "",
            431,
        )
        .await;
    }

    // With `[cluster]`: the node list, and agent views naming their node (an agent on
    // node B, seen from node A).
    let redis = RedisServer::start();
    let pki = Arc::new(TestPki::new());
    let node_a = start_node(&pki, &redis.url(), "node-a", ClusterMode::Standalone).await;
    let node_b = start_node(&pki, &redis.url(), "node-b", ClusterMode::Standalone).await;
    let on_b = pki.agent("fleet-b1");
    assert_eq!(node_b.upload(&on_b).await.0, 200);
    let SioConnect::Ok(mut sio_b) = SioWs::connect(&node_b, Some(&on_b)).await.unwrap() else {
        panic!("agent fleet-b1 was refused");
    };
    sio_b
        .emit(
            "heartbeat",
            json!({"cpu_usage": 3, "memory_usage": 1, "disk_usage": 2}),
        )
        .await;
    assert_eq!(
        sio_b.next_event_within(10).await.unwrap().0,
        "heartbeat_ack"
    );
    let deadline = std::time::Instant::now() + PROPAGATION_BOUND;
    let listed = loop {
        let r = request(&node_a, "GET", "/agents", key, "").await;
        let shown = r.json()["agents"]
            .as_array()
            .and_then(|a| a.first().cloned());
        if shown
            .as_ref()
            .is_some_and(|a| a["last_heartbeat"]["node"] == "node-b")
        {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node A never listed fleet-b1: {}",
            r.text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    c.record("GET", "/agents", &listed);
    for (path, doc_path) in [
        ("/agents/fleet-b1", agent_one),
        ("/cluster/nodes", "/cluster/nodes"),
        ("/ready", "/ready"),
    ] {
        let r = request(&node_a, "GET", path, key, "").await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        c.record("GET", doc_path, &r);
    }
    drop(sio_b);
    node_a.stop().await;
    node_b.stop().await;

    for (method, path, _) in operations(&doc) {
        let statuses = c
            .seen
            .get(&(method.clone(), path.clone()))
            .unwrap_or_else(|| panic!("{method} {path} was never called"));
        assert!(
            statuses.iter().any(|s| *s < 300),
            "{method} {path}: no success exercised ({statuses:?})"
        );
        assert!(
            statuses.iter().any(|s| *s >= 400),
            "{method} {path}: no error exercised ({statuses:?})"
        );
    }
    server.stop().await;
}

/// Swagger UI is served from the binary without a key, and points at the document.
#[tokio::test]
async fn swagger_ui_is_served_from_the_binary_without_a_key() {
    let server = TestServer::start().await;
    let r = request(&server, "GET", "/docs", &[], "").await;
    assert!(r.status / 100 == 3, "{} {}", r.status, r.text());
    assert_eq!(r.headers["location"], "/docs/");
    let page = request(&server, "GET", "/docs/", &[], "").await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("swagger-ui"), "{}", page.text());
    let init = request(&server, "GET", "/docs/swagger-initializer.js", &[], "").await;
    assert_eq!(init.status, 200);
    assert!(init.text().contains("/openapi.json"), "{}", init.text());
    for asset in ["/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"] {
        let r = request(&server, "GET", asset, &[], "").await;
        assert_eq!(r.status, 200, "{asset}");
        assert!(r.body.len() > 1000, "{asset}: {} bytes", r.body.len());
    }
    // The document names the key scheme the protected operations use.
    let doc = fetch_document(&server).await;
    assert_eq!(
        doc["components"]["securitySchemes"]["api_key"],
        json!({"type": "http", "scheme": "bearer", "description": "One of the gateway's `api_keys`"})
    );
    server.stop().await;
}
