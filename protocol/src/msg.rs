//! JSON payloads of contract v1. Unknown fields are ignored (clients may be newer than the
//! daemon); missing or mistyped fields are refused with the field's path.

use serde::{Deserialize, Serialize};

use crate::validate;
use crate::Millis;

/// The default weight from which a parcel counts as heavy, in kilograms.
pub const DEFAULT_HEAVY_KG: f64 = 10.0;

/// The customer's choice in the original service: 10 kg or more, or less.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParcelClass {
    /// Under the heavy threshold.
    Light,
    /// At or above the heavy threshold (default 10 kg).
    Heavy,
}

impl ParcelClass {
    /// The class a weight falls in, for a given heavy threshold.
    pub fn for_weight(weight_kg: f64, heavy_kg: f64) -> Self {
        if weight_kg >= heavy_kg {
            Self::Heavy
        } else {
            Self::Light
        }
    }
    /// Stable lowercase name (database, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Light => "light",
            Self::Heavy => "heavy",
        }
    }
    /// Inverse of [`ParcelClass::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "light" => Some(Self::Light),
            "heavy" => Some(Self::Heavy),
            _ => None,
        }
    }
}

/// What a courier drives: decides which parcels it can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Vehicle {
    /// Light parcels only.
    Bicycle,
    /// Light parcels only.
    Scooter,
    /// Any parcel.
    Car,
    /// Any parcel.
    Van,
    /// Any parcel.
    Truck,
}

impl Vehicle {
    /// Whether this vehicle may take a parcel of `class`.
    pub fn can_carry(self, class: ParcelClass) -> bool {
        match class {
            ParcelClass::Light => true,
            ParcelClass::Heavy => matches!(self, Self::Car | Self::Van | Self::Truck),
        }
    }
    /// Stable lowercase name (database, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bicycle => "bicycle",
            Self::Scooter => "scooter",
            Self::Car => "car",
            Self::Van => "van",
            Self::Truck => "truck",
        }
    }
    /// Inverse of [`Vehicle::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "bicycle" => Self::Bicycle,
            "scooter" => Self::Scooter,
            "car" => Self::Car,
            "van" => Self::Van,
            "truck" => Self::Truck,
            _ => return None,
        })
    }
}

/// Where a parcel waits (or a courier is).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Location {
    /// Latitude, degrees, -90..=90.
    pub lat: f64,
    /// Longitude, degrees, -180..=180.
    pub lon: f64,
    /// Human description shown to the courier ("Gate 2, locker 14").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl Location {
    /// Checks coordinates and label.
    pub fn validate(&self, field: &str) -> Result<(), String> {
        validate::lat_lon(field, self.lat, self.lon)?;
        if let Some(label) = &self.label {
            validate::text(&format!("{field}.label"), label)?;
        }
        Ok(())
    }
}

/// The parcel to pick up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parcel {
    /// Declared (or measured) class.
    pub class: ParcelClass,
    /// Weight if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_kg: Option<f64>,
    /// Where class and weight came from; set by the daemon, ignored on requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_source: Option<WeightSource>,
}

/// Where a parcel's class came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightSource {
    /// Measured by the kiosk's scale.
    Scale,
    /// Chosen by the customer (no usable scale reading).
    Declared,
}

impl Parcel {
    /// Checks the weight's range and that it agrees with the class.
    pub fn validate(&self, heavy_kg: f64) -> Result<(), String> {
        if let Some(w) = self.weight_kg {
            if !w.is_finite() || !(0.0..=validate::MAX_WEIGHT_KG).contains(&w) {
                return Err(format!(
                    "parcel.weight_kg: must be a number from 0 to {}",
                    validate::MAX_WEIGHT_KG
                ));
            }
            let by_weight = ParcelClass::for_weight(w, heavy_kg);
            if by_weight != self.class {
                return Err(format!(
                    "parcel.class: {} disagrees with weight_kg {w} (heavy from {heavy_kg} kg)",
                    self.class.as_str()
                ));
            }
        }
        Ok(())
    }
}

/// `calls/create`: a kiosk asks for a pickup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateCall {
    /// Idempotency key chosen by the kiosk; a retry with the same key gets the same call.
    pub request_id: String,
    /// The customer's phone number (personal data: stored, only masked elsewhere).
    pub tel: String,
    /// Pickup point.
    pub location: Location,
    /// What to pick up.
    pub parcel: Parcel,
    /// The kiosk that made the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kiosk_id: Option<String>,
    /// The scale the parcel stands on, if the kiosk is not bound to one in the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_id: Option<String>,
    /// Where the parcel goes, if known (prices by distance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Location>,
}

