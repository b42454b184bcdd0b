//! `agentgate-bench propagation`: how long an upload (and a deletion) made on one node
//! takes to reach another node of a cluster (issue 9, "upload-to-other-node propagation").
//!
//! For each of `--uploads` fresh agents, one task uploads the certificate on `--from`
//! while another polls `GET /agent/certificate/{id}` on `--to` (a kept-alive connection,
//! about 0.1 ms per poll on loopback) until it answers 200; then the same for the
//! deletion, until `--to` answers 404. `GET` reads the same index as the handshake, so
//! "visible" means "the next handshake on `--to` accepts it". Times are measured from the
//! moment the request to `--from` is sent; the upload's own latency is reported beside
//! them, so the part pub/sub adds can be read off.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use tokio::time::Instant;

use crate::api::{Api, ApiConn};
use crate::report::{Samples, Summary, Table};

#[derive(Args, Debug, Clone)]
pub struct PropagationArgs {
    /// The node that takes the uploads and deletions (loopback only).
    #[arg(long)]
    pub from: SocketAddr,
    /// The node whose index is watched (loopback only).
    #[arg(long)]
    pub to: SocketAddr,
    #[arg(long, env = "API_KEY")]
    pub api_key: String,
    /// Agents uploaded then deleted, one after the other.
    #[arg(long, default_value_t = 500)]
    pub uploads: usize,
    /// Agent id prefix (agents `<prefix>-<n>` are created and deleted).
    #[arg(long, default_value = "prop")]
    pub prefix: String,
    /// Give up on one change after this long (counted as a failure).
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct PropagationReport {
    pub uploads: usize,
    /// `POST /agent/certificate` on `--from`, until its answer.
    pub upload: Summary,
    /// From the upload's request until `--to` shows the certificate.
    pub upload_visible: Summary,
    /// `DELETE /agent/certificate/{id}` on `--from`, until its answer.
    pub delete: Summary,
    /// From the deletion's request until `--to` no longer has the certificate.
    pub delete_visible: Summary,
    pub failures: u64,
}

impl PropagationReport {
    pub fn print(&self) {
        let mut t = Table::new();
        t.row(
            "changes",
            format!("{} uploads, then their deletions", self.uploads),
        );
        t.latency("upload on --from (answer)", &self.upload);
        t.latency("upload visible on --to", &self.upload_visible);
        t.latency("delete on --from (answer)", &self.delete);
        t.latency("delete visible on --to", &self.delete_visible);
        t.row("failures", self.failures.to_string());
        t.print();
    }
}

pub async fn run(args: PropagationArgs) -> anyhow::Result<PropagationReport> {
    crate::check_loopback(args.from)?;
    crate::check_loopback(args.to)?;
    let ids: Vec<String> = (0..args.uploads)
        .map(|i| format!("{}-{i}", args.prefix))
        .collect();
    let certs = tokio::task::spawn_blocking(move || {
        ids.iter()
            .map(|id| crate::bench_cert(id))
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    let tls = crate::client_config(None)?;
    let mut from = Api::new(args.from, &args.api_key, tls.clone())
        .connect()
        .await?;
    let mut to = Api::new(args.to, &args.api_key, tls).connect().await?;
    let limit = Duration::from_secs(args.timeout_secs);
    let (mut upload, mut upload_visible) = (Samples::default(), Samples::default());
    let (mut delete, mut delete_visible) = (Samples::default(), Samples::default());
    let mut failures = 0;
    for cert in &certs {
        let path = format!("/agent/certificate/{}", cert.agent_id);
        let started = Instant::now();
        let (answered, seen) = tokio::join!(
            async {
                from.upload(&cert.agent_id, &cert.cert_pem).await?;
                anyhow::Ok(started.elapsed())
            },
            wait_status(&mut to, &path, 200, started, limit),
        );
        match (answered, seen) {
            (Ok(a), Ok(s)) => {
                upload.push(a);
                upload_visible.push(s);
            }
            _ => {
                failures += 1;
                continue;
            }
        }
        let started = Instant::now();
        let (answered, seen) = tokio::join!(
            async {
                let status = from.status_of(http::Method::DELETE, &path).await?;
                anyhow::ensure!(status == 200, "delete: HTTP {status}");
                anyhow::Ok(started.elapsed())
            },
            wait_status(&mut to, &path, 404, started, limit),
        );
        match (answered, seen) {
            (Ok(a), Ok(s)) => {
                delete.push(a);
                delete_visible.push(s);
            }
            _ => failures += 1,
        }
    }
    let report = PropagationReport {
        uploads: args.uploads,
        upload: upload.summary(),
        upload_visible: upload_visible.summary(),
        delete: delete.summary(),
        delete_visible: delete_visible.summary(),
        failures,
    };
    if let Some(path) = &args.json {
        crate::report::write_json(path, &report)?;
    }
    Ok(report)
}

/// Polls `path` on `conn` until it answers `want`; the time since `started`.
async fn wait_status(
    conn: &mut ApiConn,
    path: &str,
    want: u16,
    started: Instant,
    limit: Duration,
) -> anyhow::Result<Duration> {
    loop {
        if conn.status_of(http::Method::GET, path).await? == want {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(started.elapsed() < limit, "{path} never answered {want}");
    }
}
