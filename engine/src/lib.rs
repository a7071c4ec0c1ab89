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
//! - [`log`]: the node's log: framing, recovery scan, records, segments,
//!   snapshots and their compaction, the group-commit writer, and the
//!   storage it runs on.
//! - [`actor`]: the ractor actor that owns one SKU's state, drains its queue
//!   in batches, expires holds on a timer and passivates when idle.
//! - [`runtime`]: [`Engine`], the in-process entry point: routing to SKU
//!   actors, admission (`Busy`), the sold-out hint, all-or-nothing orders.
//! - `directory` (private): the per-partition order directory behind
//!   order-level idempotency and the commit decision.
//!
//! The structures shared between threads without an actor live in the
//! `flashstock-sync` crate, which is loom-checked on its own.

pub mod actor;
pub mod clock;
mod directory;
pub mod ids;
pub mod limits;
pub mod log;
pub mod order;
pub mod partition;
pub mod runtime;
pub mod sku;
mod transaction;

pub use clock::{Clock, ManualClock, SystemClock};
pub use ids::{BuyerId, InvalidId, OperationId, OrderId, SkuId};
pub use limits::Limits;
pub use order::{Line, OrderError, OrderRequest, OrderStatus, Reservation, ReservedLine, Settlement};
pub use runtime::{Durability, Engine, EngineConfig, EngineError, LogStats, OpenError, RecoveryReport, StockTotals};
pub use sku::{
    AdminChange, Quantity, SkuAnswer, SkuCommand, SkuError, SkuOutcome, SkuSettings, SkuState, StockSnapshot,
};
