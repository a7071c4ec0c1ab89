//! The node: configuration and what the binary runs, as a library so that
//! tests drive it in process.
//!
//! # Layout
//! - [`config`]: `cluster.toml` parsing and validation (unknown keys rejected,
//!   contradictions named by key), translated into engine types.
//! - [`crash_load`]: a load that runs until killed and records every
//!   acknowledged commit, for the kill -9 tests.
//! - [`sale`]: the simulated flash sale of the README's first command, with
//!   its book checks, run against a [`shop::Shop`].
//! - [`shop`]: the shop a sale runs against: the engine in process, or the
//!   cluster through the client crate.
//! - [`local_cluster`]: members as child processes, for the `cluster`
//!   command and the demo.
//! - [`operations`]: a member's metrics (Prometheus), health and status
//!   over HTTP on its `metrics_address`.
//! - [`tls`]: development certificates, the rustls configurations of both
//!   ends (mutual TLS), and the role a peer's certificate names.
//! - [`peers`]: the long-lived links to the other members, and which of
//!   them are up.
//! - [`replication`]: the driver of the member's replication groups (the
//!   engine's raft replicas and group state machines): requests, raft
//!   batches between members, one raft log and one fsync per round.
//! - [`raft_log`]: that log: one file of every group's replica writes,
//!   checksummed, cut at a torn tail, rewritten from live state.
//! - [`server`]: the QUIC endpoint of a member: handshake, requests,
//!   ownership checks.
//! - `session` (private): a member's side of a client's (or peer's)
//!   session: a frame's requests started in one go, answers gathered.
//! - [`coordination`]: the driver of the member's order coordinator (the
//!   engine's pure state machine): every order whose id's partition this
//!   member owns; those with lines elsewhere by two-phase commit over the
//!   peer links.
//! - `translate` (private): the one place wire and engine types meet.

pub mod config;
pub mod coordination;
pub mod crash_load;
pub mod local_cluster;
pub mod operations;
pub mod peers;
pub mod raft_log;
pub mod replication;
pub mod sale;
pub mod server;
mod session;
pub mod shop;
pub mod tls;
mod translate;
