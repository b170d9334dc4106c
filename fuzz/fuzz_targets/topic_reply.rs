//! Reply topics chosen by requesters: never a panic; an accepted one is exactly a
//! `kiosks|clients|couriers/<valid id>/replies` topic under the site prefix, so a request
//! can never steer an answer onto a state, job or notification topic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pickup_protocol::topic::ReplyOwner;
use pickup_protocol::validate::is_valid_id;
use pickup_protocol::Topics;

fuzz_target!(|data: &[u8]| {
    let Ok(topic) = std::str::from_utf8(data) else {
        return;
    };
    let t = Topics::new("site-1").unwrap();
    if let Ok(owner) = t.parse_reply_topic(topic) {
        let (rebuilt, id) = match owner {
            ReplyOwner::Kiosk(id) => (t.kiosk_replies(id), id),
            ReplyOwner::Client(id) => (t.client_replies(id), id),
            ReplyOwner::Courier(id) => (t.courier_replies(id), id),
        };
        assert_eq!(rebuilt, topic);
        assert!(is_valid_id(id));
        assert!(!topic.contains('+') && !topic.contains('#'));
    }
});
