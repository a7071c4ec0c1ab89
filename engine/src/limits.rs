//! Every bound the engine enforces, with the reason for its default.
//!
//! Limits are configuration, not constants, so an operator can tighten them
//! for a sale; [`Limits::validate`] checks the relations between them.

/// Bounds on what callers may ask for and on what the engine keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest quantity on one order line. Flash-sale lines are small; a line
    /// for millions of units is a bug or an attack, not a buyer.
    pub line_units_max: u32,
    /// Shortest hold. Anything shorter expires before a payment could finish.
    pub hold_ttl_ms_min: u64,
    /// Longest hold. Held units are invisible to other buyers; an hour is
    /// longer than any checkout and bounds how long a dead client locks stock.
    pub hold_ttl_ms_max: u64,
    /// Most live holds on one SKU. Each costs ~150 bytes in the SKU's actor.
    pub holds_per_sku_max: usize,
    /// Most ended reservations remembered per SKU for idempotent retries.
    /// The oldest are forgotten first.
    pub finished_per_sku_max: usize,
    /// How long an ended reservation is remembered for idempotent retries.
    /// Longer than any client's retry budget.
    pub idempotency_window_ms: u64,
    /// Most units a SKU may ever hold in stock. Keeps every sum of counts far
    /// from `u64` overflow.
    pub stock_units_max: u64,
    /// Most lines in one order. All lines are held in parallel, so this bounds
    /// the fan-out of one request.
    pub lines_per_order_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            line_units_max: 10_000,
            hold_ttl_ms_min: 1_000,
            hold_ttl_ms_max: 3_600_000,
            holds_per_sku_max: 1_000_000,
            finished_per_sku_max: 1_000_000,
            idempotency_window_ms: 24 * 3_600_000,
            stock_units_max: 1_000_000_000_000,
            lines_per_order_max: 64,
        }
    }
}

/// A limit that contradicts another, named by its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("limit `{field}` is invalid: {reason}")]
pub struct InvalidLimits {
    pub field: &'static str,
    pub reason: &'static str,
}

impl Limits {
    pub fn validate(&self) -> Result<(), InvalidLimits> {
        let checks = [
            (self.line_units_max == 0, "line_units_max", "must be at least 1"),
            (self.hold_ttl_ms_min == 0, "hold_ttl_ms_min", "must be at least 1"),
            (self.hold_ttl_ms_max < self.hold_ttl_ms_min, "hold_ttl_ms_max", "must not be below hold_ttl_ms_min"),
            (self.holds_per_sku_max == 0, "holds_per_sku_max", "must be at least 1"),
            (
                self.idempotency_window_ms < self.hold_ttl_ms_max,
                "idempotency_window_ms",
                "must cover hold_ttl_ms_max, or a retry could outlive the memory of its hold",
            ),
            (
                self.stock_units_max == 0 || self.stock_units_max > u64::MAX / 4,
                "stock_units_max",
                "must be between 1 and u64::MAX / 4",
            ),
            (self.lines_per_order_max == 0, "lines_per_order_max", "must be at least 1"),
        ];
        first_violation(checks)
    }
}

/// The first check whose condition holds (`(broken, field, reason)`), as an
/// error naming its field.
pub(crate) fn first_violation<const N: usize>(
    checks: [(bool, &'static str, &'static str); N],
) -> Result<(), InvalidLimits> {
    match checks.into_iter().find(|(broken, _, _)| *broken) {
        Some((_, field, reason)) => Err(InvalidLimits { field, reason }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_contradictions_are_named() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let limits = Limits { hold_ttl_ms_max: 10, hold_ttl_ms_min: 20, ..Limits::default() };
        assert_eq!(limits.validate().map_err(|error| error.field), Err("hold_ttl_ms_max"));
    }
}
