//! `couriers/<cid>/location` reports: never a panic; a valid position is finite and in
//! range.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pickup_protocol::answer::decode_report;
use pickup_protocol::CourierLocation;

fuzz_target!(|data: &[u8]| {
    match decode_report::<CourierLocation>(data) {
        Ok(l) => {
            if l.validate().is_ok() {
                assert!(l.lat.is_finite() && (-90.0..=90.0).contains(&l.lat));
                assert!(l.lon.is_finite() && (-180.0..=180.0).contains(&l.lon));
            }
        }
        Err(e) => {
            let _ = e.to_body();
        }
    }
});
