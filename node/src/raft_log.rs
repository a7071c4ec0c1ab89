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
//! what no group on the member needs. The new file is written by a thread
//! of its own while appends go on to the old one (which stays the whole
//! truth until the rename); what they appended meanwhile follows the live
//! state into the new file before it takes the name.

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
    /// A rewrite under way ([`RaftLog::begin_rewrite`]).
    rewrite: Option<Rewrite>,
}

/// A rewrite written by a thread of its own while appends go on: they go
/// to the old file (still the whole truth until the new one takes its
/// name) and are kept to follow the live state into the new one.
#[derive(Debug)]
struct Rewrite {
    /// Writes the new file and syncs it; gives back the file and the live
    /// state's bytes.
    writer: std::thread::JoinHandle<std::io::Result<(File, u64)>>,
    /// What was appended since the live state was taken.
    since: Vec<u8>,
}

/// Bytes appended during a rewrite past which appends wait for it: what
/// they keep for the new file is held in memory.
pub const REWRITE_SINCE_BYTES_MAX: usize = 256 << 20;

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

/// Frames every write of `writes` into one buffer sized for them up
/// front: a rewrite's buffer is as large as the log's live state, and
/// grown by doubling it was copied again at every step into memory fresh
/// from the kernel (its zeroing of those pages was most of a rewrite's
/// cost).
pub fn frame_all(writes: &[(GroupId, ReplicaWrite)]) -> Vec<u8> {
    let estimate: usize = writes.iter().map(|(_, write)| HEADER_BYTES + framed_bytes_estimate(write)).sum();
    let mut framed = Vec::with_capacity(estimate);
    for (group, write) in writes {
        frame_write(*group, write, &mut framed);
    }
    framed
}

