//! The phase exchange between the coordinator and its shards: one line of text per step
//! (`<stage> <count>` from a shard, `go` from the coordinator, `report <json>` at the
//! end), over the stdin/stdout of shard processes or over channels with one shard.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::sync::mpsc;

use super::{FleetArgs, ShardReport, shard};
use crate::agent;

/// Starts the shards: one in this process over channels, or `shards` copies of this
/// command as child processes (each with its own file-descriptor budget).
pub(super) fn spawn_shards(args: &FleetArgs, shards: usize) -> anyhow::Result<Vec<Link>> {
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
    Ok(links)
}

/// A shard process's link to its coordinator: its own stdin and stdout.
pub(super) fn to_coordinator() -> Link {
    Link::Stdio {
        out: tokio::io::stdout(),
        lines: BufReader::new(tokio::io::stdin()).lines(),
    }
}

/// Coordinator side, at the end: each shard's report.
pub(super) async fn collect_reports(links: &mut [Link]) -> anyhow::Result<Vec<ShardReport>> {
    let mut reports = Vec::with_capacity(links.len());
    for (i, link) in links.iter_mut().enumerate() {
        let line = link.recv().await?;
        match line.split_once(' ') {
            Some(("report", json)) => reports.push(serde_json::from_str::<ShardReport>(json)?),
            _ => anyhow::bail!("shard {i}: {line}"),
        }
    }
    Ok(reports)
}

/// One side of the phase exchange between the coordinator and a shard: lines of text.
pub(super) enum Link {
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
    pub(super) fn pid(&self) -> Option<u32> {
        match self {
            Link::Child { child, .. } => child.id(),
            _ => None,
        }
    }

    pub(super) async fn send(&mut self, line: String) -> anyhow::Result<()> {
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

    pub(super) async fn recv(&mut self) -> anyhow::Result<String> {
        let line = match self {
            Link::Local { rx, .. } => rx.recv().await,
            Link::Stdio { lines, .. } => lines.next_line().await?,
            Link::Child { lines, .. } => lines.next_line().await?,
        };
        line.ok_or_else(|| anyhow::anyhow!("the other side of the fleet ended"))
    }
}

/// Shard side: report `stage` with a count, then wait for the coordinator's go.
pub(super) async fn barrier(link: &mut Link, stage: &str, n: u64) -> anyhow::Result<()> {
    link.send(format!("{stage} {n}")).await?;
    match link.recv().await?.as_str() {
        "go" => Ok(()),
        other => anyhow::bail!("expected go from the coordinator, got {other:?}"),
    }
}

/// Coordinator side: waits until every shard reached `stage`; returns the sum of counts.
pub(super) async fn gather(links: &mut [Link], stage: &str) -> anyhow::Result<u64> {
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

pub(super) async fn release(links: &mut [Link]) -> anyhow::Result<()> {
    for link in links.iter_mut() {
        link.send("go".into()).await?;
    }
    Ok(())
}
