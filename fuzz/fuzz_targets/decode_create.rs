//! `calls/create` payloads: never a panic; a reply path found is bounded; a request that
//! decodes and validates survives a JSON round trip unchanged.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pickup_protocol::answer::decode_request;
use pickup_protocol::CreateCall;

fuzz_target!(|data: &[u8]| {
    let (path, res) = decode_request::<CreateCall>(data);
    assert!(path.topic.as_ref().is_none_or(|t| t.len() <= 256));
    assert!(path.correlation_id.as_ref().is_none_or(|c| c.len() <= 128));
    match res {
        Ok(c) => {
            if c.validate(10.0).is_ok() {
                let bytes = serde_json::to_vec(&c).unwrap();
                let (_, again) = decode_request::<CreateCall>(&bytes);
                assert_eq!(again.expect("re-decoding a valid request"), c);
            }
        }
        Err(e) => {
            let _ = e.to_body();
        }
    }
});
