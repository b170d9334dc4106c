pub mod alerts;
pub mod bridge;
// pickupd patch: the HTTP console only with the `console` feature.
#[cfg(feature = "console")]
pub mod console;
pub mod local;
pub mod meters;
pub mod network;
pub mod remote;
pub mod timer;
