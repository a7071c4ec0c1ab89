//! Orders of one or more lines: what callers send and get back.
//!
//! An order is all-or-nothing: [`crate::Engine::reserve`] holds every line or
//! none. This module holds the pure part: validating an order and merging
//! lines that name the same SKU, so that a SKU is never asked twice for one
//! order (which would double-count its units against stock and buyer limits).

use crate::ids::{BuyerId, OrderId, SkuId};
use crate::limits::Limits;
use crate::sku::{Quantity, SkuError, StockSnapshot};

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub sku: SkuId,
    pub quantity: Quantity,
}

/// A request to hold stock for an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRequest {
    /// The idempotency key: a retry with the same id and content returns the
    /// same reservation.
    pub order: OrderId,
    pub buyer: BuyerId,
    pub lines: Vec<Line>,
    /// How long the hold lasts before its units go back to stock.
    pub ttl_ms: u64,
}

/// A held line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservedLine {
    pub sku: SkuId,
    pub units: u32,
    /// The SKU's counts right after the hold.
    pub stock: StockSnapshot,
}

/// Stock held for an order. The order id names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub order: OrderId,
    /// When the earliest line expires; commit before then.
    pub expires_at_ms: u64,
    pub lines: Vec<ReservedLine>,
}

/// A committed or released order, line by line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub order: OrderId,
    /// Units sold (commit) or returned to stock (release) per line.
    pub lines: Vec<ReservedLine>,
    /// True when this answers a retry of a commit or release already done.
    pub replayed: bool,
}

/// Where an order stands, as the engine that owns its id knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderStatus {
    /// Its lines are being held, committed or released right now.
    InProgress,
    Held(Reservation),
    Committed(Settlement),
    Released(Settlement),
    /// Its holds ran out (or a commit came too late to be decided).
    Expired {
        expired_at_ms: u64,
    },
}

/// Why an order was refused. A refused order holds nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("an order needs at least one line")]
    NoLines,
    #[error("an order may have at most {lines_per_order_max} lines")]
    TooManyLines { lines_per_order_max: usize },
    #[error("line {index} names SKU {sku} again with a different kind of quantity")]
    ConflictingLines { index: usize, sku: SkuId },
    #[error("line {index}: quantities for SKU {sku} add up to more than a line allows")]
    MergedQuantityTooLarge { index: usize, sku: SkuId },
    #[error("line {index}: no SKU {sku}")]
    UnknownSku { index: usize, sku: SkuId },
    /// The line that failed, why, and the SKU's counts at that moment.
    #[error("line {index} (SKU {sku}): {error}")]
    Line { index: usize, sku: SkuId, error: SkuError, stock: StockSnapshot },
    #[error("the order id was already used for a different request")]
    IdempotencyConflict,
    #[error("no reservation for this order")]
    UnknownReservation,
    #[error("SKU {sku} is not a line of this order, or is named twice")]
    NotInOrder { sku: SkuId },
    #[error("cannot commit {units} units of SKU {sku}: the hold has {held}")]
    InvalidUnits { sku: SkuId, units: u32, held: u32 },
    #[error("the reservation expired at {expired_at_ms} ms")]
    Expired { expired_at_ms: u64 },
    #[error("the reservation is already committed")]
    AlreadyCommitted,
    #[error("the reservation is already released")]
    AlreadyReleased,
    #[error("busy: retry after {retry_after_ms} ms")]
    Busy { retry_after_ms: u64 },
    #[error("the engine is shutting down or the SKU's owner stopped; retry")]
    Unavailable,
}

impl OrderError {
    /// Errors a caller may retry with the same order id: the same
    /// classification as the wire's `Refusal::is_retryable` (the node's
    /// translation is tested to keep the two equal).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            OrderError::Busy { .. }
                | OrderError::Unavailable
                | OrderError::Line { error: crate::sku::SkuError::HoldLimitReached { .. }, .. }
        )
    }
}

