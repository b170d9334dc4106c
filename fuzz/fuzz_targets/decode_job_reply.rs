//! `couriers/<cid>/job/reply` payloads: never a panic; a valid reply carries valid ids.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pickup_protocol::answer::decode_request;
use pickup_protocol::validate::is_valid_id;
use pickup_protocol::JobReply;

fuzz_target!(|data: &[u8]| {
    let (_path, res) = decode_request::<JobReply>(data);
    match res {
        Ok(r) => {
            if r.validate().is_ok() {
                assert!(is_valid_id(&r.call_id));
                assert!(r.pickup_code.as_deref().is_none_or(is_valid_id));
                let bytes = serde_json::to_vec(&r).unwrap();
                assert_eq!(decode_request::<JobReply>(&bytes).1.expect("round trip"), r);
            }
        }
        Err(e) => {
            let _ = e.to_body();
        }
    }
});
