//! `pickupd demo`: the daemon with its embedded broker and SQLite file, a few simulated
//! couriers (real `courier-agent` agents in this process) and a kiosk making calls; prints
//! each call's path from request to the end. A newcomer's first look at a call going
//! through, and a smoke test of a build.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use courier_agent::{Agent, AgentConfig, Point, Policy, QueueStore};
use pickup_protocol::client::{BrokerUrl, LinkOptions, Requester};
use pickup_protocol::{CallStatus, CallView, Topics, Vehicle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::Mutex;

use crate::config::Config;

/// Demo options.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Simulated couriers.
    #[arg(long, default_value_t = 6)]
    pub couriers: usize,
    /// Calls to make (0: until Ctrl-C).
    #[arg(long, default_value_t = 8)]
    pub calls: usize,
    /// Time between calls, milliseconds.
    #[arg(long, default_value_t = 1500)]
    pub interval_ms: u64,
    /// Every n-th call is cancelled by the customer (0: none).
    #[arg(long, default_value_t = 4)]
    pub cancel_every: usize,
    /// Seed for positions and parcels.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// Where the demo happens: Seoul City Hall.
const CENTER: Point = Point {
    lat: 37.5665,
    lon: 126.9780,
};

fn near(rng: &mut StdRng, radius_m: f64) -> Point {
    let d = radius_m * rng.random::<f64>().sqrt();
    let a = rng.random::<f64>() * std::f64::consts::TAU;
    Point {
        lat: CENTER.lat + d * a.cos() / 111_195.0,
        lon: CENTER.lon + d * a.sin() / (111_195.0 * CENTER.lat.to_radians().cos()),
    }
}

struct Tracked {
    started: Instant,
    code: String,
    path: Vec<String>,
    last: Option<CallStatus>,
}

/// Calls being followed, and states that arrived before their call's answer.
#[derive(Default)]
struct Board {
    calls: HashMap<String, Tracked>,
    early: Vec<CallView>,
}

/// Prints a call's new status and plays the customer's part at pickup.
fn step(call: &mut Tracked, v: &CallView, agents: &Arc<HashMap<String, Arc<Agent>>>) {
    if call.last == Some(v.status) {
        return;
    }
    call.last = Some(v.status);
    let label = match (&v.status, &v.courier) {
        (CallStatus::Assigned, Some(c)) => {
            println!(
                "  {}  assigned to {} ({}, {:.0} m, ETA {} s)",
                v.call_id,
                c.courier_id,
                c.vehicle.as_str(),
                c.distance_m,
                c.eta_s
            );
            // The customer hands the code over when the courier arrives.
            if let Some(a) = agents.get(&c.courier_id).cloned() {
                let code = call.code.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    let _ = a.picked_up(&code).await;
                });
            }
            format!("assigned({})", c.courier_id)
        }
        (s, _) => {
            if s.is_terminal() || *s == CallStatus::PickedUp {
                println!("  {}  {}", v.call_id, s.as_str());
            }
            s.as_str().to_string()
        }
    };
    call.path.push(label);
    if v.status.is_terminal() {
        println!(
            "✔ {}: {}  ({:.1} s)",
            v.call_id,
            call.path.join(" → "),
            call.started.elapsed().as_secs_f64()
        );
    }
}

