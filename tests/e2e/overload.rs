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
