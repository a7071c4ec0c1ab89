//! Commits that span several SKUs, made whole across a crash.
//!
//! A commit of several lines is a transaction, written in the log of the
//! partition that owns the order id:
//!
//! 1. `TransactionBegun { order, lines }`, then every line is *prepared*
//!    (its hold stops expiring by TTL; `SkuCommand::Prepare`);
//! 2. once every line is prepared, `TransactionCommitted { order }` (the
//!    decision), then every line is committed, waiting out `Busy` for as
//!    long as it lasts;
//! 3. `TransactionEnded { order }`.
//!
//! If a line cannot be prepared (it expired), the transaction ends with no
//! decision and the other lines are aborted (expired) or given their TTL
//! back (busy: the caller may retry).
//!
//! The order of records is the order of submission to the one log writer,
//! and durability covers a prefix of the log, so a record submitted before
//! the lines' commands are sent is durable before any of their answers is.
//! That is why the engine's own transactions never wait for their records:
//! a prepare answered means `TransactionBegun` is durable, a commit
//! answered means the decision is.
//!
//! Recovery finishes every transaction the log left open
//! ([`crate::log::replay::ReplayedState::finish_transactions`]): decided
//! ones are committed on every line, undecided ones give their prepared
//! lines their TTL back. Lines on SKUs this engine does not hold (a
//! coordinator's lines on other members) are left to the caller, which
//! finds them in [`Engine::take_recovered_transactions`] and ends them with
//! [`Engine::end_transaction`] once carried out.
//!
//! The participant side, for a coordinator elsewhere: [`Engine::prepare`],
//! [`Engine::unprepare`], then `commit` or `release` as usual.

use std::sync::Arc;

use crate::directory::{InterruptedOrder, OrderPhase, OrderPlan};
use crate::ids::OrderId;
use crate::log::record::{LogRecord, OpenTransaction, TransactionLine};
use crate::order::{OrderError, Reservation, Settlement};
use crate::runtime::Engine;
use crate::sku::{SkuAnswer, SkuCommand, SkuError, SkuOutcome};
use crate::slot::lock;

impl Engine {
    /// Carries out a transaction over the lines of `order` (held here, phase
    /// `Settling`), then records how it ended in the order directory.
    pub(crate) async fn commit_transaction(
        self,
        order: OrderId,
        plan: Arc<OrderPlan>,
        lines: Vec<TransactionLine>,
    ) -> Result<Settlement, OrderError> {
        let begun = LogRecord::TransactionBegun { order: order.clone(), lines: lines.clone() };
        if self.submit_record(&begun).is_err() {
            return Err(self.end_undecided(&order, OrderPhase::Held, OrderError::Unavailable));
        }
        let prepared = self.apply_to_lines(&plan, false, |_| SkuCommand::Prepare { order: order.clone() }).await;
        let refusal = prepared.into_iter().zip(&plan.lines).find_map(|(answer, line)| match answer {
            Ok(SkuAnswer { result: Ok(SkuOutcome::Prepared { .. }), .. }) => None,
            Ok(SkuAnswer { result: Ok(other), .. }) => unreachable!("a prepare answered {other:?}"),
            Ok(SkuAnswer { result: Err(error), stock }) => {
                Some(OrderError::Line { index: line.index, sku: line.sku.clone(), error, stock })
            }
            Err(error) => Some(error),
        });
        if let Some(refusal) = refusal {
            // No decision: the transaction ends with nothing sold.
            let phase = if let OrderError::Line { error: SkuError::Expired { expired_at_ms }, .. } = refusal {
                // The order expired on one line: every line goes back now
                // rather than at its TTL.
                for slot in &plan.slots {
                    self.abort_line(&order, slot).await;
                }
                let _ = self.submit_record(&LogRecord::TransactionEnded { order: order.clone() });
                return Err(self.end_undecided(&order, OrderPhase::Expired, OrderError::Expired { expired_at_ms }));
            } else {
                // Busy or unavailable: the lines keep their holds and their
                // TTL, and the caller may try again.
                self.apply_to_lines(&plan, true, |_| SkuCommand::Unprepare { order: order.clone() }).await;
                OrderPhase::Held
            };
            // Best effort: a transaction left open without a decision is
            // ended the same way by the next recovery.
            let _ = self.submit_record(&LogRecord::TransactionEnded { order: order.clone() });
            return Err(self.end_undecided(&order, phase, refusal));
        }
        if self.submit_record(&LogRecord::TransactionCommitted { order: order.clone() }).is_err() {
            // The log failed: nothing more is acknowledged, and recovery
            // gives the prepared lines their TTL back (no decision is durable).
            return Err(self.end_undecided(&order, OrderPhase::Held, OrderError::Unavailable));
        }
        let units_of = |sku: &crate::ids::SkuId| lines.iter().find(|line| line.sku == *sku).and_then(|line| line.units);
        let committed = self
            .apply_to_lines(&plan, true, |line| SkuCommand::Commit { order: order.clone(), units: units_of(&line.sku) })
            .await;
        // A line that could not be committed (the log failed) keeps the
        // transaction open: recovery commits it.
        if committed.iter().all(Result::is_ok) {
            let _ = self.submit_record(&LogRecord::TransactionEnded { order: order.clone() });
        }
        self.finish_settle(&order, &plan, true, OrderPhase::Held, committed)
    }

