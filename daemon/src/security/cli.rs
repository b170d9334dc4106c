//! `pickupctl device add|remove|list|rotate` and `pickupctl broker mosquitto-config`:
//! registry management by an operator on the box. They edit the registry file directly
//! (no broker connection needed); the running daemon notices the change on the next
//! CONNECT.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use pickup_protocol::{Millis, Topics};
use serde_json::json;

use super::registry::{self, Registry, RegistryLock, Role};
use super::{daemon_id, mosquitto, write_secret};
use crate::config::Config;

/// Where the registry is.
#[derive(Args, Debug, Clone)]
pub struct RegistryArgs {
    /// pickupd settings file, for `[security] registry` and `site` (default:
    /// /etc/pickupd/pickupd.toml when it exists).
    #[arg(long, global = true, env = "PICKUPD_CONFIG")]
    pub config: Option<PathBuf>,
    /// The registry file itself (overrides the settings).
    #[arg(long, global = true, env = "PICKUP_REGISTRY")]
    pub registry: Option<PathBuf>,
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| {
        let all: Vec<_> = Role::ALL.iter().map(|r| r.as_str()).collect();
        format!("unknown role {s:?}; one of {}", all.join(", "))
    })
}

/// `pickupctl device …`
#[derive(Subcommand, Debug, Clone)]
pub enum DeviceCmd {
    /// Add a device and print its secret (shown only this once).
    Add {
        /// Device id: its MQTT username and the id in its topics.
        id: String,
        /// courier, kiosk, relay, operator or daemon.
        #[arg(long, value_parser = parse_role)]
        role: Role,
    },
    /// Remove a device; it cannot connect any more (existing connections stay until they
    /// reconnect).
    Remove {
        /// Device id.
        id: String,
    },
    /// List devices (no secrets).
    List,
    /// Give a device a new secret and print it; the old one stops working.
    Rotate {
        /// Device id.
        id: String,
    },
}

/// `pickupctl broker …`
#[derive(Subcommand, Debug, Clone)]
pub enum BrokerCmd {
    /// Write a Mosquitto password file, ACL and settings generated from the registry.
    MosquittoConfig {
        /// Directory for `passwd`, `acl` and `pickupd.conf`.
        #[arg(long)]
        out: PathBuf,
        /// Site (default: `site` from the settings).
        #[arg(long = "for-site")]
        site: Option<String>,
        /// System user Mosquitto runs as; the files are handed to it when run as root.
        #[arg(long, default_value = "mosquitto")]
        owner: String,
        /// Plain MQTT listener, ADDR:PORT (repeatable).
        #[arg(long = "listen", default_value = "127.0.0.1:1883")]
        listen: Vec<std::net::SocketAddr>,
        /// TLS listener, ADDR:PORT (repeatable); needs --certfile and --keyfile.
        #[arg(long = "tls-listen")]
        tls_listen: Vec<std::net::SocketAddr>,
        /// Server certificate chain (PEM) for the TLS listeners.
        #[arg(long, requires = "keyfile")]
        certfile: Option<PathBuf>,
        /// Server private key (PEM) for the TLS listeners.
        #[arg(long, requires = "certfile")]
        keyfile: Option<PathBuf>,
    },
}

struct Place {
    cfg: Config,
    registry: PathBuf,
}

fn place(a: &RegistryArgs) -> anyhow::Result<Place> {
    let cfg = Config::load(a.config.as_deref(), std::env::vars())?;
    let registry = match &a.registry {
        Some(p) => p.clone(),
        None => cfg.security.registry_path(&cfg),
    };
    Ok(Place { cfg, registry })
}

