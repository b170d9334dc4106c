//! Which of our publishes the broker has acknowledged, from the client's event stream alone.
//!
//! The MQTT client reports `PublishSent(pkid)` when it writes a publish and `PubAck(pkid)`
//! when the broker acknowledges it; it never says *which* publish a packet id belongs to.
//! The agent needs to know: a clean shutdown disconnects only once the broker holds the
//! "offline" presence (else the last will would say it), and the backlog of unacknowledged
//! publishes decides whether location reports are skipped. This module keeps the mapping,
//! mirroring what rumqttc does with its requests:
//!
//! - requests are written in the order they were handed to the client, each producing one
//!   `PublishSent` (QoS 0 ones with packet id 0);
//! - on a connection error every unacknowledged publish and every request still waiting in
//!   the client's channel moves to its "pending" list; on the next CONNACK that list is
//!   re-sent when the broker kept the session (unacknowledged ones keep their packet id,
//!   the others get new ones in order) and dropped when it did not;
//! - events already produced before an error (a `PublishSent` whose write then failed, acks
//!   read in the same batch) are still handed out after the reconnect, before anything the
//!   new connection does.
//!
//! The agent publishes nothing between an error and the SUBACK of the subscription it makes
//! on every CONNACK. Everything that arrives before that SUBACK therefore belongs to the
//! previous connection, and everything after it to the new one, so attribution is exact.
//!
//! Courier replies are tracked like every other publish, but a broker acknowledgement does
//! not take them out of the device's queue: only the daemon's answer does (see
//! [`crate::agent`]), because a broker that has just restarted acknowledges and drops a
//! publish nobody subscribes to yet.

use std::collections::{HashMap, VecDeque};

/// What a publish was, so its acknowledgement can be acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tag {
    /// A courier reply (it leaves the queue when the daemon answers, not on the ack).
    Reply(String),
    /// The retained "offline" presence sent at a clean shutdown.
    Offline,
    /// Anything else (presence online, location): tracked only to keep the order.
    Other,
}

/// Where the connection is, as far as publishing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No connection; nothing may be published.
    Down,
    /// CONNACK seen, waiting for the SUBACK that ends the previous connection's events.
    Subscribing {
        /// Whether the broker kept the session (and so re-sends our unacknowledged publishes).
        session_present: bool,
    },
    /// Publishing allowed.
    Ready,
}

