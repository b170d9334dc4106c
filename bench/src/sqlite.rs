//! SQLite: the commit-rate baseline, and databases with many calls for the memory and
//! start-up measurements (written with plain SQL inserts, fast, in one transaction).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use pickup_protocol::{CallStatus, CallView, CourierBrief, Location, Parcel, ParcelClass, Vehicle};
use pickupd::dispatch::Call;
use rusqlite::{params, Connection};
use serde::Serialize;

use crate::stats::Summary;

/// What the commit-rate baseline measured.
#[derive(Debug, Clone, Serialize)]
pub struct CommitRate {
    /// Transactions of one ~1 KB row insert each.
    pub commits: u64,
    /// Per second.
    pub commits_per_s: f64,
    /// Time of one BEGIN/INSERT/COMMIT.
    pub commit_latency: Summary,
    /// The settings used (the daemon's).
    pub settings: String,
}

/// Single-row transactions, back to back, for `dur`, in a fresh file in `dir`, with the
/// daemon's durability settings (WAL, synchronous = FULL).
pub fn commit_rate(dir: &Path, dur: Duration) -> anyhow::Result<CommitRate> {
    let path = dir.join("sqlite-baseline.db");
    let _ = std::fs::remove_file(&path);
    let conn = Connection::open(&path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA wal_autocheckpoint = 1000;
         CREATE TABLE t (id TEXT PRIMARY KEY, at INTEGER NOT NULL, body TEXT NOT NULL) STRICT;",
    )?;
    let body = "x".repeat(1000);
    let mut lat = Vec::new();
    let end = Instant::now() + dur;
    let mut n: u64 = 0;
    while Instant::now() < end {
        let t0 = Instant::now();
        let tx = conn.unchecked_transaction()?;
        tx.prepare_cached("INSERT INTO t (id, at, body) VALUES (?1, ?2, ?3)")?
            .execute(params![format!("c{n:012}"), n as i64, body])?;
        tx.commit()?;
        lat.push(t0.elapsed());
        n += 1;
    }
    drop(conn);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(path.with_extension("db-wal"));
    let _ = std::fs::remove_file(path.with_extension("db-shm"));
    Ok(CommitRate {
        commits: n,
        commits_per_s: n as f64 / dur.as_secs_f64(),
        commit_latency: Summary::of(&mut lat),
        settings: "journal_mode=WAL, synchronous=FULL, one 1 KB row per transaction".into(),
    })
}

/// How a generated database looks.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct History {
    /// Calls in total.
    pub calls: usize,
    /// Of those, finished within the last minutes (the daemon loads them).
    pub recent: usize,
    /// Of those, still dispatching (the daemon loads them).
    pub live: usize,
    /// Event rows per call (the audit trail; the daemon writes about five).
    pub events_per_call: usize,
    /// The finished history spans this many days back (older than one day). Within the
    /// daemon's retention (30 days by default) every such call stays in the database.
    pub days: i64,
}

/// What generating took.
#[derive(Debug, Clone, Serialize)]
pub struct Generated {
    /// The shape.
    pub history: History,
    /// Seconds to write it (0 when an existing file was reused).
    pub seconds: f64,
    /// File size, MiB.
    pub size_mib: f64,
}

fn template(now: i64) -> Call {
    Call {
        id: String::new(),
        request_id: String::new(),
        tel: "010-1234-5678".into(),
        kiosk_id: Some("k1".into()),
        location: Location {
            lat: 37.5,
            lon: 127.0,
            label: Some("Gate 2".into()),
        },
        destination: None,
        parcel: Parcel {
            class: ParcelClass::Light,
            weight_kg: None,
            weight_source: None,
        },
        price: Some(3500),
        status: CallStatus::Completed,
        pickup_code: "123456".into(),
        wrong_codes: 0,
        courier: Some(CourierBrief {
            courier_id: "courier-0001".into(),
            name: Some("Courier 0001".into()),
            vehicle: Vehicle::Scooter,
            tel: Some("010-****-0000".into()),
            distance_m: 812.4,
            eta_s: 136,
        }),
        offer: None,
        declined: BTreeSet::new(),
        grace_until: None,
        deadline_at: now,
        reason: None,
        created_at: now,
        updated_at: now,
        notices: 4,
    }
}

