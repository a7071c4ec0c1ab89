//! [`Engine`]: the in-process entry point in front of the SKU actors.
//!
//! A request for a SKU goes: partition admission gate -> SKU admission gate
//! (both answer `Busy` when full) -> the SKU's wake queue -> its actor, which
//! applies it and answers through a oneshot channel. A reservation that
//! cannot be met is answered `SoldOut` from the SKU's published snapshot
//! before any of that, when the snapshot allows it (`orders.rs`).
//!
//! This module holds the engine's partitions, SKU slots and admission,
//! admin changes and availability; orders (`orders.rs`), opening a durable
//! engine (`recovery.rs`) and counters (`statistics.rs`) are `impl Engine`
//! blocks of their own modules, which depend on this one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use flashstock_sync::{AdmissionGate, Pushed, WakeQueue};
use ractor::Actor;
use tokio::sync::oneshot;

use crate::actor::SkuActor;
use crate::clock::Clock;
use crate::config::EngineConfig;
use crate::directory::OrderDirectory;
use crate::ids::{FastMap, OperationId, OrderId, SkuId};
use crate::limits::InvalidLimits;
use crate::log::record::{EncodedRecord, LogRecord, OpenTransaction};
use crate::log::writer::{Append, LogSubmitter, LogWriter};
use crate::order::OrderError;
use crate::partition::partition_of;
use crate::sku::{AdminChange, SkuAnswer, SkuCommand, SkuError, SkuSettings, SkuState, StockSnapshot};
use crate::slot::{lock, reading_of, Reply, Request, SkuSlot};

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
    pub(crate) fn into_order_error(self, index: usize) -> OrderError {
        match self {
            EngineError::UnknownSku { sku } => OrderError::UnknownSku { index, sku },
            EngineError::Busy { retry_after_ms } => OrderError::Busy { retry_after_ms },
            EngineError::Refused { sku, error, stock } => OrderError::Line { index, sku, error, stock },
            EngineError::SkuExists { .. } | EngineError::Unavailable => OrderError::Unavailable,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Partition {
    pub(crate) gate: Arc<AdmissionGate>,
    pub(crate) skus: RwLock<FastMap<SkuId, Arc<SkuSlot>>>,
    pub(crate) orders: Mutex<OrderDirectory>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: Arc<EngineConfig>,
    /// Set once the log failed: every partition then answers
    /// `Unavailable`, since memory may be ahead of the log.
    pub(crate) log_failed: Arc<AtomicBool>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) partitions: Box<[Partition]>,
    pub(crate) log: Option<LogSubmitter>,
    /// The writer thread's handle, taken by [`Engine::shutdown`] (the thread
    /// itself holds the data directory's lock until it is done).
    pub(crate) writer: Mutex<Option<LogWriter>>,
    /// Transactions recovery left open for lines on other members.
    pub(crate) recovered_transactions: Mutex<Vec<(OrderId, OpenTransaction)>>,
    /// The order coordinator's facts recovery found, for the node's
    /// coordinator to start from.
    pub(crate) recovered_coordinator: Mutex<Vec<crate::coordination::CoordinatorRecord>>,
    /// Finishes batches' durable answers off the log writer's thread.
    pub(crate) completer: Arc<crate::batch::Completer>,
}

/// The inventory engine of one process. Cheap to clone; all clones share
/// the same SKUs. Must be used inside a tokio runtime (actors run on it).
#[derive(Debug, Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

impl Engine {
    /// An engine that keeps everything in memory (nothing survives the
    /// process).
    pub fn new(config: EngineConfig, clock: Arc<dyn Clock>) -> Result<Self, InvalidLimits> {
        config.validate()?;
        Ok(Self::build(config, clock, None))
    }

    pub(crate) fn build(config: EngineConfig, clock: Arc<dyn Clock>, writer: Option<LogWriter>) -> Self {
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
            recovered_coordinator: Mutex::new(Vec::new()),
            completer: Arc::default(),
        };
        Self { inner: Arc::new(inner) }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    pub(crate) fn partition(&self, sku: &SkuId) -> &Partition {
        &self.inner.partitions[partition_of(sku, self.inner.config.partition_count) as usize]
    }

    pub(crate) fn order_partition(&self, order: &OrderId) -> &Partition {
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

    pub(crate) fn slot(&self, sku: &SkuId) -> Result<Arc<SkuSlot>, EngineError> {
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
    pub(crate) async fn recreate(
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

    pub(crate) fn new_slot(&self, sku: SkuId, partition_index: u32, state: SkuState) -> Arc<SkuSlot> {
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
            completer: self.inner.completer.clone(),
        })
    }

    /// Admits `command` for `sku` and hands it to the SKU's actor (starting
    /// one if none runs). The answer arrives on the returned channel.
    pub(crate) fn enqueue(
        &self,
        slot: &Arc<SkuSlot>,
        command: SkuCommand,
    ) -> Result<oneshot::Receiver<SkuAnswer>, EngineError> {
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
        self.push_to_actor(slot, vec![Request { command, reply: Reply::Waiter(reply) }]);
        Ok(answer)
    }

    /// Hands admitted `requests` to the SKU's actor in one push, with at
    /// most one wake-up, starting an actor if none runs.
    pub(crate) fn push_to_actor(&self, slot: &Arc<SkuSlot>, requests: Vec<Request>) {
        match slot.queue.push_many(requests) {
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
    }

    pub(crate) async fn execute(&self, sku: &SkuId, command: SkuCommand) -> Result<SkuAnswer, EngineError> {
        let slot = self.slot(sku)?;
        self.enqueue(&slot, command)?.await.map_err(|_| EngineError::Unavailable)
    }

    pub(crate) async fn admin(&self, sku: &SkuId, command: SkuCommand) -> Result<StockSnapshot, EngineError> {
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

    /// The SKU's counts from its owner, after ending the holds whose time
    /// has come: exact, at the cost of a trip through the actor.
    pub async fn availability_now(&self, sku: &SkuId) -> Result<StockSnapshot, EngineError> {
        self.admin(sku, SkuCommand::Query).await
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
