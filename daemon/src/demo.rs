//! `pickupd demo`: the daemon with simulated couriers and kiosks, printing each call's path.

use clap::Args;

use crate::config::Config;

/// Demo options.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Simulated couriers.
    #[arg(long, default_value_t = 8)]
    pub couriers: usize,
}

/// Runs the demo until Ctrl-C.
pub async fn run(_cfg: Config, _args: DemoArgs, _explicit_config: bool) -> anyhow::Result<()> {
    anyhow::bail!("the demo is not available in this build")
}
