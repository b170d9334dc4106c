//! Layered settings: compiled-in defaults, then a TOML file (`--config`, by default
//! `/etc/pickupd/pickupd.toml` when it exists), then the environment
//! (`PICKUPD__SECTION__KEY=value`). Unknown keys are refused and every error names its key.

use std::path::{Path, PathBuf};

use pickup_protocol::validate::is_valid_id;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::dispatch::notice::Templates;
use crate::dispatch::{DispatchConfig, Mode};

/// The documented default configuration file, shipped as `configs/pickupd.toml`.
pub const DEFAULT_TOML: &str = include_str!("../../configs/pickupd.toml");

/// Where the packaged daemon reads its settings.
pub const SYSTEM_CONFIG: &str = "/etc/pickupd/pickupd.toml";

/// A setting is wrong: which one and why.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// Reading or parsing the layers failed (the message names the key or the file).
    #[error("{0}")]
    Load(String),
    /// A value is out of range or inconsistent.
    #[error("{key}: {problem}")]
    Invalid {
        /// Dotted key, e.g. `dispatch.radius_m`.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// All settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Site name: topics live under `pickup/v1/<site>/`.
    pub site: String,
    /// SQLite.
    pub store: StoreConfig,
    /// The daemon's MQTT connection.
    pub mqtt: MqttConfig,
    /// The embedded broker (used when `mqtt.url` is empty).
    pub broker: pickup_broker::BrokerConfig,
    /// Dispatch rules.
    pub dispatch: DispatchSection,
    /// Admission limits.
    pub limits: Limits,
    /// Admission control for new calls: per-client rate, queue high water, breaker.
    pub admission: crate::app::admission::AdmissionConfig,
    /// Logging.
    pub log: LogConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Customer notifications.
    pub notifications: NotificationsConfig,
    /// Prices.
    pub tariff: crate::tariff::Tariff,
    /// Weighing scales (`[[scales]]`), none by default.
    pub scales: Vec<crate::scale::ScaleConfig>,
    /// Device identities, anonymous access, TLS trust.
    pub security: crate::security::SecurityConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            site: "default".into(),
            store: StoreConfig::default(),
            mqtt: MqttConfig::default(),
            broker: pickup_broker::BrokerConfig::default(),
            dispatch: DispatchSection::default(),
            limits: Limits::default(),
            admission: crate::app::admission::AdmissionConfig::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
            notifications: NotificationsConfig::default(),
            tariff: crate::tariff::Tariff::default(),
            scales: Vec::new(),
            security: crate::security::SecurityConfig::default(),
        }
    }
}

/// `[store]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Database file; created 0600 with its directory.
    pub path: PathBuf,
    /// Jobs the writer queue holds before callers wait.
    pub queue: usize,
    /// Jobs group-committed in one transaction at most.
    pub max_batch: usize,
    /// Finished calls older than this are deleted (with their events) and their retained
    /// state topics cleared, days; 0 keeps everything.
    pub retention_days: u32,
    /// A finished call's retained state topic is cleared this many hours after it
    /// finished (the call stays readable with `calls/<id>/get` until `retention_days`);
    /// 0 keeps it as long as the call is stored. Keeps the broker's retained store, and
    /// the republishing after a start, to live and recent calls.
    pub state_hours: u32,
    /// How often retention and the retained-state sweep run, seconds.
    pub sweep_interval_s: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("./data/pickupd.db"),
            queue: 1024,
            max_batch: 256,
            retention_days: 30,
            state_hours: 24,
            sweep_interval_s: 600,
        }
    }
}

/// `[mqtt]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// External broker, `mqtt://host:port`; empty runs the embedded broker.
    pub url: String,
    /// Fixed client id: the broker keeps the daemon's session (and the requests that
    /// arrive while it restarts) under it.
    pub client_id: String,
    /// 4 (MQTT 3.1.1) or 5.
    pub version: u8,
    /// Credentials for the external broker.
    pub username: Option<String>,
    /// Credentials for the external broker.
    pub password: Option<String>,
    /// Keep-alive, seconds.
    pub keep_alive_s: u16,
    /// Longest wait between reconnect attempts, milliseconds.
    pub reconnect_max_ms: u64,
    /// Serve status reads (`calls/<id>/get`) on a second connection of their own
    /// (client id and username `<client_id>.reads`, same secret), so that a flood of
    /// requests queued towards the main connection does not delay them.
    pub read_link: bool,
    /// With the embedded broker and `version = 4`: the daemon's own connections run
    /// inside the process (straight to the broker's router, no TCP, no MQTT encoding),
    /// which takes a third or more off the broker's work per call. `false` connects
    /// them over the loopback listener like any client (e.g. to watch them with a
    /// packet capture).
    pub in_process: bool,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            client_id: "pickupd".into(),
            version: 4,
            username: None,
            password: None,
            keep_alive_s: 15,
            reconnect_max_ms: 5_000,
            read_link: true,
            in_process: true,
        }
    }
}

