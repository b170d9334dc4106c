//! `--simulate N`: a fleet of couriers in one process, for demos and load.
//!
//! Each simulated courier is a full [`Agent`] with its own MQTT connection: presence with a
//! last will is per connection in MQTT, and the daemon must see exactly what real handhelds
//! do (sessions, wills, retained jobs). One task drives the whole fleet: it moves couriers
//! (towards the pickup when they hold a job, else between random points within the radius),
//! takes them off shift now and then (never while holding a job), and prints one line per
//! job event. Answers to offers come from each agent's [`Policy`](crate::config::Policy).
//!
//! Simulated couriers finish their jobs only when someone hands them the pickup codes
//! (the daemon never sends them): [`Fleet::codes`] in-process, or `--pickup-codes` for the
//! process (see [`crate::codes`]). The fleet keeps the codes and gives each to the courier
//! that gets the call.
//!
//! With the same `--seed`, the fleet is the same: ids, names, vehicles, start points,
//! routes, shift changes (counted in ticks) and the sequence of each courier's answers.
//! Which courier gets which call still depends on timing in the daemon.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use pickup_protocol::{JobAction, JobKind, Vehicle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::agent::{now_ms, Agent, AgentError, AgentEvent, EventKind};
use crate::codes::{CodeSource, PickupCode};
use crate::config::{AgentConfig, ConfigError};
use crate::geo::Point;
use crate::queue::QueueStore;

/// A fleet's settings.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Broker, site, credentials, protocol, policy and timings every courier shares.
    pub template: AgentConfig,
    /// Number of couriers.
    pub count: usize,
    /// Ids are `<prefix>-001`, `<prefix>-002`, …
    pub id_prefix: String,
    /// Where the couriers are.
    pub center: Point,
    /// How far from the center they go, metres.
    pub radius_m: f64,
    /// Seed of everything random in the fleet.
    pub seed: u64,
    /// Simulation step.
    pub tick: Duration,
    /// Mean time on shift before a break (zero: always on shift).
    pub shift_on_mean: Duration,
    /// Mean break.
    pub shift_off_mean: Duration,
    /// One queue file per courier in this directory; `None`: memory.
    pub queue_dir: Option<PathBuf>,
    /// JSON lines instead of text.
    pub json: bool,
    /// Where pickup codes come from besides [`Fleet::codes`] (`--pickup-codes`).
    pub pickup_codes: Option<CodeSource>,
}

impl FleetConfig {
    /// Checks the values; errors name the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.count == 0 {
            return Err(ConfigError::new("--simulate: must be at least 1"));
        }
        let widest = format!("{}-{}", self.id_prefix, self.count);
        pickup_protocol::validate::id("--id", &widest).map_err(ConfigError)?;
        if self.tick.is_zero() {
            return Err(ConfigError::new("--tick-ms: must be at least 10"));
        }
        self.template.policy.validate()
    }
}

/// One simulated courier as planned from the seed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CourierPlan {
    /// Courier id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Vehicle.
    pub vehicle: Vehicle,
    /// Phone number.
    pub tel: String,
    /// Start point.
    pub start: Point,
    /// Speed, metres per second.
    pub speed_mps: f64,
    /// Seed of this courier's answers and moves.
    pub seed: u64,
}

/// The couriers a configuration produces; the same seed gives the same fleet.
pub fn plan(cfg: &FleetConfig) -> Vec<CourierPlan> {
    let width = cfg.count.to_string().len().max(3);
    let mut master = StdRng::seed_from_u64(cfg.seed);
    (0..cfg.count)
        .map(|i| {
            let seed: u64 = master.random();
            let mut rng = StdRng::seed_from_u64(seed);
            let n = i + 1;
            let vehicle = match rng.random_range(0..100) {
                0..=19 => Vehicle::Bicycle,
                20..=59 => Vehicle::Scooter,
                60..=84 => Vehicle::Car,
                _ => Vehicle::Van,
            };
            // City speeds, metres per second, with some spread between couriers.
            let base = match vehicle {
                Vehicle::Bicycle => 4.0,
                Vehicle::Scooter => 6.5,
                Vehicle::Car => 8.0,
                Vehicle::Van | Vehicle::Truck => 7.0,
            };
            CourierPlan {
                id: format!("{}-{:0width$}", cfg.id_prefix, n),
                name: format!("Courier {n:0width$}"),
                vehicle,
                tel: format!("010-{:04}-{:04}", 5000 + (n / 10_000) % 5000, n % 10_000),
                start: random_point(&mut rng, cfg.center, cfg.radius_m),
                speed_mps: base * rng.random_range(0.8..1.2),
                seed,
            }
        })
        .collect()
}

