//! End-to-end tests: the daemon with its embedded broker (or Debian's Mosquitto), a real
//! SQLite file in a temp dir, kiosks and couriers as real MQTT clients on loopback.

mod bad_input;
mod couriers;
mod dispatch;
mod external;
mod overload;
mod recovery;
mod scale;
