//! Measures what the embedded broker keeps once subscribers have read everything: `N`
//! handhelds, each subscribed at QoS 1 to its own job topic, receive `K` messages of
//! 300 bytes each (what weeks of jobs add up to); the process's heap in use and resident
//! set are read before and after, once the broker has had time to free what was read
//! (and the resident set again after `malloc_trim`, since a burst leaves free pages
//! with the allocator).
//!
//! `cargo run --release -p pickup-broker --example job_topics -- [N] [K]`
//! (default 100 handhelds, 2000 messages each).

mod support;

use std::time::{Duration, Instant};

use pickup_broker::{Broker, BrokerConfig};
use pickup_protocol::client::BrokerUrl;
use support::{connect, handhelds, memory, publish_jobs, Error};

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

    let (readers, mut done_rx) = handhelds(&url, n, k).await?;
    let (before_heap, before_rss) = memory();

    let (p, mut pev) = connect(&url, "daemon").await?;
    let t0 = Instant::now();
    publish_jobs(&p, &mut pev, n, k).await?;
    let sent = t0.elapsed();
    for _ in 0..n {
        done_rx.recv().await.ok_or("a reader stopped")?;
    }
    let read = t0.elapsed();
    // The broker frees what was read within a second.
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
