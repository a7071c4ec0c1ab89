//! One partition's log on disk: numbered segment files, appended in
//! batches, recovered on open.
//!
//! Files are `segment-<first sequence, 20 digits>.log` in the partition's
//! directory. Appends are buffered; [`PartitionLog::flush`] writes the
//! buffer with one write and one `fdatasync` and returns the highest durable
//! sequence number. The first failed write or sync poisons the log for good:
//! an fsync error may have dropped data the kernel still reports as written,
//! so nothing is acknowledged after one and nothing is retried.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::log::frame::{encode_frame, scan, ScanEnd};
use crate::log::record::LogRecord;
use crate::log::storage::{AppendFile, Storage};

/// How the log lays out its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// A segment that reaches this size is closed and a new one started.
    /// Bounds the work of reading one file and the space a snapshot frees.
    pub segment_bytes_max: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { segment_bytes_max: 64 * 1024 * 1024 }
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
    #[error("the log failed earlier ({0}) and accepts nothing more")]
    Poisoned(String),
}

/// A torn tail found and cut at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub file: PathBuf,
    pub offset: usize,
    pub bytes_cut: usize,
}

/// What [`PartitionLog::open`] found.
#[derive(Debug)]
pub struct Recovered {
    /// Every record, with its sequence number, in order.
    pub records: Vec<(u64, LogRecord)>,
    pub torn_tail: Option<TornTail>,
}

#[derive(Debug)]
pub struct PartitionLog {
    storage: Arc<dyn Storage>,
    directory: PathBuf,
    config: LogConfig,
    active: Box<dyn AppendFile>,
    /// First sequence number of the active segment (its file name).
    active_first: u64,
    active_bytes: u64,
    next_sequence: u64,
    durable_sequence: u64,
    buffer: Vec<u8>,
    poisoned: Option<String>,
}

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

impl PartitionLog {
    /// Opens (or creates) the log in `directory` and recovers its records.
    /// A torn tail in the last segment is cut off and reported; anything
    /// else unreadable is [`LogError::Corrupt`], naming the file and offset.
    pub fn open(storage: Arc<dyn Storage>, directory: &Path, config: LogConfig) -> Result<(Self, Recovered), LogError> {
        storage.create_dir_all(directory).map_err(io_error(directory, "create directory"))?;
        let segments: Vec<(u64, PathBuf)> = storage
            .list(directory)
            .map_err(io_error(directory, "list"))?
            .into_iter()
            .filter_map(|path| first_sequence_of(&path).map(|first| (first, path)))
            .collect();
        let mut records = Vec::new();
        let mut torn_tail = None;
        let mut next_sequence = segments.first().map_or(1, |(first, _)| *first);
        let mut active_bytes = 0;
        for (position, (first_sequence, path)) in segments.iter().enumerate() {
            let corrupt = |offset: usize, reason: String| LogError::Corrupt { file: path.clone(), offset, reason };
            if *first_sequence != next_sequence {
                return Err(corrupt(0, format!("segment starts at {first_sequence}, expected {next_sequence}")));
            }
            let bytes = storage.read(path).map_err(io_error(path, "read"))?;
            let scanned = scan(&bytes, *first_sequence);
            for (sequence, range) in &scanned.records {
                let record = LogRecord::decode(&bytes[range.clone()])
                    .map_err(|error| corrupt(range.start, format!("record {sequence}: {error}")))?;
                records.push((*sequence, record));
            }
            next_sequence = first_sequence + scanned.records.len() as u64;
            let is_last = position + 1 == segments.len();
            match scanned.end {
                ScanEnd::Clean => {}
                ScanEnd::TornTail { offset, reason } if is_last => {
                    tracing::warn!(file = %path.display(), offset, %reason, "cutting a torn tail off the log");
                    storage.truncate(path, offset as u64).map_err(io_error(path, "truncate"))?;
                    torn_tail = Some(TornTail { file: path.clone(), offset, bytes_cut: bytes.len() - offset });
                }
                ScanEnd::TornTail { offset, reason } => {
                    return Err(corrupt(offset, format!("damaged frame ({reason}) before a later segment")));
                }
                ScanEnd::Corrupt { offset, reason } => {
                    return Err(corrupt(offset, reason.to_string()));
                }
            }
            active_bytes = scanned.valid_bytes as u64;
        }
        let (active_first, active_path) = match segments.last() {
            Some((first, path)) => (*first, path.clone()),
            None => {
                let path = directory.join(segment_name(next_sequence));
                storage.open_append(&path).map_err(io_error(&path, "create"))?;
                storage.sync_dir(directory).map_err(io_error(directory, "sync directory"))?;
                (next_sequence, path)
            }
        };
        let active = storage.open_append(&active_path).map_err(io_error(&active_path, "open"))?;
        let log = Self {
            storage,
            directory: directory.to_path_buf(),
            config,
            active,
            active_first,
            active_bytes,
            next_sequence,
            durable_sequence: next_sequence - 1,
            buffer: Vec::new(),
            poisoned: None,
        };
        Ok((log, Recovered { records, torn_tail }))
    }

