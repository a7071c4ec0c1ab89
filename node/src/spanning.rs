//! Orders whose lines live on several members.
//!
//! The owner of the first line's SKU (the order's home) coordinates. Each
//! other member holds its *part* of the order (the lines it owns) as an
//! ordinary order with the same id, and is driven by the coordinator over
//! the peer links with member-only requests.
//!
//! Reserve: hold the local part, then each remote part; if any part is
//! refused, abandon the parts already held (their holds undone and the id
//! forgotten, so the order may be tried again) and answer the refusal with
//! the line index of the whole order. Once every part is held, the
//! coordinator logs `TransactionBegun` with every line: from then on the
//! order's parts are durable knowledge of the home member, and a restart
//! finds them again.
//!
//! Commit is two-phase: log `TransactionBegun` again with the units to sell,
//! prepare the local part and then every remote part (their holds stop
//! expiring), log the decision durably, then commit the local part and
//! every remote part, retrying each until it is done, and finally log
//! `TransactionEnded`. A refusal before the decision gives every part its
//! TTL back (busy, unreachable: the client may retry) or releases every part
//! (a part expired: the order expired). The work runs on its own task, so a
//! client that stops waiting cannot stop it half-way.
//!
//! After a crash of the coordinator, the engine's recovery finishes its own
//! part and hands back the transactions with remote lines
//! ([`Coordinator::recover`]): decided ones are committed on every member,
//! undecided ones have their remote parts given their TTL back, and the
//! order stays known here so that a later commit or release reaches every
//! part. A sweep forgets spanning orders that expired or were forgotten.
//!
//! A participant whose coordinator is down keeps prepared holds until the
//! coordinator is back (two-phase commit blocks; replicating partitions
//! removes this later). Unprepared holds expire by their TTL as always.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flashstock_client::routing::{owner_of, partition_of};
use flashstock_client::wire::{Refusal, RequestBody, Response, WireLine, WireLineResult};
use flashstock_engine::log::record::{OpenTransaction, TransactionLine};
use flashstock_engine::{BuyerId, Engine, Line, OrderError, OrderId, OrderRequest, OrderStatus, SkuId};

use crate::peers::{CallError, Peers};

/// How long one request to another member may take before the coordinator
/// counts it as unanswered (and retries, or gives up before deciding).
const PEER_CALL_TIMEOUT_MS: u64 = 2_000;
/// First and longest pause between two attempts to carry out a decision on
/// a member that does not answer.
const RETRY_PAUSE_MS_MIN: u64 = 20;
const RETRY_PAUSE_MS_MAX: u64 = 1_000;
/// How often spanning orders that ended without the coordinator's help
/// (expired, forgotten) are looked for.
const SWEEP_INTERVAL_MS: u64 = 1_000;
// A settled spanning order stays known for the engine's idempotency
// window (`Limits::idempotency_window_ms`), as long as the engine remembers
// the order itself: a retried commit or release then always meets the
// spanning order, never the home member's lines alone. Settled orders are
// the first to go when the table is full.

/// A point where a test makes the coordinator die, to check that recovery
/// finishes what it began. Read from `FLASHSTOCK_FAILPOINT` at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// Every part prepared, nothing decided.
    BeforeDecision,
    /// Decided, the local part committed, no remote part yet.
    BetweenCommits,
}

impl Failpoint {
    pub fn from_environment() -> Option<Self> {
        match std::env::var("FLASHSTOCK_FAILPOINT").ok()?.as_str() {
            "before-decision" => Some(Self::BeforeDecision),
            "between-commits" => Some(Self::BetweenCommits),
            other => {
                tracing::warn!(failpoint = other, "unknown FLASHSTOCK_FAILPOINT ignored");
                None
            }
        }
    }
}

/// The lines of one member in a spanning order.
#[derive(Debug, Clone)]
struct Part {
    member: u32,
    /// The partition of the part's first SKU: the participant's own home
    /// for the part.
    home_partition: u32,
    skus: Vec<SkuId>,
}

