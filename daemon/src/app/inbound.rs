//! The MQTT side: polls the client's event loop (with backoff after errors), resubscribes
//! when the broker did not keep the session, decodes and validates every message, and
//! routes it: status reads to the reader, everything else to the dispatch loop. Bad input
//! is answered (or dropped with a log line when there is no reply path) right here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pickup_protocol::answer::{decode_report, decode_request};
use pickup_protocol::client::{Backoff, Link, LinkEvent, LinkEvents, Message};
use pickup_protocol::topic::ReplyOwner;
use pickup_protocol::{
    CancelCall, CourierLocation, CreateCall, ErrorBody, ErrorCode, GetCall, Inbound, JobReply,
    Presence, ReplyPath, Topics,
};
use tokio::sync::{mpsc, watch};

use super::publisher::{PubIn, Reply};
use crate::dispatch::ReplyBody;

/// A decoded, validated input for the dispatch loop.
#[derive(Debug)]
pub enum Input {
    /// `calls/create`
    Create(Box<CreateCall>, ReplyPath),
    /// `calls/<id>/cancel`
    Cancel(String, CancelCall, ReplyPath),
    /// `couriers/<cid>/presence`
    Presence(String, Presence),
    /// `couriers/<cid>/location`
    Location(String, CourierLocation),
    /// `couriers/<cid>/job/reply`
    JobReply(String, JobReply, ReplyPath),
    /// The broker lost our session: retained state must be published again.
    Resync,
    /// New live settings (SIGHUP).
    Reload(Box<crate::config::Config>),
}

/// Settings of the inbound side that a reload may change.
#[derive(Debug, Clone)]
pub struct Live {
    /// Heavy threshold for parcel validation.
    pub heavy_kg: f64,
    /// Admission control.
    pub admission: super::admission::AdmissionConfig,
    /// Calls waiting for a courier before new calls are refused.
    pub max_dispatching: usize,
    /// One position per courier per this many milliseconds, and repeated presences dropped
    /// within it (`limits.position_interval_ms`).
    pub position_interval_ms: u64,
}

impl Live {
    /// The live settings of `c`.
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self {
            heavy_kg: c.dispatch.heavy_kg,
            admission: c.admission.clone(),
            max_dispatching: c.limits.max_dispatching,
            position_interval_ms: c.limits.position_interval_ms,
        }
    }
}

/// A status read for the reader.
#[derive(Debug)]
pub struct GetRequest {
    /// Call id.
    pub call_id: String,
    /// Where to answer.
    pub path: ReplyPath,
}

/// Shared flags and counters of the MQTT side.
#[derive(Debug, Default)]
pub struct MqttState {
    /// Connected to the broker.
    pub connected: AtomicBool,
    /// Subscriptions confirmed on the current connection.
    pub subscribed: AtomicBool,
    /// Stopping: new calls are refused with `busy`.
    pub stopping: AtomicBool,
    /// Messages dropped as malformed.
    pub rejected: AtomicU64,
    /// Creates refused with `busy`.
    pub shed: AtomicU64,
    /// Courier positions held back or replaced by a newer one ([`super::positions`]).
    pub positions_coalesced: AtomicU64,
    /// Courier presences dropped as repeats ([`super::presences`]).
    pub presences_dropped: AtomicU64,
    /// The status-read connection is up.
    pub reads_connected: AtomicBool,
    /// Its subscription is confirmed.
    pub reads_subscribed: AtomicBool,
}

/// Everything the inbound task needs.
pub struct InboundCtx {
    /// Topics of the site.
    pub topics: Topics,
    /// Client handle (subscribe).
    pub link: Link,
    /// Dispatch loop input.
    pub dispatch: mpsc::Sender<Input>,
    /// Reader input.
    pub reads: std::sync::mpsc::SyncSender<GetRequest>,
    /// Publisher input.
    pub publisher: mpsc::UnboundedSender<PubIn>,
    /// Flags.
    pub state: Arc<MqttState>,
    /// Settings that change on reload.
    pub live: watch::Receiver<Live>,
    /// Admission control (owned by this task).
    pub admission: super::admission::Admission,
    /// Counters of the dispatch loop (calls dispatching) and where to show admission.
    pub stats: Arc<super::Stats>,
    /// Writer queue depth and commit latency.
    pub writer_stats: Arc<crate::store::WriterStats>,
    /// Writer queue capacity.
    pub writer_capacity: usize,
    /// Reconnect backoff ceiling.
    pub reconnect_max: Duration,
    /// Turns true when the task must end (after the daemon's DISCONNECT).
    pub stop: watch::Receiver<bool>,
    /// Watchdog heartbeat of this task.
    pub beat: crate::systemd::Heartbeat,
    /// Status reads arrive on their own connection ([`super::reads`]), not this one.
    pub read_link: bool,
    /// Courier positions, one per courier per interval (owned by this task).
    pub positions: super::positions::PositionGate,
    /// Repeated courier presences, dropped within that interval (owned by this task).
    pub presences: super::presences::PresenceGate,
}

