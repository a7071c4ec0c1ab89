//! The event loop: one simulated clock, one queue of events, one seed.
//!
//! Faults run for the first part of a run (messages dropped, duplicated,
//! delayed and reordered; members cut off from everyone; members crashed,
//! losing what they had not synced, and restarted). Then the cluster heals,
//! every buyer finishes, every TTL passes, and the final checks run.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use flashstock_client::routing::{group_of_partition, preferred_leaders, replicas_of};
use flashstock_engine::coordination::{CoordinatorConfig, PartRequest, Placement};
use flashstock_engine::log::record::LogRecord;
use flashstock_engine::log::replay::{ReplayRules, ReplayedState};
use flashstock_engine::replication::{GroupConfig, GroupId, ReplicaConfig};
use flashstock_engine::{Limits, SkuId, SkuSettings, SkuState};

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
    /// Replication groups (each a raft group over `replication_factor`
    /// members) the partitions are spread over.
    pub group_count: u32,
    pub replication_factor: usize,
    pub skus: usize,
    pub buyers: u32,
    pub orders_per_buyer: u32,
    /// Clients that read SKU counts (linearizable reads) all through the
    /// faults.
    pub readers: u32,
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
            group_count: 6,
            // A third of the seeds run single copies (a group of one
            // replica: today's cluster); the rest replicate on three.
            replication_factor: if seed.is_multiple_of(3) { 1 } else { 3 },
            skus: 6,
            buyers: 8,
            orders_per_buyer: 30,
            readers: 2,
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
    Deliver {
        from: Endpoint,
        to: Endpoint,
        message: Message,
    },
    Tick {
        member: u32,
        incarnation: u64,
    },
    Sync {
        member: u32,
        incarnation: u64,
    },
    Fault,
    Restart {
        member: u32,
    },
    Heal {
        member: u32,
    },
    Campaign {
        member: u32,
        group: GroupId,
    },
    /// A client's resend after a redirection (same caller, same request).
    Resend {
        buyer: u32,
        caller: u64,
        request: flashstock_engine::coordination::ClientRequest,
    },
    BuyerWake {
        buyer: u32,
    },
    ReaderWake {
        reader: u32,
    },
    Resume {
        member: u32,
    },
    BuyerSend {
        buyer: u32,
        caller: u64,
        request: flashstock_engine::coordination::ClientRequest,
    },
    /// A snapshot imaged earlier, encoded "on another thread", arrives
    /// (lost if the member restarted meanwhile, as the node's would be).
    SnapshotEncoded {
        member: u32,
        incarnation: u64,
        group: GroupId,
        encoded: flashstock_engine::replication::EncodedSnapshot,
    },
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
    /// Which member gave each of those answers.
    answered_by: BTreeMap<u64, Vec<u32>>,
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
    /// Each group's replicas, preferred leader first.
    replicas: BTreeMap<GroupId, Vec<u32>>,
    /// Where each buyer sends each group's requests (its client's routing).
    routes: BTreeMap<(u32, GroupId), u32>,
    /// Each reader's read under way: its caller, SKU, when it was first
    /// sent, and when the reader gives up on it.
    reading: BTreeMap<u32, (u64, SkuId, u64, u64)>,
    readers_rng: Rng,
    next_read_caller: u64,
    /// Redirections followed per caller (bounded, like a client's).
    redirects: BTreeMap<u64, u32>,
    /// The leader seen for each group and term: never two.
    leaders_seen: BTreeMap<(GroupId, u64), u32>,
    /// Members cut off from everyone else.
    isolated: BTreeSet<u32>,
    /// Members cut off from the other members, still reached by buyers: a
    /// leader on the wrong side of a partition that clients still talk to.
    cut_from_members: BTreeSet<u32>,
    /// Each member's clock error: it jumps now and then, either way; a
    /// leader stamps records with its own clock, followers apply the stamp.
    clock_skew_ms: Vec<i64>,
    /// Members stopped (SIGSTOP) until a time: no ticks, no syncs, their
    /// messages wait; they resume believing what they believed.
    paused: BTreeMap<u32, u64>,
    /// Disks lost so far (at most one a run, and never with one copy).
    wipes: u32,
    history: History,
    /// Members with a sync scheduled (a group commit under way).
    syncing: BTreeSet<u32>,
    requests: u64,
    event_count: u64,
    trace_hash: u64,
    trace: VecDeque<String>,
}

const TICK_MS: u64 = 10;
/// Readers are endpoints numbered from here (buyers from 0).
const READER_BASE: u32 = 1_000;
/// The end of a run that has not settled by then is a liveness failure.
const RUN_MS_MAX: u64 = 300_000;
/// How far a member's clock may drift from real time, either way.
const CLOCK_SKEW_MS_MAX: i64 = 5_000;
/// The coordinators' idempotency window in odd seeds (see `World::new`).
const COORDINATOR_WINDOW_MS_ODD_SEEDS: u64 = 20_000;

