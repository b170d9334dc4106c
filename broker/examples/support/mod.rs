//! What the broker's measuring examples share: connecting, handhelds on their own job
//! topics, publishing jobs with every PUBACK awaited, and reading memory figures.

#![allow(dead_code)] // Each example uses its own part.

use pickup_protocol::client::{link, BrokerUrl, Link, LinkEvent, LinkEvents, LinkOptions};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::task::JoinHandle;

pub type Error = Box<dyn std::error::Error>;

/// A client connected as `id` (CONNACK received).
pub async fn connect(url: &BrokerUrl, id: &str) -> Result<(Link, LinkEvents), Error> {
    let (l, mut ev) = link(&LinkOptions::new(url.clone(), id));
    loop {
        if let LinkEvent::Connected { .. } = ev.poll().await? {
            return Ok((l, ev));
        }
    }
}

/// Waits for the next SUBACK on `ev`.
pub async fn suback(ev: &mut LinkEvents) -> Result<(), Error> {
    loop {
        if let LinkEvent::SubAck = ev.poll().await? {
            return Ok(());
        }
    }
}

/// Subscribes `sub` to `jobs/0` .. `jobs/<n-1>` (as `n` handhelds' job topics), 100
/// filters per SUBSCRIBE, each acknowledged before the next.
pub async fn subscribe_jobs(sub: &Link, sev: &mut LinkEvents, n: usize) -> Result<(), Error> {
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let filters: Vec<String> = chunk.iter().map(|i| format!("jobs/{i}")).collect();
        sub.subscribe_many(&filters).await?;
        suback(sev).await?;
    }
    Ok(())
}

/// Connects `n` handhelds (`handheld-<i>`), each subscribed to its own `jobs/<i>` and
/// polled by a task of its own for good; each reports on the returned channel once it
/// has received `k` messages.
pub async fn handhelds(
    url: &BrokerUrl,
    n: usize,
    k: usize,
) -> Result<(Vec<JoinHandle<()>>, UnboundedReceiver<()>), Error> {
    let (done_tx, done_rx) = unbounded_channel::<()>();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (l, mut ev) = connect(url, &format!("handheld-{i}")).await?;
        l.subscribe_many(&[format!("jobs/{i}")]).await?;
        suback(&mut ev).await?;
        let done = done_tx.clone();
        tasks.push(tokio::spawn(async move {
            let _keep = l;
            let mut got = 0;
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
    Ok((tasks, done_rx))
}

/// Publishes `rounds` job messages of about 300 bytes on each of `jobs/0` to
/// `jobs/<n-1>` (QoS 1, round by round) and waits for every PUBACK.
pub async fn publish_jobs(
    p: &Link,
    pev: &mut LinkEvents,
    n: usize,
    rounds: usize,
) -> Result<(), Error> {
    let publishing = async {
        for round in 0..rounds {
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
    let acking = async {
        let mut acked = 0;
        while acked < n * rounds {
            if let LinkEvent::PubAck(_) = pev.poll().await? {
                acked += 1;
            }
        }
        Ok::<(), Error>(())
    };
    let (a, b) = tokio::join!(publishing, acking);
    a?;
    b
}

/// Resident set of process `pid` ("self" for this one), in MiB.
pub fn rss_mib(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// This process's heap in use (every arena, mmapped chunks too) and resident set, in MiB.
pub fn memory() -> (f64, f64) {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    let heap = (m.uordblks + m.hblkhd) as f64 / 1048576.0;
    (heap, rss_mib("self"))
}
