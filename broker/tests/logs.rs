//! The subscription filters' logs of the embedded broker: what every reader has read is
//! freed (vendor/README.md, patch 9), and nothing a reader may still need is.
//!
//! Heap in use (`mallinfo2`, all arenas) shows the broker freeing a log's entries. Every
//! wait here is for a condition with a deadline; the broker frees read entries within a second.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use pickup_broker::{Broker, BrokerConfig};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

const WAIT: Duration = Duration::from_secs(30);
const MIB: usize = 1024 * 1024;
/// Messages of 1 KiB on the filter under test.
const JOBS: usize = 2000;
/// Messages of 1 KiB on the canary filter (about 3 MiB of log entries).
const CANARY: usize = 3000;

/// Bytes the allocator has handed out and not had back (every arena, mmapped chunks too).
fn heap_in_use() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    m.uordblks + m.hblkhd
}

/// Waits until the heap in use is at most `at_most`; panics after `WAIT` naming `what`.
async fn heap_falls_to(at_most: usize, what: &str) {
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        let now = heap_in_use();
        if now <= at_most {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{what}: heap in use stayed at {:.1} MiB, above {:.1} MiB",
            now as f64 / MIB as f64,
            at_most as f64 / MIB as f64
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `ev` until `done` returns true for an event.
async fn poll_until(ev: &mut EventLoop, what: &str, mut done: impl FnMut(&Event) -> bool) {
    tokio::time::timeout(WAIT, async {
        loop {
            let event = ev.poll().await.expect("connection lost");
            if done(&event) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out: {what}"));
}

fn is_suback(e: &Event) -> bool {
    matches!(e, Event::Incoming(Packet::SubAck(_)))
}

/// A client; `clean` false keeps its session on the broker between connections.
fn client(addr: SocketAddr, id: &str, clean: bool, manual_acks: bool) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(64 * 1024, 64 * 1024);
    o.set_clean_session(clean);
    o.set_manual_acks(manual_acks);
    AsyncClient::new(o, 256)
}

/// A client subscribed to `filter` at QoS 1 (SUBACK received).
async fn subscribed(addr: SocketAddr, id: &str, filter: &str) -> (AsyncClient, EventLoop) {
    let (c, mut ev) = client(addr, id, true, false);
    c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    poll_until(&mut ev, "SUBACK", is_suback).await;
    (c, ev)
}

/// Publishes `n` QoS 1 messages of 1 KiB on `<prefix>/<i>` and waits for every PUBACK.
async fn publish(c: &AsyncClient, ev: &mut EventLoop, prefix: &str, n: usize) {
    let sending = async {
        for i in 0..n {
            c.publish(
                format!("{prefix}/{i}"),
                QoS::AtLeastOnce,
                false,
                vec![b'x'; 1024],
            )
            .await
            .unwrap();
        }
    };
    let mut acked = 0;
    let acking = poll_until(ev, "PUBACKs", |e| {
        if matches!(e, Event::Incoming(Packet::PubAck(_))) {
            acked += 1;
        }
        acked == n
    });
    tokio::join!(sending, acking);
}

/// Receives until `n` distinct messages under `prefix/` have arrived (acknowledging each
/// when `ack` is given); returns how many arrived in all, duplicates included.
async fn receive(
    ev: &mut EventLoop,
    ack: Option<&AsyncClient>,
    prefix: &str,
    n: usize,
) -> (BTreeSet<usize>, usize) {
    let mut seen = BTreeSet::new();
    let mut all = 0;
    let mut to_ack = Vec::new();
    poll_until(ev, &format!("{n} messages on {prefix}/"), |e| {
        if let Event::Incoming(Packet::Publish(p)) = e {
            let i = p
                .topic
                .strip_prefix(&format!("{prefix}/"))
                .and_then(|i| i.parse().ok())
                .expect("a message on another topic");
            seen.insert(i);
            all += 1;
            to_ack.push(p.clone());
        }
        seen.len() == n
    })
    .await;
    if let Some(c) = ack {
        for p in &to_ack {
            c.ack(p).await.unwrap();
        }
    }
    (seen, all)
}

/// Proves that the broker has freed entries since the call: a reader of `canary/#` reads
/// `CANARY` new messages (about 3 MiB of log entries), then the heap in use must come
/// back to within half of that of where it was before them. The broker may free them
/// while they are still arriving (it looks every 100 ms), so the level before is the
/// reference, not a peak measured afterwards. Whatever the broker freed in that pass, it
/// decided with the state the test holds meanwhile.
async fn a_trim_has_run(p: &AsyncClient, pev: &mut EventLoop, cev: &mut EventLoop, round: &str) {
    let prefix = format!("canary{round}");
    let before = heap_in_use();
    let reading = receive(cev, None, &prefix, CANARY);
    let ((seen, _), ()) = tokio::join!(reading, publish(p, pev, &prefix, CANARY));
    assert_eq!(seen.len(), CANARY);
    heap_falls_to(before + 3 * MIB / 2, &format!("canary round {round} freed")).await;
}

/// A subscriber that stops acknowledging (QoS 1 messages in flight), then drops off with
/// a persistent session while another subscriber of the same filter reads everything:
/// the log is trimmed meanwhile, and still the first one, back, gets every message. Once
/// every reader has read and acknowledged, the log's entries are freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_entries_are_freed_and_no_reader_loses_one() {
    let broker = Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        // Logs far larger than the test's traffic: nothing falls out by size, so any
        // message lost was freed too early.
        segment_size: 16 * MIB,
        segment_count: 4,
        ..BrokerConfig::default()
    })
    .unwrap();
    let addr = broker.v4_addr();

    // The slow reader: persistent session, acknowledges only when told.
    let (slow, mut slow_ev) = client(addr, "slow", false, true);
    slow.subscribe("jobs/#", QoS::AtLeastOnce).await.unwrap();
    poll_until(&mut slow_ev, "SUBACK", is_suback).await;
    let (_fast, mut fast_ev) = subscribed(addr, "fast", "jobs/#").await;
    let (_canary, mut canary_ev) = subscribed(addr, "canary", "canary0/#").await;
    _canary
        .subscribe("canary1/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    poll_until(&mut canary_ev, "SUBACK", is_suback).await;
    let (p, mut pev) = client(addr, "publisher", true, false);

    let before_jobs = heap_in_use();
    let (fast_got, (slow_got, _)) = {
        let fast = receive(&mut fast_ev, None, "jobs", JOBS);
        // The slow one gets what its in-flight window holds and acknowledges none.
        let slow = async {
            let mut got = BTreeSet::new();
            poll_until(&mut slow_ev, "the slow reader's first messages", |e| {
                if let Event::Incoming(Packet::Publish(p)) = e {
                    got.insert(p.topic.clone());
                }
                got.len() >= 50
            })
            .await;
            (got, 0)
        };
        let (f, s, ()) = tokio::join!(fast, slow, publish(&p, &mut pev, "jobs", JOBS));
        (f.0, s)
    };
    assert_eq!(fast_got.len(), JOBS);
    assert!(slow_got.len() >= 50);
    let jobs_held = heap_in_use();
    assert!(
        jobs_held > before_jobs + MIB,
        "the jobs' log holds about 2 MiB: {:.1} → {:.1} MiB",
        before_jobs as f64 / MIB as f64,
        jobs_held as f64 / MIB as f64
    );

    // Trimmed while the slow reader's messages are in flight, unacknowledged.
    a_trim_has_run(&p, &mut pev, &mut canary_ev, "0").await;
    // It drops off without a word; its session (and position) stays on the broker.
    drop(slow_ev);
    drop(slow);
    // Trimmed while it is away.
    a_trim_has_run(&p, &mut pev, &mut canary_ev, "1").await;

    // Back with its session: every job arrives, the unacknowledged ones again.
    let (slow, mut slow_ev) = client(addr, "slow", false, false);
    let (seen, all) = receive(&mut slow_ev, None, "jobs", JOBS).await;
    assert_eq!(seen.len(), JOBS, "the slow reader lost messages");
    assert!(all >= JOBS);

    // Everyone has read and acknowledged every job: their entries are freed (at least
    // half of what the log held; some may have gone while the slow reader caught up).
    heap_falls_to((before_jobs + jobs_held) / 2, "the read jobs freed").await;
    drop(slow);
    broker.shutdown();
}
