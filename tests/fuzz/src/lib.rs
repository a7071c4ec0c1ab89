//! What the fuzz targets share: an allocator that remembers the largest
//! single allocation (so a target can assert that a decoder's memory is
//! bounded by its input, which "no crash" would never show), the depth
//! caps the targets check with, and the seed inputs, built by the real
//! encoders (`examples/write_seeds.rs` writes them into `corpus/`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use flashstock_client::wire;
use flashstock_engine::coordination::{CoordinatorRecord, HeldLine, Outcome};
use flashstock_engine::log::frame;
use flashstock_engine::log::record::{LogRecord, OpenTransaction, TransactionLine};
use flashstock_engine::log::snapshot::Snapshot;
use flashstock_engine::sku::{AdminChange, ReserveLine};
use flashstock_engine::{BuyerId, Limits, OperationId, OrderId, Quantity, SkuCommand, SkuId, SkuSettings, SkuState};

/// The system allocator, noting the largest block asked for.
#[derive(Debug)]
pub struct TrackingAllocator;

static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// only addition is an atomic maximum, which neither allocates nor panics.
unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        unsafe { System.dealloc(pointer, layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(pointer, layout, new_size) }
    }
}

/// Runs `work` and returns its result with the largest single allocation
/// made meanwhile (the targets are single-threaded).
pub fn largest_allocation_during<R>(work: impl FnOnce() -> R) -> (R, usize) {
    LARGEST_ALLOCATION.store(0, Ordering::Relaxed);
    let result = work();
    (result, LARGEST_ALLOCATION.load(Ordering::Relaxed))
}

/// The most a decoder may allocate at once for `input_bytes` of input once
/// every declared length is bounded by the bytes: an element needs at least
/// one byte of input and the largest decoded element (a snapshot's SKU) is
/// under 256 bytes in memory; the constant covers fixed buffers. serde's
/// unbounded preallocation (a megabyte for a few bytes) is far beyond it.
pub fn allocation_bound(input_bytes: usize) -> usize {
    256 * input_bytes + 64 * 1024
}

/// Depth the engine's log decoders accept (rmp-serde's default), so that
/// "the bounds check accepts everything the decoder accepts" is checked at
/// the decoder's own cap.
pub const LOG_DECODER_DEPTH_MAX: usize = 1024;

/// Depth the log's own encoders reach, with room to spare: the cap the
/// report proposes for calling the bounds check in the log decoders.
pub const LOG_RECORD_DEPTH_MAX: usize = 16;

/// A seed input: which target it is for, its file name, its bytes.
#[derive(Debug)]
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

fn id<T>(make: fn(&str) -> Result<T, flashstock_engine::InvalidId>, text: &str) -> T {
    make(text).unwrap_or_else(|error| panic!("seed id {text:?}: {error}"))
}

fn order(text: &str) -> OrderId {
    id(|text| OrderId::new(text), text)
}

fn sku(text: &str) -> SkuId {
    id(|text| SkuId::new(text), text)
}

fn buyer(text: &str) -> BuyerId {
    id(|text| BuyerId::new(text), text)
}

fn operation(text: &str) -> OperationId {
    id(|text| OperationId::new(text), text)
}

fn payload<T: serde::Serialize>(message: &T) -> Vec<u8> {
    let mut framed = Vec::new();
    wire::encode_frame(message, &mut framed).unwrap_or_else(|error| panic!("seed message: {error}"));
    framed.split_off(wire::FRAME_HEADER_BYTES)
}

fn framed<T: serde::Serialize>(message: &T) -> Vec<u8> {
    let mut framed = Vec::new();
    wire::encode_frame(message, &mut framed).unwrap_or_else(|error| panic!("seed message: {error}"));
    framed
}

