//! `tls.mode = "acme"` against a real ACME server: Pebble (Debian package `pebble`) with
//! real TLS-ALPN-01 validation on the gateway's own listener, and the `[http_redirect]`
//! listener. The gateway runs as the `agentgate` binary, as an operator runs it, and the
//! tests read its JSON log: that is where an operator sees what ACME did.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use agentgate::config::{RawConfig, TlsMode};
use common::pebble::{Pebble, free_port};
use common::{API_KEY, AgentCert, TestPki, alert_of, first_read_error};

const ISSUED: &str = "ACME certificate issued and stored in the cache";
const RENEWED: &str = "ACME certificate renewed and stored in the cache";
const FROM_CACHE: &str = "ACME serving the certificate from the cache";
const VALIDATION: &str = "answered an ACME TLS-ALPN-01 validation handshake";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_issues_a_certificate_that_clients_trust_and_an_agent_uses_for_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut pebble = Pebble::prepare(&dir.path().join("pebble"), port, None);
    pebble.start().await;
    let config = write_config(dir.path(), port, &pebble);
    let gw = Gateway::start(&config);

    let issued = gw.wait_for_message(ISSUED, 90).await;
    let serial = issued["serial"].as_str().unwrap().to_owned();
    assert!(
        gw.has_message(VALIDATION),
        "Pebble validated over TLS-ALPN-01 on the gateway's listener"
    );
    assert_eq!(pebble.new_orders(), 1);

    // A client that trusts Pebble's root and nothing else completes a handshake for the
    // domain, and is served HTTP over it.
    let root = pebble.root_pem().await;
    let tls = connect(port, &root, None).await.expect("TLS handshake");
    assert_eq!(leaf_serial(&tls), serial);
    let mut http = Http::over(tls).await;
    assert_eq!(http.send("GET", "/health", None).await.0, 200);

    // An agent uploads its certificate, then connects with it (mTLS) and sends heartbeats.
    let pki = TestPki::new();
    let agent = pki.agent("acme-agent-1");
    let upload = json!({"agent_id": agent.agent_id, "certificate": agent.cert_pem});
    let (status, body) = http.send("POST", "/agent/certificate", Some(upload)).await;
    assert_eq!(status, 200, "{body}");
    // tests/agents/agent.py: python-socketio, as deployed agents connect.
    let root_file = dir.path().join("pebble-root.pem");
    std::fs::write(&root_file, &root).unwrap();
    let (code, lines) = common::python_agent_at(
        &format!("https://localhost:{port}"),
        &root_file,
        dir.path(),
        Some(&agent),
        &["--heartbeats", "2", "--timeout", "30"],
    )
    .await;
    assert_eq!(code, 0, "{lines:?}");
    let acks: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "heartbeat_ack")
        .collect();
    assert_eq!(acks.len(), 2, "{lines:?}");
    assert_eq!(acks[0]["data"]["agent_id"], "acme-agent-1");
    let connected = gw.wait_for_message("agent connected", 10).await;
    assert_eq!(connected["agent_id"], "acme-agent-1", "identified by mTLS");

    // An unknown certificate is still refused on this listener: the verifier is in place.
    let stranger = pki.agent("stranger");
    let tls = connect(port, &root, Some(&stranger)).await;
    let refused = match tls {
        Err(e) => Some(e),
        Ok(tls) => first_read_error(tls).await,
    }
    .expect("an unknown client certificate is refused");
    assert_eq!(
        alert_of(&refused),
        Some(rustls::AlertDescription::CertificateUnknown)
    );
    assert_eq!(pebble.new_orders(), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_the_same_cache_serves_the_cached_certificate_without_a_new_order() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut pebble = Pebble::prepare(&dir.path().join("pebble"), port, None);
    pebble.start().await;
    let config = write_config(dir.path(), port, &pebble);

    let report = check_config(&config);
    assert!(
        report.contains("cached certificate: none in the cache"),
        "{report}"
    );

    let gw = Gateway::start(&config);
    let issued = gw.wait_for_message(ISSUED, 90).await;
    let serial = issued["serial"].as_str().unwrap().to_owned();
    let not_after = issued["not_after"].as_str().unwrap().to_owned();
    gw.stop().await;
    assert_eq!(pebble.new_orders(), 1);
    let cache = cache_files(&dir.path().join("acme"));
    assert_eq!(
        cache.len(),
        2,
        "an account key and a certificate: {cache:?}"
    );

    // check-config reads the cache without any network.
    let report = check_config(&config);
    assert!(
        report.contains(&format!("cached certificate: valid until {not_after}"))
            && report.contains(&serial),
        "{report}"
    );

    let gw = Gateway::start(&config);
    let cached = gw.wait_for_message(FROM_CACHE, 30).await;
    assert_eq!(cached["serial"], serial.as_str());
    // The library sleeps until the renewal time before it orders anything, and that time
    // is years ahead for Pebble's five-year certificates.
    let renew_at = time::OffsetDateTime::parse(
        cached["renew_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(renew_at > time::OffsetDateTime::now_utc() + time::Duration::days(365));

    let root = pebble.root_pem().await;
    let tls = connect(port, &root, None).await.expect("TLS handshake");
    assert_eq!(leaf_serial(&tls), serial);
    let mut http = Http::over(tls).await;
    assert_eq!(http.send("GET", "/health", None).await.0, 200);

    assert_eq!(pebble.new_orders(), 1, "no new order at Pebble");
    assert_eq!(
        cache_files(&dir.path().join("acme")),
        cache,
        "cache untouched"
    );
    assert!(!gw.has_message(ISSUED) && !gw.has_message(VALIDATION));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_server_down_at_start_then_certificate_obtained_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Prepared, not started: its port refuses connections.
    let mut pebble = Pebble::prepare(&dir.path().join("pebble"), port, None);
    let config = write_config(dir.path(), port, &pebble);
    // The plain-HTTP operations listener, reachable while TLS has no certificate.
    let ops_port = free_port();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("metrics_listen = \"127.0.0.1:{ops_port}\"\n{text}"),
    )
    .unwrap();
    let ready_url = format!("http://127.0.0.1:{ops_port}/ready");
    let mut gw = Gateway::start(&config);

    let failed = gw
        .wait_for(
            "a failed order",
            |l| {
                message(l).starts_with("ACME order failed; no certificate yet")
                    && l["level"] == "ERROR"
            },
            30,
        )
        .await;
    assert!(failed["retry_in_secs"].as_u64().is_some(), "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("onnection refused"),
        "the log says why: {failed}"
    );

    // Meanwhile the gateway is up and refuses handshakes cleanly, saying why.
    let anyone = rustls::RootCertStore::empty();
    let refused = connect_with(port, anyone, None)
        .await
        .expect_err("no certificate to serve yet");
    assert_eq!(
        alert_of(&refused),
        Some(rustls::AlertDescription::AccessDenied),
        "{refused}"
    );
    gw.wait_for(
        "the reason for the refused handshake",
        |l| {
            message(l).starts_with(
                "TLS handshake refused: no ACME certificate yet (the last order failed: ",
            )
        },
        10,
    )
    .await;

    let not_ready = curl(&["-s", "-w", " %{http_code}", &ready_url]);
    assert!(
        not_ready.contains("\"starting\"") && not_ready.ends_with(" 503"),
        "{not_ready}"
    );

    pebble.start().await;
    let issued = gw.wait_for_message(ISSUED, 120).await;
    let root = pebble.root_pem().await;
    let tls = connect(port, &root, None).await.expect("TLS handshake");
    assert_eq!(leaf_serial(&tls), issued["serial"].as_str().unwrap());
    assert!(gw.is_running(), "the same process, never restarted");
    let ready = curl(&["-s", "-w", " %{http_code}", &ready_url]);
    assert!(
        ready.contains("\"ready\"") && ready.ends_with(" 200"),
        "{ready}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_failed_orders_for_an_embedding_program() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // Prepared, never started: its directory URL refuses connections.
    let pebble = Pebble::prepare(&dir.path().join("pebble"), 443, None);
    let mut config = RawConfig {
        api_keys: vec![API_KEY.into()],
        data_dir: dir.path().join("data"),
        ..RawConfig::default()
    };
    config.store.dir = dir.path().join("certs");
    config.tls.mode = TlsMode::Acme;
    config.tls.acme.domains = vec!["localhost".into()];
    config.tls.acme.directory = pebble.directory_url();
    config.tls.acme.directory_ca_file = Some(pebble.listener_ca_file.clone());
    let config = config.validate("test").unwrap();

    let gateway = agentgate::Gateway::start(config).await.unwrap();
    let mut status = gateway.server_cert().acme().expect("acme mode").status();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(gateway.serve(listener, async move {
        let _ = stopped.await;
    }));
    let seen = tokio::time::timeout(
        Duration::from_secs(30),
        status.wait_for(|s| s.failed_orders >= 2),
    )
    .await
    .expect("two failed orders within 30 s")
    .unwrap()
    .clone();
    assert_eq!(seen.certificate, None);
    assert_eq!(seen.issued, 0);
    assert!(seen.consecutive_failures >= 2);
    let error = seen.last_error.unwrap();
    assert!(error.contains("onnection refused"), "{error}");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_replaces_the_certificate_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Short-lived certificates: renewal is due two thirds into the lifetime (20 s).
    let mut pebble = Pebble::prepare(&dir.path().join("pebble"), port, Some(30));
    pebble.start().await;
    let config = write_config(dir.path(), port, &pebble);
    let gw = Gateway::start(&config);
    let first = gw.wait_for_message(ISSUED, 90).await;
    let root = pebble.root_pem().await;
    let tls = connect(port, &root, None).await.expect("TLS handshake");
    assert_eq!(leaf_serial(&tls), first["serial"].as_str().unwrap());
    let mut kept = Http::over(tls).await;

    // Requests keep flowing on the connection opened before the renewal, and new
    // handshakes keep succeeding while the order runs.
    let mut renewed = None;
    for _ in 0..120 {
        assert_eq!(kept.send("GET", "/health", None).await.0, 200);
        let fresh = connect(port, &root, None).await.expect("TLS handshake");
        assert_eq!(
            Http::over(fresh).await.send("GET", "/health", None).await.0,
            200
        );
        renewed = gw.find(|l| message(l) == RENEWED);
        if renewed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let renewed = renewed.expect("renewed within 60 s");
    assert!(gw.has_message("ACME renewal due: ordering a new certificate"));
    assert_ne!(renewed["serial"], first["serial"]);
    assert_eq!(kept.send("GET", "/health", None).await.0, 200);

    // New handshakes get the new certificate.
    let tls = connect(port, &root, None).await.expect("TLS handshake");
    assert_eq!(leaf_serial(&tls), renewed["serial"].as_str().unwrap());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_renewal_keeps_the_current_certificate_until_the_acme_server_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // 45 s certificates: renewal due after 30 s, 15 s before expiry.
    let mut pebble = Pebble::prepare(&dir.path().join("pebble"), port, Some(45));
    pebble.start().await;
    let config = write_config(dir.path(), port, &pebble);
    let gw = Gateway::start(&config);
    let first = gw.wait_for_message(ISSUED, 90).await;
    let first_root = pebble.root_pem().await;
    pebble.stop();

    let failed = gw
        .wait_for(
            "a failed renewal",
            |l| message(l) == "ACME order failed; the current certificate stays in service",
            60,
        )
        .await;
    assert_eq!(failed["serving_until"], first["not_after"]);
    let tls = connect(port, &first_root, None)
        .await
        .expect("the current certificate is still served");
    assert_eq!(leaf_serial(&tls), first["serial"].as_str().unwrap());

    // A fresh Pebble (new root, no memory of the account) on the same address.
    pebble.start().await;
    let renewed = gw.wait_for_message(RENEWED, 90).await;
    let tls = connect(port, &pebble.root_pem().await, None)
        .await
        .expect("TLS handshake");
    assert_eq!(leaf_serial(&tls), renewed["serial"].as_str().unwrap());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_listener_redirects_to_https_with_301() {
    let dir = tempfile::tempdir().unwrap();
    let (port, http_port) = (free_port(), free_port());
    let config = dir.path().join("agentgate.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = {data:?}\napi_keys = [{API_KEY:?}]\n\
             log_format = \"json\"\n[store]\ndir = {certs:?}\n\
             [http_redirect]\nlisten = \"127.0.0.1:{http_port}\"\n",
            data = dir.path().join("data"),
            certs = dir.path().join("certs"),
        ),
    )
    .unwrap();
    let gw = Gateway::start(&config);
    gw.wait_for_message("plain-HTTP listener redirecting to https", 30)
        .await;
    gw.wait_for_message("agentgate listening", 30).await;

    // curl, a client nobody here wrote: the status and the target of the redirect ...
    let out = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "-X",
        "POST",
        &format!("http://localhost:{http_port}/agent/certificate/a1?x=1&y=2"),
    ]);
    assert_eq!(
        out,
        format!("301 https://localhost:{port}/agent/certificate/a1?x=1&y=2")
    );
    // ... and following it lands on the TLS listener (self-signed here, hence -k).
    let out = curl(&[
        "-sk",
        "-L",
        "-w",
        " %{http_code} %{url_effective}",
        &format!("http://localhost:{http_port}/health"),
    ]);
    assert!(
        out.ends_with(&format!(" 200 https://localhost:{port}/health")),
        "{out}"
    );
    gw.stop().await;
}

// ---------------------------------------------------------------- helpers

/// The gateway's configuration for ACME from `pebble`, listening on `port`.
fn write_config(dir: &Path, port: u16, pebble: &Pebble) -> PathBuf {
    let path = dir.join("agentgate.toml");
    let text = format!(
        "listen = \"127.0.0.1:{port}\"\n\
         data_dir = {data:?}\n\
         api_keys = [{API_KEY:?}]\n\
         log_format = \"json\"\n\
         [store]\n\
         dir = {certs:?}\n\
         [tls]\n\
         mode = \"acme\"\n\
         [tls.acme]\n\
         domains = [\"localhost\"]\n\
         contact = [\"mailto:ops@example.com\"]\n\
         directory = {url:?}\n\
         cache_dir = {cache:?}\n\
         directory_ca_file = {ca:?}\n",
        data = dir.join("data"),
        certs = dir.join("certs"),
        url = pebble.directory_url(),
        cache = dir.join("acme"),
        ca = pebble.listener_ca_file,
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn agentgate() -> Command {
    let mut cmd = common::agentgate_command();
    cmd.env("RUST_LOG", "info");
    cmd
}

fn check_config(config: &Path) -> String {
    let out = agentgate()
        .args(["check-config", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed (./scripts/test.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cache_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn message(line: &Value) -> &str {
    line["message"].as_str().unwrap_or("")
}

/// An `agentgate serve` process and its JSON log lines; killed when dropped.
struct Gateway {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Gateway {
    fn start(config: &Path) -> Gateway {
        let mut child = agentgate()
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let value =
                    serde_json::from_str(&line).unwrap_or_else(|_| json!({ "message": line }));
                sink.lock().unwrap().push(value);
            }
        });
        Gateway { child, lines }
    }

    fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.lines.lock().unwrap().iter().find(|l| pred(l)).cloned()
    }

    fn has_message(&self, text: &str) -> bool {
        self.find(|l| message(l) == text).is_some()
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The first log line matching `pred`, waiting up to `secs`.
    async fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool, secs: u64) -> Value {
        for _ in 0..secs * 10 {
            if let Some(line) = self.find(&pred) {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no log line for {what} within {secs} s; the log:\n{}",
            self.lines
                .lock()
                .unwrap()
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    async fn wait_for_message(&self, text: &str, secs: u64) -> Value {
        self.wait_for(text, |l| message(l) == text, secs).await
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    async fn stop(mut self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "agentgate exited with {status}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("agentgate did not stop within 20 s of SIGTERM");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS connection to the gateway for `localhost`, trusting `root_pem` only.
async fn connect(
    port: u16,
    root_pem: &str,
    agent: Option<&AgentCert>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap())
        .unwrap();
    connect_with(port, roots, agent).await
}

async fn connect_with(
    port: u16,
    roots: rustls::RootCertStore,
    agent: Option<&AgentCert>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match agent {
        Some(a) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(a.der.clone())],
                PrivateKeyDer::from_pem_slice(a.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The serial of the certificate the server presented, as the gateway logs it.
fn leaf_serial(tls: &TlsStream<TcpStream>) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
    X509Certificate::from_der(leaf)
        .unwrap()
        .1
        .raw_serial_as_string()
}

/// HTTP/1.1 over one kept-alive TLS connection.
struct Http {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Http {
    async fn over(tls: TlsStream<TcpStream>) -> Http {
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        Http { sender }
    }

    async fn send(&mut self, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("authorization", format!("Bearer {API_KEY}"));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = req.body(Full::new(Bytes::from(body))).unwrap();
        self.sender.ready().await.expect("connection still open");
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}
