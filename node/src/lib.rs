//! The node: configuration and what the binary runs, as a library so that
//! tests drive it in process.
//!
//! # Layout
//! - [`config`]: `cluster.toml` parsing and validation (unknown keys rejected,
//!   contradictions named by key), translated into engine types.
//! - [`sale`]: the simulated flash sale of the README's first command, with
//!   its book checks.
//!
//! The QUIC endpoint, routing and admin endpoints join with the cluster.

pub mod config;
pub mod sale;
