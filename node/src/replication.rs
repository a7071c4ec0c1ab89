//! The driver of the member's replication groups: one task owns every
//! [`GroupMachine`] this member holds (the engine's pure raft replica and
//! state machine, the same the simulator runs) and feeds it requests, raft
//! messages, part steps, durability and ticks; it carries out what the
//! machines ask — writes to the member's one raft log ([`crate::raft_log`],
//! on a thread of its own: one `fdatasync` per round for every group),
//! raft messages and part steps to other members (one batch per peer per
//! round, on a unidirectional QUIC stream), answers to callers.
//!
//! Nothing a machine decides leaves before it may: a vote or an append's
//! answer (`RaftAfterWrites`) waits until every write handed out before it
//! is synced, and a machine hears that its writes are durable only after
//! the sync returned. A failed write or sync stops the member (raft was
//! promised something the disk may not hold).
//!
//! Time: the task reads the wall clock once per round and hands it to the
//! machines as `now_ms` (expiry, TTLs); raft's own timing is in ticks of
//! [`TICK_MS`], so a stalled task delays elections instead of starting them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use flashstock_client::routing::{group_of_partition, preferred_leaders, replicas_of};
use flashstock_client::wire::{
    GroupLeader, ProbedGroup, Refusal, RequestBody, Response, WirePartAnswer, WirePartRequest,
};
use flashstock_engine::coordination::{
    CallerId, ClientAnswer, ClientRequest, CoordinatorConfig, PartMessage, PartReply, Placement,
};
use flashstock_engine::log::replay::{ReplayRules, ReplayedState};
use flashstock_engine::replication::codec::{decode_message, encode_message_into};
use flashstock_engine::replication::{
    member_of, replica_id, AdminRequest, EncodedSnapshot, GroupConfig, GroupId, GroupMachine, GroupOutput, RaftMessage,
    ReplicaConfig, ReplicaWrite, SnapshotPolicy,
};
use flashstock_engine::{Clock, EngineError, Limits, OrderError, OrderId, SkuId, StockSnapshot};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::peers::Peers;
use crate::raft_log::{frame_write, RaftLog};
use crate::translate::{
    engine_refusal, order_refusal, part_answer, part_request, wire_part_answer_unnamed, wire_part_request,
};

/// One raft tick. Elections time out after 10 to 20 ticks without a
/// leader's word (300 to 600 ms), heartbeats go every 2 ticks: slow enough
/// that a loaded 2-core machine does not start elections by itself, fast
/// enough that a dead leader is replaced well within two seconds.
pub const TICK_MS: u64 = 30;
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 2;
/// Ticks a leader that is not its group's preferred one leads before it
/// hands over (3 s): a member back from a crash, once caught up, takes its
/// groups back soon, and a fresh cluster whose first elections went to
/// whoever started first spreads its leaders before a sale begins.
const SETTLE_TICKS: usize = 100;
/// Inputs waiting for the driver; a request beyond it is refused `Busy`.
const INBOX_CAPACITY: usize = 16_384;
/// Inputs taken per round before the machines' outputs are carried out:
/// bounds a round's latency and the batch one fsync covers.
const ROUND_INPUTS_MAX: usize = 1_024;
/// Batches waiting to be sent to one peer; beyond it batches are dropped
/// (raft sends again; a peer that cannot keep up must not grow our memory).
const PEER_QUEUE_BATCHES_MAX: usize = 256;
/// How long a peer may take to answer a start's probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// The file (in the raft directory) naming this member's generation.
const GENERATION_FILE: &str = "generation";

/// How long one batch may take to leave before it counts as lost.
const PEER_SEND_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Bytes of one batch from a peer read at most (a snapshot of a group is
/// the largest thing in one).
pub const PEER_BATCH_BYTES_MAX: usize = 256 << 20;
/// When a group snapshots (see `SnapshotPolicy`): after 20,000 entries at
/// least, once the entries held since the last take four times its bytes
/// (at one, snapshots were 15% of a loaded member's CPU; at four, a
/// restart replays at most four snapshots' worth of entries), or 256 MiB
/// (every replica holds them in memory).
const SNAPSHOT_POLICY: SnapshotPolicy =
    SnapshotPolicy { entries_min: 20_000, log_bytes_per_snapshot_byte: 4, entry_bytes_max: 256 << 20 };
/// The raft log is rewritten from the groups' live state once it holds
/// this many times the bytes that state took at the last rewrite (and at
/// least [`REWRITE_BYTES_MIN`]). A rewrite copies the whole live state, so
/// it costs 1 / (multiple - 1) of a copy per byte appended: at 2 it copied
/// as much as was appended, framing and page faults of a fresh buffer were
/// a tenth of a loaded member's CPU, and every rewrite stalled the
/// member's syncs. At 4 the file holds at most four times what a restart
/// needs.
const REWRITE_LIVE_MULTIPLE: u64 = 4;
/// See [`REWRITE_LIVE_MULTIPLE`]: a small log is not rewritten for the
/// sake of a few megabytes.
const REWRITE_BYTES_MIN: u64 = 64 << 20;
/// A job's buffer larger than this (a rewrite's, a snapshot's round) is
/// let go rather than kept for the next round.
const SPARE_BUFFER_BYTES_MAX: usize = 16 << 20;
/// A snapshot, a log job or a round of the driver taking this long is
/// logged: every group on the member waits for it, and past an election
/// timeout followers start elections.
const SLOW_STEP: Duration = Duration::from_millis(100);
/// How often an idle log thread looks whether a rewrite is written.
const REWRITE_POLL: Duration = Duration::from_millis(50);
/// How often the view for status pages and the handshake is refreshed.
const VIEW_EVERY_TICKS: u64 = 5;
/// Callers' ids of part steps from other members carry this bit (the rest
/// is the member's id), apart from this member's own callers.
const PART_CALLER: CallerId = 1 << 63;

/// What the server asks of a group.
#[derive(Debug)]
pub enum GroupRequest {
    Order(ClientRequest),
    Read(SkuId),
    Admin(AdminRequest),
}

/// A group's answer to a [`GroupRequest`].
#[derive(Debug)]
pub enum GroupAnswer {
    Order(ClientAnswer),
    Read(Result<StockSnapshot, OrderError>),
    Admin(Result<StockSnapshot, EngineError>),
}

/// What the driver needs to start.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    pub own: u32,
    pub members: Vec<u32>,
    pub partition_count: u32,
    pub group_count: u32,
    pub factor: u32,
    pub limits: Limits,
    pub orders_max: usize,
    pub data_directory: std::path::PathBuf,
}

/// One group as this member sees it, for status pages and the handshake.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GroupView {
    pub group: GroupId,
    pub replicas: Vec<u32>,
    pub preferred_leader: u32,
    /// Whether this member holds a replica of the group.
    pub held_here: bool,
    pub leader: Option<u32>,
    pub term: u64,
    pub leading: bool,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    /// On the leader: entries each replica is behind its log.
    pub lag: Vec<(u32, u64)>,
    /// The raft ids of the voters (member and generation), as this
    /// replica knows the configuration.
    pub voters: Vec<u64>,
    pub skus: u64,
    pub available: u64,
    pub held: u64,
    pub sold: u64,
}

