//! `calls/<id>/cancel` payloads: never a panic; the reason is checked like the daemon does.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pickup_protocol::answer::decode_request;
use pickup_protocol::{validate, CancelCall};

fuzz_target!(|data: &[u8]| {
    let (_path, res) = decode_request::<CancelCall>(data);
    match res {
        Ok(c) => {
            if let Some(r) = &c.reason {
                let _ = validate::text("reason", r);
            }
        }
        Err(e) => {
            let _ = e.to_body();
        }
    }
});
