//! Restart recovery with the embedded broker (which keeps nothing on disk): the retained
//! call states come back from the database; a backup taken while the daemon runs holds
//! the accepted calls.

use pickup_e2e::*;
use pickup_protocol::client::Version;
use pickup_protocol::Topics;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_state_is_republished_after_a_restart_and_backup_works_live() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let kiosk = Kiosk::connect(d.broker_addr, "test", "k", Version::V4).await;
    let a = kiosk.create(kiosk.call_body("r-1")).await;
    let b = kiosk.create(kiosk.call_body("r-2")).await;
    let id_a = a["call"]["call_id"].as_str().unwrap().to_string();
    let id_b = b["call"]["call_id"].as_str().unwrap().to_string();
    assert_eq!(kiosk.cancel(&id_b).await["ok"], true);

    // Online backup while running.
    let copy = dir.path().join("backup.db");
    let out = std::process::Command::new(workspace_bin("pickupctl"))
        .args([
            "backup",
            copy.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: i64 = open_db(&copy)
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    let out = std::process::Command::new(workspace_bin("pickupctl"))
        .args([
            "backup",
            copy.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "backup overwrote an existing file");

    d.shutdown(DEADLINE).await.unwrap();

    // A new daemon on the same file, with a new (empty) embedded broker.
    let d = start_daemon(test_config(dir.path())).await;
    let topics = Topics::new("test").unwrap();
    let (seen, _w) = watch(d.broker_addr, vec![topics.call_state_filter()]).await;
    wait_until("both call states republished", || async {
        seen.last_json(&topics.call_state(&id_a))
            .is_some_and(|v| v["status"] == "dispatching")
            && seen
                .last_json(&topics.call_state(&id_b))
                .is_some_and(|v| v["status"] == "cancelled")
    })
    .await;
    d.shutdown(DEADLINE).await.unwrap();
}

/// Finished calls within the retention period but past the dispatcher's memory: their
/// retained states come from the database at start, paced so that the publisher's input
/// never holds more than a couple of pages of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republishing_many_stored_calls_is_paced() {
    const CALLS: usize = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    // The calls finished a day ago: within a two-day retained-state window.
    cfg.store.state_hours = 48;
    let db = cfg.store.path.clone();
    {
        let conn = pickupd::store::open(&db).unwrap();
        let day_ago = pickupd::store::now_ms() - 86_400_000;
        let mut ins = conn
            .prepare(
                "INSERT INTO calls (id, request_id, status, tel, kiosk_id, created_at, updated_at, view, body)
                 VALUES (?1, ?2, 'completed', '010-0000-0000', NULL, ?3, ?3, ?4, '{}')",
            )
            .unwrap();
        conn.execute_batch("BEGIN").unwrap();
        for i in 0..CALLS {
            let id = format!("c{i:08}");
            let view = json!({"call_id": id, "status": "completed"}).to_string();
            ins.execute(rusqlite::params![id, format!("r-{i}"), day_ago, view])
                .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
    }
    let topics = Topics::new("test").unwrap();
    let d = start_daemon(cfg).await;
    wait_until("every stored call state published", || async {
        d.publisher_stats
            .published
            .load(std::sync::atomic::Ordering::Relaxed)
            > CALLS as u64
    })
    .await;
    // The broker holds them: a new subscriber gets the first, a middle and the last one.
    let ids = ["c00000000", "c00010000", "c00019999"];
    let (seen, _w) = watch(
        d.broker_addr,
        ids.iter().map(|id| topics.call_state(id)).collect(),
    )
    .await;
    wait_until("retained call states delivered", || async {
        ids.iter().all(|id| {
            seen.last_json(&topics.call_state(id))
                .is_some_and(|v| v["status"] == "completed" && v["call_id"] == *id)
        })
    })
    .await;
    let peak = d
        .publisher_stats
        .queued_peak
        .load(std::sync::atomic::Ordering::Relaxed);
    // Two pages of 500, plus the client's notices of messages sent and acknowledged
    // that share the input.
    assert!(
        peak <= 4_000,
        "{peak} messages queued for the publisher at once"
    );
    d.shutdown(DEADLINE).await.unwrap();
}

/// A repeated create for a call the daemon no longer holds in memory is still answered
/// with that call once the filter of stored request ids is in use; new request ids,
/// which the filter lets skip the database, still create calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_of_forgotten_calls_are_found_with_the_request_filter() {
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(test_config(dir.path())).await;
    let kiosk = Kiosk::connect(d.broker_addr, "test", "k", Version::V4).await;
    let a = kiosk.create(kiosk.call_body("old-1")).await;
    let id = a["call"]["call_id"].as_str().unwrap().to_string();
    assert_eq!(kiosk.cancel(&id).await["ok"], true);
    d.shutdown(DEADLINE).await.unwrap();

    // Finished calls are not loaded at start: the call exists only in the file.
    let mut cfg = test_config(dir.path());
    cfg.dispatch.keep_terminal_s = 0;
    let d = start_daemon(cfg).await;
    wait_until("request id filter built", || async {
        d.stats
            .request_filter
            .load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    let kiosk = Kiosk::connect(d.broker_addr, "test", "k", Version::V4).await;
    let again = kiosk.create(kiosk.call_body("old-1")).await;
    assert_eq!(again["call"]["call_id"], id.as_str(), "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["pickup_code"], a["pickup_code"]);
    let b = kiosk.create(kiosk.call_body("new-1")).await;
    assert_eq!(b["duplicate"], false, "{b}");
    assert_ne!(b["call"]["call_id"], id.as_str());
    let b2 = kiosk.create(kiosk.call_body("new-1")).await;
    assert_eq!(b2["call"]["call_id"], b["call"]["call_id"]);
    assert_eq!(b2["duplicate"], true);
    d.shutdown(DEADLINE).await.unwrap();

    // And after another restart the new call's request id is in the rebuilt filter.
    let mut cfg = test_config(dir.path());
    cfg.dispatch.keep_terminal_s = 0;
    let d = start_daemon(cfg).await;
    wait_until("request id filter built", || async {
        d.stats
            .request_filter
            .load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    let kiosk = Kiosk::connect(d.broker_addr, "test", "k", Version::V4).await;
    let old = kiosk.create(kiosk.call_body("old-1")).await;
    assert_eq!(old["call"]["call_id"], id.as_str(), "{old}");
    let b3 = kiosk.create(kiosk.call_body("new-1")).await;
    assert_eq!(b3["call"]["call_id"], b["call"]["call_id"], "{b3}");
    assert_eq!(b3["duplicate"], true);
    d.shutdown(DEADLINE).await.unwrap();
}

/// A finished call's retained state is cleared `store.state_hours` after it finished
/// (through the outbox, by the periodic sweep), and is not republished after a restart;
/// `get` still answers from the database. Live calls keep their state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_state_of_old_finished_calls_is_cleared_and_not_republished() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.store.state_hours = 1;
    cfg.store.sweep_interval_s = 1;
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg.clone()).await;
    let started = pickupd::store::now_ms();
    let topics = Topics::new("test").unwrap();
    let kiosk = Kiosk::connect(d.broker_addr, "test", "k1", Version::V4).await;
    let old = kiosk.create(kiosk.call_body("old")).await["call"]["call_id"]
        .as_str()
        .unwrap()
        .to_string();
    let live = kiosk.create(kiosk.call_body("live")).await["call"]["call_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(kiosk.cancel(&old).await["call"]["status"], "cancelled");
    let (seen, _w) = watch(d.broker_addr, vec![topics.call_state_filter()]).await;
    wait_until("the cancelled state retained", || async {
        seen.last_json(&topics.call_state(&old))
            .is_some_and(|v| v["status"] == "cancelled")
    })
    .await;

    // An hour passes for the cancelled call (its row says so; not earlier than the
    // daemon's start minus the window, which the sweep starts from).
    let an_hour_ago = started - 3_600_000;
    let rw = rusqlite::Connection::open(&db).unwrap();
    rw.busy_timeout(DEADLINE).unwrap();
    rw.execute(
        "UPDATE calls SET updated_at = ?1 WHERE id = ?2",
        rusqlite::params![an_hour_ago, old],
    )
    .unwrap();
    wait_until("the old call's retained state cleared", || async {
        seen.on(&topics.call_state(&old))
            .last()
            .is_some_and(|m| m.payload.is_empty())
    })
    .await;
    assert!(
        seen.on(&topics.call_state(&live))
            .iter()
            .all(|m| !m.payload.is_empty()),
        "a live call's state was cleared"
    );
    assert_eq!(kiosk.get(&old).await["call"]["status"], "cancelled");
    drop(kiosk);
    d.shutdown(DEADLINE).await.unwrap();

    // After a restart (a fresh embedded broker) only the live call is republished.
    let d = start_daemon(cfg).await;
    let (seen, _w) = watch(d.broker_addr, vec![topics.call_state_filter()]).await;
    wait_until("the live call's state republished", || async {
        seen.last_json(&topics.call_state(&live))
            .is_some_and(|v| v["status"] == "dispatching")
    })
    .await;
    // Ids are time-ordered and republished in id order: the old call would have come first.
    assert!(seen.on(&topics.call_state(&old)).is_empty());
    let kiosk = Kiosk::connect(d.broker_addr, "test", "k1", Version::V4).await;
    assert_eq!(kiosk.get(&old).await["call"]["status"], "cancelled");
    drop(kiosk);
    d.shutdown(DEADLINE).await.unwrap();
}
