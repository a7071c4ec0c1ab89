//! The wire protocol: the messages between clients and nodes (and between
//! nodes), and how they are framed. This is the public contract; the
//! engine's types never travel.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of
//! MessagePack (rmp-serde, fields by name so that fields can be added). A
//! connection starts with [`Hello`] / [`Welcome`] to agree on the protocol
//! version. After that a client opens a *session*: a long-lived stream
//! that begins with [`RequestBody::OpenSession`] (answered
//! [`Response::SessionOpened`]) and then carries batch frames both ways
//! ([`BatchEncoder`], [`decode_batch`]): many requests, each with an id of
//! the client's choosing, in one frame; their answers, in the order they
//! complete, in as few frames as possible. A request outside a session
//! (the handshake, a map refresh, the members' calls to each other)
//! travels on a stream of its own and is answered on it.
//!
//! Decoding is for untrusted bytes: the length is checked against
//! [`FRAME_BYTES_MAX`] before anything is read or allocated, every length
//! the payload declares is checked against the bytes that follow it before
//! serde sees any (serde would otherwise preallocate up to a megabyte for a
//! sequence a few bytes declare), nesting is capped at [`DECODE_DEPTH_MAX`],
//! no wire type is recursive, and every failure is a [`CodecError`], never a
//! panic.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks. Version 2: admin requests carry
/// an operation id; version 3: an order's home is the partition of its id,
/// and members drive each other's parts with `Part` steps; version 4:
/// `NotLeader` names its term; version 5: sessions of batch frames. A
/// member refuses a client of another version at the handshake with the
/// versions it speaks.
pub const PROTOCOL_VERSION: u32 = 5;

/// Largest frame either side sends or accepts. The biggest message (an
/// order of the most lines, or a partition map of the most members) is a
/// few kilobytes; the bound keeps a peer from making the other allocate.
pub const FRAME_BYTES_MAX: usize = 64 * 1024;

/// Deepest nesting the decoder follows. The wire types nest at most five
/// deep (a response, its result, a list, a line, a quantity); anything
/// deeper is not a message of ours, and refusing it early keeps a crafted
/// frame from exhausting the stack through ignored fields.
pub const DECODE_DEPTH_MAX: usize = 12;

/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Why bytes are not a message.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {length} bytes exceeds the limit of {limit}")]
    FrameTooLarge { length: usize, limit: usize },
    #[error("frame ends early: {expected} bytes declared, {found} present")]
    Truncated { expected: usize, found: usize },
    /// A declared length or nesting the payload cannot hold; refused
    /// before anything is decoded or allocated.
    #[error("malformed message: {0}")]
    Bounds(#[from] flashstock_msgpack::BoundsError),
    #[error("undecodable message: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("message does not encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// A batch frame whose envelope (the list of ids and requests) is not
    /// one; its requests cannot be told apart, so none is answered.
    #[error("malformed batch: {0}")]
    Batch(String),
}

/// First message on a connection, from the side that opened it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Versions the sender can speak, newest first.
    pub versions: Vec<u32>,
    /// What the sender is, for the logs (`checkout-eu-3`); identity itself
    /// comes from the TLS certificate.
    pub agent: String,
    /// A member's links say which life of the member they come from (it
    /// changes at every start), so that the others notice a restart at
    /// once and redial it instead of sending into the old life's
    /// connection until it idles out. `None` from clients.
    #[serde(default)]
    pub boot: Option<u64>,
}

/// The answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Welcome {
    Accepted {
        version: u32,
        /// The member that answered.
        node: u32,
        map: PartitionMap,
    },
    /// No version in common; the connection closes.
    Refused { supported: Vec<u32> },
}

/// Which member owns each partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMap {
    /// Changes whenever membership or ownership does; a client holding an
    /// older epoch refreshes.
    pub epoch: u64,
    pub partition_count: u32,
    pub members: Vec<Member>,
    /// How partitions are replicated; `None` in a single-copy cluster
    /// (each partition answered by its rendezvous owner).
    #[serde(default)]
    pub replication: Option<ReplicationMap>,
}

/// How a replicated cluster places its partitions: partition `p` belongs
/// to group `p % groups + 1` ([`crate::routing::group_of_partition`]),
/// replicated on [`crate::routing::replicas_of`] members; one of them
/// leads it at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationMap {
    pub factor: u32,
    pub groups: u32,
    /// Each group's leader as the answering member knows it, by group.
    pub leaders: Vec<GroupLeader>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLeader {
    pub group: u32,
    /// `None` while the member knows of no leader (an election).
    pub leader: Option<u32>,
    /// The raft term the leader leads in: a higher term is newer news.
    pub term: u64,
}