/// Runs until told to stop or the client is closed.
pub async fn run(mut events: LinkEvents, mut ctx: InboundCtx) {
    let mut live = ctx.live.clone();
    let mut backoff = Backoff::new(Duration::from_millis(100), ctx.reconnect_max);
    let mut first = true;
    let mut stop = ctx.stop.clone();
    let mut idle = tokio::time::interval(Duration::from_secs(1));
    loop {
        let held_due = ctx.positions.next_due();
        let ev = tokio::select! {
            ev = events.poll() => ev,
            _ = stop.wait_for(|s| *s) => return,
            _ = sleep_until_ms(held_due.unwrap_or(0)), if held_due.is_some() => {
                release_positions(&mut ctx);
                continue;
            }
            _ = idle.tick() => {
                ctx.beat.beat();
                let now = crate::store::now_ms();
                let (state, t) = ctx.admission.state(now);
                report_admission(&ctx, state, t);
                release_positions(&mut ctx);
                ctx.presences.tick(now);
                continue;
            }
            _ = live.changed() => {
                let l = live.borrow_and_update().clone();
                ctx.admission.set_config(l.admission);
                let interval = i64::try_from(l.position_interval_ms).unwrap_or(i64::MAX);
                ctx.positions.set_interval(interval);
                ctx.presences.set_interval(interval);
                continue;
            }
        };
        ctx.beat.beat();
        match ev {
            Ok(LinkEvent::Connected { session_present }) => {
                backoff.reset();
                ctx.state.connected.store(true, Ordering::Relaxed);
                tracing::info!(session_present, "connected to the broker");
                ctx.state.subscribed.store(false, Ordering::Relaxed);
                // Subscribe on every connection (harmless when the session was kept).
                // Not from this task: the call may wait on the client's channel, which
                // only this task drains.
                let link = ctx.link.clone();
                let gets = ctx.topics.call_gets();
                let read_link = ctx.read_link;
                let mut filters = ctx.topics.daemon_subscriptions();
                if read_link {
                    filters.retain(|f| *f != gets);
                }
                tokio::spawn(async move {
                    if let Err(e) = link.subscribe_many(&filters).await {
                        tracing::warn!(error = %e, "subscribe failed");
                    }
                    // A kept session may still hold the subscription of a configuration
                    // without the read connection: every get would be answered twice.
                    if read_link {
                        if let Err(e) = link.unsubscribe(&gets).await {
                            tracing::debug!(error = %e, "unsubscribe failed");
                        }
                    }
                });
                if !session_present && !first {
                    let _ = ctx.publisher.send(PubIn::SessionLost);
                }
                if !session_present || first {
                    // A broker without our session may also lack the retained state, and
                    // at start we cannot know what it holds (rumqttd keeps nothing on disk
                    // and reports kept sessions it does not have): publish it again.
                    let _ = ctx.dispatch.send(Input::Resync).await;
                }
                first = false;
            }
            Ok(LinkEvent::SubAck) => {
                ctx.state.subscribed.store(true, Ordering::Relaxed);
            }
            Ok(LinkEvent::PublishSent(pkid)) => {
                let _ = ctx.publisher.send(PubIn::Sent(pkid));
            }
            Ok(LinkEvent::PubAck(pkid)) => {
                let _ = ctx.publisher.send(PubIn::Acked(pkid));
            }
            Ok(LinkEvent::Message(m)) => route(&mut ctx, m).await,
            Ok(LinkEvent::Other) => {}
            Err(e) => {
                let was = ctx.state.connected.swap(false, Ordering::Relaxed);
                ctx.state.subscribed.store(false, Ordering::Relaxed);
                if !wait_to_reconnect(
                    &e,
                    was,
                    &mut backoff,
                    &mut ctx.stop,
                    "broker connection",
                    true,
                )
                .await
                {
                    return;
                }
            }
        }
    }
}

