//! Test fixtures: a real mosquitto on a free loopback port, an MQTT client playing the
//! daemon, the agent binary as a child process, and a gate that holds client connections
//! back while a test gets ready.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pickup_protocol::client::{link, Backoff, BrokerUrl, Link, LinkEvent, LinkOptions};
use tokio::sync::Notify;

/// How long any condition in these tests may take.
pub const DEADLINE: Duration = Duration::from_secs(15);

fn mosquitto_binary() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("mosquitto"))
                .collect()
        })
        .unwrap_or_default();
    candidates.push("/usr/sbin/mosquitto".into());
    candidates.push("/usr/local/sbin/mosquitto".into());
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "mosquitto not found: these tests need a real broker. Install it with \
                 `apt-get install -y mosquitto mosquitto-clients`"
            )
        })
}

/// A free loopback port (bind port 0, read it, release it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Polls `cond` until it holds or the deadline passes.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Async flavour of [`wait_until`].
pub async fn wait_until_async(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A mosquitto process on a loopback port; killed on drop.
pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts mosquitto on a free port and waits until it accepts connections.
    pub fn start() -> Self {
        let mut m = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        m.restart();
        m
    }

    /// `mqtt://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Kills the broker (abruptly: clients see their connections drop).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)starts the broker on the same port; waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n",
                self.port
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).unwrap();
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let end = Instant::now() + DEADLINE;
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                let log = std::fs::read_to_string(self.dir.path().join("mosquitto.log"))
                    .unwrap_or_default();
                panic!("mosquitto exited with {status}: {log}");
            }
            assert!(Instant::now() < end, "mosquitto did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A message the watcher saw.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub json: serde_json::Value,
    pub retain: bool,
}

/// An MQTT client playing the daemon: subscribes, records everything, publishes.
pub struct Watcher {
    link: Link,
    msgs: Arc<Mutex<Vec<Msg>>>,
    subacks: Arc<AtomicUsize>,
    notify: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Connects to the broker on `port`, subscribes to `filters` (again after every
    /// reconnect) and waits for the first SUBACK.
    pub async fn start(port: u16, filters: &[String]) -> Self {
        let url = BrokerUrl::parse(&format!("127.0.0.1:{port}")).unwrap();
        let id = format!("test-daemon-{}", rand::random::<u32>());
        let opts = LinkOptions::new(url, id);
        let (link, mut events) = link(&opts);
        let msgs: Arc<Mutex<Vec<Msg>>> = Arc::default();
        let subacks = Arc::new(AtomicUsize::new(0));
        let notify = Arc::new(Notify::new());
        let filters = filters.to_vec();
        let (l2, m2, s2, n2) = (link.clone(), msgs.clone(), subacks.clone(), notify.clone());
        let task = tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
            loop {
                match events.poll().await {
                    Ok(LinkEvent::Connected { .. }) => {
                        backoff.reset();
                        let _ = l2.subscribe_many(&filters).await;
                    }
                    Ok(LinkEvent::SubAck) => {
                        s2.fetch_add(1, Ordering::SeqCst);
                        n2.notify_waiters();
                    }
                    Ok(LinkEvent::Message(m)) => {
                        let json =
                            serde_json::from_slice(&m.payload).unwrap_or(serde_json::Value::Null);
                        m2.lock().unwrap().push(Msg {
                            topic: m.topic,
                            json,
                            retain: m.retain,
                        });
                        n2.notify_waiters();
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(backoff.next_delay()).await,
                }
            }
        });
        let w = Self {
            link,
            msgs,
            subacks,
            notify,
            task,
        };
        w.wait_subscribed(1).await;
        w
    }

    /// Waits until `n` SUBACKs have arrived in total (one per (re)connection).
    pub async fn wait_subscribed(&self, n: usize) {
        let s = self.subacks.clone();
        wait_until_async("the watcher's subscription", || {
            s.load(Ordering::SeqCst) >= n
        })
        .await;
    }

    /// SUBACKs so far.
    pub fn subscriptions(&self) -> usize {
        self.subacks.load(Ordering::SeqCst)
    }

    /// Everything seen so far.
    pub fn all(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().clone()
    }

    /// Waits for a message satisfying `pred` (including ones already seen).
    pub async fn wait(&self, what: &str, pred: impl Fn(&Msg) -> bool) -> Msg {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            let notified = self.notify.notified();
            if let Some(m) = self.msgs.lock().unwrap().iter().find(|m| pred(m)) {
                return m.clone();
            }
            if tokio::time::timeout_at(end, notified).await.is_err() {
                let seen: Vec<String> = self
                    .all()
                    .iter()
                    .map(|m| format!("{} {}", m.topic, m.json))
                    .collect();
                panic!("timed out waiting for {what}; seen:\n{}", seen.join("\n"));
            }
        }
    }

    /// Publishes a JSON payload with QoS 1.
    pub async fn publish(&self, topic: &str, payload: &serde_json::Value, retain: bool) {
        self.link
            .publish(
                topic,
                true,
                retain,
                serde_json::to_vec(payload).unwrap(),
                None,
            )
            .await
            .unwrap();
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The agent binary as a child process, with its output collected line by line.
pub struct AgentProc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn collect(r: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let l2 = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            l2.lock().unwrap().push(line);
        }
    });
    lines
}

impl AgentProc {
    /// Starts `courier-agent` with `args`; stdin stays open for commands.
    pub fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_courier-agent"))
            .args(args)
            .env("COURIER_AGENT_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start courier-agent");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Self {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
        }
    }

    /// Types a command line.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Output so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits for an output line satisfying `pred`.
    pub fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(l) = self.stdout.lock().unwrap().iter().find(|l| pred(l)) {
                return l.clone();
            }
            if Instant::now() > end {
                panic!(
                    "timed out waiting for {what}; stdout:\n{}\nstderr:\n{}",
                    self.stdout().join("\n"),
                    self.stderr.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: no cleanup, the broker must publish the last will.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM.
    pub fn terminate(&mut self) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "could not send SIGTERM to {pid}");
    }

    /// Waits for the process to exit on its own; returns whether it succeeded.
    pub fn wait_exit(&mut self) -> bool {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.success();
            }
            assert!(Instant::now() < end, "courier-agent did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Closes stdin (end of input).
    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP forwarder in front of the broker that can refuse connections: lets a test decide
/// that the agent reconnects only after the test's own client has resubscribed.
pub struct Gate {
    pub port: u16,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// Forwards `127.0.0.1:<port>` to the broker on `upstream`; starts open.
    pub async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let o2 = open.clone();
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let c2 = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !o2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let conn = tokio::spawn(async move {
                    let _ = inbound.set_nodelay(true);
                    if let Ok(mut up) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    {
                        let _ = up.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut up).await;
                    }
                });
                c2.lock().unwrap().push(conn);
            }
        });
        Self {
            port,
            open,
            conns,
            task,
        }
    }

    /// `mqtt://127.0.0.1:<gate port>`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Lets new connections through (or not).
    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }

    /// Drops every connection through the gate (both sides see the link die), like a
    /// handheld losing coverage while the broker stays up.
    pub fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Lines of a file ("" when absent).
pub fn file_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}