#[derive(Debug)]
struct SpanningOrder {
    /// Every SKU of the order, in the order's line order.
    skus: Vec<SkuId>,
    /// The units held on each line (same order as `skus`), when known: a
    /// commit of fewer units is checked against them before anything is
    /// logged or prepared. Unknown for an order recovered after a restart
    /// (its transaction records name the SKUs only).
    held_units: Option<Vec<u32>>,
    /// The parts on other members.
    remote: Vec<Part>,
    /// One step at a time per order: commit, release, recovery and the
    /// sweep never interleave.
    turn: tokio::sync::Mutex<()>,
    /// When it was committed or released on every member.
    settled_at: Mutex<Option<std::time::Instant>>,
}

impl SpanningOrder {
    fn new(skus: Vec<SkuId>, held_units: Option<Vec<u32>>, remote: Vec<Part>) -> Self {
        Self { skus, held_units, remote, turn: tokio::sync::Mutex::new(()), settled_at: Mutex::new(None) }
    }

    /// Refuses, before anything is logged or prepared, a commit whose
    /// `fewer` names a SKU twice or outside the order, zero units, or more
    /// units than the line holds: checked after the decision, such a
    /// commit would be refused by a line with every part already prepared
    /// and the decision durable (the order stuck between the two).
    fn check_fewer(&self, fewer: &[(SkuId, u32)]) -> Result<(), OrderError> {
        for (index, (sku, units)) in fewer.iter().enumerate() {
            let position = self.skus.iter().position(|line| line == sku);
            let Some(position) = position.filter(|_| !fewer[..index].iter().any(|(earlier, _)| earlier == sku)) else {
                return Err(OrderError::NotInOrder { sku: sku.clone() });
            };
            let held = self.held_units.as_ref().and_then(|held| held.get(position).copied());
            if *units == 0 || held.is_some_and(|held| *units > held) {
                return Err(OrderError::InvalidUnits { sku: sku.clone(), units: *units, held: held.unwrap_or(0) });
            }
        }
        Ok(())
    }

    fn settle(&self) {
        *self.settled_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(std::time::Instant::now());
    }

    fn settled_for_ms(&self) -> Option<u64> {
        let settled_at = *self.settled_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        settled_at.map(|at| u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX))
    }
}

/// The coordinator of the spanning orders whose home is this member.
#[derive(Debug)]
pub struct Coordinator {
    own_id: u32,
    members: Vec<u32>,
    partition_count: u32,
    engine: Engine,
    peers: Arc<Peers>,
    orders: Mutex<HashMap<OrderId, Arc<SpanningOrder>>>,
    /// Spanning orders known at once; more are refused `Busy`. Each is a
    /// few hundred bytes and a durable transaction record until it ends.
    orders_max: usize,
    failpoint: Option<Failpoint>,
    stopping: AtomicBool,
}

/// A part's answer to a request, reduced to what the coordinator decides on.
enum PartAnswer {
    Ok(Response),
    Refused(Refusal),
}

impl Coordinator {
    pub fn new(
        own_id: u32,
        members: Vec<u32>,
        partition_count: u32,
        engine: Engine,
        peers: Arc<Peers>,
        orders_max: usize,
        failpoint: Option<Failpoint>,
    ) -> Arc<Self> {
        Arc::new(Self {
            own_id,
            members,
            partition_count,
            engine,
            peers,
            orders: Mutex::new(HashMap::new()),
            orders_max,
            failpoint,
            stopping: AtomicBool::new(false),
        })
    }

    fn owner(&self, sku: &str) -> u32 {
        owner_of(partition_of(sku, self.partition_count), &self.members).expect("a cluster has members")
    }

    /// The parts of an order with `skus` on other members, in line order.
    fn remote_parts(&self, skus: &[SkuId]) -> Vec<Part> {
        let mut parts: Vec<Part> = Vec::new();
        for sku in skus {
            let member = self.owner(sku.as_str());
            if member == self.own_id {
                continue;
            }
            match parts.iter_mut().find(|part| part.member == member) {
                Some(part) => part.skus.push(sku.clone()),
                None => parts.push(Part {
                    member,
                    home_partition: partition_of(sku.as_str(), self.partition_count),
                    skus: vec![sku.clone()],
                }),
            }
        }
        parts
    }

    /// Whether `order` is a spanning order coordinated here.
    pub fn knows(&self, order: &OrderId) -> bool {
        self.lock_orders().contains_key(order)
    }

