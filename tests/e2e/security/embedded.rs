//! The embedded broker with a device registry: who may connect, under which client id,
//! and registry changes made with the real `pickupctl` while the daemon runs.

use std::process::Command;

use pickup_protocol::client::{LinkOptions, Requester, Version};
use pickup_protocol::{JobKind, Topics};
use pickupd::security::registry::{Registry, Role};
use serde_json::{json, Value};

use super::*;

/// A kiosk that authenticates.
async fn kiosk(
    addr: SocketAddr,
    client_id: &str,
    id: &str,
    secret: &str,
) -> Result<Requester, String> {
    let t = Topics::new("test").unwrap();
    let mut o = LinkOptions::new(url(addr), client_id);
    o.version = Version::V4;
    o.credentials = Some((id.into(), secret.into()));
    Requester::connect(
        o,
        t.kiosk_replies(id),
        vec![],
        std::time::Duration::from_secs(3),
    )
    .await
    .map(|(r, _)| r)
    .map_err(|e| e.to_string())
}

fn ctl(registry: &Path, args: &[&str]) -> std::process::Output {
    Command::new(workspace_bin("pickupctl"))
        .env("PICKUP_REGISTRY", registry)
        .env_remove("PICKUPD_CONFIG")
        .args(args)
        .output()
        .unwrap()
}

fn ctl_json(registry: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = ctl(registry, &all);
    assert!(
        out.status.success(),
        "pickupctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_connect_only_as_themselves_and_changes_apply_live() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let reg = dir.path().join("registry.json");
    let s = make_registry(
        &reg,
        &[
            ("k1", Role::Kiosk),
            ("c1", Role::Courier),
            ("op", Role::Operator),
        ],
    );
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let t = Topics::new("test").unwrap();

    // The daemon made its own identity next to the registry; the secret file is 0600.
    let r = Registry::load(&reg).unwrap();
    assert_eq!(r.get("pickupd").map(|d| d.role), Some(Role::Daemon));
    let mode = std::fs::metadata(dir.path().join("daemon.secret"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    // Refused: anonymous, wrong secret, a client id bound to another identity, unknown.
    assert!(
        Dev::connect(addr, "kiosk-k1", None).await.is_err(),
        "anonymous let in"
    );
    assert!(Dev::connect(addr, "kiosk-k1", Some(("k1", s.get("c1"))))
        .await
        .is_err());
    assert!(Dev::connect(addr, "kiosk-k2", Some(("k1", s.get("k1"))))
        .await
        .is_err());
    assert!(Dev::connect(addr, "courier-k1", Some(("k1", s.get("k1"))))
        .await
        .is_err());
    assert!(Dev::connect(addr, "courier-c1", Some(("k1", s.get("k1"))))
        .await
        .is_err());
    assert!(Dev::connect(addr, "pickupd", Some(("pickupd", "guess")))
        .await
        .is_err());
    assert!(Dev::connect(addr, "kiosk-zz", Some(("zz", s.get("k1"))))
        .await
        .is_err());

    // Allowed: a kiosk and a courier as themselves; a call goes through.
    let k1 = kiosk(addr, "kiosk-k1", "k1", s.get("k1"))
        .await
        .expect("kiosk k1 connects");
    let mut o = LinkOptions::new(url(addr), "courier-c1");
    o.credentials = Some(("c1".into(), s.get("c1").into()));
    let (c1, mut jobs) = Requester::connect(
        o,
        t.courier_replies("c1"),
        vec![t.courier_job("c1")],
        DEADLINE,
    )
    .await
    .expect("courier c1 connects");
    c1.link()
        .publish(
            &t.courier_presence("c1"),
            true,
            true,
            json!({"state":"online","available":true,"vehicle":"car","name":"C1"})
                .to_string()
                .into_bytes(),
            None,
        )
        .await
        .unwrap();
    c1.link()
        .publish(
            &t.courier_location("c1"),
            true,
            false,
            br#"{"lat":37.5,"lon":127.0}"#.to_vec(),
            None,
        )
        .await
        .unwrap();
    wait_until("courier online", || async {
        d.stats.couriers_online.load(Ordering::Relaxed) == 1
    })
    .await;
    let a = k1
        .request(
            &t.calls_create(),
            json!({"request_id":"e1","tel":"010-1234-5678","location":{"lat":37.5,"lon":127.0},"parcel":{"class":"light"}}),
            DEADLINE,
        )
        .await
        .unwrap();
    assert_eq!(a["ok"], true, "{a}");
    let call_id = a["call"]["call_id"].as_str().unwrap().to_string();
    let job = tokio::time::timeout(DEADLINE, async {
        loop {
            let m = jobs.recv().await.unwrap();
            if let Ok(j) = serde_json::from_slice::<pickup_protocol::Job>(&m.payload) {
                if j.kind == JobKind::Assigned {
                    return j;
                }
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(job.call_id.as_deref(), Some(call_id.as_str()));

    // pickupctl as an operator: ctl-op--<suffix> client ids.
    let out = Command::new(workspace_bin("pickupctl"))
        .args([
            "--broker",
            &format!("mqtt://{addr}"),
            "--site",
            "test",
            "--user",
            "op",
        ])
        .env("PICKUP_PASSWORD", s.get("op"))
        .args(["status", &call_id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("assigned"));

    // Live changes through pickupctl, no restart.
    let added = ctl_json(&reg, &["device", "add", "k9", "--role", "kiosk"]);
    assert_eq!(added["client_id"], "kiosk-k9");
    let k9_secret = added["secret"].as_str().unwrap().to_string();
    kiosk(addr, "kiosk-k9", "k9", &k9_secret)
        .await
        .expect("new device connects at once");

    let rotated = ctl_json(&reg, &["device", "rotate", "k1"]);
    let k1_new = rotated["secret"].as_str().unwrap().to_string();
    assert!(
        kiosk(addr, "kiosk-k1", "k1", s.get("k1")).await.is_err(),
        "old secret still works"
    );
    kiosk(addr, "kiosk-k1", "k1", &k1_new)
        .await
        .expect("rotated secret works");

    ctl_json(&reg, &["device", "remove", "k9"]);
    assert!(
        kiosk(addr, "kiosk-k9", "k9", &k9_secret).await.is_err(),
        "removed device connects"
    );

    let list = ctl_json(&reg, &["device", "list"]);
    let ids: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["c1", "k1", "op", "pickupd"]);
    assert!(
        !std::fs::read_to_string(&reg).unwrap().contains(&k1_new),
        "plaintext secret stored"
    );

    // Bad input to pickupctl is refused with a message, not a crash.
    let out = ctl(&reg, &["device", "add", "a--b", "--role", "kiosk"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--"));
    let out = ctl(&reg, &["device", "add", "x", "--role", "admin"]);
    assert!(!out.status.success());

    drop(k1);
    d.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_setup_is_anonymous_only_on_loopback_with_no_devices() {
    // Defaults on loopback, empty registry: anonymous clients get in (the demo path).
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(test_config(dir.path())).await;
    let k = Kiosk::connect(d.broker_addr, "test", "anon", Version::V4).await;
    let a = k.create(k.call_body("z1")).await;
    assert_eq!(a["ok"], true, "{a}");
    d.shutdown(DEADLINE).await.unwrap();

    // `anonymous = "never"`: the daemon still gets in (its own identity), nobody else
    // without credentials.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.security.anonymous = pickupd::security::Anonymous::Never;
    let d = start_daemon(cfg).await;
    assert!(Dev::connect(d.broker_addr, "kiosk-anon", None)
        .await
        .is_err());
    d.shutdown(DEADLINE).await.unwrap();
}
