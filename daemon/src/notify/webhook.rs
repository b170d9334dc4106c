//! The HTTP webhook sink: POSTs each customer notification to a configured URL (a
//! KakaoTalk/SMS gateway's relay), at least once, in order per call.
//!
//! The queue is the `deliveries` table (rows written in the same transaction as the
//! notification's outbox row). This task reads pending rows at start and whenever a commit
//! holds new notifications, attempts them, and records every outcome through the store
//! writer — it never writes the database itself. Rules:
//! - per call, only the oldest pending row is attempted; a later notification waits until
//!   the earlier one is delivered or dead (so "assigned" never arrives after "cancelled");
//! - a failed attempt (connect error, timeout, 408, 429, 5xx) is retried after an
//!   exponential backoff with jitter (`Retry-After` is honoured up to `backoff_max_ms`);
//!   after `max_attempts` the row is dead, with the reason;
//! - any other non-2xx answer means the receiver refuses this payload: dead at once;
//! - a breaker stops attempts while the receiver keeps failing; rows wait, their attempt
//!   budget untouched, and flow again once a probe succeeds;
//! - a row older than `max_age_s` (the news is stale) is dead without an attempt.
//!
//! `next_attempt_at` is stored, so a restarted daemon resumes where it stopped. An attempt
//! in flight when the daemon stops is made again after the restart: receivers deduplicate
//! by the notification id (also sent as `Idempotency-Key`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::header::{HeaderName, HeaderValue};
use pickup_protocol::Millis;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use super::http::{self, Answer, Endpoint, PostError};
use crate::breaker::{Breaker, BreakerConfig};
use crate::config::ConfigError;
use crate::store::deliveries::{self, Row, State, Update, WEBHOOK};
use crate::store::{now_ms, Op, Reader, WriteJob, Writer};

/// `[notifications.webhook]`: the optional HTTP sink. Restart to change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://host[:port]/path` to POST notifications to; empty turns the sink off.
    pub url: String,
    /// Extra request headers (say `Authorization`) the receiver needs.
    pub headers: BTreeMap<String, String>,
    /// Longest TCP connect, milliseconds.
    pub connect_timeout_ms: u64,
    /// Longest wait for the answer once connected, milliseconds.
    pub timeout_ms: u64,
    /// Attempts before a notification is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay, milliseconds; doubles with each failed attempt.
    pub backoff_base_ms: u64,
    /// Retry delay ceiling, milliseconds.
    pub backoff_max_ms: u64,
    /// Notifications not delivered this long after they were queued are dead-lettered
    /// (news like "the courier arrives in 5 minutes" is worthless a day later); 0 = never.
    pub max_age_s: u64,
    /// POSTs in flight at once (each for a different call).
    pub concurrency: usize,
    /// How often the queue is re-read for rows an operator re-drove, milliseconds.
    pub rescan_ms: u64,
    /// Stops attempts while the receiver keeps failing.
    pub breaker: BreakerConfig,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            headers: BTreeMap::new(),
            connect_timeout_ms: 2_000,
            timeout_ms: 5_000,
            max_attempts: 10,
            backoff_base_ms: 1_000,
            backoff_max_ms: 300_000,
            max_age_s: 86_400,
            concurrency: 4,
            rescan_ms: 2_000,
            breaker: BreakerConfig {
                consecutive_failures: 5,
                open_ms: 5_000,
                max_open_ms: Some(60_000),
                ..BreakerConfig::default()
            },
        }
    }
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: format!("notifications.webhook.{key}"),
        problem: problem.into(),
    }
}

impl WebhookConfig {
    /// Whether the sink runs.
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        Endpoint::parse(&self.url).map_err(|e| invalid("url", e))?;
        self.header_list()?;
        for (key, v) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("timeout_ms", self.timeout_ms),
            ("backoff_base_ms", self.backoff_base_ms),
            ("rescan_ms", self.rescan_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.max_attempts == 0 {
            return Err(invalid("max_attempts", "must be at least 1"));
        }
        if self.backoff_max_ms < self.backoff_base_ms {
            return Err(invalid(
                "backoff_max_ms",
                format!(
                    "{} is below backoff_base_ms {}",
                    self.backoff_max_ms, self.backoff_base_ms
                ),
            ));
        }
        if self.concurrency == 0 {
            return Err(invalid("concurrency", "must be at least 1"));
        }
        self.breaker
            .validate("notifications.webhook.breaker")
            .map_err(ConfigError::Load)
    }

