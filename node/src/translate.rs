//! The one place where wire types and engine types meet: refusals from
//! engine errors, line results, and the coordinator's part steps and
//! answers in both directions.

use flashstock_client::wire::{
    Refusal, WireLine, WireLineResult, WirePartAnswer, WirePartRequest, WireQuantity, WireStock,
};
use flashstock_engine::coordination::{ClientAnswer, PartAnswer, PartRequest};
use flashstock_engine::{BuyerId, EngineError, OrderError, Quantity, ReservedLine, SkuError, SkuId, StockSnapshot};

pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> Refusal {
    Refusal::Invalid { field: field.to_owned(), reason: reason.into() }
}

pub(crate) fn wire_stock(stock: StockSnapshot) -> WireStock {
    WireStock { available: stock.available, held: stock.held, sold: stock.sold }
}

pub(crate) fn wire_line(line: &ReservedLine) -> WireLineResult {
    WireLineResult { sku: line.sku.as_str().to_owned(), units: line.units, stock: wire_stock(line.stock) }
}

pub(crate) fn sku_refusal(line: u32, sku: &SkuId, error: SkuError) -> Refusal {
    let sku_name = sku.as_str().to_owned();
    match error {
        SkuError::SoldOut { available } => Refusal::SoldOut { line, sku: sku_name, available },
        SkuError::LimitExceeded { units_per_buyer_max, units_taken } => {
            Refusal::LimitExceeded { line, sku: sku_name, units_per_buyer_max, units_taken }
        }
        SkuError::NotOpen { opens_at_ms } => Refusal::NotOpen { line, sku: sku_name, opens_at_ms },
        SkuError::HoldLimitReached { .. } => Refusal::HoldLimitReached { line, sku: sku_name },
        SkuError::NotEnoughUnsoldStock { available } => Refusal::NotEnoughUnsoldStock { sku: sku_name, available },
        SkuError::Expired { expired_at_ms } => Refusal::Expired { expired_at_ms },
        SkuError::AlreadyCommitted => Refusal::AlreadyCommitted,
        SkuError::AlreadyReleased => Refusal::AlreadyReleased,
        SkuError::UnknownReservation => Refusal::UnknownReservation,
        SkuError::IdempotencyConflict => Refusal::IdempotencyConflict,
        SkuError::AlreadyCreated => Refusal::SkuExists { sku: sku_name },
        error @ (SkuError::InvalidQuantity { .. } | SkuError::InvalidTtl { .. }) => {
            invalid(&format!("lines[{line}]"), error.to_string())
        }
        error @ SkuError::StockLimitExceeded { .. } => invalid("units", error.to_string()),
    }
}

pub(crate) fn engine_refusal(error: EngineError) -> Refusal {
    match error {
        EngineError::UnknownSku { sku } => Refusal::UnknownSku { sku: sku.as_str().to_owned() },
        EngineError::SkuExists { sku } => Refusal::SkuExists { sku: sku.as_str().to_owned() },
        EngineError::Refused { sku, error, .. } => sku_refusal(0, &sku, error),
        EngineError::Busy { retry_after_ms } => Refusal::Busy { retry_after_ms },
        EngineError::Unavailable => Refusal::Unavailable { reason: "the SKU's owner cannot answer now".to_owned() },
    }
}

pub(crate) fn order_refusal(error: OrderError) -> Refusal {
    let line_index = |index: usize| u32::try_from(index).unwrap_or(u32::MAX);
    match error {
        OrderError::Line { index, sku, error, .. } => sku_refusal(line_index(index), &sku, error),
        OrderError::UnknownSku { sku, .. } => Refusal::UnknownSku { sku: sku.as_str().to_owned() },
        OrderError::IdempotencyConflict => Refusal::IdempotencyConflict,
        OrderError::UnknownReservation => Refusal::UnknownReservation,
        OrderError::Expired { expired_at_ms } => Refusal::Expired { expired_at_ms },
        OrderError::AlreadyCommitted => Refusal::AlreadyCommitted,
        OrderError::AlreadyReleased => Refusal::AlreadyReleased,
        OrderError::Busy { retry_after_ms } => Refusal::Busy { retry_after_ms },
        OrderError::Unavailable => Refusal::Unavailable { reason: "the engine cannot answer now".to_owned() },
        error @ (OrderError::NoLines
        | OrderError::TooManyLines { .. }
        | OrderError::ConflictingLines { .. }
        | OrderError::MergedQuantityTooLarge { .. }) => invalid("lines", error.to_string()),
        error @ (OrderError::NotInOrder { .. } | OrderError::InvalidUnits { .. }) => {
            invalid("fewer", error.to_string())
        }
    }
}

