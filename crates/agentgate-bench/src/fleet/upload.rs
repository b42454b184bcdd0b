//! Phase 1, upload: each agent of the shard gets its own rcgen certificate, uploaded with
//! `POST /agent/certificate` on `--upload-concurrency` kept-alive API connections (the
//! gateway's next handshake sees it; nothing is reloaded).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::time::Instant;

use super::{FleetArgs, ShardReport, agent_id};
use crate::api::Api;
use crate::report::Failures;
use crate::{BenchCert, agent};

/// The shard's agents: index in the fleet and certificate.
pub(super) type Certs = Arc<Vec<(usize, BenchCert)>>;

/// Generates and uploads the certificates of agents `first..last`; returns them and the
/// indices of those uploaded (sorted). Counts and failures go into `report`.
pub(super) async fn run(
    args: &FleetArgs,
    first: usize,
    last: usize,
    report: &mut ShardReport,
) -> anyhow::Result<(Certs, Vec<usize>)> {
    let ids: Vec<(usize, String)> = (first..last).map(|i| (i, agent_id(args, i))).collect();
    let certs = tokio::task::spawn_blocking(move || {
        ids.into_iter()
            .map(|(i, id)| crate::bench_cert(&id).map(|c| (i, c)))
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    let certs = Arc::new(certs);
    let api = Api::new(args.target, &args.api_key, crate::client_config(None)?);
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
    Ok((certs, uploaded))
}
