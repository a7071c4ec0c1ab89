//! The driver of the member's order coordinator
//! ([`flashstock_engine::coordination::Coordinator`], a pure state machine):
//! one task owns it, feeds it requests, part answers, durability and time,
//! and carries out its actions — part steps to this member's engine or over
//! the peer links, coordinator records to the log, answers to callers.
//!
//! Every order's home is the member that owns the partition of its id. An
//! order whose lines all live here takes the engine's own order path (one
//! member, no two-phase commit); any other goes through the coordinator.
//! Which path an id took is decided here, in the task, so that one id can
//! never be an engine order and a coordinated order at once: a reserve of
//! another content under an id the other path knows is refused
//! `IdempotencyConflict`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flashstock_client::routing::owner_of;
use flashstock_client::wire::{Refusal, RequestBody, Response};
use flashstock_engine::coordination::{
    Action, CallerId, ClientRequest, Coordinator, CoordinatorConfig, CoordinatorRecord, PartMessage, PartReply,
    PartRequest, Placement,
};
use flashstock_engine::log::record::OpenTransaction;
use flashstock_engine::{BatchRequest, BatchSink, Engine, EngineError, OrderId, OrderRequest, PartNotNow, SkuId};
use tokio::sync::{mpsc, oneshot};

use crate::peers::Peers;
use crate::translate::{client_response, order_refusal, part_answer, wire_part_request};

/// How long one step to another member may take before it counts as
/// unanswered (the coordinator sends it again on its own timer).
const PART_CALL_TIMEOUT_MS: u64 = 2_000;
/// How often the coordinator is told that time passed: its resends, the
/// deadlines of reserves and prepares, and the expiry of held orders.
const TICK_MS: u64 = 10;
/// Inputs waiting for the coordinator's task; a request beyond it is
/// refused `Busy` rather than queued without bound.
const INBOX_CAPACITY: usize = 16_384;
/// Tries of one step on a part that answers `Busy`, and the pause between
/// them: a busy SKU is retried at once by the call, not a resend later.
const BUSY_TRIES_MAX: u32 = 20;
const BUSY_PAUSE_MS: u64 = 5;

/// A point where a test makes the coordinator die, to check that recovery
/// finishes what it began. Read from `FLASHSTOCK_FAILPOINT` at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// Every part prepared, the decision about to be logged.
    BeforeDecision,
    /// Decided, a commit about to be sent to another member.
    BetweenCommits,
    /// Replicated, no raft log: the member's first probe of its peers
    /// takes 3 s before it decides (it answers theirs meanwhile), as a
    /// member started a moment after the others.
    SlowFirstProbe,
    /// Replicated, no raft log: the member's probe never hears from its
    /// highest-numbered peer, as one whose link to that peer does not come
    /// up while the others' do.
    ProbeMissesAPeer,
}

impl Failpoint {
    pub fn from_environment() -> Option<Self> {
        match std::env::var("FLASHSTOCK_FAILPOINT").ok()?.as_str() {
            "before-decision" => Some(Self::BeforeDecision),
            "between-commits" => Some(Self::BetweenCommits),
            "slow-first-probe" => Some(Self::SlowFirstProbe),
            "probe-misses-a-peer" => Some(Self::ProbeMissesAPeer),
            other => {
                tracing::warn!(failpoint = other, "unknown FLASHSTOCK_FAILPOINT ignored");
                None
            }
        }
    }
}

/// The answer a caller waits for.
pub type Answer = Result<Response, Refusal>;

