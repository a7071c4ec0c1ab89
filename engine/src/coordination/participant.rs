//! The participant side of an order: one member's lines of it (its *part*).
//!
//! Stateless beyond the SKUs themselves: every step is one idempotent SKU
//! command per line, applied in line order, so a step cut off part-way (a
//! crash, a lost answer) is finished by sending it again, and there is no
//! per-order phase on the participant that could be left stuck. The part
//! is named by its attempt id, unique to one attempt of one order in the
//! whole cluster, so that two attempts can never meet the same holds.

use std::collections::BTreeMap;

use crate::ids::{BuyerId, OrderId, SkuId};
use crate::log::record::LogRecord;
use crate::sku::{Quantity, ReserveLine, SkuCommand, SkuError, SkuOutcome, SkuState, StockSnapshot};

/// What a coordinator asks of a part. Every request names the part's lines
/// in the same order, and each is idempotent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartRequest {
    /// Hold every line, or none: a line refused undoes the lines before it
    /// (aborted, so that the same request sent again holds them afresh).
    Reserve { buyer: BuyerId, lines: Vec<(SkuId, Quantity)>, ttl_ms: u64 },
    /// Stop every line's hold from expiring: it now waits for a decision.
    Prepare { skus: Vec<SkuId> },
    /// Sell `units` of each line (all it holds when `None`).
    Commit { lines: Vec<(SkuId, Option<u32>)> },
    /// Give every line's units back; a line that already ended unsold (or
    /// was never held) is done already.
    Release { skus: Vec<SkuId> },
}

/// A part's answer to one [`PartRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartAnswer {
    /// Every line held: units per line, each SKU's counts right after,
    /// and when the earliest hold expires.
    Held {
        units: Vec<u32>,
        stock: Vec<StockSnapshot>,
        expires_at_ms: u64,
    },
    Prepared,
    /// Units sold per line, and each SKU's counts right after.
    Committed {
        units: Vec<u32>,
        stock: Vec<StockSnapshot>,
    },
    Released,
    /// The part's line `line` refused (its index among the part's lines).
    Refused {
        line: usize,
        error: SkuError,
    },
    /// The part's line `line` names a SKU this member does not have.
    UnknownSku {
        line: usize,
    },
}

/// One line's command of a part step, and how its result is judged: the
/// one definition of a step, shared by [`apply_part`] (on SKU states, for
/// the simulator) and the engine's participant (through the SKU actors).
#[derive(Debug)]
pub struct PartStep<'a> {
    attempt: &'a OrderId,
    request: &'a PartRequest,
    /// Units held or sold per line so far, each SKU's counts after its
    /// line, and the earliest expiry.
    units: Vec<u32>,
    stock: Vec<StockSnapshot>,
    expires_at_ms: u64,
}

/// What comes after one line's result.
#[derive(Debug, PartialEq, Eq)]
pub enum LineVerdict {
    /// On to the next line.
    Next,
    /// The step ends with this answer, after the undo commands (one per
    /// line before this one, in order) are applied.
    Refused { answer: PartAnswer, undo: Vec<(SkuId, SkuCommand)> },
}

impl<'a> PartStep<'a> {
    pub fn new(attempt: &'a OrderId, request: &'a PartRequest) -> Self {
        Self { attempt, request, units: Vec::new(), stock: Vec::new(), expires_at_ms: u64::MAX }
    }

    /// The lines of the step, each with its command, in order.
    pub fn commands(&self) -> Vec<(SkuId, SkuCommand)> {
        let order = || self.attempt.clone();
        match self.request {
            PartRequest::Reserve { buyer, lines, ttl_ms } => lines
                .iter()
                .map(|(sku, quantity)| {
                    let line =
                        ReserveLine { order: order(), buyer: buyer.clone(), quantity: *quantity, ttl_ms: *ttl_ms };
                    (sku.clone(), SkuCommand::Reserve(line))
                })
                .collect(),
            PartRequest::Prepare { skus } => {
                skus.iter().map(|sku| (sku.clone(), SkuCommand::Prepare { order: order() })).collect()
            }
            PartRequest::Commit { lines } => lines
                .iter()
                .map(|(sku, units)| (sku.clone(), SkuCommand::Commit { order: order(), units: *units }))
                .collect(),
            PartRequest::Release { skus } => {
                skus.iter().map(|sku| (sku.clone(), SkuCommand::Release { order: order() })).collect()
            }
        }
    }

