//! Phase 3, steady, and phase 4, stop: every connected agent sends a heartbeat every
//! `--heartbeat-secs` and times its `heartbeat_ack` for `--steady-secs` (the commands
//! arrive meanwhile, [`super::commands`]); then the connections are reset and each
//! agent's counts are added to the shard's report.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::connect::Fleet;
use super::{FleetArgs, ShardReport};
use crate::agent::Phase;

/// Runs the steady phase; returns the agents still connected at its end.
pub(super) async fn heartbeats(args: &FleetArgs, fleet: &Fleet) -> u64 {
    let _ = fleet.phase.send(Phase::Steady);
    tokio::time::sleep(Duration::from_secs_f64(args.steady_secs)).await;
    fleet.live.load(Ordering::Relaxed)
}

/// Stops every agent and adds what each measured to `report`.
pub(super) async fn stop(fleet: Fleet, report: &mut ShardReport) -> anyhow::Result<()> {
    let _ = fleet.phase.send(Phase::Stop);
    for task in fleet.tasks {
        if let Some(outcome) = task.await? {
            report.heartbeats_sent += outcome.heartbeats_sent;
            report.heartbeat_latency.extend(outcome.heartbeat_latency);
            report.commands_acked += outcome.commands_acked;
            if let Some(reason) = outcome.failure {
                report.failures.add(reason);
            }
        }
    }
    Ok(())
}
