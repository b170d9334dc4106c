//! A small circuit breaker, shared by everything that must stop waiting on something that
//! keeps failing: dispatch acceptance under overload, the Modbus scale and the notification
//! relay.
//!
//! Closed: requests flow and outcomes are counted. Enough failures (a run of consecutive
//! failures, or a failure share over a sliding time window) open it. Open: [`Breaker::allow`]
//! says no, so callers take their fallback at once instead of waiting. After the open time,
//! the breaker goes half-open and lets a few probes through; if they all succeed it closes,
//! if one fails it opens again (for longer, when `max_open_ms` allows it).
//!
//! There is no clock and no task inside: every method takes `now`, a monotonic millisecond
//! count chosen by the caller (for example milliseconds since the daemon started). That makes
//! the state machine testable with a fake clock and usable from sync and async code alike.
//! Each change of state is returned as a [`Transition`] and handed to an optional observer,
//! so callers can log it, publish it and count it.

use std::fmt;

use pickup_protocol::Millis;
use serde::{Deserialize, Serialize};

/// Number of buckets the failure-ratio window is divided into; the window slides by one
/// bucket at a time, so memory stays constant whatever the request rate.
const WINDOW_BUCKETS: usize = 10;

/// Thresholds of one breaker. Every field has a default, so a config may set only a few.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// This many failures in a row open the breaker; 0 turns the rule off. Catches a
    /// dependency that is plainly down.
    pub consecutive_failures: u32,
    /// Share of failures (0 < r ≤ 1) within `window_ms` that opens the breaker; absent turns
    /// the rule off. Catches a dependency that fails often without failing every time.
    pub failure_ratio: Option<f64>,
    /// Length of the sliding window the ratio is measured over, in milliseconds.
    pub window_ms: u64,
    /// Fewest outcomes in the window before the ratio rule may open the breaker, so that
    /// one failure out of two requests does not count as "50 % failing".
    pub min_calls: u32,
    /// How long the breaker stays open before it lets probes through, in milliseconds.
    pub open_ms: u64,
    /// When set, each failed probe doubles the open time up to this many milliseconds, so a
    /// dependency that stays down is probed less and less often.
    pub max_open_ms: Option<u64>,
    /// Probes let through while half-open; this many successes close the breaker.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_ratio: None,
            window_ms: 10_000,
            min_calls: 20,
            open_ms: 5_000,
            max_open_ms: None,
            half_open_probes: 1,
        }
    }
}

impl BreakerConfig {
    /// Checks the thresholds; `key` is where this table sits in the config file
    /// (say `scales[0].breaker`) so the message tells what to fix.
    pub fn validate(&self, key: &str) -> Result<(), String> {
        if let Some(r) = self.failure_ratio {
            if !(r.is_finite() && r > 0.0 && r <= 1.0) {
                return Err(format!(
                    "{key}.failure_ratio: must be above 0 and at most 1, got {r}"
                ));
            }
        }
        if self.consecutive_failures == 0 && self.failure_ratio.is_none() {
            return Err(format!(
                "{key}.consecutive_failures: 0 turns the only opening rule off; set it above 0 or set failure_ratio"
            ));
        }
        if self.failure_ratio.is_some() && self.window_ms == 0 {
            return Err(format!(
                "{key}.window_ms: must be above 0 when failure_ratio is set"
            ));
        }
        if self.open_ms == 0 {
            return Err(format!("{key}.open_ms: must be above 0"));
        }
        if let Some(max) = self.max_open_ms {
            if max < self.open_ms {
                return Err(format!(
                    "{key}.max_open_ms: {max} is below open_ms {}",
                    self.open_ms
                ));
            }
        }
        if self.half_open_probes == 0 {
            return Err(format!("{key}.half_open_probes: must be at least 1"));
        }
        Ok(())
    }
}

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Requests are refused at once; callers take their fallback.
    Open,
    /// A few probes are let through to see whether the dependency is back.
    HalfOpen,
}

