//! Couriers who come and go, decline, lose signal or get killed: offers with a timeout,
//! declines, last wills, the grace period, offline replay, pickup codes, and a simulated
//! fleet of 200 under a stream of calls. Real parts throughout: the daemon with its
//! embedded broker, the SQLite file, the courier agent library, and the `courier-agent`
//! binary as a process wherever a process gets killed.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier_agent::agent::now_ms;
use courier_agent::{Agent, AgentConfig, AgentEvent, EventKind, LinkState, Point, QueueStore};
use pickup_e2e::*;
use pickup_protocol::client::Version;
use pickup_protocol::{Job, JobKind, JobReply, Topics, Vehicle};
use pickupd::config::Config;
use pickupd::dispatch::Mode;
use serde_json::{json, Value};
use tokio::sync::mpsc;

// ------------------------------------------------------------------ fixtures

fn offer_config(dir: &Path, offer_timeout_s: u64) -> Config {
    let mut c = test_config(dir);
    c.dispatch.mode = Mode::Offer;
    c.dispatch.offer_timeout_s = offer_timeout_s;
    c
}

/// One row of the daemon's audit trail.
#[derive(Debug, Clone)]
struct Ev {
    call: Option<String>,
    courier: Option<String>,
    kind: String,
    at: i64,
    recorded_at: i64,
    data: Value,
}

