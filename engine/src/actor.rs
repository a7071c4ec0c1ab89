//! The actor that owns one SKU while it is active.
//!
//! It never receives requests through its ractor mailbox: requests go into
//! the SKU's [`WakeQueue`](flashstock_sync::WakeQueue) and the mailbox only
//! carries a wake-up (`Drain`) or a timer tick, at most a few at a time. On a
//! wake-up the actor takes up to `batch_max` requests, applies them in order
//! to its [`SkuState`] at one `now`, publishes the new counts to the sold-out
//! hint, and only then answers them, so no caller can see an answer that the
//! hint contradicts.
//!
//! Timers: the actor keeps one tick armed for the earlier of (a) the next
//! hold expiry, so holds expire without anyone asking (as an
//! [`SkuCommand::Expire`] it applies itself), and (b) the idle deadline, at
//! which a SKU with no live holds passivates: its state goes back to the slot
//! and the actor stops; the next request starts a fresh one.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::log::record::{EncodedRecord, LogRecord};
use crate::log::writer::{Append, SubmitError, WriteFailure};
use crate::sku::{SkuAnswer, SkuCommand, SkuState};
use crate::slot::{Reply, Request, SkuSlot};

// The mailbox's messages are defined beside the slot that sends them, so
// that the slot never depends on the actor.
pub use crate::slot::SkuMessage;

#[derive(Debug)]
pub(crate) struct SkuActor;

#[derive(Debug)]
pub(crate) struct SkuActorState {
    slot: Arc<SkuSlot>,
    /// `None` only while being handed back at passivation.
    sku: Option<SkuState>,
    batch: Vec<Request>,
    answered: Vec<(Request, SkuAnswer)>,
    /// When the armed tick fires, if one is armed.
    tick_due_ms: Option<u64>,
    last_busy_ms: u64,
}

impl SkuActorState {
    fn state(&mut self) -> &mut SkuState {
        self.sku.as_mut().expect("an active SKU actor owns its state")
    }

    fn publish(&mut self) {
        let state = self.sku.as_ref().expect("an active SKU actor owns its state");
        self.slot.publish(state);
    }

    /// Applies one batch from the queue; returns whether more is waiting.
    fn drain_once(&mut self) -> bool {
        let batch_max = self.slot.config.batch_max;
        let mut batch = std::mem::take(&mut self.batch);
        let taken = self.slot.queue.take_batch(batch_max, &mut batch);
        if taken == 0 {
            self.batch = batch;
            return self.slot.queue.finish_batch(0);
        }
        let now_ms = self.slot.clock.now_ms();
        self.last_busy_ms = now_ms;
        let mut records = Vec::new();
        for request in batch.drain(..) {
            let (answer, recorded) = self.state().apply_recording(now_ms, &request.command);
            if let (Some(command), Some(_)) = (recorded, &self.slot.log) {
                records.push(EncodedRecord::from(&LogRecord::Apply { sku: self.slot.sku.clone(), now_ms, command }));
            }
            self.answered.push((request, answer));
        }
        self.batch = batch;
        // Publish before answering: whoever sees an answer also sees counts
        // at least this new in the hint.
        self.publish();
        self.release_answers(records, taken);
        self.slot.queue.finish_batch(taken)
    }

    /// Answers the batch just applied: at once for an in-memory engine;
    /// once its records (and every earlier record of the node's log) are
    /// durable for a durable one. Even a batch with no records waits its
    /// turn, because its answers may rest on records not yet durable.
    fn release_answers(&mut self, records: Vec<EncodedRecord>, taken: usize) {
        let Some(log) = &self.slot.log else {
            for (request, answer) in self.answered.drain(..) {
                request.answer(answer);
            }
            self.slot.admitted_done(taken);
            return;
        };
        let answered: Vec<(Request, SkuAnswer)> = self.answered.drain(..).collect();
        let slot = self.slot.clone();
        let append = Append {
            records,
            on_durable: Box::new(move |outcome| {
                match outcome {
                    Ok(_) => {
                        // Waiting callers are woken from here; a batch's
                        // completions are finished off this thread.
                        let mut completed = Vec::new();
                        for (request, answer) in answered {
                            match request.reply {
                                Reply::Waiter(reply) => {
                                    let _ = reply.send(answer);
                                }
                                Reply::Batch(completion) => completed.push((completion, answer)),
                            }
                        }
                        if !completed.is_empty() {
                            slot.completer.finish(completed);
                        }
                    }
                    // Dropping the requests tells their callers the owner
                    // could not answer; the engine (every partition: one
                    // log) answers nothing more.
                    Err(failure) => {
                        slot.log_failed.store(true, Ordering::Release);
                        tracing::error!(sku = %slot.sku, %failure, "answers withheld: their records are not durable");
                    }
                }
                slot.admitted_done(taken);
            }),
        };
        if let Err(SubmitError(append)) = log.submit(append) {
            self.slot.log_failed.store(true, Ordering::Release);
            let cause = Arc::from("the log writer stopped");
            (append.on_durable)(Err(WriteFailure { cause }));
        }
    }

