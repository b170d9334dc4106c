//! Store tests on real SQLite files in a temp dir.

use super::*;
use crate::dispatch::{DispatchConfig, Dispatcher, NewCall};
use pickup_protocol::{CreateCall, Location, Parcel, ParcelClass, Topics};

fn decision_changes() -> Vec<Change> {
    let mut d = Dispatcher::new(DispatchConfig::default(), Topics::new("t").unwrap());
    let dec = d.create_call(
        NewCall {
            id: "c1".into(),
            pickup_code: "1234".into(),
            req: CreateCall {
                request_id: "r1".into(),
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
            correlation: Some("corr-1".into()),
        },
        1_000,
    );
    dec.changes
}

#[test]
fn migrates_fresh_and_reopens_existing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("p.db");
    let conn = open(&path).unwrap();
    assert_eq!(
        schema_version(&conn).unwrap(),
        schema::MIGRATIONS.len() as i64
    );
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 2, "synchronous = FULL");
    conn.execute(
        "INSERT INTO courier_replies (courier_id, reply_id, call_id, action, recorded_at)
         VALUES ('k', 'x', 'y', 'accept', 1)",
        [],
    )
    .unwrap();
    drop(conn);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Reopening keeps data and does not re-run migrations.
    let conn = open(&path).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM courier_replies", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn refuses_newer_schema_and_damaged_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    let conn = open(&path).unwrap();
    conn.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(conn);
    assert!(matches!(
        open(&path),
        Err(StoreError::TooNew { found: 99, .. })
    ));

    let bad = dir.path().join("bad.db");
    std::fs::write(&bad, vec![0x5a; 8192]).unwrap();
    let before = std::fs::read(&bad).unwrap();
    let err = open(&bad).unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
    assert!(err.to_string().contains("refusing to start"));
    assert_eq!(
        std::fs::read(&bad).unwrap(),
        before,
        "damaged file left untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_commits_groups_and_hands_on_outbox_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    let conn = open(&path).unwrap();
    let (ctx, mut crx) = mpsc::unbounded_channel();
    let (ftx, _frx) = mpsc::unbounded_channel();
    let (w, handle) = Writer::<u32>::spawn(conn, path.clone(), 64, 32, ctx, ftx, None).unwrap();
    let changes = decision_changes();
    let n_out = changes
        .iter()
        .filter(|c| matches!(c, Change::Outbox(_)))
        .count();
    w.send(WriteJob {
        op: Op::Apply(changes),
        after: Some(7),
    })
    .await
    .unwrap();
    let done = crx.recv().await.unwrap();
    assert_eq!(done.after, vec![7]);
    assert_eq!(done.outbox.len(), n_out);
    // Read side sees it once committed.
    let r = Reader::open(&path).unwrap();
    let row = r.call("c1").unwrap().unwrap();
    assert_eq!(row.status, "requested");
    assert!(!row.view.contains("1234-5678"));
    assert_eq!(r.call_for_request("r1").unwrap().as_deref(), Some("c1"));
    assert_eq!(r.outbox_backlog().unwrap(), n_out as i64);
    // Marking sent empties the backlog.
    let ids = done.outbox.iter().map(|(id, _)| *id).collect();
    w.send(WriteJob {
        op: Op::MarkSent(ids),
        after: Some(8),
    })
    .await
    .unwrap();
    assert_eq!(crx.recv().await.unwrap().after, vec![8]);
    assert_eq!(r.outbox_backlog().unwrap(), 0);
    // Load after restart.
    drop(w);
    handle.join().unwrap();
    let conn = open(&path).unwrap();
    let loaded = load(&conn, &path, 2_000, 60_000).unwrap();
    assert_eq!(loaded.calls.len(), 1);
    assert_eq!(loaded.calls[0].notices, 1);
    assert!(loaded.unsent.is_empty());
    let events: i64 = conn
        .query_row(
            "SELECT count(*) FROM events WHERE correlation = 'corr-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(events, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_finished_calls_and_clears_their_state_topics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    let conn = open(&path).unwrap();
    let (ctx, mut crx) = mpsc::unbounded_channel();
    let (ftx, _frx) = mpsc::unbounded_channel();
    let (w, _h) = Writer::<u32>::spawn(conn, path.clone(), 64, 32, ctx, ftx, None).unwrap();
    // One live call (created at t=1000) and one cancelled at t=1000.
    let mut d = Dispatcher::new(DispatchConfig::default(), Topics::new("t").unwrap());
    let mk = |id: &str| NewCall {
        id: id.into(),
        pickup_code: "1".into(),
        req: CreateCall {
            request_id: format!("r-{id}"),
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
    };
    let mut changes = d.create_call(mk("live"), 1_000).changes;
    changes.extend(d.create_call(mk("old"), 1_000).changes);
    changes.extend(
        d.cancel_call(
            "old",
            None,
            crate::dispatch::CancelledBy::Customer,
            None,
            1_000,
        )
        .changes,
    );
    w.send(WriteJob {
        op: Op::Apply(changes),
        after: Some(1),
    })
    .await
    .unwrap();
    crx.recv().await.unwrap();
    let topics = Topics::new("t").unwrap();
    w.send(WriteJob {
        op: Op::Prune {
            before: 5_000,
            limit: 10,
            topics: topics.clone(),
        },
        after: Some(2),
    })
    .await
    .unwrap();
    let c = crx.recv().await.unwrap();
    assert_eq!(c.outbox.len(), 1);
    assert_eq!(c.outbox[0].1.topic, topics.call_state("old"));
    assert!(c.outbox[0].1.payload.is_empty() && c.outbox[0].1.retain);
    let r = Reader::open(&path).unwrap();
    assert!(r.call("old").unwrap().is_none());
    assert!(
        r.call("live").unwrap().is_some(),
        "live calls are never pruned"
    );
    let events: i64 = r
        .conn()
        .query_row(
            "SELECT count(*) FROM events WHERE call_id = 'old'",
            [],
            |x| x.get(0),
        )
        .unwrap();
    assert_eq!(events, 0);
    // Backup of the live file.
    let copy = dir.path().join("copy.db");
    backup(&path, &copy).unwrap();
    let rc = Reader::open(&copy).unwrap();
    assert!(rc.call("live").unwrap().is_some());
    assert!(backup(&path, &copy).is_err(), "never overwrites");
}

#[test]
fn full_check_after_an_unclean_stop_or_on_small_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    let conn = open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE filler (x BLOB); INSERT INTO filler VALUES (zeroblob(200000));",
    )
    .unwrap();
    // A clean stop, as the writer does it: the log ends empty.
    conn.execute_batch("PRAGMA optimize; PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
    drop(conn);
    assert_eq!(full_check_reason(&path, 1024), None);
    assert_eq!(full_check_reason(&path, u64::MAX), Some("small file"));
    // A stop without the final checkpoint leaves frames in the log.
    let conn = open(&path).unwrap();
    conn.execute_batch("INSERT INTO filler VALUES (zeroblob(1000));")
        .unwrap();
    let wal = dir.path().join("p.db-wal");
    std::fs::copy(&wal, dir.path().join("saved-wal")).unwrap();
    drop(conn);
    std::fs::copy(dir.path().join("saved-wal"), &wal).unwrap();
    assert_eq!(
        full_check_reason(&path, 1024),
        Some("the last stop was not clean")
    );
    // Either way the file opens.
    open(&path).unwrap();
}

#[test]
fn a_batch_writes_the_last_snapshot_of_each_call_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    let mut conn = open(&path).unwrap();
    let first = decision_changes();
    let Some(Change::Call(call)) = first.iter().find(|c| matches!(c, Change::Call(_))) else {
        panic!("no call in the decision");
    };
    let mut later = (**call).clone();
    later.status = pickup_protocol::CallStatus::Dispatching;
    later.updated_at = 1_500;
    let job = |changes| WriteJob::<()> {
        op: Op::Apply(changes),
        after: None,
    };
    let batch = vec![
        job(first.clone()),
        job(vec![Change::Call(Box::new(later.clone()))]),
    ];
    let skip = superseded(&batch);
    let idx = first
        .iter()
        .position(|c| matches!(c, Change::Call(_)))
        .unwrap();
    assert_eq!(skip, HashSet::from([(0, idx)]));
    let outbox = apply_batch(&mut conn, &batch).unwrap();
    assert_eq!(
        outbox.len(),
        first
            .iter()
            .filter(|c| matches!(c, Change::Outbox(_)))
            .count()
    );
    let (status, updated, body): (String, i64, String) = conn
        .query_row(
            "SELECT status, updated_at, body FROM calls WHERE id = 'c1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((status.as_str(), updated), ("dispatching", 1_500));
    assert_eq!(serde_json::from_str::<Call>(&body).unwrap(), later);
    let asg: String = conn
        .query_row(
            "SELECT state FROM assignments WHERE call_id = 'c1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(asg, "pending");
    // Nothing is skipped in a batch that prunes.
    let mut pruning = batch;
    pruning.push(WriteJob {
        op: Op::Prune {
            before: 0,
            limit: 10,
            topics: Topics::new("t").unwrap(),
        },
        after: None,
    });
    assert!(superseded(&pruning).is_empty());
}

#[test]
fn courier_updates_and_sent_marks_commit_without_waiting_for_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.db");
    let mut conn = open(&path).unwrap();
    let job = |op, after| WriteJob::<()> { op, after };
    let courier = || Op::Apply(vec![Change::Courier(Box::new(Courier::new("k1", 1_000)))]);
    let quiet = vec![
        job(courier(), None),
        job(Op::MarkSent(vec![1, 2]), None),
        job(Op::Ping, None),
    ];
    assert!(may_skip_sync(&quiet));
    // Anything else waits for the disk: a call, something to hand on, a mix.
    assert!(!may_skip_sync(&[job(Op::Apply(decision_changes()), None)]));
    assert!(!may_skip_sync(&[job(courier(), Some(()))]));
    let mut mixed = quiet;
    mixed.push(job(Op::Apply(decision_changes()), None));
    assert!(!may_skip_sync(&mixed));
    mixed.pop();
    let quiet = mixed;

    let synchronous =
        |c: &Connection| -> i64 { c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap() };
    commit(&mut conn, &quiet, true).unwrap();
    // Committed (another connection sees it), and the connection is back to FULL (2).
    let other = Connection::open(&path).unwrap();
    let n: i64 = other
        .query_row("SELECT count(*) FROM couriers WHERE id = 'k1'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(synchronous(&conn), 2);
    // Also after a commit that fails.
    conn.execute_batch("DROP TABLE couriers").unwrap();
    assert!(commit(&mut conn, &quiet, true).is_err());
    assert_eq!(synchronous(&conn), 2);
}

/// Bytes of page cache a connection holds (SQLite counts them whatever the memory
/// statistics setting).
fn cache_used(conn: &rusqlite::Connection) -> i64 {
    let (mut cur, mut hi) = (0, 0);
    // SAFETY: the handle is live for as long as `conn`; the out pointers are to locals.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_db_status(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBSTATUS_CACHE_USED,
            &mut cur,
            &mut hi,
            0,
        )
    };
    assert_eq!(rc, rusqlite::ffi::SQLITE_OK);
    i64::from(cur)
}