/// Runs the demo until all calls are final or Ctrl-C.
pub async fn run(cfg: Config, args: DemoArgs, _explicit_config: bool) -> anyhow::Result<()> {
    let site = cfg.site.clone();
    let topics = Topics::new(&site)?;
    let running = crate::app::start(cfg).await?;
    let mut ready = running.ready.clone();
    ready.wait_for(|r| *r).await?;
    let addr = running.broker_addr;
    let url = BrokerUrl {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    println!("pickupd demo: broker mqtt://{addr}, site {site:?}; watch it with");
    println!("  pickupctl --broker mqtt://{addr} --site {site} watch");

    // Couriers.
    let mut rng = StdRng::seed_from_u64(args.seed);
    let vehicles = [
        Vehicle::Scooter,
        Vehicle::Car,
        Vehicle::Bicycle,
        Vehicle::Van,
    ];
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move { while ev_rx.recv().await.is_some() {} });
    let mut agents: HashMap<String, Arc<Agent>> = HashMap::new();
    for i in 0..args.couriers.max(1) {
        let id = format!("demo-{:02}", i + 1);
        let mut c = AgentConfig::new(
            url.clone(),
            &site,
            &id,
            vehicles[i % vehicles.len()],
            near(&mut rng, 2_000.0),
        );
        c.name = Some(format!("Courier {}", i + 1));
        c.tel = Some(format!("010-5555-{:04}", i + 1));
        c.queue = QueueStore::Memory;
        c.policy = Policy {
            auto_answer: true,
            think_ms: (200, 800),
            complete_after: Some(Duration::from_millis(1500)),
            ..Policy::default()
        };
        agents.insert(id, Arc::new(Agent::spawn(c, ev_tx.clone())?));
    }
    println!(
        "{} couriers online around {:.4},{:.4}",
        agents.len(),
        CENTER.lat,
        CENTER.lon
    );

    // The kiosk, watching every call's retained state.
    let opts = LinkOptions::new(url, "kiosk-demo");
    let (kiosk, mut states) = Requester::connect(
        opts,
        topics.kiosk_replies("demo"),
        vec![topics.call_state_filter()],
        Duration::from_secs(10),
    )
    .await?;
    let board: Arc<Mutex<Board>> = Arc::default();
    let agents = Arc::new(agents);
    let watcher = {
        let board = board.clone();
        let agents = agents.clone();
        tokio::spawn(async move {
            while let Some(m) = states.recv().await {
                let Ok(v) = serde_json::from_slice::<CallView>(&m.payload) else {
                    continue;
                };
                let mut b = board.lock().await;
                match b.calls.get_mut(&v.call_id) {
                    Some(call) => step(call, &v, &agents),
                    // The state can overtake the create answer; keep it until then.
                    None => b.early.push(v),
                }
            }
        })
    };

    let mut made = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms.max(100)));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tick.tick() => {}
        }
        if args.calls > 0 && made >= args.calls {
            let b = board.lock().await;
            if b.calls
                .values()
                .all(|c| c.last.is_some_and(CallStatus::is_terminal))
            {
                break;
            }
            continue;
        }
        made += 1;
        let p = near(&mut rng, 1_500.0);
        let heavy = rng.random::<f64>() < 0.25;
        let body = json!({
            "request_id": format!("demo-{}-{made}", args.seed),
            "tel": format!("010-{:04}-{:04}", rng.random_range(1000..9999), rng.random_range(1000..9999)),
            "location": {"lat": p.lat, "lon": p.lon, "label": format!("Locker {made}")},
            "parcel": {"class": if heavy { "heavy" } else { "light" }},
            "kiosk_id": "demo",
        });
        let a = kiosk
            .request(&topics.calls_create(), body, Duration::from_secs(10))
            .await?;
        if a["ok"] != true {
            println!("✘ call refused: {}", a["error"]);
            continue;
        }
        let id = a["call"]["call_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let code = a["pickup_code"].as_str().unwrap_or_default().to_string();
        println!(
            "→ {id}  requested: {} parcel at Locker {made}, pickup code {code}, price {} won",
            if heavy { "heavy" } else { "light" },
            a["call"]["price"]
        );
        {
            let mut b = board.lock().await;
            let mut call = Tracked {
                started: Instant::now(),
                code,
                path: Vec::new(),
                last: None,
            };
            let early: Vec<CallView> = b
                .early
                .iter()
                .filter(|v| v.call_id == id)
                .cloned()
                .collect();
            b.early.retain(|v| v.call_id != id);
            for v in early {
                step(&mut call, &v, &agents);
            }
            b.calls.insert(id.clone(), call);
        }
        if args.cancel_every > 0 && made % args.cancel_every == 0 {
            let kiosk = kiosk.clone();
            let topics = topics.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                let r = kiosk
                    .request(
                        &topics.call_cancel(&id),
                        json!({"reason": "customer changed their mind"}),
                        Duration::from_secs(10),
                    )
                    .await;
                if let Ok(r) = r {
                    if r["ok"] != true {
                        println!("  {id}  cancel refused: {}", r["error"]["message"]);
                    }
                }
            });
        }
    }
    watcher.abort();
    drop(agents);
    running.shutdown(Duration::from_secs(10)).await
}