    /// The line `index` has no SKU here.
    pub fn unknown_sku(&self, index: usize) -> LineVerdict {
        LineVerdict::Refused { answer: PartAnswer::UnknownSku { line: index }, undo: self.undo(index) }
    }

    /// Judges the result of line `index`'s command, which left the SKU
    /// with `stock`.
    pub fn judge(&mut self, index: usize, result: Result<SkuOutcome, SkuError>, stock: StockSnapshot) -> LineVerdict {
        let refused =
            |error: SkuError, undo| LineVerdict::Refused { answer: PartAnswer::Refused { line: index, error }, undo };
        match (self.request, result) {
            (PartRequest::Reserve { .. }, Ok(SkuOutcome::Reserved { units, expires_at_ms, .. })) => {
                self.units.push(units);
                self.stock.push(stock);
                self.expires_at_ms = self.expires_at_ms.min(expires_at_ms);
                LineVerdict::Next
            }
            (PartRequest::Commit { .. }, Ok(SkuOutcome::Committed { units, .. })) => {
                self.units.push(units);
                self.stock.push(stock);
                LineVerdict::Next
            }
            (PartRequest::Prepare { .. }, Ok(SkuOutcome::Prepared { .. })) => LineVerdict::Next,
            // A line never held here (its reserve never arrived), or that
            // already ended unsold, has its units back already.
            (
                PartRequest::Release { .. },
                Ok(SkuOutcome::Released { .. })
                | Err(SkuError::UnknownReservation | SkuError::AlreadyReleased | SkuError::Expired { .. }),
            ) => LineVerdict::Next,
            // All or nothing: a refused line undoes the lines held before it.
            (PartRequest::Reserve { .. }, Err(error)) => refused(error, self.undo(index)),
            (_, Err(error)) => refused(error, Vec::new()),
            (request, Ok(outcome)) => unreachable!("{request:?} answered {outcome:?}"),
        }
    }

