//! What the cluster answered, and the checks of those answers against one
//! another and against the SKUs' final state.

use std::collections::{BTreeMap, BTreeSet};

use flashstock_engine::coordination::{ClientAnswer, ClientRequest};
use flashstock_engine::sku::EndingImage;
use flashstock_engine::{OrderError, OrderId, Quantity, SkuId, SkuState};

fn kind_of(request: &ClientRequest) -> &'static str {
    match request {
        ClientRequest::Reserve(_) => "reserve",
        ClientRequest::Commit { .. } => "commit",
        ClientRequest::Release { .. } => "release",
    }
}

type Content = (String, u64, Vec<(SkuId, Quantity)>);

fn content_of(request: &flashstock_engine::OrderRequest) -> Content {
    let mut lines: Vec<(SkuId, Quantity)> =
        request.lines.iter().map(|line| (line.sku.clone(), line.quantity)).collect();
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    (request.buyer.as_str().to_owned(), request.ttl_ms, lines)
}

/// What the answers said about one order id.
#[derive(Debug, Default)]
struct OrderFacts {
    reserved: Option<(Content, Vec<(SkuId, u32)>)>,
    committed: Option<Vec<(SkuId, u32)>>,
    released: bool,
    expired: bool,
}

/// Every request sent, every answer given, and what they promise.
#[derive(Debug, Default)]
pub struct History {
    requests: BTreeMap<u64, ClientRequest>,
    orders: BTreeMap<OrderId, OrderFacts>,
    /// Each attempt id the coordinators used: its order and its SKUs.
    attempts: BTreeMap<OrderId, (OrderId, BTreeSet<SkuId>)>,
    /// When the first request of each kind for each order was sent.
    first_sent: BTreeMap<(OrderId, &'static str), u64>,
    /// Every fresh SKU count an answer carried: when the operation it
    /// reports on was first asked for, when it was answered, and the counts.
    observed: BTreeMap<SkuId, Vec<(u64, u64, flashstock_engine::StockSnapshot)>>,
    /// How long after an order's first reserve was sent its coordinator
    /// may have forgotten it, in real time: its idempotency window less
    /// the most two members' clocks can disagree (the one that settled it
    /// and the one that forgot it). `None`: never within a run.
    pub forgettable_after_ms: Option<u64>,
    pub violations: Vec<String>,
    pub answers: u64,
    /// Answers by kind, for the run's summary.
    pub tally: BTreeMap<&'static str, u64>,
}

impl History {
    /// A history whose coordinators may forget an order `after_ms` after
    /// its first reserve was sent (see [`Self::forgettable_after_ms`]).
    pub fn forgetting_after(after_ms: Option<u64>) -> Self {
        Self { forgettable_after_ms: after_ms, ..Self::default() }
    }

    /// The request `caller` sent.
    pub fn request(&self, caller: u64) -> Option<&ClientRequest> {
        self.requests.get(&caller)
    }

    pub fn sent(&mut self, now_ms: u64, caller: u64, request: &ClientRequest) {
        self.first_sent.entry((request.order().clone(), kind_of(request))).or_insert(now_ms);
        self.requests.insert(caller, request.clone());
    }

    /// Keeps the SKU counts of a fresh answer (one that reports what its
    /// own operation found, not a replay of an earlier one).
    fn observe(&mut self, now_ms: u64, request: &ClientRequest, answer: &ClientAnswer) {
        let (lines, stock) = match answer {
            ClientAnswer::Reserved { lines, stock, replayed: false, .. }
            | ClientAnswer::Committed { lines, stock, replayed: false, .. } => (lines, stock),
            // A release reports the counts of earlier steps; refusals carry none.
            _ => return,
        };
        let Some(&asked_ms) = self.first_sent.get(&(request.order().clone(), kind_of(request))) else { return };
        for ((sku, _), counts) in lines.iter().zip(stock) {
            self.observed.entry(sku.clone()).or_default().push((asked_ms, now_ms, *counts));
        }
    }