/// What the driver publishes for the rest of the member.
#[derive(Debug, Clone, Default, Serialize)]
pub struct View {
    pub groups: Vec<GroupView>,
    pub log_bytes: u64,
    pub syncs: u64,
    pub writes_synced: u64,
}

/// Between members: what one round sends one peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerItem {
    /// A part step for the participant of `group`.
    Part { group: GroupId, order: String, attempt: String, step: u64, request: WirePartRequest },
    /// The participant of `group` answered a step of an order homed in
    /// the receiver's group.
    PartReply { group: GroupId, order: String, attempt: String, step: u64, answer: WirePartAnswer },
    /// The receiver sent a part step for `group` here, but `leader` leads it.
    PartNotLeader { group: GroupId, leader: Option<u32> },
    /// The sender lost its disk: its replica `replica` (a new generation)
    /// asks to take its old one's place in `group`.
    Replace { group: GroupId, replica: u64 },
}

/// What one round sends one peer.
#[derive(Debug, Default, PartialEq)]
pub struct PeerBatch {
    pub raft: Vec<(GroupId, RaftMessage)>,
    pub items: Vec<PeerItem>,
}

/// A batch's items: raft messages in raft-rs's own encoding (most of the
/// bytes), the rest in MessagePack.
const ITEM_RAFT: u8 = 1;
const ITEM_OTHER: u8 = 2;

enum Input {
    Call {
        group: GroupId,
        request: GroupRequest,
        reply: oneshot::Sender<Result<GroupAnswer, Refusal>>,
    },
    Peer {
        from: u32,
        raft: Vec<(GroupId, RaftMessage)>,
        items: Vec<PeerItem>,
    },
    /// A group's snapshot, imaged by the driver and encoded on a blocking
    /// thread (see `flashstock_engine::replication::SnapshotImage`).
    SnapshotEncoded {
        group: GroupId,
        encoded: EncodedSnapshot,
    },
    /// The log thread synced the writes through `through`; `buffer` is
    /// the job's, emptied, for the driver to frame the next round into;
    /// the file now holds `file_bytes`.
    Synced {
        through: u64,
        elapsed: Duration,
        buffer: Vec<u8>,
        file_bytes: u64,
    },
    /// A rewrite took the log's name; the live state took `live_bytes`.
    Rewritten {
        live_bytes: u64,
    },
}

impl Input {
    /// What the input is, for the slow-round warning.
    fn kind(&self) -> &'static str {
        match self {
            Input::Call { request: GroupRequest::Order(_), .. } => "order request",
            Input::Call { request: GroupRequest::Read(_), .. } => "read",
            Input::Call { request: GroupRequest::Admin(_), .. } => "admin request",
            Input::Peer { .. } => "peer messages",
            Input::SnapshotEncoded { .. } => "snapshot encoded",
            Input::Synced { .. } => "log synced",
            Input::Rewritten { .. } => "log rewritten",
        }
    }
}

/// The handle the server uses; cheap to share.
#[derive(Debug)]
pub struct Replication {
    own: u32,
    /// The groups this member holds a replica of (fixed: placement is).
    held: std::collections::BTreeSet<GroupId>,
    partition_count: u32,
    group_count: u32,
    factor: u32,
    inbox: mpsc::Sender<Input>,
    view: Arc<RwLock<View>>,
    stopping: Arc<AtomicBool>,
    /// Whether the raft log held anything when the member started.
    has_state: Arc<AtomicBool>,
    /// The other members' lives at the first start this member decided
    /// (every member without state), if it decided one in this life.
    first_start_with: Arc<RwLock<BTreeMap<u32, u64>>>,
    /// This member's life (see [`Peers::boot`]).
    boot: u64,
}

struct LogJob {
    /// Framed writes to append.
    framed: Vec<u8>,
    /// Every group's live state as of these writes, to rewrite the log
    /// from (a compaction) while later jobs go on being appended. Cloned
    /// cheaply (entries' and snapshots' data are shared buffers) and
    /// framed on the rewrite's thread, not the driver, which every group
    /// on the member waits for.
    rewrite: Option<Vec<(GroupId, ReplicaWrite)>>,
    through: u64,
}

struct Driver {
    own: u32,
    placement: Placement,
    replicas: BTreeMap<GroupId, Vec<u32>>,
    machines: BTreeMap<GroupId, GroupMachine>,
    clock: Arc<dyn Clock>,
    callers: HashMap<CallerId, (GroupId, oneshot::Sender<Result<GroupAnswer, Refusal>>)>,
    next_caller: CallerId,
    /// Who leads each group, as far as this member knows (for groups it
    /// does not hold, and for part steps).
    leaders: BTreeMap<GroupId, (Option<u32>, u64)>,
    /// Writes framed since the last job went to the log thread.
    framed: Vec<u8>,
    /// The buffer of the last job, back from the log thread: the next
    /// round frames into it. (A fresh buffer per round grew page by page
    /// out of memory the allocator had returned to the system: the kernel
    /// zeroing those pages was a tenth of a loaded member's CPU.)
    spare_buffer: Vec<u8>,
    /// Writes handed out so far, and how many of them are durable.
    written: u64,
    synced: u64,
    sync_in_flight: bool,
    log_jobs: std::sync::mpsc::SyncSender<LogJob>,
    /// Messages that may leave once `synced` reaches the count beside them.
    held_back: Vec<(u64, u32, RaftMessage, GroupId)>,
    /// Groups' persisted numbers, reported once `synced` reaches the count.
    persist: Vec<(u64, GroupId, u64)>,
    /// Per peer, what this round sends it.
    outgoing: BTreeMap<u32, PeerBatch>,
    senders: BTreeMap<u32, mpsc::Sender<Vec<u8>>>,
    view: Arc<RwLock<View>>,
    ticks: u64,
    /// Bytes in the log file, as of the last sync.
    log_bytes: u64,
    live_bytes_at_rewrite: u64,
    /// A rewrite is under way (until the log thread reports it done).
    rewriting: bool,
    syncs: u64,
    /// Anomalies of each group already logged.
    anomalies_reported: BTreeMap<GroupId, usize>,
    peers: Arc<Peers>,
    /// This member's replicas' generation (see `replica_id`): bumped when
    /// it starts again after losing its disk.
    generation: u32,
    generation_path: std::path::PathBuf,
    /// Groups whose configuration does not yet count this member's replica
    /// of the current generation, with ticks until it asks again.
    rejoining: BTreeMap<GroupId, u32>,
    initial: ReplayedState,
    /// Shared with [`Replication::probe_answer`].
    first_start_with: Arc<RwLock<BTreeMap<u32, u64>>>,
    /// Where snapshots encoded off the driver's thread come back.
    encoded_snapshots: mpsc::Sender<Input>,
    /// Groups whose snapshot is being encoded (one at a time per group).
    encoding: std::collections::BTreeSet<GroupId>,
}

