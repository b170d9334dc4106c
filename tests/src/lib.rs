//! Fixtures for the end-to-end tests: the daemon on a free port with a temp SQLite file,
//! kiosks and couriers as real MQTT clients, Debian's Mosquitto as an external broker, and
//! waiting for conditions with a deadline instead of sleeping.

use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pickup_protocol::client::{
    link, Backoff, BrokerUrl, Link, LinkEvent, LinkOptions, Message, Requester, Version,
};
use pickup_protocol::{Job, Topics};
use pickupd::app::Running;
use pickupd::config::Config;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// How long any wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Polls `cond` until it holds or [`DEADLINE`] passes (then panics with `what`).
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + DEADLINE;
    while !cond().await {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Settings for a test daemon: embedded broker on a free loopback port, database in `dir`.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config {
        site: "test".into(),
        ..Config::default()
    };
    c.store.path = dir.join("pickupd.db");
    c.broker.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    c.mqtt.reconnect_max_ms = 500;
    c
}

/// Starts the daemon in this process and waits until it is ready.
pub async fn start_daemon(cfg: Config) -> Running {
    let mut r = pickupd::app::start(cfg).await.expect("daemon starts");
    let ready = r.ready.clone();
    let mut ready2 = ready.clone();
    tokio::time::timeout(DEADLINE, ready2.wait_for(|r| *r))
        .await
        .expect("daemon ready in time")
        .expect("ready channel");
    let _ = &mut r;
    r
}

/// `mqtt://addr`.
pub fn url(addr: SocketAddr) -> BrokerUrl {
    BrokerUrl {
        host: addr.ip().to_string(),
        port: addr.port(),
    }
}

/// A kiosk: request/response on its own stable reply topic.
pub struct Kiosk {
    /// The client.
    pub req: Requester,
    /// Topics of the site.
    pub topics: Topics,
    /// Kiosk id.
    pub id: String,
}

impl Kiosk {
    /// Connects a kiosk speaking `version`.
    pub async fn connect(addr: SocketAddr, site: &str, id: &str, version: Version) -> Self {
        let topics = Topics::new(site).unwrap();
        let mut o = LinkOptions::new(url(addr), format!("kiosk-{id}"));
        o.version = version;
        let (req, _rx) = Requester::connect(o, topics.kiosk_replies(id), vec![], DEADLINE)
            .await
            .expect("kiosk connects");
        Self {
            req,
            topics,
            id: id.into(),
        }
    }

    /// Sends a create request and returns the answer.
    pub async fn create(&self, body: Value) -> Value {
        self.req
            .request(&self.topics.calls_create(), body, DEADLINE)
            .await
            .expect("create answered")
    }

    /// A valid create body for a light parcel at (37.5, 127.0).
    pub fn call_body(&self, request_id: &str) -> Value {
        json!({
            "request_id": request_id,
            "tel": "010-1234-5678",
            "location": {"lat": 37.5, "lon": 127.0, "label": "Gate 2"},
            "parcel": {"class": "light"},
            "kiosk_id": self.id,
        })
    }

    /// Status request.
    pub async fn get(&self, call_id: &str) -> Value {
        self.req
            .request(&self.topics.call_get(call_id), json!({}), DEADLINE)
            .await
            .expect("get answered")
    }

    /// Cancel request.
    pub async fn cancel(&self, call_id: &str) -> Value {
        self.req
            .request(
                &self.topics.call_cancel(call_id),
                json!({"reason": "test"}),
                DEADLINE,
            )
            .await
            .expect("cancel answered")
    }

    /// Publishes raw bytes to a topic as a request with this kiosk's reply path in the
    /// MQTT 3.1.1 style (for malformed payloads the daemon cannot read a reply path from,
    /// nothing comes back).
    pub async fn raw(&self, topic: &str, payload: Vec<u8>) {
        self.req
            .link()
            .publish(topic, true, false, payload, None)
            .await
            .expect("publish");
    }
}

/// Every message seen on some filters, for assertions.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<Message>>>);

impl Seen {
    /// Messages on `topic`, in arrival order.
    pub fn on(&self, topic: &str) -> Vec<Message> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.topic == topic)
            .cloned()
            .collect()
    }
    /// The last JSON payload on `topic`.
    pub fn last_json(&self, topic: &str) -> Option<Value> {
        self.on(topic)
            .last()
            .and_then(|m| serde_json::from_slice(&m.payload).ok())
    }
    /// Every message.
    pub fn all(&self) -> Vec<Message> {
        self.0.lock().unwrap().clone()
    }
}

