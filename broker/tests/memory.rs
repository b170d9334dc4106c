//! What the embedded broker keeps in memory, measured as the process's resident set.
//! The tests take turns (`SERIAL`) so that one's allocations do not show in the other's.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::Mutex;

use pickup_broker::{Broker, BrokerConfig};
use pickup_protocol::client::{link, BrokerUrl, Link, LinkEvent, LinkEvents, LinkOptions};

const WAIT: Duration = Duration::from_secs(30);

static SERIAL: Mutex<()> = Mutex::const_new(());

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

/// Waits for the PUBACK of a QoS 1 message published after everything else: the broker
/// has then taken everything before it.
async fn barrier(l: &Link, ev: &mut LinkEvents, topic: &str) {
    l.publish(topic, true, false, b"end".to_vec(), None)
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            if let LinkEvent::PubAck(_) = ev.poll().await.unwrap() {
                return;
            }
        }
    })
    .await
    .expect("the barrier was not acknowledged");
}

/// Publishes `pins` retained messages on topics of their own, each followed by `churn`
/// retained messages on one topic that replace each other, pipelined (QoS 0).
async fn publish_pins(l: &Link, ev: &mut LinkEvents, tag: &str, pins: usize, churn: usize) {
    publish_polling(ev, async {
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
    })
    .await;
    barrier(l, ev, "barrier").await;
}

/// Runs `publishing` while polling the link, so that what it publishes flows.
async fn publish_polling(ev: &mut LinkEvents, publishing: impl std::future::Future<Output = ()>) {
    let polling = async {
        loop {
            ev.poll().await.unwrap();
        }
    };
    tokio::select! {
        () = publishing => {}
        () = polling => {}
    }
}

/// A retained message that outlives the messages read with it costs its own size, not
/// the connection's read-buffer block it arrived in (about 10 KiB). Without the broker's
/// copy on store, 4 000 such messages keep about 34 MiB of blocks alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_message_does_not_keep_its_read_buffer_alive() {
    let _turn = SERIAL.lock().await;
    let broker = Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..BrokerConfig::default()
    })
    .unwrap();
    let (l, mut ev) = connect(broker.v4_addr(), "pinner").await;
    // Warm up allocator and buffers so the baseline holds what any run needs.
    publish_pins(&l, &mut ev, "warm", 200, 40).await;
    let before = rss_mib();
    publish_pins(&l, &mut ev, "measured", 4_000, 40).await;
    let grown = rss_mib() - before;
    // Stored: 4 000 small retained messages (about 1 MiB with their map entries).
    assert!(
        grown < 12.0,
        "resident memory grew by {grown:.1} MiB for 4 000 retained messages of 32 bytes"
    );
    // They are all there: a late subscriber gets one of them back.
    l.subscribe_many(&["pin/measured/3999".to_string()])
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
    assert_eq!(got.topic, "pin/measured/3999");
    assert_eq!(got.payload.len(), 32);
}

/// Publishes one small message on each of `n` topics of its own
/// (`calls/<tag><i>/state`), pipelined (QoS 0).
async fn publish_distinct(l: &Link, ev: &mut LinkEvents, tag: &str, n: usize) {
    publish_polling(ev, async {
        for i in 0..n {
            l.publish(
                &format!("calls/{tag}{i}/state"),
                false,
                false,
                b"x".to_vec(),
                None,
            )
            .await
            .unwrap();
        }
    })
    .await;
    barrier(l, ev, &format!("calls/{tag}-barrier/state")).await;
}

/// A topic that was published to once costs nothing once its message is gone from the
/// logs, even with a wildcard subscriber matching it: the broker keeps no per-topic
/// bookkeeping for good (a topic's filters are found by walking the filters' levels; no
/// per-topic counters). The daemon publishes a new topic for every call
/// (`calls/<id>/state`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_published_once_leave_nothing_behind() {
    let _turn = SERIAL.lock().await;
    let broker = Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        // Tiny logs, so that what the messages themselves take stays small.
        segment_size: 1024,
        segment_count: 2,
        ..BrokerConfig::default()
    })
    .unwrap();
    let (watcher, mut wev) = connect(broker.v4_addr(), "watcher").await;
    watcher
        .subscribe_many(&["calls/+/state".to_string()])
        .await
        .unwrap();
    tokio::spawn(async move {
        // Drains whatever reaches the watcher.
        while wev.poll().await.is_ok() {}
    });
    let (l, mut ev) = connect(broker.v4_addr(), "publisher").await;
    // Brings the logs and the allocator to their steady size.
    publish_distinct(&l, &mut ev, "w", 100_000).await;
    let before = rss_mib();
    publish_distinct(&l, &mut ev, "m", 100_000).await;
    let grown = rss_mib() - before;
    // With either of upstream rumqttd's per-topic maps (its unbounded cache of matching
    // filters, its per-topic publish counters) this grew by 12.3 and 13.3 MiB.
    assert!(
        grown < 8.0,
        "resident memory grew by {grown:.1} MiB after one message on each of 100 000 topics"
    );
    drop(watcher);
}

