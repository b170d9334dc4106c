//! The running daemon: adapters around the dispatch core, wired together.
//!
//! Tasks and threads, each owning its part:
//! - `inbound` (task): the MQTT event loop; decodes, validates and routes messages;
//! - the dispatch loop (task): owns the [`Dispatcher`], turns inputs and timers into
//!   decisions and queues them for the writer;
//! - the store writer (thread): group-commits decisions, then hands outbox rows and
//!   answers to the publisher;
//! - `publisher` (task): the only publisher; drains the outbox at least once;
//! - the reader (thread): answers status reads from a read-only connection, never waiting
//!   on writes.

pub mod admission;
pub mod inbound;
pub mod positions;
pub mod presences;
pub mod publisher;
pub mod reads;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use pickup_protocol::answer::CreateAnswer;
use pickup_protocol::client::{self, BrokerUrl, LinkOptions, Version, Will};
use pickup_protocol::{
    CallStatus, DaemonState, DaemonStatus, ErrorBody, ErrorCode, Millis, ReplyPath, Topics,
};
use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch};

use self::inbound::{GetRequest, InboundCtx, Input, MqttState};
use self::publisher::{AfterCommit, PubIn, PublisherStats, Reply};
use crate::config::Config;
use crate::dispatch::{CancelledBy, Decision, Dispatcher, NewCall, OutMsg, ReplyBody};
use crate::store::requests::RequestFilter;
use crate::store::{self, now_ms, Op, Reader, StoreError, WriteJob, Writer};

/// Live counters, for the status line, metrics and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Calls waiting for a courier.
    pub dispatching: AtomicU64,
    /// Couriers online.
    pub couriers_online: AtomicU64,
    /// Call admission breaker: 0 closed, 1 open, 2 half-open.
    pub admission: std::sync::atomic::AtomicU8,
    /// Creates admitted by the inbound task.
    pub creates_admitted: AtomicU64,
    /// Creates the dispatch loop has handled (admitted − handled = in flight).
    pub creates_handled: AtomicU64,
    /// Creates refused because their kiosk had too many open calls.
    pub open_limited: AtomicU64,
    /// Whether the filter of stored request ids is built (until then every create with a
    /// request id unknown in memory is looked up in the database).
    pub request_filter: std::sync::atomic::AtomicBool,
}

/// A started daemon.
pub struct Running {
    /// Where clients connect (the embedded broker's MQTT 3.1.1 listener, or the external
    /// broker's address).
    pub broker_addr: std::net::SocketAddr,
    /// The embedded broker's MQTT 5 listener, if configured.
    pub broker_v5_addr: Option<std::net::SocketAddr>,
    /// Becomes true once the store is open and the subscriptions are confirmed.
    pub ready: watch::Receiver<bool>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// MQTT flags.
    pub mqtt: Arc<MqttState>,
    /// Writer counters.
    pub writer_stats: Arc<store::WriterStats>,
    /// Publisher counters.
    pub publisher_stats: Arc<PublisherStats>,
    /// The embedded broker (None with an external one).
    pub broker: Option<pickup_broker::Broker>,
    /// Progress of the dispatch loop, store writer, MQTT task and publisher (watchdog).
    pub heartbeats: crate::systemd::Heartbeats,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where the metrics endpoint listens, when on.
    pub metrics_addr: Option<std::net::SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    dispatch: mpsc::Sender<Input>,
    heavy_kg: watch::Sender<inbound::Live>,
    config: Config,
    fatal: mpsc::UnboundedReceiver<StoreError>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Applies the settings that can change live (dispatch rules, admission limits,
    /// tariff, templates, log level) and returns the changed ones that need a restart.
    pub async fn reload(&mut self, new: Config) -> Vec<&'static str> {
        let restart = self.config.needs_restart(&new);
        let _ = self.heavy_kg.send(inbound::Live::from_config(&new));
        crate::logging::set_level(&new.log.level);
        if self
            .dispatch
            .send(Input::Reload(Box::new(new.clone())))
            .await
            .is_err()
        {
            tracing::warn!("reload: the dispatch loop has stopped");
        }
        self.config = new;
        restart
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Stops gracefully: refuses new calls, finishes and commits what is in progress,
    /// flushes the outbox (bounded by `timeout`), publishes `daemon/state` = stopping,
    /// closes the database.
    pub async fn shutdown(mut self, timeout: Duration) -> anyhow::Result<()> {
        self.mqtt.stopping.store(true, Ordering::Relaxed);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let res = match self.done.take() {
            Some(h) => match tokio::time::timeout(timeout + Duration::from_secs(2), h).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => Err(anyhow::anyhow!("daemon task failed: {e}")),
                Err(_) => Err(anyhow::anyhow!("shutdown took longer than {timeout:?}")),
            },
            None => Ok(()),
        };
        if let Some(b) = self.broker.take() {
            b.shutdown();
        }
        res
    }

    /// Resolves when a fatal store error happens (the daemon must exit non-zero).
    pub async fn fatal(&mut self) -> StoreError {
        match self.fatal.recv().await {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }
}

fn new_call_id(now: Millis) -> String {
    // Time-ordered (12 hex digits of ms) plus 64 random bits: unique without a lookup, and
    // not guessable from the time a call was made (a call id is what a cancel or a status
    // read names).
    let r: u64 = rand::rng().random();
    format!("c{:012x}{r:016x}", now.max(0))
}

fn new_pickup_code() -> String {
    format!("{:06}", rand::rng().random_range(0..1_000_000u32))
}

/// Starts the daemon: store, broker (embedded unless `mqtt.url`), MQTT client, loops.
/// Returns once everything runs; `ready` turns true when subscriptions are confirmed.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    // Before the first argon2id check (the daemon's own identity, below).
    crate::memory::configure();
    let topics = Topics::new(&cfg.site).context("site")?;
    let path: PathBuf = cfg.store.path.clone();
    let now = now_ms();

    // Store first: a damaged file must stop us before anything is announced.
    let conn = store::open(&path)?;
    let heartbeats = crate::systemd::Heartbeats::new();
    let dcfg = cfg.dispatch_config();
    let loaded = store::load(&conn, &path, now, dcfg.keep_terminal_ms)?;
    tracing::info!(
        path = %path.display(),
        calls = loaded.calls.len(),
        couriers = loaded.couriers.len(),
        unsent = loaded.unsent.len(),
        "store open"
    );
    let mut core = Dispatcher::new(dcfg, topics.clone());
    core.restore(loaded.calls, loaded.couriers);

