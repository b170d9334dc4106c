//! An MQTT connection to the embedded broker from inside the same process: packets go to
//! the router's queues directly, with no TCP and no MQTT encoding on either side.
//!
//! The daemon's own connection is the busiest one the broker has (every call arrives on
//! it and every answer, state and notification leaves on it, each with its
//! acknowledgement), and over loopback TCP each of those packets costs a socket write, a
//! read and an encoding on both sides. Through here they cost a queue push. To the
//! daemon it looks like any other [`Link`]: the same events in the same order (every
//! publish reported as sent before its acknowledgement can arrive, QoS 1 with packet
//! ids, retained messages on subscribe), so the outbox and the session logic are the
//! ones used with a network broker.
//!
//! If the router drops the connection (another client took over the client id) the
//! next poll connects again, as a network client would, and reports a new session (it
//! does not send unacknowledged publishes again itself).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex as StdMutex};

use bytes::Bytes;
use pickup_protocol::client::{
    local_link, BoxFuture, Link, LinkError, LinkEvent, LinkEvents, LocalEvents, LocalLink, Message,
};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, PubAck, PubAckReason, Publish, QoS,
    RetainForwardRule, Subscribe, Unsubscribe,
};
use rumqttd::Notification;
use tokio::sync::{Mutex, Notify, Semaphore};

/// Builds a router connection: client id, clean session (the error as text).
pub(crate) type Connect =
    Arc<dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), String> + Send + Sync>;

/// Opens an in-process connection under `client_id`, with at most `inflight` QoS 1
/// publishes not yet acknowledged by the router (as a network client's window: without
/// it nothing would hold a fast publisher back, and the router's queues would grow).
pub(crate) fn open(
    connect: Connect,
    client_id: &str,
    clean_session: bool,
    inflight: u16,
) -> Result<(Link, LinkEvents), LinkError> {
    let (tx, rx, ack) = connect(client_id, clean_session).map_err(closed)?;
    let window = usize::from(inflight.max(1));
    let shared = Arc::new(Shared {
        sent: StdMutex::default(),
        wake: Notify::new(),
        window: Semaphore::new(window),
        window_size: window,
    });
    let sender = Arc::new(Sender {
        tx: Mutex::new(TxState { tx, next_pkid: 0 }),
        shared: shared.clone(),
    });
    let events = Events {
        rx,
        sender: sender.clone(),
        shared,
        connect,
        client_id: client_id.to_string(),
        clean_session,
        pending: first_event(ack).into_iter().collect(),
        acks: Vec::new(),
        wake_router: false,
        broken: false,
    };
    Ok(local_link(sender, Box::new(events)))
}

fn closed(e: impl std::fmt::Display) -> LinkError {
    LinkError::Closed(format!("embedded broker: {e}"))
}

/// The CONNACK of a new router connection as an event.
fn first_event(ack: Notification) -> Option<LinkEvent> {
    match Option::<Packet>::from(ack) {
        Some(Packet::ConnAck(a, _)) => Some(LinkEvent::Connected {
            session_present: a.session_present,
        }),
        _ => None,
    }
}

/// What the sending side tells the event side.
struct Shared {
    /// `PublishSent` events, in the order of the publishes.
    sent: StdMutex<VecDeque<LinkEvent>>,
    /// Wakes a poll waiting on the router.
    wake: Notify,
    /// One permit per QoS 1 publish that may still go out; given back on its PUBACK.
    window: Semaphore,
    window_size: usize,
}

struct TxState {
    tx: LinkTx,
    next_pkid: u16,
}

impl TxState {
    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }

    /// Queues `packet` for the router and tells it.
    async fn send(&mut self, packet: Packet) -> Result<(), LinkError> {
        self.tx.buffer().push_back(packet);
        self.tx.notify().await.map_err(closed)
    }
}

/// The sending side (shared by every clone of the [`Link`]).
struct Sender {
    /// A tokio mutex: held while telling the router, so that packets keep call order.
    tx: Mutex<TxState>,
    shared: Arc<Shared>,
}

impl LocalLink for Sender {
    fn publish(
        &self,
        topic: &str,
        qos1: bool,
        retain: bool,
        payload: Vec<u8>,
    ) -> BoxFuture<'_, Result<(), LinkError>> {
        let topic = Bytes::copy_from_slice(topic.as_bytes());
        Box::pin(async move {
            if qos1 {
                // Taken before the lock, so waiting for room blocks no other call.
                self.shared.window.acquire().await.map_err(closed)?.forget();
            }
            let mut st = self.tx.lock().await;
            let pkid = if qos1 { st.pkid() } else { 0 };
            // Reported before the router has the packet, so before it can be acknowledged.
            if let Ok(mut q) = self.shared.sent.lock() {
                q.push_back(LinkEvent::PublishSent(pkid));
            }
            self.shared.wake.notify_one();
            let qos = if qos1 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            };
            st.send(Packet::Publish(
                Publish::with_qos(topic, Bytes::from(payload), qos, pkid, retain),
                None,
            ))
            .await
        })
    }

    fn subscribe(&self, filters: &[String]) -> BoxFuture<'_, Result<(), LinkError>> {
        let filters: Vec<Filter> = filters
            .iter()
            .map(|f| Filter {
                path: f.clone(),
                qos: QoS::AtLeastOnce,
                nolocal: false,
                preserve_retain: false,
                // As an MQTT 3.1.1 SUBSCRIBE: retained messages on every subscribe.
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            })
            .collect();
        Box::pin(async move {
            let mut st = self.tx.lock().await;
            let pkid = st.pkid();
            st.send(Packet::Subscribe(Subscribe { pkid, filters }, None))
                .await
        })
    }

    fn unsubscribe(&self, filter: &str) -> BoxFuture<'_, Result<(), LinkError>> {
        let filters = vec![filter.to_string()];
        Box::pin(async move {
            let mut st = self.tx.lock().await;
            let pkid = st.pkid();
            st.send(Packet::Unsubscribe(Unsubscribe { pkid, filters }, None))
                .await
        })
    }

    fn disconnect(&self) -> BoxFuture<'_, Result<(), LinkError>> {
        Box::pin(async move {
            let mut st = self.tx.lock().await;
            st.send(Packet::Disconnect(
                Disconnect {
                    reason_code: DisconnectReasonCode::NormalDisconnection,
                },
                None,
            ))
            .await
        })
    }
}

