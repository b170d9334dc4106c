//! The call: what a customer asked for and where it is in its life (the "call" and
//! "manage" contexts of the original design).

use std::collections::BTreeSet;

use pickup_protocol::validate::mask_phone;
use pickup_protocol::{CallStatus, CallView, CourierBrief, Location, Millis, Parcel};
use serde::{Deserialize, Serialize};

/// An offer that waits for the courier's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// Who it was offered to.
    pub courier_id: String,
    /// When it lapses.
    pub expires_at: Millis,
}

/// One call with its assignment request, as kept in memory and in the `calls` and
/// `assignments` tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    /// Daemon-chosen id (topic-safe).
    pub id: String,
    /// The kiosk's idempotency key.
    pub request_id: String,
    /// Full customer phone number (never leaves the box but on the relay channel).
    pub tel: String,
    /// Kiosk that made the call.
    pub kiosk_id: Option<String>,
    /// Pickup point.
    pub location: Location,
    /// Destination, when given.
    pub destination: Option<Location>,
    /// Parcel (class possibly from a scale).
    pub parcel: Parcel,
    /// Price from the tariff.
    pub price: Option<u64>,
    /// Status.
    pub status: CallStatus,
    /// Code the courier must present at pickup.
    pub pickup_code: String,
    /// Wrong pickup codes so far.
    pub wrong_codes: u32,
    /// Courier holding the job (assigned or picked up).
    pub courier: Option<CourierBrief>,
    /// Open offer (mode `offer`).
    pub offer: Option<Offer>,
    /// Couriers who declined or let an offer lapse: never offered this call again.
    pub declined: BTreeSet<String>,
    /// When the courier went offline while assigned; reassigned after the grace period.
    pub grace_until: Option<Millis>,
    /// Past this, a call still without courier fails.
    pub deadline_at: Millis,
    /// Why it was cancelled or failed.
    pub reason: Option<String>,
    /// Accepted at.
    pub created_at: Millis,
    /// Last status change.
    pub updated_at: Millis,
    /// Notifications issued so far; the next one's dedup id is `<id>-<notices + 1>`.
    #[serde(default)]
    pub notices: u32,
}

impl Call {
    /// The public view: masked phone, no pickup code.
    pub fn view(&self) -> CallView {
        CallView {
            call_id: self.id.clone(),
            status: self.status,
            tel: mask_phone(&self.tel),
            location: self.location.clone(),
            parcel: self.parcel.clone(),
            courier: self.courier.clone(),
            reason: self.reason.clone(),
            price: self.price,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }

    /// Whether the call still looks for a courier.
    pub fn is_pending(&self) -> bool {
        matches!(self.status, CallStatus::Requested | CallStatus::Dispatching)
            && self.offer.is_none()
    }
}
