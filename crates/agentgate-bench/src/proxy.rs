//! `agentgate-bench proxy`: request latency at fixed request rates (open loop) against
//! several targets in one run, e.g. the upstream called directly and the same upstream
//! through agentgate and through nginx, so the difference is the proxy's overhead.
//!
//! Open loop: a dispatcher thread releases request `k` at `start + k / rate` whether or
//! not earlier ones have been answered (an OS thread with `nanosleep`, not tokio's 1 ms
//! timer wheel, so arrivals are spread evenly instead of leaving in bursts each
//! millisecond). Requests go round-robin over `--connections` kept-alive HTTP/1.1
//! connections; a request whose connection is still busy waits, and that wait counts in
//! its latency (measured from its release, so a slow server cannot hide queueing by
//! slowing the generator down: no coordinated omission). Each measurement opens fresh
//! connections and warms them up (`--warmup-secs`, not recorded) first.
//!
//! Targets are measured one after the other for each rate, `--rounds` times, so
//! background load on a shared machine hits every target alike; the report gives each
//! target's median over the rounds and its difference to the baseline target.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::report::Failures;

#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// `NAME=URL`, repeated: what to measure, e.g. `direct=http://127.0.0.1:9000/x` or
    /// `agentgate=https://127.0.0.1:8443/open/x` (loopback only; https skips the server
    /// certificate check, as the other subcommands do).
    #[arg(long = "target", required = true)]
    pub targets: Vec<String>,
    /// The target the others are compared with (default: the first).
    #[arg(long)]
    pub baseline: Option<String>,
    /// Request rates (requests per second), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "500,2000,5000")]
    pub rates: Vec<u32>,
    /// Recorded seconds per target and rate.
    #[arg(long, default_value_t = 5.0)]
    pub secs: f64,
    /// Seconds at the same rate before recording, on the same connections.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// How often the whole set (every rate, every target) is measured.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Kept-alive connections per measurement.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// `Name: value`, repeated: sent with every request to every target (the same bytes
    /// everywhere, e.g. the bearer token of a `jwt` route).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct Target {
    name: String,
    addr: SocketAddr,
    tls: bool,
    path: String,
}

impl Target {
    fn parse(spec: &str) -> anyhow::Result<Self> {
        let (name, url) = spec
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--target {spec}: expected NAME=URL"))?;
        let uri: Uri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("--target {spec}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => anyhow::bail!("--target {spec}: the URL must start with http:// or https://"),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow::anyhow!("--target {spec}: no host:port"))?;
        let addr: SocketAddr = authority.as_str().parse().map_err(|e| {
            anyhow::anyhow!("--target {spec}: host must be an IP address with a port: {e}")
        })?;
        crate::check_loopback(addr)?;
        let path = uri
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned());
        Ok(Self {
            name: name.to_owned(),
            addr,
            tls,
            path,
        })
    }
}

/// Latency percentiles of one measurement, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Micros {
    pub p50: u32,
    pub p90: u32,
    pub p99: u32,
    pub p999: u32,
    pub max: u32,
}

impl Micros {
    /// Nearest-rank percentiles of `samples` (microseconds).
    pub fn of(mut samples: Vec<u32>) -> Self {
        samples.sort_unstable();
        // `per_mille` in integers: 99.9 / 100 * 1000 in floats is 999.0000000000001.
        let pct = |per_mille: usize| -> u32 {
            if samples.is_empty() {
                return 0;
            }
            let rank = (per_mille * samples.len()).div_ceil(1000);
            samples[rank.clamp(1, samples.len()) - 1]
        };
        Self {
            p50: pct(500),
            p90: pct(900),
            p99: pct(990),
            p999: pct(999),
            max: samples.last().copied().unwrap_or(0),
        }
    }
}

/// One target at one rate in one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub round: usize,
    pub rate: u32,
    pub target: String,
    /// Recorded requests answered with a 2xx.
    pub count: u64,
    /// Answered requests per second over the recorded window.
    pub achieved_per_sec: f64,
    pub latency_us: Micros,
    pub failures: Failures,
}

