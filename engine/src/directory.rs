//! The order directory: what the engine knows about each order, per
//! partition of the order id.
//!
//! It makes reserve, commit and release idempotent at the order level,
//! refuses an order id reused with other content, holds the commit decision
//! of multi-line orders, and forgets settled orders once the idempotency
//! window has passed. It never forgets an order that still holds stock:
//! when `orders_per_partition_max` orders are remembered and none may be
//! forgotten yet, a new order is refused (`Busy`) instead.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::config::EngineConfig;
use crate::ids::{BuyerId, FastMap, OrderId, SkuId};
use crate::order::{MergedLine, OrderError, Reservation, Settlement};
use crate::sku::Quantity;
use crate::slot::{lock, SkuSlot};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OrderPhase {
    /// Lines are being held right now.
    Reserving,
    Held,
    /// Every line is prepared for a transaction coordinated elsewhere (on
    /// another member): the lines wait for that coordinator's decision.
    Prepared,
    /// A commit or release is being applied to the lines.
    Settling,
    Committed,
    Released,
    Expired,
}

/// An order's merged lines and their SKUs (resolved once), shared by its
/// directory record and whichever request is working on it.
#[derive(Debug)]
pub(crate) struct OrderPlan {
    pub(crate) lines: Vec<MergedLine>,
    pub(crate) slots: Vec<Arc<SkuSlot>>,
}

/// What makes two requests the same order for idempotency: the buyer, the
/// TTL and the merged lines sorted by SKU. (A record rebuilt from the SKUs'
/// logs after a restart knows exactly this much.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OrderContent {
    pub(crate) buyer: BuyerId,
    pub(crate) ttl_ms: u64,
    pub(crate) lines: Vec<(SkuId, Quantity)>,
}

impl OrderContent {
    pub(crate) fn of(buyer: &BuyerId, ttl_ms: u64, merged: &[MergedLine]) -> Self {
        let mut lines: Vec<(SkuId, Quantity)> = merged.iter().map(|line| (line.sku.clone(), line.quantity)).collect();
        lines.sort_by(|a, b| a.0.cmp(&b.0));
        Self { buyer: buyer.clone(), ttl_ms, lines }
    }

    /// Whether a request with these parts is the same order, without
    /// building its content (this runs before the sold-out check).
    pub(crate) fn matches(&self, buyer: &BuyerId, ttl_ms: u64, merged: &[MergedLine]) -> bool {
        self.buyer == *buyer
            && self.ttl_ms == ttl_ms
            && self.lines.len() == merged.len()
            && merged.iter().all(|line| {
                self.lines
                    .binary_search_by(|(sku, _)| sku.cmp(&line.sku))
                    .is_ok_and(|position| self.lines[position].1 == line.quantity)
            })
    }
}

#[derive(Debug)]
pub(crate) struct OrderRecord {
    /// What a retry must match.
    pub(crate) content: OrderContent,
    /// Which arrival in `OrderDirectory::arrival` this record belongs to.
    pub(crate) arrival: u64,
    pub(crate) plan: Arc<OrderPlan>,
    pub(crate) phase: OrderPhase,
    pub(crate) reservation: Option<Reservation>,
    pub(crate) settlement: Option<Settlement>,
}

impl OrderPhase {
    /// Settled: the order holds no stock and waits for nothing, so it may
    /// be forgotten once its idempotency window has passed.
    fn is_settled(self) -> bool {
        matches!(self, OrderPhase::Committed | OrderPhase::Released | OrderPhase::Expired)
    }
}

/// Orders of one partition, for idempotency and for the commit decision.
#[derive(Debug, Default)]
pub(crate) struct OrderDirectory {
    pub(crate) records: FastMap<OrderId, OrderRecord>,
    /// Every record's arrival, by number (so oldest first), with when it
    /// arrived: the order in which settled orders are forgotten. Exactly
    /// one entry per record (`OrderRecord::arrival` names it).
    arrivals: BTreeMap<u64, (u64, OrderId)>,
    next_arrival: u64,
}

