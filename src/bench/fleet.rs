//! `agentgate bench fleet`: N simulated agents against a running gateway.
//!
//! A run has four phases, and every shard goes through them in step:
//!
//! 1. **upload**: each agent gets its own rcgen certificate, uploaded with
//!    `POST /agent/certificate` (the next handshake sees it; nothing is reloaded);
//! 2. **connect**: agents connect (mTLS, WebSocket, Socket.IO namespace connect) at
//!    `--connect-rate` per second, or as fast as `--connect-concurrency` allows;
//! 3. **steady**: every agent sends a heartbeat every `--heartbeat-secs` and times its
//!    `heartbeat_ack`; commands go out at `--command-rate` through the API and the agents
//!    ack them;
//! 4. **stop**: connections are reset and the shards report.
//!
//! One process holds at most as many agents as its file-descriptor limit allows, so
//! `--shards K` runs K copies of this command as child processes, each with its own fd
//! budget and its slice of the fleet; the parent (the coordinator) releases the phases
//! when every shard has reached them (one line per phase on the children's stdin/stdout),
//! samples the gateway's `/proc` entry between phases, sends the commands, and merges the
//! shards' reports. With one shard the same exchange runs over in-process channels.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::agent::{self, Phase};
use super::api::Api;
use super::report::{Failures, Rate, Samples, Summary, Table};
use super::sys::{self, ProcSample};

#[derive(clap::Args, Debug, Clone)]
pub struct FleetArgs {
    /// The gateway's TLS listener (a loopback address).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub target: SocketAddr,
    /// API key for uploads and commands.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: String,
    /// Number of agents.
    #[arg(long, default_value_t = 100)]
    pub agents: usize,
    /// Connects per second for the whole fleet; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,
    /// Connects in flight at once for the whole fleet.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// An agent that is not connected after this long counts as failed.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout_secs: u64,
    /// Seconds between two heartbeats of one agent.
    #[arg(long, default_value_t = 1.0)]
    pub heartbeat_secs: f64,
    /// Length of the steady phase.
    #[arg(long, default_value_t = 10.0)]
    pub steady_secs: f64,
    /// Commands per second through `POST /agents/{id}/commands` during the steady phase.
    #[arg(long, default_value_t = 0.0)]
    pub command_rate: f64,
    /// HTTP connections the commands are sent on.
    #[arg(long, default_value_t = 64)]
    pub command_connections: usize,
    /// Certificate uploads in flight at once (per shard).
    #[arg(long, default_value_t = 32)]
    pub upload_concurrency: usize,
    /// Simulator processes sharing the fleet (each has its own file-descriptor limit).
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// The gateway's process id, for its CPU time and memory from /proc.
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Agent ids are this prefix and a six-digit number.
    #[arg(long, default_value = "bench-")]
    pub id_prefix: String,
    /// Connections per source address before the next 127.0.0.x is used; 0 = 1,000
    /// (at most what net.ipv4.ip_local_port_range offers).
    #[arg(long, default_value_t = 0)]
    pub ports_per_address: usize,
    /// The whole run stops after this many seconds, finished or not.
    #[arg(long, default_value_t = 900)]
    pub max_secs: u64,
    /// Internal: this process is shard N of a `--shards` run.
    #[arg(long, hide = true)]
    pub shard_index: Option<usize>,
}