/// `[dispatch]`, in human units.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatchSection {
    /// `auto` or `offer`.
    pub mode: Mode,
    /// Search radius, metres.
    pub radius_m: f64,
    /// Calls without courier fail after this, seconds.
    pub deadline_s: u64,
    /// Offer timeout, seconds.
    pub offer_timeout_s: u64,
    /// Offline grace period for an assigned courier, seconds.
    pub grace_s: u64,
    /// Positions older than this are not trusted, seconds.
    pub location_max_age_s: u64,
    /// Travel speed for ETAs, km/h.
    pub speed_kmh: f64,
    /// Wrong pickup codes allowed.
    pub max_wrong_codes: u32,
    /// Heavy from this weight, kg.
    pub heavy_kg: f64,
    /// Finished calls stay in memory this long, seconds.
    pub keep_terminal_s: u64,
}

impl Default for DispatchSection {
    fn default() -> Self {
        let d = DispatchConfig::default();
        Self {
            mode: d.mode,
            radius_m: d.radius_m,
            deadline_s: (d.deadline_ms / 1000) as u64,
            offer_timeout_s: (d.offer_timeout_ms / 1000) as u64,
            grace_s: (d.grace_ms / 1000) as u64,
            location_max_age_s: (d.location_max_age_ms / 1000) as u64,
            speed_kmh: d.speed_mps * 3.6,
            max_wrong_codes: d.max_wrong_codes,
            heavy_kg: pickup_protocol::DEFAULT_HEAVY_KG,
            keep_terminal_s: (d.keep_terminal_ms / 1000) as u64,
        }
    }
}

/// `[limits]`: admission control.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Inbound messages waiting for the dispatch loop; beyond it requests get `busy`.
    pub inbound_queue: usize,
    /// Status reads waiting for the reader; beyond it they get `busy`.
    pub read_queue: usize,
    /// Calls waiting for a courier; beyond it new calls get `busy`.
    pub max_dispatching: usize,
    /// Open (unfinished) calls one kiosk may have; beyond it its new calls get `busy`, so
    /// one broken or hostile kiosk cannot fill the daemon. 0 = no limit.
    pub max_open_per_kiosk: usize,
    /// Milliseconds: a courier's positions are taken at most once per this interval; the
    /// newest of those in between is taken when it is up (none is lost, the rest are
    /// dropped). Keeps a handheld that loops on its position from turning into a stream
    /// of commits. Also the window in which a presence that repeats a courier's last one
    /// is dropped (changes pass at once). 0 = take every position and presence.
    pub position_interval_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            inbound_queue: 2048,
            read_queue: 1024,
            max_dispatching: 5000,
            max_open_per_kiosk: 200,
            position_interval_ms: 1000,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Filter, e.g. `info` or `pickupd=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` for the Prometheus endpoint (`/metrics`); empty turns it off. Keep it
    /// on loopback: it has no authentication.
    pub listen: String,
}

impl MetricsConfig {
    /// The address, when metrics are on.
    pub fn addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|_| {
            invalid(
                "metrics.listen",
                "must be an address like 127.0.0.1:9187, or empty",
            )
        })
    }
}

/// `[notifications]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotificationsConfig {
    /// Texts.
    pub templates: Templates,
    /// The optional HTTP sink.
    pub webhook: crate::notify::webhook::WebhookConfig,
}

