//! Distances on the Earth's surface, good enough for a city: haversine on a sphere.

/// Mean Earth radius in metres.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Great-circle distance in metres between two WGS84 points.
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    // Rounding can push `a` a hair above 1 for antipodal points; asin would give NaN.
    2.0 * EARTH_RADIUS_M * a.sqrt().clamp(0.0, 1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_distances() {
        assert_eq!(haversine_m(37.5, 127.0, 37.5, 127.0), 0.0);
        // One degree of latitude is about 111.2 km.
        let d = haversine_m(37.0, 127.0, 38.0, 127.0);
        assert!((d - 111_195.0).abs() < 100.0, "{d}");
        // Seoul City Hall to Gangnam station, about 8.9 km.
        let d = haversine_m(37.5663, 126.9779, 37.4979, 127.0276);
        assert!((8_000.0..10_000.0).contains(&d), "{d}");
    }
}
