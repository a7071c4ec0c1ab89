//! Snapshots: every SKU's state at a log position, in canonical form, so
//! that recovery reads the snapshot and only the log after it.
//!
//! File: `snapshot-<last sequence covered, 20 digits>.snap` holding a
//! 24-byte header (magic `FSSN` 4, format version 3, zero 3, payload length
//! u64 8, CRC32C of the payload 4, zero 4; little-endian) and a MessagePack
//! payload: the limits in force, the open transactions, the order
//! coordinator's facts and every SKU with its reservations and remembered
//! admin operations. The same state
//! always encodes to the same bytes (SKUs sorted by id, each SKU's image
//! canonical), which lets tests compare replays byte for byte.
//!
//! Writing is crash-safe: a temporary file is written and synced, renamed
//! into place, and the directory synced; a crash leaves either the old
//! snapshot or the new one, never half of one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::coordination::CoordinatorRecord;
use crate::ids::{BuyerId, InvalidId, OperationId, OrderId, SkuId};
use crate::limits::Limits;
use crate::log::record::{OpenTransaction, TransactionLine, WireCoordinatorRecord, WireLimits};
use crate::log::storage::Storage;
use crate::sku::{AdminChange, EndingImage, Quantity, ReservationImage, ReserveLine, SkuImage, SkuSettings};

const SNAPSHOT_MAGIC: u32 = u32::from_le_bytes(*b"FSSN");
/// Version 2 added open transactions, version 3 the limits in force and
/// each SKU's remembered admin operations, version 4 the coordinator's
/// facts; files of every earlier version are still read (what they lack
/// reads as empty).
const SNAPSHOT_VERSION: u8 = 4;
const SNAPSHOT_HEADER_BYTES: usize = 24;
/// Deepest nesting a snapshot's MessagePack may have: a remembered admin
/// change nests 8 containers deep.
const SNAPSHOT_DEPTH_MAX: usize = 16;
/// Largest snapshot accepted: a member's SKUs (every partition it holds,
/// one log for all) with up to a million holds each fit well below; the
/// bound stops a corrupt length from making recovery allocate without
/// limit.
pub const SNAPSHOT_PAYLOAD_BYTES_MAX: u64 = 4 << 30;

/// Every SKU of the log as of sequence `last_sequence`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub last_sequence: u64,
    /// The partition count the SKUs were spread over; a log is only ever
    /// read back with the count it was written with.
    pub partition_count: u32,
    /// Sorted by SKU id.
    pub skus: Vec<(SkuId, SkuImage)>,
    /// Transactions begun and not ended, sorted by order id.
    pub transactions: Vec<(OrderId, OpenTransaction)>,
    /// The limits commands after this point were checked against; `None`
    /// in a snapshot of a log that never named them.
    pub limits: Option<Limits>,
    /// The order coordinator's records a restart needs, in replay order.
    pub coordinator: Vec<CoordinatorRecord>,
}

/// Why a snapshot cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{file}: {reason}")]
    Invalid { file: PathBuf, reason: String },
    #[error("{file}: {operation} failed: {source}")]
    Io {
        file: PathBuf,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize)]
/// The strings of the wire types are `S`: owned when read, borrowed from
/// the state when written (the same bytes; a snapshot encoded through
/// owned copies spent a third of its time making them).
struct WireSnapshot<S = String> {
    last_sequence: u64,
    partition_count: u32,
    skus: Vec<(S, WireSku<S>)>,
    /// Absent from version 1 files, which predate transactions.
    #[serde(default)]
    transactions: Vec<WireTransaction<S>>,
    /// Absent before version 3.
    #[serde(default)]
    limits: Option<WireLimits>,
    /// Absent before version 4.
    #[serde(default)]
    coordinator: Vec<WireCoordinatorRecord>,
}

#[derive(Serialize, Deserialize)]
struct WireTransaction<S = String> {
    order: S,
    lines: Vec<(S, Option<u32>)>,
    committed: bool,
}