    fn lock_orders(&self) -> std::sync::MutexGuard<'_, HashMap<OrderId, Arc<SpanningOrder>>> {
        self.orders.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `body` to a member; an unanswered call becomes `Unavailable`.
    async fn call(&self, member: u32, body: RequestBody) -> PartAnswer {
        match self.peers.call(member, body, Duration::from_millis(PEER_CALL_TIMEOUT_MS)).await {
            Ok(Response::Refused(refusal)) => PartAnswer::Refused(refusal),
            Ok(response) => PartAnswer::Ok(response),
            Err(error @ (CallError::Down(_) | CallError::TimedOut(_) | CallError::Broken { .. })) => {
                PartAnswer::Refused(Refusal::Unavailable { reason: error.to_string() })
            }
        }
    }

    /// Sends `body` (idempotent) to a member until it answers with a
    /// result or a final refusal (as `Response::Refused`), pausing between
    /// attempts; gives up only when the node stops (the next start carries
    /// the work on from the log).
    async fn call_until_settled(&self, member: u32, body: RequestBody) -> Option<Response> {
        let mut pause_ms = RETRY_PAUSE_MS_MIN;
        loop {
            match self.call(member, body.clone()).await {
                PartAnswer::Ok(response) => return Some(response),
                PartAnswer::Refused(refusal) if !refusal.is_retryable() => return Some(Response::Refused(refusal)),
                PartAnswer::Refused(refusal) => {
                    if self.stopping.load(Ordering::Acquire) {
                        return None;
                    }
                    tracing::debug!(member, ?refusal, "retrying a step on a member");
                }
            }
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            pause_ms = (pause_ms * 2).min(RETRY_PAUSE_MS_MAX);
        }
    }

    /// [`Self::call_until_settled`] for a decided step: a final refusal is
    /// reported and gives `None`.
    async fn call_until_done(&self, member: u32, body: RequestBody) -> Option<Response> {
        match self.call_until_settled(member, body).await {
            Some(Response::Refused(refusal)) => {
                tracing::error!(member, ?refusal, "a member refused a decided step");
                None
            }
            other => other,
        }
    }

    /// Refuses at once, before anything is held or prepared, when a part's
    /// member is down: the work could not finish, and undoing it would
    /// need that member too.
    fn check_parts_reachable(&self, parts: &[Part]) -> Result<(), Refusal> {
        match parts.iter().find(|part| !self.peers.is_up(part.member)) {
            Some(part) => Err(Refusal::Unavailable {
                reason: format!("member {}, which holds part of this order, is down", part.member),
            }),
            None => Ok(()),
        }
    }

    /// Holds every line of an order whose lines live on several members.
    pub async fn reserve(
        self: &Arc<Self>,
        order: OrderId,
        buyer: BuyerId,
        lines: Vec<WireLine>,
        ttl_ms: u64,
    ) -> Result<Response, Refusal> {
        let skus = lines.iter().map(|line| sku_id(&line.sku)).collect::<Result<Vec<_>, _>>()?;
        {
            let mut orders = self.lock_orders();
            // An order id names one order: a retry must name the same SKUs
            // (its quantities are checked by each part), so a retry that
            // adds or drops a line is refused before anything is touched.
            if let Some(known) = orders.get(&order) {
                let (mut known_skus, mut asked) = (known.skus.clone(), skus.clone());
                known_skus.sort();
                asked.sort();
                if known_skus != asked {
                    return Err(Refusal::IdempotencyConflict);
                }
            }
            if !orders.contains_key(&order) && orders.len() >= self.orders_max {
                orders.retain(|_, spanning| spanning.settled_for_ms().is_none());
            }
            if !orders.contains_key(&order) && orders.len() >= self.orders_max {
                return Err(Refusal::Busy { retry_after_ms: 100 });
            }
        }
        let coordinator = self.clone();
        let task = tokio::spawn(async move { coordinator.reserve_parts(order, buyer, lines, skus, ttl_ms).await });
        task.await.unwrap_or_else(|failure| std::panic::resume_unwind(failure.into_panic()))
    }

