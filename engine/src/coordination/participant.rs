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
use crate::sku::{Quantity, ReserveLine, SkuCommand, SkuError, SkuOutcome, SkuState};

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
    /// Every line held: units per line, and when the earliest expires.
    Held {
        units: Vec<u32>,
        expires_at_ms: u64,
    },
    Prepared,
    /// Units sold per line.
    Committed {
        units: Vec<u32>,
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
    let answer = match request {
        PartRequest::Reserve { buyer, lines, ttl_ms } => {
            reserve(skus, now_ms, attempt, buyer, lines, *ttl_ms, &mut records)
        }
        PartRequest::Prepare { skus: names } => each_line(
            skus,
            now_ms,
            names,
            &mut records,
            PartAnswer::Prepared,
            |_| SkuCommand::Prepare { order: attempt.clone() },
            |_, result| match result {
                Ok(_) => Ok(()),
                Err(error) => Err(error),
            },
        ),
        PartRequest::Release { skus: names } => each_line(
            skus,
            now_ms,
            names,
            &mut records,
            PartAnswer::Released,
            |_| SkuCommand::Release { order: attempt.clone() },
            |_, result| match result {
                Ok(_) | Err(SkuError::UnknownReservation | SkuError::AlreadyReleased | SkuError::Expired { .. }) => {
                    Ok(())
                }
                Err(error) => Err(error),
            },
        ),
        PartRequest::Commit { lines } => {
            let names: Vec<SkuId> = lines.iter().map(|(sku, _)| sku.clone()).collect();
            let mut sold = Vec::with_capacity(lines.len());
            let answer = each_line(
                skus,
                now_ms,
                &names,
                &mut records,
                PartAnswer::Released,
                |index| SkuCommand::Commit { order: attempt.clone(), units: lines[index].1 },
                |_, result| match result {
                    Ok(SkuOutcome::Committed { units, .. }) => {
                        sold.push(units);
                        Ok(())
                    }
                    Ok(other) => unreachable!("a commit answered {other:?}"),
                    Err(error) => Err(error),
                },
            );
            match answer {
                PartAnswer::Released => PartAnswer::Committed { units: sold },
                refused => refused,
            }
        }
    };
    (answer, records)
}

/// Applies one command per line in order; the first line whose result
/// `judge` refuses ends the step with that refusal.
fn each_line(
    skus: &mut BTreeMap<SkuId, SkuState>,
    now_ms: u64,
    names: &[SkuId],
    records: &mut Vec<LogRecord>,
    done: PartAnswer,
    command_of: impl Fn(usize) -> SkuCommand,
    mut judge: impl FnMut(usize, Result<SkuOutcome, SkuError>) -> Result<(), SkuError>,
) -> PartAnswer {
    for (index, sku) in names.iter().enumerate() {
        let Some(state) = skus.get_mut(sku) else { return PartAnswer::UnknownSku { line: index } };
        let command = command_of(index);
        let (answer, recorded) = state.apply_recording(now_ms, &command);
        if let Some(command) = recorded {
            records.push(LogRecord::Apply { sku: sku.clone(), now_ms, command });
        }
        if let Err(error) = judge(index, answer.result) {
            return PartAnswer::Refused { line: index, error };
        }
    }
    done
}

fn reserve(
    skus: &mut BTreeMap<SkuId, SkuState>,
    now_ms: u64,
    attempt: &OrderId,
    buyer: &BuyerId,
    lines: &[(SkuId, Quantity)],
    ttl_ms: u64,
    records: &mut Vec<LogRecord>,
) -> PartAnswer {
    let mut units = Vec::with_capacity(lines.len());
    let mut expires_at_ms = u64::MAX;
    let mut refusal = None;
    for (index, (sku, quantity)) in lines.iter().enumerate() {
        let Some(state) = skus.get_mut(sku) else {
            refusal = Some(PartAnswer::UnknownSku { line: index });
            break;
        };
        let line = ReserveLine { order: attempt.clone(), buyer: buyer.clone(), quantity: *quantity, ttl_ms };
        let command = SkuCommand::Reserve(line);
        let (answer, recorded) = state.apply_recording(now_ms, &command);
        if let Some(command) = recorded {
            records.push(LogRecord::Apply { sku: sku.clone(), now_ms, command });
        }
        match answer.result {
            Ok(SkuOutcome::Reserved { units: held, expires_at_ms: expiry, .. }) => {
                units.push(held);
                expires_at_ms = expires_at_ms.min(expiry);
            }
            Ok(other) => unreachable!("a reserve answered {other:?}"),
            Err(error) => {
                refusal = Some(PartAnswer::Refused { line: index, error });
                break;
            }
        }
    }
    let Some(refusal) = refusal else { return PartAnswer::Held { units, expires_at_ms } };
    // All or nothing: undo the lines held before the refused one. Aborted
    // rather than released, so that this same request, sent again once
    // stock is back, holds them again instead of replaying an ended hold.
    for (sku, _) in &lines[..units.len()] {
        let state = skus.get_mut(sku).expect("held a moment ago");
        let (_, recorded) = state.apply_recording(now_ms, &SkuCommand::Abort { order: attempt.clone() });
        if let Some(command) = recorded {
            records.push(LogRecord::Apply { sku: sku.clone(), now_ms, command });
        }
    }
    refusal
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
        assert_eq!(answer, PartAnswer::Held { units: vec![2, 2], expires_at_ms: 10_002 });
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
        assert_eq!(apply_part(&mut skus, 99_000, &other, &commit).0, PartAnswer::Committed { units: vec![1] });
        let (again, records) = apply_part(&mut skus, 99_000, &other, &commit);
        assert_eq!(again, PartAnswer::Committed { units: vec![1] });
        assert!(records.is_empty(), "a replay records nothing");
        let refused = apply_part(&mut skus, 99_000, &other, &release).0;
        assert_eq!(refused, PartAnswer::Refused { line: 0, error: SkuError::AlreadyCommitted });
    }
}
