//! The in-process connection (`Broker::connect_in_process`): the same events as a
//! network connection, against real network clients of the same broker.

use std::collections::BTreeSet;
use std::time::Duration;

use pickup_broker::{Broker, BrokerConfig};
use pickup_protocol::client::{link, BrokerUrl, Link, LinkEvent, LinkEvents, LinkOptions};

const WAIT: Duration = Duration::from_secs(30);

fn broker() -> Broker {
    Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..BrokerConfig::default()
    })
    .unwrap()
}

/// Polls `ev` until `done` returns true for an event; panics after `WAIT` naming `what`.
async fn until(ev: &mut LinkEvents, what: &str, mut done: impl FnMut(&LinkEvent) -> bool) {
    tokio::time::timeout(WAIT, async {
        loop {
            match ev.poll().await {
                Ok(e) if done(&e) => return,
                Ok(_) => {}
                Err(e) => panic!("{what}: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out: {what}"));
}

/// A network client of `b`, connected.
async fn network(b: &Broker, id: &str) -> (Link, LinkEvents) {
    let url = BrokerUrl::parse(&b.v4_url()).unwrap();
    let (l, mut ev) = link(&LinkOptions::new(url, id));
    until(&mut ev, "CONNACK", |e| {
        matches!(e, LinkEvent::Connected { .. })
    })
    .await;
    (l, ev)
}

/// A network client of `b` that only publishes: its events are polled in the background.
async fn publisher(b: &Broker, id: &str) -> Link {
    let (l, mut ev) = network(b, id).await;
    tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    l
}

async fn subscribed(l: &Link, ev: &mut LinkEvents, filter: &str) {
    l.subscribe_many(&[filter.to_string()]).await.unwrap();
    until(ev, "SUBACK", |e| matches!(e, LinkEvent::SubAck)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_are_reported_sent_then_acknowledged_and_reach_network_subscribers() {
    let b = broker();
    let (sub, mut sub_ev) = network(&b, "watcher").await;
    subscribed(&sub, &mut sub_ev, "jobs/+").await;

    let (l, mut ev) = b.connect_in_process("daemon", false, 100).unwrap();
    until(&mut ev, "CONNACK", |e| {
        matches!(
            e,
            LinkEvent::Connected {
                session_present: false
            }
        )
    })
    .await;

    // 500 at QoS 1 (more than the broker lets be in flight per connection), every
    // tenth at QoS 0.
    let n = 500u16;
    let publishing = async {
        for i in 0..n {
            l.publish(
                &format!("jobs/{i}"),
                i % 10 != 0,
                false,
                vec![b'x'; 100],
                None,
            )
            .await
            .unwrap();
        }
    };
    let mut sent = Vec::new();
    let mut acked = BTreeSet::new();
    let events = until(&mut ev, "every QoS 1 publish acknowledged", |e| {
        match e {
            LinkEvent::PublishSent(p) => sent.push(*p),
            LinkEvent::PubAck(p) => {
                assert!(sent.contains(p), "acknowledged before reported sent: {p}");
                assert!(acked.insert(*p), "acknowledged twice: {p}");
            }
            _ => {}
        }
        acked.len() == usize::from(n - n / 10)
    });
    let mut got = BTreeSet::new();
    let receiving = until(
        &mut sub_ev,
        "every message at the network subscriber",
        |e| {
            if let LinkEvent::Message(m) = e {
                got.insert(m.topic.clone());
            }
            got.len() == usize::from(n)
        },
    );
    tokio::join!(publishing, events, receiving);
    // One report per publish, in call order: QoS 0 as packet id 0, QoS 1 numbered.
    assert_eq!(sent.len(), usize::from(n));
    let expected: Vec<u16> = (0..n)
        .scan(0u16, |k, i| {
            Some(if i % 10 == 0 {
                0
            } else {
                *k += 1;
                *k
            })
        })
        .collect();
    assert_eq!(sent, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_get_retained_messages_and_more_than_the_in_flight_window() {
    let b = broker();
    let (kiosk, mut kiosk_ev) = network(&b, "kiosk").await;
    kiosk
        .publish("state/held", true, true, b"retained".to_vec(), None)
        .await
        .unwrap();
    // Stored before the subscription below (else it would arrive as a live message).
    until(&mut kiosk_ev, "PUBACK", |e| {
        matches!(e, LinkEvent::PubAck(_))
    })
    .await;
    tokio::spawn(async move { while kiosk_ev.poll().await.is_ok() {} });

    let (l, mut ev) = b.connect_in_process("daemon", false, 100).unwrap();
    l.subscribe_many(&["state/#".to_string(), "calls/+".to_string()])
        .await
        .unwrap();
    let mut retained = None;
    until(&mut ev, "the retained message", |e| {
        if let LinkEvent::Message(m) = e {
            retained = Some((m.topic.clone(), m.payload.clone(), m.retain));
        }
        retained.is_some()
    })
    .await;
    assert_eq!(
        retained,
        Some(("state/held".into(), b"retained"[..].into(), true))
    );

    // 1000 QoS 1 messages: the broker stops forwarding at 100 unacknowledged, so all of
    // them arrive only if the in-process side acknowledges and asks for more.
    let n = 1000usize;
    let sending = async {
        for i in 0..n {
            kiosk
                .publish(&format!("calls/{i}"), true, false, vec![b'c'; 50], None)
                .await
                .unwrap();
        }
    };
    let mut got = BTreeSet::new();
    let receiving = until(&mut ev, "1000 messages in process", |e| {
        if let LinkEvent::Message(m) = e {
            if let Some(i) = m.topic.strip_prefix("calls/") {
                got.insert(i.parse::<usize>().unwrap());
            }
        }
        got.len() == n
    });
    tokio::join!(sending, receiving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_client_id_connects_again_on_the_next_poll() {
    let b = broker();
    let (l, mut ev) = b.connect_in_process("daemon", false, 100).unwrap();
    until(&mut ev, "CONNACK", |e| {
        matches!(e, LinkEvent::Connected { .. })
    })
    .await;
    subscribed(&l, &mut ev, "calls/+").await;

    // A network client with the same id: the broker drops the in-process connection.
    let _intruder = publisher(&b, "daemon").await;
    let err = tokio::time::timeout(WAIT, async {
        loop {
            if let Err(e) = ev.poll().await {
                return e;
            }
        }
    })
    .await
    .expect("the in-process connection is dropped");
    assert!(err.to_string().contains("embedded broker"), "{err}");

    // The next poll connects again, reported as a new session (publishes that were in
    // flight are not sent again by the connection); as the daemon does then, subscribe
    // again.
    until(&mut ev, "CONNACK after the takeover", |e| {
        matches!(
            e,
            LinkEvent::Connected {
                session_present: false
            }
        )
    })
    .await;
    subscribed(&l, &mut ev, "calls/+").await;
    let kiosk = publisher(&b, "kiosk").await;
    kiosk
        .publish("calls/1", true, false, b"after".to_vec(), None)
        .await
        .unwrap();
    until(
        &mut ev,
        "a message after the takeover",
        |e| matches!(e, LinkEvent::Message(m) if m.topic == "calls/1"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_publishes_wait_for_room_in_the_in_flight_window() {
    use std::future::Future;
    use std::task::{Context, Waker};

    let b = broker();
    let (l, mut ev) = b.connect_in_process("daemon", false, 10).unwrap();
    for i in 0..10 {
        l.publish(&format!("jobs/{i}"), true, false, b"x".to_vec(), None)
            .await
            .unwrap();
    }
    // Room comes back only with acknowledgements, which only polling the events takes:
    // the eleventh QoS 1 publish cannot go out yet, a QoS 0 one can.
    let mut eleventh = std::pin::pin!(l.publish("jobs/10", true, false, b"x".to_vec(), None));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(eleventh.as_mut().poll(&mut cx).is_pending());
    l.publish("jobs/qos0", false, false, b"x".to_vec(), None)
        .await
        .unwrap();
    until(&mut ev, "a PUBACK", |e| matches!(e, LinkEvent::PubAck(_))).await;
    let sent = tokio::time::timeout(WAIT, eleventh).await;
    assert!(matches!(sent, Ok(Ok(()))), "{sent:?}");
}
