//! The state a log describes, rebuilt from its snapshot and records: the
//! one definition of what a record means, shared by recovery (which then
//! hands the SKUs to their actors) and by compaction (which writes the
//! result as the next snapshot). Pure: no IO, no clock.

use std::collections::BTreeMap;

use crate::ids::{OrderId, SkuId};
use crate::limits::Limits;
use crate::log::record::{LogRecord, OpenTransaction};
use crate::log::snapshot::Snapshot;
use crate::sku::{SkuCommand, SkuState};

/// How a log's records are to be read back: with the limits and the
/// partition count of the engine that wrote them.
#[derive(Debug, Clone)]
pub struct ReplayRules {
    pub partition_count: u32,
    pub limits: Limits,
}

/// Every SKU of a log, as of the last record applied.
#[derive(Debug)]
pub struct ReplayedState {
    rules: ReplayRules,
    /// Sorted, so that snapshots come out canonical.
    pub skus: BTreeMap<SkuId, SkuState>,
    /// Transactions begun and not ended, by order.
    pub transactions: BTreeMap<OrderId, OpenTransaction>,
    /// Sequence number of the last record applied (0 before any).
    pub last_sequence: u64,
}

impl ReplayedState {
    /// The state an empty log describes.
    pub fn empty(rules: ReplayRules) -> Self {
        Self { rules, skus: BTreeMap::new(), transactions: BTreeMap::new(), last_sequence: 0 }
    }

    /// The state `snapshot` describes; a snapshot taken with another
    /// partition count, or one that breaks an invariant, is refused with
    /// the reason.
    pub fn from_snapshot(rules: ReplayRules, snapshot: Snapshot) -> Result<Self, String> {
        if snapshot.partition_count != rules.partition_count {
            return Err(format!(
                "written with {} partitions, configured with {}: the partition count is fixed for a cluster's life",
                snapshot.partition_count, rules.partition_count
            ));
        }
        let mut state = Self::empty(rules);
        state.last_sequence = snapshot.last_sequence;
        for (sku, image) in snapshot.skus {
            let restored = SkuState::from_image(image, state.rules.limits.clone())
                .map_err(|error| format!("SKU {sku}: {error}"))?;
            state.skus.insert(sku, restored);
        }
        state.transactions = snapshot.transactions.into_iter().collect();
        Ok(state)
    }

    /// Applies the record with sequence number `sequence`, which must be
    /// the next one; a record that cannot follow the state (a gap, a SKU
    /// created twice, a command for an unknown SKU) is refused with the
    /// reason, because the log it came from is not one the engine wrote.
    pub fn apply(&mut self, sequence: u64, record: LogRecord) -> Result<(), String> {
        if sequence != self.last_sequence + 1 {
            return Err(format!("expected record {}, found {sequence}", self.last_sequence + 1));
        }
        match record {
            LogRecord::CreateSku { sku, settings } => {
                if self.skus.contains_key(&sku) {
                    return Err(format!("SKU {sku} created twice"));
                }
                let state = SkuState::new(settings, self.rules.limits.clone())
                    .map_err(|error| format!("SKU {sku}: {error}"))?;
                self.skus.insert(sku, state);
            }
            LogRecord::Apply { sku, now_ms, command } => {
                let state = self.skus.get_mut(&sku).ok_or_else(|| format!("no SKU {sku}"))?;
                // The answer was given when the command was first applied;
                // replay only needs the state it left.
                state.apply(now_ms, &command);
            }
            LogRecord::TransactionBegun { order, lines } => {
                // A retried commit begins again and replaces an undecided
                // transaction; a decision is final, so a decided one stays.
                if !self.transactions.get(&order).is_some_and(|open| open.committed) {
                    self.transactions.insert(order, OpenTransaction { lines, committed: false });
                }
            }
            LogRecord::TransactionCommitted { order } => {
                let open =
                    self.transactions.get_mut(&order).ok_or_else(|| format!("order {order}: decided, never begun"))?;
                open.committed = true;
            }
            // Ending is idempotent: a coordinator may end a transaction
            // again when a retry finds it already carried out.
            LogRecord::TransactionEnded { order } => {
                self.transactions.remove(&order);
            }
        }
        self.last_sequence = sequence;
        Ok(())
    }