/// One member of the cluster as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u32,
    /// Where to reach it over QUIC (`host:port`).
    pub address: String,
    /// Whether the answering node currently reaches it.
    pub up: bool,
}

/// A request and the time the caller still waits for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Milliseconds the caller will wait from the moment it sent this; the
    /// server drops the work once they have passed (clocks of client and
    /// server are never compared).
    pub timeout_ms: u32,
    pub body: RequestBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Hold stock for every line of an order, or for none.
    Reserve {
        order: String,
        buyer: String,
        lines: Vec<WireLine>,
        ttl_ms: u64,
    },
    /// Sell the held units of an order; `fewer` names lines to sell fewer
    /// units of (the rest of those go back). `home_partition` is the one
    /// the reservation named: its owner coordinates the order.
    Commit {
        order: String,
        home_partition: u32,
        fewer: Vec<(String, u32)>,
    },
    /// Give the held units of an order back.
    Release {
        order: String,
        home_partition: u32,
    },
    Availability {
        sku: String,
    },
    PartitionMap,
    /// The answering member's own totals over the partitions it owns.
    NodeStatus,
    // Admin requests (refused unless the caller has the admin identity).
    // Each carries the caller's operation id, kept across the retries of
    // one call: the SKU applies an operation once and answers a retry with
    // its counts, so a retried `AddStock` never adds the units twice.
    CreateSku {
        sku: String,
        initial_units: u64,
        units_per_buyer_max: Option<u32>,
        opens_at_ms: u64,
        operation: String,
    },
    AddStock {
        sku: String,
        units: u64,
        operation: String,
    },
    RemoveStock {
        sku: String,
        units: u64,
        operation: String,
    },
    SetBuyerLimit {
        sku: String,
        units_per_buyer_max: Option<u32>,
        operation: String,
    },
    OpenSale {
        sku: String,
        opens_at_ms: u64,
        operation: String,
    },
    /// Between members (refused unless the caller is a member): one step
    /// of the part of `order` held on this member, the holds named by the
    /// coordinator's `attempt`; answered with `Part`. Idempotent: the
    /// coordinator sends a step again until it is answered.
    Part {
        order: String,
        attempt: String,
        step: u64,
        request: WirePartRequest,
    },
    /// Between members of a replicated cluster (refused unless the caller
    /// is a member): what raft state do you hold? Asked by a member that
    /// starts with no raft log, to tell a first start from a lost disk;
    /// `boot` names the asker's life (see [`Hello::boot`]).
    ReplicaProbe {
        #[serde(default)]
        boot: u64,
    },
    /// Turns the stream it arrives on into a session (see the module's
    /// documentation); answered with [`Response::SessionOpened`].
    OpenSession,
}

/// One group in a [`Response::ReplicaProbe`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbedGroup {
    pub group: u32,
    /// The raft ids of its voters (member and generation).
    pub voters: Vec<u64>,
}

/// A step of a part (see `flashstock_engine::coordination`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WirePartRequest {
    Reserve { buyer: String, lines: Vec<WireLine>, ttl_ms: u64 },
    Prepare { skus: Vec<String> },
    Commit { lines: Vec<(String, Option<u32>)> },
    Release { skus: Vec<String> },
}

/// A part's answer to a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WirePartAnswer {
    /// Units and the SKU's counts per line.
    Held {
        units: Vec<u32>,
        stock: Vec<WireStock>,
        expires_at_ms: u64,
    },
    Prepared,
    Committed {
        units: Vec<u32>,
        stock: Vec<WireStock>,
    },
    Released,
    /// The part's line `line` (its index among the part's lines) refused.
    Refused {
        line: u32,
        refusal: Refusal,
    },
}

