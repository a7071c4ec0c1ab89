//! A deterministic simulation of a whole flash-stock cluster in one
//! process, from one seed.
//!
//! - `rng`: the one source of randomness (SplitMix64).
//! - `member`: a member — the engine's real SKU state machines, participant
//!   and coordinator over a log whose unsynced tail a crash loses, replayed
//!   through the engine's real record decoding and replay on restart.
//! - `workload`: buyers who reserve, commit, commit fewer, release, walk
//!   away, retry with the same idempotency key, reuse an id with other
//!   content, and send malformed requests.
//! - `history`: every answer checked against the earlier ones, and the
//!   final state against every answer.
//! - `simulation`: the event loop, the faulty network, crashes and
//!   partitions, and the run's report.
//!
//! Same seed, same run: nothing here reads a clock, a socket or the
//! process's randomness, and every map walked is ordered.

pub mod history;
pub mod member;
pub mod rng;
pub mod simulation;
pub mod workload;

pub use member::{Endpoint, Message};
pub use simulation::{run, RunReport, Scripted, SimConfig, Verdict};