fn wire_seeds() -> Vec<Seed> {
    use wire::*;
    let map = PartitionMap {
        epoch: 3,
        partition_count: 64,
        members: vec![
            Member { id: 1, address: "127.0.0.1:7401".to_owned(), up: true },
            Member { id: 2, address: "127.0.0.1:7402".to_owned(), up: false },
        ],
        replication: Some(ReplicationMap {
            factor: 3,
            groups: 6,
            leaders: vec![GroupLeader { group: 1, leader: Some(2), term: 7 }],
        }),
    };
    let stock = WireStock { available: 7, held: 2, sold: 1 };
    let line_result = WireLineResult { sku: "tv".to_owned(), units: 2, stock };
    let request = |body: RequestBody| Request { timeout_ms: 2_000, body };
    let requests = [
        request(RequestBody::Reserve {
            order: "order-1".to_owned(),
            buyer: "buyer-1".to_owned(),
            lines: vec![
                WireLine { sku: "tv".to_owned(), quantity: WireQuantity::Exactly(1) },
                WireLine { sku: "hdmi".to_owned(), quantity: WireQuantity::UpTo { max: 3, min: 1 } },
            ],
            ttl_ms: 60_000,
        }),
        request(RequestBody::Commit {
            order: "order-1".to_owned(),
            home_partition: 5,
            fewer: vec![("hdmi".to_owned(), 1)],
        }),
        request(RequestBody::Release { order: "order-1".to_owned(), home_partition: 5 }),
        request(RequestBody::Availability { sku: "tv".to_owned() }),
        request(RequestBody::PartitionMap),
        request(RequestBody::CreateSku {
            sku: "tv".to_owned(),
            initial_units: 100,
            units_per_buyer_max: Some(2),
            opens_at_ms: 1_000,
            operation: "operation-1".to_owned(),
        }),
        request(RequestBody::SetBuyerLimit {
            sku: "tv".to_owned(),
            units_per_buyer_max: None,
            operation: "operation-2".to_owned(),
        }),
        request(RequestBody::Part {
            order: "order-2".to_owned(),
            attempt: "~1.2.3".to_owned(),
            step: 4,
            request: WirePartRequest::Reserve {
                buyer: "buyer-2".to_owned(),
                lines: vec![WireLine { sku: "tv".to_owned(), quantity: WireQuantity::Exactly(2) }],
                ttl_ms: 5_000,
            },
        }),
        request(RequestBody::Part {
            order: "order-2".to_owned(),
            attempt: "~1.2.3".to_owned(),
            step: 6,
            request: WirePartRequest::Commit { lines: vec![("tv".to_owned(), Some(1))] },
        }),
    ];
    let responses = [
        Response::Reserved {
            order: "order-1".to_owned(),
            home_partition: 5,
            expires_at_ms: 61_000,
            lines: vec![line_result.clone()],
        },
        Response::Settled { order: "order-1".to_owned(), lines: vec![line_result], replayed: true },
        Response::PartitionMap(map.clone()),
        Response::NodeStatus {
            node: 1,
            skus: 2,
            stock,
            sees_down: vec![2],
            hottest_skus: vec![("tv".to_owned(), stock)],
        },
        Response::Done,
        Response::Part(WirePartAnswer::Held { units: vec![2], stock: vec![stock], expires_at_ms: 9_000 }),
        Response::Part(WirePartAnswer::Refused {
            line: 0,
            refusal: Refusal::Expired { expired_at_ms: 9_000 },
        }),
        Response::Refused(Refusal::SoldOut { line: 0, sku: "tv".to_owned(), available: 0 }),
        Response::Refused(Refusal::Invalid { field: "lines".to_owned(), reason: "empty".to_owned() }),
        Response::Refused(Refusal::Forbidden),
    ];
    let mut seeds = Vec::new();
    let mut add = |name: String, bytes: Vec<u8>| seeds.push(Seed { target: "wire_decode", name, bytes });
    for (index, message) in requests.iter().enumerate() {
        add(format!("request-{index}"), payload(message));
    }
    for (index, message) in responses.iter().enumerate() {
        add(format!("response-{index}"), payload(message));
    }
    add("hello".to_owned(), payload(&Hello { versions: vec![PROTOCOL_VERSION], agent: "checkout-eu-3".to_owned(), boot: None }));
    add("welcome-accepted".to_owned(), payload(&Welcome::Accepted { version: PROTOCOL_VERSION, node: 1, map }));
    add("welcome-refused".to_owned(), payload(&Welcome::Refused { supported: vec![1] }));
    add("frame-request".to_owned(), framed(&requests[0]));
    add("frame-response".to_owned(), framed(&responses[3]));
    let mut batch = wire::BatchEncoder::new(wire::BATCH_REQUESTS_MAX);
    for (id, message) in requests.iter().enumerate() {
        batch.push(id as u64, message).expect("fits");
    }
    add("batch-requests".to_owned(), batch.finish()[wire::FRAME_HEADER_BYTES..].to_vec());
    seeds
}