    // Broker.
    let security = crate::security::Security::prepare(&cfg)?;
    let (broker, url) = if cfg.mqtt.url.is_empty() {
        let b = pickup_broker::Broker::start(security.broker_config(&cfg.broker))?;
        let addr = b.v4_addr();
        security.warn_exposure(&cfg.broker);
        // MQTT 5 kiosks need the daemon on the MQTT 5 listener too: rumqttd breaks
        // MQTT 3.1.1 connections that receive publishes with MQTT 5 properties.
        let own = match (cfg.mqtt.version, b.v5_addr()) {
            (5, Some(v5)) => v5,
            _ => addr,
        };
        let url = BrokerUrl {
            host: own.ip().to_string(),
            port: own.port(),
        };
        (Some(b), url)
    } else {
        let ep = security.endpoint.clone();
        (None, ep.map(|e| e.url).context("mqtt.url")?)
    };
    let broker_addr = match &broker {
        Some(b) => b.v4_addr(),
        None => tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], url.port))),
    };
    let broker_v5_addr = broker.as_ref().and_then(|b| b.v5_addr());

    // MQTT client: persistent session under a fixed id, last will "lost".
    let mut lo = LinkOptions::new(url, cfg.mqtt.client_id.clone());
    lo.version = if cfg.mqtt.version == 5 {
        Version::V5
    } else {
        Version::V4
    };
    lo.clean_session = false;
    lo.keep_alive_s = cfg.mqtt.keep_alive_s;
    lo.max_packet = cfg.broker.max_payload.max(pickup_protocol::MAX_PAYLOAD * 4);
    lo.inflight = 100;
    lo.channel_capacity = 4096;
    if let (Some(u), Some(p)) = (&cfg.mqtt.username, &cfg.mqtt.password) {
        lo.credentials = Some((u.clone(), p.clone()));
    }
    security.configure_link(&mut lo);
    lo.will = Some(Will {
        topic: topics.daemon_state(),
        payload: serde_json::to_vec(&DaemonState {
            state: DaemonStatus::Lost,
            version: Some(env!("CARGO_PKG_VERSION").into()),
            at: None,
            admission: None,
        })
        .unwrap_or_default(),
        retain: true,
        delay_s: None,
    });
    // With the embedded broker (MQTT 3.1.1), the daemon's connections skip TCP.
    let in_process = broker
        .as_ref()
        .filter(|_| cfg.mqtt.in_process && lo.version == Version::V4);
    if in_process.is_some() {
        tracing::info!("the daemon's broker connections run in process (mqtt.in_process)");
    }
    let (link, events) = match in_process {
        Some(b) => b
            .connect_in_process(&lo.client_id, lo.clean_session, lo.inflight)
            .context("in-process connection to the embedded broker")?,
        None => client::link(&lo),
    };
    // The status-read connection: its own identity (same secret), a clean session (a
    // status request nobody answered in time is retried by its kiosk), no last will.
    let read_link = cfg.mqtt.read_link.then(|| {
        let mut ro = lo.clone();
        ro.client_id = crate::security::registry::reads_identity(&lo.client_id);
        ro.clean_session = true;
        ro.will = None;
        ro.inflight = 100;
        ro.channel_capacity = 1024;
        ro.credentials = lo
            .credentials
            .as_ref()
            .map(|(u, p)| (crate::security::registry::reads_identity(u), p.clone()));
        match in_process {
            Some(b) => b
                .connect_in_process(&ro.client_id, ro.clean_session, ro.inflight)
                .context("in-process status-read connection to the embedded broker"),
            None => Ok(client::link(&ro)),
        }
    });
    let read_link = read_link.transpose()?;

    // Writer and publisher.
    let (committed_tx, mut committed_rx) = mpsc::unbounded_channel();
    let (fatal_tx, fatal_rx) = mpsc::unbounded_channel();
    let (writer, writer_thread) = Writer::<AfterCommit>::spawn(
        conn,
        path.clone(),
        cfg.store.queue,
        cfg.store.max_batch,
        committed_tx,
        fatal_tx,
        Some(heartbeats.register("store-writer")),
    )?;
    let writer_stats = writer.stats.clone();
    let (pub_tx, pub_rx) = mpsc::unbounded_channel::<PubIn>();
    // Woken after commits holding notifications (the webhook sink reads its queue then).
    let notified = Arc::new(tokio::sync::Notify::new());
    {
        // Commits reach the publisher through the same ordered channel as everything else.
        let pub_tx = pub_tx.clone();
        let (notified, topic) = (notified.clone(), topics.notifications());
        tokio::spawn(async move {
            while let Some(c) = committed_rx.recv().await {
                if c.outbox.iter().any(|(_, m)| m.topic == topic) {
                    notified.notify_one();
                }
                if pub_tx.send(PubIn::Committed(c)).is_err() {
                    break;
                }
            }
        });
    }
    let publisher_stats = Arc::new(PublisherStats::default());
    let publisher = tokio::spawn(publisher::run(
        link.clone(),
        pub_rx,
        writer.clone(),
        loaded.unsent,
        publisher_stats.clone(),
        // Message expiry is an MQTT 5 property; through rumqttd it would reach MQTT 3.1.1
        // couriers and break their connections, so only external brokers get it.
        cfg.mqtt.version == 5 && !cfg.mqtt.url.is_empty(),
        heartbeats.register("publisher"),
    ));

    // Reader thread for status reads.
    let (read_tx, read_rx) = std::sync::mpsc::sync_channel::<GetRequest>(cfg.limits.read_queue);
    let reader = Reader::open(&path)?;
    let (answer_tx, answer_rx) = mpsc::unbounded_channel::<Reply>();
    {
        // Answers leave on the connection the request came in on.
        let pub_tx = pub_tx.clone();
        let to_reads = answer_tx.clone();
        let on_read_link = read_link.is_some();
        let sink = move |r: Reply| {
            if on_read_link {
                to_reads.send(r).is_ok()
            } else {
                pub_tx.send(PubIn::Direct(r)).is_ok()
            }
        };
        std::thread::Builder::new()
            .name("status-reader".into())
            .spawn(move || serve_reads(reader, read_rx, sink))?;
    }

    // Inbound MQTT task.
    let mqtt_state = Arc::new(MqttState::default());
    let (dispatch_tx, dispatch_rx) = mpsc::channel::<Input>(cfg.limits.inbound_queue);
    let dispatch_tx_for_reload = dispatch_tx.clone();
    let cfg_for_reload = cfg.clone();
    let (heavy_tx, heavy_rx) = watch::channel(inbound::Live::from_config(&cfg));
    let heavy_tx_for_reload = heavy_tx.clone();
    let stats = Arc::new(Stats::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_rx_for_scales = stop_rx.clone();
    let stop_rx_for_reads = stop_rx.clone();
    crate::notify::webhook::start(
        &cfg.notifications.webhook,
        &cfg.site,
        &path,
        writer.clone(),
        notified,
        stop_rx.clone(),
    )?;
    let inbound = tokio::spawn(inbound::run(
        events,
        InboundCtx {
            topics: topics.clone(),
            link: link.clone(),
            dispatch: dispatch_tx.clone(),
            reads: read_tx.clone(),
            publisher: pub_tx.clone(),
            state: mqtt_state.clone(),
            live: heavy_rx,
            admission: admission::Admission::new(cfg.admission.clone()),
            stats: stats.clone(),
            writer_stats: writer_stats.clone(),
            writer_capacity: cfg.store.queue,
            reconnect_max: Duration::from_millis(cfg.mqtt.reconnect_max_ms.max(100)),
            stop: stop_rx,
            beat: heartbeats.register("mqtt"),
            read_link: read_link.is_some(),
            positions: positions::PositionGate::new(
                i64::try_from(cfg.limits.position_interval_ms).unwrap_or(i64::MAX),
            ),
            presences: presences::PresenceGate::new(
                i64::try_from(cfg.limits.position_interval_ms).unwrap_or(i64::MAX),
            ),
        },
    ));
    let reads_link = match read_link {
        Some((rlink, revents)) => {
            let ctx = reads::ReadsCtx {
                topics: topics.clone(),
                link: rlink.clone(),
                reads: read_tx,
                answers: answer_tx,
                state: mqtt_state.clone(),
                reconnect_max: Duration::from_millis(cfg.mqtt.reconnect_max_ms.max(100)),
                stop: stop_rx_for_reads,
                beat: heartbeats.register("mqtt-reads"),
            };
            let thread = reads::spawn(revents, ctx, answer_rx)?;
            Some((rlink, thread))
        }
        None => {
            drop((read_tx, answer_tx, answer_rx));
            None
        }
    };

    // Readiness: subscriptions confirmed → retained daemon state "ready".
    let (ready_tx, ready_rx) = watch::channel(false);
    {
        let st = mqtt_state.clone();
        let pub_tx = pub_tx.clone();
        let topic = topics.daemon_state();
        let need_reads = reads_link.is_some();
        tokio::spawn(async move {
            let mut was = false;
            loop {
                let now = st.subscribed.load(Ordering::Relaxed)
                    && st.connected.load(Ordering::Relaxed)
                    && (!need_reads
                        || (st.reads_subscribed.load(Ordering::Relaxed)
                            && st.reads_connected.load(Ordering::Relaxed)));
                if now && !was {
                    let _ =
                        pub_tx.send(PubIn::Raw(daemon_state(&topic, DaemonStatus::Ready, None)));
                    let _ = ready_tx.send(true);
                }
                was = now;
                if st.stopping.load(Ordering::Relaxed) || ready_tx.is_closed() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }

    // Scales: one poller each; readings go out retained on scales/<sid>/weight.
    let specs = crate::scale::validate_scales(&cfg.scales)?;
    let board = crate::scale::ScaleBoard::new(&specs);
    if !specs.is_empty() {
        let (scale_tx, mut scale_rx) = mpsc::channel::<crate::scale::ScaleUpdate>(64);
        for spec in specs {
            let mut stop = stop_rx_for_scales.clone();
            crate::scale::ScalePoller::new(spec, board.clone(), Some(scale_tx.clone())).spawn(
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            );
        }
        let pub_tx = pub_tx.clone();
        let topics = topics.clone();
        tokio::spawn(async move {
            while let Some(u) = scale_rx.recv().await {
                let msg = OutMsg {
                    topic: topics.scale_weight(&u.scale_id),
                    payload: serde_json::to_vec(&u.report).unwrap_or_default(),
                    retain: true,
                    expiry_s: None,
                };
                if pub_tx.send(PubIn::Raw(msg)).is_err() {
                    break;
                }
            }
        });
    }

    // Free heap pages go back to the system after bursts (see `memory`).
    let trim_stats = Arc::new(crate::memory::TrimStats::default());
    tokio::spawn(crate::memory::run(
        trim_stats.clone(),
        crate::memory::Policy::default(),
        stop_rx_for_scales.clone(),
    ));

    // Metrics.
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let _ = writer_stats.commit_hist.set(metrics.commit_latency.clone());
    let metrics_addr = match cfg.metrics.addr()? {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics.listen: cannot listen on {addr}"))?;
            let bound = listener.local_addr()?;
            tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
                crate::metrics::Live {
                    stats: stats.clone(),
                    mqtt: mqtt_state.clone(),
                    publisher: publisher_stats.clone(),
                    writer: writer_stats.clone(),
                    memory: trim_stats.clone(),
                },
            ));
            tracing::info!(listen = %bound, "metrics endpoint");
            Some(bound)
        }
        None => None,
    };

    let (shutdown_tx, shutdown_rx) = oneshot::channel();
    let reader = Reader::open(&path)?;
    let lp = DispatchLoop {
        core,
        reader,
        writer: writer.clone(),
        publisher: pub_tx.clone(),
        stats: stats.clone(),
        max_dispatching: cfg.limits.max_dispatching,
        max_open_per_kiosk: cfg.limits.max_open_per_kiosk,
        topics: topics.clone(),
        board,
        tariff: cfg.tariff.clone(),
        heavy_kg: cfg.dispatch.heavy_kg,
        beat: heartbeats.register("dispatch"),
        stall_file: std::env::var_os("PICKUPD_TEST_STALL_FILE").map(PathBuf::from),
        db: path.clone(),
        retention_days: cfg.store.retention_days,
        state_hours: cfg.store.state_hours,
        states_cleared_until: now.saturating_sub(i64::from(cfg.store.state_hours) * 3_600_000),
        sweep: None,
        sweep_every: Duration::from_secs(u64::from(cfg.store.sweep_interval_s.max(1))),
        metrics: metrics.clone(),
        requests: None,
        requests_meanwhile: None,
    };
    let done = {
        let link = link.clone();
        let mqtt_state = mqtt_state.clone();
        let topics = topics.clone();
        tokio::spawn(async move {
            lp.run(dispatch_rx, shutdown_rx).await;
            drop(heavy_tx);
            // Everything the loop queued is committed and handed on once this barrier fires.
            let (btx, brx) = oneshot::channel();
            let _ = writer
                .send(WriteJob {
                    op: Op::Ping,
                    after: Some(AfterCommit::Barrier(btx)),
                })
                .await;
            let _ = brx.await;
            // Wait (bounded) for the broker to acknowledge the outbox.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let (tx, rx) = oneshot::channel();
                if pub_tx.send(PubIn::Backlog(tx)).is_err() {
                    break;
                }
                match rx.await {
                    Ok(0) => break,
                    Ok(n) if tokio::time::Instant::now() >= deadline => {
                        tracing::warn!(unacked = n, "stopping with outbox rows unacknowledged; they are sent after the restart");
                        break;
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    Err(_) => break,
                }
            }
            let _ = pub_tx.send(PubIn::Raw(daemon_state(
                &topics.daemon_state(),
                DaemonStatus::Stopping,
                None,
            )));
            let (tx, rx) = oneshot::channel();
            let _ = pub_tx.send(PubIn::Backlog(tx));
            let _ = rx.await;
            let _ = pub_tx.send(PubIn::Stop);
            drop(pub_tx);
            let _ = tokio::time::timeout(Duration::from_secs(2), publisher).await;
            // A clean DISCONNECT (queued after "stopping") does not fire the "lost" will.
            let _ = tokio::time::timeout(Duration::from_millis(500), link.disconnect()).await;
            if let Some((rlink, _)) = &reads_link {
                let _ = tokio::time::timeout(Duration::from_millis(500), rlink.disconnect()).await;
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while mqtt_state.connected.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
            let _ = stop_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(2), inbound).await;
            if let Some((_, thread)) = reads_link {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::task::spawn_blocking(move || thread.join()),
                )
                .await;
            }
            drop(link);
            drop(writer);
            drop(dispatch_tx);
            tokio::task::spawn_blocking(move || writer_thread.join())
                .await
                .ok();
            tracing::info!("stopped");
            Ok(())
        })
    };

    Ok(Running {
        broker_addr,
        broker_v5_addr,
        ready: ready_rx,
        stats,
        mqtt: mqtt_state,
        writer_stats,
        publisher_stats,
        broker,
        heartbeats,
        metrics,
        metrics_addr,
        shutdown: Some(shutdown_tx),
        dispatch: dispatch_tx_for_reload,
        heavy_kg: heavy_tx_for_reload,
        config: cfg_for_reload,
        fatal: fatal_rx,
        done: Some(done),
    })
}

