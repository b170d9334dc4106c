//! Candidate search micro-benchmark: the daemon's grid index against the linear scan it
//! must agree with, among many couriers, on the same queries; every answer is compared.

use std::collections::{BTreeSet, HashMap};
use std::hint::black_box;
use std::time::Instant;

use pickup_protocol::{ParcelClass, Vehicle};
use pickupd::dispatch::assign::{best_linear, GridIndex, Need};
use pickupd::dispatch::Courier;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::stats::{median, Summary};

/// One scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct SearchResult {
    /// How the couriers are spread.
    pub scenario: String,
    /// Couriers in memory.
    pub couriers: usize,
    /// Search radius, metres.
    pub radius_m: f64,
    /// Queries (each run with both methods).
    pub queries: usize,
    /// Per query, grid index.
    pub grid: Summary,
    /// Per query, linear scan.
    pub linear: Summary,
    /// Median linear time / median grid time, over the rounds.
    pub speedup_median: f64,
    /// Answers that differed between the two (must be 0).
    pub mismatches: usize,
    /// Queries that found a courier.
    pub found: usize,
}

fn fleet(n: usize, lat0: f64, lon0: f64, span_deg: f64, rng: &mut SmallRng) -> Vec<Courier> {
    let vehicles = [
        Vehicle::Bicycle,
        Vehicle::Scooter,
        Vehicle::Car,
        Vehicle::Van,
    ];
    (0..n)
        .map(|i| {
            let mut c = Courier::new(&format!("c{i:06}"), rng.random_range(0..1_000_000));
            // Most are online and free; some are not, as on a real shift.
            c.online = rng.random_bool(0.9);
            c.available = rng.random_bool(0.9);
            if rng.random_bool(0.2) {
                c.active_call = Some("busy".into());
            }
            c.vehicle = Some(vehicles[rng.random_range(0..vehicles.len())]);
            c.lat = Some(lat0 + rng.random::<f64>() * span_deg);
            c.lon = Some(lon0 + rng.random::<f64>() * span_deg);
            c.location_at = Some(1_000_000);
            c
        })
        .collect()
}

/// Runs one scenario: `n` couriers spread uniformly over a `span_deg` square, `queries`
/// random pickup points inside it, `rounds` passes over all queries with each method.
pub fn search(
    scenario: &str,
    n: usize,
    span_deg: f64,
    radius_m: f64,
    queries: usize,
    rounds: usize,
) -> SearchResult {
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let (lat0, lon0) = (37.0, 126.5);
    let list = fleet(n, lat0, lon0, span_deg, &mut rng);
    let mut grid = GridIndex::default();
    let mut map = HashMap::with_capacity(n);
    for c in &list {
        if let (Some(la), Some(lo)) = (c.lat, c.lon) {
            grid.update(&c.id, la, lo);
        }
        map.insert(c.id.clone(), Box::new(c.clone()));
    }
    // The linear scan gets its best case: the couriers side by side in memory.
    let flat = list;
    let excluded = BTreeSet::new();
    let points: Vec<(f64, f64, ParcelClass)> = (0..queries)
        .map(|_| {
            (
                lat0 + rng.random::<f64>() * span_deg,
                lon0 + rng.random::<f64>() * span_deg,
                if rng.random_bool(0.2) {
                    ParcelClass::Heavy
                } else {
                    ParcelClass::Light
                },
            )
        })
        .collect();
    let now = 1_000_500;
    let need = |&(lat, lon, class): &(f64, f64, ParcelClass)| Need {
        lat,
        lon,
        class,
        radius_m,
        excluded: &excluded,
        location_max_age_ms: 300_000,
    };
    let mut mismatches = 0;
    let mut found = 0;
    for p in &points {
        let a = best_linear(flat.iter(), &need(p), now);
        let b = grid.best(&map, &need(p), now);
        if a != b {
            mismatches += 1;
        }
        found += usize::from(a.is_some());
    }
    let mut g_all = Vec::with_capacity(queries * rounds);
    let mut l_all = Vec::with_capacity(queries * rounds);
    let mut ratios = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        for p in &points {
            let t0 = Instant::now();
            black_box(grid.best(&map, &need(p), now));
            g_all.push(t0.elapsed());
        }
        let g = t.elapsed();
        let t = Instant::now();
        for p in &points {
            let t0 = Instant::now();
            black_box(best_linear(flat.iter(), &need(p), now));
            l_all.push(t0.elapsed());
        }
        let l = t.elapsed();
        ratios.push(l.as_secs_f64() / g.as_secs_f64().max(1e-12));
    }
    SearchResult {
        scenario: scenario.into(),
        couriers: n,
        radius_m,
        queries,
        grid: Summary::of(&mut g_all),
        linear: Summary::of(&mut l_all),
        speedup_median: median(&ratios),
        mismatches,
        found,
    }
}

/// The default scenarios: 100k couriers over a metropolitan region (about 110 × 90 km,
/// the case the index is for), and the same number packed into one city district (about
/// 11 × 9 km, where a 5 km radius covers most of them and no index can help much).
pub fn run(n: usize, queries: usize, rounds: usize) -> Vec<SearchResult> {
    vec![
        search("region 1.0 deg square", n, 1.0, 5_000.0, queries, rounds),
        search("district 0.1 deg square", n, 0.1, 5_000.0, queries, rounds),
    ]
}

/// Per-query medians in microseconds, for the table.
pub fn us(d: f64) -> String {
    format!("{:.1} us", d * 1e3)
}
