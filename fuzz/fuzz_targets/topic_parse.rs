//! Inbound topics: never a panic; whatever parses carries a valid id and rebuilds to the
//! very same topic (so no two topics alias one meaning).
#![no_main]
use libfuzzer_sys::fuzz_target;
use pickup_protocol::validate::is_valid_id;
use pickup_protocol::{Inbound, Topics};

fuzz_target!(|data: &[u8]| {
    let Ok(topic) = std::str::from_utf8(data) else {
        return;
    };
    let t = Topics::new("site-1").unwrap();
    if let Ok(k) = t.parse(topic) {
        let rebuilt = match k {
            Inbound::CreateCall => t.calls_create(),
            Inbound::CancelCall(id) => t.call_cancel(id),
            Inbound::GetCall(id) => t.call_get(id),
            Inbound::Presence(id) => t.courier_presence(id),
            Inbound::Location(id) => t.courier_location(id),
            Inbound::JobReply(id) => t.courier_job_reply(id),
        };
        assert_eq!(rebuilt, topic);
        if let Inbound::CancelCall(id)
        | Inbound::GetCall(id)
        | Inbound::Presence(id)
        | Inbound::Location(id)
        | Inbound::JobReply(id) = k
        {
            assert!(is_valid_id(id));
        }
    }
});
