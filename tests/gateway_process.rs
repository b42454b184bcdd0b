//! The gateway as a process (`agentgate serve`): a 200 MB body streamed both ways with the
//! process's resident memory measured from /proc, and SIGHUP re-reading the routes (a valid
//! file applies on a kept-alive connection, a broken one is refused naming the key).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test stops loudly on failure

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::json;
use tokio::net::TcpListener;

use common::*;

/// Echoes the path as JSON; `/echo-body` streams the request body back.
async fn upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|req: Request| async move {
        if req.uri().path().ends_with("/echo-body") {
            return Response::new(Body::new(req.into_body()));
        }
        axum::Json(json!({"path": req.uri().path()})).into_response()
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn write_config(dir: &Path, pki: &TestPki, port: u16, routes: &str) -> std::path::PathBuf {
    let cert = dir.join("server.pem");
    let key = dir.join("server.key");
    std::fs::write(&cert, &pki.server_cert_pem).unwrap();
    std::fs::write(&key, &pki.server_key_pem).unwrap();
    let config = dir.join("gw.toml");
    let text = format!(
        "listen = \"127.0.0.1:{port}\"\napi_keys = [\"{API_KEY}\"]\ndata_dir = \"{d}/data\"\n\
         [store]\ndir = \"{d}/certs\"\n[tls]\nmode = \"files\"\ncert_file = \"{c}\"\nkey_file = \"{k}\"\n{routes}\n",
        d = dir.display(),
        c = cert.display(),
        k = key.display()
    );
    std::fs::write(&config, text).unwrap();
    config
}

fn start(config: &Path, log: &Path) -> Proc {
    let mut cmd = common::agentgate_command();
    let child = cmd
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Proc(child)
}

/// A kept-alive HTTP/1.1 connection to the process, once it accepts one.
async fn connect(pki: &TestPki, port: u16) -> HttpConn {
    let connector = tokio_rustls::TlsConnector::from(client_config(pki, None));
    for _ in 0..200 {
        if let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            return HttpConn::handshake(tls).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gateway on port {port} never accepted a connection");
}

/// Waits for `needle` in the log file; returns the log.
async fn wait_log(log: &Path, needle: &str) -> String {
    for _ in 0..200 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "log never said {needle:?}:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn route(name: &str, prefix: &str, upstream: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nupstreams = [\"{upstream}\"]\nstrip_prefix = true\nauth = \"none\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_body_streams_both_ways_in_bounded_memory() {
    const SIZE: u64 = 200 * 1024 * 1024;
    const CHUNK: usize = 256 * 1024;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let up = upstream().await;
    let port = free_port();
    // Above `limits.proxy_max_body_bytes` (10 MiB by default): this route takes it all.
    let routes = format!(
        "[limits]\nproxy_max_body_bytes = {}\n{}",
        2 * SIZE,
        route("big", "/big", &up)
    );
    let config = write_config(dir.path(), &pki, port, &routes);
    let log = dir.path().join("gw.log");
    let proc = start(&config, &log);
    // Warm up: TLS, the upstream pool, the allocator's first arenas.
    let mut conn = connect(&pki, port).await;
    assert_eq!(
        conn.send("GET", "/big/x", &[], "").await.unwrap().status,
        200
    );

    let tls = {
        let connector = tokio_rustls::TlsConnector::from(client_config(&pki, None));
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        connector.connect(name, tcp).await.unwrap()
    };
    let (mut sender, driver) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(driver);
    let baseline = proc.rss();
    let peak = Arc::new(AtomicU64::new(baseline));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        let pid = proc.0.id();
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    && let Some(kb) = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak.fetch_max(kb * 1024, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let body = futures_util::stream::unfold(0u64, |sent| async move {
        if sent >= SIZE {
            return None;
        }
        let chunk = Bytes::from(vec![(sent / CHUNK as u64 % 251) as u8; CHUNK]);
        Some((Ok::<_, std::io::Error>(chunk), sent + CHUNK as u64))
    });
    let req = http::Request::post("/big/echo-body")
        .header("host", "localhost")
        .body(Body::from_stream(body))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
        }
    }
    done.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    assert_eq!(received, SIZE);
    let growth = peak.load(Ordering::SeqCst).saturating_sub(baseline);
    eprintln!(
        "gateway RSS: baseline {} KiB, peak {} KiB, growth {} KiB for {SIZE} bytes each way",
        baseline / 1024,
        peak.load(Ordering::SeqCst) / 1024,
        growth / 1024
    );
    assert!(
        growth < 32 * 1024 * 1024,
        "gateway RSS grew by {} KiB while streaming",
        growth / 1024
    );
}

#[tokio::test]
async fn sighup_applies_a_valid_routes_file_and_refuses_a_broken_one() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let up = upstream().await;
    let port = free_port();
    let config = write_config(dir.path(), &pki, port, &route("a", "/a", &up));
    let log = dir.path().join("gw.log");
    let proc = start(&config, &log);
    let mut conn = connect(&pki, port).await;
    let r = conn.send("GET", "/a/x", &[], "").await.unwrap();
    assert_eq!((r.status, r.json()["path"].clone()), (200, json!("/x")));
    assert_eq!(conn.send("GET", "/b/x", &[], "").await.unwrap().status, 404);

    // The access log: one line per proxied request with route and upstream; an API
    // request names its key by a digest prefix, never the key.
    let auth = format!("Bearer {API_KEY}");
    let r = conn
        .send("GET", "/routes", &[("authorization", &auth)], "")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let text = wait_log(&log, "key=\"sha256:").await;
    assert!(
        text.contains("proxied") && text.contains("route=a"),
        "{text}"
    );
    assert!(!text.contains(API_KEY), "the key was logged: {text}");

    // A valid file: /b replaces /a, on the same kept-alive connection.
    write_config(dir.path(), &pki, port, &route("b", "/b", &up));
    proc.signal("-HUP");
    wait_log(&log, "SIGHUP: routes reloaded").await;
    let r = conn.send("GET", "/b/y", &[], "").await.unwrap();
    assert_eq!((r.status, r.json()["path"].clone()), (200, json!("/y")));
    assert_eq!(conn.send("GET", "/a/x", &[], "").await.unwrap().status, 404);

    // A broken file (one good route, one on a built-in path) is refused as a whole.
    let broken = format!(
        "{}{}",
        route("c", "/c", &up),
        route("bad", "/agents/x", &up)
    );
    write_config(dir.path(), &pki, port, &broken);
    proc.signal("-HUP");
    let text = wait_log(&log, "configuration refused").await;
    assert!(text.contains("routes[1].prefix"), "{text}");
    let r = conn.send("GET", "/b/z", &[], "").await.unwrap();
    assert_eq!(r.status, 200, "the running routes stay");
    assert_eq!(conn.send("GET", "/c/z", &[], "").await.unwrap().status, 404);
}

