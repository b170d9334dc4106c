//! TLS: the embedded broker's TLS listener (checked with Mosquitto's own client), a kiosk
//! and pickupctl over `mqtts://`, and the daemon's client over TLS to Mosquitto with its
//! registry identity.

use std::io::Write as _;
use std::process::Command;

use pickup_broker::TlsSettings;
use pickup_protocol::client::{LinkOptions, Requester, TlsClient};
use pickup_protocol::{JobKind, Topics};
use pickupd::security::registry::Role;
use serde_json::json;

use super::*;

fn sub(args: &[&str]) -> std::process::Output {
    Command::new(require("mosquitto_sub", "mosquitto-clients"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_tls_listener_needs_the_right_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(&dir.path().join("pki"));
    let other = Pki::make(&dir.path().join("other"));
    let mut cfg = test_config(dir.path());
    cfg.broker.tls = Some(TlsSettings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        cert: pki.cert.clone(),
        key: pki.key.clone(),
        client_ca: None,
        handshake_timeout_ms: 2_000,
    });
    let d = start_daemon(cfg).await;
    let tls = d.broker.as_ref().unwrap().tls_addr().expect("TLS listener");
    let port = tls.port().to_string();
    let topic = Topics::new("test").unwrap().daemon_state();

    // A client that connects and says nothing must not hold up the others.
    let mut silent = std::net::TcpStream::connect(tls).unwrap();

    let ok = tokio::task::spawn_blocking({
        let (port, topic, ca) = (port.clone(), topic.clone(), pki.ca.clone());
        move || {
            sub(&[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "--cafile",
                ca.to_str().unwrap(),
                "-t",
                &topic,
                "-C",
                "1",
                "-W",
                "10",
            ])
        }
    })
    .await
    .unwrap();
    assert!(
        ok.status.success(),
        "mosquitto_sub over TLS: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("\"ready\""),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    // Plain MQTT on the TLS port, and TLS trusting another CA: both fail.
    let plain = tokio::task::spawn_blocking({
        let (port, topic) = (port.clone(), topic.clone());
        move || {
            sub(&[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-t",
                &topic,
                "-C",
                "1",
                "-W",
                "3",
            ])
        }
    })
    .await
    .unwrap();
    assert!(
        !plain.status.success(),
        "plain TCP to the TLS port got through"
    );
    assert!(plain.stdout.is_empty());
    let wrong_ca = tokio::task::spawn_blocking({
        let (port, topic, ca) = (port.clone(), topic.clone(), other.ca.clone());
        move || {
            sub(&[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "--cafile",
                ca.to_str().unwrap(),
                "-t",
                &topic,
                "-C",
                "1",
                "-W",
                "3",
            ])
        }
    })
    .await
    .unwrap();
    assert!(
        !wrong_ca.status.success(),
        "a server certificate from an untrusted CA was accepted"
    );
    assert!(wrong_ca.stdout.is_empty());

    // A kiosk through the shared client adapter over mqtts://.
    let t = Topics::new("test").unwrap();
    let mut o = LinkOptions::new(url(tls), "kiosk-tls");
    o.tls = Some(TlsClient::from_ca_file(&pki.ca).unwrap());
    let (k, _) = Requester::connect(o, t.kiosk_replies("tls"), vec![], DEADLINE)
        .await
        .expect("kiosk over TLS");
    let a = k
        .request(
            &t.calls_create(),
            json!({"request_id":"t1","tel":"010-1234-5678","location":{"lat":37.5,"lon":127.0},"parcel":{"class":"light"}}),
            DEADLINE,
        )
        .await
        .unwrap();
    assert_eq!(a["ok"], true, "{a}");
    let call_id = a["call"]["call_id"].as_str().unwrap().to_string();

    // pickupctl over mqtts://, and refusing to try without a CA.
    let out = Command::new(workspace_bin("pickupctl"))
        .args([
            "--broker",
            &format!("mqtts://127.0.0.1:{port}"),
            "--site",
            "test",
        ])
        .args(["--cafile", pki.ca.to_str().unwrap(), "status", &call_id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(workspace_bin("pickupctl"))
        .args([
            "--broker",
            &format!("mqtts://127.0.0.1:{port}"),
            "--site",
            "test",
            "status",
            &call_id,
        ])
        .env_remove("PICKUP_CAFILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cafile"));

    // A courier handheld over mqtts:// comes online (its presence reaches a watcher).
    let (seen, _w) = watch(d.broker_addr, vec![t.courier_presence("tls1")]).await;
    let mut agent = Command::new(workspace_bin("courier-agent"))
        .args([
            "--broker",
            &format!("mqtts://127.0.0.1:{port}"),
            "--cafile",
            pki.ca.to_str().unwrap(),
            "--site",
            "test",
            "--id",
            "tls1",
            "--vehicle",
            "car",
            "--lat",
            "37.5",
            "--lon",
            "127.0",
            "--no-input",
            "--queue-file",
            dir.path().join("tls1.queue").to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("courier online over TLS", || async {
        seen.last_json(&t.courier_presence("tls1"))
            .is_some_and(|v| v["state"] == "online")
    })
    .await;
    let _ = agent.kill();
    let _ = agent.wait();

    let _ = silent.write_all(b"\x16\x03");
    d.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_over_tls_to_mosquitto_with_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(&dir.path().join("pki"));
    let reg = dir.path().join("registry.json");
    let s = make_registry(
        &reg,
        &[
            ("k1", Role::Kiosk),
            ("c1", Role::Courier),
            ("r1", Role::Relay),
        ],
    );
    let mut cfg = test_config(dir.path());
    cfg.security.ca_file = Some(pki.ca.clone());
    // The daemon's identity first (what its first start does), so the password file has it.
    cfg.mqtt.url = "mqtts://127.0.0.1:8883".into();
    pickupd::security::Security::prepare(&cfg).unwrap();
    let m = SecureMosquitto::start(
        &reg,
        "test",
        &dir.path().join("mosquitto"),
        Some((&pki.cert, &pki.key)),
    );
    cfg.mqtt.url = format!("mqtts://{}", m.tls_addr.unwrap());
    let d = start_daemon(cfg).await;
    assert!(d.mqtt.connected.load(Ordering::Relaxed));

    let t = Topics::new("test").unwrap();
    let mut relay = Dev::connect(m.addr, "relay-r1", Some(("r1", s.get("r1"))))
        .await
        .unwrap();
    relay.subscribe(&[t.notifications()]).await;
    let mut c1 = Dev::connect(m.addr, "courier-c1", Some(("c1", s.get("c1"))))
        .await
        .unwrap();
    c1.subscribe(&[t.courier_job("c1")]).await;
    c1.publish(
        &t.courier_presence("c1"),
        true,
        r#"{"state":"online","available":true,"vehicle":"car"}"#,
    )
    .await;
    c1.publish(
        &t.courier_location("c1"),
        false,
        r#"{"lat":37.5,"lon":127.0}"#,
    )
    .await;
    wait_until("courier online", || async {
        d.stats.couriers_online.load(Ordering::Relaxed) == 1
    })
    .await;

    let mut o = LinkOptions::new(url(m.addr), "kiosk-k1");
    o.credentials = Some(("k1".into(), s.get("k1").into()));
    let (k1, _) = Requester::connect(o, t.kiosk_replies("k1"), vec![], DEADLINE)
        .await
        .unwrap();
    let a = k1
        .request(
            &t.calls_create(),
            json!({"request_id":"m1","tel":"010-1234-5678","location":{"lat":37.5,"lon":127.0},"parcel":{"class":"light"}}),
            DEADLINE,
        )
        .await
        .unwrap();
    assert_eq!(a["ok"], true, "{a}");
    c1.wait_payload(&t.courier_job("c1"), "\"assigned\"").await;
    let job: pickup_protocol::Job =
        serde_json::from_slice(&c1.on(&t.courier_job("c1")).last().unwrap().payload).unwrap();
    assert_eq!(job.kind, JobKind::Assigned);
    relay
        .wait_payload(&t.notifications(), "010-1234-5678")
        .await;
    // The status read goes through the daemon's read connection (`pickupd.reads`, in the
    // generated password file and ACL) and its answer reaches the kiosk.
    let id = a["call"]["call_id"].as_str().unwrap();
    let got = k1
        .request(&t.call_get(id), json!({}), DEADLINE)
        .await
        .unwrap();
    assert_eq!(got["call"]["status"], "assigned", "{got}");
    d.shutdown(DEADLINE).await.unwrap();
}
