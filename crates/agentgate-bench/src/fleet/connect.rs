//! Phase 2, connect: the uploaded agents connect (mTLS, WebSocket, Socket.IO namespace
//! connect) at `--connect-rate` per second, or as fast as `--connect-concurrency` allows,
//! each from its source address in 127.0.0.0/8; each connected agent then lives in its
//! own task ([`agent::run_session`]) until the fleet stops.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::upload::Certs;
use super::{FleetArgs, ShardReport, ports_per_address};
use crate::agent::{self, Phase, SessionOutcome};
use crate::sys;

/// The connected part of a shard's fleet.
pub(super) struct Fleet {
    /// Moves every agent to the next phase.
    pub(super) phase: watch::Sender<Phase>,
    /// Agents connected now (a session that fails counts itself out).
    pub(super) live: Arc<AtomicU64>,
    /// One task per attempted agent; `None` for those that never connected.
    pub(super) tasks: Vec<JoinHandle<Option<SessionOutcome>>>,
}

/// Connects the agents in `uploaded` of `count` shards; counts, latencies and failures go
/// into `report`. Returns when every attempt has succeeded or failed.
pub(super) async fn run(
    args: &FleetArgs,
    count: usize,
    certs: &Certs,
    uploaded: &[usize],
    report: &mut ShardReport,
) -> anyhow::Result<Fleet> {
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
    let by_index: HashMap<usize, Arc<rustls::ClientConfig>> =
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
    Ok(Fleet {
        phase: phase_tx,
        live,
        tasks,
    })
}