/// The merged report of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetReport {
    pub mode: String,
    pub conditions: Conditions,
    pub uploads: Rate,
    pub connect: ConnectReport,
    pub heartbeats: HeartbeatReport,
    pub commands: CommandReport,
    /// Agents still connected when the steady phase ended.
    pub connected_at_end: u64,
    pub failures: Failures,
    pub gateway: Option<GatewayReport>,
    /// CPU seconds of the simulator's own processes (it shares the machine's cores with
    /// the gateway, so a connect rate can be limited by the client side).
    pub simulator_cpu_secs_connect: f64,
    pub simulator_cpu_secs_steady: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Conditions {
    pub target: String,
    pub agents: usize,
    pub shards: usize,
    pub connect_rate: f64,
    pub connect_concurrency: usize,
    pub heartbeat_secs: f64,
    pub steady_secs: f64,
    pub command_rate: f64,
    pub cpus: usize,
    pub fd_limit_soft: u64,
    pub fd_limit_hard: u64,
    pub ports_per_address: usize,
    pub source_addresses: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectReport {
    pub attempted: u64,
    pub connected: u64,
    /// Connected agents over the time from the first connect to the last success.
    pub rate: Rate,
    /// From the start of the TCP connect to the accepted Socket.IO connect.
    pub latency: Summary,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatReport {
    pub sent: u64,
    pub acked: u64,
    /// From sending `heartbeat` to receiving `heartbeat_ack`.
    pub latency: Summary,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CommandReport {
    pub sent: u64,
    pub ok: u64,
    /// HTTP round trip of `POST /agents/{id}/commands`, the agent's ack included.
    pub latency: Summary,
    pub acked_by_agents: u64,
}

/// The gateway's CPU time and memory between the phases.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayReport {
    pub pid: u32,
    /// Before the connect phase (certificates uploaded, no agent connected).
    pub idle: ProcSample,
    /// When every agent had connected.
    pub connected: ProcSample,
    /// At the end of the steady phase, all agents still connected.
    pub steady_end: ProcSample,
    pub cpu_secs_connect: f64,
    pub cpu_secs_steady: f64,
    /// (RSS at the end of the steady phase − idle RSS) / agents connected.
    pub rss_per_agent_kib: f64,
    /// VmHWM at the end of the run.
    pub peak_rss_kib: u64,
}

/// What one shard measured.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ShardReport {
    uploaded: u64,
    upload_secs: f64,
    attempted: u64,
    connected: u64,
    connect_secs: f64,
    connect_latency: Samples,
    heartbeats_sent: u64,
    heartbeat_latency: Samples,
    commands_acked: u64,
    connected_at_end: u64,
    failures: Failures,
}

/// Runs `bench fleet`: the coordinator, or one shard when `--shard-index` is set.
pub async fn run(args: FleetArgs) -> anyhow::Result<Option<FleetReport>> {
    super::check_loopback(args.target)?;
    anyhow::ensure!(args.agents > 0, "--agents must be at least 1");
    anyhow::ensure!(
        args.heartbeat_secs > 0.0,
        "--heartbeat-secs must be positive"
    );
    let (soft, hard) = sys::raise_fd_limit();
    let shards = args.shards.max(1);
    if let Some(index) = args.shard_index {
        // A child: the coordinator reads our stdout, so the report goes there too.
        let mut link = Link::Stdio {
            out: tokio::io::stdout(),
            lines: BufReader::new(tokio::io::stdin()).lines(),
        };
        let report = shard(&args, index, shards, &mut link).await?;
        link.send(format!("report {}", serde_json::to_string(&report)?))
            .await?;
        return Ok(None);
    }
    let per_shard = args.agents.div_ceil(shards) as u64 + 64;
    anyhow::ensure!(
        per_shard <= soft,
        "{} agents in {shards} shard(s) need about {per_shard} file descriptors per process, \
         the limit is {soft} (hard {hard}); use --shards {}",
        args.agents,
        args.agents
            .div_ceil(soft.saturating_sub(64).max(1) as usize)
    );
    let run = coordinate(&args, shards, soft, hard);
    match tokio::time::timeout(Duration::from_secs(args.max_secs), run).await {
        Ok(report) => report.map(Some),
        Err(_) => anyhow::bail!("the run did not finish within --max-secs {}", args.max_secs),
    }
}

async fn coordinate(
    args: &FleetArgs,
    shards: usize,
    soft: u64,
    hard: u64,
) -> anyhow::Result<FleetReport> {
    let mut links = Vec::with_capacity(shards);
    if shards == 1 {
        let (to_shard, from_coord) = mpsc::unbounded_channel();
        let (to_coord, from_shard) = mpsc::unbounded_channel();
        let shard_args = args.clone();
        tokio::spawn(async move {
            let mut link = Link::Local {
                tx: to_coord,
                rx: from_coord,
            };
            let line = match shard(&shard_args, 0, 1, &mut link).await {
                Ok(r) => format!("report {}", serde_json::to_string(&r).unwrap_or_default()),
                Err(e) => format!("error {e:#}"),
            };
            let _ = link.send(line).await;
        });
        links.push(Link::Local {
            tx: to_shard,
            rx: from_shard,
        });
    } else {
        let exe = std::env::current_exe()?;
        for i in 0..shards {
            let mut child = tokio::process::Command::new(&exe)
                .args(std::env::args_os().skip(1))
                .arg("--shard-index")
                .arg(i.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()?;
            let stdin = child.stdin.take().expect("stdin was piped above");
            let stdout = child.stdout.take().expect("stdout was piped above");
            links.push(Link::Child {
                child,
                stdin,
                lines: BufReader::new(stdout).lines(),
            });
        }
    }
    let gateway = args.gateway_pid;
    let sample = || gateway.and_then(|pid| sys::sample(pid).ok());
    let mut simulator: Vec<u32> = vec![std::process::id()];
    simulator.extend(links.iter().filter_map(Link::pid));
    let simulator_cpu = || -> f64 {
        simulator
            .iter()
            .filter_map(|&pid| sys::sample(pid).ok())
            .map(|s| s.cpu_secs)
            .sum()
    };

    let uploaded = gather(&mut links, "uploaded").await?;
    eprintln!("bench: {uploaded} certificates uploaded; connect phase");
    let idle = sample();
    let sim_idle = simulator_cpu();
    release(&mut links).await?;
    let connected = gather(&mut links, "connected").await?;
    let at_connected = sample();
    let sim_connected = simulator_cpu();
    eprintln!("bench: {connected} agents connected; steady phase");
    release(&mut links).await?;
    let commands = if args.command_rate > 0.0 {
        let ids: Vec<String> = (0..args.agents).map(|i| agent_id(args, i)).collect();
        let api = Api::new(args.target, &args.api_key, super::client_config(None)?);
        Some(tokio::spawn(send_commands(
            api,
            ids,
            args.command_rate,
            Duration::from_secs_f64(args.steady_secs),
            args.command_connections.max(1),
        )))
    } else {
        None
    };
    let live = gather(&mut links, "steady-done").await?;
    let at_steady_end = sample();
    let sim_steady_end = simulator_cpu();
    eprintln!("bench: steady phase over, {live} agents connected; stopping");
    let (command_latency, command_sent, mut failures) = match commands {
        Some(task) => task.await?,
        None => (Samples::default(), 0, Failures::default()),
    };
    release(&mut links).await?;
    let mut reports = Vec::with_capacity(shards);
    for (i, link) in links.iter_mut().enumerate() {
        let line = link.recv().await?;
        match line.split_once(' ') {
            Some(("report", json)) => reports.push(serde_json::from_str::<ShardReport>(json)?),
            _ => anyhow::bail!("shard {i}: {line}"),
        }
    }
    let end = sample();

    let mut connect_latency = Samples::default();
    let mut heartbeat_latency = Samples::default();
    let (mut attempted, mut heartbeats_sent, mut acked_by_agents) = (0, 0, 0);
    let (mut connect_secs, mut upload_secs) = (0.0f64, 0.0f64);
    for r in reports {
        attempted += r.attempted;
        heartbeats_sent += r.heartbeats_sent;
        acked_by_agents += r.commands_acked;
        connect_secs = connect_secs.max(r.connect_secs);
        upload_secs = upload_secs.max(r.upload_secs);
        connect_latency.extend(r.connect_latency);
        heartbeat_latency.extend(r.heartbeat_latency);
        failures.merge(&r.failures);
    }
    let gateway = match (gateway, idle, at_connected, at_steady_end, end) {
        (Some(pid), Some(idle), Some(connected_s), Some(steady_end), Some(end)) => {
            Some(GatewayReport {
                pid,
                idle,
                connected: connected_s,
                steady_end,
                cpu_secs_connect: connected_s.cpu_secs - idle.cpu_secs,
                cpu_secs_steady: steady_end.cpu_secs - connected_s.cpu_secs,
                rss_per_agent_kib: if live > 0 {
                    (steady_end.rss_kib as f64 - idle.rss_kib as f64) / live as f64
                } else {
                    0.0
                },
                peak_rss_kib: end.peak_rss_kib,
            })
        }
        _ => None,
    };
    let command_ok = command_latency.len() as u64;
    Ok(FleetReport {
        mode: "fleet".into(),
        conditions: Conditions {
            target: args.target.to_string(),
            agents: args.agents,
            shards,
            connect_rate: args.connect_rate,
            connect_concurrency: args.connect_concurrency,
            heartbeat_secs: args.heartbeat_secs,
            steady_secs: args.steady_secs,
            command_rate: args.command_rate,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            fd_limit_soft: soft,
            fd_limit_hard: hard,
            ports_per_address: ports_per_address(args),
            source_addresses: args.agents.div_ceil(ports_per_address(args)),
        },
        uploads: Rate::new(uploaded, Duration::from_secs_f64(upload_secs)),
        connect: ConnectReport {
            attempted,
            connected,
            rate: Rate::new(connected, Duration::from_secs_f64(connect_secs)),
            latency: connect_latency.summary(),
        },
        heartbeats: HeartbeatReport {
            sent: heartbeats_sent,
            acked: heartbeat_latency.len() as u64,
            latency: heartbeat_latency.summary(),
        },
        commands: CommandReport {
            sent: command_sent,
            ok: command_ok,
            latency: command_latency.summary(),
            acked_by_agents,
        },
        connected_at_end: live,
        failures,
        gateway,
        simulator_cpu_secs_connect: sim_connected - sim_idle,
        simulator_cpu_secs_steady: sim_steady_end - sim_connected,
    })
}

impl FleetReport {
    pub fn print(&self) {
        let c = &self.conditions;
        let mut t = Table::new();
        t.row(
            "fleet",
            format!(
                "{} agents, {} shard(s), {} source address(es), {} CPUs, fd limit {}/{}",
                c.agents, c.shards, c.source_addresses, c.cpus, c.fd_limit_soft, c.fd_limit_hard
            ),
        );
        t.row(
            "uploads",
            format!(
                "{} in {:.1} s ({:.0}/s)",
                self.uploads.count, self.uploads.secs, self.uploads.per_sec
            ),
        );
        t.row(
            "connected",
            format!(
                "{}/{} in {:.2} s ({:.0}/s)",
                self.connect.connected,
                self.connect.attempted,
                self.connect.rate.secs,
                self.connect.rate.per_sec
            ),
        );
        t.latency("connect latency", &self.connect.latency);
        t.row(
            "heartbeats",
            format!(
                "{} sent, {} acked (every {} s for {} s)",
                self.heartbeats.sent, self.heartbeats.acked, c.heartbeat_secs, c.steady_secs
            ),
        );
        t.latency("heartbeat-ack latency", &self.heartbeats.latency);
        if self.commands.sent > 0 {
            t.row(
                "commands",
                format!(
                    "{} sent, {} ok at {}/s",
                    self.commands.sent, self.commands.ok, c.command_rate
                ),
            );
            t.latency("command round trip", &self.commands.latency);
        }
        t.row("connected at end", self.connected_at_end.to_string());
        t.row(
            "simulator CPU",
            format!(
                "{:.2} s connect, {:.2} s steady",
                self.simulator_cpu_secs_connect, self.simulator_cpu_secs_steady
            ),
        );
        if let Some(g) = &self.gateway {
            t.row(
                "gateway CPU",
                format!(
                    "{:.2} s connect, {:.2} s steady",
                    g.cpu_secs_connect, g.cpu_secs_steady
                ),
            );
            t.row(
                "gateway RSS",
                format!(
                    "idle {:.1} MiB, connected {:.1} MiB, end of steady {:.1} MiB, peak {:.1} MiB",
                    g.idle.rss_kib as f64 / 1024.0,
                    g.connected.rss_kib as f64 / 1024.0,
                    g.steady_end.rss_kib as f64 / 1024.0,
                    g.peak_rss_kib as f64 / 1024.0
                ),
            );
            t.row(
                "gateway RSS per agent",
                format!("{:.1} KiB", g.rss_per_agent_kib),
            );
        }
        t.failures(&self.failures);
        t.print();
    }
}

fn agent_id(args: &FleetArgs, index: usize) -> String {
    format!("{}{index:06}", args.id_prefix)
}

/// Binding to a source address before `connect` makes the kernel search that address's
/// ports for a free one, and the search slows down as the address fills up (measured:
/// the simulator's CPU per connect went from 0.7 ms at 5,000 agents on 127.0.0.1 to 4 ms
/// at 19,800), so by default the fleet takes [`DEFAULT_PER_ADDRESS`] ports per address.
fn ports_per_address(args: &FleetArgs) -> usize {
    match args.ports_per_address {
        0 => DEFAULT_PER_ADDRESS,
        n => n,
    }
    .min(sys::ports_per_address())
}

const DEFAULT_PER_ADDRESS: usize = 1_000;

/// One shard: agents `[index * N / count, (index + 1) * N / count)`.
async fn shard(
    args: &FleetArgs,
    index: usize,
    count: usize,
    link: &mut Link,
) -> anyhow::Result<ShardReport> {
    let first = index * args.agents / count;
    let last = (index + 1) * args.agents / count;
    let mut report = ShardReport::default();

    // Phase 1: certificates.
    let ids: Vec<(usize, String)> = (first..last).map(|i| (i, agent_id(args, i))).collect();
    let certs = tokio::task::spawn_blocking(move || {
        ids.into_iter()
            .map(|(i, id)| super::bench_cert(&id).map(|c| (i, c)))
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    let certs = Arc::new(certs);
    let api = Api::new(args.target, &args.api_key, super::client_config(None)?);
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut uploaders = Vec::new();
    for _ in 0..args.upload_concurrency.max(1) {
        let (api, certs, next) = (api.clone(), certs.clone(), next.clone());
        uploaders.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut failures = Failures::default();
            let mut conn = None;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some((i, cert)) = certs.get(n) else { break };
                if conn.is_none() {
                    conn = api.connect().await.ok();
                }
                let result = match conn.as_mut() {
                    Some(c) => c.upload(&cert.agent_id, &cert.cert_pem).await,
                    None => Err(anyhow::anyhow!("cannot connect to the API")),
                };
                match result {
                    Ok(()) => done.push(*i),
                    Err(e) => {
                        conn = None;
                        failures.add(format!("upload: {}", agent::short(&e.to_string())));
                    }
                }
            }
            (done, failures)
        }));
    }
    let mut uploaded = Vec::new();
    for u in uploaders {
        let (done, failures) = u.await?;
        uploaded.extend(done);
        report.failures.merge(&failures);
    }
    uploaded.sort_unstable();
    report.uploaded = uploaded.len() as u64;
    report.upload_secs = started.elapsed().as_secs_f64();
    barrier(link, "uploaded", report.uploaded).await?;

    // Phase 2: connect.
    let (phase_tx, phase_rx) = watch::channel(Phase::Connect);
    let (results_tx, mut results_rx) = mpsc::unbounded_channel::<Result<Duration, String>>();
    let concurrency = (args.connect_concurrency / count).max(1);
    let permits = Arc::new(Semaphore::new(concurrency));
    let rate = args.connect_rate / count as f64;
    let per_address = ports_per_address(args);
    let interval = Duration::from_secs_f64(args.heartbeat_secs);
    let connect_timeout = Duration::from_secs(args.connect_timeout_secs);
    let live = Arc::new(AtomicU64::new(0));
    let target = args.target;
    let n_shard = uploaded.len().max(1);
    let by_index: std::collections::HashMap<usize, Arc<rustls::ClientConfig>> =
        certs.iter().map(|(i, c)| (*i, c.tls.clone())).collect();
    let spawn_order: Vec<(usize, Arc<rustls::ClientConfig>)> = uploaded
        .iter()
        .filter_map(|i| by_index.get(i).map(|tls| (*i, tls.clone())))
        .collect();
    drop(by_index);
    let attempted = spawn_order.len();
    report.attempted = attempted as u64;
    let started = Instant::now();
    let spawner = {
        let (permits, phase_rx, live) = (permits.clone(), phase_rx.clone(), live.clone());
        tokio::spawn(async move {
            let mut ticks = (rate > 0.0).then(|| {
                let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
                t.set_missed_tick_behavior(MissedTickBehavior::Burst);
                t
            });
            let mut tasks = Vec::with_capacity(spawn_order.len());
            for (k, (i, tls)) in spawn_order.into_iter().enumerate() {
                if let Some(t) = ticks.as_mut() {
                    t.tick().await;
                }
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let (results, phase, live) = (results_tx.clone(), phase_rx.clone(), live.clone());
                // Spread the heartbeats of the fleet evenly over one interval.
                let offset = interval.mul_f64(k as f64 / n_shard as f64);
                tasks.push(tokio::spawn(async move {
                    let t0 = Instant::now();
                    let source = sys::source_address(i, per_address);
                    let opened =
                        tokio::time::timeout(connect_timeout, agent::open(target, source, tls))
                            .await;
                    drop(permit);
                    let ws = match opened {
                        Ok(Ok(ws)) => ws,
                        Ok(Err(reason)) => {
                            let _ = results.send(Err(reason));
                            return None;
                        }
                        Err(_) => {
                            let _ = results.send(Err("connect: timeout".into()));
                            return None;
                        }
                    };
                    live.fetch_add(1, Ordering::Relaxed);
                    let _ = results.send(Ok(t0.elapsed()));
                    drop(results);
                    let outcome = agent::run_session(ws, phase, interval, offset).await;
                    if outcome.failure.is_some() {
                        live.fetch_sub(1, Ordering::Relaxed);
                    }
                    Some(outcome)
                }));
            }
            tasks
        })
    };
    let mut last_success = started;
    for _ in 0..attempted {
        match results_rx.recv().await {
            Some(Ok(latency)) => {
                report.connected += 1;
                report.connect_latency.push(latency);
                last_success = Instant::now();
            }
            Some(Err(reason)) => report.failures.add(reason),
            None => break,
        }
    }
    report.connect_secs = (last_success - started).as_secs_f64();
    let tasks = spawner.await?;
    barrier(link, "connected", report.connected).await?;

    // Phase 3: steady.
    let _ = phase_tx.send(Phase::Steady);
    tokio::time::sleep(Duration::from_secs_f64(args.steady_secs)).await;
    report.connected_at_end = live.load(Ordering::Relaxed);
    barrier(link, "steady-done", report.connected_at_end).await?;

    // Phase 4: stop.
    let _ = phase_tx.send(Phase::Stop);
    for task in tasks {
        if let Some(outcome) = task.await? {
            report.heartbeats_sent += outcome.heartbeats_sent;
            report.heartbeat_latency.extend(outcome.heartbeat_latency);
            report.commands_acked += outcome.commands_acked;
            if let Some(reason) = outcome.failure {
                report.failures.add(reason);
            }
        }
    }
    Ok(report)
}

