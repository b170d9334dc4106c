//! The systemd adapter: readiness, status, reload and stop notifications, and a watchdog
//! that pings only while the daemon really works.
//!
//! systemd is pickupd's supervisor on a box nobody logs into. With `Type=notify`,
//! `READY=1` is the readiness probe; with `WatchdogSec=`, `WATCHDOG=1` is the liveness
//! probe. A watchdog pinged from a timer task proves only that the timer task runs, so
//! [`run_watchdog`] pings only while every registered component ([`Heartbeats`]) has beaten
//! recently *and* an extra probe passes (with the embedded broker: each listener still
//! accepts an MQTT connection — rumqttd can lose a listener thread while the process lives
//! on). When something hangs, the pings stop and systemd restarts the service.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every notification is a no-op, so the same
//! binary runs from a shell, in tests and under systemd.
//!
//! Notifications go over a unix datagram socket as described in `sd_notify(3)`. The
//! `sd-notify` crate supplies the message vocabulary and the monotonic clock reading; the
//! sending is done here so that a [`Notifier`] can target an explicit socket (tests play
//! systemd with a socket of their own instead of changing the process environment).

use std::ffi::{OsStr, OsString};
use std::future::Future;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::{Instant, MissedTickBehavior};

/// How long one notification may block when systemd's receive queue is full. Sending is
/// synchronous (as in libsystemd); the bound keeps a stuck manager from stalling a task.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends `sd_notify` messages to the service manager, or nothing outside systemd.
///
/// Cheap to clone: clones share one target. Failures to send are logged (a lost `READY=1`
/// makes systemd time the start out, which the operator then sees in the journal) and
/// otherwise ignored by the convenience methods; [`Notifier::send`] returns them.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    /// Where notifications go; `None` outside systemd, which makes every call a no-op.
    target: Option<Arc<Target>>,
}

/// The service manager's notification socket and what it asked of this process.
#[derive(Debug)]
struct Target {
    /// The socket address from `NOTIFY_SOCKET` (a path, or an abstract name after `@`).
    addr: SocketAddr,
    /// The raw `NOTIFY_SOCKET` value, for log lines.
    shown: String,
    /// The full `WATCHDOG_USEC` period, when systemd enabled the watchdog for this process.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier systemd asked for through the environment: `NOTIFY_SOCKET`,
    /// `WATCHDOG_USEC` and `WATCHDOG_PID`. Without `NOTIFY_SOCKET` it does nothing.
    ///
    /// The variables are left in place (unsetting them is unsound once threads run);
    /// pickupd starts no child processes that could mistake them for their own.
    pub fn from_env() -> Self {
        Self::from_vars(
            std::env::var_os("NOTIFY_SOCKET"),
            std::env::var_os("WATCHDOG_USEC"),
            std::env::var_os("WATCHDOG_PID"),
            std::process::id(),
        )
    }

    /// A notifier that never sends anything (outside systemd, and in tests of other parts).
    pub fn disabled() -> Self {
        Self::default()
    }

    /// A notifier that sends to an explicit socket path, without a watchdog. Used by tests
    /// that play systemd, and by anything that must not read the process environment.
    pub fn for_socket(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        Ok(Self {
            target: Some(Arc::new(Target {
                addr: SocketAddr::from_pathname(path)?,
                shown: path.display().to_string(),
                watchdog: None,
            })),
        })
    }

    /// The same target with the watchdog enabled at `period` (what `WATCHDOG_USEC` says);
    /// pings are then due every half `period`. No effect on a disabled notifier.
    pub fn with_watchdog(self, period: Duration) -> Self {
        let Some(target) = self.target else {
            return self;
        };
        Self {
            target: Some(Arc::new(Target {
                addr: target.addr.clone(),
                shown: target.shown.clone(),
                watchdog: (!period.is_zero()).then_some(period),
            })),
        }
    }