#[derive(Serialize, Deserialize)]
struct WireSku<S = String> {
    counts: [u64; 5],
    units_per_buyer_max: Option<u32>,
    opens_at_ms: u64,
    clock_ms: u64,
    next_hold_number: u64,
    reservations: Vec<WireReservation<S>>,
    finished_queue: Vec<(u64, S)>,
    buyer_units: Vec<(S, u32)>,
    /// Absent before version 3.
    #[serde(default)]
    operations: Vec<(u64, S, WireAdminChange)>,
}

#[derive(Serialize, Deserialize)]
enum WireAdminChange {
    AddStock(u64),
    RemoveStock(u64),
    SetBuyerLimit(Option<u32>),
    OpenSale(u64),
    Create { initial_units: u64, units_per_buyer_max: Option<u32>, opens_at_ms: u64 },
}

#[derive(Serialize, Deserialize)]
struct WireReservation<S = String> {
    order: S,
    buyer: S,
    /// `(max, min)`; equal for an exact quantity, with `exact` set.
    quantity: (u32, u32, bool),
    ttl_ms: u64,
    units: u32,
    expires_at_ms: u64,
    number: u64,
    /// 0 live, 1 committed, 2 released, 3 expired, 4 live and prepared.
    ending: u8,
    committed_units: u32,
    requested_units: Option<u32>,
}

impl Snapshot {
    /// The snapshot file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let wire = WireSnapshot {
            last_sequence: self.last_sequence,
            partition_count: self.partition_count,
            skus: self.skus.iter().map(|(sku, image)| (sku.as_str(), wire_sku(image))).collect(),
            transactions: self
                .transactions
                .iter()
                .map(|(order, open)| WireTransaction {
                    order: order.as_str(),
                    lines: open.lines.iter().map(|line| (line.sku.as_str(), line.units)).collect(),
                    committed: open.committed,
                })
                .collect(),
            limits: self.limits.as_ref().map(WireLimits::of),
            coordinator: self.coordinator.iter().map(WireCoordinatorRecord::of).collect(),
        };
        // The payload is encoded in place after the header, whose length
        // and checksum are filled in after (no second copy of megabytes).
        let mut bytes = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + 64 * (self.coordinator.len() + self.skus.len()));
        bytes.extend_from_slice(&SNAPSHOT_MAGIC.to_le_bytes());
        bytes.push(SNAPSHOT_VERSION);
        bytes.extend_from_slice(&[0; 3]);
        bytes.extend_from_slice(&[0; 8]);
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&[0; 4]);
        debug_assert_eq!(bytes.len(), SNAPSHOT_HEADER_BYTES);
        rmp_serde::encode::write(&mut bytes, &wire).expect("snapshots always encode");
        let payload = &bytes[SNAPSHOT_HEADER_BYTES..];
        let (length, checksum) = (payload.len() as u64, crc32c::crc32c(payload));
        bytes[8..16].copy_from_slice(&length.to_le_bytes());
        bytes[16..20].copy_from_slice(&checksum.to_le_bytes());
        bytes
    }

    /// Reads a snapshot file's bytes; every check failure is a reason.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < SNAPSHOT_HEADER_BYTES {
            return Err("shorter than its header".to_owned());
        }
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"));
        if word(0) != SNAPSHOT_MAGIC {
            return Err("not a snapshot (bad magic)".to_owned());
        }
        if !(1..=SNAPSHOT_VERSION).contains(&bytes[4]) {
            return Err(format!("unknown snapshot version {}", bytes[4]));
        }
        if bytes[5..8] != [0; 3] || bytes[20..24] != [0; 4] {
            return Err("reserved header bytes are not zero".to_owned());
        }
        let length = u64::from_le_bytes(bytes[8..16].try_into().expect("eight bytes"));
        if length > SNAPSHOT_PAYLOAD_BYTES_MAX || length != (bytes.len() - SNAPSHOT_HEADER_BYTES) as u64 {
            return Err(format!("declared payload of {length} bytes does not match the file"));
        }
        let payload = &bytes[SNAPSHOT_HEADER_BYTES..];
        if crc32c::crc32c(payload) != word(16) {
            return Err("checksum mismatch".to_owned());
        }
        // Every declared length is checked against the bytes first, so
        // serde never reserves more than the payload could hold.
        flashstock_msgpack::check_bounds(payload, SNAPSHOT_DEPTH_MAX).map_err(|error| error.to_string())?;
        let wire: WireSnapshot = rmp_serde::from_slice(payload).map_err(|error| error.to_string())?;
        let mut skus = Vec::with_capacity(wire.skus.len());
        for (sku, image) in wire.skus {
            let sku = SkuId::new(sku).map_err(|error| error.to_string())?;
            skus.push((sku, engine_sku(image).map_err(|error| error.to_string())?));
        }
        if !skus.windows(2).all(|pair| pair[0].0 < pair[1].0) {
            return Err("SKUs out of order or repeated".to_owned());
        }
        let mut transactions = Vec::with_capacity(wire.transactions.len());
        for open in wire.transactions {
            let order = OrderId::new(open.order).map_err(|error| error.to_string())?;
            let lines = open
                .lines
                .into_iter()
                .map(|(sku, units)| Ok(TransactionLine { sku: SkuId::new(sku)?, units }))
                .collect::<Result<_, InvalidId>>()
                .map_err(|error| error.to_string())?;
            transactions.push((order, OpenTransaction { lines, committed: open.committed }));
        }
        if !transactions.windows(2).all(|pair| pair[0].0 < pair[1].0) {
            return Err("transactions out of order or repeated".to_owned());
        }
        let limits = wire.limits.map(WireLimits::limits).transpose().map_err(|error| error.to_string())?;
        let coordinator = wire
            .coordinator
            .into_iter()
            .map(WireCoordinatorRecord::record)
            .collect::<Result<_, _>>()
            .map_err(|error| error.to_string())?;
        Ok(Self {
            last_sequence: wire.last_sequence,
            partition_count: wire.partition_count,
            skus,
            transactions,
            limits,
            coordinator,
        })
    }
}

