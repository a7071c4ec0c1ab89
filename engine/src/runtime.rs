//! [`Engine`]: the in-process entry point in front of the SKU actors.
//!
//! A request for a SKU goes: partition admission gate -> SKU admission gate
//! (both answer `Busy` when full) -> the SKU's wake queue -> its actor, which
//! applies it and answers through a oneshot channel. A reservation that
//! cannot be met is answered `SoldOut` from the SKU's published snapshot
//! before any of that, when the snapshot allows it.
//!
//! Orders are coordinated here: every line is held in parallel on its SKU's
//! actor; if any line fails, the held ones are aborted and the caller learns
//! which line failed and what was available. An order directory per
//! partition (of the order id) makes reserve, commit and release idempotent
//! at the order level and records each order's fate once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use flashstock_sync::{AdmissionGate, Pushed, SnapshotReading, WakeQueue};
use ractor::{Actor, ActorRef};
use tokio::sync::oneshot;

use crate::actor::{SkuActor, SkuMessage};
use crate::clock::Clock;
use crate::directory::{InterruptedOrder, OrderContent, OrderDirectory, OrderPhase, OrderPlan, OrderRecord};
use crate::ids::{BuyerId, FastMap, OperationId, OrderId, SkuId};
use crate::limits::{first_violation, InvalidLimits, Limits};
use crate::log::compactor::Compactor;
use crate::log::record::{EncodedRecord, LogRecord, OpenTransaction, TransactionLine};
use crate::log::replay::{ReplayRules, ReplayedState};
use crate::log::segments::{LogConfig, LogError, SegmentedLog, TornTail};
use crate::log::storage::Storage;
use crate::log::writer::{Append, LogSubmitter, LogWriter, WriterConfig};
use crate::order::{
    merge_lines, MergedLine, OrderError, OrderRequest, OrderStatus, Reservation, ReservedLine, Settlement,
};
use crate::partition::partition_of;
use crate::sku::{
    AdminChange, EndingImage, ReservationImage, ReserveLine, SkuAnswer, SkuCommand, SkuError, SkuOutcome, SkuSettings,
    SkuState, StockSnapshot,
};

/// Most partitions a cluster may have. Each costs a directory, a map and a
/// gate in every process; 65,536 is far more than any cluster needs.
const PARTITION_COUNT_MAX: u32 = 65_536;
/// Most requests one SKU may have in flight. The queue behind it is
/// unbounded storage, so this bound is what keeps a hot SKU's memory finite.
const IN_FLIGHT_PER_SKU_MAX: usize = 1 << 20;

/// How the engine runs; every bound has a unit and a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    pub limits: Limits,
    /// SKUs are spread over this many partitions (fixed for a cluster's life).
    pub partition_count: u32,
    /// Requests queued or being applied for one SKU. A hot SKU beyond this
    /// answers `Busy` at once instead of growing an unbounded queue; 4096 is
    /// a few milliseconds of work for one actor.
    pub in_flight_per_sku_max: usize,
    /// Requests in flight for all SKUs of one partition: bounds memory when
    /// many SKUs are hot at once.
    pub in_flight_per_partition_max: usize,
    /// Requests an actor applies per wake-up before yielding to its mailbox.
    pub batch_max: usize,
    /// An actor with no live holds that saw no request for this long stops
    /// and leaves its state parked in the partition.
    pub actor_idle_ms: u64,
    /// Orders remembered per partition for idempotent retries; the oldest
    /// settled ones are forgotten first.
    pub orders_per_partition_max: usize,
    /// What `Busy` answers suggest as a pause before retrying.
    pub busy_retry_after_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            partition_count: 64,
            in_flight_per_sku_max: 4_096,
            in_flight_per_partition_max: 16_384,
            batch_max: 256,
            actor_idle_ms: 30_000,
            orders_per_partition_max: 1_000_000,
            busy_retry_after_ms: 5,
        }
    }
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), InvalidLimits> {
        self.limits.validate()?;
        let checks = [
            (
                self.partition_count == 0 || self.partition_count > PARTITION_COUNT_MAX,
                "partition_count",
                "must be between 1 and 65536",
            ),
            (
                self.in_flight_per_sku_max == 0 || self.in_flight_per_sku_max > IN_FLIGHT_PER_SKU_MAX,
                "in_flight_per_sku_max",
                "must be between 1 and 1048576",
            ),
            (
                self.in_flight_per_partition_max < self.in_flight_per_sku_max,
                "in_flight_per_partition_max",
                "must be at least in_flight_per_sku_max",
            ),
            (
                self.batch_max == 0 || self.batch_max > self.in_flight_per_sku_max,
                "batch_max",
                "must be between 1 and in_flight_per_sku_max (a batch never holds more)",
            ),
            (self.orders_per_partition_max == 0, "orders_per_partition_max", "must be at least 1"),
        ];
        first_violation(checks)
    }
}

/// Why a SKU-level request (admin or query) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("no SKU {sku}")]
    UnknownSku { sku: SkuId },
    #[error("SKU {sku} already exists")]
    SkuExists { sku: SkuId },
    #[error("SKU {sku}: {error}")]
    Refused { sku: SkuId, error: SkuError, stock: StockSnapshot },
    #[error("busy: retry after {retry_after_ms} ms")]
    Busy { retry_after_ms: u64 },
    #[error("the SKU's owner stopped before answering; retry")]
    Unavailable,
}

impl EngineError {
    fn into_order_error(self, index: usize) -> OrderError {
        match self {
            EngineError::UnknownSku { sku } => OrderError::UnknownSku { index, sku },
            EngineError::Busy { retry_after_ms } => OrderError::Busy { retry_after_ms },
            EngineError::Refused { sku, error, stock } => OrderError::Line { index, sku, error, stock },
            EngineError::SkuExists { .. } | EngineError::Unavailable => OrderError::Unavailable,
        }
    }
}

/// A request travelling to a SKU actor. It holds one place in the SKU's and
/// the partition's admission gates, which the actor gives back (for a whole
/// batch at once) after answering.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) command: SkuCommand,
    reply: oneshot::Sender<SkuAnswer>,
}

impl Request {
    /// Sends the answer; the caller then calls [`SkuSlot::admitted_done`].
    pub(crate) fn answer(self, answer: SkuAnswer) {
        // The caller may have given up waiting; the answer then has no reader.
        let _ = self.reply.send(answer);
    }
}