/// An order line after merging, with the index of its first appearance in
/// the request (errors name that index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MergedLine {
    pub index: usize,
    pub sku: SkuId,
    pub quantity: Quantity,
}

/// Validates the shape of `request` and merges lines naming the same SKU:
/// exact quantities add up; "up to" quantities add their maxima and minima;
/// an exact and an "up to" line for one SKU are refused as ambiguous.
pub(crate) fn merge_lines(request: &OrderRequest, limits: &Limits) -> Result<Vec<MergedLine>, OrderError> {
    if request.lines.is_empty() {
        return Err(OrderError::NoLines);
    }
    if request.lines.len() > limits.lines_per_order_max {
        return Err(OrderError::TooManyLines { lines_per_order_max: limits.lines_per_order_max });
    }
    let mut merged: Vec<MergedLine> = Vec::with_capacity(request.lines.len());
    for (index, line) in request.lines.iter().enumerate() {
        let Some(existing) = merged.iter_mut().find(|merged_line| merged_line.sku == line.sku) else {
            merged.push(MergedLine { index, sku: line.sku.clone(), quantity: line.quantity });
            continue;
        };
        let too_large = || OrderError::MergedQuantityTooLarge { index, sku: line.sku.clone() };
        existing.quantity = match (existing.quantity, line.quantity) {
            (Quantity::Exactly(first), Quantity::Exactly(second)) => {
                Quantity::Exactly(first.checked_add(second).ok_or_else(too_large)?)
            }
            (Quantity::UpTo { max: max_a, min: min_a }, Quantity::UpTo { max: max_b, min: min_b }) => Quantity::UpTo {
                max: max_a.checked_add(max_b).ok_or_else(too_large)?,
                min: min_a.checked_add(min_b).ok_or_else(too_large)?,
            },
            _ => return Err(OrderError::ConflictingLines { index, sku: line.sku.clone() }),
        };
        let max = match existing.quantity {
            Quantity::Exactly(units) => units,
            Quantity::UpTo { max, .. } => max,
        };
        if max > limits.line_units_max {
            return Err(too_large());
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(lines: &[(&str, Quantity)]) -> OrderRequest {
        OrderRequest {
            order: OrderId::new("order-1").expect("id"),
            buyer: BuyerId::new("buyer-1").expect("id"),
            lines: lines
                .iter()
                .map(|(sku, quantity)| Line { sku: SkuId::new(sku).expect("id"), quantity: *quantity })
                .collect(),
            ttl_ms: 60_000,
        }
    }

    #[test]
    fn same_sku_lines_are_merged_not_double_counted() {
        let limits = Limits::default();
        let merged = merge_lines(
            &request(&[("a", Quantity::Exactly(2)), ("b", Quantity::Exactly(1)), ("a", Quantity::Exactly(3))]),
            &limits,
        )
        .expect("valid order");
        assert_eq!(merged.len(), 2);
        assert_eq!((merged[0].index, merged[0].quantity), (0, Quantity::Exactly(5)));
        assert_eq!(merged[1].sku.as_str(), "b");
    }

    #[test]
    fn mixed_kinds_for_one_sku_and_bad_shapes_are_refused() {
        let limits = Limits::default();
        let mixed = request(&[("a", Quantity::Exactly(2)), ("a", Quantity::UpTo { max: 3, min: 1 })]);
        assert!(matches!(merge_lines(&mixed, &limits), Err(OrderError::ConflictingLines { index: 1, .. })));
        assert_eq!(merge_lines(&request(&[]), &limits), Err(OrderError::NoLines));
        let huge = request(&[("a", Quantity::Exactly(u32::MAX)), ("a", Quantity::Exactly(2))]);
        assert!(matches!(merge_lines(&huge, &limits), Err(OrderError::MergedQuantityTooLarge { .. })));
        let over = request(&[("a", Quantity::Exactly(6_000)), ("a", Quantity::Exactly(6_000))]);
        assert!(matches!(merge_lines(&over, &limits), Err(OrderError::MergedQuantityTooLarge { .. })));
    }
}
