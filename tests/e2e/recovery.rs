//! Restart recovery with the embedded broker (which keeps nothing on disk): the retained
//! call states come back from the database; a backup taken while the daemon runs holds
//! the accepted calls.

use pickup_e2e::*;
use pickup_protocol::client::Version;
use pickup_protocol::Topics;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_state_is_republished_after_a_restart_and_backup_works_live() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let kiosk = Kiosk::connect(d.broker_addr, "test", "k", Version::V4).await;
    let a = kiosk.create(kiosk.call_body("r-1")).await;
    let b = kiosk.create(kiosk.call_body("r-2")).await;
    let id_a = a["call"]["call_id"].as_str().unwrap().to_string();
    let id_b = b["call"]["call_id"].as_str().unwrap().to_string();
    assert_eq!(kiosk.cancel(&id_b).await["ok"], true);

    // Online backup while running.
    let copy = dir.path().join("backup.db");
    let out = std::process::Command::new(workspace_bin("pickupctl"))
        .args([
            "backup",
            copy.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: i64 = open_db(&copy)
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    let out = std::process::Command::new(workspace_bin("pickupctl"))
        .args([
            "backup",
            copy.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "backup overwrote an existing file");

    d.shutdown(DEADLINE).await.unwrap();

    // A new daemon on the same file, with a new (empty) embedded broker.
    let d = start_daemon(test_config(dir.path())).await;
    let topics = Topics::new("test").unwrap();
    let (seen, _w) = watch(d.broker_addr, vec![topics.call_state_filter()]).await;
    wait_until("both call states republished", || async {
        seen.last_json(&topics.call_state(&id_a))
            .is_some_and(|v| v["status"] == "dispatching")
            && seen
                .last_json(&topics.call_state(&id_b))
                .is_some_and(|v| v["status"] == "cancelled")
    })
    .await;
    d.shutdown(DEADLINE).await.unwrap();
}