    /// Builds a notifier from the values of the three environment variables, so that the
    /// parsing is testable without touching the process environment.
    fn from_vars(
        notify_socket: Option<OsString>,
        watchdog_usec: Option<OsString>,
        watchdog_pid: Option<OsString>,
        our_pid: u32,
    ) -> Self {
        let Some(raw) = notify_socket.filter(|raw| !raw.is_empty()) else {
            return Self::disabled();
        };
        let addr = match parse_notify_socket(&raw) {
            Ok(addr) => addr,
            Err(why) => {
                tracing::warn!(
                    notify_socket = %raw.to_string_lossy(),
                    "NOTIFY_SOCKET is unusable ({why}); not notifying systemd"
                );
                return Self::disabled();
            }
        };
        Self {
            target: Some(Arc::new(Target {
                addr,
                shown: raw.to_string_lossy().into_owned(),
                watchdog: parse_watchdog(watchdog_usec, watchdog_pid, our_pid),
            })),
        }
    }

    /// Whether notifications go anywhere (false outside systemd).
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often the watchdog must be pinged: half of `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
    /// recommends, so one late ping does not kill the service. `None` when systemd did not
    /// enable the watchdog for this process (unset, zero, or `WATCHDOG_PID` names another).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.target.as_ref()?.watchdog.map(|period| period / 2)
    }

    /// `READY=1`: start-up is complete, and also that a reload has finished. Send it only
    /// when requests can really be served.
    pub fn ready(&self) {
        self.report("READY=1", &[NotifyState::Ready]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=`: a reload (SIGHUP) has started; follow it with
    /// [`Notifier::ready`] when done. systemd ≥ 253 requires the timestamp for
    /// `Type=notify-reload` and uses it to tell this reload from an earlier one; older
    /// versions and `Type=notify` accept the message and ignore the field they do not know.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.report("RELOADING=1", &[NotifyState::Reloading, now]),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read CLOCK_MONOTONIC for the reload notification");
                self.report("RELOADING=1", &[NotifyState::Reloading]);
            }
        }
    }

    /// `STOPPING=1`: shutdown has begun (systemd then stops expecting watchdog pings).
    pub fn stopping(&self) {
        self.report("STOPPING=1", &[NotifyState::Stopping]);
    }

    /// `STATUS=`: the one line `systemctl status` shows. Control characters (newlines
    /// included) become spaces, since a newline would start another assignment.
    pub fn status(&self, line: &str) {
        if self.target.is_none() {
            return;
        }
        let line: String = line
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        self.report("STATUS", &[NotifyState::Status(&line)]);
    }

    /// `WATCHDOG=1`: one liveness ping. Normally sent by [`run_watchdog`] only.
    pub fn watchdog(&self) {
        self.report("WATCHDOG=1", &[NotifyState::Watchdog]);
    }

    /// Sends `states` as one datagram (one `KEY=VALUE` line each). `Ok` without sending
    /// when disabled.
    pub fn send(&self, states: &[NotifyState<'_>]) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let mut message = String::new();
        for state in states {
            message.push_str(&state.to_string());
            message.push('\n');
        }
        let socket = UnixDatagram::unbound()?;
        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
        let sent = socket.send_to_addr(message.as_bytes(), &target.addr)?;
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", message.len()),
            ));
        }
        Ok(())
    }

    /// Sends and logs a failure instead of returning it.
    fn report(&self, what: &str, states: &[NotifyState<'_>]) {
        if let Err(e) = self.send(states) {
            let socket = self.target.as_ref().map(|t| t.shown.as_str()).unwrap_or("");
            tracing::warn!(error = %e, notify_socket = socket, "could not send {what} to systemd");
        }
    }
}

/// Parses `NOTIFY_SOCKET`: an absolute path, or `@name` for an abstract socket.
fn parse_notify_socket(raw: &OsStr) -> Result<SocketAddr, String> {
    let bytes = raw.as_bytes();
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(Path::new(raw)).map_err(|e| e.to_string()),
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]).map_err(|e| e.to_string()),
        _ => {
            Err("expected an absolute path or @name (other socket kinds are not supported)".into())
        }
    }
}