impl BreakerState {
    /// Stable lowercase name (logs, metrics, status topics).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a breaker changed state: goes into the log line and the published state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum TransitionReason {
    /// A run of failures reached `consecutive_failures`.
    ConsecutiveFailures {
        /// Length of the run.
        count: u32,
    },
    /// The failure share over the window reached `failure_ratio`.
    FailureRatio {
        /// Failures in the window.
        failures: u32,
        /// Outcomes in the window.
        total: u32,
    },
    /// Opened by the caller ([`Breaker::trip`]), e.g. commit latency over its limit.
    Tripped,
    /// The open time passed; probes may go through.
    OpenElapsed,
    /// Every probe succeeded.
    ProbesSucceeded,
    /// A probe failed.
    ProbeFailed,
    /// Closed by the caller ([`Breaker::reset`]).
    Reset,
}

impl fmt::Display for TransitionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConsecutiveFailures { count } => write!(f, "{count} consecutive failures"),
            Self::FailureRatio { failures, total } => {
                write!(f, "{failures} of {total} recent requests failed")
            }
            Self::Tripped => f.write_str("tripped"),
            Self::OpenElapsed => f.write_str("open time elapsed"),
            Self::ProbesSucceeded => f.write_str("probes succeeded"),
            Self::ProbeFailed => f.write_str("probe failed"),
            Self::Reset => f.write_str("reset"),
        }
    }
}

/// One change of state, for logs, metrics and the published daemon state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// State before.
    pub from: BreakerState,
    /// State after.
    pub to: BreakerState,
    /// The caller's `now` when it happened.
    pub at: Millis,
    /// Why.
    pub reason: TransitionReason,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} ({})", self.from, self.to, self.reason)
    }
}

/// Callback invoked on every transition.
type Observer = Box<dyn FnMut(&Transition) + Send>;

/// Outcome counts of one slice of the sliding window.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which slice of time (`now / bucket_ms`) the counts belong to.
    epoch: i64,
    successes: u32,
    failures: u32,
}

/// The closed → open → half-open state machine. Not thread-safe by itself: wrap it in a
/// mutex or keep it inside one task.
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    /// Failures since the last success (closed state).
    consecutive: u32,
    /// Sliding window for the ratio rule.
    buckets: [Bucket; WINDOW_BUCKETS],
    /// When the open state ends and probes may go through.
    open_until: Millis,
    /// How many times in a row a probe failed; grows the open time.
    reopens: u32,
    /// When the half-open state began (to re-issue probes whose outcome never came).
    half_open_since: Millis,
    /// Probes handed out in this half-open period.
    probes_issued: u32,
    /// Probes that came back successful in this half-open period.
    probe_successes: u32,
    observer: Option<Observer>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state)
            .field("consecutive", &self.consecutive)
            .field("open_until", &self.open_until)
            .field("reopens", &self.reopens)
            .field("probes_issued", &self.probes_issued)
            .field("probe_successes", &self.probe_successes)
            .finish_non_exhaustive()
    }
}

