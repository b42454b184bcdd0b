//! The commands of the steady phase: the coordinator sends `--command-rate` commands per
//! second through `POST /agents/{id}/commands` (the gateway emits each to its agent, which
//! acks it) and times each HTTP round trip.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::api::Api;
use crate::report::{Failures, Samples};

/// Sends `rate` commands per second for `duration` to the agents in turn, on `conns`
/// kept-alive API connections.
pub(super) async fn send_commands(
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
