//! The MQTT contract of pickupd, shared by the daemon, the courier agent, `pickupctl`
//! and anyone writing a kiosk client in Rust.
//!
//! Layout:
//! - [`topic`]: builds every topic under `pickup/v1/<site>/` and parses incoming ones;
//! - [`msg`]: the JSON payloads (serde types) in both directions;
//! - [`validate`]: checks on values that came from outside (coordinates, phone numbers,
//!   ids, lengths) and the masking of personal data;
//! - [`answer`]: request decoding with its reply path (MQTT 5 properties or the MQTT 3.1.1
//!   `reply_to`/`correlation_id` payload fields) and the `{"ok":...}` answer shape with
//!   stable error codes.
//!
//! Nothing here does I/O, so every decoder can be fuzzed and table-tested on its own.

pub mod answer;
#[cfg(feature = "client")]
pub mod client;
pub mod msg;
pub mod topic;
pub mod validate;

pub use answer::{ErrorBody, ErrorCode, ReplyPath, RequestError};
pub use msg::*;
pub use topic::{Inbound, TopicError, Topics};

/// Unix time in milliseconds: the one time format on the wire and in the database.
pub type Millis = i64;

/// Largest payload any pickupd topic accepts; bigger ones are refused unread.
pub const MAX_PAYLOAD: usize = 16 * 1024;
