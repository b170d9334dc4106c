//! The embedded broker through real MQTT clients on loopback ports chosen by the OS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pickup_broker::{Broker, BrokerConfig, BrokerError, Listener};
use pickup_protocol::client::{
    link, BrokerUrl, Link, LinkEvent, LinkOptions, Message, PublishProps, Version,
};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(5);

fn cfg() -> BrokerConfig {
    BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..BrokerConfig::default()
    }
}

fn cfg_v5() -> BrokerConfig {
    BrokerConfig {
        listen_v5: Some("127.0.0.1:0".parse().unwrap()),
        ..cfg()
    }
}

/// A test client: the link plus its events; the event loop stops at the first error so a
/// test sees refusals and disconnections instead of silent reconnects.
struct Client {
    link: Link,
    events: mpsc::UnboundedReceiver<Result<LinkEvent, String>>,
    task: tokio::task::JoinHandle<()>,
    /// Messages that arrived while waiting for something else (e.g. before a SUBACK).
    backlog: std::collections::VecDeque<Message>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn options(addr: SocketAddr, id: &str, version: Version) -> LinkOptions {
    let mut o = LinkOptions::new(BrokerUrl::parse(&addr.to_string()).unwrap(), id);
    o.version = version;
    o
}

fn spawn_client(opts: LinkOptions) -> Client {
    let (link, mut ev) = link(&opts);
    let (tx, events) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(e) => {
                    if tx.send(Ok(e)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    Client {
        link,
        events,
        task,
        backlog: Default::default(),
    }
}

impl Client {
    /// Waits for CONNACK; returns session_present, or the error that came instead.
    async fn connected(&mut self) -> Result<bool, String> {
        loop {
            match tokio::time::timeout(WAIT, self.events.recv()).await {
                Ok(Some(Ok(LinkEvent::Connected { session_present }))) => {
                    return Ok(session_present)
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => return Err("event loop ended".into()),
                Err(_) => return Err("no CONNACK in time".into()),
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        self.link
            .subscribe_many(&[filter.to_string()])
            .await
            .unwrap();
        self.until(|e| matches!(e, LinkEvent::SubAck)).await;
    }

    async fn publish_qos1(&mut self, topic: &str, retain: bool, payload: &[u8]) {
        self.link
            .publish(topic, true, retain, payload.to_vec(), None)
            .await
            .unwrap();
        self.until(|e| matches!(e, LinkEvent::PubAck(_))).await;
    }

    async fn message(&mut self) -> Message {
        if let Some(m) = self.backlog.pop_front() {
            return m;
        }
        let e = self.until(|e| matches!(e, LinkEvent::Message(_))).await;
        match e {
            LinkEvent::Message(m) => m,
            _ => unreachable!(),
        }
    }

    /// The next event matching `want`; panics on an error or after the deadline.
    async fn until(&mut self, want: impl Fn(&LinkEvent) -> bool) -> LinkEvent {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(e))) if want(&e) => return e,
                Ok(Some(Ok(LinkEvent::Message(m)))) => self.backlog.push_back(m),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("client error while waiting: {e}"),
                Ok(None) => panic!("event loop ended while waiting"),
                Err(_) => panic!("timed out waiting for an event"),
            }
        }
    }

    /// Waits until the connection fails; returns the error.
    async fn closed(&mut self) -> String {
        loop {
            match tokio::time::timeout(WAIT, self.events.recv()).await {
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return e,
                Ok(None) => return "event loop ended".into(),
                Err(_) => panic!("connection still open"),
            }
        }
    }
}

async fn connect(addr: SocketAddr, id: &str) -> Client {
    let mut c = spawn_client(options(addr, id, Version::V4));
    c.connected().await.unwrap();
    c
}

#[tokio::test]
async fn port_zero_resolves_and_a_client_connects() {
    let broker = Broker::start(cfg()).unwrap();
    let addr = broker.v4_addr();
    assert_ne!(addr.port(), 0);
    assert!(broker.v5_addr().is_none());
    let mut c = spawn_client(options(addr, "kiosk-1", Version::V4));
    assert_eq!(c.connected().await, Ok(false));
}

#[test]
fn starts_and_stops_outside_a_runtime() {
    let broker = Broker::start(cfg()).unwrap();
    let addr = broker.v4_addr();
    std::net::TcpStream::connect(addr).unwrap();
    broker.shutdown();
    // The port is free again.
    std::net::TcpListener::bind(addr).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn starts_inside_a_current_thread_runtime() {
    let broker = Broker::start(cfg()).unwrap();
    broker.probe(WAIT).await.unwrap();
    connect(broker.v4_addr(), "c").await;
}

#[tokio::test]
async fn qos1_publish_reaches_another_client() {
    let broker = Broker::start(cfg()).unwrap();
    let mut sub = connect(broker.v4_addr(), "courier-1").await;
    sub.subscribe("pickup/v1/s/couriers/c1/job").await;
    let mut publ = connect(broker.v4_addr(), "daemon").await;
    publ.publish_qos1("pickup/v1/s/couriers/c1/job", false, b"{\"job\":1}")
        .await;
    let m = sub.message().await;
    assert_eq!(m.topic, "pickup/v1/s/couriers/c1/job");
    assert_eq!(&m.payload[..], b"{\"job\":1}");
    assert!(!m.retain);
}

#[tokio::test]
async fn late_subscriber_sees_the_retained_message() {
    let broker = Broker::start(cfg()).unwrap();
    let mut publ = connect(broker.v4_addr(), "daemon").await;
    publ.publish_qos1("pickup/v1/s/calls/42/state", true, b"assigned")
        .await;
    let mut late = connect(broker.v4_addr(), "kiosk").await;
    late.subscribe("pickup/v1/s/calls/+/state").await;
    let m = late.message().await;
    assert_eq!(&m.payload[..], b"assigned");
    assert!(m.retain);
}

#[tokio::test]
async fn persistent_session_gets_what_was_published_while_away() {
    let broker = Broker::start(cfg()).unwrap();
    let addr = broker.v4_addr();
    let mut o = options(addr, "courier-7", Version::V4);
    o.clean_session = false;

    let mut sub = spawn_client(o.clone());
    assert_eq!(sub.connected().await, Ok(false));
    sub.subscribe("jobs/7").await;
    sub.link.disconnect().await.unwrap();
    sub.closed().await;
    drop(sub);

    let mut publ = connect(addr, "daemon").await;
    publ.publish_qos1("jobs/7", false, b"offer").await;

    let mut back = spawn_client(o);
    assert_eq!(back.connected().await, Ok(true), "session kept");
    let m = back.message().await;
    assert_eq!(&m.payload[..], b"offer");
}

/// MQTT 3.1.1 §3.8.4: a SUBSCRIBE that repeats an existing subscription re-sends the
/// retained messages. A handheld that restarts and resumes its session must see its job
/// again even though its previous connection acknowledged it (rumqttd as published sent
/// nothing here; see vendor/README.md).
#[tokio::test]
async fn resumed_session_subscribing_again_gets_the_retained_message_again() {
    let broker = Broker::start(cfg()).unwrap();
    let addr = broker.v4_addr();
    let mut publ = connect(addr, "daemon").await;
    publ.publish_qos1("jobs/7", true, b"picked_up").await;

    let mut o = options(addr, "courier-7", Version::V4);
    o.clean_session = false;
    let mut sub = spawn_client(o.clone());
    assert_eq!(sub.connected().await, Ok(false));
    sub.subscribe("jobs/+").await;
    let m = sub.message().await;
    assert_eq!((&m.payload[..], m.retain), (&b"picked_up"[..], true));
    // Acknowledged (the PUBACK goes out before the DISCONNECT), so nothing is replayed.
    sub.link.disconnect().await.unwrap();
    sub.closed().await;
    drop(sub);

    let mut back = spawn_client(o);
    assert_eq!(back.connected().await, Ok(true), "session kept");
    back.subscribe("jobs/+").await;
    let m = back.message().await;
    assert_eq!((&m.payload[..], m.retain), (&b"picked_up"[..], true));

    // Later messages still flow on the same subscription, once each.
    publ.publish_qos1("jobs/7", true, b"completed").await;
    let m = back.message().await;
    assert_eq!(&m.payload[..], b"completed");
}

/// The same within one connection: subscribing again to a filter it already holds
/// re-sends the filter's retained messages, whether or not the subscription was idle.
#[tokio::test]
async fn subscribing_again_on_one_connection_re_sends_the_retained_messages() {
    let broker = Broker::start(cfg()).unwrap();
    let addr = broker.v4_addr();
    let mut publ = connect(addr, "daemon").await;
    publ.publish_qos1("calls/1/state", true, b"assigned").await;
    publ.publish_qos1("calls/2/state", true, b"dispatching")
        .await;
    let mut kiosk = connect(addr, "kiosk").await;
    kiosk.subscribe("calls/+/state").await;
    let mut first = vec![kiosk.message().await, kiosk.message().await];
    first.sort_by(|a, b| a.topic.cmp(&b.topic));
    kiosk.subscribe("calls/+/state").await;
    let mut again = vec![kiosk.message().await, kiosk.message().await];
    again.sort_by(|a, b| a.topic.cmp(&b.topic));
    let payloads =
        |v: &[Message]| -> Vec<Vec<u8>> { v.iter().map(|m| m.payload.to_vec()).collect() };
    assert_eq!(payloads(&first), payloads(&again));
    assert!(again.iter().all(|m| m.retain));
}

#[tokio::test]
async fn probe_is_ok_when_healthy_and_names_the_listener_after_shutdown() {
    let broker = Broker::start(cfg_v5()).unwrap();
    let prober = broker.prober();
    broker.probe(WAIT).await.unwrap();
    // Probing many times works (fresh ids, nothing left behind that blocks the next one).
    for _ in 0..20 {
        prober.probe(WAIT).await.unwrap();
    }
    let (v4, v5) = (broker.v4_addr(), broker.v5_addr().unwrap());
    broker.shutdown();

    let err = prober.probe(Duration::from_secs(2)).await.unwrap_err();
    assert_eq!(err.listeners(), vec![Listener::V4, Listener::V5]);
    assert_eq!(err.failures[0].addr, v4);
    assert_eq!(err.failures[1].addr, v5);
    assert!(err.to_string().contains("MQTT 3.1.1 listener"), "{err}");
    // Both ports are released.
    std::net::TcpListener::bind(v4).unwrap();
    std::net::TcpListener::bind(v5).unwrap();
}

#[tokio::test]
async fn shutdown_drops_connected_clients() {
    let broker = Broker::start(cfg()).unwrap();
    let mut c = connect(broker.v4_addr(), "kiosk").await;
    broker.shutdown();
    c.closed().await;
}

#[tokio::test]
async fn oversized_packet_closes_the_sender_and_is_not_delivered() {
    let broker = Broker::start(BrokerConfig {
        max_payload: 2048,
        ..cfg()
    })
    .unwrap();
    let addr = broker.v4_addr();
    let mut sub = connect(addr, "daemon").await;
    sub.subscribe("calls/create").await;

    let mut big = connect(addr, "kiosk-big").await;
    big.link
        .publish("calls/create", true, false, vec![b'x'; 4096], None)
        .await
        .unwrap();
    let err = big.closed().await;
    assert!(!err.is_empty());

    // A packet within the limit still goes through, and it is the first thing the
    // subscriber sees: the big one was never delivered.
    let mut small = connect(addr, "kiosk-small").await;
    small
        .publish_qos1("calls/create", false, &[b'y'; 1500])
        .await;
    let m = sub.message().await;
    assert_eq!(m.payload.len(), 1500);
}

#[tokio::test]
async fn v5_listener_carries_mqtt5_properties() {
    let broker = Broker::start(cfg_v5()).unwrap();
    let v5 = broker.v5_addr().unwrap();
    assert_ne!(v5.port(), 0);
    assert_ne!(v5, broker.v4_addr());

    let mut daemon = spawn_client(options(v5, "daemon5", Version::V5));
    daemon.connected().await.unwrap();
    daemon.subscribe("pickup/v1/s/calls/create").await;

    let mut kiosk = spawn_client(options(v5, "kiosk5", Version::V5));
    kiosk.connected().await.unwrap();
    let props = PublishProps {
        response_topic: Some("pickup/v1/s/kiosks/k5/replies".into()),
        correlation_data: Some(b"c-1".to_vec()),
        message_expiry_s: None,
    };
    kiosk
        .link
        .publish(
            "pickup/v1/s/calls/create",
            true,
            false,
            b"{}".to_vec(),
            Some(&props),
        )
        .await
        .unwrap();
    let m = daemon.message().await;
    assert_eq!(
        m.response_topic.as_deref(),
        Some("pickup/v1/s/kiosks/k5/replies")
    );
    assert_eq!(m.correlation_data.as_deref(), Some(&b"c-1"[..]));
    broker.probe(WAIT).await.unwrap();
}

#[tokio::test]
async fn auth_hook_refuses_a_wrong_password_and_probe_still_passes() {
    let hook: pickup_broker::AuthHook =
        Arc::new(|client_id, user, pass| client_id == format!("kiosk-{user}") && pass == "right");
    let broker = Broker::start(cfg().with_auth_hook(hook)).unwrap();
    let addr = broker.v4_addr();

    let mut o = options(addr, "kiosk-7", Version::V4);
    o.credentials = Some(("7".into(), "wrong".into()));
    let mut bad = spawn_client(o.clone());
    assert!(bad.connected().await.is_err(), "wrong password refused");

    let mut anon = spawn_client(options(addr, "kiosk-7", Version::V4));
    assert!(anon.connected().await.is_err(), "no credentials refused");

    let mut other = o.clone();
    other.client_id = "kiosk-8".into();
    other.credentials = Some(("7".into(), "right".into()));
    assert!(
        spawn_client(other).connected().await.is_err(),
        "client id bound to another identity refused"
    );

    o.credentials = Some(("7".into(), "right".into()));
    assert_eq!(spawn_client(o).connected().await, Ok(false));

    // The broker's own probe does not depend on the hook.
    broker.probe(WAIT).await.unwrap();
}

#[tokio::test]
async fn static_users() {
    let mut c = cfg();
    c.users.insert("kiosk".into(), "s3cret".into());
    let broker = Broker::start(c).unwrap();
    let mut o = options(broker.v4_addr(), "k1", Version::V4);
    o.credentials = Some(("kiosk".into(), "S3cret".into()));
    assert!(spawn_client(o.clone()).connected().await.is_err());
    o.credentials = Some(("kiosk".into(), "s3cret".into()));
    assert_eq!(spawn_client(o).connected().await, Ok(false));
    broker.probe(WAIT).await.unwrap();
}

#[tokio::test]
async fn a_taken_port_is_reported_with_the_listener() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = Broker::start(BrokerConfig {
        listen: addr,
        ..BrokerConfig::default()
    })
    .unwrap_err();
    match err {
        BrokerError::Bind {
            listener, addr: a, ..
        } => {
            assert_eq!(listener, Listener::V4);
            assert_eq!(a, addr);
        }
        other => panic!("expected a bind error, got {other}"),
    }
}

#[tokio::test]
async fn bad_config_is_refused_with_its_key() {
    let err = Broker::start(BrokerConfig {
        segment_size: 10,
        ..cfg()
    })
    .unwrap_err();
    assert!(err.to_string().starts_with("broker.segment_size:"), "{err}");
}

/// The accepted sockets of the broker in this process (not the listening one).
#[cfg(target_os = "linux")]
fn accepted_nodelay(addr: SocketAddr) -> Vec<bool> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let mut listening: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: reads an int option into a local int; a stale fd only yields an error.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ACCEPTCONN,
                (&mut listening as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 || listening != 0 {
            continue;
        }
        if pickup_broker::nodelay::local_addr_of(fd) == Some(addr) {
            if let Some(v) = pickup_broker::nodelay::nodelay_of(fd) {
                out.push(v);
            }
        }
    }
    out
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn accepted_connections_have_nagle_off() {
    let broker = Broker::start(cfg()).unwrap();
    assert!(broker.nodelay_applied());
    let addr = broker.v4_addr();
    let _a = connect(addr, "a").await;
    let _b = connect(addr, "b").await;
    let flags = accepted_nodelay(addr);
    assert!(flags.len() >= 2, "found {flags:?}");
    assert!(flags.iter().all(|&v| v), "{flags:?}");

    let plain = Broker::start(BrokerConfig {
        tcp_nodelay: false,
        ..cfg()
    })
    .unwrap();
    assert!(!plain.nodelay_applied());
    let _c = connect(plain.v4_addr(), "c").await;
    let flags = accepted_nodelay(plain.v4_addr());
    assert!(!flags.is_empty() && flags.iter().all(|&v| !v), "{flags:?}");
}

/// Publishes one QoS 1 message with MQTT 5 properties from a v5 client.
async fn publish_with_properties(v5: SocketAddr, topic: &str) {
    let mut publ = spawn_client(options(v5, "publisher5", Version::V5));
    publ.connected().await.unwrap();
    let props = PublishProps {
        response_topic: Some("kiosks/k5/replies".into()),
        correlation_data: Some(b"1".to_vec()),
        message_expiry_s: None,
    };
    publ.link
        .publish(topic, true, false, b"{}".to_vec(), Some(&props))
        .await
        .unwrap();
    publ.until(|e| matches!(e, LinkEvent::PubAck(_))).await;
}

/// Both listeners still take everyone, and the probe passes.
async fn assert_listeners_healthy(broker: &Broker) {
    connect(broker.v4_addr(), "bystander").await;
    if let Some(v5) = broker.v5_addr() {
        raw_v5_connect(v5, "bystander5").await.unwrap();
    }
    broker.probe(WAIT).await.unwrap();
}

/// A v5 session holding a message with properties, resumed on the 3.1.1 listener, gets
/// the message without them. rumqttd as published panicked that connection, and the
/// same client id coming back then poisoned the 3.1.1 listener for everyone
/// (vendor/README.md, patch 15).
#[tokio::test]
async fn a_v5_session_resumed_on_v4_gets_its_message_without_properties() {
    let broker = Broker::start(cfg_v5()).unwrap();
    let (v4, v5) = (broker.v4_addr(), broker.v5_addr().unwrap());

    let mut o5 = options(v5, "victim", Version::V5);
    o5.clean_session = false;
    let mut victim = spawn_client(o5);
    victim.connected().await.unwrap();
    victim.subscribe("trap/t").await;
    victim.link.disconnect().await.unwrap();
    victim.closed().await;
    drop(victim);

    publish_with_properties(v5, "trap/t").await;

    let mut o4 = options(v4, "victim", Version::V4);
    o4.clean_session = false;
    let mut resumed = spawn_client(o4.clone());
    assert_eq!(resumed.connected().await, Ok(true));
    let m = resumed.message().await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("trap/t", &b"{}"[..]));
    drop(resumed);
    let mut again = spawn_client(o4);
    assert_eq!(again.connected().await, Ok(true));
    assert_listeners_healthy(&broker).await;
}

/// A v5 publish with properties reaches a 3.1.1 subscriber without them, and the
/// subscriber stays connected. rumqttd as published panicked the subscriber's
/// connection, and its ordinary reconnect poisoned the 3.1.1 listener.
#[tokio::test]
async fn v5_properties_reach_a_v4_subscriber_without_them() {
    let broker = Broker::start(cfg_v5()).unwrap();
    let (v4, v5) = (broker.v4_addr(), broker.v5_addr().unwrap());

    let mut watcher = connect(v4, "watcher").await;
    watcher.subscribe("pickup/v1/s/calls/create").await;
    publish_with_properties(v5, "pickup/v1/s/calls/create").await;
    assert_eq!(&watcher.message().await.payload[..], b"{}");
    // Still connected: the next message arrives too.
    publish_with_properties(v5, "pickup/v1/s/calls/create").await;
    assert_eq!(&watcher.message().await.payload[..], b"{}");
    assert_listeners_healthy(&broker).await;
}

#[tokio::test]
async fn listening_on_all_interfaces_still_probes_and_gives_a_loopback_url() {
    let broker = Broker::start(BrokerConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        ..BrokerConfig::default()
    })
    .unwrap();
    assert!(broker.v4_addr().ip().is_unspecified());
    broker.probe(WAIT).await.unwrap();
    let url = broker.v4_url();
    assert_eq!(url, format!("mqtt://127.0.0.1:{}", broker.v4_addr().port()));
    let mut c = spawn_client(LinkOptions::new(BrokerUrl::parse(&url).unwrap(), "k"));
    c.connected().await.unwrap();
    assert!(broker.nodelay_applied());
}

