//! One simulated member: a replica of each group it is chosen for — the
//! engine's real raft replica, state machine, participant and coordinator
//! ([`GroupMachine`]) — over one log for all of them whose unsynced tail a
//! crash loses.
//!
//! Raft entries carry the engine's real encoded records and are applied
//! through the engine's real replay; the log itself holds the replicas'
//! writes as values (their encoding belongs to the node's log).

use std::collections::BTreeMap;

use flashstock_engine::coordination::{ClientAnswer, ClientRequest, MemberId, PartMessage, PartReply, Placement};
use flashstock_engine::log::replay::ReplayedState;
use flashstock_engine::replication::{
    member_of, replica_id, EncodedSnapshot, GroupConfig, GroupId, GroupMachine, GroupOutput, Leadership, ReplicaId,
    ReplicaWrite, SnapshotImage,
};

use flashstock_engine::{OrderError, SkuId, StockSnapshot};

use crate::rng::Rng;

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Endpoint {
    Member(MemberId),
    Buyer(u32),
}

/// What travels between members and buyers.
#[derive(Debug, Clone)]
pub enum Message {
    /// A linearizable read of a SKU's counts, and its answer.
    Read {
        caller: u64,
        sku: SkuId,
    },
    ReadAnswer {
        caller: u64,
        answer: Result<StockSnapshot, OrderError>,
    },
    Request {
        caller: u64,
        request: ClientRequest,
    },
    Answer {
        caller: u64,
        answer: ClientAnswer,
    },
    /// The member asked does not lead the order's home group.
    NotLeader {
        caller: u64,
        group: GroupId,
        leader: Option<MemberId>,
    },
    /// A coordinator's step for the part of an order in `group`.
    Part {
        group: GroupId,
        message: PartMessage,
    },
    /// The part in `group` answered.
    PartReply {
        group: GroupId,
        reply: PartReply,
    },
    /// The member asked does not lead `group`, where a part was sent.
    PartNotLeader {
        group: GroupId,
        leader: Option<MemberId>,
    },
    Raft {
        group: GroupId,
        message: raft::eraftpb::Message,
    },
    /// A member that lost its disk asks for its new replica to replace
    /// its old one in `group`.
    Replace {
        group: GroupId,
        member: MemberId,
        replica: ReplicaId,
    },
}

/// Callers of a group's participant are members; the flag keeps their ids
/// apart from buyers' callers.
const PART_CALLER: u64 = 1 << 63;

/// A member's durable state and what it is doing now.
#[derive(Debug)]
pub struct Member {
    pub id: MemberId,
    pub up: bool,
    /// Counts restarts, so that timers of an earlier life are ignored.
    pub incarnation: u64,
    placement: Placement,
    configs: BTreeMap<GroupId, GroupConfig>,
    initial: BTreeMap<GroupId, ReplayedState>,
    pub groups: BTreeMap<GroupId, GroupMachine>,
    /// Every replica's writes, in the order written.
    log: Vec<(GroupId, ReplicaWrite)>,
    synced: usize,
    /// Messages that may only leave once the log is synced up to a length.
    held_back: Vec<(usize, Endpoint, Message)>,
    /// Outputs whose writes end at a log length: reported persisted then.
    persist: Vec<(usize, GroupId, u64)>,
    /// Who leads each group, as far as this member knows.
    leaders: BTreeMap<GroupId, MemberId>,
    /// Replicas of every group (to try when no leader is known).
    pub replicas: BTreeMap<GroupId, Vec<MemberId>>,
    /// Changes when the member lost its disk: its replicas' raft ids.
    generation: u32,
    /// Groups whose configuration does not yet count this member's
    /// replica of the current generation, and ticks until it asks again.
    rejoining: BTreeMap<GroupId, u32>,
}

impl Member {
    pub fn new(
        id: MemberId,
        placement: Placement,
        replicas: BTreeMap<GroupId, Vec<MemberId>>,
        configs: BTreeMap<GroupId, GroupConfig>,
        initial: BTreeMap<GroupId, ReplayedState>,
    ) -> Self {
        let mut member = Self {
            id,
            up: false,
            incarnation: 0,
            placement,
            configs,
            initial,
            groups: BTreeMap::new(),
            log: Vec::new(),
            synced: 0,
            held_back: Vec::new(),
            persist: Vec::new(),
            leaders: BTreeMap::new(),
            replicas,
            generation: 0,
            rejoining: BTreeMap::new(),
        };
        member.start_groups().expect("a new member starts");
        member
    }

