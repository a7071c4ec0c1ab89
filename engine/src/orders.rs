//! Orders across the SKUs of one engine: all-or-nothing reserve (every
//! line held in parallel, the held ones aborted if any fails), commit and
//! release through the order directory, idempotent on the order id, and
//! the sold-out hint that answers before any actor is involved.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::directory::{InterruptedOrder, OrderContent, OrderDirectory, OrderPhase, OrderPlan, OrderRecord};
use crate::ids::{BuyerId, OrderId, SkuId};
use crate::log::record::TransactionLine;
use crate::order::{
    merge_lines, MergedLine, OrderError, OrderRequest, OrderStatus, Reservation, ReservedLine, Settlement,
};
use crate::runtime::{Engine, EngineError};
use crate::sku::{ReserveLine, SkuAnswer, SkuCommand, SkuError, SkuOutcome};
use crate::slot::{lock, SkuSlot};

/// A line whose command is with its SKU's actor: its position in the order's
/// plan and the channel its answer arrives on.
type PendingLine = (usize, oneshot::Receiver<SkuAnswer>);

impl Engine {
    /// Where `order` stands; `None` if the engine does not know it (never
    /// reserved, refused, or forgotten after its idempotency window).
    pub fn order_status(&self, order: &OrderId) -> Option<OrderStatus> {
        let orders = lock(&self.order_partition(order).orders);
        let record = orders.records.get(order)?;
        let expired_at_ms = record.reservation.as_ref().map_or(0, |reservation| reservation.expires_at_ms);
        Some(match record.phase {
            // Prepared: waiting for a coordinator elsewhere to decide.
            OrderPhase::Reserving | OrderPhase::Settling | OrderPhase::Prepared => OrderStatus::InProgress,
            // The directory learns of an expiry only when someone settles;
            // the clock says it already.
            OrderPhase::Held if self.inner.clock.now_ms() >= expired_at_ms => OrderStatus::Expired { expired_at_ms },
            OrderPhase::Held => {
                OrderStatus::Held(record.reservation.clone().expect("a held order has its reservation"))
            }
            OrderPhase::Committed => {
                OrderStatus::Committed(record.settlement.clone().expect("a settled order has its settlement"))
            }
            OrderPhase::Released => {
                OrderStatus::Released(record.settlement.clone().expect("a settled order has its settlement"))
            }
            OrderPhase::Expired => OrderStatus::Expired { expired_at_ms },
        })
    }

    /// The `SoldOut` answer for `line` if the SKU's published snapshot proves
    /// it; `None` means "ask the actor". See `StockSnapshotCell` for what
    /// the snapshot promises.
    pub(crate) fn sold_out_from_hint(slot: &SkuSlot, line: &MergedLine, now_ms: u64) -> Option<OrderError> {
        // After a log failure the published counts may be ahead of what
        // survives; the actor path answers `Unavailable` instead.
        if slot.log_failed.load(Ordering::Acquire) {
            return None;
        }
        let reading = slot.snapshot.read()?;
        let short = reading.stock.available < u64::from(line.quantity.minimum());
        (short && now_ms < reading.next_expiry_ms).then(|| OrderError::Line {
            index: line.index,
            sku: line.sku.clone(),
            error: SkuError::SoldOut { available: reading.stock.available },
            stock: reading.stock,
        })
    }

    /// Holds every line of `request`, or none.
    ///
    /// Idempotent on the order id: a retry with the same content returns the
    /// same reservation (even after it was committed or released); different
    /// content is `IdempotencyConflict`. A refused order leaves no trace, so
    /// it may be retried with the same id.
    pub async fn reserve(&self, request: OrderRequest) -> Result<Reservation, OrderError> {
        let lines = merge_lines(&request, &self.inner.config.limits)?;
        let (plan, arrival) = match self.start_reserve(&request, lines, self.inner.clock.now_ms()) {
            ReserveStart::Answered(answer) => return answer,
            ReserveStart::Admitted { plan, arrival } => (plan, arrival),
        };
        let order = &request.order;
        let directory = &self.order_partition(order).orders;
        let interrupted = InterruptedOrder { directory, order, arrival, resting: OrderPhase::Held, finished: false };
        let outcome = self.hold_all(order, &request.buyer, request.ttl_ms, &plan).await;
        interrupted.finish();
        self.finish_reserve(order, &outcome);
        outcome
    }

