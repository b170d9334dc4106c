//! Personal data: the real `pickupd` binary, logging at debug level, runs calls through
//! pickup and cancellation. Full phone numbers appear only on `notifications`; retained
//! topics and the log carry masked numbers only; the pickup code is never retained; the
//! database files are 0600.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use pickup_protocol::client::Version;
use pickup_protocol::{JobKind, Topics};
use serde_json::json;

use super::*;

const TEL: &str = "010-2345-6789";
const TEL_DIGITS: &str = "2345-6789";
const TEL2: &str = "+82 10 9876 5432";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_numbers_are_masked_outside_the_relay_channel() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let db = dir.path().join("pickupd.db");
    let config = dir.path().join("pickupd.toml");
    std::fs::write(&config, process_toml(&db, port, None)).unwrap();
    let log_path = dir.path().join("pickupd.log");
    let mut child = Command::new(workspace_bin("pickupd"))
        .arg("--config")
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .env("RUST_LOG", "debug,rumqttd=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let t = Topics::new("test").unwrap();
    let end = Instant::now() + DEADLINE;
    let (seen, _w) = loop {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("pickupd exited: {st}");
        }
        if std::net::TcpStream::connect(addr).is_ok() {
            break watch(addr, vec![format!("{}/#", t.prefix())]).await;
        }
        assert!(Instant::now() < end, "pickupd did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut child = Kill(child);
    wait_until("daemon ready", || {
        let seen = seen.clone();
        let topic = t.daemon_state();
        async move {
            seen.last_json(&topic)
                .is_some_and(|v| v["state"] == "ready")
        }
    })
    .await;

    let courier = TestCourier::online(addr, "test", "c1", "car", 37.5, 127.0).await;
    let kiosk = Kiosk::connect(addr, "test", "k1", Version::V4).await;
    let mut body = kiosk.call_body("p1");
    body["tel"] = json!(TEL);
    let a = kiosk.create(body).await;
    assert_eq!(a["ok"], true, "{a}");
    let id = a["call"]["call_id"].as_str().unwrap().to_string();
    let code = a["pickup_code"].as_str().unwrap().to_string();
    assert!(
        !a.to_string().contains(TEL_DIGITS),
        "the kiosk's answer shows the full number"
    );
    courier.wait_job(JobKind::Assigned, &id).await;
    let r = courier
        .reply(json!({"call_id": id, "action": "picked_up", "pickup_code": code}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let r = courier
        .reply(json!({"call_id": id, "action": "completed"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    // A second call, cancelled, with another number format.
    let mut body = kiosk.call_body("p2");
    body["tel"] = json!(TEL2);
    let a2 = kiosk.create(body).await;
    let id2 = a2["call"]["call_id"].as_str().unwrap().to_string();
    let code2 = a2["pickup_code"].as_str().unwrap().to_string();
    assert_eq!(kiosk.cancel(&id2).await["ok"], true);
    // Bad requests carrying a phone number must not echo it into the log either.
    let _ = kiosk
        .create(json!({"request_id": "p3", "tel": TEL, "location": {"lat": 95.0, "lon": 0}, "parcel": {"class": "light"}}))
        .await;
    kiosk
        .raw(
            &t.calls_create(),
            format!("{{\"tel\":\"{TEL}\",").into_bytes(),
        )
        .await;

    wait_until("notifications for both calls", || {
        let seen = seen.clone();
        let topic = t.notifications();
        async move {
            let n = seen.on(&topic);
            n.iter()
                .any(|m| String::from_utf8_lossy(&m.payload).contains("cancel"))
                && n.iter()
                    .any(|m| String::from_utf8_lossy(&m.payload).contains("picked_up"))
        }
    })
    .await;

    // Full numbers: on notifications, and nowhere else the daemon publishes.
    let notes = seen.on(&t.notifications());
    assert!(notes
        .iter()
        .any(|m| String::from_utf8_lossy(&m.payload).contains(TEL)));
    assert!(notes
        .iter()
        .any(|m| String::from_utf8_lossy(&m.payload).contains(TEL2)));
    for m in seen.all() {
        let text = String::from_utf8_lossy(&m.payload);
        if m.topic == t.notifications()
            || m.topic.ends_with("/job/reply")
            || m.topic.ends_with("/calls/create")
        {
            continue; // the relay channel, and what devices sent
        }
        assert!(
            !text.contains(TEL_DIGITS) && !text.contains("9876 5432"),
            "full number on {}: {text}",
            m.topic
        );
    }

    // Retained state as a late subscriber sees it: masked, no pickup code.
    let (late, _l) = watch(addr, vec![format!("{}/#", t.prefix())]).await;
    wait_until("retained state of both calls", || {
        let late = late.clone();
        let (s1, s2) = (t.call_state(&id), t.call_state(&id2));
        async move { !late.on(&s1).is_empty() && !late.on(&s2).is_empty() }
    })
    .await;
    let retained: Vec<_> = late.all().into_iter().filter(|m| m.retain).collect();
    assert!(retained.len() >= 4, "{retained:?}");
    for m in &retained {
        let text = String::from_utf8_lossy(&m.payload);
        assert!(
            !text.contains(TEL_DIGITS) && !text.contains("9876 5432"),
            "full number retained on {}: {text}",
            m.topic
        );
        assert!(
            !text.contains(&format!("\"{code}\"")) && !text.contains(&format!("\"{code2}\"")),
            "pickup code retained on {}: {text}",
            m.topic
        );
        assert!(
            !text.contains("pickup_code"),
            "pickup code field retained on {}: {text}",
            m.topic
        );
    }
    let state = late.last_json(&t.call_state(&id)).unwrap();
    assert_eq!(state["tel"], "010-****-6789", "{state}");

    // The log: masked numbers at most, even at debug level and for refused requests.
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM);
    }
    let st = child.0.wait().unwrap();
    assert!(st.success(), "pickupd exit: {st}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains(&id),
        "the log shows the call id (sanity check that it was captured)"
    );
    assert!(!log.contains(TEL_DIGITS), "full phone number in the log");
    assert!(!log.contains("9876 5432"), "full phone number in the log");

    // The database and its WAL/SHM files are 0600.
    for f in [
        "pickupd.db",
        "pickupd.db-wal",
        "pickupd.db-shm",
        "registry.json",
        "daemon.secret",
    ] {
        let p = dir.path().join(f);
        if let Ok(m) = std::fs::metadata(&p) {
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f} is not 0600");
        } else {
            assert!(f.ends_with("-wal") || f.ends_with("-shm"), "{f} missing");
        }
    }
    drop(courier);
}