/// Where the answers of a frame's reserves go (a session's frame): the
/// coordinator's answers by tag, and the engine's through its
/// [`BatchSink`] side. Called from whichever task or thread answers; must
/// not block.
pub trait Replies: BatchSink {
    fn reply(&self, tag: u64, kind: &'static str, answer: Answer);
}

/// Whom an answer goes to.
enum Replier {
    /// A caller awaiting it.
    Waiting(oneshot::Sender<Answer>),
    /// A request of a frame, by its tag.
    Frame { replies: Arc<dyn Replies>, tag: u64 },
}

impl Replier {
    fn send(self, answer: Answer) {
        match self {
            // The caller may have given up waiting.
            Replier::Waiting(reply) => {
                let _ = reply.send(answer);
            }
            Replier::Frame { replies, tag } => replies.reply(tag, "reserve", answer),
        }
    }
}

/// A frame's reserves whose home is this member: tag, order, home partition.
pub type ReserveBatch = Vec<(u64, OrderRequest, u32)>;

enum Input {
    Client {
        request: ClientRequest,
        home_partition: u32,
        reply: oneshot::Sender<Answer>,
    },
    /// A frame's reserves, in one message: the task decides each one's
    /// path as for [`Input::Client`], and hands the engine's in one batch.
    Reserves {
        requests: ReserveBatch,
        replies: Arc<dyn Replies>,
    },
    PartAnswered {
        member: u32,
        reply: PartReply,
    },
    Durable {
        token: u64,
    },
}

/// A reserve on the engine's own path, being answered; it yields its
/// order once its caller has the answer.
type DirectReserve = std::pin::Pin<Box<dyn std::future::Future<Output = OrderId> + Send>>;

/// The handle the server uses; cheap to share.
#[derive(Debug)]
pub struct Coordination {
    own: u32,
    engine: Engine,
    placement: Placement,
    inbox: mpsc::Sender<Input>,
    /// Orders the coordinator knows that are not settled, for status pages.
    open_orders: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
}

/// What the coordinator's task needs.
struct Driver {
    own: u32,
    engine: Engine,
    peers: Arc<Peers>,
    coordinator: Coordinator,
    inbox: mpsc::Sender<Input>,
    callers: HashMap<CallerId, (u32, Replier)>,
    next_caller: CallerId,
    /// Reserves on the engine's own path under way, by order.
    direct: HashMap<OrderId, usize>,
    /// Those reserves themselves, polled by this task (no task per
    /// reserve); bounded by the requests the server lets in.
    direct_running: futures_util::stream::FuturesUnordered<DirectReserve>,
    placement: Placement,
    failpoint: Option<Failpoint>,
    /// Set by the `between-commits` failpoint.
    abort_once_local_commit_lands: bool,
    open_orders: Arc<AtomicUsize>,
}

/// The placement of a cluster with `members` and `partition_count`
/// partitions, as the client computes it.
pub fn placement(members: &[u32], partition_count: u32) -> Placement {
    Placement::new(
        (0..partition_count).map(|partition| owner_of(partition, members).expect("a cluster has members")).collect(),
    )
}

impl Coordination {
    /// Starts the coordinator's task from what the engine's recovery found;
    /// a log whose coordinator records contradict one another is an error.
    pub fn start(
        own: u32,
        members: &[u32],
        partition_count: u32,
        engine: Engine,
        peers: Arc<Peers>,
        orders_max: usize,
    ) -> anyhow::Result<Arc<Self>> {
        let placement = placement(members, partition_count);
        let config = CoordinatorConfig {
            own,
            placement: placement.clone(),
            limits: engine.config().limits.clone(),
            orders_max,
            part_answer_ms_max: PART_CALL_TIMEOUT_MS,
            // A step is sent again only once its call could have timed out
            // (a busy part is retried by the call itself, below): resending
            // sooner would add work to a member that is slow under load.
            resend_pause_ms_min: PART_CALL_TIMEOUT_MS,
            resend_pause_ms_max: 4 * PART_CALL_TIMEOUT_MS,
        };
        let coordinator = Coordinator::recover(config, engine.take_coordinator_records(), engine.now_ms())
            .map_err(|reason| anyhow::anyhow!("the log's coordinator records cannot be replayed: {reason}"))?;
        let (sender, receiver) = mpsc::channel(INBOX_CAPACITY);
        let open_orders = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let driver = Driver {
            own,
            engine: engine.clone(),
            peers: peers.clone(),
            coordinator,
            inbox: sender.clone(),
            callers: HashMap::new(),
            next_caller: 0,
            direct: HashMap::new(),
            direct_running: futures_util::stream::FuturesUnordered::new(),
            placement: placement.clone(),
            failpoint: Failpoint::from_environment(),
            abort_once_local_commit_lands: false,
            open_orders: open_orders.clone(),
        };
        tokio::spawn(driver.run(receiver, stopping.clone()));
        let coordination = Arc::new(Self { own, engine, placement, inbox: sender, open_orders, stopping });
        coordination.finish_old_transactions(peers);
        Ok(coordination)
    }

    async fn ask(&self, request: ClientRequest, home_partition: u32) -> Answer {
        let (reply, answer) = oneshot::channel();
        let input = Input::Client { request, home_partition, reply };
        if self.inbox.try_send(input).is_err() {
            return Err(Refusal::Busy { retry_after_ms: 20 });
        }
        answer.await.unwrap_or_else(|_| Err(Refusal::Unavailable { reason: "the coordinator stopped".to_owned() }))
    }

    /// Holds every line of an order whose home is this member.
    pub async fn reserve(&self, request: OrderRequest, home_partition: u32) -> Answer {
        self.ask(ClientRequest::Reserve(request), home_partition).await
    }

