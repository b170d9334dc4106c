//! Log setup: `tracing` to journald (with structured fields such as `call_id` and
//! `courier_id`) when systemd started us, otherwise to stderr. The level comes from
//! `RUST_LOG` or the config, and can change on reload.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

static RELOAD: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// The embedded broker logs every connection at `info`; keep it to warnings unless the
/// filter names it.
pub fn filter_for(level: &str) -> String {
    if level.contains("rumqttd") {
        level.to_string()
    } else {
        format!("{level},rumqttd=warn")
    }
}

/// Whether stderr is connected to the journal (systemd sets `JOURNAL_STREAM` to the
/// device and inode of the stream it gave us).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(meta.dev()) && ino.parse::<u64>().ok() == Some(meta.ino())
}

fn fmt_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use std::io::IsTerminal;
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
}

/// Installs the global subscriber once; later calls do nothing.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter_for(level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(j) => registry
                .with(j.with_syslog_identifier("pickupd".into()))
                .try_init(),
            Err(_) => registry.with(fmt_layer()).try_init(),
        }
    } else {
        registry.with(fmt_layer()).try_init()
    };
    if installed.is_ok() {
        let _ = RELOAD.set(handle);
    }
}

/// Changes the level (SIGHUP). `RUST_LOG`, when set, keeps winning.
pub fn set_level(level: &str) {
    if std::env::var_os("RUST_LOG").is_some() {
        return;
    }
    let Some(h) = RELOAD.get() else { return };
    match EnvFilter::try_new(filter_for(level)) {
        Ok(f) => {
            if let Err(e) = h.reload(f) {
                tracing::warn!(error = %e, "log level not changed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "log.level: not a valid filter"),
    }
}