    /// Logs a command the actor issued itself (the expiry timer's); no
    /// answer waits on it, only later answers, which queue behind it.
    fn record_own(&self, now_ms: u64, command: SkuCommand) {
        let Some(log) = &self.slot.log else { return };
        let failed = self.slot.log_failed.clone();
        let append = Append {
            records: vec![EncodedRecord::from(&LogRecord::Apply { sku: self.slot.sku.clone(), now_ms, command })],
            on_durable: Box::new(move |outcome| {
                if outcome.is_err() {
                    failed.store(true, Ordering::Release);
                }
            }),
        };
        if log.submit(append).is_err() {
            self.slot.log_failed.store(true, Ordering::Release);
        }
    }

    /// Arms a tick for the next expiry or the idle deadline if none is armed
    /// early enough.
    fn arm_tick(&mut self, myself: &ActorRef<SkuMessage>) {
        let now_ms = self.slot.clock.now_ms();
        let idle_deadline_ms = self.last_busy_ms.saturating_add(self.slot.config.actor_idle_ms);
        let due_ms = match self.sku.as_ref().and_then(SkuState::next_expiry_ms) {
            Some(expiry_ms) => expiry_ms.min(idle_deadline_ms),
            None => idle_deadline_ms,
        };
        if self.tick_due_ms.is_some_and(|armed_ms| armed_ms <= due_ms) {
            return;
        }
        self.tick_due_ms = Some(due_ms);
        let delay = Duration::from_millis(due_ms.saturating_sub(now_ms));
        myself.send_after(delay, || SkuMessage::Tick);
    }

    /// Hands the state back to the slot and parks the queue if the SKU has
    /// been idle long enough and holds nothing. Returns whether it parked.
    fn try_passivate(&mut self, now_ms: u64) -> bool {
        let idle = now_ms.saturating_sub(self.last_busy_ms) >= self.slot.config.actor_idle_ms;
        if !idle || self.state().hold_count() > 0 {
            return false;
        }
        let state = self.sku.take().expect("an active SKU actor owns its state");
        self.slot.store_parked(state);
        if self.slot.queue.try_park() {
            return true;
        }
        // Work arrived meanwhile (its wake-up is in our mailbox): keep going.
        self.sku = Some(self.slot.take_parked());
        false
    }
}

impl Actor for SkuActor {
    type Msg = SkuMessage;
    type State = SkuActorState;
    type Arguments = (Arc<SkuSlot>, SkuState);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (slot, sku): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Registered before we take any request, so a producer that later
        // finds the queue idle always wakes this actor, never a stopped one.
        slot.set_actor(myself.clone());
        let now_ms = slot.clock.now_ms();
        let batch_max = slot.config.batch_max;
        let mut state = SkuActorState {
            slot,
            sku: Some(sku),
            batch: Vec::with_capacity(batch_max),
            answered: Vec::with_capacity(batch_max),
            tick_due_ms: None,
            last_busy_ms: now_ms,
        };
        state.arm_tick(&myself);
        Ok(state)
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Whoever started us pushed a request and will send no wake-up.
        myself.cast(SkuMessage::Drain)?;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if state.sku.is_none() {
            // Passivated: a successor may own the queue now. A stray message
            // that reached us between parking and stopping must not touch it.
            return Ok(());
        }
        match message {
            SkuMessage::Drain => {
                if state.drain_once() {
                    // More is waiting and no wake-up will come for it. Going
                    // through the mailbox instead of looping lets timer ticks
                    // in between.
                    myself.cast(SkuMessage::Drain)?;
                }
                state.arm_tick(&myself);
            }
            SkuMessage::Tick => {
                state.tick_due_ms = None;
                let now_ms = state.slot.clock.now_ms();
                if state.state().next_expiry_ms().is_some_and(|expiry_ms| expiry_ms <= now_ms) {
                    let (answer, recorded) = state.state().apply_recording(now_ms, &SkuCommand::Expire);
                    tracing::debug!(sku = %state.slot.sku, ?answer.result, "expired holds");
                    if let Some(command) = recorded {
                        state.record_own(now_ms, command);
                    }
                    state.publish();
                }
                if state.try_passivate(now_ms) {
                    tracing::debug!(sku = %state.slot.sku, "passivated");
                    myself.stop(None);
                    return Ok(());
                }
                state.arm_tick(&myself);
            }
        }
        Ok(())
    }
}
