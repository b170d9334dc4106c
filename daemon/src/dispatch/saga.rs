//! The call → manage → assign saga: a state machine that takes one input and `now` and
//! returns a [`Decision`] — the rows to write, the messages that must leave the box (all in
//! one transaction), and the answer for the requester. No I/O happens here.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use pickup_protocol::answer::{CallAnswer, CreateAnswer, JobReplyAnswer};
use pickup_protocol::validate::mask_phone;
use pickup_protocol::{
    CallStatus, CallView, CourierBrief, CourierLocation, CreateCall, ErrorBody, ErrorCode, Job,
    JobAction, JobKind, JobReply, Millis, Notification, Presence, PresenceState, Topics,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::assign::{best_linear, eligible, GridIndex, Need};
use super::call::{Call, Offer};
use super::courier::Courier;
use super::notice::Templates;

/// How a courier gets a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The best candidate is assigned directly.
    Auto,
    /// The best candidate gets an offer it must accept in time.
    Offer,
}

/// Dispatch settings (all reloadable).
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchConfig {
    /// Auto-assign or offer.
    pub mode: Mode,
    /// Couriers farther than this from the pickup point are not considered.
    pub radius_m: f64,
    /// A call without a courier after this long fails.
    pub deadline_ms: Millis,
    /// How long an offer stays open.
    pub offer_timeout_ms: Millis,
    /// How long an assigned courier may be offline before the call is reassigned.
    pub grace_ms: Millis,
    /// Older positions make a courier ineligible.
    pub location_max_age_ms: Millis,
    /// Average travel speed for the ETA, metres per second.
    pub speed_mps: f64,
    /// Wrong pickup codes allowed before `picked_up` is refused for good.
    pub max_wrong_codes: u32,
    /// How long finished calls stay in memory (duplicate requests and replies are
    /// answered from memory meanwhile; later from the database).
    pub keep_terminal_ms: Millis,
    /// Use the grid index (else the linear scan; both give the same answer).
    pub use_index: bool,
    /// Notification texts.
    pub templates: Templates,
    /// Also queue every notification for the HTTP webhook sink ([`Change::Delivery`]).
    /// Fixed at start: the webhook task runs only when it is configured then.
    pub webhook: bool,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Auto,
            radius_m: 5_000.0,
            deadline_ms: 10 * 60_000,
            offer_timeout_ms: 30_000,
            grace_ms: 120_000,
            location_max_age_ms: 5 * 60_000,
            speed_mps: 6.0,
            max_wrong_codes: 5,
            keep_terminal_ms: 10 * 60_000,
            use_index: true,
            templates: Templates::default(),
            webhook: false,
        }
    }
}

/// A message that must be published after the transaction commits (outbox row).
#[derive(Debug, Clone, PartialEq)]
pub struct OutMsg {
    /// Full topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retained.
    pub retain: bool,
    /// MQTT 5 message expiry, seconds.
    pub expiry_s: Option<u32>,
}

/// Sink name of the HTTP webhook in [`Delivery::sink`].
pub const WEBHOOK_SINK: &str = "webhook";

/// A notification queued for a sink other than the MQTT topic (the HTTP webhook); written
/// in the same transaction as its outbox row, so both sinks get the same notifications.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Notification id (the receiver's dedup key).
    pub id: String,
    /// The call concerned: deliveries of one call keep their order.
    pub call_id: String,
    /// Sink name (`webhook`).
    pub sink: String,
    /// The notification JSON, as published on MQTT.
    pub payload: Vec<u8>,
}

/// An audit-trail row.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    /// The call concerned.
    pub call_id: Option<String>,
    /// The courier concerned.
    pub courier_id: Option<String>,
    /// What happened (`requested`, `assigned`, `declined`, …).
    pub kind: &'static str,
    /// When it happened (device time for courier actions).
    pub at: Millis,
    /// When the daemon recorded it.
    pub recorded_at: Millis,
    /// Correlation id of the request that caused it.
    pub correlation: Option<String>,
    /// Details.
    pub data: serde_json::Value,
}

/// One durable change; a [`Decision`]'s changes are written in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Insert or replace a call and its assignment row.
    Call(Box<Call>),
    /// Insert or replace a courier.
    Courier(Box<Courier>),
    /// Append to the event log.
    Event(EventRow),
    /// Remember a courier reply id.
    CourierReply {
        /// Device-chosen id.
        reply_id: String,
        /// Courier.
        courier_id: String,
        /// Call.
        call_id: String,
        /// Action.
        action: JobAction,
    },
    /// Queue a message for publishing.
    Outbox(OutMsg),
    /// Queue a notification for a non-MQTT sink.
    Delivery(Delivery),
}

/// The answer for the requester, sent after commit.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyBody {
    /// `calls/create` succeeded.
    Create(Box<CreateAnswer>),
    /// `get` / `cancel` succeeded.
    Call(Box<CallView>),
    /// A courier's job reply was applied.
    JobReply(JobReplyAnswer),
    /// Refused.
    Error(ErrorBody),
}

impl ReplyBody {
    /// Serialized answer with the payload correlation id.
    pub fn to_payload(&self, correlation: Option<&str>) -> Vec<u8> {
        use pickup_protocol::answer::Answer;
        match self {
            Self::Create(a) => Answer::ok(correlation, a).to_vec(),
            Self::Call(v) => Answer::ok(
                correlation,
                CallAnswer {
                    call: (**v).clone(),
                },
            )
            .to_vec(),
            Self::JobReply(a) => Answer::ok(correlation, a).to_vec(),
            Self::Error(e) => Answer::err(correlation, e.clone()).to_vec(),
        }
    }

    fn err(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self::Error(ErrorBody::new(code, msg))
    }
}

/// What one input leads to.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Decision {
    /// Durable changes, in order; empty means nothing to write.
    pub changes: Vec<Change>,
    /// Answer to send after commit.
    pub reply: Option<ReplyBody>,
}

impl Decision {
    fn reply(body: ReplyBody) -> Self {
        Self {
            changes: Vec::new(),
            reply: Some(body),
        }
    }
    /// Appends another decision's changes (its reply is dropped).
    pub fn absorb(&mut self, other: Decision) {
        self.changes.extend(other.changes);
    }
}

