//! `pickupd`: the dispatch daemon. Thin: parses flags, loads settings, runs
//! [`pickupd::app`], and maps signals to a graceful stop.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pickupd::config::{Config, DEFAULT_TOML};

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
            None => run(cfg).await,
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

async fn run(cfg: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut running = pickupd::app::start(cfg).await?;
    let mut ready = running.ready.clone();
    tokio::select! {
        _ = ready.wait_for(|r| *r) => {
            tracing::info!(broker = %running.broker_addr, "ready");
        }
        _ = term.recv() => return running.shutdown(Duration::from_secs(20)).await,
        _ = int.recv() => return running.shutdown(Duration::from_secs(20)).await,
    }
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
        e = running.fatal() => {
            let _ = running.shutdown(Duration::from_secs(5)).await;
            return Err(e.into());
        }
    }
    running.shutdown(Duration::from_secs(20)).await
}
