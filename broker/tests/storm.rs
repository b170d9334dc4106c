//! The embedded broker under a storm of hostile MQTT traffic on both listeners: valid
//! packets with awkward contents (wildcards and `$` in topics, multi-byte and empty
//! levels, very deep topics, invalid QoS, packets only a broker sends, a second
//! CONNECT), the same with bytes flipped or cut short, all over real TCP connections.
//! Afterwards nothing in the process may have panicked, and the broker must still serve
//! everyone. `STORM_SEED=N` repeats a run; the seed is printed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pickup_broker::{Broker, BrokerConfig};
use pickup_protocol::client::{link, BrokerUrl, LinkEvent, LinkOptions, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

/// A small deterministic generator (xorshift64*), so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
}

fn remaining_length(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len().min(0xffff) as u16).to_be_bytes().to_vec();
    v.extend_from_slice(&s[..s.len().min(0xffff)]);
    v
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    p.extend(remaining_length(body.len()));
    p.extend_from_slice(body);
    p
}

fn connect(v5: bool, id: &str) -> Vec<u8> {
    let mut b = string(b"MQTT");
    b.extend([if v5 { 5 } else { 4 }, 0x02, 0, 30]);
    if v5 {
        b.push(0);
    }
    b.extend(string(id.as_bytes()));
    packet(0x10, &b)
}

const TOPICS: &[&str] = &[
    "a/b",
    "é/x",
    "ü",
    "$SYS/x",
    "+",
    "#",
    "a/+/b",
    "a/#",
    "",
    "/",
    "//",
    "a//b",
    "pickup/v1/s/calls/create",
    "pickup/v1/s/couriers/k1/presence",
    "日本/語",
    "a/#/b",
    "+/+/#",
];

/// A topic or filter: one of the awkward ones, a very deep one, or raw bytes.
fn topic(r: &mut Rng) -> Vec<u8> {
    match r.below(10) {
        0 => vec![b'a'; 1 + r.below(300)]
            .iter()
            .flat_map(|c| [*c, b'/'])
            .collect(),
        1 => (0..r.below(40)).map(|_| r.next() as u8).collect(),
        _ => r.pick(TOPICS).as_bytes().to_vec(),
    }
}

/// One client packet, valid in form, hostile in content.
fn hostile(r: &mut Rng, v5: bool) -> Vec<u8> {
    let props: &[u8] = if v5 { &[0] } else { &[] };
    let pkid = (r.below(4) as u16).to_be_bytes();
    match r.below(12) {
        0..=3 => {
            let flags = (r.below(16)) as u8; // QoS 3, dup and retain included
            let mut b = string(&topic(r));
            if flags & 0x06 != 0 {
                b.extend(pkid);
            }
            b.extend_from_slice(props);
            b.extend((0..r.below(64)).map(|_| r.next() as u8));
            packet(0x30 | flags, &b)
        }
        4 | 5 => {
            let mut b = pkid.to_vec();
            b.extend_from_slice(props);
            for _ in 0..1 + r.below(3) {
                b.extend(string(&topic(r)));
                b.push(r.next() as u8); // options, QoS 3 included
            }
            packet(0x82, &b)
        }
        6 => {
            let mut b = pkid.to_vec();
            b.extend_from_slice(props);
            b.extend(string(&topic(r)));
            packet(0xA2, &b)
        }
        // Acknowledgements, in and out of order, and PUBREL.
        7 => packet([0x40, 0x50, 0x62, 0x70][r.below(4)], &pkid),
        // What only a broker sends: CONNACK, SUBACK, UNSUBACK, PINGRESP.
        8 => packet([0x20, 0x90, 0xB0, 0xD0][r.below(4)], &[0, 0, 0]),
        9 => connect(v5, "again"),
        10 => vec![0xC0, 0],
        _ => (0..r.below(16)).map(|_| r.next() as u8).collect(),
    }
}

