//! Hostile input against the running daemon: thousands of random and mutated payloads on
//! every topic it subscribes to, from several clients, without waiting for answers. Then
//! the daemon must still answer, the broker must still accept connections, answers must
//! have gone only to reply topics, and the database must be consistent.

use pickup_protocol::client::Version;
use pickup_protocol::Topics;
use serde_json::{json, Value};

use super::*;

/// xorshift64*: reproducible without a dependency; the seed is printed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// A JSON value of a random shape (type confusion, extremes, nesting).
fn odd_value(r: &mut Rng) -> Value {
    match r.below(14) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(1e308),
        4 => json!(u64::MAX),
        5 => json!(i64::MIN),
        6 => json!("NaN"),
        7 => json!(""),
        8 => json!("x".repeat(r.below(5000))),
        9 => json!(["a", 1, null]),
        10 => json!({"lat": 91, "lon": "0"}),
        11 => json!("010-1234-5678\u{0}\u{202e}"),
        12 => json!(r.next() as f64 / 3.0),
        _ => json!("../../#/+"),
    }
}

/// Flips, cuts, inserts and replaces bytes of `base`.
fn mutate_bytes(r: &mut Rng, mut b: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + r.below(6) {
        if b.is_empty() {
            b.push(r.next() as u8);
            continue;
        }
        let i = r.below(b.len());
        match r.below(5) {
            0 => b[i] ^= 1 << r.below(8),
            1 => b.truncate(i),
            2 => b.insert(i, *r.pick(b"{}[]\",:\\0-e.")),
            3 => b[i] = r.next() as u8,
            _ => {
                let n = r.below(b.len() - i + 1);
                let chunk = b[i..i + n].to_vec();
                b.splice(i..i, chunk);
            }
        }
    }
    b
}

/// A payload for `kind`: valid-ish, then mutated in one of several ways.
fn payload(r: &mut Rng, kind: usize, calls: &[String], t: &Topics) -> Vec<u8> {
    let call = r.pick(calls).clone();
    let mut v = match kind {
        0 => json!({"request_id": format!("h{}", r.next() % 50), "tel": "010-1234-5678",
                    "location": {"lat": 37.5, "lon": 127.0}, "parcel": {"class": "light"}}),
        1 => json!({"reason": "hostile"}),
        2 => json!({}),
        3 => {
            json!({"state": "online", "available": true, "vehicle": "car", "tel": "010-5555-0000"})
        }
        4 => json!({"lat": 37.5, "lon": 127.0, "at": 1}),
        _ => {
            json!({"call_id": call, "action": *r.pick(&["accept", "decline", "picked_up", "completed"]),
                    "pickup_code": format!("{:06}", r.next() % 1_000_000), "reply_id": format!("r{}", r.next() % 20)})
        }
    };
    if r.chance(30) {
        let reply_to = r
            .pick(&[
                t.courier_job("c1"),
                t.call_state(&call),
                t.notifications(),
                t.daemon_state(),
                format!("{}/kiosks/+/replies", t.prefix()),
                "#".to_string(),
                t.kiosk_replies("hk"),
                "x".repeat(300),
            ])
            .clone();
        v["reply_to"] = json!(reply_to);
        v["correlation_id"] = odd_value(r);
    }
    match r.below(6) {
        0 => v.to_string().into_bytes(),
        1 => {
            // Replace or add a field with an odd value.
            let keys = [
                "request_id",
                "tel",
                "location",
                "parcel",
                "state",
                "lat",
                "lon",
                "call_id",
                "action",
                "at",
                "vehicle",
                "zzz",
            ];
            v[*r.pick(&keys)] = odd_value(r);
            v.to_string().into_bytes()
        }
        2 => mutate_bytes(r, v.to_string().into_bytes()),
        3 => (0..r.below(300)).map(|_| r.next() as u8).collect(),
        4 => {
            let depth = 50 + r.below(5000);
            let mut s = "[".repeat(depth);
            s.push_str(&"]".repeat(r.below(depth + 1)));
            s.into_bytes()
        }
        _ => {
            if r.chance(10) {
                // Near the broker's packet limit (64 KiB) but over the daemon's 16 KiB.
                let mut big = v.clone();
                big["pad"] = json!("p".repeat(20_000 + r.below(40_000)));
                big.to_string().into_bytes()
            } else {
                Vec::new()
            }
        }
    }
}

