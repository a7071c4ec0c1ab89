//! The event loop: one simulated clock, one queue of events, one seed.
//!
//! Faults run for the first part of a run (messages dropped, duplicated,
//! delayed and reordered; members cut off from everyone; members crashed,
//! losing what they had not synced, and restarted). Then the cluster heals,
//! every buyer finishes, every TTL passes, and the final checks run.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use flashstock_client::routing::owner_of;
use flashstock_engine::coordination::{CoordinatorConfig, PartRequest, Placement};
use flashstock_engine::{Limits, SkuId, SkuSettings};

use crate::history::History;
use crate::member::{Endpoint, Member, Message};
use crate::rng::Rng;
use crate::workload::{Buyer, Next};

/// The shape of one run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub members: u32,
    pub partition_count: u32,
    pub skus: usize,
    pub buyers: u32,
    pub orders_per_buyer: u32,
    /// Faults happen before this time only.
    pub faults_until_ms: u64,
    /// Whether to inject faults at all.
    pub faults: bool,
    /// Trace lines kept for a failure report.
    pub trace_lines_kept: usize,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            members: 3,
            partition_count: 12,
            skus: 6,
            buyers: 8,
            orders_per_buyer: 30,
            faults_until_ms: 20_000,
            faults: true,
            trace_lines_kept: 80,
        }
    }
}

/// How a run went.
#[derive(Debug)]
pub struct RunReport {
    pub seed: u64,
    pub events: u64,
    pub requests: u64,
    pub answers: u64,
    pub simulated_ms: u64,
    /// FNV-1a over every trace line: equal for equal runs.
    pub trace_hash: u64,
    pub violations: Vec<String>,
    pub trace_tail: Vec<String>,
    /// Answers by kind, and faults by kind.
    pub tally: BTreeMap<&'static str, u64>,
}

#[derive(Debug)]
enum Event {
    Deliver { from: Endpoint, to: Endpoint, message: Message },
    Tick { member: u32, incarnation: u64 },
    Sync { member: u32, incarnation: u64 },
    Fault,
    Restart { member: u32 },
    Heal { member: u32 },
    BuyerWake { buyer: u32 },
    BuyerSend { buyer: u32, caller: u64, request: flashstock_engine::coordination::ClientRequest },
}

/// What a scripted test does with a message about to travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Deliver,
    Drop,
    /// Kept aside until [`Scripted::deliver_held`].
    Hold,
}

type Interceptor = Box<dyn FnMut(Endpoint, Endpoint, &Message) -> Verdict>;

/// A run's whole world.
struct World {
    /// A scripted test's say over each message (none in seeded runs).
    interceptor: Option<Interceptor>,
    held: Vec<(Endpoint, Endpoint, Message)>,
    /// Every answer, by caller (for scripted tests).
    answers: BTreeMap<u64, Vec<flashstock_engine::coordination::ClientAnswer>>,
    config: SimConfig,
    now_ms: u64,
    next_event: u64,
    events: BTreeMap<(u64, u64), Event>,
    network: Rng,
    faults: Rng,
    members: Vec<Member>,
    buyers: Vec<Buyer>,
    catalogue: Vec<SkuId>,
    placement: Placement,
    /// Members cut off from everyone else.
    isolated: BTreeSet<u32>,
    history: History,
    /// Members with a sync scheduled (a group commit under way).
    syncing: BTreeSet<u32>,
    requests: u64,
    event_count: u64,
    trace_hash: u64,
    trace: VecDeque<String>,
}

const TICK_MS: u64 = 10;
/// The end of a run that has not settled by then is a liveness failure.
const RUN_MS_MAX: u64 = 300_000;

