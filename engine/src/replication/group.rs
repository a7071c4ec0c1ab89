//! A replicated group on one member: its raft replica, the state machine
//! every replica applies, and — while this replica leads — the speculative
//! state, the order coordinator and the expiry timers. Pure: inputs at a
//! `now_ms` in, [`GroupOutput`]s out; no IO, no clock.
//!
//! # Execute, replicate, then answer
//!
//! The leader decides each command on its *speculative* state (the
//! applied state plus every entry in its log not yet committed, plus the
//! records staged this round) and proposes the records that decision
//! wrote — every record of a round (what the driver fed in since it last
//! took the outputs) in one entry, so raft's work per entry is paid once
//! per round rather than once per record; every replica applies
//! committed records with the same replay ([`ReplayedState::apply`]), so
//! time and rules come from the record, never from a follower's clock or
//! configuration. Every answer the leader gives waits until everything
//! its state depended on — its whole log at the moment it answered — is
//! committed and applied, in the term it answered in, *and* it is known
//! that no other leader committed anything since the answer was decided.
//! An answer decided while records were staged (its own, or earlier ones
//! it was decided on) has both once the round's entry is applied: it was
//! proposed in this term after the decision, and its commit means a
//! majority took it in this term, before any of them could have voted for
//! a successor. An answer decided with nothing staged — a refusal, a
//! replay, that wrote nothing — would otherwise be given from whatever a deposed leader last
//! knew (the simulator found a leader paused past an election answer
//! `UnknownReservation` for a reservation its successor had acknowledged,
//! seed 251): it waits for the next entry of the term to be applied (one
//! proposed after it was decided: under load, within the same round), or,
//! when the round ends with no such entry, for a majority to confirm that
//! this replica still leads (raft's read index, one round for every answer
//! of the round), whichever comes first. (Asking for that confirmation for
//! every answer, as this once did, sent a heartbeat to every follower for
//! almost every input under load.) If it loses leadership first, its
//! speculative state and every waiting answer are dropped (callers retry
//! with their idempotency keys; the next leader decides again from the
//! committed log). A deposed leader therefore acknowledges nothing.
//!
//! A new leader rebuilds its speculative state from its whole log: the
//! entries of earlier terms it holds will be committed before anything it
//! proposes, so its decisions follow them. Its coordinator, though, acts
//! on the world (it sends steps to other groups), so it starts only once
//! the leader's first entry of its term is applied — then every entry
//! before it is committed, and the coordinator is recovered from
//! committed records only, exactly as after a restart: held orders stay
//! held, decided ones are carried out, and it logs a new epoch before it
//! names any new attempt. (Recovering it from the uncommitted records let
//! a new leader carry out a decision its group then lost: the simulator's
//! seed 50 sold a line of an order its home later released.)

use std::collections::{BTreeMap, VecDeque};

use raft::eraftpb::{Entry, EntryType, Message};

use crate::coordination::{
    apply_part, Action, CallerId, ClientAnswer, ClientRequest, Coordinator, CoordinatorConfig, PartMessage, PartReply,
};
use crate::ids::OperationId;
use crate::ids::SkuId;
use crate::limits::Limits;
use crate::log::record::LogRecord;
use crate::log::replay::{ReplayRules, ReplayedState};
use crate::log::snapshot::Snapshot;
use crate::order::OrderError;
use crate::replication::codec::{entry_records, push_entry_record_with};
use crate::replication::replica::{Leadership, Replica, ReplicaConfig};
use crate::replication::storage::{GroupStorage, ReplicaWrite};
use crate::replication::{GroupId, ReplicaId};
use crate::runtime::EngineError;
use crate::sku::{AdminChange, SkuCommand, SkuError, SkuSettings, SkuState, StockSnapshot};

/// When a group snapshots its applied state. A snapshot encodes the whole
/// state, which grows with every order remembered for the idempotency
/// window; taken every so many entries its cost would grow with the state
/// (encoding it every 20,000 entries cost a loaded leader a tenth of its
/// CPU and stalled its heartbeats). Tied to the bytes of log held since the
/// last one, it costs a fixed share of each entry: the ratio sets that
/// share against the length of the log (what a restart replays, what a
/// replica holds in memory), and the cap keeps the memory bounded whatever
/// the state's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// Entries applied since the last snapshot before another: a small
    /// state is not snapshotted for every few entries.
    pub entries_min: u64,
    /// Bytes of entries held for each byte of the last snapshot before the
    /// next: at 1 a loaded member spent 15% of its CPU encoding snapshots.
    pub log_bytes_per_snapshot_byte: u64,
    /// Bytes of entries held past which a snapshot is due however large the
    /// last: they are held in memory, by every replica.
    pub entry_bytes_max: u64,
}

/// How a group runs on this member.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub replica: ReplicaConfig,
    /// The coordinator of the orders homed in this group (`own` is the
    /// group's id, and its placement maps partitions to groups).
    pub coordinator: CoordinatorConfig,
    pub rules: ReplayRules,
    /// The limits this member's configuration puts in force: a new leader
    /// that finds others in force in the log proposes these before it
    /// decides anything (the log, not the file, says what every record was
    /// checked against). `None` leaves the log's limits as they are.
    pub limits_in_force: Option<Limits>,
}

/// An operator's change to one SKU of the group, applied once per
/// operation id (a retry answers with the counts and changes nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRequest {
    Create { sku: SkuId, settings: SkuSettings, operation: OperationId },
    Change { sku: SkuId, operation: OperationId, change: AdminChange },
}

/// What the driver must do for a group.
#[derive(Debug, Clone)]
pub enum GroupOutput {
    /// A raft message for another replica (`message.to`): may leave at once.
    Raft(Message),
    /// A raft message that may only leave once every write handed out so
    /// far is fsynced (a vote, an append's answer).
    RaftAfterWrites(Message),
    /// Append to the member's log, tagged with the group; once fsynced,
    /// report [`GroupMachine::persisted`] with `number` (if any: a
    /// compaction's writes report nothing).
    Write {
        number: Option<u64>,
        writes: Vec<ReplicaWrite>,
    },
    /// A step for the participant of `group` (to its leader).
    Part {
        group: GroupId,
        message: PartMessage,
    },
    Answer {
        caller: CallerId,
        answer: ClientAnswer,
    },
    PartAnswer {
        caller: CallerId,
        reply: PartReply,
    },
    /// This replica does not lead the group: ask `leader` (if known).
    NotLeader {
        caller: CallerId,
        leader: Option<ReplicaId>,
    },
    /// The answer to [`GroupMachine::admin`].
    Admin {
        caller: CallerId,
        answer: Result<StockSnapshot, EngineError>,
    },
    /// The answer to [`GroupMachine::read`].
    Read {
        caller: CallerId,
        sku: SkuId,
        answer: Result<StockSnapshot, OrderError>,
    },
}

/// Reads waiting for a majority's confirmation or for their index to be
/// applied, per group: beyond it a read is refused `Busy` (a leader that
/// cannot reach a majority must not queue reads without end).
pub const READS_PENDING_MAX: usize = 4_096;
/// How long a read may wait for a majority before it is refused
/// `Unavailable` (the caller retries, maybe at a new leader).
pub const READ_WAIT_MS_MAX: u64 = 2_000;

/// Bytes of records staged for one entry past which they are proposed at
/// once rather than at the end of the round: raft sends an entry whole,
/// and a round of 1,024 inputs stays well under this.
pub const STAGED_ENTRY_BYTES_MAX: usize = 1 << 20;

