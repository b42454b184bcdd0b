//! The fleet's report: what each shard measured, the merged report of the run, and its
//! table.

use serde::{Deserialize, Serialize};

use crate::report::{Failures, Rate, Samples, Summary, Table};
use crate::sys::ProcSample;

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
pub(super) struct ShardReport {
    pub(super) uploaded: u64,
    pub(super) upload_secs: f64,
    pub(super) attempted: u64,
    pub(super) connected: u64,
    pub(super) connect_secs: f64,
    pub(super) connect_latency: Samples,
    pub(super) heartbeats_sent: u64,
    pub(super) heartbeat_latency: Samples,
    pub(super) commands_acked: u64,
    pub(super) connected_at_end: u64,
    pub(super) failures: Failures,
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