/// Runs a device command; `json` prints machine-readable output.
pub fn device(a: &RegistryArgs, cmd: DeviceCmd, json_out: bool) -> anyhow::Result<()> {
    let pl = place(a)?;
    let now = crate::store::now_ms();
    match cmd {
        DeviceCmd::List => {
            let reg = Registry::load(&pl.registry)?;
            if json_out {
                let v: Vec<_> = reg
                    .iter()
                    .map(|d| {
                        json!({
                            "id": d.id, "role": d.role,
                            "client_id": registry::client_id_for(d.role, &d.id),
                            "created_at": d.created_at, "rotated_at": d.rotated_at,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<24} {:<9} {:<30} {:<20} ROTATED",
                    "ID", "ROLE", "CLIENT ID", "CREATED"
                );
                for d in reg.iter() {
                    println!(
                        "{:<24} {:<9} {:<30} {:<20} {}",
                        d.id,
                        d.role.as_str(),
                        registry::client_id_for(d.role, &d.id),
                        utc(d.created_at),
                        d.rotated_at.map(utc).unwrap_or_else(|| "-".into())
                    );
                }
                eprintln!("{} device(s) in {}", reg.len(), pl.registry.display());
            }
            Ok(())
        }
        DeviceCmd::Add { id, role } => {
            let _lock = RegistryLock::acquire(&pl.registry)?;
            let mut reg = Registry::load(&pl.registry)?;
            let had_devices = reg.has_devices();
            let secret = reg.add(&id, role, now)?;
            reg.save(&pl.registry)?;
            show_secret(&pl, &id, role, &secret, "added", json_out)?;
            if !had_devices && role != Role::Daemon {
                eprintln!(
                    "note: this is the first device. A running pickupd with the embedded broker in zero-setup mode \
                     (loopback only, anonymous clients) requires authentication only after a restart."
                );
            }
            Ok(())
        }
        DeviceCmd::Remove { id } => {
            let _lock = RegistryLock::acquire(&pl.registry)?;
            let mut reg = Registry::load(&pl.registry)?;
            let d = reg.remove(&id)?;
            reg.save(&pl.registry)?;
            if json_out {
                println!("{}", json!({"removed": d.id, "role": d.role}));
            } else {
                println!("removed {} {}", d.role, d.id);
            }
            mosquitto_hint();
            Ok(())
        }
        DeviceCmd::Rotate { id } => {
            let _lock = RegistryLock::acquire(&pl.registry)?;
            let mut reg = Registry::load(&pl.registry)?;
            let secret = reg.rotate(&id, now)?;
            let role = reg.get(&id).map(|d| d.role).unwrap_or(Role::Daemon);
            if role == Role::Daemon && id == daemon_id(&pl.cfg) {
                // The daemon reads its secret from this file at start.
                let path = pl.cfg.security.daemon_secret_path(&pl.cfg);
                write_secret(&path, &secret)?;
                eprintln!(
                    "wrote the daemon's new secret to {}; restart pickupd to use it",
                    path.display()
                );
            }
            reg.save(&pl.registry)?;
            show_secret(&pl, &id, role, &secret, "rotated", json_out)
        }
    }
}

fn show_secret(
    pl: &Place,
    id: &str,
    role: Role,
    secret: &str,
    what: &str,
    json_out: bool,
) -> anyhow::Result<()> {
    let client_id = registry::client_id_for(role, id);
    if json_out {
        println!(
            "{}",
            json!({"id": id, "role": role, "client_id": client_id, "username": id, "secret": secret})
        );
    } else {
        println!("{what} {role} {id}");
        println!("  username:  {id}");
        println!("  client id: {client_id}");
        println!("  secret:    {secret}");
        eprintln!(
            "The secret is shown only now; the registry ({}) keeps only hashes.",
            pl.registry.display()
        );
    }
    mosquitto_hint();
    Ok(())
}

fn mosquitto_hint() {
    eprintln!(
        "With Mosquitto: pickupctl broker mosquitto-config --out DIR, then reload mosquitto."
    );
}

/// Runs a broker command.
pub fn broker(a: &RegistryArgs, cmd: BrokerCmd) -> anyhow::Result<()> {
    let pl = place(a)?;
    match cmd {
        BrokerCmd::MosquittoConfig {
            out,
            site,
            owner,
            listen,
            tls_listen,
            certfile,
            keyfile,
        } => {
            let site = site.unwrap_or_else(|| pl.cfg.site.clone());
            let topics = Topics::new(&site)?;
            let reg = Registry::load(&pl.registry)?;
            let tls = match (certfile, keyfile, tls_listen.is_empty()) {
                (Some(c), Some(k), false) => Some((c, k)),
                (_, _, true) => None,
                _ => anyhow::bail!("--tls-listen needs --certfile and --keyfile"),
            };
            let mut listeners: Vec<mosquitto::MqttListener> = listen
                .into_iter()
                .map(|addr| mosquitto::MqttListener { addr, tls: None })
                .collect();
            listeners.extend(tls_listen.into_iter().map(|addr| mosquitto::MqttListener {
                addr,
                tls: tls.clone(),
            }));
            let w = mosquitto::write_config(&reg, &topics, &out, &listeners)?;
            if !mosquitto::chown_to(&w, &owner)? {
                eprintln!("note: the files stay owned by the current user; Mosquitto must be able to read them");
            }
            println!("{}", w.passwd.display());
            println!("{}", w.acl.display());
            println!("{}", w.conf.display());
            eprintln!(
                "{} identities for {}/; include {} from mosquitto.conf and reload mosquitto",
                reg.len(),
                topics.prefix(),
                w.conf.display()
            );
            if !reg.iter().any(|d| d.role == Role::Daemon) {
                eprintln!("warning: no daemon identity in the registry; pickupd creates one at its first start");
            }
            Ok(())
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
fn utc(ms: Millis) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_700_000_000_000), "2023-11-14 22:13:20");
    }
}