fn records() -> Vec<LogRecord> {
    let line = ReserveLine {
        order: order("order-1"),
        buyer: buyer("buyer-1"),
        quantity: Quantity::UpTo { max: 3, min: 1 },
        ttl_ms: 5_000,
    };
    let apply = |command: SkuCommand| LogRecord::Apply { sku: sku("tv"), now_ms: 1_700, command };
    vec![
        LogRecord::CreateSku {
            sku: sku("tv"),
            settings: SkuSettings { initial_units: 50, units_per_buyer_max: Some(4), opens_at_ms: 0 },
            now_ms: 1_000,
            operation: Some(operation("operation-1")),
        },
        LogRecord::RulesInForce { limits: Limits::default() },
        apply(SkuCommand::Admin {
            operation: Some(operation("operation-2")),
            change: AdminChange::AddStock { units: 10 },
        }),
        apply(SkuCommand::Admin { operation: None, change: AdminChange::SetBuyerLimit { units_per_buyer_max: None } }),
        apply(SkuCommand::Reserve(line)),
        apply(SkuCommand::Reserve(ReserveLine {
            order: order("order-2"),
            buyer: buyer("buyer-2"),
            quantity: Quantity::Exactly(2),
            ttl_ms: 5_000,
        })),
        apply(SkuCommand::Commit { order: order("order-1"), units: Some(2) }),
        apply(SkuCommand::Release { order: order("order-2") }),
        apply(SkuCommand::Expire),
        LogRecord::TransactionBegun {
            order: order("order-3"),
            lines: vec![
                TransactionLine { sku: sku("tv"), units: None },
                TransactionLine { sku: sku("hdmi"), units: Some(1) },
            ],
        },
        apply(SkuCommand::Prepare { order: order("order-3") }),
        LogRecord::TransactionCommitted { order: order("order-3") },
        LogRecord::TransactionEnded { order: order("order-3") },
    ]
    .into_iter()
    .chain(coordinator_records().into_iter().map(LogRecord::Coordinator))
    .collect()
}

fn coordinator_records() -> Vec<CoordinatorRecord> {
    let line = |name: &str, member: u32, index: usize| HeldLine {
        sku: sku(name),
        quantity: Quantity::UpTo { max: 3, min: 1 },
        units: 2,
        member,
        index,
    };
    vec![
        CoordinatorRecord::Epoch { epoch: 2 },
        CoordinatorRecord::Held {
            order: order("order-4"),
            buyer: buyer("buyer-4"),
            ttl_ms: 5_000,
            attempt: order("~1.2.1"),
            lines: vec![line("tv", 1, 0), line("hdmi", 2, 1)],
            expires_at_ms: 9_000,
        },
        CoordinatorRecord::Decided { order: order("order-4"), units: vec![2, 1] },
        CoordinatorRecord::ReleaseDecided { order: order("order-5") },
        CoordinatorRecord::Ended {
            order: order("order-4"),
            outcome: Outcome::Committed { units: vec![2, 1] },
            now_ms: 8_000,
        },
        CoordinatorRecord::Ended { order: order("order-6"), outcome: Outcome::Expired { expired_at_ms: 7_000 }, now_ms: 7_500 },
        CoordinatorRecord::Forgotten { order: order("order-6") },
    ]
}

