//! The coordinator of orders: a pure state machine, one per member.
//!
//! Every order, whatever members its lines live on, has one *home*: the
//! member that owns the partition of its **order id** (not of a line's
//! SKU), so that every reserve, commit and release for one id meets one
//! record in the whole cluster, and another content under a known id is
//! refused [`OrderError::IdempotencyConflict`] with nothing touched.
//!
//! The coordinator does no IO and reads no clock. The driver feeds it
//! inputs at a given `now_ms` — a client's request, a part's answer, "the
//! records up to this token are durable", a tick of time — and carries out
//! the [`Action`]s it returns: send a step to a member's participant
//! ([`super::participant::apply_part`]), log a record and report when it is
//! durable, answer a caller.
//!
//! # An order's phases
//!
//! ```text
//!            reserve                 every part held   Held durable
//!   (new) ──────────▶ Holding ─────────────────────▶ RecordingHeld ──▶ Held
//!                        │ a part refused / no answer                  │ │ │
//!                        ▼                                             │ │ │ its time passes
//!                   Abandoning ──▶ (forgotten: the id is free again)   │ │ └──────────▶ Releasing(Expired)
//!                                                                      │ │ release
//!              commit   ┌──────────────────────────────────────────────┘ └────▶ RecordingRelease
//!                       ▼                                                         │ durable
//!                   Preparing ── a part refused, no answer ──▶ Held (parts may stay prepared)
//!                       │  └──── a part expired ─────────────▶ Releasing(Expired) ─┐
//!                       │ every part prepared                  Releasing(Released) ◀┘ (from RecordingRelease)
//!                       ▼                                          │ every part released
//!                 RecordingDecision ──durable──▶ Committing ──▶ Settled(outcome) ──window──▶ (forgotten)
//! ```
//!
//! An order of one line skips `Preparing` (commit goes from `Held` to
//! `RecordingDecision`): its one commit either lands or finds the hold
//! expired, and the order is whole either way.
//!
//! Every phase that waits on parts resends its step to the parts that have
//! not answered, with a growing pause, until each has; nothing gives up on
//! a prepared hold. The phases that may give up (`Holding`, `Preparing`)
//! do so by a deadline, and only towards a phase that undoes their work.
//! Answers carry the attempt and the step they answer, so a late or
//! duplicated answer of an earlier step is ignored.
//!
//! # Every order ends by an explicit step on every part
//!
//! A prepare that failed is never undone by an "unprepare": the network
//! may deliver a copy of an old prepare after it, or a copy of an old
//! unprepare after a later prepare (then a prepared line of a decided
//! order could expire before its commit, and the order be sold in part).
//! Instead the coordinator enforces the TTL of its orders itself: a held
//! order whose time has passed is released on every part, prepared or
//! not, like a released one. Every message a part can receive late is
//! then harmless: a prepare or a commit finds the hold ended (refused), a
//! release or a commit repeats, and a reserve that arrives after its
//! attempt was given up holds units that expire by their TTL unprepared.
//! The price is that a line prepared by a failed commit waits for its
//! coordinator (not its own TTL) while that member is down: the blocking
//! of two-phase commit, which replicated partitions remove.
//!
//! # What is durable, and why
//!
//! - `Held` (the order's content, its attempt id and every line's units),
//!   before a reserve is acknowledged: a restart then still refuses other
//!   content under the id, and knows the parts to commit or release. An
//!   attempt whose `Held` was lost was never acknowledged; its holds are
//!   not prepared and expire by their TTL.
//! - `Decided` before a commit is acknowledged, `ReleaseDecided` before a
//!   release is: after a restart the decision is carried out on every part.
//! - `ExpiryDecided` before an expired order's parts are released.
//!
//! # One decision per order
//!
//! No step that ends an order on a part (commit or release) leaves before
//! the decision it carries out is durable — in a replicated home, committed
//! in its group. During a failover two coordinators of one home may live at
//! once (a deposed leader that has not heard of its successor, paused or
//! cut off), and a part obeys any of them; a decision that must be
//! committed first cannot be made by the deposed one, so the two never
//! carry out different decisions. (Expiry used to release the parts at
//! once: the simulator's seed 2168 had a paused home leader release a line
//! its successor had prepared and then committed — sold in part.) Steps
//! that decide nothing may come from either: a reserve or a prepare of a
//! deposed coordinator holds or prepares at most, and every such hold ends
//! by its TTL or by the order's one decision.
//! - `Ended` once every part has its outcome (not waited for: if it is lost,
//!   the restart carries the decision out again, which replays).
//! - `Epoch` at every start, durable before any new attempt id is given
//!   out: attempt ids (`~{member}.{epoch}.{counter}`) are never reused, so
//!   a part of an abandoned or lost attempt can never be mistaken for a
//!   part of a later one.
//!
//! After a restart, held orders stay held (a part a failed commit left
//! prepared is ended by the order's next step), decided orders are carried
//! out, settled ones are remembered for the idempotency window.

use std::collections::{BTreeMap, BTreeSet};

use crate::coordination::participant::{PartAnswer, PartRequest};
use crate::ids::{BuyerId, FastMap, OrderId, SkuId};
use crate::limits::Limits;
use crate::order::{merge_lines, OrderError, OrderRequest};
use crate::partition::stable_hash;
use crate::sku::{Quantity, SkuError, StockSnapshot};

/// A member of the cluster.
pub type MemberId = u32;
/// Whoever waits for an answer, as the driver names it.
pub type CallerId = u64;

/// Which member owns each partition: fixed for a cluster's life.
#[derive(Debug, Clone)]
pub struct Placement {
    owner_by_partition: Vec<MemberId>,
}

impl Placement {
    /// # Panics
    /// If there are no partitions (a configuration is validated before).
    pub fn new(owner_by_partition: Vec<MemberId>) -> Self {
        assert!(!owner_by_partition.is_empty(), "a cluster has at least one partition");
        Self { owner_by_partition }
    }

    fn owner_of_hash(&self, hash: u64) -> MemberId {
        let count = self.owner_by_partition.len() as u64;
        self.owner_by_partition[usize::try_from(hash % count).expect("below the partition count")]
    }

    /// The member that owns `sku`.
    pub fn owner_of_sku(&self, sku: &SkuId) -> MemberId {
        self.owner_of_hash(stable_hash(sku.as_str().as_bytes()))
    }