/// A little more than the encoded bytes of `write` (its data, and a
/// generous allowance for each entry's fields and the tags).
fn framed_bytes_estimate(write: &ReplicaWrite) -> usize {
    const FIELDS_BYTES: usize = 64;
    match write {
        ReplicaWrite::Entries(entries) => entries
            .iter()
            .map(|entry| entry.data.len() + entry.context.len() + FIELDS_BYTES)
            .sum::<usize>()
            .saturating_add(FIELDS_BYTES),
        ReplicaWrite::Snapshot(snapshot) => snapshot.data.len() + 4 * FIELDS_BYTES,
        ReplicaWrite::HardState(_) | ReplicaWrite::Compact { .. } => FIELDS_BYTES,
    }
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
        Ok((Self { directory: directory.to_path_buf(), file, bytes: good as u64, rewrite: None }, recovered))
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
        if let Some(rewrite) = &mut self.rewrite {
            rewrite.since.extend_from_slice(framed);
        }
        Ok(())
    }

    /// Makes everything appended so far durable.
    ///
    /// # Errors
    /// As [`RaftLog::append`].
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Starts replacing the log with `live` (every group's live state, as
    /// of everything appended so far), framed and written by a thread of
    /// its own: appends go on meanwhile, to this file, and follow the live
    /// state into the new one when [`Self::finish_rewrite`] finds it
    /// written. (Written in line, a loaded member's rewrite of 65 MB held
    /// every group's sync back for a second.) Nothing if one is under way.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn begin_rewrite(&mut self, live: Vec<(GroupId, ReplicaWrite)>) -> std::io::Result<()> {
        if self.rewrite.is_some() {
            return Ok(());
        }
        let temporary = self.directory.join(REWRITE_NAME);
        let writer = std::thread::Builder::new().name("raft-log-rewrite".to_owned()).spawn(move || {
            let framed = frame_all(&live);
            drop(live);
            let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&temporary)?;
            file.write_all(&framed)?;
            file.sync_data()?;
            Ok((file, framed.len() as u64))
        })?;
        self.rewrite = Some(Rewrite { writer, since: Vec::new() });
        Ok(())
    }

    /// Whether a rewrite is under way.
    pub fn rewriting(&self) -> bool {
        self.rewrite.is_some()
    }

    /// Finishes a rewrite whose new file is written (or any, with `wait`,
    /// or once what was appended meanwhile passed
    /// [`REWRITE_SINCE_BYTES_MAX`]): appends what came since, syncs it,
    /// and gives it the log's name. The live state's bytes, if it did.
    ///
    /// # Errors
    /// As [`RaftLog::append`]; until the rename the old file is whole.
    pub fn finish_rewrite(&mut self, wait: bool) -> std::io::Result<Option<u64>> {
        let Some(rewrite) = &self.rewrite else { return Ok(None) };
        if !(wait || rewrite.writer.is_finished() || rewrite.since.len() >= REWRITE_SINCE_BYTES_MAX) {
            return Ok(None);
        }
        let Rewrite { writer, since } = self.rewrite.take().expect("checked");
        let (mut file, live_bytes) =
            writer.join().map_err(|_| std::io::Error::other("the raft log's rewrite thread panicked"))??;
        file.write_all(&since)?;
        file.sync_data()?;
        std::fs::rename(self.directory.join(REWRITE_NAME), self.directory.join(FILE_NAME))?;
        sync_directory(&self.directory).map_err(std::io::Error::other)?;
        self.file = file;
        self.bytes = live_bytes + since.len() as u64;
        Ok(Some(live_bytes))
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

    /// A rewrite in the background: appends made while it is written are
    /// in the old file until it takes the name, then follow the live
    /// state in the new one; what came before the live state is gone.
    #[test]
    fn appends_during_a_background_rewrite_follow_the_live_state() {
        let directory = temporary_directory("background");
        let (mut log, _) = RaftLog::open(&directory).expect("opens");
        let mut framed = Vec::new();
        for index in 0..100 {
            frame_write(1, &compact(index), &mut framed);
        }
        log.append(&framed).expect("appends");
        log.sync().expect("syncs");
        log.begin_rewrite(vec![(1, compact(99))]).expect("begins");
        assert!(log.rewriting());
        let mut during = Vec::new();
        frame_write(2, &compact(5), &mut during);
        log.append(&during).expect("appends");
        log.sync().expect("syncs");
        // Until it takes the name, the old file is the whole truth.
        let (recovered, _) = read_records(&std::fs::read(directory.join(FILE_NAME)).expect("reads")).expect("good");
        assert_eq!(recovered.writes[&1].len(), 100);
        assert_eq!(recovered.writes[&2], vec![compact(5)]);
        let mut finished = None;
        for _ in 0..500 {
            finished = log.finish_rewrite(false).expect("finishes");
            if finished.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let live_bytes = finished.expect("the rewrite was written within 5 s");
        assert!(!log.rewriting());
        let mut after = Vec::new();
        frame_write(3, &compact(7), &mut after);
        log.append(&after).expect("appends");
        log.sync().expect("syncs");
        assert_eq!(log.bytes(), live_bytes + (during.len() + after.len()) as u64);
        drop(log);
        let (_, recovered) = RaftLog::open(&directory).expect("reopens");
        assert_eq!(recovered.writes[&1], vec![compact(99)]);
        assert_eq!(recovered.writes[&2], vec![compact(5)]);
        assert_eq!(recovered.writes[&3], vec![compact(7)]);
        let _ = std::fs::remove_dir_all(&directory);
    }

    /// A rewrite's buffer is sized once, up front: framing the live state
    /// never grows it (growing copied it again at each doubling, into
    /// pages fresh from the kernel), and it frames exactly what writes
    /// framed one by one would.
    #[test]
    fn the_live_state_is_framed_into_a_buffer_sized_once() {
        use flashstock_engine::replication::{RaftEntry, RaftSnapshot};
        let entries: Vec<RaftEntry> = (1..=500u64)
            .map(|index| RaftEntry {
                index,
                term: 3,
                data: vec![7u8; (index as usize * 37) % 3_000].into(),
                ..RaftEntry::default()
            })
            .collect();
        let mut snapshot = RaftSnapshot { data: vec![1u8; 200_000].into(), ..RaftSnapshot::default() };
        snapshot.mut_metadata().index = 9;
        let writes = vec![
            (1, ReplicaWrite::Snapshot(snapshot)),
            (1, ReplicaWrite::HardState(Default::default())),
            (1, ReplicaWrite::Entries(entries)),
            (2, compact(4)),
        ];
        let framed = frame_all(&writes);
        let mut one_by_one = Vec::new();
        for (group, write) in &writes {
            frame_write(*group, write, &mut one_by_one);
        }
        assert_eq!(framed, one_by_one);
        let estimate: usize = writes.iter().map(|(_, write)| HEADER_BYTES + framed_bytes_estimate(write)).sum();
        assert!(framed.len() <= estimate, "framed {} bytes past the estimate of {estimate}", framed.len());
        assert!(estimate - framed.len() < framed.len() / 10, "an estimate close to the bytes: {estimate}");
    }
}