    /// Starts a frame's reserves whose home is this member; each is
    /// answered through `replies` by its tag.
    pub fn reserve_batch(&self, requests: ReserveBatch, replies: Arc<dyn Replies>) {
        if let Err(refused) = self.inbox.try_send(Input::Reserves { requests, replies }) {
            let (mpsc::error::TrySendError::Full(input) | mpsc::error::TrySendError::Closed(input)) = refused;
            let Input::Reserves { requests, replies } = input else { unreachable!("the input just sent") };
            for (tag, _, _) in requests {
                replies.reply(tag, "reserve", Err(Refusal::Busy { retry_after_ms: 20 }));
            }
        }
    }

    /// Commits an order whose home is this member: on the engine's own path
    /// if the engine holds it, else through the coordinator.
    pub async fn commit(&self, order: OrderId, fewer: Vec<(SkuId, u32)>, home_partition: u32) -> Answer {
        if self.engine.order_status(&order).is_some() {
            let settled = self.engine.commit_fewer(&order, &fewer).await.map_err(order_refusal)?;
            return Ok(crate::server::settled_response(settled));
        }
        self.ask(ClientRequest::Commit { order, fewer }, home_partition).await
    }

    /// Releases an order whose home is this member (as [`Self::commit`]).
    pub async fn release(&self, order: OrderId, home_partition: u32) -> Answer {
        if self.engine.order_status(&order).is_some() {
            let settled = self.engine.release(&order).await.map_err(order_refusal)?;
            return Ok(crate::server::settled_response(settled));
        }
        self.ask(ClientRequest::Release { order }, home_partition).await
    }

    /// Coordinated orders not settled yet.
    pub fn open_orders(&self) -> usize {
        self.open_orders.load(Ordering::Relaxed)
    }

    /// Stops resending: what is left is carried on by the next start.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Transactions with lines on other members that a log written before
    /// the coordinator state machine left open (parts named `~order`):
    /// decided ones are committed on every member, undecided ones released
    /// everywhere (their coordinator is gone, and committing only the
    /// lines held here would sell part of the order). Each is ended once
    /// every member answered; retried until then.
    fn finish_old_transactions(self: &Arc<Self>, peers: Arc<Peers>) {
        let transactions = self.engine.take_recovered_transactions();
        for (order, open) in transactions {
            let coordination = self.clone();
            let peers = peers.clone();
            tokio::spawn(async move { coordination.finish_old_transaction(&peers, order, open).await });
        }
    }

    async fn finish_old_transaction(&self, peers: &Peers, order: OrderId, open: OpenTransaction) {
        let attempt = format!("~{order}");
        let mut members: Vec<u32> = Vec::new();
        for line in &open.lines {
            let member = self.placement.owner_of_sku(&line.sku);
            if member != self.own && !members.contains(&member) {
                members.push(member);
            }
        }
        if !open.committed {
            let _ = self.engine.release(&order).await;
        }
        for member in members {
            let lines = open.lines.iter().filter(|line| self.placement.owner_of_sku(&line.sku) == member);
            let request = if open.committed {
                PartRequest::Commit { lines: lines.map(|line| (line.sku.clone(), line.units)).collect() }
            } else {
                PartRequest::Release { skus: lines.map(|line| line.sku.clone()).collect() }
            };
            let body = RequestBody::Part {
                order: order.as_str().to_owned(),
                attempt: attempt.clone(),
                step: 0,
                request: wire_part_request(&request),
            };
            while !self.stopping.load(Ordering::Acquire) {
                match peers.call(member, body.clone(), Duration::from_millis(PART_CALL_TIMEOUT_MS)).await {
                    Ok(Response::Part(_)) => break,
                    other => tracing::debug!(%order, member, ?other, "an old transaction's part did not answer yet"),
                }
                tokio::time::sleep(Duration::from_millis(1_000)).await;
            }
        }
        if !self.stopping.load(Ordering::Acquire) {
            let _ = self.engine.end_transaction(&order).await;
            tracing::info!(%order, committed = open.committed, "a transaction left open by an earlier version ended");
        }
    }
}

impl Driver {
    async fn run(mut self, mut receiver: mpsc::Receiver<Input>, stopping: Arc<AtomicBool>) {
        use futures_util::StreamExt;
        let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.carry_out();
        loop {
            tokio::select! {
                Some(order) = self.direct_running.next(), if !self.direct_running.is_empty() => {
                    self.direct_done(order);
                    // Nothing of the coordinator's changed.
                    continue;
                }
                input = receiver.recv() => match input {
                    Some(input) => self.handle(input),
                    None => return,
                },
                _ = tick.tick() => {
                    if stopping.load(Ordering::Acquire) {
                        continue;
                    }
                    self.coordinator.tick(self.engine.now_ms());
                }
            }
            self.carry_out();
            self.open_orders.store(self.coordinator.order_counts().1, Ordering::Relaxed);
        }
    }

