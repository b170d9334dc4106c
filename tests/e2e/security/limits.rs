//! Per-kiosk limits against the running daemon: a kiosk cannot hold more than
//! `limits.max_open_per_kiosk` unfinished calls (across a restart too), other kiosks are
//! not affected, and a kiosk may neither cancel another kiosk's call nor claim another
//! kiosk's id for a new one.

use pickup_protocol::client::Version;
use serde_json::Value;

use super::*;

fn code(a: &Value) -> &str {
    a["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_calls_per_kiosk_are_limited_and_calls_belong_to_their_kiosk() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.max_open_per_kiosk = 3;
    let d = start_daemon(cfg.clone()).await;
    let a = Kiosk::connect(d.broker_addr, "test", "ka", Version::V4).await;
    let b = Kiosk::connect(d.broker_addr, "test", "kb", Version::V4).await;

    // No courier is online: every accepted call stays open (dispatching).
    let mut mine = Vec::new();
    for i in 0..3 {
        let ans = a.create(a.call_body(&format!("a-{i}"))).await;
        assert_eq!(ans["ok"], true, "{ans}");
        mine.push(ans["call"]["call_id"].as_str().unwrap().to_string());
    }
    let refused = a.create(a.call_body("a-3")).await;
    assert_eq!(code(&refused), "busy", "{refused}");
    assert!(refused["error"]["retry_after_ms"].as_u64().unwrap() >= 5_000);
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3 open calls"),
        "{refused}"
    );
    // A repeat of an accepted request is still answered with its call.
    let again = a.create(a.call_body("a-1")).await;
    assert_eq!(again["ok"], true, "{again}");
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["call"]["call_id"], mine[1].as_str());

    // Another kiosk is not affected, and cannot cancel a's calls.
    let theirs = b.create(b.call_body("b-0")).await;
    assert_eq!(theirs["ok"], true, "{theirs}");
    let forbidden = b.cancel(&mine[0]).await;
    assert_eq!(code(&forbidden), "forbidden", "{forbidden}");
    assert_eq!(a.get(&mine[0]).await["call"]["status"], "dispatching");

    // Nor can it make calls in a's name.
    let mut body = b.call_body("b-1");
    body["kiosk_id"] = "ka".into();
    let spoofed = b.create(body).await;
    assert_eq!(code(&spoofed), "invalid", "{spoofed}");
    assert!(
        spoofed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("kiosk_id"),
        "{spoofed}"
    );
    // Without a kiosk_id the call is the response topic's kiosk's.
    let mut body = b.call_body("b-2");
    body.as_object_mut().unwrap().remove("kiosk_id");
    let implied = b.create(body).await;
    assert_eq!(implied["ok"], true, "{implied}");
    let implied = implied["call"]["call_id"].as_str().unwrap().to_string();
    assert_eq!(code(&a.cancel(&implied).await), "forbidden");

    // When one of a's calls finishes, a may make a new one.
    let cancelled = a.cancel(&mine[0]).await;
    assert_eq!(cancelled["call"]["status"], "cancelled", "{cancelled}");
    let ans = a.create(a.call_body("a-4")).await;
    assert_eq!(ans["ok"], true, "{ans}");

    // The count is rebuilt from the database at start.
    drop((a, b));
    d.shutdown(DEADLINE).await.unwrap();
    let d = start_daemon(cfg).await;
    let a = Kiosk::connect(d.broker_addr, "test", "ka", Version::V4).await;
    let refused = a.create(a.call_body("a-5")).await;
    assert_eq!(code(&refused), "busy", "{refused}");
    let db = open_db(&dir.path().join("pickupd.db"));
    let open: i64 = db
        .query_row(
            "SELECT count(*) FROM calls WHERE status NOT IN ('cancelled','completed','failed')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(open, 5, "3 of ka, 2 of kb");
    drop(a);
    d.shutdown(DEADLINE).await.unwrap();
}
