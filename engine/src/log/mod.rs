//! The partition log: how commands become durable.
//!
//! Layers, bottom up:
//! - [`frame`]: the on-disk record framing (magic, version, length,
//!   sequence, CRC32C) and the recovery scan that tells a torn tail, which
//!   is cut, from corruption in the middle, which stops the node. Pure: it
//!   works on byte slices.
//! - [`record`]: the engine's log record, its only serialized form
//!   (MessagePack of explicit mirror types, validated on decode).
//! - [`segments`]: [`segments::PartitionLog`], one partition's numbered
//!   segment files: batched appends made durable by one write and one
//!   `fdatasync`, rotation at a size, recovery on open, poisoning on the
//!   first write or sync error.
//! - [`snapshot`]: a partition's SKUs in canonical form at a log position;
//!   checksummed, written crash-safely (temporary file, sync, rename, sync
//!   directory), equal states giving equal bytes.
//! - [`writer`]: [`writer::LogWriter`], the group-commit thread: takes the
//!   appends of many actors, one write and one `fdatasync` per touched
//!   partition per round, advances the partition's durable watermark, then
//!   releases the answers.
//! - [`storage`]: the file operations the log needs, behind a trait, with
//!   the real file system and an in-memory one that injects the faults the
//!   tests need (torn writes, lost unsynced data, fsync errors, a full disk,
//!   flipped bits).
//!
//! The engine uses them in `Engine::open` (durable mode). Still to come:
//! taking snapshots periodically and dropping the segments they cover, and
//! one shared log per node so that a group commit costs one sync.

pub mod frame;
pub mod record;
pub mod segments;
pub mod snapshot;
pub mod storage;
pub mod writer;