/// Anomalies a group keeps for its driver to report.
pub const ANOMALIES_MAX: usize = 1_000;

/// What only the leader holds.
#[derive(Debug)]
struct Leading {
    term: u64,
    /// The applied state plus every entry of the log not yet applied.
    skus: BTreeMap<SkuId, SkuState>,
    /// The limits in force at the end of the log (new SKUs get them).
    limits: Limits,
    /// Started once `coordinator_from_index` is applied (see above).
    coordinator: Option<Coordinator>,
    coordinator_from_index: u64,
    /// Answers decided since leadership was last confirmed, with the
    /// index each needs applied.
    unconfirmed: Vec<(u64, GroupOutput)>,
    /// Answers waiting for the confirmation asked with each context.
    confirming: BTreeMap<u64, Vec<(u64, GroupOutput)>>,
    /// Answers confirmed, each released once the index beside it is applied.
    waiting: Vec<(u64, GroupOutput)>,
    /// Coordinator tokens, each durable once the index beside it is applied.
    tokens: VecDeque<(u64, u64)>,
    /// Reads asked for and not yet confirmed, by their context, with when
    /// they were asked.
    reads_asked: BTreeMap<u64, (CallerId, SkuId, u64)>,
    /// Reads confirmed, each answered once the index beside it is applied.
    reads_confirmed: VecDeque<(u64, CallerId, SkuId)>,
    next_read: u64,
    /// The records decided since the last proposal, as the data of one
    /// entry ([`Leading::stage`]): proposed together once the round's
    /// inputs are in ([`GroupMachine::take_outputs`]), so that raft's
    /// work per entry — appending, framing, sending to every follower,
    /// acknowledging — is paid once for all of them.
    staged: Vec<u8>,
    /// Answers decided while `staged` held records: each waits for the
    /// entry `staged` becomes.
    staged_answers: Vec<GroupOutput>,
    /// Coordinator tokens of the records in `staged`.
    staged_tokens: Vec<u64>,
}

impl Leading {
    /// Encodes `record` into the round's entry.
    fn stage(&mut self, record: &LogRecord) {
        push_entry_record_with(&mut self.staged, |out| record.encode_into(out));
    }
}

/// One group's replica and state machine on this member.
#[derive(Debug)]
pub struct GroupMachine {
    config: GroupConfig,
    replica: Replica,
    /// What every replica agrees on: the committed entries applied.
    applied: ReplayedState,
    applied_index: u64,
    leading: Option<Leading>,
    outputs: Vec<GroupOutput>,
    /// Things that should never happen, for the simulator to report.
    anomalies: Vec<String>,
    /// The leader's state was dropped after a refused proposal: it is
    /// rebuilt at the next tick.
    rebuild_at_tick: bool,
    /// Ticks since the last snapshot was taken (snapshots a lagging
    /// follower needs are taken at most once per 50 ticks).
    ticks_since_snapshot: u32,
    /// A follower needs a snapshot fresher than the one held: the driver
    /// takes one ([`GroupMachine::wants_snapshot`]).
    snapshot_wanted: bool,
}

/// A group's applied state imaged at `index` on the driver's thread, to be
/// encoded on another ([`GroupMachine::snapshot_image`]): the encoding is
/// most of a snapshot's cost and grows with the state, and while it ran on
/// the thread every group of the member waits for, a loaded member's
/// heartbeats stopped for up to a second and its followers called
/// elections.
#[derive(Debug)]
pub struct SnapshotImage {
    index: u64,
    conf_state: raft::eraftpb::ConfState,
    image: Snapshot,
}

/// A [`SnapshotImage`] encoded, for [`GroupMachine::snapshot_encoded`].
#[derive(Debug)]
pub struct EncodedSnapshot {
    index: u64,
    conf_state: raft::eraftpb::ConfState,
    data: Vec<u8>,
}

impl SnapshotImage {
    /// The applied index the image is of.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The engine's canonical encoding of the image (pure; any thread).
    pub fn encode(self) -> EncodedSnapshot {
        EncodedSnapshot { index: self.index, conf_state: self.conf_state, data: self.image.encode() }
    }
}

impl EncodedSnapshot {
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The applied index it is of.
    pub fn index(&self) -> u64 {
        self.index
    }
}

impl GroupMachine {
    /// Starts the group's replica on this member from `writes` (everything
    /// the member's log holds for the group, in order; none on a first
    /// start) over `initial`, the state every replica starts from.
    ///
    /// # Errors
    /// Writes that do not make a log this replica could have written, or
    /// a snapshot that does not decode.
    pub fn start(config: GroupConfig, initial: &ReplayedState, writes: &[ReplicaWrite]) -> Result<Self, String> {
        let mut storage = GroupStorage::initial(&config.replica.voters);
        for write in writes {
            storage.apply(write)?;
        }
        let snapshot = storage.held_snapshot();
        let applied_index = snapshot.get_metadata().index;
        let applied = if applied_index == 0 {
            initial.clone()
        } else {
            let decoded = Snapshot::decode(snapshot.get_data())?;
            ReplayedState::from_snapshot(config.rules.clone(), decoded)?
        };
        let replica = Replica::start(config.replica.clone(), storage, applied_index)?;
        Ok(Self {
            config,
            replica,
            applied,
            applied_index,
            leading: None,
            outputs: Vec::new(),
            anomalies: Vec::new(),
            rebuild_at_tick: false,
            ticks_since_snapshot: 0,
            snapshot_wanted: false,
        })
    }

    pub fn group(&self) -> GroupId {
        self.replica.group()
    }

    pub fn leadership(&self) -> Leadership {
        self.replica.leadership()
    }

