//! pickupd: the edge dispatch daemon of a parcel pickup centre.
//!
//! Layout:
//! - [`dispatch`]: the pure saga (calls, couriers, assignment), no I/O;
//! - [`store`]: SQLite — one writer thread group-committing decisions, read-only
//!   connections for status reads, migrations;
//! - [`config`]: layered settings (defaults → TOML → `PICKUPD__…` environment);
//! - [`app`]: the running daemon — the MQTT adapter, the dispatch loop, the outbox
//!   publisher and the status reader wired together;
//! - [`scale`]: weighing scales over Modbus, and the parcel class they decide;
//! - [`tariff`]: prices by class and distance;
//! - [`breaker`]: the one circuit breaker type (admission, scale, notification relay);
//! - [`notify`]: customer notification sinks beyond MQTT (the HTTP webhook) and their
//!   operator view;
//! - [`ctl`]: what `pickupctl` does;
//! - [`demo`]: `pickupd demo`, the daemon with simulated couriers and kiosks;
//! - [`logging`]: log setup;
//! - [`metrics`]: the optional Prometheus endpoint;
//! - [`memory`]: free heap pages handed back to the system after bursts;
//! - [`systemd`]: readiness, status, watchdog (sd_notify);
//! - [`security`]: the device registry, broker authentication, Mosquitto ACL generation.

pub mod app;
pub mod breaker;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod dispatch;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod scale;
pub mod security;
pub mod store;
pub mod systemd;
pub mod tariff;
