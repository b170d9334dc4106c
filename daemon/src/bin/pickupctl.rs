//! `pickupctl`: make, cancel, look up and watch calls from a terminal.

use std::process::ExitCode;

use clap::Parser;
use pickupd::ctl::{Command, Common};

/// Kiosk and operator command line for pickupd.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Command,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pickupctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(pickupd::ctl::run(args.common, args.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pickupctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
