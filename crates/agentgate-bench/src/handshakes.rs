//! `agentgate-bench handshakes`: full mTLS handshakes per second against a TLS server,
//! the gateway or nginx, with the same client code, so the two can be compared in one run.
//!
//! Each of `--concurrency` workers loops until `--secs` have passed: TCP connect, a full
//! TLS handshake presenting a client certificate (resumption disabled), then one
//! `GET <--request>` whose response head is read (so the server has finished the
//! handshake, client certificate included, and served a byte), then a reset (SO_LINGER 0,
//! so that neither side keeps the port in TIME_WAIT).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::agent::{self, short};
use crate::api::Api;
use crate::report::{Failures, Rate, Samples, Summary, Table};
use crate::sys::{self, ProcSample};

#[derive(clap::Args, Debug, Clone)]
pub struct HandshakeArgs {
    /// The TLS server (a loopback address).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub target: SocketAddr,
    /// A name for the target in the report (e.g. agentgate, nginx).
    #[arg(long, default_value = "target")]
    pub label: String,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// How long to run.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Path requested after each handshake; empty: close right after the handshake.
    #[arg(long, default_value = "/health")]
    pub request: String,
    /// Upload the client certificate to the gateway with this API key first (the gateway
    /// refuses unknown certificates; nginx with optional_no_ca takes any).
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The agent id of the client certificate.
    #[arg(long, default_value = "bench-handshake")]
    pub agent_id: String,
    /// The server's process ids (repeat for nginx's workers), for its CPU time per
    /// handshake.
    #[arg(long)]
    pub server_pid: Vec<u32>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandshakeReport {
    pub mode: String,
    pub label: String,
    pub target: String,
    pub concurrency: usize,
    pub request: String,
    pub cpus: usize,
    /// Completed handshakes (and requests) per second.
    pub rate: Rate,
    /// TCP connect + TLS handshake.
    pub handshake_latency: Summary,
    /// Handshake + request + response head.
    pub total_latency: Summary,
    pub failures: Failures,
    pub server: Option<ServerCpu>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerCpu {
    pub pids: Vec<u32>,
    /// CPU seconds of all `pids` during the run.
    pub cpu_secs: f64,
    /// Server CPU milliseconds per completed handshake.
    pub cpu_ms_per_handshake: f64,
    /// Sum of the processes' resident set sizes at the end, KiB.
    pub rss_kib: u64,
}

pub async fn run(args: HandshakeArgs) -> anyhow::Result<HandshakeReport> {
    crate::check_loopback(args.target)?;
    sys::raise_fd_limit();
    let cert = crate::bench_cert(&args.agent_id)?;
    if let Some(key) = &args.api_key {
        let api = Api::new(args.target, key, crate::client_config(None)?);
        api.connect()
            .await?
            .upload(&cert.agent_id, &cert.cert_pem)
            .await?;
    }
    let request = (!args.request.is_empty()).then(|| {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
            args.request,
            crate::SERVER_NAME
        )
    });
    let cpu = |pids: &[u32]| -> Option<(f64, u64)> {
        let samples = pids
            .iter()
            .map(|&pid| sys::sample(pid).ok())
            .collect::<Option<Vec<ProcSample>>>()?;
        Some((
            samples.iter().map(|s| s.cpu_secs).sum(),
            samples.iter().map(|s| s.rss_kib).sum(),
        ))
    };
    let start = cpu(&args.server_pid);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.secs);
    let mut workers = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency.max(1) {
        let tls = cert.tls.clone();
        let request = request.clone();
        let target = args.target;
        workers.push(tokio::spawn(async move {
            let mut hs = Samples::default();
            let mut total = Samples::default();
            let mut failures = Failures::default();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                match one(target, tls.clone(), request.as_deref(), deadline).await {
                    Ok(Some(handshake)) => {
                        hs.push(handshake);
                        total.push(t0.elapsed());
                    }
                    Ok(None) => break,
                    Err(reason) => failures.add(reason),
                }
            }
            (hs, total, failures)
        }));
    }
    let mut hs = Samples::default();
    let mut total = Samples::default();
    let mut failures = Failures::default();
    for w in workers {
        let (h, t, f) = w.await?;
        hs.extend(h);
        total.extend(t);
        failures.merge(&f);
    }
    let elapsed = started.elapsed();
    let end = cpu(&args.server_pid);
    let completed = total.len() as u64;
    let server = match (start, end) {
        (Some((start, _)), Some((end, rss_kib))) if !args.server_pid.is_empty() => {
            Some(ServerCpu {
                pids: args.server_pid.clone(),
                cpu_secs: end - start,
                cpu_ms_per_handshake: if completed > 0 {
                    (end - start) * 1000.0 / completed as f64
                } else {
                    0.0
                },
                rss_kib,
            })
        }
        _ => None,
    };
    Ok(HandshakeReport {
        mode: "handshakes".into(),
        label: args.label,
        target: args.target.to_string(),
        concurrency: args.concurrency,
        request: args.request,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        rate: Rate::new(completed, elapsed),
        handshake_latency: hs.summary(),
        total_latency: total.summary(),
        failures,
        server,
    })
}

/// One connection; `Ok(None)` when the deadline passed in the middle of it.
async fn one(
    target: SocketAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
    request: Option<&str>,
    deadline: Instant,
) -> Result<Option<Duration>, String> {
    let t0 = Instant::now();
    let work = async {
        let tcp = agent::tcp_connect(target, IpAddr::V4(Ipv4Addr::LOCALHOST))
            .await
            .map_err(|e| agent::io_reason("tcp connect", &e))?;
        let _ = tcp.set_zero_linger();
        let mut stream = agent::tls_connect(tcp, tls).await?;
        let handshake = t0.elapsed();
        if let Some(request) = request {
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| agent::io_reason("request", &e))?;
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream
                    .read(&mut chunk)
                    .await
                    .map_err(|e| agent::io_reason("response", &e))?;
                if n == 0 || buf.len() > 16 * 1024 {
                    return Err("response: closed before the end of the head".to_owned());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            if !buf.starts_with(b"HTTP/1.1 200") {
                let line = String::from_utf8_lossy(&buf);
                let status = line.lines().next().unwrap_or_default();
                return Err(format!("response: {}", short(status)));
            }
        }
        Ok(handshake)
    };
    match tokio::time::timeout_at(deadline + Duration::from_secs(5), work).await {
        Ok(Ok(h)) => Ok(Some(h)),
        Ok(Err(reason)) if Instant::now() >= deadline => {
            let _ = reason;
            Ok(None)
        }
        Ok(Err(reason)) => Err(reason),
        Err(_) => Err("timeout".into()),
    }
}

impl HandshakeReport {
    pub fn print(&self) {
        let mut t = Table::new();
        t.row(
            "handshakes",
            format!(
                "{}: {} in {:.1} s = {:.0}/s ({} connections in flight, {} CPUs)",
                self.label,
                self.rate.count,
                self.rate.secs,
                self.rate.per_sec,
                self.concurrency,
                self.cpus
            ),
        );
        t.latency("handshake latency", &self.handshake_latency);
        t.latency("with request", &self.total_latency);
        if let Some(s) = &self.server {
            t.row(
                "server CPU",
                format!(
                    "{:.2} s = {:.3} ms per handshake",
                    s.cpu_secs, s.cpu_ms_per_handshake
                ),
            );
        }
        t.failures(&self.failures);
        t.print();
    }
}
