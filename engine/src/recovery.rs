//! Opening a durable engine: the log replayed under the limits it records,
//! open transactions finished, today's limits logged if they differ, the
//! SKUs handed to their slots and every order directory rebuilt from the
//! SKUs' reservations.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::clock::Clock;
use crate::config::EngineConfig;
use crate::directory::{OrderContent, OrderPhase, OrderPlan, OrderRecord};
use crate::ids::{OrderId, SkuId};
use crate::limits::{first_violation, InvalidLimits};
use crate::log::compactor::Compactor;
use crate::log::record::{EncodedRecord, LogRecord};
use crate::log::replay::{ReplayRules, ReplayedState};
use crate::log::segments::{LogConfig, LogError, SegmentedLog, TornTail};
use crate::log::storage::Storage;
use crate::log::writer::{Append, LogWriter, WriterConfig};
use crate::order::{MergedLine, Reservation, ReservedLine, Settlement};
use crate::partition::partition_of;
use crate::runtime::Engine;
use crate::sku::{EndingImage, ReservationImage, SkuState, StockSnapshot};
use crate::slot::{lock, SkuSlot};

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

impl Engine {
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
        *lock(&engine.inner.recovered_coordinator) = state.coordinator_records();
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
    pub(crate) fn rebuild_directories(&self) -> usize {
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

    /// Adds a recovered SKU (no log record: it came from the log).
    pub(crate) fn insert_slot(&self, sku: SkuId, state: SkuState) {
        let partition_index = partition_of(&sku, self.inner.config.partition_count);
        let slot = self.new_slot(sku.clone(), partition_index, state);
        let partition = &self.inner.partitions[partition_index as usize];
        partition.skus.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(sku, slot);
    }
}