    /// Finishes, at `now_ms`, the transactions the log left open, on the
    /// lines whose SKUs are here: a decided one commits them, an undecided
    /// one gives their prepared holds their TTL back. Returns the records
    /// that make this durable (to be appended before serving) and the
    /// transactions that also have lines elsewhere, which stay open for the
    /// caller to finish there.
    pub fn finish_transactions(&mut self, now_ms: u64) -> (Vec<LogRecord>, Vec<(OrderId, OpenTransaction)>) {
        let mut records = Vec::new();
        let mut elsewhere = Vec::new();
        for (order, open) in std::mem::take(&mut self.transactions) {
            let mut all_here = true;
            for line in &open.lines {
                let Some(state) = self.skus.get_mut(&line.sku) else {
                    all_here = false;
                    continue;
                };
                let command = if open.committed {
                    SkuCommand::Commit { order: order.clone(), units: line.units }
                } else {
                    SkuCommand::Unprepare { order: order.clone() }
                };
                let (answer, recorded) = state.apply_recording(now_ms, &command);
                if let Err(error) = answer.result {
                    // An undecided line that never got a hold, or a decided
                    // one already ended, has nothing left to do.
                    tracing::debug!(%order, sku = %line.sku, %error, "a recovered transaction's line was already done");
                }
                if let Some(command) = recorded {
                    records.push(LogRecord::Apply { sku: line.sku.clone(), now_ms, command });
                }
            }
            if all_here {
                records.push(LogRecord::TransactionEnded { order });
            } else {
                self.transactions.insert(order.clone(), open.clone());
                elsewhere.push((order, open));
            }
        }
        (records, elsewhere)
    }

    /// The canonical snapshot of this state.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            last_sequence: self.last_sequence,
            partition_count: self.rules.partition_count,
            skus: self.skus.iter().map(|(sku, state)| (sku.clone(), state.image())).collect(),
            transactions: self.transactions.iter().map(|(order, open)| (order.clone(), open.clone())).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sku::SkuSettings;

    fn rules(partition_count: u32) -> ReplayRules {
        ReplayRules { partition_count, limits: Limits::default() }
    }

    fn sku() -> SkuId {
        SkuId::new("sku").expect("valid")
    }

    #[test]
    fn records_apply_in_order_and_a_snapshot_restores_the_same_state() {
        let mut state = ReplayedState::empty(rules(4));
        let settings = SkuSettings { initial_units: 10, ..SkuSettings::default() };
        state.apply(1, LogRecord::CreateSku { sku: sku(), settings }).expect("creates");
        let add = LogRecord::Apply { sku: sku(), now_ms: 5, command: SkuCommand::AddStock { units: 3 } };
        state.apply(2, add).expect("applies");
        assert_eq!(state.skus[&sku()].stock().available, 13);

        let restored = ReplayedState::from_snapshot(rules(4), state.snapshot()).expect("restores");
        assert_eq!(restored.snapshot().encode(), state.snapshot().encode());
        assert_eq!(restored.last_sequence, 2);
        let refused = ReplayedState::from_snapshot(rules(8), state.snapshot()).expect_err("other partition count");
        assert!(refused.contains("4 partitions"), "{refused}");
    }

    #[test]
    fn records_that_cannot_follow_are_refused_with_a_reason() {
        let mut state = ReplayedState::empty(rules(4));
        let create = LogRecord::CreateSku { sku: sku(), settings: SkuSettings::default() };
        assert!(state.apply(2, create.clone()).expect_err("gap").contains("expected record 1"));
        let add = LogRecord::Apply { sku: sku(), now_ms: 0, command: SkuCommand::AddStock { units: 1 } };
        assert!(state.apply(1, add).expect_err("unknown").contains("no SKU"));
        state.apply(1, create.clone()).expect("creates");
        assert!(state.apply(2, create).expect_err("twice").contains("twice"));
        assert_eq!(state.last_sequence, 1, "a refused record leaves the state as it was");
    }
}
