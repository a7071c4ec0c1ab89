//! The node's log: how commands become durable.
//!
//! Layers, bottom up:
//! - [`frame`]: the on-disk record framing (magic, version, length,
//!   sequence, CRC32C), segment headers and one checksummed batch per group
//!   commit, and the recovery scan that tells a torn tail (the last write,
//!   whose pages may have reached the disk in any order), which is cut, from
//!   corruption in the middle, which stops the node. Pure: it works on byte
//!   slices.
//! - [`record`]: the engine's log record, its only serialized form
//!   (MessagePack of explicit mirror types, validated on decode).
//! - [`segments`]: [`segments::SegmentedLog`], the numbered segment files
//!   of the node's one log (every partition's records, so a group commit
//!   costs one sync): batched appends made durable by one write and one
//!   `fdatasync`, rotation at a size, recovery from the newest snapshot and
//!   the segments after it, poisoning on the first write or sync error.
//! - [`snapshot`]: every SKU in canonical form at a log position;
//!   checksummed, written crash-safely (temporary file, sync, rename, sync
//!   directory), equal states giving equal bytes.
//! - [`replay`]: [`replay::ReplayedState`], what a run of records means:
//!   the one replay shared by recovery and compaction (pure).
//! - [`writer`]: [`writer::LogWriter`], the group-commit thread: takes the
//!   appends of many actors, one write and one `fdatasync` per round,
//!   advances the durable watermark, then releases the answers; asks for
//!   snapshots as closed log accumulates.
//! - [`compactor`]: [`compactor::Compactor`], the background thread that
//!   replays closed segments onto the newest snapshot, writes the next one
//!   and removes what it covers.
//! - [`storage`]: the file operations the log needs, behind a trait, with
//!   the real file system and an in-memory one that injects the faults the
//!   tests need (torn writes, lost unsynced data, fsync errors, a full disk,
//!   flipped bits).
//!
//! The engine uses them in `Engine::open` (durable mode).

pub mod compactor;
pub mod frame;
pub mod record;
pub mod replay;
pub mod segments;
pub mod snapshot;
pub mod storage;
pub mod writer;