/// A uniformly random point within `radius_m` of `center`.
fn random_point(rng: &mut StdRng, center: Point, radius_m: f64) -> Point {
    let r = radius_m * rng.random::<f64>().sqrt();
    let theta = rng.random::<f64>() * std::f64::consts::TAU;
    center.offset(r * theta.cos(), r * theta.sin())
}

/// A simulated courier's moving parts, owned by the fleet task.
struct Sim {
    plan: CourierPlan,
    rng: StdRng,
    position: Point,
    waypoint: Point,
    on_shift: bool,
    next_shift_tick: Option<u64>,
    /// The job as last seen, and where it sends the courier.
    job: Option<(String, JobKind, Option<Point>)>,
    delivery_to: Option<Point>,
    online: bool,
}

/// Pickup codes the fleet remembers for calls not yet (or no longer) held.
const CODES_KEPT: usize = 100_000;

/// A running fleet.
pub struct Fleet {
    cfg: FleetConfig,
    agents: Vec<Agent>,
    sims: Vec<Sim>,
    events: mpsc::Receiver<AgentEvent>,
    codes_tx: mpsc::Sender<PickupCode>,
    codes_rx: mpsc::Receiver<PickupCode>,
    /// Known codes by call, oldest first in `code_order`.
    codes: HashMap<String, String>,
    code_order: VecDeque<String>,
}

impl Fleet {
    /// Starts every courier (connections are made in the background).
    pub fn start(cfg: FleetConfig) -> Result<Self, AgentError> {
        cfg.validate()?;
        let plans = plan(&cfg);
        let (tx, rx) = mpsc::channel(4096.max(cfg.count * 8));
        let mut agents = Vec::with_capacity(plans.len());
        let mut sims = Vec::with_capacity(plans.len());
        for p in plans {
            let mut c = cfg.template.clone();
            c.courier_id = p.id.clone();
            c.client_id = format!("courier-{}", p.id);
            c.name = Some(p.name.clone());
            c.vehicle = p.vehicle;
            c.tel = Some(p.tel.clone());
            c.position = p.start;
            c.available = true;
            c.policy.seed = Some(p.seed ^ 0x5eed_a115_0ffe_2500);
            c.queue = match &cfg.queue_dir {
                Some(d) => QueueStore::File(d.join(format!("courier-{}.queue", p.id))),
                None => QueueStore::Memory,
            };
            agents.push(Agent::spawn(c, tx.clone())?);
            let mut rng = StdRng::seed_from_u64(p.seed);
            let waypoint = random_point(&mut rng, cfg.center, cfg.radius_m);
            let first_break = next_change(&mut rng, cfg.shift_on_mean, cfg.tick, 0);
            sims.push(Sim {
                position: p.start,
                plan: p,
                rng,
                waypoint,
                on_shift: true,
                next_shift_tick: first_break,
                job: None,
                delivery_to: None,
                online: false,
            });
        }
        let (codes_tx, codes_rx) = mpsc::channel(1024);
        if let Some(src) = cfg.pickup_codes.clone() {
            crate::codes::spawn_reader(src, codes_tx.clone()).map_err(|e| {
                AgentError::Invalid(format!("--pickup-codes: cannot start the reader: {e}"))
            })?;
        }
        Ok(Self {
            cfg,
            agents,
            sims,
            events: rx,
            codes_tx,
            codes_rx,
            codes: HashMap::new(),
            code_order: VecDeque::new(),
        })
    }

    /// The agents, in plan order.
    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    /// Where a driver that knows pickup codes (from the kiosks' create answers) sends them,
    /// so that simulated couriers can mark their jobs picked up and completed.
    pub fn codes(&self) -> mpsc::Sender<PickupCode> {
        self.codes_tx.clone()
    }

    fn on_code(&mut self, c: PickupCode) {
        if self
            .codes
            .insert(c.call_id.clone(), c.code.clone())
            .is_none()
        {
            self.code_order.push_back(c.call_id.clone());
            while self.code_order.len() > CODES_KEPT {
                if let Some(old) = self.code_order.pop_front() {
                    self.codes.remove(&old);
                }
            }
        }
        for (i, sim) in self.sims.iter().enumerate() {
            if sim
                .job
                .as_ref()
                .is_some_and(|(call, _, _)| *call == c.call_id)
            {
                self.agents[i].try_provide_code(&c.call_id, &c.code);
            }
        }
    }

