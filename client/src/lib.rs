//! What checkout services link to talk to a flashstock cluster.
//!
//! Today: routing, the one piece every node and every client must compute
//! identically, and the wire protocol. The connection pool, retries with
//! idempotency keys and typed errors arrive with the cluster.
//!
//! # Layout
//! - [`routing`]: SKU -> partition (stable FNV-1a hash) and partition -> node
//!   (rendezvous hashing over the members).
//! - [`wire`]: the messages between clients and nodes, their framing and
//!   the bounded decoder for untrusted bytes.
//!
//! This crate depends on nothing of ours (never the engine, never ractor).

mod client;
mod error;
pub mod routing;
pub mod tls;
pub mod wire;

pub use client::{
    Client, ClientBuilder, ClusterStatus, LineResult, MemberStatus, Order, OrderLine, Quantity, Reservation,
    ReservationId, RetryPolicy, Settlement, Stock,
};
pub use error::Error;