/// The mapping from packet ids to our publishes. Pure state: no I/O, no clock.
#[derive(Debug)]
pub struct Tracker {
    phase: Phase,
    /// Handed to the client, no `PublishSent` yet, in order.
    unsent: VecDeque<Tag>,
    /// Written with a packet id, no `PubAck` yet.
    inflight: HashMap<u16, Tag>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

impl Tracker {
    /// A tracker for a client that has not connected yet.
    pub fn new() -> Self {
        Self {
            phase: Phase::Down,
            unsent: VecDeque::new(),
            inflight: HashMap::new(),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether publishing is allowed now.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// Publishes handed to the client and not yet acknowledged (or dropped).
    pub fn outstanding(&self) -> usize {
        self.unsent.len() + self.inflight.len()
    }

    /// Records a publish just handed to the client. Only call this when [`Tracker::is_ready`].
    pub fn published(&mut self, tag: Tag) {
        debug_assert!(self.is_ready(), "publish outside the ready phase");
        self.unsent.push_back(tag);
    }

    /// The client wrote a publish with this packet id (0 for QoS 0).
    pub fn publish_sent(&mut self, pkid: u16) {
        if pkid != 0 && self.inflight.contains_key(&pkid) {
            // A retransmission of an unacknowledged publish from a resumed session.
            return;
        }
        match self.unsent.pop_front() {
            Some(tag) if pkid != 0 => {
                self.inflight.insert(pkid, tag);
            }
            // QoS 0 (never acknowledged), or an event of a request dropped with the session.
            _ => {}
        }
    }

    /// The broker acknowledged this packet id; returns what it was, if we know.
    pub fn puback(&mut self, pkid: u16) -> Option<Tag> {
        self.inflight.remove(&pkid)
    }

    /// The connection failed (or a connect attempt did).
    pub fn disconnected(&mut self) {
        // Everything outstanding now sits in the client's pending list: it is re-sent or
        // dropped on the next CONNACK, decided by `connected`.
        self.phase = Phase::Down;
    }

    /// CONNACK. Returns nothing to do: the caller subscribes and waits for the SUBACK.
    pub fn connected(&mut self, session_present: bool) {
        if !session_present {
            // The client dropped its pending list; stale `PublishSent` events still to come
            // find `unsent` empty and are ignored.
            self.unsent.clear();
            self.inflight.clear();
        }
        self.phase = Phase::Subscribing { session_present };
    }

    /// SUBACK. Returns true when this made the link ready (the caller then publishes
    /// presence and replays the queue).
    pub fn subscribed(&mut self) -> bool {
        if matches!(self.phase, Phase::Subscribing { .. }) {
            self.phase = Phase::Ready;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Tracker {
        let mut t = Tracker::new();
        t.connected(false);
        assert!(t.subscribed());
        t
    }

    fn reply(id: &str) -> Tag {
        Tag::Reply(id.into())
    }

    #[test]
    fn in_order_publishes_map_to_their_acks() {
        let mut t = ready();
        t.published(Tag::Other);
        t.published(reply("a"));
        t.published(Tag::Other); // a QoS 0 location
        t.published(reply("b"));
        t.publish_sent(1);
        t.publish_sent(2);
        t.publish_sent(0);
        t.publish_sent(3);
        assert_eq!(t.puback(3), Some(reply("b")));
        assert_eq!(t.puback(1), Some(Tag::Other));
        assert_eq!(t.puback(2), Some(reply("a")));
        assert_eq!(t.puback(2), None);
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn resumed_session_retransmits_keep_their_reply() {
        let mut t = ready();
        t.published(reply("a"));
        t.published(reply("b"));
        t.publish_sent(7);
        // "b" still in the client's channel when the link drops.
        t.disconnected();
        t.connected(true);
        // The client re-sends "a" with its old id, then "b" with a new one.
        t.publish_sent(7);
        t.publish_sent(8);
        assert!(t.subscribed());
        assert_eq!(t.puback(8), Some(reply("b")));
        assert_eq!(t.puback(7), Some(reply("a")));
    }

    #[test]
    fn lost_session_forgets_everything_and_ignores_stale_events() {
        let mut t = ready();
        t.published(reply("a"));
        t.published(reply("b"));
        t.publish_sent(3); // "a" written, then the write of "b" fails after its event
        t.disconnected();
        t.connected(false);
        // The event of the failed write is handed out after the CONNACK.
        t.publish_sent(4);
        assert!(t.subscribed());
        // New connection: new publishes map correctly despite the stale event.
        t.published(reply("c"));
        t.publish_sent(5);
        assert_eq!(t.puback(3), None);
        assert_eq!(t.puback(4), None);
        assert_eq!(t.puback(5), Some(reply("c")));
    }

    #[test]
    fn stale_event_before_connack_is_attributed() {
        // MQTT 5 client: buffered events come out before the CONNACK.
        let mut t = ready();
        t.published(reply("a"));
        t.disconnected();
        t.publish_sent(9); // the write of "a" failed after its event
        t.connected(true);
        t.publish_sent(9); // retransmission
        assert!(t.subscribed());
        assert_eq!(t.puback(9), Some(reply("a")));
    }

    #[test]
    fn suback_only_counts_once_per_connection() {
        let mut t = ready();
        assert!(!t.subscribed());
        t.disconnected();
        assert!(!t.subscribed());
        assert_eq!(t.phase(), Phase::Down);
    }

    #[test]
    fn a_puback_read_before_the_drop_still_counts() {
        let mut t = ready();
        t.published(reply("a"));
        t.publish_sent(1);
        t.disconnected();
        t.connected(true);
        assert_eq!(t.puback(1), Some(reply("a")));
    }
}
