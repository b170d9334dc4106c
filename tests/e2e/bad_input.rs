//! Bad input gets a clear error with the right code; the daemon stays up and nothing else
//! changes.

use pickup_e2e::*;
use pickup_protocol::client::{LinkOptions, Requester, Version};
use pickup_protocol::Topics;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_answers_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.broker.listen_v5 = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.mqtt.version = 5;
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let topics = Topics::new("test").unwrap();
    let kiosk = Kiosk::connect(d.broker_addr, "test", "k-v4", Version::V4).await;

    let cases = [
        (
            json!({"request_id": "r", "tel": 5, "location": {"lat": 1, "lon": 2}, "parcel": {"class": "light"}}),
            "malformed",
            "tel",
        ),
        (
            json!({"request_id": "r", "tel": "010-1234-5678", "location": {"lat": 91.0, "lon": 2}, "parcel": {"class": "light"}}),
            "invalid",
            "location.lat",
        ),
        (
            json!({"request_id": "r", "tel": "010-1234-5678", "location": {"lat": 37, "lon": -181}, "parcel": {"class": "light"}}),
            "invalid",
            "location.lon",
        ),
        (
            json!({"request_id": "r", "tel": "12", "location": {"lat": 37, "lon": 127}, "parcel": {"class": "light"}}),
            "invalid",
            "tel",
        ),
        (
            json!({"request_id": "r", "tel": "010-1234-5678", "location": {"lat": 37, "lon": 127}, "parcel": {"class": "light", "weight_kg": 30}}),
            "invalid",
            "parcel.class",
        ),
        (
            json!({"request_id": "r", "tel": "010-1234-5678", "location": {"lat": 37, "lon": 127}, "parcel": {"class": "huge"}}),
            "malformed",
            "parcel.class",
        ),
        (
            json!({"request_id": "r/x", "tel": "010-1234-5678", "location": {"lat": 37, "lon": 127}, "parcel": {"class": "light"}}),
            "invalid",
            "request_id",
        ),
        (
            json!({"request_id": "r", "tel": "010-1234-5678", "location": {"lat": 37, "lon": 127, "label": "x".repeat(300)}, "parcel": {"class": "light"}}),
            "invalid",
            "location.label",
        ),
        (json!({"tel": "010-1234-5678"}), "malformed", "request_id"),
    ];
    for (body, code, field) in cases {
        let a = kiosk.create(body.clone()).await;
        assert_eq!(a["ok"], false, "{body} → {a}");
        assert_eq!(a["error"]["code"], code, "{body} → {a}");
        let msg = a["error"]["message"].as_str().unwrap();
        assert!(msg.contains(field), "{body} → {msg}");
    }
    // Oversized payloads and non-JSON: an MQTT 5 kiosk still gets an answer through the
    // response topic property.
    let mut o = LinkOptions::new(url(d.broker_v5_addr.unwrap()), "kiosk-v5");
    o.version = Version::V5;
    let (v5, _rx) = Requester::connect(o, topics.kiosk_replies("k-v5"), vec![], DEADLINE)
        .await
        .unwrap();
    let a = v5
        .request_bytes(&topics.calls_create(), b"{not json".to_vec(), DEADLINE)
        .await
        .unwrap();
    assert_eq!(a["error"]["code"], "malformed", "{a}");
    let a = v5
        .request_bytes(&topics.calls_create(), vec![b' '; 20_000], DEADLINE)
        .await
        .unwrap();
    assert_eq!(a["error"]["code"], "too_large", "{a}");
    // Unknown call, cancel of a completed call.
    let g = kiosk.get("no-such-call").await;
    assert_eq!(g["error"]["code"], "not_found", "{g}");
    let c = kiosk.cancel("no-such-call").await;
    assert_eq!(c["error"]["code"], "not_found", "{c}");
    // Garbage on courier topics (no reply path): dropped, nothing stored.
    kiosk
        .raw(&topics.courier_location("x1"), b"\xff\xfe".to_vec())
        .await;
    kiosk
        .raw(&topics.courier_presence("x1"), b"[]".to_vec())
        .await;
    kiosk
        .raw(
            &topics.courier_location("x1"),
            br#"{"lat": "NaN", "lon": 1}"#.to_vec(),
        )
        .await;
    // Still answering, and nothing was created by any of the above.
    let ok = kiosk.create(kiosk.call_body("good-1")).await;
    assert_eq!(ok["ok"], true, "{ok}");
    let mut body = kiosk.call_body("good-2");
    body["kiosk_id"] = "k-v5".into();
    let v5ok = v5
        .request(&topics.calls_create(), body, DEADLINE)
        .await
        .unwrap();
    assert_eq!(v5ok["ok"], true, "{v5ok}");
    d.shutdown(DEADLINE).await.unwrap();
    let c = open_db(&db);
    let calls: i64 = c
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    let couriers: i64 = c
        .query_row("SELECT count(*) FROM couriers", [], |r| r.get(0))
        .unwrap();
    assert_eq!((calls, couriers), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_calls_cannot_be_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(test_config(dir.path())).await;
    let addr = d.broker_addr;
    let courier = TestCourier::online(addr, "test", "k1", "car", 37.5, 127.0).await;
    let kiosk = Kiosk::connect(addr, "test", "kiosk", Version::V4).await;
    // Retry creating until the daemon has seen the courier (the call waits otherwise).
    let a = kiosk.create(kiosk.call_body("c-1")).await;
    let id = a["call"]["call_id"].as_str().unwrap().to_string();
    let code = a["pickup_code"].as_str().unwrap().to_string();
    courier
        .wait_job(pickup_protocol::JobKind::Assigned, &id)
        .await;
    courier
        .reply(json!({"call_id": id, "action": "picked_up", "pickup_code": code}))
        .await;
    courier
        .reply(json!({"call_id": id, "action": "completed"}))
        .await;
    let c = kiosk.cancel(&id).await;
    assert_eq!(c["error"]["code"], "invalid_state", "{c}");
    assert_eq!(kiosk.get(&id).await["call"]["status"], "completed");
    d.shutdown(DEADLINE).await.unwrap();
}
