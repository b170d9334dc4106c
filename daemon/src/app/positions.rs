//! Courier positions, at most one per courier per interval.
//!
//! Every position the dispatch loop takes costs it a courier snapshot, a grid update and a
//! store job; at low load each store job is a commit of its own, with an fsync on the
//! box's SD card or eMMC. A handheld is expected to report every few seconds
//! (`courier-agent` at most once a second); one that loops on its position (a firmware
//! bug, a replayed offline queue, a hostile client on the embedded broker) must not turn
//! into a stream of commits, nor crowd calls out of the dispatch loop's queue.
//!
//! So the inbound task passes a courier's position on at once when the previous one it
//! passed on is at least `interval` old, and otherwise holds it; a newer position replaces
//! the held one, and the held one is passed on when the interval is up. The newest
//! position is never lost, only delayed by less than one interval; a position without a
//! device time is stamped with its arrival time when held, so its age stays true.

use std::collections::{HashMap, VecDeque};

use pickup_protocol::{CourierLocation, Millis};

/// The per-courier gate (owned by the inbound task; times are `store::now_ms`).
#[derive(Debug, Default)]
pub struct PositionGate {
    interval_ms: Millis,
    /// When each courier's last position was passed on (only while that is recent).
    last: HashMap<String, Millis>,
    /// `last` entries in the order they were set, to forget them once they are old.
    passed: VecDeque<(Millis, String)>,
    /// The newest position held per courier.
    held: HashMap<String, CourierLocation>,
    /// When each held position is due, in time order (due times only grow).
    due: VecDeque<(Millis, String)>,
    /// Positions replaced or delayed so far.
    coalesced: u64,
}

impl PositionGate {
    /// A gate passing one position per courier per `interval_ms` (0: every position).
    pub fn new(interval_ms: Millis) -> Self {
        Self {
            interval_ms,
            ..Self::default()
        }
    }

    /// Changes the interval (reload). Held positions keep their due times.
    pub fn set_interval(&mut self, interval_ms: Millis) {
        self.interval_ms = interval_ms;
    }

    /// A position arrived at `now`: returns it when it may go on at once; otherwise it is
    /// held (replacing an older held one) until [`PositionGate::take_due`] hands it out.
    pub fn offer(
        &mut self,
        cid: &str,
        mut loc: CourierLocation,
        now: Millis,
    ) -> Option<CourierLocation> {
        if loc.at.is_none() {
            loc.at = Some(now);
        }
        if let Some(h) = self.held.get_mut(cid) {
            *h = loc;
            self.coalesced += 1;
            return None;
        }
        match self.last.get(cid) {
            Some(&t) if self.interval_ms > 0 && now < t.saturating_add(self.interval_ms) => {
                let due = t.saturating_add(self.interval_ms);
                // Due times grow with `last`, which grows with `now`; keep the queue sorted
                // even if the interval was shortened by a reload.
                let due = self.due.back().map_or(due, |(d, _)| due.max(*d));
                self.held.insert(cid.to_string(), loc);
                self.due.push_back((due, cid.to_string()));
                self.coalesced += 1;
                None
            }
            _ => {
                self.pass(cid, now);
                Some(loc)
            }
        }
    }

    /// Held positions whose time has come, oldest first; each counts as passed on at `now`.
    pub fn take_due(&mut self, now: Millis) -> Vec<(String, CourierLocation)> {
        let mut out = Vec::new();
        while self.due.front().is_some_and(|(d, _)| *d <= now) {
            let Some((_, cid)) = self.due.pop_front() else {
                break;
            };
            if let Some(loc) = self.held.remove(&cid) {
                self.pass(&cid, now);
                out.push((cid, loc));
            }
        }
        self.forget_old(now);
        out
    }

    /// When the next held position is due, if any is held.
    pub fn next_due(&self) -> Option<Millis> {
        self.due.front().map(|(d, _)| *d)
    }

    /// Positions that did not go on at once (held, or replaced while held).
    pub fn coalesced(&self) -> u64 {
        self.coalesced
    }

    /// Couriers the gate remembers (recent or held): bounded by the couriers that
    /// reported within one interval.
    pub fn remembered(&self) -> usize {
        self.last.len().max(self.held.len())
    }

    fn pass(&mut self, cid: &str, now: Millis) {
        if self.interval_ms == 0 {
            return;
        }
        self.last.insert(cid.to_string(), now);
        self.passed.push_back((now, cid.to_string()));
        self.forget_old(now);
    }