    async fn reserve_parts(
        &self,
        order: OrderId,
        buyer: BuyerId,
        lines: Vec<WireLine>,
        skus: Vec<SkuId>,
        ttl_ms: u64,
    ) -> Result<Response, Refusal> {
        self.check_parts_reachable(&self.remote_parts(&skus))?;
        // A retry of an order this member already knows (held, settled, or
        // known here as a single-member order) must leave the original as
        // it is whatever the retry meets: its failure path abandons nothing.
        let known_before = self.engine.order_status(&order);
        match &known_before {
            // The first attempt is still under way: it answers first.
            Some(OrderStatus::InProgress) if !self.knows(&order) => return Err(Refusal::Busy { retry_after_ms: 5 }),
            // Known here, but not as a spanning order: either the same id
            // was a single-member order (other content) or a spanning one
            // the sweep has already forgotten; neither may gain lines.
            Some(_) if !self.knows(&order) => return Err(Refusal::IdempotencyConflict),
            _ => {}
        }
        let local_indices: Vec<usize> =
            (0..lines.len()).filter(|&index| self.owner(&lines[index].sku) == self.own_id).collect();
        let local_lines = local_indices
            .iter()
            .map(|&index| Line { sku: skus[index].clone(), quantity: engine_quantity(lines[index].quantity) })
            .collect();
        let request = OrderRequest { order: order.clone(), buyer: buyer.clone(), lines: local_lines, ttl_ms };
        let local = self
            .engine
            .reserve(request)
            .await
            .map_err(|error| renumber(crate::server::order_refusal(error), &local_indices))?;
        let remote = self.remote_parts(&skus);
        let mut held_parts = Vec::with_capacity(remote.len());
        let mut failure = None;
        let mut remote_lines = Vec::new();
        let mut expires_at_ms = local.expires_at_ms;
        for part in &remote {
            let indices: Vec<usize> =
                (0..lines.len()).filter(|&index| self.owner(&lines[index].sku) == part.member).collect();
            let body = RequestBody::Reserve {
                order: part_order(&order),
                buyer: buyer.as_str().to_owned(),
                lines: indices.iter().map(|&index| lines[index].clone()).collect(),
                ttl_ms,
            };
            match self.call(part.member, body).await {
                PartAnswer::Ok(Response::Reserved { expires_at_ms: part_expiry, lines, .. }) => {
                    expires_at_ms = expires_at_ms.min(part_expiry);
                    remote_lines.extend(lines);
                    held_parts.push(part.clone());
                }
                PartAnswer::Ok(other) => {
                    failure = Some(unexpected(part.member, &other));
                    break;
                }
                PartAnswer::Refused(refusal) => {
                    // An unanswered reserve may still have held: undo it too.
                    if refusal.is_retryable() {
                        held_parts.push(part.clone());
                    }
                    failure = Some(renumber(refusal, &indices));
                    break;
                }
            }
        }
        let mut all_lines: Vec<WireLineResult> = local.lines.iter().map(crate::server::wire_line).collect();
        all_lines.extend(remote_lines);
        // An order already settled (a retried reserve) is answered as it
        // was; only a held one becomes an open spanning order again.
        let held = matches!(self.engine.order_status(&order), Some(OrderStatus::Held(_)));
        let begun = match failure {
            Some(_) => None,
            None if held => {
                let lines = skus.iter().map(|sku| TransactionLine { sku: sku.clone(), units: None }).collect();
                Some(self.engine.begin_transaction(&order, lines).await)
            }
            None => Some(Ok(())),
        };
        match (failure, begun) {
            (None, Some(Ok(()))) => {
                let remote = self.remote_parts(&skus);
                let held_units = skus
                    .iter()
                    .map(|sku| all_lines.iter().find(|line| line.sku == sku.as_str()).map(|line| line.units))
                    .collect();
                let spanning = SpanningOrder::new(skus.clone(), held_units, remote);
                if !held {
                    spanning.settle();
                }
                self.lock_orders().entry(order.clone()).or_insert_with(|| Arc::new(spanning));
                all_lines.sort_by_key(|line| skus.iter().position(|sku| sku.as_str() == line.sku));
                Ok(Response::Reserved {
                    order: order.as_str().to_owned(),
                    home_partition: partition_of(skus[0].as_str(), self.partition_count),
                    expires_at_ms,
                    lines: all_lines,
                })
            }
            (failure, begun) => {
                let refusal = failure.unwrap_or_else(|| {
                    let error = begun.and_then(Result::err).unwrap_or(OrderError::Unavailable);
                    crate::server::order_refusal(error)
                });
                if known_before.is_some() {
                    // The parts belong to the original order: a refused
                    // retry (a conflict, a busy or slow part) changes nothing.
                    return Err(refusal);
                }
                if let Err(error) = self.engine.abandon(&order).await {
                    tracing::warn!(%order, %error, "could not abandon the local part; it expires by its TTL");
                }
                for part in held_parts {
                    let body = RequestBody::Abandon { order: part_order(&order), home_partition: part.home_partition };
                    if let PartAnswer::Refused(refusal) = self.call(part.member, body).await {
                        tracing::warn!(%order, member = part.member, ?refusal, "could not abandon a part; it expires by its TTL");
                    }
                }
                Err(refusal)
            }
        }
    }

