//! What checkout services link to talk to a flashstock cluster.
//!
//! A [`Client`] keeps one QUIC connection (mutual TLS) per member, learns
//! the partition map from any seed, sends each call straight to the member
//! that owns the SKU, retries what is safe to retry (busy, unavailable,
//! lost connection, timeout) with the same idempotency key, and answers
//! with typed [`Error`]s.
//!
//! A whole checkout: hold, take the payment, then sell or give back.
//!
//! ```no_run
//! use std::time::Duration;
//! use flashstock_client::{Client, Error, Order, OrderLine, Quantity};
//!
//! # async fn charge_card(_buyer: &str) -> bool { true }
//! async fn checkout(client: &Client, order_id: &str, buyer: &str) -> Result<(), Error> {
//!     let order = Order {
//!         id: order_id.to_owned(), // the idempotency key: retries never hold twice
//!         buyer: buyer.to_owned(),
//!         lines: vec![OrderLine { sku: "tv-55".to_owned(), quantity: Quantity::Exactly(1) }],
//!         hold_ttl: Duration::from_secs(120),
//!     };
//!     let reservation = match client.reserve(&order).await {
//!         Ok(reservation) => reservation,
//!         Err(Error::SoldOut { sku, .. }) => {
//!             println!("{sku} is gone");
//!             return Ok(());
//!         }
//!         Err(other) => return Err(other),
//!     };
//!     if charge_card(buyer).await {
//!         client.commit(&reservation.id).await?; // sold
//!     } else {
//!         client.release(&reservation.id).await?; // back on the shelf
//!     }
//!     Ok(())
//! }
//!
//! # async fn run() -> Result<(), Error> {
//! let client = Client::builder()
//!     .seed("127.0.0.1:7401".parse().expect("an address"))
//!     .seed("127.0.0.1:7402".parse().expect("an address"))
//!     .tls_directory(std::path::Path::new("certs"), "checkout")
//!     .connect()
//!     .await?;
//! checkout(&client, "order-7f3a", "buyer-42").await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`routing`]: SKU -> partition (stable FNV-1a hash) and partition -> node
//!   (rendezvous hashing over the members).
//! - [`wire`]: the messages between clients and nodes, their framing and
//!   the bounded decoder for untrusted bytes.
//! - [`tls`]: loading the CA and the client's identity; the rustls
//!   configuration of a connecting side.
//! - `client` ([`Client`], [`ClientBuilder`]): connections, routing, retries.
//! - `error` ([`Error`]): what can go wrong, typed.
//! - [`session`]: the long-lived stream whose batch frames carry the calls
//!   to one member (a writer that coalesces, a reader that routes answers
//!   by id); the members use it for their calls to each other too.
//! - [`exchange`]: one request exchange on a connection (stream, frame,
//!   answer, deadline), shared with the members' calls to their peers.
//!
//! This crate depends on nothing of ours (never the engine, never ractor).

mod client;
mod error;
pub mod exchange;
pub mod routing;
pub mod session;
pub mod tls;
pub mod wire;

pub use client::{
    Client, ClientBuilder, ClusterStatus, GroupStatus, LineResult, MemberStatus, Order, OrderLine, Quantity,
    Reservation, ReservationId, RetryPolicy, Settlement, Stock,
};
pub use error::Error;
