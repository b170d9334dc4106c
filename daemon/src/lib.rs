//! pickupd: the edge dispatch daemon of a parcel pickup centre.
//!
//! Layout:
//! - [`dispatch`]: the pure saga (calls, couriers, assignment), no I/O;
//! - [`store`]: SQLite — one writer thread group-committing decisions, a read-only
//!   connection for status reads, migrations;
//! - [`config`]: layered settings (defaults → TOML → `PICKUPD__…` environment);
//! - [`app`]: the running daemon — the MQTT adapter, the dispatch loop, the outbox
//!   publisher and the status reader wired together;
//! - [`ctl`]: what `pickupctl` does.

pub mod dispatch;
pub mod store;
