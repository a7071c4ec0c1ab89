//! One member's replica of one group: tikv raft-rs's `RawNode`, sans-IO.
//!
//! The driver feeds it ticks, messages and proposals, and after each
//! calls [`Replica::collect`], which hands back everything raft-rs wants
//! done ([`ReplicaOutput`]): messages to send now, writes for the member's
//! log, messages that may only leave once those writes are fsynced, and
//! committed entries to apply. Writes are persisted asynchronously: the
//! member's group-commit writer fsyncs the writes of every group at once
//! and the driver reports [`Replica::persisted`] with the output's number,
//! so one `fdatasync` per round covers them all and raft-rs never counts
//! an entry towards a majority before it is on this member's disk.
//!
//! raft-rs draws election timeouts from the thread's random generator;
//! the replica replaces every draw with one of its own seeded generator,
//! so the same inputs give the same elections (the simulator relies on
//! it).

use raft::eraftpb::{Entry, Message, Snapshot};
use raft::{RawNode, StateRole};

use crate::replication::storage::{GroupStorage, ReplicaWrite};
use crate::replication::{member_of, GroupId, ReplicaId};

/// How one replica runs.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub group: GroupId,
    /// This replica's member (its raft id).
    pub member: ReplicaId,
    /// Every replica of the group, this one included.
    pub voters: Vec<ReplicaId>,
    /// Ticks without a leader's heartbeat before a follower stands for
    /// election (the timeout drawn is between this and twice this).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats: well below `election_ticks`
    /// so that one lost heartbeat does not start an election.
    pub heartbeat_ticks: usize,
    /// Bytes of entries per append message: bounds a message's size and
    /// the memory a slow follower's catch-up takes at once.
    pub message_bytes_max: u64,
    /// Append messages in flight to one follower: bounds what a follower
    /// that stopped answering costs the leader.
    pub inflight_messages_max: usize,
    /// Bytes of proposals not yet committed: beyond it a leader refuses
    /// proposals (the caller answers `Busy`) rather than queueing without
    /// end while a majority is unreachable.
    pub uncommitted_bytes_max: u64,
    /// Seeds the election timeouts.
    pub seed: u64,
    /// The member whose replica should lead when it can (leaders spread
    /// over the members); a leader hands over to it once it has led for
    /// `settle_ticks` and the preferred replica has every entry.
    pub preferred_leader: Option<u32>,
    /// Ticks a leader keeps leading before it hands over: long enough that
    /// a member back from a crash has settled, and that handing over never
    /// becomes churn.
    pub settle_ticks: usize,
}

impl ReplicaConfig {
    /// Sensible defaults for `member`'s replica of `group`.
    pub fn new(group: GroupId, member: ReplicaId, voters: Vec<ReplicaId>, seed: u64) -> Self {
        Self {
            group,
            member,
            voters,
            election_ticks: 10,
            heartbeat_ticks: 2,
            message_bytes_max: 1 << 20,
            inflight_messages_max: 256,
            uncommitted_bytes_max: 64 << 20,
            seed,
            preferred_leader: None,
            settle_ticks: 300,
        }
    }
}

/// Who leads a group, as a replica sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub term: u64,
    /// `None` while an election is under way.
    pub leader: Option<ReplicaId>,
    /// Whether this replica is the leader.
    pub leading: bool,
}

/// What raft-rs wants done after an input.
#[derive(Debug, Default)]
pub struct ReplicaOutput {
    /// Report [`Replica::persisted`] with this once `writes` (and every
    /// earlier output's) are fsynced; `None` when nothing is to be written.
    pub number: Option<u64>,
    pub writes: Vec<ReplicaWrite>,
    /// May leave at once (a leader's appends go out while it writes).
    pub send_now: Vec<Message>,
    /// May only leave once `writes` are durable (votes, append answers).
    pub send_after_writes: Vec<Message>,
    /// Committed entries, in order, to apply to the state machine.
    pub committed: Vec<Entry>,
    /// A snapshot received from the leader: the state machine becomes its
    /// data before any entry in `committed` is applied.
    pub install: Option<Snapshot>,
    /// Reads confirmed by a majority: each may be answered once the
    /// index beside its context is applied.
    pub reads: Vec<(u64, Vec<u8>)>,
    /// Set when the term or the leader changed.
    pub leadership: Option<Leadership>,
}

