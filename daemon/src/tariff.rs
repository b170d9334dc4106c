//! What a pickup costs: a base price per parcel class plus a price per kilometre between the
//! pickup point and the destination when the kiosk gives one. Prices are whole won (the
//! smallest currency unit), so they are stored and compared exactly.

use pickup_protocol::{Location, ParcelClass};
use serde::{Deserialize, Serialize};

/// The price list, from the `[tariff]` table of the config. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tariff {
    /// Base price of a light parcel (under the heavy threshold), won.
    pub light: u64,
    /// Base price of a heavy parcel, won.
    pub heavy: u64,
    /// Price per kilometre from pickup to destination, won; charged only when the call
    /// names a destination.
    pub per_km: u64,
    /// Lowest price ever charged, won; absent means no floor beyond the base price.
    pub minimum: Option<u64>,
    /// Prices are rounded up to a multiple of this many won (1 = no rounding), so that the
    /// distance part does not produce odd amounts.
    pub round_to: u64,
}

impl Default for Tariff {
    fn default() -> Self {
        Self {
            light: 4_000,
            heavy: 7_000,
            per_km: 600,
            minimum: None,
            round_to: 100,
        }
    }
}

impl Tariff {
    /// Checks the values; `key` is where the table sits in the config (say `tariff`).
    pub fn validate(&self, key: &str) -> Result<(), String> {
        if self.round_to == 0 {
            return Err(format!(
                "{key}.round_to: must be at least 1 (1 means no rounding)"
            ));
        }
        Ok(())
    }

    /// The price of a pickup of `class` over `distance_m` metres (None: no destination
    /// known, base price only). A distance that is not a finite, non-negative number is
    /// treated as unknown rather than trusted.
    pub fn price(&self, class: ParcelClass, distance_m: Option<f64>) -> u64 {
        let base = match class {
            ParcelClass::Light => self.light,
            ParcelClass::Heavy => self.heavy,
        };
        let distance_part = match distance_m {
            Some(d) if d.is_finite() && d >= 0.0 => {
                // Float-to-int `as` saturates, so an absurd distance cannot wrap around.
                (d / 1000.0 * self.per_km as f64).ceil() as u64
            }
            _ => 0,
        };
        let raw = base.saturating_add(distance_part);
        let step = self.round_to.max(1);
        let rounded = raw.div_ceil(step).saturating_mul(step);
        rounded.max(self.minimum.unwrap_or(0))
    }

    /// The price of a call picked up at `pickup` and going to `destination` (if known).
    pub fn price_for(
        &self,
        class: ParcelClass,
        pickup: &Location,
        destination: Option<&Location>,
    ) -> u64 {
        self.price(class, destination.map(|d| distance_m(pickup, d)))
    }
}

pub use crate::dispatch::geo::haversine_m;
#[cfg(test)]
use crate::dispatch::geo::EARTH_RADIUS_M;

/// Distance between two locations, metres.
pub fn distance_m(a: &Location, b: &Location) -> f64 {
    haversine_m(a.lat, a.lon, b.lat, b.lon)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(lat: f64, lon: f64) -> Location {
        Location {
            lat,
            lon,
            label: None,
        }
    }

    #[test]
    fn haversine_matches_known_distances() {
        assert_eq!(haversine_m(37.5665, 126.978, 37.5665, 126.978), 0.0);
        // One degree of latitude on the mean sphere: R * pi / 180.
        let one_deg = haversine_m(0.0, 0.0, 1.0, 0.0);
        assert!((one_deg - 111_195.08).abs() < 0.1, "{one_deg}");
        // Seoul City Hall to Busan City Hall: about 325 km as the crow flies.
        let d = haversine_m(37.5663, 126.9779, 35.1798, 129.0750);
        assert!((320_000.0..330_000.0).contains(&d), "{d}");
        // Symmetric, and defined across the antimeridian and at antipodes.
        let there = haversine_m(10.0, 179.5, 10.0, -179.5);
        let back = haversine_m(10.0, -179.5, 10.0, 179.5);
        assert!((there - back).abs() < 1e-6);
        assert!(there < 120_000.0, "{there}");
        let antipodes = haversine_m(0.0, 0.0, 0.0, 180.0);
        assert!((antipodes - EARTH_RADIUS_M * std::f64::consts::PI).abs() < 1.0);
    }

    #[test]
    fn base_price_by_class_without_destination() {
        let t = Tariff::default();
        assert_eq!(t.price(ParcelClass::Light, None), 4_000);
        assert_eq!(t.price(ParcelClass::Heavy, None), 7_000);
    }

    #[test]
    fn distance_adds_per_km_and_rounds_up() {
        let t = Tariff::default();
        // 2.5 km * 600 = 1500 -> 5500
        assert_eq!(t.price(ParcelClass::Light, Some(2_500.0)), 5_500);
        // 1 m * 0.6 won = 0.6 -> ceil 1 -> 4001 -> rounded up to 4100
        assert_eq!(t.price(ParcelClass::Light, Some(1.0)), 4_100);
        assert_eq!(t.price(ParcelClass::Heavy, Some(0.0)), 7_000);
        let exact = Tariff {
            round_to: 1,
            ..Tariff::default()
        };
        assert_eq!(exact.price(ParcelClass::Light, Some(1_234.0)), 4_741);
    }

    #[test]
    fn minimum_is_a_floor() {
        let t = Tariff {
            light: 1_000,
            minimum: Some(3_000),
            ..Tariff::default()
        };
        assert_eq!(t.price(ParcelClass::Light, None), 3_000);
        assert_eq!(t.price(ParcelClass::Light, Some(10_000.0)), 7_000);
    }

    #[test]
    fn nonsense_distances_count_as_unknown_and_huge_ones_saturate() {
        let t = Tariff::default();
        for d in [f64::NAN, f64::INFINITY, -5.0] {
            assert_eq!(t.price(ParcelClass::Light, Some(d)), 4_000, "{d}");
        }
        let t = Tariff {
            per_km: u64::MAX,
            ..Tariff::default()
        };
        assert_eq!(t.price(ParcelClass::Heavy, Some(1e300)), u64::MAX);
    }

    #[test]
    fn price_for_uses_the_distance_between_pickup_and_destination() {
        let t = Tariff::default();
        let a = loc(37.0, 127.0);
        let b = loc(37.01, 127.0); // about 1.11 km north
        assert_eq!(t.price_for(ParcelClass::Light, &a, None), 4_000);
        // 1.112 km * 600 = 667.2 -> 4668 -> 4700
        assert_eq!(t.price_for(ParcelClass::Light, &a, Some(&b)), 4_700);
    }

    #[test]
    fn config_parses_partially_and_names_bad_keys() {
        let t: Tariff = toml::from_str("per_km = 1000\nminimum = 5000").unwrap();
        assert_eq!(t.per_km, 1_000);
        assert_eq!(t.minimum, Some(5_000));
        assert_eq!(t.light, 4_000);
        let e = toml::from_str::<Tariff>("per_mile = 1").unwrap_err();
        assert!(e.to_string().contains("per_mile"), "{e}");
        let e = toml::from_str::<Tariff>("light = -1").unwrap_err();
        assert!(e.to_string().contains("light"), "{e}");
        let e = Tariff {
            round_to: 0,
            ..Tariff::default()
        }
        .validate("tariff")
        .unwrap_err();
        assert!(e.starts_with("tariff.round_to:"), "{e}");
    }
}