    /// A read of `sku`'s counts, asked at `asked_ms`, was answered.
    pub fn read_answered(&mut self, asked_ms: u64, now_ms: u64, sku: &SkuId, counts: flashstock_engine::StockSnapshot) {
        self.answers += 1;
        *self.tally.entry("reads").or_default() += 1;
        self.observed.entry(sku.clone()).or_default().push((asked_ms, now_ms, counts));
    }

    /// Each SKU's counts as answers reported them, against real time: units
    /// sold never go back (an answer given after another was received
    /// never reports fewer sold), and available + held + sold never changes
    /// (the simulation adds and removes no stock). A stale state — a deposed
    /// leader's, or one rebuilt without an acknowledged entry — breaks the
    /// first; a lost or doubled unit the second.
    pub fn check_counts(&mut self) {
        for (sku, observed) in &mut self.observed {
            let total = |counts: &flashstock_engine::StockSnapshot| counts.available + counts.held + counts.sold;
            if let Some((_, _, first)) = observed.first() {
                let expected = total(first);
                if let Some((_, answered_ms, counts)) = observed.iter().find(|(_, _, counts)| total(counts) != expected)
                {
                    self.violations.push(format!(
                        "SKU {sku}: answered at {answered_ms} ms with {counts:?}, {} units in all where others had {expected}",
                        total(counts)
                    ));
                }
            }
            observed.sort_by_key(|(_, answered_ms, _)| *answered_ms);
            let mut most_sold: Vec<(u64, u64)> = Vec::with_capacity(observed.len());
            for (_, answered_ms, counts) in observed.iter() {
                let before = most_sold.last().map_or(0, |(_, sold)| *sold);
                most_sold.push((*answered_ms, before.max(counts.sold)));
            }
            for (asked_ms, answered_ms, counts) in observed.iter() {
                // The most sold in any answer received before this was asked.
                let earlier = most_sold.partition_point(|(at_ms, _)| at_ms < asked_ms);
                if let Some(&(_, sold)) = earlier.checked_sub(1).map(|index| &most_sold[index]) {
                    if counts.sold < sold {
                        self.violations.push(format!(
                            "SKU {sku}: answered at {answered_ms} ms with {} sold (asked at {asked_ms} ms), \
                             though an answer before it was asked had {sold} sold",
                            counts.sold
                        ));
                        break;
                    }
                }
            }
        }
    }

    /// A coordinator asked a part to hold `skus` for `attempt` of `order`.
    pub fn attempt(&mut self, attempt: &OrderId, order: &OrderId, skus: impl IntoIterator<Item = SkuId>) {
        let entry = self.attempts.entry(attempt.clone()).or_insert_with(|| (order.clone(), BTreeSet::new()));
        if entry.0 != *order {
            self.violations.push(format!("attempt {attempt} used for orders {} and {order}", entry.0));
        }
        entry.1.extend(skus);
    }