impl RequestBody {
    /// The request's kind, as metrics and log spans name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Reserve { .. } => "reserve",
            Self::Commit { .. } => "commit",
            Self::Release { .. } => "release",
            Self::Availability { .. } => "availability",
            Self::PartitionMap => "partition_map",
            Self::NodeStatus => "node_status",
            Self::CreateSku { .. } => "create_sku",
            Self::AddStock { .. } => "add_stock",
            Self::RemoveStock { .. } => "remove_stock",
            Self::SetBuyerLimit { .. } => "set_buyer_limit",
            Self::OpenSale { .. } => "open_sale",
            Self::Part { .. } => "part",
            Self::ReplicaProbe { .. } => "replica_probe",
            Self::OpenSession => "open_session",
        }
    }

    /// The order the request concerns, if any (log spans carry it, so an
    /// order can be followed from the client to every member it touches).
    pub fn order(&self) -> Option<&str> {
        match self {
            Self::Reserve { order, .. }
            | Self::Commit { order, .. }
            | Self::Release { order, .. }
            | Self::Part { order, .. } => Some(order),
            _ => None,
        }
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireLine {
    pub sku: String,
    pub quantity: WireQuantity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireQuantity {
    Exactly(u32),
    /// As many as available up to `max`, at least `min`.
    UpTo {
        max: u32,
        min: u32,
    },
}

/// A SKU's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireStock {
    pub available: u64,
    pub held: u64,
    pub sold: u64,
}

/// A line of a reservation or settlement, with the SKU's counts after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireLineResult {
    pub sku: String,
    pub units: u32,
    pub stock: WireStock,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Every line held. Commit and release go to the owner of
    /// `home_partition` (the partition of the order id: one home per id in
    /// the whole cluster).
    Reserved {
        order: String,
        home_partition: u32,
        expires_at_ms: u64,
        lines: Vec<WireLineResult>,
    },
    /// Commit or release done; `replayed` when this answers a retry.
    Settled {
        order: String,
        lines: Vec<WireLineResult>,
        replayed: bool,
    },
    Stock {
        sku: String,
        stock: WireStock,
    },
    PartitionMap(PartitionMap),
    NodeStatus {
        node: u32,
        skus: u64,
        /// Summed over the member's SKUs, as their owners last published.
        stock: WireStock,
        /// Members this one's links say are down now.
        sees_down: Vec<u32>,
        /// Its busiest SKUs (most units held plus sold), busiest first;
        /// at most [`HOTTEST_SKUS_MAX`].
        hottest_skus: Vec<(String, WireStock)>,
    },
    /// A request between members that has no other answer succeeded.
    Done,
    /// A part's answer to a step.
    Part(WirePartAnswer),
    /// The answer to `ReplicaProbe`: whether the member holds raft state
    /// (a log, or a group that has elected a leader), and its groups'
    /// configurations as it knows them; `boot` is the answerer's life,
    /// and `started_with_you` says that its state began at a first start
    /// it decided with the asker, in the asker's present life, among the
    /// members that had no state (so the asker's replicas never ran
    /// before: it starts them as they are, not under a new generation).
    ReplicaProbe {
        has_state: bool,
        groups: Vec<ProbedGroup>,
        #[serde(default)]
        boot: u64,
        #[serde(default)]
        started_with_you: bool,
    },
    /// The stream is a session now. The member works on at most
    /// `requests_in_flight_max` of its requests at once (it reads no more
    /// frames until some are answered) and takes at most
    /// `batch_requests_max` requests in one frame.
    SessionOpened {
        requests_in_flight_max: u32,
        batch_requests_max: u32,
    },
    Refused(Refusal),
}

/// SKUs a member lists in its status.
pub const HOTTEST_SKUS_MAX: usize = 10;

/// Why a request was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// `line` is the index of the order's line that failed.
    SoldOut {
        line: u32,
        sku: String,
        available: u64,
    },
    LimitExceeded {
        line: u32,
        sku: String,
        units_per_buyer_max: u32,
        units_taken: u32,
    },
    NotOpen {
        line: u32,
        sku: String,
        opens_at_ms: u64,
    },
    /// The SKU already has as many live holds as it may.
    HoldLimitReached {
        line: u32,
        sku: String,
    },
    /// Removing stock: fewer unsold units than asked.
    NotEnoughUnsoldStock {
        sku: String,
        available: u64,
    },
    UnknownSku {
        sku: String,
    },
    SkuExists {
        sku: String,
    },
    UnknownReservation,
    Expired {
        expired_at_ms: u64,
    },
    AlreadyCommitted,
    AlreadyReleased,
    IdempotencyConflict,
    /// Bad input: names the field and the reason.
    Invalid {
        field: String,
        reason: String,
    },
    /// Too much in flight; retry after the pause.
    Busy {
        retry_after_ms: u64,
    },
    /// The partition cannot answer now (its node is down or failed).
    Unavailable {
        reason: String,
    },
    /// This node does not own the partition; `owner` does.
    WrongNode {
        owner: u32,
    },
    /// This member does not lead the partition's replication `group`:
    /// `leader` does, as far as it knows (`None`: an election is under
    /// way), in raft `term` (0 when it knows none; a member of an older
    /// version sends none). Nothing was done; the same request may go to
    /// the leader.
    NotLeader {
        group: u32,
        leader: Option<u32>,
        #[serde(default)]
        term: u64,
    },
    DeadlineExceeded,
    /// The caller's identity may not do this.
    Forbidden,
}

