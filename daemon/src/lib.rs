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
//! - [`ctl`]: what `pickupctl` does;
//! - [`demo`]: `pickupd demo`, the daemon with simulated couriers and kiosks;
//! - [`logging`]: log setup;
//! - [`metrics`]: the optional Prometheus endpoint;
//! - [`systemd`]: readiness, status, watchdog (sd_notify).

pub mod app;
pub mod breaker;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod dispatch;
pub mod logging;
pub mod metrics;
pub mod scale;
pub mod store;
pub mod systemd;
pub mod tariff;
