//! `couriers/<cid>/presence` reports: never a panic, validation included.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pickup_protocol::answer::decode_report;
use pickup_protocol::Presence;

fuzz_target!(|data: &[u8]| {
    match decode_report::<Presence>(data) {
        Ok(p) => {
            let _ = p.validate();
        }
        Err(e) => {
            let _ = e.to_body();
        }
    }
});
