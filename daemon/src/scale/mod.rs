//! Weighing scales over Modbus: the parcel's class (and so its price and which vehicles may
//! take it) comes from a measured weight, with the customer's choice as the fallback.
//!
//! Layout:
//! - [`config`]: the `[[scales]]` tables and their checks ([`ScaleSpec`] is the checked form);
//! - [`decode`]: register words → kilograms, status bits, software stability (pure);
//! - [`poller`]: one task per scale reading it over tokio-modbus, with a timeout on every
//!   request, reconnect with backoff and a [`crate::breaker::Breaker`]; it writes each
//!   reading to the [`ScaleBoard`] and sends [`ScaleUpdate`]s for the retained
//!   `scales/<sid>/weight` topic;
//! - here: the board the call path reads (never waiting on a device) and
//!   [`resolve_parcel`], the pure rule deciding between measured and declared class.

pub mod config;
pub mod decode;
pub mod poller;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use pickup_protocol::{Millis, Parcel, ParcelClass, WeightSource};
use serde::{Deserialize, Serialize};

use crate::breaker::BreakerState;

pub use config::{parse_scales_toml, validate_scales, ScaleConfig, ScaleConfigError, ScaleSpec};
pub use poller::ScalePoller;

/// One weight as read from a scale, already in kilograms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Weight, kg (rounded to grams). May be slightly negative when the tare drifted.
    pub weight_kg: f64,
    /// The weight has settled (device bit, or successive readings agree).
    pub stable: bool,
    /// The load is beyond the scale's range: the number means nothing.
    pub overload: bool,
    /// Nothing on the scale.
    pub zero: bool,
    /// Wall-clock time of the read, unix ms.
    pub at: Millis,
}

impl Reading {
    /// The payload published retained on `scales/<sid>/weight`.
    pub fn report(&self) -> WeightReport {
        WeightReport {
            value: self.weight_kg,
            unit: "kg".to_string(),
            stable: self.stable,
            overload: self.overload,
            zero: self.zero,
            at: self.at,
        }
    }
}

/// JSON payload of the retained `scales/<sid>/weight` topic. Consumers judge freshness by
/// `at`: the daemon republishes an unchanged reading periodically while the scale answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightReport {
    /// Weight in `unit`.
    pub value: f64,
    /// Always `"kg"`: readings are converted whatever the scale reports in.
    pub unit: String,
    /// The weight has settled.
    pub stable: bool,
    /// Beyond the scale's range.
    pub overload: bool,
    /// Nothing on the scale.
    pub zero: bool,
    /// When it was read, unix ms.
    pub at: Millis,
}

/// A reading to publish, sent by a poller on its channel.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleUpdate {
    /// Which scale (`scales/<scale_id>/weight`).
    pub scale_id: String,
    /// The payload.
    pub report: WeightReport,
}

/// What went wrong on the last failed poll, for logs, metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleErrorKind {
    /// No connection could be made (refused, unreachable, name not found, timed out).
    Connect,
    /// The device did not answer within the request timeout.
    Timeout,
    /// The connection broke or carried garbage.
    Transport,
    /// The device answered with a Modbus exception: it is there but refuses the request
    /// (wrong register, wrong unit id, busy).
    Refused,
    /// The answer did not fit the request (too few registers, another function).
    BadResponse,
    /// The registers did not decode into a weight (NaN).
    Decode,
}

/// How a scale's poller is doing, for status lines and metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleHealth {
    /// The scale's breaker: open means it is not being asked.
    pub breaker: BreakerState,
    /// A Modbus connection is open.
    pub connected: bool,
    /// Kind of the last failure since the last good reading.
    pub last_error_kind: Option<ScaleErrorKind>,
    /// Its message.
    pub last_error: Option<String>,
    /// Good readings since start.
    pub readings: u64,
    /// Failed polls since start.
    pub failures: u64,
}

impl Default for ScaleHealth {
    fn default() -> Self {
        Self {
            breaker: BreakerState::Closed,
            connected: false,
            last_error_kind: None,
            last_error: None,
            readings: 0,
            failures: 0,
        }
    }
}

#[derive(Debug, Default)]
struct Slot {
    latest: Option<Reading>,
    health: ScaleHealth,
}

#[derive(Debug, Default)]
struct BoardInner {
    /// kiosk id → scale id, fixed at start.
    kiosks: HashMap<String, String>,
    /// scale id → oldest usable reading age, fixed at start.
    max_age_ms: HashMap<String, u64>,
    /// scale id → latest reading and health; a lock per board is plenty at a few
    /// writes per second per scale.
    slots: RwLock<HashMap<String, Slot>>,
}

