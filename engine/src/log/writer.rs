//! The group-commit writer: one thread that makes many actors' records
//! durable together.
//!
//! Actors hand it an [`Append`] (the records of one batch and what to do
//! once they are durable) without waiting. The thread takes everything
//! queued, appends it to the node's log, issues one write and one
//! `fdatasync` for all of it, advances the [`DurableWatermark`], and only
//! then runs the appends' callbacks, which release the answers. An append
//! with no records (a batch whose requests were all refused) is
//! acknowledged after the records queued before it, so no answer depends
//! on state that could still be lost.
//!
//! A failed write or sync fails the log for good: pending and later appends
//! are answered with [`WriteFailure`], never acknowledged.
//!
//! When enough closed log has accumulated, the writer asks the
//! [`Compactor`] for a snapshot; the compactor works on closed segments
//! only, so the writer never waits for it.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use flashstock_sync::DurableWatermark;

use crate::log::compactor::{Compactor, CompactorStats};
use crate::log::record::EncodedRecord;
#[cfg(test)]
use crate::log::record::LogRecord;
use crate::log::segments::SegmentedLog;
use crate::log::storage::DirectoryLock;

/// Runs once the append's records are durable (with the highest durable
/// sequence number) or can never be.
pub type DurableCallback = Box<dyn FnOnce(Result<u64, WriteFailure>) + Send>;

/// Records to make durable, and what to do then.
pub struct Append {
    pub records: Vec<EncodedRecord>,
    pub on_durable: DurableCallback,
}

impl std::fmt::Debug for Append {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Append").field("records", &self.records.len()).finish()
    }
}

/// The log failed; nothing is acknowledged any more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the log failed ({cause}); nothing more is acknowledged")]
pub struct WriteFailure {
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
    /// Appends taken per round (one write and one sync). Bounds the latency
    /// a round adds to the first append in it.
    pub round_appends_max: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self { round_appends_max: 4096 }
    }
}

/// Counts of what the writer did, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub rounds: std::sync::atomic::AtomicU64,
    pub syncs: std::sync::atomic::AtomicU64,
    pub records: std::sync::atomic::AtomicU64,
    /// Payload bytes of the records appended (frames add 24 bytes each).
    pub bytes: std::sync::atomic::AtomicU64,
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
    watermark: Arc<DurableWatermark>,
    stats: Arc<WriterStats>,
    compactor_stats: Option<Arc<CompactorStats>>,
}