impl Replication {
    /// Reads the member's raft log, starts a replica of every group the
    /// member holds and the task that drives them.
    ///
    /// # Errors
    /// The log cannot be read, or holds writes no replica of ours made.
    pub fn start(config: ReplicationConfig, peers: Arc<Peers>, clock: Arc<dyn Clock>) -> anyhow::Result<Arc<Self>> {
        let directory = config.data_directory.join("raft");
        let (log, recovered) = RaftLog::open(&directory)?;
        tracing::info!(records = recovered.records, cut_bytes = recovered.cut_bytes, "raft log read");
        let placement = Placement::new(
            (0..config.partition_count).map(|partition| group_of_partition(partition, config.group_count)).collect(),
        );
        let preferred = preferred_leaders(config.group_count, &config.members, config.factor as usize);
        let rules = ReplayRules { partition_count: config.partition_count, limits_unrecorded: Limits::default() };
        let initial = ReplayedState::empty(rules.clone());
        let generation_path = directory.join(GENERATION_FILE);
        let generation = read_generation(&generation_path)?;
        // No log and no generation: a first start, or a member whose disk
        // was lost — its peers tell which, before any replica starts.
        let needs_probe = recovered.records == 0 && generation.is_none();
        let mut replicas = BTreeMap::new();
        let mut pending = BTreeMap::new();
        for group in 1..=config.group_count {
            let members = replicas_of(group, &config.members, config.factor as usize);
            let preferred_leader = preferred[group as usize - 1];
            if members.contains(&config.own) {
                let mut voters: Vec<u64> = members.iter().map(|&member| replica_id(member, 0)).collect();
                voters.sort_unstable();
                let mut replica = ReplicaConfig::new(
                    group,
                    replica_id(config.own, 0),
                    voters,
                    u64::from(config.own) << 32 | u64::from(group),
                );
                replica.election_ticks = ELECTION_TICKS;
                replica.heartbeat_ticks = HEARTBEAT_TICKS;
                replica.preferred_leader = Some(preferred_leader);
                replica.settle_ticks = SETTLE_TICKS;
                let coordinator = CoordinatorConfig {
                    own: group,
                    placement: placement.clone(),
                    limits: config.limits.clone(),
                    orders_max: config.orders_max,
                    part_answer_ms_max: 2_000,
                    resend_pause_ms_min: 20,
                    resend_pause_ms_max: 500,
                };
                let group_config = GroupConfig {
                    replica,
                    coordinator,
                    rules: rules.clone(),
                    limits_in_force: Some(config.limits.clone()),
                };
                let writes = recovered.writes.get(&group).cloned().unwrap_or_default();
                pending.insert(group, (group_config, writes));
            }
            replicas.insert(group, members);
        }
        let (inbox, receiver) = mpsc::channel(INBOX_CAPACITY);
        let stopping = Arc::new(AtomicBool::new(false));
        let view = Arc::new(RwLock::new(View::default()));
        let log_jobs = start_log_thread(log, inbox.clone(), stopping.clone());
        let encoded_snapshots = inbox.clone();
        let mut senders = BTreeMap::new();
        for &member in config.members.iter().filter(|&&member| member != config.own) {
            let (sender, queue) = mpsc::channel(PEER_QUEUE_BATCHES_MAX);
            tokio::spawn(send_to_peer(peers.clone(), member, queue));
            senders.insert(member, sender);
        }
        let has_state = Arc::new(AtomicBool::new(recovered.records > 0));
        let first_start_with = Arc::new(RwLock::new(BTreeMap::new()));
        let mut driver = Driver {
            own: config.own,
            placement,
            replicas,
            machines: BTreeMap::new(),
            clock,
            callers: HashMap::new(),
            next_caller: 1,
            leaders: BTreeMap::new(),
            framed: Vec::new(),
            spare_buffer: Vec::new(),
            written: 0,
            synced: 0,
            sync_in_flight: false,
            log_jobs,
            held_back: Vec::new(),
            persist: Vec::new(),
            outgoing: BTreeMap::new(),
            senders,
            view: view.clone(),
            ticks: 0,
            log_bytes: 0,
            live_bytes_at_rewrite: 0,
            rewriting: false,
            syncs: 0,
            anomalies_reported: BTreeMap::new(),
            peers: peers.clone(),
            generation: generation.unwrap_or(0),
            generation_path,
            rejoining: BTreeMap::new(),
            initial,
            first_start_with: first_start_with.clone(),
            encoded_snapshots,
            encoding: std::collections::BTreeSet::new(),
        };
        let pending_groups = pending.keys().copied().collect();
        let pending = if needs_probe {
            Some(pending)
        } else {
            driver.start_machines(pending).with_context(|| format!("starting from {}", directory.display()))?;
            None
        };
        let handle = Arc::new(Self {
            own: config.own,
            held: pending_groups,
            partition_count: config.partition_count,
            group_count: config.group_count,
            factor: config.factor,
            inbox,
            view,
            stopping: stopping.clone(),
            has_state,
            first_start_with,
            boot: peers.boot(),
        });
        tokio::spawn(driver.run(receiver, stopping, pending));
        Ok(handle)
    }

    pub fn group_of_partition(&self, partition: u32) -> GroupId {
        group_of_partition(partition, self.group_count)
    }

    pub fn factor(&self) -> u32 {
        self.factor
    }

    pub fn group_count(&self) -> u32 {
        self.group_count
    }

    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    /// Whether this member holds a replica of `group`.
    pub fn holds(&self, group: GroupId) -> bool {
        self.held.contains(&group)
    }