    /// An answer reached a buyer: checked against every earlier answer.
    pub fn answered(&mut self, now_ms: u64, caller: u64, answer: &ClientAnswer) {
        self.answers += 1;
        let kind = match answer {
            ClientAnswer::Reserved { .. } => "reserved",
            ClientAnswer::Committed { .. } => "committed",
            ClientAnswer::Released { .. } => "released",
            ClientAnswer::Refused(error) if error.is_retryable() => "retryable",
            ClientAnswer::Refused(OrderError::Expired { .. }) => "expired",
            ClientAnswer::Refused(OrderError::IdempotencyConflict) => "conflict",
            ClientAnswer::Refused(_) => "refused",
        };
        *self.tally.entry(kind).or_default() += 1;
        let Some(request) = self.requests.get(&caller) else {
            self.violations.push(format!("{now_ms} ms: an answer for caller {caller}, who sent nothing"));
            return;
        };
        let order = request.order().clone();
        let request = request.clone();
        self.observe(now_ms, &request, answer);
        let request = &request;
        let forgettable = self.forgettable_after_ms.is_some_and(|after_ms| {
            self.first_sent.get(&(order.clone(), "reserve")).is_some_and(|&sent_ms| now_ms >= sent_ms + after_ms)
        });
        let facts = self.orders.entry(order.clone()).or_default();
        let mut problem = None;
        match (request, answer) {
            (ClientRequest::Reserve(asked), ClientAnswer::Reserved { lines, .. }) => {
                let content = content_of(asked);
                match &facts.reserved {
                    Some((first, _)) if *first != content => {
                        problem = Some("one id acknowledged as two different orders".to_owned());
                    }
                    Some((_, first_lines)) if first_lines != lines => {
                        problem = Some(format!("a replayed reservation answered {lines:?}, first {first_lines:?}"));
                    }
                    Some(_) => {}
                    None => facts.reserved = Some((content, lines.clone())),
                }
            }
            (ClientRequest::Commit { .. }, ClientAnswer::Committed { lines, .. }) => {
                if facts.released || facts.expired {
                    problem = Some("committed after it was answered released or expired".to_owned());
                }
                match &facts.committed {
                    Some(first) if first != lines => problem = Some(format!("committed as {lines:?}, first {first:?}")),
                    _ => facts.committed = Some(lines.clone()),
                }
            }
            (ClientRequest::Release { .. }, ClientAnswer::Released { .. }) => {
                if facts.committed.is_some() {
                    problem = Some("released after it was answered committed".to_owned());
                }
                facts.released = true;
            }
            (
                ClientRequest::Commit { .. } | ClientRequest::Release { .. },
                ClientAnswer::Refused(OrderError::Expired { .. }),
            ) => {
                if facts.committed.is_some() {
                    problem = Some("answered expired after it was answered committed".to_owned());
                }
                facts.expired = true;
            }
            (ClientRequest::Commit { .. }, ClientAnswer::Refused(OrderError::AlreadyReleased)) => {
                if facts.committed.is_some() {
                    problem = Some("answered released after it was answered committed".to_owned());
                }
            }
            (ClientRequest::Release { .. }, ClientAnswer::Refused(OrderError::AlreadyCommitted)) => {
                if facts.released {
                    problem = Some("answered committed after it was answered released".to_owned());
                }
            }
            (
                ClientRequest::Commit { .. } | ClientRequest::Release { .. },
                ClientAnswer::Refused(OrderError::UnknownReservation),
            ) => {
                // Orders are remembered for the idempotency window: an
                // acknowledged one is never unknown within it.
                if facts.reserved.is_some() && !forgettable {
                    problem = Some("an acknowledged reservation is unknown".to_owned());
                }
            }
            (_, ClientAnswer::Refused(_)) => {}
            (request, answer) => problem = Some(format!("{answer:?} does not answer {request:?}")),
        }
        if let Some(problem) = problem {
            self.violations.push(format!("{now_ms} ms, order {order}: {problem}"));
        }
    }

