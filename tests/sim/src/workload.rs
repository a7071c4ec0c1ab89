//! Buyers: each works through a few orders, one request at a time, and
//! retries what went unanswered or was refused as retryable with the same
//! idempotency key, as a checkout service linking the client would.

use flashstock_engine::coordination::{ClientAnswer, ClientRequest};
use flashstock_engine::{BuyerId, Line, OrderError, OrderId, OrderRequest, Quantity, SkuId};

use crate::rng::Rng;

/// How long a buyer waits for an answer before sending the request again.
pub const ANSWER_WAIT_MS: u64 = 1_500;
/// Sends of one request before the buyer walks away from the order.
const SENDS_PER_REQUEST_MAX: u32 = 12;

/// One step of a buyer's script for an order.
#[derive(Debug, Clone)]
struct Step {
    /// Pause before the step's first send.
    pause_ms: u64,
    request: ClientRequest,
    /// Whether the script goes on only if this step succeeded.
    needs_success: bool,
}

/// What a buyer wants to do next.
#[derive(Debug)]
pub enum Next {
    /// Send `request` at `at_ms` with this caller id.
    Send {
        at_ms: u64,
        caller: u64,
        request: ClientRequest,
    },
    /// Nothing until an answer or the wake-up at `at_ms`.
    Wait,
    Done,
}

#[derive(Debug)]
pub struct Buyer {
    pub index: u32,
    rng: Rng,
    orders_left: u32,
    steps: Vec<Step>,
    /// The step being sent: its caller id, sends so far, and when the
    /// current send times out.
    current: Option<(u64, u32, u64)>,
    next_caller: u64,
    order_number: u32,
}

impl Buyer {
    pub fn new(index: u32, rng: Rng, orders: u32) -> Self {
        Self { index, rng, orders_left: orders, steps: Vec::new(), current: None, next_caller: 0, order_number: 0 }
    }

    fn caller(&mut self) -> u64 {
        self.next_caller += 1;
        (u64::from(self.index) << 32) | self.next_caller
    }

    pub fn finished(&self) -> bool {
        self.orders_left == 0 && self.steps.is_empty() && self.current.is_none()
    }

    /// Writes the script of the next order.
    fn plan_order(&mut self, catalogue: &[SkuId]) {
        self.order_number += 1;
        let order = OrderId::new(format!("b{}-o{}", self.index, self.order_number)).expect("valid");
        let buyer = BuyerId::new(format!("buyer-{}", self.index)).expect("valid");
        let ttl_ms = self.rng.between(1_000, 6_000);
        let line_count = 1 + self.rng.below(3);
        let mut lines = Vec::new();
        for _ in 0..line_count {
            let sku = catalogue[self.rng.below(catalogue.len())].clone();
            let quantity = if self.rng.chance(200) {
                let max = 1 + u32::try_from(self.rng.below(4)).expect("small");
                Quantity::UpTo { max, min: 1 }
            } else {
                Quantity::Exactly(1 + u32::try_from(self.rng.below(3)).expect("small"))
            };
            if lines.iter().any(|line: &Line| line.sku == sku) {
                continue;
            }
            lines.push(Line { sku, quantity });
        }
        let reserve = OrderRequest { order: order.clone(), buyer: buyer.clone(), lines: lines.clone(), ttl_ms };
        let step =
            |pause_ms: u64, request: ClientRequest, needs_success: bool| Step { pause_ms, request, needs_success };
        let commit_all = ClientRequest::Commit { order: order.clone(), fewer: Vec::new() };
        let release = ClientRequest::Release { order: order.clone() };
        let think_ms = self.rng.between(0, 400);
        let mut steps = vec![step(self.rng.between(0, 600), ClientRequest::Reserve(reserve.clone()), true)];
        match self.rng.below(10) {
            0..=2 => steps.push(step(think_ms, commit_all, true)),
            3 => {
                let sku = lines[0].sku.clone();
                steps.push(step(think_ms, ClientRequest::Commit { order: order.clone(), fewer: vec![(sku, 1)] }, true));
            }
            4 => steps.push(step(think_ms, release, true)),
            5 => {}
            6 => {
                // The same id with other content must change nothing.
                let mut other = reserve.clone();
                let extra = catalogue[self.rng.below(catalogue.len())].clone();
                match other.lines.iter_mut().find(|line| line.sku == extra) {
                    Some(line) => line.quantity = Quantity::Exactly(7),
                    None => other.lines.push(Line { sku: extra, quantity: Quantity::Exactly(1) }),
                }
                steps.push(step(think_ms, ClientRequest::Reserve(other), false));
                steps.push(step(think_ms, commit_all, true));
            }
            7 => {
                let fewer = match self.rng.below(3) {
                    0 => vec![(SkuId::new("not-in-the-order").expect("valid"), 1)],
                    1 => vec![(lines[0].sku.clone(), 0)],
                    _ => vec![(lines[0].sku.clone(), 1), (lines[0].sku.clone(), 1)],
                };
                steps.push(step(think_ms, ClientRequest::Commit { order: order.clone(), fewer }, false));
                steps.push(step(think_ms, commit_all, true));
            }
            8 => {
                steps.push(step(think_ms, commit_all, true));
                steps.push(step(think_ms, release, false));
            }
            _ => steps.push(step(ttl_ms + self.rng.between(100, 1_000), commit_all, false)),
        }
        if self.rng.chance(100) {
            // A malformed order, refused before anything is held.
            let mut bad = reserve;
            match self.rng.below(3) {
                0 => bad.lines.clear(),
                1 => bad.lines[0].quantity = Quantity::Exactly(0),
                _ => bad.ttl_ms = 1,
            }
            steps = vec![step(0, ClientRequest::Reserve(bad), true)];
        }
        steps.reverse();
        self.steps = steps;
    }