fn log_seeds() -> Vec<Seed> {
    let records = records();
    let mut seeds = Vec::new();
    let mut segment = Vec::new();
    for (index, record) in records.iter().enumerate() {
        let encoded = record.encode();
        let mut single = Vec::new();
        frame::encode_frame(1, &encoded, &mut single);
        seeds.push(Seed { target: "log_scan", name: format!("record-{index}"), bytes: single });
        frame::encode_frame(1 + index as u64, &encoded, &mut segment);
    }
    let mut torn = segment.clone();
    torn.truncate(segment.len() - 3);
    let mut preallocated = segment.clone();
    preallocated.resize(segment.len() + 64, 0);
    seeds.push(Seed { target: "log_scan", name: "segment".to_owned(), bytes: segment });
    seeds.push(Seed { target: "log_scan", name: "segment-torn".to_owned(), bytes: torn });
    seeds.push(Seed { target: "log_scan", name: "segment-preallocated".to_owned(), bytes: preallocated });
    seeds
}

fn busy_sku(seed: u64) -> SkuState {
    let settings = SkuSettings { initial_units: 50, units_per_buyer_max: Some(4), opens_at_ms: 0 };
    let mut state = SkuState::new(settings, Limits::default()).unwrap_or_else(|error| panic!("seed SKU: {error}"));
    for index in 0..12u64 {
        let order = order(&format!("order-{}", (index * 7 + seed) % 5));
        let command = match index % 5 {
            0 | 1 => SkuCommand::Reserve(ReserveLine {
                order,
                buyer: buyer(&format!("buyer-{}", index % 3)),
                quantity: if index % 3 == 0 { Quantity::UpTo { max: 3, min: 1 } } else { Quantity::Exactly(2) },
                ttl_ms: 5_000,
            }),
            2 => SkuCommand::Commit { order, units: None },
            3 => SkuCommand::Release { order },
            _ => SkuCommand::Prepare { order },
        };
        state.apply(1_000 + index * 700, &command);
    }
    state
}

fn snapshot_seeds() -> Vec<Seed> {
    let transaction = OpenTransaction {
        lines: vec![TransactionLine { sku: sku("a"), units: None }, TransactionLine { sku: sku("b"), units: Some(1) }],
        committed: true,
    };
    let snapshots = [
        Snapshot {
            last_sequence: 0,
            partition_count: 64,
            skus: Vec::new(),
            transactions: Vec::new(),
            limits: None,
            coordinator: Vec::new(),
        },
        Snapshot {
            last_sequence: 42,
            partition_count: 4,
            skus: vec![(sku("a"), busy_sku(1).image()), (sku("b"), busy_sku(2).image())],
            transactions: vec![(order("order-1"), transaction)],
            limits: Some(Limits::default()),
            coordinator: coordinator_records(),
        },
        Snapshot {
            last_sequence: 7,
            partition_count: 1,
            skus: vec![(sku("tv"), busy_sku(3).image())],
            transactions: Vec::new(),
            limits: None,
            coordinator: Vec::new(),
        },
    ];
    snapshots
        .iter()
        .enumerate()
        .map(|(index, snapshot)| Seed {
            target: "snapshot_decode",
            name: format!("snapshot-{index}"),
            bytes: snapshot.encode(),
        })
        .collect()
}