/// The latest reading of every scale, shared by the pollers (writing) and the call path
/// (reading). Cloning is cheap; reading never waits on a device.
#[derive(Debug, Clone, Default)]
pub struct ScaleBoard {
    inner: Arc<BoardInner>,
}

impl ScaleBoard {
    /// A board for these scales, with their kiosk bindings.
    pub fn new(specs: &[ScaleSpec]) -> Self {
        let mut kiosks = HashMap::new();
        let mut max_age_ms = HashMap::new();
        let mut slots = HashMap::new();
        for s in specs {
            for k in &s.kiosks {
                kiosks.insert(k.clone(), s.id.clone());
            }
            max_age_ms.insert(s.id.clone(), s.max_age_ms);
            slots.insert(s.id.clone(), Slot::default());
        }
        Self {
            inner: Arc::new(BoardInner {
                kiosks,
                max_age_ms,
                slots: RwLock::new(slots),
            }),
        }
    }

    /// Ids of the configured scales.
    pub fn scale_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.inner.max_age_ms.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Whether a scale of this id is configured.
    pub fn knows(&self, scale_id: &str) -> bool {
        self.inner.max_age_ms.contains_key(scale_id)
    }

    /// The scale a kiosk is bound to in the config.
    pub fn scale_for_kiosk(&self, kiosk_id: &str) -> Option<&str> {
        self.inner.kiosks.get(kiosk_id).map(String::as_str)
    }

    /// Oldest usable reading for this scale, ms.
    pub fn max_age_ms(&self, scale_id: &str) -> Option<u64> {
        self.inner.max_age_ms.get(scale_id).copied()
    }

    /// The latest reading of a scale, however old (judge it with [`resolve_parcel`]).
    pub fn latest(&self, scale_id: &str) -> Option<Reading> {
        let slots = self.inner.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(scale_id).and_then(|s| s.latest)
    }

    /// How the scale's poller is doing.
    pub fn health(&self, scale_id: &str) -> Option<ScaleHealth> {
        let slots = self.inner.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(scale_id).map(|s| s.health.clone())
    }

    /// Stores a good reading (poller side).
    pub fn record(&self, scale_id: &str, reading: Reading) {
        let mut slots = self.inner.slots.write().unwrap_or_else(|e| e.into_inner());
        let slot = slots.entry(scale_id.to_string()).or_default();
        slot.latest = Some(reading);
        slot.health.readings = slot.health.readings.saturating_add(1);
        slot.health.last_error = None;
        slot.health.last_error_kind = None;
    }

    /// Updates the poller's health (poller side).
    pub fn update_health(&self, scale_id: &str, f: impl FnOnce(&mut ScaleHealth)) {
        let mut slots = self.inner.slots.write().unwrap_or_else(|e| e.into_inner());
        f(&mut slots.entry(scale_id.to_string()).or_default().health);
    }

    /// Decides a call's parcel from the scale bound to `kiosk_id`, or the one the call
    /// names in `scale_id` (which wins). Without a known scale the declared parcel stands.
    pub fn resolve(
        &self,
        declared: &Parcel,
        kiosk_id: Option<&str>,
        scale_id: Option<&str>,
        now: Millis,
        heavy_kg: f64,
    ) -> ParcelDecision {
        let chosen = scale_id.or_else(|| kiosk_id.and_then(|k| self.scale_for_kiosk(k)));
        let Some(sid) = chosen else {
            return ParcelDecision::declared(declared, None, Fallback::NoScale);
        };
        let Some(max_age_ms) = self.max_age_ms(sid) else {
            return ParcelDecision::declared(declared, None, Fallback::UnknownScale);
        };
        let reading = self.latest(sid);
        let mut d = resolve_parcel(declared, reading.as_ref(), now, max_age_ms, heavy_kg);
        d.scale_id = Some(sid.to_string());
        d
    }
}

/// Why the declared parcel was kept instead of a measured one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// The kiosk has no scale and the call named none.
    NoScale,
    /// The call named a scale that is not configured.
    UnknownScale,
    /// The scale has not given any reading yet (or never answered).
    NoReading,
    /// The latest reading is older than the scale's `max_age_ms` (scale unreachable).
    Stale,
    /// The weight is still moving.
    Unstable,
    /// The load is beyond the scale's range.
    Overload,
    /// Nothing stands on the scale.
    Empty,
    /// The weight is outside what a parcel can weigh (negative, above the maximum).
    OutOfRange,
}

impl Fallback {
    /// Stable lowercase name (logs, metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoScale => "no_scale",
            Self::UnknownScale => "unknown_scale",
            Self::NoReading => "no_reading",
            Self::Stale => "stale",
            Self::Unstable => "unstable",
            Self::Overload => "overload",
            Self::Empty => "empty",
            Self::OutOfRange => "out_of_range",
        }
    }
}

