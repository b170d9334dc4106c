//! What stored messages cost the embedded broker in memory, measured as the process's
//! resident set (this file is its own test process, with one test in it).

use std::net::SocketAddr;
use std::time::Duration;

use pickup_broker::{Broker, BrokerConfig};
use pickup_protocol::client::{link, BrokerUrl, Link, LinkEvent, LinkEvents, LinkOptions};

const WAIT: Duration = Duration::from_secs(30);

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

async fn connect(addr: SocketAddr, id: &str) -> (Link, LinkEvents) {
    let lo = LinkOptions::new(BrokerUrl::parse(&addr.to_string()).unwrap(), id);
    let (l, mut ev) = link(&lo);
    tokio::time::timeout(WAIT, async {
        loop {
            if let LinkEvent::Connected { .. } = ev.poll().await.unwrap() {
                return;
            }
        }
    })
    .await
    .expect("no CONNACK");
    (l, ev)
}

/// Publishes `pins` retained messages on topics of their own, each followed by `churn`
/// retained messages on one topic that replace each other, pipelined (QoS 0), then one
/// QoS 1 message whose PUBACK says the broker has taken everything before it.
async fn publish_pins(l: &Link, ev: &mut LinkEvents, tag: &str, pins: usize, churn: usize) {
    let publishing = async {
        for i in 0..pins {
            l.publish(&format!("pin/{tag}/{i}"), false, true, vec![b'p'; 32], None)
                .await
                .unwrap();
            for _ in 0..churn {
                l.publish("churn", false, true, vec![b'c'; 200], None)
                    .await
                    .unwrap();
            }
        }
        l.publish("barrier", true, false, b"end".to_vec(), None)
            .await
            .unwrap();
    };
    let acked = async {
        loop {
            if let LinkEvent::PubAck(_) = ev.poll().await.unwrap() {
                return;
            }
        }
    };
    tokio::time::timeout(WAIT, async { tokio::join!(publishing, acked) })
        .await
        .expect("the barrier was not acknowledged");
}

/// A retained message that outlives the messages read with it costs its own size, not
/// the connection's read-buffer block it arrived in (about 10 KiB). Without the broker's
/// copy on store, 2 000 such messages keep about 20 MiB of blocks alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_message_does_not_keep_its_read_buffer_alive() {
    let broker = Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..BrokerConfig::default()
    })
    .unwrap();
    let (l, mut ev) = connect(broker.v4_addr(), "pinner").await;
    // Warm up allocator and buffers so the baseline holds what any run needs.
    publish_pins(&l, &mut ev, "warm", 200, 40).await;
    let before = rss_mib();
    publish_pins(&l, &mut ev, "measured", 2_000, 40).await;
    let grown = rss_mib() - before;
    // Stored: 2 000 small retained messages (under 1 MiB with their map entries).
    assert!(
        grown < 8.0,
        "resident memory grew by {grown:.1} MiB for 2 000 retained messages of 32 bytes"
    );
    // They are all there: a late subscriber gets one of them back.
    l.subscribe_many(&["pin/measured/1999".to_string()])
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            if let LinkEvent::Message(m) = ev.poll().await.unwrap() {
                return m;
            }
        }
    })
    .await
    .expect("the retained message did not come back");
    assert_eq!(got.topic, "pin/measured/1999");
    assert_eq!(got.payload.len(), 32);
}