/// A validated create request with the values the adapter chose (id, code, price,
/// measured parcel), so that the core stays deterministic.
#[derive(Debug, Clone)]
pub struct NewCall {
    /// Call id to use.
    pub id: String,
    /// Pickup code to use.
    pub pickup_code: String,
    /// The request (parcel already resolved against the scale).
    pub req: CreateCall,
    /// Price from the tariff.
    pub price: Option<u64>,
    /// Set when the measured class overrode the declared one.
    pub class_corrected: Option<String>,
    /// Correlation id for the event log.
    pub correlation: Option<String>,
}

/// Who cancelled a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelledBy {
    /// The customer at a kiosk.
    Customer,
    /// An operator.
    Operator,
}

/// The saga's state: live calls and known couriers.
pub struct Dispatcher {
    cfg: DispatchConfig,
    topics: Topics,
    /// Maps keyed by call or request id are B-trees: a hash map that grows rehashes and
    /// moves every entry at once (with 100k calls in memory that stalled one create by
    /// 40-120 ms); a B-tree grows a node at a time.
    calls: BTreeMap<String, Box<Call>>,
    by_request: BTreeMap<String, String>,
    /// Calls waiting for a courier, oldest first; keyed by `(created_at, id)`.
    pending: BTreeSet<(Millis, String)>,
    /// Calls created since the last assign pass: they enter `dispatching` there. Kept
    /// apart so that finding them does not mean walking every pending call.
    fresh: Vec<String>,
    /// Couriers online (kept with each presence change, read after every input).
    online: usize,
    /// Every call's next due time as `(when, id)`, and each call's entry there: the next
    /// wake-up and the calls due are found without walking every call in memory.
    timers: BTreeSet<(Millis, String)>,
    timer_at: BTreeMap<String, Millis>,
    /// Boxed: the map's spare buckets (up to half of them after it grows) then cost a
    /// pointer each instead of a whole courier (about 200 bytes).
    couriers: HashMap<Arc<str>, Box<Courier>>,
    grid: GridIndex,
    /// Recent courier reply ids, to drop repeats before they reach the database.
    seen_replies: HashSet<String>,
    seen_order: VecDeque<String>,
    /// Every pending call is searched again at the next assign pass (start, new settings).
    rematch: bool,
    /// Couriers that may have become eligible since the last assign pass (online, free
    /// again, moved). After a pass no pending call has an eligible courier, so only the
    /// pending calls one of these could serve are searched again.
    freed: BTreeSet<String>,
    /// Calls that went back to waiting (a withdrawn offer, a reassignment): searched again.
    requeued: BTreeSet<String>,
    /// Open (not yet finished) calls by the kiosk that made them, and each such call's
    /// kiosk: the per-kiosk limit on open calls is checked without walking every call.
    open_by_kiosk: HashMap<String, usize>,
    open_kiosk_of: BTreeMap<String, String>,
}

const SEEN_REPLIES: usize = 4096;

/// The courier `cid` in `couriers`, added if first heard of. A known courier's id is
/// shared, not copied: this runs for every position report.
fn courier_entry<'a>(
    couriers: &'a mut HashMap<Arc<str>, Box<Courier>>,
    cid: &str,
    now: Millis,
) -> &'a mut Courier {
    let key = match couriers.get_key_value(cid) {
        Some((k, _)) => Arc::clone(k),
        None => Arc::from(cid),
    };
    couriers
        .entry(key)
        .or_insert_with_key(|k| Box::new(Courier::with_id(Arc::clone(k), now)))
}

impl Dispatcher {
    /// An empty dispatcher.
    pub fn new(cfg: DispatchConfig, topics: Topics) -> Self {
        Self {
            cfg,
            topics,
            calls: BTreeMap::new(),
            by_request: BTreeMap::new(),
            pending: BTreeSet::new(),
            fresh: Vec::new(),
            online: 0,
            timers: BTreeSet::new(),
            timer_at: BTreeMap::new(),
            couriers: HashMap::new(),
            grid: GridIndex::default(),
            seen_replies: HashSet::new(),
            seen_order: VecDeque::new(),
            rematch: false,
            freed: BTreeSet::new(),
            requeued: BTreeSet::new(),
            open_by_kiosk: HashMap::new(),
            open_kiosk_of: BTreeMap::new(),
        }
    }

    /// Replaces the settings (SIGHUP); takes effect at the next decision. The webhook
    /// switch stays as it was at start (the sink's task runs only then).
    pub fn set_config(&mut self, mut cfg: DispatchConfig) {
        cfg.webhook = self.cfg.webhook;
        self.cfg = cfg;
        self.rematch = true;
        // keep_terminal_ms may have changed.
        self.retime_all();
    }

    /// Current settings.
    pub fn config(&self) -> &DispatchConfig {
        &self.cfg
    }

    /// Loads state from the database at start. Timers keep their stored times.
    pub fn restore(&mut self, calls: Vec<Call>, couriers: Vec<Courier>) {
        for c in couriers {
            if let (Some(lat), Some(lon)) = (c.lat, c.lon) {
                self.grid.update(&c.id, lat, lon);
            }
            if c.online {
                self.online += 1;
            }
            self.couriers.insert(Arc::clone(&c.id), Box::new(c));
        }
        for call in calls {
            if call.is_pending() {
                self.pending.insert((call.created_at, call.id.clone()));
            }
            if call.status == CallStatus::Requested {
                self.fresh.push(call.id.clone());
            }
            self.by_request
                .insert(call.request_id.clone(), call.id.clone());
            self.count_open(&call);
            self.calls.insert(call.id.clone(), Box::new(call));
        }
        self.retime_all();
        self.rematch = true;
    }

    /// A call in memory (live, or finished recently).
    pub fn call(&self, id: &str) -> Option<&Call> {
        self.calls.get(id).map(|c| &**c)
    }

    /// The call a request id created, if still in memory.
    pub fn call_for_request(&self, request_id: &str) -> Option<&Call> {
        self.by_request
            .get(request_id)
            .and_then(|id| self.calls.get(id))
            .map(|c| &**c)
    }

    /// A courier.
    pub fn courier(&self, id: &str) -> Option<&Courier> {
        self.couriers.get(id).map(|c| &**c)
    }

    /// Every courier (tests, status line).
    pub fn couriers(&self) -> impl Iterator<Item = &Courier> {
        self.couriers.values().map(|c| &**c)
    }

    /// Calls still looking for a courier.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Couriers currently online.
    pub fn online_count(&self) -> usize {
        self.online
    }

    /// Calls made by kiosk `kiosk_id` that are not finished yet.
    pub fn open_for_kiosk(&self, kiosk_id: &str) -> usize {
        self.open_by_kiosk.get(kiosk_id).copied().unwrap_or(0)
    }