/// Subscribes a plain client to `filters` and records what arrives.
pub async fn watch(addr: SocketAddr, filters: Vec<String>) -> (Seen, Link) {
    let mut o = LinkOptions::new(url(addr), format!("watch-{}", free_port()));
    o.version = Version::V4;
    let (l, mut ev) = link(&o);
    let seen = Seen::default();
    let s = seen.clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let link2 = l.clone();
    tokio::spawn(async move {
        let mut b = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        loop {
            match ev.poll().await {
                Ok(LinkEvent::Connected { .. }) => {
                    let l = link2.clone();
                    let f = filters.clone();
                    tokio::spawn(async move { l.subscribe_many(&f).await });
                }
                Ok(LinkEvent::SubAck) => {
                    let _ = tx.send(());
                }
                Ok(LinkEvent::Message(m)) => s.0.lock().unwrap().push(m),
                Ok(_) => {}
                Err(e) if e.to_string().contains("Requests done") => break,
                Err(_) => tokio::time::sleep(b.next_delay()).await,
            }
        }
    });
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("watcher subscribed");
    (seen, l)
}

/// A courier handheld as the tests drive it: presence, location, job replies.
pub struct TestCourier {
    /// Courier id.
    pub id: String,
    /// Topics.
    pub topics: Topics,
    req: Requester,
    /// Jobs received.
    pub jobs: Arc<Mutex<Vec<Job>>>,
}

impl TestCourier {
    /// Connects, announces itself online with `vehicle` at (lat, lon).
    pub async fn online(
        addr: SocketAddr,
        site: &str,
        id: &str,
        vehicle: &str,
        lat: f64,
        lon: f64,
    ) -> Self {
        let topics = Topics::new(site).unwrap();
        let mut o = LinkOptions::new(url(addr), format!("courier-{id}"));
        o.will = Some(pickup_protocol::client::Will {
            topic: topics.courier_presence(id),
            payload: br#"{"state":"offline"}"#.to_vec(),
            retain: true,
            delay_s: None,
        });
        let (req, mut rx) = Requester::connect(
            o,
            topics.courier_replies(id),
            vec![topics.courier_job(id)],
            DEADLINE,
        )
        .await
        .expect("courier connects");
        let jobs: Arc<Mutex<Vec<Job>>> = Arc::default();
        let j = jobs.clone();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if let Ok(job) = serde_json::from_slice::<Job>(&m.payload) {
                    j.lock().unwrap().push(job);
                }
            }
        });
        let c = Self {
            id: id.into(),
            topics,
            req,
            jobs,
        };
        let presence = json!({
            "state": "online",
            "available": true,
            "name": format!("Courier {id}"),
            "vehicle": vehicle,
            "tel": "010-5555-0000",
        });
        c.req
            .link()
            .publish(
                &c.topics.courier_presence(id),
                true,
                true,
                serde_json::to_vec(&presence).unwrap(),
                None,
            )
            .await
            .unwrap();
        c.locate(lat, lon).await;
        c
    }

    /// Publishes presence (retained).
    pub async fn presence(&self, online: bool) {
        let state = if online { "online" } else { "offline" };
        self.req
            .link()
            .publish(
                &self.topics.courier_presence(&self.id),
                true,
                true,
                serde_json::to_vec(&json!({"state": state, "available": true})).unwrap(),
                None,
            )
            .await
            .unwrap();
    }

    /// Publishes a position.
    pub async fn locate(&self, lat: f64, lon: f64) {
        self.req
            .link()
            .publish(
                &self.topics.courier_location(&self.id),
                true,
                false,
                serde_json::to_vec(&json!({"lat": lat, "lon": lon})).unwrap(),
                None,
            )
            .await
            .unwrap();
    }

    /// Sends a job reply and waits for the answer.
    pub async fn reply(&self, body: Value) -> Value {
        self.req
            .request(&self.topics.courier_job_reply(&self.id), body, DEADLINE)
            .await
            .expect("job reply answered")
    }

    /// The last job received.
    pub fn last_job(&self) -> Option<Job> {
        self.jobs.lock().unwrap().last().cloned()
    }

    /// Waits for a job of `kind` about `call_id`.
    pub async fn wait_job(&self, kind: pickup_protocol::JobKind, call_id: &str) -> Job {
        let jobs = self.jobs.clone();
        let call = call_id.to_string();
        wait_until(
            &format!("{kind:?} job for {call_id} at {}", self.id),
            || {
                let jobs = jobs.clone();
                let call = call.clone();
                async move {
                    jobs.lock()
                        .unwrap()
                        .iter()
                        .any(|j| j.kind == kind && j.call_id.as_deref() == Some(call.as_str()))
                }
            },
        )
        .await;
        self.jobs
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|j| j.kind == kind && j.call_id.as_deref() == Some(call_id))
            .cloned()
            .unwrap()
    }
}