    /// Buffers `record`; returns its sequence number. It is durable once
    /// [`Self::flush`] returns a sequence at least this high.
    pub fn append(&mut self, record: &LogRecord) -> Result<u64, LogError> {
        self.check_poisoned()?;
        let sequence = self.next_sequence;
        encode_frame(sequence, &record.encode(), &mut self.buffer);
        self.next_sequence += 1;
        Ok(sequence)
    }

    /// Writes everything buffered with one write and one `fdatasync`, then
    /// rotates the segment if it is full. Returns the highest durable
    /// sequence number.
    pub fn flush(&mut self) -> Result<u64, LogError> {
        self.check_poisoned()?;
        if self.buffer.is_empty() {
            return Ok(self.durable_sequence);
        }
        let active_path = self.directory.join(segment_name(self.active_first));
        let written = self
            .active
            .append(&self.buffer)
            .map_err(io_error(&active_path, "write"))
            .and_then(|()| self.active.sync_data().map_err(io_error(&active_path, "fdatasync")));
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

    /// The highest sequence number known durable.
    pub fn durable_sequence(&self) -> u64 {
        self.durable_sequence
    }

    fn rotate(&mut self) -> Result<(), LogError> {
        let path = self.directory.join(segment_name(self.next_sequence));
        self.active = self.storage.open_append(&path).map_err(io_error(&path, "create"))?;
        self.storage.sync_dir(&self.directory).map_err(io_error(&self.directory, "sync directory"))?;
        self.active_first = self.next_sequence;
        self.active_bytes = 0;
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
    use crate::log::storage::{MemoryStorage, UnsyncedFate};
    use crate::sku::SkuCommand;

    fn record(units: u64) -> LogRecord {
        LogRecord::Apply {
            sku: SkuId::new("sku").expect("valid"),
            now_ms: units,
            command: SkuCommand::AddStock { units },
        }
    }

    fn units_of(recovered: &Recovered) -> Vec<u64> {
        recovered
            .records
            .iter()
            .map(|(_, record)| match record {
                LogRecord::Apply { command: SkuCommand::AddStock { units }, .. } => *units,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn open(storage: &MemoryStorage, config: LogConfig) -> Result<(PartitionLog, Recovered), LogError> {
        PartitionLog::open(Arc::new(storage.clone()), Path::new("/data/partition-0"), config)
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
        log.active.append(&log.buffer).expect("write");
        storage.crash(UnsyncedFate::TornAfter { bytes: 30 });

        let (mut log, recovered) = open(&storage, LogConfig::default()).expect("reopens");
        assert_eq!(units_of(&recovered), vec![1]);
        let torn = recovered.torn_tail.expect("reported");
        assert_eq!(torn.bytes_cut, 30);
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
        for units in 1..=3 {
            log.append(&record(units)).expect("append");
        }
        log.flush().expect("flush");
        let file = Path::new("/data/partition-0").join(segment_name(1));
        storage.flip_bit(&file, 30, 0).expect("flip");
        match open(&storage, LogConfig::default()) {
            Err(LogError::Corrupt { file: reported, offset, .. }) => {
                assert_eq!(reported, file);
                assert_eq!(offset, 0, "the first frame holds byte 30");
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
        assert!(matches!(log.flush(), Err(LogError::Io { operation: "write", .. })));
        assert!(matches!(log.flush(), Err(LogError::Poisoned(_))));
    }

    #[test]
    fn segments_rotate_and_recover_in_order() {
        let storage = MemoryStorage::new();
        let config = LogConfig { segment_bytes_max: 100 };
        let (mut log, _) = open(&storage, config).expect("opens");
        for units in 1..=20 {
            log.append(&record(units)).expect("append");
            log.flush().expect("flush");
        }
        let segments = storage.list(Path::new("/data/partition-0")).expect("list");
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
            let config = LogConfig { segment_bytes_max: 64 + next(400) };
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
            if next(2) == 0 {
                let _ = log.active.append(&log.buffer);
            }
            storage.crash(fate);
            let (_, recovered) = open(&storage, config).unwrap_or_else(|error| panic!("run {run}: {error}"));
            let units = units_of(&recovered);
            assert!(units.len() >= flushed, "run {run}: lost flushed records: {units:?} vs {flushed}");
            assert_eq!(units[..], appended[..units.len()], "run {run}");
        }
    }
}
