//! The decoders of replication's bytes on arbitrary input: a record of a
//! member's raft log (`decode_write`, and the recovery scan that reads a
//! whole file of them), a raft message from a peer (`decode_message`) and
//! a peer's batch (`decode_batch`), and an entry's data as the log
//! records it holds (`entry_records`). raft-rs's types are protobuf, whose
//! decoder reserves what a length declares (up to 10 MB) before it checks
//! the bytes are there: the targets assert that our framing keeps every
//! allocation within a bound of the input, and that whatever decodes
//! round-trips through the encoder.
#![no_main]

use flashstock_engine::replication::codec::{
    decode_message, decode_write, encode_message, encode_write, entry_records, push_entry_record,
};
use flashstock_fuzz::{allocation_bound, largest_allocation_during, TrackingAllocator};
use flashstock_node::raft_log::{frame, read_records};
use flashstock_node::replication::{decode_batch, encode_batch};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

fn check_write(payload: &[u8]) {
    let (decoded, largest) = largest_allocation_during(|| decode_write(payload));
    assert!(largest <= allocation_bound(payload.len()), "a write of {} bytes allocated {largest}", payload.len());
    let Ok((group, write)) = decoded else { return };
    let encoded = encode_write(group, &write);
    assert_eq!(decode_write(&encoded), Ok((group, write)), "a decoded write does not round-trip");
}

fn check_message(bytes: &[u8]) {
    let (decoded, largest) = largest_allocation_during(|| decode_message(bytes));
    assert!(largest <= allocation_bound(bytes.len()), "a message of {} bytes allocated {largest}", bytes.len());
    let Ok((group, message)) = decoded else { return };
    let encoded = encode_message(group, &message);
    assert_eq!(decode_message(&encoded), Ok((group, message)), "a decoded message does not round-trip");
}

fn check_batch(bytes: &[u8]) {
    let (decoded, largest) = largest_allocation_during(|| decode_batch(bytes));
    assert!(largest <= allocation_bound(bytes.len()), "a batch of {} bytes allocated {largest}", bytes.len());
    let Ok(batch) = decoded else { return };
    let encoded = encode_batch(&batch.raft, &batch.items);
    assert_eq!(decode_batch(&encoded).expect("a re-encoded batch decodes"), batch, "a batch does not round-trip");
}

/// An entry's records: each within the data, and built again from them
/// the same bytes (a records entry) or the one record it was.
fn check_entry(data: &[u8]) {
    let (decoded, largest) = largest_allocation_during(|| entry_records(data));
    assert!(largest <= allocation_bound(data.len()), "an entry of {} bytes allocated {largest}", data.len());
    let Ok(records) = decoded else { return };
    if records.len() == 1 && records[0].len() == data.len() {
        return;
    }
    let mut rebuilt = Vec::new();
    for record in &records {
        push_entry_record(&mut rebuilt, record);
    }
    if records.is_empty() {
        rebuilt = data.to_vec();
    }
    assert_eq!(rebuilt, data, "an entry of records does not round-trip");
}

/// The recovery scan: the good prefix never exceeds the input, and a
/// payload framed alone is one record exactly when it decodes.
fn check_scan(bytes: &[u8]) {
    let (scanned, largest) = largest_allocation_during(|| read_records(bytes));
    assert!(largest <= allocation_bound(bytes.len()), "a scan of {} bytes allocated {largest}", bytes.len());
    if let Ok((recovered, good)) = scanned {
        assert!(good <= bytes.len());
        assert!(recovered.records <= good / 8, "more records than headers");
    }
    let mut framed = Vec::new();
    frame(bytes, &mut framed);
    match (read_records(&framed), decode_write(bytes)) {
        (Ok((recovered, good)), Ok(_)) => assert_eq!((recovered.records, good), (1, framed.len())),
        (Err(undecodable), Err(error)) => assert_eq!((undecodable.offset, undecodable.error), (0, error)),
        (scanned, decoded) => panic!("a framed payload scans as {scanned:?} but decodes as {decoded:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    check_write(data);
    check_message(data);
    check_batch(data);
    check_scan(data);
    check_entry(data);
});