    /// The member that coordinates `order`: the owner of its id's partition.
    pub fn home_of_order(&self, order: &OrderId) -> MemberId {
        self.owner_of_hash(stable_hash(order.as_str().as_bytes()))
    }
}

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub own: MemberId,
    pub placement: Placement,
    /// The engine's limits: order shape, TTL range, the idempotency window.
    pub limits: Limits,
    /// Orders known at once (in progress, held, or settled and remembered
    /// for the idempotency window); a new order beyond it is refused
    /// `Busy` once no settled one can be forgotten. Bounds the table.
    pub orders_max: usize,
    /// How long the parts of a reserve or a prepare may take to answer
    /// before the attempt is undone and the caller told to retry.
    pub part_answer_ms_max: u64,
    /// First and longest pause before a step is sent again to a part that
    /// has not answered it.
    pub resend_pause_ms_min: u64,
    pub resend_pause_ms_max: u64,
}

/// What a checkout client asks of an order's home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRequest {
    Reserve(OrderRequest),
    /// Sells every held unit, or `fewer` units of the named lines.
    Commit {
        order: OrderId,
        fewer: Vec<(SkuId, u32)>,
    },
    Release {
        order: OrderId,
    },
}

impl ClientRequest {
    pub fn order(&self) -> &OrderId {
        match self {
            ClientRequest::Reserve(request) => &request.order,
            ClientRequest::Commit { order, .. } | ClientRequest::Release { order } => order,
        }
    }
}

/// The answer to a [`ClientRequest`]. Lines come in the order's line order
/// (lines naming one SKU twice merged into the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAnswer {
    Reserved {
        order: OrderId,
        expires_at_ms: u64,
        lines: Vec<(SkuId, u32)>,
        /// Each line's SKU counts when its part last answered (zero
        /// after the home restarted, until a part answers again).
        stock: Vec<StockSnapshot>,
        replayed: bool,
    },
    /// Units sold per line.
    Committed {
        order: OrderId,
        lines: Vec<(SkuId, u32)>,
        /// Each line's SKU counts when its part last answered (zero
        /// after the home restarted, until a part answers again).
        stock: Vec<StockSnapshot>,
        replayed: bool,
    },
    /// Units given back per line.
    Released {
        order: OrderId,
        lines: Vec<(SkuId, u32)>,
        /// Each line's SKU counts when its part last answered (zero
        /// after the home restarted, until a part answers again).
        stock: Vec<StockSnapshot>,
        replayed: bool,
    },
    Refused(OrderError),
}

/// A step sent to the participant of one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartMessage {
    pub order: OrderId,
    /// The id the part's holds carry: unique to this attempt of the order.
    pub attempt: OrderId,
    /// Which step of the attempt this is: the answer names it back.
    pub step: u64,
    pub request: PartRequest,
}

impl PartMessage {
    /// The answer to this message.
    pub fn reply(&self, answer: PartAnswer) -> PartReply {
        PartReply { order: self.order.clone(), attempt: self.attempt.clone(), step: self.step, answer }
    }
}

/// A participant's answer to a [`PartMessage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartReply {
    pub order: OrderId,
    pub attempt: OrderId,
    pub step: u64,
    pub answer: PartAnswer,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        member: MemberId,
        message: PartMessage,
    },
    /// Append to the member's log; report [`Coordinator::durable`] with
    /// `token` (or a later one) once it is on disk. Tokens grow by one.
    Log {
        token: u64,
        record: CoordinatorRecord,
    },
    Reply {
        caller: CallerId,
        answer: ClientAnswer,
    },
}

/// A line of a held order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLine {
    pub sku: SkuId,
    pub quantity: Quantity,
    pub units: u32,
    pub member: MemberId,
    /// The line's index in the request (for refusals that name it).
    pub index: usize,
}

/// How an order ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Units sold per line.
    Committed {
        units: Vec<u32>,
    },
    Released,
    Expired {
        expired_at_ms: u64,
    },
}

/// A durable fact of a coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorRecord {
    Epoch {
        epoch: u64,
    },
    Held {
        order: OrderId,
        buyer: BuyerId,
        ttl_ms: u64,
        attempt: OrderId,
        lines: Vec<HeldLine>,
        expires_at_ms: u64,
    },
    Decided {
        order: OrderId,
        units: Vec<u32>,
    },
    ReleaseDecided {
        order: OrderId,
    },
    /// The order's time passed before it was committed: every part is
    /// released. Durable before any part is told, like every decision
    /// that ends an order (see "One decision per order" in the module documentation).
    ExpiryDecided {
        order: OrderId,
        expired_at_ms: u64,
    },
    Ended {
        order: OrderId,
        outcome: Outcome,
        now_ms: u64,
    },
    /// A settled order was forgotten (its idempotency window passed, or the
    /// table was full): a restart need not know it. Not waited for.
    Forgotten {
        order: OrderId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Holding,
    Abandoning,
    RecordingHeld {
        token: u64,
    },
    Held,
    Preparing {
        units: Vec<u32>,
    },
    RecordingDecision {
        token: u64,
        units: Vec<u32>,
    },
    Committing {
        units: Vec<u32>,
    },
    /// Waiting for a release decision to be durable: a caller's release
    /// (`expired_at_ms` none) or the order's expiry.
    RecordingRelease {
        token: u64,
        expired_at_ms: Option<u64>,
    },
    /// Giving every part's units back: released (`expired_at_ms` none) or
    /// expired before it could be committed.
    Releasing {
        expired_at_ms: Option<u64>,
    },
    Settled {
        outcome: Outcome,
        at_ms: u64,
    },
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Holding => "holding",
            Phase::Abandoning => "abandoning",
            Phase::RecordingHeld { .. } => "recording-held",
            Phase::Held => "held",
            Phase::Preparing { .. } => "preparing",
            Phase::RecordingDecision { .. } => "recording-decision",
            Phase::Committing { .. } => "committing",
            Phase::RecordingRelease { .. } => "recording-release",
            Phase::Releasing { .. } => "releasing",
            Phase::Settled { .. } => "settled",
        }
    }

    /// Whether the phase waits for every part to answer its step.
    fn waits_on_parts(&self) -> bool {
        matches!(
            self,
            Phase::Holding
                | Phase::Abandoning
                | Phase::Preparing { .. }
                | Phase::Committing { .. }
                | Phase::Releasing { .. }
        )
    }
}

