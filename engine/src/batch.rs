//! [`Engine::submit_batch`]: the requests of one frame in one go.
//!
//! A caller with many requests at once (a member's session, whose client
//! sent a frame of them) hands them over together and is answered through
//! a [`BatchSink`], not a future per request. Each request is worked on
//! synchronously up to the moment its SKU must be asked — the directory's
//! replay, the sold-out hint, admission of the order — and those answered
//! by then are answered before `submit_batch` returns. The rest are
//! grouped by SKU: each SKU's group passes its admission gates in one step
//! and goes into its queue in one push with at most one wake-up, and each
//! request carries its completion (a [`BatchCompletion`]) instead of a
//! channel: the SKU's actor, or the log writer once the answer is durable,
//! finishes the order in the directory and hands the answer to the sink.
//!
//! What cannot be answered without waiting on something else is given
//! back to the caller, untouched, for the engine's awaited entry points:
//! orders of several lines (their holds are placed in parallel and undone
//! if one fails), commits and releases of orders this engine does not
//! know (they may be a coordinator's), and settles whose SKU is too busy
//! to take them now (the awaited path waits `Busy` out, as it always has).
//!
//! A request is never lost between the two: a completion dropped without
//! an answer (its actor or the log failed) answers `Unavailable` and puts
//! the order back as an interrupted future would.

use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;

use crate::directory::{OrderPhase, OrderPlan};
use crate::ids::{FastMap, OrderId, SkuId};
use crate::order::{merge_lines, OrderError, OrderRequest, Reservation, Settlement};
use crate::orders::{held_line, ReserveStart, Settle, SettleStart};
use crate::runtime::Engine;
use crate::sku::{ReserveLine, SkuAnswer, SkuCommand};
use crate::slot::{lock, Reply, Request, SkuSlot};

/// One request of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchRequest {
    Reserve(OrderRequest),
    Commit { order: OrderId, fewer: Vec<(SkuId, u32)> },
    Release { order: OrderId },
}

/// The answer to one request of a batch: what the awaited entry point of
/// the same name would have returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchAnswer {
    Reserved(Result<Reservation, OrderError>),
    Committed(Result<Settlement, OrderError>),
    Released(Result<Settlement, OrderError>),
}

/// Where the answers of a batch go, each under the tag its request came
/// with. Called exactly once for every request `submit_batch` kept, from
/// whichever thread finished it (the caller's, a SKU actor's, or the log
/// writer's for a durable engine): it must be short and must not block.
pub trait BatchSink: Send + Sync + 'static {
    fn answer(&self, tag: u64, answer: BatchAnswer);
}

/// The requests of one SKU within a batch.
struct SkuGroup {
    slot: Arc<SkuSlot>,
    requests: Vec<Request>,
}

impl Engine {
    /// Starts every request of `requests` (see the module's documentation)
    /// and returns those it gave back to the caller, in their order, for
    /// [`Engine::reserve`], [`Engine::commit_fewer`] and [`Engine::release`].
    /// Every other request is answered through `sink`, once.
    pub fn submit_batch(
        &self,
        requests: Vec<(u64, BatchRequest)>,
        sink: &Arc<dyn BatchSink>,
    ) -> Vec<(u64, BatchRequest)> {
        self.inner.completer.start();
        let now_ms = self.inner.clock.now_ms();
        let mut groups: Vec<SkuGroup> = Vec::new();
        // By the slot's address: a batch names few SKUs (a hot one), or
        // many (a long tail), and a map keeps both linear.
        let mut group_of: FastMap<usize, usize> = FastMap::default();
        let mut given_back = Vec::new();
        for (tag, request) in requests {
            let started = match request {
                BatchRequest::Reserve(order_request) => self.start_batch_reserve(tag, order_request, now_ms, sink),
                BatchRequest::Commit { order, fewer } => self.start_batch_settle(tag, order, Some(fewer), sink),
                BatchRequest::Release { order } => self.start_batch_settle(tag, order, None, sink),
            };
            match started {
                Started::Answered => {}
                Started::GivenBack(request) => given_back.push((tag, request)),
                Started::ToSku(slot, request) => {
                    let key = Arc::as_ptr(&slot) as usize;
                    let index = *group_of.entry(key).or_insert_with(|| {
                        groups.push(SkuGroup { slot, requests: Vec::new() });
                        groups.len() - 1
                    });
                    groups[index].requests.push(request);
                }
            }
        }
        for group in groups {
            given_back.extend(self.enqueue_group(group));
        }
        given_back
    }