/// Sleeps until the wall-clock time `at_ms` (`store::now_ms`).
async fn sleep_until_ms(at_ms: pickup_protocol::Millis) {
    let wait = at_ms.saturating_sub(crate::store::now_ms()).max(0);
    tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap_or(0))).await;
}

/// Hands the held positions whose interval is up to the dispatch loop.
fn release_positions(ctx: &mut InboundCtx) {
    for (cid, l) in ctx.positions.take_due(crate::store::now_ms()) {
        let _ = ctx.dispatch.try_send(Input::Location(cid, l));
    }
}

/// After a connection error: logs it and waits the backoff's next delay. False when the
/// task must end instead (the client was closed, or the daemon is stopping). With
/// `quiet_retries`, failed attempts before a first connection are logged at debug only.
pub(super) async fn wait_to_reconnect(
    e: &pickup_protocol::client::LinkError,
    was_connected: bool,
    backoff: &mut Backoff,
    stop: &mut watch::Receiver<bool>,
    what: &str,
    quiet_retries: bool,
) -> bool {
    if e.to_string().contains("Requests done") || *stop.borrow() {
        return false;
    }
    let wait = backoff.next_delay();
    if was_connected {
        tracing::warn!(error = %e, "{what} lost; reconnecting");
    } else if quiet_retries {
        tracing::debug!(error = %e, ?wait, "{what}: broker not reachable; retrying");
    } else {
        tracing::warn!(error = %e, ?wait, "{what} refused or broker not reachable; retrying");
    }
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

fn reply(ctx: &InboundCtx, path: ReplyPath, body: ReplyBody) {
    if path.topic.is_some() {
        let _ = ctx.publisher.send(PubIn::Direct(Reply { path, body }));
    }
}

/// Combines MQTT 5 properties and payload fields into a reply path whose topic is
/// confined to reply topics, so a request cannot make the daemon publish elsewhere.
fn reply_path(ctx: &InboundCtx, m: &Message, from_payload: ReplyPath) -> ReplyPath {
    confined_reply_path(&ctx.topics, m, from_payload)
}

/// [`reply_path`] for any connection of the daemon.
pub(super) fn confined_reply_path(
    topics: &Topics,
    m: &Message,
    from_payload: ReplyPath,
) -> ReplyPath {
    let mut p = from_payload;
    if m.response_topic.is_some() {
        p.topic = m.response_topic.clone();
    }
    if m.correlation_data.is_some() {
        p.correlation_data = m.correlation_data.clone();
    }
    if let Some(t) = &p.topic {
        match topics.parse_reply_topic(t) {
            Ok(ReplyOwner::Kiosk(_) | ReplyOwner::Client(_) | ReplyOwner::Courier(_)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "refusing reply topic");
                p.topic = None;
            }
        }
    }
    p
}

fn bad(ctx: &InboundCtx, topic: &str, path: ReplyPath, err: ErrorBody) {
    ctx.state.rejected.fetch_add(1, Ordering::Relaxed);
    if path.topic.is_none() {
        tracing::warn!(topic, code = err.code.as_str(), error = %err.message, "dropped bad message (no reply path)");
    } else {
        tracing::debug!(topic, code = err.code.as_str(), error = %err.message, "refused bad request");
    }
    reply(ctx, path, ReplyBody::Error(err));
}

fn busy(ctx: &InboundCtx, path: ReplyPath, retry_after_ms: u64, why: &str) {
    reply(
        ctx,
        path,
        ReplyBody::Error(ErrorBody::busy(retry_after_ms, why)),
    );
}

/// Shows the acceptance breaker's state (status line, retained daemon state, log).
fn report_admission(
    ctx: &InboundCtx,
    state: crate::breaker::BreakerState,
    t: Option<crate::breaker::Transition>,
) {
    use crate::breaker::BreakerState;
    let code = match state {
        BreakerState::Closed => 0,
        BreakerState::Open => 1,
        BreakerState::HalfOpen => 2,
    };
    ctx.stats.admission.store(code, Ordering::Relaxed);
    if let Some(t) = t {
        if t.to == BreakerState::Open {
            tracing::warn!(transition = %t, "call admission: shedding new calls");
        } else {
            tracing::info!(transition = %t, "call admission");
        }
        let _ = ctx.publisher.send(PubIn::Raw(super::daemon_state(
            &ctx.topics.daemon_state(),
            pickup_protocol::DaemonStatus::Ready,
            Some(t.to.as_str()),
        )));
    }
}

