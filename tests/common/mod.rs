//! Shared test helpers for the gateway: a real gateway on 127.0.0.1:0, TLS clients with
//! or without an agent certificate, the python-socketio agent. The clients that know
//! nothing of the gateway's code (HTTP/1.1, Socket.IO over WebSocket and long-polling,
//! the test PKI) are in the `agentgate-testkit` crate and re-exported here.

#![allow(dead_code)] // each test binary uses a different subset of the helpers

pub mod cluster;
pub mod pebble;
pub mod redis;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentgate::agents::Agents;
use agentgate::clock::{Clock, ManualClock};
use agentgate::config::{Config, RawConfig, TlsMode};
use agentgate::store::CertStore;
use agentgate::{Gateway, StartError};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

#[allow(unused_imports)] // not every test binary uses every helper
pub use agentgate_testkit::http::{HttpConn, HttpResponse};
#[allow(unused_imports)]
pub use agentgate_testkit::pki::{self, AgentCert, AgentOpts, TestPki};
#[allow(unused_imports)]
pub use agentgate_testkit::sio::{Polling, SioConnect, SioWs};

pub const API_KEY: &str = "test-api-key-0123456789";

/// A port for a process that the test starts itself (a gateway binary, Pebble), which
/// cannot be handed a listener bound to port 0.
///
/// Ports come from 20000..32000, below Linux's ephemeral range (32768..60999): a port
/// picked from the ephemeral range with `bind(0)` and released can be taken again by any
/// outgoing connection (a client, Pebble's validation) before the child binds it, which
/// is how CI once saw `Address already in use`. Each call takes the next port of this
/// process's own stretch (spread by process id, so concurrent test binaries do not meet)
/// and skips any that is in use now.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 977) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000 on 127.0.0.1");
}

/// A running gateway with its own temporary directories and PKI.
pub struct TestServer {
    pub addr: SocketAddr,
    pub pki: Arc<TestPki>,
    pub dir: Arc<tempfile::TempDir>,
    pub config: Config,
    pub store: CertStore,
    pub agents: Agents,
    /// The gateway half (routes, revocations).
    pub proxy: agentgate::proxy::Proxy,
    shutdown: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    task: tokio::sync::Mutex<Option<JoinHandle<std::io::Result<()>>>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a gateway with a test configuration that `adjust` may change (as written in
    /// a file; it is validated afterwards).
    pub async fn start_with(adjust: impl FnOnce(&mut RawConfig)) -> Self {
        let pki = Arc::new(TestPki::new());
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let config = test_config(&pki, dir.path(), adjust);
        Self::start_in(pki, dir, config).await.unwrap()
    }

    /// Starts a gateway whose API, registry and enrollment read the time from `clock`, so
    /// that a test steps over an expiry or a staleness window instead of sleeping.
    pub async fn start_with_clock(
        adjust: impl FnOnce(&mut RawConfig),
        clock: &ManualClock,
    ) -> Self {
        let pki = Arc::new(TestPki::new());
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let config = test_config(&pki, dir.path(), adjust);
        Self::start_in_with_clock(pki, dir, config, clock.clock())
            .await
            .unwrap()
    }

    /// Starts a gateway on existing directories (restart tests).
    pub async fn start_in(
        pki: Arc<TestPki>,
        dir: Arc<tempfile::TempDir>,
        config: Config,
    ) -> Result<Self, StartError> {
        Self::start_in_with_clock(pki, dir, config, Clock::system()).await
    }

    /// [`TestServer::start_in`] with the clock the API reads (restart tests over an expiry).
    pub async fn start_in_with_clock(
        pki: Arc<TestPki>,
        dir: Arc<tempfile::TempDir>,
        config: Config,
        clock: Clock,
    ) -> Result<Self, StartError> {
        init_tracing();
        let gateway = Gateway::start_with_clock(config.clone(), clock).await?;
        let store = gateway.store().clone();
        let agents = gateway.agents().clone();
        let proxy = gateway.proxy().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.serve(listener, async move {
            let _ = rx.await;
        }));
        Ok(Self {
            addr,
            pki,
            dir,
            config,
            store,
            agents,
            proxy,
            shutdown: std::sync::Mutex::new(Some(tx)),
            task: tokio::sync::Mutex::new(Some(task)),
        })
    }

    /// Stops the gateway and waits for it to drain.
    pub async fn stop(self) {
        self.begin_shutdown();
        assert!(
            self.wait_stopped(Duration::from_secs(20)).await,
            "gateway did not stop"
        );
    }

