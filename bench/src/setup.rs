//! What the benchmark starts: the daemon (in this process on its own runtime, or as a
//! child process of this binary for clean memory and start-up figures), and Mosquitto.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pickupd::config::Config;

/// Which broker the clients and the daemon use.
#[derive(Debug, Clone)]
pub enum BrokerChoice {
    /// The daemon's embedded rumqttd; `nodelay` is its `broker.tcp_nodelay`.
    Embedded {
        /// TCP_NODELAY on accepted connections.
        nodelay: bool,
        /// The daemon's connections (and the echo responder's) in process
        /// (`mqtt.in_process`), else over the loopback listener.
        in_process: bool,
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
            Self::Embedded {
                nodelay,
                in_process,
            } => format!(
                "embedded rumqttd, tcp_nodelay = {nodelay}, daemon {}",
                if *in_process {
                    "in process"
                } else {
                    "over loopback TCP"
                }
            ),
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
    // (20/s by default) and open-call limit would measure the limits, not the daemon.
    // Every other admission limit (queues, breaker) stays as configured by default.
    c.admission.per_client_rate = 1e6;
    c.admission.per_client_burst = 1e6;
    c.limits.max_open_per_kiosk = 0;
    if let BrokerChoice::Embedded {
        nodelay,
        in_process,
    } = broker
    {
        c.broker.tcp_nodelay = *nodelay;
        c.mqtt.in_process = *in_process;
    }
    if let Some(u) = url {
        c.mqtt.url = u.to_string();
    }
    c
}

/// Mosquitto on a free loopback port, killed on drop.
pub struct Mosquitto {
    child: Child,
    /// Its config file, removed on drop.
    conf: PathBuf,
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
        Ok(Self { child, conf, addr })
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
        let _ = std::fs::remove_file(&self.conf);
    }
}

/// The daemon as a child process of this binary (`pickup-bench daemon-child`), for
/// memory and start-up figures that contain nothing but the daemon.
pub struct DaemonChild {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Option<std::io::Lines<BufReader<std::process::ChildStdout>>>,
    log: Option<PathBuf>,
    spawned: Instant,
    /// Where its clients connect.
    pub addr: SocketAddr,
    /// Milliseconds from the child's `main` to READY, as the child measured it.
    pub ready_ms_inside: f64,
    /// Milliseconds from spawning it to reading its READY line.
    pub ready_ms_outside: f64,
}

/// What the daemon child's allocator reported after `malloc_trim`.
pub struct Trimmed {
    /// How long `malloc_trim` took, in milliseconds.
    pub ms: f64,
    /// Bytes allocated and not freed (glibc `mallinfo2`: `uordblks` + `hblkhd`), in MiB.
    pub heap_in_use_mib: f64,
    /// Bytes the allocator holds from the system (`arena` + `hblkhd`), in MiB.
    pub heap_held_mib: f64,
}

const MIB: f64 = 1024.0 * 1024.0;

