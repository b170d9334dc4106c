//! Measures what the embedded broker keeps once subscribers have read everything: `N`
//! handhelds, each subscribed at QoS 1 to its own job topic, receive `K` messages of
//! 300 bytes each (what weeks of jobs add up to); the process's heap in use and resident
//! set are read before and after, once the broker has had time to free what was read
//! (and the resident set again after `malloc_trim`, since a burst leaves free pages
//! with the allocator).
//!
//! `cargo run --release -p pickup-broker --example job_topics -- [N] [K]`
//! (default 100 handhelds, 2000 messages each).

use std::time::{Duration, Instant};

use pickup_broker::{Broker, BrokerConfig};
use pickup_protocol::client::{link, BrokerUrl, Link, LinkEvent, LinkEvents, LinkOptions};

type Error = Box<dyn std::error::Error>;

async fn connect(url: &BrokerUrl, id: &str) -> Result<(Link, LinkEvents), Error> {
    let (l, mut ev) = link(&LinkOptions::new(url.clone(), id));
    loop {
        if let LinkEvent::Connected { .. } = ev.poll().await? {
            return Ok((l, ev));
        }
    }
}

/// Heap in use (every arena, mmapped chunks too) and resident set, in MiB.
fn memory() -> (f64, f64) {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    let heap = (m.uordblks + m.hblkhd) as f64 / 1048576.0;
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0;
    (heap, rss)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100);
    let k: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2000);
    let broker = Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse()?,
        ..BrokerConfig::default()
    })?;
    let url = BrokerUrl::parse(&broker.v4_url())?;

    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut readers = Vec::new();
    for i in 0..n {
        let (l, mut ev) = connect(&url, &format!("handheld-{i}")).await?;
        l.subscribe_many(&[format!("jobs/{i}")]).await?;
        loop {
            if let LinkEvent::SubAck = ev.poll().await? {
                break;
            }
        }
        let done = done_tx.clone();
        readers.push(tokio::spawn(async move {
            let _keep = l;
            let mut got = 0;
            // Polls for good (acknowledging), so that the subscription stays.
            while let Ok(e) = ev.poll().await {
                if let LinkEvent::Message(_) = e {
                    got += 1;
                    if got == k {
                        let _ = done.send(());
                    }
                }
            }
        }));
    }
    let (before_heap, before_rss) = memory();

    let (p, mut pev) = connect(&url, "daemon").await?;
    let t0 = Instant::now();
    let publishing = async {
        for round in 0..k {
            for i in 0..n {
                let payload = format!("{{\"job\":{round},\"pad\":\"{}\"}}", "x".repeat(280));
                p.publish(
                    &format!("jobs/{i}"),
                    true,
                    false,
                    payload.into_bytes(),
                    None,
                )
                .await?;
            }
        }
        Ok::<(), Error>(())
    };
    let mut acked = 0;
    let acking = async {
        while acked < n * k {
            if let LinkEvent::PubAck(_) = pev.poll().await? {
                acked += 1;
            }
        }
        Ok::<(), Error>(())
    };
    let (a, b) = tokio::join!(publishing, acking);
    a?;
    b?;
    let sent = t0.elapsed();
    for _ in 0..n {
        done_rx.recv().await.ok_or("a reader stopped")?;
    }
    let read = t0.elapsed();
    // The broker frees what was read at most once a second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after_heap, after_rss) = memory();
    println!(
        "{n} job topics x {k} messages of 300 B, sent in {:.1} s, all read in {:.1} s:",
        sent.as_secs_f64(),
        read.as_secs_f64()
    );
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe { libc::malloc_trim(0) };
    let (_, trimmed_rss) = memory();
    println!(
        "  heap in use {before_heap:.1} -> {after_heap:.1} MiB, RSS {before_rss:.1} -> \
         {after_rss:.1} MiB ({trimmed_rss:.1} MiB once the allocator returns free pages)"
    );
    for r in readers {
        r.abort();
    }
    broker.shutdown();
    Ok(())
}