#[derive(Debug, Clone)]
struct Part {
    member: MemberId,
    /// Indices into the order's lines, in line order.
    lines: Vec<usize>,
    answered: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    buyer: BuyerId,
    ttl_ms: u64,
    lines: Vec<HeldLine>,
    attempt: OrderId,
    parts: Vec<Part>,
    expires_at_ms: u64,
    phase: Phase,
    step: u64,
    /// Who waits for the end of the current phase.
    caller: Option<CallerId>,
    resend_at_ms: u64,
    resend_pause_ms: u64,
    /// When `Holding` or `Preparing` gives up, or `Abandoning` stops
    /// (every hold of the attempt has expired by then).
    deadline_ms: u64,
    /// Each line's SKU counts as its part last reported them (not durable:
    /// zero after a restart until a part answers again).
    stock: Vec<StockSnapshot>,
    /// The refusal of the lowest order line while `Holding`, with its index.
    refused: Option<(usize, OrderError)>,
    /// The time this entry is filed under in `Coordinator::timers`.
    timer_ms: Option<u64>,
}

impl Entry {
    fn same_content(&self, buyer: &BuyerId, ttl_ms: u64, lines: &[HeldLine]) -> bool {
        let key = |lines: &[HeldLine]| {
            let mut key: Vec<(SkuId, Quantity)> = lines.iter().map(|line| (line.sku.clone(), line.quantity)).collect();
            key.sort_by(|a, b| a.0.cmp(&b.0));
            key
        };
        self.buyer == *buyer && self.ttl_ms == ttl_ms && key(&self.lines) == key(lines)
    }

    fn units(&self) -> Vec<(SkuId, u32)> {
        self.lines.iter().map(|line| (line.sku.clone(), line.units)).collect()
    }

    fn part_request(&self, part: &Part) -> PartRequest {
        let skus = || part.lines.iter().map(|&index| self.lines[index].sku.clone()).collect();
        match &self.phase {
            Phase::Holding => PartRequest::Reserve {
                buyer: self.buyer.clone(),
                lines: part
                    .lines
                    .iter()
                    .map(|&index| (self.lines[index].sku.clone(), self.lines[index].quantity))
                    .collect(),
                ttl_ms: self.ttl_ms,
            },
            Phase::Preparing { .. } => PartRequest::Prepare { skus: skus() },
            Phase::Committing { units } => PartRequest::Commit {
                lines: part.lines.iter().map(|&index| (self.lines[index].sku.clone(), Some(units[index]))).collect(),
            },
            Phase::Abandoning | Phase::Releasing { .. } => PartRequest::Release { skus: skus() },
            other => unreachable!("no step in phase {}", other.name()),
        }
    }

    fn all_answered(&self) -> bool {
        self.parts.iter().all(|part| part.answered)
    }
}

/// The orders whose home is this member.
#[derive(Debug)]
pub struct Coordinator {
    config: CoordinatorConfig,
    epoch: u64,
    /// The `Epoch` record's token while it is not yet durable: no new
    /// attempt starts before it is.
    epoch_token: Option<u64>,
    /// Steps decided before this life's epoch was durable, the newest per
    /// order and part (a resend replaces the step it repeats, so this is
    /// bounded by the orders known): they leave once the epoch is durable.
    sends_after_epoch: BTreeMap<(OrderId, MemberId), PartMessage>,
    next_attempt: u64,
    next_token: u64,
    durable_token: u64,
    /// Hashed, not sorted: it is only looked up, never walked for a
    /// decision (the sorted indexes below are), and a lookup in a sorted
    /// map compared whole order ids — ids sharing a long prefix made that
    /// a tenth of a loaded leader's CPU. Entries are only changed taken
    /// out ([`Self::take`]) and put back ([`Self::put`]), which keeps the
    /// indexes below in step.
    orders: FastMap<OrderId, Entry>,
    /// When each order next needs time to pass (a resend, a deadline, its
    /// expiry, the end of its idempotency window): a tick looks at the due
    /// ones only, never at every order.
    timers: BTreeSet<(u64, OrderId)>,
    /// Orders waiting for their record to be durable, by its token.
    recording: BTreeMap<u64, OrderId>,
    /// Settled orders by when they settled, oldest first: the first to be
    /// forgotten when the table is full.
    settled: BTreeSet<(u64, OrderId)>,
    /// Orders not settled.
    open: usize,
    /// Settled orders forgotten since the start, for status pages and tests.
    forgotten: u64,
    actions: Vec<Action>,
    anomalies: Vec<String>,
}

impl Coordinator {
    /// A coordinator on a member whose log holds `records` (in log order;
    /// none for a new member), at `now_ms`. Carries on what the records
    /// left open; [`Self::take_actions`] has its first sends and the new
    /// epoch's record. Records that contradict one another (a decision
    /// over other lines than the order's) are refused with the reason: the
    /// log they came from is not one a coordinator wrote.
    pub fn recover(
        config: CoordinatorConfig,
        records: impl IntoIterator<Item = CoordinatorRecord>,
        now_ms: u64,
    ) -> Result<Self, String> {
        let mut epoch = 0;
        let mut orders: BTreeMap<OrderId, Entry> = BTreeMap::new();
        for record in records {
            match record {
                CoordinatorRecord::Epoch { epoch: logged } => epoch = epoch.max(logged),
                CoordinatorRecord::Held { order, buyer, ttl_ms, attempt, lines, expires_at_ms } => {
                    let parts = parts_of(&lines);
                    let line_count = lines.len();
                    let entry = Entry {
                        buyer,
                        ttl_ms,
                        lines,
                        attempt,
                        parts,
                        expires_at_ms,
                        phase: Phase::Held,
                        // Filled in below, once this life's epoch is known.
                        step: 0,
                        caller: None,
                        resend_at_ms: 0,
                        resend_pause_ms: 0,
                        deadline_ms: 0,
                        stock: vec![StockSnapshot { available: 0, held: 0, sold: 0 }; line_count],
                        refused: None,
                        timer_ms: None,
                    };
                    orders.insert(order, entry);
                }
                CoordinatorRecord::Decided { order, units } => {
                    if let Some(entry) = orders.get_mut(&order) {
                        let held = entry.lines.iter().map(|line| line.units);
                        if units.len() != entry.lines.len() || units.iter().zip(held).any(|(&sold, held)| sold > held) {
                            return Err(format!("order {order}: a decision over other lines than the order's"));
                        }
                        entry.phase = Phase::Committing { units };
                    }
                }
                CoordinatorRecord::ReleaseDecided { order } => {
                    if let Some(entry) = orders.get_mut(&order) {
                        entry.phase = Phase::Releasing { expired_at_ms: None };
                    }
                }
                CoordinatorRecord::ExpiryDecided { order, expired_at_ms } => {
                    if let Some(entry) = orders.get_mut(&order) {
                        entry.phase = Phase::Releasing { expired_at_ms: Some(expired_at_ms) };
                    }
                }
                CoordinatorRecord::Ended { order, outcome, now_ms: at_ms } => {
                    if let Some(entry) = orders.get_mut(&order) {
                        entry.phase = Phase::Settled { outcome, at_ms };
                    }
                }
                CoordinatorRecord::Forgotten { order } => {
                    orders.remove(&order);
                }
            }
        }
        let mut coordinator = Self {
            config,
            epoch: epoch + 1,
            epoch_token: None,
            sends_after_epoch: BTreeMap::new(),
            next_attempt: 0,
            next_token: 1,
            durable_token: 0,
            orders: FastMap::default(),
            timers: BTreeSet::new(),
            recording: BTreeMap::new(),
            settled: BTreeSet::new(),
            open: 0,
            forgotten: 0,
            actions: Vec::new(),
            anomalies: Vec::new(),
        };
        let token = coordinator.log(CoordinatorRecord::Epoch { epoch: coordinator.epoch });
        coordinator.epoch_token = Some(token);
        let window_ms = coordinator.config.limits.idempotency_window_ms;
        for (order, mut entry) in orders {
            // Steps of a recovered attempt count on from this life's epoch,
            // so that a late answer to a step of an earlier life (numbered
            // from 1, or from that life's epoch) never passes for an answer
            // to one of this life (the simulator's seed 1315: a reserve's
            // late answer taken for a commit's). No step leaves before the
            // epoch is durable, so two lives never share one.
            entry.step = coordinator.epoch << 32;
            let phase = std::mem::replace(&mut entry.phase, Phase::Held);
            let next = match phase {
                Phase::Settled { at_ms, .. } if at_ms.saturating_add(window_ms) <= now_ms => continue,
                // A commit may have been preparing: some parts may be
                // prepared, and are committed or released by the order's
                // next step (at the latest, its release when its time passes).
                other => other,
            };
            coordinator.enter(&order, &mut entry, next, now_ms);
            coordinator.put(order, entry);
        }
        Ok(coordinator)
    }