    fn start_batch_reserve(&self, tag: u64, request: OrderRequest, now_ms: u64, sink: &Arc<dyn BatchSink>) -> Started {
        let lines = match merge_lines(&request, &self.inner.config.limits) {
            Ok(lines) if lines.len() == 1 => lines,
            Ok(_) => return Started::GivenBack(BatchRequest::Reserve(request)),
            Err(refused) => {
                sink.answer(tag, BatchAnswer::Reserved(Err(refused)));
                return Started::Answered;
            }
        };
        let (plan, arrival) = match self.start_reserve(&request, lines, now_ms) {
            ReserveStart::Answered(answer) => {
                sink.answer(tag, BatchAnswer::Reserved(answer));
                return Started::Answered;
            }
            ReserveStart::Admitted { plan, arrival } => (plan, arrival),
        };
        let OrderRequest { order, buyer, ttl_ms, .. } = request;
        let command =
            SkuCommand::Reserve(ReserveLine { order: order.clone(), buyer, quantity: plan.lines[0].quantity, ttl_ms });
        let slot = plan.slots[0].clone();
        let completion =
            Completion { engine: self.clone(), tag, sink: sink.clone(), order, arrival, plan, step: Step::Reserve };
        Started::ToSku(slot, Request { command, reply: Reply::Batch(BatchCompletion(Some(completion))) })
    }

    /// A commit (`fewer` given) or release of a batch.
    fn start_batch_settle(
        &self,
        tag: u64,
        order: OrderId,
        fewer: Option<Vec<(SkuId, u32)>>,
        sink: &Arc<dyn BatchSink>,
    ) -> Started {
        let how = match &fewer {
            Some(fewer) => Settle::Commit { fewer },
            None => Settle::Release,
        };
        let give_back = |order, fewer| match fewer {
            Some(fewer) => BatchRequest::Commit { order, fewer },
            None => BatchRequest::Release { order },
        };
        let (plan, resting, arrival) = match self.start_settle(&order, how, true) {
            // Perhaps a coordinator's order: the caller knows where to ask.
            SettleStart::Answered(Err(OrderError::UnknownReservation)) | SettleStart::Declined => {
                return Started::GivenBack(give_back(order, fewer));
            }
            SettleStart::Answered(answer) => {
                let answer =
                    if fewer.is_some() { BatchAnswer::Committed(answer) } else { BatchAnswer::Released(answer) };
                sink.answer(tag, answer);
                return Started::Answered;
            }
            SettleStart::Begun { plan, resting, arrival } => (plan, resting, arrival),
        };
        let command = how.command(&order, &plan.slots[0].sku);
        let slot = plan.slots[0].clone();
        let step = Step::Settle { fewer, resting };
        let completion = Completion { engine: self.clone(), tag, sink: sink.clone(), order, arrival, plan, step };
        Started::ToSku(slot, Request { command, reply: Reply::Batch(BatchCompletion(Some(completion))) })
    }

    /// Admits what the SKU's gates let in of `group` in one step and queues
    /// it in one push; the rest is refused `Busy` (a reserve) or given back
    /// (a settle, which the awaited path retries patiently).
    fn enqueue_group(&self, group: SkuGroup) -> Vec<(u64, BatchRequest)> {
        let SkuGroup { slot, mut requests } = group;
        if slot.log_failed.load(std::sync::atomic::Ordering::Acquire) {
            // Dropped: each completion answers `Unavailable`.
            drop(requests);
            return Vec::new();
        }
        let admitted = slot.partition_gate.try_acquire_up_to(requests.len());
        let admitted_here = slot.gate.try_acquire_up_to(admitted);
        slot.partition_gate.release_many(admitted - admitted_here);
        let mut given_back = Vec::new();
        let busy = OrderError::Busy { retry_after_ms: self.inner.config.busy_retry_after_ms };
        for refused in requests.drain(admitted_here..) {
            let Reply::Batch(mut completion) = refused.reply else { unreachable!("a batch carries completions") };
            let completion = completion.0.take().expect("a completion is finished once");
            match completion.step {
                Step::Settle { .. } => given_back.push(completion.give_back()),
                Step::Reserve => completion.finish(Err(busy.clone())),
            }
        }
        if !requests.is_empty() {
            self.push_to_actor(&slot, requests);
        }
        given_back
    }
}

/// What became of one request of a batch as it was started.
enum Started {
    Answered,
    GivenBack(BatchRequest),
    ToSku(Arc<SkuSlot>, Request),
}

/// What a request of a batch finishes once its SKU answered.
#[derive(Debug)]
enum Step {
    Reserve,
    /// `fewer` is a commit's (`None`: a release); `resting` is where the
    /// order goes back to if the settle cannot happen now.
    Settle {
        fewer: Option<Vec<(SkuId, u32)>>,
        resting: OrderPhase,
    },
}