/// Calls per page when the retained state is republished.
const REPUBLISH_PAGE: usize = 500;
/// Pages of republished state queued for the publisher at most.
const REPUBLISH_PAGES_QUEUED: usize = 2;

/// Queues the retained state of every stored call live or finished since `since`, a page
/// at a time, for the publisher. Blocking (runs on a blocking thread): before reading a
/// page it waits until the publisher has reached the mark queued after the page before
/// the last, so that at most [`REPUBLISH_PAGES_QUEUED`] pages wait in the publisher's
/// unbounded input. Returns the number of calls, or None if the publisher stopped.
fn republish_views(
    reader: &Reader,
    topics: &Topics,
    since: Millis,
    windowed: bool,
    publisher: &mpsc::UnboundedSender<PubIn>,
) -> rusqlite::Result<Option<usize>> {
    let mut after = String::new();
    let mut total = 0usize;
    // With a retained-state window, the calls in it are found through the indexes (a
    // short list) instead of walking the whole table.
    let ids = if windowed {
        Some(reader.window_ids(since)?)
    } else {
        None
    };
    let mut chunks = ids.as_deref().map(|ids| ids.chunks(REPUBLISH_PAGE));
    // Marks of the pages queued and not yet reached by the publisher.
    let mut marks = std::collections::VecDeque::<oneshot::Receiver<()>>::new();
    loop {
        while marks.len() >= REPUBLISH_PAGES_QUEUED {
            let Some(m) = marks.pop_front() else { break };
            if m.blocking_recv().is_err() {
                return Ok(None);
            }
        }
        let page = match chunks.as_mut() {
            Some(chunks) => {
                let Some(chunk) = chunks.next() else { break };
                let mut page = Vec::with_capacity(chunk.len());
                for id in chunk {
                    if let Some(view) = reader.view(id)? {
                        page.push((id.clone(), view));
                    }
                }
                page
            }
            None => reader.views_page(since, &after, REPUBLISH_PAGE)?,
        };
        let Some((last, _)) = page.last() else {
            if chunks.is_some() {
                continue;
            }
            break;
        };
        after = last.clone();
        total += page.len();
        for (id, view) in page {
            let m = OutMsg {
                topic: topics.call_state(&id),
                payload: view.into_bytes(),
                retain: true,
                expiry_s: None,
            };
            if publisher.send(PubIn::Raw(m)).is_err() {
                return Ok(None);
            }
        }
        let (tx, rx) = oneshot::channel();
        if publisher.send(PubIn::Mark(tx)).is_err() {
            return Ok(None);
        }
        marks.push_back(rx);
    }
    Ok(Some(total))
}

