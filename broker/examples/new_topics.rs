//! Measures what finding a topic's subscribers costs the embedded broker when many
//! filters exist: `N` handhelds' job-topic filters (`jobs/<i>`), one `calls/+/state`
//! watcher, then `M` messages on `M` topics never seen before (as a call state per call),
//! the same `M` topics once more, and then new subscriptions one at a time.
//!
//! Prints the rate of each round, the heap and resident set the topics added, and the
//! median SUBACK round trip of a new filter.
//!
//! `cargo run --release -p pickup-broker --example new_topics -- [N] [M]`
//! (default 10000 filters, 20000 topics).

mod support;

use std::time::Instant;

use pickup_broker::{Broker, BrokerConfig};
use pickup_protocol::client::{BrokerUrl, Link, LinkEvent, LinkEvents};
use support::{connect, memory, suback, subscribe_jobs, Error};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let m: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let broker = Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse()?,
        ..BrokerConfig::default()
    })?;
    let url = BrokerUrl::parse(&broker.v4_url())?;
    let (sub, mut sev) = connect(&url, "handhelds").await?;
    subscribe_jobs(&sub, &mut sev, n).await?;
    let (watch, mut wev) = connect(&url, "watcher").await?;
    watch.subscribe_many(&["calls/+/state".to_string()]).await?;
    suback(&mut wev).await?;
    let (p, mut pev) = connect(&url, "daemon").await?;
    println!("{n} filters, {m} topics");

    let (heap0, rss0) = memory();
    let first = round(&p, &mut pev, &mut wev, m).await?;
    // The broker frees what every reader has read within a second: wait for it, so that
    // what stays is what the topics left behind.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let (heap1, rss1) = memory();
    let again = round(&p, &mut pev, &mut wev, m).await?;
    println!(
        "  new topics:  {:.0} messages/s ({:.1} µs each)",
        m as f64 / first,
        first * 1e6 / m as f64
    );
    println!(
        "  same topics: {:.0} messages/s ({:.1} µs each)",
        m as f64 / again,
        again * 1e6 / m as f64
    );
    println!(
        "  left behind by the new topics (3 s later): heap +{:.1} MiB, RSS +{:.1} MiB",
        heap1 - heap0,
        rss1 - rss0
    );

    let mut rtts = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        sub.subscribe_many(&[format!("late/{i}")]).await?;
        suback(&mut sev).await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    rtts.sort_by(f64::total_cmp);
    println!(
        "  a new subscription: SUBACK after {:.3} ms (median of 50)",
        rtts[25]
    );
    drop((sub, watch, p));
    broker.shutdown();
    Ok(())
}

/// Publishes one QoS 1 message on each of `calls/0/state` .. `calls/<m-1>/state` and
/// returns the seconds until every PUBACK and every delivery to the watcher arrived.
async fn round(
    p: &Link,
    pev: &mut LinkEvents,
    wev: &mut LinkEvents,
    m: usize,
) -> Result<f64, Error> {
    let t = Instant::now();
    let publishing = async {
        for i in 0..m {
            p.publish(
                &format!("calls/{i}/state"),
                true,
                false,
                b"{}".to_vec(),
                None,
            )
            .await?;
        }
        Ok::<(), Error>(())
    };
    let acking = async {
        let mut acked = 0;
        while acked < m {
            if let LinkEvent::PubAck(_) = pev.poll().await? {
                acked += 1;
            }
        }
        Ok::<(), Error>(())
    };
    let receiving = async {
        let mut got = 0;
        while got < m {
            if let LinkEvent::Message(_) = wev.poll().await? {
                got += 1;
            }
        }
        Ok::<(), Error>(())
    };
    let (a, b, c) = tokio::join!(publishing, acking, receiving);
    a?;
    b?;
    c?;
    Ok(t.elapsed().as_secs_f64())
}