    /// Counts `call` as open for its kiosk unless it is finished or already counted.
    fn count_open(&mut self, call: &Call) {
        let Some(k) = &call.kiosk_id else { return };
        if call.status.is_terminal() || self.open_kiosk_of.contains_key(&call.id) {
            return;
        }
        self.open_kiosk_of.insert(call.id.clone(), k.clone());
        *self.open_by_kiosk.entry(k.clone()).or_default() += 1;
    }

    /// Stops counting call `id` as open (it finished).
    fn uncount_open(&mut self, id: &str) {
        let Some(k) = self.open_kiosk_of.remove(id) else {
            return;
        };
        if let Some(n) = self.open_by_kiosk.get_mut(&k) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.open_by_kiosk.remove(&k);
            }
        }
    }

    /// Takes `id` out of the pending set (its key holds the call's `created_at`).
    fn unpend(&mut self, id: &str) {
        if let Some(created) = self.calls.get(id).map(|c| c.created_at) {
            self.pending.remove(&(created, id.to_string()));
        }
    }

    /// Calls in memory, live or recently finished.
    pub fn calls(&self) -> impl Iterator<Item = &Call> {
        self.calls.values().map(|c| &**c)
    }

    // One audit row has this many facts; a struct literal at each call site reads worse.
    #[allow(clippy::too_many_arguments)]
    fn event(
        &mut self,
        d: &mut Decision,
        call: Option<&str>,
        courier: Option<&str>,
        kind: &'static str,
        at: Millis,
        now: Millis,
        correlation: Option<&str>,
        data: serde_json::Value,
    ) {
        d.changes.push(Change::Event(EventRow {
            call_id: call.map(str::to_string),
            courier_id: courier.map(str::to_string),
            kind,
            at,
            recorded_at: now,
            correlation: correlation.map(str::to_string),
            data,
        }));
    }

    fn publish_state(&self, d: &mut Decision, call: &Call) {
        d.changes.push(Change::Outbox(OutMsg {
            topic: self.topics.call_state(&call.id),
            payload: serde_json::to_vec(&call.view()).unwrap_or_default(),
            retain: true,
            expiry_s: None,
        }));
    }

    fn publish_job(&self, d: &mut Decision, courier_id: &str, job: &Job) {
        let expiry_s = job
            .expires_at
            .map(|e| u32::try_from(((e - job.at).max(1_000) + 999) / 1_000).unwrap_or(u32::MAX));
        d.changes.push(Change::Outbox(OutMsg {
            topic: self.topics.courier_job(courier_id),
            payload: serde_json::to_vec(job).unwrap_or_default(),
            retain: true,
            expiry_s,
        }));
    }

    fn job_for(call: &Call, kind: JobKind, at: Millis, reason: Option<&str>) -> Job {
        Job {
            kind,
            call_id: Some(call.id.clone()),
            pickup: Some(call.location.clone()),
            parcel: Some(call.parcel.clone()),
            tel: Some(mask_phone(&call.tel)),
            expires_at: call.offer.as_ref().map(|o| o.expires_at),
            reason: reason.map(str::to_string),
            at,
        }
    }

    fn notify(
        &mut self,
        d: &mut Decision,
        call_id: &str,
        template: &str,
        mut vars: serde_json::Map<String, serde_json::Value>,
        now: Millis,
    ) {
        let Some(call) = self.calls.get_mut(call_id) else {
            return;
        };
        call.notices += 1;
        let seq = call.notices;
        let tel = call.tel.clone();
        vars.insert("call_id".into(), call_id.into());
        let text = self.cfg.templates.render(template, &vars);
        let n = Notification {
            id: format!("{call_id}-{seq}"),
            call_id: call_id.to_string(),
            template: template.to_string(),
            tel,
            text,
            vars,
            at: now,
        };
        let payload = serde_json::to_vec(&n).unwrap_or_default();
        if self.cfg.webhook {
            d.changes.push(Change::Delivery(Delivery {
                id: n.id.clone(),
                call_id: n.call_id.clone(),
                sink: WEBHOOK_SINK.into(),
                payload: payload.clone(),
            }));
        }
        d.changes.push(Change::Outbox(OutMsg {
            topic: self.topics.notifications(),
            payload,
            retain: false,
            expiry_s: None,
        }));
    }

    /// A courier's display name for the customer (the id when it gave none).
    fn courier_name(&self, cid: &str) -> String {
        self.couriers
            .get(cid)
            .and_then(|c| c.name.as_deref())
            .unwrap_or(cid)
            .to_string()
    }

    fn put_call(&self, d: &mut Decision, id: &str) {
        if let Some(c) = self.calls.get(id) {
            d.changes.push(Change::Call(c.clone()));
            self.publish_state(d, c);
        }
    }

    fn put_courier(&self, d: &mut Decision, id: &str) {
        if let Some(c) = self.couriers.get(id) {
            d.changes.push(Change::Courier(c.clone()));
        }
    }

    /// Makes every call and courier snapshot in `d` the latest state, so that counters
    /// changed later in the same decision (notification sequence) are written too, and
    /// files each changed call under its new due time. Every change to a call goes through
    /// here: a change that is not written would be lost at the next restart.
    fn finish(&mut self, mut d: Decision) -> Decision {
        for c in &mut d.changes {
            match c {
                Change::Call(call) => {
                    if let Some(now) = self.calls.get(&call.id) {
                        **call = (**now).clone();
                    }
                    if call.status.is_terminal() {
                        self.uncount_open(&call.id);
                    }
                    self.retime(&call.id);
                }
                Change::Courier(courier) => {
                    if let Some(now) = self.couriers.get(&courier.id) {
                        *courier = now.clone();
                    }
                }
                _ => {}
            }
        }
        d
    }

    // ----------------------------------------------------------------- call context

    /// Records a new call and its assignment request. The answer says `requested`; the
    /// assigner runs in [`Dispatcher::assign_pending`].
    pub fn create_call(&mut self, new: NewCall, now: Millis) -> Decision {
        if let Some(existing) = self.call_for_request(&new.req.request_id) {
            return Decision::reply(ReplyBody::Create(Box::new(CreateAnswer {
                call: existing.view(),
                pickup_code: existing.pickup_code.clone(),
                duplicate: true,
                class_corrected: None,
            })));
        }
        let req = new.req;
        let call = Call {
            id: new.id.clone(),
            request_id: req.request_id.clone(),
            tel: req.tel,
            kiosk_id: req.kiosk_id,
            location: req.location,
            destination: req.destination,
            parcel: req.parcel,
            price: new.price,
            status: CallStatus::Requested,
            pickup_code: new.pickup_code,
            wrong_codes: 0,
            courier: None,
            offer: None,
            declined: BTreeSet::new(),
            grace_until: None,
            deadline_at: now.saturating_add(self.cfg.deadline_ms),
            reason: None,
            created_at: now,
            updated_at: now,
            notices: 0,
        };
        let id = call.id.clone();
        let answer = CreateAnswer {
            call: call.view(),
            pickup_code: call.pickup_code.clone(),
            duplicate: false,
            class_corrected: new.class_corrected.clone(),
        };
        self.by_request.insert(req.request_id.clone(), id.clone());
        self.pending.insert((now, id.clone()));
        self.fresh.push(id.clone());
        let mut vars = serde_json::Map::new();
        vars.insert("pickup_code".into(), call.pickup_code.clone().into());
        let data = json!({
            "class": call.parcel.class.as_str(),
            "weight_source": call.parcel.weight_source,
            "kiosk_id": call.kiosk_id,
            "class_corrected": new.class_corrected,
        });
        self.count_open(&call);
        self.calls.insert(id.clone(), Box::new(call));
        let mut d = Decision::default();
        self.put_call(&mut d, &id);
        self.event(
            &mut d,
            Some(&id),
            None,
            "requested",
            now,
            now,
            new.correlation.as_deref(),
            data,
        );
        self.notify(&mut d, &id, "call.accepted", vars, now);
        d.reply = Some(ReplyBody::Create(Box::new(answer)));
        self.finish(d)
    }

    /// Cancels a call before pickup; frees and tells its courier. Idempotent.
    pub fn cancel_call(
        &mut self,
        id: &str,
        reason: Option<String>,
        by: CancelledBy,
        correlation: Option<&str>,
        now: Millis,
    ) -> Decision {
        let Some(call) = self.calls.get(id) else {
            return Decision::reply(ReplyBody::err(ErrorCode::NotFound, format!("no call {id}")));
        };
        if call.status == CallStatus::Cancelled {
            return Decision::reply(ReplyBody::Call(Box::new(call.view())));
        }
        if !call.status.is_cancellable() {
            return Decision::reply(ReplyBody::err(
                ErrorCode::InvalidState,
                format!(
                    "call {id} is {} and can no longer be cancelled",
                    call.status.as_str()
                ),
            ));
        }
        let who = match by {
            CancelledBy::Customer => "customer",
            CancelledBy::Operator => "operator",
        };
        let reason = reason.unwrap_or_else(|| format!("cancelled by {who}"));
        let mut d = Decision::default();
        let (holder, was) = {
            let call = self.calls.get(id).map(|c| {
                (
                    c.courier
                        .as_ref()
                        .map(|b| b.courier_id.clone())
                        .or_else(|| c.offer.as_ref().map(|o| o.courier_id.clone())),
                    c.status,
                )
            });
            call.unwrap_or((None, CallStatus::Requested))
        };
        self.unpend(id);
        if let Some(call) = self.calls.get_mut(id) {
            call.status = CallStatus::Cancelled;
            call.reason = Some(reason.clone());
            call.updated_at = now;
        }
        if let Some(cid) = &holder {
            self.free_courier(cid, id, now);
            if let Some(call) = self.calls.get(id) {
                let job = Self::job_for(call, JobKind::Cancelled, now, Some(&reason));
                self.publish_job(&mut d, cid, &job);
            }
            self.put_courier(&mut d, cid);
        }
        if let Some(call) = self.calls.get_mut(id) {
            call.offer = None;
        }
        self.put_call(&mut d, id);
        self.event(
            &mut d,
            Some(id),
            holder.as_deref(),
            "cancelled",
            now,
            now,
            correlation,
            json!({"by": who, "reason": reason, "was": was.as_str()}),
        );
        let mut vars = serde_json::Map::new();
        vars.insert("reason".into(), reason.into());
        vars.insert("by".into(), who.into());
        self.notify(&mut d, id, "call.cancelled", vars, now);
        if let Some(call) = self.calls.get(id) {
            d.reply = Some(ReplyBody::Call(Box::new(call.view())));
        }
        self.finish(d)
    }

    /// Clears a courier's hold on `call_id` and makes it free again.
    fn free_courier(&mut self, cid: &str, call_id: &str, now: Millis) {
        if let Some(c) = self.couriers.get_mut(cid) {
            if c.active_call.as_deref() == Some(call_id) {
                c.active_call = None;
            }
            if c.offered_call.as_deref() == Some(call_id) {
                c.offered_call = None;
            }
            if c.is_free() {
                c.idle_since = now;
                self.freed.insert(cid.to_string());
            }
        }
    }

    // -------------------------------------------------------------- courier context

    /// A courier's presence (online/offline, shift, profile).
    pub fn presence(&mut self, cid: &str, p: Presence, now: Millis) -> Decision {
        let mut d = Decision::default();
        let c = courier_entry(&mut self.couriers, cid, now);
        let was_online = c.online;
        let was_available = c.available;
        if let Some(name) = p.name {
            c.name = Some(name.into_boxed_str());
        }
        if p.vehicle.is_some() {
            c.vehicle = p.vehicle;
        }
        if let Some(tel) = p.tel {
            c.tel = Some(tel.into_boxed_str());
        }
        c.online = p.state == PresenceState::Online;
        c.available = p.available;
        c.last_seen = now;
        let online = c.online;
        match (was_online, online) {
            (false, true) => self.online += 1,
            (true, false) => self.online = self.online.saturating_sub(1),
            _ => {}
        }
        let offered = c.offered_call.clone();
        let active = c.active_call.clone();
        if online && (!was_online || !was_available) && c.is_free() {
            c.idle_since = now;
        }
        if online != was_online {
            self.event(
                &mut d,
                None,
                Some(cid),
                if online { "online" } else { "offline" },
                now,
                now,
                None,
                json!({"available": p.available}),
            );
        }
        if !online || !p.available {
            if let Some(call_id) = offered {
                self.withdraw_offer(&mut d, &call_id, cid, false, "courier went offline", now);
            }
        }
        if let Some(call_id) = active.as_deref() {
            if let Some(call) = self.calls.get_mut(call_id) {
                if call.status == CallStatus::Assigned {
                    if !online && call.grace_until.is_none() {
                        call.grace_until = Some(now.saturating_add(self.cfg.grace_ms));
                        self.put_call(&mut d, call_id);
                    } else if online && call.grace_until.is_some() {
                        call.grace_until = None;
                        self.put_call(&mut d, call_id);
                    }
                }
            }
        }
        // A handheld announces itself online on every connect. One restarted with its
        // broker session may not be told its job again: the broker replays only what the
        // old process had not acknowledged, and some brokers (rumqttd as published) do not
        // re-send retained messages for a subscription the session already holds. So the
        // job is told again here.
        if online && active.is_some() {
            if let Some(job) = self
                .couriers
                .get(cid)
                .and_then(|c| self.current_job(c, now))
            {
                self.publish_job(&mut d, cid, &job);
            }
        }
        self.put_courier(&mut d, cid);
        if online && p.available {
            self.freed.insert(cid.to_string());
        }
        self.finish(d)
    }

    /// A courier's position. Device time is clamped to the arrival time.
    pub fn location(&mut self, cid: &str, loc: CourierLocation, now: Millis) -> Decision {
        let c = courier_entry(&mut self.couriers, cid, now);
        c.lat = Some(loc.lat);
        c.lon = Some(loc.lon);
        c.location_at = Some(loc.at.map_or(now, |a| a.min(now)));
        c.last_seen = now;
        let eligible_now = c.online && c.available && c.is_free();
        let id = Arc::clone(&c.id);
        self.grid.update(&id, loc.lat, loc.lon);
        if eligible_now && !self.pending.is_empty() {
            self.freed.insert(cid.to_string());
        }
        let mut d = Decision::default();
        self.put_courier(&mut d, cid);
        d
    }

    fn withdraw_offer(
        &mut self,
        d: &mut Decision,
        call_id: &str,
        cid: &str,
        exclude: bool,
        reason: &str,
        now: Millis,
    ) {
        let Some(call) = self.calls.get_mut(call_id) else {
            return;
        };
        if call.offer.as_ref().map(|o| o.courier_id.as_str()) != Some(cid) {
            return;
        }
        call.offer = None;
        if exclude {
            call.declined.insert(cid.to_string());
        }
        call.updated_at = now;
        let created = call.created_at;
        let job = Self::job_for(call, JobKind::Withdrawn, now, Some(reason));
        self.pending.insert((created, call_id.to_string()));
        self.free_courier(cid, call_id, now);
        self.publish_job(d, cid, &job);
        self.put_courier(d, cid);
        if let Some(c) = self.calls.get(call_id) {
            d.changes.push(Change::Call(c.clone()));
        }
        self.event(
            d,
            Some(call_id),
            Some(cid),
            "offer_withdrawn",
            now,
            now,
            None,
            json!({"reason": reason}),
        );
        self.requeued.insert(call_id.to_string());
    }

    /// A courier's answer about a job. Repeats (same reply id, or an action already
    /// applied) change nothing and are answered as duplicates.
    pub fn job_reply(&mut self, cid: &str, r: JobReply, now: Millis) -> Decision {
        if let Some(rid) = &r.reply_id {
            if self.seen_replies.contains(&format!("{cid}/{rid}")) {
                return Decision::reply(ReplyBody::JobReply(JobReplyAnswer {
                    call_id: r.call_id,
                    action: r.action,
                    duplicate: true,
                }));
            }
        }
        let Some(call) = self.calls.get(&r.call_id) else {
            return Decision::reply(ReplyBody::err(
                ErrorCode::NotFound,
                format!("no live call {}", r.call_id),
            ));
        };
        let at = r.at.map_or(now, |a| a.clamp(call.created_at, now));
        let holder = call.courier.as_ref().map(|b| b.courier_id.as_str());
        let offered_to = call.offer.as_ref().map(|o| o.courier_id.as_str());
        let dup = || {
            Decision::reply(ReplyBody::JobReply(JobReplyAnswer {
                call_id: r.call_id.clone(),
                action: r.action,
                duplicate: true,
            }))
        };
        let mut d = match r.action {
            JobAction::Accept => {
                if offered_to == Some(cid) {
                    let call_id = r.call_id.clone();
                    let mut d = Decision::default();
                    self.assign(&mut d, &call_id, cid, at, now, "accepted");
                    d
                } else if holder == Some(cid) {
                    return dup();
                } else {
                    return Decision::reply(ReplyBody::err(
                        ErrorCode::InvalidState,
                        format!("no open offer of call {} for {cid}", r.call_id),
                    ));
                }
            }
            JobAction::Decline => {
                if offered_to == Some(cid) {
                    let mut d = Decision::default();
                    let reason = r.reason.clone().unwrap_or_else(|| "declined".into());
                    let call_id = r.call_id.clone();
                    self.withdraw_offer(&mut d, &call_id, cid, true, &reason, now);
                    self.event(
                        &mut d,
                        Some(&call_id),
                        Some(cid),
                        "declined",
                        at,
                        now,
                        None,
                        json!({"reason": reason}),
                    );
                    d
                } else if call.declined.contains(cid) {
                    return dup();
                } else {
                    return Decision::reply(ReplyBody::err(
                        ErrorCode::InvalidState,
                        format!("no open offer of call {} for {cid}", r.call_id),
                    ));
                }
            }
            JobAction::PickedUp => {
                if holder != Some(cid) {
                    return Decision::reply(ReplyBody::err(
                        ErrorCode::Forbidden,
                        format!("call {} is not assigned to {cid}", r.call_id),
                    ));
                }
                match call.status {
                    CallStatus::PickedUp | CallStatus::Completed => return dup(),
                    CallStatus::Assigned => {}
                    other => {
                        return Decision::reply(ReplyBody::err(
                            ErrorCode::InvalidState,
                            format!("call {} is {}", r.call_id, other.as_str()),
                        ))
                    }
                }
                if call.wrong_codes >= self.cfg.max_wrong_codes {
                    return Decision::reply(ReplyBody::err(
                        ErrorCode::TooManyAttempts,
                        format!(
                            "{} wrong pickup codes for call {}; ask the operator",
                            call.wrong_codes, r.call_id
                        ),
                    ));
                }
                let call_id = r.call_id.clone();
                if r.pickup_code.as_deref() != Some(call.pickup_code.as_str()) {
                    let mut d = Decision::default();
                    if let Some(c) = self.calls.get_mut(&call_id) {
                        c.wrong_codes += 1;
                    }
                    let n = self.calls.get(&call_id).map_or(0, |c| c.wrong_codes);
                    if let Some(c) = self.calls.get(&call_id) {
                        d.changes.push(Change::Call(c.clone()));
                    }
                    self.event(
                        &mut d,
                        Some(&call_id),
                        Some(cid),
                        "wrong_pickup_code",
                        at,
                        now,
                        None,
                        json!({"attempts": n}),
                    );
                    d.reply = Some(ReplyBody::err(
                        ErrorCode::WrongCode,
                        format!(
                            "pickup code does not match ({n} of {} attempts used)",
                            self.cfg.max_wrong_codes
                        ),
                    ));
                    // The counter must survive; no reply id is recorded so a corrected
                    // retry is not taken for a repeat.
                    return self.finish(d);
                }
                let mut d = Decision::default();
                if let Some(c) = self.calls.get_mut(&call_id) {
                    c.status = CallStatus::PickedUp;
                    c.grace_until = None;
                    c.updated_at = at;
                }
                self.put_call(&mut d, &call_id);
                if let Some(c) = self.calls.get(&call_id) {
                    let job = Self::job_for(c, JobKind::PickedUp, now, None);
                    self.publish_job(&mut d, cid, &job);
                }
                self.event(
                    &mut d,
                    Some(&call_id),
                    Some(cid),
                    "picked_up",
                    at,
                    now,
                    None,
                    json!({}),
                );
                let mut vars = serde_json::Map::new();
                vars.insert("courier_id".into(), cid.into());
                vars.insert("courier_name".into(), self.courier_name(cid).into());
                self.notify(&mut d, &call_id, "call.picked_up", vars, at);
                d
            }
            JobAction::Completed => {
                if holder != Some(cid) {
                    return Decision::reply(ReplyBody::err(
                        ErrorCode::Forbidden,
                        format!("call {} is not assigned to {cid}", r.call_id),
                    ));
                }
                match call.status {
                    CallStatus::Completed => return dup(),
                    CallStatus::PickedUp => {}
                    other => {
                        return Decision::reply(ReplyBody::err(
                            ErrorCode::InvalidState,
                            format!(
                                "call {} is {}: completed needs picked_up first",
                                r.call_id,
                                other.as_str()
                            ),
                        ))
                    }
                }
                let call_id = r.call_id.clone();
                let mut d = Decision::default();
                if let Some(c) = self.calls.get_mut(&call_id) {
                    c.status = CallStatus::Completed;
                    c.updated_at = at;
                }
                self.free_courier(cid, &call_id, now);
                self.put_call(&mut d, &call_id);
                self.publish_job(
                    &mut d,
                    cid,
                    &Job {
                        kind: JobKind::None,
                        call_id: None,
                        pickup: None,
                        parcel: None,
                        tel: None,
                        expires_at: None,
                        reason: None,
                        at: now,
                    },
                );
                self.put_courier(&mut d, cid);
                self.event(
                    &mut d,
                    Some(&call_id),
                    Some(cid),
                    "completed",
                    at,
                    now,
                    None,
                    json!({}),
                );
                let mut vars = serde_json::Map::new();
                vars.insert("courier_id".into(), cid.into());
                vars.insert("courier_name".into(), self.courier_name(cid).into());
                self.notify(&mut d, &call_id, "call.completed", vars, at);
                d
            }
        };
        if let Some(rid) = r.reply_id {
            let key = format!("{cid}/{rid}");
            self.seen_replies.insert(key.clone());
            self.seen_order.push_back(key);
            while self.seen_order.len() > SEEN_REPLIES {
                if let Some(old) = self.seen_order.pop_front() {
                    self.seen_replies.remove(&old);
                }
            }
            d.changes.push(Change::CourierReply {
                reply_id: rid,
                courier_id: cid.to_string(),
                call_id: r.call_id.clone(),
                action: r.action,
            });
        }
        d.reply = Some(ReplyBody::JobReply(JobReplyAnswer {
            call_id: r.call_id,
            action: r.action,
            duplicate: false,
        }));
        self.finish(d)
    }

    /// Gives `call_id` to `cid` for good.
    fn assign(
        &mut self,
        d: &mut Decision,
        call_id: &str,
        cid: &str,
        at: Millis,
        now: Millis,
        how: &'static str,
    ) {
        let Some(c) = self.couriers.get_mut(cid) else {
            return;
        };
        c.offered_call = None;
        c.active_call = Some(call_id.into());
        let (clat, clon) = (c.lat.unwrap_or(0.0), c.lon.unwrap_or(0.0));
        let Some(call) = self.calls.get_mut(call_id) else {
            return;
        };
        let distance_m = super::geo::haversine_m(call.location.lat, call.location.lon, clat, clon);
        let eta_s = (distance_m / self.cfg.speed_mps.max(0.1))
            .ceil()
            .min(f64::from(u32::MAX)) as u32;
        let c = self.couriers.get(cid);
        let brief = CourierBrief {
            courier_id: cid.to_string(),
            name: c.and_then(|c| c.name.as_deref().map(str::to_string)),
            vehicle: c
                .and_then(|c| c.vehicle)
                .unwrap_or(pickup_protocol::Vehicle::Car),
            tel: c.and_then(|c| c.tel.as_deref().map(mask_phone)),
            distance_m: (distance_m * 10.0).round() / 10.0,
            eta_s,
        };
        call.courier = Some(brief.clone());
        call.offer = None;
        call.status = CallStatus::Assigned;
        call.grace_until = None;
        call.updated_at = at;
        self.unpend(call_id);
        self.put_call(d, call_id);
        self.put_courier(d, cid);
        if let Some(call) = self.calls.get(call_id) {
            let job = Self::job_for(call, JobKind::Assigned, now, None);
            self.publish_job(d, cid, &job);
        }
        self.event(
            d,
            Some(call_id),
            Some(cid),
            "assigned",
            at,
            now,
            None,
            json!({"how": how, "distance_m": brief.distance_m, "eta_s": eta_s}),
        );
        let mut vars = serde_json::Map::new();
        vars.insert(
            "courier_name".into(),
            brief.name.clone().unwrap_or_else(|| cid.to_string()).into(),
        );
        vars.insert("courier_id".into(), cid.into());
        vars.insert("vehicle".into(), brief.vehicle.as_str().into());
        vars.insert(
            "vehicle_name".into(),
            self.cfg.templates.vehicle_name(brief.vehicle).into(),
        );
        vars.insert(
            "courier_tel".into(),
            brief.tel.clone().unwrap_or_default().into(),
        );
        vars.insert("distance_m".into(), json!(brief.distance_m));
        vars.insert("eta_s".into(), json!(eta_s));
        vars.insert("eta_min".into(), json!(eta_s.div_ceil(60)));
        self.notify(d, call_id, "call.assigned", vars, now);
    }

    // --------------------------------------------------------------- assign context

    /// Moves new calls to `dispatching` and tries to match waiting calls with couriers.
    pub fn assign_pending(&mut self, now: Millis) -> Decision {
        let mut d = Decision::default();
        // New calls enter dispatching, oldest first.
        let mut new: Vec<(Millis, String)> = std::mem::take(&mut self.fresh)
            .into_iter()
            .filter_map(|id| {
                let c = self.calls.get(&id)?;
                let key = (c.created_at, id);
                (c.status == CallStatus::Requested && self.pending.contains(&key)).then_some(key)
            })
            .collect();
        new.sort();
        let new: Vec<String> = new.into_iter().map(|(_, id)| id).collect();
        for id in &new {
            if let Some(c) = self.calls.get_mut(id) {
                c.status = CallStatus::Dispatching;
                c.updated_at = now;
            }
            self.event(
                &mut d,
                Some(id),
                None,
                "dispatching",
                now,
                now,
                None,
                json!({}),
            );
        }
        let freed = std::mem::take(&mut self.freed);
        let requeued = std::mem::take(&mut self.requeued);
        if !self.rematch && new.is_empty() && freed.is_empty() && requeued.is_empty() {
            return d;
        }
        // Which pending calls to search, in pending order (oldest first). After every pass
        // no pending call has an eligible courier, and eligibility only grows through the
        // changes recorded in `freed`, `requeued` and `rematch`: a call that none of these
        // concern would find nobody, so the result is the same as searching every pending
        // call.
        let mut touched: BTreeSet<String> = new.iter().cloned().collect();
        if std::mem::take(&mut self.rematch) {
            let all: Vec<String> = self.pending.iter().map(|(_, id)| id.clone()).collect();
            for id in all {
                self.match_call(&mut d, &id, now, &mut touched);
            }
        } else if freed.is_empty() {
            let mut v: Vec<(Millis, String)> = new
                .iter()
                .chain(requeued.iter().filter(|id| !new.contains(id)))
                .filter_map(|id| self.calls.get(id).map(|c| (c.created_at, id.clone())))
                .filter(|k| self.pending.contains(k))
                .collect();
            v.sort();
            for (_, id) in v {
                self.match_call(&mut d, &id, now, &mut touched);
            }
        } else {
            // Walk the pending calls while a freed courier is still free, or a new or
            // requeued call is still ahead; search a call when one of those concerns it.
            let mut ahead: BTreeSet<&String> = new.iter().chain(requeued.iter()).collect();
            let mut cursor: Option<(Millis, String)> = None;
            loop {
                let next = match &cursor {
                    None => self.pending.iter().next(),
                    Some(k) => self
                        .pending
                        .range((Bound::Excluded(k), Bound::Unbounded))
                        .next(),
                };
                let Some(key) = next.cloned() else { break };
                let free: Vec<&Courier> = freed
                    .iter()
                    .filter_map(|id| self.couriers.get(id.as_str()).map(|c| &**c))
                    .filter(|c| c.online && c.available && c.is_free())
                    .collect();
                if free.is_empty() && ahead.is_empty() {
                    break;
                }
                let search = ahead.remove(&key.1)
                    || self.calls.get(&key.1).is_some_and(|call| {
                        let need = self.need(call);
                        free.iter().any(|c| eligible(c, &need, now).is_some())
                    });
                if search {
                    self.match_call(&mut d, &key.1, now, &mut touched);
                }
                cursor = Some(key);
            }
        }
        for id in touched {
            self.put_call(&mut d, &id);
        }
        self.finish(d)
    }

    /// Searches a courier for pending call `id` and assigns it (mode `auto`) or offers it
    /// (mode `offer`). `touched` collects calls whose row must be written.
    fn match_call(
        &mut self,
        d: &mut Decision,
        id: &str,
        now: Millis,
        touched: &mut BTreeSet<String>,
    ) {
        let Some(call) = self.calls.get(id) else {
            return;
        };
        if !call.is_pending() {
            return;
        }
        let need = self.need(call);
        let best = if self.cfg.use_index {
            self.grid.best(&self.couriers, &need, now)
        } else {
            best_linear(self.couriers.values().map(|c| &**c), &need, now)
        };
        let Some(best) = best else { return };
        match self.cfg.mode {
            Mode::Auto => {
                self.assign(d, id, &best.courier_id, now, now, "auto");
                touched.remove(id);
            }
            Mode::Offer => {
                let expires_at = now.saturating_add(self.cfg.offer_timeout_ms);
                if let Some(call) = self.calls.get_mut(id) {
                    call.offer = Some(Offer {
                        courier_id: best.courier_id.clone(),
                        expires_at,
                    });
                    call.updated_at = now;
                }
                if let Some(c) = self.couriers.get_mut(best.courier_id.as_str()) {
                    c.offered_call = Some(Box::from(id));
                }
                self.unpend(id);
                if let Some(call) = self.calls.get(id) {
                    let job = Self::job_for(call, JobKind::Offer, now, None);
                    self.publish_job(d, &best.courier_id, &job);
                }
                self.put_courier(d, &best.courier_id);
                touched.insert(id.to_string());
                self.event(
                    d,
                    Some(id),
                    Some(&best.courier_id),
                    "offered",
                    now,
                    now,
                    None,
                    json!({"distance_m": best.distance_m, "expires_at": expires_at}),
                );
            }
        }
    }

    /// Timers: dispatch deadlines, offer timeouts, grace periods, and forgetting finished
    /// calls. Stored times are used, so a restart does not extend any of them.
    pub fn tick(&mut self, now: Millis) -> Decision {
        let mut d = Decision::default();
        let mut expired_offers = Vec::new();
        let mut failed = Vec::new();
        let mut graced = Vec::new();
        let mut forget = Vec::new();
        let due: Vec<String> = self
            .timers
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| id.clone())
            .collect();
        for call in due.iter().filter_map(|id| self.calls.get(id)) {
            if let Some(o) = &call.offer {
                if o.expires_at <= now {
                    expired_offers.push((call.id.clone(), o.courier_id.clone()));
                    continue;
                }
            }
            match call.status {
                CallStatus::Requested | CallStatus::Dispatching
                    if call.offer.is_none() && call.deadline_at <= now =>
                {
                    failed.push(call.id.clone())
                }
                CallStatus::Assigned if call.grace_until.is_some_and(|g| g <= now) => {
                    graced.push(call.id.clone())
                }
                s if s.is_terminal()
                    && call.updated_at.saturating_add(self.cfg.keep_terminal_ms) <= now =>
                {
                    forget.push(call.id.clone())
                }
                _ => {}
            }
        }
        for (call_id, cid) in expired_offers {
            self.withdraw_offer(&mut d, &call_id, &cid, true, "offer timed out", now);
            self.event(
                &mut d,
                Some(&call_id),
                Some(&cid),
                "offer_timeout",
                now,
                now,
                None,
                json!({}),
            );
        }
        for id in failed {
            self.unpend(&id);
            if let Some(c) = self.calls.get_mut(&id) {
                c.status = CallStatus::Failed;
                c.reason = Some("no courier before the dispatch deadline".into());
                c.updated_at = now;
            }
            self.put_call(&mut d, &id);
            self.event(&mut d, Some(&id), None, "failed", now, now, None, json!({}));
            let mut vars = serde_json::Map::new();
            vars.insert(
                "reason".into(),
                self.calls
                    .get(&id)
                    .and_then(|c| c.reason.clone())
                    .unwrap_or_default()
                    .into(),
            );
            self.notify(&mut d, &id, "call.failed", vars, now);
        }
        for id in graced {
            let Some(cid) = self
                .calls
                .get(&id)
                .and_then(|c| c.courier.as_ref())
                .map(|b| b.courier_id.clone())
            else {
                continue;
            };
            self.free_courier(&cid, &id, now);
            let deadline = now.saturating_add(self.cfg.deadline_ms);
            let Some(c) = self.calls.get_mut(&id) else {
                continue;
            };
            c.status = CallStatus::Dispatching;
            c.courier = None;
            c.grace_until = None;
            c.declined.insert(cid.clone());
            c.deadline_at = c.deadline_at.max(deadline);
            c.updated_at = now;
            let created = c.created_at;
            let job = Self::job_for(
                c,
                JobKind::Withdrawn,
                now,
                Some("reassigned: offline too long"),
            );
            self.pending.insert((created, id.clone()));
            self.publish_job(&mut d, &cid, &job);
            self.put_courier(&mut d, &cid);
            self.put_call(&mut d, &id);
            self.event(
                &mut d,
                Some(&id),
                Some(&cid),
                "reassigning",
                now,
                now,
                None,
                json!({"reason": "courier offline past grace period"}),
            );
            self.requeued.insert(id.clone());
        }
        for id in forget {
            self.uncount_open(&id);
            if let Some(c) = self.calls.remove(&id) {
                self.by_request.remove(&c.request_id);
            }
        }
        for id in &due {
            self.retime(id);
        }
        d.absorb(self.assign_pending(now));
        self.finish(d)
    }

    /// The retained messages that describe the current state (call views and courier
    /// jobs), for a broker that lost its retained store.
    pub fn retained_snapshot(&self, now: Millis) -> Vec<OutMsg> {
        let mut d = Decision::default();
        for call in self.calls.values() {
            self.publish_state(&mut d, call);
        }
        for c in self.couriers.values() {
            if let Some(job) = self.current_job(c, now) {
                self.publish_job(&mut d, &c.id, &job);
            }
        }
        d.changes
            .into_iter()
            .filter_map(|c| match c {
                Change::Outbox(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    /// The job message that describes what courier `c` holds now (an offer, an assigned
    /// call, a parcel picked up), if anything.
    fn current_job(&self, c: &Courier, now: Millis) -> Option<Job> {
        let (call_id, kind) = match (&c.active_call, &c.offered_call) {
            (Some(id), _) => (id, None),
            (None, Some(id)) => (id, Some(JobKind::Offer)),
            (None, None) => return None,
        };
        let call = self.calls.get(&**call_id)?;
        let kind = kind.unwrap_or(match call.status {
            CallStatus::PickedUp => JobKind::PickedUp,
            _ => JobKind::Assigned,
        });
        Some(Self::job_for(call, kind, now, None))
    }

    /// When [`Dispatcher::tick`] next has something to do.
    pub fn next_wakeup(&self) -> Option<Millis> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// When `c` next needs [`Dispatcher::tick`]: its offer lapses, its dispatch deadline
    /// passes, its grace period ends, or, once finished, it is forgotten.
    fn due_of(&self, c: &Call) -> Option<Millis> {
        if let Some(o) = &c.offer {
            return Some(o.expires_at);
        }
        match c.status {
            CallStatus::Requested | CallStatus::Dispatching => Some(c.deadline_at),
            CallStatus::Assigned => c.grace_until,
            s if s.is_terminal() => Some(c.updated_at.saturating_add(self.cfg.keep_terminal_ms)),
            _ => None,
        }
    }

    /// Files call `id` under its current due time (none once it is forgotten).
    fn retime(&mut self, id: &str) {
        let due = self.calls.get(id).and_then(|c| self.due_of(c));
        let old = self.timer_at.get(id).copied();
        if old == due {
            return;
        }
        if let Some(o) = old {
            self.timers.remove(&(o, id.to_string()));
        }
        match due {
            Some(at) => {
                self.timers.insert((at, id.to_string()));
                self.timer_at.insert(id.to_string(), at);
            }
            None => {
                self.timer_at.remove(id);
            }
        }
    }

    /// Rebuilds every call's due time (start, new settings).
    fn retime_all(&mut self) {
        self.timers.clear();
        self.timer_at.clear();
        for c in self.calls.values() {
            if let Some(at) = self.due_of(c) {
                self.timers.insert((at, c.id.clone()));
                self.timer_at.insert(c.id.clone(), at);
            }
        }
    }

    /// Whether [`Dispatcher::assign_pending`] has work.
    pub fn wants_assign(&self) -> bool {
        self.rematch
            || !self.fresh.is_empty()
            || !self.freed.is_empty()
            || !self.requeued.is_empty()
    }

    /// What a search for a courier for `call` must satisfy.
    fn need<'a>(&self, call: &'a Call) -> Need<'a> {
        Need {
            lat: call.location.lat,
            lon: call.location.lon,
            class: call.parcel.class,
            radius_m: self.cfg.radius_m,
            excluded: &call.declined,
            location_max_age_ms: self.cfg.location_max_age_ms,
        }
    }
}
