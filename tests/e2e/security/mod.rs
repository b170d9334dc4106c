//! Gateway security end to end: device identities on the embedded broker, the generated
//! Mosquitto ACL with real Mosquitto and real clients, TLS, personal data in topics and
//! logs, and hostile payloads against the running daemon.

mod acl;
mod embedded;
mod hostile;
mod limits;
mod privacy;
mod tls;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pickup_e2e::*;
use pickupd::security::mosquitto::{self, MqttListener};
use pickupd::security::registry::{Registry, Role};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

/// A received publish.
#[derive(Debug, Clone)]
pub struct Got {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// A plain MQTT 3.1.1 client that reports CONNACK refusals, records every message and
/// does not reconnect (so a refused or kicked client stays visibly disconnected).
pub struct Dev {
    pub client: AsyncClient,
    pub got: Arc<Mutex<Vec<Got>>>,
    pub connected: Arc<AtomicBool>,
    subacks: mpsc::UnboundedReceiver<Vec<rumqttc::SubscribeReasonCode>>,
}

impl Dev {
    /// Connects; `Err` says why the broker refused (CONNACK code or closed connection).
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        creds: Option<(&str, &str)>,
    ) -> Result<Dev, String> {
        let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        if let Some((u, p)) = creds {
            o.set_credentials(u, p);
        }
        Dev::from_options(o).await
    }

    /// Connects with prepared options.
    pub async fn from_options(mut o: MqttOptions) -> Result<Dev, String> {
        o.set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, mut ev) = AsyncClient::new(o, 1024);
        let first = tokio::time::timeout(DEADLINE, async {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => {
                        return if a.code == rumqttc::ConnectReturnCode::Success {
                            Ok(())
                        } else {
                            Err(format!("{:?}", a.code))
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .map_err(|_| "no CONNACK in time".to_string())?;
        first?;
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let connected = Arc::new(AtomicBool::new(true));
        let (tx, subacks) = mpsc::unbounded_channel();
        {
            let got = got.clone();
            let connected = connected.clone();
            tokio::spawn(async move {
                loop {
                    match ev.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => got.lock().unwrap().push(Got {
                            topic: p.topic,
                            payload: p.payload.to_vec(),
                        }),
                        Ok(Event::Incoming(Packet::SubAck(s))) => {
                            let _ = tx.send(s.return_codes);
                        }
                        Ok(_) => {}
                        Err(_) => {
                            connected.store(false, Ordering::SeqCst);
                            break;
                        }
                    }
                }
            });
        }
        Ok(Dev {
            client,
            got,
            connected,
            subacks,
        })
    }

    /// Subscribes (QoS 1) and returns the SUBACK codes.
    pub async fn subscribe(&mut self, filters: &[String]) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client
            .subscribe_many(
                filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
            )
            .await
            .unwrap();
        tokio::time::timeout(DEADLINE, self.subacks.recv())
            .await
            .expect("SUBACK in time")
            .expect("event loop alive")
    }

    /// QoS 1 publish.
    pub async fn publish(&self, topic: &str, retain: bool, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.into())
            .await
            .unwrap();
    }

    /// Messages on `topic` so far.
    pub fn on(&self, topic: &str) -> Vec<Got> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.topic == topic)
            .cloned()
            .collect()
    }

    /// Waits until a message on `topic` contains `needle`.
    pub async fn wait_payload(&self, topic: &str, needle: &str) {
        let got = self.got.clone();
        let t = topic.to_string();
        let n = needle.to_string();
        wait_until(&format!("{needle} on {topic}"), || {
            let got = got.clone();
            let t = t.clone();
            let n = n.clone();
            async move {
                got.lock()
                    .unwrap()
                    .iter()
                    .any(|g| g.topic == t && String::from_utf8_lossy(&g.payload).contains(&n))
            }
        })
        .await;
    }

    /// Waits until `n` messages arrived on `topic`.
    pub async fn wait_count(&self, topic: &str, n: usize) {
        let got = self.got.clone();
        let t = topic.to_string();
        wait_until(&format!("{n} message(s) on {topic}"), || {
            let got = got.clone();
            let t = t.clone();
            async move { got.lock().unwrap().iter().filter(|g| g.topic == t).count() >= n }
        })
        .await;
    }
}

/// Reads a device's secret out of the adds made by a test.
pub struct Secrets(pub std::collections::HashMap<String, String>);

impl Secrets {
    pub fn get(&self, id: &str) -> &str {
        self.0.get(id).map(String::as_str).unwrap()
    }
}

/// A registry file with `devices` (id, role); returns the secrets.
pub fn make_registry(path: &Path, devices: &[(&str, Role)]) -> Secrets {
    let mut r = Registry::load(path).unwrap();
    let mut s = std::collections::HashMap::new();
    for (id, role) in devices {
        s.insert(id.to_string(), r.add(id, *role, 0).unwrap());
    }
    r.save(path).unwrap();
    Secrets(s)
}

/// Mosquitto started with the configuration `pickupctl broker mosquitto-config` writes.
pub struct SecureMosquitto {
    child: Child,
    /// Plain listener.
    pub addr: SocketAddr,
    /// TLS listener, when asked for.
    pub tls_addr: Option<SocketAddr>,
}

impl SecureMosquitto {
    /// Generates passwd/acl/conf from `registry` into `dir` and starts Mosquitto on it.
    pub fn start(registry: &Path, site: &str, dir: &Path, tls: Option<(&Path, &Path)>) -> Self {
        let bin = require("mosquitto", "mosquitto");
        let reg = Registry::load(registry).unwrap();
        let topics = pickup_protocol::Topics::new(site).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut listeners = vec![MqttListener { addr, tls: None }];
        let tls_addr = tls.map(|(cert, key)| {
            let a = SocketAddr::from(([127, 0, 0, 1], free_port()));
            listeners.push(MqttListener {
                addr: a,
                tls: Some((cert.to_path_buf(), key.to_path_buf())),
            });
            a
        });
        let w = mosquitto::write_config(&reg, &topics, dir, &listeners).unwrap();
        // Mosquitto started as root drops to its own user, which must reach the files.
        mosquitto::chown_to(&w, "mosquitto").unwrap();
        open_up(dir);
        if let Some((cert, key)) = tls {
            open_up(cert.parent().unwrap());
            for f in [cert, key] {
                let _ = std::os::unix::fs::chown(f, uid_of("mosquitto"), None);
            }
        }
        let log = std::fs::File::create(dir.join("mosquitto.log")).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&w.conf)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto starts");
        let mut m = Self {
            child,
            addr,
            tls_addr,
        };
        let end = Instant::now() + DEADLINE;
        for a in std::iter::once(addr).chain(tls_addr) {
            while TcpStream::connect(a).is_err() {
                if let Ok(Some(st)) = m.child.try_wait() {
                    panic!(
                        "mosquitto exited ({st}): {}",
                        std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
                    );
                }
                assert!(Instant::now() < end, "mosquitto did not start listening");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        m
    }
}

impl Drop for SecureMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn uid_of(user: &str) -> Option<u32> {
    let out = Command::new("id").arg("-u").arg(user).output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// Lets other users traverse and read a test directory (temp dirs are 0700).
pub fn open_up(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A certificate authority and a server certificate for 127.0.0.1/localhost, made with
/// the openssl command line.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn make(dir: &Path) -> Pki {
        let openssl = require("openssl", "openssl");
        std::fs::create_dir_all(dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new(&openssl)
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=pickupd test CA",
        ]);
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        Pki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }
}