    fn handle(&mut self, input: Input) {
        let now_ms = self.engine.now_ms();
        match input {
            Input::Client { request, home_partition, reply } => {
                let reply = Replier::Waiting(reply);
                if let ClientRequest::Reserve(order_request) = &request {
                    let order = &order_request.order;
                    if !self.coordinator.knows(order) {
                        if self.all_lines_here(order_request) {
                            let direct = order_request.clone();
                            self.start_direct_reserve(direct, home_partition, reply);
                            return;
                        }
                        if self.known_to_the_engine(order) {
                            reply.send(Err(Refusal::IdempotencyConflict));
                            return;
                        }
                    }
                }
                self.coordinate(now_ms, request, home_partition, reply);
            }
            Input::Reserves { requests, replies } => self.reserves(now_ms, requests, &replies),
            Input::PartAnswered { member, reply } => {
                if self.abort_once_local_commit_lands
                    && member == self.own
                    && matches!(reply.answer, flashstock_engine::coordination::PartAnswer::Committed { .. })
                {
                    tracing::error!(order = %reply.order, "failpoint between-commits: stopping dead");
                    std::process::abort();
                }
                self.coordinator.part_answered(now_ms, member, reply);
            }
            Input::Durable { token } => self.coordinator.durable(now_ms, token),
        }
    }

    /// A frame's reserves. Those on the engine's own path go to the engine
    /// first, in one batch, so that the others' check of which ids the
    /// engine knows already sees them (two reserves of one id in one
    /// frame take one path, as two in a row would).
    fn reserves(&mut self, now_ms: u64, requests: ReserveBatch, replies: &Arc<dyn Replies>) {
        let mut direct = Vec::new();
        let mut direct_homes = Vec::new();
        let mut others = Vec::new();
        for (tag, request, home_partition) in requests {
            if !self.coordinator.knows(&request.order) && self.all_lines_here(&request) {
                direct_homes.push((tag, home_partition));
                direct.push((tag, BatchRequest::Reserve(request)));
            } else {
                others.push((tag, request, home_partition));
            }
        }
        if !direct.is_empty() {
            let sink: Arc<dyn BatchSink> = replies.clone();
            // Orders of several lines come back, for the awaited path.
            for (tag, given_back) in self.engine.submit_batch(direct, &sink) {
                let BatchRequest::Reserve(request) = given_back else { unreachable!("only reserves were given") };
                let home_partition = direct_homes.iter().find(|(given, _)| *given == tag).map(|(_, home)| *home);
                let home_partition = home_partition.expect("a given-back reserve was in the batch");
                self.start_direct_reserve(request, home_partition, Replier::Frame { replies: replies.clone(), tag });
            }
        }
        for (tag, request, home_partition) in others {
            let reply = Replier::Frame { replies: replies.clone(), tag };
            if !self.coordinator.knows(&request.order) && self.known_to_the_engine(&request.order) {
                reply.send(Err(Refusal::IdempotencyConflict));
                continue;
            }
            self.coordinate(now_ms, ClientRequest::Reserve(request), home_partition, reply);
        }
    }

    /// Whether the engine's own path knows `order` (or it is on its way
    /// there): the same id with lines elsewhere is another content.
    fn known_to_the_engine(&self, order: &OrderId) -> bool {
        self.direct.contains_key(order) || self.engine.order_status(order).is_some()
    }

    /// Hands a request to the coordinator, which answers `reply` in time.
    fn coordinate(&mut self, now_ms: u64, request: ClientRequest, home_partition: u32, reply: Replier) {
        self.next_caller += 1;
        self.callers.insert(self.next_caller, (home_partition, reply));
        self.coordinator.request(now_ms, self.next_caller, request);
    }

    /// A reserve on the engine's own path was answered.
    fn direct_done(&mut self, order: OrderId) {
        if let Some(count) = self.direct.get_mut(&order) {
            *count -= 1;
            if *count == 0 {
                self.direct.remove(&order);
            }
        }
    }

    /// Whether a reserve unknown to the coordinator takes the engine's own
    /// path: every line lives here.
    fn all_lines_here(&self, request: &OrderRequest) -> bool {
        request.lines.iter().all(|line| self.placement.owner_of_sku(&line.sku) == self.own)
    }

