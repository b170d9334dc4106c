//! The embedded broker's MQTT decoders (3.1.1 and 5), fed what a client on the network
//! may send: never a panic, whatever the bytes. Each packet decoded is encoded again, as
//! the broker does when it forwards one.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rumqttd::protocol::{v4::V4, v5::V5, Protocol};

/// The broker's default `max_payload`.
const MAX: usize = 65536;

fn drain(proto: &mut impl Protocol, data: &[u8]) {
    let mut stream = BytesMut::from(data);
    // A stream holds at most one packet per byte; stop at the first error (the broker
    // then waits for more bytes or closes the connection).
    for _ in 0..=data.len() {
        let Ok(packet) = proto.read_mut(&mut stream, MAX) else {
            return;
        };
        let mut out = BytesMut::new();
        let _ = proto.write(packet, &mut out);
    }
}

fuzz_target!(|data: &[u8]| {
    drain(&mut V4, data);
    drain(&mut V5, data);
});
