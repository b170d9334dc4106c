//! Measures the QoS 1 request/response round trip through the embedded broker, the way a
//! kiosk talks to the daemon: the requester publishes a request (QoS 1) and waits for the
//! responder's answer (QoS 1) on its stable reply topic. Both clients use TCP_NODELAY.
//!
//! `cargo run --release -p pickup-broker --example rtt -- [nodelay|nagle|mqtt://HOST:PORT] [N]`
//! `nodelay` (default) and `nagle` start an embedded broker with `tcp_nodelay` on or off;
//! a URL measures an external broker (e.g. mosquitto) instead.

use std::time::{Duration, Instant};

use pickup_broker::{Broker, BrokerConfig};
use pickup_protocol::client::{link, BrokerUrl, LinkEvent, LinkOptions, Requester};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "nodelay".into());
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(500);

    let mut _broker = None;
    let url = if mode.starts_with("mqtt://") {
        BrokerUrl::parse(&mode)?
    } else {
        let cfg = BrokerConfig {
            listen: "127.0.0.1:0".parse()?,
            tcp_nodelay: mode != "nagle",
            ..BrokerConfig::default()
        };
        let b = Broker::start(cfg)?;
        let url = BrokerUrl::parse(&b.v4_addr().to_string())?;
        _broker = Some(b);
        url
    };

    // Responder: answers every request on its reply_to topic.
    let (responder, mut events) = link(&LinkOptions::new(url.clone(), "rtt-responder"));
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        loop {
            match events.poll().await {
                Ok(LinkEvent::Connected { .. }) => {
                    let _ = responder.subscribe_many(&["rtt/req".to_string()]).await;
                }
                Ok(LinkEvent::SubAck) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(LinkEvent::Message(m)) => {
                    let v: serde_json::Value = match serde_json::from_slice(&m.payload) {
                        Ok(v) => v,
                        Err(_) => continue,
                    };
                    let reply_to = v["reply_to"].as_str().unwrap_or("rtt/none").to_string();
                    let answer =
                        serde_json::json!({"ok": true, "correlation_id": v["correlation_id"]});
                    let _ = responder
                        .publish(
                            &reply_to,
                            true,
                            false,
                            answer.to_string().into_bytes(),
                            None,
                        )
                        .await;
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("responder: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    subscribed_rx.await?;

    let (req, _) = Requester::connect(
        LinkOptions::new(url, "rtt-kiosk"),
        "rtt/kiosk/replies".into(),
        vec![],
        Duration::from_secs(5),
    )
    .await?;
    // Warm-up.
    for _ in 0..20 {
        req.request("rtt/req", serde_json::json!({}), Duration::from_secs(5))
            .await?;
    }
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        req.request(
            "rtt/req",
            serde_json::json!({"x": 1}),
            Duration::from_secs(5),
        )
        .await?;
        rtts.push(t.elapsed());
    }
    rtts.sort();
    let pct = |p: f64| rtts[((rtts.len() - 1) as f64 * p).round() as usize];
    println!(
        "{mode}: n={n} median={:.3} ms p90={:.3} ms p99={:.3} ms max={:.3} ms",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.9).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        rtts[rtts.len() - 1].as_secs_f64() * 1e3,
    );
    Ok(())
}