/// Reads the watchdog period the way `sd_watchdog_enabled(3)` does: `WATCHDOG_USEC` in
/// microseconds, honoured only when `WATCHDOG_PID` is unset or names this process.
fn parse_watchdog(usec: Option<OsString>, pid: Option<OsString>, our_pid: u32) -> Option<Duration> {
    let usec = usec?;
    let Some(usec) = usec.to_str().and_then(|s| s.trim().parse::<u64>().ok()) else {
        tracing::warn!(watchdog_usec = %usec.to_string_lossy(), "WATCHDOG_USEC is not a number of microseconds; watchdog disabled");
        return None;
    };
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid {
        match pid.to_str().and_then(|s| s.trim().parse::<u32>().ok()) {
            Some(pid) if pid == our_pid => {}
            Some(_) => return None,
            None => {
                tracing::warn!(watchdog_pid = %pid.to_string_lossy(), "WATCHDOG_PID is not a process id; watchdog disabled");
                return None;
            }
        }
    }
    Some(Duration::from_micros(usec))
}

/// The components whose progress the watchdog requires, each with the time it last beat.
///
/// Each long-running loop (dispatch, store writer, MQTT link, …) registers once and calls
/// [`Heartbeat::beat`] whenever it makes progress *and* on an idle timer, so a quiet
/// component still beats and a missing beat means the component is stuck. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Heartbeats {
    /// Shared by every clone and every handed-out [`Heartbeat`].
    registry: Arc<Registry>,
}

/// The clock origin and the registered components.
#[derive(Debug)]
struct Registry {
    /// Beats are stored as microseconds since this instant, so they fit in an atomic.
    origin: Instant,
    /// Registered components; a name registered twice shares one slot.
    slots: Mutex<Vec<Slot>>,
}

/// One registered component.
#[derive(Debug)]
struct Slot {
    /// The component's name, as it appears in logs when it goes stale.
    name: &'static str,
    /// Microseconds since the registry's origin at the latest beat.
    last: Arc<AtomicU64>,
}

/// A component's handle for announcing progress; cheap to clone and to call from any
/// thread (the store writer is a plain thread).
///
/// Dropping the handle does not unregister the component: a loop that ended is as unable
/// to serve as one that hangs, so the watchdog treats both alike.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    /// The component this handle beats for.
    name: &'static str,
    /// The registry's clock origin.
    origin: Instant,
    /// The component's slot in the registry.
    last: Arc<AtomicU64>,
}

impl Default for Heartbeats {
    fn default() -> Self {
        Self::new()
    }
}