    /// The latest view of every group.
    pub fn view(&self) -> View {
        self.view.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Each group's leader and term as this member knows them.
    pub fn leaders(&self) -> Vec<GroupLeader> {
        self.view()
            .groups
            .iter()
            .map(|group| GroupLeader { group: group.group, leader: group.leader, term: group.term })
            .collect()
    }

    /// The refusal for a group this member does not hold: the leader if
    /// known, else the preferred one.
    pub fn not_here(&self, group: GroupId) -> Refusal {
        let view = self.view();
        let known = view.groups.iter().find(|view| view.group == group);
        let leader = known.and_then(|view| view.leader).or_else(|| known.map(|view| view.preferred_leader));
        let term = known.filter(|view| view.leader.is_some()).map_or(0, |view| view.term);
        Refusal::NotLeader { group, leader, term }
    }

    /// Asks `group`'s replica here; `NotLeader` if it does not lead.
    pub async fn call(&self, group: GroupId, request: GroupRequest) -> Result<GroupAnswer, Refusal> {
        if !self.holds(group) {
            return Err(self.not_here(group));
        }
        if self.stopping.load(Ordering::Acquire) {
            return Err(Refusal::Unavailable { reason: format!("member {} is stopping", self.own) });
        }
        let (reply, answer) = oneshot::channel();
        if self.inbox.try_send(Input::Call { group, request, reply }).is_err() {
            return Err(Refusal::Busy { retry_after_ms: 20 });
        }
        answer.await.unwrap_or_else(|_| Err(Refusal::Unavailable { reason: "the replication task stopped".to_owned() }))
    }

    /// An order request, answered for the wire.
    pub async fn order(&self, request: ClientRequest, home_partition: u32) -> Result<ClientAnswer, Refusal> {
        match self.call(self.group_of_partition(home_partition), GroupRequest::Order(request)).await? {
            GroupAnswer::Order(ClientAnswer::Refused(error)) => Err(order_refusal(error)),
            GroupAnswer::Order(answer) => Ok(answer),
            other => Err(unexpected(&other)),
        }
    }

    /// A linearizable read of a SKU's counts.
    pub async fn read(&self, partition: u32, sku: SkuId) -> Result<StockSnapshot, Refusal> {
        match self.call(self.group_of_partition(partition), GroupRequest::Read(sku)).await? {
            GroupAnswer::Read(answer) => answer.map_err(order_refusal),
            other => Err(unexpected(&other)),
        }
    }

    /// An operator's change to a SKU.
    pub async fn admin(&self, partition: u32, request: AdminRequest) -> Result<StockSnapshot, Refusal> {
        match self.call(self.group_of_partition(partition), GroupRequest::Admin(request)).await? {
            GroupAnswer::Admin(answer) => answer.map_err(engine_refusal),
            other => Err(unexpected(&other)),
        }
    }

    /// A batch a peer sent (see [`encode_batch`]); bytes that do not
    /// decode are dropped with a warning (raft sends again).
    pub fn deliver(&self, from: u32, bytes: &[u8]) {
        match decode_batch(bytes) {
            Ok(PeerBatch { raft, items }) => {
                // Full: dropped, like a lost packet; raft and the
                // coordinators send again.
                let _ = self.inbox.try_send(Input::Peer { from, raft, items });
            }
            Err(error) => tracing::warn!(member = from, %error, "a peer's batch did not decode"),
        }
    }

    /// What this member tells a peer, `asker` in its life `asker_boot`,
    /// that starts without a raft log (see `Driver::probe`).
    pub fn probe_answer(&self, asker: u32, asker_boot: u64) -> Response {
        let view = self.view();
        let elected = view.groups.iter().any(|group| group.held_here && group.term > 0);
        let groups = view
            .groups
            .iter()
            .filter(|group| group.held_here)
            .map(|group| ProbedGroup { group: group.group, voters: group.voters.clone() })
            .collect();
        let started_with_you =
            self.first_start_with.read().unwrap_or_else(PoisonError::into_inner).get(&asker) == Some(&asker_boot);
        Response::ReplicaProbe {
            has_state: self.has_state.load(Ordering::Acquire) || elected,
            groups,
            boot: self.boot,
            started_with_you,
        }
    }

    /// Stops taking requests and stops the task (what is synced stays).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }
}

fn unexpected(answer: &GroupAnswer) -> Refusal {
    Refusal::Unavailable { reason: format!("internal: unexpected answer {answer:?}") }
}

fn read_generation(path: &std::path::Path) -> anyhow::Result<Option<u32>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let generation = text.trim().parse().with_context(|| format!("{} is not a generation", path.display()))?;
            Ok(Some(generation))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

/// Records the generation durably before any replica of it starts.
fn write_generation(path: &std::path::Path, generation: u32) -> std::io::Result<()> {
    use std::io::Write as _;
    let temporary = path.with_extension("new");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(format!("{generation}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(directory) = path.parent() {
        std::fs::File::open(directory)?.sync_all()?;
    }
    Ok(())
}

/// A peer batch's bytes: items each `kind (u8) | length (u32 LE) | bytes`.
pub fn encode_batch(raft: &[(GroupId, RaftMessage)], items: &[PeerItem]) -> Vec<u8> {
    let mut out = Vec::new();
    // Each item is encoded in place after its header, whose length is
    // filled in after.
    let mut put = |kind: u8, encode: &mut dyn FnMut(&mut Vec<u8>)| {
        out.push(kind);
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        encode(&mut out);
        let length = u32::try_from(out.len() - at - 4).expect("an item fits a u32");
        out[at..at + 4].copy_from_slice(&length.to_le_bytes());
    };
    for (group, message) in raft {
        put(ITEM_RAFT, &mut |out| encode_message_into(*group, message, out));
    }
    for item in items {
        put(ITEM_OTHER, &mut |out| {
            rmp_serde::encode::write_named(out, item).expect("peer items encode");
        });
    }
    out
}

/// A peer batch from its bytes (public for the fuzz target).
///
/// # Errors
/// Bytes [`encode_batch`] did not make.
pub fn decode_batch(mut bytes: &[u8]) -> anyhow::Result<PeerBatch> {
    let (mut raft, mut items) = (Vec::new(), Vec::new());
    while !bytes.is_empty() {
        anyhow::ensure!(bytes.len() >= 5, "an item header is cut short");
        let kind = bytes[0];
        let length = u32::from_le_bytes(bytes[1..5].try_into().expect("4 bytes")) as usize;
        anyhow::ensure!(bytes.len() - 5 >= length, "an item of {length} bytes is cut short");
        let item = &bytes[5..5 + length];
        match kind {
            ITEM_RAFT => raft.push(decode_message(item)?),
            ITEM_OTHER => items.push(flashstock_client::wire::decode_payload::<PeerItem>(item)?),
            other => anyhow::bail!("unknown item kind {other}"),
        }
        bytes = &bytes[5 + length..];
    }
    Ok(PeerBatch { raft, items })
}

/// Bytes of batches sent to a peer in one frame at most: what queued
/// while the last frame was being written goes out together, up to this.
const PEER_FRAME_BYTES_MAX: usize = 8 << 20;
/// Batches taken off a peer's queue for one frame at most.
const PEER_FRAME_BATCHES_MAX: usize = 256;

/// Sends the batches queued for `member` in order on one long-lived
/// unidirectional stream per connection, each frame `length (u32 LE) |
/// batches`; whatever queued while a frame was being written goes in the
/// next, so a slow link sends fewer, larger frames instead of a queue of
/// streams. (A stream per batch, read by a task per stream, delivered
/// appends out of order and queued heartbeats behind appends: under load
/// followers refused the appends as gaps, leaders fell back to resending
/// megabytes, heartbeats came late and leaders changed every few
/// seconds.) A frame that cannot be written in time resets the stream: the
/// peer never sees a frame cut short, and the next frame opens a new one.
async fn send_to_peer(peers: Arc<Peers>, member: u32, mut queue: mpsc::Receiver<Vec<u8>>) {
    let mut stream: Option<(usize, quinn::SendStream)> = None;
    let mut batches = Vec::with_capacity(PEER_FRAME_BATCHES_MAX);
    let mut pending = std::collections::VecDeque::with_capacity(PEER_FRAME_BATCHES_MAX);
    // One buffer for every frame (see `Driver::spare_buffer`).
    let mut frame = Vec::new();
    loop {
        if pending.is_empty() {
            if queue.recv_many(&mut batches, PEER_FRAME_BATCHES_MAX).await == 0 {
                return;
            }
            pending.extend(batches.drain(..));
        }
        frame.clear();
        frame.extend_from_slice(&[0u8; 4]);
        while let Some(batch) = pending.front() {
            if frame.len() > 4 && frame.len() + batch.len() > PEER_FRAME_BYTES_MAX {
                break;
            }
            frame.extend_from_slice(&pending.pop_front().expect("looked at"));
        }
        let length = u32::try_from(frame.len() - 4).expect("a frame is bounded");
        frame[..4].copy_from_slice(&length.to_le_bytes());
        let Some(connection) = peers.connection(member) else {
            stream = None;
            continue;
        };
        if stream.as_ref().is_none_or(|(id, _)| *id != connection.stable_id()) {
            match tokio::time::timeout(PEER_SEND_TIMEOUT, connection.open_uni()).await {
                Ok(Ok(opened)) => stream = Some((connection.stable_id(), opened)),
                _ => {
                    tracing::debug!(member, "no stream to a peer in time; a frame was lost");
                    stream = None;
                    continue;
                }
            }
        }
        let (_, open) = stream.as_mut().expect("opened above");
        match tokio::time::timeout(PEER_SEND_TIMEOUT, open.write_all(&frame)).await {
            Ok(Ok(())) => {}
            outcome => {
                tracing::debug!(member, ?outcome, "a frame to a peer was lost");
                if let Some((_, mut broken)) = stream.take() {
                    let _ = broken.reset(0u8.into());
                }
            }
        }
    }
}

/// Reads the frames of one stream [`send_to_peer`] opened, in order,
/// handing each to `deliver`, until the stream ends or breaks.
pub async fn read_peer_frames(mut stream: quinn::RecvStream, mut deliver: impl FnMut(&[u8])) {
    let mut header = [0u8; 4];
    let mut frame = Vec::new();
    loop {
        if stream.read_exact(&mut header).await.is_err() {
            return;
        }
        let length = u32::from_le_bytes(header) as usize;
        if length > PEER_BATCH_BYTES_MAX {
            tracing::warn!(length, "a peer's frame is larger than allowed; the stream is dropped");
            let _ = stream.stop(0u8.into());
            return;
        }
        frame.resize(length, 0);
        if stream.read_exact(&mut frame).await.is_err() {
            return;
        }
        deliver(&frame);
    }
}

/// The thread that writes and syncs the raft log: each job is appended
/// (or replaces the file) and synced, then reported to the driver.
fn start_log_thread(
    mut log: RaftLog,
    inbox: mpsc::Sender<Input>,
    stopping: Arc<AtomicBool>,
) -> std::sync::mpsc::SyncSender<LogJob> {
    let (jobs, receiver) = std::sync::mpsc::sync_channel::<LogJob>(4);
    std::thread::Builder::new()
        .name("raft-log".to_owned())
        .spawn(move || {
            loop {
                let mut job = match receiver.recv_timeout(REWRITE_POLL) {
                    Ok(job) => Some(job),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                };
                let started = Instant::now();
                let appended = match &mut job {
                    Some(job) => {
                        log.append(&job.framed).and_then(|()| log.sync()).and_then(|()| match job.rewrite.take() {
                            Some(live) => log.begin_rewrite(live),
                            None => Ok(()),
                        })
                    }
                    None => Ok(()),
                };
                let live_bytes = match appended.and_then(|()| log.finish_rewrite(false)) {
                    Ok(live_bytes) => live_bytes,
                    Err(error) => {
                        // Raft was promised these writes: a member that
                        // cannot keep them must not go on voting or
                        // acknowledging.
                        tracing::error!(%error, "the raft log failed; the member stops");
                        stopping.store(true, Ordering::Release);
                        std::process::exit(70);
                    }
                };
                if let Some(live_bytes) = live_bytes {
                    if inbox.blocking_send(Input::Rewritten { live_bytes }).is_err() {
                        return;
                    }
                }
                let Some(job) = job else { continue };
                let elapsed = started.elapsed();
                metrics::histogram!("flashstock_raft_log_sync_seconds").record(elapsed.as_secs_f64());
                if elapsed >= SLOW_STEP {
                    tracing::warn!(
                        bytes = job.framed.len(),
                        elapsed_ms = elapsed.as_millis() as u64,
                        "slow raft log job"
                    );
                }
                let mut buffer = job.framed;
                buffer.clear();
                let synced = Input::Synced { through: job.through, elapsed, buffer, file_bytes: log.bytes() };
                if inbox.blocking_send(synced).is_err() {
                    return;
                }
            }
        })
        .expect("spawning the raft log thread");
    jobs
}

impl Driver {
    async fn run(
        mut self,
        mut receiver: mpsc::Receiver<Input>,
        stopping: Arc<AtomicBool>,
        pending: Option<BTreeMap<GroupId, (GroupConfig, Vec<ReplicaWrite>)>>,
    ) {
        if let Some(pending) = pending {
            let Some(generation) = self.probe(&stopping).await else { return };
            if let Err(error) = write_generation(&self.generation_path, generation) {
                tracing::error!(%error, "the generation could not be recorded; the member stops");
                std::process::exit(70);
            }
            self.generation = generation;
            if generation > 0 {
                tracing::warn!(generation, "no raft log but the cluster has run: rejoining under a new generation");
                self.rejoining = pending.keys().map(|&group| (group, 0)).collect();
            }
            if let Err(error) = self.start_machines(pending) {
                tracing::error!(%error, "the replicas did not start; the member stops");
                std::process::exit(70);
            }
        }
        // Exported from the start (at 0): the exporter shows a counter only
        // once it has been touched, and a healthy member may never send one.
        metrics::counter!("flashstock_raft_snapshots_sent_total").increment(0);
        let mut ticker = tokio::time::interval(Duration::from_millis(TICK_MS));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.carry_out();
        let mut inputs = Vec::with_capacity(ROUND_INPUTS_MAX);
        loop {
            tokio::select! {
                received = receiver.recv_many(&mut inputs, ROUND_INPUTS_MAX) => {
                    if received == 0 {
                        return;
                    }
                    let now_ms = self.clock.now_ms();
                    let started = Instant::now();
                    let count = inputs.len();
                    // One clock read per input: each input's end is the next one's start.
                    let (mut slowest, mut input_started) = ((Duration::ZERO, ""), started);
                    for input in inputs.drain(..) {
                        let kind = input.kind();
                        self.handle(now_ms, input);
                        let input_ended = Instant::now();
                        slowest = slowest.max((input_ended - input_started, kind));
                        input_started = input_ended;
                    }
                    let elapsed = input_started - started;
                    if elapsed >= SLOW_STEP {
                        tracing::warn!(
                            inputs = count,
                            elapsed_ms = elapsed.as_millis() as u64,
                            slowest = slowest.1,
                            slowest_ms = slowest.0.as_millis() as u64,
                            "slow round"
                        );
                    }
                }
                _ = ticker.tick() => self.tick(),
            }
            if stopping.load(Ordering::Acquire) {
                // What was synced stays; callers still waiting are told.
                for (_, (_, reply)) in self.callers.drain() {
                    let _ = reply.send(Err(Refusal::Unavailable { reason: "the member is stopping".to_owned() }));
                }
                return;
            }
            self.carry_out();
        }
    }

    fn handle(&mut self, now_ms: u64, input: Input) {
        match input {
            Input::Call { group, request, reply } => {
                let Some(machine) = self.machines.get_mut(&group) else {
                    let (leader, term) = self.leaders.get(&group).copied().unwrap_or((None, 0));
                    let _ = reply.send(Err(Refusal::NotLeader { group, leader, term }));
                    return;
                };
                let caller = self.next_caller;
                self.next_caller += 1;
                self.callers.insert(caller, (group, reply));
                match request {
                    GroupRequest::Order(request) => machine.request(now_ms, caller, request),
                    GroupRequest::Read(sku) => machine.read(now_ms, caller, sku),
                    GroupRequest::Admin(request) => machine.admin(now_ms, caller, request),
                }
            }
            Input::Peer { from, raft, items } => {
                for (group, message) in raft {
                    if member_of(message.from) != from {
                        tracing::warn!(member = from, "a raft message named another sender; dropped");
                        continue;
                    }
                    if let Some(machine) = self.machines.get_mut(&group) {
                        machine.raft(now_ms, message);
                    }
                }
                for item in items {
                    self.peer_item(now_ms, from, item);
                }
            }
            Input::SnapshotEncoded { group, encoded } => {
                self.encoding.remove(&group);
                if let Some(machine) = self.machines.get_mut(&group) {
                    let index = encoded.index();
                    if !machine.snapshot_encoded(encoded) {
                        tracing::debug!(group, index, "an encoded snapshot was overtaken; dropped");
                    }
                }
            }
            Input::Rewritten { live_bytes } => {
                self.live_bytes_at_rewrite = live_bytes;
                self.rewriting = false;
            }
            Input::Synced { through, elapsed, buffer, file_bytes } => {
                if buffer.capacity() <= SPARE_BUFFER_BYTES_MAX {
                    self.spare_buffer = buffer;
                }
                self.log_bytes = file_bytes;
                self.sync_in_flight = false;
                self.synced = self.synced.max(through);
                self.syncs += 1;
                tracing::trace!(through, elapsed_us = elapsed.as_micros() as u64, "raft log synced");
                let synced = self.synced;
                let mut persisted: BTreeMap<GroupId, u64> = BTreeMap::new();
                self.persist.retain(|&(needed, group, number)| {
                    if needed <= synced {
                        persisted.insert(group, number);
                        false
                    } else {
                        true
                    }
                });
                for (group, number) in persisted {
                    if let Some(machine) = self.machines.get_mut(&group) {
                        machine.persisted(now_ms, number);
                    }
                }
            }
        }
    }

    fn peer_item(&mut self, now_ms: u64, from: u32, item: PeerItem) {
        match item {
            PeerItem::Part { group, order, attempt, step, request } => {
                let (Ok(order), Ok(attempt), Ok(request)) =
                    (OrderId::new(order), OrderId::new(attempt), part_request(request))
                else {
                    tracing::warn!(member = from, "a part step did not decode; dropped");
                    return;
                };
                let message = PartMessage { order, attempt, step, request };
                match self.machines.get_mut(&group) {
                    Some(machine) => machine.part(now_ms, PART_CALLER | CallerId::from(from), message),
                    None => {
                        let leader = self.leaders.get(&group).and_then(|(leader, _)| *leader);
                        self.queue_item(from, PeerItem::PartNotLeader { group, leader });
                    }
                }
            }
            PeerItem::PartReply { group, order, attempt, step, answer } => {
                let (Ok(order), Ok(attempt), Some(answer)) =
                    (OrderId::new(order), OrderId::new(attempt), part_answer(answer))
                else {
                    tracing::warn!(member = from, "a part answer did not decode; dropped");
                    return;
                };
                let home = self.placement.home_of_order(&order);
                if let Some(machine) = self.machines.get_mut(&home) {
                    machine.part_answered(now_ms, group, PartReply { order, attempt, step, answer });
                }
            }
            PeerItem::PartNotLeader { group, leader } => self.learn_leader(group, leader),
            PeerItem::Replace { group, replica } => {
                // A member may only replace its own replica.
                if member_of(replica) != from {
                    tracing::warn!(member = from, replica, "a replacement for another member's replica; dropped");
                    return;
                }
                if let Some(machine) = self.machines.get_mut(&group) {
                    machine.replace(now_ms, from, replica);
                }
            }
        }
    }

    fn learn_leader(&mut self, group: GroupId, leader: Option<u32>) {
        let term = self.leaders.get(&group).map_or(0, |(_, term)| *term);
        match leader {
            Some(leader) => {
                self.leaders.insert(group, (Some(leader), term));
            }
            None => {
                // Try the next replica.
                let replicas = &self.replicas[&group];
                let current = self.leaders.get(&group).and_then(|(leader, _)| *leader).unwrap_or(replicas[0]);
                let at = replicas.iter().position(|&member| member == current).unwrap_or(0);
                self.leaders.insert(group, (Some(replicas[(at + 1) % replicas.len()]), term));
            }
        }
    }

    fn tick(&mut self) {
        let now_ms = self.clock.now_ms();
        self.ticks += 1;
        for (&group, machine) in &mut self.machines {
            machine.tick(now_ms);
            if self.encoding.contains(&group) || !(machine.wants_snapshot() || machine.snapshot_due(&SNAPSHOT_POLICY)) {
                continue;
            }
            let started = Instant::now();
            let Some(image) = machine.snapshot_image() else { continue };
            let imaged = started.elapsed();
            if imaged >= SLOW_STEP {
                tracing::warn!(group, elapsed_ms = imaged.as_millis() as u64, "slow snapshot image");
            }
            self.encoding.insert(group);
            let back = self.encoded_snapshots.clone();
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let index = image.index();
                let encoded = image.encode();
                let elapsed = started.elapsed();
                tracing::debug!(
                    group,
                    index,
                    bytes = encoded.bytes(),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "snapshot encoded"
                );
                // A driver that is gone has no use for it.
                let _ = back.blocking_send(Input::SnapshotEncoded { group, encoded });
            });
        }
        self.ask_to_rejoin();
        if self.ticks.is_multiple_of(VIEW_EVERY_TICKS) {
            self.publish_view();
        }
    }