/// Raw MQTT 5 CONNECT (clean start, no credentials) and the CONNACK's reason code.
async fn raw_v5_connect(
    addr: SocketAddr,
    client_id: &str,
) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 10, 0];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut pkt = vec![0x10, body.len() as u8];
    pkt.extend_from_slice(&body);
    s.write_all(&pkt).await?;
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    let mut rest = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut rest).await?;
    assert_eq!(head[0], 0x20);
    assert_eq!(rest[1], 0, "CONNACK reason code");
    Ok(s)
}

/// A v5 client that sends what only a broker sends (CONNACK) loses its connection, and
/// nothing else happens: it can come back, and everyone else is served. rumqttd as
/// published panicked the connection, and its reconnect poisoned the MQTT 5 listener.
#[tokio::test]
async fn a_hostile_v5_client_loses_only_its_own_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = Broker::start(cfg_v5()).unwrap();
    let v5 = broker.v5_addr().unwrap();

    for packet in [
        [0x20, 0x03, 0x00, 0x00, 0x00],
        [0xB0, 0x03, 0x00, 0x01, 0x00],
    ] {
        let mut s = raw_v5_connect(v5, "hostile").await.unwrap();
        s.write_all(&packet).await.unwrap();
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap();
        assert!(matches!(closed, Ok(0) | Err(_)), "connection closed");
    }
    raw_v5_connect(v5, "hostile").await.unwrap();
    assert_listeners_healthy(&broker).await;
}