/// Sends `rate` commands per second for `duration` to the agents in turn, on `conns`
/// kept-alive API connections.
async fn send_commands(
    api: Api,
    ids: Vec<String>,
    rate: f64,
    duration: Duration,
    conns: usize,
) -> (Samples, u64, Failures) {
    let total = (rate * duration.as_secs_f64()).floor() as u64;
    let (tx, rx) = mpsc::channel::<u64>(conns * 2);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let ids = Arc::new(ids);
    let mut workers = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (api, rx, ids) = (api.clone(), rx.clone(), ids.clone());
        workers.push(tokio::spawn(async move {
            let mut latency = Samples::default();
            let mut failures = Failures::default();
            let mut conn = None;
            loop {
                let Some(seq) = rx.lock().await.recv().await else {
                    break;
                };
                let id = &ids[(seq as usize) % ids.len()];
                if conn.is_none() {
                    conn = api.connect().await.ok();
                }
                let Some(c) = conn.as_mut() else {
                    failures.add("command: cannot connect to the API");
                    continue;
                };
                let t0 = Instant::now();
                match c.command(id, seq).await {
                    Ok(()) => latency.push(t0.elapsed()),
                    Err(reason) => {
                        conn = None;
                        failures.add(reason);
                    }
                }
            }
            (latency, failures)
        }));
    }
    let mut failures = Failures::default();
    let mut sent = 0;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    for seq in 0..total {
        ticks.tick().await;
        match tx.try_send(seq) {
            Ok(()) => sent += 1,
            Err(_) => failures.add("command: all API connections busy (client saturated)"),
        }
    }
    drop(tx);
    let mut latency = Samples::default();
    for w in workers {
        if let Ok((l, f)) = w.await {
            latency.extend(l);
            failures.merge(&f);
        }
    }
    (latency, sent, failures)
}