    /// Puts an order whose transaction ended without a decision in `phase`
    /// and returns `error` for its caller.
    fn end_undecided(&self, order: &OrderId, phase: OrderPhase, error: OrderError) -> OrderError {
        if let Some(record) = lock(self.order_directory(order)).records.get_mut(order) {
            record.phase = phase;
        }
        error
    }

    /// Prepares every line of `order` (held here) for a transaction
    /// coordinated elsewhere: its holds stop expiring and wait for
    /// [`Engine::commit`], [`Engine::release`] or [`Engine::unprepare`].
    /// Idempotent; answers once every line's prepare is durable. If a line
    /// expired, every line goes back to stock at once and the order is
    /// `Expired`; any other refusal leaves the prepared lines prepared for
    /// the coordinator to unprepare.
    ///
    /// `Prepared` only says that some lines may be prepared (a refusal or
    /// an interruption part-way leaves it too), so a prepare in that phase
    /// prepares every line again (each is idempotent) rather than answering
    /// from the phase: an answer `Ok` always means every line is prepared.
    /// A caller that stops waiting part-way leaves the order `Prepared`, so
    /// that a retry, an unprepare or a decision finds a way forward.
    pub async fn prepare(&self, order: &OrderId) -> Result<Reservation, OrderError> {
        let directory = self.order_directory(order);
        let (plan, arrival) = {
            let mut orders = lock(directory);
            let record = orders.records.get_mut(order).ok_or(OrderError::UnknownReservation)?;
            match record.phase {
                OrderPhase::Held | OrderPhase::Prepared => {}
                OrderPhase::Committed => return Err(OrderError::AlreadyCommitted),
                OrderPhase::Released => return Err(OrderError::AlreadyReleased),
                OrderPhase::Expired => {
                    let expired_at_ms = record.reservation.as_ref().map_or(0, |r| r.expires_at_ms);
                    return Err(OrderError::Expired { expired_at_ms });
                }
                OrderPhase::Reserving | OrderPhase::Settling => return Err(OrderError::Busy { retry_after_ms: 1 }),
            }
            record.phase = OrderPhase::Settling;
            (record.plan.clone(), record.arrival)
        };
        let interrupted =
            InterruptedOrder { directory, order, arrival, resting: OrderPhase::Prepared, finished: false };
        let prepared = self.apply_to_lines(&plan, false, |_| SkuCommand::Prepare { order: order.clone() }).await;
        let refusal = prepared.into_iter().zip(&plan.lines).find_map(|(answer, line)| match answer {
            Ok(SkuAnswer { result: Ok(_), .. }) => None,
            Ok(SkuAnswer { result: Err(SkuError::Expired { expired_at_ms }), .. }) => {
                Some(OrderError::Expired { expired_at_ms })
            }
            Ok(SkuAnswer { result: Err(error), stock }) => {
                Some(OrderError::Line { index: line.index, sku: line.sku.clone(), error, stock })
            }
            Err(error) => Some(error),
        });
        let expired = matches!(refusal, Some(OrderError::Expired { .. }));
        if expired {
            // Expired on one line: the order can never be committed, so every
            // line goes back now (a prepared one would otherwise wait for a
            // decision that cannot be to commit).
            for slot in &plan.slots {
                self.abort_line(order, slot).await;
            }
        }
        interrupted.finish();
        let mut orders = lock(directory);
        let record = orders.records.get_mut(order).expect("a settling order stays in the directory");
        match refusal {
            None => {
                record.phase = OrderPhase::Prepared;
                Ok(record.reservation.clone().expect("a prepared order has its reservation"))
            }
            Some(error) => {
                // Otherwise lines that did prepare stay prepared until the
                // coordinator, told of the refusal, gives them their TTL back.
                record.phase = if expired { OrderPhase::Expired } else { OrderPhase::Prepared };
                Err(error)
            }
        }
    }