struct Completion {
    engine: Engine,
    tag: u64,
    sink: Arc<dyn BatchSink>,
    order: OrderId,
    arrival: u64,
    plan: Arc<OrderPlan>,
    step: Step,
}

/// The reply of a batch's request: finishes its order in the directory and
/// answers the batch's sink. Dropped unanswered, it answers `Unavailable`.
pub(crate) struct BatchCompletion(Option<Completion>);

impl std::fmt::Debug for BatchCompletion {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let completion = self.0.as_ref();
        formatter
            .debug_struct("BatchCompletion")
            .field("order", &completion.map(|completion| &completion.order))
            .field("step", &completion.map(|completion| &completion.step))
            .finish()
    }
}

impl BatchCompletion {
    /// The SKU's answer arrived.
    pub(crate) fn complete(mut self, answer: SkuAnswer) {
        if let Some(completion) = self.0.take() {
            completion.finish(Ok(answer));
        }
    }
}

impl Drop for BatchCompletion {
    fn drop(&mut self) {
        if let Some(completion) = self.0.take() {
            completion.finish(Err(OrderError::Unavailable));
        }
    }
}

impl Completion {
    /// What the order's awaited path would have done with this answer
    /// (`Err`: the SKU could not be asked, or its owner stopped).
    fn finish(self, answer: Result<SkuAnswer, OrderError>) {
        let Completion { engine, tag, sink, order, arrival: _, plan, step } = self;
        let answer = match step {
            Step::Reserve => {
                let line = &plan.lines[0];
                let outcome = match answer {
                    Ok(answer) => held_line(line.index, &line.sku, Some(answer)),
                    Err(error) => Err(error),
                };
                let outcome = outcome.map(|(held, expires_at_ms)| Reservation {
                    order: order.clone(),
                    expires_at_ms,
                    lines: vec![held],
                });
                engine.finish_reserve(&order, &outcome);
                BatchAnswer::Reserved(outcome)
            }
            Step::Settle { fewer, resting } => {
                let committing = fewer.is_some();
                let outcome = engine.finish_settle(&order, &plan, committing, resting, vec![answer]);
                if committing {
                    BatchAnswer::Committed(outcome)
                } else {
                    BatchAnswer::Released(outcome)
                }
            }
        };
        sink.answer(tag, answer);
    }

    /// A settle the SKU could not take now goes back to where it rested,
    /// and to the caller, who waits `Busy` out on the awaited path.
    fn give_back(self) -> (u64, BatchRequest) {
        let Step::Settle { fewer, resting } = self.step else { unreachable!("only a settle is given back") };
        {
            let mut orders = lock(&self.engine.order_partition(&self.order).orders);
            let record = orders.records.get_mut(&self.order).filter(|record| record.arrival == self.arrival);
            if let Some(record) = record.filter(|record| record.phase == OrderPhase::Settling) {
                record.phase = resting;
            }
        }
        let order = self.order;
        let request = match fewer {
            Some(fewer) => BatchRequest::Commit { order, fewer },
            None => BatchRequest::Release { order },
        };
        (self.tag, request)
    }
}

/// Durable answers of batches, with their completions.
type Completed = Vec<(BatchCompletion, SkuAnswer)>;

/// Finishes the completions of durable answers on a task of the runtime
/// rather than on the log writer's thread, which would otherwise do every
/// order's directory work and answer between two `fdatasync`s, with a
/// worker thread idle beside it. One hand-over per durable append.
#[derive(Debug, Default)]
pub(crate) struct Completer {
    sender: OnceLock<mpsc::UnboundedSender<Completed>>,
}

impl Completer {
    /// Starts the task, once (a batch is submitted inside the runtime).
    /// Unbounded, because what it holds is bounded upstream: every
    /// completion is a request its caller admitted and waits for.
    fn start(&self) {
        self.sender.get_or_init(|| {
            let (sender, mut receiver) = mpsc::unbounded_channel::<Completed>();
            tokio::spawn(async move {
                while let Some(completed) = receiver.recv().await {
                    for (completion, answer) in completed {
                        completion.complete(answer);
                    }
                }
            });
            sender
        });
    }

    /// Finishes `completed` on the task, or here if it is not running.
    pub(crate) fn finish(&self, completed: Completed) {
        let refused = match self.sender.get() {
            Some(sender) => match sender.send(completed) {
                Ok(()) => return,
                Err(refused) => refused.0,
            },
            None => completed,
        };
        for (completion, answer) in refused {
            completion.complete(answer);
        }
    }
}
