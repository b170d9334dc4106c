//! The load: kiosks that create calls, couriers that finish their jobs, a watcher on the
//! retained call state topics, and the trivial echo responder of the baseline.
//!
//! Every client is a real MQTT client built on `pickup_protocol::client` (the library the
//! daemon, the agent and `pickupctl` use), with QoS 1 and TCP_NODELAY, so that the echo
//! baseline and the daemon are measured with the same client stack.
//!
//! Kiosks run closed-loop (`window` requests in flight each, flat out) or open-loop (a
//! fixed offered rate, sends never wait for answers). A request counts when it was sent
//! inside the measured window (after the warm-up); its latency runs from just before the
//! publish to the answer's arrival.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pickup_protocol::client::{
    link, Backoff, BrokerUrl, Link, LinkError, LinkEvent, LinkEvents, LinkOptions, Requester, Will,
};
use pickup_protocol::{Job, JobKind, Topics};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::stats::Summary;

/// Where the pickup centre is; calls are within 2 km of it, couriers within 3 km, so with
/// the default 5 km radius every courier is a candidate for every call.
const CENTER: (f64, f64) = (37.5, 127.0);
/// How long any single request may take before it counts as timed out.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A point `r_max` metres around the centre at most, uniformly.
fn random_point(rng: &mut SmallRng, r_max: f64) -> (f64, f64) {
    let r = r_max * rng.random::<f64>().sqrt();
    let t = rng.random::<f64>() * std::f64::consts::TAU;
    let dlat = r * t.cos() / 111_195.0;
    let dlon = r * t.sin() / (111_195.0 * CENTER.0.to_radians().cos());
    (CENTER.0 + dlat, CENTER.1 + dlon)
}

fn url(addr: SocketAddr) -> BrokerUrl {
    BrokerUrl {
        host: addr.ip().to_string(),
        port: addr.port(),
    }
}

/// The pickup code of an accepted call, or a courier waiting for it (the assignment can
/// reach the courier before the kiosk has read its answer).
enum Slot {
    Code(String),
    Waiting(oneshot::Sender<String>),
}

/// What kiosks, couriers and the watcher share.
#[derive(Default)]
struct Shared {
    /// Whether couriers will ask for pickup codes (they finish their jobs). When they keep
    /// their first job nobody asks, and a map of every call's code would only grow: its
    /// rehashing under the lock stalled every kiosk task for 100+ ms once past 114 688
    /// calls, which the run then reported as the daemon's latency.
    keep_codes: bool,
    codes: Mutex<HashMap<String, Slot>>,
    /// Whether a watcher follows the state topics, so that kiosks note when each call was
    /// created (else nothing would ever take the entries out again).
    track_created: bool,
    /// Call id → when its create request was sent (measured calls only).
    created: Mutex<HashMap<String, Instant>>,
    /// Call id → when the watcher first saw it `assigned` on its state topic.
    assigned: Mutex<HashMap<String, Instant>>,
    /// Jobs the couriers finished (picked up and completed).
    jobs_done: AtomicU64,
    /// Job replies that failed or were refused.
    job_errors: AtomicU64,
    /// State messages the watcher received.
    states_seen: AtomicU64,
}

impl Shared {
    fn code_known(&self, call_id: &str, code: String) {
        if !self.keep_codes {
            return;
        }
        let mut m = self.codes.lock().unwrap_or_else(|e| e.into_inner());
        match m.remove(call_id) {
            Some(Slot::Waiting(tx)) => {
                let _ = tx.send(code);
            }
            _ => {
                m.insert(call_id.to_string(), Slot::Code(code));
            }
        }
    }