    fn header_list(&self) -> Result<Vec<(HeaderName, HeaderValue)>, ConfigError> {
        self.headers
            .iter()
            .map(|(k, v)| {
                let name = HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| invalid(&format!("headers.{k}"), "not a valid header name"))?;
                let value = HeaderValue::from_str(v)
                    .map_err(|_| invalid(&format!("headers.{k}"), "not a valid header value"))?;
                Ok((name, value))
            })
            .collect()
    }
}

/// Delay before the next attempt after `attempts` failed ones: `base · 2^(attempts-1)`
/// capped at `max`, of which the upper half is random ("equal jitter": retries of many
/// notifications spread out, yet each wait still grows).
pub fn backoff_ms(attempts: u32, base: u64, max: u64, rng: &mut impl Rng) -> u64 {
    let exp = attempts.saturating_sub(1).min(32);
    let full = base.saturating_mul(1u64 << exp).min(max.max(1));
    let half = full / 2;
    half + rng.random_range(0..=full - half)
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the receiver has it.
    Delivered,
    /// Worth trying again (connect error, timeout, 408, 429, 5xx).
    Retry {
        /// What went wrong.
        error: String,
        /// The receiver's `Retry-After`, seconds.
        retry_after_s: Option<u64>,
    },
    /// The receiver refuses this payload (other 4xx, 3xx): trying again will not help.
    Refused(String),
}

/// Sorts an attempt's result into an [`Outcome`].
pub fn classify(r: Result<Answer, PostError>) -> Outcome {
    match r {
        Ok(a) if (200..300).contains(&a.status) => Outcome::Delivered,
        Ok(a) => {
            let error = if a.body.is_empty() {
                format!("HTTP {}", a.status)
            } else {
                format!("HTTP {}: {}", a.status, a.body)
            };
            if matches!(a.status, 408 | 429) || a.status >= 500 {
                Outcome::Retry {
                    error,
                    retry_after_s: a.retry_after_s,
                }
            } else {
                Outcome::Refused(error)
            }
        }
        Err(e) => Outcome::Retry {
            error: e.to_string(),
            retry_after_s: None,
        },
    }
}

/// A pending delivery as the task holds it.
#[derive(Debug, Clone)]
struct Item {
    id: String,
    call_id: String,
    payload: Vec<u8>,
    attempts: u32,
    next_attempt_at: Millis,
    /// Age is counted from here: queued, or re-driven.
    since: Millis,
    redrives: u32,
    in_flight: bool,
    last_error: Option<String>,
}

/// What to do now.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// Rows to attempt now, oldest first.
    ready: Vec<i64>,
    /// Rows too old to deliver.
    expired: Vec<i64>,
    /// When the earliest waiting row becomes due.
    next_due: Option<Millis>,
}

/// The pending rows in memory. The task's own view wins over what a rescan reads, since
/// its updates reach the file only after the writer commits them.
#[derive(Debug, Default)]
struct Queue {
    items: BTreeMap<i64, Item>,
    /// Highest `seq` read so far; rescans read only newer rows (and re-driven ones).
    max_seq: i64,
    /// Re-driven rows this task finished, with their re-drive count: a rescan racing the
    /// writer must not bring them back, while a newer re-drive must.
    finished_redriven: HashMap<i64, u32>,
}

impl Queue {
    fn merge(&mut self, rows: Vec<Row>) {
        for r in rows {
            // Rows commit in `seq` order, so an old row never re-driven is one this task
            // has (or finished): a read racing the writer, not news.
            let seen = r.seq <= self.max_seq;
            self.max_seq = self.max_seq.max(r.seq);
            if self.items.contains_key(&r.seq) || (seen && r.redrives == 0) {
                continue;
            }
            if self
                .finished_redriven
                .get(&r.seq)
                .is_some_and(|&done| done >= r.redrives)
            {
                continue;
            }
            self.finished_redriven.remove(&r.seq);
            let since = if r.redrives > 0 {
                r.updated_at
            } else {
                r.created_at
            };
            self.items.insert(
                r.seq,
                Item {
                    id: r.id,
                    call_id: r.call_id,
                    payload: r.payload,
                    attempts: r.attempts,
                    next_attempt_at: r.next_attempt_at,
                    since,
                    redrives: r.redrives,
                    in_flight: false,
                    last_error: r.last_error,
                },
            );
        }
    }

