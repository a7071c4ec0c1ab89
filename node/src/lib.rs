//! The node: configuration and what the binary runs, as a library so that
//! tests drive it in process.
//!
//! # Layout
//! - [`config`]: `cluster.toml` parsing and validation (unknown keys rejected,
//!   contradictions named by key), translated into engine types.
//! - [`crash_load`]: a load that runs until killed and records every
//!   acknowledged commit, for the kill -9 tests.
//! - [`sale`]: the simulated flash sale of the README's first command, with
//!   its book checks.
//!
//! The QUIC endpoint, routing and admin endpoints join with the cluster.

pub mod config;
pub mod crash_load;
pub mod sale;