impl DaemonChild {
    /// Starts the child on `db` and waits for its READY line.
    pub fn spawn(
        site: &str,
        db: &Path,
        url: Option<&str>,
        log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        // PICKUP_BENCH_CHILD_PREFIX runs the child under a profiler, e.g.
        // "valgrind --tool=massif --massif-out-file=/tmp/massif.out".
        let prefix: Vec<String> = std::env::var("PICKUP_BENCH_CHILD_PREFIX")
            .map(|p| p.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let mut cmd = match prefix.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(exe);
                c
            }
            None => Command::new(exe),
        };
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
        let lines = Some(lines);
        let ready_ms_outside = t0.elapsed().as_secs_f64() * 1e3;
        // READY <ms> <addr>
        let mut f = line.split_whitespace();
        let (Some("READY"), Some(ms), Some(addr)) = (f.next(), f.next(), f.next()) else {
            anyhow::bail!("unexpected line from the daemon child: {line}");
        };
        Ok(Self {
            stdin: child.stdin.take(),
            lines,
            log: log.map(Path::to_path_buf),
            spawned: t0,
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

    /// Waits until its log holds a line containing `what`; returns the time since the
    /// spawn, or `None` after `max`.
    pub fn wait_log(&self, what: &str, max: Duration) -> Option<Duration> {
        let log = self.log.as_ref()?;
        let end = Instant::now() + max;
        while Instant::now() < end {
            if std::fs::read_to_string(log).is_ok_and(|s| s.contains(what)) {
                return Some(self.spawned.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Asks it to hand free heap pages back to the system (glibc `malloc_trim`) and waits
    /// until it has.
    pub fn trim(&mut self) -> anyhow::Result<Trimmed> {
        if let Some(s) = self.stdin.as_mut() {
            s.write_all(b"trim\n")?;
            s.flush()?;
        }
        if let Some(lines) = self.lines.as_mut() {
            for l in lines.by_ref() {
                if let Some(rest) = l?.trim().strip_prefix("TRIMMED ") {
                    let f: Vec<f64> = rest
                        .split_whitespace()
                        .map(str::parse)
                        .collect::<Result<_, _>>()?;
                    if let [ms, in_use, held] = f[..] {
                        return Ok(Trimmed {
                            ms,
                            heap_in_use_mib: in_use / MIB,
                            heap_held_mib: held / MIB,
                        });
                    }
                    anyhow::bail!("the daemon child's trim reply is malformed: {rest:?}");
                }
            }
        }
        anyhow::bail!("the daemon child stopped before trimming")
    }

    /// Messages published, couriers online and store jobs done so far.
    pub fn stats(&mut self) -> anyhow::Result<(u64, u64, u64)> {
        if let Some(s) = self.stdin.as_mut() {
            s.write_all(b"stats\n")?;
            s.flush()?;
        }
        let lines = self
            .lines
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("daemon child has no stdout"))?;
        for l in lines.by_ref() {
            let l = l?;
            let mut f = l.split_whitespace();
            if f.next() == Some("STATS") {
                let mut n = || f.next().and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
                return Ok((n(), n(), n()));
            }
        }
        anyhow::bail!("daemon child closed its stdout")
    }

    /// Waits until the daemon has stopped publishing and writing (no publish and at most
    /// the heartbeat's store job per 250 ms, for `quiet`), or `max` has passed; returns
    /// how long that took.
    pub fn wait_idle(&mut self, quiet: Duration, max: Duration) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let mut last = self.stats()?;
        let mut since = Instant::now();
        while t0.elapsed() < max {
            std::thread::sleep(Duration::from_millis(250));
            let now = self.stats()?;
            if now.0 != last.0 || now.2 > last.2 + 1 {
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                break;
            }
            last = now;
        }
        Ok(t0.elapsed())
    }

    /// Asks it to stop (closes its stdin) and waits for it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"stop\n");
        }
        let end = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Its log is kept only when it did not stop cleanly.
                if status.success() {
                    if let Some(log) = &self.log {
                        let _ = std::fs::remove_file(log);
                    }
                }
                return Ok(());
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                anyhow::bail!("daemon child did not stop within 90 s");
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
        None => BrokerChoice::Embedded {
            nodelay: true,
            in_process: true,
        },
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
        // Commands on stdin, read off the runtime's workers: "stop" (or EOF), "trim",
        // "stats".
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            let mut s = String::new();
            let stdin = std::io::stdin();
            loop {
                s.clear();
                match stdin.read_line(&mut s) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if tx.send(s.trim().to_string()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        while let Some(cmd) = rx.recv().await {
            match cmd.as_str() {
                "stop" => break,
                "trim" => {
                    // Hands free heap pages back to the system, so that the resident set
                    // shows what is live rather than what the allocator keeps.
                    // SAFETY: malloc_trim only walks the allocator's own free lists.
                    let t0 = Instant::now();
                    unsafe { libc::malloc_trim(0) };
                    let ms = t0.elapsed().as_secs_f64() * 1e3;
                    // What the allocator holds against what is allocated from it: the
                    // difference is free space it cannot give back (fragmentation).
                    // SAFETY: mallinfo2 only reads the allocator's counters, under its locks.
                    let mi = unsafe { libc::mallinfo2() };
                    println!(
                        "TRIMMED {ms:.3} {} {}",
                        mi.uordblks + mi.hblkhd,
                        mi.arena + mi.hblkhd
                    );
                }
                "stats" => println!(
                    "STATS {} {} {}",
                    running.publisher_stats.published.load(Ordering::Relaxed),
                    running.stats.couriers_online.load(Ordering::Relaxed),
                    running.writer_stats.jobs.load(Ordering::Relaxed),
                ),
                _ => {}
            }
        }
        running.shutdown(Duration::from_secs(60)).await
    })
}
