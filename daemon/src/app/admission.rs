//! Admission control for new calls: decides at once, before any database work, whether a
//! `calls/create` may go in. Refusals are `busy` answers with a `retry_after_ms` that reflects
//! the backlog (with jitter, so kiosks do not retry in step). Shedding only ever refuses new
//! work; what was accepted is never dropped.
//!
//! Three limits and one breaker:
//! - per client (kiosk) a token bucket: a kiosk stuck in a retry loop cannot crowd out the
//!   others;
//! - work in flight: the dispatch loop's queue, the store writer's queue, calls waiting for
//!   a courier;
//! - a circuit breaker (closed → open → half-open) around acceptance, opened by sustained
//!   overload (share of refusals in a window) or by store commits slower than a threshold.
//!   While open every create is refused cheaply; after `open_ms` a few probes go through
//!   and close it again when the daemon keeps up.

use std::collections::HashMap;

use pickup_protocol::Millis;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::breaker::{Breaker, BreakerConfig, BreakerState, Transition};

/// `[admission]` settings (all reloadable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Sustained create requests per second allowed per client (kiosk).
    pub per_client_rate: f64,
    /// Burst allowed per client.
    pub per_client_burst: f64,
    /// Share of a queue's capacity (dispatch loop, store writer) beyond which creates are
    /// refused.
    pub queue_high_water: f64,
    /// A store commit slower than this opens the breaker, milliseconds.
    pub commit_latency_ms: u64,
    /// Estimated cost of one queued item, for `retry_after_ms`, milliseconds.
    pub item_cost_ms: f64,
    /// The acceptance breaker.
    pub breaker: BreakerConfig,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            per_client_rate: 20.0,
            per_client_burst: 40.0,
            queue_high_water: 0.8,
            commit_latency_ms: 1_000,
            item_cost_ms: 2.0,
            breaker: BreakerConfig {
                consecutive_failures: 0,
                failure_ratio: Some(0.5),
                window_ms: 5_000,
                min_calls: 50,
                open_ms: 2_000,
                max_open_ms: Some(15_000),
                half_open_probes: 10,
            },
        }
    }
}

impl AdmissionConfig {
    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.per_client_rate.is_finite() && self.per_client_rate > 0.0) {
            return Err("admission.per_client_rate: must be a positive number".into());
        }
        if !(self.per_client_burst.is_finite() && self.per_client_burst >= 1.0) {
            return Err("admission.per_client_burst: must be at least 1".into());
        }
        if !(self.queue_high_water > 0.0 && self.queue_high_water <= 1.0) {
            return Err("admission.queue_high_water: must be in (0, 1]".into());
        }
        if !(self.item_cost_ms.is_finite() && self.item_cost_ms >= 0.0) {
            return Err("admission.item_cost_ms: must be a non-negative number".into());
        }
        self.breaker.validate("admission.breaker")
    }
}

/// The load figures admission looks at, read from the live counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    /// Messages waiting for the dispatch loop.
    pub inbound_queued: usize,
    /// Its capacity.
    pub inbound_capacity: usize,
    /// Jobs waiting for the store writer.
    pub writer_queued: usize,
    /// Its capacity.
    pub writer_capacity: usize,
    /// Calls waiting for a courier.
    pub dispatching: usize,
    /// Their limit.
    pub max_dispatching: usize,
    /// The last commit's duration, microseconds.
    pub last_commit_us: u64,
}

/// Why a create was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// When to try again.
    pub retry_after_ms: u64,
    /// For the answer's message.
    pub why: &'static str,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Millis,
}

/// Admission state; owned by the inbound task (no locking).
pub struct Admission {
    cfg: AdmissionConfig,
    breaker: Breaker,
    buckets: HashMap<String, Bucket>,
    last_sweep: Millis,
}

const MAX_RETRY_MS: u64 = 30_000;

fn jitter(base: u64) -> u64 {
    base + rand::rng().random_range(0..=base / 2)
}

impl Admission {
    /// A closed breaker and empty buckets.
    pub fn new(cfg: AdmissionConfig) -> Self {
        Self {
            breaker: Breaker::new(cfg.breaker.clone()),
            cfg,
            buckets: HashMap::new(),
            last_sweep: 0,
        }
    }

    /// New settings (SIGHUP); the breaker keeps its state unless its thresholds changed.
    pub fn set_config(&mut self, cfg: AdmissionConfig) {
        if cfg.breaker != self.cfg.breaker {
            self.breaker = Breaker::new(cfg.breaker.clone());
        }
        self.cfg = cfg;
    }

    /// The breaker's state (after advancing time).
    pub fn state(&mut self, now: Millis) -> (BreakerState, Option<Transition>) {
        let t = self.breaker.poll(now);
        (self.breaker.state(), t)
    }