impl Heartbeats {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            registry: Arc::new(Registry {
                origin: Instant::now(),
                slots: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Registers `name` (or returns the existing slot's handle) and counts registration as
    /// a beat, so a component gets a full `max_age` to start.
    pub fn register(&self, name: &'static str) -> Heartbeat {
        let mut slots = self
            .registry
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let last = match slots.iter().find(|slot| slot.name == name) {
            Some(slot) => Arc::clone(&slot.last),
            None => {
                let last = Arc::new(AtomicU64::new(0));
                slots.push(Slot {
                    name,
                    last: Arc::clone(&last),
                });
                last
            }
        };
        drop(slots);
        let heartbeat = Heartbeat {
            name,
            origin: self.registry.origin,
            last,
        };
        heartbeat.beat();
        heartbeat
    }

    /// The components that have not beaten within `max_age`, in registration order.
    pub fn stale(&self, max_age: Duration) -> Vec<&'static str> {
        let now = micros_since(self.registry.origin);
        let max_age = u64::try_from(max_age.as_micros()).unwrap_or(u64::MAX);
        let slots = self
            .registry
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        slots
            .iter()
            .filter(|slot| now.saturating_sub(slot.last.load(Ordering::Relaxed)) > max_age)
            .map(|slot| slot.name)
            .collect()
    }
}

impl Heartbeat {
    /// Records that the component made progress (or is idle and well) now.
    pub fn beat(&self) {
        self.last
            .fetch_max(micros_since(self.origin), Ordering::Relaxed);
    }

    /// The component's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Microseconds from `origin` to now on tokio's clock (which tests can pause and advance).
fn micros_since(origin: Instant) -> u64 {
    u64::try_from(Instant::now().saturating_duration_since(origin).as_micros()).unwrap_or(u64::MAX)
}

/// Why the watchdog is withholding its pings.
#[derive(Debug)]
enum Unhealthy {
    /// These components have not beaten within `max_age`.
    Stale(Vec<&'static str>),
    /// The probe answered with this error.
    ProbeFailed(String),
    /// The probe did not answer within one ping period.
    ProbeHung(Duration),
}

impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unhealthy::Stale(names) => write!(f, "no heartbeat from {}", names.join(", ")),
            Unhealthy::ProbeFailed(why) => write!(f, "probe failed: {why}"),
            Unhealthy::ProbeHung(after) => {
                write!(f, "probe gave no answer within {} ms", after.as_millis())
            }
        }
    }
}

/// Pings the systemd watchdog every [`Notifier::watchdog_interval`] while the daemon is
/// healthy: no component in `heartbeats` is older than `max_age`, and `probe` answers
/// `Ok` within one interval. Otherwise it withholds the ping, so systemd restarts the
/// service once `WatchdogSec` passes without one.
///
/// Logs once (error) when it stops pinging, with the reason, and once (info) when it
/// resumes. Returns at once when the watchdog is not enabled; otherwise runs until the
/// task is dropped, so spawn it and abort it at shutdown. `max_age` should be a few times
/// the components' idle beat period, and below `WatchdogSec` minus one interval so that a
/// hang is caught before systemd gives up anyway.
///
/// `probe` is called once per healthy tick; pass `|| async { Ok(()) }` when there is
/// nothing beyond the heartbeats to check (an external broker).
pub async fn run_watchdog<P, F>(
    notifier: Notifier,
    heartbeats: Heartbeats,
    max_age: Duration,
    mut probe: P,
) where
    P: FnMut() -> F,
    F: Future<Output = Result<(), String>>,
{
    let Some(interval) = notifier.watchdog_interval() else {
        tracing::debug!("systemd watchdog not enabled for this process; no pings");
        return;
    };
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        max_age_ms = max_age.as_millis() as u64,
        "systemd watchdog enabled"
    );
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut withheld_since: Option<Instant> = None;
    loop {
        ticker.tick().await;
        match check_health(&heartbeats, max_age, &mut probe, interval).await {
            Ok(()) => {
                if let Some(since) = withheld_since.take() {
                    tracing::info!(
                        withheld_ms = since.elapsed().as_millis() as u64,
                        "watchdog pings resumed: every component beats and the probe passes"
                    );
                }
                notifier.watchdog();
            }
            Err(why) => {
                if withheld_since.is_none() {
                    tracing::error!(
                        reason = %why,
                        "watchdog pings stopped ({why}); systemd restarts the service unless this clears"
                    );
                    withheld_since = Some(Instant::now());
                }
            }
        }
    }
}