/// After writing and then reading back a history several times larger than the caches,
/// the writer's and a long-lived reader's page caches together stay within the sizes set
/// for them. (The bundled SQLite pools all connections' page caches in one group whose
/// limit is the sum of theirs, so each connection's size counts towards a process-wide
/// bound: at SQLite's default, 2 MB for each open connection.)
#[test]
fn the_page_caches_stay_within_the_sizes_set_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    let mut conn = open(&path).unwrap();
    let n = 4000;
    let view = "v".repeat(1500);
    let tx = conn.transaction().unwrap();
    for i in 0..n {
        tx.execute(
            "INSERT INTO calls (id, request_id, status, tel, created_at, updated_at, view, body) \
             VALUES (?1, ?2, 'completed', '010', ?3, ?3, ?4, '{}')",
            rusqlite::params![format!("c{i:08}"), format!("r{i}"), i, view],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    let reader = Reader::open(&path).unwrap();
    for i in 0..n {
        let row = reader.call(&format!("c{i:08}")).unwrap().unwrap();
        assert_eq!(row.view.len(), 1500);
    }
    let used = cache_used(&conn) + cache_used(&reader.conn);
    // Pages carry a header of some 10 % on top of their 4 KiB.
    let bound = i64::from(WRITER_CACHE_KIB + READER_CACHE_KIB) * 1024 * 23 / 20;
    assert!(
        used <= bound,
        "page caches hold {used} bytes, more than {bound}"
    );
    // The history was large enough to fill them.
    assert!(used >= bound / 2, "only {used} bytes cached");
}

/// SQLite's plan for `sql`, one line per step.
fn query_plan(conn: &Connection, sql: &str) -> Vec<String> {
    let n = conn.prepare(sql).unwrap().parameter_count();
    let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
    let args = vec![rusqlite::types::Value::Integer(1); n];
    st.query_map(rusqlite::params_from_iter(args), |r| r.get(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The prune runs in the writer's transaction, so every statement it runs per call must
/// find its rows through an index: a full scan of a table per pruned call held every
/// commit behind it for as long as the site's history is long.
#[test]
fn every_prune_statement_uses_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let conn = open(&dir.path().join("p.db")).unwrap();
    for sql in std::iter::once(PRUNE_SELECT).chain(PRUNE_DELETES) {
        let plan = query_plan(&conn, sql);
        assert!(
            !plan.is_empty() && plan.iter().all(|p| p.starts_with("SEARCH")),
            "{sql}: {plan:?}"
        );
    }
}

/// The retained-state window is read at every start: through the partial index of live
/// calls and the `updated_at` index, never a walk of every call stored.
#[test]
fn the_retained_state_window_reads_only_its_calls() {
    let dir = tempfile::tempdir().unwrap();
    let conn = open(&dir.path().join("p.db")).unwrap();
    let plan = query_plan(&conn, WINDOW_IDS);
    assert!(
        plan.iter()
            .any(|p| p == "SEARCH calls USING INDEX calls_updated (updated_at>?)"),
        "{plan:?}"
    );
    for p in plan.iter().filter(|p| p.starts_with("SCAN calls")) {
        assert_eq!(p, "SCAN calls USING INDEX calls_live", "{plan:?}");
    }
}

/// A prune deletes every row of the calls it takes (and only theirs) and the outbox rows
/// sent before the cut-off, walking the outbox from its oldest row: a row not yet sent
/// holds back the sent rows after it until it is sent.
#[test]
fn a_prune_deletes_every_row_of_its_calls_and_the_outbox_rows_sent_before() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = open(&dir.path().join("p.db")).unwrap();
    for (id, status, updated) in [
        ("old", "completed", 1_000),
        ("new", "completed", 9_000),
        ("live", "dispatching", 1_000),
    ] {
        conn.execute_batch(&format!(
            "INSERT INTO calls (id, request_id, status, tel, created_at, updated_at, view, body)
               VALUES ('{id}', 'r-{id}', '{status}', '010', 1, {updated}, '{{}}', '{{}}');
             INSERT INTO assignments (call_id, state, deadline_at, declined, updated_at)
               VALUES ('{id}', 'done', 1, '[]', 1);
             INSERT INTO courier_replies (courier_id, reply_id, call_id, action, recorded_at)
               VALUES ('k1', 'x-{id}', '{id}', 'accept', 1);
             INSERT INTO deliveries (id, call_id, sink, payload, state, next_attempt_at, created_at, updated_at)
               VALUES ('{id}-1', '{id}', 'webhook', x'', 'delivered', 1, 1, 1);
             INSERT INTO events (call_id, kind, at, recorded_at, data)
               VALUES ('{id}', 'requested', 1, 1, '{{}}');"
        ))
        .unwrap();
    }
    // Outbox, in id order: two sent long ago, one not yet sent, one sent long ago behind
    // it, one sent recently.
    for sent in ["100", "200", "NULL", "300", "9000"] {
        conn.execute(
            &format!("INSERT INTO outbox (topic, payload, retain, created_at, sent_at) VALUES ('t', x'', 0, 1, {sent})"),
            [],
        )
        .unwrap();
    }
    let prune = |conn: &mut Connection| {
        let job = WriteJob::<()> {
            op: Op::Prune {
                before: 5_000,
                limit: 10,
                topics: Topics::new("t").unwrap(),
            },
            after: None,
        };
        apply_batch(conn, &[job]).unwrap()
    };
    let published = prune(&mut conn);
    assert_eq!(published.len(), 1, "one retained state cleared");
    let count =
        |conn: &Connection, sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    for table in [
        "calls",
        "assignments",
        "courier_replies",
        "deliveries",
        "events",
    ] {
        let key = if table == "calls" { "id" } else { "call_id" };
        assert_eq!(
            count(
                &conn,
                &format!("SELECT count(*) FROM {table} WHERE {key} = 'old'")
            ),
            0,
            "{table} still holds rows of the pruned call"
        );
        assert_eq!(
            count(
                &conn,
                &format!("SELECT count(*) FROM {table} WHERE {key} IN ('new', 'live')")
            ),
            2,
            "{table} lost rows of calls that stay"
        );
    }
    let sent_left = |conn: &Connection| -> Vec<Option<i64>> {
        let mut st = conn
            .prepare("SELECT sent_at FROM outbox WHERE topic = 't' ORDER BY id")
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(sent_left(&conn), vec![None, Some(300), Some(9_000)]);
    // Once the row is sent, the old rows behind it go at the next round.
    conn.execute(
        "UPDATE outbox SET sent_at = 400 WHERE sent_at IS NULL AND topic = 't'",
        [],
    )
    .unwrap();
    prune(&mut conn);
    assert_eq!(sent_left(&conn), vec![Some(9_000)]);
}

/// A file written by a release before migrations 3 and 4 (with its `requests` rows) is
/// brought up to date at open, and what it held still answers: a repeated request id
/// finds its call, and the prune's indexes are there.
#[test]
fn a_file_from_before_migrations_3_and_4_is_upgraded_and_keeps_its_calls() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let conn = Connection::open(&path).unwrap();
        for sql in &schema::MIGRATIONS[..2] {
            conn.execute_batch(sql).unwrap();
        }
        conn.execute_batch(
            "PRAGMA user_version = 2;
             INSERT INTO calls (id, request_id, status, tel, created_at, updated_at, view, body)
               VALUES ('c1', 'req-1', 'completed', '010', 1, 1, '{\"call_id\":\"c1\"}', '{}');
             INSERT INTO requests (request_id, call_id, created_at) VALUES ('req-1', 'c1', 1);",
        )
        .unwrap();
    }
    let conn = open(&path).unwrap();
    assert_eq!(
        schema_version(&conn).unwrap(),
        schema::MIGRATIONS.len() as i64
    );
    let names: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(!names.iter().any(|n| n == "requests"), "{names:?}");
    for index in ["courier_replies_call", "deliveries_call"] {
        assert!(
            names.iter().any(|n| n == index),
            "{index} missing: {names:?}"
        );
    }
    drop(conn);
    let reader = Reader::open(&path).unwrap();
    assert_eq!(
        reader.call_for_request("req-1").unwrap().as_deref(),
        Some("c1")
    );
    assert_eq!(reader.call_for_request("req-2").unwrap(), None);
    let filter = requests::build(&path, requests::MIN_CAPACITY).unwrap();
    assert!(filter.may_contain("req-1"));
}