    /// Commits a spanning order (`fewer` as for any commit), on its own task.
    pub async fn commit(self: &Arc<Self>, order: OrderId, fewer: Vec<(SkuId, u32)>) -> Result<Response, Refusal> {
        let coordinator = self.clone();
        let task = tokio::spawn(async move { coordinator.commit_parts(order, fewer).await });
        task.await.unwrap_or_else(|failure| std::panic::resume_unwind(failure.into_panic()))
    }

    fn spanning(&self, order: &OrderId) -> Result<Arc<SpanningOrder>, Refusal> {
        self.lock_orders().get(order).cloned().ok_or(Refusal::UnknownReservation)
    }

    async fn commit_parts(self: &Arc<Self>, order: OrderId, fewer: Vec<(SkuId, u32)>) -> Result<Response, Refusal> {
        let spanning = self.spanning(&order)?;
        let _turn = spanning.turn.lock().await;
        spanning.check_fewer(&fewer).map_err(crate::server::order_refusal)?;
        match self.engine.order_status(&order) {
            // Decided before (a retried commit, or a decision whose remote
            // parts are still being carried out): finish it.
            Some(OrderStatus::Committed(_)) => return self.carry_out(&order, &spanning, &fewer).await,
            Some(OrderStatus::Released(_)) => return Err(Refusal::AlreadyReleased),
            Some(OrderStatus::Expired { expired_at_ms }) => return Err(Refusal::Expired { expired_at_ms }),
            None => return Err(Refusal::UnknownReservation),
            Some(OrderStatus::Held(_) | OrderStatus::InProgress) => {}
        }
        self.check_parts_reachable(&spanning.remote)?;
        let units_of = |sku: &SkuId| fewer.iter().find(|(named, _)| named == sku).map(|&(_, units)| units);
        let lines =
            spanning.skus.iter().map(|sku| TransactionLine { sku: sku.clone(), units: units_of(sku) }).collect();
        self.engine.begin_transaction(&order, lines).await.map_err(crate::server::order_refusal)?;

        // Phase one: prepare every part; the first refusal ends it.
        let mut refusal = self.engine.prepare(&order).await.err().map(crate::server::order_refusal);
        if refusal.is_none() {
            for part in &spanning.remote {
                let body = RequestBody::Prepare { order: part_order(&order), home_partition: part.home_partition };
                match self.call(part.member, body).await {
                    PartAnswer::Ok(Response::Reserved { .. }) => {}
                    PartAnswer::Ok(other) => refusal = Some(unexpected(part.member, &other)),
                    PartAnswer::Refused(part_refusal) => refusal = Some(part_refusal),
                }
                if refusal.is_some() {
                    break;
                }
            }
        }
        if let Some(refusal) = refusal {
            return Err(self.end_undecided(&order, &spanning, refusal).await);
        }
        if self.failpoint == Some(Failpoint::BeforeDecision) {
            tracing::error!(%order, "failpoint before-decision: stopping dead");
            std::process::abort();
        }
        // The decision: from here every part is committed, whatever happens.
        self.engine.decide_transaction(&order).await.map_err(crate::server::order_refusal)?;
        self.carry_out(&order, &spanning, &fewer).await
    }