fn config_seeds(shipped_cluster_toml: &str) -> Vec<Seed> {
    let minimal = "[cluster]\nname = \"x\"\npartitions = 4\n";
    let members = format!(
        "{minimal}[tls]\ndirectory = \"certs\"\n[storage]\ndata_directory = \"data\"\nsegment_bytes_max = 65536\n\
         [network]\nconnections_max = 16\n\
         [[members]]\nid = 1\naddress = \"127.0.0.1:7401\"\ndata_directory = \"data/1\"\nmetrics_address = \"127.0.0.1:9401\"\n\
         [[members]]\nid = 2\naddress = \"[::1]:7402\"\ndata_directory = \"data/2\"\n"
    );
    [("cluster.toml", shipped_cluster_toml.to_owned()), ("minimal.toml", minimal.to_owned()), ("members.toml", members)]
        .into_iter()
        .map(|(name, text)| Seed { target: "config_parse", name: name.to_owned(), bytes: text.into_bytes() })
        .collect()
}

fn raft_seeds() -> Vec<Seed> {
    use flashstock_engine::replication::codec::{encode_message, encode_write, push_entry_record};
    use flashstock_engine::replication::{RaftMessage, ReplicaWrite};
    use flashstock_node::replication::{encode_batch, PeerItem};
    use raft_proto::eraftpb::{Entry, HardState, MessageType, Snapshot};

    let entry = |index: u64, data: &[u8]| Entry { index, term: 2, data: data.to_vec().into(), ..Entry::default() };
    let mut snapshot = Snapshot { data: b"snapshot".to_vec().into(), ..Snapshot::default() };
    snapshot.mut_metadata().index = 9;
    snapshot.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
    let writes = [
        ReplicaWrite::Entries(vec![entry(1, b"first"), entry(2, b""), entry(3, &[0x92, 0x01, 0x02])]),
        ReplicaWrite::HardState(HardState { term: 3, vote: 1, commit: 2, ..HardState::default() }),
        ReplicaWrite::Snapshot(snapshot),
        ReplicaWrite::Compact { index: 4 },
    ];
    let append = RaftMessage {
        msg_type: MessageType::MsgAppend,
        from: 1,
        to: 2,
        term: 2,
        log_term: 2,
        index: 1,
        commit: 1,
        entries: vec![entry(2, b"x"), entry(3, b"yz")].into(),
        ..RaftMessage::default()
    };
    let heartbeat = RaftMessage { msg_type: MessageType::MsgHeartbeat, from: 1, to: 3, term: 2, ..RaftMessage::default() };
    let mut seeds = Vec::new();
    let mut log = Vec::new();
    for (index, write) in writes.iter().enumerate() {
        let payload = encode_write(1 + index as u32, write);
        flashstock_node::raft_log::frame(&payload, &mut log);
        seeds.push(Seed { target: "raft_decode", name: format!("write-{index}"), bytes: payload });
    }
    seeds.push(Seed { target: "raft_decode", name: "log".to_owned(), bytes: log });
    seeds.push(Seed { target: "raft_decode", name: "message".to_owned(), bytes: encode_message(2, &append) });
    let items = [PeerItem::PartNotLeader { group: 2, leader: Some(3) }, PeerItem::Replace { group: 1, replica: 1 << 32 | 3 }];
    let batch = encode_batch(&[(1, append), (2, heartbeat)], &items);
    seeds.push(Seed { target: "raft_decode", name: "batch".to_owned(), bytes: batch });
    let mut entry_data = Vec::new();
    for record in records().iter().take(3) {
        push_entry_record(&mut entry_data, &record.encode());
    }
    seeds.push(Seed { target: "raft_decode", name: "entry-of-records".to_owned(), bytes: entry_data });
    seeds
}

/// Every seed, for every target; `shipped_cluster_toml` is the text of the
/// repository's `cluster.toml`.
pub fn seeds(shipped_cluster_toml: &str) -> Vec<Seed> {
    let mut seeds = wire_seeds();
    seeds.extend(log_seeds());
    seeds.extend(snapshot_seeds());
    seeds.extend(raft_seeds());
    seeds.extend(config_seeds(shipped_cluster_toml));
    seeds
}