    fn start_groups(&mut self) -> Result<(), String> {
        self.groups.clear();
        let own = replica_id(self.id, self.generation);
        for (&group, config) in &mut self.configs {
            config.replica.member = own;
            let writes: Vec<ReplicaWrite> =
                self.log.iter().filter(|(of, _)| *of == group).map(|(_, write)| write.clone()).collect();
            let machine = GroupMachine::start(config.clone(), &self.initial[&group], &writes)
                .map_err(|error| format!("member {}: group {group}: {error}", self.id))?;
            self.groups.insert(group, machine);
        }
        self.up = true;
        Ok(())
    }

    /// The member this one would send a message for `group` to.
    fn route(&self, group: GroupId) -> MemberId {
        if let Some(machine) = self.groups.get(&group) {
            if let Some(leader) = machine.leadership().leader {
                return member_of(leader);
            }
        }
        if let Some(&leader) = self.leaders.get(&group) {
            return leader;
        }
        self.replicas[&group][0]
    }

    /// Carries out `group`'s outputs.
    fn drain(&mut self, now_ms: u64, group: GroupId, outbox: &mut Vec<(Endpoint, Message)>) {
        let Some(machine) = self.groups.get_mut(&group) else { return };
        for output in machine.take_outputs(now_ms) {
            match output {
                GroupOutput::Raft(message) => {
                    let to = member_of(message.to);
                    outbox.push((Endpoint::Member(to), Message::Raft { group, message }));
                }
                GroupOutput::RaftAfterWrites(message) => {
                    let to = member_of(message.to);
                    self.held_back.push((self.log.len(), Endpoint::Member(to), Message::Raft { group, message }));
                }
                GroupOutput::Write { number, writes } => {
                    self.log.extend(writes.into_iter().map(|write| (group, write)));
                    if let Some(number) = number {
                        self.persist.push((self.log.len(), group, number));
                    }
                }
                GroupOutput::Part { group: to_group, message } => {
                    let to = self.route(to_group);
                    outbox.push((Endpoint::Member(to), Message::Part { group: to_group, message }));
                }
                GroupOutput::Answer { caller, answer } => {
                    let buyer = u32::try_from(caller >> 32).expect("a buyer index");
                    outbox.push((Endpoint::Buyer(buyer), Message::Answer { caller, answer }));
                }
                GroupOutput::PartAnswer { caller, reply } => {
                    let to = u32::try_from(caller & !PART_CALLER).expect("a member id");
                    outbox.push((Endpoint::Member(to), Message::PartReply { group, reply }));
                }
                GroupOutput::Admin { .. } => unreachable!("the simulated members make no admin changes"),
                GroupOutput::Read { caller, answer, .. } => {
                    let buyer = u32::try_from(caller >> 32).expect("a reader index");
                    outbox.push((Endpoint::Buyer(buyer), Message::ReadAnswer { caller, answer }));
                }
                GroupOutput::NotLeader { caller, leader } => {
                    let leader = leader.map(member_of);
                    if caller & PART_CALLER != 0 {
                        let to = u32::try_from(caller & !PART_CALLER).expect("a member id");
                        outbox.push((Endpoint::Member(to), Message::PartNotLeader { group, leader }));
                    } else {
                        let buyer = u32::try_from(caller >> 32).expect("a buyer index");
                        outbox.push((Endpoint::Buyer(buyer), Message::NotLeader { caller, group, leader }));
                    }
                }
            }
        }
    }

    fn drain_all(&mut self, now_ms: u64, outbox: &mut Vec<(Endpoint, Message)>) {
        let groups: Vec<GroupId> = self.groups.keys().copied().collect();
        for group in groups {
            self.drain(now_ms, group, outbox);
        }
        self.release_durable(outbox);
    }