    /// Stops the gateway and starts a new one on the same directories and PKI.
    pub async fn restart(self) -> TestServer {
        let (pki, dir, config) = (self.pki.clone(), self.dir.clone(), self.config.clone());
        self.stop().await;
        TestServer::start_in(pki, dir, config).await.unwrap()
    }

    /// Resolves the gateway's shutdown future (as SIGTERM does in the binary).
    pub fn begin_shutdown(&self) {
        if let Some(tx) = self.shutdown.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }

    /// Waits up to `within` for `serve` to return `Ok`; false if it did not.
    pub async fn wait_stopped(&self, within: Duration) -> bool {
        let mut task = self.task.lock().await;
        let Some(handle) = task.as_mut() else {
            return true;
        };
        match tokio::time::timeout(within, handle).await {
            Ok(result) => {
                result.unwrap().unwrap();
                *task = None;
                true
            }
            Err(_) => false,
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.task
            .try_lock()
            .map(|t| t.as_ref().is_none_or(|h| h.is_finished()))
            .unwrap_or(false)
    }

    pub fn store_dir(&self) -> PathBuf {
        self.config.store.dir.clone()
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn ca_file(&self) -> PathBuf {
        let path = self.dir.path().join("ca.pem");
        std::fs::write(&path, &self.pki.ca_pem).unwrap();
        path
    }

    /// Opens a TLS connection, presenting `agent`'s certificate if given.
    pub async fn tls(&self, agent: Option<&AgentCert>) -> std::io::Result<TlsStream<TcpStream>> {
        let connector = TlsConnector::from(client_config(&self.pki, agent));
        let tcp = TcpStream::connect(self.addr).await?;
        connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }

    /// An HTTP/1.1 connection (kept alive across requests).
    pub async fn http(&self, agent: Option<&AgentCert>) -> std::io::Result<HttpConn> {
        let tls = self.tls(agent).await?;
        HttpConn::handshake(tls)
            .await
            .map_err(std::io::Error::other)
    }

    /// One request on a fresh connection without a client certificate, with the API key.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut conn = self.http(None).await.unwrap();
        let auth = format!("Bearer {API_KEY}");
        let body = body.map(|b| b.to_string());
        let resp = conn
            .send(
                method,
                path,
                &[("authorization", &auth)],
                body.as_deref().unwrap_or(""),
            )
            .await
            .unwrap();
        (resp.status, resp.json())
    }

    /// The value of one sample line of `GET /metrics`, e.g.
    /// `agentgate_limit_refusals_total{limit="max_body_bytes"}` (0 when absent).
    pub async fn metric(&self, sample: &str) -> f64 {
        let mut conn = self.http(None).await.unwrap();
        let text = conn.send("GET", "/metrics", &[], "").await.unwrap().text();
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    pub async fn upload(&self, agent: &AgentCert) -> (u16, Value) {
        self.api(
            "POST",
            "/agent/certificate",
            Some(json!({"agent_id": agent.agent_id, "certificate": agent.cert_pem})),
        )
        .await
    }
}

/// One request on a fresh connection without a client certificate.
pub async fn request(
    server: &TestServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    let mut conn = server.http(None).await.unwrap();
    conn.send(method, path, headers, body).await.unwrap()
}

/// `SioWs::connect(&server, agent)` connects to this gateway.
impl agentgate_testkit::sio::Target for TestServer {
    fn tls(
        &self,
        agent: Option<&AgentCert>,
    ) -> impl std::future::Future<Output = std::io::Result<TlsStream<TcpStream>>> + Send {
        TestServer::tls(self, agent)
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().take() {
            task.abort();
        }
    }
}

/// An upstream service on loopback for routes: answers `{"path": <the path it got>}`;
/// `/echo-body` streams the request body back. Returns its base URL.
pub async fn echo_upstream() -> String {
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|req: axum::extract::Request| async move {
        if req.uri().path().ends_with("/echo-body") {
            return axum::response::Response::new(axum::body::Body::new(req.into_body()));
        }
        axum::Json(json!({"path": req.uri().path()})).into_response()
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// The configuration tests use: files-mode server certificate from the test PKI.
pub fn test_config(
    pki: &TestPki,
    dir: &std::path::Path,
    adjust: impl FnOnce(&mut RawConfig),
) -> Config {
    let cert = dir.join("server.pem");
    let key = dir.join("server.key");
    std::fs::write(&cert, &pki.server_cert_pem).unwrap();
    std::fs::write(&key, &pki.server_key_pem).unwrap();
    let mut config = RawConfig {
        api_keys: vec![API_KEY.into()],
        data_dir: dir.join("data"),
        ..RawConfig::default()
    };
    config.store.dir = dir.join("certs");
    config.tls.mode = TlsMode::Files;
    config.tls.cert_file = Some(cert);
    config.tls.key_file = Some(key);
    adjust(&mut config);
    config.validate("test").unwrap()
}

pub fn client_config(pki: &TestPki, agent: Option<&AgentCert>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
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
    Arc::new(config)
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The Python interpreter of the test venv (python-socketio + aiohttp), set up by
/// `scripts/test.sh`.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("AGENTGATE_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run ./scripts/test.sh, which creates the Python venv these tests drive",
        venv.display()
    );
    venv
}

/// A token minted the way the replaced gateway's token function mints them (PyJWT, HS256
/// with `secret`, claims `jti`, `project`, `service`, `iat`, `exp` = now + 90 days); `jti`
/// is a fresh UUID when not given.
pub fn pyjwt_token(secret: &str, project: &str, service: &str, jti: Option<&str>) -> String {
    let script = "import jwt, time, uuid, sys\n\
        now = int(time.time())\n\
        jti = sys.argv[4] or str(uuid.uuid4())\n\
        print(jwt.encode({'jti': jti, 'project': sys.argv[2], 'service': sys.argv[3], \
        'iat': now, 'exp': now + 90 * 86400}, sys.argv[1], algorithm='HS256'))\n";
    let out = std::process::Command::new(python())
        .args(["-c", script, secret, project, service, jti.unwrap_or("")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "PyJWT: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Runs `tests/agents/agent.py` with `args` against `server`.
pub async fn python_agent(
    server: &TestServer,
    agent: Option<&AgentCert>,
    args: &[&str],
) -> (i32, Vec<Value>) {
    python_agent_at(
        &server.url(),
        &server.ca_file(),
        server.dir.path(),
        agent,
        args,
    )
    .await
}

/// Runs `tests/agents/agent.py` against `url` trusting `ca`; returns its JSON lines and
/// exit code. Key files are written into `dir`.
pub async fn python_agent_at(
    url: &str,
    ca: &std::path::Path,
    dir: &std::path::Path,
    agent: Option<&AgentCert>,
    args: &[&str],
) -> (i32, Vec<Value>) {
    let mut cmd = python_agent_command(url, ca, dir, agent, args);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("python agent hung")
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if !out.status.success() {
        eprintln!("agent.py stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.code().unwrap_or(-1), lines)
}

/// The command line of a python agent, for tests that run it in the background.
pub fn python_agent_command(
    url: &str,
    ca: &std::path::Path,
    dir: &std::path::Path,
    agent: Option<&AgentCert>,
    args: &[&str],
) -> tokio::process::Command {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/agents/agent.py");
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(script).arg("--url").arg(url).arg("--ca").arg(ca);
    if let Some(a) = agent {
        let stem = format!("{}-{}", a.agent_id, &a.fingerprint_hex()[..8]);
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &a.cert_pem).unwrap();
        std::fs::write(&key, &a.key_pem).unwrap();
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    cmd.args(args).kill_on_drop(true);
    cmd
}

/// Reads from a TLS stream after the handshake: a refused client certificate shows up here
/// under TLS 1.3 (DESIGN.md: the alert arrives on the first read).
pub async fn first_read_error(mut tls: TlsStream<TcpStream>) -> Option<std::io::Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tls
        .write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("read timed out")
    {
        Ok(0) => Some(std::io::Error::other("closed without data")),
        Ok(_) => None,
        Err(e) => Some(e),
    }
}

/// The TLS alert a client received, if the error carries one.
pub fn alert_of(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// `agentgate` (the binary under test) without the tests' own environment: nothing of
/// `AGENTGATE_*` (the test command sets `AGENTGATE_TEST_PYTHON`), `API_KEY`,
/// `CERT_STORAGE_DIR` or `GATEWAY_JWT_SECRET` leaks into the child's configuration.
pub fn agentgate_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_agentgate"));
    for (k, _) in std::env::vars() {
        if k.starts_with("AGENTGATE_")
            || k == "API_KEY"
            || k == "CERT_STORAGE_DIR"
            || k == "GATEWAY_JWT_SECRET"
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// A gateway process (see [`agentgate_command`]); killed when dropped.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Sends `sig` (`-HUP`, `-TERM`, ...) with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// VmRSS in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap();
        kb * 1024
    }
}
