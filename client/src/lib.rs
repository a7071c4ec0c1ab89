//! What checkout services link to talk to a flashstock cluster.
//!
//! Today: routing, the one piece every node and every client must compute
//! identically. The connection pool, wire protocol, retries with idempotency
//! keys and typed errors arrive with the cluster.
//!
//! # Layout
//! - [`routing`]: SKU -> partition (stable FNV-1a hash) and partition -> node
//!   (rendezvous hashing over the members).
//!
//! This crate depends on nothing of ours (never the engine, never ractor).

pub mod routing;
