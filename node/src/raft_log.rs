//! The member's raft log: one file for every replication group it holds,
//! each record a [`ReplicaWrite`] tagged with its group
//! ([`flashstock_engine::replication::codec`]), framed as
//! `length (u32 LE) | crc32c (u32 LE) | payload`.
//!
//! Appends are written as they come and made durable by one `fdatasync`
//! for everything written since the last: every group on the member shares
//! it (the point of one log per member). A crash may tear the last record
//! or lose the unsynced tail; recovery reads up to the first record that
//! does not check out and cuts the file there, so later appends follow
//! good records. Nothing before a sync completed is ever lost: raft
//! counts a write only once [`RaftLog::sync`] returned.
//!
//! Compaction rewrites the file from the groups' live state (each group's
//! snapshot, hard state and entries not yet covered by it) into a new
//! file, fsyncs it and renames it over the old one, so the log only drops
//! what no group on the member needs.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use flashstock_engine::replication::codec::{decode_write, encode_write_into, CodecError};
use flashstock_engine::replication::{GroupId, ReplicaWrite};

const HEADER_BYTES: usize = 8;
/// Largest record read back: a snapshot of a group is the biggest; a
/// length beyond this is a torn or foreign record, not an allocation.
pub const RECORD_BYTES_MAX: usize = 1 << 30;
const FILE_NAME: &str = "raft.log";
const REWRITE_NAME: &str = "raft.log.rewrite";

/// The open log.
#[derive(Debug)]
pub struct RaftLog {
    directory: PathBuf,
    file: File,
    /// Bytes in the file now (what compaction compares with the live state).
    bytes: u64,
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    pub writes: BTreeMap<GroupId, Vec<ReplicaWrite>>,
    pub records: usize,
    /// Bytes cut off the end (a torn record, or a tail a crash left).
    pub cut_bytes: u64,
}

/// Frames `payload` as one record, appended to `out`.
pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    frame_with(out, |out| out.extend_from_slice(payload));
}

/// Frames `write` of `group`, appended to `out` (encoded in place).
pub fn frame_write(group: GroupId, write: &ReplicaWrite, out: &mut Vec<u8>) {
    frame_with(out, |out| encode_write_into(group, write, out));
}

/// One record whose payload `encode` appends to `out`, after a header
/// filled in once the payload's length and checksum are known.
fn frame_with(out: &mut Vec<u8>, encode: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0; HEADER_BYTES]);
    encode(out);
    let payload = &out[at + HEADER_BYTES..];
    let length = u32::try_from(payload.len()).expect("a record fits a u32");
    let checksum = crc32c::crc32c(payload);
    out[at..at + 4].copy_from_slice(&length.to_le_bytes());
    out[at + 4..at + 8].copy_from_slice(&checksum.to_le_bytes());
}

impl RaftLog {
    /// Opens (or creates) the log in `directory` and reads it back.
    ///
    /// # Errors
    /// The directory cannot be made or read.
    pub fn open(directory: &Path) -> anyhow::Result<(Self, Recovered)> {
        std::fs::create_dir_all(directory).with_context(|| format!("creating {}", directory.display()))?;
        // A rewrite that did not finish: the old file is still whole.
        let _ = std::fs::remove_file(directory.join(REWRITE_NAME));
        let path = directory.join(FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
        let (recovered, good) = read_records(&bytes).with_context(|| format!("recovering {}", path.display()))?;
        if good < bytes.len() {
            tracing::warn!(cut = bytes.len() - good, "the raft log's tail did not check out; cut there");
            file.set_len(good as u64).context("cutting the raft log's torn tail")?;
            file.sync_data().context("syncing the cut raft log")?;
        }
        let recovered = Recovered { cut_bytes: (bytes.len() - good) as u64, ..recovered };
        sync_directory(directory)?;
        Ok((Self { directory: directory.to_path_buf(), file, bytes: good as u64 }, recovered))
    }

    /// Bytes the file holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends framed records (not yet durable).
    ///
    /// # Errors
    /// The write failed: the member must stop (what raft was promised may
    /// not be on disk).
    pub fn append(&mut self, framed: &[u8]) -> std::io::Result<()> {
        self.file.write_all(framed)?;
        self.bytes += framed.len() as u64;
        Ok(())
    }

    /// Makes everything appended so far durable.
    ///
    /// # Errors
    /// As [`RaftLog::append`].
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Replaces the whole log with `framed` (every group's live state),
    /// durably: the new file is synced before it takes the old one's name.
    ///
    /// # Errors
    /// As [`RaftLog::append`]; the old file is then still in place.
    pub fn rewrite(&mut self, framed: &[u8]) -> std::io::Result<()> {
        let temporary = self.directory.join(REWRITE_NAME);
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&temporary)?;
        file.write_all(framed)?;
        file.sync_data()?;
        std::fs::rename(&temporary, self.directory.join(FILE_NAME))?;
        sync_directory(&self.directory).map_err(std::io::Error::other)?;
        self.file = OpenOptions::new().read(true).append(true).open(self.directory.join(FILE_NAME))?;
        self.bytes = framed.len() as u64;
        Ok(())
    }
}

/// A record whose checksum matches but which is not a write: not a torn
/// tail (a torn record fails its checksum) but a bug or a foreign file.
/// Recovery stops there rather than cut: what follows may be votes and
/// entries raft was promised.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the raft log's record at byte {offset} checks out but is not a write ({error}); not cutting acknowledged state"
)]
pub struct UndecodableRecord {
    pub offset: usize,
    pub error: CodecError,
}

