//! `pickupctl`: the kiosk/operator command line. Every command is a plain MQTT client of
//! the documented contract (request/response with a stable reply topic), so it also shows
//! integrators what a kiosk does.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use pickup_protocol::answer::{Answer, CallAnswer, CreateAnswer};
use pickup_protocol::client::{BrokerUrl, LinkOptions, Requester, Version};
use pickup_protocol::{CallView, ParcelClass, Topics};
use serde_json::json;

/// Options shared by every command.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Broker address.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883", env = "PICKUP_BROKER")]
    pub broker: String,
    /// Site name (topic prefix pickup/v1/<site>/).
    #[arg(long, default_value = "default", env = "PICKUP_SITE")]
    pub site: String,
    /// MQTT protocol version: 4 (3.1.1) or 5.
    #[arg(long, default_value_t = 4)]
    pub mqtt_version: u8,
    /// Client id (also names the reply topic clients/<id>/replies).
    #[arg(long)]
    pub client_id: Option<String>,
    /// Username.
    #[arg(long, env = "PICKUP_USER")]
    pub user: Option<String>,
    /// Password.
    #[arg(long, env = "PICKUP_PASSWORD")]
    pub password: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for an answer, milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub timeout_ms: u64,
}

/// Parcel class on the command line.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum ClassArg {
    /// Under 10 kg.
    Light,
    /// 10 kg or more.
    Heavy,
}

/// Commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Make a pickup call (what a kiosk does).
    Call {
        /// Customer phone number.
        #[arg(long)]
        tel: String,
        /// Pickup latitude.
        #[arg(long, allow_negative_numbers = true)]
        lat: f64,
        /// Pickup longitude.
        #[arg(long, allow_negative_numbers = true)]
        lon: f64,
        /// Pickup description.
        #[arg(long)]
        label: Option<String>,
        /// Parcel class.
        #[arg(long, value_enum, default_value = "light")]
        class: ClassArg,
        /// Parcel weight, kg.
        #[arg(long)]
        weight_kg: Option<f64>,
        /// Kiosk id.
        #[arg(long)]
        kiosk_id: Option<String>,
        /// Scale id.
        #[arg(long)]
        scale_id: Option<String>,
        /// Idempotency key (default: random). Repeating it returns the same call.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Cancel a call.
    Cancel {
        /// Call id.
        call_id: String,
        /// Reason.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Show a call.
    Status {
        /// Call id.
        call_id: String,
    },
    /// Copy the live database to FILE (SQLite online backup; safe while pickupd runs).
    Backup {
        /// The copy to write (must not exist).
        file: std::path::PathBuf,
        /// The database (default: store.path from the daemon's settings).
        #[arg(long)]
        db: Option<std::path::PathBuf>,
        /// The daemon's settings file (default: /etc/pickupd/pickupd.toml when present).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Print call state changes as they happen (retained state topics).
    Watch {
        /// Only this call.
        call_id: Option<String>,
        /// Exit after this many updates.
        #[arg(long)]
        count: Option<usize>,
    },
}

fn random_id(prefix: &str) -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{prefix}{n:016x}")
}

async fn connect(
    c: &Common,
    extra: Vec<String>,
) -> anyhow::Result<(
    Requester,
    tokio::sync::mpsc::UnboundedReceiver<pickup_protocol::client::Message>,
    Topics,
)> {
    let topics = Topics::new(&c.site)?;
    let id = c.client_id.clone().unwrap_or_else(|| random_id("ctl-"));
    let mut o = LinkOptions::new(BrokerUrl::parse(&c.broker)?, id.clone());
    o.version = if c.mqtt_version == 5 {
        Version::V5
    } else {
        Version::V4
    };
    if let (Some(u), Some(p)) = (&c.user, &c.password) {
        o.credentials = Some((u.clone(), p.clone()));
    }
    let (r, rx) = Requester::connect(
        o,
        topics.client_replies(&id),
        extra,
        Duration::from_millis(c.timeout_ms),
    )
    .await?;
    Ok((r, rx, topics))
}

/// One line describing a call, for humans.
pub fn describe(v: &CallView) -> String {
    let mut s = format!("{} {}", v.call_id, v.status.as_str());
    if let Some(c) = &v.courier {
        s.push_str(&format!(
            " courier={} ({}) {:.0} m, eta {} s",
            c.courier_id,
            c.vehicle.as_str(),
            c.distance_m,
            c.eta_s
        ));
    }
    if let Some(r) = &v.reason {
        s.push_str(&format!(" reason=\"{r}\""));
    }
    s
}

fn print_answer<T>(
    c: &Common,
    raw: &serde_json::Value,
    ok: impl FnOnce(&T) -> String,
) -> anyhow::Result<()>
where
    T: serde::de::DeserializeOwned,
{
    if c.json {
        println!("{raw}");
    }
    let a: Answer<T> = serde_json::from_value(raw.clone())?;
    match (a.ok, a.body, a.error) {
        (true, Some(b), _) => {
            if !c.json {
                println!("{}", ok(&b));
            }
            Ok(())
        }
        (_, _, Some(e)) => {
            let retry = e
                .retry_after_ms
                .map(|ms| format!(" (retry after {ms} ms)"))
                .unwrap_or_default();
            anyhow::bail!("{}: {}{retry}", e.code.as_str(), e.message)
        }
        _ => anyhow::bail!("unexpected answer: {raw}"),
    }
}

/// Runs one command.
pub async fn run(c: Common, cmd: Command) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(c.timeout_ms);
    match cmd {
        Command::Call {
            tel,
            lat,
            lon,
            label,
            class,
            weight_kg,
            kiosk_id,
            scale_id,
            request_id,
        } => {
            let (r, _rx, t) = connect(&c, vec![]).await?;
            let class = match class {
                ClassArg::Light => ParcelClass::Light,
                ClassArg::Heavy => ParcelClass::Heavy,
            };
            let body = json!({
                "request_id": request_id.unwrap_or_else(|| random_id("req-")),
                "tel": tel,
                "location": {"lat": lat, "lon": lon, "label": label},
                "parcel": {"class": class, "weight_kg": weight_kg},
                "kiosk_id": kiosk_id,
                "scale_id": scale_id,
            });
            let raw = r.request(&t.calls_create(), body, timeout).await?;
            print_answer::<CreateAnswer>(&c, &raw, |a| {
                format!(
                    "{}{} pickup code {}{}",
                    describe(&a.call),
                    if a.duplicate {
                        " (repeated request)"
                    } else {
                        ""
                    },
                    a.pickup_code,
                    a.class_corrected
                        .as_deref()
                        .map(|s| format!(" ({s})"))
                        .unwrap_or_default()
                )
            })
        }
        Command::Cancel { call_id, reason } => {
            let (r, _rx, t) = connect(&c, vec![]).await?;
            let raw = r
                .request(&t.call_cancel(&call_id), json!({"reason": reason}), timeout)
                .await?;
            print_answer::<CallAnswer>(&c, &raw, |a| describe(&a.call))
        }
        Command::Status { call_id } => {
            let (r, _rx, t) = connect(&c, vec![]).await?;
            let raw = r.request(&t.call_get(&call_id), json!({}), timeout).await?;
            print_answer::<CallAnswer>(&c, &raw, |a| describe(&a.call))
        }
        Command::Backup { file, db, config } => {
            let db = match db {
                Some(p) => p,
                None => {
                    crate::config::Config::load(config.as_deref(), std::env::vars())?
                        .store
                        .path
                }
            };
            crate::store::backup(&db, &file)?;
            if c.json {
                println!("{}", json!({"ok": true, "from": db, "to": file}));
            } else {
                println!("backed up {} to {}", db.display(), file.display());
            }
            Ok(())
        }
        Command::Watch { call_id, count } => {
            let topics = Topics::new(&c.site)?;
            let filter = match &call_id {
                Some(id) => topics.call_state(id),
                None => topics.call_state_filter(),
            };
            let (_r, mut rx, _t) = connect(&c, vec![filter]).await?;
            let mut seen = 0usize;
            while let Some(m) = rx.recv().await {
                if m.payload.is_empty() {
                    continue;
                }
                match serde_json::from_slice::<CallView>(&m.payload) {
                    Ok(_) if c.json => println!("{}", String::from_utf8_lossy(&m.payload)),
                    Ok(v) => println!("{}", describe(&v)),
                    Err(e) => eprintln!("unreadable state on {}: {e}", m.topic),
                }
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    break;
                }
            }
            Ok(())
        }
    }
}
