//! Who may talk to the daemon, and how the daemon proves who it is.
//!
//! Layout:
//! - [`registry`]: the device registry file (identities, roles, hashed secrets);
//! - [`hook`]: the embedded broker's CONNECT check against the registry;
//! - [`mosquitto`]: a Mosquitto password file, ACL and config generated from the registry
//!   (the production broker, since rumqttd cannot authorize per topic);
//! - [`cli`]: `pickupctl device …` and `pickupctl broker mosquitto-config`;
//! - this module: the `[security]` settings and [`Security::prepare`], which the daemon
//!   runs at start to make sure its own identity exists, decide whether the embedded
//!   broker demands authentication, and set up its own client (credentials, TLS).
//!
//! The anonymous rule (`anonymous = "auto"`, the default): the embedded broker lets
//! clients in without credentials only while every listener is on loopback **and** the
//! registry holds no device besides the daemon itself — a checkout, a demo, a test run.
//! Anything else requires every client to authenticate. The rule is decided at start and
//! logged; adding the first device takes effect at the next restart (`pickupctl device
//! add` says so). `anonymous = "never"` always requires authentication.

pub mod cli;
pub mod hook;
pub mod mosquitto;
pub mod registry;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use pickup_protocol::client::{Endpoint, LinkOptions, TlsClient};
use serde::{Deserialize, Serialize};

use self::hook::DeviceAuth;
use self::registry::{Registry, RegistryLock, Role};
use crate::config::{Config, ConfigError};

/// When the embedded broker lets clients in without credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Anonymous {
    /// Only while every listener is on loopback and the registry has no devices.
    #[default]
    Auto,
    /// Never: every client authenticates against the registry.
    Never,
}

/// `[security]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Device registry file. Unset: `registry.json` next to the database.
    pub registry: Option<PathBuf>,
    /// When anonymous clients may connect to the embedded broker.
    pub anonymous: Anonymous,
    /// File holding the daemon's own secret (0600, created at first start). Unset:
    /// `daemon.secret` next to the registry.
    pub daemon_secret: Option<PathBuf>,
    /// PEM file of the certificate authorities trusted for an `mqtts://` broker
    /// (`mqtt.url`); required with `mqtts://`. Use the system bundle
    /// (`/etc/ssl/certs/ca-certificates.crt`) for a publicly signed broker.
    pub ca_file: Option<PathBuf>,
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

impl SecurityConfig {
    /// The registry file for these settings.
    pub fn registry_path(&self, cfg: &Config) -> PathBuf {
        match &self.registry {
            Some(p) => p.clone(),
            None => cfg.store.path.with_file_name("registry.json"),
        }
    }

    /// The daemon's secret file for these settings.
    pub fn daemon_secret_path(&self, cfg: &Config) -> PathBuf {
        match &self.daemon_secret {
            Some(p) => p.clone(),
            None => self.registry_path(cfg).with_file_name("daemon.secret"),
        }
    }