/// Creates (or reuses, when it already holds `h.calls` calls) a daemon database at `path`
/// with `h.calls` calls: finished history spread over the past `h.days` days, `h.recent` calls
/// finished in the last minutes and `h.live` calls still dispatching.
pub fn generate(path: &Path, h: History) -> anyhow::Result<Generated> {
    if path.exists() {
        let conn = Connection::open(path)?;
        let n: i64 = conn
            .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
            .unwrap_or(-1);
        if n == h.calls as i64 {
            return Ok(Generated {
                history: h,
                seconds: 0.0,
                size_mib: size_mib(path),
            });
        }
        drop(conn);
        std::fs::remove_file(path)?;
    }
    let t0 = Instant::now();
    // The daemon's own migrations make the schema.
    let conn = pickupd::store::open(path)?;
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -200000;")?;
    let now = pickupd::store::now_ms();
    let day = 86_400_000i64;
    let old = h.calls.saturating_sub(h.recent + h.live);
    // History: over the last `days` days, older than one day.
    let span = (h.days.max(2) - 1) * day;
    let step = span / old.max(1) as i64;
    let base = now - h.days.max(2) * day;
    let mut call = template(now);
    let tx = conn.unchecked_transaction()?;
    {
        let mut ins_call = tx.prepare(
            "INSERT INTO calls (id, request_id, status, tel, kiosk_id, created_at, updated_at, view, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        let mut ins_asg = tx.prepare(
            "INSERT INTO assignments (call_id, state, courier_id, offer_expires_at, grace_until, deadline_at, declined, updated_at)
             VALUES (?1, ?2, ?3, NULL, NULL, ?4, '[]', ?5)",
        )?;
        let mut ins_ev = tx.prepare(
            "INSERT INTO events (call_id, courier_id, kind, at, recorded_at, correlation, data)
             VALUES (?1, ?2, ?3, ?4, ?4, NULL, '{}')",
        )?;
        const KINDS: [&str; 5] = [
            "requested",
            "dispatching",
            "assigned",
            "picked_up",
            "completed",
        ];
        for i in 0..h.calls {
            let (created, status) = if i < old {
                (base + i as i64 * step, CallStatus::Completed)
            } else if i < old + h.recent {
                // Finished within the last five minutes.
                (
                    now - 300_000 + (i - old) as i64 * 250_000 / h.recent.max(1) as i64,
                    CallStatus::Completed,
                )
            } else {
                (
                    now - 60_000 + (i - old - h.recent) as i64 * 50_000 / h.live.max(1) as i64,
                    CallStatus::Dispatching,
                )
            };
            call.id = format!("c{:012x}{:05x}", created, i % 0xfffff);
            call.request_id = format!("req-{i:08}");
            call.status = status;
            call.created_at = created;
            call.updated_at = created + 1_800_000.min(now - created);
            call.deadline_at = created + 600_000;
            call.courier = if status == CallStatus::Dispatching {
                None
            } else {
                template(now).courier
            };
            let view: CallView = call.view();
            ins_call.execute(params![
                call.id,
                call.request_id,
                status.as_str(),
                call.tel,
                call.kiosk_id,
                call.created_at,
                call.updated_at,
                serde_json::to_string(&view)?,
                serde_json::to_string(&call)?,
            ])?;
            let state = if status == CallStatus::Completed {
                "done"
            } else {
                "pending"
            };
            ins_asg.execute(params![
                call.id,
                state,
                call.courier.as_ref().map(|c| c.courier_id.clone()),
                call.deadline_at,
                call.updated_at
            ])?;
            for k in KINDS.iter().take(h.events_per_call) {
                ins_ev.execute(params![call.id, "courier-0001", k, call.created_at])?;
            }
        }
    }
    tx.commit()?;
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA optimize;")?;
    drop(conn);
    Ok(Generated {
        history: h,
        seconds: t0.elapsed().as_secs_f64(),
        size_mib: size_mib(path),
    })
}

fn size_mib(path: &Path) -> f64 {
    std::fs::metadata(path).map_or(0.0, |m| m.len() as f64 / (1024.0 * 1024.0))
}

/// `EXPLAIN QUERY PLAN` of the statements the daemon runs at start, one line per step.
pub fn start_query_plans(path: &Path) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let queries = [
        "SELECT id, body FROM calls WHERE status NOT IN ('completed', 'cancelled', 'failed') \
         UNION SELECT id, body FROM calls WHERE updated_at >= 0",
        "SELECT id, body FROM couriers",
        "SELECT id, topic, payload, retain, expiry_s FROM outbox WHERE sent_at IS NULL ORDER BY id",
    ];
    let mut out = Vec::new();
    for q in queries {
        let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {q}"))?;
        let steps = st
            .query_map([], |r| r.get::<_, String>(3))?
            .collect::<Result<Vec<_>, _>>()?;
        out.push((q.to_string(), steps));
    }
    Ok(out)
}
