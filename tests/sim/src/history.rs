//! What the cluster answered, and the checks of those answers against one
//! another and against the SKUs' final state.

use std::collections::{BTreeMap, BTreeSet};

use flashstock_engine::coordination::{ClientAnswer, ClientRequest};
use flashstock_engine::sku::EndingImage;
use flashstock_engine::{OrderError, OrderId, Quantity, SkuId, SkuState};

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
    pub violations: Vec<String>,
    pub answers: u64,
    /// Answers by kind, for the run's summary.
    pub tally: BTreeMap<&'static str, u64>,
}

impl History {
    /// The request `caller` sent.
    pub fn request(&self, caller: u64) -> Option<&ClientRequest> {
        self.requests.get(&caller)
    }

    pub fn sent(&mut self, caller: u64, request: &ClientRequest) {
        self.requests.insert(caller, request.clone());
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
                // Orders are remembered for the idempotency window, longer
                // than any run: an acknowledged one is never unknown.
                if facts.reserved.is_some() {
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
