//! Replication of partition groups with tikv raft-rs, as pure state
//! machines the node's driver and the simulator both run.
//!
//! - [`storage`]: a replica's raft log and hard state in memory, and the
//!   [`ReplicaWrite`]s the member's one log holds for every group.
//! - [`replica`]: one member's replica of one group (`RawNode`, sans-IO,
//!   asynchronous persistence, seeded election timeouts).
//! - [`codec`]: the bytes of a replica's writes (records of the member's
//!   raft log) and of raft messages between members.
//! - [`group`]: a group's state machine on one member: committed records
//!   applied by every replica, and on the leader the speculative state,
//!   the order coordinator and expiry, with every answer held until what
//!   it depends on is committed.
//!
//! Nothing here does IO or reads a clock: time comes in as `now_ms`, and
//! ticks are the driver's.

pub mod codec;
pub mod group;
pub mod replica;
pub mod storage;

pub use group::{AdminRequest, EncodedSnapshot, GroupConfig, GroupMachine, GroupOutput, SnapshotImage, SnapshotPolicy};
/// raft-rs's message between replicas, for drivers that carry it.
pub use raft::eraftpb::Message as RaftMessage;
/// Entries and snapshots as the raft log holds them (for the node's log).
pub use raft::eraftpb::{Entry as RaftEntry, Snapshot as RaftSnapshot};
pub use replica::{Leadership, ProposeError, Replica, ReplicaConfig, ReplicaOutput};
pub use storage::{GroupStorage, ReplicaWrite};

/// A replication group: a fixed set of partitions, replicated together.
/// Numbered from 1, like members, so that an order's attempt ids
/// (`~{group}.{epoch}.{n}`) never collide with another group's.
pub type GroupId = u32;
/// A replica's raft id: the member it lives on (low 32 bits) and the
/// member's *generation* (high bits), which starts at 0 and changes when
/// the member lost its disk and rejoins: a replica that forgot its votes
/// and its log must never speak under the id that had them.
pub type ReplicaId = u64;

/// The raft id of `member`'s replicas in `generation`.
pub fn replica_id(member: u32, generation: u32) -> ReplicaId {
    (u64::from(generation) << 32) | u64::from(member)
}

/// The member a replica lives on.
pub fn member_of(replica: ReplicaId) -> u32 {
    u32::try_from(replica & 0xffff_ffff).expect("masked to 32 bits")
}