    /// Checks what the types alone do not; errors name the key.
    pub fn validate(&self, cfg: &Config) -> Result<(), ConfigError> {
        if self
            .registry
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid(
                "security.registry",
                "must not be empty (leave it out for the default)",
            ));
        }
        if self
            .daemon_secret
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid(
                "security.daemon_secret",
                "must not be empty (leave it out for the default)",
            ));
        }
        if !cfg.mqtt.url.is_empty() {
            let ep =
                Endpoint::parse(&cfg.mqtt.url).map_err(|e| invalid("mqtt.url", e.to_string()))?;
            match (&self.ca_file, ep.tls) {
                (None, true) => return Err(invalid(
                    "security.ca_file",
                    "mqtt.url uses mqtts:// and needs the CA certificate(s) to trust (PEM file)",
                )),
                (Some(p), true) => {
                    TlsClient::from_ca_file(p)
                        .map_err(|e| invalid("security.ca_file", e.to_string()))?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The daemon's security arrangements for one run.
pub struct Security {
    /// The registry file.
    pub registry_path: PathBuf,
    /// Where the daemon connects, and whether over TLS.
    pub endpoint: Option<Endpoint>,
    /// The daemon's username and secret for its own MQTT link.
    credentials: Option<(String, String)>,
    /// TLS for the daemon's link.
    tls: Option<TlsClient>,
    /// Registry-backed authentication for the embedded broker (None: anonymous allowed).
    pub auth: Option<Arc<DeviceAuth>>,
}

impl Security {
    /// Runs at daemon start: makes sure the daemon's identity exists (registry entry +
    /// secret file), decides the embedded broker's authentication (see the module docs)
    /// and prepares the daemon's own link.
    pub fn prepare(cfg: &Config) -> anyhow::Result<Security> {
        let sec = &cfg.security;
        let registry_path = sec.registry_path(cfg);
        let endpoint = if cfg.mqtt.url.is_empty() {
            None
        } else {
            Some(Endpoint::parse(&cfg.mqtt.url).context("mqtt.url")?)
        };
        let tls = match (&endpoint, &sec.ca_file) {
            (Some(e), Some(ca)) if e.tls => {
                Some(TlsClient::from_ca_file(ca).context("security.ca_file")?)
            }
            (Some(e), None) if e.tls => anyhow::bail!(
                "security.ca_file: mqtt.url uses mqtts:// and needs the CA certificate(s) to trust"
            ),
            _ => None,
        };

        let configured = match (&cfg.mqtt.username, &cfg.mqtt.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            _ => None,
        };
        let own = match configured {
            Some(c) => Some(c),
            None => ensure_daemon_identity(cfg, &registry_path, &sec.daemon_secret_path(cfg))?,
        };

        let mut auth = None;
        if endpoint.is_none() {
            let registry = Registry::load(&registry_path)?;
            let exposed = exposed_listeners(&cfg.broker);
            let anonymous_ok =
                sec.anonymous == Anonymous::Auto && exposed.is_empty() && !registry.has_devices();
            if anonymous_ok {
                tracing::warn!(
                    registry = %registry_path.display(),
                    "anonymous MQTT clients are allowed: the embedded broker listens on loopback only and the device registry has no devices (zero-setup mode). Adding a device (pickupctl device add) turns authentication on at the next restart"
                );
            } else {
                auth = Some(DeviceAuth::new(&registry_path, own.clone())?);
                let devices = registry.iter().filter(|d| d.role != Role::Daemon).count();
                if devices == 0 {
                    tracing::error!(
                        registry = %registry_path.display(),
                        exposed = ?exposed,
                        "the embedded broker requires authentication and the device registry has no devices: every device is refused until one is added (pickupctl device add ID --role ROLE)"
                    );
                } else {
                    tracing::info!(
                        registry = %registry_path.display(),
                        devices,
                        "the embedded broker requires authentication against the device registry"
                    );
                }
            }
        }
        Ok(Security {
            registry_path,
            endpoint,
            credentials: own,
            tls,
            auth,
        })
    }

    /// The embedded broker's settings with the registry check installed (when required).
    pub fn broker_config(&self, base: &pickup_broker::BrokerConfig) -> pickup_broker::BrokerConfig {
        let mut b = base.clone();
        if let Some(a) = &self.auth {
            b.auth_hook = Some(match b.auth_hook.take() {
                // Keep a hook someone else installed: both must pass.
                Some(other) => {
                    let mine = a.hook();
                    Arc::new(move |c: &str, u: &str, p: &str| mine(c, u, p) && other(c, u, p))
                }
                None => a.hook(),
            });
        }
        b
    }

    /// Credentials (unless configured explicitly) and TLS for the daemon's own link.
    pub fn configure_link(&self, lo: &mut LinkOptions) {
        if lo.credentials.is_none() {
            if let Some(c) = &self.credentials {
                // The embedded broker without authentication ignores them.
                lo.credentials = Some(c.clone());
            }
        }
        if self.endpoint.as_ref().is_some_and(|e| e.tls) {
            lo.tls = self.tls.clone();
        }
    }

    /// Logs what an exposed embedded broker means (called once it runs).
    pub fn warn_exposure(&self, cfg: &pickup_broker::BrokerConfig) {
        let exposed = exposed_listeners(cfg);
        if !exposed.is_empty() {
            tracing::warn!(
                listen = ?exposed,
                authentication = self.auth.is_some(),
                "the embedded broker listens beyond loopback and has no per-topic authorization: every device that may connect can read and publish every topic (other couriers' jobs, customer notifications). Use Mosquitto with the ACL from `pickupctl broker mosquitto-config` for production (docs/security.md)"
            );
        }
    }
}

/// Listener addresses that are not loopback.
pub fn exposed_listeners(b: &pickup_broker::BrokerConfig) -> Vec<SocketAddr> {
    let mut all = vec![b.listen];
    all.extend(b.listen_v5);
    all.extend(b.tls.as_ref().map(|t| t.listen));
    all.into_iter().filter(|a| !a.ip().is_loopback()).collect()
}

/// The daemon's id in the registry: its MQTT username, by default its client id.
pub fn daemon_id(cfg: &Config) -> String {
    cfg.mqtt
        .username
        .clone()
        .unwrap_or_else(|| cfg.mqtt.client_id.clone())
}

/// Makes sure the daemon has an identity (registry entry of role `daemon`) and its secret
/// file; returns `(id, secret)`. Creates both at first start. `None` (with a warning) when
/// the client id cannot be a registry id.
fn ensure_daemon_identity(
    cfg: &Config,
    registry_path: &Path,
    secret_path: &Path,
) -> anyhow::Result<Option<(String, String)>> {
    let id = daemon_id(cfg);
    if let Err(e) = registry::check_id(&id, Role::Daemon) {
        tracing::warn!(problem = %e, "mqtt.client_id cannot name the daemon's identity; the daemon connects without credentials");
        return Ok(None);
    }
    let _lock = RegistryLock::acquire(registry_path)?;
    let mut reg = Registry::load(registry_path)?;
    let stored = read_secret(secret_path)?;
    match (reg.get(&id), stored) {
        (Some(d), Some(secret)) => {
            if d.role != Role::Daemon {
                anyhow::bail!(
                    "device registry {}: {id:?} is a {} identity, but the daemon uses that name (mqtt.client_id); remove it or change mqtt.client_id",
                    registry_path.display(),
                    d.role
                );
            }
            if !registry::verify_secret(&secret, &d.secret_hash) {
                anyhow::bail!(
                    "{} does not match the daemon identity {id:?} in {}; run `pickupctl device rotate {id}` (it rewrites both)",
                    secret_path.display(),
                    registry_path.display()
                );
            }
            Ok(Some((id, secret)))
        }
        (Some(d), None) => {
            if d.role != Role::Daemon {
                anyhow::bail!(
                    "device registry {}: {id:?} is a {} identity, but the daemon uses that name (mqtt.client_id)",
                    registry_path.display(),
                    d.role
                );
            }
            let secret = reg.rotate(&id, crate::store::now_ms())?;
            write_secret(secret_path, &secret)?;
            reg.save(registry_path)?;
            tracing::warn!(id, secret_file = %secret_path.display(), "the daemon's secret file was missing: new secret made (regenerate the Mosquitto password file if one is in use)");
            Ok(Some((id, secret)))
        }
        (None, _) => {
            let secret = reg.add(&id, Role::Daemon, crate::store::now_ms())?;
            write_secret(secret_path, &secret)?;
            reg.save(registry_path)?;
            tracing::info!(id, registry = %registry_path.display(), secret_file = %secret_path.display(), "created the daemon's identity");
            Ok(Some((id, secret)))
        }
    }
}

/// Reads a secret file (trimmed); missing → None.
pub fn read_secret(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

/// Writes a secret file atomically, 0600.
pub fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    registry::write_atomic(path, format!("{secret}\n").as_bytes())?;
    Ok(())
}