    /// Starts a replica of every group this member holds, under its
    /// generation, from what the log holds for it.
    fn start_machines(&mut self, pending: BTreeMap<GroupId, (GroupConfig, Vec<ReplicaWrite>)>) -> anyhow::Result<()> {
        let own = replica_id(self.own, self.generation);
        for (group, (mut config, writes)) in pending {
            config.replica.member = own;
            let machine = GroupMachine::start(config, &self.initial, &writes)
                .map_err(|error| anyhow::anyhow!("group {group}: {error}"))?;
            self.machines.insert(group, machine);
        }
        // The first round delivers what the log holds committed.
        let now_ms = self.clock.now_ms();
        for machine in self.machines.values_mut() {
            machine.tick(now_ms);
        }
        Ok(())
    }

    /// Asks the other members what they hold, until they tell: a peer with
    /// raft state means the cluster has run, so this member (with none)
    /// lost its disk and must not start under the ids whose votes and
    /// entries it forgot — it takes the next generation; every peer
    /// without state means a first start (generation 0). A peer whose
    /// state began at a first start it decided with this member, in this
    /// life, counts as one without state: this member's replicas have not
    /// run yet (it was still asking), so they forgot nothing. (Without that
    /// rule a member started a moment after the others found them already
    /// elected and rejoined a brand-new cluster under a new generation,
    /// replacing its replicas in every group during the first sale.)
    /// `None` if the member stops meanwhile.
    async fn probe(&self, stopping: &AtomicBool) -> Option<u32> {
        let peers: Vec<u32> = self.senders.keys().copied().collect();
        let boot = self.peers.boot();
        let failpoint = crate::coordination::Failpoint::from_environment();
        let slow_first = failpoint == Some(crate::coordination::Failpoint::SlowFirstProbe);
        let missed_peer = (failpoint == Some(crate::coordination::Failpoint::ProbeMissesAPeer))
            .then(|| peers.iter().copied().max())
            .flatten();
        for round in 0u64.. {
            if stopping.load(Ordering::Acquire) {
                return None;
            }
            let mut without_state = BTreeMap::new();
            let mut started_with_us = 0;
            let mut generation_seen = None;
            // Every peer at once: one that does not answer yet must not
            // hold up the others' answers.
            let mut asks = tokio::task::JoinSet::new();
            for &peer in peers.iter().filter(|&&peer| Some(peer) != missed_peer) {
                let links = self.peers.clone();
                asks.spawn(
                    async move { (peer, links.call(peer, RequestBody::ReplicaProbe { boot }, PROBE_TIMEOUT).await) },
                );
            }
            if round == 0 && slow_first {
                tracing::warn!("failpoint slow-first-probe: deciding in 3 s");
                tokio::time::sleep(Duration::from_secs(3)).await;
                continue;
            }
            // A probe task that failed counts as a peer that did not answer.
            // Every 25th round the answers are logged if still undecided.
            let logging = round % 25 == 0;
            let mut answers_seen = Vec::new();
            while let Some(joined) = asks.join_next().await {
                let Ok((peer, answer)) = joined else { continue };
                if logging {
                    answers_seen.push(match &answer {
                        Ok(Response::ReplicaProbe { has_state, started_with_you, groups, .. }) => format!(
                            "member {peer}: has state {has_state}, started with us {started_with_you}, {} groups",
                            groups.len()
                        ),
                        Ok(other) => format!("member {peer}: {other:?}"),
                        Err(error) => format!("member {peer}: {error}"),
                    });
                }
                match answer {
                    Ok(Response::ReplicaProbe { has_state: false, boot, .. }) => {
                        without_state.insert(peer, boot);
                    }
                    Ok(Response::ReplicaProbe { has_state: true, started_with_you: true, .. }) => started_with_us += 1,
                    Ok(Response::ReplicaProbe { has_state: true, groups, .. }) if !groups.is_empty() => {
                        let mine = groups
                            .iter()
                            .flat_map(|group| &group.voters)
                            .filter(|&&voter| member_of(voter) == self.own)
                            .map(|&voter| (voter >> 32) as u32)
                            .max()
                            .unwrap_or(0);
                        generation_seen = Some(generation_seen.unwrap_or(0).max(mine));
                    }
                    // State, but its groups not yet published: ask again.
                    Ok(_) | Err(_) => {}
                }
            }
            // A peer that recorded this very life of ours when it decided
            // on the first start proves we are part of it (this life has no
            // log, so it never joined under another generation): decided,
            // whoever else has not answered. Waiting for every peer instead
            // left a member that could not reach one of them probing for
            // ever while the other two ran the groups without it.
            let first_start = started_with_us > 0 || without_state.len() == peers.len();
            if first_start {
                // Every member deciding on the first start vouches for the
                // fresh members it heard from, not only the first to decide:
                // a late member may reach only some of us.
                self.first_start_with.write().unwrap_or_else(PoisonError::into_inner).extend(without_state);
                return Some(0);
            }
            if let Some(seen) = generation_seen {
                return Some(seen + 1);
            }
            if logging {
                tracing::info!(
                    peers_without_state = without_state.len(),
                    answers = ?answers_seen,
                    "waiting for the other members to tell a first start from a lost disk"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// A member that lost its disk asks every other replica of each group
    /// (the leader acts) until the configuration counts its new replica.
    fn ask_to_rejoin(&mut self) {
        let machines = &self.machines;
        self.rejoining.retain(|group, _| !machines.get(group).is_some_and(|machine| machine.replica().is_voter()));
        let replica = replica_id(self.own, self.generation);
        let mut asks = Vec::new();
        for (&group, wait) in &mut self.rejoining {
            if *wait > 0 {
                *wait -= 1;
                continue;
            }
            *wait = 20;
            for &member in self.replicas[&group].iter().filter(|&&member| member != self.own) {
                asks.push((member, PeerItem::Replace { group, replica }));
            }
        }
        for (member, item) in asks {
            self.queue_item(member, item);
        }
    }

    /// The member the steps for `group` go to.
    fn route(&self, group: GroupId) -> u32 {
        if let Some(leader) = self.machines.get(&group).and_then(|machine| machine.leadership().leader) {
            return member_of(leader);
        }
        if let Some((Some(leader), _)) = self.leaders.get(&group) {
            return *leader;
        }
        self.replicas[&group][0]
    }

    fn queue_item(&mut self, to: u32, item: PeerItem) {
        self.outgoing.entry(to).or_default().items.push(item);
    }

    /// Carries out every machine's outputs, then sends this round's
    /// batches and hands the round's writes to the log thread.
    fn carry_out(&mut self) {
        let now_ms = self.clock.now_ms();
        // Outputs of a machine may be inputs of another on this member
        // (a part step for a group led here): bounded rounds.
        for _ in 0..8 {
            let mut local = Vec::new();
            let groups: Vec<GroupId> = self.machines.keys().copied().collect();
            for group in groups {
                let outputs =
                    self.machines.get_mut(&group).map(|machine| machine.take_outputs(now_ms)).unwrap_or_default();
                for output in outputs {
                    self.output(group, output, &mut local);
                }
            }
            if local.is_empty() {
                break;
            }
            for (from, item) in local {
                self.peer_item(now_ms, from, item);
            }
        }
        self.release_synced();
        self.flush_peers();
        self.submit_writes();
    }

    fn output(&mut self, group: GroupId, output: GroupOutput, local: &mut Vec<(u32, PeerItem)>) {
        match output {
            GroupOutput::Raft(message) => {
                let to = member_of(message.to);
                // A follower the log no longer covers: worth counting, as
                // each costs the whole state in bytes on both sides.
                let snapshot = message.get_snapshot();
                if !snapshot.get_data().is_empty() {
                    metrics::counter!("flashstock_raft_snapshots_sent_total").increment(1);
                    tracing::info!(
                        group,
                        to,
                        index = snapshot.get_metadata().index,
                        bytes = snapshot.get_data().len(),
                        "a snapshot sent to a follower"
                    );
                }
                self.outgoing.entry(to).or_default().raft.push((group, message));
            }
            GroupOutput::RaftAfterWrites(message) => {
                let to = member_of(message.to);
                self.held_back.push((self.written, to, message, group));
            }
            GroupOutput::Write { number, writes } => {
                for write in &writes {
                    frame_write(group, write, &mut self.framed);
                    self.written += 1;
                }
                if let Some(number) = number {
                    self.persist.push((self.written, group, number));
                }
            }
            GroupOutput::Part { group: to_group, message } => {
                let item = PeerItem::Part {
                    group: to_group,
                    order: message.order.as_str().to_owned(),
                    attempt: message.attempt.as_str().to_owned(),
                    step: message.step,
                    request: wire_part_request(&message.request),
                };
                let to = self.route(to_group);
                if to == self.own {
                    local.push((self.own, item));
                } else {
                    self.queue_item(to, item);
                }
            }
            GroupOutput::PartAnswer { caller, reply } => {
                let to = u32::try_from(caller & !PART_CALLER).expect("a member id");
                let item = PeerItem::PartReply {
                    group,
                    order: reply.order.as_str().to_owned(),
                    attempt: reply.attempt.as_str().to_owned(),
                    step: reply.step,
                    answer: wire_part_answer_unnamed(reply.answer),
                };
                if to == self.own {
                    local.push((self.own, item));
                } else {
                    self.queue_item(to, item);
                }
            }
            GroupOutput::NotLeader { caller, leader } if caller & PART_CALLER != 0 => {
                let to = u32::try_from(caller & !PART_CALLER).expect("a member id");
                let item = PeerItem::PartNotLeader { group, leader: leader.map(member_of) };
                if to == self.own {
                    local.push((self.own, item));
                } else {
                    self.queue_item(to, item);
                }
            }
            GroupOutput::NotLeader { caller, leader } => {
                let term = self.machines.get(&group).map_or(0, |machine| machine.leadership().term);
                self.answer(caller, Err(Refusal::NotLeader { group, leader: leader.map(member_of), term }));
            }
            GroupOutput::Answer { caller, answer } => self.answer(caller, Ok(GroupAnswer::Order(answer))),
            GroupOutput::Read { caller, answer, .. } => self.answer(caller, Ok(GroupAnswer::Read(answer))),
            GroupOutput::Admin { caller, answer } => self.answer(caller, Ok(GroupAnswer::Admin(answer))),
        }
    }

    fn answer(&mut self, caller: CallerId, answer: Result<GroupAnswer, Refusal>) {
        if let Some((_, reply)) = self.callers.remove(&caller) {
            // The caller may have given up (its deadline): nothing to do.
            let _ = reply.send(answer);
        }
    }

    fn release_synced(&mut self) {
        let synced = self.synced;
        let mut index = 0;
        while index < self.held_back.len() {
            if self.held_back[index].0 <= synced {
                let (_, to, message, group) = self.held_back.swap_remove(index);
                self.outgoing.entry(to).or_default().raft.push((group, message));
            } else {
                index += 1;
            }
        }
    }

    fn flush_peers(&mut self) {
        for (to, PeerBatch { raft, items }) in std::mem::take(&mut self.outgoing) {
            if raft.is_empty() && items.is_empty() {
                continue;
            }
            if let Some(sender) = self.senders.get(&to) {
                // A full queue drops the batch, as a lost packet.
                let _ = sender.try_send(encode_batch(&raft, &items));
            }
        }
    }

    /// Hands the writes framed since the last job to the log thread (one
    /// job in flight: what comes meanwhile goes in the next, so one sync
    /// covers a whole round's writes of every group).
    fn submit_writes(&mut self) {
        if self.sync_in_flight || (self.framed.is_empty() && self.synced == self.written) {
            return;
        }
        let threshold = self.live_bytes_at_rewrite.saturating_mul(REWRITE_LIVE_MULTIPLE).max(REWRITE_BYTES_MIN);
        let rewrite = (!self.rewriting && self.log_bytes > threshold).then(|| self.live_writes());
        self.rewriting |= rewrite.is_some();
        let next = std::mem::take(&mut self.spare_buffer);
        let job = LogJob { framed: std::mem::replace(&mut self.framed, next), rewrite, through: self.written };
        self.sync_in_flight = true;
        if self.log_jobs.send(job).is_err() {
            tracing::error!("the raft log thread is gone");
        }
    }

    /// Every group's live state as writes: what a rewrite keeps.
    fn live_writes(&self) -> Vec<(GroupId, ReplicaWrite)> {
        let mut writes = Vec::with_capacity(self.machines.len() * 3);
        for (&group, machine) in &self.machines {
            let storage = machine.replica().storage();
            writes.push((group, ReplicaWrite::Snapshot(storage.held_snapshot().clone())));
            writes.push((group, ReplicaWrite::HardState(storage.hard_state().clone())));
            let entries = storage.entries_held();
            if !entries.is_empty() {
                writes.push((group, ReplicaWrite::Entries(entries.to_vec())));
            }
        }
        writes
    }

    fn publish_view(&mut self) {
        let mut groups = Vec::with_capacity(self.replicas.len());
        let preferred = {
            let members: Vec<u32> = self.peers_and_self();
            let factor = self.replicas.values().next().map_or(1, Vec::len);
            preferred_leaders(self.replicas.len() as u32, &members, factor)
        };
        for (&group, replicas) in &self.replicas {
            let mut view = GroupView {
                group,
                replicas: replicas.clone(),
                preferred_leader: preferred[group as usize - 1],
                ..GroupView::default()
            };
            if let Some(machine) = self.machines.get(&group) {
                let leadership = machine.leadership();
                let replica = machine.replica();
                view.held_here = true;
                view.leader = leadership.leader.map(member_of);
                view.term = leadership.term;
                view.leading = leadership.leading;
                view.commit_index = replica.commit_index();
                view.applied_index = machine.applied_index();
                view.last_index = replica.last_index();
                view.voters = replica.configuration().0;
                view.lag = replica
                    .progress()
                    .into_iter()
                    .map(|(id, matched)| (member_of(id), view.last_index.saturating_sub(matched)))
                    .collect();
                let applied = machine.applied();
                view.skus = applied.skus.len() as u64;
                for state in applied.skus.values() {
                    let stock = state.stock();
                    view.available += stock.available;
                    view.held += stock.held;
                    view.sold += stock.sold;
                }
                if let Some(leader) = view.leader {
                    self.leaders.insert(group, (Some(leader), view.term));
                }
                let previous = self.view.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                let was_leading = previous.groups.iter().any(|old| old.group == group && old.leading);
                drop(previous);
                if view.leading && !was_leading {
                    metrics::counter!("flashstock_leader_changes_total").increment(1);
                    tracing::info!(group, term = view.term, "leading");
                }
                let anomalies = machine.anomalies();
                let reported = self.anomalies_reported.entry(group).or_insert(0);
                for anomaly in &anomalies[(*reported).min(anomalies.len())..] {
                    tracing::error!(group, anomaly, "a replication group misbehaved");
                }
                *reported = anomalies.len();
                metrics::gauge!("flashstock_group_applied_index", "group" => group.to_string())
                    .set(view.applied_index as f64);
                let lag_max = view.lag.iter().map(|(_, lag)| *lag).max().unwrap_or(0);
                if view.leading {
                    metrics::gauge!("flashstock_group_replication_lag_entries", "group" => group.to_string())
                        .set(lag_max as f64);
                }
                metrics::gauge!("flashstock_group_leading", "group" => group.to_string()).set(if view.leading {
                    1.0
                } else {
                    0.0
                });
            } else if let Some((leader, term)) = self.leaders.get(&group) {
                view.leader = *leader;
                view.term = *term;
            }
            groups.push(view);
        }
        let view = View { groups, log_bytes: self.log_bytes, syncs: self.syncs, writes_synced: self.synced };
        *self.view.write().unwrap_or_else(std::sync::PoisonError::into_inner) = view;
    }

    fn peers_and_self(&self) -> Vec<u32> {
        let mut members: Vec<u32> = self.senders.keys().copied().collect();
        members.push(self.own);
        members.sort_unstable();
        members
    }
}
