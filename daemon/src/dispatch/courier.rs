//! What the daemon knows about a courier: identity, vehicle, presence, position, and the
//! one job it may hold.

use std::sync::Arc;

use pickup_protocol::{Millis, Vehicle};
use serde::{Deserialize, Serialize};

/// A courier as kept in memory and in the `couriers` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Courier {
    /// Courier id (topic segment). Shared: the dispatcher's map and its grid keep the
    /// same one instead of three more copies (10k couriers: about 1 MB).
    pub id: Arc<str>,
    /// Display name.
    pub name: Option<Box<str>>,
    /// Vehicle; a courier without one is never eligible.
    pub vehicle: Option<Vehicle>,
    /// Phone number (shown masked).
    pub tel: Option<Box<str>>,
    /// Connected (presence online, last will not fired).
    pub online: bool,
    /// On shift.
    pub available: bool,
    /// Last known position.
    pub lat: Option<f64>,
    /// Last known position.
    pub lon: Option<f64>,
    /// When the position was taken (device time, clamped to arrival).
    pub location_at: Option<Millis>,
    /// The call it is assigned to (assigned or picked up).
    pub active_call: Option<Box<str>>,
    /// The call it has an open offer for.
    pub offered_call: Option<Box<str>>,
    /// Free since (ties in ranking go to the longest idle).
    pub idle_since: Millis,
    /// Last message from it.
    pub last_seen: Millis,
}

impl Courier {
    /// A courier heard of for the first time.
    pub fn new(id: &str, now: Millis) -> Self {
        Self::with_id(Arc::from(id), now)
    }

    /// A courier heard of for the first time, under an id already shared.
    pub fn with_id(id: Arc<str>, now: Millis) -> Self {
        Self {
            id,
            name: None,
            vehicle: None,
            tel: None,
            online: false,
            available: false,
            lat: None,
            lon: None,
            location_at: None,
            active_call: None,
            offered_call: None,
            idle_since: now,
            last_seen: now,
        }
    }

    /// Holds neither a job nor an offer.
    pub fn is_free(&self) -> bool {
        self.active_call.is_none() && self.offered_call.is_none()
    }
}
