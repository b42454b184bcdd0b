//! The `agentgate` command line: parses arguments and calls the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use agentgate::log_writer::{BatchWriter, Flush};
use clap::{Parser, Subcommand};

use agentgate::config::{Config, LogFormat, TlsSource};
use agentgate::identity::AgentId;

#[derive(Parser)]
#[command(
    name = "agentgate",
    version,
    about = "mTLS gateway for orchestrator agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// TOML configuration file (optional; environment variables override it).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Agent certificate tools.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// The shared state of a cluster (`[cluster]` in the configuration).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Validate a configuration and print the effective settings (secrets masked).
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Load a one-node certificate directory (CERT_STORAGE_DIR) into Redis, once: agents
    /// Redis already has are left as they are, so running it again imports nothing.
    Import {
        /// The directory of `<agent_id>.pem` files.
        #[arg(long)]
        from: PathBuf,
        /// TOML configuration file with the `[cluster]` section (environment variables
        /// override it, as for `serve`).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Write a self-signed ECDSA P-256 agent certificate and key.
    Generate {
        /// The agent id; becomes the certificate's CN.
        #[arg(long)]
        agent_id: String,
        /// Output directory for <agent_id>.crt and <agent_id>.key.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => match Config::load(config.as_deref()) {
            Ok(c) => {
                if let Err(e) = agentgate::proxy::Proxy::check_files(&c) {
                    return fail(&e);
                }
                println!("# configuration is valid; effective settings:");
                print!("{}", c.to_masked_toml());
                if let TlsSource::Acme(acme) = &c.tls {
                    print!("{}", agentgate::tls::acme::report(acme, c.cluster.as_ref()));
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Store {
            command: StoreCommand::Import { from, config },
        } => store_import(config, from),
        Command::Cert {
            command:
                CertCommand::Generate {
                    agent_id,
                    out,
                    days,
                },
        } => {
            let id = match AgentId::parse(&agent_id) {
                Ok(id) => id,
                Err(e) => return fail(&format!("--agent-id: {e}")),
            };
            let result = agentgate::certgen::generate(&id, days).and_then(|cert| {
                agentgate::certgen::write(&out, &id, &cert).map(|paths| (cert, paths))
            });
            match result {
                Ok((cert, (cert_path, key_path))) => {
                    println!("certificate: {}", cert_path.display());
                    println!(
                        "private key: {} (mode 0600; keep it on the agent)",
                        key_path.display()
                    );
                    println!("sha256 fingerprint: {}", cert.fingerprint);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
    }
}

fn serve(config_path: Option<PathBuf>) -> ExitCode {
    let config = match Config::load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let log = match init_logging(config.log_format) {
        Ok(guard) => guard,
        Err(e) => return fail(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the tokio runtime: {e}")),
    };
    match runtime.block_on(agentgate::run(
        config,
        config_path,
        agentgate::signal::shutdown(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            // The log line first, then the message of `fail`.
            drop(log);
            fail(&format!("{e:#}"))
        }
    }
}

fn store_import(config_path: Option<PathBuf>, from: PathBuf) -> ExitCode {
    let config = match Config::load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let Some(cluster) = config.cluster else {
        return fail(
            &"store import needs a [cluster] section (cluster.redis_url) in the configuration",
        );
    };
    let _log = match init_logging(config.log_format) {
        Ok(guard) => guard,
        Err(e) => return fail(&e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the tokio runtime: {e}")),
    };
    match runtime.block_on(agentgate::store::import::import(&cluster, &from)) {
        Ok(report) => {
            for s in &report.unreadable {
                eprintln!("skipped {}: {}", s.path.display(), s.reason);
            }
            println!(
                "imported {} certificates into {}; skipped {} already there and {} unreadable files",
                report.imported,
                cluster.redis_url,
                report.already_present,
                report.unreadable.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("store import from {}: {e}", from.display())),
    }
}

/// Logs go to stderr; colours only when stderr is a terminal (a file, journald or a
/// container log gets plain text). An unparsable `RUST_LOG` stops start-up rather than
/// silently logging something else.
///
/// A line is formatted on the thread that logs it and written to stderr in batches by a
/// thread of its own (`log_writer`): under load one `write` per batch instead of one per
/// line on the runtime's threads (the proxy's access log; BENCHMARKS.md, "Proxy"). No line
/// is dropped, and lines appear within a few milliseconds; the returned guard writes what
/// is left when it is dropped, so it lives as long as the command.
fn init_logging(format: LogFormat) -> Result<Flush, String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => tracing_subscriber::EnvFilter::try_new(&spec)
            .map_err(|e| {
                format!("environment variable RUST_LOG={spec:?} is not a log filter: {e}")
            })?,
        _ => tracing_subscriber::EnvFilter::new("info"),
    };
    let (writer, guard) = BatchWriter::new(std::io::stderr())
        .map_err(|e| format!("cannot start the log writer thread: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    match format {
        LogFormat::Text => builder
            .fmt_fields(agentgate::log_fields::FastFields)
            .event_format(agentgate::log_fields::FastFormat::default())
            .init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(guard)
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("agentgate: {e}");
    ExitCode::from(2)
}