    /// Carries out a decided commit on every part, ends the transaction and
    /// answers with every line's settlement.
    async fn carry_out(
        &self,
        order: &OrderId,
        spanning: &SpanningOrder,
        fewer: &[(SkuId, u32)],
    ) -> Result<Response, Refusal> {
        let local_fewer: Vec<(SkuId, u32)> =
            fewer.iter().filter(|(sku, _)| self.owner(sku.as_str()) == self.own_id).cloned().collect();
        let mut pause_ms = RETRY_PAUSE_MS_MIN;
        let local = loop {
            match self.engine.commit_fewer(order, &local_fewer).await {
                Ok(settlement) => break settlement,
                Err(error) if error.is_retryable() && !self.stopping.load(Ordering::Acquire) => {
                    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                    pause_ms = (pause_ms * 2).min(RETRY_PAUSE_MS_MAX);
                }
                Err(error) => return Err(crate::server::order_refusal(error)),
            }
        };
        if self.failpoint == Some(Failpoint::BetweenCommits) {
            tracing::error!(%order, "failpoint between-commits: stopping dead");
            std::process::abort();
        }
        let mut lines: Vec<WireLineResult> = local.lines.iter().map(crate::server::wire_line).collect();
        let mut replayed = local.replayed;
        for part in &spanning.remote {
            let body = RequestBody::Commit {
                order: part_order(order),
                home_partition: part.home_partition,
                fewer: fewer
                    .iter()
                    .filter(|(sku, _)| part.skus.contains(sku))
                    .map(|(sku, units)| (sku.as_str().to_owned(), *units))
                    .collect(),
            };
            match self.call_until_done(part.member, body).await {
                Some(Response::Settled { lines: part_lines, replayed: part_replayed, .. }) => {
                    lines.extend(part_lines);
                    replayed &= part_replayed;
                }
                Some(other) => return Err(unexpected(part.member, &other)),
                None => {
                    return Err(Refusal::Unavailable {
                        reason: format!("committed; member {} will be brought up to date", part.member),
                    })
                }
            }
        }
        if spanning.settled_for_ms().is_none() {
            if let Err(error) = self.engine.end_transaction(order).await {
                tracing::warn!(%order, %error, "could not log the end of a carried-out transaction");
            }
            spanning.settle();
        }
        lines.sort_by_key(|line| spanning.skus.iter().position(|sku| sku.as_str() == line.sku));
        Ok(Response::Settled { order: order.as_str().to_owned(), lines, replayed })
    }

    /// Ends a commit that was refused before the decision: an expired part
    /// means the order expired and every part is released; anything else
    /// gives every part its TTL back so that the client may retry.
    async fn end_undecided(
        self: &Arc<Self>,
        order: &OrderId,
        spanning: &Arc<SpanningOrder>,
        refusal: Refusal,
    ) -> Refusal {
        let expired = matches!(refusal, Refusal::Expired { .. });
        if expired {
            let _ = self.engine.release(order).await;
        } else if let Err(error) = self.engine.unprepare(order).await {
            tracing::warn!(%order, %error, "could not give the local part its TTL back");
        }
        for part in &spanning.remote {
            let (order_text, home_partition) = (part_order(order), part.home_partition);
            let body = if expired {
                RequestBody::Release { order: order_text, home_partition }
            } else {
                RequestBody::Unprepare { order: order_text, home_partition }
            };
            // A part that was never prepared is unaffected; one that cannot
            // be reached now may hold a prepared hold, which must not wait
            // for a decision that will not come: keep trying in the background.
            if let PartAnswer::Refused(part_refusal) = self.call(part.member, body.clone()).await {
                if part_refusal.is_retryable() {
                    tracing::warn!(%order, member = part.member, ?part_refusal, "retrying a part's undo in the background");
                    let (coordinator, member) = (self.clone(), part.member);
                    let (order, spanning) = (order.clone(), spanning.clone());
                    tokio::spawn(async move { coordinator.undo_in_turn(&order, &spanning, member, body).await });
                }
            }
        }
        if expired {
            let _ = self.engine.end_transaction(order).await;
            self.lock_orders().remove(order);
        }
        refusal
    }

    /// Releases a spanning order on every part.
    pub async fn release(self: &Arc<Self>, order: OrderId) -> Result<Response, Refusal> {
        let coordinator = self.clone();
        let task = tokio::spawn(async move { coordinator.release_parts(order).await });
        task.await.unwrap_or_else(|failure| std::panic::resume_unwind(failure.into_panic()))
    }

