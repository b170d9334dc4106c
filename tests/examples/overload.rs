//! Overload measurement (not a test): what the daemon sustains, what happens when calls
//! are offered at several times that, how fast status reads stay meanwhile, and how soon
//! new calls are accepted again once the flood stops.
//!
//!     cargo run --release -p pickup-e2e --example overload [-- SECONDS MULTIPLIER [one-link]]
//!
//! `one-link` serves status reads on the daemon's main connection (`mqtt.read_link =
//! false`), to compare with their own connection (the default).
//!
//! Phases, all against the daemon in this process with its embedded broker and a SQLite
//! file in a temporary directory: (1) idle status reads; (2) flat out from 16 kiosks, 4
//! requests in flight each: the sustainable rate; (3) open loop at MULTIPLIER (default 4)
//! times that rate while a reader keeps asking for a call's status; (4) recovery.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pickup_e2e::*;
use pickup_protocol::client::Version;

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn status_latencies(reader: &Kiosk, call_id: &str, until: Instant) -> Vec<f64> {
    let mut out = Vec::new();
    while Instant::now() < until {
        let t = Instant::now();
        let g = reader.get(call_id).await;
        assert_eq!(g["ok"], true, "{g}");
        out.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let mult: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4.0);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    // Kiosks here stand for many; calls wait without couriers, so lift that limit and let
    // the queues and the breaker do the shedding.
    cfg.admission.per_client_rate = 1e6;
    cfg.admission.per_client_burst = 1e6;
    cfg.limits.max_dispatching = 10_000_000;
    cfg.limits.max_open_per_kiosk = 0;
    cfg.mqtt.read_link = args.get(3).map(String::as_str) != Some("one-link");
    println!(
        "status reads on their own connection: {}",
        cfg.mqtt.read_link
    );
    let d = start_daemon(cfg).await;
    let addr = d.broker_addr;
    let reader = Kiosk::connect(addr, "test", "reader", Version::V4).await;
    let probe = reader.create(reader.call_body("probe")).await;
    let probe_id = probe["call"]["call_id"].as_str().unwrap().to_string();

    // 1. Idle status reads.
    let mut idle = status_latencies(
        &reader,
        &probe_id,
        Instant::now() + Duration::from_secs_f64(secs / 2.0),
    )
    .await;

    // 2. Flat out: closed loop, 16 kiosks × 4 in flight.
    let mut kiosks = Vec::new();
    for k in 0..16 {
        kiosks.push(Arc::new(
            Kiosk::connect(addr, "test", &format!("load-{k}"), Version::V4).await,
        ));
    }
    let seq = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for k in &kiosks {
        for _ in 0..4 {
            let (k, seq, ok) = (k.clone(), seq.clone(), ok.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    let a = k.create(k.call_body(&format!("flat-{n}"))).await;
                    if a["ok"] == true {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let sustainable = ok.load(Ordering::Relaxed) as f64 / secs;

    // 3. Open loop at mult × sustainable, with a status reader alongside.
    let offered = sustainable * mult;
    let interval = Duration::from_secs_f64(1.0 / offered);
    let accepted = Arc::new(AtomicU64::new(0));
    let busy = Arc::new(AtomicU64::new(0));
    let retry_hints = Arc::new(Mutex::new(Vec::<f64>::new()));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let reads = {
        let reader = Kiosk::connect(addr, "test", "reader-2", Version::V4).await;
        let id = probe_id.clone();
        tokio::spawn(async move { status_latencies(&reader, &id, end).await })
    };
    let mut sent = 0u64;
    let mut handles = Vec::new();
    let mut next = Instant::now();
    while Instant::now() < end {
        let k = kiosks[(sent % 16) as usize].clone();
        let (accepted, busy, hints) = (accepted.clone(), busy.clone(), retry_hints.clone());
        let n = sent;
        handles.push(tokio::spawn(async move {
            let a = k.create(k.call_body(&format!("over-{n}"))).await;
            if a["ok"] == true {
                accepted.fetch_add(1, Ordering::Relaxed);
            } else if a["error"]["code"] == "busy" {
                busy.fetch_add(1, Ordering::Relaxed);
                if let Some(ms) = a["error"]["retry_after_ms"].as_f64() {
                    hints.lock().unwrap().push(ms);
                }
            }
        }));
        sent += 1;
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    for h in handles {
        let _ = h.await;
    }
    let mut under = reads.await.unwrap();
    let elapsed = start.elapsed().as_secs_f64();

    // 4. Recovery: how long until a new call is accepted again.
    let t = Instant::now();
    let mut i = 0;
    loop {
        i += 1;
        let a = reader.create(reader.call_body(&format!("after-{i}"))).await;
        if a["ok"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered_ms = t.elapsed().as_secs_f64() * 1000.0;

    let (acc, bsy) = (
        accepted.load(Ordering::Relaxed),
        busy.load(Ordering::Relaxed),
    );
    let mut hints = retry_hints.lock().unwrap().clone();
    let idle_p99 = pct(&mut idle, 0.99);
    let under_p99 = pct(&mut under, 0.99);
    println!("sustainable (flat out, 64 in flight): {sustainable:.0} calls/s");
    println!(
        "offered: {:.0} calls/s ({mult}x) for {elapsed:.1} s: {sent} sent, {acc} accepted ({:.0}/s), {bsy} busy ({:.1} %)",
        sent as f64 / elapsed,
        acc as f64 / elapsed,
        100.0 * bsy as f64 / sent.max(1) as f64
    );
    println!(
        "retry_after_ms given: p50 {:.0}, p99 {:.0}",
        pct(&mut hints, 0.5),
        pct(&mut hints, 0.99)
    );
    println!(
        "status read latency, ms: idle p50 {:.2} p99 {:.2} ({} reads); under overload p50 {:.2} p99 {:.2} ({} reads); p99 ratio {:.1}",
        pct(&mut idle, 0.5),
        idle_p99,
        idle.len(),
        pct(&mut under, 0.5),
        under_p99,
        under.len(),
        under_p99 / idle_p99
    );
    println!("new calls accepted again {recovered_ms:.0} ms after the flood stopped");
    d.shutdown(Duration::from_secs(30)).await.unwrap();
}