impl World {
    fn new(config: SimConfig) -> Self {
        let mut root = Rng::new(config.seed);
        // The SKUs remember every ended hold for the whole run (the final
        // checks read them); the coordinators of odd seeds forget settled
        // orders after 20 s, so that forgetting, and restarts after it, run.
        let limits = Limits { idempotency_window_ms: 3_600_000, ..Limits::default() };
        let coordinator_limits = Limits {
            idempotency_window_ms: if config.seed % 2 == 1 { 20_000 } else { limits.idempotency_window_ms },
            ..limits.clone()
        };
        let member_ids: Vec<u32> = (1..=config.members).collect();
        let owner_by_partition =
            (0..config.partition_count).map(|partition| owner_of(partition, &member_ids).expect("members")).collect();
        let placement = Placement::new(owner_by_partition);
        let mut members: Vec<Member> = member_ids
            .iter()
            .map(|&own| {
                let coordinator = CoordinatorConfig {
                    own,
                    placement: placement.clone(),
                    limits: coordinator_limits.clone(),
                    orders_max: 10_000,
                    part_answer_ms_max: 1_000,
                    resend_pause_ms_min: 20,
                    resend_pause_ms_max: 500,
                };
                Member::new(own, coordinator, &limits, config.partition_count)
            })
            .collect();
        let mut setup = root.fork();
        let catalogue: Vec<SkuId> =
            (0..config.skus).map(|index| SkuId::new(format!("sku-{index}")).expect("valid")).collect();
        for sku in &catalogue {
            let owner = placement.owner_of_sku(sku);
            let settings = SkuSettings { initial_units: setup.between(20, 120), ..SkuSettings::default() };
            members[owner as usize - 1].create_sku(sku.clone(), settings, &limits);
        }
        let buyers = (0..config.buyers).map(|index| Buyer::new(index, root.fork(), config.orders_per_buyer)).collect();
        let network = root.fork();
        let faults = root.fork();
        let mut world = Self {
            interceptor: None,
            held: Vec::new(),
            answers: BTreeMap::new(),
            config,
            now_ms: 0,
            next_event: 0,
            events: BTreeMap::new(),
            network,
            faults,
            members,
            buyers,
            catalogue,
            placement,
            isolated: BTreeSet::new(),
            history: History::default(),
            syncing: BTreeSet::new(),
            requests: 0,
            event_count: 0,
            trace_hash: 0xcbf2_9ce4_8422_2325,
            trace: VecDeque::new(),
        };
        for member in 1..=world.config.members {
            world.schedule(1, Event::Tick { member, incarnation: 0 });
        }
        for buyer in 0..world.config.buyers {
            world.schedule(0, Event::BuyerWake { buyer });
        }
        if world.config.faults {
            world.schedule(500, Event::Fault);
        }
        world
    }

    fn schedule(&mut self, at_ms: u64, event: Event) {
        self.next_event += 1;
        self.events.insert((at_ms.max(self.now_ms), self.next_event), event);
    }