impl Refusal {
    /// The refusal's name, as metrics and logs give it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SoldOut { .. } => "sold_out",
            Self::LimitExceeded { .. } => "limit_exceeded",
            Self::NotOpen { .. } => "not_open",
            Self::HoldLimitReached { .. } => "hold_limit_reached",
            Self::NotEnoughUnsoldStock { .. } => "not_enough_unsold_stock",
            Self::UnknownSku { .. } => "unknown_sku",
            Self::SkuExists { .. } => "sku_exists",
            Self::UnknownReservation => "unknown_reservation",
            Self::Expired { .. } => "expired",
            Self::AlreadyCommitted => "already_committed",
            Self::AlreadyReleased => "already_released",
            Self::IdempotencyConflict => "idempotency_conflict",
            Self::Invalid { .. } => "invalid",
            Self::Busy { .. } => "busy",
            Self::Unavailable { .. } => "unavailable",
            Self::WrongNode { .. } => "wrong_node",
            Self::NotLeader { .. } => "not_leader",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Forbidden => "forbidden",
        }
    }
    /// Whether sending the same request again (with the same order id) is
    /// safe and may succeed: the one classification, which
    /// [`crate::Error::is_retryable`] shares (a `WrongNode` is retried
    /// after a map refresh).
    pub fn is_retryable(&self) -> bool {
        match self {
            Refusal::WrongNode { .. } | Refusal::NotLeader { .. } => true,
            other => crate::Error::from(other.clone()).is_retryable(),
        }
    }
}

/// Appends `message` as one frame to `out`.
pub fn encode_frame<T: Serialize>(message: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    if let Err(error) = rmp_serde::encode::write_named(out, message) {
        out.truncate(start);
        return Err(error.into());
    }
    let length = out.len() - start - FRAME_HEADER_BYTES;
    if length > FRAME_BYTES_MAX {
        out.truncate(start);
        return Err(CodecError::FrameTooLarge { length, limit: FRAME_BYTES_MAX });
    }
    let prefix = u32::try_from(length).expect("bounded by FRAME_BYTES_MAX");
    out[start..start + FRAME_HEADER_BYTES].copy_from_slice(&prefix.to_be_bytes());
    Ok(())
}

/// The payload length a frame header declares, refused before anything is
/// read if it is beyond the limit.
pub fn frame_length(header: [u8; FRAME_HEADER_BYTES]) -> Result<usize, CodecError> {
    let length = u32::from_be_bytes(header) as usize;
    if length > FRAME_BYTES_MAX {
        return Err(CodecError::FrameTooLarge { length, limit: FRAME_BYTES_MAX });
    }
    Ok(length)
}

/// Decodes one message from a frame's payload (without its header).
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    if payload.len() > FRAME_BYTES_MAX {
        return Err(CodecError::FrameTooLarge { length: payload.len(), limit: FRAME_BYTES_MAX });
    }
    flashstock_msgpack::check_bounds(payload, DECODE_DEPTH_MAX)?;
    // A cursor over the payload: a string or binary longer than the payload
    // fails at the end of the bytes, never allocating what was declared.
    let mut deserializer = rmp_serde::Deserializer::new(std::io::Cursor::new(payload));
    deserializer.set_max_depth(DECODE_DEPTH_MAX);
    let message = T::deserialize(&mut deserializer)?;
    let trailing = payload.len() as u64 - deserializer.position();
    if trailing != 0 {
        let reason = format!("{trailing} bytes after the message");
        return Err(CodecError::Decode(rmp_serde::decode::Error::Syntax(reason)));
    }
    Ok(message)
}

/// Why a message could not be read from or written to a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame from `reader` and decodes it. The length is checked
/// before the payload is read, so a peer cannot make this allocate more
/// than [`FRAME_BYTES_MAX`].
pub async fn read_message<T, R>(reader: &mut R) -> Result<T, StreamError>
where
    T: DeserializeOwned,
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut header = [0; FRAME_HEADER_BYTES];
    reader.read_exact(&mut header).await?;
    let length = frame_length(header)?;
    let mut payload = vec![0; length];
    reader.read_exact(&mut payload).await?;
    Ok(decode_payload(&payload)?)
}

/// Encodes `message` as one frame and writes it to `writer`.
pub async fn write_message<T, W>(writer: &mut W, message: &T) -> Result<(), StreamError>
where
    T: Serialize,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let mut bytes = Vec::new();
    encode_frame(message, &mut bytes)?;
    writer.write_all(&bytes).await?;
    Ok(())
}

