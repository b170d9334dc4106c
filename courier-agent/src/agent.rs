//! One courier's handheld: the MQTT session, presence, location, the current job, the
//! courier's actions and the offline queue.
//!
//! [`Agent::spawn`] starts one task that owns everything: it polls the MQTT event loop,
//! takes commands from [`Agent`] handles, reports location on a timer and fires the
//! automatic answers of the [`Policy`](crate::config::Policy). Being the only publisher and
//! the only reader of the event loop, it knows exactly which publish each broker
//! acknowledgement belongs to (see [`crate::delivery`]).
//!
//! On every CONNACK it subscribes to its job topic and its replies topic (the SUBACK also
//! marks the end of the previous connection's events), then publishes its retained presence,
//! its location, and the replies that waited in the queue, oldest first.
//!
//! A reply leaves the queue only when the daemon's answer to it arrives (matched by
//! `correlation_id` = `reply_id`): applied, a repeat, or refused for good. The broker's
//! PUBACK is not enough: a broker that has just restarted acknowledges and drops a reply
//! when the daemon has not subscribed again yet. Unanswered replies are sent again after
//! [`AgentConfig::answer_timeout`] (doubling, up to a minute) and on every reconnect; the
//! daemon drops repeats by `reply_id`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use pickup_protocol::client::{
    link, Backoff, Link, LinkError, LinkEvent, LinkEvents, LinkOptions, Message, Will,
};
use pickup_protocol::{
    answer, validate, CourierLocation, Job, JobAction, JobKind, JobReply, Millis, Presence,
    PresenceState, Topics,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{AgentConfig, ConfigError};
use crate::delivery::{Phase, Tag, Tracker};
use crate::geo::Point;
use crate::queue::{QueueError, ReplyQueue};

/// Why an action or a command was refused.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// There is no job to act on.
    #[error("there is no current job")]
    NoJob,
    /// The job is not in a state that allows this action.
    #[error("cannot {action} call {call_id}: {why}")]
    NotNow {
        /// The action tried.
        action: &'static str,
        /// The call concerned.
        call_id: String,
        /// Why not.
        why: String,
    },
    /// A value given to the action is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The queue file refused the reply; nothing was sent.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The agent has stopped.
    #[error("the agent has stopped")]
    Stopped,
    /// A wait ran out.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// What the courier does about the current job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Take the offered job.
    Accept,
    /// Refuse the offered job, optionally saying why.
    Decline(Option<String>),
    /// Parcel collected, with the customer's pickup code.
    PickedUp(String),
    /// Parcel delivered.
    Completed,
}

impl Action {
    fn kind(&self) -> JobAction {
        match self {
            Self::Accept => JobAction::Accept,
            Self::Decline(_) => JobAction::Decline,
            Self::PickedUp(_) => JobAction::PickedUp,
            Self::Completed => JobAction::Completed,
        }
    }
}

/// The state of the link to the broker, as the courier sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// No connection; actions are queued on the device.
    Offline,
    /// Connected, subscribing.
    Connecting,
    /// Online: presence published, replies flowing.
    Online,
}

/// A snapshot of the agent, kept current for [`Agent::status`] and [`Agent::wait_for`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// Courier id.
    pub courier_id: String,
    /// Link state.
    pub link: LinkState,
    /// On shift.
    pub available: bool,
    /// Current position.
    pub position: Point,
    /// The job as last published by the daemon (`None` before any arrived).
    pub job: Option<Job>,
    /// The courier's latest action on that job, if any.
    pub last_action: Option<JobAction>,
    /// Replies waiting for the daemon's answer.
    pub queued: usize,
    /// Events the consumer did not take in time and that were dropped.
    pub events_dropped: u64,
}