/// The records of `bytes` up to the first that is torn (short or failing
/// its checksum), and how many bytes those good records take.
///
/// # Errors
/// A record that checks out does not decode ([`UndecodableRecord`]).
pub fn read_records(bytes: &[u8]) -> Result<(Recovered, usize), UndecodableRecord> {
    let mut recovered = Recovered::default();
    let mut at = 0;
    while bytes.len() - at >= HEADER_BYTES {
        let length = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let checksum = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        if length > RECORD_BYTES_MAX || bytes.len() - at - HEADER_BYTES < length {
            break;
        }
        let payload = &bytes[at + HEADER_BYTES..at + HEADER_BYTES + length];
        if crc32c::crc32c(payload) != checksum {
            break;
        }
        let (group, write) = decode_write(payload).map_err(|error| UndecodableRecord { offset: at, error })?;
        recovered.writes.entry(group).or_default().push(write);
        recovered.records += 1;
        at += HEADER_BYTES + length;
    }
    Ok((recovered, at))
}

fn sync_directory(directory: &Path) -> anyhow::Result<()> {
    File::open(directory)
        .and_then(|handle| handle.sync_all())
        .with_context(|| format!("syncing the directory {}", directory.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(index: u64) -> ReplicaWrite {
        ReplicaWrite::Compact { index }
    }

    fn temporary_directory(name: &str) -> PathBuf {
        let directory = std::env::temp_dir().join(format!("flashstock-raft-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        directory
    }

    #[test]
    fn records_come_back_by_group_and_a_torn_tail_is_cut() {
        let directory = temporary_directory("torn");
        let (mut log, recovered) = RaftLog::open(&directory).expect("opens");
        assert_eq!(recovered.records, 0);
        let mut framed = Vec::new();
        frame_write(1, &compact(1), &mut framed);
        frame_write(2, &compact(2), &mut framed);
        frame_write(1, &compact(3), &mut framed);
        log.append(&framed).expect("appends");
        // A record torn by a crash.
        let mut torn = Vec::new();
        frame_write(2, &compact(4), &mut torn);
        log.append(&torn[..torn.len() - 3]).expect("appends");
        log.sync().expect("syncs");
        drop(log);
        let (mut log, recovered) = RaftLog::open(&directory).expect("reopens");
        assert_eq!(recovered.records, 3);
        assert_eq!(recovered.cut_bytes, (torn.len() - 3) as u64);
        assert_eq!(recovered.writes[&1], vec![compact(1), compact(3)]);
        assert_eq!(recovered.writes[&2], vec![compact(2)]);
        // Appends after the cut follow the good records.
        log.append(&torn).expect("appends");
        log.sync().expect("syncs");
        drop(log);
        let (_, recovered) = RaftLog::open(&directory).expect("reopens");
        assert_eq!(recovered.writes[&2], vec![compact(2), compact(4)]);
        let _ = std::fs::remove_dir_all(&directory);
    }

    #[test]
    fn a_record_that_checks_out_but_does_not_decode_stops_recovery_without_cutting() {
        let directory = temporary_directory("undecodable");
        let (mut log, _) = RaftLog::open(&directory).expect("opens");
        let mut framed = Vec::new();
        frame_write(1, &compact(1), &mut framed);
        let offset = framed.len();
        // A write of an unknown kind, with a good checksum.
        frame(&[1, 0, 0, 0, 99], &mut framed);
        frame_write(1, &compact(2), &mut framed);
        log.append(&framed).expect("appends");
        log.sync().expect("syncs");
        drop(log);
        let error = RaftLog::open(&directory).expect_err("refuses");
        let undecodable = error.downcast_ref::<UndecodableRecord>().expect("typed");
        assert_eq!(undecodable, &UndecodableRecord { offset, error: CodecError::UnknownKind(99) });
        let bytes = std::fs::read(directory.join(FILE_NAME)).expect("reads");
        assert_eq!(bytes, framed, "nothing was cut");
        let _ = std::fs::remove_dir_all(&directory);
    }

    #[test]
    fn a_rewrite_replaces_everything() {
        let directory = temporary_directory("rewrite");
        let (mut log, _) = RaftLog::open(&directory).expect("opens");
        let mut framed = Vec::new();
        for index in 0..100 {
            frame_write(1, &compact(index), &mut framed);
        }
        log.append(&framed).expect("appends");
        let mut live = Vec::new();
        frame_write(1, &compact(99), &mut live);
        log.rewrite(&live).expect("rewrites");
        let mut more = Vec::new();
        frame_write(3, &compact(7), &mut more);
        log.append(&more).expect("appends");
        log.sync().expect("syncs");
        drop(log);
        let (log, recovered) = RaftLog::open(&directory).expect("reopens");
        assert_eq!(recovered.writes[&1], vec![compact(99)]);
        assert_eq!(recovered.writes[&3], vec![compact(7)]);
        assert_eq!(log.bytes(), (live.len() + more.len()) as u64);
        let _ = std::fs::remove_dir_all(&directory);
    }
}