    /// Starts a reserve on the engine's own path; this task polls it
    /// beside its inbox (see `direct_running`).
    fn start_direct_reserve(&mut self, request: OrderRequest, home_partition: u32, reply: Replier) {
        let order = request.order.clone();
        *self.direct.entry(order.clone()).or_insert(0) += 1;
        let engine = self.engine.clone();
        self.direct_running.push(Box::pin(async move {
            let answer = match engine.reserve(request).await {
                Ok(reservation) => Ok(Response::Reserved {
                    order: reservation.order.as_str().to_owned(),
                    home_partition,
                    expires_at_ms: reservation.expires_at_ms,
                    lines: reservation.lines.iter().map(crate::translate::wire_line).collect(),
                }),
                Err(error) => Err(order_refusal(error)),
            };
            reply.send(answer);
            order
        }));
    }

    fn carry_out(&mut self) {
        loop {
            let actions = self.coordinator.take_actions();
            if actions.is_empty() {
                return;
            }
            for action in actions {
                match action {
                    Action::Send { member, message } => self.send(member, message),
                    Action::Log { token, record } => self.log(token, record),
                    Action::Reply { caller, answer } => {
                        if let Some((home_partition, reply)) = self.callers.remove(&caller) {
                            reply.send(client_response(home_partition, answer));
                        }
                    }
                }
            }
        }
    }

    fn log(&mut self, token: u64, record: CoordinatorRecord) {
        if self.failpoint == Some(Failpoint::BeforeDecision) && matches!(record, CoordinatorRecord::Decided { .. }) {
            tracing::error!("failpoint before-decision: stopping dead");
            std::process::abort();
        }
        match self.engine.log_coordinator_record(record) {
            Ok(Some(durable)) => {
                let inbox = self.inbox.clone();
                tokio::spawn(async move {
                    if durable.await == Ok(true) {
                        let _ = inbox.send(Input::Durable { token }).await;
                    }
                });
            }
            // No log: nothing is durable, and nothing need wait.
            Ok(None) => self.coordinator.durable(self.engine.now_ms(), token),
            // The log failed: nothing more is acknowledged (the engine
            // answers `Unavailable` from now on, and so does what waits here).
            Err(error) => tracing::error!(%error, "a coordinator record could not be logged"),
        }
    }

    fn send(&mut self, member: u32, message: PartMessage) {
        let inbox = self.inbox.clone();
        if member == self.own {
            let engine = self.engine.clone();
            tokio::spawn(async move {
                for _ in 0..BUSY_TRIES_MAX {
                    match engine.apply_part(&message.attempt, &message.request).await {
                        Ok(answer) => {
                            let reply = message.reply(answer);
                            let _ = inbox.send(Input::PartAnswered { member, reply }).await;
                            return;
                        }
                        Err(PartNotNow(EngineError::Busy { retry_after_ms })) => {
                            tokio::time::sleep(Duration::from_millis(retry_after_ms.max(BUSY_PAUSE_MS))).await;
                        }
                        Err(not_now) => {
                            tracing::debug!(%not_now, order = %message.order, "a local part step is sent again later");
                            return;
                        }
                    }
                }
            });
            return;
        }
        if self.failpoint == Some(Failpoint::BetweenCommits) && matches!(message.request, PartRequest::Commit { .. }) {
            // Stop dead with this line unsent and the local line sold: the
            // process ends once the local commit (sent before, on its own
            // task) has landed, so the test does not race that task.
            self.abort_once_local_commit_lands = true;
            return;
        }
        let peers = self.peers.clone();
        tokio::spawn(async move {
            let body = RequestBody::Part {
                order: message.order.as_str().to_owned(),
                attempt: message.attempt.as_str().to_owned(),
                step: message.step,
                request: wire_part_request(&message.request),
            };
            for _ in 0..BUSY_TRIES_MAX {
                match peers.call(member, body.clone(), Duration::from_millis(PART_CALL_TIMEOUT_MS)).await {
                    Ok(Response::Part(answer)) => {
                        match part_answer(answer) {
                            Some(answer) => {
                                let reply = message.reply(answer);
                                let _ = inbox.send(Input::PartAnswered { member, reply }).await;
                            }
                            None => tracing::debug!(order = %message.order, member, "a part's answer is sent again"),
                        }
                        return;
                    }
                    Ok(Response::Refused(Refusal::Busy { retry_after_ms })) => {
                        tokio::time::sleep(Duration::from_millis(retry_after_ms.max(BUSY_PAUSE_MS))).await;
                    }
                    other => {
                        tracing::debug!(order = %message.order, member, ?other, "a part step is sent again later");
                        return;
                    }
                }
            }
        });
    }
}
