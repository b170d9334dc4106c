//! placeholder
pub mod systemd;
