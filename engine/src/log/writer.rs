//! The group-commit writer: one thread that makes many actors' records
//! durable together.
//!
//! Actors hand it an [`Append`] (the records of one batch and what to do
//! once they are durable) without waiting. The thread takes everything
//! queued, appends it to each touched partition's log, issues one write and
//! one `fdatasync` per touched partition, advances that partition's
//! [`DurableWatermark`], and only then runs the appends' callbacks, which
//! release the answers. An append with no records (a batch whose requests
//! were all refused) is acknowledged after the records queued before it, so
//! no answer depends on state that could still be lost.
//!
//! A failed write or sync fails that partition for good: its pending and
//! later appends are answered with [`WriteFailure`], never acknowledged.
//!
//! When a partition has enough closed log, the writer asks the
//! [`Compactor`] for a snapshot; the compactor works on closed segments
//! only, so the writer never waits for it.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use flashstock_sync::DurableWatermark;

use crate::log::compactor::{Compactor, CompactorStats, SnapshotRequest};
use crate::log::record::LogRecord;
use crate::log::segments::PartitionLog;
use crate::log::storage::DirectoryLock;

/// Runs once the append's records are durable (with the highest durable
/// sequence number of its partition) or can never be.
pub type DurableCallback = Box<dyn FnOnce(Result<u64, WriteFailure>) + Send>;

/// Records of one partition to make durable.
pub struct Append {
    pub partition: u32,
    pub records: Vec<LogRecord>,
    pub on_durable: DurableCallback,
}

impl std::fmt::Debug for Append {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Append")
            .field("partition", &self.partition)
            .field("records", &self.records.len())
            .finish()
    }
}

/// A partition whose log failed; it acknowledges nothing any more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("partition {partition}: the log failed ({cause}); nothing more is acknowledged")]
pub struct WriteFailure {
    pub partition: u32,
    pub cause: Arc<str>,
}

/// An append the writer cannot take: its thread has stopped.
#[derive(Debug, thiserror::Error)]
#[error("the log writer has stopped")]
pub struct SubmitError(pub Append);

/// Bounds of the writer. Its queue has no bound of its own: every append
/// carries the answers of admitted requests (or one timer's expiry per SKU),
/// so the admission gates bound it, and refusing an append of commands that
/// were already applied would leave memory ahead of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterConfig {
    /// Appends taken per round (one write + sync per touched partition).
    /// Bounds the latency a round adds to the first append in it.
    pub round_appends_max: usize,
    /// Partition logs synced at once in a round. Syncs of different files
    /// overlap on the device; more threads than the device has queues only
    /// add scheduling.
    pub sync_threads_max: usize,
}

/// Counts of what the writer did, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub rounds: std::sync::atomic::AtomicU64,
    pub syncs: std::sync::atomic::AtomicU64,
    pub records: std::sync::atomic::AtomicU64,
}

/// A handle that queues appends for the writer; cheap to clone. The writer
/// thread ends once every submitter (and the [`LogWriter`]) is gone and the
/// queue is drained.
#[derive(Debug, Clone)]
pub struct LogSubmitter {
    sender: Sender<Message>,
}

#[derive(Debug)]
enum Message {
    Append(Append),
    /// Finish what came before, then exit (releasing the directory lock).
    Stop,
}

impl LogSubmitter {
    /// Queues `append` without waiting.
    pub fn submit(&self, append: Append) -> Result<(), SubmitError> {
        self.sender.send(Message::Append(append)).map_err(|error| match error.0 {
            Message::Append(append) => SubmitError(append),
            Message::Stop => unreachable!("only appends are submitted"),
        })
    }
}

/// The writer thread and the way to feed it. Dropping it does not wait for
/// the thread (the thread finishes what is queued and exits once the last
/// submitter is gone); [`LogWriter::stop`] waits.
#[derive(Debug)]
pub struct LogWriter {
    submitter: Option<LogSubmitter>,
    thread: Option<JoinHandle<()>>,
    watermarks: Arc<[DurableWatermark]>,
    stats: Arc<WriterStats>,
    compactor_stats: Option<Arc<CompactorStats>>,
}

