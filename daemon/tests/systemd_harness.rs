//! Plays systemd for the real `pickupd` binary: a unix datagram socket as NOTIFY_SOCKET,
//! WATCHDOG_USEC set, and signals. Checks READY only when clients can connect, STATUS
//! lines, watchdog pings at half the period (and none while a loop hangs), SIGHUP reload,
//! STOPPING and a clean exit on SIGTERM.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Datagrams from the daemon with their arrival time.
struct Systemd {
    rx: mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
}

impl Systemd {
    fn bind(path: &Path) -> Self {
        let sock = UnixDatagram::bind(path).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send((Instant::now(), msg)).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a datagram containing `needle`; returns its arrival time.
    fn wait_for(&mut self, needle: &str) -> Instant {
        if let Some((t, _)) = self.seen.iter().find(|(_, m)| m.contains(needle)) {
            return *t;
        }
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((t, m)) => {
                    let hit = m.contains(needle);
                    self.seen.push((t, m));
                    if hit {
                        return t;
                    }
                }
                Err(_) => panic!("no {needle:?} from the daemon; got {:?}", self.seen),
            }
        }
    }

    /// Collects everything that arrives within `d`.
    fn collect(&mut self, d: Duration) -> Vec<(Instant, String)> {
        let end = Instant::now() + d;
        let mut out = Vec::new();
        while let Ok((t, m)) = self
            .rx
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            self.seen.push((t, m.clone()));
            out.push((t, m));
        }
        out
    }
}

struct Daemon {
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

fn write_config(dir: &Path, port: u16, extra: &str) -> PathBuf {
    let p = dir.join("pickupd.toml");
    let mut f = std::fs::File::create(&p).unwrap();
    write!(
        f,
        "site = \"test\"\n{extra}\n[store]\npath = \"{}\"\n[broker]\nlisten = \"127.0.0.1:{port}\"\n",
        dir.join("p.db").display()
    )
    .unwrap();
    p
}

fn start(
    dir: &Path,
    config: &Path,
    notify: &Path,
    watchdog_usec: u64,
    stall: Option<&Path>,
) -> Daemon {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pickupd"));
    cmd.arg("--config")
        .arg(config)
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", watchdog_usec.to_string())
        .env("RUST_LOG", "info,rumqttd=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).unwrap());
    if let Some(s) = stall {
        cmd.env("PICKUPD_TEST_STALL_FILE", s);
    }
    Daemon {
        child: cmd.spawn().unwrap(),
    }
}

#[test]
fn ready_status_watchdog_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let sock = dir.path().join("notify.sock");
    let mut sd = Systemd::bind(&sock);
    let mut d = start(dir.path(), &config, &sock, 1_000_000, None);

    sd.wait_for("READY=1");
    // A client connecting right after READY succeeds.
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).expect("broker accepts after READY");
    sd.wait_for("STATUS=calls dispatching: 0, couriers online: 0, outbox backlog: ");
    sd.wait_for("broker: connected, status reads: connected");

    // WATCHDOG_USEC = 1 s → pings every 0.5 s.
    let first = sd.wait_for("WATCHDOG=1");
    let pings: Vec<Instant> = sd
        .collect(Duration::from_millis(2_600))
        .into_iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .map(|(t, _)| t)
        .collect();
    assert!(
        (4..=7).contains(&pings.len()),
        "expected about 5 pings in 2.6 s at 0.5 s, got {} (first at {:?})",
        pings.len(),
        first
    );

    signal(&d.child, libc::SIGTERM);
    sd.wait_for("STOPPING=1");
    let status = d.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn a_hung_loop_stops_the_pings() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let sock = dir.path().join("notify.sock");
    let stall = dir.path().join("stall");
    let mut sd = Systemd::bind(&sock);
    let _d = start(dir.path(), &config, &sock, 1_000_000, Some(&stall));
    sd.wait_for("READY=1");
    sd.wait_for("WATCHDOG=1");
    sd.collect(Duration::from_millis(600));
    // Hang the dispatch loop: it beats no more; after the heartbeat max age (5 s) the
    // pings must stop within one watchdog period.
    std::fs::write(&stall, b"").unwrap();
    let hung_at = Instant::now();
    let msgs = sd.collect(Duration::from_secs(9));
    let pings: Vec<Duration> = msgs
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .map(|(t, _)| t.duration_since(hung_at))
        .collect();
    let last = pings.last().copied().unwrap_or_default();
    assert!(
        last < Duration::from_millis(5_000 + 1_000 + 500),
        "pings went on after the loop hung: {pings:?}"
    );
    assert!(
        !msgs
            .iter()
            .any(|(t, m)| m.contains("WATCHDOG=1")
                && t.duration_since(hung_at) > Duration::from_secs(7)),
        "pings resumed while hung"
    );
    // Released: pings resume.
    std::fs::remove_file(&stall).unwrap();
    sd.collect(Duration::from_millis(100));
    let resumed = sd.rx.recv_timeout(DEADLINE).expect("pings resume");
    let _ = resumed;
}