impl OrderDirectory {
    /// Forgets the settled orders whose idempotency window has passed. An
    /// order past its window that is not settled (prepared for a
    /// coordinator that has not decided, or mid-way) is kept and looked at
    /// again a window later.
    pub(crate) fn forget_old(&mut self, now_ms: u64, config: &EngineConfig) {
        let window_ms = config.limits.idempotency_window_ms;
        while let Some(entry) = self.arrivals.first_entry() {
            let (arrived_ms, order) = entry.get();
            if arrived_ms.saturating_add(window_ms) > now_ms {
                break;
            }
            let order = order.clone();
            entry.remove();
            let record = self.records.get_mut(&order).expect("every arrival has its record");
            if record.phase.is_settled() {
                self.records.remove(&order);
            } else {
                record.arrival = self.next_arrival;
                self.next_arrival += 1;
                self.arrivals.insert(record.arrival, (now_ms, order));
            }
        }
        debug_assert_eq!(self.arrivals.len(), self.records.len());
    }

    /// Remembers a new order (`make` builds its record, given its arrival
    /// number); returns the number. Refused with `Busy` when the directory
    /// holds `orders_per_partition_max` orders none of which may be
    /// forgotten yet: forgetting a live order would lose its stock, and
    /// forgetting a settled one inside its window would answer a retry
    /// differently. The caller has called [`Self::forget_old`] at `now_ms`
    /// (a reserve does so before it looks the id up).
    pub(crate) fn admit(
        &mut self,
        now_ms: u64,
        order: &OrderId,
        config: &EngineConfig,
        make: impl FnOnce(u64) -> OrderRecord,
    ) -> Result<u64, OrderError> {
        if self.records.len() >= config.orders_per_partition_max {
            tracing::warn!(
                orders = self.records.len(),
                "the order directory is full of orders it may not forget yet; new orders are refused"
            );
            return Err(OrderError::Busy { retry_after_ms: config.busy_retry_after_ms });
        }
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let record = make(arrival);
        debug_assert_eq!(record.arrival, arrival);
        self.arrivals.insert(arrival, (now_ms, order.clone()));
        let earlier = self.records.insert(order.clone(), record);
        assert!(earlier.is_none(), "an order admitted twice");
        Ok(arrival)
    }

    /// Forgets `order` at once (a refused or abandoned order leaves no trace).
    pub(crate) fn remove(&mut self, order: &OrderId) {
        if let Some(record) = self.records.remove(order) {
            self.arrivals.remove(&record.arrival);
        }
    }
}

/// Restores an order that was mid-way (reserving or settling) when the
/// future working on it was dropped, so that a retry can finish it: a
/// reserve is forgotten (its placed holds are found again by the retry, or
/// expire), a settle goes back to where it started (`resting`; settling
/// lines is idempotent).
#[derive(Debug)]
pub(crate) struct InterruptedOrder<'a> {
    pub(crate) directory: &'a Mutex<OrderDirectory>,
    pub(crate) order: &'a OrderId,
    pub(crate) arrival: u64,
    pub(crate) resting: OrderPhase,
    pub(crate) finished: bool,
}

impl InterruptedOrder<'_> {
    pub(crate) fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for InterruptedOrder<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut orders = lock(self.directory);
        let Some(record) = orders.records.get_mut(self.order).filter(|record| record.arrival == self.arrival) else {
            return;
        };
        match record.phase {
            OrderPhase::Reserving => orders.remove(self.order),
            OrderPhase::Settling => record.phase = self.resting,
            OrderPhase::Held
            | OrderPhase::Prepared
            | OrderPhase::Committed
            | OrderPhase::Released
            | OrderPhase::Expired => {}
        }
        tracing::debug!(order = %self.order, "an order's caller stopped waiting mid-way; a retry will finish it");
    }
}