/// One side of the phase exchange between the coordinator and a shard: lines of text.
enum Link {
    /// In-process (one shard).
    Local {
        tx: mpsc::UnboundedSender<String>,
        rx: mpsc::UnboundedReceiver<String>,
    },
    /// A shard process talking to its coordinator.
    Stdio {
        out: tokio::io::Stdout,
        lines: Lines<BufReader<tokio::io::Stdin>>,
    },
    /// The coordinator talking to a shard process.
    Child {
        child: tokio::process::Child,
        stdin: tokio::process::ChildStdin,
        lines: Lines<BufReader<tokio::process::ChildStdout>>,
    },
}

impl Link {
    fn pid(&self) -> Option<u32> {
        match self {
            Link::Child { child, .. } => child.id(),
            _ => None,
        }
    }

    async fn send(&mut self, line: String) -> anyhow::Result<()> {
        match self {
            Link::Local { tx, .. } => tx
                .send(line)
                .map_err(|_| anyhow::anyhow!("the other side of the fleet is gone")),
            Link::Stdio { out, .. } => {
                out.write_all(format!("{line}\n").as_bytes()).await?;
                Ok(out.flush().await?)
            }
            Link::Child { stdin, .. } => {
                stdin.write_all(format!("{line}\n").as_bytes()).await?;
                Ok(stdin.flush().await?)
            }
        }
    }

