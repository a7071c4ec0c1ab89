//! The state a log describes, rebuilt from its snapshot and records: the
//! one definition of what a record means, shared by recovery (which then
//! hands the SKUs to their actors) and by compaction (which writes the
//! result as the next snapshot). Pure: no IO, no clock.
//!
//! The limits commands were checked against are part of the state: the log
//! records them when they change ([`LogRecord::RulesInForce`]) and snapshots
//! carry them, so each record is replayed under the limits it was first
//! applied with, whatever the configuration of the engine replaying it.

use std::collections::BTreeMap;

use crate::coordination::CoordinatorFacts;
use crate::ids::{OrderId, SkuId};
use crate::limits::Limits;
use crate::log::record::{LogRecord, OpenTransaction};
use crate::log::snapshot::Snapshot;
use crate::sku::{SkuCommand, SkuState};

/// How a log's records are to be read back.
#[derive(Debug, Clone)]
pub struct ReplayRules {
    /// Fixed for a cluster's life; a log is only read with its own count.
    pub partition_count: u32,
    /// The limits to assume until the log names its own: only a log written
    /// before the limits were logged (every engine since logs them before
    /// its first command) is replayed under these.
    pub limits_unrecorded: Limits,
}

/// Every SKU of a log, as of the last record applied.
#[derive(Debug, Clone)]
pub struct ReplayedState {
    rules: ReplayRules,
    /// The limits commands are checked against from here on, and whether
    /// the log (or its snapshot) named them.
    limits: Limits,
    limits_recorded: bool,
    /// Sorted, so that snapshots come out canonical.
    pub skus: BTreeMap<SkuId, SkuState>,
    /// Transactions begun and not ended, by order.
    pub transactions: BTreeMap<OrderId, OpenTransaction>,
    /// What the member's order coordinator must know again.
    pub coordinator: CoordinatorFacts,
    /// Sequence number of the last record applied (0 before any).
    pub last_sequence: u64,
}

impl ReplayedState {
    /// The state an empty log describes.
    pub fn empty(rules: ReplayRules) -> Self {
        let limits = rules.limits_unrecorded.clone();
        Self {
            rules,
            limits,
            limits_recorded: false,
            skus: BTreeMap::new(),
            transactions: BTreeMap::new(),
            coordinator: CoordinatorFacts::default(),
            last_sequence: 0,
        }
    }

    /// Puts `limits` in force for every SKU and every later record (what
    /// [`LogRecord::RulesInForce`] means).
    pub fn put_in_force(&mut self, limits: Limits) {
        for state in self.skus.values_mut() {
            state.set_limits(limits.clone());
        }
        self.limits = limits;
        self.limits_recorded = true;
    }

