//! The `kinesis-fanout` binary: command line, logging, signals. Everything else is in the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

mod commands;

use clap::{Parser, Subcommand};
use commands::{check, deregister_consumer, leases, replay, run};
use kinesis_fanout::Settings;
use kinesis_fanout::config::{ConfigError, LogFormat, LogSettings};

/// jemalloc, with the settings compiled in from `.cargo/config.toml`: resident memory keeps within
/// `memory.limit` whatever environment the binary starts in.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Copies one Kinesis stream to every stream matching a pattern, through Enhanced Fan-Out.
#[derive(Debug, Parser)]
#[command(name = "kinesis-fanout", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the service until SIGTERM or SIGINT; SIGHUP reloads the destination groups from the
    /// configuration file.
    Run {
        /// The TOML configuration file.
        #[arg(long, env = "KINESIS_FANOUT_CONFIG")]
        config: Option<PathBuf>,
        /// File backend: move the checkpoint file aside (kept as `<path>.reset-<unix time>`) and
        /// start from source.initial_position. For a corrupt file, and only on purpose.
        #[arg(long)]
        reset_checkpoints: bool,
    },
    /// Validates the configuration, resolves the source stream, and explains every stream of
    /// every region and identity the destination groups use: a destination (of which group) or
    /// not, and why, or unreachable. Writes nothing.
    Check {
        /// The TOML configuration file.
        #[arg(long, env = "KINESIS_FANOUT_CONFIG")]
        config: Option<PathBuf>,
        /// Also say what every group thought of every stream (the first matching group wins).
        #[arg(long)]
        explain: bool,
        /// One JSON document instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// One row per lease (or per checkpointed shard with the file backend): owner, counter,
    /// checkpoint and each destination's own position, parents and children, state (owned, free,
    /// expired as seen now, finished) and lag. Read-only.
    Leases {
        /// The TOML configuration file.
        #[arg(long, env = "KINESIS_FANOUT_CONFIG")]
        config: Option<PathBuf>,
        /// Watch the table this long to tell expired leases (counter not moving) from owned ones
        /// [checkpoint.failover_time]; 0s: one read, no expiry verdict.
        #[arg(long, value_parser = humantime::parse_duration)]
        observe: Option<std::time::Duration>,
        /// One JSON document instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Dead-letter stream tools.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// The service's Enhanced Fan-Out consumer.
    #[command(subcommand)]
    Consumer(ConsumerCommand),
    /// Probes `/healthz` of a running service (for container health checks: distroless has no
    /// curl). Exits 0 when it answers 200.
    Healthcheck {
        /// The configuration file, whose metrics.listen is probed.
        #[arg(long, env = "KINESIS_FANOUT_CONFIG")]
        config: Option<PathBuf>,
        /// Probe this address (host:port) instead of the configured one.
        #[arg(long)]
        addr: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum DeadLetters {
    /// Re-sends each record of a dead-letter stream to its destination, with the service's
    /// batching, rate limits and retries; keeps its own position, so a second run sends nothing
    /// twice. Records refused again are reported and left where they are.
    Replay {
        /// The TOML configuration file.
        #[arg(long, env = "KINESIS_FANOUT_CONFIG")]
        config: Option<PathBuf>,
        /// The dead-letter stream (a group's dead_letter_stream).
        #[arg(long)]
        stream: String,
        /// Only records for this destination (its name, or region/name).
        #[arg(long)]
        destination: Option<String>,
        /// Start at records that arrived from this time (RFC 3339) when nothing was replayed yet.
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        since: Option<std::time::SystemTime>,
        /// Stop at records that arrived after this time (RFC 3339).
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        until: Option<std::time::SystemTime>,
        /// Only count what would be replayed: send nothing, keep no position.
        #[arg(long)]
        dry_run: bool,
        /// Forget the position earlier runs kept: read from the start (or --since) again, to
        /// re-send records that were refused again once their cause is fixed.
        #[arg(long)]
        restart: bool,
        /// Do not ask (required when stdin is not a terminal, unless --dry-run).
        #[arg(long)]
        yes: bool,
        /// One JSON summary instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConsumerCommand {
    /// Deregisters source.consumer_name from the source stream after a decommission (Enhanced
    /// Fan-Out bills per consumer-shard-hour while it is registered). Refuses while a worker holds
    /// a lease in the lease table, unless --force.
    Deregister {
        /// The TOML configuration file.
        #[arg(long, env = "KINESIS_FANOUT_CONFIG")]
        config: Option<PathBuf>,
        /// Deregister even while workers hold leases (their subscriptions end).
        #[arg(long)]
        force: bool,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Exit status for a configuration that cannot be used.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Healthcheck { addr: Some(addr), .. } = &cli.command {
        return healthcheck(addr);
    }
    let (Command::Run { config, .. }
    | Command::Check { config, .. }
    | Command::Leases { config, .. }
    | Command::DeadLetters(DeadLetters::Replay { config, .. })
    | Command::Consumer(ConsumerCommand::Deregister { config, .. })
    | Command::Healthcheck { config, .. }) = &cli.command;
    let settings = match load(config.as_deref()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("kinesis-fanout: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Healthcheck { .. } = cli.command {
        let mut addr = settings.metrics.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        return healthcheck(&addr.to_string());
    }
    init_logging(&settings.log);
    if let Command::Run { reset_checkpoints: true, .. } = cli.command
        && let Err(err) = kinesis_fanout::operate::reset_checkpoints(&settings)
    {
        eprintln!("kinesis-fanout: {err}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("kinesis-fanout: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run { config, .. } => runtime.block_on(run(settings, config.unwrap_or_default())),
        Command::Check { explain, json, .. } => runtime.block_on(check(settings, explain, json)),
        Command::Leases { observe, json, .. } => runtime.block_on(leases(settings, observe, json)),
        Command::DeadLetters(DeadLetters::Replay {
            stream,
            destination,
            since,
            until,
            dry_run,
            restart,
            yes,
            json,
            ..
        }) => {
            let args =
                kinesis_fanout::operate::replay::ReplayArgs { stream, destination, since, until, dry_run, restart };
            runtime.block_on(replay(settings, args, yes, json))
        }
        Command::Consumer(ConsumerCommand::Deregister { force, json, .. }) => {
            runtime.block_on(deregister_consumer(settings, force, json))
        }
        Command::Healthcheck { .. } => unreachable!("answered above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kinesis-fanout: {}", chain(&err));
            ExitCode::FAILURE
        }
    }
}

fn load(path: Option<&std::path::Path>) -> Result<Settings, ConfigError> {
    let path = path.ok_or(ConfigError::NoFile)?;
    Settings::load(path)
}

/// Logs to stderr as text or JSON; `RUST_LOG` overrides the configured level. Text is coloured
/// only on a terminal, and never with `NO_COLOR` set.
fn init_logging(settings: &LogSettings) {
    use std::io::IsTerminal;
    // The SDK's own warnings (a region or credentials looked for on an instance metadata service
    // that is not there) are noise unless debugging: the real error is said once, in one line.
    let level = settings.level.to_ascii_lowercase();
    let quiet_sdk = !level.contains("debug") && !level.contains("trace") && !level.contains("aws_config");
    let level = if quiet_sdk {
        format!("{level},aws_config::imds::region=error,aws_config::meta::credentials::chain=error")
    } else {
        level
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
        LogFormat::Text => builder.init(),
    }
}

/// GET /healthz: exit 0 when it answers 200.
fn healthcheck(addr: &str) -> ExitCode {
    match kinesis_fanout::operate::probe_health(addr) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("kinesis-fanout: {why}");
            ExitCode::FAILURE
        }
    }
}

/// The cause chain, as every layer logs it ([`kinesis_fanout::aws::chain`]).
fn chain(err: &anyhow::Error) -> String {
    kinesis_fanout::aws::chain(err.as_ref())
}
