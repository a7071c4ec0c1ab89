//! Replication of partition groups with tikv raft-rs, as pure state
//! machines the node's driver and the simulator both run.
//!
//! - [`storage`]: a replica's raft log and hard state in memory, and the
//!   [`ReplicaWrite`]s the member's one log holds for every group.
//! - [`replica`]: one member's replica of one group (`RawNode`, sans-IO,
//!   asynchronous persistence, seeded election timeouts).
//! - [`group`]: a group's state machine on one member: committed records
//!   applied by every replica, and on the leader the speculative state,
//!   the order coordinator and expiry, with every answer held until what
//!   it depends on is committed.
//!
//! Nothing here does IO or reads a clock: time comes in as `now_ms`, and
//! ticks are the driver's.

pub mod group;
pub mod replica;
pub mod storage;

pub use group::{GroupConfig, GroupMachine, GroupOutput};
pub use replica::{Leadership, ProposeError, Replica, ReplicaConfig, ReplicaOutput};
pub use storage::{GroupStorage, ReplicaWrite};

/// A replication group: a fixed set of partitions, replicated together.
/// Numbered from 1, like members, so that an order's attempt ids
/// (`~{group}.{epoch}.{n}`) never collide with another group's.
pub type GroupId = u32;
/// A replica's raft id: the id of the member it lives on.
pub type ReplicaId = u64;