/// The retained `daemon/state` message.
pub fn daemon_state(topic: &str, state: DaemonStatus, admission: Option<&str>) -> OutMsg {
    OutMsg {
        topic: topic.to_string(),
        payload: serde_json::to_vec(&DaemonState {
            state,
            version: Some(env!("CARGO_PKG_VERSION").into()),
            at: Some(now_ms()),
            admission: admission.map(str::to_string),
        })
        .unwrap_or_default(),
        retain: true,
        expiry_s: None,
    }
}

/// The reader thread: answers status reads from the database; `answer` sends an answer
/// out (false once nobody takes them).
fn serve_reads(
    reader: Reader,
    rx: std::sync::mpsc::Receiver<GetRequest>,
    answer: impl Fn(Reply) -> bool,
) {
    while let Ok(req) = rx.recv() {
        let body = match reader.call(&req.call_id) {
            Ok(Some(row)) => match serde_json::from_str(&row.view) {
                Ok(view) => ReplyBody::Call(Box::new(view)),
                Err(e) => ReplyBody::Error(ErrorBody::new(
                    ErrorCode::Internal,
                    format!("stored view unreadable: {e}"),
                )),
            },
            Ok(None) => ReplyBody::Error(ErrorBody::new(
                ErrorCode::NotFound,
                format!("no call {}", req.call_id),
            )),
            Err(e) => {
                tracing::error!(error = %e, "status read failed");
                ReplyBody::Error(ErrorBody::new(ErrorCode::Internal, "status read failed"))
            }
        };
        if !answer(Reply {
            path: req.path,
            body,
        }) {
            break;
        }
    }
}

