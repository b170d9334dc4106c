//! The `deliveries` table: customer notifications queued for sinks other than the MQTT
//! topic (the HTTP webhook), with their delivery state.
//!
//! Rows are inserted by the writer in the same transaction as the notification's outbox
//! row ([`crate::dispatch::Change::Delivery`]), so a notification either exists for every
//! sink or for none. The webhook task changes their state through the writer
//! ([`super::Op::Delivery`]); `pickupctl notifications` reads them and re-drives dead ones.

use pickup_protocol::Millis;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::dispatch::Delivery;

/// Sink name of the HTTP webhook.
pub const WEBHOOK: &str = crate::dispatch::saga::WEBHOOK_SINK;

/// Where a delivery is. `delivered` and `dead` are final until an operator re-drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for its turn or its next attempt.
    Pending,
    /// The sink acknowledged it.
    Delivered,
    /// Given up (attempts exhausted, refused by the sink, or too old); `last_error` says why.
    Dead,
}

impl State {
    /// Name stored in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
        }
    }

    fn parse(s: &str) -> rusqlite::Result<Self> {
        match s {
            "pending" => Ok(Self::Pending),
            "delivered" => Ok(Self::Delivered),
            "dead" => Ok(Self::Dead),
            other => Err(rusqlite::Error::FromSqlConversionFailure(
                0,
                rusqlite::types::Type::Text,
                format!("unknown delivery state {other:?}").into(),
            )),
        }
    }
}

/// One stored delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Insertion order; within a call, the order the sink must keep.
    pub seq: i64,
    /// Notification id (the receiver's dedup key).
    pub id: String,
    /// The call it is about.
    pub call_id: String,
    /// Which sink.
    pub sink: String,
    /// The notification JSON.
    pub payload: Vec<u8>,
    /// Where it is.
    pub state: State,
    /// Attempts made since it was queued (or last re-driven).
    pub attempts: u32,
    /// Not attempted before this, unix ms.
    pub next_attempt_at: Millis,
    /// Why the last attempt failed, or why it is dead.
    pub last_error: Option<String>,
    /// When it was queued, unix ms.
    pub created_at: Millis,
    /// Last state change, unix ms.
    pub updated_at: Millis,
    /// Times an operator re-drove it; an update made for an older re-drive is ignored.
    pub redrives: u32,
}

const COLUMNS: &str = "seq, id, call_id, sink, payload, state, attempts, next_attempt_at, \
                       last_error, created_at, updated_at, redrives";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        seq: r.get(0)?,
        id: r.get(1)?,
        call_id: r.get(2)?,
        sink: r.get(3)?,
        payload: r.get(4)?,
        state: State::parse(&r.get::<_, String>(5)?)?,
        attempts: r.get(6)?,
        next_attempt_at: r.get(7)?,
        last_error: r.get(8)?,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
        redrives: r.get(11)?,
    })
}

/// A state change decided by a sink, applied by the writer.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// Which sink.
    pub sink: String,
    /// Notification id.
    pub id: String,
    /// The re-drive generation the sink worked on; the update is dropped if an operator
    /// re-drove the row since.
    pub redrives: u32,
    /// New state.
    pub state: State,
    /// Attempts made so far.
    pub attempts: u32,
    /// Next attempt, unix ms (pending rows).
    pub next_attempt_at: Millis,
    /// Why the last attempt failed / why it is dead.
    pub last_error: Option<String>,
}

/// Queues a delivery; a repeat of the same (sink, id) is ignored.
pub(super) fn insert(
    tx: &rusqlite::Transaction<'_>,
    d: &Delivery,
    now: Millis,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO deliveries
         (id, call_id, sink, payload, state, attempts, next_attempt_at, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5, ?5, ?5)",
    )?
    .execute(params![d.id, d.call_id, d.sink, d.payload, now])?;
    Ok(())
}

/// Applies a sink's decision.
pub(super) fn update(
    tx: &rusqlite::Transaction<'_>,
    u: &Update,
    now: Millis,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE deliveries SET state = ?1, attempts = ?2, next_attempt_at = ?3, last_error = ?4,
             updated_at = ?5
         WHERE sink = ?6 AND id = ?7 AND redrives = ?8",
    )?
    .execute(params![
        u.state.as_str(),
        u.attempts,
        u.next_attempt_at,
        u.last_error,
        now,
        u.sink,
        u.id,
        u.redrives,
    ])?;
    Ok(())
}

/// Pending rows of `sink` queued after `after_seq`, plus pending rows an operator
/// re-drove, in order. `after_seq = 0` gives every pending row (what a sink resumes from
/// at start); later rescans pass the highest `seq` seen so far.
pub fn pending(conn: &Connection, sink: &str, after_seq: i64) -> rusqlite::Result<Vec<Row>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM deliveries
         WHERE sink = ?1 AND state = 'pending' AND (seq > ?2 OR redrives > 0) ORDER BY seq"
    ))?;
    let rows = st.query_map(params![sink, after_seq], row)?;
    rows.collect()
}

/// Rows for the operator, newest first: all of them, or only those in `state`.
pub fn list(conn: &Connection, state: Option<State>, limit: u32) -> rusqlite::Result<Vec<Row>> {
    let mut st = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM deliveries WHERE ?1 IS NULL OR state = ?1 ORDER BY seq DESC LIMIT ?2"
    ))?;
    let rows = st.query_map(params![state.map(State::as_str), limit], row)?;
    rows.collect()
}

/// Counts per state (status lines, tests).
pub fn counts(conn: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut st = conn.prepare(
        "SELECT state, count(*) FROM deliveries GROUP BY state ORDER BY state",
    )?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// What a re-drive did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    /// The dead row is pending again with a fresh attempt budget. `later_delivered`
    /// counts notifications of the same call the sink already has: this one now arrives
    /// after them, out of order.
    Redriven {
        /// Later notifications of the call already delivered.
        later_delivered: u32,
    },
    /// Only dead rows can be re-driven.
    NotDead(State),
    /// No such notification id.
    NotFound,
}

/// Puts the dead delivery `id` back to pending, to be attempted at once. One short
/// IMMEDIATE transaction, so it waits (busy timeout) rather than fails while the daemon
/// commits.
pub fn redrive(conn: &mut Connection, id: &str, now: Millis) -> rusqlite::Result<Redrive> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: Option<(i64, String, String, String)> = tx
        .query_row(
            "SELECT seq, sink, call_id, state FROM deliveries WHERE id = ?1 ORDER BY seq LIMIT 1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((seq, sink, call_id, state)) = found else {
        return Ok(Redrive::NotFound);
    };
    let state = State::parse(&state)?;
    if state != State::Dead {
        return Ok(Redrive::NotDead(state));
    }
    let later_delivered: u32 = tx.query_row(
        "SELECT count(*) FROM deliveries
         WHERE sink = ?1 AND call_id = ?2 AND seq > ?3 AND state = 'delivered'",
        params![sink, call_id, seq],
        |r| r.get(0),
    )?;
    tx.execute(
        "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?2,
             updated_at = ?2, redrives = redrives + 1,
             last_error = 're-driven by operator; before: ' || coalesce(last_error, '')
         WHERE seq = ?1 AND state = 'dead'",
        params![seq, now],
    )?;
    tx.commit()?;
    Ok(Redrive::Redriven { later_delivered })
}
