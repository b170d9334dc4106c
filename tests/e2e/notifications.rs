//! Customer notifications through both sinks: the HTTP webhook against a real local HTTP
//! server that refuses, fails, hangs and then answers; dead letters and their re-drive with
//! the real `pickupctl`; a restart in the middle of retrying; and the reference Python relay
//! on the MQTT topic.

use std::collections::{HashMap, VecDeque};
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pickup_e2e::*;
use pickup_protocol::client::Version;
use pickup_protocol::{JobKind, Topics};
use pickupd::config::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

// ------------------------------------------------------------------ the test webhook

/// What the test webhook does with one request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Act {
    /// Answer with this status.
    Status(u16),
    /// Read the request and never answer.
    Hang,
}

/// One request the webhook received.
#[derive(Debug, Clone)]
struct Hit {
    /// Notification id from the `Idempotency-Key` header.
    key: String,
    /// `X-Pickup-Attempt`.
    attempt: u32,
    /// The parsed body.
    body: Value,
    /// The answer given (`None`: none, it hung).
    status: Option<u16>,
}

#[derive(Default)]
struct HookState {
    script: VecDeque<Act>,
    default: Option<Act>,
    hits: Vec<Hit>,
}

/// A real HTTP/1.1 server on a loopback port the OS chose. It starts bound but not
/// listening, so connections are refused until [`Hook::listen`].
struct Hook {
    addr: SocketAddr,
    socket: Option<TcpSocket>,
    state: Arc<Mutex<HookState>>,
}

impl Hook {
    fn bound() -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        Self {
            addr,
            socket: Some(socket),
            state: Arc::new(Mutex::new(HookState {
                default: Some(Act::Status(200)),
                ..HookState::default()
            })),
        }
    }

    fn listening(default: Act) -> Self {
        let mut h = Self::bound();
        h.set_default(default);
        h.listen();
        h
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The next requests get these answers, in order; later ones the default.
    fn then(&self, acts: &[Act]) {
        self.state
            .lock()
            .unwrap()
            .script
            .extend(acts.iter().copied());
    }

    fn set_default(&self, act: Act) {
        self.state.lock().unwrap().default = Some(act);
    }

    fn hits(&self) -> Vec<Hit> {
        self.state.lock().unwrap().hits.clone()
    }

    /// Requests for `key` answered 2xx.
    fn acked(&self, key: &str) -> usize {
        self.hits()
            .iter()
            .filter(|h| h.key == key && h.status.is_some_and(|s| (200..300).contains(&s)))
            .count()
    }

    fn listen(&mut self) {
        let listener = self.socket.take().expect("listen once").listen(64).unwrap();
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, state.clone()));
            }
        });
    }
}