/// Every event row, in commit order.
fn events(db: &Path) -> Vec<Ev> {
    let c = open_db(db);
    let mut st = c
        .prepare("SELECT call_id, courier_id, kind, at, recorded_at, data FROM events ORDER BY id")
        .unwrap();
    st.query_map([], |r| {
        Ok(Ev {
            call: r.get(0)?,
            courier: r.get(1)?,
            kind: r.get(2)?,
            at: r.get(3)?,
            recorded_at: r.get(4)?,
            data: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or(Value::Null),
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

fn call_events(db: &Path, call: &str) -> Vec<Ev> {
    events(db)
        .into_iter()
        .filter(|e| e.call.as_deref() == Some(call))
        .collect()
}

/// `(kind, courier)` of a call's events whose kind is in `kinds`.
fn trail(db: &Path, call: &str, kinds: &[&str]) -> Vec<(String, String)> {
    call_events(db, call)
        .into_iter()
        .filter(|e| kinds.contains(&e.kind.as_str()))
        .map(|e| (e.kind, e.courier.unwrap_or_default()))
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Waits until the daemon has stored courier `id` online with a position.
async fn courier_known(db: &Path, id: &str) {
    let db = db.to_path_buf();
    let id = id.to_string();
    wait_until(&format!("courier {id} known"), || {
        let (db, id) = (db.clone(), id.clone());
        async move {
            open_db(&db)
                .query_row(
                    "SELECT count(*) FROM couriers WHERE id = ?1 AND online = 1 AND body LIKE '%\"lat\":%'",
                    [&id],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n == 1)
                .unwrap_or(false)
        }
    })
    .await;
}

/// Waits until the call's events satisfy `pred`.
async fn wait_trail(db: &Path, call: &str, what: &str, pred: impl Fn(&[Ev]) -> bool) {
    let end = Instant::now() + DEADLINE;
    loop {
        let evs = call_events(db, call);
        if pred(&evs) {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}; events: {:?}",
            evs.iter()
                .map(|e| format!("{}:{}", e.kind, e.courier.as_deref().unwrap_or("-")))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn agent_config(addr: SocketAddr, id: &str, vehicle: Vehicle, lat: f64, lon: f64) -> AgentConfig {
    let mut c = AgentConfig::new(url(addr), "test", id, vehicle, Point::new(lat, lon));
    c.name = Some(format!("Courier {id}"));
    c.tel = Some("010-5555-0000".into());
    c.queue = QueueStore::Memory;
    c.reconnect_min = Duration::from_millis(20);
    c.reconnect_max = Duration::from_millis(200);
    c.answer_timeout = Duration::from_millis(1_000);
    c
}

/// A courier agent in this process, with every event it reports kept for assertions.
struct Handheld {
    agent: Agent,
    events: Arc<Mutex<Vec<AgentEvent>>>,
}

impl Handheld {
    /// Starts the agent and waits until it is online.
    async fn start(cfg: AgentConfig) -> Self {
        let (tx, mut rx) = mpsc::channel(1024);
        let agent = Agent::spawn(cfg, tx).unwrap();
        let events: Arc<Mutex<Vec<AgentEvent>>> = Arc::default();
        let e = events.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                e.lock().unwrap().push(ev);
            }
        });
        agent
            .wait_for(DEADLINE, |s| s.link == LinkState::Online)
            .await
            .unwrap();
        Self { agent, events }
    }

    /// Courier that answers offers by itself (accepts).
    async fn accepting(addr: SocketAddr, id: &str, lat: f64, lon: f64) -> Self {
        let mut cfg = agent_config(addr, id, Vehicle::Car, lat, lon);
        cfg.policy.auto_answer = true;
        Self::start(cfg).await
    }

    /// Courier who answers nothing unless the test makes them.
    async fn manual(addr: SocketAddr, id: &str, lat: f64, lon: f64) -> Self {
        Self::start(agent_config(addr, id, Vehicle::Car, lat, lon)).await
    }

    /// Every job message received about `call`, in order.
    fn jobs(&self, call: &str) -> Vec<Job> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::Job { job } if job.call_id.as_deref() == Some(call) => Some(job.clone()),
                _ => None,
            })
            .collect()
    }

    async fn wait_job(&self, kind: JobKind, call: &str) -> Job {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(j) = self.jobs(call).into_iter().rev().find(|j| j.kind == kind) {
                return j;
            }
            assert!(
                Instant::now() < end,
                "{}: no {kind:?} job for {call}; got {:?}",
                self.agent.courier_id(),
                self.jobs(call).iter().map(|j| j.kind).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until an event satisfying `pred` has been reported.
    async fn wait_event(&self, what: &str, pred: impl Fn(&EventKind) -> bool) {
        let end = Instant::now() + DEADLINE;
        while !self.events.lock().unwrap().iter().any(|e| pred(&e.kind)) {
            assert!(
                Instant::now() < end,
                "{}: timed out waiting for {what}",
                self.agent.courier_id()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for a `duplicate` (applied before, changed nothing) answer to `reply_id`.
    async fn wait_duplicate(&self, reply_id: &Option<String>) {
        self.wait_event("a duplicate answer", |k| {
            matches!(k, EventKind::Answer { reply_id: r, duplicate: true, ok: true, .. } if r == reply_id)
        })
        .await;
    }

    /// The daemon's answer to a reply: (ok, duplicate, error code).
    async fn answer(&self, reply_id: &str) -> (bool, bool, Option<String>) {
        let end = Instant::now() + DEADLINE;
        loop {
            let found = self
                .events
                .lock()
                .unwrap()
                .iter()
                .find_map(|e| match &e.kind {
                    EventKind::Answer {
                        reply_id: Some(r),
                        ok,
                        duplicate,
                        code,
                        ..
                    } if r == reply_id => Some((*ok, *duplicate, code.clone())),
                    _ => None,
                });
            if let Some(a) = found {
                return a;
            }
            assert!(Instant::now() < end, "no answer to {reply_id}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Acts and returns the daemon's answer.
    async fn act(&self, action: courier_agent::Action) -> (JobReply, (bool, bool, Option<String>)) {
        let r = self.agent.act(action).await.unwrap();
        let a = self.answer(r.reply_id.as_deref().unwrap()).await;
        (r, a)
    }
}

/// The real `courier-agent` binary as a child process; SIGKILLed on drop.
struct AgentProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    out: PathBuf,
}

impl AgentProcess {
    /// Starts `courier-agent` with `args` against the broker at `addr`; output in `out`.
    fn spawn(addr: SocketAddr, args: &[&str], out: PathBuf, stdin: bool) -> Self {
        let log = std::fs::File::create(&out).unwrap();
        let broker = format!("mqtt://{addr}");
        let mut child = Command::new(workspace_bin("courier-agent"))
            .args([
                "--broker",
                &broker,
                "--site",
                "test",
                "--reconnect-max-ms",
                "500",
            ])
            .args(args)
            .env("COURIER_AGENT_LOG", "warn")
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("courier-agent starts");
        Self {
            stdin: child.stdin.take(),
            child,
            out,
        }
    }

    /// One courier that answers nothing by itself.
    fn courier(addr: SocketAddr, dir: &Path, id: &str, lat: f64) -> Self {
        let queue = dir.join(format!("{id}.queue"));
        let lat = lat.to_string();
        Self::spawn(
            addr,
            &[
                "--id",
                id,
                "--vehicle",
                "car",
                "--lat",
                &lat,
                "--lon",
                "127.0",
                "--no-input",
                "--json",
                "--will-delay-s",
                "0",
                "--queue-file",
                &queue.to_string_lossy(),
            ],
            dir.join(format!("{id}.out")),
            false,
        )
    }

    /// SIGKILL: no goodbye; the broker must publish the last will.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit; returns whether it succeeded.
    fn terminate(&mut self) -> bool {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.success();
            }
            assert!(Instant::now() < end, "courier-agent did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Writes one line to the process's stdin.
    fn line(&mut self, s: &str) {
        let stdin = self.stdin.as_mut().expect("stdin piped");
        writeln!(stdin, "{s}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP forwarder in front of the broker: refuses connections while closed, drops the
/// ones through it on `cut` (a handheld out of coverage), and can point at a new
/// upstream (a restarted daemon with its broker on another port).
struct Gate {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    upstream: Arc<Mutex<SocketAddr>>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let upstream = Arc::new(Mutex::new(upstream));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (o, u, c) = (open.clone(), upstream.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !o.load(Ordering::SeqCst) {
                    continue;
                }
                let to = *u.lock().unwrap();
                c.lock().unwrap().push(tokio::spawn(async move {
                    let _ = inbound.set_nodelay(true);
                    if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                        let _ = up.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut up).await;
                    }
                }));
            }
        });
        Self {
            addr,
            open,
            upstream,
            conns,
            task,
        }
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }

    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn retarget(&self, to: SocketAddr) {
        *self.upstream.lock().unwrap() = to;
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

fn call_id(a: &Value) -> String {
    a["call"]["call_id"].as_str().expect("call id").to_string()
}

// ------------------------------------------------------------------ offers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_offer_times_out_and_moves_on_never_back() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = offer_config(dir.path(), 1);
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let a = Handheld::manual(addr, "a", 37.5005, 127.0).await;
    let b = Handheld::manual(addr, "b", 37.502, 127.0).await;
    courier_known(&db, "a").await;
    courier_known(&db, "b").await;
    let kiosk = Kiosk::connect(addr, "test", "kiosk-1", Version::V4).await;
    let id = call_id(&kiosk.create(kiosk.call_body("t-1")).await);

    // The nearest courier gets the offer, with its expiry; nobody answers.
    let offer = a.wait_job(JobKind::Offer, &id).await;
    assert!(offer.expires_at.is_some_and(|e| e > offer.at));
    // Timed out: withdrawn from A, offered to B; B does not answer either.
    let w = a.wait_job(JobKind::Withdrawn, &id).await;
    assert_eq!(w.reason.as_deref(), Some("offer timed out"));
    b.wait_job(JobKind::Offer, &id).await;
    b.wait_job(JobKind::Withdrawn, &id).await;
    wait_trail(&db, &id, "two offer timeouts", |e| {
        e.iter().filter(|e| e.kind == "offer_timeout").count() == 2
    })
    .await;
    // Nobody left: the call waits.
    assert_eq!(kiosk.get(&id).await["call"]["status"], "dispatching");

    // A farther courier comes online and takes it; A (nearer) and B are not asked again.
    let c = Handheld::accepting(addr, "c", 37.504, 127.0).await;
    c.wait_job(JobKind::Assigned, &id).await;
    assert_eq!(
        trail(&db, &id, &["offered", "offer_timeout", "assigned"]),
        pairs(&[
            ("offered", "a"),
            ("offer_timeout", "a"),
            ("offered", "b"),
            ("offer_timeout", "b"),
            ("offered", "c"),
            ("assigned", "c"),
        ])
    );
    for h in [&a, &b] {
        let offers = h
            .jobs(&id)
            .iter()
            .filter(|j| j.kind == JobKind::Offer)
            .count();
        assert_eq!(offers, 1, "{} offered again", h.agent.courier_id());
    }
    d.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declines_move_on_and_when_all_declined_a_new_courier_gets_the_call() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = offer_config(dir.path(), 30);
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let a = Handheld::manual(addr, "a", 37.5005, 127.0).await;
    let b = Handheld::manual(addr, "b", 37.502, 127.0).await;
    courier_known(&db, "a").await;
    courier_known(&db, "b").await;
    let kiosk = Kiosk::connect(addr, "test", "kiosk-1", Version::V4).await;
    let id = call_id(&kiosk.create(kiosk.call_body("d-1")).await);

    a.wait_job(JobKind::Offer, &id).await;
    let (ra, ans) = a
        .act(courier_agent::Action::Decline(Some("too far".into())))
        .await;
    assert_eq!(ans, (true, false, None));
    b.wait_job(JobKind::Offer, &id).await;
    let (_, ans) = b.act(courier_agent::Action::Decline(None)).await;
    assert_eq!(ans, (true, false, None));
    // A repeat of A's decline (same reply id) changes nothing.
    let again = a.agent.send_reply(ra.clone()).await.unwrap();
    assert_eq!(again.reply_id, ra.reply_id);
    a.wait_duplicate(&ra.reply_id).await;

    // Everyone declined: the call waits, offered to nobody.
    let g = kiosk.get(&id).await;
    assert_eq!(g["call"]["status"], "dispatching", "{g}");
    let open = open_db(&db)
        .query_row(
            "SELECT state FROM assignments WHERE call_id = ?1",
            [&id],
            |r| r.get::<_, String>(0),
        )
        .unwrap();
    assert_eq!(open, "pending");

    // A new courier comes online, farther away than both: it gets the call.
    let c = Handheld::accepting(addr, "c", 37.506, 127.0).await;
    c.wait_job(JobKind::Assigned, &id).await;
    assert_eq!(
        trail(&db, &id, &["offered", "declined", "assigned"]),
        pairs(&[
            ("offered", "a"),
            ("declined", "a"),
            ("offered", "b"),
            ("declined", "b"),
            ("offered", "c"),
            ("assigned", "c"),
        ])
    );
    let evs = call_events(&db, &id);
    let decl = evs
        .iter()
        .find(|e| e.kind == "declined" && e.courier.as_deref() == Some("a"))
        .unwrap();
    assert_eq!(decl.data["reason"], "too far");
    assert_eq!(Some(decl.at), ra.at, "the device's time is recorded");
    for h in [&a, &b] {
        let offers = h
            .jobs(&id)
            .iter()
            .filter(|j| j.kind == JobKind::Offer)
            .count();
        assert_eq!(offers, 1, "{} offered again", h.agent.courier_id());
    }
    d.shutdown(DEADLINE).await.unwrap();
}

// ------------------------------------------------------------------ killed couriers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_courier_holding_an_offer_loses_it_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = offer_config(dir.path(), 60);
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let topics = Topics::new("test").unwrap();
    let mut k = AgentProcess::courier(addr, dir.path(), "k", 37.5005);
    let b = Handheld::accepting(addr, "b", 37.502, 127.0).await;
    courier_known(&db, "k").await;
    courier_known(&db, "b").await;
    let (seen, _w) = watch(addr, vec![topics.courier_job("k")]).await;
    let kiosk = Kiosk::connect(addr, "test", "kiosk-1", Version::V4).await;
    let id = call_id(&kiosk.create(kiosk.call_body("k-1")).await);

    // The process has the offer (it shows it) and does not answer.
    let job_k = topics.courier_job("k");
    wait_until("the offer at k", || async {
        seen.last_json(&job_k)
            .is_some_and(|j| j["kind"] == "offer" && j["call_id"] == id.as_str())
    })
    .await;
    wait_until("k shows the offer", || async {
        k.output().contains(r#""event":"job""#) && k.output().contains(r#""kind":"offer""#)
    })
    .await;
    k.kill();

    // Its last will withdraws the offer; B gets and takes the call.
    b.wait_job(JobKind::Assigned, &id).await;
    assert_eq!(
        trail(
            &db,
            &id,
            &["offered", "offer_withdrawn", "offer_timeout", "assigned"]
        ),
        pairs(&[
            ("offered", "k"),
            ("offer_withdrawn", "k"),
            ("offered", "b"),
            ("assigned", "b"),
        ])
    );
    let evs = call_events(&db, &id);
    let first = evs.iter().find(|e| e.kind == "offered").unwrap();
    let expires_at = first.data["expires_at"].as_i64().unwrap();
    let withdrawn = evs.iter().find(|e| e.kind == "offer_withdrawn").unwrap();
    assert_eq!(withdrawn.data["reason"], "courier went offline");
    let second = evs
        .iter()
        .find(|e| e.kind == "offered" && e.courier.as_deref() == Some("b"))
        .unwrap();
    assert!(
        second.recorded_at < expires_at,
        "moved on by the will, not by the offer timeout"
    );
    let off = events(&db)
        .into_iter()
        .find(|e| e.kind == "offline" && e.courier.as_deref() == Some("k"))
        .expect("k marked offline by its will");
    assert!(off.recorded_at <= withdrawn.recorded_at);
    wait_until("withdrawn retained at k", || async {
        seen.last_json(&job_k)
            .is_some_and(|j| j["kind"] == "withdrawn")
    })
    .await;
    d.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_assigned_courier_is_replaced_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.dispatch.grace_s = 1;
    let grace_ms = 1_000;
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let topics = Topics::new("test").unwrap();
    let mut k = AgentProcess::courier(addr, dir.path(), "k", 37.5005);
    let b = Handheld::manual(addr, "b", 37.502, 127.0).await;
    courier_known(&db, "k").await;
    courier_known(&db, "b").await;
    let (seen, _w) = watch(addr, vec![topics.call_state_filter()]).await;
    let kiosk = Kiosk::connect(addr, "test", "kiosk-1", Version::V4).await;
    let id = call_id(&kiosk.create(kiosk.call_body("g-1")).await);
    wait_until("k shows the assignment", || async {
        k.output().contains(r#""kind":"assigned""#) && k.output().contains(id.as_str())
    })
    .await;
    k.kill();

    // After the grace period B is assigned; the kiosk sees the new courier.
    b.wait_job(JobKind::Assigned, &id).await;
    let state = topics.call_state(&id);
    wait_until("the kiosk sees b", || async {
        seen.last_json(&state)
            .is_some_and(|v| v["status"] == "assigned" && v["courier"]["courier_id"] == "b")
    })
    .await;
    let statuses: Vec<(String, String)> = seen
        .on(&state)
        .iter()
        .filter_map(|m| serde_json::from_slice::<Value>(&m.payload).ok())
        .map(|v| {
            (
                v["status"].as_str().unwrap_or("").to_string(),
                v["courier"]["courier_id"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    let k_at = statuses
        .iter()
        .position(|s| *s == ("assigned".into(), "k".into()))
        .unwrap();
    let b_at = statuses
        .iter()
        .position(|s| *s == ("assigned".into(), "b".into()))
        .unwrap();
    assert!(
        statuses[k_at..b_at].iter().any(|s| s.0 == "dispatching"),
        "{statuses:?}"
    );
    assert_eq!(
        trail(&db, &id, &["assigned", "reassigning"]),
        pairs(&[("assigned", "k"), ("reassigning", "k"), ("assigned", "b")])
    );
    let off = events(&db)
        .into_iter()
        .find(|e| e.kind == "offline" && e.courier.as_deref() == Some("k"))
        .expect("k marked offline by its will");
    let re = call_events(&db, &id)
        .into_iter()
        .find(|e| e.kind == "reassigning")
        .unwrap();
    assert!(
        re.recorded_at >= off.recorded_at + grace_ms,
        "not before the grace period"
    );

    // The old courier is told: its retained job says withdrawn, which a late reader and
    // the restarted handheld both see.
    let job_k = topics.courier_job("k");
    let (late, _l) = watch(addr, vec![job_k.clone()]).await;
    wait_until("withdrawn retained at k", || async {
        late.last_json(&job_k).is_some_and(|j| {
            j["kind"] == "withdrawn"
                && j["call_id"] == id.as_str()
                && j["reason"] == "reassigned: offline too long"
        })
    })
    .await;
    let k2 = AgentProcess::courier(addr, dir.path(), "k", 37.5005);
    wait_until("the restarted handheld shows the withdrawal", || async {
        k2.output()
            .lines()
            .any(|l| l.contains(r#""kind":"withdrawn""#) && l.contains(id.as_str()))
    })
    .await;
    d.shutdown(DEADLINE).await.unwrap();
}

/// A handheld killed between pickup and delivery and started again (same id, same broker
/// session) is told its job again and can finish it. Its old process had acknowledged
/// the picked-up job message, so the session has nothing to replay; rumqttd as published
/// did not re-send retained messages for a subscription the session already holds, and
/// the call stayed open for good. Two fixes cover it, each tested on its own: the
/// vendored broker re-sends them (`broker/tests/broker.rs`), and the daemon tells the
/// job again when the courier comes back online (`dispatch::tests`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handheld_restarted_holding_a_parcel_is_told_its_job_again_and_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let queue = dir.path().join("k.queue");
    let queue = queue.to_string_lossy();
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--id",
            "k",
            "--vehicle",
            "car",
            "--lat",
            "37.5005",
            "--lon",
            "127.0",
            "--json",
            "--will-delay-s",
            "0",
            "--queue-file",
            &queue,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // The first run takes commands on stdin, as a courier at the console would.
    let first = args(&[]);
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let mut k = AgentProcess::spawn(addr, &first, dir.path().join("k-1.out"), true);
    courier_known(&db, "k").await;
    let kiosk = Kiosk::connect(addr, "test", "kiosk-1", Version::V4).await;
    let created = kiosk.create(kiosk.call_body("r-1")).await;
    let id = call_id(&created);
    let code = created["pickup_code"].as_str().unwrap().to_string();
    let job_line = |out: String, kind: &str| {
        out.lines().any(|l| {
            l.contains(r#""event":"job""#)
                && l.contains(&format!(r#""kind":"{kind}""#))
                && l.contains(id.as_str())
        })
    };
    wait_until("the handheld shows the assignment", || async {
        job_line(k.output(), "assigned")
    })
    .await;
    k.line(&format!("picked {code}"));
    wait_until("the handheld shows the picked-up job", || async {
        job_line(k.output(), "picked_up")
    })
    .await;
    // A position sent after that job message arrived: once the daemon has it, the broker
    // has also had the handheld's acknowledgement of the job message (same connection,
    // earlier), so a resumed session will not replay it.
    k.line("move 37.5011 127.0");
    wait_until("the daemon has the new position", || async {
        open_db(&db)
            .query_row("SELECT body FROM couriers WHERE id = 'k'", [], |r| {
                r.get::<_, String>(0)
            })
            .is_ok_and(|b| b.contains("37.5011"))
    })
    .await;
    k.kill();
    wait_until("k marked offline by its will", || async {
        d.stats.couriers_online.load(Ordering::Relaxed) == 0
    })
    .await;

    // Started again: it delivers by itself once it knows it holds the parcel.
    let again = args(&["--no-input", "--auto-complete-after-ms", "100"]);
    let again: Vec<&str> = again.iter().map(String::as_str).collect();
    let k2 = AgentProcess::spawn(addr, &again, dir.path().join("k-2.out"), false);
    wait_until(
        "the call is completed by the restarted handheld",
        || async {
            open_db(&db)
                .query_row("SELECT status FROM calls WHERE id = ?1", [&id], |r| {
                    r.get::<_, String>(0)
                })
                .is_ok_and(|s| s == "completed")
        },
    )
    .await;
    assert!(job_line(k2.output(), "picked_up"), "{}", k2.output());
    assert_eq!(
        trail(&db, &id, &["assigned", "picked_up", "completed"]),
        pairs(&[("assigned", "k"), ("picked_up", "k"), ("completed", "k")])
    );
    d.shutdown(DEADLINE).await.unwrap();
}

// ------------------------------------------------------------------ offline replay

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_taken_offline_is_replayed_with_its_time_and_repeats_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cfg = test_config(dir.path());
    cfg.broker.listen = SocketAddr::from(([127, 0, 0, 1], port));
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let gate = Gate::start(d.broker_addr).await;
    let qpath = dir.path().join("a.queue");
    let mut acfg = agent_config(gate.addr, "a", Vehicle::Car, 37.5005, 127.0);
    acfg.queue = QueueStore::File(qpath.clone());
    let a = Handheld::start(acfg).await;
    courier_known(&db, "a").await;
    let kiosk = Kiosk::connect(d.broker_addr, "test", "kiosk-1", Version::V4).await;
    let created = kiosk.create(kiosk.call_body("o-1")).await;
    let id = call_id(&created);
    let code = created["pickup_code"].as_str().unwrap().to_string();
    a.wait_job(JobKind::Assigned, &id).await;

    // Out of coverage: the parcel is collected anyway.
    gate.set_open(false);
    gate.cut();
    a.agent
        .wait_for(DEADLINE, |s| s.link == LinkState::Offline)
        .await
        .unwrap();
    let picked = a.agent.picked_up(&code).await.unwrap();
    let at = picked.at.unwrap();
    assert_eq!(a.agent.status().queued, 1);
    assert_eq!(
        std::fs::read_to_string(&qpath).unwrap().lines().count(),
        1,
        "the action is on the device's disk"
    );
    a.wait_event("the action queued offline", |k| {
        matches!(k, EventKind::Acted { offline: true, reply, .. } if reply.reply_id == picked.reply_id)
    })
    .await;
    wait_until("the clock to move past the action", || async {
        now_ms() > at + 20
    })
    .await;

    // Back in coverage: replayed, applied with the device's time, answered, dequeued.
    gate.set_open(true);
    let (ok, dup, _) = a.answer(picked.reply_id.as_deref().unwrap()).await;
    assert!(ok && !dup);
    a.agent.wait_for(DEADLINE, |s| s.queued == 0).await.unwrap();
    assert_eq!(std::fs::read_to_string(&qpath).unwrap(), "");
    let ev = call_events(&db, &id)
        .into_iter()
        .find(|e| e.kind == "picked_up")
        .expect("picked_up recorded");
    assert_eq!(ev.at, at, "the device's time, not the arrival time");
    assert!(ev.at < ev.recorded_at);
    assert_eq!(kiosk.get(&id).await["call"]["status"], "picked_up");

    // The same reply again (a replay after a lost answer): a duplicate, nothing changes.
    a.agent.send_reply(picked.clone()).await.unwrap();
    a.wait_duplicate(&picked.reply_id).await;

    // Completed; then the daemon restarts and forgets finished calls: a repeat is still
    // recognised, now from the database.
    let (done, ans) = a.act(courier_agent::Action::Completed).await;
    assert_eq!(ans, (true, false, None));
    wait_trail(&db, &id, "completed", |e| {
        e.iter().any(|e| e.kind == "completed")
    })
    .await;
    d.shutdown(DEADLINE).await.unwrap();
    let mut cfg = test_config(dir.path());
    cfg.broker.listen = SocketAddr::from(([127, 0, 0, 1], port));
    cfg.dispatch.keep_terminal_s = 0;
    let d = start_daemon(cfg).await;
    gate.retarget(d.broker_addr);
    gate.cut();
    a.agent
        .wait_for(DEADLINE, |s| s.link == LinkState::Online)
        .await
        .unwrap();
    let rid = done.reply_id.clone();
    a.agent.send_reply(done).await.unwrap();
    a.wait_duplicate(&rid).await;
    a.agent.wait_for(DEADLINE, |s| s.queued == 0).await.unwrap();
    d.shutdown(DEADLINE).await.unwrap();
    let kinds: Vec<String> = call_events(&db, &id).into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "picked_up").count(), 1);
    assert_eq!(kinds.iter().filter(|k| *k == "completed").count(), 1);
}

// ------------------------------------------------------------------ pickup code

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pickup_code_gates_pickup_and_the_kiosk_sees_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = offer_config(dir.path(), 30);
    cfg.dispatch.max_wrong_codes = 2;
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let topics = Topics::new("test").unwrap();
    let (seen, _w) = watch(addr, vec![topics.call_state_filter()]).await;
    let a = Handheld::manual(addr, "a", 37.5005, 127.0).await;
    courier_known(&db, "a").await;
    let kiosk = Kiosk::connect(addr, "test", "kiosk-1", Version::V4).await;
    let created = kiosk.create(kiosk.call_body("p-1")).await;
    let id = call_id(&created);
    let code = created["pickup_code"].as_str().unwrap().to_string();
    let wrong = if code == "000000" { "111111" } else { "000000" };

    a.wait_job(JobKind::Offer, &id).await;
    let (_, ans) = a.act(courier_agent::Action::Accept).await;
    assert_eq!(ans, (true, false, None));
    a.wait_job(JobKind::Assigned, &id).await;
    let (_, ans) = a.act(courier_agent::Action::PickedUp(wrong.into())).await;
    assert_eq!(ans.2.as_deref(), Some("wrong_code"), "{ans:?}");
    assert!(!ans.0);
    // Refused: the courier may try again, with the right code.
    let (_, ans) = a.act(courier_agent::Action::PickedUp(code.clone())).await;
    assert_eq!(ans, (true, false, None));
    a.wait_job(JobKind::PickedUp, &id).await;
    let (_, ans) = a.act(courier_agent::Action::Completed).await;
    assert_eq!(ans, (true, false, None));

    let state = topics.call_state(&id);
    wait_until("completed state", || async {
        seen.last_json(&state)
            .is_some_and(|v| v["status"] == "completed")
    })
    .await;
    let mut statuses: Vec<String> = Vec::new();
    for m in seen.on(&state) {
        let text = String::from_utf8_lossy(&m.payload).to_string();
        assert!(!text.contains(&code), "pickup code on a retained topic");
        let v: Value = serde_json::from_str(&text).unwrap();
        let s = v["status"].as_str().unwrap().to_string();
        if statuses.last() != Some(&s) {
            statuses.push(s);
        }
    }
    assert_eq!(
        statuses,
        [
            "requested",
            "dispatching",
            "assigned",
            "picked_up",
            "completed"
        ]
    );
    assert_eq!(
        trail(
            &db,
            &id,
            &[
                "offered",
                "assigned",
                "wrong_pickup_code",
                "picked_up",
                "completed"
            ]
        ),
        pairs(&[
            ("offered", "a"),
            ("assigned", "a"),
            ("wrong_pickup_code", "a"),
            ("picked_up", "a"),
            ("completed", "a"),
        ])
    );

    // Wrong codes are limited: after two, even the right one is refused.
    let created = kiosk.create(kiosk.call_body("p-2")).await;
    let id2 = call_id(&created);
    let code2 = created["pickup_code"].as_str().unwrap().to_string();
    let wrong2 = if code2 == "000000" {
        "111111"
    } else {
        "000000"
    };
    a.wait_job(JobKind::Offer, &id2).await;
    a.act(courier_agent::Action::Accept).await;
    a.wait_job(JobKind::Assigned, &id2).await;
    for _ in 0..2 {
        let (_, ans) = a.act(courier_agent::Action::PickedUp(wrong2.into())).await;
        assert_eq!(ans.2.as_deref(), Some("wrong_code"));
    }
    let (_, ans) = a.act(courier_agent::Action::PickedUp(code2)).await;
    assert_eq!(ans.2.as_deref(), Some("too_many_attempts"), "{ans:?}");
    assert_eq!(kiosk.get(&id2).await["call"]["status"], "assigned");
    d.shutdown(DEADLINE).await.unwrap();
}

// ------------------------------------------------------------------ a simulated fleet

/// Replays the audit trail per courier: a job is held from `assigned` to the event that
/// ends the hold (completed, cancelled, reassigning), an offer from `offered` to its
/// withdrawal, acceptance or cancellation. Panics when a courier gets an offer or a job
/// while holding either, or still holds one at the end; returns each courier's job
/// intervals `(from, to, call)` in daemon time, checked not to overlap.
fn one_job_at_a_time(evs: &[Ev]) -> HashMap<String, Vec<(i64, i64, String)>> {
    let mut holding: HashMap<String, (String, i64)> = HashMap::new();
    let mut offered: HashMap<String, String> = HashMap::new();
    let mut intervals: HashMap<String, Vec<(i64, i64, String)>> = HashMap::new();
    for e in evs {
        let (Some(call), Some(cid)) = (&e.call, &e.courier) else {
            continue;
        };
        let holds = holding.get(cid).map(|(c, _)| c.clone());
        let offer = offered.get(cid).cloned();
        match e.kind.as_str() {
            "offered" => {
                assert!(
                    holds.is_none() && offer.is_none(),
                    "{cid} offered {call} while holding {holds:?} / offered {offer:?}"
                );
                offered.insert(cid.clone(), call.clone());
            }
            "offer_withdrawn" if offer.as_ref() == Some(call) => {
                offered.remove(cid);
            }
            "assigned" => {
                if let Some(other) = holds {
                    panic!("{cid} assigned {call} while holding {other}");
                }
                match offer {
                    Some(o) if o == *call => {
                        offered.remove(cid);
                    }
                    Some(o) => panic!("{cid} assigned {call} while offered {o}"),
                    None => {}
                }
                holding.insert(cid.clone(), (call.clone(), e.recorded_at));
            }
            "completed" | "cancelled" | "reassigning" => {
                if offer.as_ref() == Some(call) {
                    offered.remove(cid);
                }
                if holds.as_ref() == Some(call) {
                    let (_, from) = holding.remove(cid).unwrap();
                    intervals.entry(cid.clone()).or_default().push((
                        from,
                        e.recorded_at,
                        call.clone(),
                    ));
                }
            }
            _ => {}
        }
    }
    assert!(
        holding.is_empty(),
        "jobs still held at the end: {holding:?}"
    );
    assert!(
        offered.is_empty(),
        "offers still open at the end: {offered:?}"
    );
    for (cid, iv) in &intervals {
        for w in iv.windows(2) {
            assert!(w[0].1 <= w[1].0, "{cid}: {:?} overlaps {:?}", w[0], w[1]);
        }
    }
    intervals
}

/// A point `north_m`/`east_m` metres from (37.5, 127.0).
fn around(north_m: f64, east_m: f64) -> (f64, f64) {
    let lat = 37.5 + north_m / 111_320.0;
    let lon = 127.0 + east_m / (111_320.0 * 37.5f64.to_radians().cos());
    (lat, lon)
}

/// `courier-agent --simulate 200` that answers offers (declining a fifth), finishes jobs
/// with the codes it is fed on stdin, and takes short breaks.
fn spawn_fleet(addr: SocketAddr, dir: &Path, name: &str) -> AgentProcess {
    AgentProcess::spawn(
        addr,
        &[
            "--simulate",
            "200",
            "--center",
            "37.5,127.0",
            "--radius-m",
            "1500",
            "--seed",
            "7",
            "--tick-ms",
            "250",
            "--decline-rate",
            "0.2",
            "--auto-complete-after-ms",
            "300",
            "--shift-on-mean-s",
            "20",
            "--shift-off-mean-s",
            "3",
            "--pickup-codes",
            "-",
            "--json",
        ],
        dir.join(name),
        true,
    )
}

/// How long a whole fleet scenario may take.
const FLEET_WAIT: Duration = Duration::from_secs(120);

async fn wait_online(d: &pickupd::app::Running, n: u64) {
    let end = Instant::now() + FLEET_WAIT;
    while d.stats.couriers_online.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < end,
            "the fleet did not come online: {}",
            d.stats.couriers_online.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls `range` from two kiosks, one every 40 ms, spread around the center; every 30th
/// is 8 km out, beyond every courier's reach. Each code goes to the fleet as the customer
/// would tell it. Returns (call id, code).
async fn call_stream(
    kiosks: &[Kiosk; 2],
    range: std::ops::Range<usize>,
    fleet: &mut AgentProcess,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut seed: u64 = 12345 + range.start as u64;
    let mut rnd = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut pace = tokio::time::interval(Duration::from_millis(40));
    for i in range {
        pace.tick().await;
        let k = &kiosks[i % 2];
        let (lat, lon) = if i % 30 == 0 {
            around(8_000.0, 0.0)
        } else {
            around((rnd() - 0.5) * 2400.0, (rnd() - 0.5) * 2400.0)
        };
        let parcel = if rnd() < 0.15 {
            json!({"class": "heavy", "weight_kg": 14.0})
        } else {
            json!({"class": "light"})
        };
        let body = json!({
            "request_id": format!("sim-{i}"),
            "tel": "010-1234-5678",
            "location": {"lat": lat, "lon": lon},
            "parcel": parcel,
            "kiosk_id": k.id,
        });
        // As a kiosk does: `busy` (a commit slower than the breaker's threshold, on a box
        // whose disk is shared) is retried with the same request id after the time given.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut a = k.create(body.clone()).await;
        while a["error"]["code"] == "busy" && tokio::time::Instant::now() < deadline {
            let wait = a["error"]["retry_after_ms"]
                .as_u64()
                .unwrap_or(100)
                .min(3000);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            a = k.create(body.clone()).await;
        }
        assert_eq!(a["ok"], true, "{a}");
        let id = call_id(&a);
        let code = a["pickup_code"].as_str().unwrap().to_string();
        fleet.line(&format!("{id} {code}"));
        out.push((id, code));
    }
    out
}

/// Waits until `n` calls are completed or failed.
async fn wait_finished(db: &Path, n: usize) {
    let count = |sql: &str| -> Vec<(String, String)> {
        open_db(db)
            .prepare(sql)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let end = Instant::now() + FLEET_WAIT;
    while count("SELECT id, status FROM calls WHERE status IN ('completed', 'failed')").len() < n {
        if Instant::now() > end {
            panic!(
                "calls still open: {:?}",
                count("SELECT id, status FROM calls WHERE status NOT IN ('completed', 'failed')")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the SQLite file says about a finished fleet run.
struct FleetReport {
    completed: usize,
    failed: usize,
    couriers_served: usize,
    events: Vec<Ev>,
}

/// Checks from the SQLite file that every call in `ids` ended completed (assigned and
/// beyond, by one courier) or failed by its deadline, that no courier ever held two jobs
/// (or an offer and a job) at once, and that the assignment rows agree.
fn check_fleet_run(db: &Path, ids: &[String], deadline_ms: i64) -> FleetReport {
    let c = open_db(db);
    let calls: Vec<(String, String)> = c
        .prepare("SELECT id, status FROM calls")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut stored: Vec<&String> = calls.iter().map(|(id, _)| id).collect();
    stored.sort();
    let mut want: Vec<&String> = ids.iter().collect();
    want.sort();
    assert_eq!(stored, want);
    let evs = events(db);
    let intervals = one_job_at_a_time(&evs);
    let (mut completed, mut failed) = (0, 0);
    for (id, status) in &calls {
        let mine: Vec<&Ev> = evs.iter().filter(|e| e.call.as_ref() == Some(id)).collect();
        let (state, holder): (String, Option<String>) = c
            .query_row(
                "SELECT state, courier_id FROM assignments WHERE call_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        match status.as_str() {
            "completed" => {
                completed += 1;
                let who = |k: &str| {
                    mine.iter()
                        .rev()
                        .find(|e| e.kind == k)
                        .and_then(|e| e.courier.clone())
                };
                let by = who("completed").expect("completed by a courier");
                assert_eq!(who("assigned").as_ref(), Some(&by), "{id}");
                assert_eq!(who("picked_up").as_ref(), Some(&by), "{id}");
                assert_eq!(state, "done", "{id}");
                assert_eq!(holder.as_ref(), Some(&by), "{id}");
            }
            "failed" => {
                failed += 1;
                let reason: String = c
                    .query_row(
                        "SELECT json_extract(view, '$.reason') FROM calls WHERE id = ?1",
                        [id],
                        |r| r.get(0),
                    )
                    .unwrap();
                assert!(reason.contains("deadline"), "{id}: {reason}");
                let requested = mine.iter().find(|e| e.kind == "requested").unwrap();
                let f = mine.iter().find(|e| e.kind == "failed").unwrap();
                assert!(f.recorded_at >= requested.recorded_at + deadline_ms, "{id}");
                assert!(!mine.iter().any(|e| e.kind == "assigned"), "{id}");
                assert_eq!(state, "failed", "{id}");
            }
            other => panic!("call {id} ended {other}"),
        }
    }
    FleetReport {
        completed,
        failed,
        couriers_served: intervals.len(),
        events: evs,
    }
}

impl FleetReport {
    fn count(&self, kind: &str) -> usize {
        self.events.iter().filter(|e| e.kind == kind).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_fleet_of_200_serves_a_stream_of_calls_one_job_at_a_time() {
    const CALLS: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = offer_config(dir.path(), 4);
    cfg.dispatch.deadline_s = 10;
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let started = Instant::now();
    let mut fleet = spawn_fleet(addr, dir.path(), "fleet.out");
    wait_online(&d, 200).await;
    let online_after = started.elapsed();

    let kiosks = [
        Kiosk::connect(addr, "test", "kiosk-1", Version::V4).await,
        Kiosk::connect(addr, "test", "kiosk-2", Version::V4).await,
    ];
    let stream_start = Instant::now();
    let calls = call_stream(&kiosks, 0..CALLS, &mut fleet).await;
    let stream_took = stream_start.elapsed();
    wait_finished(&db, CALLS).await;
    let all_done = stream_start.elapsed();
    assert!(fleet.child.try_wait().unwrap().is_none(), "the fleet died");
    assert!(fleet.terminate(), "the fleet exits cleanly");
    d.shutdown(DEADLINE).await.unwrap();

    let ids: Vec<String> = calls.into_iter().map(|(id, _)| id).collect();
    let r = check_fleet_run(&db, &ids, 10_000);
    println!(
        "fleet of 200: online in {online_after:?}; {CALLS} calls sent in {stream_took:?}, all finished {all_done:?} after the first; \
         completed {}, failed {}; offers {}, declined {}, offer timeouts {}, withdrawn {}; {} couriers served calls",
        r.completed,
        r.failed,
        r.count("offered"),
        r.count("declined"),
        r.count("offer_timeout"),
        r.count("offer_withdrawn"),
        r.couriers_served
    );
    assert!(r.completed > 0);
    assert!(r.failed >= CALLS / 30, "the calls out of reach failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_killed_mid_stream_comes_back_and_no_courier_holds_two_jobs() {
    const CALLS: usize = 120;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = offer_config(dir.path(), 4);
    cfg.dispatch.deadline_s = 10;
    cfg.dispatch.grace_s = 1;
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let mut fleet = spawn_fleet(addr, dir.path(), "fleet-1.out");
    wait_online(&d, 200).await;
    let kiosks = [
        Kiosk::connect(addr, "test", "kiosk-1", Version::V4).await,
        Kiosk::connect(addr, "test", "kiosk-2", Version::V4).await,
    ];
    let mut calls = call_stream(&kiosks, 0..CALLS / 2, &mut fleet).await;

    // The whole fleet dies with jobs in hand: 200 last wills; the held jobs are
    // reassigned once the grace period is over, with nobody online to take them.
    let held_at_kill = open_db(&db)
        .query_row(
            "SELECT count(*) FROM assignments WHERE state IN ('assigned', 'picked_up')",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap();
    fleet.kill();
    let end = Instant::now() + FLEET_WAIT;
    while d.stats.couriers_online.load(Ordering::Relaxed) > 0 {
        assert!(Instant::now() < end, "the wills did not all arrive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reassigning = || {
        open_db(&db)
            .query_row(
                "SELECT count(*) FROM events WHERE kind = 'reassigning'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
    };
    if held_at_kill > 0 {
        let end = Instant::now() + FLEET_WAIT;
        while reassigning() == 0 {
            assert!(
                Instant::now() < end,
                "no reassignment after the grace period"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // The same couriers come back (same ids and sessions; the codes told again), and the
    // stream goes on.
    let mut fleet = spawn_fleet(addr, dir.path(), "fleet-2.out");
    for (id, code) in &calls {
        fleet.line(&format!("{id} {code}"));
    }
    wait_online(&d, 200).await;
    calls.extend(call_stream(&kiosks, CALLS / 2..CALLS, &mut fleet).await);
    wait_finished(&db, CALLS).await;
    assert!(fleet.terminate(), "the fleet exits cleanly");
    d.shutdown(DEADLINE).await.unwrap();

    let ids: Vec<String> = calls.into_iter().map(|(id, _)| id).collect();
    let r = check_fleet_run(&db, &ids, 10_000);
    println!(
        "fleet killed and back: held at kill {held_at_kill}, reassigned {}; completed {}, failed {}; \
         offers {}, withdrawn {}",
        r.count("reassigning"),
        r.completed,
        r.failed,
        r.count("offered"),
        r.count("offer_withdrawn"),
    );
    assert!(r.completed > 0);
}

/// A handheld that loops on its position costs the daemon one position per
/// `limits.position_interval_ms`, not one store job (at low load, one commit and fsync)
/// per message; the position kept is the newest one sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_courier_flooding_its_position_costs_one_per_interval_and_the_newest_wins() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.position_interval_ms = 500;
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let c = TestCourier::online(d.broker_addr, "test", "loop", "scooter", 37.5, 127.0).await;
    courier_known(&db, "loop").await;

    let jobs_before = d.writer_stats.jobs.load(Ordering::Relaxed);
    let coalesced_before = d.mqtt.positions_coalesced.load(Ordering::Relaxed);
    let n = 2000u32;
    let lat = |i: u32| 37.5 + f64::from(i) * 1e-5;
    let started = Instant::now();
    for i in 1..=n {
        c.locate(lat(i), 127.0).await;
    }
    let last = format!("\"lat\":{}", lat(n));
    wait_until("the newest position is stored", || async {
        open_db(&db)
            .query_row("SELECT body FROM couriers WHERE id = 'loop'", [], |r| {
                r.get::<_, String>(0)
            })
            .is_ok_and(|b| b.contains(&last))
    })
    .await;
    // The daemon got every position within this time (the newest one is stored).
    let window = started.elapsed();

    // One position per 500 ms of that window, the first at once, and a margin of two
    // for the boundaries; without the gate every position is a store job of its own.
    let allowed = u64::try_from(window.as_millis() / 500).unwrap_or(u64::MAX) + 3;
    let jobs = d.writer_stats.jobs.load(Ordering::Relaxed) - jobs_before;
    assert!(
        jobs <= allowed,
        "{jobs} store jobs for {n} positions received within {window:?} (at most {allowed} expected)"
    );
    let coalesced = d.mqtt.positions_coalesced.load(Ordering::Relaxed) - coalesced_before;
    assert!(
        coalesced >= u64::from(n) - allowed,
        "{coalesced} of {n} positions coalesced"
    );
}

/// A handheld that loops on the same presence while holding a job costs the daemon one
/// presence per `limits.position_interval_ms`: not a store job and a fresh job message
/// per repeat. A change (going offline) still passes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_courier_repeating_its_presence_costs_one_per_interval_and_a_change_passes_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.position_interval_ms = 500;
    let db = cfg.store.path.clone();
    let d = start_daemon(cfg).await;
    let c = TestCourier::online(d.broker_addr, "test", "loop", "car", 37.5, 127.0).await;
    courier_known(&db, "loop").await;
    let kiosk = Kiosk::connect(d.broker_addr, "test", "kiosk-1", Version::V4).await;
    let a = kiosk.create(kiosk.call_body("m-1")).await;
    let call = a["call"]["call_id"].as_str().unwrap().to_string();
    c.wait_job(JobKind::Assigned, &call).await;

    let jobs_before = c.jobs.lock().unwrap().len();
    let store_before = d.writer_stats.jobs.load(Ordering::Relaxed);
    let dropped_before = d.mqtt.presences_dropped.load(Ordering::Relaxed);
    let n = 1000u64;
    let started = Instant::now();
    for _ in 0..n {
        c.presence(true).await;
    }
    // Every repeat has reached the daemon once the counter accounts for all but the ones
    // passed on; a marker position after them shows the inbound task is past them.
    c.locate(37.5001, 127.0).await;
    wait_until("the presences are read", || async {
        let dropped = d.mqtt.presences_dropped.load(Ordering::Relaxed) - dropped_before;
        let window = u64::try_from(started.elapsed().as_millis() / 500).unwrap_or(u64::MAX);
        dropped + window + 3 >= n
    })
    .await;
    let window = started.elapsed();
    let allowed = u64::try_from(window.as_millis() / 500).unwrap_or(u64::MAX) + 3;
    let dropped = d.mqtt.presences_dropped.load(Ordering::Relaxed) - dropped_before;
    assert!(
        dropped >= n - allowed,
        "{dropped} of {n} repeated presences dropped within {window:?}"
    );
    // Each presence that passed re-tells the held job; the rest told nothing.
    let told = u64::try_from(c.jobs.lock().unwrap().len() - jobs_before).unwrap();
    assert!(
        told <= allowed,
        "{told} job messages for {n} repeated presences"
    );
    let store_jobs = d.writer_stats.jobs.load(Ordering::Relaxed) - store_before;
    // Presences passed, the marker position, and their job messages' sent marks.
    assert!(
        store_jobs <= 3 * allowed + 3,
        "{store_jobs} store jobs for {n} repeated presences"
    );

    // Going offline is a change: applied at once, well inside the interval.
    c.presence(false).await;
    wait_until("the courier is offline", || async {
        open_db(&db)
            .query_row("SELECT online FROM couriers WHERE id = 'loop'", [], |r| {
                r.get::<_, i64>(0)
            })
            .is_ok_and(|o| o == 0)
    })
    .await;
    d.shutdown(DEADLINE).await.unwrap();
}