    /// The final checks, on every SKU of the healed cluster once every TTL
    /// has passed: every acknowledged commit is sold in full, no order is
    /// partly sold or sold twice, nothing released or expired is sold, and
    /// nothing is still held.
    pub fn check_final(&mut self, skus: &BTreeMap<SkuId, SkuState>) {
        self.check_counts();
        // Units sold per attempt and SKU, from the SKUs themselves.
        let mut sold: BTreeMap<OrderId, BTreeMap<SkuId, u32>> = BTreeMap::new();
        for (sku, state) in skus {
            let image = state.image();
            let stock = state.stock();
            if stock.held != 0 || state.hold_count() != 0 {
                let live: Vec<String> = image
                    .reservations
                    .iter()
                    .filter(|reservation| reservation.ending.is_none())
                    .map(|reservation| {
                        let order = self.attempts.get(&reservation.line.order).map(|(order, _)| order.as_str());
                        format!(
                            "{} (order {order:?}, {} units, prepared {}, expires {} ms)",
                            reservation.line.order, reservation.units, reservation.prepared, reservation.expires_at_ms
                        )
                    })
                    .collect();
                self.violations.push(format!(
                    "SKU {sku}: {} units still held in {} holds: {live:?}",
                    stock.held,
                    state.hold_count()
                ));
            }
            let mut sold_here = 0u64;
            for reservation in &image.reservations {
                if let Some(EndingImage::Committed { units, .. }) = reservation.ending {
                    sold_here += u64::from(units);
                    sold.entry(reservation.line.order.clone()).or_default().insert(sku.clone(), units);
                }
            }
            if sold_here != stock.sold {
                self.violations.push(format!("SKU {sku}: sold {} but its commits add up to {sold_here}", stock.sold));
            }
        }
        let mut committed_attempts: BTreeMap<OrderId, Vec<OrderId>> = BTreeMap::new();
        for (attempt, lines) in &sold {
            let Some((order, skus_of_attempt)) = self.attempts.get(attempt) else {
                self.violations.push(format!("attempt {attempt} sold without a coordinator asking"));
                continue;
            };
            let sold_skus: BTreeSet<SkuId> = lines.keys().cloned().collect();
            if sold_skus != *skus_of_attempt {
                self.violations.push(format!("order {order} partly sold: {sold_skus:?} of {skus_of_attempt:?}"));
            }
            committed_attempts.entry(order.clone()).or_default().push(attempt.clone());
        }
        for (order, attempts) in &committed_attempts {
            if attempts.len() > 1 {
                self.violations.push(format!("order {order} sold by {} attempts: {attempts:?}", attempts.len()));
            }
        }
        for (order, facts) in &self.orders {
            let attempt = committed_attempts.get(order).and_then(|attempts| attempts.first());
            match (&facts.committed, attempt) {
                (Some(lines), Some(attempt)) => {
                    let found = &sold[attempt];
                    for (sku, units) in lines {
                        if found.get(sku) != Some(units) {
                            self.violations.push(format!(
                                "order {order}: acknowledged {units} of {sku} sold, found {:?}",
                                found.get(sku)
                            ));
                        }
                    }
                }
                (Some(_), None) => self.violations.push(format!("order {order}: an acknowledged commit was lost")),
                (None, Some(_)) if facts.released || facts.expired => {
                    self.violations.push(format!("order {order}: sold though answered released or expired"));
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashstock_engine::{BuyerId, Line, OrderRequest, StockSnapshot};

    fn reserve(order: &str) -> ClientRequest {
        ClientRequest::Reserve(OrderRequest {
            order: OrderId::new(order).expect("valid"),
            buyer: BuyerId::new("buyer").expect("valid"),
            lines: vec![Line { sku: SkuId::new("sku").expect("valid"), quantity: Quantity::Exactly(1) }],
            ttl_ms: 5_000,
        })
    }

    fn reserved(order: &str, available: u64, held: u64, sold: u64) -> ClientAnswer {
        ClientAnswer::Reserved {
            order: OrderId::new(order).expect("valid"),
            expires_at_ms: 5_000,
            lines: vec![(SkuId::new("sku").expect("valid"), 1)],
            stock: vec![StockSnapshot { available, held, sold }],
            replayed: false,
        }
    }

    fn history_of(answers: &[(&str, u64, u64, ClientAnswer)]) -> Vec<String> {
        let mut history = History::default();
        for (caller, (order, sent_ms, answered_ms, answer)) in (1..).zip(answers) {
            history.sent(*sent_ms, caller, &reserve(order));
            history.answered(*answered_ms, caller, answer);
        }
        history.check_counts();
        history.violations
    }

    #[test]
    fn sold_going_back_after_an_answer_was_received_is_found() {
        let violations = history_of(&[("a", 0, 10, reserved("a", 5, 1, 4)), ("b", 20, 30, reserved("b", 7, 1, 2))]);
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].contains("though an answer before it was asked had 4 sold"), "{violations:?}");
    }

    #[test]
    fn overlapping_operations_may_be_ordered_either_way() {
        let violations =
            history_of(&[("a", 0, 30, reserve_answer_with_sold(4)), ("b", 20, 40, reserve_answer_with_sold(2))]);
        assert!(violations.is_empty(), "{violations:?}");
    }

    #[test]
    fn a_unit_appearing_or_vanishing_is_found() {
        let violations = history_of(&[("a", 0, 10, reserved("a", 5, 1, 4)), ("b", 20, 30, reserved("b", 5, 2, 4))]);
        assert!(violations.iter().any(|violation| violation.contains("units in all")), "{violations:?}");
    }

    fn reserve_answer_with_sold(sold: u64) -> ClientAnswer {
        reserved("x", 10 - sold, 0, sold)
    }
}
