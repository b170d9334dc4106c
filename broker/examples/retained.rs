//! Measures what a subscription costs the embedded broker when many retained messages are
//! held: one retained state per call is what the daemon keeps for `store.state_hours`.
//! A client subscribes to one call's state topic and waits for its retained message,
//! many times, while `N` retained messages are held; then the same with a wildcard
//! filter over one courier's topics (one retained message under it).
//!
//! `cargo run --release -p pickup-broker --example retained -- [N] [SUBSCRIPTIONS]`
//! (default 100000 retained messages, 200 subscriptions each).

use std::time::{Duration, Instant};

use pickup_broker::{Broker, BrokerConfig};
use pickup_protocol::client::{link, BrokerUrl, Link, LinkEvent, LinkEvents, LinkOptions};

async fn connect(
    url: &BrokerUrl,
    id: &str,
) -> Result<(Link, LinkEvents), Box<dyn std::error::Error>> {
    let (l, mut ev) = link(&LinkOptions::new(url.clone(), id));
    loop {
        if let LinkEvent::Connected { .. } = ev.poll().await? {
            return Ok((l, ev));
        }
    }
}

/// Subscribes to `filter` and waits for the first message: the retained one.
async fn subscribe_and_receive(
    l: &Link,
    ev: &mut LinkEvents,
    filter: &str,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    l.subscribe_many(&[filter.to_string()]).await?;
    loop {
        if let LinkEvent::Message(_) = ev.poll().await? {
            return Ok(t0.elapsed());
        }
    }
}

fn report(what: &str, mut v: Vec<Duration>) {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    println!(
        "{what:44} p50 {:8.3} ms   p99 {:8.3} ms   max {:8.3} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let subs: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200);

    let broker = Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse()?,
        ..BrokerConfig::default()
    })?;
    let url = BrokerUrl::parse(&broker.v4_addr().to_string())?;

    // The retained states, pipelined; a QoS 1 message after them says they are all in.
    let (publisher, mut pev) = connect(&url, "retained-publisher").await?;
    let publishing = async {
        for i in 0..n {
            let topic = format!("pickup/v1/site/calls/c{i:08}/state");
            publisher
                .publish(
                    &topic,
                    false,
                    true,
                    br#"{"status":"completed"}"#.to_vec(),
                    None,
                )
                .await?;
        }
        for c in 0..subs {
            let topic = format!("pickup/v1/site/couriers/k{c}/job");
            publisher
                .publish(&topic, false, true, b"{}".to_vec(), None)
                .await?;
        }
        publisher
            .publish("pickup/v1/site/barrier", true, false, b"end".to_vec(), None)
            .await?;
        Ok::<(), Box<dyn std::error::Error>>(())
    };
    let acked = async {
        loop {
            if let LinkEvent::PubAck(_) = pev.poll().await? {
                return Ok::<(), Box<dyn std::error::Error>>(());
            }
        }
    };
    let (p, a) = tokio::join!(publishing, acked);
    p?;
    a?;
    println!("{n} retained messages held");

    let (l, mut ev) = connect(&url, "retained-subscriber").await?;
    let mut exact = Vec::with_capacity(subs);
    let mut wildcard = Vec::with_capacity(subs);
    for k in 0..subs {
        let i = (k * 7919) % n.max(1);
        let f = format!("pickup/v1/site/calls/c{i:08}/state");
        exact.push(subscribe_and_receive(&l, &mut ev, &f).await?);
        l.unsubscribe(&f).await?;
        // Distinct filters: rumqttd does not send retained messages again to a filter
        // subscribed before.
        let f = format!("pickup/v1/site/couriers/k{k}/#");
        wildcard.push(subscribe_and_receive(&l, &mut ev, &f).await?);
        l.unsubscribe(&f).await?;
    }
    report("subscribe to one call's state → retained", exact);
    report("subscribe to couriers/<id>/# → retained", wildcard);
    Ok(())
}