    /// Aborts (not releases) the lines before `index` of a refused reserve,
    /// so that the same request sent again holds them afresh instead of
    /// replaying an ended hold. Nothing to undo for other steps.
    fn undo(&self, index: usize) -> Vec<(SkuId, SkuCommand)> {
        match self.request {
            PartRequest::Reserve { lines, .. } => lines[..index]
                .iter()
                .map(|(sku, _)| (sku.clone(), SkuCommand::Abort { order: self.attempt.clone() }))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The answer once every line went through.
    pub fn done(self) -> PartAnswer {
        match self.request {
            PartRequest::Reserve { .. } => {
                PartAnswer::Held { units: self.units, stock: self.stock, expires_at_ms: self.expires_at_ms }
            }
            PartRequest::Prepare { .. } => PartAnswer::Prepared,
            PartRequest::Commit { .. } => PartAnswer::Committed { units: self.units, stock: self.stock },
            PartRequest::Release { .. } => PartAnswer::Released,
        }
    }
}

/// Applies `request` to the part `attempt` at `now_ms` on the SKUs of one
/// member; returns the answer and the records that make it durable (to be
/// logged, in order, before the answer is sent).
pub fn apply_part(
    skus: &mut BTreeMap<SkuId, SkuState>,
    now_ms: u64,
    attempt: &OrderId,
    request: &PartRequest,
) -> (PartAnswer, Vec<LogRecord>) {
    let mut records = Vec::new();
    let mut apply = |sku: &SkuId, command: &SkuCommand, state: &mut SkuState| {
        let (answer, recorded) = state.apply_recording(now_ms, command);
        if let Some(command) = recorded {
            records.push(LogRecord::Apply { sku: sku.clone(), now_ms, command });
        }
        answer
    };
    let mut step = PartStep::new(attempt, request);
    for (index, (sku, command)) in step.commands().into_iter().enumerate() {
        let verdict = match skus.get_mut(&sku) {
            Some(state) => {
                let answer = apply(&sku, &command, state);
                step.judge(index, answer.result, answer.stock)
            }
            None => step.unknown_sku(index),
        };
        if let LineVerdict::Refused { answer, undo } = verdict {
            for (sku, command) in undo {
                let state = skus.get_mut(&sku).expect("a line held a moment ago");
                // An abort of a line just held cannot be refused.
                let _aborted = apply(&sku, &command, state);
            }
            return (answer, records);
        }
    }
    (step.done(), records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;
    use crate::sku::SkuSettings;

    fn sku(name: &str) -> SkuId {
        SkuId::new(name).expect("valid")
    }

    fn member(stock: &[(&str, u64)]) -> BTreeMap<SkuId, SkuState> {
        stock
            .iter()
            .map(|&(name, units)| {
                let settings = SkuSettings { initial_units: units, ..SkuSettings::default() };
                (sku(name), SkuState::new(settings, Limits::default()).expect("valid"))
            })
            .collect()
    }

    fn reserve(lines: &[(&str, u32)]) -> PartRequest {
        PartRequest::Reserve {
            buyer: BuyerId::new("buyer").expect("valid"),
            lines: lines.iter().map(|&(name, units)| (sku(name), Quantity::Exactly(units))).collect(),
            ttl_ms: 10_000,
        }
    }

    #[test]
    fn a_refused_line_undoes_the_part_and_the_same_request_later_holds_it_all() {
        let mut skus = member(&[("a", 5), ("b", 1)]);
        let attempt = OrderId::new("~1.1.1").expect("valid");
        let (answer, _) = apply_part(&mut skus, 0, &attempt, &reserve(&[("a", 2), ("b", 2)]));
        assert!(matches!(answer, PartAnswer::Refused { line: 1, error: SkuError::SoldOut { .. } }), "{answer:?}");
        assert_eq!(skus[&sku("a")].stock().available, 5, "line a was given back");
        skus.get_mut(&sku("b"))
            .expect("b")
            .apply(1, &SkuCommand::Admin { operation: None, change: crate::sku::AdminChange::AddStock { units: 1 } });
        let (answer, records) = apply_part(&mut skus, 2, &attempt, &reserve(&[("a", 2), ("b", 2)]));
        assert!(
            matches!(&answer, PartAnswer::Held { units, expires_at_ms: 10_002, .. } if units == &vec![2, 2]),
            "{answer:?}"
        );
        assert_eq!(records.len(), 2, "one record per line held");
    }

    #[test]
    fn every_step_is_idempotent_and_release_of_a_part_never_held_is_done() {
        let mut skus = member(&[("a", 5)]);
        let attempt = OrderId::new("~1.1.1").expect("valid");
        let skus_of_part = vec![sku("a")];
        let release = PartRequest::Release { skus: skus_of_part.clone() };
        assert_eq!(apply_part(&mut skus, 0, &attempt, &release).0, PartAnswer::Released);
        apply_part(&mut skus, 0, &OrderId::new("~1.1.2").expect("valid"), &reserve(&[("a", 1)]));
        let other = OrderId::new("~1.1.2").expect("valid");
        let prepare = PartRequest::Prepare { skus: skus_of_part.clone() };
        assert_eq!(apply_part(&mut skus, 1, &other, &prepare).0, PartAnswer::Prepared);
        assert_eq!(apply_part(&mut skus, 1, &other, &prepare).0, PartAnswer::Prepared);
        let commit = PartRequest::Commit { lines: vec![(sku("a"), None)] };
        let sold =
            PartAnswer::Committed { units: vec![1], stock: vec![StockSnapshot { available: 4, held: 0, sold: 1 }] };
        assert_eq!(apply_part(&mut skus, 99_000, &other, &commit).0, sold);
        let (again, records) = apply_part(&mut skus, 99_000, &other, &commit);
        assert_eq!(again, sold);
        assert!(records.is_empty(), "a replay records nothing");
        let refused = apply_part(&mut skus, 99_000, &other, &release).0;
        assert_eq!(refused, PartAnswer::Refused { line: 0, error: SkuError::AlreadyCommitted });
    }
}