    async fn release_parts(&self, order: OrderId) -> Result<Response, Refusal> {
        let spanning = self.spanning(&order)?;
        let _turn = spanning.turn.lock().await;
        let local = self.engine.release(&order).await.map_err(crate::server::order_refusal)?;
        let mut lines: Vec<WireLineResult> = local.lines.iter().map(crate::server::wire_line).collect();
        for part in &spanning.remote {
            let body = RequestBody::Release { order: part_order(&order), home_partition: part.home_partition };
            // A part that expired (or was released) has its units back
            // already: for a release that is done, not a failure to retry.
            match self.call_until_settled(part.member, body).await {
                Some(Response::Settled { lines: part_lines, .. }) => lines.extend(part_lines),
                Some(Response::Refused(Refusal::Expired { .. } | Refusal::AlreadyReleased)) => {}
                Some(other) => return Err(unexpected(part.member, &other)),
                None => {
                    return Err(Refusal::Unavailable {
                        reason: format!("released here; member {} did not answer", part.member),
                    })
                }
            }
        }
        if spanning.settled_for_ms().is_none() {
            let _ = self.engine.end_transaction(&order).await;
            spanning.settle();
        }
        lines.sort_by_key(|line| spanning.skus.iter().position(|sku| sku.as_str() == line.sku));
        Ok(Response::Settled { order: order.as_str().to_owned(), lines, replayed: local.replayed })
    }

    /// Takes over the transactions recovery left open: decided ones are
    /// carried out on every member, undecided ones have their remote parts
    /// given their TTL back; every one stays known until it ends.
    pub fn recover(self: &Arc<Self>, transactions: Vec<(OrderId, OpenTransaction)>) {
        for (order, open) in transactions {
            let skus: Vec<SkuId> = open.lines.iter().map(|line| line.sku.clone()).collect();
            let remote = self.remote_parts(&skus);
            let spanning = Arc::new(SpanningOrder::new(skus, None, remote));
            self.lock_orders().insert(order.clone(), spanning.clone());
            let coordinator = self.clone();
            tokio::spawn(async move {
                let _turn = spanning.turn.lock().await;
                if open.committed {
                    let fewer: Vec<(SkuId, u32)> = open
                        .lines
                        .iter()
                        .filter_map(|line| line.units.map(|units| (line.sku.clone(), units)))
                        .collect();
                    match coordinator.carry_out(&order, &spanning, &fewer).await {
                        Ok(_) => tracing::info!(%order, "a decided transaction was carried out after a restart"),
                        Err(refusal) => {
                            tracing::error!(%order, ?refusal, "a decided transaction could not be carried out")
                        }
                    }
                } else {
                    for part in &spanning.remote {
                        let body =
                            RequestBody::Unprepare { order: part_order(&order), home_partition: part.home_partition };
                        coordinator.call_until_done(part.member, body).await;
                    }
                    tracing::info!(%order, "an undecided transaction's parts have their TTL back");
                }
            });
        }
    }