impl ReplicaOutput {
    pub fn is_empty(&self) -> bool {
        self.number.is_none()
            && self.send_now.is_empty()
            && self.send_after_writes.is_empty()
            && self.committed.is_empty()
            && self.install.is_none()
            && self.reads.is_empty()
            && self.leadership.is_none()
    }
}

/// Why a proposal was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("this replica is not the group's leader (leader: {leader:?})")]
    NotLeader { leader: Option<ReplicaId> },
    #[error("too many proposals wait for a majority")]
    Busy,
}

/// One replica of one group.
pub struct Replica {
    config: ReplicaConfig,
    node: RawNode<GroupStorage>,
    seen: Leadership,
    role_seen: StateRole,
    random: u64,
    /// Ticks led since the last hand-over attempt.
    ticks_leading: usize,
    /// Ticks each follower has been waiting on a snapshot (leader only).
    snapshot_waits: std::collections::BTreeMap<ReplicaId, usize>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Replica")
            .field("group", &self.config.group)
            .field("member", &self.config.member)
            .field("leadership", &self.seen)
            .finish_non_exhaustive()
    }
}

fn discard_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl Replica {
    /// Starts the replica over `storage` (the group's initial storage on a
    /// first start, or what the member's log holds after a restart), with
    /// everything up to `applied` already in the state machine.
    ///
    /// # Errors
    /// A configuration raft-rs refuses, or a storage it cannot start from.
    pub fn start(config: ReplicaConfig, storage: GroupStorage, applied: u64) -> Result<Self, String> {
        let raft_config = raft::Config {
            id: config.member,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied,
            max_size_per_msg: config.message_bytes_max,
            max_inflight_msgs: config.inflight_messages_max,
            max_uncommitted_size: config.uncommitted_bytes_max,
            // A partitioned member does not disturb the term of a healthy
            // majority when it comes back, and a leader cut off from a
            // majority steps down within an election timeout.
            pre_vote: true,
            check_quorum: true,
            ..raft::Config::default()
        };
        raft_config.validate().map_err(|error| error.to_string())?;
        let node = RawNode::new(&raft_config, storage, &discard_logger()).map_err(|error| error.to_string())?;
        let random = config.seed ^ (u64::from(config.group) << 32) ^ config.member;
        let mut replica = Self {
            config,
            node,
            seen: Leadership { term: 0, leader: None, leading: false },
            role_seen: StateRole::Follower,
            random,
            ticks_leading: 0,
            snapshot_waits: std::collections::BTreeMap::new(),
        };
        replica.draw_election_timeout();
        Ok(replica)
    }

    fn next_random(&mut self) -> u64 {
        // SplitMix64: small, seeded, and the same on every platform.
        self.random = self.random.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut mixed = self.random;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        mixed ^ (mixed >> 31)
    }

    /// Draws the next election timeout in [election, 2 x election) ticks:
    /// the preferred leader's from the first third, the others' from the
    /// second half, so that the preferred replica, when it is up, usually
    /// stands first and wins — leadership starts spread over the members
    /// instead of being handed over later (a hand-over in the middle of a
    /// sale refuses proposals and moves every coordinator at once). Without
    /// the preferred replica the others still draw from a range of their
    /// own, so their votes rarely split.
    fn draw_election_timeout(&mut self) {
        let election = self.config.election_ticks as u64;
        let preferred = self.config.preferred_leader == Some(member_of(self.config.member));
        let (from, span) = if preferred {
            (election, (election / 3).max(1))
        } else {
            (election + election / 2, (election - election / 2).max(1))
        };
        let ticks = from + self.next_random() % span;
        self.node.raft.set_randomized_election_timeout(usize::try_from(ticks).expect("small"));
    }

    pub fn group(&self) -> GroupId {
        self.config.group
    }

    pub fn member(&self) -> ReplicaId {
        self.config.member
    }

    pub fn leadership(&self) -> Leadership {
        let raft = &self.node.raft;
        let leader = (raft.leader_id != raft::INVALID_ID).then_some(raft.leader_id);
        Leadership { term: raft.term, leader, leading: raft.state == StateRole::Leader }
    }

    /// The replica this leader is handing leadership to, if any: until the
    /// hand-over ends, raft-rs refuses proposals.
    pub fn handing_over_to(&self) -> Option<ReplicaId> {
        self.node.raft.lead_transferee
    }

    /// The index of the last entry in this replica's log.
    pub fn last_index(&self) -> u64 {
        self.node.raft.raft_log.last_index()
    }

    /// On the leader, how far each replica's log is known to match its
    /// own (its lag is `last_index` minus that); empty on a follower.
    pub fn progress(&self) -> Vec<(ReplicaId, u64)> {
        if self.node.raft.state != StateRole::Leader {
            return Vec::new();
        }
        self.node.raft.prs().iter().map(|(&replica, progress)| (replica, progress.matched)).collect()
    }

    pub fn commit_index(&self) -> u64 {
        self.node.raft.raft_log.committed
    }

    /// The group's storage as held in memory.
    pub fn storage(&self) -> &GroupStorage {
        self.node.store()
    }

    /// One tick of logical time has passed.
    pub fn tick(&mut self) {
        self.node.tick();
        self.unstick_snapshots();
        self.hand_over_to_preferred();
    }

    /// Hands leadership to the preferred replica when this one has led for
    /// a while and the preferred one is caught up (raft's leader transfer:
    /// no election timeout, no term without a leader).
    fn hand_over_to_preferred(&mut self) {
        let raft = &self.node.raft;
        let Some(preferred_member) = self.config.preferred_leader else { return };
        let preferred = raft.prs().conf().voters().ids().iter().find(|&id| member_of(id) == preferred_member);
        let Some(preferred) = preferred else { return };
        if raft.state != StateRole::Leader || preferred == self.config.member {
            self.ticks_leading = 0;
            return;
        }
        self.ticks_leading += 1;
        let caught_up =
            raft.prs().get(preferred).is_some_and(|progress| progress.matched == raft.raft_log.last_index());
        if self.ticks_leading >= self.config.settle_ticks && caught_up && raft.lead_transferee.is_none() {
            self.ticks_leading = 0;
            self.node.transfer_leader(preferred);
        }
    }

    /// A leader that sent a follower a snapshot waits for that follower's
    /// answer before sending it anything else; if the snapshot or the
    /// answer was lost, it would wait for ever. A follower still waiting
    /// after two election timeouts is reported failed, so the leader
    /// probes it again (and sends a newer snapshot if it must).
    fn unstick_snapshots(&mut self) {
        if self.node.raft.state != StateRole::Leader {
            self.snapshot_waits.clear();
            return;
        }
        let waiting: Vec<u64> = self
            .node
            .raft
            .prs()
            .iter()
            .filter(|(_, progress)| progress.state == raft::ProgressState::Snapshot)
            .map(|(&id, _)| id)
            .collect();
        self.snapshot_waits.retain(|id, _| waiting.contains(id));
        let patience = 2 * self.config.election_ticks;
        for id in waiting {
            let ticks = self.snapshot_waits.entry(id).or_insert(0);
            *ticks += 1;
            if *ticks > patience {
                self.snapshot_waits.remove(&id);
                self.node.report_snapshot(id, raft::SnapshotStatus::Failure);
            }
        }
    }

    /// A message from another replica of the group. Messages for another
    /// group or member, or that raft-rs refuses, are dropped: the network
    /// may deliver anything, and raft tolerates loss.
    pub fn step(&mut self, message: Message) {
        if message.to != self.config.member {
            return;
        }
        if let Err(error) = self.node.step(message) {
            tracing::debug!(group = self.config.group, %error, "a raft message was refused");
        }
    }

    /// Proposes `data` as the next entry; returns its index.
    ///
    /// # Errors
    /// Not the leader (with the leader known, if any), or too much waits
    /// for a majority already.
    pub fn propose(&mut self, data: Vec<u8>) -> Result<u64, ProposeError> {
        let leadership = self.leadership();
        if !leadership.leading {
            return Err(ProposeError::NotLeader { leader: leadership.leader });
        }
        let before = self.last_index();
        match self.node.propose(Vec::new(), data) {
            Ok(()) if self.last_index() == before + 1 => Ok(before + 1),
            Ok(()) => unreachable!("a leader's proposal is appended to its log at once"),
            Err(raft::Error::ProposalDropped) if self.leadership().leading => Err(ProposeError::Busy),
            Err(_) => Err(ProposeError::NotLeader { leader: self.leadership().leader }),
        }
    }

    /// Asks a majority to confirm this replica still leads (raft's read
    /// index, the safe variant: a heartbeat round, no reliance on clocks);
    /// the answer comes back in [`ReplicaOutput::reads`] with `context`.
    pub fn read_index(&mut self, context: Vec<u8>) {
        self.node.read_index(context);
    }

    /// Whether a follower needs entries this leader's log no longer holds
    /// (so only a snapshot can bring it up), and the snapshot held is older
    /// than `applied`: a fresh one should be taken. A follower added after
    /// the held snapshot was taken refuses it (it is not in its
    /// configuration), so without a fresh one it would never catch up.
    pub fn needs_fresh_snapshot(&self, applied: u64) -> bool {
        let raft = &self.node.raft;
        let store = self.node.store();
        let first = store.held_snapshot().get_metadata().index + 1;
        raft.state == StateRole::Leader
            && store.held_snapshot().get_metadata().index < applied
            && raft.prs().iter().any(|(&id, progress)| {
                id != self.config.member
                    && (progress.state == raft::ProgressState::Snapshot || progress.next_idx < first)
            })
    }

    /// The voters of the group's configuration as this replica applied it,
    /// and whether it is a joint one (a replacement half done).
    pub fn configuration(&self) -> (Vec<ReplicaId>, bool) {
        let conf = self.node.raft.prs().conf();
        let mut voters: Vec<ReplicaId> = conf.voters().ids().iter().collect();
        voters.sort_unstable();
        (voters, !conf.to_conf_state().voters_outgoing.is_empty())
    }

    /// Whether this replica votes in the group's configuration.
    pub fn is_voter(&self) -> bool {
        self.node.raft.prs().conf().voters().contains(self.config.member)
    }

    /// Replaces `member`'s replica in the configuration with `replica` (a
    /// member that lost its disk and rejoins under a new generation), by
    /// joint consensus: a majority of the old and of the new configuration
    /// decide every entry until the change is done, so the forgotten
    /// replica's votes and entries can never be counted twice. Only a
    /// leader with no other change in progress proposes it; the member
    /// asks again until it is a voter.
    pub fn propose_replacement(&mut self, member: u32, replica: ReplicaId) {
        let raft = &self.node.raft;
        let voters = raft.prs().conf().voters().ids();
        let old: Vec<u64> = voters.iter().filter(|&id| member_of(id) == member && id != replica).collect();
        if raft.state != StateRole::Leader || raft.has_pending_conf() || voters.contains(replica) || old.len() != 1 {
            return;
        }
        let changes = vec![
            raft::prelude::ConfChangeSingle {
                change_type: raft::prelude::ConfChangeType::RemoveNode,
                node_id: old[0],
                ..Default::default()
            },
            raft::prelude::ConfChangeSingle {
                change_type: raft::prelude::ConfChangeType::AddNode,
                node_id: replica,
                ..Default::default()
            },
        ];
        let change = raft::prelude::ConfChangeV2 {
            transition: raft::prelude::ConfChangeTransition::Auto,
            changes: changes.into(),
            ..Default::default()
        };
        if let Err(error) = self.node.propose_conf_change(Vec::new(), change) {
            tracing::debug!(group = self.config.group, %error, "a replacement was refused");
        }
    }

    /// Applies a committed membership change entry.
    ///
    /// # Errors
    /// An entry that does not decode, or a change raft-rs refuses.
    pub fn apply_conf_change(&mut self, entry: &Entry) -> Result<(), String> {
        use protobuf::Message as _;
        let change = match entry.get_entry_type() {
            raft::eraftpb::EntryType::EntryConfChangeV2 => {
                raft::prelude::ConfChangeV2::parse_from_bytes(&entry.data).map_err(|error| error.to_string())?
            }
            raft::eraftpb::EntryType::EntryConfChange => {
                let change =
                    raft::prelude::ConfChange::parse_from_bytes(&entry.data).map_err(|error| error.to_string())?;
                raft_proto::ConfChangeI::into_v2(change)
            }
            raft::eraftpb::EntryType::EntryNormal => return Ok(()),
        };
        let conf_state = self.node.apply_conf_change(&change).map_err(|error| error.to_string())?;
        self.node.mut_store().set_conf_state(conf_state);
        Ok(())
    }

    /// Stands for election now (an operator's or a test's choice).
    pub fn campaign(&mut self) {
        if let Err(error) = self.node.campaign() {
            tracing::debug!(group = self.config.group, %error, "campaign refused");
        }
    }

    /// The state machine has applied every committed entry up to `index`
    /// (told after applying them: raft-rs acts on what is applied — a
    /// leader leaves a joint configuration once it sees the entry that
    /// entered it applied, and told before, it never left).
    pub fn applied_to(&mut self, index: u64) {
        let raft_log = &self.node.raft.raft_log;
        if index > raft_log.applied && index <= raft_log.committed.min(raft_log.persisted) {
            self.node.advance_apply_to(index);
        }
    }

    /// The writes of the output numbered `number` (and every earlier one)
    /// are fsynced.
    pub fn persisted(&mut self, number: u64) {
        self.node.on_persist_ready(number);
    }

    /// The state machine holds a snapshot at `index`: entries before it may
    /// go from the log. Returns the writes that record it.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Vec<ReplicaWrite> {
        let Some(snapshot) = self.node.store().snapshot_taken(index, data) else { return Vec::new() };
        let writes = vec![ReplicaWrite::Snapshot(snapshot), ReplicaWrite::Compact { index }];
        for write in &writes {
            self.node.mut_store().apply(write).expect("a snapshot of applied state fits the log");
        }
        writes
    }

    /// Everything raft-rs wants done now.
    pub fn collect(&mut self) -> ReplicaOutput {
        let mut output = ReplicaOutput::default();
        while self.node.has_ready() {
            // A snapshot replaces the state machine: the entries committed
            // before it must be applied first, so it waits for the next call.
            let snapshot_pending = self.node.snap().is_some_and(|snapshot| !snapshot.is_empty());
            if snapshot_pending && (!output.committed.is_empty() || output.install.is_some()) {
                break;
            }
            let mut ready = self.node.ready();
            output.send_now.extend(ready.take_messages());
            output.reads.extend(ready.take_read_states().into_iter().map(|read| (read.index, read.request_ctx)));
            let mut writes = Vec::new();
            if !ready.snapshot().is_empty() {
                let snapshot = ready.snapshot().clone();
                writes.push(ReplicaWrite::Snapshot(snapshot.clone()));
                output.install = Some(snapshot);
            }
            output.committed.extend(ready.take_committed_entries());
            let entries = ready.take_entries();
            if !entries.is_empty() {
                writes.push(ReplicaWrite::Entries(entries));
            }
            if let Some(hard_state) = ready.hs() {
                writes.push(ReplicaWrite::HardState(hard_state.clone()));
            }
            for write in &writes {
                // The mirror follows at once: raft-rs reads its log from it.
                self.node.mut_store().apply(write).expect("raft-rs writes what follows its own log");
            }
            output.writes.extend(writes);
            output.send_after_writes.extend(ready.take_persisted_messages());
            if !output.writes.is_empty() {
                output.number = Some(ready.number());
            }
            if let Some(snapshot) = &output.install {
                // A snapshot only reaches a follower, and is committed
                // data: raft-rs is told at once that it is persisted, so
                // that it counts it applied before anything reads the log
                // from its old applied index (which the snapshot removed).
                // The follower's answers still wait for the fsync (they
                // are `send_after_writes`), so the leader learns nothing
                // before it is durable.
                let index = snapshot.get_metadata().index;
                let mut light = self.node.advance_append(ready);
                self.node.advance_apply_to(index);
                output.send_after_writes.extend(light.take_messages());
                output.committed.extend(light.take_committed_entries());
            } else {
                self.node.advance_append_async(ready);
            }
        }
        let now = self.leadership();
        let role = self.node.raft.state;
        if now.term != self.seen.term || now.leader != self.seen.leader || role != self.role_seen {
            if now.term != self.seen.term || role != self.role_seen {
                self.draw_election_timeout();
            }
            self.seen = now;
            self.role_seen = role;
            output.leadership = Some(now);
        }
        output
    }
}
