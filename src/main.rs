//! The `kinesis-fanout` binary: command line, logging, signals. Everything else is in the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kinesis_fanout::config::{ConfigError, LogFormat, LogSettings};
use kinesis_fanout::{Service, Settings};
use tokio_util::sync::CancellationToken;

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
    /// Runs the service until SIGTERM or SIGINT.
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
        Command::Run { .. } => runtime.block_on(run(settings)),
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

/// The SDK's configuration, in the region the configuration names (else the SDK's own chain), and
/// checked for what a first run most often lacks, a region and credentials: each missing piece is
/// one short line naming what to set.
async fn sdk_config(settings: &Settings) -> anyhow::Result<aws_config::SdkConfig> {
    use aws_sdk_kinesis::config::ProvideCredentials;
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    // `[aws] region` is the default region of every place that names none.
    if let Some(region) = settings.aws.region.clone() {
        loader = loader.region(aws_config::Region::new(region));
    }
    let sdk = loader.load().await;
    let unnamed = std::iter::once(&settings.source.aws)
        .chain(settings.destinations.iter().map(|g| &g.aws))
        .any(|place| place.region.is_none());
    if sdk.region().is_none() && unnamed {
        anyhow::bail!("no AWS region: set AWS_REGION, or `region` under [aws] in the configuration");
    }
    let hint = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with a task or instance role \
                (against an emulator: `endpoint_url` under [aws] and any keys)";
    if let Some(provider) = sdk.credentials_provider() {
        match provider.provide_credentials().await {
            Ok(_) => {}
            Err(aws_credential_types::provider::error::CredentialsError::CredentialsNotLoaded(_)) => {
                anyhow::bail!("no AWS credentials: {hint}")
            }
            Err(err) => anyhow::bail!("cannot load AWS credentials ({}): {hint}", kinesis_fanout::aws::chain(&err)),
        }
    }
    Ok(sdk)
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let sdk = sdk_config(&settings).await?;
    let grace = settings.shutdown.grace_period;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone(), grace));
    Service::new(settings, &sdk)?.run(shutdown).await?;
    Ok(())
}

/// The first SIGTERM/SIGINT starts a graceful stop; a second one, or the grace period plus a
/// margin, ends the process at once.
async fn watch_signals(shutdown: CancellationToken, grace: std::time::Duration) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else { return };
    let Ok(mut int) = signal(SignalKind::interrupt()) else { return };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!(grace_ms = grace.as_millis() as u64, "Stop requested; draining.");
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => tracing::warn!("Second stop signal; exiting without draining."),
        _ = int.recv() => tracing::warn!("Second stop signal; exiting without draining."),
        _ = tokio::time::sleep(grace + std::time::Duration::from_secs(5)) => tracing::error!("Drain took longer than the grace period; exiting."),
    }
    std::process::exit(1);
}

async fn check(settings: Settings, explain: bool, json: bool) -> anyhow::Result<()> {
    let sdk = sdk_config(&settings).await?;
    let report = kinesis_fanout::operate::check::report(&settings, &sdk).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render(&settings, explain));
    }
    Ok(())
}

async fn leases(settings: Settings, observe: Option<std::time::Duration>, json: bool) -> anyhow::Result<()> {
    let sdk = sdk_config(&settings).await?;
    let rows = kinesis_fanout::operate::leases::rows(&settings, &sdk, observe).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", kinesis_fanout::operate::leases::render(&rows));
    }
    Ok(())
}

async fn replay(
    settings: Settings,
    args: kinesis_fanout::operate::replay::ReplayArgs,
    yes: bool,
    json: bool,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if !args.dry_run && !yes {
        if !std::io::stdin().is_terminal() {
            anyhow::bail!("refusing to replay without --yes when stdin is not a terminal (or use --dry-run to count)");
        }
        eprint!("Replay the records of {} to their destinations? [y/N] ", args.stream);
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !answer.trim().eq_ignore_ascii_case("y") {
            anyhow::bail!("not confirmed; nothing sent");
        }
    }
    let sdk = sdk_config(&settings).await?;
    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("a valid template"));
        bar
    });
    let mut last_line = tokio::time::Instant::now();
    let summary = kinesis_fanout::operate::replay::replay(&settings, &sdk, &args, |s| {
        let line = s.progress_line();
        match &bar {
            Some(bar) => bar.set_message(line),
            None if last_line.elapsed() >= std::time::Duration::from_secs(5) => {
                last_line = tokio::time::Instant::now();
                eprintln!("replay: {line}");
            }
            None => {}
        }
    })
    .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let summary = summary?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    print!("{}", summary.render(&args.stream, args.dry_run));
    Ok(())
}