    async fn recv(&mut self) -> anyhow::Result<String> {
        let line = match self {
            Link::Local { rx, .. } => rx.recv().await,
            Link::Stdio { lines, .. } => lines.next_line().await?,
            Link::Child { lines, .. } => lines.next_line().await?,
        };
        line.ok_or_else(|| anyhow::anyhow!("the other side of the fleet ended"))
    }
}

/// Shard side: report `stage` with a count, then wait for the coordinator's go.
async fn barrier(link: &mut Link, stage: &str, n: u64) -> anyhow::Result<()> {
    link.send(format!("{stage} {n}")).await?;
    match link.recv().await?.as_str() {
        "go" => Ok(()),
        other => anyhow::bail!("expected go from the coordinator, got {other:?}"),
    }
}

/// Coordinator side: waits until every shard reached `stage`; returns the sum of counts.
async fn gather(links: &mut [Link], stage: &str) -> anyhow::Result<u64> {
    let mut sum = 0;
    for (i, link) in links.iter_mut().enumerate() {
        let line = link.recv().await?;
        match line.split_once(' ') {
            Some((s, n)) if s == stage => sum += n.parse::<u64>()?,
            _ => anyhow::bail!("shard {i}: expected {stage}, got {}", agent::short(&line)),
        }
    }
    Ok(sum)
}

async fn release(links: &mut [Link]) -> anyhow::Result<()> {
    for link in links.iter_mut() {
        link.send("go".into()).await?;
    }
    Ok(())
}
