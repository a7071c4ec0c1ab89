//! A partition's state rebuilt from its snapshot and log records: the one
//! definition of what a record means, shared by recovery (which then hands
//! the SKUs to their actors) and by compaction (which writes the result as
//! the next snapshot). Pure: no IO, no clock.

use std::collections::BTreeMap;

use crate::ids::SkuId;
use crate::limits::Limits;
use crate::log::record::LogRecord;
use crate::log::snapshot::PartitionSnapshot;
use crate::partition::partition_of;
use crate::sku::SkuState;

/// Every SKU of one partition, as of the last record applied.
#[derive(Debug)]
pub struct PartitionState {
    partition: u32,
    partition_count: u32,
    limits: Limits,
    /// Sorted, so that snapshots come out canonical.
    pub skus: BTreeMap<SkuId, SkuState>,
    /// Sequence number of the last record applied (0 before any).
    pub last_sequence: u64,
}

impl PartitionState {
    /// The state an empty log describes.
    pub fn empty(partition: u32, partition_count: u32, limits: Limits) -> Self {
        Self { partition, partition_count, limits, skus: BTreeMap::new(), last_sequence: 0 }
    }

    /// The state `snapshot` describes; a snapshot that breaks an invariant
    /// (or holds another partition's SKU) is refused with the reason.
    pub fn from_snapshot(
        partition: u32,
        partition_count: u32,
        limits: Limits,
        snapshot: PartitionSnapshot,
    ) -> Result<Self, String> {
        let mut state = Self::empty(partition, partition_count, limits);
        state.last_sequence = snapshot.last_sequence;
        for (sku, image) in snapshot.skus {
            state.check_owned(&sku)?;
            let restored =
                SkuState::from_image(image, state.limits.clone()).map_err(|error| format!("SKU {sku}: {error}"))?;
            state.skus.insert(sku, restored);
        }
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
                self.check_owned(&sku)?;
                if self.skus.contains_key(&sku) {
                    return Err(format!("SKU {sku} created twice"));
                }
                let state =
                    SkuState::new(settings, self.limits.clone()).map_err(|error| format!("SKU {sku}: {error}"))?;
                self.skus.insert(sku, state);
            }
            LogRecord::Apply { sku, now_ms, command } => {
                let state = self.skus.get_mut(&sku).ok_or_else(|| format!("no SKU {sku}"))?;
                // The answer was given when the command was first applied;
                // replay only needs the state it left.
                state.apply(now_ms, &command);
            }
        }
        self.last_sequence = sequence;
        Ok(())
    }

    /// The canonical snapshot of this state.
    pub fn snapshot(&self) -> PartitionSnapshot {
        PartitionSnapshot {
            last_sequence: self.last_sequence,
            skus: self.skus.iter().map(|(sku, state)| (sku.clone(), state.image())).collect(),
        }
    }

    fn check_owned(&self, sku: &SkuId) -> Result<(), String> {
        if partition_of(sku, self.partition_count) != self.partition {
            return Err(format!("SKU {sku} belongs to another partition"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sku::{SkuCommand, SkuSettings};

    fn sku_in(partition: u32, partition_count: u32) -> SkuId {
        (0..)
            .map(|index| SkuId::new(format!("sku-{index}")).expect("valid"))
            .find(|sku| partition_of(sku, partition_count) == partition)
            .expect("some SKU lands in every partition")
    }

    #[test]
    fn records_apply_in_order_and_a_snapshot_restores_the_same_state() {
        let sku = sku_in(1, 4);
        let mut state = PartitionState::empty(1, 4, Limits::default());
        let settings = SkuSettings { initial_units: 10, ..SkuSettings::default() };
        state.apply(1, LogRecord::CreateSku { sku: sku.clone(), settings }).expect("creates");
        let add = LogRecord::Apply { sku: sku.clone(), now_ms: 5, command: SkuCommand::AddStock { units: 3 } };
        state.apply(2, add.clone()).expect("applies");
        assert_eq!(state.skus[&sku].stock().available, 13);

        let restored = PartitionState::from_snapshot(1, 4, Limits::default(), state.snapshot()).expect("restores");
        assert_eq!(restored.snapshot().encode(), state.snapshot().encode());
        assert_eq!(restored.last_sequence, 2);
    }

    #[test]
    fn records_that_cannot_follow_are_refused_with_a_reason() {
        let (mine, foreign) = (sku_in(1, 4), sku_in(2, 4));
        let mut state = PartitionState::empty(1, 4, Limits::default());
        let create = |sku: &SkuId| LogRecord::CreateSku { sku: sku.clone(), settings: SkuSettings::default() };
        assert!(state.apply(2, create(&mine)).expect_err("gap").contains("expected record 1"));
        assert!(state.apply(1, create(&foreign)).expect_err("foreign").contains("another partition"));
        let add = LogRecord::Apply { sku: mine.clone(), now_ms: 0, command: SkuCommand::AddStock { units: 1 } };
        assert!(state.apply(1, add).expect_err("unknown").contains("no SKU"));
        state.apply(1, create(&mine)).expect("creates");
        assert!(state.apply(2, create(&mine)).expect_err("twice").contains("twice"));
        assert_eq!(state.last_sequence, 1, "a refused record leaves the state as it was");
    }
}