/// The dispatch loop: owns the core, turns inputs and timers into decisions.
struct DispatchLoop {
    core: Dispatcher,
    reader: Reader,
    writer: Writer<AfterCommit>,
    publisher: mpsc::UnboundedSender<PubIn>,
    stats: Arc<Stats>,
    max_dispatching: usize,
    /// Open calls one kiosk may have (0 = no limit).
    max_open_per_kiosk: usize,
    topics: Topics,
    /// Latest scale readings.
    board: crate::scale::ScaleBoard,
    /// Prices.
    tariff: crate::tariff::Tariff,
    /// Heavy threshold.
    heavy_kg: f64,
    /// Watchdog heartbeat.
    beat: crate::systemd::Heartbeat,
    /// Test-only fault injection: while this file exists the loop hangs (takes no input
    /// and does not beat), so tests can see watchdog pings stop and what still works
    /// without the loop. Unset in production.
    stall_file: Option<PathBuf>,
    /// The database, for republishing retained state from a reader of its own.
    db: PathBuf,
    /// Retention of finished calls, days (0: keep).
    retention_days: u32,
    /// Retained state of finished calls, hours (0: as long as stored).
    state_hours: u32,
    /// Finished calls last changed before this have had their retained state cleared
    /// (or were never republished since the start).
    states_cleared_until: Millis,
    /// The running retained-state sweep, if any.
    sweep: Option<tokio::task::JoinHandle<()>>,
    /// How often retention and the sweep run.
    sweep_every: Duration,
    /// Event counters and the assignment latency histogram.
    metrics: Arc<crate::metrics::Metrics>,
    /// Request ids the database may hold, once built: a create whose request id is
    /// certainly not there skips the lookup (see `store::requests`).
    requests: Option<RequestFilter>,
    /// While the filter is being built: the request ids created meanwhile, inserted into
    /// it when it arrives (the build reads a snapshot and would miss them).
    requests_meanwhile: Option<Vec<String>>,
}

