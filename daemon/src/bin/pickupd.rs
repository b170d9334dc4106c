//! `pickupd`: the dispatch daemon. Thin: parses flags, loads settings, runs
//! [`pickupd::app`], and maps signals to a graceful stop.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pickupd::config::{Config, DEFAULT_TOML};
use pickupd::systemd::Notifier;

/// Edge dispatch daemon for a parcel pickup centre.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Settings file (TOML). Default: /etc/pickupd/pickupd.toml when it exists.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print the documented default settings and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Load and check the settings, print them, and exit (non-zero when wrong).
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon with the embedded broker, simulated couriers and kiosk calls, and
    /// print each call's path. Uses ./data/demo.db unless --config says otherwise.
    Demo(pickupd::demo::DemoArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_default_config {
        print!("{DEFAULT_TOML}");
        return ExitCode::SUCCESS;
    }
    let cfg = match Config::load(args.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pickupd: configuration error: {e}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    if args.check_config {
        match toml::to_string_pretty(&cfg) {
            Ok(s) => {
                println!("{s}");
                eprintln!("pickupd: configuration is valid");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("pickupd: cannot print configuration: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    pickupd::logging::init(&cfg.log.level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pickupd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async move {
        match args.cmd {
            Some(Cmd::Demo(d)) => pickupd::demo::run(cfg, d, args.config.is_some()).await,
            None => run(cfg, args.config.clone()).await,
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("pickupd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How old a component's last heartbeat may be before the watchdog withholds pings.
const HEARTBEAT_MAX_AGE: Duration = Duration::from_secs(5);

async fn run(cfg: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    use tokio::signal::unix::{signal, SignalKind};

    let notifier = Notifier::from_env();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut running = match pickupd::app::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            notifier.status(&format!("failed to start: {e:#}"));
            return Err(e);
        }
    };
    let mut ready = running.ready.clone();
    tokio::select! {
        _ = ready.wait_for(|r| *r) => {}
        _ = term.recv() => return stop(running, &notifier).await,
        _ = int.recv() => return stop(running, &notifier).await,
    }
    // READY only now: migrations ran, the store is open, the broker listens (embedded) or
    // is connected (external), and the subscriptions are confirmed.
    notifier.ready();
    tracing::info!(broker = %running.broker_addr, "ready");

    // Watchdog: pings only while every loop beats and every embedded listener answers.
    let prober = running.broker.as_ref().map(|b| b.prober());
    let watchdog = tokio::spawn(pickupd::systemd::run_watchdog(
        notifier.clone(),
        running.heartbeats.clone(),
        HEARTBEAT_MAX_AGE,
        move || {
            let prober = prober.clone();
            async move {
                match prober {
                    Some(p) => p
                        .probe(Duration::from_secs(2))
                        .await
                        .map_err(|e| e.to_string()),
                    None => Ok(()),
                }
            }
        },
    ));

    // One STATUS line with live counters, sent when it changes.
    let status = {
        let notifier = notifier.clone();
        let stats = running.stats.clone();
        let mqtt = running.mqtt.clone();
        let publisher = running.publisher_stats.clone();
        let read_link = running.config().mqtt.read_link;
        tokio::spawn(async move {
            let mut last = String::new();
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                let up = |b: bool| if b { "connected" } else { "disconnected" };
                let line = format!(
                    "calls dispatching: {}, couriers online: {}, outbox backlog: {}, broker: {}{}",
                    stats.dispatching.load(Ordering::Relaxed),
                    stats.couriers_online.load(Ordering::Relaxed),
                    publisher.unacked.load(Ordering::Relaxed),
                    up(mqtt.connected.load(Ordering::Relaxed)),
                    if read_link {
                        format!(
                            ", status reads: {}",
                            up(mqtt.reads_connected.load(Ordering::Relaxed))
                        )
                    } else {
                        String::new()
                    },
                );
                if line != last {
                    notifier.status(&line);
                    last = line;
                }
            }
        })
    };

    let res = loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping");
                break Ok(());
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping");
                break Ok(());
            }
            _ = hup.recv() => {
                notifier.reloading();
                match Config::load(config_path.as_deref(), std::env::vars()) {
                    Ok(new) => {
                        let restart = running.reload(new).await;
                        if restart.is_empty() {
                            tracing::info!("SIGHUP: settings reloaded");
                        } else {
                            tracing::warn!(
                                needs_restart = %restart.join(", "),
                                "SIGHUP: settings reloaded; these changed but only take effect after a restart"
                            );
                            notifier.status(&format!("reloaded; restart needed for: {}", restart.join(", ")));
                        }
                    }
                    Err(e) => {
                        tracing::error!("SIGHUP: configuration error, keeping the current settings: {e}");
                        notifier.status(&format!("reload refused: {e}"));
                    }
                }
                notifier.ready();
            }
            e = running.fatal() => {
                break Err(anyhow::Error::from(e));
            }
        }
    };
    watchdog.abort();
    status.abort();
    let stopped = stop(running, &notifier).await;
    res.and(stopped)
}

async fn stop(running: pickupd::app::Running, notifier: &Notifier) -> anyhow::Result<()> {
    notifier.stopping();
    // Within TimeoutStopSec (30 s in the unit): refuse new calls, finish and commit what
    // is in progress, flush the outbox, publish daemon/state = stopping, close the file.
    running.shutdown(Duration::from_secs(20)).await
}