#[test]
fn sighup_reloads_live_settings_and_names_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let sock = dir.path().join("notify.sock");
    let mut sd = Systemd::bind(&sock);
    let d = start(dir.path(), &config, &sock, 0, None);
    sd.wait_for("READY=1");
    // A change of the radius applies live; a change of the site needs a restart.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap().replace(
            "site = \"test\"",
            "site = \"other\"\n[dispatch]\nradius_m = 123.0",
        ),
    )
    .unwrap();
    signal(&d.child, libc::SIGHUP);
    sd.wait_for("RELOADING=1");
    sd.wait_for("restart needed for: site");
    let log_path = dir.path().join("log");
    let end = Instant::now() + DEADLINE;
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("settings reloaded") && log.contains("radius_m=123") {
            assert!(log.contains("needs_restart=site"), "{log}");
            break;
        }
        assert!(Instant::now() < end, "reload not logged: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The radius set by a reload is the one the next assignment uses.
#[test]
fn sighup_radius_decides_the_next_assignment() {
    use pickup_protocol::client::{link, BrokerUrl, LinkOptions, Requester};
    use serde_json::json;

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let sock = dir.path().join("notify.sock");
    let mut sd = Systemd::bind(&sock);
    let d = start(dir.path(), &config, &sock, 0, None);
    sd.wait_for("READY=1");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = BrokerUrl {
        host: "127.0.0.1".into(),
        port,
    };
    let reload = |radius: &str, sd: &mut Systemd| {
        let text = std::fs::read_to_string(&config).unwrap();
        let base = text.split("[dispatch]").next().unwrap().to_string();
        std::fs::write(&config, format!("{base}[dispatch]\nradius_m = {radius}\n")).unwrap();
        let before = sd.seen.len();
        signal(&d.child, libc::SIGHUP);
        // READY=1 after RELOADING=1 means the reload was applied.
        let end = Instant::now() + DEADLINE;
        loop {
            sd.collect(Duration::from_millis(50));
            let after: Vec<&String> = sd.seen[before..].iter().map(|(_, m)| m).collect();
            if let Some(i) = after.iter().position(|m| m.contains("RELOADING=1")) {
                if after[i..].iter().any(|m| m.contains("READY=1")) {
                    break;
                }
            }
            assert!(Instant::now() < end, "no reload");
        }
    };
    reload("100.0", &mut sd);
    rt.block_on(async {
        // A courier about 560 m from the pickup point.
        let (courier, mut ev) = link(&LinkOptions::new(url.clone(), "courier-k1"));
        tokio::spawn(async move { while ev.poll().await.is_ok() {} });
        courier
            .publish(
                "pickup/v1/test/couriers/k1/presence",
                true,
                true,
                br#"{"state":"online","available":true,"vehicle":"car"}"#.to_vec(),
                None,
            )
            .await
            .unwrap();
        courier
            .publish(
                "pickup/v1/test/couriers/k1/location",
                true,
                false,
                br#"{"lat":37.505,"lon":127.0}"#.to_vec(),
                None,
            )
            .await
            .unwrap();
        let (kiosk, _rx) = Requester::connect(
            LinkOptions::new(url.clone(), "kiosk-k"),
            "pickup/v1/test/kiosks/k/replies".into(),
            vec![],
            DEADLINE,
        )
        .await
        .unwrap();
        let a = kiosk
            .request(
                "pickup/v1/test/calls/create",
                json!({"request_id":"r1","tel":"010-1234-5678","location":{"lat":37.5,"lon":127.0},"parcel":{"class":"light"}}),
                DEADLINE,
            )
            .await
            .unwrap();
        let id = a["call"]["call_id"].as_str().unwrap().to_string();
        // Give the courier's reports time to land, then: still waiting (radius 100 m).
        let end = Instant::now() + Duration::from_secs(1);
        while Instant::now() < end {
            let g = kiosk
                .request(&format!("pickup/v1/test/calls/{id}/get"), json!({}), DEADLINE)
                .await
                .unwrap();
            assert_eq!(g["call"]["status"], "dispatching", "{g}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        id
    });
    reload("5000.0", &mut sd);
    rt.block_on(async {
        let (kiosk, _rx) = Requester::connect(
            LinkOptions::new(url.clone(), "kiosk-k2"),
            "pickup/v1/test/kiosks/k2/replies".into(),
            vec![],
            DEADLINE,
        )
        .await
        .unwrap();
        let end = Instant::now() + DEADLINE;
        loop {
            let n: i64 = rusqlite::Connection::open(dir.path().join("p.db"))
                .unwrap()
                .query_row(
                    "SELECT count(*) FROM calls WHERE status = 'assigned'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            if n == 1 {
                break;
            }
            assert!(
                Instant::now() < end,
                "not assigned after widening the radius"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(kiosk);
    });
}