    /// Handles a message; returns what to send now.
    pub fn receive(&mut self, now_ms: u64, from: Endpoint, message: Message) -> Vec<(Endpoint, Message)> {
        let mut outbox = Vec::new();
        match message {
            Message::Request { caller, request } => {
                let group = self.placement.home_of_order(request.order());
                match self.groups.get_mut(&group) {
                    Some(machine) => machine.request(now_ms, caller, request),
                    None => {
                        let leader = self.leaders.get(&group).copied();
                        let Endpoint::Buyer(buyer) = from else { return outbox };
                        outbox.push((Endpoint::Buyer(buyer), Message::NotLeader { caller, group, leader }));
                    }
                }
            }
            Message::Part { group, message } => {
                let Endpoint::Member(sender) = from else { return outbox };
                match self.groups.get_mut(&group) {
                    Some(machine) => machine.part(now_ms, PART_CALLER | u64::from(sender), message),
                    None => {
                        let leader = self.leaders.get(&group).copied();
                        outbox.push((from, Message::PartNotLeader { group, leader }));
                    }
                }
            }
            Message::PartReply { group, reply } => {
                let home = self.placement.home_of_order(&reply.order);
                if let Some(machine) = self.groups.get_mut(&home) {
                    machine.part_answered(now_ms, group, reply);
                }
            }
            Message::PartNotLeader { group, leader } => self.learn_leader(group, leader),
            Message::Replace { group, member, replica } => {
                if let Some(machine) = self.groups.get_mut(&group) {
                    machine.replace(now_ms, member, replica);
                }
            }
            Message::Read { caller, sku } => {
                let group = self.placement.owner_of_sku(&sku);
                match self.groups.get_mut(&group) {
                    Some(machine) => machine.read(now_ms, caller, sku),
                    None => {
                        let leader = self.leaders.get(&group).copied();
                        outbox.push((from, Message::NotLeader { caller, group, leader }));
                    }
                }
            }
            Message::Raft { group, message } => {
                if let Some(machine) = self.groups.get_mut(&group) {
                    machine.raft(now_ms, message);
                }
            }
            Message::Answer { .. } | Message::NotLeader { .. } | Message::ReadAnswer { .. } => {
                unreachable!("members receive no client answers")
            }
        }
        self.drain_all(now_ms, &mut outbox);
        outbox
    }

    fn learn_leader(&mut self, group: GroupId, leader: Option<MemberId>) {
        match leader {
            Some(leader) => {
                self.leaders.insert(group, leader);
            }
            None => {
                // Try the next replica.
                let replicas = &self.replicas[&group];
                let current = self.leaders.get(&group).copied().unwrap_or(replicas[0]);
                let at = replicas.iter().position(|&member| member == current).unwrap_or(0);
                self.leaders.insert(group, replicas[(at + 1) % replicas.len()]);
            }
        }
    }

    /// One tick of every replica (elections, heartbeats, the leaders'
    /// coordinators and expiry).
    pub fn tick(&mut self, now_ms: u64) -> Vec<(Endpoint, Message)> {
        let mut outbox = Vec::new();
        for machine in self.groups.values_mut() {
            machine.tick(now_ms);
            if machine.wants_snapshot() {
                machine.compact(now_ms);
            }
        }
        // A member that lost its disk asks every other replica (the leader
        // acts) until the configuration counts its new replica.
        let replica = replica_id(self.id, self.generation);
        let groups = &self.groups;
        self.rejoining.retain(|group, _| !groups.get(group).is_some_and(|machine| machine.replica().is_voter()));
        for (&group, wait) in &mut self.rejoining {
            if *wait > 0 {
                *wait -= 1;
                continue;
            }
            *wait = 20;
            for &member in self.replicas[&group].iter().filter(|&&member| member != self.id) {
                outbox.push((Endpoint::Member(member), Message::Replace { group, member: self.id, replica }));
            }
        }
        self.drain_all(now_ms, &mut outbox);
        outbox
    }

    /// Runs `input` on `group`'s replica here (if any); returns what to send.
    fn with_group(
        &mut self,
        now_ms: u64,
        group: GroupId,
        input: impl FnOnce(&mut GroupMachine),
    ) -> Vec<(Endpoint, Message)> {
        let mut outbox = Vec::new();
        if let Some(machine) = self.groups.get_mut(&group) {
            input(machine);
        }
        self.drain_all(now_ms, &mut outbox);
        outbox
    }

    /// `group`'s replica here stands for election now.
    pub fn campaign(&mut self, now_ms: u64, group: GroupId) -> Vec<(Endpoint, Message)> {
        self.with_group(now_ms, group, |machine| machine.campaign(now_ms))
    }