/// Something that happened, for the console, the fleet printer or a test.
#[derive(Debug, Clone, Serialize)]
pub struct AgentEvent {
    /// Which courier.
    pub courier_id: String,
    /// Wall-clock time, unix ms.
    pub at: Millis,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The kinds of [`AgentEvent`].
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// CONNACK from the broker.
    Connected {
        /// Whether the broker kept the session.
        session_present: bool,
    },
    /// Subscribed; presence, location and queued replies published.
    Online {
        /// Replies replayed from the queue.
        replayed: usize,
    },
    /// The connection failed or a connect attempt did.
    Disconnected {
        /// The client's error.
        error: String,
    },
    /// The retained job topic said something (also on every (re)subscribe).
    Job {
        /// The job.
        job: Job,
    },
    /// The retained job was cleared.
    JobCleared,
    /// The courier (or the policy) acted; the reply is in the queue.
    Acted {
        /// The reply as queued.
        reply: JobReply,
        /// Chosen by the policy, not a human.
        auto: bool,
        /// Taken while not online: sent on reconnect.
        offline: bool,
    },
    /// The daemon answered a reply (applied, a repeat, or refused for good); it left the
    /// queue.
    Delivered {
        /// The reply's id.
        reply_id: String,
    },
    /// The daemon answered a reply.
    Answer {
        /// The reply it answers.
        reply_id: Option<String>,
        /// Applied or not.
        ok: bool,
        /// A repeat of a reply the daemon had already applied.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        duplicate: bool,
        /// Error code when refused.
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        /// Error message when refused.
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// Shift changed.
    Shift {
        /// On shift now.
        available: bool,
    },
    /// A location report went out.
    Location {
        /// Where.
        position: Point,
    },
    /// A line of the queue file could not be read and was skipped.
    QueueCorrupt {
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        error: String,
    },
    /// Something from outside was not usable (a malformed job payload, …).
    Warning {
        /// What.
        message: String,
    },
    /// The agent stopped.
    Stopped,
}

enum Command {
    Act {
        action: Action,
        respond: oneshot::Sender<Result<JobReply, AgentError>>,
    },
    Raw {
        reply: JobReply,
        respond: oneshot::Sender<Result<JobReply, AgentError>>,
    },
    Shift {
        available: bool,
        respond: Option<oneshot::Sender<()>>,
    },
    Move {
        to: Point,
        force: bool,
        respond: Option<oneshot::Sender<()>>,
    },
    Code {
        call_id: String,
        code: String,
    },
    Shutdown {
        respond: oneshot::Sender<()>,
    },
}

/// A handle on a running agent. Dropping every handle stops it cleanly (presence offline).
pub struct Agent {
    courier_id: String,
    cmd: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
    task: JoinHandle<()>,
}

impl Agent {
    /// Opens the queue and starts the agent's task. Events go to `events` (dropped, and
    /// counted in [`Status::events_dropped`], when the receiver does not keep up).
    pub fn spawn(
        config: AgentConfig,
        events: mpsc::Sender<AgentEvent>,
    ) -> Result<Self, AgentError> {
        config.validate()?;
        let topics = config.topics()?;
        let (queue, corrupt) = ReplyQueue::open(&config.queue)?;
        let cid = config.courier_id.clone();
        let will = Presence {
            state: PresenceState::Offline,
            available: false,
            name: config.name.clone(),
            vehicle: Some(config.vehicle),
            tel: config.tel.clone(),
            at: None,
        };
        let mut opts = LinkOptions::new(config.broker.clone(), config.client_id.clone());
        opts.version = config.version;
        opts.clean_session = false;
        opts.keep_alive_s = config.keep_alive_s;
        opts.credentials = config.credentials.clone();
        opts.tls = config.tls.clone();
        opts.channel_capacity = config.channel_capacity;
        opts.max_packet = 64 * 1024;
        opts.will = Some(Will {
            topic: topics.courier_presence(&cid),
            payload: to_json(&will),
            retain: true,
            delay_s: Some(config.will_delay_s).filter(|d| *d > 0),
        });
        let (link, link_events) = link(&opts);
        let rng = match config.policy.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let status = Status {
            courier_id: cid.clone(),
            link: LinkState::Offline,
            available: config.available,
            position: config.position,
            job: None,
            last_action: None,
            queued: queue.len(),
            events_dropped: 0,
        };
        let (status_tx, status_rx) = watch::channel(status);
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let mut runner = Runner {
            job_topic: topics.courier_job(&cid),
            replies_topic: topics.courier_replies(&cid),
            topics,
            available: config.available,
            position: config.position,
            last_reported: None,
            cfg: config,
            link,
            tracker: Tracker::new(),
            queue,
            job: None,
            job_code: None,
            codes: HashMap::new(),
            codes_order: VecDeque::new(),
            resend: HashMap::new(),
            progress: HashMap::new(),
            progress_order: VecDeque::new(),
            awaiting_answer: HashMap::new(),
            timers: Vec::new(),
            rng,
            events,
            events_dropped: 0,
            status_tx,
            stop: Stop::Running,
            stop_waiters: Vec::new(),
        };
        // Replies still queued from an earlier run count as done: a retained offer seen
        // again after a restart is not answered twice.
        for r in runner.queue.entries().to_vec() {
            runner.set_progress(&r.call_id, r.action);
        }
        for c in corrupt {
            tracing::warn!(courier = %cid, line = c.line, error = %c.error, "skipped a corrupt line of the queue file");
            runner.emit(EventKind::QueueCorrupt {
                line: c.line,
                error: c.error,
            });
        }
        let task = tokio::spawn(runner.run(link_events, cmd_rx));
        Ok(Self {
            courier_id: cid,
            cmd: cmd_tx,
            status: status_rx,
            task,
        })
    }

    /// The courier id.
    pub fn courier_id(&self) -> &str {
        &self.courier_id
    }

    /// The current state.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Waits until `pred` holds for the status, or `timeout` passes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl FnMut(&Status) -> bool,
    ) -> Result<Status, AgentError> {
        let mut rx = self.status.clone();
        let res = match tokio::time::timeout(timeout, rx.wait_for(pred)).await {
            Ok(Ok(s)) => Ok(s.clone()),
            Ok(Err(_)) => Err(AgentError::Stopped),
            Err(_) => Err(AgentError::Timeout(timeout)),
        };
        res
    }

