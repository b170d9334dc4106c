//! A kiosk bound to a scale: the daemon reads a Modbus server nobody here wrote (pymodbus)
//! and the call gets the measured class with `weight_source: "scale"`, the correction in
//! the answer, and the reading on the retained weight topic.

use std::process::Stdio;

use pickup_e2e::*;
use pickup_protocol::client::Version;
use pickup_protocol::Topics;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// An interpreter that imports pymodbus, or a failure saying how to get one.
async fn python() -> String {
    let mut candidates: Vec<String> = ["PICKUP_PYTHON", "PICKUP_TEST_PYTHON"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .filter(|p| !p.is_empty())
        .collect();
    candidates.extend(["python3".to_string(), "/usr/bin/python3".to_string()]);
    for p in &candidates {
        let ok = Command::new(p)
            .args(["-c", "import pymodbus"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if ok {
            return p.clone();
        }
    }
    panic!("pymodbus is missing: apt-get install -y python3-pymodbus (scripts/test does this); tried {candidates:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_reading_decides_the_class_of_a_call() {
    let py = python().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../daemon/tests/fixtures/modbus_scale_server.py"
    );
    // 12 345 g as i32 (high word first) and a status word with bit 0 = stable.
    let mut server = Command::new(&py)
        .arg(script)
        .args(["--port", "0", "--holding", "0=0x0000,0x3039,0x0001"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("pymodbus server starts");
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("pymodbus ready in time")
        .unwrap()
        .expect("pymodbus printed its port");
    let port: u16 = line.strip_prefix("ready ").unwrap().trim().parse().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pickupd.toml");
    std::fs::write(
        &file,
        format!(
            r#"
site = "test"
[store]
path = "{}"
[broker]
listen = "127.0.0.1:0"
[[scales]]
id = "desk"
kiosks = ["kiosk-s"]
address = "127.0.0.1:{port}"
register = 0
format = "i32"
unit = "g"
poll_interval_ms = 100
request_timeout_ms = 1000
max_age_ms = 5000
[scales.status]
register = 2
stable_bit = 0
"#,
            dir.path().join("p.db").display()
        ),
    )
    .unwrap();
    let cfg = pickupd::config::Config::load(Some(&file), []).expect("config with a scale");
    let d = start_daemon(cfg).await;
    let topics = Topics::new("test").unwrap();
    let (seen, _w) = watch(d.broker_addr, vec![topics.scale_weight("desk")]).await;
    wait_until("a stable reading on the weight topic", || async {
        seen.last_json(&topics.scale_weight("desk"))
            .is_some_and(|v| v["stable"] == true && v["unit"] == "kg")
    })
    .await;
    let w = seen.last_json(&topics.scale_weight("desk")).unwrap();
    assert!((w["value"].as_f64().unwrap() - 12.345).abs() < 1e-9, "{w}");

    // The customer chose "light"; the scale says 12.3 kg.
    let kiosk = Kiosk::connect(d.broker_addr, "test", "kiosk-s", Version::V4).await;
    let a = kiosk.create(kiosk.call_body("s-1")).await;
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["call"]["parcel"]["class"], "heavy", "{a}");
    assert_eq!(a["call"]["parcel"]["weight_source"], "scale", "{a}");
    assert!((a["call"]["parcel"]["weight_kg"].as_f64().unwrap() - 12.345).abs() < 1e-9);
    assert!(a["class_corrected"].is_string(), "{a}");
    assert_eq!(a["call"]["price"], 7000, "heavy tariff: {a}");
    // A kiosk without a scale keeps the declared class.
    let other = Kiosk::connect(d.broker_addr, "test", "kiosk-x", Version::V4).await;
    let b = other.create(other.call_body("s-2")).await;
    assert_eq!(b["call"]["parcel"]["class"], "light", "{b}");
    assert_eq!(b["call"]["parcel"]["weight_source"], "declared", "{b}");

    // The scale goes away: calls fall back to the declared class, without waiting.
    server.kill().await.unwrap();
    let mut n = 0;
    wait_until(
        "fallback to the declared class once the reading is stale",
        || {
            n += 1;
            let body = kiosk.call_body(&format!("s-after-{n}"));
            let kiosk = &kiosk;
            async move {
                let a = kiosk.create(body).await;
                a["call"]["parcel"]["weight_source"] == "declared"
            }
        },
    )
    .await;
    d.shutdown(DEADLINE).await.unwrap();
}
