//! Background snapshots: the closed segments of the log are replayed on top
//! of its newest snapshot, the result is written as the next snapshot, and
//! the segments it covers are removed.
//!
//! Closed segments never change, so the compactor reads them while the
//! writer appends to the active one, without any coordination beyond the
//! request naming the last record to cover. Rebuilding from the files
//! (instead of copying live actor state) makes each snapshot exactly the
//! state a restart would replay to, and costs the live path nothing.
//!
//! A failed snapshot is not fatal: the log still holds every record, so the
//! node keeps serving, the failure is reported, and the next request
//! tries again with a longer stretch of log. Crash safety follows from the
//! order of steps: the new snapshot is durable (temporary file, sync,
//! rename, sync directory) before any segment it covers is removed, and
//! segments are removed oldest first, so a crash at any point leaves a
//! snapshot and a contiguous log after it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::log::replay::{ReplayRules, ReplayedState};
use crate::log::segments::{list_segments, read_segments, remove_leftovers, split_covered, LogError};
use crate::log::snapshot::{load_newest_snapshot, write_snapshot};
use crate::log::storage::Storage;

/// Counts of what the compactor did.
#[derive(Debug, Default)]
pub struct CompactorStats {
    pub snapshots: AtomicU64,
    pub segments_removed: AtomicU64,
    pub failures: AtomicU64,
    /// When the last snapshot was written (milliseconds since the Unix
    /// epoch; 0 before the first). For operators' "snapshot age": the
    /// compactor is an edge of the engine and may read the wall clock.
    pub last_snapshot_unix_ms: AtomicU64,
}

/// What one snapshot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub records_replayed: usize,
    pub segments_removed: usize,
}

/// The compactor thread.
#[derive(Debug)]
pub struct Compactor {
    /// Requests to cover the log through a sequence number, which must be
    /// the last record of a closed segment.
    sender: Option<Sender<u64>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<CompactorStats>,
}

impl Compactor {
    /// Starts the thread. At most `queue_max` requests wait; beyond that a
    /// request is dropped, which only delays a snapshot (the next request
    /// covers more).
    pub fn start(
        storage: Arc<dyn Storage>,
        directory: PathBuf,
        rules: ReplayRules,
        queue_max: usize,
    ) -> std::io::Result<Self> {
        let (sender, receiver) = crossbeam_channel::bounded(queue_max.max(1));
        let stats = Arc::new(CompactorStats::default());
        let thread = {
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("log-compactor".to_owned())
                .spawn(move || run(storage.as_ref(), &directory, &receiver, &rules, &stats))?
        };
        Ok(Self { sender: Some(sender), thread: Some(thread), stats })
    }

    /// Asks for a snapshot through record `through` (the last record of a
    /// closed segment) without waiting; returns false if it was dropped.
    pub fn request(&self, through: u64) -> bool {
        match self.sender.as_ref().map(|sender| sender.try_send(through)) {
            Some(Ok(())) => true,
            Some(Err(TrySendError::Full(_))) => {
                tracing::debug!(through, "snapshot queue full; the next request covers more");
                false
            }
            Some(Err(TrySendError::Disconnected(_))) | None => false,
        }
    }

    pub fn stats(&self) -> &Arc<CompactorStats> {
        &self.stats
    }

    /// Finishes the queued requests, then ends the thread and waits for it.
    pub fn stop(mut self) {
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the log compactor thread panicked");
            }
        }
    }
}

fn run(storage: &dyn Storage, directory: &Path, receiver: &Receiver<u64>, rules: &ReplayRules, stats: &CompactorStats) {
    for through in receiver {
        let _span = tracing::info_span!("snapshot", through).entered();
        match take_snapshot(storage, directory, through, rules) {
            Ok(Some(done)) => {
                stats.snapshots.fetch_add(1, Relaxed);
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                stats.last_snapshot_unix_ms.store(u64::try_from(now.as_millis()).unwrap_or(u64::MAX), Relaxed);
                stats.segments_removed.fetch_add(done.segments_removed as u64, Relaxed);
                tracing::debug!(records = done.records_replayed, segments = done.segments_removed, "snapshot taken");
            }
            Ok(None) => {}
            Err(error) => {
                stats.failures.fetch_add(1, Relaxed);
                tracing::error!(%error, "snapshot failed; the log keeps every record and the next request retries");
            }
        }
    }
}

