//! Overload: a flood of calls far beyond what the daemon may take in is refused with
//! `busy` (with a retry hint), status reads keep being answered meanwhile, nothing accepted
//! is lost, and when the flood stops the breaker closes by itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pickup_e2e::*;
use pickup_protocol::client::Version;
use pickup_protocol::Topics;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_is_shed_with_busy_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    // Small limits so that a test-sized flood overloads the daemon.
    cfg.limits.max_dispatching = 40;
    cfg.admission.per_client_rate = 1_000.0;
    cfg.admission.per_client_burst = 1_000.0;
    cfg.admission.breaker.min_calls = 20;
    cfg.admission.breaker.open_ms = 300;
    cfg.admission.breaker.max_open_ms = Some(600);
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let topics = Topics::new("test").unwrap();
    let (states, _w) = watch(addr, vec![topics.daemon_state()]).await;

    // No courier: accepted calls stay dispatching and fill the limit.
    let accepted = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let busy = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for k in 0..4 {
        let kiosk = Kiosk::connect(addr, "test", &format!("flood-{k}"), Version::V4).await;
        let accepted = accepted.clone();
        let busy = busy.clone();
        // Every request of the kiosk at once, like a kiosk stuck in a retry loop.
        for i in 0..60 {
            let req = kiosk.req.clone();
            let body = kiosk.call_body(&format!("flood-{k}-{i}"));
            let topic = kiosk.topics.calls_create();
            let accepted = accepted.clone();
            let busy = busy.clone();
            tasks.push(tokio::spawn(async move {
                let a = req.request(&topic, body, DEADLINE).await.unwrap();
                if a["ok"] == true {
                    accepted
                        .lock()
                        .unwrap()
                        .push(a["call"]["call_id"].as_str().unwrap().to_string());
                } else {
                    assert_eq!(a["error"]["code"], "busy", "{a}");
                    assert!(a["error"]["retry_after_ms"].as_u64().unwrap() > 0, "{a}");
                    busy.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    // Status reads are answered while creation sheds.
    let reader = Kiosk::connect(addr, "test", "reader", Version::V4).await;
    for _ in 0..20 {
        let g = reader.get("no-such-call").await;
        assert_eq!(g["error"]["code"], "not_found", "{g}");
    }
    for t in tasks {
        t.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    let refused = busy.load(Ordering::Relaxed);
    assert_eq!(accepted.len() + refused, 240);
    assert!(refused > 0, "the flood was not shed");
    assert!(
        accepted.len() <= 40 + 1,
        "more accepted than the limit: {}",
        accepted.len()
    );
    // The breaker's state was made visible on the retained daemon state.
    wait_until("breaker opened on daemon/state", || async {
        states
            .on(&topics.daemon_state())
            .iter()
            .any(|m| String::from_utf8_lossy(&m.payload).contains("\"admission\":\"open\""))
    })
    .await;

    // Free capacity: cancel the accepted calls. The breaker closes by itself and new calls
    // are taken again.
    // (Cancelled from an operator tool's reply topic: a kiosk may cancel only its own.)
    let (operator, _rx) = pickup_protocol::client::Requester::connect(
        pickup_protocol::client::LinkOptions::new(url(addr), "operator"),
        topics.client_replies("operator"),
        vec![],
        DEADLINE,
    )
    .await
    .unwrap();
    for id in &accepted {
        let c = operator
            .request(&topics.call_cancel(id), serde_json::json!({}), DEADLINE)
            .await
            .unwrap();
        assert_eq!(c["ok"], true, "{c}");
    }
    let mut n = 0;
    wait_until("a new call accepted after the flood", || {
        n += 1;
        let reader = &reader;
        let body = reader.call_body(&format!("after-{n}"));
        async move { reader.create(body).await["ok"] == true }
    })
    .await;
    d.shutdown(DEADLINE).await.unwrap();
    // Nothing accepted was lost.
    let c = open_db(&db);
    for id in &accepted {
        let n: i64 = c
            .query_row("SELECT count(*) FROM calls WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 1, "accepted call {id} missing");
    }
}

/// Status reads have a connection of their own: with the dispatch loop hung (test fault
/// injection) and thousands of courier reports queued towards the daemon's main
/// connection behind a full inbound queue, a `get` is still answered. On one shared
/// connection it would wait behind every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_are_answered_while_the_main_connection_is_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let db = dir.path().join("pickupd.db");
    let stall = dir.path().join("stall");
    let mut d = DaemonProcess::spawn_env(
        dir.path(),
        &process_toml(&db, port, None),
        &[("PICKUPD_TEST_STALL_FILE", stall.as_os_str())],
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_until("the daemon's broker listens", || async {
        std::net::TcpStream::connect(addr).is_ok()
    })
    .await;
    // Requests sent before the daemon has subscribed would be dropped by the broker.
    let topics = Topics::new("test").unwrap();
    let (state, _w) = watch(addr, vec![topics.daemon_state()]).await;
    wait_until("the daemon ready", || async {
        state
            .last_json(&topics.daemon_state())
            .is_some_and(|v| v["state"] == "ready")
    })
    .await;
    let kiosk = Kiosk::connect(addr, "test", "k1", Version::V4).await;
    let created = kiosk.create(kiosk.call_body("before")).await;
    assert_eq!(created["ok"], true, "{created}");
    let id = created["call"]["call_id"].as_str().unwrap().to_string();

    // Hang the dispatch loop and wait until it says so.
    std::fs::write(&stall, b"").unwrap();
    let log = dir.path().join("pickupd.log");
    wait_until("the dispatch loop hangs", || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("test fault injection"))
        }
    })
    .await;
    // A create now waits for the loop; courier reports fill the loop's queue (2048) and
    // then block the task that reads the main connection.
    let pending_create = {
        let req = kiosk.req.clone();
        let (t, body) = (topics.calls_create(), kiosk.call_body("during"));
        tokio::spawn(async move { req.request(&t, body, DEADLINE * 3).await })
    };
    let (courier, _rx) = pickup_protocol::client::Requester::connect(
        pickup_protocol::client::LinkOptions::new(url(addr), "courier-x"),
        topics.courier_replies("x"),
        vec![],
        DEADLINE,
    )
    .await
    .unwrap();
    let presence = serde_json::json!({"state": "online", "available": false}).to_string();
    for _ in 0..3_000 {
        courier
            .link()
            .publish(
                &topics.courier_presence("x"),
                true,
                false,
                presence.clone().into_bytes(),
                None,
            )
            .await
            .unwrap();
    }
    // Answered from the read side while all of that waits.
    for _ in 0..3 {
        let got = kiosk.get(&id).await;
        assert_eq!(got["ok"], true, "{got}");
        assert_eq!(got["call"]["call_id"], id.as_str());
    }
    assert!(
        !pending_create.is_finished(),
        "the create waited for the loop"
    );

    // Released, the loop works through its backlog and answers the create.
    std::fs::remove_file(&stall).unwrap();
    let a = pending_create.await.unwrap().expect("create answered");
    assert_eq!(a["ok"], true, "{a}");
    assert!(d.terminate().success());
}
