//! The generated Mosquitto password file and ACL, with real Mosquitto and real clients.
//!
//! Mosquitto 2.0 answers a subscription outside the ACL with a granted SUBACK and then
//! delivers nothing on it, and acknowledges a denied QoS 1 publish and drops it. So every
//! "cannot" below is proven by a barrier: a message the device *may* see (or send) goes
//! through the same connection right after the forbidden one, and once it has arrived the
//! forbidden one would have arrived before it.

use pickup_protocol::Topics;
use pickupd::security::registry::Role;

use super::*;

const SITE: &str = "acl";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_device_reaches_only_its_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("registry.json");
    let s = make_registry(
        &reg,
        &[
            ("a", Role::Courier),
            ("b", Role::Courier),
            ("k1", Role::Kiosk),
            ("k2", Role::Kiosk),
            ("r1", Role::Relay),
            ("op", Role::Operator),
            ("pickupd", Role::Daemon),
        ],
    );
    let m = SecureMosquitto::start(&reg, SITE, &dir.path().join("mosquitto"), None);
    let t = Topics::new(SITE).unwrap();
    let p = t.prefix().to_string();

    // Wrong secret, unknown device, no credentials, another device's secret: refused.
    let e = Dev::connect(m.addr, "courier-a", Some(("a", "wrong")))
        .await
        .err();
    assert!(
        e.as_deref().is_some_and(|e| e.contains("NotAuthorized")),
        "{e:?}"
    );
    let e = Dev::connect(m.addr, "courier-x", Some(("x", s.get("a"))))
        .await
        .err();
    assert!(
        e.as_deref().is_some_and(|e| e.contains("NotAuthorized")),
        "{e:?}"
    );
    assert!(Dev::connect(m.addr, "courier-a", None).await.is_err());
    let e = Dev::connect(m.addr, "courier-a", Some(("a", s.get("b"))))
        .await
        .err();
    assert!(
        e.as_deref().is_some_and(|e| e.contains("NotAuthorized")),
        "{e:?}"
    );

    let mut d = Dev::connect(m.addr, "pickupd", Some(("pickupd", s.get("pickupd"))))
        .await
        .expect("daemon identity connects");
    d.subscribe(&[format!("{p}/#")]).await;

    // Courier a cannot read b's job or replies, even with wildcards.
    d.publish(&t.courier_job("b"), true, r#"{"kind":"none","at":1}"#)
        .await;
    d.publish(&t.courier_job("a"), true, r#"{"kind":"none","at":2}"#)
        .await;
    let mut a = Dev::connect(m.addr, "courier-a", Some(("a", s.get("a"))))
        .await
        .unwrap();
    a.subscribe(&[
        t.courier_job("b"),
        t.courier_replies("b"),
        format!("{p}/couriers/+/job"),
        t.courier_job("a"),
    ])
    .await;
    a.wait_count(&t.courier_job("a"), 1).await;
    d.publish(&t.courier_replies("b"), false, "{}").await;
    d.publish(&t.courier_job("b"), true, r#"{"kind":"none","at":3}"#)
        .await;
    d.publish(&t.courier_job("a"), true, r#"{"kind":"none","at":4}"#)
        .await;
    a.wait_payload(&t.courier_job("a"), "\"at\":4").await;
    assert!(a.on(&t.courier_job("b")).is_empty(), "a read b's job");
    assert!(
        a.on(&t.courier_replies("b")).is_empty(),
        "a read b's replies"
    );

    // Courier a cannot publish b's reply or presence; its own location goes through.
    a.publish(
        &t.courier_job_reply("b"),
        false,
        r#"{"call_id":"c1","action":"accept"}"#,
    )
    .await;
    a.publish(&t.courier_presence("b"), true, r#"{"state":"offline"}"#)
        .await;
    a.publish(
        &t.courier_location("a"),
        false,
        r#"{"lat":37.5,"lon":127.0}"#,
    )
    .await;
    d.wait_count(&t.courier_location("a"), 1).await;
    assert!(
        d.on(&t.courier_job_reply("b")).is_empty(),
        "a published b's reply"
    );
    assert!(
        d.on(&t.courier_presence("b")).is_empty(),
        "a published b's presence"
    );

    // Courier a connecting with b's client id does not take over b's session: the
    // broker replaces the client id with the username.
    let b = Dev::connect(m.addr, "courier-b", Some(("b", s.get("b"))))
        .await
        .unwrap();
    let a2 = Dev::connect(m.addr, "courier-b", Some(("a", s.get("a"))))
        .await
        .unwrap();
    a2.publish(
        &t.courier_location("a"),
        false,
        r#"{"lat":37.5,"lon":127.0}"#,
    )
    .await;
    d.wait_count(&t.courier_location("a"), 2).await;
    b.publish(
        &t.courier_location("b"),
        false,
        r#"{"lat":37.5,"lon":127.0}"#,
    )
    .await;
    d.wait_count(&t.courier_location("b"), 1).await;
    assert!(
        b.connected.load(Ordering::SeqCst),
        "b was kicked by a's connection"
    );

    // A kiosk cannot read notifications or another kiosk's replies, nor forge a job;
    // its requests go through.
    let mut k1 = Dev::connect(m.addr, "kiosk-k1", Some(("k1", s.get("k1"))))
        .await
        .unwrap();
    k1.subscribe(&[
        t.notifications(),
        t.kiosk_replies("k2"),
        t.kiosk_replies("k1"),
    ])
    .await;
    let mut r1 = Dev::connect(m.addr, "relay-r1", Some(("r1", s.get("r1"))))
        .await
        .unwrap();
    r1.subscribe(&[t.notifications(), t.call_state_filter(), format!("{p}/#")])
        .await;
    d.publish(&t.notifications(), false, r#"{"tel":"010-1234-5678"}"#)
        .await;
    d.publish(&t.kiosk_replies("k2"), false, "{}").await;
    d.publish(&t.call_state("c1"), true, r#"{"tel":"010-****-5678"}"#)
        .await;
    d.publish(&t.kiosk_replies("k1"), false, "{}").await;
    k1.wait_count(&t.kiosk_replies("k1"), 1).await;
    r1.wait_count(&t.notifications(), 1).await;
    assert!(
        k1.on(&t.notifications()).is_empty(),
        "a kiosk read notifications"
    );
    assert!(
        k1.on(&t.kiosk_replies("k2")).is_empty(),
        "k1 read k2's replies"
    );
    assert!(
        r1.on(&t.call_state("c1")).is_empty(),
        "the relay read call state"
    );
    assert!(
        r1.got
            .lock()
            .unwrap()
            .iter()
            .all(|g| g.topic == t.notifications()),
        "the relay sees notifications only"
    );
    k1.publish(&t.courier_job("a"), true, r#"{"kind":"offer","at":9}"#)
        .await;
    k1.publish(&t.courier_presence("k1"), true, r#"{"state":"online"}"#)
        .await;
    k1.publish(&t.calls_create(), false, r#"{"request_id":"x"}"#)
        .await;
    d.wait_count(&t.calls_create(), 1).await;
    assert!(
        d.on(&t.courier_job("a"))
            .iter()
            .all(|g| !String::from_utf8_lossy(&g.payload).contains("offer")),
        "a kiosk forged a job"
    );
    assert!(
        d.on(&t.courier_presence("k1")).is_empty(),
        "a kiosk posed as a courier"
    );

    // The operator reads state but not notifications, and cannot make calls.
    let mut op = Dev::connect(m.addr, "ctl-op", Some(("op", s.get("op"))))
        .await
        .unwrap();
    op.subscribe(&[format!("{p}/#"), t.call_state_filter(), t.notifications()])
        .await;
    d.publish(&t.notifications(), false, r#"{"tel":"010-1234-5678"}"#)
        .await;
    d.publish(&t.call_state("c2"), true, r#"{"tel":"010-****-5678"}"#)
        .await;
    op.wait_count(&t.call_state("c2"), 1).await;
    assert!(
        op.on(&t.notifications()).is_empty(),
        "the operator read notifications"
    );
    op.publish(&t.calls_create(), false, r#"{"request_id":"y"}"#)
        .await;
    op.publish(&t.call_get("c2"), false, "{}").await;
    d.wait_count(&t.call_get("c2"), 1).await;
    assert_eq!(d.on(&t.calls_create()).len(), 1, "the operator made a call");

    // Nothing outside the site's prefix, not even for the daemon.
    d.subscribe(&["#".to_string(), "$SYS/#".to_string()]).await;
    d.publish("pickup/v1/other/calls/create", false, "{}").await;
    d.publish(&t.daemon_state(), true, r#"{"state":"ready"}"#)
        .await;
    d.wait_payload(&t.daemon_state(), "ready").await;
    assert!(
        d.got
            .lock()
            .unwrap()
            .iter()
            .all(|g| g.topic.starts_with(&p)),
        "the daemon identity reached beyond its prefix"
    );
}