fn wire_sku(image: &SkuImage) -> WireSku<&str> {
    WireSku {
        counts: [image.units_added, image.units_removed, image.available, image.held, image.sold],
        units_per_buyer_max: image.units_per_buyer_max,
        opens_at_ms: image.opens_at_ms,
        clock_ms: image.clock_ms,
        next_hold_number: image.next_hold_number,
        reservations: image
            .reservations
            .iter()
            .map(|reservation| {
                let (ending, committed_units, requested_units) = match reservation.ending {
                    None if reservation.prepared => (4, 0, None),
                    None => (0, 0, None),
                    Some(EndingImage::Committed { units, requested }) => (1, units, requested),
                    Some(EndingImage::Released) => (2, 0, None),
                    Some(EndingImage::Expired) => (3, 0, None),
                };
                let quantity = match reservation.line.quantity {
                    Quantity::Exactly(units) => (units, units, true),
                    Quantity::UpTo { max, min } => (max, min, false),
                };
                WireReservation {
                    order: reservation.line.order.as_str(),
                    buyer: reservation.line.buyer.as_str(),
                    quantity,
                    ttl_ms: reservation.line.ttl_ms,
                    units: reservation.units,
                    expires_at_ms: reservation.expires_at_ms,
                    number: reservation.number,
                    ending,
                    committed_units,
                    requested_units,
                }
            })
            .collect(),
        finished_queue: image.finished_queue.iter().map(|(at, order)| (*at, order.as_str())).collect(),
        buyer_units: image.buyer_units.iter().map(|(buyer, units)| (buyer.as_str(), *units)).collect(),
        operations: image
            .operations
            .iter()
            .map(|(at_ms, operation, change)| {
                let change = match *change {
                    AdminChange::AddStock { units } => WireAdminChange::AddStock(units),
                    AdminChange::RemoveStock { units } => WireAdminChange::RemoveStock(units),
                    AdminChange::SetBuyerLimit { units_per_buyer_max } => {
                        WireAdminChange::SetBuyerLimit(units_per_buyer_max)
                    }
                    AdminChange::OpenSale { opens_at_ms } => WireAdminChange::OpenSale(opens_at_ms),
                    AdminChange::Create { settings } => WireAdminChange::Create {
                        initial_units: settings.initial_units,
                        units_per_buyer_max: settings.units_per_buyer_max,
                        opens_at_ms: settings.opens_at_ms,
                    },
                };
                (*at_ms, operation.as_str(), change)
            })
            .collect(),
    }
}