impl LogWriter {
    /// Starts the writer over `logs`, indexed by partition, asking
    /// `compactor` (if any) for snapshots. `lock` (the data directory's) is
    /// held by the thread until it and the compactor have written their
    /// last byte, so a successor can never write beside them.
    pub fn start(
        logs: Vec<PartitionLog>,
        config: WriterConfig,
        compactor: Option<Compactor>,
        lock: Option<DirectoryLock>,
    ) -> std::io::Result<Self> {
        assert!(config.round_appends_max > 0, "a round takes at least one append");
        let watermarks: Arc<[DurableWatermark]> =
            logs.iter().map(|log| DurableWatermark::new(log.durable_sequence())).collect();
        let stats = Arc::new(WriterStats::default());
        let (sender, receiver) = crossbeam_channel::unbounded();
        let compactor_stats = compactor.as_ref().map(|compactor| compactor.stats().clone());
        let thread = {
            let (watermarks, stats) = (watermarks.clone(), stats.clone());
            std::thread::Builder::new().name("log-writer".to_owned()).spawn(move || {
                run(logs, &receiver, config, compactor.as_ref(), &watermarks, &stats);
                if let Some(compactor) = compactor {
                    compactor.stop();
                }
                drop(lock);
            })?
        };
        Ok(Self { submitter: Some(LogSubmitter { sender }), thread: Some(thread), watermarks, stats, compactor_stats })
    }

    /// What the compactor did, if there is one.
    pub fn compactor_stats(&self) -> Option<&CompactorStats> {
        self.compactor_stats.as_deref()
    }

    /// Queues `append` without waiting.
    pub fn submit(&self, append: Append) -> Result<(), SubmitError> {
        match &self.submitter {
            Some(submitter) => submitter.submit(append),
            None => Err(SubmitError(append)),
        }
    }

    /// A handle for queueing appends from elsewhere.
    pub fn submitter(&self) -> LogSubmitter {
        self.submitter.clone().expect("a running writer has a submitter")
    }

    /// The durable watermark of each partition.
    pub fn watermarks(&self) -> Arc<[DurableWatermark]> {
        self.watermarks.clone()
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Makes everything queued so far durable (or fails it), then ends the
    /// thread and waits for it. Appends submitted afterwards fail.
    pub fn stop(mut self) {
        if let Some(submitter) = self.submitter.take() {
            // A send error means the thread is already gone.
            let _ = submitter.sender.send(Message::Stop);
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the log writer thread panicked");
            }
        }
    }
}