/// Debian's Mosquitto on a free loopback port, killed on drop.
pub struct Mosquitto {
    child: Child,
    /// Its address.
    pub addr: SocketAddr,
    /// Its config file, kept for [`Mosquitto::restart`].
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

/// Path of an installed program, or a panic that says how to install it.
pub fn require(program: &str, package: &str) -> PathBuf {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
        "/sbin",
        "/bin",
    ] {
        let p = Path::new(dir).join(program);
        if p.exists() {
            return p;
        }
    }
    panic!("{program} is not installed; these tests need it: apt-get install -y {package} (scripts/test does this)");
}

impl Mosquitto {
    /// Starts it (anonymous, no persistence, nodelay) and waits until it accepts TCP.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Like [`Mosquitto::start`], with persistence on as Debian ships it: a graceful
    /// stop saves sessions, queued and retained messages, and a restart brings them back.
    pub fn start_persistent() -> Self {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let persistence = if persistent {
            // `user root`: started as root, Mosquitto would switch to its own user,
            // which cannot write into the test's private temp dir (no effect otherwise).
            format!(
                "persistence true\npersistence_location {}/\nuser root\n",
                dir.path().display()
            )
        } else {
            "persistence false\n".to_string()
        };
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\n{persistence}set_tcp_nodelay true\nmax_queued_messages 100000\n"
            ),
        )
        .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Self::spawn(&conf, addr);
        Self {
            child,
            addr,
            conf,
            _dir: dir,
        }
    }

    fn spawn(conf: &Path, addr: SocketAddr) -> Child {
        let bin = require("mosquitto", "mosquitto");
        let child = Command::new(bin)
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        let end = Instant::now() + DEADLINE;
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < end, "mosquitto did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    /// SIGKILL: the broker vanishes without a goodbye, and with persistence off its
    /// sessions, queued messages and retained messages go with it (a broker crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait: a graceful stop (a persistent broker saves its state).
    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same settings (after
    /// [`Mosquitto::kill`] or [`Mosquitto::terminate`]; kills it first if still running).
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.conf, self.addr);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens the daemon's database read-only (to check what is durable).
pub fn open_db(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

/// Path of a workspace binary (`pickupd`, `pickupctl`, `courier-agent`, `pickup-broker`)
/// built next to this test. `cargo test --workspace` builds them before any test runs;
/// a lone `cargo test -p pickup-e2e` may not, and then this says what to run.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-… → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable sits in target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins, or run scripts/test)",
        p.display()
    );
    p
}

/// A daemon process (the real `pickupd` binary) with a config file in `dir`; killed on
/// drop if still running.
pub struct DaemonProcess {
    /// The child.
    pub child: Child,
    /// Config file.
    pub config: PathBuf,
}

impl DaemonProcess {
    /// Writes `toml` to `dir/pickupd.toml` and starts `pickupd --config` on it, with its
    /// log in `dir/pickupd.log` (appended across restarts).
    pub fn spawn(dir: &Path, toml: &str) -> Self {
        Self::spawn_env(dir, toml, &[])
    }

    /// [`DaemonProcess::spawn`] with extra environment variables.
    pub fn spawn_env(dir: &Path, toml: &str, env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let config = dir.join("pickupd.toml");
        std::fs::write(&config, toml).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("pickupd.log"))
            .unwrap();
        let child = Command::new(workspace_bin("pickupd"))
            .arg("--config")
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .env("RUST_LOG", "info,rumqttd=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("pickupd starts");
        Self { child, config }
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        self.child.wait().unwrap()
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal config file for a daemon process: site `test`, the database at `db`, the
/// embedded broker on `port` (or an external broker when `external` is set).
pub fn process_toml(db: &Path, port: u16, external: Option<SocketAddr>) -> String {
    let mut s = format!(
        "site = \"test\"\n[store]\npath = \"{}\"\n[mqtt]\nreconnect_max_ms = 500\n",
        db.display()
    );
    match external {
        Some(a) => s.push_str(&format!("url = \"mqtt://{a}\"\n")),
        None => s.push_str(&format!("[broker]\nlisten = \"127.0.0.1:{port}\"\n")),
    }
    s
}
