//! The coordinator's records folded down to those a restart still needs:
//! what replay keeps and what a snapshot carries, so that compaction can
//! drop the log they came from.

use crate::coordination::CoordinatorRecord;
use crate::ids::{FastMap, OrderId};

/// The coordinator facts of a log, as of its last record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoordinatorFacts {
    epoch: u64,
    /// Each known order's records, from its `Held` on. Hashed: every
    /// replica folds in every record of its group, so this is looked up
    /// once per record, and walked only by [`Self::records`] (a snapshot,
    /// a coordinator's start), which sorts.
    orders: FastMap<OrderId, Vec<CoordinatorRecord>>,
    /// The newest time a record named: orders that ended a window before
    /// it are forgotten, as the coordinator forgets them.
    newest_ms: u64,
}

impl CoordinatorFacts {
    /// Folds in the next record. A fact about an order the facts do not
    /// hold (it was forgotten) has nothing left to say.
    pub fn apply(&mut self, record: CoordinatorRecord) {
        let order = match &record {
            CoordinatorRecord::Epoch { epoch } => {
                self.epoch = self.epoch.max(*epoch);
                return;
            }
            // A new attempt of an order forgotten before starts afresh.
            CoordinatorRecord::Held { order, .. } => {
                self.orders.insert(order.clone(), vec![record]);
                return;
            }
            CoordinatorRecord::Forgotten { order } => {
                self.orders.remove(order);
                return;
            }
            CoordinatorRecord::Ended { order, now_ms, .. } => {
                self.newest_ms = self.newest_ms.max(*now_ms);
                order
            }
            CoordinatorRecord::Decided { order, .. }
            | CoordinatorRecord::ReleaseDecided { order }
            | CoordinatorRecord::ExpiryDecided { order, .. } => order,
        };
        if let Some(records) = self.orders.get_mut(order) {
            records.push(record);
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
        // Sorted by order id: a snapshot's bytes are canonical, and a
        // coordinator started from them walks its orders in one order.
        let mut orders: Vec<(&OrderId, &Vec<CoordinatorRecord>)> = self.orders.iter().collect();
        orders.sort_unstable_by_key(|(order, _)| *order);
        for (_, order_records) in orders {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordination::{HeldLine, Outcome};
    use crate::ids::{BuyerId, SkuId};
    use crate::sku::Quantity;

    fn held(order: &str) -> CoordinatorRecord {
        CoordinatorRecord::Held {
            order: OrderId::new(order).expect("valid"),
            buyer: BuyerId::new("buyer").expect("valid"),
            ttl_ms: 5_000,
            attempt: OrderId::new(format!("~1.1.{order}")).expect("valid"),
            lines: vec![HeldLine {
                sku: SkuId::new("a").expect("valid"),
                quantity: Quantity::Exactly(1),
                units: 1,
                member: 2,
                index: 0,
            }],
            expires_at_ms: 9_000,
        }
    }

    fn ended(order: &str, now_ms: u64) -> CoordinatorRecord {
        CoordinatorRecord::Ended { order: OrderId::new(order).expect("valid"), outcome: Outcome::Released, now_ms }
    }

    /// What a restart needs: open orders whole, settled ones within the
    /// window, nothing the coordinator forgot; the newest epoch first.
    #[test]
    fn facts_keep_what_a_restart_needs_and_nothing_forgotten() {
        let mut facts = CoordinatorFacts::default();
        for record in [
            CoordinatorRecord::Epoch { epoch: 1 },
            held("open"),
            held("old"),
            ended("old", 1_000),
            held("recent"),
            ended("recent", 50_000),
            held("dropped"),
            ended("dropped", 50_000),
            CoordinatorRecord::Forgotten { order: OrderId::new("dropped").expect("valid") },
            CoordinatorRecord::Epoch { epoch: 2 },
            CoordinatorRecord::Decided { order: OrderId::new("never-held").expect("valid"), units: vec![1] },
        ] {
            facts.apply(record);
        }
        let records = facts.records(10_000);
        assert_eq!(records[0], CoordinatorRecord::Epoch { epoch: 2 });
        let orders: Vec<&str> = records
            .iter()
            .filter_map(|record| match record {
                CoordinatorRecord::Held { order, .. } => Some(order.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(orders, ["open", "recent"], "ended a window ago, forgotten, or never held: left out");
        assert_eq!(CoordinatorFacts::from_records(records.clone()).records(10_000), records);
    }
}