    /// Runs the simulation until `stop` completes, then stops every courier cleanly.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.cfg.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n_tick: u64 = 0;
        let mut shown_online = usize::MAX;
        self.print_fleet(0);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                ev = self.events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => break,
                },
                Some(c) = self.codes_rx.recv() => self.on_code(c),
                _ = tick.tick() => {
                    n_tick += 1;
                    self.step(n_tick);
                    let online = self.sims.iter().filter(|s| s.online).count();
                    if online != shown_online {
                        shown_online = online;
                        self.print_fleet(online);
                    }
                }
            }
        }
        let mut set = tokio::task::JoinSet::new();
        for a in self.agents.drain(..) {
            set.spawn(a.shutdown());
        }
        while set.join_next().await.is_some() {}
        while let Ok(ev) = self.events.try_recv() {
            self.on_event(ev);
        }
    }

    fn print_fleet(&self, online: usize) {
        if self.cfg.json {
            println!(
                "{}",
                serde_json::json!({"event":"fleet","at":now_ms(),"online":online,"total":self.cfg.count})
            );
        } else {
            println!(
                "{} fleet: {online}/{} couriers online",
                clock(now_ms()),
                self.cfg.count
            );
        }
    }

    fn index(&self, cid: &str) -> Option<usize> {
        let n: usize = cid.rsplit('-').next()?.parse().ok()?;
        (n >= 1 && n <= self.sims.len() && self.sims[n - 1].plan.id == cid).then(|| n - 1)
    }

    fn on_event(&mut self, ev: AgentEvent) {
        let Some(i) = self.index(&ev.courier_id) else {
            return;
        };
        let line = {
            let sim = &mut self.sims[i];
            match &ev.kind {
                EventKind::Online { .. } => {
                    sim.online = true;
                    None
                }
                EventKind::Disconnected { .. } | EventKind::Stopped => {
                    sim.online = false;
                    None
                }
                EventKind::Job { job } => {
                    let pickup = job.pickup.as_ref().map(|l| Point::new(l.lat, l.lon));
                    let call = job.call_id.clone().unwrap_or_default();
                    if matches!(job.kind, JobKind::Offer | JobKind::Assigned) {
                        if let Some(code) = self.codes.get(&call) {
                            self.agents[i].try_provide_code(&call, code);
                        }
                    }
                    sim.job = match job.kind {
                        JobKind::Offer | JobKind::Assigned | JobKind::PickedUp => {
                            Some((call.clone(), job.kind, pickup))
                        }
                        _ => None,
                    };
                    if job.kind == JobKind::PickedUp && sim.delivery_to.is_none() {
                        sim.delivery_to = Some(random_point(
                            &mut sim.rng,
                            self.cfg.center,
                            self.cfg.radius_m,
                        ));
                    }
                    if sim.job.is_none() {
                        sim.delivery_to = None;
                    }
                    if job.kind == JobKind::None {
                        None
                    } else {
                        let dist = pickup
                            .map(|p| format!(" {:.0} m away", sim.position.distance_m(p)))
                            .unwrap_or_default();
                        let parcel = job
                            .parcel
                            .as_ref()
                            .map(|p| format!(" {}", p.class.as_str()))
                            .unwrap_or_default();
                        let reason = job
                            .reason
                            .as_ref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default();
                        Some(format!(
                            "{} call {call}{parcel}{dist}{reason}",
                            job_word(job.kind)
                        ))
                    }
                }
                EventKind::Acted { reply, offline, .. } => {
                    if matches!(reply.action, JobAction::Decline | JobAction::Completed) {
                        sim.job = None;
                        sim.delivery_to = None;
                    }
                    Some(format!(
                        "{} call {}{}",
                        reply.action.as_str(),
                        reply.call_id,
                        if *offline { " (queued offline)" } else { "" }
                    ))
                }
                EventKind::Answer {
                    ok: false,
                    code,
                    message,
                    ..
                } => Some(format!(
                    "refused: {} ({})",
                    message.as_deref().unwrap_or(""),
                    code.as_deref().unwrap_or("error")
                )),
                EventKind::QueueCorrupt { line, error } => {
                    Some(format!("queue file line {line} skipped: {error}"))
                }
                _ => None,
            }
        };
        let Some(line) = line else {
            return;
        };
        if self.cfg.json {
            println!("{}", serde_json::to_string(&ev).unwrap_or_default());
        } else {
            println!("{} {} {line}", clock(ev.at), ev.courier_id);
        }
    }

    /// One simulation step: move everyone, change shifts.
    fn step(&mut self, n_tick: u64) {
        let dt = self.cfg.tick.as_secs_f64();
        for (i, sim) in self.sims.iter_mut().enumerate() {
            let busy = sim.job.is_some();
            if let Some(at) = sim.next_shift_tick {
                if n_tick >= at && !busy {
                    sim.on_shift = !sim.on_shift;
                    let mean = if sim.on_shift {
                        self.cfg.shift_on_mean
                    } else {
                        self.cfg.shift_off_mean
                    };
                    sim.next_shift_tick = next_change(&mut sim.rng, mean, self.cfg.tick, n_tick);
                    self.agents[i].try_set_available(sim.on_shift);
                }
            }
            if !sim.on_shift && !busy {
                continue;
            }
            let target = match &sim.job {
                Some((_, JobKind::PickedUp, _)) => sim.delivery_to,
                Some((_, JobKind::Assigned, Some(p))) => Some(*p),
                // An offer: stay put until it is decided.
                Some((_, JobKind::Offer, _)) => None,
                _ => Some(sim.waypoint),
            };
            let Some(target) = target else {
                continue;
            };
            let (p, reached) = sim.position.step_towards(target, sim.plan.speed_mps * dt);
            sim.position = p;
            if reached && sim.job.is_none() {
                sim.waypoint = random_point(&mut sim.rng, self.cfg.center, self.cfg.radius_m);
            }
            self.agents[i].try_move_to(p);
        }
    }
}