    fn take_token(&mut self, client: &str, now: Millis) -> Result<(), u64> {
        let (rate, burst) = (self.cfg.per_client_rate, self.cfg.per_client_burst);
        if now.saturating_sub(self.last_sweep) > 60_000 {
            // Forget clients that have been quiet long enough to have a full bucket.
            let full_after = ((burst / rate) * 1000.0) as Millis;
            self.buckets
                .retain(|_, b| now.saturating_sub(b.at) < full_after);
            self.last_sweep = now;
        }
        let b = self.buckets.entry(client.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_sub(b.at).max(0) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / rate * 1000.0).ceil() as u64)
        }
    }

    /// Decides one create from `client` under `load`. Returns the refusal (if any) and a
    /// breaker transition to report (if one happened).
    pub fn admit(
        &mut self,
        client: &str,
        load: Load,
        now: Millis,
    ) -> (Result<(), Refusal>, Option<Transition>) {
        if !self.breaker.allow(now) {
            let wait = self.breaker.retry_after_ms(now).max(100);
            return (
                Err(Refusal {
                    retry_after_ms: jitter(wait).min(MAX_RETRY_MS),
                    why: "pickupd is shedding load; retry later",
                }),
                None,
            );
        }
        if let Err(wait) = self.take_token(client, now) {
            // A client over its own rate says nothing about the daemon's health: no outcome
            // for the breaker (the permit is handed back as a success).
            let t = self.breaker.on_success(now);
            return (
                Err(Refusal {
                    retry_after_ms: jitter(wait.max(50)).min(MAX_RETRY_MS),
                    why: "too many requests from this client",
                }),
                t,
            );
        }
        let hw = self.cfg.queue_high_water;
        let full = |q: usize, cap: usize| cap > 0 && q as f64 >= hw * cap as f64;
        let backlog = load.inbound_queued + load.writer_queued;
        let backlog_ms = (backlog as f64 * self.cfg.item_cost_ms) as u64;
        let overloaded = if full(load.inbound_queued, load.inbound_capacity) {
            Some("the request queue is full")
        } else if full(load.writer_queued, load.writer_capacity) {
            Some("the store is behind")
        } else if load.max_dispatching > 0 && load.dispatching >= load.max_dispatching {
            Some("too many calls are waiting for a courier")
        } else {
            None
        };
        if load.last_commit_us / 1000 > self.cfg.commit_latency_ms {
            let t = self.breaker.trip(now);
            return (
                Err(Refusal {
                    retry_after_ms: jitter(
                        self.breaker.retry_after_ms(now).max(backlog_ms).max(200),
                    )
                    .min(MAX_RETRY_MS),
                    why: "the store is slow; retry later",
                }),
                t,
            );
        }
        match overloaded {
            Some(why) => {
                let t = self.breaker.on_failure(now);
                (
                    Err(Refusal {
                        retry_after_ms: jitter(backlog_ms.max(200)).min(MAX_RETRY_MS),
                        why,
                    }),
                    t,
                )
            }
            None => (Ok(()), self.breaker.on_success(now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle() -> Load {
        Load {
            inbound_capacity: 100,
            writer_capacity: 100,
            max_dispatching: 10,
            ..Load::default()
        }
    }

    #[test]
    fn per_client_bucket_limits_one_kiosk_only() {
        let mut a = Admission::new(AdmissionConfig {
            per_client_rate: 2.0,
            per_client_burst: 3.0,
            ..AdmissionConfig::default()
        });
        for _ in 0..3 {
            assert!(a.admit("k1", idle(), 0).0.is_ok());
        }
        let (r, _) = a.admit("k1", idle(), 0);
        let r = r.unwrap_err();
        assert!((500..=750).contains(&r.retry_after_ms), "{r:?}");
        assert!(
            a.admit("k2", idle(), 0).0.is_ok(),
            "other kiosks unaffected"
        );
        assert!(a.admit("k1", idle(), 500).0.is_ok(), "refilled after 0.5 s");
    }

    #[test]
    fn sustained_overload_opens_then_probes_close() {
        let mut a = Admission::new(AdmissionConfig {
            per_client_rate: 1e9,
            per_client_burst: 1e9,
            ..AdmissionConfig::default()
        });
        let mut busy = idle();
        busy.inbound_queued = 95;
        let mut opened = None;
        for i in 0..100 {
            let (r, t) = a.admit("k", busy, i);
            let r = r.unwrap_err();
            assert!(r.retry_after_ms >= 200, "{r:?}");
            if let Some(t) = t {
                opened = Some(t);
                break;
            }
        }
        let t = opened.expect("breaker opened");
        assert_eq!(t.to, BreakerState::Open);
        // Open: refused even when idle, cheaply.
        assert!(a.admit("k", idle(), 200).0.is_err());
        // After open_ms, probes go through; enough successes close it.
        let mut closed = false;
        for i in 0..20 {
            let (r, t) = a.admit("k", idle(), 3_000 + i);
            if r.is_ok() {
                if let Some(t) = t {
                    assert_eq!(t.to, BreakerState::Closed);
                    closed = true;
                }
            }
        }
        assert!(closed);
        assert!(a.admit("k", idle(), 4_000).0.is_ok());
    }

    #[test]
    fn slow_commits_trip_the_breaker_and_retry_reflects_backlog() {
        let mut a = Admission::new(AdmissionConfig::default());
        let mut slow = idle();
        slow.last_commit_us = 2_000_000;
        let (r, t) = a.admit("k", slow, 0);
        assert!(r.is_err());
        assert_eq!(t.unwrap().to, BreakerState::Open);

        let mut a = Admission::new(AdmissionConfig::default());
        let mut backlog = idle();
        backlog.writer_queued = 90;
        backlog.inbound_queued = 10;
        backlog.writer_capacity = 100;
        let r = a.admit("k", backlog, 0).0.unwrap_err();
        // 100 items × 2 ms = 200 ms, plus up to half again of jitter.
        assert!((200..=300).contains(&r.retry_after_ms), "{r:?}");
        let mut waiting = idle();
        waiting.dispatching = 10;
        assert_eq!(
            a.admit("k", waiting, 1).0.unwrap_err().why,
            "too many calls are waiting for a courier"
        );
    }
}