/// Everything about one SKU that outlives its actor.
#[derive(Debug)]
pub(crate) struct SkuSlot {
    pub(crate) sku: SkuId,
    /// Where the actor sends its records; `None` for an in-memory engine.
    pub(crate) log: Option<LogSubmitter>,
    /// Set once the log failed: memory may be ahead of the log,
    /// so the partition answers nothing more.
    pub(crate) log_failed: Arc<AtomicBool>,
    pub(crate) config: Arc<EngineConfig>,
    pub(crate) clock: Arc<dyn Clock>,
    gate: AdmissionGate,
    partition_gate: Arc<AdmissionGate>,
    snapshot: flashstock_sync::StockSnapshotCell,
    pub(crate) queue: WakeQueue<Request>,
    /// The state while no actor runs.
    parked: Mutex<Option<SkuState>>,
    /// The running actor, or the last one (only woken while it runs).
    actor: Mutex<Option<ActorRef<SkuMessage>>>,
}

fn reading_of(state: &SkuState) -> SnapshotReading {
    SnapshotReading { stock: state.stock(), next_expiry_ms: state.next_expiry_ms().unwrap_or(u64::MAX) }
}

impl SkuSlot {
    pub(crate) fn publish(&self, state: &SkuState) {
        self.snapshot.publish(reading_of(state));
    }

    /// Gives back the admission places of `count` answered requests.
    pub(crate) fn admitted_done(&self, count: usize) {
        self.gate.release_many(count);
        self.partition_gate.release_many(count);
    }

    pub(crate) fn store_parked(&self, state: SkuState) {
        let previous = lock(&self.parked).replace(state);
        assert!(previous.is_none(), "two parked states for one SKU");
    }

    pub(crate) fn take_parked(&self) -> SkuState {
        lock(&self.parked).take().expect("a parked SKU has its state in the slot")
    }

    pub(crate) fn set_actor(&self, actor: ActorRef<SkuMessage>) {
        *lock(&self.actor) = Some(actor);
    }

    fn wake(&self) {
        let actor = lock(&self.actor).clone().expect("a woken SKU has an actor");
        if actor.cast(SkuMessage::Drain).is_err() {
            // Only a crashed actor refuses messages; the node stops on
            // panics, so this is unreachable outside tests that kill actors.
            tracing::error!(sku = %self.sku, "SKU actor is gone; its queued requests fail");
        }
    }
}

/// Locks a mutex whose holder cannot leave it half-updated (every critical
/// section here is a few assignments), so poisoning carries no information.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug)]
struct Partition {
    gate: Arc<AdmissionGate>,
    skus: RwLock<FastMap<SkuId, Arc<SkuSlot>>>,
    orders: Mutex<OrderDirectory>,
}

#[derive(Debug)]
struct Inner {
    config: Arc<EngineConfig>,
    /// Set once the log failed: every partition then answers
    /// `Unavailable`, since memory may be ahead of the log.
    log_failed: Arc<AtomicBool>,
    clock: Arc<dyn Clock>,
    partitions: Box<[Partition]>,
    log: Option<LogSubmitter>,
    /// The writer thread's handle, taken by [`Engine::shutdown`] (the thread
    /// itself holds the data directory's lock until it is done).
    writer: Mutex<Option<LogWriter>>,
    /// Transactions recovery left open for lines on other members.
    recovered_transactions: Mutex<Vec<(OrderId, OpenTransaction)>>,
}

/// Where and how a durable engine keeps its log.
#[derive(Debug, Clone)]
pub struct Durability {
    pub storage: Arc<dyn Storage>,
    /// The log (segments and snapshots) lives in `log/` below; the
    /// directory itself is locked against a second process.
    pub data_directory: PathBuf,
    pub log: LogConfig,
    pub writer: WriterConfig,
}

/// Counts summed over many SKUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StockTotals {
    pub skus: u64,
    pub available: u64,
    pub held: u64,
    pub sold: u64,
}

/// Counts of what a durable engine's log has done since it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// `fdatasync` calls on log segments.
    pub syncs: u64,
    pub records: u64,
    /// Record payload bytes appended.
    pub bytes: u64,
    pub snapshots: u64,
    /// Log segments removed because a snapshot covers them.
    pub segments_removed: u64,
    /// Snapshots that failed (the log kept every record).
    pub snapshot_failures: u64,
    /// When the last snapshot was written, in milliseconds since the Unix
    /// epoch, if one was since the engine opened.
    pub last_snapshot_unix_ms: Option<u64>,
}

/// What opening a durable engine found.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    pub skus: usize,
    /// Orders rebuilt from the SKUs' reservations.
    pub orders: usize,
    /// Records replayed after the snapshot.
    pub records: usize,
    /// Whether recovery began from a snapshot.
    pub from_snapshot: bool,
    /// A torn last write that was cut off.
    pub torn_tail: Option<TornTail>,
    /// Transactions the log left open, finished on this engine's lines
    /// (the rest: [`Engine::take_recovered_transactions`]).
    pub transactions: usize,
}

