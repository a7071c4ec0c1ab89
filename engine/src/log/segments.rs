//! The node's log on disk: numbered segment files, appended in batches,
//! recovered on open.
//!
//! One log holds the records of every partition of the node, so that a
//! group commit costs one `fdatasync` however many partitions it touches.
//! A record names its SKU, and the SKU's partition follows from the id, so
//! the log can be split per partition (for replication) without a new
//! format.
//!
//! Files are `segment-<first sequence, 20 digits>.log` in the log's
//! directory. A segment starts with a header, written and synced when it
//! is created. Appends are buffered as one batch; [`SegmentedLog::flush`]
//! writes the batch, its header (length and checksum) first, with one write
//! and one `fdatasync`, and returns the highest durable sequence number. One
//! write holds exactly one batch, so that recovery can tell the torn last
//! write (a batch that does not verify, with no batch begun after it) from
//! damage to durable data (see [`crate::log::frame`]). The first failed
//! write or sync poisons the log for good: an fsync error may have dropped
//! data the kernel still reports as written, so nothing is acknowledged
//! after one and nothing is retried.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::log::frame::{
    encode_batch_header, encode_frame, encode_segment_header, scan, ScanEnd, SegmentFormat, BATCH_BODY_BYTES_MAX,
    BATCH_HEADER_BYTES, FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES,
};
use crate::log::record::{EncodedRecord, LogRecord};
use crate::log::snapshot::{load_newest_snapshot, snapshot_sequence_of, Snapshot, SnapshotError};
use crate::log::storage::{AppendFile, Storage};

/// How the log lays out its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// A segment that reaches this size is closed and a new one started.
    /// Bounds the work of reading one file and the space a snapshot frees.
    pub segment_bytes_max: u64,
    /// Once closed segments not yet covered by a snapshot hold this many
    /// bytes, a snapshot is taken in the background and they are removed.
    /// Bounds both the disk the log uses and the log a restart replays.
    pub snapshot_log_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { segment_bytes_max: 64 * 1024 * 1024, snapshot_log_bytes: 256 * 1024 * 1024 }
    }
}

/// Why the log cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{file}: corrupt at byte {offset}: {reason}")]
    Corrupt { file: PathBuf, offset: usize, reason: String },
    #[error("{file}: {operation} failed: {source}")]
    Io {
        file: PathBuf,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("the log failed earlier ({0}) and accepts nothing more")]
    Poisoned(String),
}

/// A torn tail found and cut at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub file: PathBuf,
    pub offset: usize,
    /// Bytes of the torn write found, up to its last non-zero byte (the
    /// preallocated zeros after it are cut too, but are not counted).
    pub bytes_cut: usize,
}

/// What [`SegmentedLog::open`] found.
#[derive(Debug)]
pub struct Recovered {
    /// The newest snapshot, if one was taken.
    pub snapshot: Option<Snapshot>,
    /// Every record after the snapshot, with its sequence number, in order.
    pub records: Vec<(u64, LogRecord)>,
    pub torn_tail: Option<TornTail>,
}

#[derive(Debug)]
pub struct SegmentedLog {
    storage: Arc<dyn Storage>,
    directory: PathBuf,
    config: LogConfig,
    active: Box<dyn AppendFile>,
    /// First sequence number of the active segment (its file name).
    active_first: u64,
    active_bytes: u64,
    next_sequence: u64,
    durable_sequence: u64,
    /// Bytes of closed segments since the last snapshot was asked for.
    closed_bytes_unsnapshotted: u64,
    /// How far the active segment is written with zeros ahead of its data.
    preallocated_through: u64,
    /// The next batch: room for its header, then the frames appended since
    /// the last flush (empty when there are none).
    buffer: Vec<u8>,
    poisoned: Option<String>,
}

/// The active segment is zero-filled this far ahead of its data, so that
/// group commits overwrite written blocks (a cheaper `fdatasync`, see
/// `AppendFile::preallocate`). One zero write and sync per 2 MiB of log
/// (about 8,000 records) costs the writer a few milliseconds.
const PREALLOCATION_STEP_BYTES: u64 = 2 * 1024 * 1024;

fn segment_name(first_sequence: u64) -> String {
    format!("segment-{first_sequence:020}.log")
}

fn first_sequence_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("segment-")?.strip_suffix(".log")?.parse().ok()
}

fn io_error<'a>(file: &'a Path, operation: &'static str) -> impl FnOnce(std::io::Error) -> LogError + 'a {
    move |source| LogError::Io { file: file.to_path_buf(), operation, source }
}

/// Creates the segment that starts at `first_sequence` (or opens it, empty)
/// and makes its header and name durable before any batch goes into it, so
/// that damage to the header with anything valid after it is known to be
/// corruption, and a header torn while being created has nothing after it.
fn start_segment(
    storage: &dyn Storage,
    directory: &Path,
    first_sequence: u64,
) -> Result<Box<dyn AppendFile>, LogError> {
    let path = directory.join(segment_name(first_sequence));
    let mut file = storage.open_append(&path).map_err(io_error(&path, "create"))?;
    file.append(&encode_segment_header(first_sequence)).map_err(io_error(&path, "write"))?;
    file.sync_data().map_err(io_error(&path, "fdatasync"))?;
    storage.sync_dir(directory).map_err(io_error(directory, "sync directory"))?;
    Ok(file)
}