impl LogWriter {
    /// Starts the writer over `log`, asking `compactor` (if any) for
    /// snapshots. `lock` (the data directory's) is held by the thread until
    /// it and the compactor have written their last byte, so a successor
    /// can never write beside them.
    pub fn start(
        log: SegmentedLog,
        config: WriterConfig,
        compactor: Option<Compactor>,
        lock: Option<DirectoryLock>,
    ) -> std::io::Result<Self> {
        assert!(config.round_appends_max > 0, "a round takes at least one append");
        let watermark = Arc::new(DurableWatermark::new(log.durable_sequence()));
        let stats = Arc::new(WriterStats::default());
        let (sender, receiver) = crossbeam_channel::unbounded();
        let compactor_stats = compactor.as_ref().map(|compactor| compactor.stats().clone());
        let thread = {
            let (watermark, stats) = (watermark.clone(), stats.clone());
            std::thread::Builder::new().name("log-writer".to_owned()).spawn(move || {
                run(log, &receiver, config, compactor.as_ref(), &watermark, &stats);
                if let Some(compactor) = compactor {
                    compactor.stop();
                }
                drop(lock);
            })?
        };
        Ok(Self { submitter: Some(LogSubmitter { sender }), thread: Some(thread), watermark, stats, compactor_stats })
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

    /// The highest sequence number known durable.
    pub fn watermark(&self) -> &Arc<DurableWatermark> {
        &self.watermark
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
    mut log: SegmentedLog,
    receiver: &Receiver<Message>,
    config: WriterConfig,
    compactor: Option<&Compactor>,
    watermark: &DurableWatermark,
    stats: &WriterStats,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut failed: Option<Arc<str>> = None;
    let mut round: Vec<Append> = Vec::with_capacity(config.round_appends_max);
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
        if failed.is_none() {
            failed = write_round(&mut log, &round, compactor, watermark, stats).err();
        }
        for append in round.drain(..) {
            let outcome = match &failed {
                Some(cause) => Err(WriteFailure { cause: cause.clone() }),
                None => Ok(watermark.durable()),
            };
            (append.on_durable)(outcome);
        }
    }
}

/// Appends a round's records, makes them durable with one write and one
/// sync, and advances the watermark; asks for a snapshot when one is due.
fn write_round(
    log: &mut SegmentedLog,
    round: &[Append],
    compactor: Option<&Compactor>,
    watermark: &DurableWatermark,
    stats: &WriterStats,
) -> Result<(), Arc<str>> {
    use std::sync::atomic::Ordering::Relaxed;
    let fail = |error: crate::log::segments::LogError| {
        tracing::error!(%error, "the log failed; nothing more is acknowledged");
        Arc::<str>::from(error.to_string())
    };
    let (mut records, mut bytes) = (0, 0);
    for append in round {
        for record in &append.records {
            log.append_encoded(record).map_err(fail)?;
            bytes += record.as_bytes().len() as u64;
        }
        records += append.records.len() as u64;
    }
    stats.records.fetch_add(records, Relaxed);
    stats.bytes.fetch_add(bytes, Relaxed);
    if records > 0 {
        stats.syncs.fetch_add(1, Relaxed);
    }
    let durable = log.flush().map_err(fail)?;
    watermark.advance(durable);
    if let (Some(compactor), Some(through)) = (compactor, log.snapshot_due()) {
        if compactor.request(through) {
            log.snapshot_requested();
        }
    }
    Ok(())
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

    const CONFIG: WriterConfig = WriterConfig { round_appends_max: 64 };

    fn record(units: u64) -> LogRecord {
        LogRecord::Apply {
            sku: SkuId::new("sku").expect("valid"),
            now_ms: 0,
            command: SkuCommand::Admin { operation: None, change: crate::sku::AdminChange::AddStock { units } },
        }
    }

    fn open(storage: &MemoryStorage) -> (SegmentedLog, Vec<u64>) {
        let (log, recovered) = SegmentedLog::open(
            Arc::new(storage.clone()) as Arc<dyn Storage>,
            Path::new("/data/log"),
            LogConfig::default(),
        )
        .expect("opens");
        let units = recovered
            .records
            .into_iter()
            .map(|(_, record)| match record {
                LogRecord::Apply {
                    command: SkuCommand::Admin { change: crate::sku::AdminChange::AddStock { units }, .. },
                    ..
                } => units,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        (log, units)
    }

    type Outcomes = Arc<Mutex<Vec<(u64, Result<u64, WriteFailure>)>>>;

    fn submit(writer: &LogWriter, units: u64, outcomes: &Outcomes) {
        let outcomes = outcomes.clone();
        let append = Append {
            records: vec![EncodedRecord::from(&record(units))],
            on_durable: Box::new(move |outcome| outcomes.lock().expect("lock").push((units, outcome))),
        };
        writer.submit(append).expect("queued");
    }

    #[test]
    fn concurrent_appends_are_all_acknowledged_durable_and_in_order() {
        let storage = MemoryStorage::new();
        let writer = Arc::new(LogWriter::start(open(&storage).0, CONFIG, None, None).expect("starts"));
        let outcomes: Outcomes = Arc::default();
        let producers: Vec<_> = (0..4u64)
            .map(|producer| {
                let (writer, outcomes) = (writer.clone(), outcomes.clone());
                std::thread::spawn(move || {
                    for index in 0..50 {
                        submit(&writer, producer * 1000 + index, &outcomes);
                    }
                })
            })
            .collect();
        for producer in producers {
            producer.join().expect("producer");
        }
        let rounds = writer.stats().rounds.load(std::sync::atomic::Ordering::Relaxed);
        Arc::try_unwrap(writer).expect("sole owner").stop();
        let outcomes = outcomes.lock().expect("lock");
        assert_eq!(outcomes.len(), 200);
        assert!(outcomes.iter().all(|(_, outcome)| outcome.is_ok()));
        assert!(rounds <= 200);

        storage.crash(UnsyncedFate::Lost);
        let (_, units) = open(&storage);
        assert_eq!(units.len(), 200, "every acknowledged record is durable");
        for producer in 0..4 {
            let mine: Vec<u64> = units.iter().copied().filter(|units| units / 1000 == producer).collect();
            assert_eq!(mine, (0..50).map(|index| producer * 1000 + index).collect::<Vec<_>>(), "order kept");
        }
    }

    #[test]
    fn an_acknowledgement_comes_only_after_the_watermark_covers_it() {
        let storage = MemoryStorage::new();
        let writer = LogWriter::start(open(&storage).0, CONFIG, None, None).expect("starts");
        let watermark = writer.watermark().clone();
        let (sender, receiver) = std::sync::mpsc::channel();
        for units in 1..=20 {
            let (sender, watermark) = (sender.clone(), watermark.clone());
            let append = Append {
                records: vec![EncodedRecord::from(&record(units))],
                on_durable: Box::new(move |outcome| {
                    let durable = outcome.expect("durable");
                    sender.send((durable, watermark.durable())).expect("send");
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
    fn a_failed_sync_acknowledges_nothing_then_or_after() {
        let broken = MemoryStorage::new();
        let writer = LogWriter::start(open(&broken).0, CONFIG, None, None).expect("starts");
        let outcomes: Outcomes = Arc::default();
        submit(&writer, 1, &outcomes);
        // Wait for the first to be durable before breaking the disk.
        for _ in 0..1_000 {
            if !outcomes.lock().expect("lock").is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        broken.fail_syncs_after(0);
        for units in 2..=5 {
            submit(&writer, units, &outcomes);
        }
        writer.stop();
        let outcomes = outcomes.lock().expect("lock");
        assert_eq!(outcomes.len(), 5);
        assert_eq!(outcomes[0], (1, Ok(1)));
        assert!(outcomes[1..].iter().all(|(_, outcome)| outcome.is_err()), "{outcomes:?}");
        drop(outcomes);
        broken.crash(UnsyncedFate::Lost);
        assert_eq!(open(&broken).1, vec![1]);
    }
}
