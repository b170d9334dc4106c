//! Courier presences that repeat the last one, dropped within an interval.
//!
//! Every presence the dispatch loop takes costs it a courier snapshot and a store job,
//! and for a courier holding a job, a fresh publish of that job (a handheld announces
//! itself online on every connect and is told its job again: see
//! `Dispatcher::presence`). A handheld that loops on its presence (a firmware bug, a
//! reconnect loop, a hostile client on the embedded broker) must not turn into a stream
//! of commits and job messages.
//!
//! So a presence equal to the last one passed on for that courier (same state,
//! availability, name, vehicle and phone; the device time does not count) is dropped when
//! that one is less than `interval` old. Anything that changes passes at once: an offline
//! is never delayed, and nor is the online after it. At most one unchanged presence per
//! courier per interval reaches the loop, so its last-seen time stays within an interval
//! of the truth.
//!
//! The gate remembers a courier for one interval after its last presence passed, as a
//! 64-bit digest of what it said (a change that digests the same as before, one chance in
//! 2^64, would be dropped like a repeat). Entries are forgotten on the
//! inbound task's once-a-second tick, and room left by a burst (a fleet announcing itself)
//! is given back.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use pickup_protocol::{Millis, Presence};

/// A digest of what a presence says, without its device time.
fn said(p: &Presence) -> u64 {
    // SipHash with fixed keys: the same presence digests the same in every run.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.state.hash(&mut h);
    p.available.hash(&mut h);
    p.name.hash(&mut h);
    p.vehicle.hash(&mut h);
    p.tel.hash(&mut h);
    h.finish()
}

/// The per-courier gate (owned by the inbound task; times are `store::now_ms`).
#[derive(Debug, Default)]
pub struct PresenceGate {
    interval_ms: Millis,
    /// When the last presence passed on per courier did, and what it said (only while that
    /// is recent).
    last: HashMap<Box<str>, (Millis, u64)>,
    /// `last` entries in the order they were set, to forget them once they are old.
    passed: VecDeque<(Millis, Box<str>)>,
    /// Presences dropped so far.
    dropped: u64,
}

impl PresenceGate {
    /// A gate dropping repeats within `interval_ms` (0: none dropped).
    pub fn new(interval_ms: Millis) -> Self {
        Self {
            interval_ms,
            ..Self::default()
        }
    }

    /// Changes the interval (reload).
    pub fn set_interval(&mut self, interval_ms: Millis) {
        self.interval_ms = interval_ms;
    }

    /// A presence arrived at `now`: whether it goes on to the dispatch loop.
    pub fn offer(&mut self, cid: &str, p: &Presence, now: Millis) -> bool {
        self.forget_old(now);
        let said = said(p);
        if let Some((t, last)) = self.last.get(cid) {
            if self.interval_ms > 0 && now < t.saturating_add(self.interval_ms) && *last == said {
                self.dropped += 1;
                return false;
            }
        }
        if self.interval_ms > 0 {
            self.last.insert(cid.into(), (now, said));
            self.passed.push_back((now, cid.into()));
        }
        true
    }

    /// Forgets what is older than one interval (the inbound task's tick).
    pub fn tick(&mut self, now: Millis) {
        self.forget_old(now);
    }

    /// Presences dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Couriers whose last presence is still remembered (for tests).
    pub fn remembered(&self) -> usize {
        self.last.len()
    }

    fn forget_old(&mut self, now: Millis) {
        while let Some((t, _)) = self.passed.front() {
            if self.interval_ms > 0 && now < t.saturating_add(self.interval_ms) {
                break;
            }
            let Some((t, cid)) = self.passed.pop_front() else {
                break;
            };
            // A later pass of the same courier keeps its entry.
            if self.last.get(&cid).is_some_and(|(at, _)| *at == t) {
                self.last.remove(&cid);
            }
        }
        // A burst (every courier announcing itself at start) leaves room for all of them
        // behind; give it back once the gate is mostly empty again.
        if self.last.capacity() > 64 && self.last.len() < self.last.capacity() / 4 {
            self.last.shrink_to(self.last.len() * 2);
            self.passed.shrink_to(self.passed.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pickup_protocol::{PresenceState, Vehicle};

    fn presence(state: PresenceState, available: bool, at: Option<Millis>) -> Presence {
        Presence {
            state,
            available,
            name: Some("Kim".into()),
            vehicle: Some(Vehicle::Scooter),
            tel: None,
            at,
        }
    }

    #[test]
    fn repeats_within_the_interval_are_dropped_and_changes_pass_at_once() {
        let mut g = PresenceGate::new(1000);
        let on = presence(PresenceState::Online, true, Some(1));
        assert!(g.offer("k1", &on, 0));
        // The same again, even with another device time: dropped.
        assert!(!g.offer("k1", &presence(PresenceState::Online, true, Some(2)), 10));
        assert!(!g.offer("k1", &on, 999));
        // Another courier is not held back by this one.
        assert!(g.offer("k2", &on, 20));
        // A change passes at once, and so does the change back.
        assert!(g.offer("k1", &presence(PresenceState::Online, false, None), 30));
        assert!(g.offer("k1", &on, 31));
        assert!(g.offer("k1", &presence(PresenceState::Offline, true, None), 32));
        assert!(g.offer("k1", &on, 33));
        // A new name is a change too.
        let mut renamed = on.clone();
        renamed.name = Some("Lee".into());
        assert!(g.offer("k1", &renamed, 34));
        assert!(!g.offer("k1", &renamed, 35));
        assert_eq!(g.dropped(), 3);
    }

    #[test]
    fn a_looping_courier_passes_one_unchanged_presence_per_interval() {
        let mut g = PresenceGate::new(1000);
        let on = presence(PresenceState::Online, true, None);
        let passed = (0..10_000).filter(|i| g.offer("k1", &on, *i)).count();
        // At 0, 1000, ..., 9000.
        assert_eq!(passed, 10);
        assert_eq!(g.dropped(), 9_990);
    }

    #[test]
    fn old_entries_are_forgotten_and_zero_passes_everything() {
        let mut g = PresenceGate::new(1000);
        let on = presence(PresenceState::Online, true, None);
        for i in 0..500 {
            assert!(g.offer(&format!("k{i}"), &on, i));
        }
        assert_eq!(g.remembered(), 500);
        // Long after, the tick forgets them all, and the room they took.
        g.tick(10_000);
        assert_eq!(g.remembered(), 0);
        assert!(g.last.capacity() <= 64, "{}", g.last.capacity());
        assert!(g.offer("k0", &on, 10_001));
        assert_eq!(g.remembered(), 1);

        let mut open = PresenceGate::new(0);
        assert!((0..100).all(|i| open.offer("k1", &on, i)));
        assert_eq!(open.remembered(), 0);
    }
}