    /// Every group this member leads, with its term.
    pub fn leading(&self) -> Vec<(GroupId, Leadership)> {
        self.groups
            .iter()
            .map(|(&group, machine)| (group, machine.leadership()))
            .filter(|(_, leadership)| leadership.leading)
            .collect()
    }

    fn release_durable(&mut self, outbox: &mut Vec<(Endpoint, Message)>) {
        let synced = self.synced;
        let (ready, waiting): (Vec<_>, Vec<_>) = self.held_back.drain(..).partition(|(needed, _, _)| *needed <= synced);
        self.held_back = waiting;
        outbox.extend(ready.into_iter().map(|(_, to, message)| (to, message)));
    }

    /// Whether an fsync would make anything durable or let anything out.
    pub fn needs_sync(&self) -> bool {
        self.log.len() > self.synced || !self.held_back.is_empty() || !self.persist.is_empty()
    }

    /// An fsync completed: everything appended so far is durable.
    pub fn sync(&mut self, now_ms: u64) -> Vec<(Endpoint, Message)> {
        let mut outbox = Vec::new();
        self.drain_all(now_ms, &mut outbox);
        self.synced = self.log.len();
        let mut persisted: BTreeMap<GroupId, u64> = BTreeMap::new();
        for (_, group, number) in self.persist.drain(..) {
            persisted.insert(group, number);
        }
        for (group, number) in persisted {
            if let Some(machine) = self.groups.get_mut(&group) {
                machine.persisted(now_ms, number);
            }
        }
        self.drain_all(now_ms, &mut outbox);
        outbox
    }

    /// Dies: what was not synced is lost, except a random prefix of it
    /// (written, not yet fsynced, and happened to reach the disk).
    pub fn crash(&mut self, rng: &mut Rng) {
        let unsynced = self.log.len() - self.synced;
        let kept = if unsynced > 0 && rng.chance(300) { rng.below(unsynced + 1) } else { 0 };
        self.log.truncate(self.synced + kept);
        self.synced = self.log.len();
        self.up = false;
        self.held_back.clear();
        self.persist.clear();
        self.groups.clear();
        self.leaders.clear();
    }

    /// Dies and loses its disk: it will start empty, under a new
    /// generation, and rejoin every group it replicates.
    pub fn wipe(&mut self, rng: &mut Rng) {
        self.crash(rng);
        self.log.clear();
        self.synced = 0;
        self.generation += 1;
        self.rejoining = self.configs.keys().map(|&group| (group, 0)).collect();
    }

    /// Whether the member is still rejoining after losing its disk.
    pub fn rejoining(&self) -> bool {
        !self.rejoining.is_empty()
    }

    /// Starts again from the log, at `now_ms`: every replica rebuilt from
    /// its writes (snapshots included) through the engine's real replay.
    pub fn restart(&mut self, now_ms: u64) -> Result<Vec<(Endpoint, Message)>, String> {
        self.start_groups()?;
        self.incarnation += 1;
        let mut outbox = Vec::new();
        for machine in self.groups.values_mut() {
            // The first round delivers the committed entries again.
            machine.tick(now_ms);
        }
        self.drain_all(now_ms, &mut outbox);
        Ok(outbox)
    }

    /// Takes a snapshot of `group`'s applied state and drops the entries
    /// it covers (a compaction).
    pub fn compact(&mut self, now_ms: u64, group: GroupId) -> Vec<(Endpoint, Message)> {
        self.with_group(now_ms, group, |machine| machine.compact(now_ms))
    }

    /// The first half of a compaction the node's way: `group`'s applied
    /// state imaged now, to be encoded and taken later
    /// ([`Self::snapshot_encoded`]), while the group goes on.
    pub fn snapshot_image(&mut self, group: GroupId) -> Option<SnapshotImage> {
        self.groups.get_mut(&group).and_then(GroupMachine::snapshot_image)
    }

    /// The second half: an image encoded meanwhile arrives; whether it was
    /// taken (not overtaken).
    pub fn snapshot_encoded(
        &mut self,
        now_ms: u64,
        group: GroupId,
        encoded: EncodedSnapshot,
    ) -> (Vec<(Endpoint, Message)>, bool) {
        let mut taken = false;
        let outbox = self.with_group(now_ms, group, |machine| taken = machine.snapshot_encoded(encoded));
        (outbox, taken)
    }
}