    fn trace(&mut self, line: String) {
        for byte in line.as_bytes().iter().chain(b"\n") {
            self.trace_hash = (self.trace_hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        if self.trace.len() == self.config.trace_lines_kept {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    fn faulty(&self) -> bool {
        self.config.faults && self.now_ms < self.config.faults_until_ms
    }

    fn member(&mut self, id: u32) -> &mut Member {
        &mut self.members[id as usize - 1]
    }

    fn cut_off(&self, from: Endpoint, to: Endpoint) -> bool {
        let isolated = |endpoint: Endpoint| matches!(endpoint, Endpoint::Member(id) if self.isolated.contains(&id));
        from != to && (isolated(from) || isolated(to))
    }

    /// Puts `message` on the network: maybe lost, maybe twice, maybe late.
    fn send(&mut self, from: Endpoint, to: Endpoint, message: Message) {
        if let (Endpoint::Member(_), Message::Part(part)) = (from, &message) {
            if let PartRequest::Reserve { lines, .. } = &part.request {
                self.history.attempt(&part.attempt, &part.order, lines.iter().map(|(sku, _)| sku.clone()));
            }
        }
        let local = from == to;
        if let Some(interceptor) = &mut self.interceptor {
            match interceptor(from, to, &message) {
                Verdict::Deliver => {}
                Verdict::Drop => {
                    self.trace(format!("{} dropped by the script {from:?}->{to:?} {message:?}", self.now_ms));
                    return;
                }
                Verdict::Hold => {
                    self.held.push((from, to, message));
                    return;
                }
            }
        }
        if self.cut_off(from, to) {
            self.trace(format!("{} cut {from:?}->{to:?}", self.now_ms));
            return;
        }
        let faulty = self.faulty() && !local;
        if faulty && self.network.chance(20) {
            self.trace(format!("{} lost {from:?}->{to:?} {message:?}", self.now_ms));
            return;
        }
        let copies = if faulty && self.network.chance(10) { 2 } else { 1 };
        for _ in 0..copies {
            let delay_ms = if local {
                self.network.between(0, 1)
            } else if faulty && self.network.chance(30) {
                self.network.between(50, 600)
            } else {
                self.network.between(1, 6)
            };
            let at_ms = self.now_ms + delay_ms;
            self.schedule(at_ms, Event::Deliver { from, to, message: message.clone() });
        }
    }

    fn send_all(&mut self, from: Endpoint, outbox: Vec<(Endpoint, Message)>) {
        for (to, message) in outbox {
            self.send(from, to, message);
        }
    }

    fn buyer_next(&mut self, buyer: u32, next: Next) {
        match next {
            Next::Send { at_ms, caller, request } => {
                self.schedule(at_ms, Event::BuyerSend { buyer, caller, request });
            }
            Next::Wait | Next::Done => {}
        }
        if let Some(deadline_ms) = self.buyers[buyer as usize].deadline_ms() {
            self.schedule(deadline_ms, Event::BuyerWake { buyer });
        }
    }

    /// Schedules an fsync of `member` in a few milliseconds if it has
    /// anything to make durable and none is under way: a group commit.
    fn sync_soon(&mut self, member: u32) {
        let state = &self.members[member as usize - 1];
        if !state.up || !state.needs_sync() || self.syncing.contains(&member) {
            return;
        }
        let incarnation = state.incarnation;
        self.syncing.insert(member);
        let at_ms = self.now_ms + self.network.between(1, 4);
        self.schedule(at_ms, Event::Sync { member, incarnation });
    }

    fn fault(&mut self) {
        let member = 1 + u32::try_from(self.faults.below(self.config.members as usize)).expect("small");
        match self.faults.below(10) {
            0..=3 if self.members[member as usize - 1].up => {
                let mut rng = self.faults.fork();
                self.member(member).crash(&mut rng);
                *self.history.tally.entry("crashes").or_default() += 1;
                let back_ms = self.now_ms + self.faults.between(50, 3_000);
                self.trace(format!("{} crash member {member}", self.now_ms));
                self.schedule(back_ms, Event::Restart { member });
            }
            4..=6 if !self.isolated.contains(&member) => {
                self.isolated.insert(member);
                *self.history.tally.entry("partitions").or_default() += 1;
                let heal_ms = self.now_ms + self.faults.between(100, 3_000);
                self.trace(format!("{} isolate member {member}", self.now_ms));
                self.schedule(heal_ms, Event::Heal { member });
            }
            _ => {}
        }
        let next_ms = self.now_ms + self.faults.between(200, 2_000);
        if next_ms < self.config.faults_until_ms {
            self.schedule(next_ms, Event::Fault);
        } else {
            // The end of the faults: everyone back, nobody cut off.
            for member in 1..=self.config.members {
                self.schedule(self.config.faults_until_ms, Event::Heal { member });
                self.schedule(self.config.faults_until_ms, Event::Restart { member });
            }
        }
    }

    fn restart(&mut self, member: u32) {
        if self.members[member as usize - 1].up {
            return;
        }
        let now_ms = self.now_ms;
        let through_snapshot = self.faults.chance(500);
        match self.member(member).restart(now_ms, through_snapshot) {
            Ok(outbox) => {
                let incarnation = self.members[member as usize - 1].incarnation;
                self.trace(format!("{now_ms} restart member {member}"));
                self.send_all(Endpoint::Member(member), outbox);
                self.schedule(now_ms + 1, Event::Tick { member, incarnation });
                self.syncing.remove(&member);
                self.sync_soon(member);
            }
            Err(error) => self.history.violations.push(format!("{now_ms} ms: restart failed: {error}")),
        }
    }

    fn step(&mut self, event: Event) {
        self.event_count += 1;
        let now_ms = self.now_ms;
        match event {
            Event::Deliver { from, to, message } => match to {
                Endpoint::Member(id) => {
                    if !self.members[id as usize - 1].up {
                        return;
                    }
                    self.trace(format!("{now_ms} {from:?}->{to:?} {message:?}"));
                    let outbox = self.member(id).receive(now_ms, from, message);
                    self.send_all(to, outbox);
                    self.sync_soon(id);
                }
                Endpoint::Buyer(buyer) => {
                    let Message::Answer { caller, answer } = message else { unreachable!("buyers get answers") };
                    self.trace(format!("{now_ms} {from:?}->{to:?} {caller} {answer:?}"));
                    self.history.answered(now_ms, caller, &answer);
                    if self.interceptor.is_some() {
                        self.answers.entry(caller).or_default().push(answer.clone());
                    }
                    if (buyer as usize) < self.buyers.len() {
                        let catalogue = self.catalogue.clone();
                        let next = self.buyers[buyer as usize].answered(now_ms, caller, Some(&answer), &catalogue);
                        self.buyer_next(buyer, next);
                    }
                }
            },
            Event::Tick { member, incarnation } => {
                let state = &self.members[member as usize - 1];
                if !state.up || state.incarnation != incarnation {
                    return;
                }
                let outbox = self.member(member).tick(now_ms);
                self.send_all(Endpoint::Member(member), outbox);
                self.sync_soon(member);
                self.schedule(now_ms + TICK_MS, Event::Tick { member, incarnation });
            }
            Event::Sync { member, incarnation } => {
                let state = &self.members[member as usize - 1];
                if !state.up || state.incarnation != incarnation {
                    return;
                }
                self.syncing.remove(&member);
                let outbox = self.member(member).sync(now_ms);
                self.send_all(Endpoint::Member(member), outbox);
                self.sync_soon(member);
            }
            Event::Fault => self.fault(),
            Event::Restart { member } => self.restart(member),
            Event::Heal { member } => {
                if self.isolated.remove(&member) {
                    self.trace(format!("{now_ms} heal member {member}"));
                }
            }
            Event::BuyerWake { buyer } => {
                let catalogue = self.catalogue.clone();
                let state = &mut self.buyers[buyer as usize];
                let next = match state.deadline_ms() {
                    Some(_) => state.answered(now_ms, 0, None, &catalogue),
                    None => state.next(now_ms, &catalogue),
                };
                self.buyer_next(buyer, next);
            }
            Event::BuyerSend { buyer, caller, request } => {
                self.requests += 1;
                self.history.sent(caller, &request);
                let home = self.placement.home_of_order(request.order());
                self.trace(format!("{now_ms} buyer {buyer} sends {caller} to {home}: {request:?}"));
                self.send(Endpoint::Buyer(buyer), Endpoint::Member(home), Message::Request { caller, request });
            }
        }
    }

    fn settled(&self) -> bool {
        self.buyers.iter().all(Buyer::finished)
            && self.members.iter().all(|member| member.up && member.coordinator.order_counts().1 == 0)
            && self.members.iter().all(|member| member.skus.values().all(|state| state.hold_count() == 0))
    }

    /// Processes every event due by `until_ms`.
    fn run_until(&mut self, until_ms: u64) {
        while let Some(entry) = self.events.first_entry() {
            if entry.key().0 > until_ms {
                break;
            }
            let ((at_ms, _), event) = entry.remove_entry();
            self.now_ms = at_ms;
            self.step(event);
        }
        self.now_ms = until_ms;
    }

    /// The final checks (assumes a healed cluster, every TTL passed).
    fn check_final(&mut self) -> Vec<String> {
        let mut skus = BTreeMap::new();
        for member in &self.members {
            skus.extend(member.skus.iter().map(|(sku, state)| (sku.clone(), state.clone())));
            for anomaly in member.coordinator.anomalies() {
                self.history.violations.push(format!("member {}: {anomaly}", member.id));
            }
            let (_, open) = member.coordinator.order_counts();
            if open > 0 {
                let orders = member.coordinator.open_orders();
                self.history.violations.push(format!("member {}: orders still open: {orders:?}", member.id));
            }
        }
        self.history.check_final(&skus);
        std::mem::take(&mut self.history.violations)
    }

    fn run(mut self) -> RunReport {
        let mut quiet_since = None;
        while let Some(((at_ms, _), event)) = self.events.pop_first() {
            self.now_ms = at_ms;
            if self.now_ms > RUN_MS_MAX {
                break;
            }
            self.step(event);
            if self.now_ms >= self.config.faults_until_ms && self.settled() {
                let since = *quiet_since.get_or_insert(self.now_ms);
                if self.now_ms >= since + 1_000 {
                    break;
                }
            } else {
                quiet_since = None;
            }
        }
        if !self.settled() {
            let open: Vec<String> = self
                .members
                .iter()
                .map(|member| format!("member {}: {:?}", member.id, member.coordinator.open_orders()))
                .collect();
            let unfinished = self.buyers.iter().filter(|buyer| !buyer.finished()).count();
            self.history.violations.push(format!(
                "did not settle by {} ms: {unfinished} buyers unfinished; open orders {open:?}",
                self.now_ms
            ));
        }
        let forgotten: u64 = self.members.iter().map(|member| member.coordinator.forgotten()).sum();
        *self.history.tally.entry("forgotten").or_default() += forgotten;
        let violations = self.check_final();
        RunReport {
            seed: self.config.seed,
            events: self.event_count,
            requests: self.requests,
            answers: self.history.answers,
            simulated_ms: self.now_ms,
            trace_hash: self.trace_hash,
            violations,
            trace_tail: self.trace.into_iter().collect(),
            tally: std::mem::take(&mut self.history.tally),
        }
    }
}

/// Runs one seed.
pub fn run(config: SimConfig) -> RunReport {
    World::new(config).run()
}

/// A cluster driven step by step by a test: no buyers and no random
/// faults; the test sends requests, decides the fate of each message, and
/// crashes and restarts members.
pub struct Scripted {
    world: World,
    next_caller: u64,
}

impl std::fmt::Debug for Scripted {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Scripted").field("now_ms", &self.world.now_ms).finish_non_exhaustive()
    }
}

impl Scripted {
    /// A cluster of `members` with `skus` SKUs of `units` each (`sku-0`,
    /// `sku-1`, ...); which member owns which is [`Self::owner_of`].
    pub fn new(members: u32, skus: usize) -> Self {
        let config = SimConfig { buyers: 0, faults: false, members, skus, trace_lines_kept: 200, ..SimConfig::new(0) };
        let mut world = World::new(config);
        world.interceptor = Some(Box::new(|_, _, _| Verdict::Deliver));
        Self { world, next_caller: 0 }
    }

    pub fn owner_of(&self, sku: &str) -> u32 {
        self.world.placement.owner_of_sku(&SkuId::new(sku).expect("valid"))
    }

    pub fn home_of(&self, order: &str) -> u32 {
        self.world.placement.home_of_order(&flashstock_engine::OrderId::new(order).expect("valid"))
    }

    /// The SKU's counts on its owner.
    pub fn stock(&self, sku: &str) -> flashstock_engine::StockSnapshot {
        let sku = SkuId::new(sku).expect("valid");
        let owner = self.world.placement.owner_of_sku(&sku);
        self.world.members[owner as usize - 1].skus[&sku].stock()
    }

    /// Decides the fate of every message from now on.
    pub fn intercept(&mut self, interceptor: impl FnMut(Endpoint, Endpoint, &Message) -> Verdict + 'static) {
        self.world.interceptor = Some(Box::new(interceptor));
    }

    /// Delivers the messages held so far, now (in the order they were held).
    pub fn deliver_held(&mut self) -> usize {
        let held = std::mem::take(&mut self.world.held);
        let count = held.len();
        for (from, to, message) in held {
            let at_ms = self.world.now_ms + 1;
            self.world.schedule(at_ms, Event::Deliver { from, to, message });
        }
        count
    }

    /// Sends `request` from a buyer to the order's home; returns its caller id.
    pub fn send(&mut self, request: flashstock_engine::coordination::ClientRequest) -> u64 {
        self.next_caller += 1;
        let caller = self.next_caller;
        self.world.history.sent(caller, &request);
        let home = self.world.placement.home_of_order(request.order());
        self.world.send(Endpoint::Buyer(0), Endpoint::Member(home), Message::Request { caller, request });
        caller
    }

    /// Runs the cluster for `duration_ms`.
    pub fn run_for(&mut self, duration_ms: u64) {
        let until_ms = self.world.now_ms + duration_ms;
        self.world.run_until(until_ms);
    }

    /// Every answer `caller` got so far.
    pub fn answers(&self, caller: u64) -> &[flashstock_engine::coordination::ClientAnswer] {
        self.world.answers.get(&caller).map_or(&[], Vec::as_slice)
    }

    /// Sends `request`, runs for a second, and returns its (only) answer.
    pub fn call(
        &mut self,
        request: flashstock_engine::coordination::ClientRequest,
    ) -> flashstock_engine::coordination::ClientAnswer {
        let caller = self.send(request);
        self.run_for(1_000);
        match self.answers(caller) {
            [answer] => answer.clone(),
            other => panic!("expected one answer, got {other:?}"),
        }
    }

    pub fn crash(&mut self, member: u32) {
        let mut rng = Rng::new(0);
        self.world.member(member).crash(&mut rng);
        let now_ms = self.world.now_ms;
        self.world.trace(format!("{now_ms} crash member {member}"));
    }

    pub fn restart(&mut self, member: u32) {
        self.world.restart(member);
    }

    /// Lets every message through again, runs past every TTL, and returns
    /// what the final checks found (nothing, in a correct cluster).
    pub fn finish(mut self) -> Vec<String> {
        self.world.interceptor = Some(Box::new(|_, _, _| Verdict::Deliver));
        self.deliver_held();
        for member in 1..=self.world.config.members {
            self.world.restart(member);
        }
        self.run_for(3_600_000 / 50);
        let mut violations = self.world.check_final();
        if !violations.is_empty() {
            violations.push(format!("trace tail: {:#?}", self.world.trace));
        }
        violations
    }
}