    /// The limits commands are checked against from here on.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The limits in force, if the log named them.
    pub fn limits_recorded(&self) -> Option<&Limits> {
        self.limits_recorded.then_some(&self.limits)
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
        if let Some(limits) = snapshot.limits {
            state.limits = limits;
            state.limits_recorded = true;
        }
        for (sku, image) in snapshot.skus {
            let restored =
                SkuState::from_image(image, state.limits.clone()).map_err(|error| format!("SKU {sku}: {error}"))?;
            state.skus.insert(sku, restored);
        }
        state.transactions = snapshot.transactions.into_iter().collect();
        state.coordinator = CoordinatorFacts::from_records(snapshot.coordinator);
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
            LogRecord::CreateSku { sku, settings, now_ms, operation } => {
                if self.skus.contains_key(&sku) {
                    return Err(format!("SKU {sku} created twice"));
                }
                let state = SkuState::created(now_ms, settings, self.limits.clone(), operation)
                    .map_err(|error| format!("SKU {sku}: {error}"))?;
                self.skus.insert(sku, state);
            }
            LogRecord::RulesInForce { limits } => self.put_in_force(limits),
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
            LogRecord::Coordinator(record) => self.coordinator.apply(record),
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

    /// The coordinator records a restart needs (orders settled longer ago
    /// than the idempotency window in force left out).
    pub fn coordinator_records(&self) -> Vec<crate::coordination::CoordinatorRecord> {
        self.coordinator.records(self.limits.idempotency_window_ms)
    }

    /// The canonical snapshot of this state.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            last_sequence: self.last_sequence,
            partition_count: self.rules.partition_count,
            limits: self.limits_recorded().cloned(),
            skus: self.skus.iter().map(|(sku, state)| (sku.clone(), state.image())).collect(),
            transactions: self.transactions.iter().map(|(order, open)| (order.clone(), open.clone())).collect(),
            coordinator: self.coordinator_records(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sku::SkuSettings;

    fn rules(partition_count: u32) -> ReplayRules {
        ReplayRules { partition_count, limits_unrecorded: Limits::default() }
    }

    fn sku() -> SkuId {
        SkuId::new("sku").expect("valid")
    }

    fn create(settings: SkuSettings) -> LogRecord {
        LogRecord::CreateSku { sku: sku(), settings, now_ms: 0, operation: None }
    }

    fn add_stock(units: u64) -> SkuCommand {
        SkuCommand::Admin { operation: None, change: crate::sku::AdminChange::AddStock { units } }
    }

    /// A record applied under limits that were later changed means what it
    /// meant then: a reserve logged under a 600 s TTL limit still holds
    /// after the limit drops to 300 s, and the creation of a SKU larger
    /// than a later `stock_units_max` still creates it.
    #[test]
    fn records_replay_under_the_limits_in_force_when_they_were_written() {
        let generous = Limits { hold_ttl_ms_max: 600_000, stock_units_max: 100, ..Limits::default() };
        let strict = Limits { hold_ttl_ms_max: 300_000, stock_units_max: 10, ..Limits::default() };
        let mut state = ReplayedState::empty(ReplayRules { partition_count: 4, limits_unrecorded: strict.clone() });
        assert_eq!(state.limits_recorded(), None);
        state.apply(1, LogRecord::RulesInForce { limits: generous.clone() }).expect("rules");
        state.apply(2, create(SkuSettings { initial_units: 50, ..SkuSettings::default() })).expect("creates");
        let line = crate::sku::ReserveLine {
            order: OrderId::new("o").expect("valid"),
            buyer: crate::ids::BuyerId::new("b").expect("valid"),
            quantity: crate::sku::Quantity::Exactly(3),
            ttl_ms: 600_000,
        };
        state.apply(3, LogRecord::Apply { sku: sku(), now_ms: 0, command: SkuCommand::Reserve(line) }).expect("holds");
        state.apply(4, LogRecord::RulesInForce { limits: strict.clone() }).expect("rules");
        let commit = SkuCommand::Commit { order: OrderId::new("o").expect("valid"), units: None };
        state.apply(5, LogRecord::Apply { sku: sku(), now_ms: 1, command: commit }).expect("commits");
        assert_eq!(state.skus[&sku()].stock().sold, 3);
        assert_eq!(state.skus[&sku()].limits(), &strict, "the SKU checks new commands against the new limits");
        let restored = ReplayedState::from_snapshot(rules(4), state.snapshot()).expect("restores");
        assert_eq!(restored.limits_recorded(), Some(&strict), "the snapshot carries the limits in force");
        assert_eq!(restored.snapshot().encode(), state.snapshot().encode());
    }

    #[test]
    fn records_apply_in_order_and_a_snapshot_restores_the_same_state() {
        let mut state = ReplayedState::empty(rules(4));
        let settings = SkuSettings { initial_units: 10, ..SkuSettings::default() };
        state.apply(1, create(settings)).expect("creates");
        let add = LogRecord::Apply { sku: sku(), now_ms: 5, command: add_stock(3) };
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
        let create = create(SkuSettings::default());
        assert!(state.apply(2, create.clone()).expect_err("gap").contains("expected record 1"));
        let add = LogRecord::Apply { sku: sku(), now_ms: 0, command: add_stock(1) };
        assert!(state.apply(1, add).expect_err("unknown").contains("no SKU"));
        state.apply(1, create.clone()).expect("creates");
        assert!(state.apply(2, create).expect_err("twice").contains("twice"));
        assert_eq!(state.last_sequence, 1, "a refused record leaves the state as it was");
    }
}
