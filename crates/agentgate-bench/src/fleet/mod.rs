//! `agentgate-bench fleet`: N simulated agents against a running gateway.
//!
//! A run has four phases, and every shard goes through them in step; one file each:
//!
//! 1. `upload.rs`: each agent gets its own rcgen certificate, uploaded with
//!    `POST /agent/certificate` (the next handshake sees it; nothing is reloaded);
//! 2. `connect.rs`: agents connect (mTLS, WebSocket, Socket.IO namespace connect) at
//!    `--connect-rate` per second, or as fast as `--connect-concurrency` allows;
//! 3. `steady.rs`: every agent sends a heartbeat every `--heartbeat-secs` and times its
//!    `heartbeat_ack`; `commands.rs`: commands go out at `--command-rate` through the API
//!    and the agents ack them;
//! 4. stop (`steady.rs`): connections are reset; the shards report (`report.rs`).
//!
//! One process holds at most as many agents as its file-descriptor limit allows, so
//! `--shards K` runs K copies of this command as child processes, each with its own fd
//! budget and its slice of the fleet; the parent (the coordinator) releases the phases
//! when every shard has reached them (one line per phase on the children's stdin/stdout),
//! samples the gateway's `/proc` entry between phases, sends the commands, and merges the
//! shards' reports (`link.rs`). With one shard the same exchange runs over in-process
//! channels.

mod commands;
mod connect;
mod link;
mod report;
mod steady;
mod upload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use self::link::{Link, barrier, gather, release};
use self::report::ShardReport;
pub use self::report::{
    CommandReport, Conditions, ConnectReport, FleetReport, GatewayReport, HeartbeatReport,
};
use crate::api::Api;
use crate::report::{Failures, Rate, Samples};
use crate::sys;

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
    /// Send the commands through this node's API instead of `--target`'s (a loopback
    /// address): with two clustered nodes, a command then crosses Redis to the node the
    /// agent is connected to (BENCHMARKS.md, "Several nodes").
    #[arg(long)]
    pub command_target: Option<SocketAddr>,
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

/// Runs `agentgate-bench fleet`: the coordinator, or one shard when `--shard-index` is set.
pub async fn run(args: FleetArgs) -> anyhow::Result<Option<FleetReport>> {
    crate::check_loopback(args.target)?;
    if let Some(t) = args.command_target {
        crate::check_loopback(t)?;
    }
    anyhow::ensure!(args.agents > 0, "--agents must be at least 1");
    anyhow::ensure!(
        args.heartbeat_secs > 0.0,
        "--heartbeat-secs must be positive"
    );
    let (soft, hard) = sys::raise_fd_limit();
    let shards = args.shards.max(1);
    if let Some(index) = args.shard_index {
        // A child: the coordinator reads our stdout, so the report goes there too.
        let mut link = link::to_coordinator();
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
    let mut links = link::spawn_shards(args, shards)?;
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
        let via = args.command_target.unwrap_or(args.target);
        let api = Api::new(via, &args.api_key, crate::client_config(None)?);
        Some(tokio::spawn(commands::send_commands(
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
    let reports = link::collect_reports(&mut links).await?;
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

/// One shard: agents `[index * N / count, (index + 1) * N / count)`, through the phases
/// in step with the other shards.
async fn shard(
    args: &FleetArgs,
    index: usize,
    count: usize,
    link: &mut Link,
) -> anyhow::Result<ShardReport> {
    let first = index * args.agents / count;
    let last = (index + 1) * args.agents / count;
    let mut report = ShardReport::default();

    let (certs, uploaded) = upload::run(args, first, last, &mut report).await?;
    barrier(link, "uploaded", report.uploaded).await?;

    let fleet = connect::run(args, count, &certs, &uploaded, &mut report).await?;
    drop(certs);
    barrier(link, "connected", report.connected).await?;

    report.connected_at_end = steady::heartbeats(args, &fleet).await;
    barrier(link, "steady-done", report.connected_at_end).await?;

    steady::stop(fleet, &mut report).await?;
    Ok(report)
}