    /// Acts on the current job. The reply is durable in the queue when this returns; it is
    /// sent now if online, else on reconnect.
    pub async fn act(&self, action: Action) -> Result<JobReply, AgentError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Act {
            action,
            respond: tx,
        })
        .await?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// Accepts the current offer.
    pub async fn accept(&self) -> Result<JobReply, AgentError> {
        self.act(Action::Accept).await
    }

    /// Declines the current offer.
    pub async fn decline(&self, reason: Option<String>) -> Result<JobReply, AgentError> {
        self.act(Action::Decline(reason)).await
    }

    /// Marks the current job picked up with the customer's code.
    pub async fn picked_up(&self, code: &str) -> Result<JobReply, AgentError> {
        self.act(Action::PickedUp(code.to_string())).await
    }

    /// Marks the current job delivered.
    pub async fn complete(&self) -> Result<JobReply, AgentError> {
        self.act(Action::Completed).await
    }

    /// Sends a reply about any call, without checking it against the current job (tools
    /// and tests). `reply_id` and `at` are filled in when missing.
    pub async fn send_reply(&self, reply: JobReply) -> Result<JobReply, AgentError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Raw { reply, respond: tx }).await?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// Goes on or off shift (republishes presence).
    pub async fn set_available(&self, available: bool) -> Result<(), AgentError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Shift {
            available,
            respond: Some(tx),
        })
        .await?;
        rx.await.map_err(|_| AgentError::Stopped)
    }

    /// Moves the courier. The location is reported at once when it moved at least the
    /// configured threshold since the last report, or when `force` is set.
    pub async fn move_to(&self, to: Point, force: bool) -> Result<(), AgentError> {
        validate::lat_lon("position", to.lat, to.lon).map_err(AgentError::Invalid)?;
        let (tx, rx) = oneshot::channel();
        self.send(Command::Move {
            to,
            force,
            respond: Some(tx),
        })
        .await?;
        rx.await.map_err(|_| AgentError::Stopped)
    }

    /// Like [`Agent::move_to`] without waiting: for a simulation driving many agents, which
    /// must not stall on one busy agent. Returns false when the command was not taken.
    pub fn try_move_to(&self, to: Point) -> bool {
        self.cmd
            .try_send(Command::Move {
                to,
                force: false,
                respond: None,
            })
            .is_ok()
    }

    /// Like [`Agent::set_available`] without waiting.
    pub fn try_set_available(&self, available: bool) -> bool {
        self.cmd
            .try_send(Command::Shift {
                available,
                respond: None,
            })
            .is_ok()
    }

    /// Hands over the pickup code of a call, as the customer would at the door. With
    /// automatic answers ([`Policy::complete_after`](crate::config::Policy)), the agent
    /// then sends `picked_up` with it once it holds that call. The daemon never puts the
    /// code on the job topic; this is how a demo or load driver that knows the codes (from
    /// the kiosks' create answers) lets simulated couriers finish their jobs. The code may
    /// arrive before or after the job.
    pub async fn provide_code(&self, call_id: &str, code: &str) -> Result<(), AgentError> {
        check_code(call_id, code)?;
        self.send(Command::Code {
            call_id: call_id.to_string(),
            code: code.to_string(),
        })
        .await
    }

    /// Like [`Agent::provide_code`] without waiting; returns false when the command was
    /// not taken (invalid values, full command channel, stopped agent).
    pub fn try_provide_code(&self, call_id: &str, code: &str) -> bool {
        check_code(call_id, code).is_ok()
            && self
                .cmd
                .try_send(Command::Code {
                    call_id: call_id.to_string(),
                    code: code.to_string(),
                })
                .is_ok()
    }

    /// Stops cleanly: publishes presence offline (when online), disconnects so that the
    /// last will is not sent, and waits for the task to end. Queued replies stay in the
    /// queue file for the next start.
    pub async fn shutdown(self) {
        let (tx, rx) = oneshot::channel();
        if self
            .cmd
            .send(Command::Shutdown { respond: tx })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }

    async fn send(&self, c: Command) -> Result<(), AgentError> {
        self.cmd.send(c).await.map_err(|_| AgentError::Stopped)
    }
}

fn check_code(call_id: &str, code: &str) -> Result<(), AgentError> {
    validate::id("call_id", call_id).map_err(AgentError::Invalid)?;
    validate::id("pickup code", code).map_err(AgentError::Invalid)
}

/// How far a clean shutdown has got.
enum Stop {
    Running,
    /// Waiting for the broker to acknowledge the offline presence.
    Offline {
        deadline: Instant,
    },
    /// DISCONNECT sent; waiting for the broker to close.
    Closing {
        deadline: Instant,
    },
    Done,
}

/// A scheduled automatic action.
#[derive(Debug, Clone)]
struct Timer {
    at: Instant,
    call_id: String,
    action: Action,
}

/// The next event-loop poll, owning the event loop so that it is never cancelled midway
/// (rumqttc's poll is not cancellation-safe) while the task serves commands and timers.
type PollFuture = Pin<Box<dyn Future<Output = (LinkEvents, Result<LinkEvent, LinkError>)> + Send>>;

fn next_poll(mut events: LinkEvents, delay: Option<Duration>) -> PollFuture {
    Box::pin(async move {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let r = events.poll().await;
        (events, r)
    })
}

/// Replies whose answers the console may want to explain, per call.
const PROGRESS_KEPT: usize = 64;
/// Where an action stands in a job's course: later steps rest on earlier ones.
fn step(a: JobAction) -> u8 {
    match a {
        JobAction::Accept | JobAction::Decline => 1,
        JobAction::PickedUp => 2,
        JobAction::Completed => 3,
    }
}

/// Pickup codes kept for calls the courier may get (a simulated courier sees few calls).
const CODES_KEPT: usize = 256;
/// The longest wait before an unanswered reply is sent again.
const RESEND_MAX: Duration = Duration::from_secs(60);