    /// Whether `order` is known here (held, in progress, or settled and
    /// remembered).
    pub fn knows(&self, order: &OrderId) -> bool {
        self.orders.contains_key(order)
    }

    /// The actions to carry out, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Things that a correct cluster never does (a part refusing a decided
    /// step, an answer out of protocol), for tests and operators.
    pub fn anomalies(&self) -> &[String] {
        &self.anomalies
    }

    /// Settled orders forgotten since this coordinator started.
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// Orders known now, and those not settled.
    pub fn order_counts(&self) -> (usize, usize) {
        (self.orders.len(), self.open)
    }

    /// Each open order and its phase, for a failure report.
    pub fn open_orders(&self) -> Vec<(OrderId, &'static str)> {
        let mut open: Vec<(OrderId, &'static str)> = self
            .orders
            .iter()
            .filter(|(_, entry)| !matches!(entry.phase, Phase::Settled { .. }))
            .map(|(order, entry)| (order.clone(), entry.phase.name()))
            .collect();
        open.sort_unstable();
        open
    }

    fn log(&mut self, record: CoordinatorRecord) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.actions.push(Action::Log { token, record });
        token
    }

    fn reply(&mut self, caller: Option<CallerId>, answer: ClientAnswer) {
        if let Some(caller) = caller {
            self.actions.push(Action::Reply { caller, answer });
        }
    }

    /// Puts `entry` in `phase` as a new step, and sends the step to every
    /// part if the phase waits on them.
    fn enter(&mut self, order: &OrderId, entry: &mut Entry, phase: Phase, now_ms: u64) {
        entry.phase = phase;
        entry.step += 1;
        if !entry.phase.waits_on_parts() {
            return;
        }
        for part in &mut entry.parts {
            part.answered = false;
        }
        entry.resend_pause_ms = self.config.resend_pause_ms_min;
        entry.resend_at_ms = now_ms.saturating_add(entry.resend_pause_ms);
        self.send_unanswered(order, entry);
    }

    /// Sends the current step to every part that has not answered it.
    fn send_unanswered(&mut self, order: &OrderId, entry: &Entry) {
        for part in entry.parts.iter().filter(|part| !part.answered) {
            let message = PartMessage {
                order: order.clone(),
                attempt: entry.attempt.clone(),
                step: entry.step,
                request: entry.part_request(part),
            };
            if self.epoch_token.is_some() {
                self.sends_after_epoch.insert((order.clone(), part.member), message);
            } else {
                self.actions.push(Action::Send { member: part.member, message });
            }
        }
    }

    /// The order's time passed unsold: the expiry is logged, and its parts
    /// are released once it is durable.
    fn decide_expiry(&mut self, order: &OrderId, entry: &mut Entry, expired_at_ms: u64, now_ms: u64) {
        let token = self.log(CoordinatorRecord::ExpiryDecided { order: order.clone(), expired_at_ms });
        self.enter(order, entry, Phase::RecordingRelease { token, expired_at_ms: Some(expired_at_ms) }, now_ms);
    }

    /// Settles `entry` with `outcome` (logged, not waited for).
    fn settle(&mut self, order: &OrderId, entry: &mut Entry, outcome: Outcome, now_ms: u64) {
        self.log(CoordinatorRecord::Ended { order: order.clone(), outcome: outcome.clone(), now_ms });
        self.enter(order, entry, Phase::Settled { outcome, at_ms: now_ms }, now_ms);
    }

    /// A client's request, from `caller`.
    pub fn request(&mut self, now_ms: u64, caller: CallerId, request: ClientRequest) {
        let order = request.order().clone();
        if self.config.placement.home_of_order(&order) != self.config.own {
            // A caller with a stale map: answering here would make a
            // second record of the id.
            self.reply(Some(caller), ClientAnswer::Refused(OrderError::Unavailable));
            return;
        }
        let answer = match request {
            ClientRequest::Reserve(request) => self.reserve(now_ms, caller, request),
            ClientRequest::Commit { order, fewer } => self.commit(now_ms, caller, order, fewer),
            ClientRequest::Release { order } => self.release(now_ms, caller, order),
        };
        if let Some(answer) = answer {
            self.reply(Some(caller), answer);
        }
    }