/// The event side.
struct Events {
    rx: LinkRx,
    sender: Arc<Sender>,
    shared: Arc<Shared>,
    connect: Connect,
    client_id: String,
    clean_session: bool,
    /// Events ready to be reported (the CONNACK).
    pending: VecDeque<LinkEvent>,
    /// Acknowledgements owed for QoS 1 messages already reported.
    acks: Vec<u16>,
    /// The router asked to be told when this side is ready again (`Unschedule`).
    wake_router: bool,
    /// The router dropped the connection: the next poll connects again.
    broken: bool,
}

impl Events {
    /// Work left over from the previous poll. Runs before anything new is taken, so that
    /// a poll cancelled here (the caller's `select!`) loses nothing: the acknowledgements
    /// stay queued and the router is told again next time.
    async fn settle(&mut self) -> Result<(), LinkError> {
        if !self.acks.is_empty() {
            let mut st = self.sender.tx.lock().await;
            for pkid in &self.acks {
                st.tx.buffer().push_back(Packet::PubAck(
                    PubAck {
                        pkid: *pkid,
                        reason: PubAckReason::Success,
                    },
                    None,
                ));
            }
            self.acks.clear();
            st.tx.notify().await.map_err(closed)?;
        }
        if self.wake_router {
            self.rx.wake().await.map_err(closed)?;
            self.wake_router = false;
        }
        Ok(())
    }

    /// Connects again after the router dropped the connection.
    async fn reconnect(&mut self) -> Result<LinkEvent, LinkError> {
        let (tx, rx, ack) = (self.connect)(&self.client_id, self.clean_session).map_err(closed)?;
        let mut st = self.sender.tx.lock().await;
        st.tx = tx;
        self.rx = rx;
        // Publishes the old connection never acknowledged will not be: open the window.
        let taken = self.shared.window_size - self.shared.window.available_permits();
        self.give_back(taken);
        self.acks.clear();
        self.wake_router = false;
        self.broken = false;
        match first_event(ack) {
            // Reported as a new session whatever the router kept: unlike a network
            // client, this one does not send its unacknowledged publishes again, so its
            // user must (the daemon re-sends the outbox rows in flight on a lost session).
            Some(LinkEvent::Connected { .. }) => Ok(LinkEvent::Connected {
                session_present: false,
            }),
            _ => Err(closed("no connection acknowledgement")),
        }
    }

    /// Gives `n` permits back to the publish window, never beyond its size.
    fn give_back(&self, n: usize) {
        let room = self.shared.window_size - self.shared.window.available_permits();
        self.shared.window.add_permits(n.min(room));
    }

    /// One notification from the router, as an event (None: nothing to report).
    fn event(&mut self, n: Notification) -> Result<Option<LinkEvent>, LinkError> {
        let Some(packet) = Option::<Packet>::from(n) else {
            self.wake_router = true;
            return Ok(None);
        };
        Ok(Some(match packet {
            Packet::Publish(p, props) => {
                if p.qos() == QoS::AtLeastOnce {
                    self.acks.push(p.pkid());
                }
                let (response_topic, correlation_data) = match props {
                    Some(pr) => (pr.response_topic, pr.correlation_data.map(|b| b.to_vec())),
                    None => (None, None),
                };
                LinkEvent::Message(Message {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload,
                    retain: p.retain,
                    response_topic,
                    correlation_data,
                })
            }
            Packet::PubAck(a, _) => {
                self.give_back(1);
                LinkEvent::PubAck(a.pkid)
            }
            Packet::SubAck(..) => LinkEvent::SubAck,
            Packet::ConnAck(a, _) => LinkEvent::Connected {
                session_present: a.session_present,
            },
            Packet::Disconnect(..) => {
                self.broken = true;
                return Err(LinkError::Connection(
                    "the embedded broker dropped the in-process connection".into(),
                ));
            }
            _ => LinkEvent::Other,
        }))
    }
}

impl LocalEvents for Events {
    fn poll(&mut self) -> BoxFuture<'_, Result<LinkEvent, LinkError>> {
        Box::pin(async move {
            if self.broken {
                return self.reconnect().await;
            }
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            self.settle().await?;
            loop {
                let sent = self.shared.sent.lock().ok().and_then(|mut q| q.pop_front());
                if let Some(e) = sent {
                    return Ok(e);
                }
                tokio::select! {
                    biased;
                    () = self.shared.wake.notified() => {}
                    n = self.rx.next() => match n {
                        Ok(Some(n)) => {
                            if let Some(e) = self.event(n)? {
                                return Ok(e);
                            }
                            self.settle().await?;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            self.broken = true;
                            return Err(closed(e));
                        }
                    },
                }
            }
        })
    }
}
