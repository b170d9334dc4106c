//! What the benchmark starts: the daemon (in this process on its own runtime, or as a
//! child process of this binary for clean memory and start-up figures), and Mosquitto.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use pickupd::config::Config;

/// Which broker the clients and the daemon use.
#[derive(Debug, Clone)]
pub enum BrokerChoice {
    /// The daemon's embedded rumqttd; `nodelay` is its `broker.tcp_nodelay`.
    Embedded {
        /// TCP_NODELAY on accepted connections.
        nodelay: bool,
    },
    /// Debian's Mosquitto, started by the benchmark.
    Mosquitto {
        /// `set_tcp_nodelay`.
        nodelay: bool,
    },
    /// A broker someone else runs.
    External(String),
}

impl BrokerChoice {
    /// Short description for reports.
    pub fn describe(&self) -> String {
        match self {
            Self::Embedded { nodelay } => format!("embedded rumqttd, tcp_nodelay = {nodelay}"),
            Self::Mosquitto { nodelay } => {
                format!("mosquitto (started by the benchmark), set_tcp_nodelay {nodelay}")
            }
            Self::External(u) => format!("external broker {u}"),
        }
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Settings for the daemon under test: everything default except the site (unique per
/// run), the database file, and where the broker is.
pub fn daemon_config(site: &str, db: &Path, broker: &BrokerChoice, url: Option<&str>) -> Config {
    let mut c = Config {
        site: site.into(),
        ..Config::default()
    };
    c.store.path = db.to_path_buf();
    c.broker.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    c.broker.max_connections = 4096;
    c.mqtt.client_id = format!("pickupd-{site}");
    c.mqtt.reconnect_max_ms = 500;
    // The benchmark's few kiosk clients stand for many kiosks: the per-kiosk rate limit
    // (20/s by default) would measure the limit, not the daemon. Every other admission
    // limit (queues, breaker) stays as configured by default.
    c.admission.per_client_rate = 1e6;
    c.admission.per_client_burst = 1e6;
    if let BrokerChoice::Embedded { nodelay } = broker {
        c.broker.tcp_nodelay = *nodelay;
    }
    if let Some(u) = url {
        c.mqtt.url = u.to_string();
    }
    c
}

/// Mosquitto on a free loopback port, killed on drop.
pub struct Mosquitto {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Mosquitto {
    /// Starts `/usr/sbin/mosquitto` (anonymous, no persistence, large queues) with its
    /// config in `dir`, and waits until it accepts TCP.
    pub fn start(dir: &Path, nodelay: bool) -> anyhow::Result<Self> {
        let bin = [
            "/usr/sbin/mosquitto",
            "/usr/bin/mosquitto",
            "/usr/local/sbin/mosquitto",
        ]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--mosquitto: mosquitto is not installed (apt-get install -y mosquitto)"
            )
        })?;
        let port = free_port()?;
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 set_tcp_nodelay {nodelay}\nmax_queued_messages 100000\nmax_inflight_messages 100\n"
            ),
        )?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let end = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > end {
                anyhow::bail!("mosquitto did not listen on {addr} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Self { child, addr })
    }

    /// Its process id (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon as a child process of this binary (`pickup-bench daemon-child`), for
/// memory and start-up figures that contain nothing but the daemon.
pub struct DaemonChild {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Where its clients connect.
    pub addr: SocketAddr,
    /// Milliseconds from the child's `main` to READY, as the child measured it.
    pub ready_ms_inside: f64,
    /// Milliseconds from spawning it to reading its READY line.
    pub ready_ms_outside: f64,
}

impl DaemonChild {
    /// Starts the child on `db` and waits for its READY line.
    pub fn spawn(
        site: &str,
        db: &Path,
        url: Option<&str>,
        log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("daemon-child")
            .arg("--site")
            .arg(site)
            .arg("--db")
            .arg(db);
        if let Some(u) = url {
            cmd.arg("--url").arg(u);
        }
        if let Some(l) = log {
            cmd.arg("--log").arg(l);
        }
        let t0 = Instant::now();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("child has no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .next()
            .ok_or_else(|| anyhow::anyhow!("daemon child exited before READY"))??;
        let ready_ms_outside = t0.elapsed().as_secs_f64() * 1e3;
        // READY <ms> <addr>
        let mut f = line.split_whitespace();
        let (Some("READY"), Some(ms), Some(addr)) = (f.next(), f.next(), f.next()) else {
            anyhow::bail!("unexpected line from the daemon child: {line}");
        };
        Ok(Self {
            stdin: child.stdin.take(),
            child,
            addr: addr.parse()?,
            ready_ms_inside: ms.parse()?,
            ready_ms_outside,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks it to stop (closes its stdin) and waits for it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"stop\n");
        }
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                anyhow::bail!("daemon child did not stop within 15 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DaemonChild {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The child's side: runs the daemon, prints `READY <ms since main> <addr>`, and stops
/// when its stdin closes or says `stop`.
pub fn run_child(started: Instant, site: &str, db: &Path, url: Option<&str>) -> anyhow::Result<()> {
    let broker = match url {
        Some(u) => BrokerChoice::External(u.into()),
        None => BrokerChoice::Embedded { nodelay: true },
    };
    let cfg = daemon_config(site, db, &broker, url);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pickupd-rt")
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let running = pickupd::app::start(cfg).await?;
        let mut ready = running.ready.clone();
        tokio::time::timeout(Duration::from_secs(60), ready.wait_for(|r| *r)).await??;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        println!("READY {ms:.2} {}", running.broker_addr);
        // Wait for "stop" or EOF on stdin, off the runtime's workers.
        let _ = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let stdin = std::io::stdin();
            loop {
                s.clear();
                match stdin.read_line(&mut s) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if s.trim() == "stop" => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        running.shutdown(Duration::from_secs(5)).await
    })
}
