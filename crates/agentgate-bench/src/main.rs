//! The `agentgate-bench` command line: parses arguments and calls the library.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test and bench tooling: a failure should stop loudly

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use agentgate_bench::{fleet, handshakes, propagation, proxy, report, upstream};

#[derive(Parser)]
#[command(
    name = "agentgate-bench",
    version,
    about = "Measure a running agentgate on this machine (see BENCHMARKS.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate a fleet of agents: upload, connect, heartbeats, commands.
    Fleet(fleet::FleetArgs),
    /// Full mTLS handshakes per second against a TLS server (the gateway or nginx).
    Handshakes(handshakes::HandshakeArgs),
    /// Upload-to-other-node propagation between two nodes of a cluster.
    Propagation(propagation::PropagationArgs),
    /// Request latency at fixed rates through proxies and directly (open loop).
    Proxy(proxy::ProxyArgs),
    /// The upstream of the proxy benchmark: a small HTTP server (and optionally TLS).
    Upstream(upstream::UpstreamArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the tokio runtime: {e}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Fleet(args) => {
                let json = args.json.clone();
                // A shard of a `--shards` run reports to its coordinator instead.
                if let Some(report) = fleet::run(args).await? {
                    report.print();
                    if let Some(path) = json {
                        report::write_json(&path, &report)?;
                    }
                }
            }
            Command::Handshakes(args) => {
                let json = args.json.clone();
                let report = handshakes::run(args).await?;
                report.print();
                if let Some(path) = json {
                    report::write_json(&path, &report)?;
                }
            }
            Command::Propagation(args) => propagation::run(args).await?.print(),
            Command::Proxy(args) => {
                let json = args.json.clone();
                let report = proxy::run(args).await?;
                report.print();
                if let Some(path) = json {
                    report::write_json(&path, &report)?;
                }
            }
            Command::Upstream(args) => upstream::run(args).await?,
        }
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}")),
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("agentgate-bench: {e}");
    ExitCode::from(2)
}