/// The tick of the next shift change: exponentially distributed with `mean`.
fn next_change(rng: &mut StdRng, mean: Duration, tick: Duration, now: u64) -> Option<u64> {
    if mean.is_zero() {
        return None;
    }
    let u: f64 = rng.random_range(f64::EPSILON..1.0);
    let secs = -mean.as_secs_f64() * u.ln();
    let ticks = (secs / tick.as_secs_f64()).ceil().max(1.0);
    Some(now + ticks as u64)
}

fn job_word(k: JobKind) -> &'static str {
    match k {
        JobKind::Offer => "offer",
        JobKind::Assigned => "assigned",
        JobKind::PickedUp => "picked up",
        JobKind::Cancelled => "cancelled",
        JobKind::Withdrawn => "withdrawn",
        JobKind::None => "no job",
    }
}

/// `HH:MM:SS.mmm` (UTC) of a unix-ms time.
pub fn clock(ms: i64) -> String {
    let day_ms = ms.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use pickup_protocol::client::BrokerUrl;

    fn cfg(seed: u64) -> FleetConfig {
        let template = AgentConfig::new(
            BrokerUrl::parse("127.0.0.1:1").unwrap(),
            "s",
            "sim",
            Vehicle::Scooter,
            Point::new(37.5, 127.0),
        );
        FleetConfig {
            template,
            count: 50,
            id_prefix: "sim".into(),
            center: Point::new(37.5, 127.0),
            radius_m: 1500.0,
            seed,
            tick: Duration::from_secs(1),
            shift_on_mean: Duration::from_secs(600),
            shift_off_mean: Duration::from_secs(60),
            queue_dir: None,
            json: false,
            pickup_codes: None,
        }
    }

    #[test]
    fn same_seed_same_fleet() {
        let a = plan(&cfg(42));
        assert_eq!(a, plan(&cfg(42)));
        assert_ne!(a, plan(&cfg(43)));
        assert_eq!(a[0].id, "sim-001");
        assert_eq!(a[49].id, "sim-050");
        for p in &a {
            assert!(p.start.distance_m(Point::new(37.5, 127.0)) <= 1500.5);
            pickup_protocol::validate::phone("tel", &p.tel).unwrap();
        }
        // A mix of vehicles, so heavy parcels find someone.
        assert!(a
            .iter()
            .any(|p| p.vehicle.can_carry(pickup_protocol::ParcelClass::Heavy)));
        assert!(a
            .iter()
            .any(|p| !p.vehicle.can_carry(pickup_protocol::ParcelClass::Heavy)));
    }

    #[test]
    fn shift_changes_are_spread_around_the_mean() {
        let mut rng = StdRng::seed_from_u64(1);
        let n = 2000;
        let total: u64 = (0..n)
            .map(|_| {
                next_change(
                    &mut rng,
                    Duration::from_secs(100),
                    Duration::from_secs(1),
                    0,
                )
                .unwrap()
            })
            .sum();
        let mean = total as f64 / n as f64;
        assert!((80.0..120.0).contains(&mean), "{mean}");
        assert_eq!(
            next_change(&mut rng, Duration::ZERO, Duration::from_secs(1), 5),
            None
        );
    }

    #[test]
    fn clock_formats() {
        assert_eq!(clock(3_723_004), "01:02:03.004");
    }
}