/// When an unanswered reply goes out again.
#[derive(Debug, Clone, Copy)]
struct Resend {
    /// Sends so far.
    attempts: u32,
    /// Next send, if still unanswered by then.
    at: Instant,
}
/// Location reports are skipped while this many publishes wait for the broker.
const BACKLOG_LIMIT: usize = 256;
/// How long a publish may wait for room in the client's channel.
const PUBLISH_WAIT: Duration = Duration::from_secs(2);

struct Runner {
    cfg: AgentConfig,
    topics: Topics,
    job_topic: String,
    replies_topic: String,
    link: Link,
    tracker: Tracker,
    queue: ReplyQueue,
    /// The job as the daemon last published it.
    job: Option<Job>,
    /// A pickup code carried on the job (simulation only; the daemon never sends one).
    job_code: Option<String>,
    /// Pickup codes handed over by the caller ([`Agent::provide_code`]), per call.
    codes: HashMap<String, String>,
    codes_order: VecDeque<String>,
    /// Queued replies sent on this connection, and when to send them again unanswered.
    resend: HashMap<String, Resend>,
    /// The courier's latest action per call, so that a retained offer seen again after a
    /// reconnect is not answered twice, and commands can follow ahead of the daemon.
    progress: HashMap<String, JobAction>,
    progress_order: VecDeque<String>,
    /// reply id → (call, action, the progress before it), to roll back on refusal.
    awaiting_answer: HashMap<String, (String, JobAction, Option<JobAction>)>,
    available: bool,
    position: Point,
    last_reported: Option<Point>,
    timers: Vec<Timer>,
    rng: StdRng,
    events: mpsc::Sender<AgentEvent>,
    events_dropped: u64,
    status_tx: watch::Sender<Status>,
    stop: Stop,
    stop_waiters: Vec<oneshot::Sender<()>>,
}

