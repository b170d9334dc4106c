//! Customer notification sinks, around the dispatch core's notifications.
//!
//! The core renders each notification (`dispatch::notice` templates) and queues it in the
//! same transaction as the call change that caused it: an outbox row for the MQTT
//! `notifications` topic (drained by `app::publisher`, QoS 1) and, when the webhook is
//! configured, a `deliveries` row for the HTTP sink here. Both sinks deliver at least
//! once, keyed by the notification id, in order per call. See docs/notifications.md.
//!
//! - [`webhook`]: the HTTP sink task (retries, backoff, breaker, dead letters);
//! - [`http`]: its minimal HTTP/1.1 client;
//! - [`ctl`]: `pickupctl notifications` (list, re-drive).

pub mod ctl;
pub mod http;
pub mod webhook;
