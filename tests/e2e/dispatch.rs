//! A call goes through: create → assigned → picked up → completed; cancel; status;
//! repeated request ids.

use pickup_e2e::*;
use pickup_protocol::client::Version;
use pickup_protocol::{JobKind, Topics};
use serde_json::json;

/// Waits until the daemon has stored courier `id` online with a position.
async fn courier_known(db: &std::path::Path, id: &str) {
    let db = db.to_path_buf();
    let id = id.to_string();
    wait_until(&format!("courier {id} known"), || {
        let db = db.clone();
        let id = id.clone();
        async move {
            let c = open_db(&db);
            c.query_row(
                "SELECT count(*) FROM couriers WHERE id = ?1 AND online = 1 AND body LIKE '%\"lat\":%'",
                [&id],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n == 1)
            .unwrap_or(false)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_is_assigned_picked_up_and_completed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let topics = Topics::new("test").unwrap();
    let (seen, _w) = watch(
        addr,
        vec![topics.call_state_filter(), topics.notifications()],
    )
    .await;

    let courier = TestCourier::online(addr, "test", "k1", "car", 37.501, 127.0).await;
    courier_known(&db, "k1").await;
    let kiosk = Kiosk::connect(addr, "test", "kiosk-1", Version::V4).await;

    let a = kiosk.create(kiosk.call_body("req-1")).await;
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["duplicate"], false);
    let id = a["call"]["call_id"].as_str().unwrap().to_string();
    let code = a["pickup_code"].as_str().unwrap().to_string();
    assert_eq!(code.len(), 6);
    assert_eq!(a["call"]["tel"], "010-****-5678");

    // The courier gets the job (masked phone, no code); the kiosk sees the retained state.
    let job = courier.wait_job(JobKind::Assigned, &id).await;
    assert_eq!(job.tel.as_deref(), Some("010-****-5678"));
    let state_topic = topics.call_state(&id);
    wait_until("assigned state", || async {
        seen.last_json(&state_topic)
            .is_some_and(|v| v["status"] == "assigned" && v["courier"]["courier_id"] == "k1")
    })
    .await;
    for m in seen.on(&state_topic) {
        let s = String::from_utf8_lossy(&m.payload);
        assert!(!s.contains(&code), "pickup code on a retained topic");
        assert!(
            !s.contains("1234-5678"),
            "full phone number on a retained topic"
        );
    }

    // Completed before pickup is refused; a wrong code is refused; the right one works.
    let r = courier
        .reply(json!({"call_id": id, "action": "completed"}))
        .await;
    assert_eq!(r["error"]["code"], "invalid_state", "{r}");
    let r = courier
        .reply(json!({"call_id": id, "action": "picked_up", "pickup_code": "000000x"}))
        .await;
    assert_eq!(r["error"]["code"], "wrong_code", "{r}");
    let r = courier
        .reply(
            json!({"call_id": id, "action": "picked_up", "pickup_code": code, "reply_id": "p-1"}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let r = courier
        .reply(
            json!({"call_id": id, "action": "picked_up", "pickup_code": code, "reply_id": "p-1"}),
        )
        .await;
    assert_eq!(r["duplicate"], true, "{r}");
    let r = courier
        .reply(json!({"call_id": id, "action": "completed", "reply_id": "c-1"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    wait_until("completed state", || async {
        seen.last_json(&state_topic)
            .is_some_and(|v| v["status"] == "completed")
    })
    .await;

    // Status answers from the read side; a late subscriber sees the retained final state.
    let g = kiosk.get(&id).await;
    assert_eq!(g["call"]["status"], "completed", "{g}");
    let (late, _l) = watch(addr, vec![state_topic.clone()]).await;
    wait_until("retained state for a late subscriber", || async {
        late.last_json(&state_topic)
            .is_some_and(|v| v["status"] == "completed")
    })
    .await;

    // The customer was told at every step, with the full number on the relay channel only.
    let notes: Vec<String> = seen
        .on(&topics.notifications())
        .iter()
        .filter_map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).ok())
        .filter(|v| v["call_id"] == id.as_str())
        .map(|v| v["template"].as_str().unwrap_or("").to_string())
        .collect();
    wait_until("notifications", || async {
        seen.on(&topics.notifications()).len() >= 4
    })
    .await;
    let _ = notes;
    let all: Vec<serde_json::Value> = seen
        .on(&topics.notifications())
        .iter()
        .filter_map(|m| serde_json::from_slice(&m.payload).ok())
        .collect();
    let templates: Vec<&str> = all.iter().filter_map(|v| v["template"].as_str()).collect();
    assert_eq!(
        templates,
        [
            "call.accepted",
            "call.assigned",
            "call.picked_up",
            "call.completed"
        ]
    );
    assert!(all.iter().all(|v| v["tel"] == "010-1234-5678"));

    d.shutdown(DEADLINE).await.unwrap();
    // The events carry the device's times and the whole path is in the file.
    let c = open_db(&db);
    let kinds: Vec<String> = c
        .prepare("SELECT kind FROM events WHERE call_id = ?1 ORDER BY id")
        .unwrap()
        .query_map([&id], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        kinds,
        [
            "requested",
            "dispatching",
            "assigned",
            "wrong_pickup_code",
            "picked_up",
            "completed"
        ]
    );
    let unsent: i64 = c
        .query_row(
            "SELECT count(*) FROM outbox WHERE sent_at IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(unsent, 0, "outbox drained before stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_frees_and_tells_the_courier() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let courier = TestCourier::online(addr, "test", "k1", "scooter", 37.5, 127.001).await;
    courier_known(&db, "k1").await;
    let kiosk = Kiosk::connect(addr, "test", "kiosk-1", Version::V4).await;

    let a = kiosk.create(kiosk.call_body("req-a")).await;
    let id = a["call"]["call_id"].as_str().unwrap().to_string();
    courier.wait_job(JobKind::Assigned, &id).await;
    let c = kiosk.cancel(&id).await;
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["call"]["status"], "cancelled");
    let job = courier.wait_job(JobKind::Cancelled, &id).await;
    assert_eq!(job.reason.as_deref(), Some("test"));
    // Cancelling again is harmless; the freed courier takes the next call.
    let again = kiosk.cancel(&id).await;
    assert_eq!(again["call"]["status"], "cancelled", "{again}");
    let b = kiosk.create(kiosk.call_body("req-b")).await;
    let id2 = b["call"]["call_id"].as_str().unwrap().to_string();
    courier.wait_job(JobKind::Assigned, &id2).await;
    // After pickup, cancel is refused and changes nothing.
    let code = b["pickup_code"].as_str().unwrap();
    let r = courier
        .reply(json!({"call_id": id2, "action": "picked_up", "pickup_code": code}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let c = kiosk.cancel(&id2).await;
    assert_eq!(c["error"]["code"], "invalid_state", "{c}");
    assert_eq!(kiosk.get(&id2).await["call"]["status"], "picked_up");
    d.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_request_id_returns_the_same_call() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let kiosk = Kiosk::connect(d.broker_addr, "test", "kiosk-1", Version::V4).await;
    let a = kiosk.create(kiosk.call_body("same")).await;
    let b = kiosk.create(kiosk.call_body("same")).await;
    assert_eq!(a["call"]["call_id"], b["call"]["call_id"]);
    assert_eq!(a["pickup_code"], b["pickup_code"]);
    assert_eq!(b["duplicate"], true);
    // No courier: the call waits in dispatching.
    let g = kiosk.get(a["call"]["call_id"].as_str().unwrap()).await;
    assert_eq!(g["call"]["status"], "dispatching", "{g}");
    d.shutdown(DEADLINE).await.unwrap();
    let n: i64 = open_db(&db)
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);

    // After a restart the repeat is answered from the file.
    let mut cfg = test_config(dir.path());
    cfg.dispatch.keep_terminal_s = 0;
    let d = start_daemon(cfg).await;
    let kiosk = Kiosk::connect(d.broker_addr, "test", "kiosk-1", Version::V4).await;
    let c = kiosk.create(kiosk.call_body("same")).await;
    assert_eq!(c["call"]["call_id"], a["call"]["call_id"], "{c}");
    assert_eq!(c["duplicate"], true);
    d.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_courier_coming_online_later_gets_the_waiting_call() {
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(test_config(dir.path())).await;
    let addr = d.broker_addr;
    let kiosk = Kiosk::connect(addr, "test", "kiosk-1", Version::V4).await;
    let mut body = kiosk.call_body("heavy-1");
    body["parcel"] = json!({"class": "heavy", "weight_kg": 12.5});
    let a = kiosk.create(body).await;
    let id = a["call"]["call_id"].as_str().unwrap().to_string();
    // A scooter cannot carry it; a van can.
    let scooter = TestCourier::online(addr, "test", "s1", "scooter", 37.5, 127.0).await;
    let van = TestCourier::online(addr, "test", "v1", "van", 37.502, 127.0).await;
    van.wait_job(JobKind::Assigned, &id).await;
    assert!(scooter.last_job().is_none());
    d.shutdown(DEADLINE).await.unwrap();
}

/// The value of counter `name` in a metrics text, or -1 when it is missing.
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_calls_and_couriers() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.metrics.listen = "127.0.0.1:0".into();
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.metrics_addr.expect("metrics on");
    let courier = TestCourier::online(d.broker_addr, "test", "k1", "car", 37.5, 127.0).await;
    courier_known(&db, "k1").await;
    let kiosk = Kiosk::connect(d.broker_addr, "test", "kiosk-1", Version::V4).await;
    let a = kiosk.create(kiosk.call_body("m-1")).await;
    courier
        .wait_job(JobKind::Assigned, a["call"]["call_id"].as_str().unwrap())
        .await;
    let scrape = move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    wait_until("metrics show the assignment", || async move {
        let m = tokio::task::spawn_blocking(scrape).await.unwrap();
        m.starts_with("HTTP/1.1 200")
            && m.contains("pickupd_call_events_total{kind=\"assigned\"} 1")
            && m.contains("pickupd_couriers_online 1")
            && m.contains("pickupd_assignment_latency_seconds_count 1")
            && m.contains("pickupd_broker_connected 1")
            && m.contains("pickupd_reads_connected 1")
            && m.contains("pickupd_store_commit_seconds_count")
            // The marks that the assignment's messages were sent need no fsync.
            && counter(&m, "pickupd_store_commits_unsynced_total") >= 1.0
            && counter(&m, "pickupd_store_commits_total")
                > counter(&m, "pickupd_store_commits_unsynced_total")
            // The process with its embedded broker: more than a few MiB.
            && counter(&m, "pickupd_resident_bytes") > 4.0 * 1048576.0
            && m.contains("pickupd_memory_trims_total")
            && m.contains("pickupd_presences_dropped_total")
            && m.contains("pickupd_memory_returned_bytes_total")
    })
    .await;
    d.shutdown(DEADLINE).await.unwrap();
}

/// `mqtt.in_process = false`: the daemon's connections to its embedded broker go over
/// the loopback listener like any client's (every other test here runs them in process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_over_the_loopback_listener_dispatches_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.mqtt.in_process = false;
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let courier = TestCourier::online(addr, "test", "k1", "car", 37.501, 127.0).await;
    courier_known(&db, "k1").await;
    let kiosk = Kiosk::connect(addr, "test", "kiosk-1", Version::V4).await;
    let a = kiosk.create(kiosk.call_body("req-1")).await;
    assert_eq!(a["ok"], true, "{a}");
    let id = a["call"]["call_id"].as_str().unwrap().to_string();
    courier.wait_job(JobKind::Assigned, &id).await;
    let got = kiosk.get(&id).await;
    assert_eq!(got["call"]["status"], "assigned", "{got}");
}

/// On a quiet site each new call costs one durable commit: the call, its entry into
/// `dispatching` and the answer's messages are one write job, not a create followed by a
/// second job (and often a second fsync) for the dispatching step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_call_and_its_dispatching_step_are_one_durable_commit() {
    use std::sync::atomic::Ordering;
    const CALLS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let kiosk = Kiosk::connect(d.broker_addr, "test", "kiosk-1", Version::V4).await;
    let synced = || {
        d.writer_stats.commits.load(Ordering::Relaxed)
            - d.writer_stats.unsynced.load(Ordering::Relaxed)
    };
    // Whatever the start queued is committed before counting begins.
    let first = kiosk.create(kiosk.call_body("warm-up")).await;
    assert_eq!(first["ok"], true, "{first}");
    let dispatching = |n: usize| {
        let db = db.clone();
        move || {
            let db = db.clone();
            async move {
                let conn = rusqlite::Connection::open(&db).unwrap();
                let seen: i64 = conn
                    .query_row(
                        "SELECT count(*) FROM events WHERE kind = 'dispatching'",
                        [],
                        |r| r.get(0),
                    )
                    .unwrap();
                seen as usize >= n
            }
        }
    };
    wait_until("the warm-up call dispatching", dispatching(1)).await;
    let before = synced();
    for i in 0..CALLS {
        let a = kiosk
            .create(kiosk.call_body(&format!("one-commit-{i}")))
            .await;
        assert_eq!(a["ok"], true, "{a}");
    }
    wait_until("every call dispatching", dispatching(CALLS + 1)).await;
    assert_eq!(
        synced() - before,
        CALLS as u64,
        "durable commits for {CALLS} calls made one at a time"
    );
    d.shutdown(DEADLINE).await.unwrap();
}

/// The marks that outbox rows went out wait (`ACKS_WAIT`) and share a write job: calls
/// made one at a time cost about one commit each, not a second one for the marks of
/// their messages. Each of those was a commit of its own, unsynced but writing log
/// frames: at 500 calls/s, 77 KB written to the disk per call against 69 KB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_that_messages_went_out_share_commits() {
    use pickupd::app::publisher::ACKS_WAIT;
    use std::sync::atomic::Ordering;
    const CALLS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let kiosk = Kiosk::connect(d.broker_addr, "test", "kiosk-1", Version::V4).await;
    let unsynced = || d.writer_stats.unsynced.load(Ordering::Relaxed);
    let all_marked = |total: i64| {
        let db = db.clone();
        move || {
            let db = db.clone();
            async move {
                let conn = rusqlite::Connection::open(&db).unwrap();
                let (rows, unsent): (i64, i64) = conn
                    .query_row(
                        "SELECT count(*), count(*) FILTER (WHERE sent_at IS NULL) FROM outbox",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .unwrap();
                rows >= total && unsent == 0
            }
        }
    };
    let first = kiosk.create(kiosk.call_body("warm-up")).await;
    assert_eq!(first["ok"], true, "{first}");
    wait_until("the warm-up call's messages marked sent", all_marked(1)).await;
    let rows_before: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
        .unwrap();
    let before = unsynced();
    let started = std::time::Instant::now();
    for i in 0..CALLS {
        let a = kiosk.create(kiosk.call_body(&format!("marks-{i}"))).await;
        assert_eq!(a["ok"], true, "{a}");
    }
    let took = started.elapsed();
    // Every call has messages in the outbox (its state at least); all of them marked.
    wait_until(
        "every call's messages marked sent",
        all_marked(rows_before + CALLS as i64),
    )
    .await;
    let counted = unsynced() - before;
    let waited = started.elapsed();
    // Unsynced commits while counting: marks, at most one per ACKS_WAIT and one more at
    // the end, and the dispatch loop's liveness pings (one per 500 ms). Marks recorded
    // after every burst of acknowledgements made about one per call.
    let windows = waited.as_millis() / ACKS_WAIT.as_millis() + 1;
    let pings = waited.as_millis() / 500 + 1;
    let bound = u64::try_from(windows + pings).unwrap();
    assert!(
        counted <= bound,
        "{counted} unsynced commits for {CALLS} calls made in {took:?} (all marked after \
         {waited:?}); at most {bound} expected"
    );
    d.shutdown(DEADLINE).await.unwrap();
}