fn run(
    mut logs: Vec<PartitionLog>,
    receiver: &Receiver<Message>,
    config: WriterConfig,
    compactor: Option<&Compactor>,
    watermarks: &[DurableWatermark],
    stats: &WriterStats,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut failed: Vec<Option<Arc<str>>> = vec![None; logs.len()];
    let mut round: Vec<Append> = Vec::with_capacity(config.round_appends_max);
    let mut touched: Vec<bool> = vec![false; logs.len()];
    let mut stopping = false;
    while !stopping {
        match receiver.recv() {
            Ok(Message::Append(first)) => round.push(first),
            Ok(Message::Stop) | Err(_) => break,
        }
        while round.len() < config.round_appends_max {
            match receiver.try_recv() {
                Ok(Message::Append(append)) => round.push(append),
                Ok(Message::Stop) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        stats.rounds.fetch_add(1, Relaxed);
        for append in &round {
            let partition = append.partition as usize;
            assert!(partition < logs.len(), "append for unknown partition {partition}");
            if failed[partition].is_some() {
                continue;
            }
            touched[partition] = true;
            for record in &append.records {
                if let Err(error) = logs[partition].append(record) {
                    failed[partition] = Some(Arc::from(error.to_string()));
                    break;
                }
            }
            stats.records.fetch_add(append.records.len() as u64, Relaxed);
        }
        let to_flush: Vec<(usize, &mut PartitionLog)> = logs
            .iter_mut()
            .enumerate()
            .filter(|(partition, _)| std::mem::take(&mut touched[*partition]) && failed[*partition].is_none())
            .collect();
        stats.syncs.fetch_add(to_flush.len() as u64, Relaxed);
        for (partition, outcome) in flush_in_parallel(to_flush, config.sync_threads_max) {
            match outcome {
                Ok(durable) => {
                    watermarks[partition].advance(durable);
                    if let (Some(compactor), Some(through)) = (compactor, logs[partition].snapshot_due()) {
                        let log = &mut logs[partition];
                        let request = SnapshotRequest {
                            partition: partition as u32,
                            storage: log.storage().clone(),
                            directory: log.directory().to_path_buf(),
                            through,
                        };
                        if compactor.request(request) {
                            log.snapshot_requested();
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(partition, %error, "partition log failed; it acknowledges nothing more");
                    failed[partition] = Some(Arc::from(error.to_string()));
                }
            }
        }
        for append in round.drain(..) {
            let partition = append.partition as usize;
            let outcome = match &failed[partition] {
                Some(cause) => Err(WriteFailure { partition: append.partition, cause: cause.clone() }),
                None => Ok(watermarks[partition].durable()),
            };
            (append.on_durable)(outcome);
        }
    }
}

/// Flushes each log (one write and one `fdatasync`) on up to
/// `threads_max` threads at once: the syncs of different files overlap in
/// the device's queue instead of waiting for each other.
fn flush_in_parallel(
    logs: Vec<(usize, &mut PartitionLog)>,
    threads_max: usize,
) -> Vec<(usize, Result<u64, crate::log::segments::LogError>)> {
    if logs.len() <= 1 || threads_max <= 1 {
        return logs.into_iter().map(|(partition, log)| (partition, log.flush())).collect();
    }
    let per_thread = logs.len().div_ceil(threads_max);
    let mut chunks: Vec<Vec<(usize, &mut PartitionLog)>> = Vec::new();
    let mut remaining = logs.into_iter().peekable();
    while remaining.peek().is_some() {
        chunks.push(remaining.by_ref().take(per_thread).collect());
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                scope.spawn(move || {
                    chunk.into_iter().map(|(partition, log)| (partition, log.flush())).collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|worker| worker.join().expect("a flush thread panicked")).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SkuId;
    use crate::log::segments::LogConfig;
    use crate::log::storage::{MemoryStorage, Storage, UnsyncedFate};
    use crate::sku::SkuCommand;
    use std::path::Path;
    use std::sync::Mutex;

    const CONFIG: WriterConfig = WriterConfig { round_appends_max: 64, sync_threads_max: 4 };

    fn record(units: u64) -> LogRecord {
        LogRecord::Apply { sku: SkuId::new("sku").expect("valid"), now_ms: 0, command: SkuCommand::AddStock { units } }
    }

    fn open(storage: &MemoryStorage, partition: u32) -> (PartitionLog, Vec<u64>) {
        let directory = Path::new("/data").join(format!("partition-{partition}"));
        let (log, recovered) =
            PartitionLog::open(Arc::new(storage.clone()) as Arc<dyn Storage>, &directory, LogConfig::default())
                .expect("opens");
        let units = recovered
            .records
            .into_iter()
            .map(|(_, record)| match record {
                LogRecord::Apply { command: SkuCommand::AddStock { units }, .. } => units,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        (log, units)
    }

    type Outcomes = Arc<Mutex<Vec<(u64, Result<u64, WriteFailure>)>>>;

    fn submit(writer: &LogWriter, partition: u32, units: u64, outcomes: &Outcomes) {
        let outcomes = outcomes.clone();
        let append = Append {
            partition,
            records: vec![record(units)],
            on_durable: Box::new(move |outcome| outcomes.lock().expect("lock").push((units, outcome))),
        };
        writer.submit(append).expect("queued");
    }

    #[test]
    fn concurrent_appends_are_all_acknowledged_durable_and_in_order() {
        let storage = MemoryStorage::new();
        let logs = vec![open(&storage, 0).0, open(&storage, 1).0];
        let writer = Arc::new(LogWriter::start(logs, CONFIG, None, None).expect("starts"));
        let outcomes: Outcomes = Arc::default();
        let producers: Vec<_> = (0..4u64)
            .map(|producer| {
                let (writer, outcomes) = (writer.clone(), outcomes.clone());
                std::thread::spawn(move || {
                    for index in 0..50 {
                        submit(&writer, (producer % 2) as u32, producer * 1000 + index, &outcomes);
                    }
                })
            })
            .collect();
        for producer in producers {
            producer.join().expect("producer");
        }
        Arc::try_unwrap(writer).expect("sole owner").stop();
        let outcomes = outcomes.lock().expect("lock");
        assert_eq!(outcomes.len(), 200);
        assert!(outcomes.iter().all(|(_, outcome)| outcome.is_ok()));

        storage.crash(UnsyncedFate::Lost);
        for partition in 0..2u64 {
            let (_, units) = open(&storage, partition as u32);
            assert_eq!(units.len(), 100, "every acknowledged record is durable");
            for producer in [partition, partition + 2] {
                let mine: Vec<u64> = units.iter().copied().filter(|units| units / 1000 == producer).collect();
                assert_eq!(mine, (0..50).map(|index| producer * 1000 + index).collect::<Vec<_>>(), "order kept");
            }
        }
    }

    #[test]
    fn an_acknowledgement_comes_only_after_the_watermark_covers_it() {
        let storage = MemoryStorage::new();
        let writer = LogWriter::start(vec![open(&storage, 0).0], CONFIG, None, None).expect("starts");
        let watermarks = writer.watermarks();
        let (sender, receiver) = std::sync::mpsc::channel();
        for units in 1..=20 {
            let (sender, watermarks) = (sender.clone(), watermarks.clone());
            let append = Append {
                partition: 0,
                records: vec![record(units)],
                on_durable: Box::new(move |outcome| {
                    let durable = outcome.expect("durable");
                    sender.send((durable, watermarks[0].durable())).expect("send");
                }),
            };
            writer.submit(append).expect("queued");
        }
        writer.stop();
        let acknowledged: Vec<(u64, u64)> = receiver.try_iter().collect();
        assert_eq!(acknowledged.len(), 20);
        for (position, (durable, watermark)) in acknowledged.iter().enumerate() {
            assert!(*durable > position as u64, "acknowledged before its own record was durable");
            assert!(watermark >= durable);
        }
    }

    #[test]
    fn a_failed_sync_fails_the_partition_and_acknowledges_nothing_after() {
        let (healthy, broken) = (MemoryStorage::new(), MemoryStorage::new());
        let logs = vec![open(&healthy, 0).0, open(&broken, 1).0];
        broken.fail_syncs_after(0);
        let writer = LogWriter::start(logs, CONFIG, None, None).expect("starts");
        let outcomes: Outcomes = Arc::default();
        submit(&writer, 1, 1, &outcomes);
        submit(&writer, 0, 2, &outcomes);
        writer.stop();
        let outcomes = outcomes.lock().expect("lock");
        let of = |units: u64| outcomes.iter().find(|(u, _)| *u == units).map(|(_, outcome)| outcome.clone());
        assert!(matches!(of(1), Some(Err(WriteFailure { partition: 1, .. }))));
        assert_eq!(of(2), Some(Ok(1)), "other partitions carry on");
    }

    #[test]
    fn after_a_failure_later_appends_fail_without_touching_the_disk() {
        let broken = MemoryStorage::new();
        broken.fail_syncs_after(0);
        let writer = LogWriter::start(vec![open(&broken, 0).0], CONFIG, None, None).expect("starts");
        let outcomes: Outcomes = Arc::default();
        for units in 1..=5 {
            submit(&writer, 0, units, &outcomes);
        }
        writer.stop();
        let outcomes = outcomes.lock().expect("lock");
        assert_eq!(outcomes.len(), 5);
        assert!(outcomes.iter().all(|(_, outcome)| outcome.is_err()), "{outcomes:?}");
    }
}