impl Config {
    /// Builds the layers. `file`: an explicit `--config` (must exist); `None` uses
    /// [`SYSTEM_CONFIG`] if present. `env` lists `(name, value)` pairs (the process
    /// environment in production; a fixed list in tests).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut b = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        match file {
            Some(p) => {
                if !p.exists() {
                    return Err(ConfigError::Load(format!(
                        "config file {} does not exist",
                        p.display()
                    )));
                }
                b = b.add_source(
                    config::File::from(p.to_path_buf())
                        .format(config::FileFormat::Toml)
                        .required(true),
                );
            }
            None => {
                let p = Path::new(SYSTEM_CONFIG);
                if p.exists() {
                    b = b.add_source(config::File::from(p).format(config::FileFormat::Toml));
                }
            }
        }
        let vars: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("PICKUPD__"))
            .collect();
        b = b.add_source(
            config::Environment::with_prefix("PICKUPD")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(vars)),
        );
        let built = b.build().map_err(|e| ConfigError::Load(e.to_string()))?;
        let cfg: Config = built
            .try_deserialize()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_valid_id(&self.site) {
            return Err(invalid(
                "site",
                "must be 1-64 characters of A-Z a-z 0-9 _ . -",
            ));
        }
        if self.store.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must not be empty"));
        }
        if self.store.queue == 0 {
            return Err(invalid("store.queue", "must be at least 1"));
        }
        if self.store.max_batch == 0 {
            return Err(invalid("store.max_batch", "must be at least 1"));
        }
        if !self.mqtt.url.is_empty() {
            pickup_protocol::client::Endpoint::parse(&self.mqtt.url)
                .map_err(|e| invalid("mqtt.url", e.to_string()))?;
        }
        self.security.validate(self)?;
        if !matches!(self.mqtt.version, 4 | 5) {
            return Err(invalid("mqtt.version", "must be 4 (MQTT 3.1.1) or 5"));
        }
        if self.mqtt.client_id.is_empty() || self.mqtt.client_id.len() > 64 {
            return Err(invalid("mqtt.client_id", "must be 1-64 characters"));
        }
        if self.mqtt.read_link && self.mqtt.client_id.len() > 58 {
            return Err(invalid(
                "mqtt.client_id",
                "must be at most 58 characters with mqtt.read_link on (the read connection adds \".reads\")",
            ));
        }
        if self.store.sweep_interval_s == 0 {
            return Err(invalid("store.sweep_interval_s", "must be at least 1"));
        }
        if self.mqtt.keep_alive_s == 0 {
            return Err(invalid(
                "mqtt.keep_alive_s",
                "must be at least 1 (the embedded broker refuses 0)",
            ));
        }
        if self.mqtt.url.is_empty() && self.mqtt.version == 5 && self.broker.listen_v5.is_none() {
            return Err(invalid(
                "mqtt.version",
                "5 with the embedded broker needs broker.listen_v5 (the opt-in MQTT 5 listener)",
            ));
        }
        if self.mqtt.url.is_empty() {
            self.broker
                .validate()
                .map_err(|e| ConfigError::Load(e.to_string()))?;
        }
        let d = &self.dispatch;
        if !(d.radius_m.is_finite() && d.radius_m > 0.0 && d.radius_m <= 100_000.0) {
            return Err(invalid(
                "dispatch.radius_m",
                "must be a number from 1 to 100000",
            ));
        }
        if d.deadline_s == 0 {
            return Err(invalid("dispatch.deadline_s", "must be at least 1"));
        }
        if d.offer_timeout_s == 0 {
            return Err(invalid("dispatch.offer_timeout_s", "must be at least 1"));
        }
        if !(d.speed_kmh.is_finite() && d.speed_kmh > 0.0) {
            return Err(invalid("dispatch.speed_kmh", "must be a positive number"));
        }
        if !(d.heavy_kg.is_finite() && d.heavy_kg > 0.0) {
            return Err(invalid("dispatch.heavy_kg", "must be a positive number"));
        }
        if self.limits.inbound_queue == 0 {
            return Err(invalid("limits.inbound_queue", "must be at least 1"));
        }
        if self.limits.read_queue == 0 {
            return Err(invalid("limits.read_queue", "must be at least 1"));
        }
        if self.limits.position_interval_ms > 3_600_000 {
            return Err(invalid(
                "limits.position_interval_ms",
                "must be at most 3600000 (one hour); positions older than dispatch.location_max_age_s are not used anyway",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        self.notifications
            .templates
            .validate()
            .map_err(ConfigError::Load)?;
        self.tariff.validate("tariff").map_err(ConfigError::Load)?;
        crate::scale::validate_scales(&self.scales)
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        self.notifications.webhook.validate()?;
        Ok(())
    }

    /// The dispatch core's settings.
    pub fn dispatch_config(&self) -> DispatchConfig {
        let d = &self.dispatch;
        let ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
        DispatchConfig {
            mode: d.mode,
            radius_m: d.radius_m,
            deadline_ms: ms(d.deadline_s),
            offer_timeout_ms: ms(d.offer_timeout_s),
            grace_ms: ms(d.grace_s),
            location_max_age_ms: ms(d.location_max_age_s),
            speed_mps: d.speed_kmh / 3.6,
            max_wrong_codes: d.max_wrong_codes,
            keep_terminal_ms: ms(d.keep_terminal_s),
            use_index: true,
            templates: self.notifications.templates.clone(),
            webhook: self.notifications.webhook.enabled(),
        }
    }

    /// Settings that differ between `self` and `new` and cannot change without a restart.
    pub fn needs_restart(&self, new: &Config) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.site != new.site {
            v.push("site");
        }
        if self.store.path != new.store.path {
            v.push("store.path");
        }
        if self.store.queue != new.store.queue || self.store.max_batch != new.store.max_batch {
            v.push("store.queue/store.max_batch");
        }
        if self.store.sweep_interval_s != new.store.sweep_interval_s {
            v.push("store.sweep_interval_s");
        }
        if serde_json::to_value(&self.mqtt).ok() != serde_json::to_value(&new.mqtt).ok() {
            v.push("mqtt");
        }
        if serde_json::to_value(&self.broker).ok() != serde_json::to_value(&new.broker).ok() {
            v.push("broker");
        }
        if self.metrics.listen != new.metrics.listen {
            v.push("metrics.listen");
        }
        if serde_json::to_value(&self.security).ok() != serde_json::to_value(&new.security).ok() {
            v.push("security");
        }
        if self.limits.inbound_queue != new.limits.inbound_queue
            || self.limits.read_queue != new.limits.read_queue
        {
            v.push("limits.inbound_queue/limits.read_queue");
        }
        if self.notifications.webhook != new.notifications.webhook {
            v.push("notifications.webhook");
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_file_is_the_defaults() {
        let from_file = Config::load(
            Some(Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../configs/pickupd.toml"
            ))),
            [],
        )
        .unwrap();
        let json = |c: &Config| serde_json::to_value(c).unwrap();
        assert_eq!(json(&from_file), json(&Config::default()));
    }

    #[test]
    fn layers_apply_in_order_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.toml");
        std::fs::write(
            &f,
            "site = \"s1\"\n[dispatch]\nradius_m = 1200.0\nmode = \"offer\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&f), env(&[("PICKUPD__DISPATCH__RADIUS_M", "800")])).unwrap();
        assert_eq!(c.site, "s1");
        assert_eq!(c.dispatch.radius_m, 800.0);
        assert_eq!(c.dispatch.mode, Mode::Offer);

        let e = Config::load(Some(&f), env(&[("PICKUPD__DISPATCH__RADIUS_M", "-5")])).unwrap_err();
        assert!(e.to_string().contains("dispatch.radius_m"), "{e}");
        let e = Config::load(Some(&f), env(&[("PICKUPD__DISPATCH__RADIUS_M", "far")])).unwrap_err();
        assert!(e.to_string().contains("radius_m"), "{e}");
        let e = Config::load(
            Some(&f),
            env(&[("PICKUPD__LIMITS__POSITION_INTERVAL_MS", "7200000")]),
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("limits.position_interval_ms:"),
            "{e}"
        );
        std::fs::write(&f, "[dispatch]\nradius = 3\n").unwrap();
        let e = Config::load(Some(&f), []).unwrap_err();
        assert!(e.to_string().contains("radius"), "{e}");
        std::fs::write(&f, "site = \"a/b\"\n").unwrap();
        assert!(Config::load(Some(&f), [])
            .unwrap_err()
            .to_string()
            .starts_with("site:"));
        std::fs::write(&f, "[mqtt]\nurl = \"mqtt://h:x\"\n").unwrap();
        assert!(Config::load(Some(&f), [])
            .unwrap_err()
            .to_string()
            .contains("mqtt.url"));
        assert!(Config::load(Some(&dir.path().join("missing.toml")), [])
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
    }

    #[test]
    fn restart_only_settings_are_named() {
        let a = Config::default();
        let mut b = a.clone();
        b.dispatch.radius_m = 10.0;
        assert!(a.needs_restart(&b).is_empty());
        b.site = "other".into();
        b.mqtt.url = "mqtt://x:1".into();
        assert_eq!(a.needs_restart(&b), vec!["site", "mqtt"]);
    }
}
