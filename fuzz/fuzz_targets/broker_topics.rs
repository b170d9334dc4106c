//! The embedded broker's topic matching, fed a topic and a filter as any client may send
//! them (split at the first NUL): never a panic (a topic starting with a multi-byte
//! character once stopped the router), and filter validation never panics either.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rumqttd::protocol::{matches, valid_filter};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (topic, filter) = s.split_once('\0').unwrap_or((s, "#"));
    let _ = matches(topic, filter);
    let _ = valid_filter(filter);
    // `#` matches every topic but those starting with `$`.
    assert_eq!(matches(topic, "#"), !topic.starts_with('$'));
    // A topic without wildcards matches itself as a filter, unless it starts with `$`.
    if !topic.contains(['+', '#']) && !topic.starts_with('$') {
        assert!(matches(topic, topic));
    }
});
