//! placeholder

pub mod breaker;
pub mod scale;
pub mod tariff;
