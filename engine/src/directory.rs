//! The order directory: what the engine knows about each order, per
//! partition of the order id.
//!
//! It makes reserve, commit and release idempotent at the order level,
//! refuses an order id reused with other content, holds the commit decision
//! of multi-line orders, and forgets settled orders oldest first (bounded by
//! count and by the idempotency window).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::ids::{BuyerId, FastMap, OrderId, SkuId};
use crate::order::{MergedLine, Reservation, Settlement};
use crate::runtime::{lock, EngineConfig, SkuSlot};
use crate::sku::Quantity;

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

/// Orders of one partition, for idempotency and for the commit decision.
#[derive(Debug, Default)]
pub(crate) struct OrderDirectory {
    pub(crate) records: FastMap<OrderId, OrderRecord>,
    /// Arrivals with their time and number, oldest first, for forgetting
    /// the oldest. An order refused and then retried arrives twice; the
    /// number tells which arrival its record belongs to.
    pub(crate) arrival: VecDeque<(u64, u64, OrderId)>,
    next_arrival: u64,
}

impl OrderDirectory {
    pub(crate) fn forget_old(&mut self, now_ms: u64, config: &EngineConfig) {
        while let Some((arrived_ms, arrival, order)) = self.arrival.front() {
            let too_old = arrived_ms.saturating_add(config.limits.idempotency_window_ms) <= now_ms;
            let too_many = self.arrival.len() > config.orders_per_partition_max;
            if !(too_old || too_many) {
                break;
            }
            let record = self.records.get(order).filter(|record| record.arrival == *arrival);
            if record.is_some_and(|record| matches!(record.phase, OrderPhase::Reserving | OrderPhase::Settling)) {
                break;
            }
            if record.is_some() {
                self.records.remove(order);
            }
            self.arrival.pop_front();
        }
    }

    /// Records a new order's arrival; returns its number.
    pub(crate) fn arrive(&mut self, now_ms: u64, order: &OrderId) -> u64 {
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.arrival.push_back((now_ms, arrival, order.clone()));
        arrival
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
            OrderPhase::Reserving => {
                orders.records.remove(self.order);
            }
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