    /// Validates the whole request before anything is held.
    fn lines_of(&self, request: &OrderRequest) -> Result<Vec<HeldLine>, OrderError> {
        let limits = &self.config.limits;
        let merged = merge_lines(request, limits)?;
        let zero = StockSnapshot { available: 0, held: 0, sold: 0 };
        let refuse = |index: usize, sku: &SkuId, error: SkuError| OrderError::Line {
            index,
            sku: sku.clone(),
            error,
            stock: zero,
        };
        if !(limits.hold_ttl_ms_min..=limits.hold_ttl_ms_max).contains(&request.ttl_ms) {
            let error = SkuError::InvalidTtl {
                ttl_ms: request.ttl_ms,
                ttl_ms_min: limits.hold_ttl_ms_min,
                ttl_ms_max: limits.hold_ttl_ms_max,
            };
            return Err(refuse(0, &merged[0].sku, error));
        }
        merged
            .into_iter()
            .map(|line| {
                line.quantity.validate(limits).map_err(|error| refuse(line.index, &line.sku, error))?;
                let member = self.config.placement.owner_of_sku(&line.sku);
                Ok(HeldLine { sku: line.sku, quantity: line.quantity, units: 0, member, index: line.index })
            })
            .collect()
    }

    fn reserve(&mut self, now_ms: u64, caller: CallerId, request: OrderRequest) -> Option<ClientAnswer> {
        let lines = match self.lines_of(&request) {
            Ok(lines) => lines,
            Err(error) => return Some(ClientAnswer::Refused(error)),
        };
        let order = request.order.clone();
        if let Some(entry) = self.orders.get(&order) {
            // An attempt that was refused is being undone: the id is free
            // (for any content) once it is.
            if entry.phase == Phase::Abandoning {
                return Some(ClientAnswer::Refused(OrderError::Busy { retry_after_ms: 20 }));
            }
            if !entry.same_content(&request.buyer, request.ttl_ms, &lines) {
                return Some(ClientAnswer::Refused(OrderError::IdempotencyConflict));
            }
            return Some(match entry.phase {
                Phase::Holding | Phase::Abandoning | Phase::RecordingHeld { .. } => {
                    ClientAnswer::Refused(OrderError::Busy { retry_after_ms: 5 })
                }
                _ => ClientAnswer::Reserved {
                    order,
                    expires_at_ms: entry.expires_at_ms,
                    lines: entry.units(),
                    stock: entry.stock.clone(),
                    replayed: true,
                },
            });
        }
        if self.epoch_token.is_some() {
            return Some(ClientAnswer::Refused(OrderError::Unavailable));
        }
        if self.orders.len() >= self.config.orders_max && !self.forget_oldest_settled() {
            return Some(ClientAnswer::Refused(OrderError::Busy { retry_after_ms: 100 }));
        }
        self.next_attempt += 1;
        let attempt = OrderId::new(format!("~{}.{}.{}", self.config.own, self.epoch, self.next_attempt))
            .expect("an attempt id is short and printable");
        let line_count = lines.len();
        let mut entry = Entry {
            buyer: request.buyer,
            ttl_ms: request.ttl_ms,
            parts: parts_of(&lines),
            lines,
            attempt,
            expires_at_ms: u64::MAX,
            phase: Phase::Held,
            step: 0,
            caller: Some(caller),
            resend_at_ms: 0,
            resend_pause_ms: 0,
            deadline_ms: now_ms.saturating_add(self.config.part_answer_ms_max),
            stock: vec![StockSnapshot { available: 0, held: 0, sold: 0 }; line_count],
            refused: None,
            timer_ms: None,
        };
        self.enter(&order, &mut entry, Phase::Holding, now_ms);
        self.put(order, entry);
        None
    }

    fn forget_oldest_settled(&mut self) -> bool {
        let Some(order) = self.settled.first().map(|(_, order)| order.clone()) else { return false };
        self.forget(&order);
        true
    }

    /// Forgets a settled order, here and (once logged) after a restart, so
    /// that what the log carries stays within what the table holds.
    fn forget(&mut self, order: &OrderId) {
        if self.take(order).is_some() {
            self.forgotten += 1;
            self.log(CoordinatorRecord::Forgotten { order: order.clone() });
        }
    }

    /// Takes `order`'s entry out of the table and its indexes.
    fn take(&mut self, order: &OrderId) -> Option<Entry> {
        let entry = self.orders.remove(order)?;
        if let Some(at_ms) = entry.timer_ms {
            self.timers.remove(&(at_ms, order.clone()));
        }
        match entry.phase {
            Phase::Settled { at_ms, .. } => {
                self.settled.remove(&(at_ms, order.clone()));
            }
            Phase::RecordingHeld { token }
            | Phase::RecordingDecision { token, .. }
            | Phase::RecordingRelease { token, .. } => {
                self.recording.remove(&token);
                self.open -= 1;
            }
            _ => self.open -= 1,
        }
        Some(entry)
    }

    /// Puts `order`'s entry (back) into the table and its indexes.
    fn put(&mut self, order: OrderId, mut entry: Entry) {
        let window_ms = self.config.limits.idempotency_window_ms;
        entry.timer_ms = match &entry.phase {
            Phase::Holding | Phase::Abandoning | Phase::Preparing { .. } => {
                Some(entry.resend_at_ms.min(entry.deadline_ms))
            }
            Phase::Committing { .. } | Phase::Releasing { .. } => Some(entry.resend_at_ms),
            Phase::Held => Some(entry.expires_at_ms),
            Phase::Settled { at_ms, .. } => Some(at_ms.saturating_add(window_ms)),
            Phase::RecordingHeld { .. } | Phase::RecordingDecision { .. } | Phase::RecordingRelease { .. } => None,
        };
        if let Some(at_ms) = entry.timer_ms {
            self.timers.insert((at_ms, order.clone()));
        }
        match entry.phase {
            Phase::Settled { at_ms, .. } => {
                self.settled.insert((at_ms, order.clone()));
            }
            Phase::RecordingHeld { token }
            | Phase::RecordingDecision { token, .. }
            | Phase::RecordingRelease { token, .. } => {
                self.recording.insert(token, order.clone());
                self.open += 1;
            }
            _ => self.open += 1,
        }
        self.orders.insert(order, entry);
    }

    /// The units to sell per line for a commit of `fewer`, checked against
    /// the order before anything is prepared or logged.
    fn units_to_sell(entry: &Entry, fewer: &[(SkuId, u32)]) -> Result<Vec<u32>, OrderError> {
        let mut units: Vec<u32> = entry.lines.iter().map(|line| line.units).collect();
        let mut named = vec![false; units.len()];
        for (sku, asked) in fewer {
            let position = entry.lines.iter().position(|line| line.sku == *sku);
            let Some(position) = position.filter(|&position| !named[position]) else {
                return Err(OrderError::NotInOrder { sku: sku.clone() });
            };
            named[position] = true;
            let held = entry.lines[position].units;
            if *asked == 0 || *asked > held {
                return Err(OrderError::InvalidUnits { sku: sku.clone(), units: *asked, held });
            }
            units[position] = *asked;
        }
        Ok(units)
    }