/// Why a durable engine could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] InvalidLimits),
    #[error("cannot lock the data directory: {0}")]
    Locked(#[source] std::io::Error),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("log record {sequence}: {reason}")]
    Replay { sequence: u64, reason: String },
    #[error("starting the log threads: {0}")]
    Writer(#[source] std::io::Error),
}

/// The inventory engine of one process. Cheap to clone; all clones share
/// the same SKUs. Must be used inside a tokio runtime (actors run on it).
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// A line whose command is with its SKU's actor: its position in the order's
/// plan and the channel its answer arrives on.
type PendingLine = (usize, oneshot::Receiver<SkuAnswer>);

impl Engine {
    /// An engine that keeps everything in memory (nothing survives the
    /// process).
    pub fn new(config: EngineConfig, clock: Arc<dyn Clock>) -> Result<Self, InvalidLimits> {
        config.validate()?;
        Ok(Self::build(config, clock, None))
    }

    fn build(config: EngineConfig, clock: Arc<dyn Clock>, writer: Option<LogWriter>) -> Self {
        let partitions = (0..config.partition_count)
            .map(|_| Partition {
                gate: Arc::new(AdmissionGate::new(config.in_flight_per_partition_max)),
                skus: RwLock::new(FastMap::default()),
                orders: Mutex::new(OrderDirectory::default()),
            })
            .collect();
        let log = writer.as_ref().map(LogWriter::submitter);
        let log_failed = Arc::new(AtomicBool::new(false));
        let inner = Inner {
            config: Arc::new(config),
            log_failed,
            clock,
            partitions,
            log,
            writer: Mutex::new(writer),
            recovered_transactions: Mutex::new(Vec::new()),
        };
        Self { inner: Arc::new(inner) }
    }

    /// A durable engine: opens the node's log under the data directory
    /// (one log for every partition), replays it under the limits it
    /// records, logs today's limits if they differ, and from then on answers a command only once
    /// its record is durable.
    pub fn open(
        config: EngineConfig,
        clock: Arc<dyn Clock>,
        durability: Durability,
    ) -> Result<(Self, RecoveryReport), OpenError> {
        config.validate()?;
        first_violation([
            (durability.writer.round_appends_max == 0, "round_appends_max", "must be at least 1"),
            (durability.log.segment_bytes_max == 0, "segment_bytes_max", "must be at least 1"),
            (
                durability.log.snapshot_log_bytes < durability.log.segment_bytes_max,
                "snapshot_log_bytes",
                "must be at least segment_bytes_max (snapshots cover whole closed segments)",
            ),
        ])?;
        let directory_lock = durability.storage.lock_dir(&durability.data_directory).map_err(OpenError::Locked)?;
        let directory = durability.data_directory.join("log");
        let (log, recovered) = SegmentedLog::open(durability.storage.clone(), &directory, durability.log)?;
        let rules = ReplayRules { partition_count: config.partition_count, limits_unrecorded: config.limits.clone() };
        let (records, from_snapshot) = (recovered.records.len(), recovered.snapshot.is_some());
        let mut state = match recovered.snapshot {
            Some(snapshot) => {
                let sequence = snapshot.last_sequence;
                ReplayedState::from_snapshot(rules.clone(), snapshot)
                    .map_err(|reason| OpenError::Replay { sequence, reason })?
            }
            None => ReplayedState::empty(rules.clone()),
        };
        for (sequence, record) in recovered.records {
            state.apply(sequence, record).map_err(|reason| OpenError::Replay { sequence, reason })?;
        }
        let transactions_open = state.transactions.len();
        // Open transactions are finished under the limits they began with;
        // today's limits apply from the first new command on.
        let (mut finishing, elsewhere) = state.finish_transactions(clock.now_ms());
        if state.limits_recorded() != Some(&config.limits) {
            if let Some(earlier) = state.limits_recorded() {
                tracing::info!(?earlier, now = ?config.limits, "the configured limits changed; they apply to new commands");
            }
            state.put_in_force(config.limits.clone());
            finishing.push(LogRecord::RulesInForce { limits: config.limits.clone() });
        }
        // One request waiting is enough: a later one covers everything an
        // earlier one would have.
        let compactor = Compactor::start(durability.storage.clone(), directory, rules, 1).map_err(OpenError::Writer)?;
        let writer = LogWriter::start(log, durability.writer, Some(compactor), Some(directory_lock))
            .map_err(OpenError::Writer)?;
        // What finishing the open transactions did is durable before the
        // first request is served.
        if !finishing.is_empty() {
            let (sender, receiver) = std::sync::mpsc::channel();
            let append = Append {
                records: finishing.iter().map(EncodedRecord::from).collect(),
                on_durable: Box::new(move |outcome| {
                    let _ = sender.send(outcome.map_err(|failure| failure.cause.to_string()));
                }),
            };
            writer.submit(append).map_err(|_| OpenError::Writer(std::io::Error::other("the log writer stopped")))?;
            let outcome = receiver.recv().unwrap_or_else(|_| Err("the log writer stopped".to_owned()));
            outcome.map_err(|cause| OpenError::Writer(std::io::Error::other(cause)))?;
        }
        let engine = Self::build(config, clock, Some(writer));
        *lock(&engine.inner.recovered_transactions) = elsewhere;
        let mut report = RecoveryReport {
            skus: state.skus.len(),
            orders: 0,
            records,
            from_snapshot,
            torn_tail: recovered.torn_tail,
            transactions: transactions_open,
        };
        for (sku, sku_state) in state.skus {
            engine.insert_slot(sku, sku_state);
        }
        report.orders = engine.rebuild_directories();
        Ok((engine, report))
    }

    /// Rebuilds every partition's order directory from the reservations the
    /// recovered SKUs hold: the SKUs' logs are the only truth, and an order
    /// is exactly its lines' reservations. Returns how many orders.
    ///
    /// An order whose lines ended differently (a multi-line settle cut off
    /// by the crash: some lines committed or released, others still held)
    /// is rebuilt as held, so that the client's retried commit or release
    /// finishes it (settling is idempotent per line).
    fn rebuild_directories(&self) -> usize {
        let mut orders: BTreeMap<OrderId, Vec<(Arc<SkuSlot>, ReservationImage)>> = BTreeMap::new();
        for partition in self.inner.partitions.iter() {
            let skus = partition.skus.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            for slot in skus.values() {
                let image = lock(&slot.parked).as_ref().expect("no actor runs while recovering").image();
                for reservation in image.reservations {
                    orders.entry(reservation.line.order.clone()).or_default().push((slot.clone(), reservation));
                }
            }
        }
        let now_ms = self.inner.clock.now_ms();
        let count = orders.len();
        // Rebuilding is never refused: every order here was remembered
        // before the restart (under the same bound, or a since lowered one).
        let unbounded = EngineConfig { orders_per_partition_max: usize::MAX, ..(*self.inner.config).clone() };
        for (order, mut lines) in orders {
            lines.sort_by(|a, b| a.0.sku.cmp(&b.0.sku));
            let first = &lines[0].1.line;
            let (buyer, ttl_ms) = (first.buyer.clone(), first.ttl_ms);
            let merged: Vec<MergedLine> = lines
                .iter()
                .enumerate()
                .map(|(index, (slot, reservation))| MergedLine {
                    index,
                    sku: slot.sku.clone(),
                    quantity: reservation.line.quantity,
                })
                .collect();
            let stock_of =
                |slot: &SkuSlot| slot.snapshot.read().map_or_else(StockSnapshot::default, |reading| reading.stock);
            let reservation = Reservation {
                order: order.clone(),
                expires_at_ms: lines.iter().map(|(_, reservation)| reservation.expires_at_ms).min().unwrap_or(0),
                lines: lines
                    .iter()
                    .map(|(slot, reservation)| ReservedLine {
                        sku: slot.sku.clone(),
                        units: reservation.units,
                        stock: stock_of(slot),
                    })
                    .collect(),
            };
            let ended = |wanted: fn(&EndingImage) -> bool| {
                lines.iter().filter(|(_, r)| r.ending.as_ref().is_some_and(wanted)).count()
            };
            let committed = ended(|ending| matches!(ending, EndingImage::Committed { .. }));
            let released = ended(|ending| matches!(ending, EndingImage::Released));
            let live = lines.iter().filter(|(_, reservation)| reservation.ending.is_none()).count();
            let prepared = lines.iter().any(|(_, reservation)| reservation.prepared);
            let (phase, settled_units): (OrderPhase, Option<Vec<u32>>) = if prepared {
                // Prepared for a coordinator elsewhere (this engine's own
                // transactions were finished before this rebuild).
                (OrderPhase::Prepared, None)
            } else if live > 0 {
                (OrderPhase::Held, None)
            } else if committed > 0 {
                let units = lines
                    .iter()
                    .map(|(_, reservation)| match reservation.ending {
                        Some(EndingImage::Committed { units, .. }) => units,
                        _ => 0,
                    })
                    .collect();
                (OrderPhase::Committed, Some(units))
            } else if released > 0 {
                (OrderPhase::Released, Some(lines.iter().map(|(_, reservation)| reservation.units).collect()))
            } else {
                (OrderPhase::Expired, None)
            };
            if live > 0 && live < lines.len() {
                tracing::warn!(%order, "an order's settle was cut off by the crash; a retried commit or release finishes it");
            }
            let settlement = settled_units.map(|units| Settlement {
                order: order.clone(),
                lines: lines
                    .iter()
                    .zip(units)
                    .map(|((slot, _), units)| ReservedLine { sku: slot.sku.clone(), units, stock: stock_of(slot) })
                    .collect(),
                replayed: false,
            });
            let slots = lines.into_iter().map(|(slot, _)| slot).collect();
            let directory = &self.order_partition(&order).orders;
            let mut directory = lock(directory);
            let record = |arrival| OrderRecord {
                content: OrderContent::of(&buyer, ttl_ms, &merged),
                arrival,
                plan: Arc::new(OrderPlan { lines: merged, slots }),
                phase,
                reservation: Some(reservation),
                settlement,
            };
            directory.admit(now_ms, &order, &unbounded, record).expect("an unbounded directory admits every order");
        }
        count
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    fn partition(&self, sku: &SkuId) -> &Partition {
        &self.inner.partitions[partition_of(sku, self.inner.config.partition_count) as usize]
    }

    fn order_partition(&self, order: &OrderId) -> &Partition {
        let hash = crate::partition::stable_hash(order.as_str().as_bytes());
        &self.inner.partitions[(hash % u64::from(self.inner.config.partition_count)) as usize]
    }

    /// The directory of the partition that owns `order`.
    pub(crate) fn order_directory(&self, order: &OrderId) -> &Mutex<OrderDirectory> {
        &self.order_partition(order).orders
    }

    pub(crate) fn recovered_transactions(&self) -> &Mutex<Vec<(OrderId, OpenTransaction)>> {
        &self.inner.recovered_transactions
    }

    /// Whether this engine holds `sku`.
    pub fn has_sku(&self, sku: &SkuId) -> bool {
        self.slot(sku).is_ok()
    }

    fn slot(&self, sku: &SkuId) -> Result<Arc<SkuSlot>, EngineError> {
        let skus = self.partition(sku).skus.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        skus.get(sku).cloned().ok_or_else(|| EngineError::UnknownSku { sku: sku.clone() })
    }

    /// Creates a SKU. No actor starts until the first request for it. A
    /// durable engine answers once the creation is in the log. A retry of
    /// the same `operation` (same settings) answers with the SKU's counts;
    /// any other creation of an existing SKU is `SkuExists`.
    pub async fn create_sku(
        &self,
        sku: SkuId,
        settings: SkuSettings,
        operation: OperationId,
    ) -> Result<StockSnapshot, EngineError> {
        if self.has_sku(&sku) {
            return self.recreate(sku, settings, operation).await;
        }
        let now_ms = self.inner.clock.now_ms();
        let state = SkuState::created(now_ms, settings, self.inner.config.limits.clone(), Some(operation.clone()))
            .map_err(|error| EngineError::Refused { sku: sku.clone(), error, stock: StockSnapshot::default() })?;
        let stock = state.stock();
        let partition_index = partition_of(&sku, self.inner.config.partition_count);
        let partition = &self.inner.partitions[partition_index as usize];
        if self.inner.log_failed.load(Ordering::Acquire) {
            return Err(EngineError::Unavailable);
        }
        let durable = {
            let mut skus = partition.skus.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            if skus.contains_key(&sku) {
                // Created by a call that raced this one.
                None
            } else {
                // Submitted before the SKU is visible, so the creation
                // precedes every record of a command on it in the log.
                let record =
                    LogRecord::CreateSku { sku: sku.clone(), settings, now_ms, operation: Some(operation.clone()) };
                let durable = self.submit_record(&record)?;
                skus.insert(sku.clone(), self.new_slot(sku.clone(), partition_index, state));
                Some(durable)
            }
        };
        let Some(durable) = durable else { return self.recreate(sku, settings, operation).await };
        if let Some(receiver) = durable {
            if !receiver.await.unwrap_or(false) {
                return Err(EngineError::Unavailable);
            }
        }
        Ok(stock)
    }

    /// A creation of a SKU that exists: the SKU answers whether `operation`
    /// is the one that created it (a retry) or another.
    async fn recreate(
        &self,
        sku: SkuId,
        settings: SkuSettings,
        operation: OperationId,
    ) -> Result<StockSnapshot, EngineError> {
        match self.change(&sku, operation, AdminChange::Create { settings }).await {
            Err(EngineError::Refused { error: SkuError::AlreadyCreated | SkuError::IdempotencyConflict, .. }) => {
                Err(EngineError::SkuExists { sku })
            }
            other => other,
        }
    }

    /// Queues a record of the engine's own (not a SKU command's) behind
    /// everything already queued; the receiver says whether it became
    /// durable. `None` for an in-memory engine.
    pub(crate) fn submit_record(&self, record: &LogRecord) -> Result<Option<oneshot::Receiver<bool>>, EngineError> {
        let Some(log) = &self.inner.log else { return Ok(None) };
        if self.inner.log_failed.load(Ordering::Acquire) {
            return Err(EngineError::Unavailable);
        }
        let (sender, receiver) = oneshot::channel();
        let failed = self.inner.log_failed.clone();
        let append = Append {
            records: vec![EncodedRecord::from(record)],
            on_durable: Box::new(move |outcome| {
                if outcome.is_err() {
                    failed.store(true, Ordering::Release);
                }
                let _ = sender.send(outcome.is_ok());
            }),
        };
        if log.submit(append).is_err() {
            self.inner.log_failed.store(true, Ordering::Release);
            return Err(EngineError::Unavailable);
        }
        Ok(Some(receiver))
    }

    fn new_slot(&self, sku: SkuId, partition_index: u32, state: SkuState) -> Arc<SkuSlot> {
        let partition = &self.inner.partitions[partition_index as usize];
        Arc::new(SkuSlot {
            sku,
            log: self.inner.log.clone(),
            log_failed: self.inner.log_failed.clone(),
            config: self.inner.config.clone(),
            clock: self.inner.clock.clone(),
            gate: AdmissionGate::new(self.inner.config.in_flight_per_sku_max),
            partition_gate: partition.gate.clone(),
            snapshot: flashstock_sync::StockSnapshotCell::new(reading_of(&state)),
            queue: WakeQueue::new_parked(),
            parked: Mutex::new(Some(state)),
            actor: Mutex::new(None),
        })
    }

    /// Adds a recovered SKU (no log record: it came from the log).
    fn insert_slot(&self, sku: SkuId, state: SkuState) {
        let partition_index = partition_of(&sku, self.inner.config.partition_count);
        let slot = self.new_slot(sku.clone(), partition_index, state);
        let partition = &self.inner.partitions[partition_index as usize];
        partition.skus.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(sku, slot);
    }

    /// Admits `command` for `sku` and hands it to the SKU's actor (starting
    /// one if none runs). The answer arrives on the returned channel.
    fn enqueue(&self, slot: &Arc<SkuSlot>, command: SkuCommand) -> Result<oneshot::Receiver<SkuAnswer>, EngineError> {
        if slot.log_failed.load(Ordering::Acquire) {
            return Err(EngineError::Unavailable);
        }
        let busy = EngineError::Busy { retry_after_ms: self.inner.config.busy_retry_after_ms };
        if !slot.partition_gate.try_acquire() {
            return Err(busy);
        }
        if !slot.gate.try_acquire() {
            slot.partition_gate.release();
            return Err(busy);
        }
        let (reply, answer) = oneshot::channel();
        let request = Request { command, reply };
        match slot.queue.push(request) {
            Pushed::ConsumerBusy => {}
            Pushed::WakeConsumer => slot.wake(),
            Pushed::StartConsumer => {
                // Started on its own task, so that a caller who stops waiting
                // (a dropped future) cannot drop the SKU's state with it.
                let (slot, state) = (slot.clone(), slot.take_parked());
                tokio::spawn(async move {
                    // Spawning only fails on a duplicate actor name; ours are unnamed.
                    Actor::spawn(None, SkuActor, (slot, state)).await.expect("spawning an unnamed actor cannot fail");
                });
            }
        }
        Ok(answer)
    }

    async fn execute(&self, sku: &SkuId, command: SkuCommand) -> Result<SkuAnswer, EngineError> {
        let slot = self.slot(sku)?;
        self.enqueue(&slot, command)?.await.map_err(|_| EngineError::Unavailable)
    }

    async fn admin(&self, sku: &SkuId, command: SkuCommand) -> Result<StockSnapshot, EngineError> {
        let answer = self.execute(sku, command).await?;
        match answer.result {
            Ok(_) => Ok(answer.stock),
            Err(error) => Err(EngineError::Refused { sku: sku.clone(), error, stock: answer.stock }),
        }
    }

    /// Applies an admin change to `sku` exactly once per `operation`: a
    /// retry of the same operation answers with the counts and changes
    /// nothing; the same operation id with another change is refused
    /// (`IdempotencyConflict`). Operations are remembered like ended
    /// reservations (`idempotency_window_ms`, `finished_per_sku_max`).
    pub async fn change(
        &self,
        sku: &SkuId,
        operation: OperationId,
        change: AdminChange,
    ) -> Result<StockSnapshot, EngineError> {
        self.admin(sku, SkuCommand::Admin { operation: Some(operation), change }).await
    }

    pub async fn add_stock(
        &self,
        sku: &SkuId,
        units: u64,
        operation: OperationId,
    ) -> Result<StockSnapshot, EngineError> {
        self.change(sku, operation, AdminChange::AddStock { units }).await
    }

    pub async fn remove_stock(
        &self,
        sku: &SkuId,
        units: u64,
        operation: OperationId,
    ) -> Result<StockSnapshot, EngineError> {
        self.change(sku, operation, AdminChange::RemoveStock { units }).await
    }

    pub async fn set_buyer_limit(
        &self,
        sku: &SkuId,
        units_per_buyer_max: Option<u32>,
        operation: OperationId,
    ) -> Result<StockSnapshot, EngineError> {
        self.change(sku, operation, AdminChange::SetBuyerLimit { units_per_buyer_max }).await
    }

    pub async fn open_sale(
        &self,
        sku: &SkuId,
        opens_at_ms: u64,
        operation: OperationId,
    ) -> Result<StockSnapshot, EngineError> {
        self.change(sku, operation, AdminChange::OpenSale { opens_at_ms }).await
    }

    /// The SKU's counts, from its published snapshot: no trip to the actor
    /// unless the snapshot is being rewritten at this instant, or a hold in
    /// it has expired since it was published (a SKU nobody asked since its
    /// holds' time came, or one recovered with live holds), so that
    /// expired holds are never counted as held. After a log failure
    /// nothing is answered: the published counts may not survive.
    pub async fn availability(&self, sku: &SkuId) -> Result<StockSnapshot, EngineError> {
        let slot = self.slot(sku)?;
        if self.inner.log_failed.load(Ordering::Acquire) {
            return Err(EngineError::Unavailable);
        }
        match slot.snapshot.read() {
            Some(reading) if self.inner.clock.now_ms() < reading.next_expiry_ms => Ok(reading.stock),
            _ => self.availability_now(sku).await,
        }
    }

    /// Where `order` stands; `None` if the engine does not know it (never
    /// reserved, refused, or forgotten after its idempotency window).
    pub fn order_status(&self, order: &OrderId) -> Option<OrderStatus> {
        let orders = lock(&self.order_partition(order).orders);
        let record = orders.records.get(order)?;
        let expired_at_ms = record.reservation.as_ref().map_or(0, |reservation| reservation.expires_at_ms);
        Some(match record.phase {
            // Prepared: waiting for a coordinator elsewhere to decide.
            OrderPhase::Reserving | OrderPhase::Settling | OrderPhase::Prepared => OrderStatus::InProgress,
            // The directory learns of an expiry only when someone settles;
            // the clock says it already.
            OrderPhase::Held if self.inner.clock.now_ms() >= expired_at_ms => OrderStatus::Expired { expired_at_ms },
            OrderPhase::Held => {
                OrderStatus::Held(record.reservation.clone().expect("a held order has its reservation"))
            }
            OrderPhase::Committed => {
                OrderStatus::Committed(record.settlement.clone().expect("a settled order has its settlement"))
            }
            OrderPhase::Released => {
                OrderStatus::Released(record.settlement.clone().expect("a settled order has its settlement"))
            }
            OrderPhase::Expired => OrderStatus::Expired { expired_at_ms },
        })
    }

    /// The SKU's counts from its owner, after ending the holds whose time
    /// has come: exact, at the cost of a trip through the actor.
    pub async fn availability_now(&self, sku: &SkuId) -> Result<StockSnapshot, EngineError> {
        self.admin(sku, SkuCommand::Query).await
    }

    /// The counts of every SKU in the partitions `owned` says, summed, as
    /// the actors last published them (a read of each SKU's snapshot; no
    /// actor is woken). For status pages: a SKU being written at this
    /// instant is counted as of its previous publish.
    pub fn totals(&self, owned: impl Fn(u32) -> bool) -> StockTotals {
        let mut totals = StockTotals::default();
        for (index, partition) in self.partition_totals().into_iter().enumerate() {
            if owned(index as u32) {
                totals.skus += partition.skus;
                totals.available += partition.available;
                totals.held += partition.held;
                totals.sold += partition.sold;
            }
        }
        totals
    }

    /// Every partition's counts (by partition number), summed as the actors
    /// last published them.
    pub fn partition_totals(&self) -> Vec<StockTotals> {
        self.inner
            .partitions
            .iter()
            .map(|partition| {
                let mut totals = StockTotals::default();
                let skus = partition.skus.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                for slot in skus.values() {
                    totals.skus += 1;
                    if let Some(reading) = slot.snapshot.read() {
                        totals.available += reading.stock.available;
                        totals.held += reading.stock.held;
                        totals.sold += reading.stock.sold;
                    }
                }
                totals
            })
            .collect()
    }

    /// The `count` SKUs with the most units held plus sold in the partitions
    /// `owned` says, busiest first (ties by id), as last published.
    pub fn hottest_skus(&self, count: usize, owned: impl Fn(u32) -> bool) -> Vec<(SkuId, StockSnapshot)> {
        let mut all = Vec::new();
        for (index, partition) in self.inner.partitions.iter().enumerate() {
            if !owned(index as u32) {
                continue;
            }
            let skus = partition.skus.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            all.extend(skus.values().filter_map(|slot| Some((slot.sku.clone(), slot.snapshot.read()?.stock))));
        }
        all.sort_by(|(a, a_stock), (b, b_stock)| {
            (b_stock.held + b_stock.sold).cmp(&(a_stock.held + a_stock.sold)).then_with(|| a.cmp(b))
        });
        all.truncate(count);
        all
    }

    /// How many SKU actors are running now (the rest are passivated).
    pub fn active_actor_count(&self) -> usize {
        self.inner
            .partitions
            .iter()
            .map(|partition| {
                let skus = partition.skus.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                skus.values().filter(|slot| !slot.queue.is_parked()).count()
            })
            .sum()
    }

    /// The `SoldOut` answer for `line` if the SKU's published snapshot proves
    /// it; `None` means "ask the actor". See `StockSnapshotCell` for what
    /// the snapshot promises.
    fn sold_out_from_hint(slot: &SkuSlot, line: &MergedLine, now_ms: u64) -> Option<OrderError> {
        // After a log failure the published counts may be ahead of what
        // survives; the actor path answers `Unavailable` instead.
        if slot.log_failed.load(Ordering::Acquire) {
            return None;
        }
        let reading = slot.snapshot.read()?;
        let short = reading.stock.available < u64::from(line.quantity.minimum());
        (short && now_ms < reading.next_expiry_ms).then(|| OrderError::Line {
            index: line.index,
            sku: line.sku.clone(),
            error: SkuError::SoldOut { available: reading.stock.available },
            stock: reading.stock,
        })
    }

    /// Holds every line of `request`, or none.
    ///
    /// Idempotent on the order id: a retry with the same content returns the
    /// same reservation (even after it was committed or released); different
    /// content is `IdempotencyConflict`. A refused order leaves no trace, so
    /// it may be retried with the same id.
    pub async fn reserve(&self, request: OrderRequest) -> Result<Reservation, OrderError> {
        let config = &self.inner.config;
        let lines = merge_lines(&request, &config.limits)?;
        let slots = lines
            .iter()
            .map(|line| self.slot(&line.sku).map_err(|error| error.into_order_error(line.index)))
            .collect::<Result<Vec<_>, _>>()?;
        let directory = &self.order_partition(&request.order).orders;
        let now_ms = self.inner.clock.now_ms();
        // Nothing is cloned before the sold-out check: most requests in a
        // flash sale end there.
        let (order, buyer, ttl_ms, plan, arrival) = {
            let mut orders = lock(directory);
            // What is past its window is forgotten before the id is looked
            // up: a reused id after the window is a new order.
            orders.forget_old(now_ms, config);
            // A retry is answered from the directory, before the hint: a
            // held order stays held even once its SKU has sold out.
            if let Some(answer) = Self::replay_reserve(&orders, &request, &lines) {
                return answer;
            }
            for (line, slot) in lines.iter().zip(&slots) {
                if let Some(sold_out) = Self::sold_out_from_hint(slot, line, now_ms) {
                    return Err(sold_out);
                }
            }
            let (order, buyer, ttl_ms) = (request.order.clone(), request.buyer.clone(), request.ttl_ms);
            let content = OrderContent::of(&request.buyer, request.ttl_ms, &lines);
            let plan = Arc::new(OrderPlan { lines, slots });
            let record = |arrival| OrderRecord {
                content,
                arrival,
                plan: plan.clone(),
                phase: OrderPhase::Reserving,
                reservation: None,
                settlement: None,
            };
            let arrival = orders.admit(now_ms, &order, config, record)?;
            (order, buyer, ttl_ms, plan, arrival)
        };
        let interrupted =
            InterruptedOrder { directory, order: &order, arrival, resting: OrderPhase::Held, finished: false };
        let outcome = self.hold_all(&order, &buyer, ttl_ms, &plan).await;
        interrupted.finish();
        let mut orders = lock(directory);
        let record = orders.records.get_mut(&order).expect("a reserving order stays in the directory");
        match &outcome {
            Ok(reservation) => {
                record.phase = OrderPhase::Held;
                record.reservation = Some(reservation.clone());
            }
            Err(_) => orders.remove(&order),
        }
        outcome
    }

    fn replay_reserve(
        orders: &OrderDirectory,
        request: &OrderRequest,
        merged: &[MergedLine],
    ) -> Option<Result<Reservation, OrderError>> {
        let record = orders.records.get(&request.order)?;
        if !record.content.matches(&request.buyer, request.ttl_ms, merged) {
            return Some(Err(OrderError::IdempotencyConflict));
        }
        Some(match &record.reservation {
            Some(reservation) => Ok(reservation.clone()),
            // The same request is being served right now.
            None => Err(OrderError::Busy { retry_after_ms: 1 }),
        })
    }

    /// Places a hold on every line in parallel; on any failure aborts the
    /// holds that were placed and reports the first failing line.
    async fn hold_all(
        &self,
        order: &OrderId,
        buyer: &BuyerId,
        ttl_ms: u64,
        plan: &OrderPlan,
    ) -> Result<Reservation, OrderError> {
        let mut pending: Vec<PendingLine> = Vec::with_capacity(plan.lines.len());
        let mut failure: Option<OrderError> = None;
        for (position, (line, slot)) in plan.lines.iter().zip(&plan.slots).enumerate() {
            let command = SkuCommand::Reserve(ReserveLine {
                order: order.clone(),
                buyer: buyer.clone(),
                quantity: line.quantity,
                ttl_ms,
            });
            match self.enqueue(slot, command) {
                Ok(answer) => pending.push((position, answer)),
                Err(error) => {
                    failure = Some(error.into_order_error(line.index));
                    break;
                }
            }
        }
        let mut held = Vec::with_capacity(pending.len());
        let mut held_slots = Vec::with_capacity(pending.len());
        let mut expires_at_ms = u64::MAX;
        for (position, answer) in pending {
            let (index, slot) = (plan.lines[position].index, &plan.slots[position]);
            match answer.await {
                Ok(SkuAnswer {
                    result: Ok(SkuOutcome::Reserved { units, expires_at_ms: line_expiry_ms, .. }),
                    stock,
                }) => {
                    expires_at_ms = expires_at_ms.min(line_expiry_ms);
                    held.push(ReservedLine { sku: slot.sku.clone(), units, stock });
                    held_slots.push(slot);
                }
                Ok(SkuAnswer { result: Err(error), stock }) => {
                    failure.get_or_insert(OrderError::Line { index, sku: slot.sku.clone(), error, stock });
                }
                Ok(SkuAnswer { result: Ok(other), .. }) => {
                    unreachable!("a reserve answered {other:?}")
                }
                Err(_) => {
                    failure.get_or_insert(OrderError::Unavailable);
                }
            }
        }
        let Some(failure) = failure else {
            return Ok(Reservation { order: order.clone(), expires_at_ms, lines: held });
        };
        for slot in held_slots {
            self.abort_line(order, slot).await;
        }
        Err(failure)
    }

    /// Enqueues a command that must not be dropped for want of admission
    /// (part of a decided settlement or an abort), waiting out `Busy` a
    /// bounded number of times.
    async fn enqueue_patiently(
        &self,
        slot: &Arc<SkuSlot>,
        command: SkuCommand,
    ) -> Result<oneshot::Receiver<SkuAnswer>, EngineError> {
        const ATTEMPTS_MAX: u32 = 200;
        let mut last = EngineError::Busy { retry_after_ms: self.inner.config.busy_retry_after_ms };
        for _ in 0..ATTEMPTS_MAX {
            match self.enqueue(slot, command.clone()) {
                Err(EngineError::Busy { retry_after_ms }) => {
                    last = EngineError::Busy { retry_after_ms };
                    tokio::time::sleep(std::time::Duration::from_millis(retry_after_ms)).await;
                }
                other => return other,
            }
        }
        Err(last)
    }

    /// Undoes one line's hold, waiting out `Busy` for as long as it lasts:
    /// the hold may be prepared, and a prepared hold never expires, so
    /// giving up would lock its units for good. Only a log failure (the
    /// engine answers nothing more) stops it.
    pub(crate) async fn abort_line(&self, order: &OrderId, slot: &Arc<SkuSlot>) {
        let answer = loop {
            match self.enqueue_patiently(slot, SkuCommand::Abort { order: order.clone() }).await {
                Err(EngineError::Busy { .. }) => continue,
                Ok(answer) => break answer.await.ok(),
                Err(_) => break None,
            }
        };
        if answer.is_none() {
            tracing::warn!(%order, sku = %slot.sku, "could not abort a hold: the log failed");
        }
    }

    /// Sells every held unit of the order.
    pub async fn commit(&self, order: &OrderId) -> Result<Settlement, OrderError> {
        self.settle(order, Settle::Commit { fewer: &[] }).await
    }

    /// Sells the given units per SKU (lines not named sell all their units);
    /// the rest of each hold goes back to stock.
    pub async fn commit_fewer(&self, order: &OrderId, fewer: &[(SkuId, u32)]) -> Result<Settlement, OrderError> {
        self.settle(order, Settle::Commit { fewer }).await
    }

    /// Gives every held unit of the order back to stock.
    pub async fn release(&self, order: &OrderId) -> Result<Settlement, OrderError> {
        self.settle(order, Settle::Release).await
    }

    async fn settle(&self, order: &OrderId, how: Settle<'_>) -> Result<Settlement, OrderError> {
        let committing = matches!(how, Settle::Commit { .. });
        if let Settle::Commit { fewer } = how {
            for (index, (sku, _)) in fewer.iter().enumerate() {
                if fewer[..index].iter().any(|(earlier, _)| earlier == sku) {
                    return Err(OrderError::NotInOrder { sku: sku.clone() });
                }
            }
        }
        let directory = &self.order_partition(order).orders;
        let (plan, resting, arrival) = {
            let mut orders = lock(directory);
            let record = orders.records.get_mut(order).ok_or(OrderError::UnknownReservation)?;
            match (record.phase, committing) {
                (OrderPhase::Held | OrderPhase::Prepared, _) => {}
                (OrderPhase::Committed, true) | (OrderPhase::Released, false) => {
                    let mut settlement = record.settlement.clone().expect("a settled order has its settlement");
                    settlement.replayed = true;
                    return Ok(settlement);
                }
                (OrderPhase::Committed, false) => return Err(OrderError::AlreadyCommitted),
                (OrderPhase::Released, true) => return Err(OrderError::AlreadyReleased),
                (OrderPhase::Expired, _) => {
                    let expired_at_ms = record.reservation.as_ref().map_or(0, |r| r.expires_at_ms);
                    return Err(OrderError::Expired { expired_at_ms });
                }
                (OrderPhase::Reserving | OrderPhase::Settling, _) => {
                    return Err(OrderError::Busy { retry_after_ms: 1 });
                }
            }
            // Every requested count is checked against its hold before any
            // line is touched: one line refusing while the others sell would
            // split the order.
            if let (Settle::Commit { fewer }, Some(reservation)) = (how, record.reservation.as_ref()) {
                for (sku, units) in fewer {
                    let held = reservation.lines.iter().find(|line| line.sku == *sku).map(|line| line.units);
                    match held {
                        None => return Err(OrderError::NotInOrder { sku: sku.clone() }),
                        Some(held) if *units == 0 || *units > held => {
                            return Err(OrderError::InvalidUnits { sku: sku.clone(), units: *units, held });
                        }
                        Some(_) => {}
                    }
                }
            }
            let resting = record.phase;
            record.phase = OrderPhase::Settling;
            (record.plan.clone(), resting, record.arrival)
        };
        let fewer_units = |sku: &SkuId| match how {
            Settle::Commit { fewer } => fewer.iter().find(|(named, _)| named == sku).map(|&(_, units)| units),
            Settle::Release => None,
        };
        // Several lines held here are sold all or none by a transaction,
        // on its own task so that a caller who stops waiting cannot leave
        // it half done. (Lines prepared for a coordinator elsewhere follow
        // that coordinator's decision instead.)
        if committing && plan.lines.len() > 1 && resting == OrderPhase::Held {
            let lines = plan
                .lines
                .iter()
                .map(|line| TransactionLine { sku: line.sku.clone(), units: fewer_units(&line.sku) })
                .collect();
            let (engine, order) = (self.clone(), order.clone());
            let task = tokio::spawn(async move { engine.commit_transaction(order, plan, lines).await });
            return task.await.unwrap_or_else(|failure| std::panic::resume_unwind(failure.into_panic()));
        }
        let interrupted = InterruptedOrder { directory, order, arrival, resting, finished: false };
        let answers = self
            .apply_to_lines(&plan, false, |line| match how {
                Settle::Commit { .. } => SkuCommand::Commit { order: order.clone(), units: fewer_units(&line.sku) },
                Settle::Release => SkuCommand::Release { order: order.clone() },
            })
            .await;
        interrupted.finish();
        self.finish_settle(order, &plan, committing, resting, answers)
    }

    /// Records how a settle of `order` ended from its lines' answers, and
    /// answers the caller.
    pub(crate) fn finish_settle(
        &self,
        order: &OrderId,
        plan: &OrderPlan,
        committing: bool,
        resting: OrderPhase,
        answers: Vec<Result<SkuAnswer, OrderError>>,
    ) -> Result<Settlement, OrderError> {
        let mut settled = Vec::with_capacity(answers.len());
        let mut first_error = None;
        for (position, answer) in answers.into_iter().enumerate() {
            let (index, sku) = (plan.lines[position].index, plan.slots[position].sku.clone());
            match answer {
                Ok(SkuAnswer {
                    result: Ok(SkuOutcome::Committed { units, .. } | SkuOutcome::Released { units, .. }),
                    stock,
                }) => {
                    settled.push(ReservedLine { sku, units, stock });
                }
                Ok(SkuAnswer { result: Err(error), stock }) => {
                    first_error.get_or_insert(OrderError::Line { index, sku, error, stock });
                }
                Ok(SkuAnswer { result: Ok(other), .. }) => unreachable!("a settle answered {other:?}"),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        let mut orders = lock(&self.order_partition(order).orders);
        let record = orders.records.get_mut(order).expect("a settling order stays in the directory");
        let Some(error) = first_error else {
            let settlement = Settlement { order: order.clone(), lines: settled, replayed: false };
            record.phase = if committing { OrderPhase::Committed } else { OrderPhase::Released };
            record.settlement = Some(settlement.clone());
            return Ok(settlement);
        };
        // A line refused: for a single line (or a release) the SKU's answer
        // is the order's answer. Expired lines mean the order expired.
        record.phase = match (&error, plan.lines.len()) {
            (OrderError::Line { error: SkuError::Expired { .. }, .. }, _) => OrderPhase::Expired,
            (OrderError::Line { error: SkuError::InvalidQuantity { .. } | SkuError::IdempotencyConflict, .. }, _) => {
                resting
            }
            (OrderError::Line { .. }, lines) if lines > 1 && !settled.is_empty() => {
                tracing::error!(%order, ?error, "a multi-line order settled on some lines only");
                // What did settle is the order's settlement from now on: a
                // settled phase always has one.
                record.settlement = Some(Settlement { order: order.clone(), lines: settled, replayed: false });
                if committing {
                    OrderPhase::Committed
                } else {
                    OrderPhase::Released
                }
            }
            // Busy or unavailable: settling again is safe (lines are idempotent).
            _ => resting,
        };
        Err(match error {
            OrderError::Line { error: SkuError::Expired { expired_at_ms }, .. } => {
                OrderError::Expired { expired_at_ms }
            }
            other => other,
        })
    }

    /// Sends `command_for(line)` to every line of `plan` at once and
    /// collects the answers in line order. `decided` commands (carrying out
    /// a transaction's decision) wait out `Busy` for as long as it lasts;
    /// others give up after a bounded wait.
    pub(crate) async fn apply_to_lines(
        &self,
        plan: &OrderPlan,
        decided: bool,
        command_for: impl Fn(&MergedLine) -> SkuCommand,
    ) -> Vec<Result<SkuAnswer, OrderError>> {
        let mut pending = Vec::with_capacity(plan.lines.len());
        for (line, slot) in plan.lines.iter().zip(&plan.slots) {
            let command = command_for(line);
            let enqueued = loop {
                match self.enqueue_patiently(slot, command.clone()).await {
                    Err(EngineError::Busy { .. }) if decided => continue,
                    other => break other,
                }
            };
            pending.push(enqueued.map_err(|error| error.into_order_error(line.index)));
        }
        let mut answers = Vec::with_capacity(pending.len());
        for enqueued in pending {
            answers.push(match enqueued {
                Ok(answer) => answer.await.map_err(|_| OrderError::Unavailable),
                Err(error) => Err(error),
            });
        }
        answers
    }

    /// What the log has done so far; `None` for an in-memory engine.
    pub fn log_stats(&self) -> Option<LogStats> {
        use std::sync::atomic::Ordering::Relaxed;
        lock(&self.inner.writer).as_ref().map(|writer| {
            let compactor = writer.compactor_stats();
            let of =
                |counter: Option<&std::sync::atomic::AtomicU64>| counter.map_or(0, |counter| counter.load(Relaxed));
            LogStats {
                syncs: writer.stats().syncs.load(Relaxed),
                records: writer.stats().records.load(Relaxed),
                bytes: writer.stats().bytes.load(Relaxed),
                snapshots: of(compactor.map(|stats| &stats.snapshots)),
                segments_removed: of(compactor.map(|stats| &stats.segments_removed)),
                snapshot_failures: of(compactor.map(|stats| &stats.failures)),
                last_snapshot_unix_ms: Some(of(compactor.map(|stats| &stats.last_snapshot_unix_ms)))
                    .filter(|&at_ms| at_ms > 0),
            }
        })
    }

    /// Orderly stop: stops the SKU actors, makes every record already
    /// queued durable, ends the log writer and releases the data directory.
    /// Requests after this fail with `Unavailable` (durable engine) or find
    /// their actors gone.
    pub async fn shutdown(&self) {
        self.stop_actors();
        let writer = lock(&self.inner.writer).take();
        if let Some(writer) = writer {
            if tokio::task::spawn_blocking(move || writer.stop()).await.is_err() {
                tracing::error!("stopping the log writer panicked");
            }
        }
    }

    /// Stops every running SKU actor (their state stays in memory, parked
    /// actors are unaffected). For tests and orderly process exit.
    pub fn stop_actors(&self) {
        for partition in self.inner.partitions.iter() {
            let skus = partition.skus.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            for slot in skus.values() {
                if let Some(actor) = lock(&slot.actor).as_ref() {
                    actor.stop(None);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Settle<'a> {
    Commit { fewer: &'a [(SkuId, u32)] },
    Release,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bounds_name_the_field() {
        assert_eq!(EngineConfig::default().validate(), Ok(()));
        let field = |config: EngineConfig| config.validate().map_err(|error| error.field);
        assert_eq!(field(EngineConfig { partition_count: 1 << 20, ..EngineConfig::default() }), Err("partition_count"));
        assert_eq!(field(EngineConfig { batch_max: 10_000, ..EngineConfig::default() }), Err("batch_max"));
        assert_eq!(
            field(EngineConfig { in_flight_per_partition_max: 10, ..EngineConfig::default() }),
            Err("in_flight_per_partition_max")
        );
    }
}