impl Breaker {
    /// A closed breaker with these thresholds. Call [`BreakerConfig::validate`] on
    /// configured values first; nonsensical values are clamped here rather than refused.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: BreakerState::Closed,
            consecutive: 0,
            buckets: [Bucket::default(); WINDOW_BUCKETS],
            open_until: 0,
            reopens: 0,
            half_open_since: 0,
            probes_issued: 0,
            probe_successes: 0,
            observer: None,
        }
    }

    /// Calls `f` on every transition (log it, publish it, count it).
    pub fn with_observer(mut self, f: impl FnMut(&Transition) + Send + 'static) -> Self {
        self.observer = Some(Box::new(f));
        self
    }

    /// The thresholds in force.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// The state as of the last call. An open breaker whose time has passed turns
    /// half-open on the next [`Breaker::allow`] or [`Breaker::poll`].
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Failures since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// Milliseconds until an open breaker lets probes through (0 when not open): the
    /// honest `retry_after_ms` for callers refused because of it.
    pub fn retry_after_ms(&self, now: Millis) -> u64 {
        match self.state {
            BreakerState::Open => u64::try_from(self.open_until.saturating_sub(now)).unwrap_or(0),
            _ => 0,
        }
    }

    /// Advances time-driven changes (open → half-open) without asking for a permit;
    /// for status displays that want a current state.
    pub fn poll(&mut self, now: Millis) -> Option<Transition> {
        if self.state == BreakerState::Open && now >= self.open_until {
            self.half_open_since = now;
            self.probes_issued = 0;
            self.probe_successes = 0;
            return self.go(BreakerState::HalfOpen, now, TransitionReason::OpenElapsed);
        }
        None
    }

    /// Whether a request may go out now. Each `true` must be followed by
    /// [`Breaker::on_success`] or [`Breaker::on_failure`] once the outcome is known.
    pub fn allow(&mut self, now: Millis) -> bool {
        self.poll(now);
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => {
                // Probes whose outcome never came back (the caller gave up on them) must not
                // keep the breaker half-open forever: after an open period, hand out new ones.
                if self.probes_issued >= self.config.half_open_probes.max(1)
                    && now.saturating_sub(self.half_open_since) >= self.current_open_ms()
                {
                    self.half_open_since = now;
                    self.probes_issued = self.probe_successes;
                }
                if self.probes_issued < self.config.half_open_probes.max(1) {
                    self.probes_issued += 1;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Records a success. Closes a half-open breaker once enough probes succeeded.
    pub fn on_success(&mut self, now: Millis) -> Option<Transition> {
        match self.state {
            BreakerState::Closed => {
                self.consecutive = 0;
                self.bucket(now).successes += 1;
                None
            }
            // A late answer to a request sent before the breaker opened says little about now.
            BreakerState::Open => None,
            BreakerState::HalfOpen => {
                self.probe_successes += 1;
                if self.probe_successes >= self.config.half_open_probes.max(1) {
                    self.consecutive = 0;
                    self.reopens = 0;
                    self.buckets = [Bucket::default(); WINDOW_BUCKETS];
                    self.go(BreakerState::Closed, now, TransitionReason::ProbesSucceeded)
                } else {
                    None
                }
            }
        }
    }

    /// Records a failure. May open the breaker.
    pub fn on_failure(&mut self, now: Millis) -> Option<Transition> {
        match self.state {
            BreakerState::Closed => {
                self.consecutive = self.consecutive.saturating_add(1);
                self.bucket(now).failures += 1;
                let limit = self.config.consecutive_failures;
                if limit > 0 && self.consecutive >= limit {
                    let reason = TransitionReason::ConsecutiveFailures {
                        count: self.consecutive,
                    };
                    return self.open(now, reason);
                }
                if let Some(ratio) = self.config.failure_ratio {
                    let (failures, total) = self.window_counts(now);
                    if total >= self.config.min_calls.max(1)
                        && f64::from(failures) >= ratio * f64::from(total)
                    {
                        return self.open(now, TransitionReason::FailureRatio { failures, total });
                    }
                }
                None
            }
            BreakerState::Open => None,
            BreakerState::HalfOpen => {
                self.reopens = self.reopens.saturating_add(1);
                self.open(now, TransitionReason::ProbeFailed)
            }
        }
    }

    /// Opens the breaker now, whatever the counts say (for signals the caller measures
    /// itself, such as store commit latency over its limit). Already open: extends nothing.
    pub fn trip(&mut self, now: Millis) -> Option<Transition> {
        match self.state {
            BreakerState::Open => None,
            _ => self.open(now, TransitionReason::Tripped),
        }
    }

    /// Closes the breaker and forgets all counts (an operator's "try again now").
    pub fn reset(&mut self, now: Millis) -> Option<Transition> {
        self.consecutive = 0;
        self.reopens = 0;
        self.buckets = [Bucket::default(); WINDOW_BUCKETS];
        if self.state == BreakerState::Closed {
            return None;
        }
        self.go(BreakerState::Closed, now, TransitionReason::Reset)
    }

    /// Open time for the current run of failed probes.
    fn current_open_ms(&self) -> i64 {
        let base = self.config.open_ms.max(1);
        let ms = match self.config.max_open_ms {
            Some(max) => {
                let factor = 1u64.checked_shl(self.reopens.min(32)).unwrap_or(u64::MAX);
                base.saturating_mul(factor).min(max.max(base))
            }
            None => base,
        };
        i64::try_from(ms).unwrap_or(i64::MAX)
    }

    fn open(&mut self, now: Millis, reason: TransitionReason) -> Option<Transition> {
        self.open_until = now.saturating_add(self.current_open_ms());
        self.probes_issued = 0;
        self.probe_successes = 0;
        self.go(BreakerState::Open, now, reason)
    }

    fn go(
        &mut self,
        to: BreakerState,
        now: Millis,
        reason: TransitionReason,
    ) -> Option<Transition> {
        if self.state == to {
            return None;
        }
        let t = Transition {
            from: self.state,
            to,
            at: now,
            reason,
        };
        self.state = to;
        if let Some(observer) = self.observer.as_mut() {
            observer(&t);
        }
        Some(t)
    }

    fn bucket_ms(&self) -> i64 {
        let per = self.config.window_ms / WINDOW_BUCKETS as u64;
        i64::try_from(per.max(1)).unwrap_or(i64::MAX)
    }

    /// The bucket for `now`, emptied first if it still holds an older slice of time.
    fn bucket(&mut self, now: Millis) -> &mut Bucket {
        let epoch = now.div_euclid(self.bucket_ms());
        let slot = usize::try_from(epoch.rem_euclid(WINDOW_BUCKETS as i64)).unwrap_or(0);
        let b = &mut self.buckets[slot];
        if b.epoch != epoch {
            *b = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        b
    }

    /// (failures, total) over the buckets that still lie inside the window.
    fn window_counts(&self, now: Millis) -> (u32, u32) {
        let epoch = now.div_euclid(self.bucket_ms());
        let oldest = epoch - (WINDOW_BUCKETS as i64 - 1);
        self.buckets
            .iter()
            .filter(|b| b.epoch >= oldest && b.epoch <= epoch)
            .fold((0u32, 0u32), |(f, t), b| {
                (
                    f.saturating_add(b.failures),
                    t.saturating_add(b.failures).saturating_add(b.successes),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_ratio: None,
            window_ms: 1_000,
            min_calls: 4,
            open_ms: 100,
            max_open_ms: None,
            half_open_probes: 1,
        }
    }

    #[test]
    fn defaults_are_valid_and_parse_from_a_partial_table() {
        BreakerConfig::default().validate("b").unwrap();
        let c: BreakerConfig = toml::from_str("open_ms = 250\nfailure_ratio = 0.5").unwrap();
        assert_eq!(c.open_ms, 250);
        assert_eq!(c.failure_ratio, Some(0.5));
        assert_eq!(c.consecutive_failures, 5);
        c.validate("b").unwrap();
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = toml::from_str::<BreakerConfig>("open_secs = 1").unwrap_err();
        assert!(e.to_string().contains("open_secs"), "{e}");
        let bad = |f: fn(&mut BreakerConfig), key: &str| {
            let mut c = cfg();
            f(&mut c);
            let e = c.validate("relay.breaker").unwrap_err();
            assert!(e.starts_with(&format!("relay.breaker.{key}:")), "{e}");
        };
        bad(|c| c.failure_ratio = Some(1.5), "failure_ratio");
        bad(|c| c.failure_ratio = Some(f64::NAN), "failure_ratio");
        bad(|c| c.consecutive_failures = 0, "consecutive_failures");
        bad(|c| c.open_ms = 0, "open_ms");
        bad(|c| c.max_open_ms = Some(10), "max_open_ms");
        bad(|c| c.half_open_probes = 0, "half_open_probes");
        bad(
            |c| {
                c.failure_ratio = Some(0.5);
                c.window_ms = 0;
            },
            "window_ms",
        );
    }

    #[test]
    fn consecutive_failures_open_and_a_success_resets_the_run() {
        let mut b = Breaker::new(cfg());
        assert!(b.allow(0));
        assert_eq!(b.on_failure(0), None);
        assert_eq!(b.on_failure(1), None);
        assert_eq!(b.on_success(2), None);
        assert_eq!(b.consecutive_failures(), 0);
        assert_eq!(b.on_failure(3), None);
        assert_eq!(b.on_failure(4), None);
        let t = b.on_failure(5).unwrap();
        assert_eq!(t.from, BreakerState::Closed);
        assert_eq!(t.to, BreakerState::Open);
        assert_eq!(t.at, 5);
        assert_eq!(t.reason, TransitionReason::ConsecutiveFailures { count: 3 });
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow(6));
        assert_eq!(b.retry_after_ms(6), 99);
    }

    #[test]
    fn open_turns_half_open_after_open_ms_and_one_probe_closes_it() {
        let mut b = Breaker::new(cfg());
        for t in 0..3 {
            b.on_failure(t);
        }
        assert!(!b.allow(101), "open until 2 + 100");
        assert!(b.allow(102));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.allow(103), "only one probe at a time");
        let t = b.on_success(104).unwrap();
        assert_eq!(
            (t.from, t.to, t.reason),
            (
                BreakerState::HalfOpen,
                BreakerState::Closed,
                TransitionReason::ProbesSucceeded
            )
        );
        assert!(b.allow(105));
        assert_eq!(b.retry_after_ms(105), 0);
    }

    #[test]
    fn a_failed_probe_reopens_for_a_full_open_period() {
        let mut b = Breaker::new(cfg());
        for t in 0..3 {
            b.on_failure(t);
        }
        assert!(b.allow(200));
        let t = b.on_failure(201).unwrap();
        assert_eq!(t.reason, TransitionReason::ProbeFailed);
        assert_eq!(t.to, BreakerState::Open);
        assert!(!b.allow(300));
        assert!(b.allow(301));
    }

    #[test]
    fn failed_probes_double_the_open_time_up_to_the_cap() {
        let mut b = Breaker::new(BreakerConfig {
            max_open_ms: Some(350),
            ..cfg()
        });
        for t in 0..3 {
            b.on_failure(t);
        }
        // opened at 2 for 100
        assert!(b.allow(102));
        b.on_failure(102); // reopen for 200
        assert!(!b.allow(301));
        assert!(b.allow(302));
        b.on_failure(302); // reopen for 400, capped at 350
        assert_eq!(b.retry_after_ms(302), 350);
        assert!(!b.allow(651));
        assert!(b.allow(652));
        b.on_success(653);
        assert_eq!(b.state(), BreakerState::Closed);
        // After closing, the open time starts from open_ms again.
        for t in 700..703 {
            b.on_failure(t);
        }
        assert_eq!(b.retry_after_ms(702), 100);
    }

    #[test]
    fn several_probes_must_all_succeed() {
        let mut b = Breaker::new(BreakerConfig {
            half_open_probes: 3,
            ..cfg()
        });
        for t in 0..3 {
            b.on_failure(t);
        }
        assert!(b.allow(200));
        assert!(b.allow(200));
        assert!(b.allow(200));
        assert!(!b.allow(200), "a fourth probe is refused");
        assert_eq!(b.on_success(201), None);
        assert_eq!(b.on_success(201), None);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.on_success(202).unwrap().to, BreakerState::Closed);
    }

    #[test]
    fn probes_that_never_report_are_reissued_after_an_open_period() {
        let mut b = Breaker::new(cfg());
        for t in 0..3 {
            b.on_failure(t);
        }
        assert!(b.allow(200));
        // The caller dropped the probe without reporting.
        assert!(!b.allow(250));
        assert!(!b.allow(299));
        assert!(b.allow(300));
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn outcomes_reported_while_open_change_nothing() {
        let mut b = Breaker::new(cfg());
        for t in 0..3 {
            b.on_failure(t);
        }
        assert_eq!(b.on_success(10), None);
        assert_eq!(b.on_failure(11), None);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.retry_after_ms(11), 91);
    }

    #[test]
    fn failure_ratio_opens_only_with_enough_calls_in_the_window() {
        let mut b = Breaker::new(BreakerConfig {
            consecutive_failures: 0,
            failure_ratio: Some(0.5),
            min_calls: 4,
            ..cfg()
        });
        // Alternate: never two failures in a row, but half of all calls fail.
        assert_eq!(b.on_failure(0), None, "1 call is below min_calls");
        b.on_success(10);
        assert_eq!(b.on_failure(20), None, "2 of 3 but only 3 calls");
        b.on_success(30);
        let t = b.on_failure(40).unwrap();
        assert_eq!(
            t.reason,
            TransitionReason::FailureRatio {
                failures: 3,
                total: 5
            }
        );
    }

    #[test]
    fn old_outcomes_slide_out_of_the_window() {
        let config = BreakerConfig {
            consecutive_failures: 0,
            failure_ratio: Some(0.4),
            min_calls: 4,
            ..cfg()
        };
        // The same pattern twice: a bad burst at 0, then 3 successes and 1 failure later.
        let run = |later: Millis| {
            let mut b = Breaker::new(config.clone());
            for _ in 0..3 {
                assert_eq!(b.on_failure(0), None, "below min_calls");
            }
            for _ in 0..3 {
                b.on_success(0);
            }
            for t in 0..3 {
                b.on_success(later + t);
            }
            b.on_failure(later + 3)
        };
        // Within the 1000 ms window: 4 failures of 10 calls reach the ratio.
        assert_eq!(
            run(500).map(|t| t.reason),
            Some(TransitionReason::FailureRatio {
                failures: 4,
                total: 10
            })
        );
        // 1500 ms later the burst has slid out: 1 failure of 4 calls does not.
        assert_eq!(run(1_500), None);
    }

    #[test]
    fn trip_and_reset_are_reported_and_idempotent() {
        let mut b = Breaker::new(cfg());
        let t = b.trip(50).unwrap();
        assert_eq!(t.reason, TransitionReason::Tripped);
        assert_eq!(b.trip(60), None);
        assert_eq!(b.retry_after_ms(60), 90);
        let t = b.reset(70).unwrap();
        assert_eq!((t.from, t.to), (BreakerState::Open, BreakerState::Closed));
        assert_eq!(b.reset(71), None);
        assert!(b.allow(72));
    }

    #[test]
    fn the_observer_sees_every_transition_in_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let mut b =
            Breaker::new(cfg()).with_observer(move |t| sink.lock().unwrap().push(t.to_string()));
        for t in 0..3 {
            b.on_failure(t);
        }
        b.allow(500);
        b.on_failure(501);
        b.allow(700);
        b.on_success(701);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                "closed -> open (3 consecutive failures)",
                "open -> half_open (open time elapsed)",
                "half_open -> open (probe failed)",
                "open -> half_open (open time elapsed)",
                "half_open -> closed (probes succeeded)",
            ]
        );
    }

    #[test]
    fn a_clock_that_steps_back_does_not_break_anything() {
        let mut b = Breaker::new(BreakerConfig {
            failure_ratio: Some(0.5),
            ..cfg()
        });
        b.on_failure(10_000);
        b.on_success(-5);
        b.on_failure(i64::MIN);
        b.on_failure(0);
        b.on_failure(i64::MAX);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow(0));
        assert_eq!(b.retry_after_ms(i64::MIN), u64::try_from(i64::MAX).unwrap());
    }
}
