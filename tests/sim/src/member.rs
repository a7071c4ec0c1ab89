//! One simulated member: the real SKU state machines, the real
//! participant and coordinator, and a log whose unsynced tail a crash loses.
//!
//! SKU records go through the engine's real record encoding and are read
//! back through the engine's real replay ([`ReplayedState`]); coordinator
//! records are kept as values (their encoding belongs to the node's driver).

use std::collections::BTreeMap;

use flashstock_engine::coordination::{
    apply_part, Action, ClientRequest, Coordinator, CoordinatorConfig, MemberId, PartMessage, PartReply,
};
use flashstock_engine::log::record::LogRecord;
use flashstock_engine::log::replay::{ReplayRules, ReplayedState};
use flashstock_engine::log::snapshot::Snapshot;
use flashstock_engine::sku::SkuCommand;
use flashstock_engine::{Limits, SkuId, SkuState};

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
    Request { caller: u64, request: ClientRequest },
    Answer { caller: u64, answer: flashstock_engine::coordination::ClientAnswer },
    Part(PartMessage),
    PartReply(PartReply),
}

/// An encoded engine record: SKU commands and coordinator facts alike go
/// through the engine's real record encoding.
#[derive(Debug, Clone)]
struct Stored(Vec<u8>);

/// A member's durable state and what it is doing now.
#[derive(Debug)]
pub struct Member {
    pub id: MemberId,
    pub up: bool,
    /// Counts restarts, so that timers of an earlier life are ignored.
    pub incarnation: u64,
    config: CoordinatorConfig,
    rules: ReplayRules,
    pub skus: BTreeMap<SkuId, SkuState>,
    pub coordinator: Coordinator,
    log: Vec<Stored>,
    synced: usize,
    /// Messages that may only leave once the log is synced up to a length.
    held_back: Vec<(usize, Endpoint, Message)>,
    /// Coordinator tokens and the log length that makes each durable.
    tokens: Vec<(u64, usize)>,
}

impl Member {
    pub fn new(id: MemberId, config: CoordinatorConfig, limits: &Limits, partition_count: u32) -> Self {
        let rules = ReplayRules { partition_count, limits_unrecorded: limits.clone() };
        let coordinator = Coordinator::recover(config.clone(), Vec::new(), 0).expect("nothing to contradict");
        let mut member = Self {
            id,
            up: true,
            incarnation: 0,
            config,
            rules,
            skus: BTreeMap::new(),
            coordinator,
            log: Vec::new(),
            synced: 0,
            held_back: Vec::new(),
            tokens: Vec::new(),
        };
        member.log.push(Stored(LogRecord::RulesInForce { limits: limits.clone() }.encode()));
        let first = member.sync(0);
        assert!(first.is_empty(), "a new member has nothing to say");
        member
    }

    /// Creates a SKU here (before the run starts; durable at once).
    pub fn create_sku(&mut self, sku: SkuId, settings: flashstock_engine::SkuSettings, limits: &Limits) {
        let state = SkuState::created(0, settings, limits.clone(), None).expect("valid settings");
        self.skus.insert(sku.clone(), state);
        self.log.push(Stored(LogRecord::CreateSku { sku, settings, now_ms: 0, operation: None }.encode()));
        self.synced = self.log.len();
    }

    fn append(&mut self, record: &LogRecord) {
        self.log.push(Stored(record.encode()));
    }

    /// Carries out the coordinator's actions; returns the messages to send now.
    fn drain(&mut self, outbox: &mut Vec<(Endpoint, Message)>) {
        for action in self.coordinator.take_actions() {
            match action {
                Action::Send { member, message } => outbox.push((Endpoint::Member(member), Message::Part(message))),
                Action::Log { token, record } => {
                    self.log.push(Stored(LogRecord::Coordinator(record).encode()));
                    self.tokens.push((token, self.log.len()));
                }
                Action::Reply { caller, answer } => {
                    let buyer = u32::try_from(caller >> 32).expect("a buyer index");
                    outbox.push((Endpoint::Buyer(buyer), Message::Answer { caller, answer }));
                }
            }
        }
    }

