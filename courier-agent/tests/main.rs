//! End-to-end tests of the courier agent against a real mosquitto, with the test playing
//! the daemon. Needs Debian's `mosquitto` installed; fails (does not skip) without it.

mod support;

use std::time::Duration;

use courier_agent::agent::now_ms;
use courier_agent::{Agent, AgentConfig, EventKind, LinkState, Point, QueueStore};
use pickup_protocol::client::{BrokerUrl, Version};
use pickup_protocol::{Topics, Vehicle};
use serde_json::json;
use support::*;
use tokio::sync::mpsc;

fn topics() -> Topics {
    Topics::new("default").unwrap()
}

fn offer(call: &str) -> serde_json::Value {
    json!({
        "kind": "offer", "call_id": call,
        "pickup": {"lat": 37.501, "lon": 127.0, "label": "Gate 2"},
        "parcel": {"class": "light", "weight_kg": 2.5},
        "tel": "010-****-5678",
        "expires_at": now_ms() + 60_000, "at": now_ms()
    })
}

fn assigned(call: &str) -> serde_json::Value {
    json!({
        "kind": "assigned", "call_id": call,
        "pickup": {"lat": 37.501, "lon": 127.0},
        "parcel": {"class": "light"},
        "tel": "010-****-5678", "at": now_ms()
    })
}

fn agent_config(url: &str, id: &str, queue: QueueStore) -> AgentConfig {
    let mut c = AgentConfig::new(
        BrokerUrl::parse(url).unwrap(),
        "default",
        id,
        Vehicle::Scooter,
        Point::new(37.5, 127.0),
    );
    c.name = Some("Kim".into());
    c.tel = Some("010-1234-5678".into());
    c.queue = queue;
    c.reconnect_min = Duration::from_millis(20);
    c.reconnect_max = Duration::from_millis(200);
    c
}

/// Plays the daemon's answer to a reply: `{"ok":true,...}` with its correlation id.
async fn answer_ok(w: &Watcher, cid: &str, reply_id: &str) {
    w.publish(
        &topics().courier_replies(cid),
        &json!({"ok": true, "correlation_id": reply_id, "duplicate": false}),
        false,
    )
    .await;
}

fn is_presence(m: &Msg, cid: &str, state: &str) -> bool {
    m.topic == topics().courier_presence(cid) && m.json["state"] == state
}