/// A segment file: its first sequence number (from its name) and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) first_sequence: u64,
    pub(crate) path: PathBuf,
}

/// The segment files in `directory`, oldest first.
pub(crate) fn list_segments(storage: &dyn Storage, directory: &Path) -> Result<Vec<Segment>, LogError> {
    let mut segments: Vec<Segment> = storage
        .list(directory)
        .map_err(io_error(directory, "list"))?
        .into_iter()
        .filter_map(|path| first_sequence_of(&path).map(|first_sequence| Segment { first_sequence, path }))
        .collect();
    segments.sort_by_key(|segment| segment.first_sequence);
    Ok(segments)
}

/// Splits `segments` into those whose every record is at or below
/// `covered_through` (a snapshot holds them) and the rest. Snapshots are
/// taken at segment boundaries, so a segment is covered exactly when the
/// next one starts at or below `covered_through + 1`.
pub(crate) fn split_covered(mut segments: Vec<Segment>, covered_through: u64) -> (Vec<Segment>, Vec<Segment>) {
    let covered = segments.windows(2).take_while(|pair| pair[1].first_sequence <= covered_through + 1).count();
    let rest = segments.split_off(covered);
    (segments, rest)
}

/// The records of a run of segments, read without changing anything.
#[derive(Debug)]
pub(crate) struct SegmentsRead {
    /// Records with a sequence number above the `after` given.
    pub(crate) records: Vec<(u64, LogRecord)>,
    /// The sequence number the next record would get.
    pub(crate) next_sequence: u64,
    /// Bytes of each segment read, in order.
    pub(crate) segment_bytes: Vec<u64>,
    /// A damaged end of the last segment: where it starts, why, and where
    /// its last non-zero byte ends.
    pub(crate) torn_tail: Option<(usize, String, usize)>,
    /// The last segment's file length (its data and any zeros after it).
    pub(crate) last_file_bytes: u64,
    /// How the last segment is written, if anything readable is in it.
    pub(crate) last_format: Option<SegmentFormat>,
}

/// Reads `segments` (consecutive, oldest first), keeping the records after
/// `after`. The first segment must start at or before `after + 1` so no
/// record is missing. Only the last segment may end in a torn write, and
/// only if `tail_may_be_torn`; anything else unreadable is corruption,
/// reported with the file and offset.
pub(crate) fn read_segments(
    storage: &dyn Storage,
    segments: &[Segment],
    after: u64,
    tail_may_be_torn: bool,
) -> Result<SegmentsRead, LogError> {
    let mut read = SegmentsRead {
        records: Vec::new(),
        next_sequence: segments.first().map_or(after + 1, |segment| segment.first_sequence),
        segment_bytes: Vec::with_capacity(segments.len()),
        torn_tail: None,
        last_file_bytes: 0,
        last_format: None,
    };
    if read.next_sequence > after + 1 {
        let file = segments[0].path.clone();
        let reason = format!("the log starts at record {}, but the snapshot ends at {after}", read.next_sequence);
        return Err(LogError::Corrupt { file, offset: 0, reason });
    }
    for (position, segment) in segments.iter().enumerate() {
        let path = &segment.path;
        let corrupt = |offset: usize, reason: String| LogError::Corrupt { file: path.clone(), offset, reason };
        if segment.first_sequence != read.next_sequence {
            let reason = format!("segment starts at {}, expected {}", segment.first_sequence, read.next_sequence);
            return Err(corrupt(0, reason));
        }
        let bytes = storage.read(path).map_err(io_error(path, "read"))?;
        read.last_file_bytes = bytes.len() as u64;
        let scanned = scan(&bytes, segment.first_sequence);
        for (sequence, range) in &scanned.records {
            if *sequence <= after {
                continue;
            }
            let record = LogRecord::decode(&bytes[range.clone()])
                .map_err(|error| corrupt(range.start, format!("record {sequence}: {error}")))?;
            read.records.push((*sequence, record));
        }
        read.next_sequence = segment.first_sequence + scanned.records.len() as u64;
        read.segment_bytes.push(scanned.valid_bytes as u64);
        read.last_format = scanned.format;
        let is_last = position + 1 == segments.len();
        match scanned.end {
            ScanEnd::Clean => {}
            ScanEnd::TornTail { offset, reason } if is_last && tail_may_be_torn => {
                let data_end = bytes.iter().rposition(|&byte| byte != 0).map_or(offset, |last| last + 1);
                read.torn_tail = Some((offset, reason.to_string(), data_end.max(offset)));
            }
            ScanEnd::TornTail { offset, reason } => {
                return Err(corrupt(offset, format!("damaged frame ({reason}) where the log must be whole")));
            }
            ScanEnd::Corrupt { offset, reason } => {
                return Err(corrupt(offset, reason.to_string()));
            }
        }
    }
    if read.next_sequence <= after {
        let file = segments.last().map_or_else(PathBuf::new, |segment| segment.path.clone());
        let reason = format!("the log ends at record {}, before the snapshot's {after}", read.next_sequence - 1);
        return Err(LogError::Corrupt { file, offset: 0, reason });
    }
    Ok(read)
}