impl CreateCall {
    /// Every check on a create request; the message names the first bad field.
    pub fn validate(&self, heavy_kg: f64) -> Result<(), String> {
        validate::id("request_id", &self.request_id)?;
        validate::phone("tel", &self.tel)?;
        self.location.validate("location")?;
        self.parcel.validate(heavy_kg)?;
        if let Some(k) = &self.kiosk_id {
            validate::id("kiosk_id", k)?;
        }
        if let Some(s) = &self.scale_id {
            validate::id("scale_id", s)?;
        }
        if let Some(d) = &self.destination {
            d.validate("destination")?;
        }
        Ok(())
    }
}

/// `calls/<id>/cancel` body (all optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CancelCall {
    /// Why, for the audit trail and the courier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `calls/<id>/get` body (nothing but the reply path).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GetCall {}

/// Where a call is in its life. Terminal: completed, cancelled, failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    /// Recorded, not yet looked at by the assigner.
    Requested,
    /// Looking for a courier (possibly an offer is out).
    Dispatching,
    /// A courier has the job.
    Assigned,
    /// The courier holds the parcel.
    PickedUp,
    /// Delivered.
    Completed,
    /// Cancelled before pickup.
    Cancelled,
    /// No courier before the dispatch deadline.
    Failed,
}

impl CallStatus {
    /// Stable lowercase name (database, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Dispatching => "dispatching",
            Self::Assigned => "assigned",
            Self::PickedUp => "picked_up",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }
    /// Inverse of [`CallStatus::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "requested" => Self::Requested,
            "dispatching" => Self::Dispatching,
            "assigned" => Self::Assigned,
            "picked_up" => Self::PickedUp,
            "completed" => Self::Completed,
            "cancelled" => Self::Cancelled,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
    /// No transition leaves a terminal status.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled | Self::Failed)
    }
    /// Cancel is allowed before the parcel is picked up.
    pub fn is_cancellable(self) -> bool {
        matches!(self, Self::Requested | Self::Dispatching | Self::Assigned)
    }
}

/// The courier as the customer sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CourierBrief {
    /// Courier id.
    pub courier_id: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Vehicle.
    pub vehicle: Vehicle,
    /// Masked phone number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tel: Option<String>,
    /// Distance to the pickup point at assignment, metres.
    pub distance_m: f64,
    /// Estimated time to arrive, seconds.
    pub eta_s: u32,
}

/// The public view of a call: the retained `calls/<id>/state` and the `get` answer.
/// Holds the masked phone number and never the pickup code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallView {
    /// Call id.
    pub call_id: String,
    /// Current status.
    pub status: CallStatus,
    /// Masked customer phone number.
    pub tel: String,
    /// Pickup point.
    pub location: Location,
    /// Parcel.
    pub parcel: Parcel,
    /// Assigned courier, from `assigned` on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub courier: Option<CourierBrief>,
    /// Why a call was cancelled or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Price from the tariff, in the smallest currency unit (won).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<u64>,
    /// When the call was accepted.
    pub created_at: Millis,
    /// When the status last changed.
    pub updated_at: Millis,
}

/// Online/offline, as in the retained `couriers/<cid>/presence` (also the last will).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceState {
    /// Connected.
    Online,
    /// Disconnected (cleanly or by last will).
    Offline,
}

/// `couriers/<cid>/presence`: who the courier is and whether it can take work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    /// Online or offline.
    pub state: PresenceState,
    /// On shift and willing to take jobs.
    #[serde(default = "yes")]
    pub available: bool,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Vehicle; required the first time a courier comes online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vehicle: Option<Vehicle>,
    /// The courier's phone number (shown masked to customers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tel: Option<String>,
    /// Device time of the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Millis>,
}

fn yes() -> bool {
    true
}

impl Presence {
    /// Checks the optional fields.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(n) = &self.name {
            validate::text("name", n)?;
        }
        if let Some(t) = &self.tel {
            validate::phone("tel", t)?;
        }
        Ok(())
    }
}

/// `couriers/<cid>/location`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CourierLocation {
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Device time of the fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Millis>,
}

impl CourierLocation {
    /// Checks coordinates.
    pub fn validate(&self) -> Result<(), String> {
        validate::lat_lon("location", self.lat, self.lon)
    }
}

/// What the retained `couriers/<cid>/job` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// An offer the courier may accept or decline until `expires_at`.
    Offer,
    /// The job is the courier's.
    Assigned,
    /// The parcel was picked up; deliver it.
    PickedUp,
    /// The customer cancelled: drop it.
    Cancelled,
    /// The offer or assignment was taken back (timeout, offline, reassigned).
    Withdrawn,
    /// Nothing to do.
    None,
}

/// `couriers/<cid>/job`: the courier's current job (retained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// What this message means.
    pub kind: JobKind,
    /// The call concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    /// Pickup point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup: Option<Location>,
    /// Parcel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parcel: Option<Parcel>,
    /// Masked customer phone number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tel: Option<String>,
    /// Offer deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Millis>,
    /// Why (cancel / withdraw reasons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the daemon decided this.
    pub at: Millis,
}

/// What a courier answers about a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobAction {
    /// Take the offered job.
    Accept,
    /// Refuse the offered job.
    Decline,
    /// Parcel collected (needs the pickup code).
    PickedUp,
    /// Parcel delivered.
    Completed,
}

