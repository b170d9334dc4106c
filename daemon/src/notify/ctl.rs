//! `pickupctl notifications`: the operator's view of webhook deliveries, and the re-drive
//! of dead-lettered ones.
//!
//! It works on the database file, on the box: listing opens it read-only (WAL readers
//! never block the daemon). A re-drive is one short `UPDATE … WHERE state = 'dead'` in an
//! IMMEDIATE transaction with a busy timeout: SQLite in WAL mode serialises it with the
//! daemon's writer (which waits up to its own busy timeout), it works whether the daemon
//! runs or not (after an outage is when dead letters get looked at), and it needs no
//! operator topic on the broker that every site's ACL would have to guard. The running
//! daemon picks the row up at its next rescan (`notifications.webhook.rescan_ms`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use pickup_protocol::Millis;
use rusqlite::{Connection, OpenFlags};
use serde_json::json;

use crate::config::Config;
use crate::store::deliveries::{self, Redrive, Row, State};
use crate::store::{now_ms, Reader};

/// `pickupctl notifications` options.
#[derive(Args, Debug, Clone)]
pub struct NotificationsArgs {
    /// Only dead-lettered deliveries (given up; `--retry` re-drives them).
    #[arg(long)]
    pub failed: bool,
    /// Re-drive this dead notification (by id): pending again, with a fresh attempt budget.
    #[arg(long, value_name = "ID")]
    pub retry: Option<String>,
    /// Database file. Default: `store.path` from the daemon's settings.
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// The daemon's settings file, for the default database path (default:
    /// /etc/pickupd/pickupd.toml when it exists; PICKUPD__STORE__PATH also applies).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Most rows listed, newest first.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

fn db_path(args: &NotificationsArgs) -> anyhow::Result<PathBuf> {
    let p = match &args.db {
        Some(p) => p.clone(),
        None => {
            Config::load(args.config.as_deref(), std::env::vars())
                .context("reading the daemon settings for store.path (or pass --db)")?
                .store
                .path
        }
    };
    anyhow::ensure!(
        p.exists(),
        "no database at {} (pass --db, or --config with the daemon's settings)",
        p.display()
    );
    Ok(p)
}

/// Lists deliveries (all, or only dead ones), newest first.
pub fn list(db: &Path, failed: bool, limit: u32) -> anyhow::Result<Vec<Row>> {
    let reader = Reader::open(db)?;
    deliveries::list(reader.conn(), failed.then_some(State::Dead), limit).map_err(|e| {
        if e.to_string().contains("no such table") {
            anyhow::anyhow!(
                "{} has no deliveries table yet: start this version of pickupd on it once",
                db.display()
            )
        } else {
            anyhow::anyhow!("reading deliveries from {}: {e}", db.display())
        }
    })
}

/// Re-drives the dead delivery `id`; see the module documentation for why this writes
/// the file directly.
pub fn retry(db: &Path, id: &str) -> anyhow::Result<Redrive> {
    let mut conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {} for writing", db.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    deliveries::redrive(&mut conn, id, now_ms())
        .with_context(|| format!("re-driving {id} in {}", db.display()))
}

fn ago(now: Millis, at: Millis) -> String {
    let s = (now - at) / 1000;
    match s {
        s if s < 0 => format!("in {}s", -s),
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s => format!("{}h ago", s / 3600),
    }
}

fn template(r: &Row) -> String {
    serde_json::from_slice::<serde_json::Value>(&r.payload)
        .ok()
        .and_then(|v| v["template"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// One line per delivery, for humans.
pub fn describe(r: &Row, now: Millis) -> String {
    let mut s = format!(
        "{} {} {} attempts={} call={} updated {}",
        r.id,
        r.state.as_str(),
        template(r),
        r.attempts,
        r.call_id,
        ago(now, r.updated_at)
    );
    if r.state == State::Pending {
        s.push_str(&format!(", next attempt {}", ago(now, r.next_attempt_at)));
    }
    if let Some(e) = &r.last_error {
        s.push_str(&format!(" error=\"{e}\""));
    }
    s
}

/// Runs `pickupctl notifications`.
pub fn run(args: NotificationsArgs, json_out: bool) -> anyhow::Result<()> {
    let db = db_path(&args)?;
    let json_out = json_out || args.json;
    if let Some(id) = &args.retry {
        return match retry(&db, id)? {
            Redrive::Redriven { later_delivered } => {
                if json_out {
                    println!(
                        "{}",
                        json!({"id": id, "redriven": true, "later_delivered": later_delivered})
                    );
                } else {
                    println!("{id} re-driven: pending, attempted at the daemon's next rescan");
                }
                if later_delivered > 0 {
                    eprintln!(
                        "pickupctl: note: {later_delivered} later notification(s) of the same call were already delivered; this one arrives after them (receivers order by the number after the last '-' of the id)"
                    );
                }
                Ok(())
            }
            Redrive::NotDead(state) => anyhow::bail!(
                "{id} is {}: only dead deliveries can be re-driven",
                state.as_str()
            ),
            Redrive::NotFound => anyhow::bail!("no delivery with id {id}"),
        };
    }
    let now = now_ms();
    for r in list(&db, args.failed, args.limit)? {
        if json_out {
            println!(
                "{}",
                json!({
                    "id": r.id,
                    "call_id": r.call_id,
                    "sink": r.sink,
                    "template": template(&r),
                    "state": r.state.as_str(),
                    "attempts": r.attempts,
                    "next_attempt_at": r.next_attempt_at,
                    "last_error": r.last_error,
                    "created_at": r.created_at,
                    "updated_at": r.updated_at,
                    "redrives": r.redrives,
                })
            );
        } else {
            println!("{}", describe(&r, now));
        }
    }
    Ok(())
}
