//! The dispatch core: the call → manage → assign saga as plain data and functions.
//!
//! No tokio, SQLite or MQTT in here: inputs come in with `now`, and each returns a
//! [`Decision`] (rows to write, messages to publish in the same transaction, the answer to
//! send after commit). The adapters in `crate::app` carry decisions out. That keeps every
//! rule testable with plain table tests and a hand-turned clock.

pub mod assign;
pub mod call;
pub mod courier;
pub mod geo;
pub mod notice;
pub mod saga;

pub use call::{Call, Offer};
pub use courier::Courier;
pub use saga::{
    CancelledBy, Change, Decision, Delivery, DispatchConfig, Dispatcher, EventRow, Mode, NewCall,
    OutMsg, ReplyBody,
};

#[cfg(test)]
mod tests;