    fn commit(
        &mut self,
        now_ms: u64,
        caller: CallerId,
        order: OrderId,
        fewer: Vec<(SkuId, u32)>,
    ) -> Option<ClientAnswer> {
        let Some(mut entry) = self.take(&order) else {
            return Some(ClientAnswer::Refused(OrderError::UnknownReservation));
        };
        let answer = self.commit_entry(now_ms, caller, &order, &mut entry, &fewer);
        self.put(order, entry);
        answer
    }

    fn commit_entry(
        &mut self,
        now_ms: u64,
        caller: CallerId,
        order: &OrderId,
        entry: &mut Entry,
        fewer: &[(SkuId, u32)],
    ) -> Option<ClientAnswer> {
        let busy = ClientAnswer::Refused(OrderError::Busy { retry_after_ms: 5 });
        let refused = ClientAnswer::Refused;
        match &entry.phase {
            Phase::Holding | Phase::RecordingHeld { .. } | Phase::Abandoning => Some(busy),
            Phase::Preparing { .. } | Phase::RecordingDecision { .. } => Some(busy),
            Phase::RecordingRelease { expired_at_ms: None, .. } | Phase::Releasing { expired_at_ms: None } => {
                Some(refused(OrderError::AlreadyReleased))
            }
            Phase::Settled { outcome: Outcome::Released, .. } => Some(refused(OrderError::AlreadyReleased)),
            Phase::RecordingRelease { expired_at_ms: Some(expired_at_ms), .. }
            | Phase::Releasing { expired_at_ms: Some(expired_at_ms) }
            | Phase::Settled { outcome: Outcome::Expired { expired_at_ms }, .. } => {
                Some(refused(OrderError::Expired { expired_at_ms: *expired_at_ms }))
            }
            Phase::Committing { units } => {
                match Self::units_to_sell(entry, fewer) {
                    Err(error) => Some(refused(error)),
                    // The decision stands; the retry is answered once every
                    // part carried it out (what the caller reads next then
                    // agrees), in place of any earlier caller still waiting.
                    Ok(asked) if asked == *units => {
                        self.wait_for_decision(entry, caller);
                        None
                    }
                    Ok(_) => Some(refused(OrderError::IdempotencyConflict)),
                }
            }
            Phase::Settled { outcome: Outcome::Committed { units }, .. } => {
                let sold = units.clone();
                Some(match Self::units_to_sell(entry, fewer) {
                    Err(error) => refused(error),
                    Ok(asked) if asked == sold => ClientAnswer::Committed {
                        order: order.clone(),
                        lines: entry.lines.iter().zip(&sold).map(|(line, &units)| (line.sku.clone(), units)).collect(),
                        stock: entry.stock.clone(),
                        replayed: true,
                    },
                    Ok(_) => refused(OrderError::IdempotencyConflict),
                })
            }
            Phase::Held => {
                let units = match Self::units_to_sell(entry, fewer) {
                    Ok(units) => units,
                    Err(error) => return Some(refused(error)),
                };
                if now_ms >= entry.expires_at_ms {
                    let expired_at_ms = entry.expires_at_ms;
                    self.decide_expiry(order, entry, expired_at_ms, now_ms);
                    return Some(refused(OrderError::Expired { expired_at_ms }));
                }
                entry.caller = Some(caller);
                if entry.lines.len() == 1 {
                    // One line on one member: its commit either lands or
                    // finds the hold expired, and either way the order is
                    // whole, so no prepare is needed. The decision is still
                    // logged first, so that a restart carries it out.
                    let token = self.log(CoordinatorRecord::Decided { order: order.clone(), units: units.clone() });
                    self.enter(order, entry, Phase::RecordingDecision { token, units }, now_ms);
                    return None;
                }
                entry.deadline_ms = now_ms.saturating_add(self.config.part_answer_ms_max);
                self.enter(order, entry, Phase::Preparing { units }, now_ms);
                None
            }
        }
    }

    fn release(&mut self, now_ms: u64, caller: CallerId, order: OrderId) -> Option<ClientAnswer> {
        let Some(mut entry) = self.take(&order) else {
            return Some(ClientAnswer::Refused(OrderError::UnknownReservation));
        };
        let answer = match &entry.phase {
            Phase::Held if now_ms >= entry.expires_at_ms => {
                let expired_at_ms = entry.expires_at_ms;
                self.decide_expiry(&order, &mut entry, expired_at_ms, now_ms);
                Some(ClientAnswer::Refused(OrderError::Expired { expired_at_ms }))
            }
            Phase::Held => {
                let token = self.log(CoordinatorRecord::ReleaseDecided { order: order.clone() });
                entry.caller = Some(caller);
                self.enter(&order, &mut entry, Phase::RecordingRelease { token, expired_at_ms: None }, now_ms);
                None
            }
            Phase::Releasing { expired_at_ms: None } => {
                self.wait_for_decision(&mut entry, caller);
                None
            }
            Phase::Settled { outcome: Outcome::Released, .. } => {
                let (lines, stock) = (entry.units(), entry.stock.clone());
                Some(ClientAnswer::Released { order: order.clone(), lines, stock, replayed: true })
            }
            Phase::RecordingRelease { expired_at_ms: Some(expired_at_ms), .. }
            | Phase::Releasing { expired_at_ms: Some(expired_at_ms) }
            | Phase::Settled { outcome: Outcome::Expired { expired_at_ms }, .. } => {
                Some(ClientAnswer::Refused(OrderError::Expired { expired_at_ms: *expired_at_ms }))
            }
            Phase::Committing { .. }
            | Phase::RecordingDecision { .. }
            | Phase::Settled { outcome: Outcome::Committed { .. }, .. } => {
                Some(ClientAnswer::Refused(OrderError::AlreadyCommitted))
            }
            Phase::Holding
            | Phase::Abandoning
            | Phase::RecordingHeld { .. }
            | Phase::Preparing { .. }
            | Phase::RecordingRelease { expired_at_ms: None, .. } => {
                Some(ClientAnswer::Refused(OrderError::Busy { retry_after_ms: 5 }))
            }
        };
        self.put(order, entry);
        answer
    }