/// Decodes one whole frame (header and payload) from `bytes`, which must
/// hold exactly one frame.
pub fn decode_frame<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let header: [u8; FRAME_HEADER_BYTES] = bytes
        .get(..FRAME_HEADER_BYTES)
        .and_then(|header| header.try_into().ok())
        .ok_or(CodecError::Truncated { expected: FRAME_HEADER_BYTES, found: bytes.len() })?;
    let length = frame_length(header)?;
    let payload = &bytes[FRAME_HEADER_BYTES..];
    if payload.len() != length {
        return Err(CodecError::Truncated { expected: length, found: payload.len() });
    }
    decode_payload(payload)
}

/// Most entries one batch frame holds: bounds what one frame makes its
/// receiver decode and start at once (and the list it allocates for it).
/// At 256 the fixed cost of a frame is already spread thin; the client's
/// usual in-flight depth fits in one frame or two.
pub const BATCH_REQUESTS_MAX: usize = 256;

/// Bytes of a batch's list header: always a 32-bit array header, written
/// before the count is known and filled in at the end.
const BATCH_LIST_HEADER_BYTES: usize = 5;

/// Bytes around each entry's message: a two-element array header, the id
/// as a 64-bit unsigned integer and a 32-bit binary header.
const BATCH_ENTRY_ENVELOPE_BYTES: usize = 1 + 9 + 5;

/// Why a message was not added to a batch frame.
#[derive(Debug, thiserror::Error)]
pub enum BatchPushError {
    /// The frame holds as many entries or bytes as it may: send it and
    /// push the message into the next one.
    #[error("the batch frame is full")]
    Full,
    /// The message alone is larger than a frame (or does not encode): it
    /// can never be sent.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Builds one batch frame: a list of `[id, message]` entries, each message
/// MessagePack (fields by name) inside a binary of its own. The binary
/// wrapping lets the receiver split a frame into entries without decoding
/// their messages, so one undecodable message is refused under its own id
/// while the others in its frame are answered.
#[derive(Debug)]
pub struct BatchEncoder {
    bytes: Vec<u8>,
    entries: usize,
    entries_max: usize,
}

impl BatchEncoder {
    /// An empty frame that takes at most `entries_max` entries (capped at
    /// [`BATCH_REQUESTS_MAX`]; at least one).
    pub fn new(entries_max: usize) -> Self {
        let mut bytes = Vec::with_capacity(4096);
        bytes.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
        bytes.push(0xdd);
        bytes.extend_from_slice(&[0; 4]);
        Self { bytes, entries: 0, entries_max: entries_max.clamp(1, BATCH_REQUESTS_MAX) }
    }

    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Appends `message` under `id`, or leaves the frame as it was.
    pub fn push<T: Serialize>(&mut self, id: u64, message: &T) -> Result<(), BatchPushError> {
        if self.entries >= self.entries_max {
            return Err(BatchPushError::Full);
        }
        let start = self.bytes.len();
        self.bytes.push(0x92);
        self.bytes.push(0xcf);
        self.bytes.extend_from_slice(&id.to_be_bytes());
        self.bytes.push(0xc6);
        let length_at = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 4]);
        if let Err(error) = rmp_serde::encode::write_named(&mut self.bytes, message) {
            self.bytes.truncate(start);
            return Err(CodecError::from(error).into());
        }
        let length = self.bytes.len() - length_at - 4;
        if self.bytes.len() - FRAME_HEADER_BYTES > FRAME_BYTES_MAX {
            self.bytes.truncate(start);
            let alone = BATCH_LIST_HEADER_BYTES + BATCH_ENTRY_ENVELOPE_BYTES + length;
            if alone > FRAME_BYTES_MAX {
                return Err(CodecError::FrameTooLarge { length: alone, limit: FRAME_BYTES_MAX }.into());
            }
            return Err(BatchPushError::Full);
        }
        let length = u32::try_from(length).expect("bounded by FRAME_BYTES_MAX");
        self.bytes[length_at..length_at + 4].copy_from_slice(&length.to_be_bytes());
        self.entries += 1;
        Ok(())
    }

    /// The whole frame, length prefix included, ready to write.
    pub fn finish(mut self) -> Vec<u8> {
        let payload = u32::try_from(self.bytes.len() - FRAME_HEADER_BYTES).expect("bounded by FRAME_BYTES_MAX");
        self.bytes[..FRAME_HEADER_BYTES].copy_from_slice(&payload.to_be_bytes());
        let entries = u32::try_from(self.entries).expect("bounded by BATCH_REQUESTS_MAX");
        self.bytes[FRAME_HEADER_BYTES + 1..FRAME_HEADER_BYTES + BATCH_LIST_HEADER_BYTES]
            .copy_from_slice(&entries.to_be_bytes());
        self.bytes
    }
}

