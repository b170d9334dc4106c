//! Log setup: `tracing` to stderr, level from `RUST_LOG` or the config.

use tracing_subscriber::EnvFilter;

/// The embedded broker logs every connection at `info`; keep it to warnings unless the
/// filter names it.
pub fn filter_for(level: &str) -> String {
    if level.contains("rumqttd") {
        level.to_string()
    } else {
        format!("{level},rumqttd=warn")
    }
}

/// Installs the global subscriber once; later calls do nothing.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter_for(level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
