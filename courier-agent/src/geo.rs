//! Distances and small moves on the earth's surface: enough to decide when a courier has
//! moved "significantly" and to walk simulated couriers around a center.

/// Mean earth radius, metres.
const EARTH_M: f64 = 6_371_000.0;

/// A WGS84 position.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Point {
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
}

impl Point {
    /// A point.
    pub fn new(lat: f64, lon: f64) -> Self {
        Self { lat, lon }
    }

    /// Great-circle distance in metres (haversine).
    pub fn distance_m(self, other: Point) -> f64 {
        let (p1, p2) = (self.lat.to_radians(), other.lat.to_radians());
        let dp = p2 - p1;
        let dl = (other.lon - self.lon).to_radians();
        let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
        2.0 * EARTH_M * a.sqrt().asin()
    }

    /// The point `east_m` metres east and `north_m` metres north (flat-earth approximation,
    /// good to well under a metre at city scale).
    pub fn offset(self, east_m: f64, north_m: f64) -> Point {
        let dlat = (north_m / EARTH_M).to_degrees();
        let cos = self.lat.to_radians().cos().max(1e-6);
        let dlon = (east_m / (EARTH_M * cos)).to_degrees();
        Point {
            lat: (self.lat + dlat).clamp(-90.0, 90.0),
            lon: wrap_lon(self.lon + dlon),
        }
    }

    /// Moves up to `step_m` metres straight towards `target`; returns the new point and
    /// whether the target was reached.
    pub fn step_towards(self, target: Point, step_m: f64) -> (Point, bool) {
        let d = self.distance_m(target);
        if d <= step_m || d == 0.0 {
            return (target, true);
        }
        let f = step_m / d;
        (
            Point {
                lat: self.lat + (target.lat - self.lat) * f,
                lon: self.lon + (target.lon - self.lon) * f,
            },
            false,
        )
    }
}

fn wrap_lon(lon: f64) -> f64 {
    if lon > 180.0 {
        lon - 360.0
    } else if lon < -180.0 {
        lon + 360.0
    } else {
        lon
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_and_offsets_agree() {
        let a = Point::new(37.5, 127.0);
        let b = a.offset(300.0, 400.0);
        let d = a.distance_m(b);
        assert!((d - 500.0).abs() < 1.0, "{d}");
        // One degree of latitude is about 111.2 km.
        let d = a.distance_m(Point::new(38.5, 127.0));
        assert!((d - 111_195.0).abs() < 100.0, "{d}");
    }

    #[test]
    fn steps_stop_at_the_target() {
        let a = Point::new(37.5, 127.0);
        let t = a.offset(100.0, 0.0);
        let (p, done) = a.step_towards(t, 30.0);
        assert!(!done);
        assert!((a.distance_m(p) - 30.0).abs() < 0.5);
        let (p, done) = p.step_towards(t, 1000.0);
        assert!(done);
        assert_eq!(p, t);
    }
}
