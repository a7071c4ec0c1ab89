//! The structures that threads share without an actor in between.
//!
//! Everything else in the engine is owned by exactly one actor at a time; the
//! few places below are touched concurrently by the network edge and the
//! actors, so each one states its promise and has a loom test of it
//! (`tests/loom.rs`, built with `RUSTFLAGS="--cfg flashstock_loom"`).
//!
//! # Layout
//! - [`primitives`]: the atomics and queue we build on; the only module that
//!   switches to loom under `--cfg flashstock_loom`.
//! - [`gate`]: [`AdmissionGate`], a bounded count of requests in flight;
//!   beyond the bound a caller is told to back off instead of queueing.
//! - [`snapshot`]: [`StockSnapshotCell`], a single-writer seqlock with a SKU's
//!   available / held / sold, read by the edge to answer `SoldOut` without a
//!   trip to the actor.
//! - [`watermark`]: [`DurableWatermark`], the highest log sequence number
//!   known durable; it never moves back.
//! - [`wake`]: [`WakeQueue`], a multi-producer queue whose consumer is woken
//!   exactly once per batch of work and can park itself (actor passivation)
//!   without losing a request.

pub mod gate;
pub mod primitives;
pub mod snapshot;
pub mod wake;
pub mod watermark;

pub use gate::AdmissionGate;
pub use snapshot::{SnapshotReading, StockSnapshot, StockSnapshotCell};
pub use wake::{Pushed, WakeQueue};
pub use watermark::DurableWatermark;
