//! Measures what a distinct subscription filter costs the embedded broker: `N` filters
//! of their own (as `N` handhelds each subscribed to their job topic), one message
//! published on each so that every filter's log has held something, and the process's
//! heap in use and resident set before and after.
//!
//! `cargo run --release -p pickup-broker --example filters -- [N]` (default 10000).

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
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let broker = Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse()?,
        ..BrokerConfig::default()
    })?;
    let url = BrokerUrl::parse(&broker.v4_url())?;
    let (sub, mut sev) = connect(&url, "handhelds").await?;
    let (p, mut pev) = connect(&url, "daemon").await?;
    let (heap0, rss0) = memory();

    // Subscribe in batches, each acknowledged before the next.
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let filters: Vec<String> = chunk.iter().map(|i| format!("jobs/{i}")).collect();
        sub.subscribe_many(&filters).await?;
        loop {
            if let LinkEvent::SubAck = sev.poll().await? {
                break;
            }
        }
    }
    let (heap1, rss1) = memory();

    // One message on each, all received (and acknowledged).
    let publishing = async {
        for i in 0..n {
            p.publish(&format!("jobs/{i}"), true, false, vec![b'j'; 300], None)
                .await?;
        }
        Ok::<(), Error>(())
    };
    let acking = async {
        let mut acked = 0;
        while acked < n {
            if let LinkEvent::PubAck(_) = pev.poll().await? {
                acked += 1;
            }
        }
        Ok::<(), Error>(())
    };
    let receiving = async {
        let mut got = 0;
        while got < n {
            if let LinkEvent::Message(_) = sev.poll().await? {
                got += 1;
            }
        }
        Ok::<(), Error>(())
    };
    let (a, b, c) = tokio::join!(publishing, acking, receiving);
    a?;
    b?;
    c?;
    let (heap2, rss2) = memory();
    let per = |a: f64, b: f64| (b - a) * 1048576.0 / n as f64 / 1024.0;
    println!("{n} distinct filters:");
    println!(
        "  subscribed: heap +{:.1} MiB ({:.1} KiB each), RSS +{:.1} MiB ({:.1} KiB each)",
        heap1 - heap0,
        per(heap0, heap1),
        rss1 - rss0,
        per(rss0, rss1)
    );
    println!(
        "  one message on each, read: heap +{:.1} MiB ({:.1} KiB each), RSS +{:.1} MiB ({:.1} KiB each)",
        heap2 - heap0,
        per(heap0, heap2),
        rss2 - rss0,
        per(rss0, rss2)
    );
    drop(sub);
    drop(p);
    broker.shutdown();
    Ok(())
}