/// `check-config` reads the files the gateway half names, so a start would not be the
/// first to find them missing; the message names the key.
#[test]
fn check_config_names_a_missing_jwt_key_file_and_a_bad_route() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let check = |extra: &str| {
        let config = write_config(dir.path(), &pki, 8443, extra);
        let out = common::agentgate_command()
            .args(["check-config", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = check(&format!(
        "[[jwt.keys]]\nalg = \"RS256\"\npem_file = \"{}/missing.pem\"\n",
        dir.path().display()
    ));
    assert!(!ok && stderr.contains("`jwt.keys[0].pem_file`"), "{stderr}");
    let (ok, stderr) = check(&route("x", "/metrics/x", "http://127.0.0.1:9"));
    assert!(!ok && stderr.contains("`routes[0].prefix`"), "{stderr}");
    let (ok, stderr) = check(&route("x", "/x", "http://127.0.0.1:9"));
    assert!(ok, "{stderr}");
}

/// A hand-edited store directory (issue 11, point 5): a file that fails the upload rules is
/// skipped with a log line naming it; the gateway's temporary files are never read.
#[tokio::test]
async fn a_bad_file_copied_into_the_store_directory_is_skipped_with_a_log_line() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), &pki, port, "");
    let log = dir.path().join("gw.log");
    let _proc = start(&config, &log);
    let _conn = connect(&pki, port).await;
    let certs = dir.path().join("certs");
    std::fs::write(
        certs.join(".agentgate-tmp-1-1"),
        pki.agent("tmp-agent").cert_pem,
    )
    .unwrap();
    std::fs::write(certs.join("bad-1.pem"), pki.agent("someone-else").cert_pem).unwrap();
    let text = wait_log(&log, "skipped file in certificate store").await;
    assert!(text.contains("bad-1.pem"), "{text}");
    assert!(
        !text.contains(".agentgate-tmp-"),
        "a temporary file was read: {text}"
    );
    // A good file after it is taken.
    std::fs::write(certs.join("good-1.pem"), pki.agent("good-1").cert_pem).unwrap();
    wait_log(&log, "certificate added in the store directory").await;
}