#[tokio::test]
async fn restarting_keeps_sessions_and_retained_messages() {
    let mut broker = Broker::start(cfg()).unwrap();
    let addr = broker.v4_addr();
    let mut publ = connect(addr, "daemon").await;
    publ.publish_qos1("pickup/v1/s/daemon/state", true, b"ready")
        .await;
    broker.restart_listener(Listener::V4).unwrap();
    publ.closed().await; // connections of the old listener are dropped
    let mut late = connect(addr, "kiosk").await;
    late.subscribe("pickup/v1/s/daemon/state").await;
    assert_eq!(&late.message().await.payload[..], b"ready");

    let err = broker.restart_listener(Listener::V5).unwrap_err();
    assert!(err.to_string().starts_with("broker.listen_v5:"), "{err}");
}

/// A topic may start with any character: one that takes more than one byte in UTF-8
/// (`é`) used to be cut at its first byte when a topic was tested against a filter,
/// which panicked the broker's router (rumqttd's `matches`; vendor/README.md, patch 14).
#[tokio::test]
async fn a_topic_starting_with_a_multibyte_character_is_delivered() {
    let broker = Broker::start(cfg()).unwrap();
    let mut publ = connect(broker.v4_addr(), "device").await;
    publ.publish_qos1("é/status", true, b"retained").await;
    let mut all = connect(broker.v4_addr(), "watcher").await;
    all.subscribe("#").await;
    let m = all.message().await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("é/status", &b"retained"[..])
    );
    publ.publish_qos1("ü/live", false, b"live").await;
    let m = all.message().await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("ü/live", &b"live"[..]));
    // The broker still serves everyone.
    let mut late = connect(broker.v4_addr(), "late").await;
    late.subscribe("é/#").await;
    assert_eq!(&late.message().await.payload[..], b"retained");
}

/// A wildcard subscription gets every retained message it matches, however many more
/// there are than the subscriber's in-flight window (a dashboard subscribing to every
/// call's state, a daemon re-reading every courier's presence).
#[tokio::test]
async fn a_wildcard_subscriber_gets_every_retained_message_beyond_its_inflight_window() {
    let broker = Broker::start(cfg()).unwrap();
    let addr = broker.v4_addr();
    let mut publ = connect(addr, "daemon").await;
    let n = 3 * usize::from(BrokerConfig::default().max_inflight) + 7;
    for i in 0..n {
        publ.publish_qos1(
            &format!("calls/{i}/state"),
            true,
            format!("s{i}").as_bytes(),
        )
        .await;
    }
    let mut board = connect(addr, "board").await;
    board.subscribe("calls/+/state").await;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < n {
        let m = board.message().await;
        assert!(m.retain);
        let i: usize = m.topic.split('/').nth(1).unwrap().parse().unwrap();
        assert_eq!(&m.payload[..], format!("s{i}").as_bytes());
        seen.insert(i);
    }
}
