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
    let mut st =
        conn.prepare("SELECT state, count(*) FROM deliveries GROUP BY state ORDER BY state")?;
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
/// commits. The row is found by its id before that transaction: the id is unique only
/// per sink, so the search reads the table, and a WAL reader does not hold the daemon's
/// writer while it does.
pub fn redrive(conn: &mut Connection, id: &str, now: Millis) -> rusqlite::Result<Redrive> {
    let seq: Option<i64> = conn
        .query_row(
            "SELECT seq FROM deliveries WHERE id = ?1 ORDER BY seq LIMIT 1",
            [id],
            |r| r.get(0),
        )
        .optional()?;
    let Some(seq) = seq else {
        return Ok(Redrive::NotFound);
    };
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Read again under the write lock: the row may have changed (or been pruned) since.
    let found: Option<(i64, String, String, String)> = tx
        .query_row(
            "SELECT seq, sink, call_id, state FROM deliveries WHERE seq = ?1",
            [seq],
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{Change, DispatchConfig, Dispatcher, NewCall};
    use crate::store::{open, Op, WriteJob, Writer};
    use pickup_protocol::{CreateCall, Location, Parcel, ParcelClass, Topics};
    use tokio::sync::mpsc;

    fn create(d: &mut Dispatcher, id: &str, request_id: &str) -> Vec<Change> {
        d.create_call(
            NewCall {
                id: id.into(),
                pickup_code: "1234".into(),
                req: CreateCall {
                    request_id: request_id.into(),
                    tel: "010-1234-5678".into(),
                    location: Location {
                        lat: 37.5,
                        lon: 127.0,
                        label: None,
                    },
                    parcel: Parcel {
                        class: ParcelClass::Light,
                        weight_kg: None,
                        weight_source: None,
                    },
                    kiosk_id: None,
                    scale_id: None,
                    destination: None,
                },
                price: None,
                class_corrected: None,
                correlation: None,
            },
            1_000,
        )
        .changes
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_commit_with_their_outbox_row_and_change_state_through_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        let conn = open(&path).unwrap();
        let (ctx, mut crx) = mpsc::unbounded_channel();
        let (ftx, mut frx) = mpsc::unbounded_channel();
        let (w, handle) = Writer::<u32>::spawn(conn, path.clone(), 64, 32, ctx, ftx, None).unwrap();
        let mut d = Dispatcher::new(
            DispatchConfig {
                webhook: true,
                ..DispatchConfig::default()
            },
            Topics::new("t").unwrap(),
        );
        let mut changes = create(&mut d, "c1", "r1");
        // The same delivery twice is stored once.
        let again: Vec<Change> = changes
            .iter()
            .filter(|c| matches!(c, Change::Delivery(_)))
            .cloned()
            .collect();
        assert_eq!(again.len(), 1);
        changes.extend(again);
        w.send(WriteJob {
            op: Op::Apply(changes),
            after: Some(1),
        })
        .await
        .unwrap();
        crx.recv().await.unwrap();
        let r = crate::store::Reader::open(&path).unwrap();
        let rows = pending(r.conn(), WEBHOOK, 0).unwrap();
        assert_eq!(rows.len(), 1);
        let row = rows[0].clone();
        assert_eq!((row.id.as_str(), row.call_id.as_str()), ("c1-1", "c1"));
        assert_eq!(
            (row.state, row.attempts, row.next_attempt_at),
            (State::Pending, 0, row.created_at)
        );
        let outbox: Vec<u8> = r
            .conn()
            .query_row(
                "SELECT payload FROM outbox WHERE topic LIKE '%/notifications'",
                [],
                |x| x.get(0),
            )
            .unwrap();
        assert_eq!(outbox, row.payload, "both sinks get the same bytes");
        assert!(pending(r.conn(), WEBHOOK, row.seq).unwrap().is_empty());

        // Dead, with the reason; listed as failed.
        let dead = Update {
            sink: WEBHOOK.into(),
            id: "c1-1".into(),
            redrives: 0,
            state: State::Dead,
            attempts: 3,
            next_attempt_at: 5,
            last_error: Some("gave up after 3 attempts: HTTP 500".into()),
        };
        w.send(WriteJob {
            op: Op::Delivery(dead.clone()),
            after: Some(2),
        })
        .await
        .unwrap();
        crx.recv().await.unwrap();
        let failed = list(r.conn(), Some(State::Dead), 10).unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(
            failed[0].last_error.as_deref(),
            Some("gave up after 3 attempts: HTTP 500")
        );
        assert!(list(r.conn(), Some(State::Delivered), 10)
            .unwrap()
            .is_empty());

        // Re-drive from a second connection while the writer runs.
        let mut op = Connection::open(&path).unwrap();
        op.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(
            redrive(&mut op, "c1-1", 9_000).unwrap(),
            Redrive::Redriven { later_delivered: 0 }
        );
        assert_eq!(
            redrive(&mut op, "c1-1", 9_000).unwrap(),
            Redrive::NotDead(State::Pending)
        );
        assert_eq!(redrive(&mut op, "nope", 9_000).unwrap(), Redrive::NotFound);
        // A rescan past its seq still finds it; attempts start over.
        let back = pending(r.conn(), WEBHOOK, row.seq).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(
            (back[0].attempts, back[0].redrives, back[0].next_attempt_at),
            (0, 1, 9_000)
        );
        assert!(back[0]
            .last_error
            .as_deref()
            .unwrap()
            .starts_with("re-driven by operator"));
        // An update decided before the re-drive is dropped; one after it applies.
        w.send(WriteJob {
            op: Op::Delivery(dead.clone()),
            after: Some(3),
        })
        .await
        .unwrap();
        crx.recv().await.unwrap();
        assert_eq!(pending(r.conn(), WEBHOOK, 0).unwrap().len(), 1);
        w.send(WriteJob {
            op: Op::Delivery(Update {
                redrives: 1,
                state: State::Delivered,
                attempts: 1,
                ..dead
            }),
            after: Some(4),
        })
        .await
        .unwrap();
        crx.recv().await.unwrap();
        assert!(pending(r.conn(), WEBHOOK, 0).unwrap().is_empty());
        assert_eq!(
            redrive(&mut op, "c1-1", 9_500).unwrap(),
            Redrive::NotDead(State::Delivered)
        );
        assert_eq!(
            counts(r.conn()).unwrap(),
            vec![("delivered".to_string(), 1)]
        );

        // A transaction that fails leaves neither the outbox row nor the delivery.
        // Request id r1 belongs to c1: the call row, written last here, breaks the commit
        // after the outbox row and the delivery were inserted.
        let mut bad = create(
            &mut Dispatcher::new(
                DispatchConfig {
                    webhook: true,
                    ..DispatchConfig::default()
                },
                Topics::new("t").unwrap(),
            ),
            "c2",
            "r1",
        );
        let at = bad
            .iter()
            .position(|c| matches!(c, Change::Call(_)))
            .unwrap();
        let call = bad.remove(at);
        assert!(bad.iter().any(|c| matches!(c, Change::Delivery(_))));
        bad.push(call);
        w.send(WriteJob {
            op: Op::Apply(bad),
            after: Some(5),
        })
        .await
        .unwrap();
        assert!(frx.recv().await.is_some());
        handle.join().unwrap();
        let c = Connection::open(&path).unwrap();
        assert_eq!(
            count(&c, "SELECT count(*) FROM deliveries WHERE call_id = 'c2'"),
            0
        );
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM outbox WHERE payload LIKE '%c2-1%'"
            ),
            0
        );
    }
}