async fn presence_then_will(version: &str) {
    let broker = Mosquitto::start();
    let t = topics();
    let w = Watcher::start(
        broker.port,
        &[t.courier_presence("+"), t.courier_location("+")],
    )
    .await;
    let mut agent = AgentProc::spawn(&[
        "--broker",
        &broker.url(),
        "--id",
        "k1",
        "--name",
        "Kim",
        "--vehicle",
        "car",
        "--tel",
        "010-1234-5678",
        "--lat",
        "37.5",
        "--lon",
        "127.0",
        "--no-input",
        "--mqtt-version",
        version,
        "--will-delay-s",
        "1",
        "--queue-file",
        &std::env::temp_dir()
            .join(format!("ca-test-{}.queue", rand::random::<u64>()))
            .to_string_lossy(),
    ]);
    let online = w
        .wait("presence online", |m| is_presence(m, "k1", "online"))
        .await;
    assert_eq!(online.json["available"], true);
    assert_eq!(online.json["name"], "Kim");
    assert_eq!(online.json["vehicle"], "car");
    assert_eq!(online.json["tel"], "010-1234-5678");
    assert!(online.json["at"].as_i64().unwrap() <= now_ms());
    let loc = w
        .wait("a location report", |m| m.topic == t.courier_location("k1"))
        .await;
    assert_eq!(loc.json["lat"], 37.5);
    assert_eq!(loc.json["lon"], 127.0);

    // A late subscriber sees the presence retained.
    let late = Watcher::start(broker.port, &[t.courier_presence("k1")]).await;
    let r = late
        .wait("retained presence", |m| is_presence(m, "k1", "online"))
        .await;
    assert!(r.retain);

    agent.kill();
    let will = w
        .wait("the last will", |m| is_presence(m, "k1", "offline"))
        .await;
    assert_eq!(will.json["available"], false);
    assert_eq!(will.json["vehicle"], "car");
    // The will was written at connect time: it carries no device time.
    assert!(will.json.get("at").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn presence_on_connect_and_last_will_on_sigkill_v311() {
    presence_then_will("4").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn presence_on_connect_and_last_will_on_sigkill_v5() {
    presence_then_will("5").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_accept_answers_the_retained_offer_and_shows_the_answer() {
    let broker = Mosquitto::start();
    let t = topics();
    let w = Watcher::start(broker.port, &[t.courier_job_reply("+")]).await;
    // The offer is waiting (retained) before the courier starts.
    w.publish(&t.courier_job("k2"), &offer("c-100"), true).await;
    let dir = tempfile::tempdir().unwrap();
    let queue = dir.path().join("k2.queue");
    let agent = AgentProc::spawn(&[
        "--broker",
        &broker.url(),
        "--id",
        "k2",
        "--lat",
        "37.5",
        "--lon",
        "127.0",
        "--no-input",
        "--auto-accept",
        "--json",
        "--queue-file",
        &queue.to_string_lossy(),
    ]);
    let before = now_ms();
    let reply = w
        .wait("an accept", |m| m.topic == t.courier_job_reply("k2"))
        .await;
    assert_eq!(reply.json["action"], "accept");
    assert_eq!(reply.json["call_id"], "c-100");
    let at = reply.json["at"].as_i64().expect("at");
    assert!(at <= now_ms() && at > before - 60_000);
    let reply_id = reply.json["reply_id"].as_str().unwrap().to_string();
    assert_eq!(reply.json["reply_to"], t.courier_replies("k2"));
    assert_eq!(reply.json["correlation_id"], reply_id.as_str());
    // The agent showed the job it found on start.
    agent.wait_line("the job event", |l| {
        l.contains(r#""event":"job""#) && l.contains("c-100")
    });

    // The daemon answers on the courier's replies topic; the agent reports it.
    w.publish(
        &t.courier_replies("k2"),
        &json!({"ok": false, "correlation_id": reply_id, "error": {"code": "invalid_state", "message": "offer expired"}}),
        false,
    )
    .await;
    agent.wait_line("the answer", |l| {
        l.contains(r#""event":"answer""#) && l.contains("invalid_state") && l.contains(&reply_id)
    });
    wait_until("the queue to empty", || file_lines(&queue).is_empty());
    // Exactly one answer to one offer.
    let n = w
        .all()
        .iter()
        .filter(|m| m.topic == t.courier_job_reply("k2"))
        .count();
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn decline_rate_one_declines_with_a_reason() {
    let broker = Mosquitto::start();
    let t = topics();
    let w = Watcher::start(broker.port, &[t.courier_job_reply("+")]).await;
    w.publish(&t.courier_job("k3"), &offer("c-200"), true).await;
    let dir = tempfile::tempdir().unwrap();
    let _agent = AgentProc::spawn(&[
        "--broker",
        &broker.url(),
        "--id",
        "k3",
        "--lat",
        "37.5",
        "--lon",
        "127.0",
        "--no-input",
        "--decline-rate",
        "1.0",
        "--queue-file",
        &dir.path().join("q").to_string_lossy(),
    ]);
    let reply = w
        .wait("a decline", |m| m.topic == t.courier_job_reply("k3"))
        .await;
    assert_eq!(reply.json["action"], "decline");
    assert_eq!(reply.json["call_id"], "c-200");
    assert!(reply.json["reason"].as_str().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn interactive_commands_drive_the_job_and_quit_goes_offline_cleanly() {
    let broker = Mosquitto::start();
    let t = topics();
    let w = Watcher::start(
        broker.port,
        &[
            t.courier_job_reply("+"),
            t.courier_presence("+"),
            t.courier_location("+"),
        ],
    )
    .await;
    w.publish(&t.courier_job("k4"), &assigned("c-300"), true)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = AgentProc::spawn(&[
        "--broker",
        &broker.url(),
        "--id",
        "k4",
        "--lat",
        "37.5",
        "--lon",
        "127.0",
        "--queue-file",
        &dir.path().join("q").to_string_lossy(),
    ]);
    agent.wait_line("the assigned job", |l| l.starts_with("ASSIGNED call c-300"));
    w.wait("online", |m| is_presence(m, "k4", "online")).await;

    agent.send("accept");
    agent.wait_line("a refusal of accept", |l| {
        l.starts_with("! cannot accept call c-300")
    });
    agent.send("picked 4821");
    let r = w
        .wait("picked_up", |m| {
            m.topic == t.courier_job_reply("k4") && m.json["action"] == "picked_up"
        })
        .await;
    assert_eq!(r.json["pickup_code"], "4821");
    assert_eq!(r.json["call_id"], "c-300");
    // The daemon has not confirmed yet; the courier may still complete.
    agent.send("done");
    w.wait("completed", |m| {
        m.topic == t.courier_job_reply("k4") && m.json["action"] == "completed"
    })
    .await;

    agent.send("shift off");
    w.wait("presence off shift", |m| {
        is_presence(m, "k4", "online") && m.json["available"] == false
    })
    .await;
    agent.send("move 37.51 127.01");
    w.wait("the new location", |m| {
        m.topic == t.courier_location("k4") && m.json["lat"] == 37.51 && m.json["lon"] == 127.01
    })
    .await;
    agent.send("status");
    agent.wait_line("status", |l| {
        l.starts_with("k4: online, off shift, at 37.51000,127.01000")
    });
    agent.send("nonsense");
    agent.wait_line("an error", |l| l.contains("unknown command"));

    agent.send("quit");
    assert!(agent.wait_exit(), "courier-agent exited with an error");
    let off = w
        .wait("clean offline", |m| is_presence(m, "k4", "offline"))
        .await;
    // A clean goodbye is the agent's own message (with a device time), not the will.
    assert!(off.json["at"].as_i64().is_some(), "{}", off.json);
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_action_is_replayed_with_its_original_time_after_a_broker_restart() {
    let mut broker = Mosquitto::start();
    let gate = Gate::start(broker.port).await;
    let t = topics();
    let w = Watcher::start(broker.port, &[t.courier_job_reply("+")]).await;
    w.publish(&t.courier_job("k5"), &assigned("c-500"), true)
        .await;

    let dir = tempfile::tempdir().unwrap();
    let qpath = dir.path().join("k5.queue");
    let (tx, mut events) = mpsc::channel(256);
    let agent = Agent::spawn(
        agent_config(&gate.url(), "k5", QueueStore::File(qpath.clone())),
        tx,
    )
    .unwrap();
    agent
        .wait_for(DEADLINE, |s| s.link == LinkState::Online && s.job.is_some())
        .await
        .unwrap();

    // Out of coverage: the broker goes away.
    gate.set_open(false);
    broker.stop();
    agent
        .wait_for(DEADLINE, |s| s.link == LinkState::Offline)
        .await
        .unwrap();
    let reply = agent.picked_up("4821").await.unwrap();
    let at = reply.at.unwrap();
    assert_eq!(agent.status().queued, 1);
    assert_eq!(file_lines(&qpath).len(), 1, "the action is on disk");
    while now_ms() <= at {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let restarted_at = now_ms();

    // The broker comes back empty (no persistence): the agent's session is gone too.
    let subs = w.subscriptions();
    broker.restart();
    w.wait_subscribed(subs + 1).await;
    gate.set_open(true);

    let got = w
        .wait("the replayed reply", |m| {
            m.topic == t.courier_job_reply("k5")
                && m.json["reply_id"].as_str() == reply.reply_id.as_deref()
        })
        .await;
    assert_eq!(got.json["action"], "picked_up");
    assert_eq!(got.json["pickup_code"], "4821");
    assert_eq!(got.json["at"].as_i64(), Some(at));
    assert!(at < restarted_at);
    // Delivered to the broker is not enough: it stays queued until the daemon answers.
    assert_eq!(agent.status().queued, 1);
    answer_ok(&w, "k5", reply.reply_id.as_deref().unwrap()).await;
    agent.wait_for(DEADLINE, |s| s.queued == 0).await.unwrap();
    assert!(file_lines(&qpath).is_empty());

    let mut saw_replay = false;
    let mut saw_delivered = false;
    while let Ok(ev) = events.try_recv() {
        match ev.kind {
            EventKind::Acted { offline, .. } => assert!(offline),
            EventKind::Online { replayed: 1 } => saw_replay = true,
            EventKind::Delivered { reply_id } => saw_delivered = Some(reply_id) == reply.reply_id,
            _ => {}
        }
    }
    assert!(saw_replay && saw_delivered);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn coverage_lost_and_back_keeps_the_session_and_replays() {
    let broker = Mosquitto::start();
    let gate = Gate::start(broker.port).await;
    let t = topics();
    let w = Watcher::start(
        broker.port,
        &[t.courier_job_reply("+"), t.courier_presence("+")],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let qpath = dir.path().join("k7.queue");
    let (tx, mut events) = mpsc::channel(256);
    let agent = Agent::spawn(
        agent_config(&gate.url(), "k7", QueueStore::File(qpath.clone())),
        tx,
    )
    .unwrap();
    agent
        .wait_for(DEADLINE, |s| s.link == LinkState::Online)
        .await
        .unwrap();

    gate.set_open(false);
    gate.cut();
    agent
        .wait_for(DEADLINE, |s| s.link == LinkState::Offline)
        .await
        .unwrap();
    // The broker noticed too and published the will.
    w.wait("the will", |m| is_presence(m, "k7", "offline"))
        .await;
    // While the courier is away: the daemon assigns a job, the courier reports a delivery.
    w.publish(&t.courier_job("k7"), &assigned("c-800"), true)
        .await;
    let reply = agent
        .send_reply(pickup_protocol::JobReply {
            call_id: "c-799".into(),
            action: pickup_protocol::JobAction::Completed,
            reply_id: None,
            reason: None,
            pickup_code: None,
            at: None,
        })
        .await
        .unwrap();
    gate.set_open(true);

    let got = w
        .wait("the replayed reply", |m| {
            m.json["reply_id"].as_str() == reply.reply_id.as_deref()
        })
        .await;
    assert_eq!(got.json["at"].as_i64(), reply.at);
    answer_ok(&w, "k7", reply.reply_id.as_deref().unwrap()).await;
    let s = agent
        .wait_for(DEADLINE, |s| {
            s.queued == 0 && s.job.as_ref().and_then(|j| j.call_id.as_deref()) == Some("c-800")
        })
        .await
        .unwrap();
    assert_eq!(s.link, LinkState::Online);
    assert!(file_lines(&qpath).is_empty());
    w.wait("online again", |m| {
        is_presence(m, "k7", "online") && m.json["at"].as_i64() > reply.at.map(|a| a - 1)
    })
    .await;
    let mut resumed = false;
    while let Ok(ev) = events.try_recv() {
        if let EventKind::Connected { session_present } = ev.kind {
            resumed = session_present;
        }
    }
    assert!(resumed, "the broker kept the session");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_queue_line_is_reported_and_skipped() {
    let broker = Mosquitto::start();
    let t = topics();
    let w = Watcher::start(broker.port, &[t.courier_job_reply("+")]).await;
    let dir = tempfile::tempdir().unwrap();
    let qpath = dir.path().join("k6.queue");
    let old_at = now_ms() - 3_600_000;
    std::fs::write(
        &qpath,
        format!(
            "{{\"call_id\":\"c-600\",\"acti\n{}\n\u{0}\u{1}garbage\n",
            json!({"call_id":"c-601","action":"completed","reply_id":"rid-601","at":old_at})
        ),
    )
    .unwrap();
    let (tx, mut events) = mpsc::channel(256);
    let agent = Agent::spawn(
        agent_config(&broker.url(), "k6", QueueStore::File(qpath.clone())),
        tx,
    )
    .unwrap();
    let got = w
        .wait("the queued reply", |m| m.topic == t.courier_job_reply("k6"))
        .await;
    assert_eq!(got.json["reply_id"], "rid-601");
    assert_eq!(got.json["call_id"], "c-601");
    assert_eq!(got.json["at"].as_i64(), Some(old_at));
    answer_ok(&w, "k6", "rid-601").await;
    agent.wait_for(DEADLINE, |s| s.queued == 0).await.unwrap();
    assert!(file_lines(&qpath).is_empty());
    let aside = file_lines(&dir.path().join("k6.queue.corrupt"));
    assert_eq!(aside.len(), 2);

    let mut corrupt = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let EventKind::QueueCorrupt { line, .. } = ev.kind {
            corrupt.push(line);
        }
    }
    assert_eq!(corrupt, vec![1, 3]);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_of_twenty_comes_online_and_leaves_cleanly() {
    let broker = Mosquitto::start();
    let t = topics();
    let w = Watcher::start(
        broker.port,
        &[t.courier_presence("+"), t.courier_location("+")],
    )
    .await;
    let mut fleet = AgentProc::spawn(&[
        "--broker",
        &broker.url(),
        "--simulate",
        "20",
        "--center",
        "37.5,127.0",
        "--radius-m",
        "1000",
        "--seed",
        "7",
        "--tick-ms",
        "200",
    ]);
    let online = |all: &[Msg]| {
        let mut ids: Vec<&str> = all
            .iter()
            .filter(|m| m.json["state"] == "online")
            .filter_map(|m| m.topic.strip_prefix("pickup/v1/default/couriers/"))
            .filter_map(|r| r.strip_suffix("/presence"))
            .collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    wait_until_async("20 couriers online", || online(&w.all()) == 20).await;
    fleet.wait_line("the fleet summary", |l| {
        l.ends_with("fleet: 20/20 couriers online")
    });
    for m in w.all() {
        if m.topic.ends_with("/presence") && m.json["state"] == "online" {
            assert!(m.json["vehicle"].is_string());
            assert!(m.json["name"].is_string());
        }
        if m.topic.ends_with("/location") {
            let p = Point::new(
                m.json["lat"].as_f64().unwrap(),
                m.json["lon"].as_f64().unwrap(),
            );
            assert!(p.distance_m(Point::new(37.5, 127.0)) <= 1001.0);
        }
    }
    fleet.terminate();
    assert!(fleet.wait_exit());
    let offline = |all: &[Msg]| {
        all.iter()
            .filter(|m| m.json["state"] == "offline" && m.json["at"].is_i64())
            .count()
    };
    wait_until_async("20 clean offline presences", || offline(&w.all()) >= 20).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_answers_offers_and_completes_picked_up_jobs() {
    let broker = Mosquitto::start();
    let t = topics();
    let w = Watcher::start(
        broker.port,
        &[t.courier_job_reply("+"), t.courier_presence("+")],
    )
    .await;
    let mut template = agent_config(&broker.url(), "f", QueueStore::Memory);
    template.policy.auto_answer = true;
    template.policy.complete_after = Some(Duration::from_millis(50));
    template.version = Version::V5;
    let cfg = courier_agent::fleet::FleetConfig {
        template,
        count: 3,
        id_prefix: "f".into(),
        center: Point::new(37.5, 127.0),
        radius_m: 500.0,
        seed: 1,
        tick: Duration::from_millis(100),
        shift_on_mean: Duration::ZERO,
        shift_off_mean: Duration::from_secs(1),
        queue_dir: None,
        json: true,
        pickup_codes: None,
    };
    let fleet = courier_agent::fleet::Fleet::start(cfg).unwrap();
    let fleet_codes = fleet.codes();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(fleet.run(async {
        let _ = stop_rx.await;
    }));
    wait_until_async("3 online", || {
        w.all()
            .iter()
            .filter(|m| m.json["state"] == "online")
            .count()
            >= 3
    })
    .await;
    let codes = fleet_codes;
    w.publish(&t.courier_job("f-002"), &offer("c-700"), true)
        .await;
    let r = w
        .wait("an answer", |m| m.topic == t.courier_job_reply("f-002"))
        .await;
    assert_eq!(r.json["action"], "accept");
    // The daemon assigns; the driver hands over the code the kiosk got; the courier
    // collects the parcel with it.
    w.publish(&t.courier_job("f-002"), &assigned("c-700"), true)
        .await;
    codes
        .send(courier_agent::codes::PickupCode {
            call_id: "c-700".into(),
            code: "246810".into(),
        })
        .await
        .unwrap();
    let p = w
        .wait("picked_up with the code", |m| {
            m.topic == t.courier_job_reply("f-002") && m.json["action"] == "picked_up"
        })
        .await;
    assert_eq!(p.json["pickup_code"], "246810");
    assert_eq!(p.json["call_id"], "c-700");
    // The daemon confirms the pickup; the courier completes after the delay.
    let mut picked = assigned("c-700");
    picked["kind"] = json!("picked_up");
    w.publish(&t.courier_job("f-002"), &picked, true).await;
    let c = w
        .wait("completed", |m| {
            m.topic == t.courier_job_reply("f-002") && m.json["action"] == "completed"
        })
        .await;
    assert_eq!(c.json["call_id"], "c-700");
    let _ = stop_tx.send(());
    run.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_stays_queued_and_is_sent_again_until_the_daemon_answers() {
    let broker = Mosquitto::start();
    let t = topics();
    let (tx, mut events) = mpsc::channel(256);
    let mut cfg = agent_config(&broker.url(), "k8", QueueStore::Memory);
    cfg.answer_timeout = Duration::from_millis(200);
    let agent = Agent::spawn(cfg, tx).unwrap();
    agent
        .wait_for(DEADLINE, |s| s.link == LinkState::Online)
        .await
        .unwrap();
    // No daemon listens yet (a broker that has just restarted): the broker takes the
    // reply and drops it.
    let reply = agent
        .send_reply(pickup_protocol::JobReply {
            call_id: "c-880".into(),
            action: pickup_protocol::JobAction::Completed,
            reply_id: None,
            reason: None,
            pickup_code: None,
            at: None,
        })
        .await
        .unwrap();
    let rid = reply.reply_id.clone().unwrap();
    // The daemon subscribes later and sees the reply again, more than once while it
    // does not answer.
    let w = Watcher::start(broker.port, &[t.courier_job_reply("k8")]).await;
    let copies = |w: &Watcher| {
        w.all()
            .iter()
            .filter(|m| m.json["reply_id"] == rid.as_str())
            .count()
    };
    wait_until_async("the reply sent again twice", || copies(&w) >= 2).await;
    for m in w.all() {
        assert_eq!(m.json["at"].as_i64(), reply.at, "the original time");
    }
    assert_eq!(agent.status().queued, 1);
    // "busy" asks for later: still queued, sent again.
    let seen = copies(&w);
    w.publish(
        &t.courier_replies("k8"),
        &json!({"ok": false, "correlation_id": rid, "error": {"code": "busy", "message": "later", "retry_after_ms": 100}}),
        false,
    )
    .await;
    wait_until_async("a copy after busy", || copies(&w) > seen).await;
    assert_eq!(agent.status().queued, 1);
    answer_ok(&w, "k8", &rid).await;
    agent.wait_for(DEADLINE, |s| s.queued == 0).await.unwrap();

    // A definitive refusal also settles a reply (the courier may act again).
    let refused = agent
        .send_reply(pickup_protocol::JobReply {
            call_id: "c-881".into(),
            action: pickup_protocol::JobAction::Completed,
            reply_id: None,
            reason: None,
            pickup_code: None,
            at: None,
        })
        .await
        .unwrap();
    let rid2 = refused.reply_id.clone().unwrap();
    w.wait("the second reply", |m| m.json["reply_id"] == rid2.as_str())
        .await;
    w.publish(
        &t.courier_replies("k8"),
        &json!({"ok": false, "correlation_id": rid2, "error": {"code": "invalid_state", "message": "no"}}),
        false,
    )
    .await;
    agent.wait_for(DEADLINE, |s| s.queued == 0).await.unwrap();

    let mut delivered = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let EventKind::Delivered { reply_id } = ev.kind {
            delivered.push(reply_id);
        }
    }
    assert_eq!(delivered, vec![rid, rid2]);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_code_handed_over_lets_the_policy_pick_up_and_complete() {
    let broker = Mosquitto::start();
    let t = topics();
    let w = Watcher::start(broker.port, &[t.courier_job_reply("k9")]).await;
    let (tx, _events) = mpsc::channel(256);
    let mut cfg = agent_config(&broker.url(), "k9", QueueStore::Memory);
    cfg.policy.auto_answer = true;
    cfg.policy.complete_after = Some(Duration::from_millis(20));
    let agent = Agent::spawn(cfg, tx).unwrap();
    agent
        .wait_for(DEADLINE, |s| s.link == LinkState::Online)
        .await
        .unwrap();
    assert!(agent.provide_code("bad/id", "1").await.is_err());

    // Code after the job.
    w.publish(&t.courier_job("k9"), &assigned("c-900"), true)
        .await;
    agent.wait_for(DEADLINE, |s| s.job.is_some()).await.unwrap();
    agent.provide_code("c-900", "123456").await.unwrap();
    let p = w
        .wait("picked_up c-900", |m| {
            m.json["action"] == "picked_up" && m.json["call_id"] == "c-900"
        })
        .await;
    assert_eq!(p.json["pickup_code"], "123456");
    answer_ok(&w, "k9", p.json["reply_id"].as_str().unwrap()).await;
    let mut picked = assigned("c-900");
    picked["kind"] = json!("picked_up");
    w.publish(&t.courier_job("k9"), &picked, true).await;
    w.wait("completed c-900", |m| {
        m.json["action"] == "completed" && m.json["call_id"] == "c-900"
    })
    .await;

    // Code before the job.
    agent.provide_code("c-901", "654321").await.unwrap();
    w.publish(&t.courier_job("k9"), &assigned("c-901"), true)
        .await;
    let p = w
        .wait("picked_up c-901", |m| {
            m.json["action"] == "picked_up" && m.json["call_id"] == "c-901"
        })
        .await;
    assert_eq!(p.json["pickup_code"], "654321");
    agent.shutdown().await;
}

/// Plays the daemon refusing a reply.
async fn answer_refused(w: &Watcher, cid: &str, reply_id: &str, code: &str) {
    w.publish(
        &topics().courier_replies(cid),
        &json!({"ok": false, "correlation_id": reply_id,
                "error": {"code": code, "message": "refused by the test"}}),
        false,
    )
    .await;
}

/// A pickup the daemon refuses for a wrong code drops the completion the policy armed on
/// top of it, forgets that code (a job message seen again does not try it again), and a
/// new code lets the policy pick up and complete. Before, the armed completion blocked
/// the new code's pickup, then was skipped, and the call stayed open for good.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_automatic_pickup_waits_for_a_new_code_then_completes() {
    let broker = Mosquitto::start();
    let t = topics();
    let w = Watcher::start(broker.port, &[t.courier_job_reply("k10")]).await;
    let (tx, _events) = mpsc::channel(256);
    let mut cfg = agent_config(&broker.url(), "k10", QueueStore::Memory);
    cfg.policy.auto_answer = true;
    // Long enough that the completion armed after the pickup is still waiting when the
    // refusal and the new code arrive.
    cfg.policy.complete_after = Some(Duration::from_secs(2));
    let agent = Agent::spawn(cfg, tx).unwrap();
    agent
        .wait_for(DEADLINE, |s| s.link == LinkState::Online)
        .await
        .unwrap();
    agent.provide_code("c-910", "111111").await.unwrap();
    w.publish(&t.courier_job("k10"), &assigned("c-910"), true)
        .await;
    let picked_up = |m: &Msg| m.json["action"] == "picked_up" && m.json["call_id"] == "c-910";
    let first = w.wait("picked_up c-910", picked_up).await;
    assert_eq!(first.json["pickup_code"], "111111");
    let first_id = first.json["reply_id"].as_str().unwrap().to_string();
    answer_refused(&w, "k10", &first_id, "wrong_code").await;
    agent.wait_for(DEADLINE, |s| s.queued == 0).await.unwrap();
    // The daemon sends the job again (as it does when a handheld comes back online):
    // the refused code is not tried again. Then the courier gets the right code.
    w.publish(&t.courier_job("k10"), &assigned("c-910"), true)
        .await;
    agent.wait_for(DEADLINE, |s| s.job.is_some()).await.unwrap();
    agent.provide_code("c-910", "222222").await.unwrap();
    let second = w
        .wait("picked_up c-910 with the new code", |m| {
            picked_up(m) && m.json["reply_id"] != first_id.as_str()
        })
        .await;
    assert_eq!(second.json["pickup_code"], "222222");
    answer_ok(&w, "k10", second.json["reply_id"].as_str().unwrap()).await;
    let mut picked = assigned("c-910");
    picked["kind"] = json!("picked_up");
    w.publish(&t.courier_job("k10"), &picked, true).await;
    w.wait("completed c-910", |m| {
        m.json["action"] == "completed" && m.json["call_id"] == "c-910"
    })
    .await;
    // Two pickups in all: the refused one and the one with the new code.
    assert_eq!(w.all().iter().filter(|m| picked_up(m)).count(), 2);
    agent.shutdown().await;
}