    /// A part's answer, from `member`.
    pub fn part_answered(&mut self, now_ms: u64, member: MemberId, reply: PartReply) {
        let Some(mut entry) = self.take(&reply.order) else { return };
        let order = reply.order.clone();
        let current = reply.attempt == entry.attempt && reply.step == entry.step && entry.phase.waits_on_parts();
        let part = entry.parts.iter().position(|part| part.member == member);
        if let Some(part) = part.filter(|&part| current && !entry.parts[part].answered) {
            entry.parts[part].answered = true;
            self.on_answer(now_ms, &order, &mut entry, part, reply.answer);
            // An abandoned attempt is forgotten once every part answered.
            if entry.phase == Phase::Abandoning && entry.all_answered() {
                return;
            }
        }
        self.put(order, entry);
    }

    /// The order's refusal for a part's answer, with the index of the
    /// order line it names (`usize::MAX` for none).
    fn line_refusal(entry: &Entry, part: usize, answer: &PartAnswer) -> (usize, OrderError) {
        let line_of = |line: usize| entry.parts[part].lines.get(line).map(|&index| &entry.lines[index]);
        // The SKU's counts do not travel with a refusal.
        let stock = StockSnapshot { available: 0, held: 0, sold: 0 };
        match answer {
            PartAnswer::Refused { line, error } => match line_of(*line) {
                Some(held) => (
                    held.index,
                    OrderError::Line { index: held.index, sku: held.sku.clone(), error: error.clone(), stock },
                ),
                None => (usize::MAX, OrderError::Unavailable),
            },
            PartAnswer::UnknownSku { line } => match line_of(*line) {
                Some(held) => (held.index, OrderError::UnknownSku { index: held.index, sku: held.sku.clone() }),
                None => (usize::MAX, OrderError::Unavailable),
            },
            _ => (usize::MAX, OrderError::Unavailable),
        }
    }

    fn anomaly(&mut self, order: &OrderId, entry: &Entry, answer: &PartAnswer) {
        self.anomalies.push(format!("order {order} in phase {}: a part answered {answer:?}", entry.phase.name()));
    }

    fn on_answer(&mut self, now_ms: u64, order: &OrderId, entry: &mut Entry, part: usize, answer: PartAnswer) {
        match (&entry.phase, &answer) {
            (Phase::Holding, PartAnswer::Held { units, stock, expires_at_ms })
                if units.len() == entry.parts[part].lines.len() && stock.len() == units.len() =>
            {
                for ((&index, &held), &counts) in entry.parts[part].lines.iter().zip(units).zip(stock) {
                    entry.lines[index].units = held;
                    entry.stock[index] = counts;
                }
                entry.expires_at_ms = entry.expires_at_ms.min(*expires_at_ms);
                if entry.all_answered() {
                    if let Some((_, error)) = entry.refused.take() {
                        self.abandon(now_ms, order, entry, error);
                        return;
                    }
                    let record = CoordinatorRecord::Held {
                        order: order.clone(),
                        buyer: entry.buyer.clone(),
                        ttl_ms: entry.ttl_ms,
                        attempt: entry.attempt.clone(),
                        lines: entry.lines.clone(),
                        expires_at_ms: entry.expires_at_ms,
                    };
                    let token = self.log(record);
                    self.enter(order, entry, Phase::RecordingHeld { token }, now_ms);
                }
            }
            // Every part answers before the attempt is given up, so that the
            // refusal named is the first refused line of the order, however
            // the answers raced.
            (Phase::Holding, _) => {
                let (index, error) = Self::line_refusal(entry, part, &answer);
                if entry.refused.as_ref().is_none_or(|(first, _)| index < *first) {
                    entry.refused = Some((index, error));
                }
                if entry.all_answered() {
                    let (_, error) = entry.refused.take().expect("just set");
                    self.abandon(now_ms, order, entry, error);
                }
            }
            (Phase::Abandoning, _) => {}
            (Phase::Preparing { units }, PartAnswer::Prepared) => {
                if entry.all_answered() {
                    let units = units.clone();
                    let token = self.log(CoordinatorRecord::Decided { order: order.clone(), units: units.clone() });
                    self.enter(order, entry, Phase::RecordingDecision { token, units }, now_ms);
                }
            }
            (
                Phase::Preparing { .. },
                PartAnswer::Refused {
                    error: SkuError::Expired { .. } | SkuError::UnknownReservation | SkuError::AlreadyReleased,
                    ..
                },
            ) => {
                // A hold ran out before it was prepared: the order can never
                // be committed, so every part gives its units back now.
                let expired_at_ms = match answer {
                    PartAnswer::Refused { error: SkuError::Expired { expired_at_ms }, .. } => expired_at_ms,
                    _ => entry.expires_at_ms,
                };
                let caller = entry.caller.take();
                self.reply(caller, ClientAnswer::Refused(OrderError::Expired { expired_at_ms }));
                self.decide_expiry(order, entry, expired_at_ms, now_ms);
            }
            (Phase::Preparing { .. }, _) => {
                self.anomaly(order, entry, &answer);
                let caller = entry.caller.take();
                self.reply(caller, ClientAnswer::Refused(OrderError::Unavailable));
                self.enter(order, entry, Phase::Held, now_ms);
            }
            // The lone line of an order committed without a prepare found
            // its hold ended: nothing was sold, the order expired.
            (
                Phase::Committing { .. },
                PartAnswer::Refused {
                    error: SkuError::Expired { .. } | SkuError::UnknownReservation | SkuError::AlreadyReleased,
                    ..
                },
            ) if entry.lines.len() == 1 => {
                let expired_at_ms = match answer {
                    PartAnswer::Refused { error: SkuError::Expired { expired_at_ms }, .. } => expired_at_ms,
                    _ => entry.expires_at_ms,
                };
                let caller = entry.caller.take();
                self.reply(caller, ClientAnswer::Refused(OrderError::Expired { expired_at_ms }));
                self.settle(order, entry, Outcome::Expired { expired_at_ms }, now_ms);
            }
            (Phase::Committing { units }, _) => {
                match &answer {
                    PartAnswer::Committed { stock, .. } if stock.len() == entry.parts[part].lines.len() => {
                        for (&index, &counts) in entry.parts[part].lines.iter().zip(stock) {
                            entry.stock[index] = counts;
                        }
                    }
                    _ => self.anomaly(order, entry, &answer),
                }
                if entry.all_answered() {
                    let units = units.clone();
                    self.answer_decided(order, entry);
                    self.settle(order, entry, Outcome::Committed { units }, now_ms);
                }
            }
            (Phase::Releasing { expired_at_ms }, _) => {
                if !matches!(answer, PartAnswer::Released) {
                    self.anomaly(order, entry, &answer);
                }
                if entry.all_answered() {
                    let outcome = match *expired_at_ms {
                        Some(expired_at_ms) => Outcome::Expired { expired_at_ms },
                        None => Outcome::Released,
                    };
                    self.answer_decided(order, entry);
                    self.settle(order, entry, outcome, now_ms);
                }
            }
            (phase, _) => unreachable!("phase {} takes no answers", phase.name()),
        }
    }