/// Splits a batch frame's payload into its entries, each an id and its
/// message's undecoded bytes (for [`decode_payload`]). Only the envelope is
/// read here: at most [`BATCH_REQUESTS_MAX`] entries, each exactly
/// `[id, binary]`, every binary within the payload, nothing after the last.
pub fn decode_batch(payload: &[u8]) -> Result<Vec<(u64, &[u8])>, CodecError> {
    fn malformed(error: impl std::fmt::Display) -> CodecError {
        CodecError::Batch(error.to_string())
    }
    if payload.len() > FRAME_BYTES_MAX {
        return Err(CodecError::FrameTooLarge { length: payload.len(), limit: FRAME_BYTES_MAX });
    }
    let mut rest = payload;
    let count = rmp::decode::read_array_len(&mut rest).map_err(malformed)? as usize;
    if count > BATCH_REQUESTS_MAX {
        return Err(CodecError::Batch(format!("{count} entries; a frame holds at most {BATCH_REQUESTS_MAX}")));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        if rmp::decode::read_array_len(&mut rest).map_err(malformed)? != 2 {
            return Err(CodecError::Batch("an entry is not [id, message]".to_owned()));
        }
        let id: u64 = rmp::decode::read_int(&mut rest).map_err(malformed)?;
        let length = rmp::decode::read_bin_len(&mut rest).map_err(malformed)? as usize;
        if length > rest.len() {
            return Err(CodecError::Truncated { expected: length, found: rest.len() });
        }
        let (message, after) = rest.split_at(length);
        entries.push((id, message));
        rest = after;
    }
    if !rest.is_empty() {
        return Err(CodecError::Batch(format!("{} bytes after the last entry", rest.len())));
    }
    Ok(entries)
}