/// Removes leftovers that recovery must not trip over and nothing needs:
/// temporary files of snapshots never renamed, snapshots older than the
/// newest, segments the newest snapshot covers. Returns whether any name
/// changed (the caller syncs the directory).
pub(crate) fn remove_leftovers(
    storage: &dyn Storage,
    directory: &Path,
    newest_snapshot: Option<u64>,
    covered: &[Segment],
) -> Result<bool, LogError> {
    let mut doomed: Vec<PathBuf> = covered.iter().map(|segment| segment.path.clone()).collect();
    for path in storage.list(directory).map_err(io_error(directory, "list"))? {
        let is_temporary = path.extension().is_some_and(|extension| extension == "tmp");
        let is_older_snapshot = snapshot_sequence_of(&path).is_some_and(|sequence| Some(sequence) != newest_snapshot);
        if is_temporary || is_older_snapshot {
            doomed.push(path);
        }
    }
    for path in &doomed {
        storage.remove(path).map_err(io_error(path, "remove"))?;
    }
    Ok(!doomed.is_empty())
}

impl SegmentedLog {
    /// Opens (or creates) the log in `directory` and recovers it: the
    /// newest snapshot and the records after it. A torn tail in the last
    /// segment is cut off and reported; anything else unreadable is
    /// [`LogError::Corrupt`], naming the file and offset.
    pub fn open(storage: Arc<dyn Storage>, directory: &Path, config: LogConfig) -> Result<(Self, Recovered), LogError> {
        storage.create_dir_all(directory).map_err(io_error(directory, "create directory"))?;
        let snapshot = load_newest_snapshot(storage.as_ref(), directory)?;
        let covered_through = snapshot.as_ref().map_or(0, |snapshot| snapshot.last_sequence);
        let (covered, segments) = split_covered(list_segments(storage.as_ref(), directory)?, covered_through);
        if remove_leftovers(storage.as_ref(), directory, snapshot.as_ref().map(|s| s.last_sequence), &covered)? {
            storage.sync_dir(directory).map_err(io_error(directory, "sync directory"))?;
        }
        if segments.is_empty() && snapshot.is_some() {
            let reason = format!("no log segment after the snapshot of record {covered_through}");
            return Err(LogError::Corrupt { file: directory.to_path_buf(), offset: 0, reason });
        }
        let read = read_segments(storage.as_ref(), &segments, covered_through, true)?;
        let mut torn_tail = None;
        if let (Some((offset, reason, length)), Some(last)) = (&read.torn_tail, segments.last()) {
            let path = &last.path;
            tracing::warn!(file = %path.display(), offset, %reason, "cutting a torn tail off the log");
            storage.truncate(path, *offset as u64).map_err(io_error(path, "truncate"))?;
            torn_tail = Some(TornTail { file: path.clone(), offset: *offset, bytes_cut: length - offset });
        } else if let (Some(last), Some(&valid)) = (segments.last(), read.segment_bytes.last()) {
            // Preallocated zeros after the data: cut them, so that appends
            // go on from the end of the data.
            if read.last_file_bytes > valid {
                storage.truncate(&last.path, valid).map_err(io_error(&last.path, "truncate"))?;
            }
        }
        let mut closed_bytes_unsnapshotted: u64 = read.segment_bytes.iter().rev().skip(1).sum();
        // Batches go only into segments that start with a header: a version
        // 1 segment is closed as it is, and an empty one (never written, or
        // its header torn) is given its header now.
        let header_bytes = SEGMENT_HEADER_BYTES as u64;
        let (active_first, active, active_bytes) = match (segments.last(), read.segment_bytes.last().copied()) {
            (Some(last), Some(valid)) if valid > 0 && read.last_format == Some(SegmentFormat::Batches) => {
                let active = storage.open_append(&last.path).map_err(io_error(&last.path, "open"))?;
                (last.first_sequence, active, valid)
            }
            (Some(last), Some(0)) => {
                (last.first_sequence, start_segment(storage.as_ref(), directory, last.first_sequence)?, header_bytes)
            }
            (last, valid) => {
                if last.is_some() {
                    tracing::info!("closing a version 1 log segment: new records go to a version 2 one");
                    closed_bytes_unsnapshotted += valid.unwrap_or(0);
                }
                (read.next_sequence, start_segment(storage.as_ref(), directory, read.next_sequence)?, header_bytes)
            }
        };
        let log = Self {
            storage,
            directory: directory.to_path_buf(),
            config,
            active,
            active_first,
            active_bytes,
            next_sequence: read.next_sequence,
            durable_sequence: read.next_sequence - 1,
            closed_bytes_unsnapshotted,
            preallocated_through: 0,
            buffer: Vec::new(),
            poisoned: None,
        };
        Ok((log, Recovered { snapshot, records: read.records, torn_tail }))
    }

