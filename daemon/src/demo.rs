//! placeholder for demo
