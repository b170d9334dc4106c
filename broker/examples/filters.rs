//! Measures what a distinct subscription filter costs the embedded broker: `N` filters
//! of their own (as `N` handhelds each subscribed to their job topic), one message
//! published on each so that every filter's log has held something, and the process's
//! heap in use and resident set before and after.
//!
//! `cargo run --release -p pickup-broker --example filters -- [N]` (default 10000).

mod support;

use pickup_broker::{Broker, BrokerConfig};
use pickup_protocol::client::{BrokerUrl, LinkEvent};
use support::{connect, memory, publish_jobs, subscribe_jobs, Error};

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

    subscribe_jobs(&sub, &mut sev, n).await?;
    let (heap1, rss1) = memory();

    // One message on each, all received (and acknowledged).
    let receiving = async {
        let mut got = 0;
        while got < n {
            if let LinkEvent::Message(_) = sev.poll().await? {
                got += 1;
            }
        }
        Ok::<(), Error>(())
    };
    let (a, b) = tokio::join!(publish_jobs(&p, &mut pev, n, 1), receiving);
    a?;
    b?;
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