    /// Drops `last` entries older than one interval: such a courier's next position goes
    /// on at once anyway.
    fn forget_old(&mut self, now: Millis) {
        while let Some((t, _)) = self.passed.front() {
            if t.saturating_add(self.interval_ms) > now {
                break;
            }
            let Some((t, cid)) = self.passed.pop_front() else {
                break;
            };
            if self.last.get(&cid) == Some(&t) && !self.held.contains_key(&cid) {
                self.last.remove(&cid);
            }
        }
        // A burst (every courier announcing itself at start) leaves room for all of them
        // behind; give it back once the gate is mostly empty again.
        if self.last.capacity() > 64 && self.last.len() < self.last.capacity() / 4 {
            self.last.shrink_to(self.last.len() * 2);
            self.passed.shrink_to(self.passed.len() * 2);
        }
        if self.held.capacity() > 64 && self.held.len() < self.held.capacity() / 4 {
            self.held.shrink_to(self.held.len() * 2);
            self.due.shrink_to(self.due.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lat: f64) -> CourierLocation {
        CourierLocation {
            lat,
            lon: 127.0,
            at: None,
        }
    }

    #[test]
    fn first_position_goes_on_at_once_then_one_per_interval() {
        let mut g = PositionGate::new(1000);
        assert_eq!(g.offer("a", at(1.0), 10).map(|l| l.lat), Some(1.0));
        // Other couriers are not held back by "a".
        assert!(g.offer("b", at(5.0), 20).is_some());
        assert!(g.offer("a", at(2.0), 500).is_none());
        assert!(g.offer("a", at(3.0), 900).is_none());
        assert_eq!(g.next_due(), Some(1010));
        assert!(g.take_due(1009).is_empty());
        let due = g.take_due(1010);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, "a");
        // The newest one, stamped with its arrival time.
        assert_eq!(due[0].1.lat, 3.0);
        assert_eq!(due[0].1.at, Some(900));
        assert_eq!(g.coalesced(), 2);
        // Passed on at 1010: the next one waits until 2010.
        assert!(g.offer("a", at(4.0), 1500).is_none());
        assert_eq!(g.next_due(), Some(2010));
        assert_eq!(g.take_due(2010).len(), 1);
        // Quiet for an interval: the next one goes on at once, and nothing is remembered.
        assert!(g.take_due(3100).is_empty());
        assert_eq!(g.remembered(), 0);
        assert!(g.offer("a", at(6.0), 3100).is_some());
    }

    #[test]
    fn a_burst_leaves_no_room_behind() {
        let mut g = PositionGate::new(1000);
        for i in 0..10_000 {
            let cid = format!("c{i}");
            assert!(g.offer(&cid, at(1.0), 0).is_some());
            assert!(g.offer(&cid, at(2.0), 1).is_none());
        }
        assert_eq!(g.take_due(1000).len(), 10_000);
        assert!(g.take_due(2000).is_empty());
        assert_eq!(g.remembered(), 0);
        assert!(g.last.capacity() <= 64 && g.held.capacity() <= 64);
        assert!(g.passed.capacity() <= 64 && g.due.capacity() <= 64);
    }

    #[test]
    fn device_time_is_kept() {
        let mut g = PositionGate::new(1000);
        assert!(g.offer("a", at(1.0), 0).is_some());
        let mut l = at(2.0);
        l.at = Some(123);
        assert!(g.offer("a", l, 10).is_none());
        assert_eq!(g.take_due(1000)[0].1.at, Some(123));
    }

    #[test]
    fn zero_interval_passes_everything_and_remembers_nothing() {
        let mut g = PositionGate::new(0);
        for i in 0..100 {
            assert!(g.offer("a", at(f64::from(i)), 5).is_some());
        }
        assert_eq!(g.remembered(), 0);
        assert_eq!(g.coalesced(), 0);
        assert_eq!(g.next_due(), None);
    }

    #[test]
    fn a_flood_yields_one_position_per_interval_and_ends_with_the_newest() {
        let mut g = PositionGate::new(1000);
        let mut passed = Vec::new();
        // 10 000 positions over 5 s from one courier.
        for i in 0..10_000u32 {
            let now = Millis::from(i / 2);
            passed.extend(g.take_due(now).into_iter().map(|(_, l)| l.lat));
            if let Some(l) = g.offer("a", at(f64::from(i)), now) {
                passed.push(l.lat);
            }
        }
        passed.extend(g.take_due(10_000).into_iter().map(|(_, l)| l.lat));
        assert!(passed.len() <= 6, "{} passed", passed.len());
        assert_eq!(passed.last().copied(), Some(9999.0));
        assert!(passed.windows(2).all(|w| w[0] < w[1]), "in order");
    }

    #[test]
    fn shortening_the_interval_keeps_due_times_in_order() {
        let mut g = PositionGate::new(10_000);
        assert!(g.offer("a", at(1.0), 0).is_some());
        assert!(g.offer("a", at(2.0), 1).is_none());
        g.set_interval(100);
        assert!(g.offer("b", at(1.0), 2).is_some());
        assert!(g.offer("b", at(2.0), 3).is_none());
        // "b" is due no earlier than "a", so nothing is stuck behind a later entry.
        assert_eq!(g.take_due(10_000).len(), 2);
        assert_eq!(g.next_due(), None);
    }
}