    /// The state every replica agrees on (committed and applied).
    pub fn applied(&self) -> &ReplayedState {
        &self.applied
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The coordinator, while this replica leads.
    pub fn coordinator(&self) -> Option<&Coordinator> {
        self.leading.as_ref().and_then(|leading| leading.coordinator.as_ref())
    }

    pub fn anomalies(&self) -> &[String] {
        &self.anomalies
    }

    /// Keeps the first [`ANOMALIES_MAX`]: a long-running member must not
    /// grow a list of repeats (the driver logs each as it comes).
    fn note_anomaly(&mut self, anomaly: String) {
        if self.anomalies.len() < ANOMALIES_MAX {
            self.anomalies.push(anomaly);
        }
    }

    /// Takes what the driver must do, at the end of a round of inputs
    /// (at `now_ms`): answers that wrote nothing and that no later entry
    /// will confirm ask a majority here, once for the whole round.
    pub fn take_outputs(&mut self, now_ms: u64) -> Vec<GroupOutput> {
        // Settling may decide more (a coordinator answering what came of
        // the proposal): bounded, the rest waits for the next round.
        for _ in 0..8 {
            let proposed = self.propose_staged();
            let last_index = self.replica.last_index();
            let unconfirmed_last =
                self.leading.as_ref().and_then(|leading| leading.unconfirmed.last().map(|(index, _)| *index));
            let confirming = unconfirmed_last.is_some_and(|index| index >= last_index) && self.confirm_answers();
            if !proposed && !confirming {
                break;
            }
            self.settle(now_ms);
        }
        std::mem::take(&mut self.outputs)
    }

    /// A checkout's request for an order homed here.
    pub fn request(&mut self, now_ms: u64, caller: CallerId, request: ClientRequest) {
        let handing_over = self.replica.handing_over_to().is_some();
        let taking_over = self.taking_over();
        match &mut self.leading {
            // Handing over to another replica: proposals are refused.
            Some(_) if handing_over => {
                let answer = ClientAnswer::Refused(OrderError::Busy { retry_after_ms: 20 });
                self.outputs.push(GroupOutput::Answer { caller, answer });
            }
            Some(Leading { coordinator: Some(coordinator), .. }) => coordinator.request(now_ms, caller, request),
            // A new leader whose earlier entries are not yet committed.
            Some(Leading { coordinator: None, .. }) => {
                let answer = ClientAnswer::Refused(OrderError::Busy { retry_after_ms: 20 });
                self.outputs.push(GroupOutput::Answer { caller, answer });
            }
            None if taking_over => {
                let answer = ClientAnswer::Refused(OrderError::Busy { retry_after_ms: 20 });
                self.outputs.push(GroupOutput::Answer { caller, answer });
            }
            None => {
                let leader = self.replica.leadership().leader;
                self.outputs.push(GroupOutput::NotLeader { caller, leader });
            }
        }
        self.settle(now_ms);
    }

    /// The counts of `sku` (available, held, sold), linearizable: the
    /// leader confirms with a majority that it still leads (read index),
    /// then answers from its applied state once that has reached the
    /// commit index of the moment it asked — so the answer reflects every
    /// change acknowledged before the read began, and a deposed leader,
    /// which cannot get that confirmation, never answers.
    pub fn read(&mut self, now_ms: u64, caller: CallerId, sku: SkuId) {
        let taking_over = self.taking_over();
        let refusal = match &mut self.leading {
            None if taking_over => Some(GroupOutput::Read {
                caller,
                sku: sku.clone(),
                answer: Err(OrderError::Busy { retry_after_ms: 20 }),
            }),
            None => Some(GroupOutput::NotLeader { caller, leader: self.replica.leadership().leader }),
            // raft-rs drops reads until the leader committed in its term.
            Some(Leading { coordinator: None, .. }) => Some(GroupOutput::Read {
                caller,
                sku: sku.clone(),
                answer: Err(OrderError::Busy { retry_after_ms: 20 }),
            }),
            Some(leading) if leading.reads_asked.len() + leading.reads_confirmed.len() >= READS_PENDING_MAX => {
                Some(GroupOutput::Read {
                    caller,
                    sku: sku.clone(),
                    answer: Err(OrderError::Busy { retry_after_ms: 20 }),
                })
            }
            Some(leading) => {
                leading.next_read += 1;
                let context = leading.next_read;
                leading.reads_asked.insert(context, (caller, sku.clone(), now_ms));
                self.replica.read_index(context.to_be_bytes().to_vec());
                None
            }
        };
        self.outputs.extend(refusal);
        self.settle(now_ms);
    }

    /// An operator's change to a SKU of this group: decided on the
    /// leader's speculative state like every command, proposed, and
    /// answered once committed, applied and confirmed (see above). The
    /// operation id makes it exactly once: a retry, even at the next
    /// leader, finds the operation in the SKU's state and changes nothing.
    pub fn admin(&mut self, now_ms: u64, caller: CallerId, request: AdminRequest) {
        let handing_over = self.replica.handing_over_to().is_some();
        let busy = GroupOutput::Admin { caller, answer: Err(EngineError::Busy { retry_after_ms: 20 }) };
        let taking_over = self.taking_over();
        let leading = match &mut self.leading {
            None if taking_over => {
                self.outputs.push(busy);
                return;
            }
            None => {
                let leader = self.replica.leadership().leader;
                self.outputs.push(GroupOutput::NotLeader { caller, leader });
                return;
            }
            Some(Leading { coordinator: None, .. }) => {
                self.outputs.push(busy);
                return;
            }
            Some(_) if handing_over => {
                self.outputs.push(busy);
                return;
            }
            Some(leading) => leading,
        };
        let (answer, record) = match request {
            AdminRequest::Create { sku, settings, operation } if !leading.skus.contains_key(&sku) => {
                match SkuState::created(now_ms, settings, leading.limits.clone(), Some(operation.clone())) {
                    Ok(state) => {
                        let stock = state.stock();
                        leading.skus.insert(sku.clone(), state);
                        let record = LogRecord::CreateSku { sku, settings, now_ms, operation: Some(operation) };
                        (Ok(stock), Some(record))
                    }
                    Err(error) => (Err(EngineError::Refused { sku, error, stock: StockSnapshot::default() }), None),
                }
            }
            AdminRequest::Create { sku, settings, operation } => {
                let command =
                    SkuCommand::Admin { operation: Some(operation), change: AdminChange::Create { settings } };
                match admin_on(leading, now_ms, sku.clone(), &command) {
                    (
                        Err(EngineError::Refused {
                            error: SkuError::AlreadyCreated | SkuError::IdempotencyConflict,
                            ..
                        }),
                        _,
                    ) => (Err(EngineError::SkuExists { sku }), None),
                    other => other,
                }
            }
            AdminRequest::Change { sku, operation, change } => {
                let command = SkuCommand::Admin { operation: Some(operation), change };
                admin_on(leading, now_ms, sku, &command)
            }
        };
        self.stage_all(&Vec::from_iter(record));
        self.answer_when_applied(GroupOutput::Admin { caller, answer });
        self.settle(now_ms);
    }

    /// A coordinator's step for this group's part of an order.
    pub fn part(&mut self, now_ms: u64, caller: CallerId, message: PartMessage) {
        let Some(leading) = &mut self.leading else {
            // Taking over: the coordinator sends the step again.
            if !self.taking_over() {
                let leader = self.replica.leadership().leader;
                self.outputs.push(GroupOutput::NotLeader { caller, leader });
            }
            return;
        };
        if self.replica.handing_over_to().is_some() {
            // Proposals are refused while handing over; the coordinator
            // sends the step again.
            return;
        }
        let (answer, records) = apply_part(&mut leading.skus, now_ms, &message.attempt, &message.request);
        self.stage_all(&records);
        self.answer_when_applied(GroupOutput::PartAnswer { caller, reply: message.reply(answer) });
        self.settle(now_ms);
    }

    /// The participant of `group` answered a step of an order homed here.
    pub fn part_answered(&mut self, now_ms: u64, group: GroupId, reply: PartReply) {
        if let Some(coordinator) = self.leading.as_mut().and_then(|leading| leading.coordinator.as_mut()) {
            coordinator.part_answered(now_ms, group, reply);
        }
        self.settle(now_ms);
    }

    /// A raft message from another replica of the group.
    pub fn raft(&mut self, now_ms: u64, message: Message) {
        self.replica.step(message);
        self.settle(now_ms);
    }

    /// One raft tick (the driver's tick interval) at `now_ms`: elections
    /// and heartbeats, and on the leader the coordinator's timers and the
    /// expiry of holds whose time has come.
    pub fn tick(&mut self, now_ms: u64) {
        self.replica.tick();
        self.rebuild_at_tick = false;
        self.ticks_since_snapshot = self.ticks_since_snapshot.saturating_add(1);
        if self.ticks_since_snapshot > 50 && self.replica.needs_fresh_snapshot(self.applied_index) {
            self.snapshot_wanted = true;
        }
        let handing_over = self.replica.handing_over_to().is_some();
        if let Some(leading) = self.leading.as_mut().filter(|_| !handing_over) {
            if let Some(coordinator) = &mut leading.coordinator {
                coordinator.tick(now_ms);
            }
            let overdue: Vec<u64> = leading
                .reads_asked
                .iter()
                .filter(|(_, (_, _, asked_ms))| now_ms.saturating_sub(*asked_ms) > READ_WAIT_MS_MAX)
                .map(|(&context, _)| context)
                .collect();
            for context in overdue {
                let (caller, sku, _) = leading.reads_asked.remove(&context).expect("listed");
                self.outputs.push(GroupOutput::Read { caller, sku, answer: Err(OrderError::Unavailable) });
            }
            let due: Vec<SkuId> = leading
                .skus
                .iter()
                .filter(|(_, state)| state.next_expiry_ms().is_some_and(|at| at <= now_ms))
                .map(|(sku, _)| sku.clone())
                .collect();
            let mut records = Vec::new();
            for sku in due {
                let state = leading.skus.get_mut(&sku).expect("listed");
                if let (_, Some(command)) = state.apply_recording(now_ms, &SkuCommand::Expire) {
                    records.push(LogRecord::Apply { sku, now_ms, command });
                }
            }
            // Nothing answers for an expiry: a refused proposal rebuilds
            // the state and the next tick expires again.
            self.stage_all(&records);
        }
        self.settle(now_ms);
    }

    /// `member` lost its disk and asks for its new replica `replica` to
    /// take the place of its old one (see [`Replica::propose_replacement`]).
    pub fn replace(&mut self, now_ms: u64, member: u32, replica: ReplicaId) {
        self.replica.propose_replacement(member, replica);
        self.settle(now_ms);
    }

    /// Stands for election now.
    pub fn campaign(&mut self, now_ms: u64) {
        self.replica.campaign();
        self.settle(now_ms);
    }

    /// The writes of output `number` (and all before) are fsynced.
    pub fn persisted(&mut self, now_ms: u64, number: u64) {
        self.replica.persisted(number);
        self.settle(now_ms);
    }

    /// Takes a snapshot of the applied state (in the engine's canonical
    /// snapshot encoding) and lets the entries it covers go: the member's
    /// log may then drop them, and a follower too far behind is sent the
    /// snapshot instead.
    pub fn compact(&mut self, _now_ms: u64) {
        if let Some(image) = self.snapshot_image() {
            self.snapshot_encoded(image.encode());
        }
    }

    /// Whether a follower needs a fresher snapshot than the one held.
    pub fn wants_snapshot(&self) -> bool {
        self.snapshot_wanted
    }

    /// The first half of [`Self::compact`]: the applied state's image, if
    /// anything was applied since the snapshot held.
    pub fn snapshot_image(&mut self) -> Option<SnapshotImage> {
        let held = self.replica.storage().held_snapshot().get_metadata().index;
        if self.applied_index <= held {
            return None;
        }
        self.ticks_since_snapshot = 0;
        self.snapshot_wanted = false;
        let conf_state = self.replica.storage().conf_state().clone();
        Some(SnapshotImage { index: self.applied_index, conf_state, image: self.applied.snapshot() })
    }

    /// The second half of [`Self::compact`]: takes `encoded` as the held
    /// snapshot and drops the entries it covers — unless, while it was
    /// being encoded, a snapshot as new was installed or taken, the
    /// entries at its index were dropped, or the configuration changed
    /// (its metadata would then name a configuration the state at its
    /// index did not have). Whether it was taken.
    pub fn snapshot_encoded(&mut self, encoded: EncodedSnapshot) -> bool {
        let storage = self.replica.storage();
        let held = storage.held_snapshot().get_metadata().index;
        // (An image past what this machine applied is not of its state.)
        if encoded.index <= held || encoded.index > self.applied_index || *storage.conf_state() != encoded.conf_state {
            return false;
        }
        let writes = self.replica.compact(encoded.index, encoded.data);
        if writes.is_empty() {
            return false;
        }
        self.outputs.push(GroupOutput::Write { number: None, writes });
        true
    }

    /// Raft elected this replica but it has not taken over yet (a refused
    /// coordinator record defers that to the next tick): callers are told
    /// `Busy`, never `NotLeader` naming this replica, which sent clients
    /// back to it until their retries ran out.
    fn taking_over(&self) -> bool {
        self.leading.is_none() && self.replica.leadership().leading
    }

    /// Whether a snapshot is worth taking (see [`SnapshotPolicy`]): at
    /// least `entries_min` entries applied since the last, and the entries
    /// held since then either `log_bytes_per_snapshot_byte` times as large
    /// as that snapshot or past `entry_bytes_max`.
    pub fn snapshot_due(&self, policy: &SnapshotPolicy) -> bool {
        let storage = self.replica.storage();
        let held = storage.held_snapshot();
        let entry_bytes = storage.entry_bytes_held();
        let in_proportion = held.get_data().len() as u64 * policy.log_bytes_per_snapshot_byte;
        self.applied_index.saturating_sub(held.get_metadata().index) >= policy.entries_min
            && (entry_bytes >= in_proportion || entry_bytes >= policy.entry_bytes_max)
    }

    /// Stages `records`, in order, for the round's entry.
    fn stage_all(&mut self, records: &[LogRecord]) {
        if let Some(leading) = &mut self.leading {
            for record in records {
                leading.stage(record);
            }
        }
    }

    /// Proposes the records staged since the last proposal as one entry;
    /// the answers and coordinator tokens that waited for them then wait
    /// for its index. Returns whether there was anything to propose.
    fn propose_staged(&mut self) -> bool {
        let Some(leading) = &mut self.leading else { return false };
        if leading.staged.is_empty() {
            return false;
        }
        let data = std::mem::take(&mut leading.staged);
        match self.replica.propose(data) {
            Ok(index) => {
                let leading = self.leading.as_mut().expect("leading: it just proposed");
                leading.waiting.extend(leading.staged_answers.drain(..).map(|output| (index, output)));
                leading.tokens.extend(leading.staged_tokens.drain(..).map(|token| (token, index)));
            }
            Err(error) => {
                // The staged decisions go with the speculative state they
                // were made on: every caller waiting is told to ask again,
                // as a deposed leader's are, and the state is rebuilt from
                // the log at the next tick (not at once: a leader that
                // refuses proposals would refuse again).
                tracing::debug!(group = self.group(), %error, "a proposal was refused");
                self.step_down();
                self.rebuild_at_tick = true;
            }
        }
        true
    }

    /// Holds `output` until it may be given (see the module's doc): an
    /// answer decided while records are staged (its own or earlier ones
    /// it depends on) once the entry they become is applied — proposed
    /// after the answer was decided, in this term; any other once an
    /// entry after the log's last is applied, or a majority confirmed
    /// this replica still leads, whichever comes first.
    fn answer_when_applied(&mut self, output: GroupOutput) {
        let index = self.replica.last_index();
        if let Some(leading) = &mut self.leading {
            if leading.staged.is_empty() {
                leading.unconfirmed.push((index, output));
            } else {
                leading.staged_answers.push(output);
            }
        }
    }

    /// Asks a majority to confirm leadership for the answers decided since
    /// the last time (once the term has committed an entry: raft-rs
    /// ignores reads before); returns whether it asked.
    fn confirm_answers(&mut self) -> bool {
        let Some(leading) = &mut self.leading else { return false };
        if leading.unconfirmed.is_empty() || leading.coordinator.is_none() {
            return false;
        }
        leading.next_read += 1;
        let context = leading.next_read;
        leading.confirming.insert(context, std::mem::take(&mut leading.unconfirmed));
        self.replica.read_index(context.to_be_bytes().to_vec());
        true
    }

    /// Carries out what raft-rs and the coordinator want, until neither
    /// wants anything more.
    fn settle(&mut self, now_ms: u64) {
        if self.leading.as_ref().is_some_and(|leading| leading.staged.len() >= STAGED_ENTRY_BYTES_MAX) {
            self.propose_staged();
        }
        for _ in 0..64 {
            let drained = self.drain_coordinator();
            let output = self.replica.collect();
            let raft_work = !output.is_empty();
            self.outputs.extend(output.send_now.into_iter().map(GroupOutput::Raft));
            if let Some(number) = output.number {
                self.outputs.push(GroupOutput::Write { number: Some(number), writes: output.writes });
            }
            self.outputs.extend(output.send_after_writes.into_iter().map(GroupOutput::RaftAfterWrites));
            if let Some(snapshot) = output.install {
                self.install(&snapshot);
            }
            for entry in output.committed {
                self.apply_committed(&entry);
            }
            self.replica.applied_to(self.applied_index);
            if let Some(leading) = &mut self.leading {
                for (index, context) in output.reads {
                    let Ok(context) = <[u8; 8]>::try_from(context.as_slice()) else { continue };
                    let context = u64::from_be_bytes(context);
                    if let Some((caller, sku, _)) = leading.reads_asked.remove(&context) {
                        leading.reads_confirmed.push_back((index, caller, sku));
                    }
                    for (needed, output) in leading.confirming.remove(&context).unwrap_or_default() {
                        leading.waiting.push((needed.max(index), output));
                    }
                }
            }
            let leadership = self.replica.leadership();
            match (&self.leading, leadership.leading) {
                (Some(leading), true) if leading.term == leadership.term => {}
                (_, true) if !self.rebuild_at_tick => self.become_leader(leadership.term),
                (_, true) => {}
                (Some(_), false) => self.step_down(),
                (None, false) => {}
            }
            let started = self.start_coordinator(now_ms);
            let released = self.release_applied(now_ms) | self.answer_reads();
            if !drained && !raft_work && !released && !started {
                return;
            }
        }
        self.note_anomaly(format!("group {}: did not settle within 64 rounds", self.group()));
    }

    fn install(&mut self, snapshot: &raft::eraftpb::Snapshot) {
        let decoded = Snapshot::decode(snapshot.get_data())
            .and_then(|decoded| ReplayedState::from_snapshot(self.config.rules.clone(), decoded));
        match decoded {
            Ok(state) => {
                self.applied = state;
                self.applied_index = snapshot.get_metadata().index;
            }
            Err(error) => self.note_anomaly(format!("group {}: a snapshot received: {error}", self.group())),
        }
    }

    fn apply_committed(&mut self, entry: &Entry) {
        if entry.index <= self.applied_index {
            return;
        }
        self.applied_index = entry.index;
        if entry.get_entry_type() != EntryType::EntryNormal {
            // A membership change: raft's, not the state machine's. One
            // raft-rs refuses (a second leader's request to leave a joint
            // configuration already left) is refused alike on every
            // replica, whose configurations are equal at this index, and
            // changes nothing.
            if let Err(error) = self.replica.apply_conf_change(entry) {
                tracing::debug!(group = self.group(), index = entry.index, %error, "a membership change was refused");
            }
            return;
        }
        if entry.data.is_empty() {
            // A new leader's empty entry.
            return;
        }
        let records = match entry_records(&entry.data) {
            Ok(records) => records,
            Err(error) => {
                self.note_anomaly(format!("group {}: entry {}: {error}", self.group(), entry.index));
                return;
            }
        };
        for bytes in records {
            let applied = LogRecord::decode(bytes)
                .map_err(|error| error.to_string())
                .and_then(|record| self.applied.apply(self.applied.last_sequence + 1, record));
            if let Err(error) = applied {
                self.note_anomaly(format!("group {}: entry {}: {error}", self.group(), entry.index));
            }
        }
    }

    /// The state of the whole log: applied, then every entry after it.
    fn speculative_state(&self) -> ReplayedState {
        let mut state = self.applied.clone();
        for entry in self.replica.storage().entries_held() {
            if entry.index <= self.applied_index
                || entry.data.is_empty()
                || entry.get_entry_type() != EntryType::EntryNormal
            {
                continue;
            }
            for bytes in entry_records(&entry.data).unwrap_or_default() {
                if let Ok(record) = LogRecord::decode(bytes) {
                    let sequence = state.last_sequence + 1;
                    if let Err(error) = state.apply(sequence, record) {
                        tracing::warn!(group = self.replica.group(), %error, "an unapplied entry does not follow");
                    }
                }
            }
        }
        state
    }

    fn become_leader(&mut self, term: u64) {
        let state = self.speculative_state();
        self.leading = Some(Leading {
            term,
            limits: state.limits().clone(),
            skus: state.skus,
            coordinator: None,
            // raft-rs appended the term's first (empty) entry on election.
            coordinator_from_index: self.replica.last_index(),
            unconfirmed: Vec::new(),
            confirming: BTreeMap::new(),
            waiting: Vec::new(),
            tokens: VecDeque::new(),
            reads_asked: BTreeMap::new(),
            reads_confirmed: VecDeque::new(),
            next_read: 0,
            staged: Vec::new(),
            staged_answers: Vec::new(),
            staged_tokens: Vec::new(),
        });
    }

    /// Starts the coordinator of a new leader once every entry before its
    /// term's first is committed and applied; returns whether it started.
    fn start_coordinator(&mut self, now_ms: u64) -> bool {
        let applied_index = self.applied_index;
        let Some(leading) = &mut self.leading else { return false };
        if leading.coordinator.is_some() || applied_index < leading.coordinator_from_index {
            return false;
        }
        let records = self.applied.coordinator_records();
        match Coordinator::recover(self.config.coordinator.clone(), records, now_ms) {
            Ok(coordinator) => {
                leading.coordinator = Some(coordinator);
                let wanted = self.config.limits_in_force.clone().filter(|limits| *limits != leading.limits);
                if let Some(limits) = wanted {
                    let record = LogRecord::RulesInForce { limits: limits.clone() };
                    // Should its proposal be refused, the next leader (or
                    // the next term of this one) tries again.
                    leading.stage(&record);
                    for state in leading.skus.values_mut() {
                        state.set_limits(limits.clone());
                    }
                    leading.limits = limits;
                }
            }
            Err(error) => {
                let group = self.replica.group();
                self.note_anomaly(format!("group {group}: coordinator: {error}"));
                self.leading = None;
            }
        }
        true
    }

    /// Leadership lost: the speculative state goes, and every caller
    /// still waiting is told to ask the new leader (never what this one
    /// decided: that may not be what the group keeps; a retry with the
    /// same idempotency key finds out).
    fn step_down(&mut self) {
        let Some(leading) = self.leading.take() else { return };
        let leader = self.replica.leadership().leader;
        let reads = leading.reads_asked.into_values().map(|(caller, _, _)| caller);
        let confirmed = leading.reads_confirmed.into_iter().map(|(_, caller, _)| caller);
        let answers = leading
            .unconfirmed
            .into_iter()
            .chain(leading.confirming.into_values().flatten())
            .chain(leading.waiting)
            .chain(leading.staged_answers.into_iter().map(|output| (0, output)))
            .filter_map(|(_, output)| match output {
                GroupOutput::Answer { caller, .. }
                | GroupOutput::PartAnswer { caller, .. }
                | GroupOutput::Admin { caller, .. } => Some(caller),
                _ => None,
            });
        let callers: Vec<CallerId> = reads.chain(confirmed).chain(answers).collect();
        for caller in callers {
            self.outputs.push(GroupOutput::NotLeader { caller, leader });
        }
    }

    /// Answers the reads whose index is applied, from the applied state.
    fn answer_reads(&mut self) -> bool {
        let applied_index = self.applied_index;
        let Some(leading) = &mut self.leading else { return false };
        let mut answered = false;
        while leading.reads_confirmed.front().is_some_and(|(index, _, _)| *index <= applied_index) {
            let (_, caller, sku) = leading.reads_confirmed.pop_front().expect("checked");
            let answer = match self.applied.skus.get(&sku) {
                Some(state) => Ok(state.stock()),
                None => Err(OrderError::UnknownSku { index: 0, sku: sku.clone() }),
            };
            self.outputs.push(GroupOutput::Read { caller, sku, answer });
            answered = true;
        }
        answered
    }

    /// Releases the answers and coordinator tokens the applied index has
    /// reached; returns whether there were any.
    fn release_applied(&mut self, now_ms: u64) -> bool {
        let applied_index = self.applied_index;
        let Some(leading) = &mut self.leading else { return false };
        let mut released = false;
        // An answer that wrote nothing, decided when the log ended at
        // `index`: an entry after it is applied, proposed by this leader
        // in this term after the answer was decided — its commit proves
        // no other leader had committed anything in between.
        // Each list is in the order the answers were decided, so by index.
        for answers in std::iter::once(&mut leading.unconfirmed).chain(leading.confirming.values_mut()) {
            let split = answers.partition_point(|(index, _)| *index < applied_index);
            if split > 0 {
                self.outputs.extend(answers.drain(..split).map(|(_, output)| output));
                released = true;
            }
        }
        if released {
            // The confirmation of an emptied context may still come (or
            // not, if raft-rs dropped the read): nothing waits for it.
            leading.confirming.retain(|_, answers| !answers.is_empty());
        }
        if leading.waiting.iter().any(|(index, _)| *index <= applied_index) {
            let (ready, later): (Vec<_>, Vec<_>) =
                std::mem::take(&mut leading.waiting).into_iter().partition(|(index, _)| *index <= applied_index);
            leading.waiting = later;
            self.outputs.extend(ready.into_iter().map(|(_, output)| output));
            released = true;
        }
        let mut durable = None;
        while leading.tokens.front().is_some_and(|(_, index)| *index <= applied_index) {
            durable = leading.tokens.pop_front().map(|(token, _)| token);
        }
        if let (Some(token), Some(coordinator)) = (durable, &mut leading.coordinator) {
            coordinator.durable(now_ms, token);
            released = true;
        }
        released
    }

    /// Carries out the coordinator's actions; returns whether it had any.
    fn drain_coordinator(&mut self) -> bool {
        let Some(coordinator) = self.leading.as_mut().and_then(|leading| leading.coordinator.as_mut()) else {
            return false;
        };
        let actions = coordinator.take_actions();
        let any = !actions.is_empty();
        for action in actions {
            match action {
                Action::Send { member, message } => self.outputs.push(GroupOutput::Part { group: member, message }),
                Action::Log { token, record } => {
                    if let Some(leading) = &mut self.leading {
                        leading.stage(&LogRecord::Coordinator(record));
                        leading.staged_tokens.push(token);
                    }
                }
                Action::Reply { caller, answer } => {
                    self.answer_when_applied(GroupOutput::Answer { caller, answer });
                }
            }
            if self.leading.is_none() {
                return true;
            }
        }
        any
    }
}

/// Applies an admin `command` to `sku` in the leader's state: the answer,
/// and the record to propose if it changed anything.
fn admin_on(
    leading: &mut Leading,
    now_ms: u64,
    sku: SkuId,
    command: &SkuCommand,
) -> (Result<StockSnapshot, EngineError>, Option<LogRecord>) {
    let Some(state) = leading.skus.get_mut(&sku) else { return (Err(EngineError::UnknownSku { sku }), None) };
    let (answer, recorded) = state.apply_recording(now_ms, command);
    let record = recorded.map(|command| LogRecord::Apply { sku: sku.clone(), now_ms, command });
    let answer = match answer.result {
        Ok(_) => Ok(answer.stock),
        Err(error) => Err(EngineError::Refused { sku, error, stock: answer.stock }),
    };
    (answer, record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordination::{PartAnswer, PartRequest, Placement};
    use crate::ids::{BuyerId, OrderId};
    use crate::limits::Limits;
    use crate::sku::{Quantity, SkuSettings};

    const GROUP: GroupId = 1;

    fn sku() -> SkuId {
        SkuId::new("sku").expect("valid")
    }

    fn machines() -> Vec<GroupMachine> {
        let limits = Limits::default();
        let rules = ReplayRules { partition_count: 1, limits_unrecorded: limits.clone() };
        let mut initial = ReplayedState::empty(rules.clone());
        let settings = SkuSettings { initial_units: 10, ..SkuSettings::default() };
        initial.apply(1, LogRecord::CreateSku { sku: sku(), settings, now_ms: 0, operation: None }).expect("new");
        (1..=3)
            .map(|member| {
                let coordinator = CoordinatorConfig {
                    own: GROUP,
                    placement: Placement::new(vec![GROUP]),
                    limits: limits.clone(),
                    orders_max: 100,
                    part_answer_ms_max: 1_000,
                    resend_pause_ms_min: 20,
                    resend_pause_ms_max: 500,
                };
                let replica = ReplicaConfig::new(GROUP, member, vec![1, 2, 3], 7);
                let config = GroupConfig { replica, coordinator, rules: rules.clone(), limits_in_force: None };
                GroupMachine::start(config, &initial, &[]).expect("starts")
            })
            .collect()
    }

    /// Carries every raft message (but those `cut` says to drop) and
    /// persists every write at once, for a bounded number of rounds;
    /// returns the outputs for callers, by member.
    fn exchange(machines: &mut [GroupMachine], now_ms: u64, cut: impl Fn(u64, u64) -> bool) -> Vec<(u64, GroupOutput)> {
        let mut for_callers = Vec::new();
        for _ in 0..50 {
            let mut messages = Vec::new();
            for (index, machine) in machines.iter_mut().enumerate() {
                let member = index as u64 + 1;
                for output in machine.take_outputs(now_ms) {
                    match output {
                        GroupOutput::Raft(message) | GroupOutput::RaftAfterWrites(message) => messages.push(message),
                        GroupOutput::Write { number: Some(number), .. } => machine.persisted(now_ms, number),
                        GroupOutput::Write { number: None, .. } => {}
                        other => for_callers.push((member, other)),
                    }
                }
            }
            if messages.is_empty() && machines.iter().all(|machine| machine.outputs.is_empty()) {
                break;
            }
            for message in messages {
                if !cut(message.from, message.to) {
                    machines[message.to as usize - 1].raft(now_ms, message);
                }
            }
        }
        for_callers
    }

    fn reserve_step(attempt: &str) -> PartMessage {
        PartMessage {
            order: OrderId::new("order").expect("valid"),
            attempt: OrderId::new(attempt).expect("valid"),
            step: 1,
            request: PartRequest::Reserve {
                buyer: BuyerId::new("buyer").expect("valid"),
                lines: vec![(sku(), Quantity::Exactly(2))],
                ttl_ms: 60_000,
            },
        }
    }

    fn elect_first(machines: &mut [GroupMachine]) {
        machines[0].campaign(0);
        exchange(machines, 0, |_, _| false);
        assert!(machines[0].leadership().leading, "member 1 won its election");
    }

    #[test]
    fn a_part_step_is_answered_once_committed_and_every_replica_applies_it() {
        let mut machines = machines();
        elect_first(&mut machines);
        machines[0].part(10, 99, reserve_step("~1.1.1"));
        assert!(
            !machines[0].outputs.iter().any(|output| matches!(output, GroupOutput::PartAnswer { .. })),
            "nothing is answered before a majority has the entry"
        );
        let answered = exchange(&mut machines, 10, |_, _| false);
        assert!(
            matches!(&answered[..], [(1, GroupOutput::PartAnswer { caller: 99, reply })] if matches!(reply.answer, PartAnswer::Held { .. })),
            "{answered:?}"
        );
        // A heartbeat round carries the commit index to the followers.
        for machine in &mut machines {
            for _ in 0..3 {
                machine.tick(20);
            }
        }
        exchange(&mut machines, 20, |_, _| false);
        let leader_state = machines[0].applied().snapshot().encode();
        for follower in &machines[1..] {
            assert_eq!(follower.applied().skus[&sku()].stock().held, 2);
            assert_eq!(follower.applied().snapshot().encode(), leader_state, "replicas agree byte for byte");
        }
    }

    #[test]
    fn a_rounds_records_are_one_entry_and_every_answer_waits_for_it() {
        let mut machines = machines();
        elect_first(&mut machines);
        let before = machines[0].replica().last_index();
        machines[0].part(10, 98, reserve_step("~1.1.1"));
        machines[0].part(10, 99, reserve_step("~1.1.2"));
        // Refused (the SKU holds 10 units, 4 are held): it wrote nothing,
        // but was decided on the two holds, so it waits for them too.
        let mut greedy = reserve_step("~1.1.3");
        if let PartRequest::Reserve { lines, .. } = &mut greedy.request {
            lines[0].1 = Quantity::Exactly(7);
        }
        machines[0].part(10, 97, greedy);
        assert_eq!(machines[0].replica().last_index(), before, "nothing is proposed before the round ends");
        let outputs = machines[0].take_outputs(10);
        assert!(
            !outputs.iter().any(|output| matches!(output, GroupOutput::PartAnswer { .. })),
            "nothing is answered before a majority has the entry: {outputs:?}"
        );
        machines[0].outputs = outputs;
        let answered = exchange(&mut machines, 10, |_, _| false);
        assert_eq!(machines[0].replica().last_index(), before + 1, "the round's two records went in one entry");
        let mut callers: Vec<CallerId> = answered
            .iter()
            .filter_map(|(_, output)| match output {
                GroupOutput::PartAnswer { caller, .. } => Some(*caller),
                _ => None,
            })
            .collect();
        callers.sort_unstable();
        assert_eq!(callers, vec![97, 98, 99], "{answered:?}");
        for machine in &mut machines {
            for _ in 0..3 {
                machine.tick(20);
            }
        }
        exchange(&mut machines, 20, |_, _| false);
        for machine in &machines {
            assert_eq!(machine.applied().skus[&sku()].stock().held, 4, "every replica applied both holds");
        }
    }

    #[test]
    fn a_leader_cut_off_from_its_followers_answers_nothing_and_steps_down() {
        let mut machines = machines();
        elect_first(&mut machines);
        machines[0].part(10, 99, reserve_step("~1.1.1"));
        let cut = |from: u64, to: u64| from == 1 || to == 1;
        let mut answered = exchange(&mut machines, 10, cut);
        for tick in 0..40 {
            machines[0].tick(20 + tick * 10);
            answered.extend(exchange(&mut machines, 20 + tick * 10, cut));
        }
        assert!(!machines[0].leadership().leading, "check-quorum deposed it");
        assert!(
            answered.iter().all(|(_, output)| matches!(output, GroupOutput::NotLeader { caller: 99, .. })),
            "only told to go elsewhere: {answered:?}"
        );
        assert!(!answered.is_empty(), "the waiting caller is sent on");
        assert_eq!(machines[1].applied().skus[&sku()].stock().held, 0, "the majority never saw the hold");
    }

    /// A leader cut off from the others, everything it knows committed,
    /// gives no answer that writes nothing: its successor may have changed
    /// what it would say (the simulator's seed 251 had a paused leader
    /// answer `UnknownReservation` for a hold its successor acknowledged).
    /// Once it hears of the successor, the caller is sent there.
    #[test]
    fn a_deposed_leader_gives_no_answer_that_writes_nothing() {
        let mut machines = machines();
        elect_first(&mut machines);
        for tick in 1..4 {
            machines[0].tick(tick);
            exchange(&mut machines, tick, |_, _| false);
        }
        assert_eq!(machines[0].applied_index(), machines[0].replica().last_index(), "all it knows is committed");
        let cut = |from: u64, to: u64| from == 1 || to == 1;
        // The others hear nothing from member 1 (which is not ticked, so
        // it does not notice it lost its majority) and elect one of them.
        for tick in 4..64 {
            machines[1].tick(tick);
            machines[2].tick(tick);
            exchange(&mut machines, tick, cut);
        }
        let successor = (1..3).find(|&index| machines[index].leadership().leading).expect("a successor was elected");
        assert!(machines[0].leadership().leading, "member 1 has not heard of it");
        let new_sku = SkuId::new("new").expect("valid");
        let create = AdminRequest::Create {
            sku: new_sku.clone(),
            settings: SkuSettings { initial_units: 5, ..SkuSettings::default() },
            operation: OperationId::new("create-new").expect("valid"),
        };
        machines[successor].admin(70, 7, create);
        let answered = exchange(&mut machines, 70, cut);
        assert!(
            answered.iter().any(|(member, output)| *member == successor as u64 + 1
                && matches!(output, GroupOutput::Admin { caller: 7, answer: Ok(_) })),
            "the successor acknowledged the new SKU: {answered:?}"
        );
        // The deposed leader, asked to hold the new SKU, does not know it:
        // a refusal that writes nothing, decided on a stale state.
        let reserve = PartMessage {
            order: OrderId::new("order").expect("valid"),
            attempt: OrderId::new("~1.1.9").expect("valid"),
            step: 1,
            request: PartRequest::Reserve {
                buyer: BuyerId::new("buyer").expect("valid"),
                lines: vec![(new_sku, Quantity::Exactly(1))],
                ttl_ms: 60_000,
            },
        };
        let last_index = machines[0].replica().last_index();
        machines[0].part(80, 8, reserve);
        assert_eq!(machines[0].replica().last_index(), last_index, "the refusal wrote nothing");
        let answered = exchange(&mut machines, 80, cut);
        assert!(!answered.iter().any(|(member, _)| *member == 1), "the deposed leader answered: {answered:?}");
        let mut answered = Vec::new();
        for tick in 0..5 {
            machines[successor].tick(90 + tick);
            answered.extend(exchange(&mut machines, 90 + tick, |_, _| false));
        }
        assert!(!machines[0].leadership().leading, "it heard of the next term");
        assert!(
            answered
                .iter()
                .any(|(member, output)| *member == 1 && matches!(output, GroupOutput::NotLeader { caller: 8, .. })),
            "the caller is sent on: {answered:?}"
        );
        assert!(
            !answered.iter().any(|(member, output)| *member == 1 && matches!(output, GroupOutput::PartAnswer { .. })),
            "{answered:?}"
        );
    }

    /// Adds one unit to the SKU on the leader, under a new operation id:
    /// one entry each, committed and applied everywhere.
    fn add_units(machines: &mut [GroupMachine], count: usize, first: usize) {
        for number in first..first + count {
            let change = AdminRequest::Change {
                sku: sku(),
                operation: OperationId::new(format!("add-{number}")).expect("valid"),
                change: AdminChange::AddStock { units: 1 },
            };
            machines[0].admin(10, 7, change);
            exchange(machines, 10, |_, _| false);
        }
    }

    #[test]
    fn a_snapshot_is_due_in_proportion_to_the_last_or_past_the_memory_cap() {
        let mut machines = machines();
        elect_first(&mut machines);
        // The entries of the election count too.
        let entries_min = machines[0].applied_index() + 3;
        let policy = SnapshotPolicy { entries_min, log_bytes_per_snapshot_byte: 4, entry_bytes_max: u64::MAX };
        add_units(&mut machines, 2, 0);
        assert!(!machines[0].snapshot_due(&policy), "fewer entries than the minimum since the last snapshot");
        add_units(&mut machines, 1, 2);
        assert!(machines[0].snapshot_due(&policy), "no snapshot yet: any log is as large as it");
        machines[0].compact(10);
        let snapshot_bytes = machines[0].replica().storage().held_snapshot().get_data().len() as u64;
        assert!(snapshot_bytes > 0);
        assert!(!machines[0].snapshot_due(&policy), "nothing applied since");
        // Entries until their bytes reach four times the snapshot's.
        let mut added = 3;
        for _ in 0..10_000 {
            if machines[0].replica().storage().entry_bytes_held() >= 4 * snapshot_bytes {
                break;
            }
            assert!(
                !machines[0].snapshot_due(&policy),
                "due at {} bytes of entries, under four times the snapshot's {snapshot_bytes}",
                machines[0].replica().storage().entry_bytes_held()
            );
            add_units(&mut machines, 1, added);
            added += 1;
        }
        assert!(machines[0].snapshot_due(&policy), "due once the entries take four times the snapshot's bytes");
        // The cap makes it due sooner however large the last snapshot.
        machines[0].compact(10);
        add_units(&mut machines, entries_min as usize, added);
        let held = machines[0].replica().storage().entry_bytes_held();
        assert!(held < 4 * snapshot_bytes);
        assert!(!machines[0].snapshot_due(&policy));
        assert!(machines[0].snapshot_due(&SnapshotPolicy { entry_bytes_max: held, ..policy }));
    }

    /// A snapshot encoded off the driver's thread is taken at the index
    /// it was imaged at, however far the group went meanwhile, and its
    /// state is the state at that index; one overtaken by a newer
    /// snapshot is dropped, never installed over it.
    #[test]
    fn a_snapshot_encoded_elsewhere_is_taken_at_its_index_unless_overtaken() {
        let mut machines = machines();
        elect_first(&mut machines);
        add_units(&mut machines, 3, 0);
        let image = machines[0].snapshot_image().expect("entries applied since the last snapshot");
        let index = image.index();
        let available_then = machines[0].applied().skus[&sku()].stock().available;
        add_units(&mut machines, 2, 3);
        assert!(machines[0].applied_index() > index);
        assert!(machines[0].snapshot_encoded(image.encode()), "taken although the group moved on");
        let held = machines[0].replica().storage().held_snapshot().clone();
        assert_eq!(held.get_metadata().index, index);
        let state = Snapshot::decode(held.get_data()).expect("decodes");
        let restored = ReplayedState::from_snapshot(machines[0].config.rules.clone(), state).expect("restores");
        assert_eq!(restored.skus[&sku()].stock().available, available_then, "the state at its index");
        assert!(machines[0].replica().storage().entries_held().iter().all(|entry| entry.index >= index));
        // An older image arriving after a newer snapshot is dropped.
        add_units(&mut machines, 1, 5);
        let stale = machines[0].snapshot_image().expect("applied since");
        add_units(&mut machines, 1, 6);
        machines[0].compact(10);
        let newest = machines[0].replica().storage().held_snapshot().get_metadata().index;
        assert!(newest > stale.index());
        assert!(!machines[0].snapshot_encoded(stale.encode()), "overtaken");
        assert_eq!(machines[0].replica().storage().held_snapshot().get_metadata().index, newest);
    }

    #[test]
    fn a_follower_names_the_leader() {
        let mut machines = machines();
        elect_first(&mut machines);
        machines[1].part(10, 5, reserve_step("~1.1.1"));
        let outputs = machines[1].take_outputs(10);
        assert!(
            outputs.iter().any(|output| matches!(output, GroupOutput::NotLeader { caller: 5, leader: Some(1) })),
            "{outputs:?}"
        );
        machines[1].read(10, 6, sku());
        let outputs = machines[1].take_outputs(10);
        assert!(outputs.iter().any(|output| matches!(output, GroupOutput::NotLeader { caller: 6, .. })), "{outputs:?}");
    }

    #[test]
    fn admin_changes_apply_once_on_every_replica_and_the_configured_limits_come_into_force() {
        let mut machines = machines();
        let strict = Limits { line_units_max: 3, ..Limits::default() };
        machines[0].config.limits_in_force = Some(strict.clone());
        elect_first(&mut machines);
        let new_sku = SkuId::new("new").expect("valid");
        let operation = OperationId::new("op-1").expect("valid");
        let create = AdminRequest::Create {
            sku: new_sku.clone(),
            settings: SkuSettings { initial_units: 5, ..SkuSettings::default() },
            operation: operation.clone(),
        };
        machines[0].admin(10, 1, create.clone());
        let add = AdminRequest::Change {
            sku: new_sku.clone(),
            operation: OperationId::new("op-2").expect("valid"),
            change: AdminChange::AddStock { units: 7 },
        };
        machines[0].admin(10, 2, add.clone());
        // The retry of the addition (a lost answer) and of the creation.
        machines[0].admin(10, 3, add);
        machines[0].admin(10, 4, create);
        let conflicting = AdminRequest::Create {
            sku: new_sku.clone(),
            settings: SkuSettings { initial_units: 6, ..SkuSettings::default() },
            operation: OperationId::new("op-3").expect("valid"),
        };
        machines[0].admin(10, 5, conflicting);
        let answered = exchange(&mut machines, 10, |_, _| false);
        let answer = |caller: CallerId| {
            answered
                .iter()
                .find_map(|(_, output)| match output {
                    GroupOutput::Admin { caller: of, answer } if *of == caller => Some(answer.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("caller {caller} answered: {answered:?}"))
        };
        assert_eq!(answer(1).expect("created").available, 5);
        assert_eq!(answer(2).expect("added").available, 12);
        assert_eq!(answer(3).expect("a retry answers").available, 12, "added once");
        assert_eq!(answer(4).expect("a retry of the creation answers").available, 12);
        assert!(matches!(answer(5), Err(EngineError::SkuExists { .. })), "{:?}", answer(5));
        for machine in &mut machines {
            for _ in 0..3 {
                machine.tick(20);
            }
        }
        exchange(&mut machines, 20, |_, _| false);
        for machine in &machines {
            assert_eq!(machine.applied().skus[&new_sku].stock().available, 12);
            assert_eq!(machine.applied().limits_recorded(), Some(&strict), "the leader put its limits in force");
        }
        machines[1].admin(
            30,
            6,
            AdminRequest::Change {
                sku: new_sku,
                operation: OperationId::new("op-4").expect("valid"),
                change: AdminChange::AddStock { units: 1 },
            },
        );
        let outputs = machines[1].take_outputs(10);
        assert!(outputs.iter().any(|output| matches!(output, GroupOutput::NotLeader { caller: 6, leader: Some(1) })));
    }
}