    /// Every `SWEEP_INTERVAL_MS`: forgets the spanning orders that ended
    /// without the coordinator (expired, or forgotten by the engine), ending
    /// their transactions, and those settled longer ago than the idempotency window. Runs
    /// until the node stops.
    pub fn start_sweep(self: &Arc<Self>) {
        let coordinator = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(SWEEP_INTERVAL_MS));
            while !coordinator.stopping.load(Ordering::Acquire) {
                interval.tick().await;
                coordinator.sweep().await;
            }
        });
    }

    async fn sweep(&self) {
        let candidates: Vec<(OrderId, Arc<SpanningOrder>)> =
            self.lock_orders().iter().map(|(order, spanning)| (order.clone(), spanning.clone())).collect();
        for (order, spanning) in candidates {
            let Ok(_turn) = spanning.turn.try_lock() else { continue };
            let settled_memory_ms = self.engine.config().limits.idempotency_window_ms;
            if spanning.settled_for_ms().is_some_and(|settled_ms| settled_ms >= settled_memory_ms) {
                self.lock_orders().remove(&order);
                continue;
            }
            let ended = matches!(self.engine.order_status(&order), None | Some(OrderStatus::Expired { .. }));
            if ended && spanning.settled_for_ms().is_none() {
                // The local part ended undecided, but a remote part may
                // still be prepared (its Prepare answered and the answer
                // lost, its Unprepare still retrying): every part is
                // released before the order is forgotten, or it is looked
                // at again next sweep. Nothing else would ever end that
                // prepared hold.
                if !self.release_every_part(&order, &spanning).await {
                    continue;
                }
                if let Err(error) = self.engine.end_transaction(&order).await {
                    tracing::warn!(%order, %error, "could not log the end of an expired spanning order");
                    continue;
                }
                self.lock_orders().remove(&order);
            }
        }
    }

    /// Retries undoing a part of an undecided attempt until the part
    /// answers, each attempt in the order's turn: a later commit attempt
    /// (which prepares the part again and may decide) holds the turn from
    /// its prepare to its end, so this undo can never land between a later
    /// prepare and that attempt's commit. Stops once the order is decided
    /// or settled: nothing is left to undo then.
    async fn undo_in_turn(&self, order: &OrderId, spanning: &SpanningOrder, member: u32, body: RequestBody) {
        let mut pause_ms = RETRY_PAUSE_MS_MIN;
        while !self.stopping.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            pause_ms = (pause_ms * 2).min(RETRY_PAUSE_MS_MAX);
            let _turn = spanning.turn.lock().await;
            if spanning.settled_for_ms().is_some()
                || matches!(self.engine.order_status(order), Some(OrderStatus::Committed(_)))
            {
                return;
            }
            match self.call(member, body.clone()).await {
                PartAnswer::Refused(refusal) if refusal.is_retryable() => {
                    tracing::debug!(%order, member, ?refusal, "a part's undo is still unanswered");
                }
                _ => return,
            }
        }
    }

    /// Releases every remote part of an undecided order, one attempt each;
    /// true once every part answered (released, or already ended).
    async fn release_every_part(&self, order: &OrderId, spanning: &SpanningOrder) -> bool {
        let mut every_part_answered = true;
        for part in &spanning.remote {
            let body = RequestBody::Release { order: part_order(order), home_partition: part.home_partition };
            if let PartAnswer::Refused(refusal) = self.call(part.member, body).await {
                if refusal.is_retryable() {
                    tracing::debug!(%order, member = part.member, ?refusal, "a part of an ended order did not answer yet");
                    every_part_answered = false;
                }
            }
        }
        every_part_answered
    }

    /// Stops retrying: what is left is carried on by the next start.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Spanning orders known now.
    pub fn open_orders(&self) -> usize {
        self.lock_orders().len()
    }
}

/// The id under which a member holds its part of `order`: the reserved
/// prefix keeps checkout clients from settling a part on its own (which
/// would split the order) and keeps parts apart from the member's own
/// orders of the same id.
pub fn part_order(order: &OrderId) -> String {
    format!("{PART_ORDER_PREFIX}{order}")
}

/// Order ids beginning with this are the cluster's own (parts of spanning
/// orders); clients may not use them.
pub const PART_ORDER_PREFIX: char = '~';

fn sku_id(sku: &str) -> Result<SkuId, Refusal> {
    SkuId::new(sku).map_err(|error| Refusal::Invalid { field: "sku".to_owned(), reason: error.to_string() })
}

fn engine_quantity(quantity: flashstock_client::wire::WireQuantity) -> flashstock_engine::Quantity {
    match quantity {
        flashstock_client::wire::WireQuantity::Exactly(units) => flashstock_engine::Quantity::Exactly(units),
        flashstock_client::wire::WireQuantity::UpTo { max, min } => flashstock_engine::Quantity::UpTo { max, min },
    }
}

/// A part's refusal, with its line index turned into the whole order's.
fn renumber(refusal: Refusal, indices: &[usize]) -> Refusal {
    let whole = |line: u32| indices.get(line as usize).map_or(line, |&index| u32::try_from(index).unwrap_or(u32::MAX));
    match refusal {
        Refusal::SoldOut { line, sku, available } => Refusal::SoldOut { line: whole(line), sku, available },
        Refusal::LimitExceeded { line, sku, units_per_buyer_max, units_taken } => {
            Refusal::LimitExceeded { line: whole(line), sku, units_per_buyer_max, units_taken }
        }
        Refusal::NotOpen { line, sku, opens_at_ms } => Refusal::NotOpen { line: whole(line), sku, opens_at_ms },
        Refusal::HoldLimitReached { line, sku } => Refusal::HoldLimitReached { line: whole(line), sku },
        other => other,
    }
}

fn unexpected(member: u32, response: &Response) -> Refusal {
    tracing::error!(member, ?response, "a member answered out of protocol");
    Refusal::Unavailable { reason: format!("member {member} answered out of protocol") }
}