    async fn code_for(&self, call_id: &str) -> Option<String> {
        let rx = {
            let mut m = self.codes.lock().unwrap_or_else(|e| e.into_inner());
            match m.remove(call_id) {
                Some(Slot::Code(c)) => return Some(c),
                _ => {
                    let (tx, rx) = oneshot::channel();
                    m.insert(call_id.to_string(), Slot::Waiting(tx));
                    rx
                }
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, rx).await.ok()?.ok()
    }
}

/// Connected clients, kept across phases.
pub struct Rig {
    topics: Topics,
    echo_topic: String,
    kiosks: Vec<Requester>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    seed: u64,
}

/// How the rig is built.
#[derive(Debug, Clone)]
pub struct RigOpts {
    /// Site of the daemon under test.
    pub site: String,
    /// Number of kiosk clients.
    pub kiosks: usize,
    /// Number of courier clients.
    pub couriers: usize,
    /// Whether couriers pick up and complete each job at once (else they keep the first).
    pub finish_jobs: bool,
    /// Whether a watcher follows the retained call state topics (create→assigned).
    pub watch_states: bool,
}

/// One measured phase.
#[derive(Debug, Clone, Copy)]
pub struct PhaseOpts {
    /// Requests to the daemon (`calls/create`) or to the echo responder.
    pub echo: bool,
    /// Offered rate in requests/s over all kiosks; `None`: flat out (closed loop).
    pub rate: Option<f64>,
    /// Requests in flight per kiosk when flat out.
    pub window: usize,
    /// Not measured.
    pub warmup: Duration,
    /// Measured.
    pub duration: Duration,
}

/// What one phase measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseResult {
    /// `create` or `echo`.
    pub kind: String,
    /// Offered rate (requests/s), or null when flat out.
    pub offered_rate: Option<f64>,
    /// Measured seconds.
    pub seconds: f64,
    /// Requests sent in the measured window.
    pub sent: u64,
    /// Answered `ok`.
    pub accepted: u64,
    /// Answered `busy`.
    pub busy: u64,
    /// Answered with another error.
    pub errors: u64,
    /// Not answered within 10 s.
    pub timeouts: u64,
    /// Accepted per second.
    pub accepted_per_s: f64,
    /// Request → answer, accepted requests.
    pub latency: Summary,
    /// Create request → call seen `assigned` on its retained state topic.
    pub create_to_assigned: Summary,
    /// Accepted calls never seen assigned (couriers busy, or the watcher missed it).
    pub not_seen_assigned: u64,
    /// Jobs couriers finished during the phase.
    pub jobs_finished: u64,
    /// Job replies refused or failed during the phase.
    pub job_errors: u64,
}

#[derive(Default)]
struct Tally {
    sent: u64,
    accepted: u64,
    busy: u64,
    errors: u64,
    timeouts: u64,
    lat: Vec<Duration>,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.sent += o.sent;
        self.accepted += o.accepted;
        self.busy += o.busy;
        self.errors += o.errors;
        self.timeouts += o.timeouts;
        self.lat.extend(o.lat);
    }
}

/// Outcome of one request.
enum Outcome {
    Ok(Duration),
    Busy(u64),
    Error,
    Timeout,
}