async fn serve(mut stream: TcpStream, state: Arc<Mutex<HookState>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    assert!(head.starts_with("POST /hook HTTP/1.1\r\n"), "{head}");
    assert_eq!(header("content-type"), "application/json");
    let len: usize = header("content-length").parse().unwrap();
    while buf.len() < head_end + len {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body: Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap();
    let act = {
        let mut s = state.lock().unwrap();
        let act = s
            .script
            .pop_front()
            .or(s.default)
            .unwrap_or(Act::Status(200));
        s.hits.push(Hit {
            key: header("idempotency-key"),
            attempt: header("x-pickup-attempt").parse().unwrap_or(0),
            body,
            status: match act {
                Act::Status(c) => Some(c),
                Act::Hang => None,
            },
        });
        act
    };
    match act {
        Act::Status(code) => {
            let text = if code < 300 { "ok" } else { "relay unhappy" };
            let resp = format!(
                "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
        Act::Hang => {
            // Hold the connection open without answering, until the test ends.
            std::future::pending::<()>().await;
            drop(stream);
        }
    }
}

// ------------------------------------------------------------------ helpers

/// A test daemon whose webhook points at `url`, with short timeouts and backoff.
fn hook_config(dir: &Path, url: &str) -> Config {
    let mut c = test_config(dir);
    let w = &mut c.notifications.webhook;
    w.url = url.to_string();
    w.connect_timeout_ms = 1_000;
    w.timeout_ms = 300;
    w.backoff_base_ms = 20;
    w.backoff_max_ms = 200;
    w.max_attempts = 1_000;
    w.rescan_ms = 100;
    w.breaker.consecutive_failures = 3;
    w.breaker.open_ms = 50;
    w.breaker.max_open_ms = Some(200);
    c.validate().unwrap();
    c
}

/// A delivery row as the database has it.
#[derive(Debug, Clone)]
struct Row {
    id: String,
    call_id: String,
    state: String,
    attempts: i64,
    last_error: Option<String>,
}

fn rows(db: &Path) -> Vec<Row> {
    let c = open_db(db);
    let mut st = c
        .prepare("SELECT id, call_id, state, attempts, last_error FROM deliveries ORDER BY seq")
        .unwrap();
    st.query_map([], |r| {
        Ok(Row {
            id: r.get(0)?,
            call_id: r.get(1)?,
            state: r.get(2)?,
            attempts: r.get(3)?,
            last_error: r.get(4)?,
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

fn row(db: &Path, id: &str) -> Option<Row> {
    rows(db).into_iter().find(|r| r.id == id)
}

async fn wait_row(db: &Path, what: &str, cond: impl Fn(&[Row]) -> bool) {
    wait_until(what, || {
        let ok = cond(&rows(db));
        async move { ok }
    })
    .await;
}

async fn courier_known(db: &Path, id: &str) {
    let (db, id) = (db.to_path_buf(), id.to_string());
    wait_until(&format!("courier {id} known"), || {
        let n: i64 = open_db(&db)
            .query_row(
                "SELECT count(*) FROM couriers WHERE id = ?1 AND online = 1 AND body LIKE '%\"lat\":%'",
                [&id],
                |r| r.get(0),
            )
            .unwrap_or(0);
        async move { n == 1 }
    })
    .await;
}

/// Position of the first hit for `key` in `hits`, or of its 2xx answer.
fn first(hits: &[Hit], key: &str, acked: bool) -> usize {
    hits.iter()
        .position(|h| h.key == key && (!acked || h.status.is_some_and(|s| (200..300).contains(&s))))
        .unwrap_or_else(|| panic!("no hit for {key}"))
}

// ------------------------------------------------------------------ webhook tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_retries_through_failures_and_delivers_each_once_in_call_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut hook = Hook::bound();
    let cfg = hook_config(dir.path(), &hook.url());
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let topics = Topics::new("test").unwrap();
    let (seen, _w) = watch(addr, vec![topics.notifications()]).await;

    // Call a: accepted, assigned. Call b arrives while the only courier is busy, and is
    // cancelled: accepted, cancelled.
    let courier = TestCourier::online(addr, "test", "k1", "car", 37.501, 127.0).await;
    courier_known(&db, "k1").await;
    let kiosk = Kiosk::connect(addr, "test", "kiosk-1", Version::V4).await;
    let a = kiosk.create(kiosk.call_body("req-a")).await;
    let a = a["call"]["call_id"].as_str().unwrap().to_string();
    courier.wait_job(JobKind::Assigned, &a).await;
    let b = kiosk.create(kiosk.call_body("req-b")).await;
    let b = b["call"]["call_id"].as_str().unwrap().to_string();
    assert_eq!(kiosk.cancel(&b).await["ok"], true);
    let ids = [
        format!("{a}-1"),
        format!("{a}-2"),
        format!("{b}-1"),
        format!("{b}-2"),
    ];

    // Connection refused: the first notification of each call is retried; the second of
    // each call waits behind it.
    wait_row(&db, "retries against a refusing webhook", |rs| {
        [&ids[0], &ids[2]].iter().all(|id| {
            rs.iter().any(|r| {
                &&r.id == id
                    && r.state == "pending"
                    && r.attempts >= 2
                    && r.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("refused"))
            })
        })
    })
    .await;
    for id in [&ids[1], &ids[3]] {
        let r = row(&db, id).unwrap();
        assert_eq!(
            (r.state.as_str(), r.attempts),
            ("pending", 0),
            "{id} waits its turn"
        );
    }

    // Up, but the next two requests get a 500 and no answer at all; then 200s.
    hook.then(&[Act::Status(500), Act::Hang]);
    hook.listen();
    wait_row(&db, "every notification delivered", |rs| {
        rs.len() == 4 && rs.iter().all(|r| r.state == "delivered")
    })
    .await;

    let hits = hook.hits();
    assert_eq!(hits[0].status, Some(500));
    assert_eq!(hits[1].status, None);
    for id in &ids {
        assert_eq!(hook.acked(id), 1, "{id} acknowledged exactly once");
        // Each request for a notification is a new attempt, numbered upwards.
        let attempts: Vec<u32> = hits
            .iter()
            .filter(|h| &h.key == id)
            .map(|h| h.attempt)
            .collect();
        assert!(
            attempts.windows(2).all(|w| w[0] < w[1]),
            "{id}: {attempts:?}"
        );
        assert_eq!(
            row(&db, id).unwrap().attempts,
            i64::from(*attempts.last().unwrap())
        );
    }
    // Per call, the later notification is first sent only after the earlier one is in.
    assert!(first(&hits, &ids[1], false) > first(&hits, &ids[0], true));
    assert!(first(&hits, &ids[3], false) > first(&hits, &ids[2], true));
    // The hung request's notification remembers why it needed another attempt.
    let hung = &hits[1].key;
    let r = row(&db, hung).unwrap();
    assert!(
        r.last_error
            .as_deref()
            .unwrap()
            .contains("no answer within 300 ms"),
        "{r:?}"
    );
    // The body is the notification, as on MQTT: full number, text, variables.
    let ok = &hits[first(&hits, &ids[1], true)].body;
    assert_eq!(ok["id"], ids[1].as_str());
    assert_eq!(ok["call_id"], a.as_str());
    assert_eq!(ok["template"], "call.assigned");
    assert_eq!(ok["tel"], "010-1234-5678");
    assert_eq!(ok["vars"]["courier_id"], "k1");
    assert!(ok["text"].as_str().unwrap().contains("Courier k1"));
    let cancelled = &hits[first(&hits, &ids[3], true)].body;
    assert_eq!(cancelled["template"], "call.cancelled");
    assert_eq!(cancelled["vars"]["by"], "customer");

    // The MQTT sink carried the same notifications.
    wait_until("notifications on MQTT", || async {
        seen.on(&topics.notifications()).len() >= 4
    })
    .await;
    let mut mqtt_ids: Vec<String> = seen
        .on(&topics.notifications())
        .iter()
        .map(|m| {
            serde_json::from_slice::<Value>(&m.payload).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    mqtt_ids.sort();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(mqtt_ids, want);
    d.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Runs the real `pickupctl` and returns (success, stdout, stderr).
fn pickupctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(workspace_bin("pickupctl"))
        .args(args)
        .env_remove("PICKUPD__STORE__PATH")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_dead_letters_after_the_limit_and_pickupctl_re_drives() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Hook::listening(Act::Status(503));
    let mut cfg = hook_config(dir.path(), &hook.url());
    cfg.notifications.webhook.max_attempts = 3;
    cfg.notifications.webhook.breaker.consecutive_failures = 1_000;
    let db = cfg.store.path.clone();
    let dbs = db.to_str().unwrap().to_string();
    let d = start_daemon(cfg).await;
    let kiosk = Kiosk::connect(d.broker_addr, "test", "kiosk-1", Version::V4).await;

    // No courier: accepted, then cancelled. Both fail three times and are dead-lettered,
    // the second only after the first.
    let a = kiosk.create(kiosk.call_body("req-a")).await;
    let a = a["call"]["call_id"].as_str().unwrap().to_string();
    assert_eq!(kiosk.cancel(&a).await["ok"], true);
    let (a1, a2) = (format!("{a}-1"), format!("{a}-2"));
    wait_row(&db, "both dead", |rs| {
        rs.len() == 2 && rs.iter().all(|r| r.state == "dead")
    })
    .await;
    let hits = hook.hits();
    let keys: Vec<&str> = hits.iter().map(|h| h.key.as_str()).collect();
    assert_eq!(keys, [&a1, &a1, &a1, &a2, &a2, &a2]);
    for id in [&a1, &a2] {
        let r = row(&db, id).unwrap();
        assert_eq!(r.attempts, 3);
        assert!(
            r.last_error
                .as_deref()
                .unwrap()
                .starts_with("gave up after 3 attempts: HTTP 503: relay unhappy"),
            "{r:?}"
        );
    }

    // The operator sees them…
    let (ok, out, err) = pickupctl(&["notifications", "--db", &dbs, "--failed", "--json"]);
    assert!(ok, "{err}");
    let listed: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut ids: Vec<&str> = listed.iter().map(|v| v["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, [a1.as_str(), a2.as_str()]);
    assert!(listed
        .iter()
        .all(|v| v["state"] == "dead" && v["attempts"] == 3));
    let (ok, out, _) = pickupctl(&["notifications", "--db", &dbs]);
    assert!(ok);
    assert!(
        out.contains(&format!("{a1} dead call.accepted attempts=3")),
        "{out}"
    );

    // …and, once the relay is fixed, re-drives them while the daemon runs.
    hook.set_default(Act::Status(200));
    let (ok, out, err) = pickupctl(&["notifications", "--db", &dbs, "--retry", &a1]);
    assert!(ok, "{err}");
    assert!(out.contains("re-driven"), "{out}");
    wait_row(&db, "re-driven notification delivered", |rs| {
        rs.iter().any(|r| r.id == a1 && r.state == "delivered")
    })
    .await;
    let (ok, _, err) = pickupctl(&["notifications", "--db", &dbs, "--retry", &a2]);
    assert!(ok, "{err}");
    wait_row(&db, "second re-driven notification delivered", |rs| {
        rs.iter().any(|r| r.id == a2 && r.state == "delivered")
    })
    .await;
    assert_eq!((hook.acked(&a1), hook.acked(&a2)), (1, 1));
    let (ok, _, err) = pickupctl(&["notifications", "--db", &dbs, "--retry", &a2]);
    assert!(!ok && err.contains("only dead deliveries"), "{err}");
    let (ok, _, err) = pickupctl(&["notifications", "--db", &dbs, "--retry", "nope-1"]);
    assert!(!ok && err.contains("no delivery with id nope-1"), "{err}");

    // A receiver that refuses the payload (400) dead-letters it at once; the call's next
    // notification then goes through.
    hook.then(&[Act::Status(400)]);
    let c = kiosk.create(kiosk.call_body("req-c")).await;
    let c = c["call"]["call_id"].as_str().unwrap().to_string();
    assert_eq!(kiosk.cancel(&c).await["ok"], true);
    wait_row(&db, "refused one dead, next delivered", |rs| {
        rs.iter()
            .any(|r| r.id == format!("{c}-1") && r.state == "dead")
            && rs
                .iter()
                .any(|r| r.id == format!("{c}-2") && r.state == "delivered")
    })
    .await;
    let r = row(&db, &format!("{c}-1")).unwrap();
    assert_eq!(r.attempts, 1);
    assert_eq!(
        r.last_error.as_deref(),
        Some("refused by the webhook: HTTP 400: relay unhappy")
    );
    assert_eq!(r.call_id, c);
    d.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_delivery_resumes_after_a_restart_mid_retry() {
    let dir = tempfile::tempdir().unwrap();
    let mut hook = Hook::bound();
    let cfg = hook_config(dir.path(), &hook.url());
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg.clone()).await;
    let kiosk = Kiosk::connect(d.broker_addr, "test", "kiosk-1", Version::V4).await;
    let a = kiosk.create(kiosk.call_body("req-a")).await;
    let a = a["call"]["call_id"].as_str().unwrap().to_string();
    assert_eq!(kiosk.cancel(&a).await["ok"], true);
    let (a1, a2) = (format!("{a}-1"), format!("{a}-2"));
    wait_row(&db, "retrying", |rs| {
        rs.iter().any(|r| r.id == a1 && r.attempts >= 2)
    })
    .await;
    drop(kiosk);
    d.shutdown(Duration::from_secs(10)).await.unwrap();
    let before = rows(&db);
    assert!(before.iter().all(|r| r.state == "pending"), "{before:?}");
    let tried = before.iter().find(|r| r.id == a1).unwrap().attempts;

    // The relay comes back while the daemon is down; the restarted daemon resumes from
    // the stored attempt counts and delivers both, in order.
    hook.listen();
    let d = start_daemon(cfg).await;
    wait_row(&db, "delivered after the restart", |rs| {
        rs.len() == 2 && rs.iter().all(|r| r.state == "delivered")
    })
    .await;
    let hits = hook.hits();
    let keys: Vec<&str> = hits.iter().map(|h| h.key.as_str()).collect();
    assert_eq!(keys, [&a1, &a2]);
    assert_eq!(
        i64::from(hits[0].attempt),
        tried + 1,
        "attempt count survived"
    );
    assert_eq!(row(&db, &a1).unwrap().attempts, tried + 1);
    d.shutdown(Duration::from_secs(10)).await.unwrap();
}

// ------------------------------------------------------------------ the Python relay

/// A Python 3 that has paho-mqtt (Debian's python3-paho-mqtt lives in /usr/bin/python3).
fn python_with_paho() -> PathBuf {
    for p in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(p)
            .args(["-c", "import paho.mqtt.client"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return PathBuf::from(p);
        }
    }
    panic!("the relay test needs Python 3 with paho-mqtt: apt-get install -y python3-paho-mqtt (or pip install paho-mqtt)");
}

/// The reference relay as a child process; its stdout lines (notifications) and stderr
/// lines (its log) are collected. Killed on drop.
struct Relay {
    child: Child,
    out: Arc<Mutex<Vec<Value>>>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Relay {
    async fn start(addr: SocketAddr, seen_file: &Path) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/relay/relay.py");
        let mut child = Command::new(python_with_paho())
            .arg(script)
            .args([
                "--host",
                &addr.ip().to_string(),
                "--port",
                &addr.port().to_string(),
            ])
            .args(["--site", "test", "--client-id", "relay-e2e"])
            .arg("--seen-file")
            .arg(seen_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out: Arc<Mutex<Vec<Value>>> = Arc::default();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (o, l) = (out.clone(), log.clone());
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                o.lock().unwrap().push(serde_json::from_str(&line).unwrap());
            }
        });
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                l.lock().unwrap().push(line);
            }
        });
        let r = Self { child, out, log };
        let log = r.log.clone();
        wait_until("relay subscribed", || {
            let ok = log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("subscribed to"));
            async move { ok }
        })
        .await;
        r
    }

    fn ids(&self) -> Vec<String> {
        self.out
            .lock()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_relay_gets_every_notification_in_call_order_across_its_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let seen_file = dir.path().join("relay-seen.txt");
    let mut relay = Relay::start(addr, &seen_file).await;

    let courier = TestCourier::online(addr, "test", "k1", "van", 37.501, 127.0).await;
    courier_known(&db, "k1").await;
    let kiosk = Kiosk::connect(addr, "test", "kiosk-1", Version::V4).await;
    let a = kiosk.create(kiosk.call_body("req-a")).await;
    let code = a["pickup_code"].as_str().unwrap().to_string();
    let a = a["call"]["call_id"].as_str().unwrap().to_string();
    courier.wait_job(JobKind::Assigned, &a).await;
    let b = kiosk.create(kiosk.call_body("req-b")).await;
    let b = b["call"]["call_id"].as_str().unwrap().to_string();
    assert_eq!(kiosk.cancel(&b).await["ok"], true);
    // Wait until the relay has recorded the cancellation as handled: killing it between
    // printing and recording would make it print that one again after the restart (its
    // at-least-once window), which this test is not about.
    let (sf, rb, out) = (seen_file.clone(), format!("{b}-2"), relay.out.clone());
    wait_until("relay printed and recorded the cancellation", || {
        let ok = out.lock().unwrap().iter().any(|v| v["id"] == rb.as_str())
            && std::fs::read_to_string(&sf).is_ok_and(|s| s.lines().any(|l| l == rb));
        async move { ok }
    })
    .await;

    // The relay goes away; the call goes on. Its persistent session keeps what follows.
    let before = relay.ids();
    drop(relay);
    let r = courier
        .reply(json!({"call_id": a, "action": "picked_up", "pickup_code": code}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let r = courier
        .reply(json!({"call_id": a, "action": "completed"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    wait_until("completion notification in the outbox and acknowledged", || {
        let n: i64 = open_db(&db)
            .query_row(
                "SELECT count(*) FROM outbox WHERE topic LIKE '%/notifications' AND sent_at IS NULL",
                [],
                |r| r.get(0),
            )
            .unwrap_or(1);
        let total: i64 = open_db(&db)
            .query_row(
                "SELECT count(*) FROM outbox WHERE topic LIKE '%/notifications'",
                [],
                |r| r.get(0),
            )
            .unwrap_or(0);
        async move { n == 0 && total == 6 }
    })
    .await;

    relay = Relay::start(addr, &seen_file).await;
    let (out, last) = (relay.out.clone(), format!("{a}-4"));
    wait_until("relay printed what was published while it was away", || {
        let ok = out.lock().unwrap().iter().any(|v| v["id"] == last.as_str());
        async move { ok }
    })
    .await;
    // A repeat of an old notification, then a marker: the repeat must be dropped.
    let topics = Topics::new("test").unwrap();
    let old = json!({"id": format!("{a}-1"), "call_id": a, "template": "call.accepted",
                     "tel": "010-1234-5678", "text": "again", "vars": {}, "at": 1});
    let marker = json!({"id": "marker-1", "call_id": "marker", "template": "call.accepted",
                        "tel": "", "text": "", "vars": {}, "at": 1});
    for m in [&old, &marker] {
        kiosk
            .req
            .link()
            .publish(
                &topics.notifications(),
                true,
                false,
                serde_json::to_vec(m).unwrap(),
                None,
            )
            .await
            .unwrap();
    }
    let out = relay.out.clone();
    wait_until("relay printed the marker", || {
        let ok = out.lock().unwrap().iter().any(|v| v["id"] == "marker-1");
        async move { ok }
    })
    .await;

    let mut all = before;
    all.extend(relay.ids());
    let of = |call: &str| -> Vec<String> {
        all.iter()
            .filter(|id| id.rsplit_once('-').is_some_and(|(c, _)| c == call))
            .cloned()
            .collect()
    };
    assert_eq!(
        of(&a),
        (1..=4).map(|n| format!("{a}-{n}")).collect::<Vec<_>>(),
        "every notification of the call once, in order: {all:?}"
    );
    assert_eq!(of(&b), [format!("{b}-1"), format!("{b}-2")]);
    assert!(relay
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains(&format!("duplicate {a}-1 dropped"))));
    let texts: HashMap<String, String> = relay
        .out
        .lock()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["template"].as_str().unwrap().to_string(),
                v["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(texts["call.completed"].contains("배송"), "{texts:?}");
    d.shutdown(Duration::from_secs(10)).await.unwrap();
}
