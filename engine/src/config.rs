//! [`EngineConfig`]: how the engine runs, every bound with its unit and
//! reason, and the checks of the relations between them.

use crate::limits::{first_violation, InvalidLimits, Limits};

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
