//! Orders as pure state machines: the coordinator at an order's home and
//! the participant on each member that holds some of its lines.
//!
//! - [`coordinator`]: [`Coordinator`], one per member: every order whose
//!   id's partition the member owns, through explicit phases from the first
//!   reserve to its outcome; inputs at a given time in, actions out.
//! - [`facts`]: [`CoordinatorFacts`], the coordinator's log records folded
//!   down to what a restart needs (kept by replay, carried by snapshots).
//! - [`participant`]: [`apply_part`], one step of a part applied to a
//!   member's SKUs, idempotent line by line.
//!
//! Neither does IO or reads a clock: the node's driver and the simulator
//! (`tests/sim`) carry their actions out, which is what lets the simulator
//! run a whole cluster of them deterministically.

pub mod coordinator;
pub mod facts;
pub mod participant;

pub use coordinator::{
    Action, CallerId, ClientAnswer, ClientRequest, Coordinator, CoordinatorConfig, CoordinatorRecord, HeldLine,
    MemberId, Outcome, PartMessage, PartReply, Placement,
};
pub use facts::CoordinatorFacts;
pub use participant::{apply_part, PartAnswer, PartRequest};