/// A subscription filter costs little before and after its first message: rumqttd as
/// published reserved room for 1024 messages (96 KiB) and 10 parked requests in every
/// filter's log, about 6 KiB resident each, so a fleet of 10 000 handhelds subscribed to
/// their own job topics cost 59 MiB before a single job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_filters_cost_little() {
    let _turn = SERIAL.lock().await;
    let broker = Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..BrokerConfig::default()
    })
    .unwrap();
    let (l, mut ev) = connect(broker.v4_addr(), "handhelds").await;
    // Warm up allocator and buffers.
    subscribe_filters(&l, &mut ev, "warm", 500).await;
    let before = rss_mib();
    subscribe_filters(&l, &mut ev, "jobs", 10_000).await;
    let grown = rss_mib() - before;
    // Measured 12.8 MiB; 59 MiB with the room reserved up front.
    assert!(
        grown < 30.0,
        "resident memory grew by {grown:.1} MiB for 10 000 subscription filters"
    );
    // They work: a message on the last one arrives.
    barrier_on(&l, &mut ev, "jobs/9999").await;
}

/// Subscribes to `<tag>/<i>` for `i` in `0..n`, 100 filters per SUBSCRIBE, each
/// acknowledged before the next.
async fn subscribe_filters(l: &Link, ev: &mut LinkEvents, tag: &str, n: usize) {
    for start in (0..n).step_by(100) {
        let filters: Vec<String> = (start..(start + 100).min(n))
            .map(|i| format!("{tag}/{i}"))
            .collect();
        l.subscribe_many(&filters).await.unwrap();
        tokio::time::timeout(WAIT, async {
            loop {
                if let LinkEvent::SubAck = ev.poll().await.unwrap() {
                    return;
                }
            }
        })
        .await
        .expect("no SUBACK");
    }
}

/// Publishes on `topic` (QoS 1) and waits until the same link receives it.
async fn barrier_on(l: &Link, ev: &mut LinkEvents, topic: &str) {
    l.publish(topic, true, false, b"job".to_vec(), None)
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            if let LinkEvent::Message(m) = ev.poll().await.unwrap() {
                if m.topic == topic {
                    return;
                }
            }
        }
    })
    .await
    .expect("the message on the last filter did not arrive");
}

/// A client on a clean session leaves nothing behind once gone: rumqttd as published
/// kept about 600 B for every client id ever connected, so a kiosk library that picks a
/// fresh id per connection grew the broker with every reconnect, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_fresh_ids_leave_nothing_behind() {
    let _turn = SERIAL.lock().await;
    let broker = Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..BrokerConfig::default()
    })
    .unwrap();
    let addr = broker.v4_addr();
    // Warm up allocator and buffers.
    connect_and_leave(addr, "warm", 500).await;
    let before = rss_mib();
    connect_and_leave(addr, "fresh", 10_000).await;
    let grown = rss_mib() - before;
    // Measured 0.1 MiB; 5.7 MiB with the connection events kept per id.
    assert!(
        grown < 3.0,
        "resident memory grew by {grown:.1} MiB after 10 000 clients with fresh ids came and went"
    );
}

/// Connects `n` clients with ids of their own (`<tag>-<i>`, clean sessions), one after
/// the other, each dropped once its CONNACK is in.
async fn connect_and_leave(addr: SocketAddr, tag: &str, n: usize) {
    for i in 0..n {
        let (l, ev) = connect(addr, &format!("{tag}-{i}")).await;
        drop(l);
        drop(ev);
    }
}