impl DispatchLoop {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>, mut shutdown: oneshot::Receiver<()>) {
        let mut heartbeat = tokio::time::interval(Duration::from_millis(500));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Retention and the retained-state sweep run one interval after start (at most a
        // minute), then every interval (`store.sweep_interval_s`), in small batches.
        let mut retention = tokio::time::interval_at(
            tokio::time::Instant::now() + self.sweep_every.min(Duration::from_secs(60)),
            self.sweep_every,
        );
        retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Recovery: timers were restored with their stored times; catch up at once.
        let d = self.core.tick(now_ms());
        self.submit(d, None).await;
        let mut building = Some(self.build_request_filter().await);
        loop {
            let wake = self.core.next_wakeup();
            let sleep = async {
                match wake {
                    Some(at) => {
                        let ms = u64::try_from(at.saturating_sub(now_ms()).max(0)).unwrap_or(0);
                        tokio::time::sleep(Duration::from_millis(ms)).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                msg = rx.recv() => match msg {
                    Some(m) => {
                        let create = matches!(m, Input::Create(..));
                        self.handle(m).await;
                        if create {
                            // The new call counts as dispatching before it stops counting as
                            // in flight, so admission never sees it in neither.
                            self.stats
                                .dispatching
                                .store(self.core.pending_count() as u64, Ordering::Relaxed);
                            self.stats.creates_handled.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    None => break,
                },
                _ = sleep => {
                    let d = self.core.tick(now_ms());
                    self.submit(d, None).await;
                }
                _ = retention.tick() => {
                    self.prune().await;
                    self.sweep_states(now_ms());
                }
                built = async { building.as_mut().expect("precondition").await }, if building.is_some() => {
                    building = None;
                    self.request_filter_built(built);
                }
                _ = heartbeat.tick() => {
                    // Proves the loop turns and the writer takes work (watchdog).
                    let _ = self.writer.try_send(WriteJob { op: Op::Ping, after: None });
                    if let Some(f) = self.stall_file.as_ref().filter(|f| f.exists()) {
                        tracing::warn!(file = %f.display(), "test fault injection: the dispatch loop hangs while this file exists");
                        while f.exists() {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
            if self.core.wants_assign() {
                let d = self.core.assign_pending(now_ms());
                self.submit(d, None).await;
            }
            self.stats
                .dispatching
                .store(self.core.pending_count() as u64, Ordering::Relaxed);
            self.stats
                .couriers_online
                .store(self.core.online_count() as u64, Ordering::Relaxed);
            self.beat.beat();
        }
        // Inputs still queued are requests not yet answered: kiosks retry them.
        rx.close();
    }

    /// Starts building the filter of the request ids stored (once, after start, on a
    /// blocking thread with a read connection of its own), sized for twice what the
    /// database holds; it grows by layers after that without reading again. The build
    /// reads once every job queued so far is committed, and the ids created from now on
    /// are kept aside for it, so that no stored request id is missing from the result.
    async fn build_request_filter(
        &mut self,
    ) -> tokio::task::JoinHandle<Result<RequestFilter, StoreError>> {
        let cap = store::requests::capacity_for(&self.reader).unwrap_or(0);
        self.requests_meanwhile = Some(Vec::new());
        let (btx, brx) = oneshot::channel();
        let queued = self
            .writer
            .send(WriteJob {
                op: Op::Ping,
                after: Some(AfterCommit::Barrier(btx)),
            })
            .await
            .is_ok();
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            if !queued || brx.blocking_recv().is_err() {
                return Err(StoreError::WriterGone);
            }
            store::requests::build(&db, cap)
        })
    }

    /// Takes a built filter into use, with the request ids created while it was built.
    fn request_filter_built(
        &mut self,
        built: Result<Result<RequestFilter, StoreError>, tokio::task::JoinError>,
    ) {
        let meanwhile = self.requests_meanwhile.take();
        match built {
            Ok(Ok(mut f)) => {
                for id in meanwhile.iter().flatten() {
                    f.insert(id);
                }
                tracing::info!(
                    ids = f.len(),
                    capacity = f.capacity(),
                    kib = f.bytes() / 1024,
                    "request id filter built"
                );
                self.requests = Some(f);
                self.stats.request_filter.store(true, Ordering::Relaxed);
            }
            // Without a filter every create is looked up, as before: slower, still right.
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot build the request id filter"),
            Err(e) => tracing::warn!(error = %e, "request id filter build failed"),
        }
    }

    /// Deletes finished calls past the retention period, a batch at a time.
    async fn prune(&mut self) {
        if self.retention_days == 0 {
            return;
        }
        let before = now_ms().saturating_sub(i64::from(self.retention_days) * 86_400_000);
        let job = WriteJob {
            op: Op::Prune {
                before,
                limit: 500,
                topics: self.topics.clone(),
            },
            after: None,
        };
        if self.writer.send(job).await.is_err() {
            tracing::warn!("retention: the writer has stopped");
        }
    }

    /// Clears the retained state topics of calls that finished more than `state_hours`
    /// ago since the last sweep: empty retained messages through the outbox (so a
    /// restart does not lose them), a page per transaction, on a task of its own.
    fn sweep_states(&mut self, now: Millis) {
        if self.state_hours == 0 {
            return;
        }
        if self.sweep.as_ref().is_some_and(|h| !h.is_finished()) {
            return; // The previous sweep is still at it; the next tick continues.
        }
        let before = now.saturating_sub(i64::from(self.state_hours) * 3_600_000);
        let from = self.states_cleared_until;
        if before <= from {
            return;
        }
        self.states_cleared_until = before;
        let (db, topics, writer) = (self.db.clone(), self.topics.clone(), self.writer.clone());
        self.sweep = Some(tokio::spawn(async move {
            let mut reader = match tokio::task::spawn_blocking(move || Reader::open(&db)).await {
                Ok(Ok(r)) => r,
                _ => {
                    tracing::error!("retained-state sweep: cannot open the database");
                    return;
                }
            };
            let mut cursor = (from, String::new());
            let mut total = 0usize;
            loop {
                let c = cursor.clone();
                let res = tokio::task::spawn_blocking(move || {
                    let page = reader.finished_before((c.0, &c.1), before, 500);
                    (reader, page)
                })
                .await;
                let page = match res {
                    Ok((r, Ok(page))) => {
                        reader = r;
                        page
                    }
                    Ok((_, Err(e))) => {
                        tracing::error!(error = %e, "retained-state sweep: read failed");
                        return;
                    }
                    Err(_) => return,
                };
                let Some(last) = page.last() else { break };
                cursor = last.clone();
                total += page.len();
                let changes = page
                    .iter()
                    .map(|(_, id)| {
                        crate::dispatch::Change::Outbox(OutMsg {
                            topic: topics.call_state(id),
                            payload: Vec::new(),
                            retain: true,
                            expiry_s: None,
                        })
                    })
                    .collect();
                let job = WriteJob {
                    op: Op::Apply(changes),
                    after: None,
                };
                if writer.send(job).await.is_err() {
                    return;
                }
            }
            if total > 0 {
                tracing::info!(calls = total, "retained state of finished calls cleared");
            }
        }));
    }

    /// Publishes the retained state again: courier jobs from memory, call views from the
    /// database (live calls and those within the retention period), page by page on a
    /// blocking thread so the loop is not held up. Paced: a page is queued only once the
    /// publisher has handed the page before the last one to the client, so at most two
    /// pages wait in its (unbounded) input, however many calls are stored; live messages
    /// queued meanwhile are interleaved rather than stuck behind the whole table.
    fn republish(&self, now: Millis) {
        let jobs = self.core.retained_snapshot(now);
        let n_mem = jobs.len();
        for m in jobs {
            let _ = self.publisher.send(PubIn::Raw(m));
        }
        let db = self.db.clone();
        let topics = self.topics.clone();
        let publisher = self.publisher.clone();
        let since = if self.retention_days == 0 {
            0
        } else {
            now.saturating_sub(i64::from(self.retention_days) * 86_400_000)
        };
        let windowed = self.state_hours > 0;
        let since = if windowed {
            since.max(now.saturating_sub(i64::from(self.state_hours) * 3_600_000))
        } else {
            since
        };
        tokio::task::spawn_blocking(move || {
            let reader = match Reader::open(&db) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "republish: cannot open the database");
                    return;
                }
            };
            match republish_views(&reader, &topics, since, windowed, &publisher) {
                Ok(Some(total)) => {
                    tracing::info!(calls = total, jobs = n_mem, "retained state republished");
                }
                // The publisher stopped (shutdown).
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "republish: read failed"),
            }
        });
    }

    /// Counts a decision's events; an assignment also records its latency.
    fn count(&self, d: &Decision) {
        use crate::dispatch::Change;
        for c in &d.changes {
            if let Change::Event(e) = c {
                self.metrics
                    .events
                    .get_or_create(&crate::metrics::KindLabel {
                        kind: e.kind.to_string(),
                    })
                    .inc();
                if e.kind == "assigned" {
                    let created = d.changes.iter().find_map(|c| match c {
                        Change::Call(call) if Some(&call.id) == e.call_id.as_ref() => {
                            Some(call.created_at)
                        }
                        _ => None,
                    });
                    if let Some(created) = created {
                        self.metrics
                            .assign_latency
                            .observe(e.recorded_at.saturating_sub(created).max(0) as f64 / 1000.0);
                    }
                }
            }
        }
    }

    /// Queues a decision; its answer goes out after the commit that holds it.
    async fn submit(&mut self, d: Decision, path: Option<ReplyPath>) {
        self.count(&d);
        let after = match (d.reply, path) {
            (Some(body), Some(path)) if path.topic.is_some() => {
                Some(AfterCommit::Reply(Reply { path, body }))
            }
            _ => None,
        };
        if d.changes.is_empty() && after.is_none() {
            return;
        }
        if let Err(e) = self
            .writer
            .send(WriteJob {
                op: Op::Apply(d.changes),
                after,
            })
            .await
        {
            tracing::error!(error = %e, "cannot queue a decision");
        }
    }

    fn direct(&self, path: ReplyPath, body: ReplyBody) {
        if path.topic.is_some() {
            let _ = self.publisher.send(PubIn::Direct(Reply { path, body }));
        }
    }

    async fn handle(&mut self, input: Input) {
        let now = now_ms();
        match input {
            Input::Create(req, path) => {
                let span = tracing::info_span!("create", request_id = %req.request_id);
                let _g = span.enter();
                let stored = self
                    .requests
                    .as_ref()
                    .is_none_or(|f| f.may_contain(&req.request_id));
                if self.core.call_for_request(&req.request_id).is_none() {
                    // An older call for the same request id, no longer in memory (looked
                    // up unless the filter says the database certainly lacks it).
                    let found = if stored {
                        self.reader.call_for_request(&req.request_id)
                    } else {
                        Ok(None)
                    };
                    match found {
                        Ok(Some(call_id)) => {
                            let body = match self.reader.call_body(&call_id) {
                                Ok(Some(call)) => ReplyBody::Create(Box::new(CreateAnswer {
                                    call: call.view(),
                                    pickup_code: call.pickup_code.clone(),
                                    duplicate: true,
                                    class_corrected: None,
                                })),
                                _ => ReplyBody::Error(ErrorBody::new(
                                    ErrorCode::Internal,
                                    "stored call unreadable",
                                )),
                            };
                            return self.direct(path, body);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "request id lookup failed");
                            return self.direct(
                                path,
                                ReplyBody::Error(ErrorBody::new(
                                    ErrorCode::Internal,
                                    "lookup failed",
                                )),
                            );
                        }
                    }
                    if self.core.pending_count() >= self.max_dispatching {
                        let ms = 1_000 + rand::rng().random_range(0..1_000);
                        return self.direct(
                            path,
                            ReplyBody::Error(ErrorBody::busy(
                                ms,
                                "too many calls are waiting for a courier",
                            )),
                        );
                    }
                    if let Some(k) = req.kiosk_id.as_deref() {
                        let open = self.core.open_for_kiosk(k);
                        if self.max_open_per_kiosk > 0 && open >= self.max_open_per_kiosk {
                            // Calls finish in minutes, not milliseconds: a longer hint.
                            let ms = 5_000 + rand::rng().random_range(0..5_000);
                            self.stats.open_limited.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(kiosk_id = k, open, "open-call limit reached");
                            return self.direct(
                                path,
                                ReplyBody::Error(ErrorBody::busy(
                                    ms,
                                    format!(
                                        "kiosk {k} has {open} open calls, the most allowed; \
                                         retry when one has finished"
                                    ),
                                )),
                            );
                        }
                    }
                }
                let mut req = *req;
                // Every call created from here on is stored under this request id.
                if let Some(f) = &mut self.requests {
                    f.insert(&req.request_id);
                }
                if let Some(m) = &mut self.requests_meanwhile {
                    m.push(req.request_id.clone());
                }
                // The scale decides the class when it has a fresh, stable reading; the
                // call never waits for it.
                let parcel = self.board.resolve(
                    &req.parcel,
                    req.kiosk_id.as_deref(),
                    req.scale_id.as_deref(),
                    now,
                    self.heavy_kg,
                );
                if let Some(why) = parcel.fallback {
                    if parcel.scale_id.is_some() {
                        tracing::info!(scale_id = ?parcel.scale_id, reason = why.as_str(), "declared parcel class kept");
                    }
                }
                req.parcel = parcel.parcel;
                let price = self.tariff.price_for(
                    req.parcel.class,
                    &req.location,
                    req.destination.as_ref(),
                );
                let new = NewCall {
                    id: new_call_id(now),
                    pickup_code: new_pickup_code(),
                    correlation: path
                        .payload_correlation()
                        .map(str::to_string)
                        .or_else(|| Some(req.request_id.clone())),
                    req,
                    price: Some(price),
                    class_corrected: parcel.corrected,
                };
                let mut d = self.core.create_call(new, now);
                if let Some(ReplyBody::Create(a)) = &d.reply {
                    if !a.duplicate {
                        // One line per call: debug (the events table holds every call's
                        // audit trail; at info this line cost about a tenth of the create path).
                        tracing::debug!(call_id = %a.call.call_id, "call accepted");
                    }
                }
                if self.core.wants_assign() {
                    // The new call enters dispatching (and may meet its courier) in the
                    // same write job, so both are one commit: a quiet site's call then
                    // costs one fsync, not two, and the store writes the call row once.
                    // The answer waited for this commit anyway.
                    d.absorb(self.core.assign_pending(now_ms()));
                }
                self.submit(d, Some(path)).await;
            }
            Input::Cancel(id, body, path) => {
                if self.core.call(&id).is_none() {
                    let body = match self.reader.call(&id) {
                        Ok(Some(row)) if row.status == CallStatus::Cancelled.as_str() => {
                            match serde_json::from_str(&row.view) {
                                Ok(v) => ReplyBody::Call(Box::new(v)),
                                Err(_) => ReplyBody::Error(ErrorBody::new(
                                    ErrorCode::Internal,
                                    "stored view unreadable",
                                )),
                            }
                        }
                        Ok(Some(row)) => ReplyBody::Error(ErrorBody::new(
                            ErrorCode::InvalidState,
                            format!("call {id} is {} and can no longer be cancelled", row.status),
                        )),
                        Ok(None) => ReplyBody::Error(ErrorBody::new(
                            ErrorCode::NotFound,
                            format!("no call {id}"),
                        )),
                        Err(_) => {
                            ReplyBody::Error(ErrorBody::new(ErrorCode::Internal, "lookup failed"))
                        }
                    };
                    return self.direct(path, body);
                }
                // A kiosk may cancel only its own calls; operator tools (answered on
                // `clients/…`) any call.
                let asker =
                    path.topic
                        .as_deref()
                        .and_then(|t| match self.topics.parse_reply_topic(t) {
                            Ok(pickup_protocol::topic::ReplyOwner::Kiosk(k)) => Some(k.to_string()),
                            _ => None,
                        });
                let owner = self.core.call(&id).and_then(|c| c.kiosk_id.clone());
                if let (Some(asker), Some(owner)) = (&asker, &owner) {
                    if asker != owner {
                        tracing::warn!(call_id = %id, kiosk_id = %asker, "cancel of another kiosk's call refused");
                        return self.direct(
                            path,
                            ReplyBody::Error(ErrorBody::new(
                                ErrorCode::Forbidden,
                                format!("call {id} was made by another kiosk"),
                            )),
                        );
                    }
                }
                let corr = path.payload_correlation().map(str::to_string);
                let d = self.core.cancel_call(
                    &id,
                    body.reason,
                    CancelledBy::Customer,
                    corr.as_deref(),
                    now,
                );
                self.submit(d, Some(path)).await;
            }
            Input::Presence(cid, p) => {
                let d = self.core.presence(&cid, p, now);
                self.submit(d, None).await;
            }
            Input::Location(cid, l) => {
                let d = self.core.location(&cid, l, now);
                self.submit(d, None).await;
            }
            Input::JobReply(cid, r, path) => {
                if let Some(rid) = &r.reply_id {
                    if let Ok(Some(_)) = self.reader.courier_reply(&cid, rid) {
                        return self.direct(
                            path,
                            ReplyBody::JobReply(pickup_protocol::answer::JobReplyAnswer {
                                call_id: r.call_id,
                                action: r.action,
                                duplicate: true,
                            }),
                        );
                    }
                }
                if self.core.call(&r.call_id).is_none() {
                    let body = match self.reader.call(&r.call_id) {
                        Ok(Some(row)) => ReplyBody::Error(ErrorBody::new(
                            ErrorCode::InvalidState,
                            format!("call {} is {}", r.call_id, row.status),
                        )),
                        _ => ReplyBody::Error(ErrorBody::new(
                            ErrorCode::NotFound,
                            format!("no call {}", r.call_id),
                        )),
                    };
                    tracing::info!(courier_id = %cid, call_id = %r.call_id, "refused job reply for an unknown or finished call");
                    return self.direct(path, body);
                }
                let d = self.core.job_reply(&cid, r, now);
                if let Some(ReplyBody::Error(e)) = &d.reply {
                    tracing::info!(courier_id = %cid, code = e.code.as_str(), error = %e.message, "refused job reply");
                }
                self.submit(d, Some(path)).await;
            }
            Input::Reload(cfg) => {
                self.core.set_config(cfg.dispatch_config());
                self.max_dispatching = cfg.limits.max_dispatching;
                self.max_open_per_kiosk = cfg.limits.max_open_per_kiosk;
                self.tariff = cfg.tariff.clone();
                self.heavy_kg = cfg.dispatch.heavy_kg;
                self.retention_days = cfg.store.retention_days;
                self.state_hours = cfg.store.state_hours;
                tracing::info!(
                    radius_m = cfg.dispatch.radius_m,
                    mode = ?cfg.dispatch.mode,
                    "settings reloaded"
                );
            }
            Input::Resync => {
                self.republish(now);
                let _ = self.publisher.send(PubIn::Raw(daemon_state(
                    &self.topics.daemon_state(),
                    DaemonStatus::Ready,
                    None,
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The republishing queues at most two pages ahead of the publisher: while the two
    /// newest marks are unanswered, nothing more arrives; every stored call arrives once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn republishing_waits_for_the_publisher_two_pages_ahead() {
        pacing(false).await;
    }

    /// The same through the retained-state window's index path.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn windowed_republishing_waits_for_the_publisher_two_pages_ahead() {
        pacing(true).await;
    }

    async fn pacing(windowed: bool) {
        const CALLS: usize = 2_200;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        let conn = store::open(&path).unwrap();
        conn.execute_batch("BEGIN").unwrap();
        for i in 0..CALLS {
            conn.execute(
                "INSERT INTO calls (id, request_id, status, tel, kiosk_id, created_at, updated_at, view, body)
                 VALUES (?1, ?2, 'completed', '010', NULL, 5, 5, '{}', '{}')",
                [format!("c{i:06}"), format!("r{i}")],
            )
            .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
        let topics = Topics::new("t").unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let producer = {
            let topics = topics.clone();
            tokio::task::spawn_blocking(move || {
                let reader = Reader::open(&path).unwrap();
                republish_views(&reader, &topics, 0, windowed, &tx)
            })
        };
        let mut held = std::collections::VecDeque::new();
        let mut topics_seen = std::collections::HashSet::new();
        loop {
            if held.len() == REPUBLISH_PAGES_QUEUED {
                // The producer must be waiting now: nothing may arrive until a mark is
                // answered (a bounded look; the producer never gets past its wait).
                match tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
                    Err(_) | Ok(None) => {}
                    Ok(Some(PubIn::Raw(m))) => {
                        panic!("{} queued with two pages unanswered", m.topic)
                    }
                    Ok(Some(other)) => panic!("unexpected {other:?}"),
                }
                let t: oneshot::Sender<()> = held.pop_front().unwrap();
                t.send(()).unwrap();
            }
            match rx.recv().await {
                Some(PubIn::Raw(m)) => assert!(topics_seen.insert(m.topic)),
                Some(PubIn::Mark(t)) => held.push_back(t),
                Some(other) => panic!("unexpected {other:?}"),
                None => break,
            }
        }
        assert_eq!(producer.await.unwrap().unwrap(), Some(CALLS));
        assert_eq!(topics_seen.len(), CALLS);
        assert!(topics_seen.contains(&topics.call_state("c002199")));
    }
}