    /// Handles a message; returns what to send now.
    pub fn receive(&mut self, now_ms: u64, from: Endpoint, message: Message) -> Vec<(Endpoint, Message)> {
        let mut outbox = Vec::new();
        match message {
            Message::Request { caller, request } => self.coordinator.request(now_ms, caller, request),
            Message::Part(part) => {
                let (answer, records) = apply_part(&mut self.skus, now_ms, &part.attempt, &part.request);
                for record in &records {
                    self.append(record);
                }
                // Even a replay waits for the records of the state it reports.
                self.held_back.push((self.log.len(), from, Message::PartReply(part.reply(answer))));
                self.release_durable(&mut outbox);
            }
            Message::PartReply(reply) => {
                let Endpoint::Member(member) = from else { return outbox };
                self.coordinator.part_answered(now_ms, member, reply);
            }
            Message::Answer { .. } => unreachable!("members receive no client answers"),
        }
        self.drain(&mut outbox);
        outbox
    }

    /// Time passed: the coordinator's timers and the SKUs' expiry.
    pub fn tick(&mut self, now_ms: u64) -> Vec<(Endpoint, Message)> {
        let mut outbox = Vec::new();
        self.coordinator.tick(now_ms);
        let due: Vec<SkuId> = self
            .skus
            .iter()
            .filter(|(_, state)| state.next_expiry_ms().is_some_and(|at| at <= now_ms))
            .map(|(sku, _)| sku.clone())
            .collect();
        for sku in due {
            let (_, recorded) = self.skus.get_mut(&sku).expect("listed").apply_recording(now_ms, &SkuCommand::Expire);
            if let Some(command) = recorded {
                self.append(&LogRecord::Apply { sku, now_ms, command });
            }
        }
        self.drain(&mut outbox);
        outbox
    }

    fn release_durable(&mut self, outbox: &mut Vec<(Endpoint, Message)>) {
        let synced = self.synced;
        let (ready, waiting): (Vec<_>, Vec<_>) = self.held_back.drain(..).partition(|(needed, _, _)| *needed <= synced);
        self.held_back = waiting;
        outbox.extend(ready.into_iter().map(|(_, to, message)| (to, message)));
    }

    /// Whether an fsync would make anything durable or let anything out.
    pub fn needs_sync(&self) -> bool {
        self.log.len() > self.synced || !self.held_back.is_empty()
    }

    /// An fsync completed: everything appended so far is durable.
    pub fn sync(&mut self, now_ms: u64) -> Vec<(Endpoint, Message)> {
        let mut outbox = Vec::new();
        self.drain(&mut outbox);
        self.synced = self.log.len();
        self.release_durable(&mut outbox);
        let durable =
            self.tokens.iter().take_while(|(_, length)| *length <= self.synced).map(|(token, _)| *token).max();
        self.tokens.retain(|(_, length)| *length > self.synced);
        if let Some(token) = durable {
            self.coordinator.durable(now_ms, token);
        }
        self.drain(&mut outbox);
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
        self.tokens.clear();
        self.skus.clear();
    }

    /// Starts again from the log, at `now_ms`, through the engine's real
    /// replay; with `through_snapshot`, also through a snapshot of the
    /// replayed state (encoded and decoded), as after a compaction.
    pub fn restart(&mut self, now_ms: u64, through_snapshot: bool) -> Result<Vec<(Endpoint, Message)>, String> {
        let failed = |what: &str, error: String| format!("member {}: {what}: {error}", self.id);
        let mut state = ReplayedState::empty(self.rules.clone());
        for (sequence, Stored(bytes)) in (1..).zip(&self.log) {
            let record = LogRecord::decode(bytes).map_err(|error| failed("decode", error.to_string()))?;
            state.apply(sequence, record).map_err(|error| failed("replay", error))?;
        }
        if through_snapshot {
            let snapshot = Snapshot::decode(&state.snapshot().encode()).map_err(|error| failed("snapshot", error))?;
            state = ReplayedState::from_snapshot(self.rules.clone(), snapshot)
                .map_err(|error| failed("snapshot", error))?;
        }
        let coordinator_records = state.coordinator_records();
        self.skus = std::mem::take(&mut state.skus);
        self.coordinator = Coordinator::recover(self.config.clone(), coordinator_records, now_ms)
            .map_err(|error| failed("coordinator", error))?;
        self.up = true;
        self.incarnation += 1;
        let mut outbox = Vec::new();
        self.drain(&mut outbox);
        Ok(outbox)
    }
}
