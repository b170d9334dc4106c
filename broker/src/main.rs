//! `pickup-broker`: the embedded broker of pickupd, run on its own (for a demo, a test
//! bench, or a site whose broker runs beside the daemon). Same settings as pickupd's
//! `[broker]` section.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use pickup_broker::{Broker, BrokerConfig};
use serde::Deserialize;

/// How often the standalone broker checks (and if needed restarts) its listeners.
const HEALTH_EVERY: Duration = Duration::from_secs(30);

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "pickup-broker",
    version,
    about = "pickupd's embedded MQTT broker, standalone"
)]
struct Args {
    /// TOML file with a `[broker]` table (the same keys as pickupd's `[broker]` section).
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// MQTT 3.1.1 listen address; overrides the file. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Opt-in MQTT 5 listen address; overrides the file (read docs/broker.md first).
    #[arg(long, value_name = "ADDR")]
    listen_v5: Option<SocketAddr>,
    /// Print the default configuration as TOML and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

/// The config file: a `[broker]` table, so one snippet works here and in pickupd.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct File {
    broker: BrokerConfig,
}

#[derive(serde::Serialize)]
struct PrintFile<'a> {
    broker: &'a BrokerConfig,
}

fn load(args: &Args) -> Result<BrokerConfig> {
    let mut cfg = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<File>(&text)
                .with_context(|| format!("{}: invalid configuration", path.display()))?
                .broker
        }
        None => BrokerConfig::default(),
    };
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(l) = args.listen_v5 {
        cfg.listen_v5 = Some(l);
    }
    cfg.validate()?;
    Ok(cfg)
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    if args.print_default_config {
        print!(
            "{}",
            toml::to_string(&PrintFile {
                broker: &BrokerConfig::default()
            })?
        );
        return Ok(());
    }
    let cfg = load(&args)?;
    if args.check_config {
        println!("configuration ok");
        return Ok(());
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("creating the runtime")?;
    // Handlers first, so a signal right after the "listening" line is not fatal.
    let (mut int, mut term) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _rt = rt.enter();
        (
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        )
    };
    let mut broker = Broker::start(cfg)?;
    // One line on stdout for scripts that started us with port 0.
    match broker.v5_addr() {
        Some(v5) => println!("pickup-broker listening v4={} v5={v5}", broker.v4_addr()),
        None => println!("pickup-broker listening v4={}", broker.v4_addr()),
    }

    let signal = rt.block_on(async {
        let mut health = tokio::time::interval(HEALTH_EVERY);
        health.tick().await;
        loop {
            tokio::select! {
                _ = int.recv() => return "SIGINT",
                _ = term.recv() => return "SIGTERM",
                _ = health.tick() => {
                    // A rumqttd listener can die while the process lives on: replace it.
                    if let Err(e) = broker.probe(Duration::from_secs(5)).await {
                        tracing::error!(error = %e, "listener health");
                        for l in e.listeners() {
                            if let Err(e) = broker.restart_listener(l) {
                                tracing::error!(error = %e, "listener restart");
                            }
                        }
                    }
                }
            }
        }
    });
    tracing::info!(signal, "stopping");
    broker.shutdown();
    Ok(())
}