/// A target at a rate, over every round: the median of the rounds' percentiles, and the
/// difference to the baseline target's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Compared {
    pub rate: u32,
    pub target: String,
    pub p50_us: u32,
    pub p99_us: u32,
    pub p50_overhead_us: i64,
    pub p99_overhead_us: i64,
    pub failures: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyReport {
    pub mode: String,
    pub cpus: usize,
    pub connections: usize,
    pub secs: f64,
    pub warmup_secs: f64,
    pub rounds: usize,
    pub baseline: String,
    pub targets: BTreeMap<String, String>,
    pub measurements: Vec<Measurement>,
    pub compared: Vec<Compared>,
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<ProxyReport> {
    let targets = args
        .targets
        .iter()
        .map(|t| Target::parse(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let baseline = args
        .baseline
        .clone()
        .unwrap_or_else(|| targets[0].name.clone());
    anyhow::ensure!(
        targets.iter().any(|t| t.name == baseline),
        "--baseline {baseline}: no target of that name"
    );
    anyhow::ensure!(
        args.rates.iter().all(|&r| r > 0),
        "--rates: every rate must be above 0"
    );
    anyhow::ensure!(args.secs > 0.0, "--secs must be above 0");
    let headers = args
        .headers
        .iter()
        .map(|h| {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("--header {h}: expected `Name: value`"))?;
            Ok((
                HeaderName::from_bytes(name.trim().as_bytes())?,
                HeaderValue::from_str(value.trim())?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tls = crate::client_config(None)?;
    let mut measurements = Vec::new();
    for round in 1..=args.rounds.max(1) {
        for &rate in &args.rates {
            for target in &targets {
                let m = measure(&args, target, rate, &headers, &tls).await?;
                eprintln!(
                    "round {round} {rate}/s {}: p50 {} µs p99 {} µs ({} failures)",
                    target.name,
                    m.0.p50,
                    m.0.p99,
                    m.2.total()
                );
                measurements.push(Measurement {
                    round,
                    rate,
                    target: target.name.clone(),
                    count: m.1.0,
                    achieved_per_sec: m.1.1,
                    latency_us: m.0,
                    failures: m.2,
                });
            }
        }
    }
    let compared = compare(&measurements, &args.rates, &targets, &baseline);
    Ok(ProxyReport {
        mode: "proxy".into(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        connections: args.connections,
        secs: args.secs,
        warmup_secs: args.warmup_secs,
        rounds: args.rounds.max(1),
        baseline,
        targets: args
            .targets
            .iter()
            .filter_map(|t| t.split_once('='))
            .map(|(n, u)| (n.to_owned(), u.to_owned()))
            .collect(),
        measurements,
        compared,
    })
}

fn compare(
    measurements: &[Measurement],
    rates: &[u32],
    targets: &[Target],
    baseline: &str,
) -> Vec<Compared> {
    let median = |mut v: Vec<u32>| -> u32 {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let of = |rate: u32, target: &str| -> (u32, u32, u64) {
        let ms: Vec<&Measurement> = measurements
            .iter()
            .filter(|m| m.rate == rate && m.target == target)
            .collect();
        (
            median(ms.iter().map(|m| m.latency_us.p50).collect()),
            median(ms.iter().map(|m| m.latency_us.p99).collect()),
            ms.iter().map(|m| m.failures.total()).sum(),
        )
    };
    let mut out = Vec::new();
    for &rate in rates {
        let (base50, base99, _) = of(rate, baseline);
        for t in targets {
            let (p50, p99, failures) = of(rate, &t.name);
            out.push(Compared {
                rate,
                target: t.name.clone(),
                p50_us: p50,
                p99_us: p99,
                p50_overhead_us: i64::from(p50) - i64::from(base50),
                p99_overhead_us: i64::from(p99) - i64::from(base99),
                failures,
            });
        }
    }
    out
}

type Sender = SendRequest<Empty<Bytes>>;

async fn connect(target: &Target, tls: &Arc<rustls::ClientConfig>) -> Result<Sender, String> {
    let tcp = tokio::net::TcpStream::connect(target.addr)
        .await
        .map_err(|e| crate::agent::io_reason("tcp connect", &e))?;
    let _ = tcp.set_nodelay(true);
    if target.tls {
        let stream = crate::agent::tls_connect(tcp, tls.clone()).await?;
        handshake(stream).await
    } else {
        handshake(tcp).await
    }
}

async fn handshake<S>(stream: S) -> Result<Sender, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One target at one rate: `(latency, (count, achieved rate), failures)`.
async fn measure(
    args: &ProxyArgs,
    target: &Target,
    rate: u32,
    headers: &[(HeaderName, HeaderValue)],
    tls: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<(Micros, (u64, f64), Failures)> {
    let n = args.connections.max(1);
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        senders.push(
            connect(target, tls)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", target.name))?,
        );
    }
    let warmup = (args.warmup_secs * f64::from(rate)) as u64;
    let total = warmup + (args.secs * f64::from(rate)).max(1.0) as u64;
    let mut queues = Vec::with_capacity(n);
    let mut workers = Vec::with_capacity(n);
    for sender in senders {
        let (tx, rx) = mpsc::unbounded_channel::<(Instant, bool)>();
        queues.push(tx);
        let (target, headers) = (target.clone(), headers.to_vec());
        let tls = tls.clone();
        workers.push(tokio::spawn(worker(sender, rx, target, headers, tls)));
    }
    // The dispatcher: an OS thread, so that its sleeps are as fine as the kernel's.
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let dispatcher = std::thread::spawn(move || {
        let start = Instant::now();
        let mut recorded_from = None;
        for k in 0..total {
            let due = start + interval.mul_f64(k as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let record = k >= warmup;
            let released = Instant::now();
            if record && recorded_from.is_none() {
                recorded_from = Some(released);
            }
            // A worker only goes away when its queue is closed: the send cannot fail.
            let _ = queues[(k % n as u64) as usize].send((released, record));
        }
        recorded_from.unwrap_or(start)
    });
    let mut samples = Vec::new();
    let mut failures = Failures::default();
    let mut last_done = Instant::now();
    for w in workers {
        let (s, f, done) = w.await?;
        samples.extend(s);
        failures.merge(&f);
        last_done = last_done.max(done);
    }
    let recorded_from = dispatcher
        .join()
        .map_err(|_| anyhow::anyhow!("the dispatcher thread panicked"))?;
    let count = samples.len() as u64;
    let window = last_done.saturating_duration_since(recorded_from);
    let achieved = if window.is_zero() {
        0.0
    } else {
        count as f64 / window.as_secs_f64()
    };
    Ok((Micros::of(samples), (count, achieved), failures))
}

/// Sends each released request on this worker's connection (reconnecting after an
/// error); returns the recorded latencies, the failures and when the last one finished.
async fn worker(
    mut sender: Sender,
    mut queue: mpsc::UnboundedReceiver<(Instant, bool)>,
    target: Target,
    headers: Vec<(HeaderName, HeaderValue)>,
    tls: Arc<rustls::ClientConfig>,
) -> (Vec<u32>, Failures, Instant) {
    let mut samples = Vec::new();
    let mut failures = Failures::default();
    let mut broken = false;
    while let Some((released, record)) = queue.recv().await {
        if broken {
            match connect(&target, &tls).await {
                Ok(s) => {
                    sender = s;
                    broken = false;
                }
                Err(e) => {
                    failures.add(e);
                    continue;
                }
            }
        }
        match one(&mut sender, &target.path, &headers).await {
            Ok(()) if record => {
                samples.push(u32::try_from(released.elapsed().as_micros()).unwrap_or(u32::MAX))
            }
            Ok(()) => {}
            Err((reason, fatal)) => {
                broken |= fatal;
                failures.add(reason);
            }
        }
    }
    (samples, failures, Instant::now())
}

/// One request and its whole body; the error says whether the connection is gone.
async fn one(
    sender: &mut Sender,
    path: &str,
    headers: &[(HeaderName, HeaderValue)],
) -> Result<(), (String, bool)> {
    sender
        .ready()
        .await
        .map_err(|e| (format!("connection: {e}"), true))?;
    let mut req = hyper::Request::get(path)
        .header(http::header::HOST, crate::SERVER_NAME)
        .body(Empty::<Bytes>::new())
        .map_err(|e| (format!("request: {e}"), false))?;
    for (name, value) in headers {
        req.headers_mut().insert(name.clone(), value.clone());
    }
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| (format!("request: {e}"), true))?;
    let status = resp.status();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| (format!("response body: {e}"), true))?;
    if status.is_success() {
        Ok(())
    } else {
        Err((format!("status {}", status.as_u16()), false))
    }
}

impl ProxyReport {
    pub fn print(&self) {
        println!(
            "open loop, {} connections per target, {} s per rate (+{} s warm-up), {} round(s), {} CPUs; baseline {}",
            self.connections, self.secs, self.warmup_secs, self.rounds, self.cpus, self.baseline
        );
        println!(
            "{:>7}  {:<16} {:>8} {:>8} {:>10} {:>10} {:>9}",
            "rate/s", "target", "p50 µs", "p99 µs", "Δp50 µs", "Δp99 µs", "failures"
        );
        for c in &self.compared {
            println!(
                "{:>7}  {:<16} {:>8} {:>8} {:>+10} {:>+10} {:>9}",
                c.rate,
                c.target,
                c.p50_us,
                c.p99_us,
                c.p50_overhead_us,
                c.p99_overhead_us,
                c.failures
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_must_be_loopback() {
        let t = Target::parse("gw=https://127.0.0.1:8443/open/x?y=1").unwrap();
        assert_eq!((t.name.as_str(), t.tls), ("gw", true));
        assert_eq!(t.addr.port(), 8443);
        assert_eq!(t.path, "/open/x?y=1");
        assert_eq!(Target::parse("d=http://127.0.0.1:9").unwrap().path, "/");
        for bad in [
            "no-equals",
            "x=ftp://127.0.0.1:1/",
            "x=http://localhost:1/",
            "x=http://10.0.0.1:80/",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn percentiles_in_microseconds() {
        let m = Micros::of((1..=1000).rev().collect());
        assert_eq!(
            (m.p50, m.p90, m.p99, m.p999, m.max),
            (500, 900, 990, 999, 1000)
        );
        assert_eq!(Micros::of(Vec::new()).p99, 0);
    }
}
