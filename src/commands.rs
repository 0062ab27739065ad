//! What each subcommand of the binary does beyond parsing its arguments: the SDK configuration
//! (checked for a region and credentials), `run` with its signal handling, and the operator
//! commands' rendering on the terminal (prompt, progress bar). Part of the binary, not the library.

use kinesis_fanout::{Service, Settings};
use tokio_util::sync::CancellationToken;

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

pub async fn run(settings: Settings, path: std::path::PathBuf) -> anyhow::Result<()> {
    // Registered first: until then a SIGHUP would end the process.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let sdk = sdk_config(&settings).await?;
    let grace = settings.shutdown.grace_period;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone(), grace));
    let service = Service::new(settings, &sdk)?;
    tokio::spawn(reload_on_hangup(service.reloader(), path, hangup));
    service.run(shutdown).await?;
    Ok(())
}

/// Every SIGHUP reads the configuration file again (with the environment's overrides, as at
/// start) and applies what changed in the destination groups; a file with any problem is
/// refused whole, each problem logged with its key.
async fn reload_on_hangup(
    reloader: kinesis_fanout::app::Reloader,
    path: std::path::PathBuf,
    mut hangup: tokio::signal::unix::Signal,
) {
    use kinesis_fanout::app::ReloadError;
    while hangup.recv().await.is_some() {
        tracing::info!(config = %path.display(), "SIGHUP: reading the configuration again.");
        match reloader.reload(Settings::load(&path)).await {
            Ok(Some(report)) => {
                tracing::info!(added = ?report.added, removed = ?report.removed, kept = report.kept.len(), "Configuration reloaded.")
            }
            Ok(None) => tracing::info!("Configuration reloaded: no destination group changed."),
            Err(ReloadError::Invalid(err)) => {
                for problem in err.problems() {
                    tracing::error!(key = %problem.key, problem = %problem.message, "Configuration problem.");
                }
                tracing::error!(error = %kinesis_fanout::aws::chain(&err), "Configuration reload refused; the running configuration stays.");
            }
            Err(err) => tracing::error!(error = %err, "Configuration reload refused."),
        }
    }
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

pub async fn check(settings: Settings, explain: bool, json: bool) -> anyhow::Result<()> {
    let sdk = sdk_config(&settings).await?;
    let report = kinesis_fanout::operate::check::report(&settings, &sdk).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render(&settings, explain));
    }
    Ok(())
}

pub async fn leases(settings: Settings, observe: Option<std::time::Duration>, json: bool) -> anyhow::Result<()> {
    let sdk = sdk_config(&settings).await?;
    let rows = kinesis_fanout::operate::leases::rows(&settings, &sdk, observe).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", kinesis_fanout::operate::leases::render(&rows));
    }
    Ok(())
}

pub async fn deregister_consumer(settings: Settings, force: bool, json: bool) -> anyhow::Result<()> {
    let sdk = sdk_config(&settings).await?;
    let done = kinesis_fanout::operate::consumer::deregister(&settings, &sdk, force).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        print!("{}", done.render());
    }
    Ok(())
}

pub async fn replay(
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