impl Rig {
    /// Connects couriers (online, positioned), kiosks and the watcher, and waits until
    /// `online` reports every courier.
    pub async fn connect(
        addr: SocketAddr,
        o: &RigOpts,
        online: impl Fn() -> u64,
    ) -> anyhow::Result<Self> {
        let topics = Topics::new(&o.site)?;
        let shared = Arc::new(Shared {
            keep_codes: o.finish_jobs,
            track_created: o.watch_states,
            ..Shared::default()
        });
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let seed: u64 = rand::rng().random();
        for i in 0..o.couriers {
            let c = CourierSim {
                id: format!("bc{i:05}"),
                heavy: i % 3 == 0,
                topics: topics.clone(),
                shared: shared.clone(),
                finish: o.finish_jobs,
                seed: seed ^ i as u64,
            };
            let (ready_tx, ready_rx) = oneshot::channel();
            tasks.spawn(c.run(addr, ready_tx, stop_rx.clone()));
            ready_rx
                .await
                .map_err(|_| anyhow::anyhow!("courier {i} could not connect"))??;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while online() < o.couriers as u64 {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the daemon sees {} of {} couriers online after 30 s",
                    online(),
                    o.couriers
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut kiosks = Vec::with_capacity(o.kiosks);
        for k in 0..o.kiosks {
            let lo = LinkOptions::new(url(addr), format!("bench-kiosk-{seed:x}-{k}"));
            let (req, _rx) = Requester::connect(
                lo,
                topics.kiosk_replies(&format!("bk{k}")),
                vec![],
                Duration::from_secs(10),
            )
            .await?;
            kiosks.push(req);
        }
        if o.watch_states {
            let (ready_tx, ready_rx) = oneshot::channel();
            tasks.spawn(watch_states(
                addr,
                topics.call_state_filter(),
                shared.clone(),
                ready_tx,
                stop_rx.clone(),
            ));
            let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
        }
        Ok(Self {
            echo_topic: format!("pickup-bench/{}/echo", o.site),
            topics,
            kiosks,
            shared,
            stop,
            tasks,
            seed,
        })
    }

    /// The topic the echo responder listens on.
    pub fn echo_topic(&self) -> &str {
        &self.echo_topic
    }

    /// Runs one phase and returns what it measured.
    pub async fn phase(&self, p: PhaseOpts) -> PhaseResult {
        let start = Instant::now();
        let measure_from = start + p.warmup;
        let end = measure_from + p.duration;
        let done0 = self.shared.jobs_done.load(Ordering::Relaxed);
        let err0 = self.shared.job_errors.load(Ordering::Relaxed);
        let mut set = JoinSet::new();
        let n = self.kiosks.len().max(1);
        for (k, req) in self.kiosks.iter().enumerate() {
            let ctx = KioskCtx {
                req: req.clone(),
                topic: if p.echo {
                    self.echo_topic.clone()
                } else {
                    self.topics.calls_create()
                },
                echo: p.echo,
                kiosk_id: format!("bk{k}"),
                prefix: format!("r{:x}-{k}", self.seed ^ start.elapsed().as_nanos() as u64),
                shared: self.shared.clone(),
                measure_from,
                end,
                seed: self.seed.wrapping_add(k as u64 * 7919),
            };
            match p.rate {
                None => {
                    for w in 0..p.window.max(1) {
                        set.spawn(ctx.clone().closed_loop(w));
                    }
                }
                Some(rate) => {
                    let interval = Duration::from_secs_f64(n as f64 / rate.max(0.001));
                    // Kiosks start spread over one interval, not in step.
                    let offset = interval.mul_f64(k as f64 / n as f64);
                    set.spawn(ctx.open_loop(start + offset, interval));
                }
            }
        }
        let mut t = Tally::default();
        while let Some(r) = set.join_next().await {
            if let Ok(x) = r {
                t.add(x);
            }
        }
        let seconds = p.duration.as_secs_f64();
        let mut res = PhaseResult {
            kind: if p.echo { "echo" } else { "create" }.into(),
            offered_rate: p.rate,
            seconds,
            sent: t.sent,
            accepted: t.accepted,
            busy: t.busy,
            errors: t.errors,
            timeouts: t.timeouts,
            accepted_per_s: t.accepted as f64 / seconds,
            latency: Summary::of(&mut t.lat),
            ..Default::default()
        };
        if !p.echo && self.shared.track_created {
            // Let assignments of the last calls arrive.
            let settle = Instant::now() + Duration::from_secs(2);
            loop {
                let missing = {
                    let c = lock(&self.shared.created);
                    let a = lock(&self.shared.assigned);
                    c.keys().filter(|k| !a.contains_key(*k)).count()
                };
                if missing == 0 || Instant::now() > settle {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let created = std::mem::take(&mut *lock(&self.shared.created));
            let mut assigned = lock(&self.shared.assigned);
            let mut lat = Vec::with_capacity(created.len());
            let mut missing = 0;
            for (id, t0) in &created {
                match assigned.remove(id) {
                    Some(t1) => lat.push(t1.saturating_duration_since(*t0)),
                    None => missing += 1,
                }
            }
            assigned.clear();
            res.create_to_assigned = Summary::of(&mut lat);
            res.not_seen_assigned = missing;
        }
        res.jobs_finished = self.shared.jobs_done.load(Ordering::Relaxed) - done0;
        res.job_errors = self.shared.job_errors.load(Ordering::Relaxed) - err0;
        res
    }

    /// Waits until every courier has finished its jobs (or `max` passes).
    pub async fn quiesce(&self, max: Duration) {
        let end = Instant::now() + max;
        let mut last = u64::MAX;
        while Instant::now() < end {
            let now = self.shared.jobs_done.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// State messages the watcher has received.
    pub fn states_seen(&self) -> u64 {
        self.shared.states_seen.load(Ordering::Relaxed)
    }

    /// Disconnects every client.
    pub async fn close(mut self) {
        let _ = self.stop.send(true);
        for k in &self.kiosks {
            let _ = tokio::time::timeout(Duration::from_millis(200), k.link().disconnect()).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone)]
struct KioskCtx {
    req: Requester,
    topic: String,
    echo: bool,
    kiosk_id: String,
    prefix: String,
    shared: Arc<Shared>,
    measure_from: Instant,
    end: Instant,
    seed: u64,
}

impl KioskCtx {
    fn body(&self, n: u64, rng: &mut SmallRng) -> Value {
        let (lat, lon) = random_point(rng, 2_000.0);
        let heavy = rng.random_range(0..10) == 0;
        json!({
            "request_id": format!("{}-{n}", self.prefix),
            "tel": "010-1234-5678",
            "location": {"lat": lat, "lon": lon, "label": "Gate 2"},
            "parcel": {"class": if heavy { "heavy" } else { "light" }},
            "kiosk_id": self.kiosk_id,
        })
    }

    /// Sends one request and records what came back.
    async fn one(&self, body: Value, measured: bool) -> Outcome {
        let t0 = Instant::now();
        let ans = self.req.request(&self.topic, body, REQUEST_TIMEOUT).await;
        let dt = t0.elapsed();
        match ans {
            Ok(v) if v.get("ok").and_then(Value::as_bool) == Some(true) => {
                if !self.echo {
                    let id = v
                        .pointer("/call/call_id")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    let code = v
                        .get("pickup_code")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    if let (Some(id), Some(code)) = (id, code) {
                        if measured && self.shared.track_created {
                            lock(&self.shared.created).insert(id.clone(), t0);
                        }
                        self.shared.code_known(&id, code);
                    }
                }
                Outcome::Ok(dt)
            }
            Ok(v) => match v.pointer("/error/code").and_then(Value::as_str) {
                Some("busy") => Outcome::Busy(
                    v.pointer("/error/retry_after_ms")
                        .and_then(Value::as_u64)
                        .unwrap_or(100),
                ),
                _ => Outcome::Error,
            },
            Err(LinkError::Timeout(_)) => Outcome::Timeout,
            Err(_) => Outcome::Error,
        }
    }

    fn record(t: &mut Tally, o: &Outcome) {
        t.sent += 1;
        match o {
            Outcome::Ok(d) => {
                t.accepted += 1;
                t.lat.push(*d);
            }
            Outcome::Busy(_) => t.busy += 1,
            Outcome::Error => t.errors += 1,
            Outcome::Timeout => t.timeouts += 1,
        }
    }

    async fn closed_loop(self, w: usize) -> Tally {
        let mut rng = SmallRng::seed_from_u64(self.seed ^ (w as u64) << 32);
        let mut t = Tally::default();
        let mut n = (w as u64) << 40;
        while Instant::now() < self.end {
            n += 1;
            let measured = Instant::now() >= self.measure_from;
            let body = self.body(n, &mut rng);
            let o = self.one(body, measured).await;
            if measured {
                Self::record(&mut t, &o);
            }
            if let Outcome::Busy(ms) = o {
                // A kiosk told to wait does; capped so a short run keeps offering load.
                tokio::time::sleep(Duration::from_millis(ms.min(50))).await;
            }
        }
        t
    }

    async fn open_loop(self, first: Instant, interval: Duration) -> Tally {
        let mut rng = SmallRng::seed_from_u64(self.seed);
        let me = Arc::new(self);
        let mut set = JoinSet::new();
        let mut at = first;
        let mut n = 0u64;
        while at < me.end {
            tokio::time::sleep_until(at.into()).await;
            n += 1;
            let measured = at >= me.measure_from;
            let body = me.body(n, &mut rng);
            let k = me.clone();
            set.spawn(async move { (measured, k.one(body, measured).await) });
            at += interval;
        }
        let mut t = Tally::default();
        while let Some(r) = set.join_next().await {
            if let Ok((true, o)) = r {
                Self::record(&mut t, &o);
            }
        }
        t
    }
}

/// A light courier client: online with a vehicle at a fixed point; on an `assigned` job it
/// sends `picked_up` (with the code the kiosk got) and `completed`, so it is free again.
struct CourierSim {
    id: String,
    heavy: bool,
    topics: Topics,
    shared: Arc<Shared>,
    finish: bool,
    seed: u64,
}

impl CourierSim {
    async fn run(
        self,
        addr: SocketAddr,
        ready: oneshot::Sender<anyhow::Result<()>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut lo = LinkOptions::new(url(addr), format!("bench-courier-{}", self.id));
        lo.will = Some(Will {
            topic: self.topics.courier_presence(&self.id),
            payload: br#"{"state":"offline"}"#.to_vec(),
            retain: true,
            delay_s: None,
        });
        let (req, mut jobs) = match Requester::connect(
            lo,
            self.topics.courier_replies(&self.id),
            vec![self.topics.courier_job(&self.id)],
            Duration::from_secs(10),
        )
        .await
        {
            Ok(x) => x,
            Err(e) => {
                let _ = ready.send(Err(e.into()));
                return;
            }
        };
        let mut rng = SmallRng::seed_from_u64(self.seed);
        let (lat, lon) = random_point(&mut rng, 3_000.0);
        let presence = json!({
            "state": "online", "available": true,
            "name": format!("Bench {}", self.id),
            "vehicle": if self.heavy { "car" } else { "scooter" },
            "tel": "010-5555-0000",
        });
        let location = serde_json::to_vec(&json!({"lat": lat, "lon": lon})).unwrap_or_default();
        let l = req.link();
        let r1 = l
            .publish(
                &self.topics.courier_presence(&self.id),
                true,
                true,
                serde_json::to_vec(&presence).unwrap_or_default(),
                None,
            )
            .await;
        let r2 = l
            .publish(
                &self.topics.courier_location(&self.id),
                true,
                false,
                location.clone(),
                None,
            )
            .await;
        let _ = ready.send(r1.and(r2).map_err(Into::into));
        let mut refresh = tokio::time::interval(Duration::from_secs(30));
        refresh.tick().await;
        let topic = self.topics.courier_job_reply(&self.id);
        loop {
            let m = tokio::select! {
                m = jobs.recv() => match m { Some(m) => m, None => break },
                _ = refresh.tick() => {
                    // Positions older than location_max_age make a courier ineligible.
                    let _ = l.publish(&self.topics.courier_location(&self.id), true, false, location.clone(), None).await;
                    continue;
                }
                _ = stop.changed() => break,
            };
            if !self.finish || m.payload.is_empty() {
                continue;
            }
            let Ok(job) = serde_json::from_slice::<Job>(&m.payload) else {
                continue;
            };
            let (JobKind::Assigned, Some(call)) = (job.kind, job.call_id) else {
                continue;
            };
            let Some(code) = self.shared.code_for(&call).await else {
                self.shared.job_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let mut ok = true;
            for (action, extra) in [("picked_up", Some(code)), ("completed", None)] {
                let mut b = json!({"call_id": call, "action": action, "reply_id": format!("{call}-{action}")});
                if let Some(c) = extra {
                    b["pickup_code"] = c.into();
                }
                match req.request(&topic, b, REQUEST_TIMEOUT).await {
                    Ok(v) if v.get("ok").and_then(Value::as_bool) == Some(true) => {}
                    _ => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                self.shared.jobs_done.fetch_add(1, Ordering::Relaxed);
            } else {
                self.shared.job_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), l.disconnect()).await;
    }
}

/// Follows `calls/+/state` and notes when each call is first seen `assigned`.
async fn watch_states(
    addr: SocketAddr,
    filter: String,
    shared: Arc<Shared>,
    ready: oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) {
    #[derive(serde::Deserialize)]
    struct State<'a> {
        call_id: &'a str,
        status: &'a str,
    }
    let mut lo = LinkOptions::new(url(addr), format!("bench-watch-{}", rand::random::<u32>()));
    lo.channel_capacity = 4096;
    let (l, mut ev) = link(&lo);
    let mut ready = Some(ready);
    let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
    loop {
        let e = tokio::select! {
            e = ev.poll() => e,
            _ = stop.changed() => break,
        };
        match e {
            Ok(LinkEvent::Connected { .. }) => {
                let l = l.clone();
                let f = vec![filter.clone()];
                tokio::spawn(async move { l.subscribe_many(&f).await });
            }
            Ok(LinkEvent::SubAck) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
            Ok(LinkEvent::Message(m)) => {
                let now = Instant::now();
                shared.states_seen.fetch_add(1, Ordering::Relaxed);
                if let Ok(s) = serde_json::from_slice::<State<'_>>(&m.payload) {
                    if s.status == "assigned" {
                        lock(&shared.assigned)
                            .entry(s.call_id.to_string())
                            .or_insert(now);
                    }
                }
            }
            Ok(_) => {}
            Err(e) if e.to_string().contains("Requests done") => break,
            Err(_) => tokio::time::sleep(backoff.next_delay()).await,
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), l.disconnect()).await;
}

/// The baseline's responder: one client, like the daemon's (persistent session, same
/// in-flight window, in process when `local` is given, as the daemon's is with the
/// embedded broker); it answers each request on its `reply_to` topic with the
/// `correlation_id`, from a separate publishing task as the daemon does.
pub async fn echo_responder(
    addr: SocketAddr,
    topic: String,
    ready: oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
    local: Option<(Link, LinkEvents)>,
) {
    let (l, mut ev) = local.unwrap_or_else(|| {
        let mut lo = LinkOptions::new(url(addr), format!("bench-echo-{}", rand::random::<u32>()));
        lo.clean_session = false;
        lo.inflight = 100;
        lo.channel_capacity = 4096;
        link(&lo)
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Vec<u8>)>();
    let pl = l.clone();
    let publisher = tokio::spawn(async move {
        while let Some((t, p)) = rx.recv().await {
            if pl.publish(&t, true, false, p, None).await.is_err() {
                break;
            }
        }
    });
    let mut ready = Some(ready);
    let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
    loop {
        let e = tokio::select! {
            e = ev.poll() => e,
            _ = stop.changed() => break,
        };
        match e {
            Ok(LinkEvent::Connected { .. }) => {
                let l = l.clone();
                let f = vec![topic.clone()];
                tokio::spawn(async move { l.subscribe_many(&f).await });
            }
            Ok(LinkEvent::SubAck) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
            Ok(LinkEvent::Message(m)) => {
                let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else {
                    continue;
                };
                let (Some(to), corr) = (
                    v.get("reply_to").and_then(Value::as_str),
                    v.get("correlation_id").cloned(),
                ) else {
                    continue;
                };
                let answer = serde_json::to_vec(&json!({"ok": true, "correlation_id": corr}))
                    .unwrap_or_default();
                let _ = tx.send((to.to_string(), answer));
            }
            Ok(_) => {}
            Err(e) if e.to_string().contains("Requests done") => break,
            Err(_) => tokio::time::sleep(backoff.next_delay()).await,
        }
    }
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_millis(500), publisher).await;
    let _ = tokio::time::timeout(Duration::from_millis(200), l.disconnect()).await;
}

/// The courier id `announce_couriers` uses for index `i`.
pub fn announced_id(i: usize) -> String {
    format!("mc{i:06}")
}

/// A quick publisher used to bring many couriers online from few connections (the daemon
/// sees courier ids, not connections): presence and a position for each id. Positions
/// depend only on the index, so announcing again changes nothing.
pub async fn announce_couriers(
    addr: SocketAddr,
    site: &str,
    ids: Vec<usize>,
    spread_m: f64,
    per_s: f64,
) -> anyhow::Result<Link> {
    let topics = Topics::new(site)?;
    let started = Instant::now();
    let mut lo = LinkOptions::new(
        url(addr),
        format!("bench-announce-{}", rand::random::<u32>()),
    );
    lo.channel_capacity = 4096;
    let (l, mut ev) = link(&lo);
    let (conn_tx, conn_rx) = oneshot::channel();
    let mut conn_tx = Some(conn_tx);
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(LinkEvent::Connected { .. }) => {
                    if let Some(t) = conn_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(_) => {}
                Err(e) if e.to_string().contains("Requests done") => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), conn_rx).await??;
    for (k, i) in ids.into_iter().enumerate() {
        if per_s > 0.0 {
            let after = Duration::try_from_secs_f64(k as f64 / per_s)
                .map_err(|e| anyhow::anyhow!("--mem-announce-per-s is too small: {e}"))?;
            tokio::time::sleep_until((started + after).into()).await;
        }
        let id = announced_id(i);
        let mut rng = SmallRng::seed_from_u64(i as u64);
        let (lat, lon) = random_point(&mut rng, spread_m);
        let presence = json!({"state": "online", "available": true, "vehicle": if i % 3 == 0 { "car" } else { "scooter" }, "name": format!("Courier {i}")});
        l.publish(
            &topics.courier_presence(&id),
            true,
            true,
            serde_json::to_vec(&presence)?,
            None,
        )
        .await?;
        l.publish(
            &topics.courier_location(&id),
            true,
            false,
            serde_json::to_vec(&json!({"lat": lat, "lon": lon}))?,
            None,
        )
        .await?;
    }
    Ok(l)
}