pub(crate) fn sku_id(sku: String) -> Result<SkuId, Refusal> {
    SkuId::new(sku).map_err(|error| invalid("sku", error.to_string()))
}

pub(crate) fn engine_quantity(quantity: WireQuantity) -> Quantity {
    match quantity {
        WireQuantity::Exactly(units) => Quantity::Exactly(units),
        WireQuantity::UpTo { max, min } => Quantity::UpTo { max, min },
    }
}

fn wire_quantity(quantity: Quantity) -> WireQuantity {
    match quantity {
        Quantity::Exactly(units) => WireQuantity::Exactly(units),
        Quantity::UpTo { max, min } => WireQuantity::UpTo { max, min },
    }
}

/// A part step for the wire.
pub(crate) fn wire_part_request(request: &PartRequest) -> WirePartRequest {
    let names = |skus: &[SkuId]| skus.iter().map(|sku| sku.as_str().to_owned()).collect();
    match request {
        PartRequest::Reserve { buyer, lines, ttl_ms } => WirePartRequest::Reserve {
            buyer: buyer.as_str().to_owned(),
            lines: lines
                .iter()
                .map(|(sku, quantity)| WireLine { sku: sku.as_str().to_owned(), quantity: wire_quantity(*quantity) })
                .collect(),
            ttl_ms: *ttl_ms,
        },
        PartRequest::Prepare { skus } => WirePartRequest::Prepare { skus: names(skus) },
        PartRequest::Commit { lines } => WirePartRequest::Commit {
            lines: lines.iter().map(|(sku, units)| (sku.as_str().to_owned(), *units)).collect(),
        },
        PartRequest::Release { skus } => WirePartRequest::Release { skus: names(skus) },
    }
}

/// A part step from the wire; an id that is not one is `Invalid`.
pub(crate) fn part_request(request: WirePartRequest) -> Result<PartRequest, Refusal> {
    let skus = |names: Vec<String>| names.into_iter().map(sku_id).collect::<Result<Vec<_>, _>>();
    Ok(match request {
        WirePartRequest::Reserve { buyer, lines, ttl_ms } => PartRequest::Reserve {
            buyer: BuyerId::new(buyer).map_err(|error| invalid("buyer", error.to_string()))?,
            lines: lines
                .into_iter()
                .map(|line| Ok((sku_id(line.sku)?, engine_quantity(line.quantity))))
                .collect::<Result<_, Refusal>>()?,
            ttl_ms,
        },
        WirePartRequest::Prepare { skus: names } => PartRequest::Prepare { skus: skus(names)? },
        WirePartRequest::Commit { lines } => PartRequest::Commit {
            lines: lines.into_iter().map(|(sku, units)| Ok((sku_id(sku)?, units))).collect::<Result<_, Refusal>>()?,
        },
        WirePartRequest::Release { skus: names } => PartRequest::Release { skus: skus(names)? },
    })
}

/// The SKU of the part's line `line`, for a refusal that names it.
fn part_line_sku(request: &PartRequest, line: usize) -> Option<SkuId> {
    match request {
        PartRequest::Reserve { lines, .. } => lines.get(line).map(|(sku, _)| sku.clone()),
        PartRequest::Commit { lines } => lines.get(line).map(|(sku, _)| sku.clone()),
        PartRequest::Prepare { skus } | PartRequest::Release { skus } => skus.get(line).cloned(),
    }
}