/// One connection's worth of traffic: CONNECT, then hostile packets, some of them
/// corrupted, possibly cut short at the end.
fn session(r: &mut Rng, v5: bool, n: usize) -> Vec<u8> {
    let mut bytes = connect(v5, &format!("storm-{}", r.below(8)));
    for _ in 0..n {
        let mut p = hostile(r, v5);
        if !p.is_empty() && r.below(8) == 0 {
            let i = r.below(p.len());
            p[i] ^= 1 << r.below(8);
        }
        bytes.extend(p);
    }
    if r.below(4) == 0 {
        let cut = r.below(bytes.len());
        bytes.truncate(cut.max(1));
    }
    bytes
}

/// Sends `bytes` and reads whatever comes back until the broker closes the connection
/// or goes quiet for a moment (then the client hangs up).
/// A broker that stops reading cannot hold the storm up: the whole exchange has a
/// deadline (the checks afterwards tell whether the broker still works).
async fn blast(addr: SocketAddr, bytes: Vec<u8>) {
    let exchange = async {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            return;
        };
        let _ = s.write_all(&bytes).await;
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(WAIT, exchange).await;
}

/// A publish over a fresh connection reaches a subscriber, and a retained one a late one.
async fn still_serves(addr: SocketAddr, version: Version) {
    let url = BrokerUrl::parse(&addr.to_string()).unwrap();
    let client = |id: &str| {
        let mut o = LinkOptions::new(url.clone(), id);
        o.version = version;
        link(&o)
    };
    let (sub, mut sev) = client(&format!("after-sub-{version:?}"));
    let (publ, mut pev) = client(&format!("after-pub-{version:?}"));
    let connected = async |ev: &mut pickup_protocol::client::LinkEvents| loop {
        if let LinkEvent::Connected { .. } = ev.poll().await.unwrap() {
            return;
        }
    };
    tokio::time::timeout(WAIT, async {
        connected(&mut sev).await;
        connected(&mut pev).await;
        sub.subscribe_many(&["after/+".to_string()]).await.unwrap();
        loop {
            match sev.poll().await {
                Ok(LinkEvent::SubAck) => break,
                Ok(_) => {}
                Err(e) => panic!("subscriber on {addr}: {e}"),
            }
        }
        let pumping = async {
            publ.publish("after/x", true, true, b"ok".to_vec(), None)
                .await
                .unwrap();
            loop {
                let _ = pev.poll().await;
            }
        };
        let receiving = async {
            loop {
                if let LinkEvent::Message(m) = sev.poll().await.unwrap() {
                    assert_eq!(&m.payload[..], b"ok");
                    return;
                }
            }
        };
        tokio::select! {
            _ = pumping => {}
            _ = receiving => {}
        }
    })
    .await
    .expect("the broker still delivers after the storm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_hostile_packets_panics_nothing_and_the_broker_still_serves() {
    let panics = Arc::new(AtomicUsize::new(0));
    let counted = panics.clone();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        counted.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));

    let seed = std::env::var("STORM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
        | 1;
    println!("STORM_SEED={seed}");
    let mut r = Rng(seed);

    let broker = Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        listen_v5: Some("127.0.0.1:0".parse().unwrap()),
        ..BrokerConfig::default()
    })
    .unwrap();
    let (v4, v5) = (broker.v4_addr(), broker.v5_addr().unwrap());

    // 400 connections, 16 at a time, each with up to 40 packets.
    for _round in 0..25 {
        let mut wave = Vec::new();
        for _ in 0..16 {
            let on_v5 = r.below(2) == 0;
            let n = 1 + r.below(40);
            let bytes = session(&mut r, on_v5, n);
            wave.push(tokio::spawn(blast(if on_v5 { v5 } else { v4 }, bytes)));
        }
        for w in wave {
            w.await.unwrap();
        }
    }

    broker.probe(WAIT).await.unwrap();
    still_serves(v4, Version::V4).await;
    still_serves(v5, Version::V5).await;
    assert_eq!(
        panics.load(Ordering::SeqCst),
        0,
        "something panicked during the storm (STORM_SEED={seed})"
    );
}