    /// Buffers `record`; returns its sequence number. It is durable once
    /// [`Self::flush`] returns a sequence at least this high.
    pub fn append(&mut self, record: &LogRecord) -> Result<u64, LogError> {
        self.append_encoded(&EncodedRecord::from(record))
    }

    /// [`Self::append`] for a record already encoded.
    pub fn append_encoded(&mut self, record: &EncodedRecord) -> Result<u64, LogError> {
        self.check_poisoned()?;
        let frame_bytes = FRAME_HEADER_BYTES + record.as_bytes().len();
        if !self.buffer.is_empty() && self.buffer.len() - BATCH_HEADER_BYTES + frame_bytes > BATCH_BODY_BYTES_MAX {
            // A batch has a bounded length; this one is made durable sooner.
            self.flush()?;
        }
        if self.buffer.is_empty() {
            self.buffer.resize(BATCH_HEADER_BYTES, 0);
        }
        let sequence = self.next_sequence;
        encode_frame(sequence, record.as_bytes(), &mut self.buffer);
        self.next_sequence += 1;
        Ok(sequence)
    }

    /// Writes everything buffered as one batch with one write and one
    /// `fdatasync`, then rotates the segment if it is full. Returns the
    /// highest durable sequence number.
    pub fn flush(&mut self) -> Result<u64, LogError> {
        self.check_poisoned()?;
        if self.buffer.is_empty() {
            return Ok(self.durable_sequence);
        }
        let active_path = self.directory.join(segment_name(self.active_first));
        let written =
            self.write_batch().and_then(|()| self.active.sync_data().map_err(io_error(&active_path, "fdatasync")));
        if let Err(error) = written {
            self.poisoned = Some(error.to_string());
            return Err(error);
        }
        self.active_bytes += self.buffer.len() as u64;
        self.buffer.clear();
        self.durable_sequence = self.next_sequence - 1;
        if self.active_bytes >= self.config.segment_bytes_max {
            if let Err(error) = self.rotate() {
                self.poisoned = Some(error.to_string());
                return Err(error);
            }
        }
        Ok(self.durable_sequence)
    }

    /// Seals the buffered batch with its header and writes it, in one
    /// write, over zeros preallocated for it; does not sync.
    fn write_batch(&mut self) -> Result<(), LogError> {
        let active_path = self.directory.join(segment_name(self.active_first));
        let needed = self.active_bytes + self.buffer.len() as u64;
        if needed > self.preallocated_through {
            // Ahead by a step, but not far past the segment's end.
            let through = (needed + PREALLOCATION_STEP_BYTES).min(needed.max(self.config.segment_bytes_max));
            self.active.preallocate(through).map_err(io_error(&active_path, "preallocate"))?;
            self.preallocated_through = through;
        }
        let first_sequence = self.durable_sequence + 1;
        let record_count = u32::try_from(self.next_sequence - first_sequence).expect("a bounded batch");
        let header = encode_batch_header(first_sequence, record_count, &self.buffer[BATCH_HEADER_BYTES..]);
        self.buffer[..BATCH_HEADER_BYTES].copy_from_slice(&header);
        self.active.append(&self.buffer).map_err(io_error(&active_path, "write"))
    }

    /// The highest sequence number known durable.
    pub fn durable_sequence(&self) -> u64 {
        self.durable_sequence
    }

    /// If enough closed log awaits a snapshot, the last sequence number a
    /// snapshot would cover now (the end of the newest closed segment).
    pub fn snapshot_due(&self) -> Option<u64> {
        (self.closed_bytes_unsnapshotted >= self.config.snapshot_log_bytes).then(|| self.active_first - 1)
    }

    /// A snapshot through [`Self::snapshot_due`]'s answer was asked for;
    /// the next is due after as many bytes again.
    pub fn snapshot_requested(&mut self) {
        self.closed_bytes_unsnapshotted = 0;
    }