impl Runner {
    async fn run(mut self, events: LinkEvents, mut cmds: mpsc::Receiver<Command>) {
        let mut backoff = Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max);
        let mut poll = next_poll(events, None);
        let mut loc_tick = tokio::time::interval(self.cfg.location_interval);
        loc_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loc_tick.tick().await;
        let mut cmds_open = true;
        loop {
            let timer_at = self.timers.iter().map(|t| t.at).min();
            let stop_at = match self.stop {
                Stop::Offline { deadline } | Stop::Closing { deadline } => Some(deadline),
                _ => None,
            };
            let resend_at = if self.tracker.is_ready() {
                self.resend.values().map(|r| r.at).min()
            } else {
                None
            };
            tokio::select! {
                (ev, res) = &mut poll => {
                    let delay = match res {
                        Ok(e) => {
                            if matches!(e, LinkEvent::Connected { .. }) {
                                backoff.reset();
                            }
                            self.on_link_event(e).await;
                            None
                        }
                        Err(e) => {
                            self.on_link_error(e);
                            Some(backoff.next_delay())
                        }
                    };
                    poll = next_poll(ev, delay);
                }
                cmd = cmds.recv(), if cmds_open => match cmd {
                    Some(c) => self.on_command(c).await,
                    None => {
                        cmds_open = false;
                        self.begin_stop().await;
                    }
                },
                _ = loc_tick.tick() => self.report_location(true).await,
                _ = sleep_until_opt(timer_at), if timer_at.is_some() => self.fire_timers().await,
                _ = sleep_until_opt(stop_at), if stop_at.is_some() => self.on_stop_deadline().await,
                _ = sleep_until_opt(resend_at), if resend_at.is_some() => self.resend_due().await,
            }
            self.update_status();
            if matches!(self.stop, Stop::Done) {
                break;
            }
        }
        self.emit(EventKind::Stopped);
        for w in self.stop_waiters.drain(..) {
            let _ = w.send(());
        }
    }

    fn emit(&mut self, kind: EventKind) {
        let ev = AgentEvent {
            courier_id: self.cfg.courier_id.clone(),
            at: now_ms(),
            kind,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(ev) {
            self.events_dropped += 1;
        }
    }

    fn update_status(&self) {
        let link = match self.tracker.phase() {
            Phase::Down => LinkState::Offline,
            Phase::Subscribing { .. } => LinkState::Connecting,
            Phase::Ready => LinkState::Online,
        };
        let last_action = self
            .job
            .as_ref()
            .and_then(|j| j.call_id.as_ref())
            .and_then(|c| self.progress.get(c).copied());
        self.status_tx.send_if_modified(|s| {
            let new = Status {
                courier_id: self.cfg.courier_id.clone(),
                link,
                available: self.available,
                position: self.position,
                job: self.job.clone(),
                last_action,
                queued: self.queue.len(),
                events_dropped: self.events_dropped,
            };
            if *s == new {
                false
            } else {
                *s = new;
                true
            }
        });
    }

    // ---- the link ----

    async fn on_link_event(&mut self, e: LinkEvent) {
        match e {
            LinkEvent::Connected { session_present } => {
                self.tracker.connected(session_present);
                self.emit(EventKind::Connected { session_present });
                // Always subscribe: it re-reads the retained job, and its SUBACK marks
                // the end of the previous connection's events.
                let filters = [self.job_topic.clone(), self.replies_topic.clone()];
                if let Err(e) = self.link.subscribe_many(&filters).await {
                    tracing::warn!(courier = %self.cfg.courier_id, error = %e, "subscribe failed");
                }
            }
            LinkEvent::SubAck => {
                if self.tracker.subscribed() {
                    self.on_ready().await;
                }
            }
            LinkEvent::PublishSent(pkid) => self.tracker.publish_sent(pkid),
            // A reply acknowledged by the broker stays queued until the daemon answers it.
            LinkEvent::PubAck(pkid) => {
                let offline_out = self.tracker.puback(pkid) == Some(Tag::Offline);
                if offline_out && matches!(self.stop, Stop::Offline { .. }) {
                    self.close().await;
                }
            }
            LinkEvent::Message(m) => self.on_message(m),
            LinkEvent::Other => {}
        }
    }

    fn on_link_error(&mut self, e: LinkError) {
        if matches!(self.stop, Stop::Closing { .. }) {
            self.stop = Stop::Done;
            return;
        }
        if self.tracker.phase() != Phase::Down {
            tracing::info!(courier = %self.cfg.courier_id, error = %e, "disconnected");
            self.emit(EventKind::Disconnected {
                error: e.to_string(),
            });
        } else {
            tracing::debug!(courier = %self.cfg.courier_id, error = %e, "connect failed");
        }
        self.tracker.disconnected();
        if matches!(self.stop, Stop::Offline { .. }) {
            self.stop = Stop::Done;
        }
    }

    async fn on_ready(&mut self) {
        self.publish_presence(PresenceState::Online).await;
        self.report_location(true).await;
        // Everything unanswered goes out again on a new connection, oldest first.
        let pending: Vec<JobReply> = self.queue.entries().to_vec();
        let replayed = pending.len();
        for r in pending {
            self.publish_reply(&r).await;
        }
        self.emit(EventKind::Online { replayed });
        if matches!(self.stop, Stop::Offline { .. }) {
            // A shutdown began while connecting: say offline now.
            self.publish_offline().await;
        }
    }

    /// Publishes if the link is ready; records the publish for acknowledgement tracking.
    async fn publish(
        &mut self,
        topic: String,
        qos1: bool,
        retain: bool,
        payload: Vec<u8>,
        tag: Tag,
    ) -> bool {
        if !self.tracker.is_ready() {
            return false;
        }
        match tokio::time::timeout(
            PUBLISH_WAIT,
            self.link.publish(&topic, qos1, retain, payload, None),
        )
        .await
        {
            Ok(Ok(())) => {
                self.tracker.published(tag);
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(courier = %self.cfg.courier_id, error = %e, "publish failed");
                false
            }
            Err(_) => {
                tracing::warn!(courier = %self.cfg.courier_id, "publish not taken: client backlog full");
                false
            }
        }
    }

    fn presence(&self, state: PresenceState) -> Presence {
        Presence {
            state,
            available: self.available && state == PresenceState::Online,
            name: self.cfg.name.clone(),
            vehicle: Some(self.cfg.vehicle),
            tel: self.cfg.tel.clone(),
            at: Some(now_ms()),
        }
    }

    async fn publish_presence(&mut self, state: PresenceState) {
        let p = self.presence(state);
        let topic = self.topics.courier_presence(&self.cfg.courier_id);
        self.publish(topic, true, true, to_json(&p), Tag::Other)
            .await;
    }

    async fn publish_offline(&mut self) {
        let p = self.presence(PresenceState::Offline);
        let topic = self.topics.courier_presence(&self.cfg.courier_id);
        if !self
            .publish(topic, true, true, to_json(&p), Tag::Offline)
            .await
        {
            self.close().await;
        }
    }

    async fn report_location(&mut self, force: bool) {
        if !self.tracker.is_ready() || self.tracker.outstanding() > BACKLOG_LIMIT {
            return;
        }
        if !force {
            if let Some(last) = self.last_reported {
                if last.distance_m(self.position) < self.cfg.move_threshold_m {
                    return;
                }
            }
        }
        let loc = CourierLocation {
            lat: self.position.lat,
            lon: self.position.lon,
            at: Some(now_ms()),
        };
        let topic = self.topics.courier_location(&self.cfg.courier_id);
        if self
            .publish(topic, false, false, to_json(&loc), Tag::Other)
            .await
        {
            self.last_reported = Some(self.position);
            self.emit(EventKind::Location {
                position: self.position,
            });
        }
    }

    async fn publish_reply(&mut self, r: &JobReply) {
        let Some(reply_id) = r.reply_id.clone() else {
            return;
        };
        // The answer comes back on the courier's stable replies topic; the reply id tells
        // the answers apart (MQTT 3.1.1 style, which MQTT 5 brokers carry too).
        let mut v = serde_json::to_value(r).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("reply_to".into(), self.replies_topic.clone().into());
            obj.insert("correlation_id".into(), reply_id.clone().into());
        }
        let topic = self.topics.courier_job_reply(&self.cfg.courier_id);
        if self
            .publish(
                topic,
                true,
                false,
                to_json(&v),
                Tag::Reply(reply_id.clone()),
            )
            .await
        {
            let attempts = self.resend.get(&reply_id).map_or(0, |r| r.attempts) + 1;
            let wait = self
                .cfg
                .answer_timeout
                .saturating_mul(1 << (attempts - 1).min(6))
                .min(RESEND_MAX.max(self.cfg.answer_timeout));
            self.resend.insert(
                reply_id,
                Resend {
                    attempts,
                    at: Instant::now() + wait,
                },
            );
        }
    }

    /// Sends again, oldest first, the queued replies whose answer is overdue.
    async fn resend_due(&mut self) {
        let now = Instant::now();
        let due: Vec<JobReply> = self
            .queue
            .entries()
            .iter()
            .filter(|r| {
                r.reply_id
                    .as_ref()
                    .and_then(|id| self.resend.get(id))
                    .is_some_and(|s| s.at <= now)
            })
            .cloned()
            .collect();
        // Entries no longer queued (answered meanwhile) need no timer.
        let queued: std::collections::HashSet<&str> = self
            .queue
            .entries()
            .iter()
            .filter_map(|r| r.reply_id.as_deref())
            .collect();
        self.resend.retain(|id, _| queued.contains(id.as_str()));
        for r in due {
            if !self.tracker.is_ready() {
                break;
            }
            tracing::debug!(courier = %self.cfg.courier_id, reply_id = ?r.reply_id, "no answer yet; sending the reply again");
            self.publish_reply(&r).await;
        }
    }

    /// The daemon answered a queued reply: it leaves the queue unless the daemon asked to
    /// be asked again later (`busy`) or failed inside (`internal`).
    fn settle(
        &mut self,
        reply_id: &str,
        ok: bool,
        code: Option<&str>,
        retry_after_ms: Option<u64>,
    ) {
        let transient = !ok && matches!(code, Some("busy" | "internal"));
        if transient {
            if let Some(r) = self.resend.get_mut(reply_id) {
                let wait = retry_after_ms
                    .map(Duration::from_millis)
                    .unwrap_or(self.cfg.answer_timeout)
                    .min(RESEND_MAX);
                r.at = Instant::now() + wait;
            }
            return;
        }
        self.resend.remove(reply_id);
        match self.queue.remove(reply_id) {
            Ok(true) => self.emit(EventKind::Delivered {
                reply_id: reply_id.to_string(),
            }),
            Ok(false) => {}
            Err(e) => {
                // The reply stays in the file and is sent again later: a repeat the
                // daemon answers as such.
                tracing::error!(courier = %self.cfg.courier_id, error = %e, "could not remove an answered reply from the queue");
                self.emit(EventKind::Warning {
                    message: e.to_string(),
                });
            }
        }
    }

    // ---- incoming ----

    fn on_message(&mut self, m: Message) {
        if m.topic == self.job_topic {
            self.on_job(&m.payload);
        } else if m.topic == self.replies_topic {
            self.on_answer(&m.payload);
        }
    }

    fn on_job(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            self.job = None;
            self.job_code = None;
            self.emit(EventKind::JobCleared);
            return;
        }
        let job = match answer::decode_report::<Job>(payload) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(courier = %self.cfg.courier_id, error = %e, "ignored a malformed job message");
                self.emit(EventKind::Warning {
                    message: format!("ignored a malformed job message: {e}"),
                });
                return;
            }
        };
        if let Some(c) = &job.call_id {
            if !validate::is_valid_id(c) {
                self.emit(EventKind::Warning {
                    message: "ignored a job message with an invalid call_id".into(),
                });
                return;
            }
        }
        self.job_code = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v.get("pickup_code")?.as_str().map(str::to_string))
            .filter(|c| validate::is_valid_id(c));
        self.job = Some(job.clone());
        self.emit(EventKind::Job { job: job.clone() });
        self.apply_policy(&job);
    }

    fn on_answer(&mut self, payload: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            self.emit(EventKind::Warning {
                message: "ignored an answer that is not JSON".into(),
            });
            return;
        };
        let ok = v.get("ok").and_then(|o| o.as_bool()).unwrap_or(false);
        let reply_id = v
            .get("correlation_id")
            .and_then(|c| c.as_str())
            .map(str::to_string);
        let err = v.get("error");
        let code = err
            .and_then(|e| e.get("code"))
            .and_then(|c| c.as_str())
            .map(str::to_string);
        let message = err
            .and_then(|e| e.get("message"))
            .and_then(|c| c.as_str())
            .map(|s| s.chars().take(300).collect());
        let retry_after_ms = err
            .and_then(|e| e.get("retry_after_ms"))
            .and_then(|r| r.as_u64());
        let duplicate = ok && v.get("duplicate").and_then(|d| d.as_bool()) == Some(true);
        if let Some(id) = &reply_id {
            self.settle(id, ok, code.as_deref(), retry_after_ms);
        }
        let transient = !ok && matches!(code.as_deref(), Some("busy" | "internal"));
        if let Some((call, action, before)) = reply_id
            .as_ref()
            .filter(|_| !transient)
            .and_then(|r| self.awaiting_answer.remove(r))
        {
            // Refused (wrong code, out of order…): the courier may try again. A later
            // step taken before the answer (a completion right after the pickup) rests on
            // the refused one, so it goes back too.
            let built_on = self
                .progress
                .get(&call)
                .is_some_and(|p| step(*p) >= step(action));
            if !ok && built_on {
                match before {
                    Some(b) => {
                        self.progress.insert(call.clone(), b);
                    }
                    None => {
                        self.progress.remove(&call);
                    }
                }
                // Steps armed on top of the refused one cannot be taken now; dropping them
                // lets the next job message or code arm the policy again.
                self.timers.retain(|t| t.call_id != call);
                if code.as_deref() == Some("wrong_code") {
                    // Trying the same code again is pointless: wait for a new one.
                    self.codes.remove(&call);
                    self.codes_order.retain(|c| c != &call);
                    self.job_code = None;
                }
            }
        }
        self.emit(EventKind::Answer {
            reply_id,
            ok,
            duplicate,
            code,
            message,
        });
    }

    // ---- actions ----

    fn current_call(&self) -> Result<(String, JobKind), AgentError> {
        let job = self.job.as_ref().ok_or(AgentError::NoJob)?;
        let call = job.call_id.clone().ok_or(AgentError::NoJob)?;
        Ok((call, job.kind))
    }

    /// Checks an action against the job and what the courier already did.
    fn check(&self, action: &Action) -> Result<String, AgentError> {
        let (call_id, kind) = self.current_call()?;
        let done = self.progress.get(&call_id).copied();
        let not_now = |why: String| AgentError::NotNow {
            action: action.kind().as_str(),
            call_id: call_id.clone(),
            why,
        };
        let kind_name = kind_str(kind);
        match action {
            Action::Accept | Action::Decline(_) => {
                if kind != JobKind::Offer {
                    return Err(not_now(format!("the job is {kind_name}, not an offer")));
                }
                if let Some(d) = done {
                    return Err(not_now(format!("already answered ({})", d.as_str())));
                }
            }
            Action::PickedUp(code) => {
                validate::id("pickup code", code).map_err(AgentError::Invalid)?;
                let ok = match kind {
                    JobKind::Assigned => {
                        !matches!(done, Some(JobAction::PickedUp | JobAction::Completed))
                    }
                    JobKind::Offer => done == Some(JobAction::Accept),
                    _ => false,
                };
                if !ok {
                    return Err(not_now(match done {
                        Some(d) => format!("the job is {kind_name}, last action {}", d.as_str()),
                        None => format!("the job is {kind_name}"),
                    }));
                }
            }
            Action::Completed => {
                let ok = match kind {
                    JobKind::PickedUp => done != Some(JobAction::Completed),
                    JobKind::Assigned | JobKind::Offer => done == Some(JobAction::PickedUp),
                    _ => false,
                };
                if !ok {
                    return Err(not_now(format!(
                        "the parcel is not picked up (the job is {kind_name})"
                    )));
                }
            }
        }
        if let Action::Decline(Some(r)) = action {
            validate::text("reason", r).map_err(AgentError::Invalid)?;
        }
        Ok(call_id)
    }

    async fn act(&mut self, action: Action, auto: bool) -> Result<JobReply, AgentError> {
        let call_id = self.check(&action)?;
        let kind = action.kind();
        let (reason, code) = match action {
            Action::Decline(r) => (r, None),
            Action::PickedUp(c) => (None, Some(c)),
            _ => (None, None),
        };
        let reply = JobReply {
            call_id,
            action: kind,
            reply_id: Some(new_reply_id()),
            reason,
            pickup_code: code,
            at: Some(now_ms()),
        };
        self.enqueue(reply, auto).await
    }

    async fn enqueue(&mut self, reply: JobReply, auto: bool) -> Result<JobReply, AgentError> {
        reply.validate().map_err(AgentError::Invalid)?;
        self.queue.push(reply.clone())?;
        let before = self.progress.get(&reply.call_id).copied();
        self.set_progress(&reply.call_id, reply.action);
        if let Some(id) = &reply.reply_id {
            if self.awaiting_answer.len() >= PROGRESS_KEPT {
                self.awaiting_answer.clear();
            }
            self.awaiting_answer
                .insert(id.clone(), (reply.call_id.clone(), reply.action, before));
        }
        let online = self.tracker.is_ready();
        self.emit(EventKind::Acted {
            reply: reply.clone(),
            auto,
            offline: !online,
        });
        if online {
            self.publish_reply(&reply).await;
        }
        // What the courier did may enable the next automatic step (a picked-up parcel
        // completes after the delay even before the daemon confirms).
        if let Some(job) = self.job.clone() {
            self.apply_policy(&job);
        }
        Ok(reply)
    }

    fn set_progress(&mut self, call: &str, action: JobAction) {
        if self.progress.insert(call.to_string(), action).is_none() {
            self.progress_order.push_back(call.to_string());
            while self.progress_order.len() > PROGRESS_KEPT {
                if let Some(old) = self.progress_order.pop_front() {
                    self.progress.remove(&old);
                }
            }
        }
    }

    // ---- policy ----

    fn apply_policy(&mut self, job: &Job) {
        let Some(call) = job.call_id.clone() else {
            return;
        };
        if matches!(
            job.kind,
            JobKind::Cancelled | JobKind::Withdrawn | JobKind::None
        ) {
            self.timers.retain(|t| t.call_id != call);
            return;
        }
        if self.timers.iter().any(|t| t.call_id == call) {
            return;
        }
        let done = self.progress.get(&call).copied();
        let policy = self.cfg.policy.clone();
        use JobAction::{Accept, PickedUp};
        let action = match (job.kind, done) {
            (JobKind::Offer, None) if policy.auto_answer => {
                let think = self.rng.random_range(policy.think_ms.0..=policy.think_ms.1);
                let decline =
                    policy.decline_rate > 0.0 && self.rng.random_bool(policy.decline_rate);
                let action = if decline {
                    Action::Decline(Some("declined by policy".into()))
                } else {
                    Action::Accept
                };
                Some((Duration::from_millis(think), action))
            }
            // Collect the parcel, only possible when the job carries a code (simulation).
            (JobKind::Assigned, None | Some(Accept)) | (JobKind::Offer, Some(Accept)) => {
                let code = self.job_code.as_ref().or_else(|| self.codes.get(&call));
                match (code, policy.complete_after) {
                    (Some(code), Some(d)) => Some((d, Action::PickedUp(code.clone()))),
                    _ => None,
                }
            }
            (JobKind::Assigned | JobKind::Offer | JobKind::PickedUp, Some(PickedUp))
            | (JobKind::PickedUp, None | Some(Accept)) => {
                policy.complete_after.map(|d| (d, Action::Completed))
            }
            _ => None,
        };
        if let Some((delay, action)) = action {
            self.timers.push(Timer {
                at: Instant::now() + delay,
                call_id: call,
                action,
            });
        }
    }

    async fn fire_timers(&mut self) {
        let now = Instant::now();
        let (due, rest): (Vec<Timer>, Vec<Timer>) =
            self.timers.drain(..).partition(|t| t.at <= now);
        self.timers = rest;
        for t in due {
            let current = self.job.as_ref().and_then(|j| j.call_id.as_deref());
            if current != Some(t.call_id.as_str()) {
                continue;
            }
            if let Err(e) = self.act(t.action, true).await {
                tracing::debug!(courier = %self.cfg.courier_id, error = %e, "automatic action skipped");
            }
        }
    }

    // ---- commands ----

    async fn on_command(&mut self, c: Command) {
        match c {
            Command::Act { action, respond } => {
                let r = self.act(action, false).await;
                self.update_status();
                let _ = respond.send(r);
            }
            Command::Raw { mut reply, respond } => {
                if reply.reply_id.is_none() {
                    reply.reply_id = Some(new_reply_id());
                }
                if reply.at.is_none() {
                    reply.at = Some(now_ms());
                }
                let r = self.enqueue(reply, false).await;
                self.update_status();
                let _ = respond.send(r);
            }
            Command::Shift { available, respond } => {
                if available != self.available {
                    self.available = available;
                    self.emit(EventKind::Shift { available });
                    self.publish_presence(PresenceState::Online).await;
                }
                if let Some(r) = respond {
                    self.update_status();
                    let _ = r.send(());
                }
            }
            Command::Move { to, force, respond } => {
                self.position = to;
                self.report_location(force).await;
                if let Some(r) = respond {
                    self.update_status();
                    let _ = r.send(());
                }
            }
            Command::Code { call_id, code } => {
                if !self.codes.contains_key(&call_id) {
                    self.codes_order.push_back(call_id.clone());
                    while self.codes_order.len() > CODES_KEPT {
                        if let Some(old) = self.codes_order.pop_front() {
                            self.codes.remove(&old);
                        }
                    }
                }
                self.codes.insert(call_id.clone(), code);
                if let Some(job) = self.job.clone() {
                    if job.call_id.as_deref() == Some(call_id.as_str()) {
                        // A pickup armed with an older code waits for this one instead.
                        self.timers.retain(|t| {
                            !(t.call_id == call_id && matches!(t.action, Action::PickedUp(_)))
                        });
                        self.apply_policy(&job);
                    }
                }
            }
            Command::Shutdown { respond } => {
                self.stop_waiters.push(respond);
                self.begin_stop().await;
            }
        }
    }

    // ---- shutdown ----

    async fn begin_stop(&mut self) {
        if !matches!(self.stop, Stop::Running) {
            return;
        }
        match self.tracker.phase() {
            Phase::Ready => {
                self.stop = Stop::Offline {
                    deadline: Instant::now() + Duration::from_secs(3),
                };
                self.publish_offline().await;
            }
            Phase::Subscribing { .. } => {
                // Let the subscription finish so the offline presence can go out.
                self.stop = Stop::Offline {
                    deadline: Instant::now() + Duration::from_secs(3),
                };
            }
            Phase::Down => self.stop = Stop::Done,
        }
    }

    async fn close(&mut self) {
        let _ = self.link.disconnect().await;
        self.stop = Stop::Closing {
            deadline: Instant::now() + Duration::from_secs(1),
        };
    }

    async fn on_stop_deadline(&mut self) {
        match self.stop {
            Stop::Offline { .. } => self.close().await,
            _ => self.stop = Stop::Done,
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn kind_str(k: JobKind) -> &'static str {
    match k {
        JobKind::Offer => "an offer",
        JobKind::Assigned => "assigned",
        JobKind::PickedUp => "picked up",
        JobKind::Cancelled => "cancelled",
        JobKind::Withdrawn => "withdrawn",
        JobKind::None => "none",
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX))
        .unwrap_or(0)
}

/// A reply id unique across devices and restarts: time plus 64 random bits.
pub fn new_reply_id() -> String {
    format!("r{:x}-{:016x}", now_ms(), rand::rng().random::<u64>())
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain data structures always serialize.
    serde_json::to_vec(v).unwrap_or_default()
}