fn topic(r: &mut Rng, kind: usize, calls: &[String], t: &Topics) -> String {
    let id = match r.below(4) {
        0 => r.pick(calls).clone(),
        1 => format!("h{}", r.next() % 40),
        2 => "a b\u{e9}\u{1f600}".to_string(),
        _ => "x".repeat(1 + r.below(100)),
    };
    let cid = if r.chance(50) {
        "c1".to_string()
    } else {
        id.clone()
    };
    match kind {
        0 => t.calls_create(),
        1 => t.call_cancel(&id),
        2 => t.call_get(&id),
        3 => t.courier_presence(&cid),
        4 => t.courier_location(&cid),
        _ => t.courier_job_reply(&cid),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_hostile_payloads_leave_the_daemon_answering_and_consistent() {
    const MESSAGES: usize = 4000;
    let seed = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("hostile input seed: {seed} (HOSTILE_SEED={seed} repeats this run)");
    let mut r = Rng(seed);

    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let t = Topics::new("test").unwrap();
    let (seen, _w) = watch(addr, vec![format!("{}/#", t.prefix())]).await;

    let courier = TestCourier::online(addr, "test", "c1", "car", 37.5, 127.0).await;
    let kiosk = Kiosk::connect(addr, "test", "k1", Version::V4).await;
    let mut calls = Vec::new();
    for i in 0..3 {
        let a = kiosk.create(kiosk.call_body(&format!("ok-{i}"))).await;
        calls.push(a["call"]["call_id"].as_str().unwrap().to_string());
    }

    // Several hostile clients at once; they do not wait for anything.
    let mut senders = Vec::new();
    for n in 0..3 {
        senders.push(
            Dev::connect(addr, &format!("hostile-{n}"), None)
                .await
                .unwrap(),
        );
    }
    let mut sent = 0;
    for i in 0..MESSAGES {
        let kind = r.below(6);
        let topic = topic(&mut r, kind, &calls, &t);
        let body = payload(&mut r, kind, &calls, &t);
        let retain = r.chance(5);
        let dev = &senders[i % senders.len()];
        let qos = if r.chance(50) {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        if dev.client.publish(topic, qos, retain, body).await.is_ok() {
            sent += 1;
        }
    }
    eprintln!("sent {sent} hostile messages");
    // Every sender's last message has passed the broker before the checks start.
    for (n, dev) in senders.iter().enumerate() {
        dev.publish(&t.call_get(&format!("end-{n}")), false, "{}")
            .await;
    }
    for n in 0..senders.len() {
        let seen = seen.clone();
        let topic = t.call_get(&format!("end-{n}"));
        wait_until("the storm to pass the broker", || {
            let seen = seen.clone();
            let topic = topic.clone();
            async move { !seen.on(&topic).is_empty() }
        })
        .await;
    }

    // The daemon still answers: a fresh valid call (retrying while it sheds load).
    let end = Instant::now() + DEADLINE;
    let answer = loop {
        let a = kiosk.create(kiosk.call_body("after-storm")).await;
        if a["ok"] == true {
            break a;
        }
        assert_eq!(a["error"]["code"], "busy", "{a}");
        assert!(Instant::now() < end, "still busy after the storm");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let id = answer["call"]["call_id"].as_str().unwrap();
    assert_eq!(kiosk.get(id).await["ok"], true);
    for c in &calls {
        assert_eq!(kiosk.get(c).await["ok"], true);
    }
    // The broker still takes new connections and the hostile clients' limits held.
    d.broker
        .as_ref()
        .unwrap()
        .probe(Duration::from_secs(2))
        .await
        .expect("broker listeners answer");
    assert!(d.mqtt.connected.load(Ordering::Relaxed));
    let rejected = d.mqtt.rejected.load(Ordering::Relaxed);
    eprintln!("daemon rejected {rejected} messages");
    assert!(rejected > 100, "bad messages were not counted");

    // Answers went to reply topics only: never onto state, job or notification topics.
    for m in seen.all() {
        let text = String::from_utf8_lossy(&m.payload);
        if text.starts_with("{\"ok\"") || text.contains("\"error\":{\"code\"") {
            assert!(
                m.topic.ends_with("/replies"),
                "an answer was published on {}: {text}",
                m.topic
            );
        }
    }

    // The database is consistent.
    d.shutdown(DEADLINE).await.unwrap();
    let conn = open_db(&db);
    let q = |sql: &str| -> i64 { conn.query_row(sql, [], |row| row.get(0)).unwrap() };
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    assert_eq!(q("SELECT COUNT(*) FROM calls c LEFT JOIN assignments a ON a.call_id = c.id WHERE a.call_id IS NULL"), 0, "a call without its assignment row");
    assert_eq!(
        q("SELECT COUNT(*) FROM (SELECT courier_id FROM assignments WHERE state IN ('offered','assigned','picked_up') GROUP BY courier_id HAVING COUNT(*) > 1)"),
        0,
        "a courier with two active jobs"
    );
    assert_eq!(
        q(
            "SELECT COUNT(*) FROM calls c JOIN assignments a ON a.call_id = c.id WHERE NOT (
             (c.status IN ('requested','dispatching') AND a.state IN ('pending','offered'))
          OR (c.status = 'assigned' AND a.state = 'assigned')
          OR (c.status = 'picked_up' AND a.state = 'picked_up')
          OR (c.status = 'completed' AND a.state = 'done')
          OR (c.status = 'cancelled' AND a.state = 'cancelled')
          OR (c.status = 'failed' AND a.state = 'failed'))"
        ),
        0,
        "call status and assignment state disagree"
    );
    assert!(q("SELECT COUNT(*) FROM calls") >= 4);
    drop(courier);
}