/// A part's answer for the wire.
pub(crate) fn wire_part_answer(request: &PartRequest, answer: PartAnswer) -> WirePartAnswer {
    wire_part_answer_naming(|line| part_line_sku(request, line), answer)
}

/// A part's answer for the wire where the step is not at hand: a refused
/// line is named by its index only (all a coordinator reads of it).
pub(crate) fn wire_part_answer_unnamed(answer: PartAnswer) -> WirePartAnswer {
    wire_part_answer_naming(|_| None, answer)
}

fn wire_part_answer_naming(line_sku: impl Fn(usize) -> Option<SkuId>, answer: PartAnswer) -> WirePartAnswer {
    let index = |line: usize| u32::try_from(line).unwrap_or(u32::MAX);
    let sku = |line: usize| line_sku(line).unwrap_or_else(|| SkuId::new("?").expect("valid"));
    match answer {
        PartAnswer::Held { units, stock, expires_at_ms } => {
            WirePartAnswer::Held { units, stock: stock.into_iter().map(wire_stock).collect(), expires_at_ms }
        }
        PartAnswer::Prepared => WirePartAnswer::Prepared,
        PartAnswer::Committed { units, stock } => {
            WirePartAnswer::Committed { units, stock: stock.into_iter().map(wire_stock).collect() }
        }
        PartAnswer::Released => WirePartAnswer::Released,
        PartAnswer::Refused { line, error } => {
            WirePartAnswer::Refused { line: index(line), refusal: sku_refusal(index(line), &sku(line), error) }
        }
        PartAnswer::UnknownSku { line } => WirePartAnswer::Refused {
            line: index(line),
            refusal: Refusal::UnknownSku { sku: sku(line).as_str().to_owned() },
        },
    }
}

/// A part's answer from the wire; `None` for a refusal that is no answer
/// of a line (the step is sent again).
pub(crate) fn part_answer(answer: WirePartAnswer) -> Option<PartAnswer> {
    Some(match answer {
        WirePartAnswer::Held { units, stock, expires_at_ms } => {
            PartAnswer::Held { units, stock: stock.into_iter().map(engine_stock).collect(), expires_at_ms }
        }
        WirePartAnswer::Prepared => PartAnswer::Prepared,
        WirePartAnswer::Committed { units, stock } => {
            PartAnswer::Committed { units, stock: stock.into_iter().map(engine_stock).collect() }
        }
        WirePartAnswer::Released => PartAnswer::Released,
        WirePartAnswer::Refused { line, refusal } => {
            let line = usize::try_from(line).ok()?;
            let error = match refusal {
                Refusal::UnknownSku { .. } => return Some(PartAnswer::UnknownSku { line }),
                Refusal::SoldOut { available, .. } => SkuError::SoldOut { available },
                Refusal::LimitExceeded { units_per_buyer_max, units_taken, .. } => {
                    SkuError::LimitExceeded { units_per_buyer_max, units_taken }
                }
                Refusal::NotOpen { opens_at_ms, .. } => SkuError::NotOpen { opens_at_ms },
                Refusal::HoldLimitReached { .. } => SkuError::HoldLimitReached { holds_per_sku_max: 0 },
                Refusal::NotEnoughUnsoldStock { available, .. } => SkuError::NotEnoughUnsoldStock { available },
                Refusal::Expired { expired_at_ms } => SkuError::Expired { expired_at_ms },
                Refusal::AlreadyCommitted => SkuError::AlreadyCommitted,
                Refusal::AlreadyReleased => SkuError::AlreadyReleased,
                Refusal::UnknownReservation => SkuError::UnknownReservation,
                Refusal::IdempotencyConflict => SkuError::IdempotencyConflict,
                Refusal::SkuExists { .. } => SkuError::AlreadyCreated,
                Refusal::Invalid { .. } => SkuError::InvalidQuantity { detail: "the part refused the line as invalid" },
                _ => return None,
            };
            PartAnswer::Refused { line, error }
        }
    })
}

fn engine_stock(stock: WireStock) -> StockSnapshot {
    StockSnapshot { available: stock.available, held: stock.held, sold: stock.sold }
}