#[derive(Debug, thiserror::Error)]
enum ImageError {
    #[error(transparent)]
    Id(#[from] InvalidId),
    #[error("unknown reservation ending {0}")]
    Ending(u8),
    #[error("{0} out of order or repeated")]
    NotCanonical(&'static str),
}

fn engine_sku(wire: WireSku) -> Result<SkuImage, ImageError> {
    let [units_added, units_removed, available, held, sold] = wire.counts;
    let mut reservations = Vec::with_capacity(wire.reservations.len());
    for reservation in wire.reservations {
        let (max, min, exact) = reservation.quantity;
        let ending = match reservation.ending {
            0 | 4 => None,
            1 => Some(EndingImage::Committed {
                units: reservation.committed_units,
                requested: reservation.requested_units,
            }),
            2 => Some(EndingImage::Released),
            3 => Some(EndingImage::Expired),
            other => return Err(ImageError::Ending(other)),
        };
        reservations.push(ReservationImage {
            line: ReserveLine {
                order: OrderId::new(reservation.order)?,
                buyer: BuyerId::new(reservation.buyer)?,
                quantity: if exact { Quantity::Exactly(max) } else { Quantity::UpTo { max, min } },
                ttl_ms: reservation.ttl_ms,
            },
            units: reservation.units,
            expires_at_ms: reservation.expires_at_ms,
            number: reservation.number,
            prepared: reservation.ending == 4,
            ending,
        });
    }
    let finished_queue = wire
        .finished_queue
        .into_iter()
        .map(|(at, order)| Ok((at, OrderId::new(order)?)))
        .collect::<Result<_, InvalidId>>()?;
    let buyer_units: Vec<(BuyerId, u32)> = wire
        .buyer_units
        .into_iter()
        .map(|(buyer, units)| Ok((BuyerId::new(buyer)?, units)))
        .collect::<Result<_, InvalidId>>()?;
    // A snapshot is canonical (equal states, equal bytes): anything in
    // another order is not one the engine wrote, and restoring it would
    // give an image other than the one decoded.
    if !reservations.windows(2).all(|pair| pair[0].line.order < pair[1].line.order) {
        return Err(ImageError::NotCanonical("reservations"));
    }
    if !buyer_units.windows(2).all(|pair| pair[0].0 < pair[1].0) {
        return Err(ImageError::NotCanonical("buyers"));
    }
    let operations = wire
        .operations
        .into_iter()
        .map(|(at_ms, operation, change)| {
            let change = match change {
                WireAdminChange::AddStock(units) => AdminChange::AddStock { units },
                WireAdminChange::RemoveStock(units) => AdminChange::RemoveStock { units },
                WireAdminChange::SetBuyerLimit(units_per_buyer_max) => {
                    AdminChange::SetBuyerLimit { units_per_buyer_max }
                }
                WireAdminChange::OpenSale(opens_at_ms) => AdminChange::OpenSale { opens_at_ms },
                WireAdminChange::Create { initial_units, units_per_buyer_max, opens_at_ms } => {
                    AdminChange::Create { settings: SkuSettings { initial_units, units_per_buyer_max, opens_at_ms } }
                }
            };
            Ok((at_ms, OperationId::new(operation)?, change))
        })
        .collect::<Result<_, InvalidId>>()?;
    Ok(SkuImage {
        units_added,
        units_removed,
        available,
        held,
        sold,
        units_per_buyer_max: wire.units_per_buyer_max,
        opens_at_ms: wire.opens_at_ms,
        clock_ms: wire.clock_ms,
        next_hold_number: wire.next_hold_number,
        reservations,
        finished_queue,
        buyer_units,
        operations,
    })
}

fn snapshot_name(last_sequence: u64) -> String {
    format!("snapshot-{last_sequence:020}.snap")
}

/// The sequence number a snapshot file's name says it covers.
pub(crate) fn snapshot_sequence_of(path: &Path) -> Option<u64> {
    path.file_name()?.to_str()?.strip_prefix("snapshot-")?.strip_suffix(".snap")?.parse().ok()
}

/// Writes `snapshot` into `directory` crash-safely and returns its path.
/// Older snapshots are left for the caller to remove once this one is
/// known durable (it is, when this returns).
pub fn write_snapshot(storage: &dyn Storage, directory: &Path, snapshot: &Snapshot) -> Result<PathBuf, SnapshotError> {
    let io = |file: &Path, operation: &'static str| {
        let file = file.to_path_buf();
        move |source| SnapshotError::Io { file, operation, source }
    };
    let final_path = directory.join(snapshot_name(snapshot.last_sequence));
    let temporary = directory.join(format!("{}.tmp", snapshot_name(snapshot.last_sequence)));
    let mut file = storage.open_append(&temporary).map_err(io(&temporary, "create"))?;
    file.append(&snapshot.encode()).map_err(io(&temporary, "write"))?;
    file.sync_data().map_err(io(&temporary, "fdatasync"))?;
    storage.rename(&temporary, &final_path).map_err(io(&temporary, "rename"))?;
    storage.sync_dir(directory).map_err(io(directory, "sync directory"))?;
    Ok(final_path)
}

/// The newest snapshot in `directory`, if any. A damaged newest snapshot is
/// an error (the log it covers may already be gone), never skipped.
pub fn load_newest_snapshot(storage: &dyn Storage, directory: &Path) -> Result<Option<Snapshot>, SnapshotError> {
    let listed = storage.list(directory).map_err(|source| SnapshotError::Io {
        file: directory.to_path_buf(),
        operation: "list",
        source,
    })?;
    let Some((sequence, path)) =
        listed.into_iter().filter_map(|path| snapshot_sequence_of(&path).map(|sequence| (sequence, path))).max()
    else {
        return Ok(None);
    };
    let bytes =
        storage.read(&path).map_err(|source| SnapshotError::Io { file: path.clone(), operation: "read", source })?;
    let snapshot = Snapshot::decode(&bytes).map_err(|reason| SnapshotError::Invalid { file: path.clone(), reason })?;
    if snapshot.last_sequence != sequence {
        let reason = format!("names sequence {sequence} but holds {}", snapshot.last_sequence);
        return Err(SnapshotError::Invalid { file: path, reason });
    }
    Ok(Some(snapshot))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;
    use crate::log::storage::{MemoryStorage, UnsyncedFate};
    use crate::sku::{SkuCommand, SkuSettings, SkuState};

    fn busy_sku(seed: u64) -> SkuState {
        let mut state = SkuState::new(
            SkuSettings { initial_units: 50, units_per_buyer_max: Some(4), opens_at_ms: 0 },
            Limits::default(),
        )
        .expect("valid");
        for index in 0..20u64 {
            let order = OrderId::new(format!("order-{}", (index * 7 + seed) % 13)).expect("id");
            let command = match index % 5 {
                0 | 1 => SkuCommand::Reserve(ReserveLine {
                    order,
                    buyer: BuyerId::new(format!("buyer-{}", index % 5)).expect("id"),
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

    fn snapshot_of(states: &[(&str, &SkuState)], last_sequence: u64) -> Snapshot {
        let mut skus: Vec<(SkuId, SkuImage)> =
            states.iter().map(|(sku, state)| (SkuId::new(sku).expect("id"), state.image())).collect();
        skus.sort_by(|a, b| a.0.cmp(&b.0));
        let lines = vec![
            TransactionLine { sku: SkuId::new("a").expect("id"), units: None },
            TransactionLine { sku: SkuId::new("b").expect("id"), units: Some(1) },
        ];
        let transactions = vec![(OrderId::new("order-1").expect("id"), OpenTransaction { lines, committed: true })];
        let order = OrderId::new("order-2").expect("id");
        let held_line = |sku: &str, index: usize| crate::coordination::HeldLine {
            sku: SkuId::new(sku).expect("id"),
            quantity: Quantity::UpTo { max: 3, min: 1 },
            units: 2,
            member: 2,
            index,
        };
        let coordinator = vec![
            CoordinatorRecord::Epoch { epoch: 3 },
            CoordinatorRecord::Held {
                order: order.clone(),
                buyer: BuyerId::new("buyer-1").expect("id"),
                ttl_ms: 5_000,
                attempt: OrderId::new("~1.3.7").expect("id"),
                lines: vec![held_line("a", 0), held_line("b", 2)],
                expires_at_ms: 9_000,
            },
            CoordinatorRecord::Decided { order: order.clone(), units: vec![2, 1] },
            CoordinatorRecord::Ended {
                order,
                outcome: crate::coordination::Outcome::Committed { units: vec![2, 1] },
                now_ms: 8_000,
            },
        ];
        Snapshot { last_sequence, partition_count: 4, skus, transactions, limits: None, coordinator }
    }

    #[test]
    fn snapshots_round_trip_and_equal_states_encode_to_equal_bytes() {
        let (first, second) = (busy_sku(1), busy_sku(1));
        let snapshot = snapshot_of(&[("b", &first), ("a", &busy_sku(2))], 42);
        let decoded = Snapshot::decode(&snapshot.encode()).expect("decodes");
        assert_eq!(decoded, snapshot);
        // Two replays of the same history: identical bytes, whatever the maps' layout.
        assert_eq!(snapshot_of(&[("x", &first)], 1).encode(), snapshot_of(&[("x", &second)], 1).encode());
        let restored = SkuState::from_image(decoded.skus[1].1.clone(), Limits::default()).expect("consistent");
        assert_eq!(restored.image(), busy_sku(1).image());
    }

    /// Found by the `snapshot_decode` fuzz target: a snapshot whose SKU
    /// listed its reservations out of order was accepted, and restoring it
    /// gave another image than the one decoded. Not canonical, so refused.
    #[test]
    fn a_snapshot_out_of_canonical_order_is_refused() {
        let mut snapshot = snapshot_of(&[("a", &busy_sku(3))], 7);
        snapshot.skus[0].1.reservations.reverse();
        assert!(snapshot.skus[0].1.reservations.len() > 1);
        let refused = Snapshot::decode(&snapshot.encode()).expect_err("out of order");
        assert!(refused.contains("reservations out of order"), "{refused}");
        let mut snapshot = snapshot_of(&[("a", &busy_sku(3))], 7);
        snapshot.skus[0].1.buyer_units.reverse();
        assert!(snapshot.skus[0].1.buyer_units.len() > 1);
        assert!(Snapshot::decode(&snapshot.encode()).expect_err("out of order").contains("buyers"));
    }

    #[test]
    fn damaged_snapshots_are_refused_with_a_reason() {
        let bytes = snapshot_of(&[("a", &busy_sku(3))], 7).encode();
        for position in [0, 4, 6, 9, 17, 22, SNAPSHOT_HEADER_BYTES + 5, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[position] ^= 0x20;
            assert!(Snapshot::decode(&damaged).is_err(), "flip at {position} accepted");
        }
        assert!(Snapshot::decode(&bytes[..bytes.len() - 1]).is_err(), "truncated accepted");
    }

    #[test]
    fn a_crash_while_writing_leaves_the_previous_snapshot() {
        let storage = MemoryStorage::new();
        let directory = Path::new("/data/log");
        let old = snapshot_of(&[("a", &busy_sku(4))], 10);
        write_snapshot(&storage, directory, &old).expect("written");
        // The next snapshot's bytes are written but the process dies before
        // the rename: recovery finds the old one.
        let mut file = storage.open_append(&directory.join("snapshot-00000000000000000020.snap.tmp")).expect("open");
        file.append(&snapshot_of(&[("a", &busy_sku(5))], 20).encode()).expect("append");
        storage.crash(UnsyncedFate::TornAfter { bytes: 100 });
        assert_eq!(load_newest_snapshot(&storage, directory).expect("loads"), Some(old));
    }

    #[test]
    fn a_damaged_newest_snapshot_stops_recovery() {
        let storage = MemoryStorage::new();
        let directory = Path::new("/data/log");
        let path = write_snapshot(&storage, directory, &snapshot_of(&[("a", &busy_sku(6))], 3)).expect("written");
        storage.flip_bit(&path, 40, 1).expect("flip");
        assert!(
            matches!(load_newest_snapshot(&storage, directory), Err(SnapshotError::Invalid { file, .. }) if file == path)
        );
    }
}