    /// A reserve up to the moment its lines are asked: the answer if the
    /// directory or the sold-out hint gives one, or else the order
    /// admitted (`Reserving`) with its plan. Nothing is cloned before the
    /// sold-out check: most requests in a flash sale end there.
    pub(crate) fn start_reserve(&self, request: &OrderRequest, lines: Vec<MergedLine>, now_ms: u64) -> ReserveStart {
        let config = &self.inner.config;
        let slots = match lines
            .iter()
            .map(|line| self.slot(&line.sku).map_err(|error| error.into_order_error(line.index)))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(slots) => slots,
            Err(error) => return ReserveStart::Answered(Err(error)),
        };
        let mut orders = lock(&self.order_partition(&request.order).orders);
        // What is past its window is forgotten before the id is looked
        // up: a reused id after the window is a new order.
        orders.forget_old(now_ms, config);
        // A retry is answered from the directory, before the hint: a held
        // order stays held even once its SKU has sold out.
        if let Some(answer) = Self::replay_reserve(&orders, request, &lines) {
            return ReserveStart::Answered(answer);
        }
        for (line, slot) in lines.iter().zip(&slots) {
            if let Some(sold_out) = Self::sold_out_from_hint(slot, line, now_ms) {
                return ReserveStart::Answered(Err(sold_out));
            }
        }
        let content = OrderContent::of(&request.buyer, request.ttl_ms, &lines);
        let plan = Arc::new(OrderPlan { lines, slots });
        let record = |arrival| OrderRecord {
            content,
            arrival,
            plan: plan.clone(),
            phase: OrderPhase::Reserving,
            reservation: None,
            settlement: None,
        };
        match orders.admit(now_ms, &request.order, config, record) {
            Ok(arrival) => ReserveStart::Admitted { plan, arrival },
            Err(refused) => ReserveStart::Answered(Err(refused)),
        }
    }

    /// Records how a reserve admitted by [`Self::start_reserve`] ended: held,
    /// or forgotten (a refused order leaves no trace).
    pub(crate) fn finish_reserve(&self, order: &OrderId, outcome: &Result<Reservation, OrderError>) {
        let mut orders = lock(&self.order_partition(order).orders);
        let record = orders.records.get_mut(order).expect("a reserving order stays in the directory");
        match outcome {
            Ok(reservation) => {
                record.phase = OrderPhase::Held;
                record.reservation = Some(reservation.clone());
            }
            Err(_) => orders.remove(order),
        }
    }

    pub(crate) fn replay_reserve(
        orders: &OrderDirectory,
        request: &OrderRequest,
        merged: &[MergedLine],
    ) -> Option<Result<Reservation, OrderError>> {
        let record = orders.records.get(&request.order)?;
        if !record.content.matches(&request.buyer, request.ttl_ms, merged) {
            return Some(Err(OrderError::IdempotencyConflict));
        }
        Some(match &record.reservation {
            Some(reservation) => Ok(reservation.clone()),
            // The same request is being served right now.
            None => Err(OrderError::Busy { retry_after_ms: 1 }),
        })
    }

    /// Places a hold on every line in parallel; on any failure aborts the
    /// holds that were placed and reports the first failing line.
    pub(crate) async fn hold_all(
        &self,
        order: &OrderId,
        buyer: &BuyerId,
        ttl_ms: u64,
        plan: &OrderPlan,
    ) -> Result<Reservation, OrderError> {
        let mut pending: Vec<PendingLine> = Vec::with_capacity(plan.lines.len());
        let mut failure: Option<OrderError> = None;
        for (position, (line, slot)) in plan.lines.iter().zip(&plan.slots).enumerate() {
            let command = SkuCommand::Reserve(ReserveLine {
                order: order.clone(),
                buyer: buyer.clone(),
                quantity: line.quantity,
                ttl_ms,
            });
            match self.enqueue(slot, command) {
                Ok(answer) => pending.push((position, answer)),
                Err(error) => {
                    failure = Some(error.into_order_error(line.index));
                    break;
                }
            }
        }
        let mut held = Vec::with_capacity(pending.len());
        let mut held_slots = Vec::with_capacity(pending.len());
        let mut expires_at_ms = u64::MAX;
        for (position, answer) in pending {
            let (index, slot) = (plan.lines[position].index, &plan.slots[position]);
            match held_line(index, &slot.sku, answer.await.ok()) {
                Ok((line, line_expiry_ms)) => {
                    expires_at_ms = expires_at_ms.min(line_expiry_ms);
                    held.push(line);
                    held_slots.push(slot);
                }
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
        let Some(failure) = failure else {
            return Ok(Reservation { order: order.clone(), expires_at_ms, lines: held });
        };
        for slot in held_slots {
            self.abort_line(order, slot).await;
        }
        Err(failure)
    }

    /// Enqueues a command that must not be dropped for want of admission
    /// (part of a decided settlement or an abort), waiting out `Busy` a
    /// bounded number of times.
    pub(crate) async fn enqueue_patiently(
        &self,
        slot: &Arc<SkuSlot>,
        command: SkuCommand,
    ) -> Result<oneshot::Receiver<SkuAnswer>, EngineError> {
        const ATTEMPTS_MAX: u32 = 200;
        let mut last = EngineError::Busy { retry_after_ms: self.inner.config.busy_retry_after_ms };
        for _ in 0..ATTEMPTS_MAX {
            match self.enqueue(slot, command.clone()) {
                Err(EngineError::Busy { retry_after_ms }) => {
                    last = EngineError::Busy { retry_after_ms };
                    tokio::time::sleep(std::time::Duration::from_millis(retry_after_ms)).await;
                }
                other => return other,
            }
        }
        Err(last)
    }

    /// Undoes one line's hold, waiting out `Busy` for as long as it lasts:
    /// the hold may be prepared, and a prepared hold never expires, so
    /// giving up would lock its units for good. Only a log failure (the
    /// engine answers nothing more) stops it.
    pub(crate) async fn abort_line(&self, order: &OrderId, slot: &Arc<SkuSlot>) {
        let answer = loop {
            match self.enqueue_patiently(slot, SkuCommand::Abort { order: order.clone() }).await {
                Err(EngineError::Busy { .. }) => continue,
                Ok(answer) => break answer.await.ok(),
                Err(_) => break None,
            }
        };
        if answer.is_none() {
            tracing::warn!(%order, sku = %slot.sku, "could not abort a hold: the log failed");
        }
    }

    /// Sells every held unit of the order.
    pub async fn commit(&self, order: &OrderId) -> Result<Settlement, OrderError> {
        self.settle(order, Settle::Commit { fewer: &[] }).await
    }

    /// Sells the given units per SKU (lines not named sell all their units);
    /// the rest of each hold goes back to stock.
    pub async fn commit_fewer(&self, order: &OrderId, fewer: &[(SkuId, u32)]) -> Result<Settlement, OrderError> {
        self.settle(order, Settle::Commit { fewer }).await
    }

    /// Gives every held unit of the order back to stock.
    pub async fn release(&self, order: &OrderId) -> Result<Settlement, OrderError> {
        self.settle(order, Settle::Release).await
    }

    pub(crate) async fn settle(&self, order: &OrderId, how: Settle<'_>) -> Result<Settlement, OrderError> {
        let committing = matches!(how, Settle::Commit { .. });
        let (plan, resting, arrival) = match self.start_settle(order, how, false) {
            SettleStart::Answered(answer) => return answer,
            SettleStart::Begun { plan, resting, arrival } => (plan, resting, arrival),
            SettleStart::Declined => unreachable!("only a batch declines an order of several lines"),
        };
        let directory = &self.order_partition(order).orders;
        // Several lines held here are sold all or none by a transaction,
        // on its own task so that a caller who stops waiting cannot leave
        // it half done. (Lines prepared for a coordinator elsewhere follow
        // that coordinator's decision instead.)
        if committing && plan.lines.len() > 1 && resting == OrderPhase::Held {
            let lines = plan
                .lines
                .iter()
                .map(|line| TransactionLine { sku: line.sku.clone(), units: how.units_for(&line.sku) })
                .collect();
            let (engine, order) = (self.clone(), order.clone());
            let task = tokio::spawn(async move { engine.commit_transaction(order, plan, lines).await });
            return task.await.unwrap_or_else(|failure| std::panic::resume_unwind(failure.into_panic()));
        }
        let interrupted = InterruptedOrder { directory, order, arrival, resting, finished: false };
        let answers = self.apply_to_lines(&plan, false, |line| how.command(order, &line.sku)).await;
        interrupted.finish();
        self.finish_settle(order, &plan, committing, resting, answers)
    }

    /// A commit or release up to the moment its lines are asked: the
    /// answer if the directory gives one (a replay, a refusal), or else
    /// the order marked `Settling` with its plan and the phase it rests in
    /// if the settle is interrupted. With `single_line_only`, an order of
    /// several lines is left untouched (`Declined`) for the caller's
    /// awaited path.
    pub(crate) fn start_settle(&self, order: &OrderId, how: Settle<'_>, single_line_only: bool) -> SettleStart {
        let committing = matches!(how, Settle::Commit { .. });
        if let Settle::Commit { fewer } = how {
            for (index, (sku, _)) in fewer.iter().enumerate() {
                if fewer[..index].iter().any(|(earlier, _)| earlier == sku) {
                    return SettleStart::Answered(Err(OrderError::NotInOrder { sku: sku.clone() }));
                }
            }
        }
        let answered = |answer| SettleStart::Answered(answer);
        let mut orders = lock(&self.order_partition(order).orders);
        let Some(record) = orders.records.get_mut(order) else {
            return answered(Err(OrderError::UnknownReservation));
        };
        match (record.phase, committing) {
            (OrderPhase::Held | OrderPhase::Prepared, _) => {}
            (OrderPhase::Committed, true) | (OrderPhase::Released, false) => {
                let mut settlement = record.settlement.clone().expect("a settled order has its settlement");
                settlement.replayed = true;
                return answered(Ok(settlement));
            }
            (OrderPhase::Committed, false) => return answered(Err(OrderError::AlreadyCommitted)),
            (OrderPhase::Released, true) => return answered(Err(OrderError::AlreadyReleased)),
            (OrderPhase::Expired, _) => {
                let expired_at_ms = record.reservation.as_ref().map_or(0, |r| r.expires_at_ms);
                return answered(Err(OrderError::Expired { expired_at_ms }));
            }
            (OrderPhase::Reserving | OrderPhase::Settling, _) => {
                return answered(Err(OrderError::Busy { retry_after_ms: 1 }));
            }
        }
        // Every requested count is checked against its hold before any
        // line is touched: one line refusing while the others sell would
        // split the order.
        if let (Settle::Commit { fewer }, Some(reservation)) = (how, record.reservation.as_ref()) {
            for (sku, units) in fewer {
                let held = reservation.lines.iter().find(|line| line.sku == *sku).map(|line| line.units);
                match held {
                    None => return answered(Err(OrderError::NotInOrder { sku: sku.clone() })),
                    Some(held) if *units == 0 || *units > held => {
                        return answered(Err(OrderError::InvalidUnits { sku: sku.clone(), units: *units, held }));
                    }
                    Some(_) => {}
                }
            }
        }
        if single_line_only && record.plan.lines.len() > 1 {
            return SettleStart::Declined;
        }
        let resting = record.phase;
        record.phase = OrderPhase::Settling;
        SettleStart::Begun { plan: record.plan.clone(), resting, arrival: record.arrival }
    }

    /// Records how a settle of `order` ended from its lines' answers, and
    /// answers the caller.
    pub(crate) fn finish_settle(
        &self,
        order: &OrderId,
        plan: &OrderPlan,
        committing: bool,
        resting: OrderPhase,
        answers: Vec<Result<SkuAnswer, OrderError>>,
    ) -> Result<Settlement, OrderError> {
        let mut settled = Vec::with_capacity(answers.len());
        let mut first_error = None;
        for (position, answer) in answers.into_iter().enumerate() {
            let (index, sku) = (plan.lines[position].index, plan.slots[position].sku.clone());
            match answer {
                Ok(SkuAnswer {
                    result: Ok(SkuOutcome::Committed { units, .. } | SkuOutcome::Released { units, .. }),
                    stock,
                }) => {
                    settled.push(ReservedLine { sku, units, stock });
                }
                Ok(SkuAnswer { result: Err(error), stock }) => {
                    first_error.get_or_insert(OrderError::Line { index, sku, error, stock });
                }
                Ok(SkuAnswer { result: Ok(other), .. }) => unreachable!("a settle answered {other:?}"),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        let mut orders = lock(&self.order_partition(order).orders);
        let record = orders.records.get_mut(order).expect("a settling order stays in the directory");
        let Some(error) = first_error else {
            let settlement = Settlement { order: order.clone(), lines: settled, replayed: false };
            record.phase = if committing { OrderPhase::Committed } else { OrderPhase::Released };
            record.settlement = Some(settlement.clone());
            return Ok(settlement);
        };
        // A line refused: for a single line (or a release) the SKU's answer
        // is the order's answer. Expired lines mean the order expired.
        record.phase = match (&error, plan.lines.len()) {
            (OrderError::Line { error: SkuError::Expired { .. }, .. }, _) => OrderPhase::Expired,
            (OrderError::Line { error: SkuError::InvalidQuantity { .. } | SkuError::IdempotencyConflict, .. }, _) => {
                resting
            }
            (OrderError::Line { .. }, lines) if lines > 1 && !settled.is_empty() => {
                tracing::error!(%order, ?error, "a multi-line order settled on some lines only");
                // What did settle is the order's settlement from now on: a
                // settled phase always has one.
                record.settlement = Some(Settlement { order: order.clone(), lines: settled, replayed: false });
                if committing {
                    OrderPhase::Committed
                } else {
                    OrderPhase::Released
                }
            }
            // Busy or unavailable: settling again is safe (lines are idempotent).
            _ => resting,
        };
        Err(match error {
            OrderError::Line { error: SkuError::Expired { expired_at_ms }, .. } => {
                OrderError::Expired { expired_at_ms }
            }
            other => other,
        })
    }

    /// Sends `command_for(line)` to every line of `plan` at once and
    /// collects the answers in line order. `decided` commands (carrying out
    /// a transaction's decision) wait out `Busy` for as long as it lasts;
    /// others give up after a bounded wait.
    pub(crate) async fn apply_to_lines(
        &self,
        plan: &OrderPlan,
        decided: bool,
        command_for: impl Fn(&MergedLine) -> SkuCommand,
    ) -> Vec<Result<SkuAnswer, OrderError>> {
        let mut pending = Vec::with_capacity(plan.lines.len());
        for (line, slot) in plan.lines.iter().zip(&plan.slots) {
            let command = command_for(line);
            let enqueued = loop {
                match self.enqueue_patiently(slot, command.clone()).await {
                    Err(EngineError::Busy { .. }) if decided => continue,
                    other => break other,
                }
            };
            pending.push(enqueued.map_err(|error| error.into_order_error(line.index)));
        }
        let mut answers = Vec::with_capacity(pending.len());
        for enqueued in pending {
            answers.push(match enqueued {
                Ok(answer) => answer.await.map_err(|_| OrderError::Unavailable),
                Err(error) => Err(error),
            });
        }
        answers
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Settle<'a> {
    Commit { fewer: &'a [(SkuId, u32)] },
    Release,
}

impl Settle<'_> {
    /// The units a commit sells of the line of `sku` (`None`: all held).
    pub(crate) fn units_for(self, sku: &SkuId) -> Option<u32> {
        match self {
            Settle::Commit { fewer } => fewer.iter().find(|(named, _)| named == sku).map(|&(_, units)| units),
            Settle::Release => None,
        }
    }

    /// The command that settles `order` on the line of `sku`.
    pub(crate) fn command(self, order: &OrderId, sku: &SkuId) -> SkuCommand {
        match self {
            Settle::Commit { .. } => SkuCommand::Commit { order: order.clone(), units: self.units_for(sku) },
            Settle::Release => SkuCommand::Release { order: order.clone() },
        }
    }
}

/// Where [`Engine::start_reserve`] left a reserve.
pub(crate) enum ReserveStart {
    Answered(Result<Reservation, OrderError>),
    /// In the directory as `Reserving`; its lines are to be held.
    Admitted {
        plan: Arc<OrderPlan>,
        arrival: u64,
    },
}

/// Where [`Engine::start_settle`] left a commit or release.
pub(crate) enum SettleStart {
    Answered(Result<Settlement, OrderError>),
    /// In the directory as `Settling`; its lines are to be settled.
    Begun {
        plan: Arc<OrderPlan>,
        resting: OrderPhase,
        arrival: u64,
    },
    /// Several lines, and the caller asked for one only; nothing changed.
    Declined,
}

/// One line's answer to a reserve, as the order's: the held line and when
/// it expires, or the refusal (`None`: its owner stopped before answering).
pub(crate) fn held_line(
    index: usize,
    sku: &SkuId,
    answer: Option<SkuAnswer>,
) -> Result<(ReservedLine, u64), OrderError> {
    match answer {
        Some(SkuAnswer { result: Ok(SkuOutcome::Reserved { units, expires_at_ms, .. }), stock }) => {
            Ok((ReservedLine { sku: sku.clone(), units, stock }, expires_at_ms))
        }
        Some(SkuAnswer { result: Err(error), stock }) => {
            Err(OrderError::Line { index, sku: sku.clone(), error, stock })
        }
        Some(SkuAnswer { result: Ok(other), .. }) => unreachable!("a reserve answered {other:?}"),
        None => Err(OrderError::Unavailable),
    }
}
