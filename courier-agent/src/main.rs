//! `courier-agent`: one courier's handheld (interactive or by policy), or `--simulate N`.

use std::process::ExitCode;

use clap::Parser;
use courier_agent::cli::{Cli, Run};
use courier_agent::fleet::Fleet;
use courier_agent::{console, Agent};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_env("COURIER_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    let run = match cli.into_run() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("courier-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("courier-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match run {
            Run::Single {
                agent,
                console: opts,
            } => {
                let (tx, rx) = tokio::sync::mpsc::channel(1024);
                let agent = match Agent::spawn(*agent, tx) {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("courier-agent: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                console::run(agent, rx, opts).await;
                ExitCode::SUCCESS
            }
            Run::Fleet(cfg) => {
                let fleet = match Fleet::start(*cfg) {
                    Ok(f) => f,
                    Err(e) => {
                        eprintln!("courier-agent: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                fleet.run(shutdown_signal()).await;
                ExitCode::SUCCESS
            }
        }
    })
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
