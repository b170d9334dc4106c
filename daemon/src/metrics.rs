//! Optional Prometheus endpoint (`[metrics] listen = "127.0.0.1:9187"`): calls by status,
//! assignment latency, couriers online, outbox backlog, broker connection, admission state,
//! store commit latency. A plain HTTP/1.1 responder on localhost, so no web framework is
//! pulled in for one GET.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Label of the per-event counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Event kind (`requested`, `assigned`, `completed`, …).
    pub kind: String,
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// Call events by kind (status transitions and courier actions).
    pub events: Family<KindLabel, Counter>,
    /// From acceptance to assignment, seconds.
    pub assign_latency: Histogram,
    /// Duration of store commits, seconds.
    pub commit_latency: Histogram,
    /// Calls waiting for a courier.
    pub dispatching: Gauge,
    /// Couriers online.
    pub couriers_online: Gauge,
    /// Outbox rows not yet acknowledged by the broker.
    pub outbox_backlog: Gauge,
    /// 1 when connected to the broker.
    pub broker_connected: Gauge,
    /// 1 when the status-read connection is up.
    pub reads_connected: Gauge,
    /// Call admission breaker: 0 closed, 1 open, 2 half-open.
    pub admission_state: Gauge,
    /// Creates refused with `busy`.
    pub shed_total: Counter,
    /// Messages refused as malformed or invalid.
    pub rejected_total: Counter,
    /// Courier positions held back or replaced (`limits.position_interval_ms`).
    pub positions_coalesced_total: Counter,
    /// Courier presences dropped as repeats of the last one (`limits.position_interval_ms`).
    pub presences_dropped_total: Counter,
    /// Store transactions committed.
    pub commits_total: Counter,
    /// Of those, the ones that did not wait for the disk (courier updates, sent marks).
    pub commits_unsynced_total: Counter,
    /// Resident set of the process, bytes, read at scrape time.
    pub resident_bytes: Gauge,
    /// Free heap pages handed back to the system (`memory`): trims run, bytes returned.
    pub memory_trims_total: Counter,
    pub memory_returned_bytes_total: Counter,
    commits_seen: AtomicU64,
    trims_seen: AtomicU64,
    returned_seen: AtomicU64,
    unsynced_seen: AtomicU64,
    shed_seen: AtomicU64,
    rejected_seen: AtomicU64,
    positions_seen: AtomicU64,
    presences_seen: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `pickupd_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pickupd");
        let events = Family::<KindLabel, Counter>::default();
        let buckets = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 300.0,
        ];
        let assign_latency = Histogram::new(buckets);
        let commit_latency = Histogram::new([
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
        ]);
        let m = Self {
            registry: Registry::default(),
            events: events.clone(),
            assign_latency: assign_latency.clone(),
            commit_latency: commit_latency.clone(),
            dispatching: Gauge::default(),
            couriers_online: Gauge::default(),
            outbox_backlog: Gauge::default(),
            broker_connected: Gauge::default(),
            reads_connected: Gauge::default(),
            admission_state: Gauge::default(),
            shed_total: Counter::default(),
            rejected_total: Counter::default(),
            positions_coalesced_total: Counter::default(),
            presences_dropped_total: Counter::default(),
            commits_total: Counter::default(),
            commits_unsynced_total: Counter::default(),
            resident_bytes: Gauge::default(),
            memory_trims_total: Counter::default(),
            memory_returned_bytes_total: Counter::default(),
            commits_seen: AtomicU64::new(0),
            trims_seen: AtomicU64::new(0),
            returned_seen: AtomicU64::new(0),
            unsynced_seen: AtomicU64::new(0),
            shed_seen: AtomicU64::new(0),
            rejected_seen: AtomicU64::new(0),
            positions_seen: AtomicU64::new(0),
            presences_seen: AtomicU64::new(0),
        };
        registry.register("call_events", "Call events by kind", events);
        registry.register(
            "assignment_latency_seconds",
            "Time from acceptance to assignment",
            assign_latency,
        );
        registry.register(
            "store_commit_seconds",
            "Duration of store commits (group commits)",
            commit_latency,
        );
        registry.register(
            "calls_dispatching",
            "Calls waiting for a courier",
            m.dispatching.clone(),
        );
        registry.register(
            "couriers_online",
            "Couriers online",
            m.couriers_online.clone(),
        );
        registry.register(
            "outbox_backlog",
            "Outbox rows not yet acknowledged by the broker",
            m.outbox_backlog.clone(),
        );
        registry.register(
            "broker_connected",
            "1 when connected to the broker",
            m.broker_connected.clone(),
        );
        registry.register(
            "reads_connected",
            "1 when the status-read connection is up",
            m.reads_connected.clone(),
        );
        registry.register(
            "admission_state",
            "Call admission breaker: 0 closed, 1 open, 2 half-open",
            m.admission_state.clone(),
        );
        registry.register(
            "calls_shed",
            "Creates refused with busy",
            m.shed_total.clone(),
        );
        registry.register(
            "messages_rejected",
            "Messages refused as malformed or invalid",
            m.rejected_total.clone(),
        );
        registry.register(
            "positions_coalesced",
            "Courier positions held back or replaced by a newer one (limits.position_interval_ms)",
            m.positions_coalesced_total.clone(),
        );
        registry.register(
            "presences_dropped",
            "Courier presences dropped as repeats of the last one within limits.position_interval_ms",
            m.presences_dropped_total.clone(),
        );
        registry.register(
            "store_commits",
            "Store transactions committed (group commits)",
            m.commits_total.clone(),
        );
        registry.register(
            "store_commits_unsynced",
            "Store commits that did not wait for the disk: only courier updates and sent marks",
            m.commits_unsynced_total.clone(),
        );
        registry.register(
            "resident_bytes",
            "Resident set of the daemon's process (with the embedded broker, the broker too)",
            m.resident_bytes.clone(),
        );
        registry.register(
            "memory_trims",
            "Times free heap pages were handed back to the system",
            m.memory_trims_total.clone(),
        );
        registry.register(
            "memory_returned_bytes",
            "Bytes by which those trims shrank the resident set",
            m.memory_returned_bytes_total.clone(),
        );
        Self { registry, ..m }
    }

    /// Brings gauges up to date from the live counters, then renders the text format.
    pub fn render(&self, live: &Live) -> String {
        self.dispatching
            .set(live.stats.dispatching.load(Ordering::Relaxed) as i64);
        self.couriers_online
            .set(live.stats.couriers_online.load(Ordering::Relaxed) as i64);
        self.admission_state
            .set(i64::from(live.stats.admission.load(Ordering::Relaxed)));
        self.outbox_backlog
            .set(live.publisher.unacked.load(Ordering::Relaxed) as i64);
        self.broker_connected
            .set(i64::from(live.mqtt.connected.load(Ordering::Relaxed)));
        self.reads_connected
            .set(i64::from(live.mqtt.reads_connected.load(Ordering::Relaxed)));
        // Refusals by admission and by the per-kiosk open-call limit.
        let shed = live.mqtt.shed.load(Ordering::Relaxed)
            + live.stats.open_limited.load(Ordering::Relaxed);
        advance(&self.shed_total, &self.shed_seen, shed);
        let mqtt = &live.mqtt;
        advance(
            &self.rejected_total,
            &self.rejected_seen,
            mqtt.rejected.load(Ordering::Relaxed),
        );
        advance(
            &self.positions_coalesced_total,
            &self.positions_seen,
            mqtt.positions_coalesced.load(Ordering::Relaxed),
        );
        advance(
            &self.presences_dropped_total,
            &self.presences_seen,
            mqtt.presences_dropped.load(Ordering::Relaxed),
        );
        advance(
            &self.commits_total,
            &self.commits_seen,
            live.writer.commits.load(Ordering::Relaxed),
        );
        advance(
            &self.commits_unsynced_total,
            &self.unsynced_seen,
            live.writer.unsynced.load(Ordering::Relaxed),
        );
        if let Some(rss) = crate::memory::resident_bytes() {
            self.resident_bytes
                .set(i64::try_from(rss).unwrap_or(i64::MAX));
        }
        advance(
            &self.memory_trims_total,
            &self.trims_seen,
            live.memory.trims.load(Ordering::Relaxed),
        );
        advance(
            &self.memory_returned_bytes_total,
            &self.returned_seen,
            live.memory.returned_bytes.load(Ordering::Relaxed),
        );
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Brings `counter` up to `total`, a running count kept elsewhere; `seen` holds the total
/// at the previous scrape (Prometheus counters only ever grow by what happened since).
fn advance(counter: &Counter, seen: &AtomicU64, total: u64) {
    let before = seen.swap(total, Ordering::Relaxed);
    counter.inc_by(total.saturating_sub(before));
}

/// The live counters the gauges read at scrape time.
pub struct Live {
    /// Dispatch loop counters.
    pub stats: Arc<crate::app::Stats>,
    /// MQTT flags.
    pub mqtt: Arc<crate::app::inbound::MqttState>,
    /// Publisher counters.
    pub publisher: Arc<crate::app::publisher::PublisherStats>,
    /// Store writer counters.
    pub writer: Arc<crate::store::WriterStats>,
    /// What the memory trimmer did.
    pub memory: Arc<crate::memory::TrimStats>,
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, live: Live) {
    let live = Arc::new(live);
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let live = live.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body, ctype) =
                if req.starts_with("GET /metrics ") || req.starts_with("GET / ") {
                    (
                        "200 OK",
                        metrics.render(&live),
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                } else {
                    ("404 Not Found", "try /metrics\n".to_string(), "text/plain")
                };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