    /// Only the oldest row of each call is considered; it is ready when it is due and not
    /// already in flight. Ready rows come longest-waiting first, so that while the breaker
    /// lets only a probe through, the probes rotate over the calls instead of spending one
    /// row's attempts.
    fn plan(&self, now: Millis, max_age_ms: Millis) -> Plan {
        let mut plan = Plan::default();
        let mut heads: HashSet<&str> = HashSet::new();
        for (&seq, it) in &self.items {
            if !heads.insert(it.call_id.as_str()) || it.in_flight {
                continue;
            }
            if max_age_ms > 0 && now.saturating_sub(it.since) >= max_age_ms {
                plan.expired.push(seq);
            } else if it.next_attempt_at <= now {
                plan.ready.push(seq);
            } else {
                plan.next_due = Some(
                    plan.next_due
                        .map_or(it.next_attempt_at, |d: Millis| d.min(it.next_attempt_at)),
                );
            }
        }
        plan.ready
            .sort_by_key(|seq| (self.items[seq].next_attempt_at, *seq));
        plan
    }

    fn finish(&mut self, seq: i64) -> Option<Item> {
        let it = self.items.remove(&seq)?;
        if it.redrives > 0 {
            self.finished_redriven.insert(seq, it.redrives);
        }
        Some(it)
    }
}

/// Starts the webhook task when `cfg.url` is set. `wake` is signalled after commits that
/// hold new notifications; the task stops when `stop` turns true (in-flight attempts are
/// dropped and made again after the restart).
pub fn start<R: Send + 'static>(
    cfg: &WebhookConfig,
    site: &str,
    db: &Path,
    writer: Writer<R>,
    wake: Arc<Notify>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if !cfg.enabled() {
        return Ok(None);
    }
    let endpoint =
        Endpoint::parse(&cfg.url).map_err(|e| anyhow::anyhow!("notifications.webhook.url: {e}"))?;
    let headers = cfg.header_list()?;
    let reader = Reader::open(db)?;
    tracing::info!(url = %endpoint, "notification webhook on");
    let sink = Sink {
        breaker: Breaker::new(cfg.breaker.clone()).with_observer(|t| {
            tracing::warn!(transition = %t, "notification webhook breaker");
        }),
        cfg: cfg.clone(),
        site: HeaderValue::from_str(site).ok(),
        endpoint,
        headers: Arc::new(headers),
        reader,
        writer,
        queue: Queue::default(),
        started: Instant::now(),
        inflight: JoinSet::new(),
        tasks: HashMap::new(),
    };
    Ok(Some(tokio::spawn(sink.run(wake, stop))))
}

struct Sink<R> {
    cfg: WebhookConfig,
    site: Option<HeaderValue>,
    endpoint: Endpoint,
    headers: Arc<Vec<(HeaderName, HeaderValue)>>,
    reader: Reader,
    writer: Writer<R>,
    queue: Queue,
    breaker: Breaker,
    /// The breaker's clock: monotonic, unlike the stored wall-clock times.
    started: Instant,
    inflight: JoinSet<Outcome>,
    /// Attempt task → the row it attempts.
    tasks: HashMap<tokio::task::Id, i64>,
}

fn ms_until(at: Millis, now: Millis) -> Duration {
    Duration::from_millis(u64::try_from(at.saturating_sub(now)).unwrap_or(0))
}