async fn route(ctx: &mut InboundCtx, m: Message) {
    let kind = match ctx.topics.parse(&m.topic) {
        Ok(k) => k,
        Err(e) => {
            // Only reachable with a broker that delivers beyond our filters.
            tracing::debug!(error = %e, "ignored message on unexpected topic");
            return;
        }
    };
    if m.retain && !matches!(kind, Inbound::Presence(_)) {
        // Retained requests are stale by definition (someone published with retain by
        // mistake); executing them at every reconnect would repeat them.
        tracing::warn!(topic = %m.topic, "ignored retained request");
        return;
    }
    match kind {
        Inbound::CreateCall => {
            let (p, res) = decode_request::<CreateCall>(&m.payload);
            let path = reply_path(ctx, &m, p);
            let mut req = match res {
                Ok(r) => r,
                Err(e) => return bad(ctx, &m.topic, path, e.to_body()),
            };
            // A kiosk answered on its own response topic is that kiosk: the call is its,
            // for the open-call limit and for who may cancel it.
            if let Some(k) = reply_kiosk(ctx, &path) {
                match &req.kiosk_id {
                    Some(id) if id != k => {
                        let e = format!(
                            "kiosk_id: {id} does not match the response topic of kiosk {k}"
                        );
                        return bad(ctx, &m.topic, path, ErrorBody::new(ErrorCode::Invalid, e));
                    }
                    Some(_) => {}
                    None => req.kiosk_id = Some(k.to_string()),
                }
            }
            let (heavy, max_dispatching) = {
                let l = ctx.live.borrow();
                (l.heavy_kg, l.max_dispatching)
            };
            if let Err(e) = req.validate(heavy) {
                return bad(ctx, &m.topic, path, ErrorBody::new(ErrorCode::Invalid, e));
            }
            if ctx.state.stopping.load(Ordering::Relaxed) {
                return busy(ctx, path, 5_000, "pickupd is restarting; retry shortly");
            }
            let client = req
                .kiosk_id
                .clone()
                .or_else(|| path.topic.clone())
                .unwrap_or_else(|| "anonymous".into());
            let load = super::admission::Load {
                inbound_queued: ctx.dispatch.max_capacity() - ctx.dispatch.capacity(),
                inbound_capacity: ctx.dispatch.max_capacity(),
                writer_queued: ctx.writer_stats.queued.load(Ordering::Relaxed) as usize,
                writer_capacity: ctx.writer_capacity,
                dispatching: (ctx.stats.dispatching.load(Ordering::Relaxed)
                    + ctx
                        .stats
                        .creates_admitted
                        .load(Ordering::Relaxed)
                        .saturating_sub(ctx.stats.creates_handled.load(Ordering::Relaxed)))
                    as usize,
                max_dispatching,
                last_commit_us: ctx.writer_stats.last_commit_us.load(Ordering::Relaxed),
            };
            let now = crate::store::now_ms();
            let (verdict, t) = ctx.admission.admit(&client, load, now);
            if t.is_some() {
                let (state, _) = ctx.admission.state(now);
                report_admission(ctx, state, t);
            }
            if let Err(r) = verdict {
                ctx.state.shed.fetch_add(1, Ordering::Relaxed);
                return busy(ctx, path, r.retry_after_ms, r.why);
            }
            ctx.stats.creates_admitted.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = ctx.dispatch.try_send(Input::Create(Box::new(req), path)) {
                ctx.stats.creates_admitted.fetch_sub(1, Ordering::Relaxed);
                let path = match e.into_inner() {
                    Input::Create(_, p) => p,
                    _ => return,
                };
                busy(ctx, path, retry_after(ctx), "too many requests in progress");
            }
        }
        Inbound::CancelCall(id) => {
            let (p, res) = decode_request::<CancelCall>(&m.payload);
            let path = reply_path(ctx, &m, p);
            let body = match res {
                Ok(b) => b,
                Err(e) => return bad(ctx, &m.topic, path, e.to_body()),
            };
            if let Some(r) = &body.reason {
                if let Err(e) = pickup_protocol::validate::text("reason", r) {
                    return bad(ctx, &m.topic, path, ErrorBody::new(ErrorCode::Invalid, e));
                }
            }
            // Cancels are never shed: they only free capacity.
            if ctx
                .dispatch
                .send(Input::Cancel(id.to_string(), body, path))
                .await
                .is_err()
            {
                tracing::debug!("dispatch loop gone");
            }
        }
        Inbound::GetCall(_) if ctx.read_link => {
            tracing::debug!("status request on the main connection ignored (read connection on)");
        }
        Inbound::GetCall(id) => {
            let (p, res) = decode_request::<GetCall>(&m.payload);
            let path = reply_path(ctx, &m, p);
            if let Err(e) = res {
                return bad(ctx, &m.topic, path, e.to_body());
            }
            let req = GetRequest {
                call_id: id.to_string(),
                path,
            };
            if let Err(e) = ctx.reads.try_send(req) {
                let req = match e {
                    std::sync::mpsc::TrySendError::Full(r)
                    | std::sync::mpsc::TrySendError::Disconnected(r) => r,
                };
                busy(ctx, req.path, 200, "too many status reads in progress");
            }
        }
        Inbound::Presence(cid) => {
            if m.payload.is_empty() {
                return; // A cleared retained presence.
            }
            match decode_report::<Presence>(&m.payload)
                .map_err(|e| e.to_body())
                .and_then(|p| {
                    p.validate()
                        .map(|()| p)
                        .map_err(|e| ErrorBody::new(ErrorCode::Invalid, e))
                }) {
                Ok(p) => {
                    let passed = ctx.presences.offer(cid, &p, crate::store::now_ms());
                    ctx.state
                        .presences_dropped
                        .store(ctx.presences.dropped(), Ordering::Relaxed);
                    if passed {
                        let _ = ctx.dispatch.send(Input::Presence(cid.to_string(), p)).await;
                    }
                }
                Err(e) => bad(ctx, &m.topic, ReplyPath::default(), e),
            }
        }
        Inbound::Location(cid) => {
            match decode_report::<CourierLocation>(&m.payload)
                .map_err(|e| e.to_body())
                .and_then(|l| {
                    l.validate()
                        .map(|()| l)
                        .map_err(|e| ErrorBody::new(ErrorCode::Invalid, e))
                }) {
                Ok(l) => {
                    let now = crate::store::now_ms();
                    let passed = ctx.positions.offer(cid, l, now);
                    ctx.state
                        .positions_coalesced
                        .store(ctx.positions.coalesced(), Ordering::Relaxed);
                    if let Some(l) = passed {
                        // Positions are frequent and superseded by the next one: shed
                        // them first when the loop is saturated.
                        let _ = ctx.dispatch.try_send(Input::Location(cid.to_string(), l));
                    }
                }
                Err(e) => bad(ctx, &m.topic, ReplyPath::default(), e),
            }
        }
        Inbound::JobReply(cid) => {
            let (p, res) = decode_request::<JobReply>(&m.payload);
            let path = reply_path(ctx, &m, p);
            let r = match res {
                Ok(r) => r,
                Err(e) => return bad(ctx, &m.topic, path, e.to_body()),
            };
            if let Err(e) = r.validate() {
                return bad(ctx, &m.topic, path, ErrorBody::new(ErrorCode::Invalid, e));
            }
            if ctx
                .dispatch
                .send(Input::JobReply(cid.to_string(), r, path))
                .await
                .is_err()
            {
                tracing::debug!("dispatch loop gone");
            }
        }
    }
}

/// The kiosk whose own response topic `path` names, if any.
fn reply_kiosk<'a>(ctx: &InboundCtx, path: &'a ReplyPath) -> Option<&'a str> {
    match ctx.topics.parse_reply_topic(path.topic.as_deref()?) {
        Ok(ReplyOwner::Kiosk(k)) => Some(k),
        _ => None,
    }
}

/// A retry hint from the current backlog, with jitter so kiosks do not retry in step.
fn retry_after(ctx: &InboundCtx) -> u64 {
    use rand::Rng;
    let backlog = ctx.dispatch.max_capacity() - ctx.dispatch.capacity();
    let base = 200 + (backlog as u64).min(10_000) / 2;
    base + rand::rng().random_range(0..=base / 2)
}