    /// Makes `caller` the one answered when the decision being carried out
    /// is done; an earlier caller still waiting is told to retry (it has
    /// given up waiting, or it would not have been retried).
    fn wait_for_decision(&mut self, entry: &mut Entry, caller: CallerId) {
        let earlier = entry.caller.replace(caller);
        self.reply(earlier, ClientAnswer::Refused(OrderError::Busy { retry_after_ms: 20 }));
    }

    /// Answers the caller waiting for a durable decision (commit or
    /// release) being carried out, if any.
    fn answer_decided(&mut self, order: &OrderId, entry: &mut Entry) {
        let Some(caller) = entry.caller.take() else { return };
        let (stock, order) = (entry.stock.clone(), order.clone());
        let answer = match &entry.phase {
            Phase::Committing { units } => {
                let lines = entry.lines.iter().zip(units).map(|(line, &units)| (line.sku.clone(), units)).collect();
                ClientAnswer::Committed { order, lines, stock, replayed: false }
            }
            Phase::Releasing { expired_at_ms: None } => {
                ClientAnswer::Released { order, lines: entry.units(), stock, replayed: false }
            }
            other => unreachable!("no decision is carried out in phase {}", other.name()),
        };
        self.reply(Some(caller), answer);
    }

    /// Undoes an attempt that will not be acknowledged: answers `error`
    /// and releases every part (they expire by their TTL if a part never
    /// answers, so the attempt is forgotten by then at the latest).
    fn abandon(&mut self, now_ms: u64, order: &OrderId, entry: &mut Entry, error: OrderError) {
        let caller = entry.caller.take();
        self.reply(caller, ClientAnswer::Refused(error));
        entry.deadline_ms = now_ms.saturating_add(entry.ttl_ms).saturating_add(self.config.part_answer_ms_max);
        self.enter(order, entry, Phase::Abandoning, now_ms);
    }

    /// Records up to `token` are durable.
    pub fn durable(&mut self, now_ms: u64, token: u64) {
        self.durable_token = self.durable_token.max(token);
        if self.epoch_token.is_some_and(|epoch| epoch <= self.durable_token) {
            self.epoch_token = None;
            let held = std::mem::take(&mut self.sends_after_epoch);
            self.actions.extend(held.into_iter().map(|((_, member), message)| Action::Send { member, message }));
        }
        let waiting: Vec<OrderId> =
            self.recording.range(..=self.durable_token).map(|(_, order)| order.clone()).collect();
        for order in waiting {
            let mut entry = self.take(&order).expect("indexed orders are in the table");
            let caller = entry.caller.take();
            match std::mem::replace(&mut entry.phase, Phase::Held) {
                Phase::RecordingHeld { .. } => {
                    let answer = ClientAnswer::Reserved {
                        order: order.clone(),
                        expires_at_ms: entry.expires_at_ms,
                        lines: entry.units(),
                        stock: entry.stock.clone(),
                        replayed: false,
                    };
                    self.reply(caller, answer);
                    self.enter(&order, &mut entry, Phase::Held, now_ms);
                }
                // The decision is durable: the caller is answered once every
                // part carried it out, so that what it reads next agrees
                // (a part that is down delays the answer, never the decision).
                Phase::RecordingDecision { units, .. } => {
                    entry.caller = caller;
                    self.enter(&order, &mut entry, Phase::Committing { units }, now_ms);
                }
                Phase::RecordingRelease { expired_at_ms, .. } => {
                    entry.caller = caller;
                    self.enter(&order, &mut entry, Phase::Releasing { expired_at_ms }, now_ms);
                }
                _ => unreachable!("only recording phases wait for durability"),
            }
            self.put(order, entry);
        }
    }

    /// Time passed: resends unanswered steps, gives up the steps that may
    /// give up, expires held orders and forgets old settled ones.
    pub fn tick(&mut self, now_ms: u64) {
        let window_ms = self.config.limits.idempotency_window_ms;
        // Each due order once per tick: one whose next time is due again
        // (a held order found expired by a prepare's deadline) waits for
        // the next tick.
        let due: Vec<OrderId> =
            self.timers.iter().take_while(|(at_ms, _)| *at_ms <= now_ms).map(|(_, order)| order.clone()).collect();
        for order in due {
            let mut entry = self.take(&order).expect("indexed orders are in the table");
            match &entry.phase {
                Phase::Settled { at_ms, .. } if at_ms.saturating_add(window_ms) <= now_ms => {
                    self.forgotten += 1;
                    self.log(CoordinatorRecord::Forgotten { order });
                    continue;
                }
                Phase::Abandoning if entry.deadline_ms <= now_ms => continue,
                Phase::Held if entry.expires_at_ms <= now_ms => {
                    let expired_at_ms = entry.expires_at_ms;
                    self.decide_expiry(&order, &mut entry, expired_at_ms, now_ms);
                }
                Phase::Holding if entry.deadline_ms <= now_ms => {
                    let error = entry.refused.take().map_or(OrderError::Unavailable, |(_, error)| error);
                    self.abandon(now_ms, &order, &mut entry, error);
                }
                Phase::Preparing { .. } if entry.deadline_ms <= now_ms => {
                    let caller = entry.caller.take();
                    self.reply(caller, ClientAnswer::Refused(OrderError::Unavailable));
                    self.enter(&order, &mut entry, Phase::Held, now_ms);
                }
                phase if phase.waits_on_parts() && entry.resend_at_ms <= now_ms => {
                    entry.resend_pause_ms = (entry.resend_pause_ms * 2).min(self.config.resend_pause_ms_max);
                    entry.resend_at_ms = now_ms.saturating_add(entry.resend_pause_ms);
                    self.send_unanswered(&order, &entry);
                }
                _ => {}
            }
            self.put(order, entry);
        }
    }
}

/// The parts of an order: its lines grouped by member, members in the
/// order of their first line.
fn parts_of(lines: &[HeldLine]) -> Vec<Part> {
    let mut parts: Vec<Part> = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        match parts.iter_mut().find(|part| part.member == line.member) {
            Some(part) => part.lines.push(index),
            None => parts.push(Part { member: line.member, lines: vec![index], answered: false }),
        }
    }
    parts
}
