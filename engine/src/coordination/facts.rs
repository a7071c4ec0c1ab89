//! The coordinator's records folded down to those a restart still needs:
//! what replay keeps and what a snapshot carries, so that compaction can
//! drop the log they came from.

use std::collections::BTreeMap;

use crate::coordination::CoordinatorRecord;
use crate::ids::OrderId;

/// The coordinator facts of a log, as of its last record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoordinatorFacts {
    epoch: u64,
    /// Each known order's records, from its `Held` on.
    orders: BTreeMap<OrderId, Vec<CoordinatorRecord>>,
    /// The newest time a record named: orders that ended a window before
    /// it are forgotten, as the coordinator forgets them.
    newest_ms: u64,
}

impl CoordinatorFacts {
    /// Folds in the next record. A fact about an order the facts do not
    /// hold (it was forgotten) has nothing left to say.
    pub fn apply(&mut self, record: CoordinatorRecord) {
        match &record {
            CoordinatorRecord::Epoch { epoch } => self.epoch = self.epoch.max(*epoch),
            // A new attempt of an order forgotten before starts afresh.
            CoordinatorRecord::Held { order, .. } => {
                self.orders.insert(order.clone(), vec![record]);
            }
            CoordinatorRecord::Decided { order, .. } | CoordinatorRecord::ReleaseDecided { order } => {
                if let Some(records) = self.orders.get_mut(order) {
                    records.push(record.clone());
                }
            }
            CoordinatorRecord::Ended { order, now_ms, .. } => {
                self.newest_ms = self.newest_ms.max(*now_ms);
                if let Some(records) = self.orders.get_mut(order) {
                    records.push(record.clone());
                }
            }
        }
    }

    /// The records a restart needs, in an order it can replay them in
    /// (the epoch first, then each order's records in their own order):
    /// orders that ended `window_ms` before the newest record are left out.
    pub fn records(&self, window_ms: u64) -> Vec<CoordinatorRecord> {
        let mut records = Vec::new();
        if self.epoch > 0 {
            records.push(CoordinatorRecord::Epoch { epoch: self.epoch });
        }
        for order_records in self.orders.values() {
            let forgotten = order_records.iter().any(|record| {
                matches!(record, CoordinatorRecord::Ended { now_ms, .. }
                    if now_ms.saturating_add(window_ms) <= self.newest_ms)
            });
            if !forgotten {
                records.extend(order_records.iter().cloned());
            }
        }
        records
    }

    /// The facts a snapshot's records describe.
    pub fn from_records(records: impl IntoIterator<Item = CoordinatorRecord>) -> Self {
        let mut facts = Self::default();
        for record in records {
            facts.apply(record);
        }
        facts
    }
}