/// The parcel a call goes ahead with.
#[derive(Debug, Clone, PartialEq)]
pub struct ParcelDecision {
    /// Class, weight and where they came from (`weight_source` is always set).
    pub parcel: Parcel,
    /// Set when the measured class overrode the declared one; goes into the answer's
    /// `class_corrected`.
    pub corrected: Option<String>,
    /// Why the scale was not used, when it was not.
    pub fallback: Option<Fallback>,
    /// The scale consulted, if any.
    pub scale_id: Option<String>,
}

impl ParcelDecision {
    fn declared(declared: &Parcel, scale_id: Option<String>, why: Fallback) -> Self {
        Self {
            parcel: Parcel {
                class: declared.class,
                weight_kg: declared.weight_kg,
                weight_source: Some(WeightSource::Declared),
            },
            corrected: None,
            fallback: Some(why),
            scale_id,
        }
    }
}

/// Decides the parcel of a call: the latest reading if it is fresh (not older than
/// `max_age_ms` at `now`), stable, in range and not empty; otherwise the declared parcel.
/// The measured class wins over the declared one, and the decision says so. Pure and
/// instant: a call never waits on a scale.
pub fn resolve_parcel(
    declared: &Parcel,
    reading: Option<&Reading>,
    now: Millis,
    max_age_ms: u64,
    heavy_kg: f64,
) -> ParcelDecision {
    let fallback = |why| ParcelDecision::declared(declared, None, why);
    let Some(r) = reading else {
        return fallback(Fallback::NoReading);
    };
    let age = now.saturating_sub(r.at);
    // A reading from the future means the clock stepped back: do not trust it.
    if age < 0 || u64::try_from(age).unwrap_or(u64::MAX) > max_age_ms {
        return fallback(Fallback::Stale);
    }
    if r.overload {
        return fallback(Fallback::Overload);
    }
    if !r.stable {
        return fallback(Fallback::Unstable);
    }
    if r.zero {
        return fallback(Fallback::Empty);
    }
    let w = r.weight_kg;
    if !w.is_finite() || w <= 0.0 || w > pickup_protocol::validate::MAX_WEIGHT_KG {
        return fallback(Fallback::OutOfRange);
    }
    let class = ParcelClass::for_weight(w, heavy_kg);
    let corrected = (class != declared.class).then(|| {
        format!(
            "the scale measured {w} kg: class {}, not the declared {}",
            class.as_str(),
            declared.class.as_str()
        )
    });
    ParcelDecision {
        parcel: Parcel {
            class,
            weight_kg: Some(w),
            weight_source: Some(WeightSource::Scale),
        },
        corrected,
        fallback: None,
        scale_id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(class: ParcelClass) -> Parcel {
        Parcel {
            class,
            weight_kg: None,
            weight_source: None,
        }
    }

    fn reading(weight_kg: f64, at: Millis) -> Reading {
        Reading {
            weight_kg,
            stable: true,
            overload: false,
            zero: false,
            at,
        }
    }

    #[test]
    fn a_fresh_stable_reading_sets_class_and_weight() {
        let d = resolve_parcel(
            &declared(ParcelClass::Heavy),
            Some(&reading(3.2, 1_000)),
            1_500,
            2_000,
            10.0,
        );
        assert_eq!(d.parcel.class, ParcelClass::Light);
        assert_eq!(d.parcel.weight_kg, Some(3.2));
        assert_eq!(d.parcel.weight_source, Some(WeightSource::Scale));
        let msg = d.corrected.unwrap();
        assert!(msg.contains("3.2 kg") && msg.contains("light"), "{msg}");
        assert_eq!(d.fallback, None);
        // The measured parcel passes the protocol's own consistency check.
        d.parcel.validate(10.0).unwrap();
    }

    #[test]
    fn agreement_is_not_a_correction_and_the_threshold_is_inclusive() {
        let d = resolve_parcel(
            &declared(ParcelClass::Heavy),
            Some(&reading(10.0, 0)),
            0,
            2_000,
            10.0,
        );
        assert_eq!(d.parcel.class, ParcelClass::Heavy);
        assert_eq!(d.corrected, None);
        let d = resolve_parcel(
            &declared(ParcelClass::Heavy),
            Some(&reading(10.0, 0)),
            0,
            2_000,
            12.0,
        );
        assert_eq!(d.parcel.class, ParcelClass::Light, "threshold is passed in");
    }

    #[test]
    fn unusable_readings_fall_back_to_the_declared_class() {
        let base = reading(15.0, 1_500);
        let cases = [
            (None, Fallback::NoReading),
            (Some(Reading { at: 0, ..base }), Fallback::Stale),
            (Some(Reading { at: 5_000, ..base }), Fallback::Stale),
            (
                Some(Reading {
                    overload: true,
                    ..base
                }),
                Fallback::Overload,
            ),
            (
                Some(Reading {
                    stable: false,
                    ..base
                }),
                Fallback::Unstable,
            ),
            (Some(Reading { zero: true, ..base }), Fallback::Empty),
            (
                Some(Reading {
                    weight_kg: -0.5,
                    ..base
                }),
                Fallback::OutOfRange,
            ),
            (
                Some(Reading {
                    weight_kg: 5_000.0,
                    ..base
                }),
                Fallback::OutOfRange,
            ),
            (
                Some(Reading {
                    weight_kg: f64::NAN,
                    ..base
                }),
                Fallback::OutOfRange,
            ),
        ];
        let light = Parcel {
            class: ParcelClass::Light,
            weight_kg: Some(4.0),
            weight_source: None,
        };
        for (r, why) in cases {
            let d = resolve_parcel(&light, r.as_ref(), 2_001, 1_000, 10.0);
            assert_eq!(d.fallback, Some(why), "{r:?}");
            assert_eq!(d.parcel.class, ParcelClass::Light);
            assert_eq!(d.parcel.weight_kg, Some(4.0), "declared weight is kept");
            assert_eq!(d.parcel.weight_source, Some(WeightSource::Declared));
            assert_eq!(d.corrected, None);
        }
        // Exactly max_age old is still fresh.
        let d = resolve_parcel(&light, Some(&base), 2_500, 1_000, 10.0);
        assert_eq!(d.parcel.weight_source, Some(WeightSource::Scale));
    }

    fn board() -> ScaleBoard {
        let specs = parse_scales_toml(
            r#"
[[scales]]
id = "front"
kiosks = ["k1"]
address = "127.0.0.1:1"
register = 0
format = "u16"
unit = "kg"
max_age_ms = 1000
[[scales]]
id = "back"
address = "127.0.0.1:2"
register = 0
format = "u16"
unit = "kg"
"#,
        )
        .unwrap();
        ScaleBoard::new(&specs)
    }

    #[test]
    fn the_board_picks_the_kiosks_scale_or_the_named_one() {
        let b = board();
        assert_eq!(b.scale_ids(), vec!["back", "front"]);
        assert_eq!(b.scale_for_kiosk("k1"), Some("front"));
        assert_eq!(b.scale_for_kiosk("k2"), None);
        b.record("front", reading(12.0, 100));
        b.record("back", reading(2.0, 100));
        let light = declared(ParcelClass::Light);

        let d = b.resolve(&light, Some("k1"), None, 200, 10.0);
        assert_eq!(d.scale_id.as_deref(), Some("front"));
        assert_eq!(d.parcel.class, ParcelClass::Heavy);
        assert!(d.corrected.is_some());

        let d = b.resolve(&light, Some("k1"), Some("back"), 200, 10.0);
        assert_eq!(d.scale_id.as_deref(), Some("back"));
        assert_eq!(d.parcel.weight_kg, Some(2.0));

        let d = b.resolve(&light, Some("k2"), None, 200, 10.0);
        assert_eq!(d.fallback, Some(Fallback::NoScale));
        let d = b.resolve(&light, None, Some("nope"), 200, 10.0);
        assert_eq!(d.fallback, Some(Fallback::UnknownScale));
        // Per-scale max age: front allows 1 s.
        let d = b.resolve(&light, Some("k1"), None, 1_101, 10.0);
        assert_eq!(d.fallback, Some(Fallback::Stale));
        assert_eq!(d.scale_id.as_deref(), Some("front"));
    }

    #[test]
    fn the_board_tracks_health() {
        let b = board();
        assert_eq!(b.latest("front"), None);
        b.update_health("front", |h| {
            h.failures += 1;
            h.last_error_kind = Some(ScaleErrorKind::Timeout);
        });
        let h = b.health("front").unwrap();
        assert_eq!(h.failures, 1);
        b.record("front", reading(1.0, 5));
        let h = b.health("front").unwrap();
        assert_eq!((h.readings, h.last_error_kind), (1, None));
        assert_eq!(b.health("nope"), None);
    }

    #[test]
    fn the_report_is_the_documented_json() {
        let r = reading(12.345, 1_700_000_000_000).report();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"value": 12.345, "unit": "kg", "stable": true,
                "overload": false, "zero": false, "at": 1_700_000_000_000i64})
        );
        let back: WeightReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}
