//! What outlives a SKU's actor: its [`SkuSlot`] (state while parked,
//! queue, admission gates, published counts) and the [`Request`]s that
//! travel to the actor. The actor and the engine both work through it.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use flashstock_sync::{AdmissionGate, SnapshotReading, WakeQueue};
use ractor::ActorRef;
use tokio::sync::oneshot;

use crate::batch::{BatchCompletion, Completer};
use crate::clock::Clock;
use crate::config::EngineConfig;
use crate::ids::SkuId;
use crate::log::writer::LogSubmitter;
use crate::sku::{SkuAnswer, SkuCommand, SkuState};

/// Messages an SKU actor receives. Requests themselves travel in the slot's
/// queue, so this mailbox stays tiny whatever the load.
#[derive(Debug)]
pub enum SkuMessage {
    /// Requests are waiting in the slot's queue.
    Drain,
    /// A timer fired: expire holds, maybe passivate.
    Tick,
}

/// A request travelling to a SKU actor. It holds one place in the SKU's and
/// the partition's admission gates, which the actor gives back (for a whole
/// batch at once) after answering.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) command: SkuCommand,
    pub(crate) reply: Reply,
}

/// Where a request's answer goes.
#[derive(Debug)]
pub(crate) enum Reply {
    /// To a future awaiting it.
    Waiter(oneshot::Sender<SkuAnswer>),
    /// Into a batch's completion, which finishes the order and answers the
    /// batch's sink (see `batch.rs`).
    Batch(BatchCompletion),
}

impl Request {
    /// Sends the answer; the caller then calls [`SkuSlot::admitted_done`].
    /// Dropping a request unanswered tells its caller that the owner could
    /// not answer.
    pub(crate) fn answer(self, answer: SkuAnswer) {
        match self.reply {
            // The caller may have given up waiting; the answer then has no reader.
            Reply::Waiter(reply) => {
                let _ = reply.send(answer);
            }
            Reply::Batch(completion) => completion.complete(answer),
        }
    }
}

/// Everything about one SKU that outlives its actor.
#[derive(Debug)]
pub(crate) struct SkuSlot {
    pub(crate) sku: SkuId,
    /// Where the actor sends its records; `None` for an in-memory engine.
    pub(crate) log: Option<LogSubmitter>,
    /// Set once the log failed: memory may be ahead of the log,
    /// so the partition answers nothing more.
    pub(crate) log_failed: Arc<AtomicBool>,
    pub(crate) config: Arc<EngineConfig>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) gate: AdmissionGate,
    pub(crate) partition_gate: Arc<AdmissionGate>,
    pub(crate) snapshot: flashstock_sync::StockSnapshotCell,
    pub(crate) queue: WakeQueue<Request>,
    /// The state while no actor runs.
    pub(crate) parked: Mutex<Option<SkuState>>,
    /// The running actor, or the last one (only woken while it runs).
    pub(crate) actor: Mutex<Option<ActorRef<SkuMessage>>>,
    /// Where durable answers of batches are finished.
    pub(crate) completer: Arc<Completer>,
}

pub(crate) fn reading_of(state: &SkuState) -> SnapshotReading {
    SnapshotReading { stock: state.stock(), next_expiry_ms: state.next_expiry_ms().unwrap_or(u64::MAX) }
}

impl SkuSlot {
    pub(crate) fn publish(&self, state: &SkuState) {
        self.snapshot.publish(reading_of(state));
    }

    /// Gives back the admission places of `count` answered requests.
    pub(crate) fn admitted_done(&self, count: usize) {
        self.gate.release_many(count);
        self.partition_gate.release_many(count);
    }

    pub(crate) fn store_parked(&self, state: SkuState) {
        let previous = lock(&self.parked).replace(state);
        assert!(previous.is_none(), "two parked states for one SKU");
    }

    pub(crate) fn take_parked(&self) -> SkuState {
        lock(&self.parked).take().expect("a parked SKU has its state in the slot")
    }

    pub(crate) fn set_actor(&self, actor: ActorRef<SkuMessage>) {
        *lock(&self.actor) = Some(actor);
    }

    pub(crate) fn wake(&self) {
        let actor = lock(&self.actor).clone().expect("a woken SKU has an actor");
        if actor.cast(SkuMessage::Drain).is_err() {
            // Only a crashed actor refuses messages; the node stops on
            // panics, so this is unreachable outside tests that kill actors.
            tracing::error!(sku = %self.sku, "SKU actor is gone; its queued requests fail");
        }
    }
}

/// Locks a mutex whose holder cannot leave it half-updated (every critical
/// section here is a few assignments), so poisoning carries no information.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