/// One health verdict: heartbeats first (cheap), then the probe with a deadline.
async fn check_health<P, F>(
    heartbeats: &Heartbeats,
    max_age: Duration,
    probe: &mut P,
    deadline: Duration,
) -> Result<(), Unhealthy>
where
    P: FnMut() -> F,
    F: Future<Output = Result<(), String>>,
{
    let stale = heartbeats.stale(max_age);
    if !stale.is_empty() {
        return Err(Unhealthy::Stale(stale));
    }
    match tokio::time::timeout(deadline, probe()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(why)) => Err(Unhealthy::ProbeFailed(why)),
        Err(_) => Err(Unhealthy::ProbeHung(deadline)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;
    use std::pin::Pin;
    use std::sync::atomic::AtomicBool;

    /// Plays systemd: a unix datagram socket in a temp dir that receives notifications.
    struct FakeSystemd {
        _dir: tempfile::TempDir,
        path: PathBuf,
        socket: tokio::net::UnixDatagram,
    }

    impl FakeSystemd {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify");
            let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
            Self {
                _dir: dir,
                path,
                socket,
            }
        }

        fn notifier(&self) -> Notifier {
            Notifier::for_socket(&self.path).unwrap()
        }

        /// The next datagram, or `None` if none arrives before `deadline`.
        async fn next_before(&self, deadline: Instant) -> Option<String> {
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf))
                .await
                .ok()?
                .unwrap();
            Some(String::from_utf8(buf[..n].to_vec()).unwrap())
        }

        /// The next datagram; fails the test if none comes within a minute (of tokio time,
        /// which paused tests advance on their own).
        async fn next(&self) -> String {
            self.next_before(Instant::now() + Duration::from_secs(60))
                .await
                .expect("no notification within 60 s")
        }
    }

    /// Log output captured from `tracing`, to count what the watchdog said.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        fn install(&self) -> tracing::subscriber::DefaultGuard {
            let writer = self.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::DEBUG)
                .finish();
            tracing::subscriber::set_default(subscriber)
        }

        fn lines_containing(&self, needle: &str) -> Vec<String> {
            let bytes = self.0.lock().unwrap().clone();
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .filter(|line| line.contains(needle))
                .map(str::to_owned)
                .collect()
        }
    }

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Beats `heartbeat` every 100 ms of tokio time, like an idle component's timer.
    fn keep_beating(heartbeat: Heartbeat) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                heartbeat.beat();
            }
        })
    }

    type BoxedProbe = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

    #[tokio::test]
    async fn notifications_arrive_as_systemd_expects_them() {
        let systemd = FakeSystemd::new();
        let notifier = systemd.notifier();
        assert!(notifier.is_enabled());

        notifier.ready();
        assert_eq!(systemd.next().await, "READY=1\n");
        notifier.status("3 dispatching, 12 couriers online, outbox 0");
        assert_eq!(
            systemd.next().await,
            "STATUS=3 dispatching, 12 couriers online, outbox 0\n"
        );
        notifier.clone().watchdog();
        assert_eq!(systemd.next().await, "WATCHDOG=1\n");
        notifier.stopping();
        assert_eq!(systemd.next().await, "STOPPING=1\n");
    }

    #[tokio::test]
    async fn status_stays_one_line() {
        let systemd = FakeSystemd::new();
        systemd.notifier().status("line one\nREADY=1\r\tend");
        assert_eq!(systemd.next().await, "STATUS=line one READY=1  end\n");
    }

    #[tokio::test]
    async fn reloading_carries_a_monotonic_timestamp_in_the_same_datagram() {
        let systemd = FakeSystemd::new();
        let notifier = systemd.notifier();
        notifier.reloading();
        let message = systemd.next().await;
        let lines: Vec<&str> = message.lines().collect();
        assert_eq!(lines.len(), 2, "{message:?}");
        assert_eq!(lines[0], "RELOADING=1");
        let usec: u64 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .expect("MONOTONIC_USEC line")
            .parse()
            .unwrap();
        assert!(usec > 0);
        notifier.ready();
        assert_eq!(systemd.next().await, "READY=1\n");
    }

    #[tokio::test]
    async fn abstract_notify_socket_is_reached() {
        let name = format!("pickupd-test-notify-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier::from_vars(Some(format!("@{name}").into()), None, None, 1);
        notifier.ready();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
    }

    #[tokio::test]
    async fn outside_systemd_everything_is_a_no_op() {
        let notifier = Notifier::from_vars(None, Some("20000000".into()), None, 1);
        assert!(!notifier.is_enabled());
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.ready();
        notifier.status("x");
        notifier.reloading();
        notifier.watchdog();
        notifier.stopping();
        notifier.send(&[NotifyState::Ready]).unwrap();
        // An empty NOTIFY_SOCKET counts as unset; a relative one is refused.
        assert!(!Notifier::from_vars(Some("".into()), None, None, 1).is_enabled());
        assert!(!Notifier::from_vars(Some("run/notify".into()), None, None, 1).is_enabled());
    }

    #[tokio::test]
    async fn a_vanished_socket_is_an_error_not_a_panic() {
        let systemd = FakeSystemd::new();
        let notifier = systemd.notifier();
        let path = systemd.path.clone();
        drop(systemd);
        assert!(!path.exists());
        assert!(notifier.send(&[NotifyState::Ready]).is_err());
        notifier.ready(); // logs, does not panic
    }

    #[test]
    fn watchdog_interval_is_half_of_watchdog_usec_for_this_process_only() {
        let socket = || Some(OsString::from("/run/systemd/notify"));
        let interval = |usec: Option<&str>, pid: Option<&str>| {
            Notifier::from_vars(socket(), usec.map(Into::into), pid.map(Into::into), 42)
                .watchdog_interval()
        };
        assert_eq!(
            interval(Some("20000000"), None),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            interval(Some("20000000"), Some("42")),
            Some(Duration::from_secs(10))
        );
        assert_eq!(interval(Some("20000000"), Some("43")), None);
        assert_eq!(interval(Some("20000000"), Some("x")), None);
        assert_eq!(interval(Some("0"), None), None);
        assert_eq!(interval(Some("soon"), None), None);
        assert_eq!(interval(None, Some("42")), None);
        assert_eq!(
            Notifier::disabled()
                .with_watchdog(Duration::from_secs(2))
                .watchdog_interval(),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_go_stale_without_beats_and_recover_with_one() {
        let heartbeats = Heartbeats::new();
        let dispatch = heartbeats.register("dispatch loop");
        let store = heartbeats.register("store writer");
        let max_age = Duration::from_secs(5);
        assert!(heartbeats.stale(max_age).is_empty());

        tokio::time::advance(Duration::from_secs(4)).await;
        dispatch.beat();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(heartbeats.stale(max_age), vec!["store writer"]);

        store.beat();
        assert!(heartbeats.stale(max_age).is_empty());

        // A second registration under the same name shares the slot.
        let again = heartbeats.register("store writer");
        assert_eq!(again.name(), "store writer");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            heartbeats.stale(max_age),
            vec!["dispatch loop", "store writer"]
        );
        again.beat();
        assert_eq!(heartbeats.stale(max_age), vec!["dispatch loop"]);
    }

    #[tokio::test]
    async fn beats_from_a_plain_thread_count() {
        let heartbeats = Heartbeats::new();
        let writer = heartbeats.register("store writer");
        std::thread::spawn(move || writer.beat()).join().unwrap();
        assert!(heartbeats.stale(Duration::from_secs(1)).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn pings_at_half_the_watchdog_period_while_healthy() {
        let systemd = FakeSystemd::new();
        let period = Duration::from_secs(2);
        let interval = period / 2;
        let notifier = systemd.notifier().with_watchdog(period);
        assert_eq!(notifier.watchdog_interval(), Some(interval));
        let heartbeats = Heartbeats::new();
        let _beater = keep_beating(heartbeats.register("dispatch loop"));
        let watchdog = tokio::spawn(run_watchdog(
            notifier,
            heartbeats,
            Duration::from_secs(1),
            || async { Ok(()) },
        ));

        let mut at = Vec::new();
        for _ in 0..4 {
            assert_eq!(systemd.next().await, "WATCHDOG=1\n");
            at.push(Instant::now());
        }
        // Tokio time is paused: these are logical instants. Pings cannot come faster than
        // the interval; a receipt may lag its ping only until the next 100 ms beat timer.
        let span = at[3] - at[0];
        assert!(
            span >= 3 * interval - Duration::from_millis(100),
            "{span:?}"
        );
        assert!(span < 4 * interval, "{span:?}");
        watchdog.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_component_stops_the_pings_within_one_interval_and_they_resume() {
        let logs = Captured::default();
        let _guard = logs.install();
        let systemd = FakeSystemd::new();
        let interval = Duration::from_secs(1);
        let max_age = Duration::from_millis(1500);
        let heartbeats = Heartbeats::new();
        let _dispatch = keep_beating(heartbeats.register("dispatch loop"));
        let store = heartbeats.register("store writer");
        let watchdog = tokio::spawn(run_watchdog(
            systemd.notifier().with_watchdog(2 * interval),
            heartbeats,
            max_age,
            || async { Ok(()) },
        ));
        assert_eq!(systemd.next().await, "WATCHDOG=1\n");

        // The store writer beats one last time, then hangs.
        store.beat();
        let stale_from = Instant::now() + max_age;
        let mut last_ping = None;
        while let Some(message) = systemd.next_before(stale_from + 5 * interval).await {
            assert_eq!(message, "WATCHDOG=1\n");
            last_ping = Some(Instant::now());
        }
        // No ping was sent once the component was stale, so the first tick after that
        // (within one interval) withheld it, and so did every tick for four more
        // intervals (systemd would have restarted us). Tokio time is paused, so these are
        // logical instants; a receipt lags its ping at most until the next 100 ms beat.
        if let Some(last) = last_ping {
            assert!(
                last <= stale_from + Duration::from_millis(100),
                "ping received {:?} after the component went stale",
                last - stale_from
            );
        }
        let stopped = logs.lines_containing("watchdog pings stopped");
        assert_eq!(stopped.len(), 1, "{stopped:#?}");
        assert!(
            stopped[0].contains("no heartbeat from store writer"),
            "{}",
            stopped[0]
        );
        assert!(!stopped[0].contains("dispatch loop"), "{}", stopped[0]);

        // The writer recovers: pings resume, and that is logged once.
        let _store = keep_beating(store);
        assert_eq!(systemd.next().await, "WATCHDOG=1\n");
        assert_eq!(systemd.next().await, "WATCHDOG=1\n");
        assert_eq!(logs.lines_containing("watchdog pings resumed").len(), 1);
        assert_eq!(logs.lines_containing("watchdog pings stopped").len(), 1);
        watchdog.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_probe_stops_the_pings_and_its_recovery_resumes_them() {
        let logs = Captured::default();
        let _guard = logs.install();
        let systemd = FakeSystemd::new();
        let interval = Duration::from_secs(1);
        let heartbeats = Heartbeats::new();
        let _dispatch = keep_beating(heartbeats.register("dispatch loop"));
        let failing = Arc::new(AtomicBool::new(false));
        let probe = {
            let failing = Arc::clone(&failing);
            move || {
                let failing = failing.load(Ordering::SeqCst);
                async move {
                    if failing {
                        Err("v4 listener 127.0.0.1:1883 refused the connection".to_owned())
                    } else {
                        Ok(())
                    }
                }
            }
        };
        let watchdog = tokio::spawn(run_watchdog(
            systemd.notifier().with_watchdog(2 * interval),
            heartbeats,
            Duration::from_secs(5),
            probe,
        ));
        assert_eq!(systemd.next().await, "WATCHDOG=1\n");

        failing.store(true, Ordering::SeqCst);
        let failed_at = Instant::now();
        let mut last_ping = None;
        while let Some(message) = systemd.next_before(failed_at + 5 * interval).await {
            assert_eq!(message, "WATCHDOG=1\n");
            last_ping = Some(Instant::now());
        }
        // The probe runs on every tick, so the first tick after the failure (within one
        // interval) withheld its ping, and so did every later one.
        assert_eq!(
            last_ping.map(|at| at - failed_at),
            None,
            "ping after the probe failed"
        );
        let stopped = logs.lines_containing("watchdog pings stopped");
        assert_eq!(stopped.len(), 1, "{stopped:#?}");
        assert!(
            stopped[0].contains("refused the connection"),
            "{}",
            stopped[0]
        );

        failing.store(false, Ordering::SeqCst);
        assert_eq!(systemd.next().await, "WATCHDOG=1\n");
        assert_eq!(logs.lines_containing("watchdog pings resumed").len(), 1);
        watchdog.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_answers_counts_as_failed() {
        let logs = Captured::default();
        let _guard = logs.install();
        let systemd = FakeSystemd::new();
        let interval = Duration::from_secs(1);
        let heartbeats = Heartbeats::new();
        let _dispatch = keep_beating(heartbeats.register("dispatch loop"));
        let probe = || -> BoxedProbe { Box::pin(std::future::pending()) };
        let watchdog = tokio::spawn(run_watchdog(
            systemd.notifier().with_watchdog(2 * interval),
            heartbeats,
            Duration::from_secs(5),
            probe,
        ));
        let start = Instant::now();
        assert_eq!(systemd.next_before(start + 5 * interval).await, None);
        let stopped = logs.lines_containing("watchdog pings stopped");
        assert_eq!(stopped.len(), 1, "{stopped:#?}");
        assert!(
            stopped[0].contains("no answer within 1000 ms"),
            "{}",
            stopped[0]
        );
        watchdog.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_watchdog_run_watchdog_returns_and_sends_nothing() {
        let systemd = FakeSystemd::new();
        run_watchdog(
            systemd.notifier(),
            Heartbeats::new(),
            Duration::from_secs(1),
            || async { Ok(()) },
        )
        .await;
        let start = Instant::now();
        assert_eq!(
            systemd.next_before(start + Duration::from_secs(10)).await,
            None
        );
    }
}