/// Replays the closed segments of the log in `directory` through
/// record `through` onto its newest snapshot, writes the result as the new
/// snapshot, then removes the older snapshot and the covered segments.
/// `None` if a snapshot already covers `through`.
pub fn take_snapshot(
    storage: &dyn Storage,
    directory: &Path,
    through: u64,
    rules: &ReplayRules,
) -> Result<Option<Compacted>, LogError> {
    let corrupt = |reason: String| LogError::Corrupt { file: directory.to_path_buf(), offset: 0, reason };
    let base = load_newest_snapshot(storage, directory)?;
    let covered_through = base.as_ref().map_or(0, |snapshot| snapshot.last_sequence);
    if covered_through >= through {
        return Ok(None);
    }
    let mut state = base_state(directory, rules, base)?;
    let (_, uncovered) = split_covered(list_segments(storage, directory)?, covered_through);
    // Only closed segments: those starting at or before `through`, which
    // end at it exactly because `through` is a segment boundary.
    let closed: Vec<_> = uncovered.into_iter().take_while(|segment| segment.first_sequence <= through).collect();
    let read = read_segments(storage, &closed, covered_through, false)?;
    if read.next_sequence != through + 1 {
        return Err(corrupt(format!("closed segments end at record {}, not {through}", read.next_sequence - 1)));
    }
    let records_replayed = read.records.len();
    apply_all(directory, &mut state, read.records)?;
    write_snapshot(storage, directory, &state.snapshot())?;
    // Everything at or below `through` is now in the snapshot.
    let (covered, _) = split_covered(list_segments(storage, directory)?, through);
    remove_leftovers(storage, directory, Some(through), &covered)?;
    storage.sync_dir(directory).map_err(|source| LogError::Io {
        file: directory.to_path_buf(),
        operation: "sync directory",
        source,
    })?;
    Ok(Some(Compacted { records_replayed, segments_removed: covered.len() }))
}

/// The state the log in `directory` describes (newest snapshot plus every
/// record after it), read without changing anything: what a restart would
/// recover, for tools and tests. A torn tail is left out, as recovery would
/// cut it.
pub fn replay_log(storage: &dyn Storage, directory: &Path, rules: &ReplayRules) -> Result<ReplayedState, LogError> {
    let base = load_newest_snapshot(storage, directory)?;
    let covered_through = base.as_ref().map_or(0, |snapshot| snapshot.last_sequence);
    let mut state = base_state(directory, rules, base)?;
    let (_, segments) = split_covered(list_segments(storage, directory)?, covered_through);
    let read = read_segments(storage, &segments, covered_through, true)?;
    apply_all(directory, &mut state, read.records)?;
    Ok(state)
}

fn base_state(
    directory: &Path,
    rules: &ReplayRules,
    base: Option<crate::log::snapshot::Snapshot>,
) -> Result<ReplayedState, LogError> {
    match base {
        Some(snapshot) => ReplayedState::from_snapshot(rules.clone(), snapshot).map_err(|reason| LogError::Corrupt {
            file: directory.to_path_buf(),
            offset: 0,
            reason,
        }),
        None => Ok(ReplayedState::empty(rules.clone())),
    }
}