impl<R: Send + 'static> Sink<R> {
    fn mono(&self) -> Millis {
        i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    async fn run(mut self, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
        self.rescan();
        let mut rescan = tokio::time::interval(Duration::from_millis(self.cfg.rescan_ms.max(1)));
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let max_age_ms = i64::try_from(self.cfg.max_age_s.saturating_mul(1000)).unwrap_or(0);
        loop {
            if *stop.borrow() {
                break;
            }
            let now = now_ms();
            let plan = self.queue.plan(now, max_age_ms);
            if !plan.expired.is_empty() {
                for seq in plan.expired {
                    self.expire(seq, now).await;
                }
                continue;
            }
            let mut wait = plan.next_due.map(|t| ms_until(t, now));
            for seq in plan.ready {
                if self.inflight.len() >= self.cfg.concurrency.max(1) {
                    break;
                }
                let m = self.mono();
                if !self.breaker.allow(m) {
                    // Open (or half-open with its probe out): wait, do not count attempts.
                    let ra = Duration::from_millis(self.breaker.retry_after_ms(m).max(50));
                    wait = Some(wait.map_or(ra, |w| w.min(ra)));
                    break;
                }
                self.launch(seq);
            }
            let sleep = async {
                match wait {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                r = stop.changed() => {
                    if r.is_err() {
                        break;
                    }
                }
                Some(done) = self.inflight.join_next_with_id(), if !self.inflight.is_empty() => {
                    match done {
                        Ok((task, outcome)) => {
                            if let Some(seq) = self.tasks.remove(&task) {
                                self.settle(seq, outcome).await;
                            }
                        }
                        Err(e) => {
                            // The attempt task died; try that row again like a failure.
                            if let Some(seq) = self.tasks.remove(&e.id()) {
                                let outcome = Outcome::Retry { error: format!("attempt failed: {e}"), retry_after_s: None };
                                self.settle(seq, outcome).await;
                            }
                        }
                    }
                }
                _ = wake.notified() => self.rescan(),
                _ = rescan.tick() => self.rescan(),
                _ = sleep => {}
            }
        }
        let left = self.inflight.len();
        self.inflight.abort_all();
        tracing::info!(
            in_flight = left,
            pending = self.queue.items.len(),
            "notification webhook stopped; pending notifications are sent after the restart"
        );
    }

    fn rescan(&mut self) {
        match deliveries::pending(self.reader.conn(), WEBHOOK, self.queue.max_seq) {
            Ok(rows) => self.queue.merge(rows),
            Err(e) => tracing::warn!(error = %e, "reading pending notification deliveries"),
        }
    }

    fn launch(&mut self, seq: i64) {
        let Some(it) = self.queue.items.get_mut(&seq) else {
            return;
        };
        it.in_flight = true;
        let attempt = it.attempts + 1;
        let mut headers: Vec<(HeaderName, HeaderValue)> = self.headers.as_ref().clone();
        if let Ok(v) = HeaderValue::from_str(&it.id) {
            headers.push((HeaderName::from_static("idempotency-key"), v));
        }
        headers.push((
            HeaderName::from_static("x-pickup-attempt"),
            HeaderValue::from(attempt),
        ));
        if let Some(site) = &self.site {
            headers.push((HeaderName::from_static("x-pickup-site"), site.clone()));
        }
        let ep = self.endpoint.clone();
        let payload = it.payload.clone();
        let connect = Duration::from_millis(self.cfg.connect_timeout_ms);
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        tracing::debug!(id = %it.id, call_id = %it.call_id, attempt, "posting notification");
        let handle = self.inflight.spawn(async move {
            classify(http::post(&ep, &headers, payload, connect, timeout).await)
        });
        self.tasks.insert(handle.id(), seq);
    }

    async fn settle(&mut self, seq: i64, outcome: Outcome) {
        let now = now_ms();
        let m = self.mono();
        match &outcome {
            Outcome::Retry { .. } => {
                self.breaker.on_failure(m);
            }
            // The receiver answered: it is up, even when it refuses this payload.
            Outcome::Delivered | Outcome::Refused(_) => {
                self.breaker.on_success(m);
            }
        }
        let max_attempts = self.cfg.max_attempts.max(1);
        let update = match outcome {
            Outcome::Delivered => {
                let Some(it) = self.queue.finish(seq) else {
                    return;
                };
                tracing::info!(id = %it.id, call_id = %it.call_id, attempts = it.attempts + 1, "notification delivered to the webhook");
                Update {
                    sink: WEBHOOK.into(),
                    id: it.id,
                    redrives: it.redrives,
                    state: State::Delivered,
                    attempts: it.attempts + 1,
                    next_attempt_at: now,
                    last_error: it.last_error,
                }
            }
            Outcome::Refused(error) => {
                let Some(it) = self.queue.finish(seq) else {
                    return;
                };
                let reason = format!("refused by the webhook: {error}");
                tracing::warn!(id = %it.id, call_id = %it.call_id, %reason, "notification dead-lettered");
                Update {
                    sink: WEBHOOK.into(),
                    id: it.id,
                    redrives: it.redrives,
                    state: State::Dead,
                    attempts: it.attempts + 1,
                    next_attempt_at: now,
                    last_error: Some(reason),
                }
            }
            Outcome::Retry {
                error,
                retry_after_s,
            } => {
                let Some(it) = self.queue.items.get_mut(&seq) else {
                    return;
                };
                it.attempts += 1;
                it.in_flight = false;
                if it.attempts >= max_attempts {
                    let reason = format!("gave up after {} attempts: {error}", it.attempts);
                    let attempts = it.attempts;
                    let Some(it) = self.queue.finish(seq) else {
                        return;
                    };
                    tracing::warn!(id = %it.id, call_id = %it.call_id, %reason, "notification dead-lettered");
                    Update {
                        sink: WEBHOOK.into(),
                        id: it.id,
                        redrives: it.redrives,
                        state: State::Dead,
                        attempts,
                        next_attempt_at: now,
                        last_error: Some(reason),
                    }
                } else {
                    let mut delay = backoff_ms(
                        it.attempts,
                        self.cfg.backoff_base_ms,
                        self.cfg.backoff_max_ms,
                        &mut rand::rng(),
                    );
                    if let Some(s) = retry_after_s {
                        delay = delay.max(s.saturating_mul(1000).min(self.cfg.backoff_max_ms));
                    }
                    it.next_attempt_at =
                        now.saturating_add(i64::try_from(delay).unwrap_or(i64::MAX));
                    it.last_error = Some(error.clone());
                    tracing::info!(id = %it.id, call_id = %it.call_id, attempts = it.attempts, retry_in_ms = delay, %error, "notification not delivered; will retry");
                    Update {
                        sink: WEBHOOK.into(),
                        id: it.id.clone(),
                        redrives: it.redrives,
                        state: State::Pending,
                        attempts: it.attempts,
                        next_attempt_at: it.next_attempt_at,
                        last_error: it.last_error.clone(),
                    }
                }
            }
        };
        self.record(update).await;
    }

    async fn expire(&mut self, seq: i64, now: Millis) {
        let Some(it) = self.queue.finish(seq) else {
            return;
        };
        let reason = format!(
            "expired: not delivered within {} s{}",
            self.cfg.max_age_s,
            it.last_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
        tracing::warn!(id = %it.id, call_id = %it.call_id, %reason, "notification dead-lettered");
        self.record(Update {
            sink: WEBHOOK.into(),
            id: it.id,
            redrives: it.redrives,
            state: State::Dead,
            attempts: it.attempts,
            next_attempt_at: now,
            last_error: Some(reason),
        })
        .await;
    }

    async fn record(&mut self, u: Update) {
        if self
            .writer
            .send(WriteJob {
                op: Op::Delivery(u),
                after: None,
            })
            .await
            .is_err()
        {
            tracing::debug!("writer closed; delivery state not recorded (re-sent after restart)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn row(seq: i64, id: &str, call: &str, next: Millis) -> Row {
        Row {
            seq,
            id: id.into(),
            call_id: call.into(),
            sink: WEBHOOK.into(),
            payload: b"{}".to_vec(),
            state: State::Pending,
            attempts: 0,
            next_attempt_at: next,
            last_error: None,
            created_at: 1_000,
            updated_at: 1_000,
            redrives: 0,
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempts in 1..=40u32 {
            let full = 100u64
                .saturating_mul(1 << (attempts - 1).min(32))
                .min(10_000);
            for _ in 0..50 {
                let d = backoff_ms(attempts, 100, 10_000, &mut rng);
                assert!(d >= full / 2 && d <= full, "attempt {attempts}: {d}");
            }
        }
        assert!(backoff_ms(1, 1, 1, &mut rng) <= 1);
    }

    #[test]
    fn answers_are_sorted_into_outcomes() {
        let a = |status, body: &str| {
            Ok(Answer {
                status,
                retry_after_s: Some(3),
                body: body.into(),
            })
        };
        assert_eq!(classify(a(200, "")), Outcome::Delivered);
        assert_eq!(classify(a(204, "")), Outcome::Delivered);
        for s in [408, 429, 500, 502, 503] {
            assert!(matches!(
                classify(a(s, "x")),
                Outcome::Retry {
                    retry_after_s: Some(3),
                    ..
                }
            ));
        }
        assert_eq!(
            classify(a(400, "bad tel")),
            Outcome::Refused("HTTP 400: bad tel".into())
        );
        assert!(matches!(classify(a(301, "")), Outcome::Refused(_)));
        assert!(matches!(
            classify(Err(PostError::Timeout(5))),
            Outcome::Retry { error, .. } if error.contains("no answer within 5 ms")
        ));
    }

    #[test]
    fn only_the_oldest_row_of_a_call_is_attempted_and_only_when_due() {
        let mut q = Queue::default();
        q.merge(vec![
            row(1, "a-1", "a", 100),
            row(2, "b-1", "b", 500),
            row(3, "a-2", "a", 0),
            row(4, "c-1", "c", 0),
        ]);
        let p = q.plan(200, 0);
        assert_eq!(p.ready, vec![4, 1], "longest waiting first");
        assert_eq!(p.next_due, Some(500));
        // In flight: its call is blocked, the others go on.
        q.items.get_mut(&1).unwrap().in_flight = true;
        assert_eq!(q.plan(200, 0).ready, vec![4]);
        // Finished (delivered or dead): the next of the call becomes its head.
        q.finish(1);
        assert_eq!(q.plan(600, 0).ready, vec![3, 4, 2]);
        // Too old: expired instead of attempted.
        let p = q.plan(1_000 + 60_000, 60_000);
        assert_eq!(p.expired, vec![2, 3, 4]);
        assert!(p.ready.is_empty());
    }

    #[test]
    fn rescans_never_revive_finished_rows_but_take_re_driven_ones() {
        let mut q = Queue::default();
        q.merge(vec![row(1, "a-1", "a", 0), row(2, "a-2", "a", 0)]);
        assert_eq!(q.max_seq, 2);
        // Delivered; the writer has not committed yet, so a racing read still shows it pending.
        q.finish(1);
        q.merge(vec![row(1, "a-1", "a", 0)]);
        assert!(!q.items.contains_key(&1));
        // Our own view of an attempted row wins over a stale read.
        q.items.get_mut(&2).unwrap().attempts = 3;
        q.merge(vec![row(2, "a-2", "a", 0)]);
        assert_eq!(q.items[&2].attempts, 3);
        // An operator re-drove row 1: it comes back.
        let mut r = row(1, "a-1", "a", 0);
        r.redrives = 1;
        r.updated_at = 5_000;
        q.merge(vec![r.clone()]);
        assert_eq!(q.items[&1].since, 5_000);
        // Finished again; a stale read of the same re-drive does not revive it, a newer one does.
        q.finish(1);
        q.merge(vec![r.clone()]);
        assert!(!q.items.contains_key(&1));
        r.redrives = 2;
        q.merge(vec![r]);
        assert!(q.items.contains_key(&1));
    }

    #[test]
    fn config_errors_name_the_key() {
        let ok = WebhookConfig {
            url: "http://127.0.0.1:9/hook".into(),
            ..WebhookConfig::default()
        };
        ok.validate().unwrap();
        WebhookConfig::default().validate().unwrap();
        let e = |f: fn(&mut WebhookConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(e(|c| c.url = "https://x/".into()).starts_with("notifications.webhook.url:"));
        assert!(e(|c| c.max_attempts = 0).starts_with("notifications.webhook.max_attempts:"));
        assert!(e(|c| c.backoff_max_ms = 1).starts_with("notifications.webhook.backoff_max_ms:"));
        assert!(e(|c| c.timeout_ms = 0).starts_with("notifications.webhook.timeout_ms:"));
        assert!(e(|c| {
            c.headers.insert("bad name".into(), "v".into());
        })
        .starts_with("notifications.webhook.headers.bad name:"));
        assert!(e(|c| c.breaker.open_ms = 0).contains("notifications.webhook.breaker.open_ms"));
    }
}