/// The coordinator's answer to a client, for the wire.
pub(crate) fn client_response(
    home_partition: u32,
    answer: ClientAnswer,
) -> Result<flashstock_client::wire::Response, Refusal> {
    use flashstock_client::wire::Response;
    let lines = |lines: Vec<(SkuId, u32)>, stock: Vec<StockSnapshot>| {
        lines
            .into_iter()
            .zip(stock)
            .map(|((sku, units), stock)| WireLineResult {
                sku: sku.as_str().to_owned(),
                units,
                stock: wire_stock(stock),
            })
            .collect()
    };
    match answer {
        ClientAnswer::Reserved { order, expires_at_ms, lines: held, stock, .. } => Ok(Response::Reserved {
            order: order.as_str().to_owned(),
            home_partition,
            expires_at_ms,
            lines: lines(held, stock),
        }),
        ClientAnswer::Committed { order, lines: sold, stock, replayed } => {
            Ok(Response::Settled { order: order.as_str().to_owned(), lines: lines(sold, stock), replayed })
        }
        ClientAnswer::Released { order, lines: returned, stock, replayed } => {
            Ok(Response::Settled { order: order.as_str().to_owned(), lines: lines(returned, stock), replayed })
        }
        ClientAnswer::Refused(error) => Err(order_refusal(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine's and the wire's `is_retryable` are one classification:
    /// every engine refusal keeps it through the translation (they once
    /// disagreed about `HoldLimitReached`).
    #[test]
    fn retryable_refusals_stay_retryable_through_the_translation() {
        let sku = SkuId::new("tv").expect("valid");
        let line = |error| OrderError::Line { index: 0, sku: sku.clone(), error, stock: StockSnapshot::default() };
        let errors = [
            OrderError::Busy { retry_after_ms: 5 },
            OrderError::Unavailable,
            line(SkuError::HoldLimitReached { holds_per_sku_max: 3 }),
            line(SkuError::SoldOut { available: 0 }),
            line(SkuError::LimitExceeded { units_per_buyer_max: 1, units_taken: 1 }),
            line(SkuError::NotOpen { opens_at_ms: 9 }),
            line(SkuError::Expired { expired_at_ms: 1 }),
            OrderError::IdempotencyConflict,
            OrderError::UnknownReservation,
            OrderError::Expired { expired_at_ms: 1 },
            OrderError::AlreadyCommitted,
            OrderError::AlreadyReleased,
            OrderError::NoLines,
        ];
        for error in errors {
            let retryable = error.is_retryable();
            let refusal = order_refusal(error.clone());
            assert_eq!(refusal.is_retryable(), retryable, "{error:?} became {refusal:?}");
            let client_error = flashstock_client::Error::from(refusal);
            assert_eq!(client_error.is_retryable(), retryable, "{error:?} reached the client as {client_error:?}");
        }
    }

    /// A part's refusal of a line crosses the wire as the same SKU error
    /// (for the coordinator's decision) and the same line.
    #[test]
    fn part_answers_survive_the_wire() {
        let request =
            PartRequest::Prepare { skus: vec![SkuId::new("a").expect("valid"), SkuId::new("b").expect("valid")] };
        for answer in [
            PartAnswer::Prepared,
            PartAnswer::Held { units: vec![1, 2], stock: vec![StockSnapshot::default(); 2], expires_at_ms: 9 },
            PartAnswer::Committed { units: vec![3], stock: vec![StockSnapshot { available: 1, held: 2, sold: 3 }] },
            PartAnswer::Released,
            PartAnswer::Refused { line: 1, error: SkuError::Expired { expired_at_ms: 4 } },
            PartAnswer::Refused { line: 0, error: SkuError::SoldOut { available: 2 } },
            PartAnswer::Refused { line: 1, error: SkuError::AlreadyCommitted },
            PartAnswer::UnknownSku { line: 1 },
        ] {
            let back = part_answer(wire_part_answer(&request, answer.clone()));
            assert_eq!(back, Some(answer));
        }
        assert_eq!(part_request(wire_part_request(&request)).expect("valid"), request);
    }
}