fn apply_all(
    directory: &Path,
    state: &mut ReplayedState,
    records: Vec<(u64, crate::log::record::LogRecord)>,
) -> Result<(), LogError> {
    for (sequence, record) in records {
        state.apply(sequence, record).map_err(|reason| LogError::Corrupt {
            file: directory.to_path_buf(),
            offset: 0,
            reason: format!("record {sequence}: {reason}"),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{BuyerId, OrderId, SkuId};
    use crate::limits::Limits;
    use crate::log::record::LogRecord;
    use crate::log::segments::{LogConfig, SegmentedLog};
    use crate::log::snapshot::Snapshot;
    use crate::log::storage::{MemoryStorage, UnsyncedFate};
    use crate::sku::{Quantity, ReserveLine, SkuCommand, SkuSettings};

    const RULES: fn() -> ReplayRules = || ReplayRules { partition_count: 1, limits_unrecorded: Limits::default() };
    const CONFIG: LogConfig = LogConfig { segment_bytes_max: 300, snapshot_log_bytes: 900 };

    fn directory() -> PathBuf {
        PathBuf::from("/data/log")
    }

    fn sku() -> SkuId {
        SkuId::new("sku").expect("valid")
    }

    /// A history of `count` records: a creation, then holds, sales and
    /// restocks at advancing times.
    fn history(count: u64) -> Vec<LogRecord> {
        let settings = SkuSettings { initial_units: 1_000, ..SkuSettings::default() };
        let mut records = vec![LogRecord::CreateSku { sku: sku(), settings, now_ms: 0, operation: None }];
        for index in 1..count {
            let order = OrderId::new(format!("order-{}", index / 2)).expect("valid");
            let command = match index % 5 {
                0 => SkuCommand::Admin { operation: None, change: crate::sku::AdminChange::AddStock { units: 2 } },
                1 | 3 => SkuCommand::Reserve(ReserveLine {
                    order,
                    buyer: BuyerId::new(format!("buyer-{index}")).expect("valid"),
                    quantity: Quantity::Exactly(1),
                    ttl_ms: 10_000,
                }),
                _ => SkuCommand::Commit { order, units: None },
            };
            records.push(LogRecord::Apply { sku: sku(), now_ms: 1_000 + index * 100, command });
        }
        records
    }

    /// Writes `records`, one flush each; returns the open log.
    fn write(storage: &MemoryStorage, records: &[LogRecord]) -> SegmentedLog {
        let (mut log, _) = SegmentedLog::open(Arc::new(storage.clone()), &directory(), CONFIG).expect("opens");
        for record in records {
            log.append(record).expect("append");
            log.flush().expect("flush");
        }
        log
    }

    fn replayed_bytes(storage: &MemoryStorage) -> Vec<u8> {
        replay_log(storage, &directory(), &RULES()).expect("replays").snapshot().encode()
    }

    fn segment_count(storage: &MemoryStorage) -> usize {
        list_segments(storage, &directory()).expect("lists").len()
    }

    #[test]
    fn a_snapshot_replaces_the_closed_segments_and_recovery_reaches_the_same_state() {
        let storage = MemoryStorage::new();
        let log = write(&storage, &history(120));
        let through = log.snapshot_due().expect("enough closed log");
        let (full, segments_before) = (replayed_bytes(&storage), segment_count(&storage));
        assert_eq!(replayed_bytes(&storage), full, "replaying twice gives the same bytes");

        let done = take_snapshot(&storage, &directory(), through, &RULES()).expect("snapshot").expect("taken");
        assert!(done.segments_removed > 0);
        assert_eq!(segment_count(&storage), segments_before - done.segments_removed);
        assert_eq!(replayed_bytes(&storage), full, "snapshot + tail replays to the same bytes as the whole log");
        assert_eq!(take_snapshot(&storage, &directory(), through, &RULES()).expect("no-op"), None);
        let mut log = log;
        for record in &history(123)[120..] {
            log.append(record).expect("append");
        }
        log.flush().expect("flush");
        drop(log);

        storage.crash(UnsyncedFate::Lost);
        let (mut log, recovered) = SegmentedLog::open(Arc::new(storage.clone()), &directory(), CONFIG).expect("opens");
        assert_eq!(recovered.snapshot.as_ref().map(|snapshot| snapshot.last_sequence), Some(through));
        assert_eq!(recovered.records.first().map(|(sequence, _)| *sequence), Some(through + 1));
        assert_eq!(recovered.records.last().map(|(sequence, _)| *sequence), Some(123));
        assert_eq!(log.append(&history(2)[1]).expect("append"), 124, "sequence numbers continue");
    }

    #[test]
    fn a_crash_after_the_snapshot_but_before_the_removals_recovers_the_same_state() {
        let storage = MemoryStorage::new();
        let log = write(&storage, &history(90));
        let through = log.snapshot_due().expect("enough closed log");
        let full = replayed_bytes(&storage);
        // The first half of a snapshot: written and durable, nothing removed.
        let mut state = ReplayedState::empty(RULES());
        for (index, record) in history(through).into_iter().enumerate() {
            state.apply(index as u64 + 1, record).expect("applies");
        }
        crate::log::snapshot::write_snapshot(&storage, &directory(), &state.snapshot()).expect("written");
        let stray = directory().join("snapshot-00000000000000000099.snap.tmp");
        storage.open_append(&stray).expect("stray temporary file");
        storage.sync_dir(&directory()).expect("sync");
        drop(log);
        storage.crash(UnsyncedFate::Lost);

        let (_, recovered) = SegmentedLog::open(Arc::new(storage.clone()), &directory(), CONFIG).expect("opens");
        assert_eq!(recovered.snapshot.map(|snapshot| snapshot.last_sequence), Some(through));
        assert_eq!(replayed_bytes(&storage), full);
        let names = storage.list(&directory()).expect("lists");
        assert!(!names.contains(&stray), "temporary files are cleared at open");
        assert!(split_covered(list_segments(&storage, &directory()).expect("lists"), through).0.is_empty());
    }

    #[test]
    fn a_damaged_closed_segment_fails_the_snapshot_and_removes_nothing() {
        let storage = MemoryStorage::new();
        let log = write(&storage, &history(60));
        let through = log.snapshot_due().expect("enough closed log");
        let first = list_segments(&storage, &directory()).expect("lists")[0].path.clone();
        storage.flip_bit(&first, 40, 3).expect("flip");
        let before = storage.list(&directory()).expect("lists");
        let failed = take_snapshot(&storage, &directory(), through, &RULES());
        assert!(matches!(&failed, Err(LogError::Corrupt { file, .. }) if *file == first), "{failed:?}");
        assert_eq!(storage.list(&directory()).expect("lists"), before);
    }

    #[test]
    fn recovery_refuses_a_log_with_a_gap_after_the_snapshot() {
        let storage = MemoryStorage::new();
        let log = write(&storage, &history(120));
        let through = log.snapshot_due().expect("enough closed log");
        take_snapshot(&storage, &directory(), through, &RULES()).expect("snapshot").expect("taken");
        drop(log);
        // Lose the segment right after the snapshot.
        let next = list_segments(&storage, &directory()).expect("lists")[0].path.clone();
        storage.remove(&next).expect("remove");
        let refused = SegmentedLog::open(Arc::new(storage.clone()), &directory(), CONFIG);
        assert!(matches!(refused, Err(LogError::Corrupt { .. })), "{refused:?}");
    }

    #[test]
    fn the_writer_asks_for_snapshots_and_they_bound_the_log() {
        let storage = MemoryStorage::new();
        let (log, _) = SegmentedLog::open(Arc::new(storage.clone()), &directory(), CONFIG).expect("opens");
        let compactor = Compactor::start(Arc::new(storage.clone()), directory(), RULES(), 4).expect("starts");
        let writer = crate::log::writer::LogWriter::start(
            log,
            crate::log::writer::WriterConfig { round_appends_max: 8 },
            Some(compactor),
            None,
        )
        .expect("starts");
        for record in history(400) {
            let (sender, receiver) = std::sync::mpsc::channel();
            let append = crate::log::writer::Append {
                records: vec![crate::log::record::EncodedRecord::from(&record)],
                on_durable: Box::new(move |outcome| sender.send(outcome.is_ok()).expect("send")),
            };
            writer.submit(append).expect("queued");
            assert!(receiver.recv().expect("answered"), "durable");
        }
        let snapshots = writer.compactor_stats().expect("has a compactor").snapshots.load(Relaxed);
        let failures = writer.compactor_stats().expect("has a compactor").failures.load(Relaxed);
        writer.stop();
        assert!(snapshots > 0 && failures == 0, "{snapshots} snapshots, {failures} failures");
        // 400 records fill over 100 segments; snapshots removed most of them
        // (how many remain depends on how far the compactor lagged).
        assert!(segment_count(&storage) < 40, "{} segments left", segment_count(&storage));
        let state = replay_log(&storage, &directory(), &RULES()).expect("replays");
        let mut expected = ReplayedState::empty(RULES());
        for (index, record) in history(400).into_iter().enumerate() {
            expected.apply(index as u64 + 1, record).expect("applies");
        }
        assert_eq!(state.snapshot().encode(), expected.snapshot().encode());
        let _: Snapshot = state.snapshot();
    }
}
