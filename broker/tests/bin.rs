//! The standalone `pickup-broker` binary as a real process.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pickup-broker");

/// Kills the process if a test fails half-way.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the "listening" line and returns the v4 (and v5) addresses.
fn listening(p: &mut Proc) -> (SocketAddr, Option<SocketAddr>) {
    let out = p.0.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).unwrap();
    let mut v4 = None;
    let mut v5 = None;
    for word in line.split_whitespace() {
        if let Some(a) = word.strip_prefix("v4=") {
            v4 = Some(a.parse().unwrap());
        }
        if let Some(a) = word.strip_prefix("v5=") {
            v5 = Some(a.parse().unwrap());
        }
    }
    (
        v4.unwrap_or_else(|| panic!("no v4 address in {line:?}")),
        v5,
    )
}

/// Waits for the process to exit, with a deadline.
fn wait_exit(p: &mut Proc) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "pickup-broker did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts the binary with `args`, its stdout piped for [`listening`].
fn start(args: &[&str]) -> Proc {
    Proc(
        Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// An MQTT 3.1.1 CONNECT with a clean session and no credentials; answers the connection
/// and the CONNACK code.
fn mqtt_session(addr: SocketAddr) -> std::io::Result<(std::net::TcpStream, u8)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut pkt = vec![0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10, 0, 2];
    pkt.extend_from_slice(b"t1");
    s.write_all(&pkt)?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)?;
    assert_eq!(ack[0], 0x20);
    Ok((s, ack[3]))
}

/// The CONNACK code a CONNECT gets (see [`mqtt_session`]).
fn mqtt_connect(addr: SocketAddr) -> std::io::Result<u8> {
    mqtt_session(addr).map(|(_, code)| code)
}

fn sigterm(p: &Proc) {
    let pid = libc::pid_t::try_from(p.0.id()).unwrap();
    // SAFETY: sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

#[test]
fn runs_serves_and_stops_on_sigterm() {
    let mut p = start(&["--listen", "127.0.0.1:0", "--listen-v5", "127.0.0.1:0"]);
    let (v4, v5) = listening(&mut p);
    assert_ne!(v4.port(), 0);
    assert!(v5.is_some());
    assert_eq!(mqtt_connect(v4).unwrap(), 0);

    sigterm(&p);
    let status = wait_exit(&mut p);
    assert!(status.success(), "{status}");
    // The port was released.
    std::net::TcpListener::bind(v4).unwrap();
}

#[test]
fn config_file_is_read_and_listen_flag_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        "[broker]\nlisten = \"127.0.0.1:1\"\nmax_payload = 4096\n[broker.users]\nkiosk = \"pw\"\n",
    )
    .unwrap();
    let config = path.to_str().unwrap();
    let mut p = start(&["--config", config, "--listen", "127.0.0.1:0"]);
    let (v4, _) = listening(&mut p);
    assert_ne!(v4.port(), 1);
    // Users are configured, so an anonymous CONNECT is refused (rumqttd closes the
    // connection without a CONNACK).
    assert!(mqtt_connect(v4).is_err());
    sigterm(&p);
    assert!(wait_exit(&mut p).success());
}

#[test]
fn a_bad_config_value_is_reported_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, "[broker]\nsegment_count = 0\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broker.segment_count"), "{err}");

    std::fs::write(&path, "[broker]\nlisten = 7\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen"), "{err}");
}

#[test]
fn default_config_prints_and_reads_back() {
    let out = Command::new(BIN)
        .arg("--print-default-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[broker]"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("default.toml");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A program from a Debian package the tests need (scripts/test installs them).
fn require(program: &str, package: &str) -> std::path::PathBuf {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin"]
        .iter()
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "{program} is not installed: apt-get install -y {package} (scripts/test does this)"
            )
        })
}

/// A third-party client (`mosquitto_sub`) subscribing with a wildcard gets every retained
/// message the filter matches, at QoS 0 and at QoS 1, though they are more than one
/// in-flight window (200 and 100 by default): rumqttd as published sent the first window
/// and dropped the rest.
#[test]
fn mosquitto_sub_gets_every_retained_message_beyond_a_window() {
    use std::io::Read;
    let sub_bin = require("mosquitto_sub", "mosquitto-clients");
    let mut p = start(&["--listen", "127.0.0.1:0"]);
    let (v4, _) = listening(&mut p);

    // Publish n retained messages at QoS 0, then one at QoS 1: its PUBACK comes after the
    // router has stored everything before it on this connection.
    let n = 450usize;
    let (mut s, code) = mqtt_session(v4).unwrap();
    assert_eq!(code, 0);
    let publish = |i: usize, qos1: bool| {
        let topic = format!("calls/{i}/state");
        let payload = format!("s{i}");
        let mut body = vec![0, u8::try_from(topic.len()).unwrap()];
        body.extend_from_slice(topic.as_bytes());
        if qos1 {
            body.extend_from_slice(&[0, 1]);
        }
        body.extend_from_slice(payload.as_bytes());
        let mut pkt = vec![
            if qos1 { 0x33 } else { 0x31 },
            u8::try_from(body.len()).unwrap(),
        ];
        pkt.extend_from_slice(&body);
        pkt
    };
    let mut all = Vec::new();
    for i in 0..n {
        all.extend_from_slice(&publish(i, false));
    }
    all.extend_from_slice(&publish(n, true));
    s.write_all(&all).unwrap();
    let mut puback = [0u8; 4];
    s.read_exact(&mut puback).unwrap();
    assert_eq!(puback, [0x40, 2, 0, 1]);

    for qos in ["0", "1"] {
        let out = Command::new(&sub_bin)
            .args(["-h", "127.0.0.1", "-p", &v4.port().to_string()])
            .args(["-t", "calls/+/state", "-q", qos, "-v", "-W", "20"])
            .args(["-C", &(n + 1).to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let got: std::collections::BTreeSet<&str> = text.lines().collect();
        assert_eq!(
            got.len(),
            n + 1,
            "QoS {qos}: {} messages of {}",
            got.len(),
            n + 1
        );
        for i in 0..=n {
            assert!(
                got.contains(format!("calls/{i}/state s{i}").as_str()),
                "QoS {qos}: {i}"
            );
        }
    }
    sigterm(&p);
    assert!(wait_exit(&mut p).success());
}
