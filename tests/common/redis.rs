//! redis-server processes for the scale-out tests: one standalone server on a free
//! loopback port (kill -9 and restart on the same port), and a 3-shard Redis Cluster.
//! Each lives in its own temporary directory, without persistence, and is killed when
//! its handle drops.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// How long a server gets to answer PING or a cluster to report `cluster_state:ok`.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// One redis-server.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A standalone server without persistence.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with extra command-line options (`--appendonly yes` for persistence).
    pub fn start_with(extra: &[&str]) -> Self {
        let mut server = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.spawn();
        server
    }

    /// `redis://127.0.0.1:<port>`, as an operator would write it.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash or an OOM kill would; returns once the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory; returns when it answers.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// While this server is down, changes its data: a second redis-server on
    /// another port loads the same directory, runs them, and shuts down (saving), so the
    /// next [`RedisServer::restart`] serves the changed data. Clients connected to this
    /// server hear of nothing: the change is one they missed while cut off. Needs
    /// persistence (`--appendonly yes`).
    /// `edit` gets the second server's port (see [`cli_at`]).
    pub fn edit_offline(&mut self, edit: impl FnOnce(u16)) {
        assert!(
            self.child.is_none(),
            "edit_offline needs the server stopped"
        );
        let port = free_port();
        let mut cmd = redis_server(port, self.dir.path());
        cmd.args(&self.extra);
        let mut child = cmd.spawn().expect("redis-server");
        wait_for_pong(port, self.dir.path());
        edit(port);
        redis_cli(port, &["SHUTDOWN", "SAVE"]);
        let _ = child.wait();
    }

    /// A command through redis-cli, its stdout trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }

    fn spawn(&mut self) {
        let mut cmd = redis_server(self.port, self.dir.path());
        cmd.args(&self.extra);
        self.child = Some(
            cmd.spawn()
                .expect("redis-server (Debian package redis-server)"),
        );
        wait_for_pong(self.port, self.dir.path());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three redis-server processes in cluster mode, every slot assigned, no replicas.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let dir = tempfile::tempdir().unwrap();
                let port = free_cluster_port();
                let mut node = RedisServer {
                    port,
                    dir,
                    extra: [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                    child: None,
                };
                node.spawn();
                node
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + READY_WITHIN;
        for node in &nodes {
            loop {
                let info = node.cli(&["cluster", "info"]);
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster not ok:\n{info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { nodes }
    }

    /// Every node's URL (seed list).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

fn redis_server(port: u16, dir: &Path) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// A port whose cluster bus port (port + 10000) is free as well.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn wait_for_pong(port: u16, dir: &Path) {
    let deadline = Instant::now() + READY_WITHIN;
    while !ping(port) {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            panic!("redis-server on port {port} did not answer PING:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A command through redis-cli to the server on `port`, its stdout trimmed.
pub fn cli_at(port: u16, args: &[&str]) -> String {
    redis_cli(port, args)
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