    /// Gives the prepared lines of `order` their TTL back (the coordinator
    /// decided nothing): each ends by expiry again, at once if its time has
    /// passed. Idempotent; an order never prepared, released or expired is
    /// left as it is; a committed one is `AlreadyCommitted`.
    ///
    /// A caller that stops waiting part-way leaves the order `Prepared`
    /// (some lines may still be), so that a retry unprepares every line.
    pub async fn unprepare(&self, order: &OrderId) -> Result<(), OrderError> {
        let directory = self.order_directory(order);
        let (plan, arrival) = {
            let mut orders = lock(directory);
            let record = orders.records.get_mut(order).ok_or(OrderError::UnknownReservation)?;
            match record.phase {
                OrderPhase::Prepared => {}
                OrderPhase::Held | OrderPhase::Released | OrderPhase::Expired => return Ok(()),
                OrderPhase::Committed => return Err(OrderError::AlreadyCommitted),
                OrderPhase::Reserving | OrderPhase::Settling => return Err(OrderError::Busy { retry_after_ms: 1 }),
            }
            record.phase = OrderPhase::Settling;
            (record.plan.clone(), record.arrival)
        };
        let interrupted =
            InterruptedOrder { directory, order, arrival, resting: OrderPhase::Prepared, finished: false };
        let answers = self.apply_to_lines(&plan, true, |_| SkuCommand::Unprepare { order: order.clone() }).await;
        interrupted.finish();
        let failed = answers.into_iter().find_map(Result::err);
        let mut orders = lock(directory);
        let record = orders.records.get_mut(order).expect("a settling order stays in the directory");
        match failed {
            None => {
                record.phase = OrderPhase::Held;
                Ok(())
            }
            Some(error) => {
                record.phase = OrderPhase::Prepared;
                Err(error)
            }
        }
    }

    /// Writes `record` (a transaction record of a coordinator that spans
    /// members) and waits until it is durable.
    async fn record_durably(&self, record: LogRecord) -> Result<(), OrderError> {
        let durable = match self.submit_record(&record) {
            Ok(Some(durable)) => durable.await.unwrap_or(false),
            Ok(None) => true,
            Err(_) => false,
        };
        if durable {
            Ok(())
        } else {
            Err(OrderError::Unavailable)
        }
    }

    /// Logs the start of a transaction over `lines`, some of which may live
    /// on other members; returns once durable. Call before preparing any
    /// line, so that a restart knows which prepared lines to give back.
    pub async fn begin_transaction(&self, order: &OrderId, lines: Vec<TransactionLine>) -> Result<(), OrderError> {
        self.record_durably(LogRecord::TransactionBegun { order: order.clone(), lines }).await
    }

    /// Logs the decision to commit every line; returns once durable. From
    /// then on the lines must be committed, across restarts if need be.
    pub async fn decide_transaction(&self, order: &OrderId) -> Result<(), OrderError> {
        self.record_durably(LogRecord::TransactionCommitted { order: order.clone() }).await
    }

    /// Logs that every line of the transaction has its outcome.
    pub async fn end_transaction(&self, order: &OrderId) -> Result<(), OrderError> {
        self.record_durably(LogRecord::TransactionEnded { order: order.clone() }).await
    }

    /// Transactions recovery found open with lines on SKUs this engine does
    /// not hold (this engine's own lines are already done): for the caller
    /// to carry out on the other members and then end. Returned once.
    pub fn take_recovered_transactions(&self) -> Vec<(OrderId, OpenTransaction)> {
        std::mem::take(&mut *lock(self.recovered_transactions()))
    }

    /// Undoes every hold of `order` and forgets it, as if its reserve had
    /// been refused: for a coordinator whose order could not be held on
    /// another member, so that the whole order may be tried again with the
    /// same id. Idempotent; a prepared or settled order is not abandoned.
    /// A caller that stops waiting part-way leaves the order held (its
    /// remaining holds expire by their TTL), so that a retry abandons it.
    pub async fn abandon(&self, order: &OrderId) -> Result<(), OrderError> {
        let directory = self.order_directory(order);
        let (plan, arrival, resting) = {
            let mut orders = lock(directory);
            let Some(record) = orders.records.get_mut(order) else { return Ok(()) };
            match record.phase {
                OrderPhase::Held | OrderPhase::Expired => {}
                OrderPhase::Prepared | OrderPhase::Reserving | OrderPhase::Settling => {
                    return Err(OrderError::Busy { retry_after_ms: 1 })
                }
                OrderPhase::Committed => return Err(OrderError::AlreadyCommitted),
                OrderPhase::Released => return Err(OrderError::AlreadyReleased),
            }
            let resting = record.phase;
            record.phase = OrderPhase::Settling;
            (record.plan.clone(), record.arrival, resting)
        };
        let interrupted = InterruptedOrder { directory, order, arrival, resting, finished: false };
        for slot in &plan.slots {
            self.abort_line(order, slot).await;
        }
        interrupted.finish();
        lock(directory).remove(order);
        Ok(())
    }
}