impl JobAction {
    /// Stable lowercase name (database, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accept => "accept",
            Self::Decline => "decline",
            Self::PickedUp => "picked_up",
            Self::Completed => "completed",
        }
    }
}

/// `couriers/<cid>/job/reply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobReply {
    /// The call the action is about.
    pub call_id: String,
    /// What the courier did.
    pub action: JobAction,
    /// Device-chosen id; a repeat with the same id changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_id: Option<String>,
    /// Decline reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The customer's pickup code, for `picked_up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup_code: Option<String>,
    /// When it happened on the device (offline replays carry the original time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Millis>,
}

impl JobReply {
    /// Checks ids and lengths.
    pub fn validate(&self) -> Result<(), String> {
        validate::id("call_id", &self.call_id)?;
        if let Some(r) = &self.reply_id {
            validate::id("reply_id", r)?;
        }
        if let Some(r) = &self.reason {
            validate::text("reason", r)?;
        }
        if let Some(c) = &self.pickup_code {
            validate::id("pickup_code", c)?;
        }
        Ok(())
    }
}

/// Life of the daemon as seen on the retained `daemon/state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonStatus {
    /// Taking requests.
    Ready,
    /// Shutting down; retry later.
    Stopping,
    /// Connection lost (the daemon's last will).
    Lost,
}

/// Retained `daemon/state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonState {
    /// Ready / stopping / lost.
    pub state: DaemonStatus,
    /// Daemon version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// When this was published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Millis>,
    /// State of the breaker around call acceptance: `closed` (taking calls), `open`
    /// (refusing new calls with `busy`), `half_open` (letting a few through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<String>,
}

/// A customer message handed to the relay on `notifications`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Stable dedup id: a relay drops repeats by it.
    pub id: String,
    /// The call concerned.
    pub call_id: String,
    /// Template key (`call.accepted`, `call.assigned`, …).
    pub template: String,
    /// The customer's full phone number (this channel only).
    pub tel: String,
    /// Rendered text.
    pub text: String,
    /// Template variables.
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// When the event happened.
    pub at: Millis,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vehicles_and_classes() {
        assert!(Vehicle::Scooter.can_carry(ParcelClass::Light));
        assert!(!Vehicle::Scooter.can_carry(ParcelClass::Heavy));
        assert!(!Vehicle::Bicycle.can_carry(ParcelClass::Heavy));
        assert!(Vehicle::Van.can_carry(ParcelClass::Heavy));
        assert_eq!(ParcelClass::for_weight(10.0, 10.0), ParcelClass::Heavy);
        assert_eq!(ParcelClass::for_weight(9.99, 10.0), ParcelClass::Light);
    }

    #[test]
    fn parcel_class_must_agree_with_weight() {
        let p = Parcel {
            class: ParcelClass::Light,
            weight_kg: Some(12.0),
            weight_source: None,
        };
        assert!(p.validate(10.0).unwrap_err().starts_with("parcel.class"));
        let p = Parcel {
            class: ParcelClass::Heavy,
            weight_kg: Some(-1.0),
            weight_source: None,
        };
        assert!(p
            .validate(10.0)
            .unwrap_err()
            .starts_with("parcel.weight_kg"));
    }

    #[test]
    fn statuses_round_trip() {
        for s in [
            CallStatus::Requested,
            CallStatus::Dispatching,
            CallStatus::Assigned,
            CallStatus::PickedUp,
            CallStatus::Completed,
            CallStatus::Cancelled,
            CallStatus::Failed,
        ] {
            assert_eq!(CallStatus::parse(s.as_str()), Some(s));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
    }

    /// A long decimal (the fuzzer found this one) must decode to the nearest f64 and
    /// survive a JSON round trip unchanged: a stored call must not drift on re-read.
    #[test]
    fn coordinates_decode_exactly_and_round_trip() {
        let raw = br#"{"request_id":"r1","tel":"005-1234-5678","location":{"lat":37.5,"lon":127.666663333333333330,"label":"Gkiosk_ate 2"},"parcel":{"class":"light"},"kios~k_id":"k1"}"#;
        let (_, res) = crate::answer::decode_request::<CreateCall>(raw);
        let call = res.unwrap();
        assert_eq!(
            call.location.lon,
            "127.666663333333333330".parse::<f64>().unwrap()
        );
        let again: CreateCall =
            serde_json::from_slice(&serde_json::to_vec(&call).unwrap()).unwrap();
        assert_eq!(again, call);
        for s in [
            "0.1",
            "52.520008",
            "-33.868820000000001",
            "1.7976931348623157e308",
            "5e-324",
        ] {
            let v: f64 = serde_json::from_str(s).unwrap();
            assert_eq!(v, s.parse::<f64>().unwrap(), "{s}");
            let back: f64 = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
            assert_eq!(back, v, "{s}");
        }
    }
}