    pub fn directory(&self) -> &Path {
        &self.directory
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn rotate(&mut self) -> Result<(), LogError> {
        // A closed segment holds exactly its data (readers would skip the
        // zeros anyway; this gives their space back).
        if self.preallocated_through > self.active_bytes {
            let closed = self.directory.join(segment_name(self.active_first));
            self.storage.truncate(&closed, self.active_bytes).map_err(io_error(&closed, "truncate"))?;
        }
        self.preallocated_through = 0;
        self.active = start_segment(self.storage.as_ref(), &self.directory, self.next_sequence)?;
        self.active_first = self.next_sequence;
        self.closed_bytes_unsnapshotted += self.active_bytes;
        self.active_bytes = SEGMENT_HEADER_BYTES as u64;
        Ok(())
    }

    fn check_poisoned(&self) -> Result<(), LogError> {
        match &self.poisoned {
            Some(cause) => Err(LogError::Poisoned(cause.clone())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SkuId;
    use crate::log::storage::{MemoryStorage, PageFate, UnsyncedFate, PAGE_BYTES};
    use crate::sku::SkuCommand;

    fn record(units: u64) -> LogRecord {
        LogRecord::Apply {
            sku: SkuId::new("sku").expect("valid"),
            now_ms: units,
            command: SkuCommand::Admin { operation: None, change: crate::sku::AdminChange::AddStock { units } },
        }
    }

    fn units_of(recovered: &Recovered) -> Vec<u64> {
        recovered
            .records
            .iter()
            .map(|(_, record)| match record {
                LogRecord::Apply {
                    command: SkuCommand::Admin { change: crate::sku::AdminChange::AddStock { units }, .. },
                    ..
                } => *units,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn open(storage: &MemoryStorage, config: LogConfig) -> Result<(SegmentedLog, Recovered), LogError> {
        SegmentedLog::open(Arc::new(storage.clone()), Path::new("/data/log"), config)
    }

    /// On real files: the active segment runs ahead of its data in zeros,
    /// closed segments hold exactly their data, and a log dropped without a
    /// goodbye (as a crash leaves it, zeros and all) reopens with every
    /// record, no torn tail, and appends going on from the end of the data.
    #[test]
    fn preallocated_zeros_are_not_data_and_never_torn() {
        let directory = std::env::temp_dir().join(format!("flashstock-preallocation-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        let storage: Arc<dyn Storage> = Arc::new(crate::log::storage::FileStorage);
        let config = LogConfig { segment_bytes_max: 2 * PREALLOCATION_STEP_BYTES, snapshot_log_bytes: u64::MAX };
        let file_lengths = |directory: &Path| -> Vec<u64> {
            let mut files: Vec<_> = std::fs::read_dir(directory)
                .expect("listed")
                .map(|entry| entry.expect("entry").path())
                .filter(|path| first_sequence_of(path).is_some())
                .collect();
            files.sort();
            files.iter().map(|path| std::fs::metadata(path).expect("exists").len()).collect()
        };
        let mut expected = Vec::new();
        {
            let (mut log, recovered) = SegmentedLog::open(storage.clone(), &directory, config).expect("opens");
            assert!(recovered.records.is_empty());
            // Rounds of about 40 KiB: segments close every 2 steps.
            for round in 0..250u64 {
                for index in 0..1_000 {
                    let units = round * 1_000 + index + 1;
                    log.append(&record(units)).expect("appended");
                    expected.push(units);
                }
                log.flush().expect("durable");
            }
            let lengths = file_lengths(&directory);
            assert!(lengths.len() >= 2, "{lengths:?}");
            let active_data = log.active_bytes;
            assert!(*lengths.last().expect("active") > active_data, "the active segment runs ahead in zeros");
            assert!(lengths.iter().rev().skip(1).all(|&length| length >= config.segment_bytes_max));
            assert!(lengths.iter().rev().skip(1).all(|&length| length < config.segment_bytes_max + 200_000));
        }
        let (mut log, recovered) = SegmentedLog::open(storage.clone(), &directory, config).expect("reopens");
        assert_eq!(units_of(&recovered), expected);
        assert!(recovered.torn_tail.is_none(), "zeros are not a torn write");
        assert_eq!(*file_lengths(&directory).last().expect("active"), log.active_bytes, "the zeros were cut");
        log.append(&record(7)).expect("appended");
        log.flush().expect("durable");
        drop(log);
        let (_log, recovered) = SegmentedLog::open(storage, &directory, config).expect("reopens");
        assert_eq!(recovered.records.len(), expected.len() + 1);
        let _ = std::fs::remove_dir_all(&directory);
    }

    #[test]
    fn flushed_records_survive_a_crash_and_unflushed_ones_do_not() {
        let storage = MemoryStorage::new();
        let (mut log, recovered) = open(&storage, LogConfig::default()).expect("opens");
        assert!(recovered.records.is_empty());
        for units in 1..=3 {
            log.append(&record(units)).expect("append");
        }
        assert_eq!(log.flush().expect("flush"), 3);
        log.append(&record(4)).expect("append");
        storage.crash(UnsyncedFate::Lost);

        let (mut log, recovered) = open(&storage, LogConfig::default()).expect("reopens");
        assert_eq!(units_of(&recovered), vec![1, 2, 3]);
        assert_eq!(recovered.records.last().map(|(sequence, _)| *sequence), Some(3));
        assert_eq!(log.append(&record(5)).expect("append"), 4, "sequence continues");
    }

    #[test]
    fn a_torn_last_write_is_cut_and_reported() {
        let storage = MemoryStorage::new();
        let (mut log, _) = open(&storage, LogConfig::default()).expect("opens");
        log.append(&record(1)).expect("append");
        log.flush().expect("flush");
        log.append(&record(2)).expect("append");
        log.append(&record(3)).expect("append");
        // Power fails during the flush: the write was issued, the sync never
        // finished, and only part of the batch reached the disk.
        log.write_batch().expect("write");
        // The batch header and the first frame's magic.
        storage.crash(UnsyncedFate::TornAfter { bytes: BATCH_HEADER_BYTES + 4 });

        let (mut log, recovered) = open(&storage, LogConfig::default()).expect("reopens");
        assert_eq!(units_of(&recovered), vec![1]);
        let torn = recovered.torn_tail.expect("reported");
        assert_eq!(torn.bytes_cut, BATCH_HEADER_BYTES + 4);
        log.append(&record(7)).expect("append");
        log.flush().expect("flush after the cut");
        let (_, recovered) = open(&storage, LogConfig::default()).expect("reopens");
        assert_eq!(units_of(&recovered), vec![1, 7]);
        assert!(recovered.torn_tail.is_none());
    }

    #[test]
    fn a_flipped_bit_in_the_middle_stops_recovery_naming_file_and_offset() {
        let storage = MemoryStorage::new();
        let (mut log, _) = open(&storage, LogConfig::default()).expect("opens");
        let mut batch_starts = Vec::new();
        for units in 1..=3 {
            batch_starts.push(log.active_bytes as usize);
            log.append(&record(units)).expect("append");
            log.flush().expect("flush");
        }
        let file = Path::new("/data/log").join(segment_name(1));
        storage.flip_bit(&file, batch_starts[1] + 30, 0).expect("flip");
        match open(&storage, LogConfig::default()) {
            Err(LogError::Corrupt { file: reported, offset, .. }) => {
                assert_eq!(reported, file);
                assert_eq!(offset, batch_starts[1], "the second batch holds the flipped bit");
            }
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[test]
    fn a_failed_fsync_poisons_the_log_for_good() {
        let storage = MemoryStorage::new();
        let (mut log, _) = open(&storage, LogConfig::default()).expect("opens");
        log.append(&record(1)).expect("append");
        log.flush().expect("flush");
        storage.fail_syncs_after(0);
        log.append(&record(2)).expect("append");
        assert!(matches!(log.flush(), Err(LogError::Io { operation: "fdatasync", .. })));
        assert_eq!(log.durable_sequence(), 1, "nothing after the failure is durable");
        assert!(matches!(log.append(&record(3)), Err(LogError::Poisoned(_))));
        assert!(matches!(log.flush(), Err(LogError::Poisoned(_))), "no retry of fsync");
    }

    #[test]
    fn a_full_disk_poisons_the_log() {
        let storage = MemoryStorage::new();
        let (mut log, _) = open(&storage, LogConfig::default()).expect("opens");
        storage.set_capacity_bytes(40);
        log.append(&record(1)).expect("append");
        log.append(&record(2)).expect("append");
        // The batch goes over preallocated zeros, so the zeros are what
        // no longer fit.
        assert!(matches!(log.flush(), Err(LogError::Io { operation: "preallocate", .. })));
        assert!(matches!(log.flush(), Err(LogError::Poisoned(_))));
    }

    #[test]
    fn segments_rotate_and_recover_in_order() {
        let storage = MemoryStorage::new();
        let config = LogConfig { segment_bytes_max: 100, snapshot_log_bytes: 100 };
        let (mut log, _) = open(&storage, config).expect("opens");
        for units in 1..=20 {
            log.append(&record(units)).expect("append");
            log.flush().expect("flush");
        }
        let segments = storage.list(Path::new("/data/log")).expect("list");
        assert!(segments.len() > 3, "{segments:?}");
        storage.crash(UnsyncedFate::Lost);
        let (_, recovered) = open(&storage, config).expect("reopens");
        assert_eq!(units_of(&recovered), (1..=20).collect::<Vec<_>>());
    }

    /// Seeded: many runs of appends and flushes, a crash at a random point
    /// with a random torn length, then recovery. Every flushed record is
    /// back, in order; beyond them only whole records that were appended
    /// (never a partial one, never a foreign one).
    #[test]
    fn random_crashes_keep_every_flushed_record() {
        let mut seed: u64 = 0x5eed;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        for run in 0..200 {
            let storage = MemoryStorage::new();
            let config = LogConfig { segment_bytes_max: 64 + next(400), snapshot_log_bytes: u64::MAX };
            let (mut log, _) = open(&storage, config).expect("opens");
            let mut appended = Vec::new();
            let mut flushed = 0;
            for _ in 0..next(40) {
                let units = appended.len() as u64 + 1;
                log.append(&record(units)).expect("append");
                appended.push(units);
                if next(3) == 0 {
                    log.flush().expect("flush");
                    flushed = appended.len();
                }
            }
            let fate =
                if next(2) == 0 { UnsyncedFate::Lost } else { UnsyncedFate::TornAfter { bytes: next(200) as usize } };
            // Part of the buffer may be on its way to the disk when power fails.
            if next(2) == 0 && !log.buffer.is_empty() {
                let _ = log.write_batch();
            }
            storage.crash(fate);
            let (_, recovered) = open(&storage, config).unwrap_or_else(|error| panic!("run {run}: {error}"));
            let units = units_of(&recovered);
            assert!(units.len() >= flushed, "run {run}: lost flushed records: {units:?} vs {flushed}");
            assert_eq!(units[..], appended[..units.len()], "run {run}");
        }
    }

    /// Records `first..=last`, appended and not flushed.
    fn append_all(log: &mut SegmentedLog, units: std::ops::RangeInclusive<u64>) {
        for units in units {
            log.append(&record(units)).expect("append");
        }
    }

    /// Issues the buffered group commit's write, and power fails during its
    /// `fdatasync`: the write may be anywhere between not started and
    /// done, page by page.
    fn flush_interrupted_by_power_loss(storage: &MemoryStorage, log: &mut SegmentedLog) {
        let preallocates = log.active_bytes + log.buffer.len() as u64 > log.preallocated_through;
        storage.fail_syncs_after(usize::from(preallocates));
        assert!(log.flush().is_err(), "the sync never returned");
    }

    /// The power loss: the last group commit spans several pages,
    /// and a later page of it reached the disk while an earlier one did not
    /// (or only partly). Frames of it survive after the hole; they must not
    /// be taken for records that were durable once. Recovery cuts the torn
    /// write at the end of the last complete batch and goes on.
    #[test]
    fn a_later_page_of_the_last_write_surviving_an_earlier_lost_one_is_a_torn_tail() {
        use PageFate::{Lost, Survives, Torn};
        let patterns = [
            vec![Survives, Lost, Survives, Survives, Survives, Survives],
            vec![Lost, Survives, Survives, Survives, Survives, Survives],
            vec![Survives, Survives, Torn { bytes: 1000 }, Lost, Survives, Survives],
            vec![Torn { bytes: 2000 }, Lost, Lost, Survives],
        ];
        for fates in patterns {
            let storage = MemoryStorage::new();
            let (mut log, _) = open(&storage, LogConfig::default()).expect("opens");
            for units in 1..=3 {
                log.append(&record(units)).expect("append");
                log.flush().expect("flush");
            }
            let last_write_at = log.active_bytes as usize;
            append_all(&mut log, 4..=500);
            assert!(log.buffer.len() > 4 * PAGE_BYTES, "the last write spans pages");
            flush_interrupted_by_power_loss(&storage, &mut log);
            storage.crash(UnsyncedFate::EachPage(fates.clone()));

            let (mut log, recovered) =
                open(&storage, LogConfig::default()).unwrap_or_else(|error| panic!("{fates:?}: {error}"));
            assert_eq!(units_of(&recovered), vec![1, 2, 3], "{fates:?}");
            let torn = recovered.torn_tail.unwrap_or_else(|| panic!("{fates:?}: a torn tail is reported"));
            assert_eq!((torn.file, torn.offset), (Path::new("/data/log").join(segment_name(1)), last_write_at));
            log.append(&record(7)).expect("append");
            log.flush().expect("flush after the cut");
            let (_, recovered) = open(&storage, LogConfig::default()).expect("reopens");
            assert_eq!(units_of(&recovered), vec![1, 2, 3, 7]);
        }
    }

    /// The other side of the line: the same torn last write, but a bit of a
    /// batch synced before it has flipped. That batch was durable (a batch
    /// header begins after it), so recovery refuses, naming file and offset,
    /// while the disk without the flipped bit recovers.
    #[test]
    fn damage_before_the_last_sync_is_corruption_even_with_a_torn_last_write() {
        let storage = MemoryStorage::new();
        let (mut log, _) = open(&storage, LogConfig::default()).expect("opens");
        let mut batch_starts = Vec::new();
        for batch in 0..4 {
            batch_starts.push(log.active_bytes as usize);
            append_all(&mut log, batch * 3 + 1..=batch * 3 + 3);
            log.flush().expect("flush");
        }
        let last_write_at = log.active_bytes as usize;
        append_all(&mut log, 13..=500);
        flush_interrupted_by_power_loss(&storage, &mut log);
        let fates = vec![PageFate::Survives, PageFate::Lost, PageFate::Survives, PageFate::Survives];
        let file = Path::new("/data/log").join(segment_name(1));

        let intact = storage.crashed_copy(UnsyncedFate::EachPage(fates.clone()));
        let (_, recovered) = open(&intact, LogConfig::default()).expect("the torn write alone is cut");
        assert_eq!(units_of(&recovered), (1..=12).collect::<Vec<_>>());
        assert_eq!(recovered.torn_tail.map(|torn| torn.offset), Some(last_write_at));

        // In a batch in the middle, and in the last synced one (the torn
        // write's surviving header is what proves it was synced).
        for damaged_batch in [1, 3] {
            let disk = storage.crashed_copy(UnsyncedFate::EachPage(fates.clone()));
            disk.flip_bit(&file, batch_starts[damaged_batch] + 40, 2).expect("flip");
            match open(&disk, LogConfig::default()) {
                Err(LogError::Corrupt { file: reported, offset, .. }) => {
                    assert_eq!((reported, offset), (file.clone(), batch_starts[damaged_batch]));
                }
                other => panic!("batch {damaged_batch}: expected corruption, got {other:?}"),
            }
        }
    }

    /// Seeded: synced group commits, then a last one whose pages each
    /// survive, vanish or tear at random. Recovery always opens and keeps
    /// exactly a prefix of the appended records: every synced one, and the
    /// last batch wholly or not at all.
    #[test]
    fn any_page_fates_of_the_last_write_keep_exactly_a_prefix_with_everything_synced() {
        let mut seed: u64 = 0x708e_5eed;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let mut last_batch_kept = 0;
        let mut torn = 0;
        for run in 0..400 {
            let storage = MemoryStorage::new();
            let config = LogConfig { segment_bytes_max: 8 * 1024 + next(64 * 1024), snapshot_log_bytes: u64::MAX };
            let (mut log, _) = open(&storage, config).expect("opens");
            let mut appended = 0;
            for _ in 0..next(6) {
                let count = 1 + next(80);
                append_all(&mut log, appended + 1..=appended + count);
                appended += count;
                log.flush().expect("flush");
            }
            let synced = appended;
            let count_max = if next(4) == 0 { 20 } else { 500 };
            let count = 1 + next(count_max);
            append_all(&mut log, appended + 1..=appended + count);
            appended += count;
            flush_interrupted_by_power_loss(&storage, &mut log);
            storage.crash(UnsyncedFate::SeededPages { seed: next(u64::MAX) });

            let (mut log, recovered) =
                open(&storage, config).unwrap_or_else(|error| panic!("run {run}: recovery refused: {error}"));
            let units = units_of(&recovered);
            assert!(
                units.len() as u64 == synced || units.len() as u64 == appended,
                "run {run}: kept {} records of {synced} synced and {appended} appended",
                units.len()
            );
            assert_eq!(units, (1..=units.len() as u64).collect::<Vec<_>>(), "run {run}");
            last_batch_kept += usize::from(units.len() as u64 == appended);
            torn += usize::from(recovered.torn_tail.is_some());
            let after = units.len() as u64 + 1;
            log.append(&record(after)).expect("append");
            log.flush().expect("flush after recovery");
            let (_, recovered) = open(&storage, config).expect("reopens");
            assert_eq!(units_of(&recovered), (1..=after).collect::<Vec<_>>(), "run {run}");
        }
        assert!(last_batch_kept > 10 && torn > 100, "the seeds cover both ends: {last_batch_kept} kept, {torn} torn");
    }

    /// A data directory written before batches: version 1 segments of bare
    /// frames, the active one ending in a torn frame and preallocated zeros.
    /// It opens with every whole record, new records go to a version 2
    /// segment after it, and the next open reads both.
    #[test]
    fn a_version_1_log_is_still_read_and_continued_in_a_version_2_segment() {
        let storage = MemoryStorage::new();
        let directory = Path::new("/data/log");
        let frames_of = |units: std::ops::RangeInclusive<u64>| {
            let mut bytes = Vec::new();
            for units in units {
                encode_frame(units, EncodedRecord::from(&record(units)).as_bytes(), &mut bytes);
            }
            bytes
        };
        let write_version_1 = |first_sequence: u64, bytes: &[u8]| {
            let mut file = storage.open_append(&directory.join(segment_name(first_sequence))).expect("create");
            file.append(bytes).expect("write");
            file.sync_data().expect("sync");
        };
        write_version_1(1, &frames_of(1..=3));
        let mut active = frames_of(4..=6);
        active.truncate(active.len() - 3);
        active.resize(active.len() + PAGE_BYTES, 0);
        write_version_1(4, &active);
        storage.sync_dir(directory).expect("sync directory");

        let (mut log, recovered) = open(&storage, LogConfig::default()).expect("opens");
        assert_eq!(units_of(&recovered), vec![1, 2, 3, 4, 5]);
        assert_eq!(recovered.torn_tail.map(|torn| torn.file), Some(directory.join(segment_name(4))));
        assert_eq!(log.append(&record(6)).expect("append"), 6);
        log.flush().expect("flush");
        let names: Vec<PathBuf> = [1, 4, 6].iter().map(|&first| directory.join(segment_name(first))).collect();
        assert_eq!(storage.list(directory).expect("list"), names);
        assert_eq!(storage.read(&names[1]).expect("read"), frames_of(4..=5), "left as written, cut to its data");

        let (_, recovered) = open(&storage, LogConfig::default()).expect("reopens");
        assert_eq!(units_of(&recovered), (1..=6).collect::<Vec<_>>());
        assert!(recovered.torn_tail.is_none());
    }
}