/// Reads one frame's payload from `reader`, its length checked against
/// [`FRAME_BYTES_MAX`] before anything is allocated; `None` when the
/// stream ends cleanly between frames.
pub async fn read_payload<R>(reader: &mut R) -> Result<Option<Vec<u8>>, StreamError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut header = [0; FRAME_HEADER_BYTES];
    let mut filled = 0;
    while filled < FRAME_HEADER_BYTES {
        match reader.read(&mut header[filled..]).await? {
            0 if filled == 0 => return Ok(None),
            0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            read => filled += read,
        }
    }
    let length = frame_length(header)?;
    let mut payload = vec![0; length];
    reader.read_exact(&mut payload).await?;
    Ok(Some(payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reserve() -> Request {
        Request {
            timeout_ms: 2_000,
            body: RequestBody::Reserve {
                order: "order-1".to_owned(),
                buyer: "buyer-1".to_owned(),
                lines: vec![
                    WireLine { sku: "tv".to_owned(), quantity: WireQuantity::Exactly(1) },
                    WireLine { sku: "hdmi".to_owned(), quantity: WireQuantity::UpTo { max: 3, min: 1 } },
                ],
                ttl_ms: 60_000,
            },
        }
    }

    fn framed<T: Serialize>(message: &T) -> Vec<u8> {
        let mut bytes = Vec::new();
        encode_frame(message, &mut bytes).expect("encodes");
        bytes
    }

    #[test]
    fn messages_round_trip() {
        let request = reserve();
        assert_eq!(decode_frame::<Request>(&framed(&request)).expect("decodes"), request);
        let response = Response::Refused(Refusal::SoldOut { line: 1, sku: "tv".to_owned(), available: 0 });
        assert_eq!(decode_frame::<Response>(&framed(&response)).expect("decodes"), response);
        let welcome = Welcome::Accepted {
            version: PROTOCOL_VERSION,
            node: 2,
            map: PartitionMap {
                epoch: 1,
                partition_count: 64,
                members: vec![Member { id: 1, address: "127.0.0.1:7401".to_owned(), up: true }],
                replication: Some(ReplicationMap {
                    factor: 3,
                    groups: 6,
                    leaders: vec![GroupLeader { group: 1, leader: Some(2), term: 7 }],
                }),
            },
        };
        assert_eq!(decode_frame::<Welcome>(&framed(&welcome)).expect("decodes"), welcome);
    }

    #[test]
    fn an_oversized_frame_is_refused_before_reading_it() {
        let declared = u32::try_from(FRAME_BYTES_MAX + 1).expect("fits").to_be_bytes();
        assert!(matches!(frame_length(declared), Err(CodecError::FrameTooLarge { .. })));
        assert!(matches!(frame_length([0xff; 4]), Err(CodecError::FrameTooLarge { .. })));
        let huge = Request {
            timeout_ms: 1,
            body: RequestBody::Release { order: "x".repeat(FRAME_BYTES_MAX + 1), home_partition: 0 },
        };
        let mut out = vec![7];
        assert!(matches!(encode_frame(&huge, &mut out), Err(CodecError::FrameTooLarge { .. })));
        assert_eq!(out, vec![7], "a refused frame leaves nothing behind");
    }

    #[test]
    fn truncated_and_padded_frames_are_errors() {
        let bytes = framed(&reserve());
        for cut in 0..bytes.len() {
            assert!(decode_frame::<Request>(&bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(decode_frame::<Request>(&padded).is_err());
        let mut payload = bytes[FRAME_HEADER_BYTES..].to_vec();
        payload.push(0xc0);
        assert!(decode_payload::<Request>(&payload).is_err(), "trailing bytes accepted");
    }

    /// A `NotLeader` from a member of the version before terms were
    /// named reads with term 0 (no news), not as an error.
    #[test]
    fn a_not_leader_refusal_without_a_term_reads_as_term_zero() {
        #[derive(Serialize)]
        enum Before {
            NotLeader { group: u32, leader: Option<u32> },
        }
        let mut frame = Vec::new();
        encode_frame(&Before::NotLeader { group: 3, leader: Some(2) }, &mut frame).expect("encodes");
        let refusal: Refusal = decode_frame(&frame).expect("decodes");
        assert_eq!(refusal, Refusal::NotLeader { group: 3, leader: Some(2), term: 0 });
        let mut frame = Vec::new();
        encode_frame(&Refusal::NotLeader { group: 3, leader: None, term: 9 }, &mut frame).expect("encodes");
        assert_eq!(
            decode_frame::<Refusal>(&frame).expect("decodes"),
            Refusal::NotLeader { group: 3, leader: None, term: 9 }
        );
    }

    #[test]
    fn adversarial_payloads_are_errors_not_panics() {
        // 100,000 nested one-element arrays.
        let deep: Vec<u8> = std::iter::repeat_n(0x91, 100_000).chain([0xc0]).collect();
        assert!(decode_payload::<Request>(&deep).is_err());
        // A map whose unknown field holds deep nesting (serde skips unknown
        // fields recursively).
        let mut ignored = vec![0x82, 0xaa];
        ignored.extend_from_slice(b"timeout_ms");
        ignored.push(0x01);
        ignored.extend_from_slice(&[0xa5, b'e', b'x', b't', b'r', b'a']);
        ignored.extend(std::iter::repeat_n(0x91, 50_000));
        ignored.push(0xc0);
        assert!(decode_payload::<Request>(&ignored).is_err());
        // Arrays, maps, strings and binaries declaring 4 GiB.
        for marker in [0xdd, 0xdf, 0xdb, 0xc6] {
            let huge = [marker, 0xff, 0xff, 0xff, 0xff, 0x01];
            assert!(decode_payload::<Request>(&huge).is_err());
            assert!(decode_payload::<Response>(&huge).is_err());
        }
        // Right shape, wrong types.
        let wrong = framed(&(1u8, "two", [3.5f64]));
        assert!(decode_frame::<Request>(&wrong).is_err());
    }

    #[test]
    fn a_declared_length_beyond_the_payload_is_refused_before_serde_preallocates() {
        // A million-element array in ten bytes: serde would reserve a
        // megabyte of lines for it before reading the first.
        let mut frame = 6u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[0xdd, 0x00, 0x0f, 0x42, 0x40, 0xc0]);
        let error = decode_frame::<Request>(&frame).expect_err("refused");
        assert!(
            matches!(
                error,
                CodecError::Bounds(flashstock_msgpack::BoundsError::CountBeyondBytes {
                    offset: 0,
                    declared: 1_000_000,
                    remaining: 1
                })
            ),
            "{error:?}"
        );
        // The same inside a valid-looking request: the lines of a Reserve.
        let mut payload = framed(&reserve())[FRAME_HEADER_BYTES..].to_vec();
        let lines = payload.windows(6).position(|window| window == b"\xa5lines").expect("lines key") + 6;
        assert_eq!(payload[lines], 0x92, "two lines as a fixarray");
        payload.splice(lines..=lines, [0xdd, 0x00, 0x0f, 0x42, 0x40]);
        assert!(matches!(
            decode_payload::<Request>(&payload),
            Err(CodecError::Bounds(flashstock_msgpack::BoundsError::CountBeyondBytes { declared: 1_000_000, .. }))
        ));
        // A map of 2^32 - 1 entries in a Welcome.
        let huge_map = [0x81, 0xa8, b'A', b'c', b'c', b'e', b'p', b't', b'e', b'd', 0xdf, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(decode_payload::<Welcome>(&huge_map), Err(CodecError::Bounds(_))));
    }

    fn batch_of(count: usize) -> Vec<u8> {
        let mut batch = BatchEncoder::new(BATCH_REQUESTS_MAX);
        for id in 0..count {
            batch.push(id as u64 * 7, &reserve()).expect("fits");
        }
        batch.finish()
    }

    #[test]
    fn a_batch_splits_into_its_entries_and_each_decodes() {
        let frame = batch_of(3);
        let length = frame_length(frame[..FRAME_HEADER_BYTES].try_into().expect("header")).expect("bounded");
        assert_eq!(length, frame.len() - FRAME_HEADER_BYTES);
        let entries = decode_batch(&frame[FRAME_HEADER_BYTES..]).expect("splits");
        assert_eq!(entries.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [0, 7, 14]);
        for (_, bytes) in entries {
            assert_eq!(decode_payload::<Request>(bytes).expect("decodes"), reserve());
        }
        assert!(decode_batch(&batch_of(0)[FRAME_HEADER_BYTES..]).expect("an empty batch").is_empty());
    }

    /// A full frame refuses the next entry without changing, so that the
    /// entry opens the next frame; an entry that fits no frame is an error.
    #[test]
    fn a_batch_frame_stays_within_its_bounds() {
        let mut batch = BatchEncoder::new(2);
        batch.push(1, &reserve()).expect("fits");
        batch.push(2, &reserve()).expect("fits");
        assert!(matches!(batch.push(3, &reserve()), Err(BatchPushError::Full)));
        assert_eq!(decode_batch(&batch.finish()[FRAME_HEADER_BYTES..]).expect("splits").len(), 2);

        let big = |bytes: usize| Request {
            timeout_ms: 1,
            body: RequestBody::Release { order: "x".repeat(bytes), home_partition: 0 },
        };
        let mut batch = BatchEncoder::new(BATCH_REQUESTS_MAX);
        batch.push(1, &big(FRAME_BYTES_MAX / 2)).expect("fits");
        assert!(matches!(batch.push(2, &big(FRAME_BYTES_MAX / 2)), Err(BatchPushError::Full)));
        assert!(matches!(
            batch.push(3, &big(FRAME_BYTES_MAX)),
            Err(BatchPushError::Codec(CodecError::FrameTooLarge { .. }))
        ));
        assert_eq!(batch.len(), 1);
        let frame = batch.finish();
        assert!(frame.len() - FRAME_HEADER_BYTES <= FRAME_BYTES_MAX);
        assert_eq!(decode_batch(&frame[FRAME_HEADER_BYTES..]).expect("splits").len(), 1);
    }

    #[test]
    fn malformed_batches_are_errors_not_panics() {
        let payload = batch_of(2)[FRAME_HEADER_BYTES..].to_vec();
        for cut in 0..payload.len() {
            assert!(decode_batch(&payload[..cut]).is_err(), "cut at {cut} accepted");
        }
        let mut padded = payload.clone();
        padded.push(0);
        assert!(matches!(decode_batch(&padded), Err(CodecError::Batch(_))));
        // More entries than a frame may hold, declared in five bytes.
        assert!(matches!(decode_batch(&[0xdd, 0xff, 0xff, 0xff, 0xff]), Err(CodecError::Batch(_))));
        // An entry of three fields; an id that is not an integer; a binary
        // declared longer than the frame.
        assert!(decode_batch(&[0x91, 0x93, 0x01, 0xc4, 0x00, 0x01]).is_err());
        assert!(decode_batch(&[0x91, 0x92, 0xa1, b'x', 0xc4, 0x00]).is_err());
        assert!(matches!(
            decode_batch(&[0x91, 0x92, 0x01, 0xc6, 0x00, 0x01, 0x00, 0x00]),
            Err(CodecError::Truncated { expected: 65_536, found: 0 })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<Request>(&bytes);
            let _ = decode_payload::<Request>(&bytes);
            let _ = decode_payload::<Response>(&bytes);
            let _ = decode_payload::<Hello>(&bytes);
            let _ = decode_payload::<Welcome>(&bytes);
            if let Ok(entries) = decode_batch(&bytes) {
                prop_assert!(entries.len() <= BATCH_REQUESTS_MAX);
            }
        }

        #[test]
        fn mutated_valid_frames_never_panic(position in 0usize..200, value in any::<u8>(), cut in 0usize..200) {
            let mut bytes = framed(&reserve());
            let at = position % bytes.len();
            bytes[at] = value;
            bytes.truncate(bytes.len() - cut.min(bytes.len()));
            let _ = decode_frame::<Request>(&bytes);
        }
    }
}
