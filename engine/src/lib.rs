//! The flash-sale inventory engine.
//!
//! A pure state machine per SKU, driven by one actor per active SKU, with
//! admission control and a sold-out fast path in front. The engine knows
//! nothing of the network: the node translates wire requests into the types
//! here.
//!
//! # Layout
//! - [`ids`]: validated SKU, order and buyer ids.
//! - [`limits`]: every bound the engine enforces, with its reason.
//! - [`sku`]: the pure, deterministic state machine of one SKU (commands,
//!   outcomes, errors, the conservation invariant).
//! - [`order`]: multi-line orders: validation and merging of lines (pure).
//! - [`partition`]: the stable SKU -> partition hash.
//! - [`clock`]: where the shell gets `now` from (system or manual clock).
//! - [`coordination`]: orders across members as pure state machines (the
//!   coordinator at an order's home, the participant of each member).
//! - [`replication`]: partition groups replicated with tikv raft-rs, as
//!   pure state machines (the replica, its storage, the group's state
//!   machine with its leader's coordinator).
//! - [`log`]: the node's log: framing, recovery scan, records, segments,
//!   snapshots and their compaction, the group-commit writer, and the
//!   storage it runs on.
//! - [`actor`]: the ractor actor that owns one SKU's state, drains its queue
//!   in batches, expires holds on a timer and passivates when idle.
//! - [`config`]: [`EngineConfig`], how the engine runs, and its checks.
//! - `slot` (private): what outlives a SKU's actor, and the requests and
//!   messages that travel to it.
//! - [`runtime`]: [`Engine`], the in-process entry point: routing to SKU
//!   slots, admission (`Busy`), admin changes, availability.
//! - `orders` (private): all-or-nothing reserve, commit and release, the
//!   sold-out hint.
//! - `batch` (private): [`Engine::submit_batch`], a frame's requests in one
//!   go: one admission and one push per SKU, answers through a
//!   [`BatchSink`] instead of a future each.
//! - `recovery` (private): [`Engine::open`], a durable engine rebuilt from
//!   its log.
//! - `parts` (private): [`Engine::apply_part`], the participant side of
//!   orders coordinated by [`coordination`], through the SKU actors.
//! - `statistics` (private): totals and counters for status pages.
//! - `directory` (private): the per-partition order directory behind
//!   order-level idempotency and the commit decision.
//! - `transaction` (private): multi-line commits as transactions, and the
//!   participant side for coordinators on other members.
//!
//! Dependencies run one way: `slot` <- `actor`, `directory` <- `runtime`
//! <- `orders` <- `batch`, and `recovery`, `statistics`, `transaction` on
//! `runtime`; the one loop is a request's reply in `slot`, which may be a
//! batch's completion.
//!
//! The structures shared between threads without an actor live in the
//! `flashstock-sync` crate, which is loom-checked on its own.

pub mod actor;
mod batch;
pub mod clock;
pub mod config;
pub mod coordination;
mod directory;
pub mod ids;
pub mod limits;
pub mod log;
pub mod order;
mod orders;
pub mod partition;
mod parts;
mod recovery;
pub mod replication;
pub mod runtime;
pub mod sku;
mod slot;
mod statistics;
mod transaction;

pub use batch::{BatchAnswer, BatchRequest, BatchSink};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::EngineConfig;
pub use ids::{BuyerId, InvalidId, OperationId, OrderId, SkuId};
pub use limits::Limits;
pub use order::{Line, OrderError, OrderRequest, OrderStatus, Reservation, ReservedLine, Settlement};
pub use parts::PartNotNow;
pub use recovery::{Durability, OpenError, RecoveryReport};
pub use runtime::{Engine, EngineError};
pub use sku::{
    AdminChange, Quantity, SkuAnswer, SkuCommand, SkuError, SkuOutcome, SkuSettings, SkuState, StockSnapshot,
};
pub use statistics::{LogStats, StockTotals};