    /// The buyer's first move, or its next after a step ended.
    pub fn next(&mut self, now_ms: u64, catalogue: &[SkuId]) -> Next {
        if self.current.is_some() {
            return Next::Wait;
        }
        if self.steps.is_empty() {
            if self.orders_left == 0 {
                return Next::Done;
            }
            self.orders_left -= 1;
            self.plan_order(catalogue);
        }
        let step = self.steps.last().expect("just planned").clone();
        let at_ms = now_ms + step.pause_ms;
        let caller = self.caller();
        self.current = Some((caller, 1, at_ms + ANSWER_WAIT_MS));
        Next::Send { at_ms, caller, request: step.request }
    }

    /// The current request was answered (or not, `None`, by `now_ms`).
    pub fn answered(&mut self, now_ms: u64, caller: u64, answer: Option<&ClientAnswer>, catalogue: &[SkuId]) -> Next {
        let Some((current, sends, deadline_ms)) = self.current else { return Next::Wait };
        let late_answer = answer.is_some() && caller != current;
        let early_wake = answer.is_none() && now_ms < deadline_ms;
        if late_answer || early_wake {
            return Next::Wait;
        }
        let retry = match answer {
            None => true,
            Some(ClientAnswer::Refused(error)) => error.is_retryable(),
            Some(_) => false,
        };
        let step = self.steps.last().expect("a step is under way").clone();
        if retry && sends < SENDS_PER_REQUEST_MAX {
            let pause_ms = match answer {
                Some(ClientAnswer::Refused(OrderError::Busy { retry_after_ms })) => (*retry_after_ms).max(5),
                _ => self.rng.between(10, 200),
            };
            let caller = self.caller();
            let at_ms = now_ms + pause_ms;
            self.current = Some((caller, sends + 1, at_ms + ANSWER_WAIT_MS));
            return Next::Send { at_ms, caller, request: step.request };
        }
        self.current = None;
        self.steps.pop();
        let succeeded = matches!(answer, Some(answer) if !matches!(answer, ClientAnswer::Refused(_)));
        if step.needs_success && !succeeded {
            self.steps.clear();
        }
        self.next(now_ms, catalogue)
    }

    /// The caller id of the request under way.
    pub fn current_caller(&self) -> Option<u64> {
        self.current.map(|(caller, _, _)| caller)
    }

    /// When the current send gives up waiting.
    pub fn deadline_ms(&self) -> Option<u64> {
        self.current.map(|(_, _, deadline_ms)| deadline_ms)
    }
}
