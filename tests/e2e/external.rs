//! Debian's Mosquitto as the broker (external mode), with Mosquitto's own command-line
//! clients as kiosks: MQTT 5 request/response with `mosquitto_rr`, MQTT 3.1.1 with
//! `mosquitto_sub` + `mosquitto_pub` and the payload's `reply_to`/`correlation_id`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pickup_e2e::*;
use pickup_protocol::client::Version;
use pickup_protocol::{JobKind, Topics};
use serde_json::json;

fn external_config(dir: &std::path::Path, m: &Mosquitto, version: u8) -> pickupd::config::Config {
    let mut cfg = test_config(dir);
    cfg.mqtt.url = format!("mqtt://{}", m.addr);
    cfg.mqtt.version = version;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_as_kiosks() {
    let m = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(external_config(dir.path(), &m, 5)).await;
    let topics = Topics::new("test").unwrap();
    let port = m.addr.port().to_string();
    let courier = TestCourier::online(m.addr, "test", "k1", "car", 37.5005, 127.0).await;

    // MQTT 5: Response Topic + Correlation Data, with mosquitto_rr.
    let rr = require("mosquitto_rr", "mosquitto-clients");
    let body = json!({
        "request_id": "rr-1",
        "tel": "010-1234-5678",
        "location": {"lat": 37.5, "lon": 127.0},
        "parcel": {"class": "light"},
    });
    let out = tokio::task::spawn_blocking({
        let topics = topics.clone();
        let port = port.clone();
        move || {
            Command::new(rr)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-V",
                    "5",
                    "-q",
                    "1",
                    "-W",
                    "15",
                ])
                .args(["-t", &topics.calls_create()])
                .args(["-e", &topics.kiosk_replies("rr-kiosk")])
                .args(["-m", &body.to_string()])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "mosquitto_rr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON answer");
    assert_eq!(a["ok"], true, "{a}");
    let id = a["call"]["call_id"].as_str().unwrap().to_string();
    courier.wait_job(JobKind::Assigned, &id).await;

    // MQTT 3.1.1: mosquitto_sub on the kiosk's reply topic, mosquitto_pub sends the
    // request with reply_to/correlation_id. The request id makes re-sending safe, so the
    // request is repeated until the subscriber (whose start we cannot observe) has it.
    let sub_bin = require("mosquitto_sub", "mosquitto-clients");
    let pub_bin = require("mosquitto_pub", "mosquitto-clients");
    let reply_topic = topics.kiosk_replies("sub-kiosk");
    let mut sub = Command::new(sub_bin)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "311",
            "-q",
            "1",
            "-C",
            "1",
        ])
        .args(["-t", &reply_topic])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let req = json!({
        "request_id": "v4-1",
        "tel": "010-1234-5678",
        "location": {"lat": 37.5, "lon": 127.0},
        "parcel": {"class": "light"},
        "reply_to": reply_topic,
        "correlation_id": "abc-1",
    });
    let end = Instant::now() + DEADLINE;
    loop {
        let st = Command::new(&pub_bin)
            .args(["-h", "127.0.0.1", "-p", &port, "-V", "311", "-q", "1"])
            .args(["-t", &topics.calls_create(), "-m", &req.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        if sub.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            Instant::now() < end,
            "no answer on the MQTT 3.1.1 reply topic"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = sub.wait_with_output().unwrap();
    let a: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON answer");
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["correlation_id"], "abc-1");
    d.shutdown(DEADLINE).await.unwrap();
    let calls: i64 = open_db(&dir.path().join("pickupd.db"))
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(calls, 2, "repeated MQTT 3.1.1 requests made one call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_kiosks_of_both_versions_through_mosquitto() {
    let m = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(external_config(dir.path(), &m, 5)).await;
    let v4 = Kiosk::connect(m.addr, "test", "kv4", Version::V4).await;
    let v5 = Kiosk::connect(m.addr, "test", "kv5", Version::V5).await;
    let a = v4.create(v4.call_body("a")).await;
    let b = v5.create(v5.call_body("b")).await;
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(b["ok"], true, "{b}");
    let g = v5.get(a["call"]["call_id"].as_str().unwrap()).await;
    assert_eq!(g["call"]["status"], "dispatching", "{g}");
    d.shutdown(DEADLINE).await.unwrap();
}