impl World {
    fn new(config: SimConfig) -> Self {
        let mut root = Rng::new(config.seed);
        // The SKUs remember every ended hold for the whole run (the final
        // checks read them); the coordinators of odd seeds forget settled
        // orders after 20 s, so that forgetting, and restarts after it, run.
        let limits = Limits { idempotency_window_ms: 3_600_000, ..Limits::default() };
        let coordinator_limits = Limits {
            idempotency_window_ms: if config.seed % 2 == 1 {
                COORDINATOR_WINDOW_MS_ODD_SEEDS
            } else {
                limits.idempotency_window_ms
            },
            ..limits.clone()
        };
        let forgettable_after_ms =
            (config.seed % 2 == 1).then(|| COORDINATOR_WINDOW_MS_ODD_SEEDS - 2 * CLOCK_SKEW_MS_MAX as u64);
        let member_ids: Vec<u32> = (1..=config.members).collect();
        let group_of_partition_table: Vec<u32> =
            (0..config.partition_count).map(|partition| group_of_partition(partition, config.group_count)).collect();
        let placement = Placement::new(group_of_partition_table);
        let preferred = preferred_leaders(config.group_count, &member_ids, config.replication_factor);
        let replicas: BTreeMap<GroupId, Vec<u32>> = (1..=config.group_count)
            .map(|group| {
                let mut chosen = replicas_of(group, &member_ids, config.replication_factor);
                let leader = preferred[group as usize - 1];
                chosen.retain(|&member| member != leader);
                chosen.insert(0, leader);
                (group, chosen)
            })
            .collect();
        let rules = ReplayRules { partition_count: config.partition_count, limits_unrecorded: limits.clone() };
        let mut initial: BTreeMap<GroupId, ReplayedState> = (1..=config.group_count)
            .map(|group| {
                let mut state = ReplayedState::empty(rules.clone());
                state.apply(1, LogRecord::RulesInForce { limits: limits.clone() }).expect("an empty state");
                (group, state)
            })
            .collect();
        let mut setup = root.fork();
        let catalogue: Vec<SkuId> =
            (0..config.skus).map(|index| SkuId::new(format!("sku-{index}")).expect("valid")).collect();
        for sku in &catalogue {
            let group = placement.owner_of_sku(sku);
            let settings = SkuSettings { initial_units: setup.between(20, 120), ..SkuSettings::default() };
            let state = initial.get_mut(&group).expect("every group");
            let sequence = state.last_sequence + 1;
            state
                .apply(sequence, LogRecord::CreateSku { sku: sku.clone(), settings, now_ms: 0, operation: None })
                .expect("a new SKU");
        }
        let election_seed = root.next_u64();
        let members: Vec<Member> = member_ids
            .iter()
            .map(|&own| {
                let mut configs = BTreeMap::new();
                let mut own_initial = BTreeMap::new();
                for (&group, voters) in &replicas {
                    if !voters.contains(&own) {
                        continue;
                    }
                    let coordinator = CoordinatorConfig {
                        own: group,
                        placement: placement.clone(),
                        limits: coordinator_limits.clone(),
                        orders_max: 10_000,
                        part_answer_ms_max: 1_000,
                        resend_pause_ms_min: 20,
                        resend_pause_ms_max: 500,
                    };
                    let mut voter_ids: Vec<u64> = voters.iter().map(|&member| u64::from(member)).collect();
                    voter_ids.sort_unstable();
                    let mut replica = ReplicaConfig::new(group, u64::from(own), voter_ids, election_seed);
                    replica.preferred_leader = Some(voters[0]);
                    configs.insert(
                        group,
                        GroupConfig { replica, coordinator, rules: rules.clone(), limits_in_force: None },
                    );
                    own_initial.insert(group, initial[&group].clone());
                }
                Member::new(own, placement.clone(), replicas.clone(), configs, own_initial)
            })
            .collect();
        let buyers = (0..config.buyers).map(|index| Buyer::new(index, root.fork(), config.orders_per_buyer)).collect();
        let network = root.fork();
        let faults = root.fork();
        let readers_rng = root.fork();
        let member_count = config.members as usize;
        let mut world = Self {
            interceptor: None,
            held: Vec::new(),
            answers: BTreeMap::new(),
            answered_by: BTreeMap::new(),
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
            replicas,
            routes: BTreeMap::new(),
            redirects: BTreeMap::new(),
            reading: BTreeMap::new(),
            readers_rng,
            next_read_caller: 0,
            leaders_seen: BTreeMap::new(),
            isolated: BTreeSet::new(),
            cut_from_members: BTreeSet::new(),
            clock_skew_ms: vec![0; member_count],
            paused: BTreeMap::new(),
            wipes: 0,
            history: History::forgetting_after(forgettable_after_ms),
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
        for reader in 0..world.config.readers {
            world.schedule(100, Event::ReaderWake { reader });
        }
        // Each group's preferred leader stands first; later elections are
        // raft's own.
        let firsts: Vec<(GroupId, u32)> =
            world.replicas.iter().map(|(&group, replicas)| (group, replicas[0])).collect();
        for (group, member) in firsts {
            world.schedule(0, Event::Campaign { member, group });
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

    /// What `member`'s clock reads now: the simulated time plus its skew.
    fn clock_of(&self, member: u32) -> u64 {
        self.now_ms.saturating_add_signed(self.clock_skew_ms[member as usize - 1])
    }

    fn member(&mut self, id: u32) -> &mut Member {
        &mut self.members[id as usize - 1]
    }

    fn cut_off(&self, from: Endpoint, to: Endpoint) -> bool {
        let isolated = |endpoint: Endpoint| matches!(endpoint, Endpoint::Member(id) if self.isolated.contains(&id));
        let cut = |endpoint: Endpoint| matches!(endpoint, Endpoint::Member(id) if self.cut_from_members.contains(&id));
        let between_members = matches!((from, to), (Endpoint::Member(_), Endpoint::Member(_)));
        from != to && (isolated(from) || isolated(to) || (between_members && (cut(from) || cut(to))))
    }

    /// Puts `message` on the network: maybe lost, maybe twice, maybe late.
    fn send(&mut self, from: Endpoint, to: Endpoint, message: Message) {
        if let (Endpoint::Buyer(_), Endpoint::Member(member)) = (from, to) {
            if !self.members[member as usize - 1].up {
                // Nothing listens there: the client's connection fails at
                // once, and it tries the next replica.
                let caller = match &message {
                    Message::Request { caller, .. } | Message::Read { caller, .. } => Some(*caller),
                    _ => None,
                };
                if let Some(caller) = caller {
                    let group = match &message {
                        Message::Read { sku, .. } => self.placement.owner_of_sku(sku),
                        Message::Request { request, .. } => self.placement.home_of_order(request.order()),
                        _ => unreachable!("matched above"),
                    };
                    let at_ms = self.now_ms + 5;
                    let refusal = Message::NotLeader { caller, group, leader: None };
                    self.schedule(at_ms, Event::Deliver { from: to, to: from, message: refusal });
                    return;
                }
            }
        }
        if let (Endpoint::Member(_), Message::Part { message: part, .. }) = (from, &message) {
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
        if let Endpoint::Member(member) = from {
            self.observe_leaders(member);
        }
        for (to, message) in outbox {
            self.send(from, to, message);
        }
    }

    /// Election safety: one leader per group and term, whoever observes.
    fn observe_leaders(&mut self, member: u32) {
        let state = &self.members[member as usize - 1];
        if !state.up {
            return;
        }
        for (group, leadership) in state.leading() {
            let first = *self.leaders_seen.entry((group, leadership.term)).or_insert(member);
            if first != member {
                let now_ms = self.now_ms;
                self.history.violations.push(format!(
                    "{now_ms} ms: group {group} has two leaders in term {}: members {first} and {member}",
                    leadership.term
                ));
            }
        }
    }

    /// Where `buyer`'s client sends requests for `group`.
    fn route(&mut self, buyer: u32, group: GroupId) -> u32 {
        let preferred = self.replicas[&group][0];
        *self.routes.entry((buyer, group)).or_insert(preferred)
    }

    /// Updates `buyer`'s route for `group` after a refusal: the hint, or
    /// the next replica; returns the new route.
    fn follow_hint(&mut self, buyer: u32, group: GroupId, leader: Option<u32>) -> u32 {
        *self.history.tally.entry("not leader").or_default() += 1;
        let replicas = self.replicas[&group].clone();
        let current = self.route(buyer, group);
        let next = match leader {
            Some(leader) if leader != current => leader,
            _ => {
                let at = replicas.iter().position(|&member| member == current).unwrap_or(0);
                replicas[(at + 1) % replicas.len()]
            }
        };
        self.routes.insert((buyer, group), next);
        next
    }

    /// A member that does not lead `group` refused `caller`: the client
    /// follows the hint (or tries the next replica) and sends again, a
    /// bounded number of times; then the buyer's own timeout retries.
    fn redirected(&mut self, buyer: u32, caller: u64, group: GroupId, leader: Option<u32>) {
        let next = self.follow_hint(buyer, group, leader);
        let redirects = self.redirects.entry(caller).or_default();
        *redirects += 1;
        if *redirects > 8 {
            return;
        }
        let Some(request) = self.history.request(caller).cloned() else { return };
        let pause_ms = if leader.is_some() { self.network.between(1, 5) } else { self.network.between(20, 100) };
        let at_ms = self.now_ms + pause_ms;
        self.trace(format!("{} buyer {buyer} redirected to {next} for group {group}", self.now_ms));
        self.schedule(at_ms, Event::Resend { buyer, caller, request });
    }

    /// A reader's next move: a new read now and then, or a retry of one
    /// unanswered for too long.
    fn reader_wake(&mut self, reader: u32) {
        let now_ms = self.now_ms;
        if let Some((_, _, _, give_up_ms)) = self.reading.get(&reader) {
            if now_ms < *give_up_ms {
                return;
            }
            self.reading.remove(&reader);
        }
        if now_ms > self.config.faults_until_ms + 5_000 {
            return;
        }
        self.next_read_caller += 1;
        let endpoint = READER_BASE + reader;
        let caller = (u64::from(endpoint) << 32) | self.next_read_caller;
        let sku = self.catalogue[self.readers_rng.below(self.catalogue.len())].clone();
        self.reading.insert(reader, (caller, sku.clone(), now_ms, now_ms + 1_000));
        self.schedule(now_ms + 1_000, Event::ReaderWake { reader });
        self.send_read(reader, caller, sku);
    }

    fn send_read(&mut self, reader: u32, caller: u64, sku: SkuId) {
        let group = self.placement.owner_of_sku(&sku);
        let endpoint = READER_BASE + reader;
        let to = self.route(endpoint, group);
        self.send(Endpoint::Buyer(endpoint), Endpoint::Member(to), Message::Read { caller, sku });
    }

    fn read_answered(
        &mut self,
        reader: u32,
        caller: u64,
        answer: Result<flashstock_engine::StockSnapshot, flashstock_engine::OrderError>,
    ) {
        let Some((current, sku, asked_ms, _)) = self.reading.get(&reader).cloned() else { return };
        if current != caller {
            return;
        }
        // Busy or unavailable: the reader tries again when it gives up.
        if let Ok(counts) = answer {
            let now_ms = self.now_ms;
            self.history.read_answered(asked_ms, now_ms, &sku, counts);
            self.reading.remove(&reader);
            let next_ms = now_ms + self.readers_rng.between(20, 300);
            self.schedule(next_ms, Event::ReaderWake { reader });
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
        // Now and then a slow disk: a sync that takes far longer.
        let slow = self.faulty() && self.network.chance(30);
        let at_ms = self.now_ms + if slow { self.network.between(20, 300) } else { self.network.between(1, 4) };
        self.schedule(at_ms, Event::Sync { member, incarnation });
    }

    fn fault(&mut self) {
        let mut member = 1 + u32::try_from(self.faults.below(self.config.members as usize)).expect("small");
        if self.faults.chance(500) {
            // Half the faults strike a leader: that is where answers wait.
            let leaders: Vec<u32> = self
                .members
                .iter()
                .filter(|state| state.up && !state.leading().is_empty())
                .map(|state| state.id)
                .collect();
            if !leaders.is_empty() {
                member = leaders[self.faults.below(leaders.len())];
            }
        }
        match self.faults.below(14) {
            0..=3 if self.members[member as usize - 1].up => {
                let mut rng = self.faults.fork();
                self.member(member).crash(&mut rng);
                self.paused.remove(&member);
                *self.history.tally.entry("crashes").or_default() += 1;
                let back_ms = self.now_ms + self.faults.between(50, 3_000);
                self.trace(format!("{} crash member {member}", self.now_ms));
                self.schedule(back_ms, Event::Restart { member });
            }
            8 => {
                let group = 1 + u32::try_from(self.faults.below(self.config.group_count as usize)).expect("small");
                if self.members[member as usize - 1].up {
                    *self.history.tally.entry("compactions").or_default() += 1;
                    let now_ms = self.now_ms;
                    self.trace(format!("{now_ms} compact group {group} on member {member}"));
                    if self.faults.below(2) == 0 {
                        // The node's way: imaged now, encoded elsewhere,
                        // taken once it comes back, the group going on.
                        if let Some(image) = self.member(member).snapshot_image(group) {
                            let encoded = image.encode();
                            let incarnation = self.members[member as usize - 1].incarnation;
                            let at_ms = now_ms + self.faults.between(1, 400);
                            self.schedule(at_ms, Event::SnapshotEncoded { member, incarnation, group, encoded });
                        }
                    } else {
                        let clock_ms = self.clock_of(member);
                        let outbox = self.member(member).compact(clock_ms, group);
                        self.send_all(Endpoint::Member(member), outbox);
                        self.sync_soon(member);
                    }
                }
            }
            11 if self.wipes == 0
                && self.config.replication_factor >= 3
                && self.faults.chance(200)
                && self.members.iter().all(|state| state.up && !state.rejoining())
                && self.paused.is_empty() =>
            {
                // A disk lost, once a run, with every other member up: the
                // member starts empty and must get everything back from
                // the others.
                self.wipes += 1;
                let mut rng = self.faults.fork();
                self.member(member).wipe(&mut rng);
                *self.history.tally.entry("disks lost").or_default() += 1;
                let back_ms = self.now_ms + self.faults.between(50, 3_000);
                self.trace(format!("{} member {member} loses its disk", self.now_ms));
                self.schedule(back_ms, Event::Restart { member });
            }
            10 if !self.paused.contains_key(&member) && self.members[member as usize - 1].up => {
                // Longer than an election timeout; half the time cut off
                // from the other members as well, so that on resuming it
                // hears nothing of the new leader and still believes it leads.
                let resume_ms = self.now_ms + self.faults.between(200, 2_000);
                self.paused.insert(member, resume_ms);
                if self.faults.chance(500) && self.cut_from_members.insert(member) {
                    let heal_ms = resume_ms + self.faults.between(50, 500);
                    self.schedule(heal_ms, Event::Heal { member });
                }
                *self.history.tally.entry("pauses").or_default() += 1;
                self.trace(format!("{} pause member {member} until {resume_ms}", self.now_ms));
                self.schedule(resume_ms, Event::Resume { member });
            }
            9 => {
                let jump_ms = i64::try_from(self.faults.between(0, 4_000)).expect("small") - 2_000;
                let skew = &mut self.clock_skew_ms[member as usize - 1];
                *skew = (*skew + jump_ms).clamp(-CLOCK_SKEW_MS_MAX, CLOCK_SKEW_MS_MAX);
                *self.history.tally.entry("clock jumps").or_default() += 1;
                let (now_ms, skew) = (self.now_ms, *skew);
                self.trace(format!("{now_ms} member {member}'s clock jumps by {jump_ms} ms to skew {skew} ms"));
            }
            6 | 7 if !self.cut_from_members.contains(&member) => {
                self.cut_from_members.insert(member);
                *self.history.tally.entry("cut from members").or_default() += 1;
                let heal_ms = self.now_ms + self.faults.between(100, 3_000);
                self.trace(format!("{} cut member {member} from the other members", self.now_ms));
                self.schedule(heal_ms, Event::Heal { member });
            }
            4 | 5 if !self.isolated.contains(&member) => {
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
        let clock_ms = self.clock_of(member);
        match self.member(member).restart(clock_ms) {
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
                    if let Some(&resume_ms) = self.paused.get(&id) {
                        // A paused process reads its socket when it resumes.
                        self.schedule(resume_ms, Event::Deliver { from, to, message });
                        return;
                    }
                    self.trace(format!("{now_ms} {from:?}->{to:?} {message:?}"));
                    let clock_ms = self.clock_of(id);
                    let outbox = self.member(id).receive(clock_ms, from, message);
                    self.send_all(to, outbox);
                    self.sync_soon(id);
                }
                Endpoint::Buyer(buyer) if buyer >= READER_BASE => match message {
                    Message::ReadAnswer { caller, answer } => {
                        self.trace(format!("{now_ms} {from:?}->{to:?} {caller} {answer:?}"));
                        self.read_answered(buyer - READER_BASE, caller, answer);
                    }
                    Message::NotLeader { caller, group, leader } => {
                        self.follow_hint(buyer, group, leader);
                        let reader = buyer - READER_BASE;
                        if let Some((current, sku, _, _)) = self.reading.get(&reader).cloned() {
                            if current == caller {
                                self.send_read(reader, caller, sku);
                            }
                        }
                    }
                    other => unreachable!("readers get read answers, not {other:?}"),
                },
                Endpoint::Buyer(buyer) => {
                    if let Message::NotLeader { caller, group, leader } = message {
                        self.redirected(buyer, caller, group, leader);
                        return;
                    }
                    let Message::Answer { caller, answer } = message else { unreachable!("buyers get answers") };
                    self.trace(format!("{now_ms} {from:?}->{to:?} {caller} {answer:?}"));
                    self.history.answered(now_ms, caller, &answer);
                    if self.interceptor.is_some() {
                        self.answers.entry(caller).or_default().push(answer.clone());
                        if let Endpoint::Member(member) = from {
                            self.answered_by.entry(caller).or_default().push(member);
                        }
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
                if let Some(&resume_ms) = self.paused.get(&member) {
                    self.schedule(resume_ms, Event::Tick { member, incarnation });
                    return;
                }
                let clock_ms = self.clock_of(member);
                let outbox = self.member(member).tick(clock_ms);
                self.send_all(Endpoint::Member(member), outbox);
                self.sync_soon(member);
                self.schedule(now_ms + TICK_MS, Event::Tick { member, incarnation });
            }
            Event::Sync { member, incarnation } => {
                let state = &self.members[member as usize - 1];
                if !state.up || state.incarnation != incarnation {
                    return;
                }
                if let Some(&resume_ms) = self.paused.get(&member) {
                    self.schedule(resume_ms, Event::Sync { member, incarnation });
                    return;
                }
                self.syncing.remove(&member);
                let clock_ms = self.clock_of(member);
                let outbox = self.member(member).sync(clock_ms);
                self.send_all(Endpoint::Member(member), outbox);
                self.sync_soon(member);
            }
            Event::Fault => self.fault(),
            Event::Resend { buyer, caller, request } => {
                let group = self.placement.home_of_order(request.order());
                let to = self.route(buyer, group);
                self.send(Endpoint::Buyer(buyer), Endpoint::Member(to), Message::Request { caller, request });
            }
            Event::Campaign { member, group } => {
                if self.members[member as usize - 1].up {
                    let clock_ms = self.clock_of(member);
                    let outbox = self.member(member).campaign(clock_ms, group);
                    self.send_all(Endpoint::Member(member), outbox);
                    self.sync_soon(member);
                }
            }
            Event::Restart { member } => self.restart(member),
            Event::SnapshotEncoded { member, incarnation, group, encoded } => {
                let state = &self.members[member as usize - 1];
                if !state.up || state.incarnation != incarnation {
                    return;
                }
                if let Some(&resume_ms) = self.paused.get(&member) {
                    self.schedule(resume_ms, Event::SnapshotEncoded { member, incarnation, group, encoded });
                    return;
                }
                self.trace(format!(
                    "{now_ms} encoded snapshot of group {group} at {} on member {member}",
                    encoded.index()
                ));
                let clock_ms = self.clock_of(member);
                let (outbox, taken) = self.member(member).snapshot_encoded(clock_ms, group, encoded);
                let tally = if taken { "snapshots encoded elsewhere" } else { "snapshots overtaken" };
                *self.history.tally.entry(tally).or_default() += 1;
                self.send_all(Endpoint::Member(member), outbox);
                self.sync_soon(member);
            }
            Event::Heal { member } => {
                let was_cut = self.cut_from_members.remove(&member);
                if self.isolated.remove(&member) || was_cut {
                    self.trace(format!("{now_ms} heal member {member}"));
                }
            }
            Event::ReaderWake { reader } => self.reader_wake(reader),
            Event::Resume { member } => {
                if self.paused.remove(&member).is_some() {
                    self.trace(format!("{now_ms} resume member {member}"));
                }
            }
            Event::BuyerWake { buyer } => {
                let catalogue = self.catalogue.clone();
                let state = &self.buyers[buyer as usize];
                if let (Some(deadline_ms), Some(caller)) = (state.deadline_ms(), state.current_caller()) {
                    // A request unanswered for long: its client tries
                    // another replica next time.
                    let group =
                        self.history.request(caller).map(|request| self.placement.home_of_order(request.order()));
                    if let (true, Some(group)) = (now_ms >= deadline_ms, group) {
                        self.follow_hint(buyer, group, None);
                    }
                }
                let state = &mut self.buyers[buyer as usize];
                let next = match state.deadline_ms() {
                    Some(_) => state.answered(now_ms, 0, None, &catalogue),
                    None => state.next(now_ms, &catalogue),
                };
                self.buyer_next(buyer, next);
            }
            Event::BuyerSend { buyer, caller, request } => {
                self.requests += 1;
                self.history.sent(now_ms, caller, &request);
                let group = self.placement.home_of_order(request.order());
                let to = self.route(buyer, group);
                self.trace(format!("{now_ms} buyer {buyer} sends {caller} to {to} (group {group}): {request:?}"));
                self.send(Endpoint::Buyer(buyer), Endpoint::Member(to), Message::Request { caller, request });
            }
        }
    }

    /// Each group's leader, if exactly one up member leads it in the
    /// highest term seen.
    fn leader_of(&self, group: GroupId) -> Option<&flashstock_engine::replication::GroupMachine> {
        let mut best: Option<(u64, &flashstock_engine::replication::GroupMachine)> = None;
        for member in self.members.iter().filter(|member| member.up) {
            if let Some(machine) = member.groups.get(&group) {
                let leadership = machine.leadership();
                if leadership.leading && best.is_none_or(|(term, _)| leadership.term > term) {
                    best = Some((leadership.term, machine));
                }
            }
        }
        best.map(|(_, machine)| machine)
    }

    fn settled(&self) -> bool {
        self.buyers.iter().all(Buyer::finished)
            && self.members.iter().all(|member| member.up)
            && (1..=self.config.group_count).all(|group| {
                self.leader_of(group).is_some_and(|leader| {
                    leader.coordinator().is_some_and(|coordinator| coordinator.order_counts().1 == 0)
                        && leader.applied().skus.values().all(|state| state.hold_count() == 0)
                        && self.replicas[&group].iter().all(|&member| {
                            self.members[member as usize - 1]
                                .groups
                                .get(&group)
                                .is_some_and(|replica| replica.applied_index() == leader.applied_index())
                        })
                })
            })
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

    /// The final checks (assumes a healed cluster, every TTL passed):
    /// every replica of a group agrees, and the agreed state against
    /// every answer.
    fn check_final(&mut self) -> Vec<String> {
        let mut skus = BTreeMap::new();
        let mut violations = Vec::new();
        for member in &self.members {
            for machine in member.groups.values() {
                for anomaly in machine.anomalies() {
                    violations.push(format!("member {}: {anomaly}", member.id));
                }
            }
        }
        for group in 1..=self.config.group_count {
            let Some(leader) = self.leader_of(group) else {
                violations.push(format!("group {group} has no leader at the end"));
                continue;
            };
            skus.extend(leader.applied().skus.iter().map(|(sku, state)| (sku.clone(), state.clone())));
            // Every replacement finished: one voter per replica member.
            let (voters, joint) = leader.replica().configuration();
            let mut members: Vec<u32> =
                voters.iter().map(|&voter| flashstock_engine::replication::member_of(voter)).collect();
            members.sort_unstable();
            let mut expected = self.replicas[&group].clone();
            expected.sort_unstable();
            if joint || members != expected {
                violations.push(format!("group {group}: configuration {voters:?} (joint {joint}) at the end"));
            }
            let agreed = leader.applied().snapshot().encode();
            for &member in &self.replicas[&group] {
                let Some(replica) = self.members[member as usize - 1].groups.get(&group) else { continue };
                if replica.applied_index() == leader.applied_index() && replica.applied().snapshot().encode() != agreed
                {
                    violations.push(format!(
                        "group {group}: member {member}'s state differs from its leader's at index {}",
                        leader.applied_index()
                    ));
                }
            }
            if let Some(coordinator) = leader.coordinator() {
                for anomaly in coordinator.anomalies() {
                    violations.push(format!("group {group}: {anomaly}"));
                }
                let (_, open) = coordinator.order_counts();
                if open > 0 {
                    let orders = coordinator.open_orders();
                    violations.push(format!("group {group}: orders still open: {orders:?}"));
                }
            }
        }
        self.history.violations.extend(violations);
        self.history.check_final(&skus);
        std::mem::take(&mut self.history.violations)
    }

    /// What each group still waits for, for a run that did not settle.
    fn open_orders(&self) -> Vec<String> {
        (1..=self.config.group_count)
            .map(|group| match self.leader_of(group) {
                Some(leader) => {
                    let open = leader.coordinator().map(|coordinator| coordinator.open_orders());
                    let held: usize = leader.applied().skus.values().map(SkuState::hold_count).sum();
                    let applied: Vec<(u32, Option<u64>)> = self.replicas[&group]
                        .iter()
                        .map(|&member| {
                            let replica = self.members[member as usize - 1].groups.get(&group);
                            (member, replica.map(flashstock_engine::replication::GroupMachine::applied_index))
                        })
                        .collect();
                    format!("group {group}: orders open {open:?}, holds {held}, applied per replica {applied:?}")
                }
                None => format!("group {group}: no leader"),
            })
            .collect()
    }

    fn run(mut self) -> RunReport {
        let mut quiet_since = None;
        while let Some(((at_ms, _), event)) = self.events.pop_first() {
            self.now_ms = at_ms;
            if self.now_ms > RUN_MS_MAX {
                break;
            }
            // A panic in the engine is a finding like any other: it is
            // reported with the trace that led to it.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step(event)));
            if let Err(panic) = stepped {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                    .unwrap_or_default();
                let violation = format!("{} ms: panicked: {message}", self.now_ms);
                return self.report(vec![violation]);
            }
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
            let open = self.open_orders();
            let unfinished = self.buyers.iter().filter(|buyer| !buyer.finished()).count();
            self.history.violations.push(format!(
                "did not settle by {} ms: {unfinished} buyers unfinished; open orders {open:?}",
                self.now_ms
            ));
        }
        let forgotten: u64 = (1..=self.config.group_count)
            .filter_map(|group| self.leader_of(group).and_then(|leader| leader.coordinator()))
            .map(|coordinator| coordinator.forgotten())
            .sum();
        *self.history.tally.entry("forgotten").or_default() += forgotten;
        *self.history.tally.entry("leaders elected").or_default() += self.leaders_seen.len() as u64;
        let preferred_leading = self
            .replicas
            .iter()
            .filter(|(&group, replicas)| {
                self.leader_of(group).is_some_and(|leader| leader.replica().member() == u64::from(replicas[0]))
            })
            .count();
        *self.history.tally.entry("groups led by their preferred leader at the end").or_default() +=
            preferred_leading as u64;
        let violations = self.check_final();
        self.report(violations)
    }

    fn report(mut self, violations: Vec<String>) -> RunReport {
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

/// Times a scripted call asks again after `Busy`.
const SCRIPTED_BUSY_ASKS_MAX: u32 = 20;

impl Scripted {
    /// A cluster of `members` with `skus` SKUs of `units` each (`sku-0`,
    /// `sku-1`, ...); which member owns which is [`Self::owner_of`].
    pub fn new(members: u32, skus: usize) -> Self {
        Self::replicated(members, skus, 1)
    }

    /// A cluster whose groups each have `replication_factor` replicas; each
    /// group's preferred leader is elected before this returns.
    pub fn replicated(members: u32, skus: usize, replication_factor: usize) -> Self {
        let config = SimConfig {
            buyers: 0,
            faults: false,
            members,
            skus,
            replication_factor,
            readers: 0,
            trace_lines_kept: 2_000,
            ..SimConfig::new(0)
        };
        let mut world = World::new(config);
        world.interceptor = Some(Box::new(|_, _, _| Verdict::Deliver));
        world.run_until(500);
        Self { world, next_caller: 0 }
    }

    /// The member leading the group of `sku` (with one replica: its only one).
    pub fn owner_of(&self, sku: &str) -> u32 {
        let group = self.world.placement.owner_of_sku(&SkuId::new(sku).expect("valid"));
        self.leader_member(group)
    }

    /// The member leading the home group of `order`.
    pub fn home_of(&self, order: &str) -> u32 {
        let group = self.world.placement.home_of_order(&flashstock_engine::OrderId::new(order).expect("valid"));
        self.leader_member(group)
    }

    fn leader_member(&self, group: GroupId) -> u32 {
        self.world
            .members
            .iter()
            .filter(|member| member.up)
            .find(|member| member.leading().iter().any(|(led, _)| *led == group))
            .map_or(self.world.replicas[&group][0], |member| member.id)
    }

    /// The SKU's counts in its group's agreed (committed) state.
    pub fn stock(&self, sku: &str) -> flashstock_engine::StockSnapshot {
        let sku = SkuId::new(sku).expect("valid");
        let group = self.world.placement.owner_of_sku(&sku);
        let leader = self.world.leader_of(group).expect("a group with a leader");
        leader.applied().skus[&sku].stock()
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
        let now_ms = self.world.now_ms;
        self.world.history.sent(now_ms, caller, &request);
        let group = self.world.placement.home_of_order(request.order());
        let to = self.world.route(0, group);
        self.world.send(Endpoint::Buyer(0), Endpoint::Member(to), Message::Request { caller, request });
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
        // `Busy` (a leader elected but not yet taken over, a hand-over)
        // is asked again, as a client would, a bounded number of times.
        for _ in 0..SCRIPTED_BUSY_ASKS_MAX {
            let caller = self.send(request.clone());
            self.run_for(1_000);
            match self.answers(caller) {
                [flashstock_engine::coordination::ClientAnswer::Refused(flashstock_engine::OrderError::Busy {
                    ..
                })] => continue,
                [answer] => return answer.clone(),
                other => {
                    let trace: Vec<&String> =
                        self.world.trace.iter().filter(|line| !line.contains("MsgHeartbeat")).collect();
                    panic!("expected one answer, got {other:?}; trace tail: {trace:#?}")
                }
            }
        }
        panic!("Busy {SCRIPTED_BUSY_ASKS_MAX} times in a row")
    }

    /// The members that gave `caller`'s answers, in order.
    pub fn answered_by(&self, caller: u64) -> &[u32] {
        self.world.answered_by.get(&caller).map_or(&[], Vec::as_slice)
    }

    /// The member leading the group of `order`'s home, if one leads.
    pub fn leader_of_home(&self, order: &str) -> Option<u32> {
        let group = self.world.placement.home_of_order(&flashstock_engine::OrderId::new(order).expect("valid"));
        self.world
            .members
            .iter()
            .filter(|member| member.up)
            .find(|member| member.leading().iter().any(|(led, _)| *led == group))
            .map(|member| member.id)
    }

    /// Sends the client's next requests for `order` to `member` (as a
    /// client with a stale map would).
    pub fn route_to(&mut self, order: &str, member: u32) {
        let group = self.world.placement.home_of_order(&flashstock_engine::OrderId::new(order).expect("valid"));
        self.world.routes.insert((0, group), member);
    }

    /// Cuts `member` off from the other members; buyers still reach it.
    pub fn cut_from_members(&mut self, member: u32) {
        self.world.cut_from_members.insert(member);
    }

    /// Stops `member` (as SIGSTOP would) for `duration_ms`.
    pub fn pause(&mut self, member: u32, duration_ms: u64) {
        let resume_ms = self.world.now_ms + duration_ms;
        self.world.paused.insert(member, resume_ms);
        self.world.schedule(resume_ms, Event::Resume { member });
    }

    /// Ends every cut.
    pub fn heal(&mut self) {
        self.world.cut_from_members.clear();
        self.world.isolated.clear();
    }

    /// Kills `member` and deletes its data directory.
    pub fn wipe(&mut self, member: u32) {
        let mut rng = Rng::new(0);
        self.world.member(member).wipe(&mut rng);
        let now_ms = self.world.now_ms;
        self.world.trace(format!("{now_ms} member {member} loses its disk"));
    }

    /// Whether `member` still waits to be counted again in some group
    /// after losing its disk.
    pub fn rejoining(&self, member: u32) -> bool {
        self.world.members[member as usize - 1].rejoining()
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
